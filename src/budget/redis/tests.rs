//! The scripts against a real Redis (`TOLLGATE_TEST_REDIS` or 127.0.0.1:6379), each test
//! under its own prefix. Without Redis they skip with a note, unless `CI` is set.

use super::*;
use crate::clock::ManualClock;
use crate::secret::Secret;

const T0: i64 = 1_795_343_400_000_000; // 2026-11-22T10:30:00Z

struct Scratch {
    book: RedisBook,
    url: String,
    prefix: String,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let Ok(mut conn) = redis::Client::open(self.url.as_str()).and_then(|c| c.get_connection())
        else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query(&mut conn)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(keys).query(&mut conn);
        }
    }
}

fn test_redis() -> String {
    std::env::var("TOLLGATE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

async fn scratch(test: &str) -> Option<Scratch> {
    scratch_via(test, &test_redis()).await
}

/// A scratch book that reaches Redis at `book_url` (a relay), cleaned up through Redis itself.
async fn scratch_via(test: &str, book_url: &str) -> Option<Scratch> {
    let url = test_redis();
    let mut id = [0u8; 6];
    getrandom::fill(&mut id).unwrap();
    let prefix = format!(
        "tgunit-{}:",
        id.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let cfg = RedisStore {
        url: Secret::new(book_url),
        cluster: false,
        ca_file: None,
        prefix: prefix.clone(),
        timeout: Duration::from_millis(500),
        lease: Duration::from_secs(60),
        fail_open_share: 0.1,
    };
    let book = RedisBook::new(cfg, Arc::new(ManualClock::new(T0)), Tasks::new()).unwrap();
    if !book.start().await.unwrap() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set, so {test} may not be skipped: no Redis at {url}"
        );
        eprintln!("SKIPPED {test}: no Redis at {url}");
        return None;
    }
    Some(Scratch { book, url, prefix })
}

fn team(budgets: Vec<Budget>) -> Team {
    Team {
        name: "search".into(),
        key_hashes: vec![],
        tags: Default::default(),
        request_tags: vec![],
        regions: vec![],
        budgets,
    }
}

fn tokens(n: i64) -> Demand {
    Demand { nusd: 0, tokens: n }
}

fn budget(window: Window, nusd: Option<i64>, tokens: Option<u64>, per_key: bool) -> Budget {
    Budget {
        window,
        tokens,
        usd: nusd.map(|n| n as f64 / 1e9),
        nusd,
        soft_ratio: None,
        per_key,
        fail_open: false,
    }
}

#[tokio::test]
async fn a_request_is_reserved_in_every_window_or_in_none() {
    let Some(s) = scratch("a_request_is_reserved_in_every_window_or_in_none").await else {
        return;
    };
    let t = team(vec![
        budget(Window::Month, Some(1_000), None, false),
        budget(Window::Day, None, Some(10), true),
    ]);
    let (k1, k2): (Arc<str>, Arc<str>) = ("k1".into(), "k2".into());
    let d = Demand {
        nusd: 300,
        tokens: 4,
    };
    let (a, room) = s.book.admit(&t, &k1, d).await.unwrap();
    assert_eq!((room.nusd, room.tokens), (Some(700), Some(6)));
    let (_b, _) = s.book.admit(&t, &k1, d).await.unwrap();
    // k1's day tokens are short (8 + 4 > 10): refused there, and the month keeps nothing of it.
    match s.book.admit(&t, &k1, d).await {
        Err(Refusal::Over(o)) => {
            assert_eq!(o.window, Window::Day);
            assert_eq!(o.kind, LimitKind::Tokens);
            assert_eq!(o.key_id.as_deref(), Some("k1"));
            assert_eq!((o.limit, o.used), (10, 8));
        }
        other => panic!("{other:?}"),
    }
    // Another key has its own day budget; the team's month is shared: 600 + 300 fits.
    let (_c, room) = s.book.admit(&t, &k2, d).await.unwrap();
    assert_eq!(room.nusd, Some(100));
    match s.book.admit(&t, &k2, d).await {
        Err(Refusal::Over(o)) => assert_eq!((o.window, o.kind), (Window::Month, LimitKind::Usd)),
        other => panic!("{other:?}"),
    }
    assert!(
        a.settle_confirmed(
            Demand {
                nusd: 100,
                tokens: 1
            },
            T0
        )
        .await
    );
    let v = s.book.view(&[Arc::new(t)]).await.unwrap();
    let month = &v[0];
    assert_eq!((month.spent.nusd, month.reserved.nusd), (100, 600));
    let mut days: Vec<_> = v[1..]
        .iter()
        .map(|d| (d.key_id.clone().unwrap(), d.spent.tokens, d.reserved.tokens))
        .collect();
    days.sort();
    assert_eq!(days, [("k1".into(), 1, 4), ("k2".into(), 0, 4)]);
}

#[tokio::test]
async fn a_settlement_sent_twice_counts_once() {
    let Some(s) = scratch("a_settlement_sent_twice_counts_once").await else {
        return;
    };
    let t = team(vec![budget(Window::Day, None, Some(100), false)]);
    let k: Arc<str> = "k".into();
    let (r, _) = s.book.admit(&t, &k, tokens(50)).await.unwrap();
    let (inner, op) = r.into_settlement(
        Demand {
            nusd: 0,
            tokens: 20,
        },
        T0,
    );
    inner.run_settle(&op).await.unwrap();
    // A retry after a lost reply.
    inner.run_settle(&op).await.unwrap();
    let v = s.book.view(&[Arc::new(t)]).await.unwrap();
    assert_eq!((v[0].spent.tokens, v[0].reserved.tokens), (20, 0));
}

#[tokio::test]
async fn seeding_raises_counters_to_the_ledger_and_never_adds_twice() {
    let Some(s) = scratch("seeding_raises_counters_to_the_ledger").await else {
        return;
    };
    let t = Arc::new(team(vec![budget(
        Window::Day,
        Some(1_000_000),
        None,
        false,
    )]));
    let start = window::bounds(Window::Day, T0).0;
    let seeded = Demand {
        nusd: 400_000,
        tokens: 9,
    };
    for _ in 0..2 {
        s.book.seed(&t.name, None, Window::Day, start, seeded);
        assert!(s.book.inner.flush().await);
    }
    let v = s.book.view(std::slice::from_ref(&t)).await.unwrap();
    assert_eq!(v[0].spent, seeded, "seeded twice, counted once");
    // A counter already past the ledger (spend not yet in it) is left alone.
    s.book.seed(
        &t.name,
        None,
        Window::Day,
        start,
        Demand { nusd: 1, tokens: 1 },
    );
    assert!(s.book.inner.flush().await);
    let v = s.book.view(&[t]).await.unwrap();
    assert_eq!(v[0].spent, seeded);
}

#[tokio::test]
async fn amounts_past_lua_number_printing_stay_exact() {
    let Some(s) = scratch("amounts_past_lua_number_printing_stay_exact").await else {
        return;
    };
    // $5M in one window: 5e15 nano-dollars, which Lua would print as 5e+15.
    let t = team(vec![budget(
        Window::Month,
        Some(9_000_000_000_000_000),
        None,
        false,
    )]);
    let k: Arc<str> = "k".into();
    let d = Demand {
        nusd: 5_000_000_000_000_001,
        tokens: 1,
    };
    let (r, room) = s.book.admit(&t, &k, d).await.unwrap();
    assert_eq!(room.nusd, Some(3_999_999_999_999_999));
    assert!(r.settle_confirmed(d, T0).await);
    let v = s.book.view(&[Arc::new(t)]).await.unwrap();
    assert_eq!(
        (v[0].spent.nusd, v[0].reserved.nusd),
        (5_000_000_000_000_001, 0)
    );
}

#[tokio::test]
async fn renewal_pushes_out_running_leases_and_never_revives_a_settled_one() {
    let Some(s) = scratch("renewal_pushes_out_running_leases").await else {
        return;
    };
    let t = team(vec![budget(Window::Day, None, Some(100), false)]);
    let k: Arc<str> = "k".into();
    let d = Demand {
        nusd: 0,
        tokens: 10,
    };
    let (running, _) = s.book.admit(&t, &k, d).await.unwrap();
    let (done, _) = s.book.admit(&t, &k, d).await.unwrap();
    let leases = format!("{}:leases", running.held[0].key);
    let conn = redis::Client::open(s.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let score = |rid: String| {
        let mut conn = conn.clone();
        let leases = leases.clone();
        async move {
            redis::cmd("ZSCORE")
                .arg(&leases)
                .arg(rid)
                .query_async::<Option<f64>>(&mut conn)
                .await
                .unwrap()
        }
    };
    let before = score(running.rids[0].clone()).await.unwrap();
    let settled_id = done.rids[0].clone();
    assert!(done.settle_confirmed(d, T0).await);
    assert_eq!(
        lock(&s.book.inner.live).len(),
        1,
        "only the running one is renewed"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(s.book.inner.renew().await);
    assert!(score(running.rids[0].clone()).await.unwrap() > before);
    assert_eq!(score(settled_id).await, None);
    drop(running);
}

/// The ledger as a rebuild sees it: a fixed spend per team-wide window, slowly.
struct FixedLedger {
    tokens: i64,
    delay: Duration,
    fails: bool,
    reads: std::sync::atomic::AtomicU32,
}

impl SpendSource for FixedLedger {
    fn spend(
        &self,
        _team: &str,
        budgets: &[(Window, bool)],
        now_us: i64,
    ) -> Result<Vec<LedgerSeed>, super::super::SpendUnreadable> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        if self.fails {
            return Err(super::super::SpendUnreadable("the ledger is down".into()));
        }
        Ok(budgets
            .iter()
            .filter(|(_, per_key)| !per_key)
            .map(|&(window, _)| LedgerSeed {
                window,
                start_us: window::bounds(window, now_us).0,
                key_id: None,
                spent: Demand {
                    nusd: 0,
                    tokens: self.tokens,
                },
            })
            .collect())
    }
}

impl Scratch {
    /// Every key of this test gone, as after FLUSHALL.
    fn flush(&self) {
        let mut conn = redis::Client::open(self.url.as_str())
            .unwrap()
            .get_connection()
            .unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query(&mut conn)
            .unwrap();
        assert!(!keys.is_empty());
        let _: () = redis::cmd("DEL").arg(keys).query(&mut conn).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_counters_are_rebuilt_once_however_many_admissions_find_them_gone() {
    let Some(s) = scratch("lost_counters_are_rebuilt_once").await else {
        return;
    };
    let ledger = Arc::new(FixedLedger {
        tokens: 70,
        delay: Duration::from_millis(200),
        fails: false,
        reads: Default::default(),
    });
    s.book.set_spend_source(ledger.clone());
    let t = Arc::new(team(vec![budget(Window::Day, None, Some(100), false)]));
    let k: Arc<str> = "k".into();
    let five = Demand { nusd: 0, tokens: 5 };
    // A new Redis: the first admission finds no marker and brings the ledger's 70 in.
    let (r, room) = s.book.admit(&t, &k, five).await.unwrap();
    assert_eq!(room.tokens, Some(25));
    assert_eq!(ledger.reads.load(Ordering::SeqCst), 1);
    drop(r);
    s.flush();
    let mut admissions = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (book, t, k) = (s.book.clone(), t.clone(), k.clone());
        admissions.spawn(async move { book.admit(&t, &k, five).await.map(|(r, _)| r) });
    }
    let (mut admitted, mut refused, mut held) = (0, 0, Vec::new());
    while let Some(a) = admissions.join_next().await {
        match a.unwrap() {
            Ok(r) => {
                admitted += 1;
                held.push(r);
            }
            Err(Refusal::Over(o)) => {
                refused += 1;
                assert_eq!(o.limit, 100);
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!(
        (admitted, refused),
        (6, 2),
        "70 from the ledger + 6 x 5 = 100"
    );
    assert_eq!(
        ledger.reads.load(Ordering::SeqCst),
        2,
        "one read for the eight"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_ledger_refuses_as_an_unavailable_store_and_waiters_do_not_queue_up() {
    let Some(s) = scratch("an_unreadable_ledger_refuses").await else {
        return;
    };
    let ledger = Arc::new(FixedLedger {
        tokens: 0,
        delay: Duration::from_millis(300),
        fails: true,
        reads: Default::default(),
    });
    s.book.set_spend_source(ledger.clone());
    let t = Arc::new(team(vec![budget(Window::Day, None, Some(100), false)]));
    let k: Arc<str> = "k".into();
    let five = Demand { nusd: 0, tokens: 5 };
    let asked = crate::clock::now();
    let mut admissions = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (book, t, k) = (s.book.clone(), t.clone(), k.clone());
        admissions.spawn(async move { book.admit(&t, &k, five).await.map(|_| ()) });
    }
    while let Some(a) = admissions.join_next().await {
        assert!(matches!(a.unwrap(), Err(Refusal::StoreUnavailable)));
    }
    assert_eq!(
        ledger.reads.load(Ordering::SeqCst),
        1,
        "the waiters gave up with it"
    );
    // One wait for the fleet's flushes and one read, not four of each.
    let one = RESEED_AFTER_FLUSHES + Duration::from_millis(300);
    assert!(asked.elapsed() < one * 2, "{:?}", asked.elapsed());
}

/// A Redis Cluster refuses a script whose keys sit in different slots: every key one call
/// touches (marker, counters, leases, settlement markers) must hash like the team's marker,
/// whatever the team is called (a name starting with `}` is refused by validation).
#[tokio::test]
async fn every_key_a_script_touches_hashes_to_its_teams_slot() {
    use redis::cluster_routing::Slot;
    let cfg = RedisStore {
        url: Secret::new("redis://127.0.0.1:1/0"),
        cluster: false,
        ca_file: None,
        prefix: "tollgate:".into(),
        timeout: Duration::from_millis(10),
        lease: Duration::from_secs(30),
        fail_open_share: 0.0,
    };
    let book = RedisBook::new(cfg, Arc::new(ManualClock::new(T0)), Tasks::new()).unwrap();
    let i = &book.inner;
    for team in [
        "search",
        "a}b",
        "{x",
        "x{y}z",
        "with spaces",
        "ünï",
        "t:day:team",
    ] {
        let slot = Slot::for_key(i.marker_key(team));
        let day = i.counter_key(team, Window::Day, None, T0);
        let month = i.counter_key(team, Window::Month, Some("{k}"), T0);
        for key in [
            format!("{day}:leases"),
            format!("{month}:leases"),
            day,
            month,
            i.done_key(team, "0a1b2c-3"),
        ] {
            assert_eq!(Slot::for_key(&key), slot, "team `{team}`: {key}");
        }
    }
}

/// A TCP relay to the test Redis that, once `cut` is set, swallows the next reply and drops
/// the connection: a call Redis ran whose answer never came back.
struct Relay {
    url: String,
    cut: Arc<AtomicBool>,
    _tasks: Tasks,
}

async fn relay() -> Relay {
    let target = test_redis();
    // redis://[user:pass@]host:port[/db]: the relay stands in for host:port.
    let rest = target.strip_prefix("redis://").expect("a redis:// URL");
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((a, r)) => (format!("{a}@"), r),
        None => (String::new(), rest),
    };
    let (hostport, db) = rest.split_once('/').unwrap_or((rest, "0"));
    let upstream = hostport.to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{auth}{}/{db}", listener.local_addr().unwrap());
    let cut = Arc::new(AtomicBool::new(false));
    let tasks = Tasks::new();
    let (cut2, tasks2) = (cut.clone(), tasks.clone());
    tasks.spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let cut = cut2.clone();
            tasks2.spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = tokio::io::copy(&mut cr, &mut sw);
                let down = async {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = sr.read(&mut buf).await?;
                        if n == 0 || cut.swap(false, Ordering::SeqCst) {
                            return Ok::<_, std::io::Error>(());
                        }
                        cw.write_all(&buf[..n]).await?;
                    }
                };
                tokio::select! {
                    _ = up => {}
                    _ = down => {}
                }
            });
        }
    });
    Relay {
        url,
        cut,
        _tasks: tasks,
    }
}

