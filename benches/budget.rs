//! Admission plus settlement of one request against its team's budgets (a day token budget
//! and a month dollar budget), with 1, 100 and 10,000 teams in the book.
//!
//! Run: `cargo bench --bench budget`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::sync::Arc;
use tollgate::budget::{BudgetBook, Demand};
use tollgate::clock::SystemClock;
use tollgate::config::{Budget, Team, Window};

fn team(i: usize) -> Arc<Team> {
    let budget = |window, usd: Option<f64>, tokens| Budget {
        window,
        tokens,
        usd,
        nusd: usd.map(|u| (u * 1e9) as i64),
        soft_ratio: Some(0.8),
        per_key: false,
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
        let book = BudgetBook::new(Arc::new(SystemClock));
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
}

criterion_group!(benches, bench);
criterion_main!(benches);
