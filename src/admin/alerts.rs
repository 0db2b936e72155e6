//! The alerts webhook (`[alerts] url`): JSON POSTs when a budget passes its soft limit, when a
//! budget's forecast runs out within `alerts.forecast_hours`, and when a self-hosted backend
//! has been idle for `metrics.idle_after_s`.
//!
//! ```text
//! check (every check_interval_s, off the request path)        send (one at a time)
//!   conditions true now ─ minus those already true ─► queue ─► POST ─ 2xx ─► done
//!   (one alert per condition and episode: a condition         (bounded; │    5xx, 408, 429, no answer:
//!    that clears and comes back is a new episode)              full:    │    wait, doubled each time,
//!                                                              dropped) └──  up to max_attempts
//! ```
//!
//! Conditions read the same counters as `/admin/budgets` and `/metrics` (the budget views and
//! their forecasts, the GPU occupancy), so an alert never says what those would not. A
//! payload names teams, windows, backends and figures; never a key, a key's hash or id, or a
//! store's URL. The webhook's own URL is a secret too (receivers put their token in it): logs
//! name only its host. Alerts still queued when the gateway stops are not sent.

use super::Admin;
use crate::budget::forecast::Forecast;
use crate::budget::{BudgetView, LimitKind};
use crate::clock::format_time;
use crate::config::Hosting;
use crate::live::{Live, LiveState};
use crate::meter::format_usd;
use crate::upstream::client::UpstreamClient;
use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, USER_AGENT};
use http::Request;
use http_body_util::Full;
use std::collections::HashSet;
use std::time::Duration;
use tokio::sync::mpsc;

/// The longest wait between two tries of one alert.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// One condition that holds now: its identity (what makes an episode) and what to say.
#[derive(Debug)]
struct Condition {
    id: String,
    payload: serde_json::Value,
}

/// Starts the check and send loops; they end when shutdown begins. Without `alerts.url`
/// they idle, so a reload that adds one takes effect.
pub fn start(admin: &Admin) {
    let queue = admin.live.load().config.alerts.queue;
    let (tx, rx) = mpsc::channel(queue);
    let tasks = admin.tasks.clone();
    tasks.spawn(check_loop(admin.clone(), tx));
    tasks.spawn(send_loop(admin.live.clone(), rx, admin.tasks.clone()));
}

async fn check_loop(admin: Admin, tx: mpsc::Sender<serde_json::Value>) {
    // Conditions already alerted on, until they clear.
    let mut active: HashSet<String> = HashSet::new();
    loop {
        let every = admin.live.load().config.alerts.check_interval;
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = admin.tasks.stopping() => return,
        }
        let live = admin.live.load_full();
        if live.config.alerts.url.is_none() {
            active.clear();
            continue;
        }
        let mut now_true = gpu_conditions(&live);
        match admin.forecasts().await {
            Ok(f) => now_true.extend(budget_conditions(&live, &f.views, &f.forecasts, f.now_us)),
            // The budget store's errors have their own counter; keep the budget episodes as
            // they were rather than re-alert when it answers again.
            Err(_) => now_true.extend(active.iter().filter(|id| id.starts_with("budget")).map(
                |id| Condition {
                    id: id.clone(),
                    payload: serde_json::Value::Null,
                },
            )),
        }
        let mut next = HashSet::with_capacity(now_true.len());
        for c in now_true {
            if !active.contains(&c.id) && !c.payload.is_null() {
                if let Err(e) = tx.try_send(c.payload) {
                    let why = match e {
                        mpsc::error::TrySendError::Full(_) => "the queue is full",
                        mpsc::error::TrySendError::Closed(_) => return,
                    };
                    tracing::warn!(condition = %c.id, "alert dropped: {why} (the receiver is failing or slow)");
                }
            }
            next.insert(c.id);
        }
        active = next;
    }
}

/// Soft limits passed and forecasts that run out within `alerts.forecast_hours`.
fn budget_conditions(
    live: &LiveState,
    views: &[BudgetView],
    forecasts: &[Forecast],
    now_us: i64,
) -> Vec<Condition> {
    let horizon_s = live.config.alerts.forecast.as_secs_f64();
    let mut out = Vec::new();
    for (v, f) in views.iter().zip(forecasts) {
        let start_us = crate::budget::window::bounds(v.window, now_us).0;
        // The key's id is an identity here only: it never reaches a payload.
        let episode = format!(
            "{}/{}/{}/{start_us}",
            v.team,
            v.key_id.as_deref().unwrap_or("*"),
            v.window.as_str()
        );
        let base = |kind: &str, message: String| {
            serde_json::json!({
                "source": "tollgate",
                "kind": kind,
                "at": format_time(now_us),
                "gateway": &*live.config.server.replica,
                "team": &*v.team,
                "per_key": v.key_id.is_some(),
                "window": v.window.as_str(),
                "limit_usd": v.limit_nusd.map(format_usd),
                "limit_tokens": v.limit_tokens,
                "spent_usd": format_usd(v.spent.nusd),
                "spent_tokens": v.spent.tokens,
                "resets_at": format_time(v.resets_at_us),
                "message": message,
            })
        };
        let who = if v.key_id.is_some() {
            format!("a key of team {}", v.team)
        } else {
            format!("team {}", v.team)
        };
        if let Some(ratio) = v.soft_ratio {
            let passed = |limit: Option<i64>, used: i64| {
                limit.is_some_and(|l| used as f64 >= ratio * l as f64)
            };
            if passed(v.limit_nusd, v.spent.nusd) || passed(v.limit_tokens, v.spent.tokens) {
                let mut p = base(
                    "budget_soft_limit",
                    format!(
                        "{who} has spent {:.0}% or more of its {} budget",
                        ratio * 100.0,
                        v.window.as_str()
                    ),
                );
                p["soft_ratio"] = ratio.into();
                out.push(Condition {
                    id: format!("budget-soft/{episode}"),
                    payload: p,
                });
            }
        }
        if let (Some(left), Some(at)) = (f.seconds_left(now_us), f.exhausts_at_us) {
            if left <= horizon_s {
                let limit = match f.limit {
                    Some(LimitKind::Tokens) => "tokens",
                    _ => "usd",
                };
                let mut p = base(
                    "budget_forecast",
                    format!(
                        "{who} runs out of its {} budget at {} at the rate of {}",
                        v.window.as_str(),
                        format_time(at),
                        f.describe_window()
                    ),
                );
                p["exhausts_at"] = format_time(at).into();
                p["seconds_left"] = left.into();
                p["runs_out_on"] = limit.into();
                p["burn_usd_per_hour"] = (f.nusd_per_hour / 1e9).into();
                p["burn_tokens_per_hour"] = f.tokens_per_hour.into();
                p["rate_window"] = f.describe_window().into();
                p["forecast_hours"] = (horizon_s / 3600.0).into();
                out.push(Condition {
                    id: format!("budget-forecast/{episode}"),
                    payload: p,
                });
            }
        }
    }
    out
}

