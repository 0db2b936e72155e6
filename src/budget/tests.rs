use super::local::LocalBook as BudgetBook;
use super::*;
use crate::clock::ManualClock;
use crate::config::{Budget, Team};
use std::sync::atomic::Ordering;

const T0: i64 = 1_795_343_400_000_000; // 2026-11-22T10:30:00Z

pub(super) fn team(budgets: Vec<Budget>) -> Team {
    Team {
        name: "search".into(),
        key_hashes: vec![],
        tags: Default::default(),
        request_tags: vec![],
        regions: vec![],
        budgets,
    }
}

pub(super) fn budget(window: Window, usd: Option<f64>, tokens: Option<u64>) -> Budget {
    Budget {
        window,
        tokens,
        usd,
        nusd: usd.map(|u| (u * 1e9) as i64),
        soft_ratio: None,
        per_key: false,
        fail_open: false,
    }
}

fn usd(x: f64) -> i64 {
    (x * 1e9) as i64
}

#[test]
fn reservations_hold_the_limit_and_settle_to_actuals() {
    let clock = Arc::new(ManualClock::new(T0));
    let book = BudgetBook::new(clock.clone());
    let t = team(vec![budget(Window::Day, Some(1.0), None)]);
    let key: Arc<str> = "k".into();
    let worst = Demand {
        nusd: usd(0.4),
        tokens: 100,
    };
    let (a, _) = book.admit(&t, &key, worst).unwrap();
    let (b, rem) = book.admit(&t, &key, worst).unwrap();
    assert_eq!(rem.nusd, Some(usd(0.2)));
    let over = book.admit(&t, &key, worst).unwrap_err();
    assert_eq!(
        (over.kind, over.limit, over.used),
        (LimitKind::Usd, usd(1.0), usd(0.8))
    );
    // Actuals are below the worst case: room comes back.
    a.settle(
        Demand {
            nusd: usd(0.1),
            tokens: 10,
        },
        clock.now_us(),
    );
    drop(b); // failed upstream: released, nothing spent
    let (_c, rem) = book.admit(&t, &key, worst).unwrap();
    assert_eq!(rem.nusd, Some(usd(0.5)));
}

#[test]
fn every_window_must_fit_and_a_refusal_undoes_the_others() {
    let clock = Arc::new(ManualClock::new(T0));
    let book = BudgetBook::new(clock);
    let t = team(vec![
        budget(Window::Month, Some(10.0), None),
        budget(Window::Minute, None, Some(100)),
    ]);
    let key: Arc<str> = "k".into();
    let over = book
        .admit(
            &t,
            &key,
            Demand {
                nusd: usd(1.0),
                tokens: 101,
            },
        )
        .unwrap_err();
    assert_eq!(over.window, Window::Minute);
    let v = book.view(&[Arc::new(t)]);
    assert_eq!(
        v[0].reserved,
        Demand::default(),
        "the month reservation was undone"
    );
}

#[test]
fn a_new_window_starts_from_zero() {
    let clock = Arc::new(ManualClock::new(T0 + 59_000_000));
    let book = BudgetBook::new(clock.clone());
    let t = team(vec![budget(Window::Minute, None, Some(100))]);
    let key: Arc<str> = "k".into();
    let (r, _) = book
        .admit(
            &t,
            &key,
            Demand {
                nusd: 0,
                tokens: 100,
            },
        )
        .unwrap();
    r.settle(
        Demand {
            nusd: 0,
            tokens: 100,
        },
        clock.now_us(),
    );
    let over = book
        .admit(&t, &key, Demand { nusd: 0, tokens: 1 })
        .unwrap_err();
    assert_eq!(
        over.retry_after,
        Duration::from_secs(1),
        "resets at the top of the minute"
    );
    clock.advance(Duration::from_secs(1));
    assert!(book
        .admit(
            &t,
            &key,
            Demand {
                nusd: 0,
                tokens: 100
            }
        )
        .is_ok());
}

