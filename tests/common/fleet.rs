//! A real Redis for the fleet tests: `TOLLGATE_TEST_REDIS` or 127.0.0.1:6379, each test under
//! its own key prefix, deleted when it ends. Off machines that run Redis the tests skip with a
//! printed reason; with `CI` set they fail instead, so CI cannot pass by skipping them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub fn redis_url() -> String {
    std::env::var("TOLLGATE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// A Redis to test against, under a fresh prefix; `None` (the test returns) when there is
/// none and CI is not set.
pub fn require_redis(test: &str) -> Option<TestRedis> {
    let url = redis_url();
    let reachable = redis::Client::open(url.as_str())
        .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(500)))
        .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
    match reachable {
        Ok(_) => {}
        Err(why) if std::env::var_os("CI").is_none() => {
            eprintln!("SKIPPED {test}: no Redis at {url} ({why})");
            return None;
        }
        Err(why) => panic!("CI is set, so {test} may not be skipped: no Redis at {url} ({why})"),
    }
    let mut r = [0u8; 6];
    getrandom::fill(&mut r).unwrap();
    let tag: String = r.iter().map(|b| format!("{b:02x}")).collect();
    Some(TestRedis {
        url,
        prefix: format!("tgtest-{tag}:"),
    })
}

/// A Redis and the key prefix that is this test's alone.
pub struct TestRedis {
    pub url: String,
    pub prefix: String,
}

impl TestRedis {
    /// `[store]` lines for a gateway on this Redis.
    pub fn store(&self) -> String {
        self.store_via(&self.url)
    }

    /// `[store]` lines for a gateway that reaches this Redis at `url` (a relay).
    pub fn store_via(&self, url: &str) -> String {
        format!("budgets = \"{url}\"\nredis_prefix = \"{}\"", self.prefix)
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url.as_str())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Every key of this test.
    pub fn keys(&self) -> Vec<String> {
        let mut conn = self.conn();
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}*", self.prefix))
                .arg("COUNT")
                .arg(1000)
                .query(&mut conn)
                .unwrap();
            keys.extend(batch);
            if next == 0 {
                return keys;
            }
            cursor = next;
        }
    }

    /// Deletes this test's keys, as a flush of the whole Redis would.
    pub fn flush(&self) {
        let keys = self.keys();
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL").arg(keys).query(&mut self.conn()).unwrap();
        }
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.flush();
    }
}

/// A TCP relay in front of Redis that can be cut (every connection dropped, new ones closed
/// at once) and mended: Redis going down and coming back, without touching the shared server.
pub struct Relay {
    pub addr: std::net::SocketAddr,
    up: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
}

impl Relay {
    pub async fn start(target: &str) -> Relay {
        let target = target
            .trim_start_matches("redis://")
            .split('/')
            .next()
            .unwrap()
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let (cut, cuts) = watch::channel(0u64);
        let is_up = up.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !is_up.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let mut cuts = cuts.clone();
                // Only cuts from now on end this connection.
                cuts.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        Relay { addr, up, cut }
    }

    /// The Redis URL through this relay, database included.
    pub fn url(&self, db_url: &str) -> String {
        let db = db_url.rsplit_once('/').map_or("0", |(_, d)| d);
        format!("redis://{}/{db}", self.addr)
    }

    pub fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    pub fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// A Redis Cluster of three primaries, started for one test from the machine's `redis-server`
/// and `redis-cli` (in a temporary directory, on free ports, nothing persisted) and stopped
/// when dropped. Skips with a printed reason where they are not installed, unless CI is set.
pub struct TestCluster {
    pub ports: Vec<u16>,
    servers: Vec<std::process::Child>,
    dir: std::path::PathBuf,
}

impl TestCluster {
    pub fn require(test: &str) -> Option<TestCluster> {
        Self::installed(test).then(|| Self::start(Self::free_ports()))
    }

