//! A Redis server of the test's own: `/usr/bin/redis-server` (or `TOLLGATE_TEST_REDIS_SERVER`)
//! on a free port with its data in a temp dir, so a test can really stop it mid-load and start
//! it again on the same port — an outage of the process itself, which a relay in front of the
//! shared server (127.0.0.1:6379, never touched here) only imitates.
//!
//! Without the binary the tests skip with the reason; with `CI` set they fail instead, as
//! `require_redis` in `fleet.rs` does. The process is killed when the guard drops.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct OwnRedis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

fn binary() -> PathBuf {
    std::env::var_os("TOLLGATE_TEST_REDIS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/redis-server".into())
}

/// A port nothing listens on now (the kernel's choice; released at once for the server).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl OwnRedis {
    /// Started and answering PING; `None` (after saying why) when there is no redis-server
    /// and CI is not set.
    pub async fn start(test: &str) -> Option<OwnRedis> {
        let bin = binary();
        if !bin.exists() {
            let why = format!("no {}", bin.display());
            if std::env::var_os("CI").is_none() {
                eprintln!("SKIPPED {test}: {why}");
                return None;
            }
            panic!("CI is set, so {test} may not be skipped: {why}");
        }
        let mut r = OwnRedis {
            port: free_port(),
            dir: crate::common::temp_dir("own-redis"),
            child: None,
        };
        r.spawn().await;
        Some(r)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// `[store]` lines for a gateway on this server.
    pub fn store(&self) -> String {
        format!("budgets = \"{}\"\nredis_prefix = \"tgtest:\"", self.url())
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Starts the server (again) on the same port; it loads `dump.rdb` from its dir if a
    /// `SHUTDOWN SAVE` left one. Returns once it answers PING.
    pub async fn spawn(&mut self) {
        assert!(!self.is_running(), "already running");
        // No automatic snapshots, no AOF: the only data a restart finds is what
        // `shutdown_saving` wrote on purpose.
        let child = Command::new(binary())
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--dbfilename", "dump.rdb", "--protected-mode", "no"])
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ping = redis::Client::open(self.url().as_str())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            // LOADING (an RDB being read) is an error reply too: wait for PONG.
            if ping.is_ok() {
                return;
            }
            assert!(self.is_running(), "redis-server exited: {}", self.log());
            assert!(
                Instant::now() < deadline,
                "redis-server does not answer: {ping:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `SHUTDOWN SAVE`: the server writes its data to `dump.rdb` and exits; returns once the
    /// process is gone. The next `spawn` finds the data again.
    pub async fn shutdown_saving(&mut self) {
        let mut c = redis::Client::open(self.url().as_str())
            .unwrap()
            .get_connection()
            .unwrap();
        // The server closes the connection instead of answering.
        let _ = redis::cmd("SHUTDOWN").arg("SAVE").query::<()>(&mut c);
        self.wait_exit().await;
        assert!(self.dir.join("dump.rdb").exists(), "{}", self.log());
    }

    /// SIGKILL, and the snapshot (if any) removed: the next `spawn` starts empty, as a Redis
    /// without persistence does after a crash.
    pub async fn kill_losing_data(&mut self) {
        if let Some(c) = self.child.as_mut() {
            c.kill().unwrap();
        }
        self.wait_exit().await;
        let _ = std::fs::remove_file(self.dir.join("dump.rdb"));
    }

    async fn wait_exit(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.is_running() {
            assert!(Instant::now() < deadline, "redis-server did not exit");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.child = None;
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