#[test]
fn per_key_budgets_count_each_key_apart() {
    let book = BudgetBook::new(Arc::new(ManualClock::new(T0)));
    let mut b = budget(Window::Day, None, Some(10));
    b.per_key = true;
    let t = team(vec![b]);
    let (k1, k2): (Arc<str>, Arc<str>) = ("k1".into(), "k2".into());
    let _r1 = book
        .admit(
            &t,
            &k1,
            Demand {
                nusd: 0,
                tokens: 10,
            },
        )
        .unwrap();
    assert!(book.admit(&t, &k1, Demand { nusd: 0, tokens: 1 }).is_err());
    assert!(book
        .admit(
            &t,
            &k2,
            Demand {
                nusd: 0,
                tokens: 10
            }
        )
        .is_ok());
}

#[test]
fn seeded_spend_counts_in_its_window_only() {
    let clock = Arc::new(ManualClock::new(T0));
    let book = BudgetBook::new(clock.clone());
    let t = team(vec![budget(Window::Hour, Some(1.0), None)]);
    let (start, _) = window::bounds(Window::Hour, T0);
    book.seed(
        &t.name,
        None,
        Window::Hour,
        start,
        Demand {
            nusd: usd(0.9),
            tokens: 0,
        },
    );
    let key: Arc<str> = "k".into();
    assert!(book
        .admit(
            &t,
            &key,
            Demand {
                nusd: usd(0.2),
                tokens: 0
            }
        )
        .is_err());
    clock.advance(Duration::from_secs(3600));
    assert!(book
        .admit(
            &t,
            &key,
            Demand {
                nusd: usd(0.2),
                tokens: 0
            }
        )
        .is_ok());
}

#[test]
fn concurrent_admissions_never_overrun() {
    let book = Arc::new(BudgetBook::new(Arc::new(ManualClock::new(T0))));
    let t = Arc::new(team(vec![budget(Window::Day, Some(1.0), None)]));
    let admitted = std::sync::atomic::AtomicI64::new(0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                let key: Arc<str> = "k".into();
                for _ in 0..1000 {
                    if let Ok((r, _)) = book.admit(
                        &t,
                        &key,
                        Demand {
                            nusd: usd(0.003),
                            tokens: 0,
                        },
                    ) {
                        admitted.fetch_add(1, Ordering::Relaxed);
                        r.settle(
                            Demand {
                                nusd: usd(0.003),
                                tokens: 0,
                            },
                            T0,
                        );
                    }
                }
            });
        }
    });
    assert_eq!(admitted.load(Ordering::Relaxed), 333);
}

#[test]
fn a_grown_reservation_settles_once() {
    // A fallback to a dearer backend reserves the difference and absorbs it.
    let clock = Arc::new(ManualClock::new(T0));
    let book = BudgetBook::new(clock.clone());
    let t = team(vec![
        budget(Window::Day, Some(1.0), None),
        budget(Window::Month, None, Some(1000)),
    ]);
    let key: Arc<str> = "k".into();
    let (mut held, _) = book
        .admit(
            &t,
            &key,
            Demand {
                nusd: usd(0.3),
                tokens: 100,
            },
        )
        .unwrap();
    let (more, rem) = book
        .admit(
            &t,
            &key,
            Demand {
                nusd: usd(0.5),
                tokens: 0,
            },
        )
        .unwrap();
    assert_eq!(rem.nusd, Some(usd(0.2)));
    held.absorb(more);
    assert!(
        book.admit(
            &t,
            &key,
            Demand {
                nusd: usd(0.3),
                tokens: 0
            }
        )
        .is_err(),
        "both parts are held"
    );
    held.settle(
        Demand {
            nusd: usd(0.6),
            tokens: 120,
        },
        clock.now_us(),
    );
    let (_, rem) = book.admit(&t, &key, Demand::default()).unwrap();
    assert_eq!(
        rem.nusd,
        Some(usd(0.4)),
        "charged once, reservation released"
    );
    assert_eq!(rem.tokens, Some(880));
}