    /// Whether redis-server and redis-cli are there (else the test skips, or fails in CI).
    pub fn installed(test: &str) -> bool {
        let installed = ["redis-server", "redis-cli"].iter().all(|b| {
            std::process::Command::new(b)
                .arg("--version")
                .stdout(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        if !installed {
            let why = "redis-server and redis-cli are not both installed";
            if std::env::var_os("CI").is_none() {
                eprintln!("SKIPPED {test}: {why}");
                return false;
            }
            panic!("CI is set, so {test} may not be skipped: {why}");
        }
        true
    }

    /// Three ports free now, each with its cluster bus port (+ 10000) free too.
    pub fn free_ports() -> Vec<u16> {
        let mut ports = Vec::new();
        while ports.len() < 3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if port <= 55_000
                && !ports.contains(&port)
                && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
            {
                ports.push(port);
            }
        }
        ports
    }

    /// Starts a node on each port and makes them one cluster.
    pub fn start(ports: Vec<u16>) -> TestCluster {
        let dir = std::env::temp_dir().join(format!(
            "tollgate-cluster-{}-{}",
            std::process::id(),
            ports[0]
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cluster = TestCluster {
            ports: Vec::new(),
            servers: Vec::new(),
            dir,
        };
        for port in ports {
            let node_dir = cluster.dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            let server = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&node_dir)
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            cluster.ports.push(port);
            cluster.servers.push(server);
        }
        for &port in &cluster.ports {
            cluster.wait(port, "PING", |r| r == "PONG");
        }
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let created = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap();
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        for &port in &cluster.ports {
            cluster.wait(port, "CLUSTER INFO", |r| r.contains("cluster_state:ok"));
        }
        cluster
    }

    /// Asks one node until its answer passes `ok` (10 s at most).
    fn wait(&self, port: u16, cmd: &str, ok: impl Fn(&str) -> bool) {
        let mut last = String::new();
        for _ in 0..200 {
            let answer = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
                .and_then(|mut c| {
                    let mut words = cmd.split(' ');
                    let mut q = redis::cmd(words.next().unwrap());
                    q.arg(words.collect::<Vec<_>>());
                    q.query::<String>(&mut c)
                });
            match answer {
                Ok(r) if ok(&r) => return,
                Ok(r) => last = r,
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("node 127.0.0.1:{port} never answered `{cmd}` as expected: {last}");
    }

    /// `store.budgets` naming two of the nodes (the client learns the third).
    pub fn store(&self, prefix: &str) -> String {
        Self::store_on(&self.ports, prefix)
    }

    /// `[store]` lines for a cluster on these ports, started or not.
    pub fn store_on(ports: &[u16], prefix: &str) -> String {
        format!(
            "budgets = \"redis://127.0.0.1:{},redis://127.0.0.1:{}\"\nredis_cluster = true\nredis_prefix = \"{prefix}\"",
            ports[0], ports[1]
        )
    }

    /// Keys held by each node.
    pub fn keys_per_node(&self) -> Vec<usize> {
        self.ports
            .iter()
            .map(|p| {
                let mut c = redis::Client::open(format!("redis://127.0.0.1:{p}/"))
                    .unwrap()
                    .get_connection()
                    .unwrap();
                redis::cmd("DBSIZE").query::<usize>(&mut c).unwrap()
            })
            .collect()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis speaking only TLS (`rediss://`), its certificate signed by a certificate authority
/// made for the test with `openssl`: what `store.redis_ca_file` is for. Started from the
/// machine's `redis-server` in a temporary directory, stopped when dropped; skips with a
/// printed reason where the tools are not installed, unless CI is set.
pub struct TestTlsRedis {
    pub port: u16,
    /// The CA's certificate (PEM).
    pub ca: std::path::PathBuf,
    server: std::process::Child,
    dir: std::path::PathBuf,
}

impl TestTlsRedis {
    pub fn require(test: &str) -> Option<TestTlsRedis> {
        let installed = [("redis-server", "--version"), ("openssl", "version")]
            .iter()
            .all(|(b, arg)| {
                std::process::Command::new(b)
                    .arg(arg)
                    .stdout(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            });
        if !installed {
            let why = "redis-server and openssl are not both installed";
            if std::env::var_os("CI").is_none() {
                eprintln!("SKIPPED {test}: {why}");
                return None;
            }
            panic!("CI is set, so {test} may not be skipped: {why}");
        }
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tollgate-tls-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec_key = "ec_paramgen_curve:prime256v1";
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            ec_key,
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=tollgate-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            ec_key,
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.pem",
        ]);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = std::process::Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args([
                "--tls-cert-file",
                "server.pem",
                "--tls-key-file",
                "server.key",
            ])
            .args(["--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no"])
            .args(["--save", "", "--appendonly", "no"])
            .current_dir(&dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let tls = TestTlsRedis {
            port,
            ca: dir.join("ca.pem"),
            server,
            dir,
        };
        for _ in 0..200 {
            let pong = std::process::Command::new("redis-cli")
                .args(["--tls", "--cacert"])
                .arg(&tls.ca)
                .args(["-p", &port.to_string(), "PING"])
                .output();
            if pong.is_ok_and(|o| o.stdout.starts_with(b"PONG")) {
                return Some(tls);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the TLS Redis on port {port} never answered");
    }
}

impl Drop for TestTlsRedis {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