/// Self-hosted backends idle past `metrics.idle_after_s`, as `tollgate_backend_idle` says.
fn gpu_conditions(live: &LiveState) -> Vec<Condition> {
    let now = live.clock.now_us();
    let m = &live.config.metrics;
    live.backends
        .iter()
        .filter(|b| b.cfg.hosting == Hosting::SelfHosted)
        .filter_map(|b| {
            let r = b.state.occupancy.read(now, m.busy_window, m.idle_after);
            r.idle.then(|| {
                let priced = b.cfg.gpu.is_some();
                Condition {
                    id: format!("gpu-idle/{}", b.cfg.name),
                    payload: serde_json::json!({
                        "source": "tollgate",
                        "kind": "gpu_idle",
                        "at": format_time(now),
                        "gateway": &*live.config.server.replica,
                        "backend": &*b.cfg.name,
                        "idle_after_s": m.idle_after.as_secs_f64(),
                        "hourly_usd": b.cfg.gpu.as_ref().map(|g| g.hourly_usd * g.count as f64 * g.fraction),
                        "idle_cost_usd": priced.then(|| format_usd(r.idle_nusd)),
                        "message": format!(
                            "self-hosted backend {} has had no request for {} s: its GPU hours are paid for nothing",
                            b.cfg.name,
                            m.idle_after.as_secs_f64()
                        ),
                    }),
                }
            })
        })
        .collect()
}

async fn send_loop(
    live: Live,
    mut rx: mpsc::Receiver<serde_json::Value>,
    tasks: crate::tasks::Tasks,
) {
    // Connecting is bounded by the whole attempt's `alerts.timeout_s`; idle connections to the
    // receiver are kept a minute, alerts being rare.
    let client =
        crate::upstream::client::https(live.load().config.alerts.timeout, Duration::from_secs(60));
    loop {
        let alert = tokio::select! {
            a = rx.recv() => match a {
                Some(a) => a,
                None => return,
            },
            _ = tasks.stopping() => return,
        };
        tokio::select! {
            _ = deliver(&client, &live, &alert) => {}
            _ = tasks.stopping() => return,
        }
    }
}

/// POSTs one alert, retrying what a retry may fix, with a doubling wait.
async fn deliver(client: &UpstreamClient, live: &Live, alert: &serde_json::Value) {
    let cfg = live.load().config.alerts.clone();
    let Some(url) = cfg.url else { return };
    let Ok(uri) = url.expose().parse::<http::Uri>() else {
        return;
    };
    let host = uri.host().unwrap_or("?").to_string();
    let kind = alert["kind"].as_str().unwrap_or("?").to_string();
    let body = Bytes::from(serde_json::to_vec(alert).unwrap_or_default());
    let mut wait = cfg.retry_initial;
    for attempt in 1..=cfg.max_attempts {
        let mut req = Request::post(uri.clone()).body(Full::new(body.clone()));
        if let Ok(r) = req.as_mut() {
            let h = r.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            h.insert(USER_AGENT, HeaderValue::from_static("tollgate-alerts"));
        }
        let Ok(req) = req else { return };
        let (failure, retry) = match tokio::time::timeout(cfg.timeout, client.request(req)).await {
            Ok(Ok(resp)) if resp.status().is_success() => {
                tracing::info!(%host, kind, attempt, "alert delivered");
                return;
            }
            Ok(Ok(resp)) => {
                let s = resp.status();
                let retry = s.is_server_error() || s.as_u16() == 408 || s.as_u16() == 429;
                (format!("answered {s}"), retry)
            }
            // The client's errors name no URL; redacted all the same.
            Ok(Err(e)) => (
                crate::secret::redact_urls(&e.to_string()).into_owned(),
                true,
            ),
            Err(_) => (format!("no answer within {:?}", cfg.timeout), true),
        };
        if !retry || attempt == cfg.max_attempts {
            tracing::error!(%host, kind, attempt, failure, "alert not delivered");
            return;
        }
        tracing::warn!(%host, kind, attempt, failure, retry_in = ?wait, "alert not delivered yet");
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(MAX_BACKOFF);
    }
}