#[tokio::test]
async fn a_reservation_whose_answer_was_lost_is_given_back_once_redis_answers() {
    const TEST: &str = "a_reservation_whose_answer_was_lost_is_given_back";
    let relay = relay().await;
    let Some(s) = scratch_via(TEST, &relay.url).await else {
        return;
    };
    let t = Arc::new(team(vec![budget(Window::Day, None, Some(100), false)]));
    let k: Arc<str> = "k".into();
    let d = tokens(40);
    // Redis runs the admission; its answer is lost with the connection: refused (fail-closed),
    // though Redis holds the reservation.
    relay.cut.store(true, Ordering::SeqCst);
    match s.book.admit(&t, &k, d).await {
        Err(Refusal::StoreUnavailable) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(s.book.queued(), 1, "the release is queued");
    // Once Redis answers (the flush loop, or this push), the reservation is given back
    // rather than held for the whole lease (60 s here).
    let deadline = crate::clock::now() + Duration::from_secs(10);
    loop {
        s.book.inner.flush().await;
        let v = s.book.view(std::slice::from_ref(&t)).await;
        if let Ok(v) = &v {
            if v[0].reserved.tokens == 0 && s.book.queued() == 0 {
                assert_eq!(v[0].spent.tokens, 0);
                break;
            }
        }
        assert!(
            crate::clock::now() < deadline,
            "the lost admission's reservation is still held: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The room is whole again: 100 tokens fit.
    let (r, _) = s.book.admit(&t, &k, tokens(100)).await.unwrap();
    drop(r);
}
