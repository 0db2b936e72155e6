//! GPU economics as the operators see them: the Prometheus families of every self-hosted
//! backend's occupancy, and a watch that logs a GPU going idle. The accounting itself is
//! kept on the request path (`route/occupancy.rs`); this only reads it.

use crate::config::{Backend, Hosting};
use crate::live::LiveState;
use crate::meter::format_usd;
use crate::metrics::Exposition;
use crate::route::occupancy::{IdleChange, Reading};
use std::time::Duration;

pub const BACKEND_BUSY_RATIO: &str = "tollgate_backend_busy_ratio";
pub const BACKEND_BUSY_SECONDS_TOTAL: &str = "tollgate_backend_busy_seconds_total";
/// GPU time in seconds, not hours: Prometheus names carry base units (promtool flags `_hours`).
pub const BACKEND_GPU_SECONDS_TOTAL: &str = "tollgate_backend_gpu_seconds_total";
pub const BACKEND_PAID_USD_TOTAL: &str = "tollgate_backend_paid_usd_total";
pub const BACKEND_CHARGED_USD_TOTAL: &str = "tollgate_backend_charged_usd_total";
pub const BACKEND_IDLE_COST_USD_TOTAL: &str = "tollgate_backend_idle_cost_usd_total";
pub const BACKEND_IDLE: &str = "tollgate_backend_idle";

/// Logs each backend that goes idle or comes back, once per change; runs until the gateway
/// goes away. Ticks in real time but reads the gateway's clock.
pub async fn watch(live: std::sync::Weak<arc_swap::ArcSwap<LiveState>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(live) = live.upgrade() else { return };
        let snapshot = live.load_full();
        drop(live);
        let now = snapshot.clock.now_us();
        let metrics = &snapshot.config.metrics;
        for b in snapshot.backends.iter() {
            if b.cfg.hosting != Hosting::SelfHosted {
                continue;
            }
            let occupancy = &b.state.occupancy;
            // Keeps the busy-ratio samples fresh however rarely Prometheus scrapes.
            occupancy.read(now, metrics.busy_window, metrics.idle_after);
            match occupancy.check_idle(now, metrics.idle_after) {
                Some(IdleChange::BecameIdle { quiet_for }) => tracing::warn!(
                    backend = &*b.cfg.name,
                    ?quiet_for,
                    hourly_usd = b.cfg.gpu.as_ref().map(|g| g.hourly_usd * g.count as f64 * g.fraction),
                    "self-hosted backend is idle: no request for a while, its GPU hours are paid for nothing"
                ),
                Some(IdleChange::Active) => {
                    tracing::info!(backend = &*b.cfg.name, "self-hosted backend is busy again")
                }
                None => {}
            }
        }
    }
}

/// The GPU-economics families of every self-hosted backend, in Prometheus text.
pub fn render(live: &LiveState, out: &mut Exposition) {
    let now = live.clock.now_us();
    let m = &live.config.metrics;
    let readings: Vec<(&Backend, Reading)> = live
        .backends
        .iter()
        .filter(|b| b.cfg.hosting == Hosting::SelfHosted)
        .map(|b| {
            (
                &*b.cfg,
                b.state.occupancy.read(now, m.busy_window, m.idle_after),
            )
        })
        .collect();
    if readings.is_empty() {
        return;
    }
    let window = m.busy_window.as_secs_f64();
    out.family(
        BACKEND_BUSY_RATIO,
        "gauge",
        &format!("Self-hosted backend utilization over the last {window} s: measure=\"busy\" is the share of time with at least one request in flight, measure=\"concurrency\" the mean requests in flight divided by max_concurrency."),
    );
    for (b, r) in &readings {
        out.sample(
            BACKEND_BUSY_RATIO,
            [("backend", &*b.name), ("measure", "busy")],
            r.busy_ratio,
        );
        if let Some(c) = r.concurrency_ratio {
            out.sample(
                BACKEND_BUSY_RATIO,
                [("backend", &*b.name), ("measure", "concurrency")],
                c,
            );
        }
    }
    out.family(
        BACKEND_BUSY_SECONDS_TOTAL,
        "counter",
        "Seconds a self-hosted backend had at least one request in flight.",
    );
    for (b, r) in &readings {
        out.sample(
            BACKEND_BUSY_SECONDS_TOTAL,
            [("backend", &*b.name)],
            r.busy_seconds,
        );
    }
    out.family(
        BACKEND_IDLE,
        "gauge",
        &format!(
            "1 while a self-hosted backend has had no request for metrics.idle_after_s ({} s).",
            m.idle_after.as_secs_f64()
        ),
    );
    for (b, r) in &readings {
        out.sample(BACKEND_IDLE, [("backend", &*b.name)], u8::from(r.idle));
    }
    let priced: Vec<&(&Backend, Reading)> =
        readings.iter().filter(|(b, _)| b.gpu.is_some()).collect();
    if priced.is_empty() {
        return;
    }
    type UsdFamily = (&'static str, &'static str, fn(&Reading) -> i64);
    let usd_families: [UsdFamily; 3] = [
        (
            BACKEND_PAID_USD_TOTAL,
            "GPU cost paid for a self-hosted backend: gpu hourly_usd x count x fraction x wall time.",
            |r| r.paid_nusd,
        ),
        (
            BACKEND_CHARGED_USD_TOTAL,
            "Cost charged to the requests a self-hosted backend served (its rate card, as in the ledger).",
            |r| r.charged_nusd,
        ),
        (
            BACKEND_IDLE_COST_USD_TOTAL,
            "Idle cost of a self-hosted backend: paid minus charged (held, never decreasing, while requests are charged more than the hours cost).",
            |r| r.idle_nusd,
        ),
    ];
    for (name, help, value) in usd_families {
        out.family(name, "counter", help);
        for (b, r) in &priced {
            out.sample(name, [("backend", &*b.name)], format_usd(value(r)));
        }
    }
    out.family(
        BACKEND_GPU_SECONDS_TOTAL,
        "counter",
        "GPU time paid for a self-hosted backend: wall seconds x count x fraction (divide by 3600 for GPU hours).",
    );
    for (b, r) in &priced {
        out.sample(
            BACKEND_GPU_SECONDS_TOTAL,
            [("backend", &*b.name)],
            r.gpu_seconds,
        );
    }
}
