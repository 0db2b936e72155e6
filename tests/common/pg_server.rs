//! A PostgreSQL instance of the test's own (Debian's binaries, `/usr/lib/postgresql/15/bin` or
//! `TOLLGATE_TEST_PG_BIN`): `initdb` in a temp dir, a free port on 127.0.0.1, trust auth, so a
//! test can really stop the server (`pg_ctl stop -m fast`) for as long as it wants and start
//! it again, or run it with TLS — neither of which it may do to the shared server.
//!
//! PostgreSQL refuses to run as root, and the tests run as root here: the server then runs as
//! the `postgres` user (`runuser -u postgres --`) in a dir that user owns. Without the
//! binaries the tests skip with the reason; with `CI` set they fail instead.
#![allow(dead_code)]

use crate::pg::Row;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct OwnPg {
    pub port: u16,
    pub dir: PathBuf,
    /// `-c name=value` settings every start gets.
    settings: Vec<String>,
    running: bool,
}

fn bin(name: &str) -> PathBuf {
    std::env::var_os("TOLLGATE_TEST_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/lib/postgresql/15/bin".into())
        .join(name)
}

fn as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// `cmd args…`, as the `postgres` user when we are root.
fn run_as_owner(cmd: &Path, args: &[&str]) -> std::process::Output {
    let mut c = if as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(cmd);
        c
    } else {
        Command::new(cmd)
    };
    c.args(args).output().expect("runs")
}

/// A port nothing listens on now (the kernel's choice; released at once for the server).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl OwnPg {
    /// `initdb` and start with `settings` (`ssl=on`, …); `hba` replaces `pg_hba.conf` when
    /// given. `None` (after saying why) when it cannot run here and CI is not set.
    pub async fn start(test: &str, settings: &[&str], hba: Option<&str>) -> Option<OwnPg> {
        let mut pg = Self::init(test, hba)?;
        for s in settings {
            pg.set(s);
        }
        pg.start_again().await;
        Some(pg)
    }

    /// `initdb` only: files (certificates) and settings can be added before the first start.
    pub fn init(test: &str, hba: Option<&str>) -> Option<OwnPg> {
        if let Err(why) = Self::usable() {
            if std::env::var_os("CI").is_none() {
                eprintln!("SKIPPED {test}: {why}");
                return None;
            }
            panic!("CI is set, so {test} may not be skipped: {why}");
        }
        let dir = crate::common::temp_dir("own-pg");
        if as_root() {
            // The server's user must own its data dir, and reach it.
            let st = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(st.success());
            // /tmp is; a TMPDIR under /root is not, and its modes are not the test's to change.
            let reach = run_as_owner(Path::new("test"), &["-w", dir.to_str().unwrap()]);
            assert!(
                reach.status.success(),
                "the postgres user cannot write {}: set TMPDIR to a dir it can reach",
                dir.display()
            );
        }
        let data = dir.join("data");
        let out = run_as_owner(
            &bin("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        assert!(out.status.success(), "initdb: {out:?}");
        if let Some(hba) = hba {
            std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
        }
        Some(OwnPg {
            port: free_port(),
            dir,
            settings: Vec::new(),
            running: false,
        })
    }

    fn usable() -> Result<(), String> {
        for b in ["initdb", "pg_ctl", "postgres"] {
            if !bin(b).exists() {
                return Err(format!("no {}", bin(b).display()));
            }
        }
        if as_root() {
            let ok = Command::new("runuser")
                .args(["-u", "postgres", "--", "true"])
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return Err("running as root, and `runuser -u postgres` fails".into());
            }
        }
        Ok(())
    }

    /// A `name=value` setting for the next starts.
    pub fn set(&mut self, setting: &str) {
        self.settings.push(setting.to_string());
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// A file in the data dir, owned by the server's user (certificates, keys).
    pub fn put(&self, name: &str, text: &[u8], mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.data().join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        if as_root() {
            Command::new("chown")
                .arg("postgres:postgres")
                .arg(&path)
                .status()
                .unwrap();
        }
    }

    /// `pg_ctl start -w`: returns once the server accepts connections.
    pub async fn start_again(&mut self) {
        let mut opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off",
            self.port,
            self.dir.display()
        );
        for s in &self.settings {
            opts.push_str(" -c ");
            opts.push_str(s);
        }
        let (data, log) = (self.data(), self.dir.join("postgres.log"));
        let out = tokio::task::spawn_blocking(move || {
            run_as_owner(
                &bin("pg_ctl"),
                &[
                    "-D",
                    data.to_str().unwrap(),
                    "-l",
                    log.to_str().unwrap(),
                    "-w",
                    "-o",
                    &opts,
                    "start",
                ],
            )
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {out:?}\n{}",
            self.log()
        );
        self.running = true;
    }

    /// `pg_ctl stop -m fast -w`: every session is ended and the server is gone on return.
    pub async fn stop(&mut self) {
        let data = self.data();
        let out = tokio::task::spawn_blocking(move || {
            run_as_owner(
                &bin("pg_ctl"),
                &["-D", data.to_str().unwrap(), "-m", "fast", "-w", "stop"],
            )
        })
        .await
        .unwrap();
        assert!(out.status.success(), "pg_ctl stop: {out:?}");
        self.running = false;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A client over the server's Unix socket, as the test's own reader: it works whatever
    /// `pg_hba.conf` says of TCP (keep a `local` line when replacing it).
    pub async fn socket_client(&self, db: &str) -> tokio_postgres::Client {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host_path(&self.dir)
            .port(self.port)
            .user("postgres")
            .dbname(db);
        let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        client
    }

    /// Makes database `db` and returns its URL.
    pub async fn create_db(&self, db: &str) -> String {
        self.socket_client("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .unwrap();
        self.url(db)
    }

    /// Every ledger row of `db` (id, replica, statuses).
    pub async fn rows(&self, db: &str) -> Vec<Row> {
        crate::pg::rows_of(&self.socket_client(db).await).await
    }
}

impl Drop for OwnPg {
    fn drop(&mut self) {
        if self.running {
            let data = self.data();
            // Immediate: nothing of this instance is kept.
            let _ = run_as_owner(
                &bin("pg_ctl"),
                &[
                    "-D",
                    data.to_str().unwrap(),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
