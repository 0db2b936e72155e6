//! Active health probes of backends: a task per backend that asks its health path now and
//! then, so a dead server is taken out before a user finds it and a revived one comes back
//! within one interval. What a probe's answer means for routing is the breaker's
//! (`route::health`); this only asks.

use crate::config::HealthCheck;
use crate::live::Live;
use crate::tasks::Tasks;
use std::sync::Arc;

/// Starts an active prober for every backend that has a health check and none running yet;
/// called at start and after each reload. A prober follows its backend by name through
/// reloads and stops when the backend leaves the config or the gateway goes away.
pub fn ensure_probes(live: &Live, tasks: &Tasks) {
    let snapshot = live.load();
    for b in &snapshot.backends {
        if b.cfg.health_check.is_some() && b.state.start_probing() {
            let (live, name, stop) = (Arc::downgrade(live), b.cfg.name.clone(), tasks.clone());
            tasks.spawn(async move {
                tokio::select! {
                    _ = probe_loop(live, name) => {}
                    _ = stop.stopping() => {}
                }
            });
        }
    }
}

async fn probe_loop(
    live: std::sync::Weak<arc_swap::ArcSwap<crate::live::LiveState>>,
    name: Arc<str>,
) {
    loop {
        // Holds the snapshot only for one probe: a reload or shutdown is seen at the next tick.
        let interval = {
            let Some(live) = live.upgrade() else { return };
            let snapshot = live.load_full();
            let Some(b) = snapshot.backends.iter().find(|b| b.cfg.name == name) else {
                return;
            };
            let Some(hc) = b.cfg.health_check.clone() else {
                b.state.stop_probing();
                return;
            };
            drop(live);
            // A backend serving requests reports its health through them; a probe beside
            // them would only add load, and llama-cpp-python cuts a running stream short
            // whenever another request waits for its model lock.
            if b.state.in_flight() == 0 {
                let ok = probe(b, &hc).await;
                b.state.on_probe(ok);
            }
            hc.interval
        };
        tokio::time::sleep(interval).await;
    }
}

/// `GET` the health path: up when it answers anything but a 5xx or 429 in time.
async fn probe(b: &crate::route::RouteBackend, hc: &HealthCheck) -> bool {
    let mut req = http::Request::get(format!("{}{}", b.cfg.base_url, hc.path));
    if let Some(key) = &b.cfg.api_key {
        req = req.header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", key.expose()),
        );
    }
    let Ok(req) = req.body(http_body_util::Full::new(bytes::Bytes::new())) else {
        return false;
    };
    match tokio::time::timeout(hc.timeout, b.client.request(req)).await {
        Ok(Ok(resp)) => {
            let s = resp.status();
            let ok = !(s.is_server_error() || s == http::StatusCode::TOO_MANY_REQUESTS);
            if !ok {
                tracing::debug!(
                    backend = &*b.cfg.name,
                    status = s.as_u16(),
                    "health probe failed"
                );
            }
            ok
        }
        Ok(Err(e)) => {
            tracing::debug!(backend = &*b.cfg.name, error = %e, "health probe failed");
            false
        }
        Err(_) => false,
    }
}
