//! Admission plus settlement of one request against its team's budgets (a day token budget
//! and a month dollar budget), with 1, 100 and 10,000 teams in the book; and the same against
//! a Redis store on 127.0.0.1:6379 (two round trips: the admit and settle scripts), skipped
//! with a note when no Redis answers there.
//!
//! Run: `cargo bench --bench budget`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::sync::Arc;
use tollgate::budget::redis::RedisBook;
use tollgate::budget::{BudgetBook, Demand, LocalBook, Reservation};
use tollgate::clock::SystemClock;
use tollgate::config::{Budget, RedisStore, Team, Window};

fn team(i: usize) -> Arc<Team> {
    let budget = |window, usd: Option<f64>, tokens| Budget {
        window,
        tokens,
        usd,
        nusd: usd.map(|u| (u * 1e9) as i64),
        soft_ratio: Some(0.8),
        per_key: false,
        fail_open: false,
    };
    Arc::new(Team {
        name: format!("team-{i}").into(),
        key_hashes: vec![],
        tags: Default::default(),
        request_tags: vec![],
        regions: vec![],
        budgets: vec![
            budget(Window::Day, None, Some(u64::MAX / 4)),
            budget(Window::Month, Some(1e9), None),
        ],
    })
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("budget_admit_settle");
    for teams in [1usize, 100, 10_000] {
        let book = LocalBook::new(Arc::new(SystemClock));
        let all: Vec<Arc<Team>> = (0..teams).map(team).collect();
        let key: Arc<str> = "k-bench".into();
        // Every team's counters exist, as after some traffic.
        for t in &all {
            book.admit(t, &key, Demand::default())
                .unwrap()
                .0
                .settle(Demand::default(), book.now_us());
        }
        let mut i = 0;
        group.bench_with_input(BenchmarkId::from_parameter(teams), &teams, |b, _| {
            b.iter(|| {
                i = (i + 7919) % all.len();
                let (r, _) = book
                    .admit(
                        &all[i],
                        &key,
                        Demand {
                            nusd: 150_000,
                            tokens: 4_000,
                        },
                    )
                    .unwrap();
                r.settle(
                    Demand {
                        nusd: 147_500,
                        tokens: 29,
                    },
                    book.now_us(),
                );
            })
        });
    }
    group.finish();
    redis(c);
}

fn redis(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let prefix = format!("tollgate-bench-{}:", std::process::id());
    let store = RedisStore {
        url: tollgate::secret::Secret::new("redis://127.0.0.1:6379/0"),
        cluster: false,
        ca_file: None,
        prefix: prefix.clone(),
        timeout: std::time::Duration::from_millis(200),
        lease: std::time::Duration::from_secs(60),
        fail_open_share: 0.05,
    };
    let tasks = tollgate::tasks::Tasks::new();
    let book = rt.block_on(async {
        let book = RedisBook::new(store, Arc::new(SystemClock), tasks.clone()).unwrap();
        book.start().await.ok()?.then_some(book)
    });
    let Some(book) = book else {
        eprintln!("budget_redis skipped: no Redis answers on 127.0.0.1:6379");
        return;
    };
    let book = BudgetBook::Redis(book);
    let t = team(0);
    let key: Arc<str> = "k-bench".into();
    c.bench_function("budget_redis_admit_settle", |b| {
        b.iter(|| {
            rt.block_on(async {
                let (r, _) = book
                    .admit(
                        &t,
                        &key,
                        Demand {
                            nusd: 150_000,
                            tokens: 4_000,
                        },
                    )
                    .await
                    .unwrap();
                let Reservation::Redis(r) = r else {
                    unreachable!()
                };
                r.settle_confirmed(
                    Demand {
                        nusd: 147_500,
                        tokens: 29,
                    },
                    book.now_us(),
                )
                .await;
            })
        })
    });
    rt.block_on(async {
        let client = redis::Client::open("redis://127.0.0.1:6379/0").unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(keys)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
