//! A real PostgreSQL for the fleet tests (127.0.0.1:5432, or `TOLLGATE_TEST_POSTGRES` as
//! host:port; trust auth, as this machine type runs it): each test makes a database of its
//! own through the `test` database and drops it.
//! Without a server the tests skip with the reason; with `CI` set they fail instead, so CI
//! cannot pass by skipping them.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// host:port of the server.
pub fn server() -> String {
    std::env::var("TOLLGATE_TEST_POSTGRES").unwrap_or_else(|_| "127.0.0.1:5432".into())
}

/// A database of its own, dropped at the end.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// `None` (after saying why) when there is no server and this is not CI.
    pub async fn new(what: &str) -> Option<TestDb> {
        static N: AtomicU32 = AtomicU32::new(0);
        let admin = match admin().await {
            Ok(c) => c,
            Err(why) if std::env::var_os("CI").is_none() => {
                eprintln!("SKIPPED {what}: no PostgreSQL at {} ({why})", server());
                return None;
            }
            Err(why) => panic!(
                "CI is set, so {what} may not be skipped: no PostgreSQL at {} ({why})",
                server()
            ),
        };
        let name = format!(
            "tollgate_t_{what}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        // One statement each: a multi-statement string runs as one transaction, which
        // CREATE DATABASE refuses.
        for sql in [
            format!("DROP DATABASE IF EXISTS {name}"),
            format!("CREATE DATABASE {name}"),
        ] {
            admin.batch_execute(&sql).await.unwrap();
        }
        Some(TestDb {
            url: format!("postgres://postgres@{}/{name}", server()),
            name,
        })
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await.unwrap()
    }

    /// Every row's request id with its replica, HTTP status and ledger status.
    pub async fn rows(&self) -> Vec<Row> {
        rows_of(&self.client().await).await
    }

    /// Request ids with how often each is there.
    pub async fn ids(&self) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for r in self.rows().await {
            *out.entry(r.id).or_default() += 1;
        }
        out
    }
}

/// Every ledger row the client's database holds, as [`Row`]s.
pub async fn rows_of(client: &tokio_postgres::Client) -> Vec<Row> {
    client
        .query("SELECT id, replica, http_status, status FROM requests", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| Row {
            id: r.get(0),
            replica: r.get(1),
            http_status: r.get(2),
            status: r.get(3),
        })
        .collect()
}

#[derive(Debug, Clone)]
pub struct Row {
    pub id: String,
    pub replica: String,
    pub http_status: i32,
    pub status: String,
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime: a thread of its own with a runtime of its own.
        #[allow(clippy::disallowed_methods)]
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(c) = admin().await {
                    let _ = c
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

pub async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

async fn admin() -> Result<tokio_postgres::Client, String> {
    let url = format!("postgres://postgres@{}/test", server());
    match tokio::time::timeout(Duration::from_secs(3), connect(&url)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer in 3 s".into()),
    }
}

/// A TCP proxy to PostgreSQL that a test can cut (every connection closed, new ones refused)
/// and restore: an outage of one replica's path to the database, without touching the
/// machine's server.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Bumped on each cut: connections of an older generation close.
    generation: std::sync::Arc<AtomicU32>,
}

impl Proxy {
    pub async fn start() -> Proxy {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let generation = Arc::new(AtomicU32::new(0));
        let (up2, gen2) = (up.clone(), generation.clone());
        let target = server();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !up2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let born = gen2.load(Ordering::SeqCst);
                let (generation, target) = (gen2.clone(), target.clone());
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    let cut = async {
                        while generation.load(Ordering::SeqCst) == born {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            up,
            generation,
        }
    }

    /// The test database's URL through this proxy.
    pub fn url(&self, db: &TestDb) -> String {
        format!("postgres://postgres@{}/{}", self.addr, db.name)
    }

    /// Returns once every open connection has seen the cut (they poll every 10 ms).
    pub async fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}
