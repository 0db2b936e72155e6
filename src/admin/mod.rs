//! The admin port: health for load balancers, metrics for Prometheus, and operator views.
//!
//! It listens apart from the client API so that it can stay on a private address; when the
//! admin key's variable is set, everything but the health probes requires that key.

pub mod alerts;
mod console;
mod dashboard;

use crate::body::GatewayBody;
use crate::config;
use crate::error::GatewayError;
use crate::finops::report;
use crate::keys::hash_key;
use crate::ledger::read::Reader;
use crate::ledger::Ledger;
use crate::live::{Live, LiveState};
use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_DISPOSITION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The budgets as they stand at one instant, each with its forecast (same order).
struct Forecasts {
    views: Vec<crate::budget::BudgetView>,
    forecasts: Vec<crate::budget::forecast::Forecast>,
    now_us: i64,
}

#[derive(Clone)]
pub struct Admin {
    pub live: Live,
    pub metrics: PrometheusHandle,
    /// Set when shutdown begins, so `/readyz` turns load balancers away before we stop.
    pub draining: Arc<AtomicBool>,
    pub config_path: Option<PathBuf>,
    pub ledger: Arc<Ledger>,
    pub budgets: Arc<crate::budget::BudgetBook>,
    /// Samples of budget spend between looks, for the burn-rate forecast.
    pub forecast: Arc<crate::budget::forecast::Forecaster>,
    pub tasks: crate::tasks::Tasks,
}

impl Admin {
    pub async fn handle<B>(self, req: Request<B>) -> Result<Response<GatewayBody>, Infallible> {
        let path = req.uri().path();
        if req.method() == Method::GET {
            if let Some(resp) = dashboard::asset(path) {
                return Ok(resp);
            }
            if path == "/dashboard" {
                return Ok(self.dashboard(&req));
            }
        }
        // A shared budget store is asked over the network, which `route` cannot wait for.
        if req.method() == Method::GET && path == "/admin/budgets" && self.authorized(&req) {
            return Ok(match self.forecasts().await {
                Ok(f) => json(StatusCode::OK, budgets(&f)),
                Err(_) => error(&GatewayError::BudgetStoreUnavailable),
            });
        }
        // The forecast family asks the budget store too.
        if req.method() == Method::GET && path == "/metrics" && self.authorized(&req) {
            return Ok(self.metrics().await);
        }
        // Reports read the ledger and must wait for it, which `route` cannot.
        if req.method() == Method::GET
            && matches!(
                path,
                "/admin/usage" | "/admin/report/focus" | "/admin/console"
            )
            && self.authorized(&req)
        {
            let query = req.uri().query().unwrap_or("");
            return Ok(match path {
                "/admin/usage" => self.usage(query).await,
                "/admin/console" => self.console(query).await,
                _ => self.focus(query).await,
            });
        }
        Ok(self.route(&req))
    }

    /// Every budget with its forecast, sampled now.
    async fn forecasts(&self) -> Result<Forecasts, crate::budget::Refusal> {
        let teams = self.live.load().config.teams.clone();
        let views = self.budgets.view(&teams).await?;
        let now_us = self.budgets.now_us();
        let forecasts = self.forecast.observe(&views, now_us);
        Ok(Forecasts {
            views,
            forecasts,
            now_us,
        })
    }

    /// `GET /dashboard`: the page, the sign-in form, or the redirect that signs in.
    fn dashboard<B>(&self, req: &Request<B>) -> Response<GatewayBody> {
        let live = self.live.load();
        let Some(admin_key) = &live.config.server.admin_key else {
            return dashboard::page();
        };
        if let Some(key) = param(req.uri().query().unwrap_or(""), "key") {
            return if hash_key(&key) == hash_key(admin_key.expose()) {
                dashboard::signed_in(admin_key.expose())
            } else {
                dashboard::login(true)
            };
        }
        if self.authorized(req) {
            dashboard::page()
        } else {
            dashboard::login(false)
        }
    }

    /// `GET /metrics`: the recorder's families, the dollar counters, GPU economics, and the
    /// budgets' forecasts (computed now, from the counters: nothing per request).
    async fn metrics(&self) -> Response<GatewayBody> {
        let mut text = self.metrics.render();
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        let mut more = crate::metrics::Exposition::new();
        crate::metrics::usd().render(&mut more);
        crate::finops::gpu::render(&self.live.load(), &mut more);
        match self.forecasts().await {
            Ok(f) => crate::budget::forecast::render(&f.views, &f.forecasts, f.now_us, &mut more),
            // The other families still answer; the store's errors have their own counter.
            Err(_) => {
                tracing::warn!("/metrics: no budget forecast, the budget store did not answer")
            }
        }
        text.push_str(&more.finish());
        let mut resp = Response::new(GatewayBody::full(Bytes::from(text)));
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        resp
    }

    /// `GET /admin/console?from=…&to=…&tag=…`: the dashboard's figures (see `console.rs`).
    async fn console(&self, query: &str) -> Response<GatewayBody> {
        let live = self.live.load_full();
        let now = live.clock.now_us();
        let q = match console::Query::parse(query, &live.config, now) {
            Ok(q) => q,
            Err(e) => return bad_query(e),
        };
        let budget_json = match self.forecasts().await {
            Ok(f) => budgets(&f),
            Err(_) => serde_json::json!({"error": "the budget store did not answer"}),
        };
        let backends_now = backends(&live);
        let config = live.config.clone();
        let q2 = q.clone();
        let panels = self
            .read_ledger("console", move |conn| {
                let v = console::ledger_panels(
                    conn,
                    &config,
                    &crate::config::prices::Catalog::builtin(),
                    &q2,
                    now,
                )?;
                Ok(serde_json::to_string(&v).unwrap_or_default())
            })
            .await;
        let panels: serde_json::Value = match panels {
            Ok(text) => serde_json::from_str(&text).unwrap_or_default(),
            Err(resp) => return resp,
        };
        let teams: Vec<&str> = live.config.teams.iter().map(|t| &*t.name).collect();
        json(
            StatusCode::OK,
            serde_json::json!({
                "period": panels.get("period"),
                "generated_at": crate::clock::format_time(now),
                "teams": teams,
                "budgets": {
                    "rows": budget_json,
                    "source": "budget counters, as GET /admin/budgets (current windows, not the period)",
                },
                "backends_now": {
                    "rows": backends_now,
                    "source": "live occupancy counters, as GET /admin/backends and the tollgate_backend_* metrics",
                },
                "ledger": panels,
            }),
        )
    }

    /// `GET /admin/usage?group_by=team,model&from=…&to=…`: the ledger report as JSON.
    async fn usage(&self, query: &str) -> Response<GatewayBody> {
        let parsed = (|| -> Result<_, report::ReportError> {
            let by = report::Dim::parse_list(
                &param(query, "group_by").unwrap_or_else(|| "team".into()),
            )?;
            let (from, to) = period(query)?;
            Ok((by, from, to))
        })();
        let (by, from, to) = match parsed {
            Ok(p) => p,
            Err(e) => return bad_query(e),
        };
        let json = self
            .read_ledger("usage report", move |conn| {
                let rows = report::query(conn, &by, from, to)?;
                Ok(report::render(&by, &rows, report::Format::Json))
            })
            .await;
        match json {
            Ok(json) => {
                let mut resp = Response::new(GatewayBody::full(Bytes::from(json)));
                resp.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                resp
            }
            Err(resp) => resp,
        }
    }

    /// `GET /admin/report/focus?from=…&to=…`: the FOCUS export as a CSV download.
    async fn focus(&self, query: &str) -> Response<GatewayBody> {
        let (from, to) = match period(query) {
            Ok(p) => p,
            Err(e) => return bad_query(e),
        };
        let config = self.live.load().config.clone();
        let csv = self
            .read_ledger("FOCUS export", move |conn| {
                crate::finops::focus::export(conn, &config, from, to)
            })
            .await;
        match csv {
            Ok(csv) => {
                let mut resp = Response::new(GatewayBody::full(Bytes::from(csv)));
                let h = resp.headers_mut();
                h.insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/csv; charset=utf-8"),
                );
                h.insert(
                    CONTENT_DISPOSITION,
                    HeaderValue::from_static("attachment; filename=\"tollgate-focus.csv\""),
                );
                resp
            }
            Err(resp) => resp,
        }
    }

    /// Runs `read` on a ledger connection (the file, or PostgreSQL in fleet mode) on the
    /// blocking pool: a report can scan many rows, and the runtime must keep serving meanwhile.
    /// A failure is logged here and answered with a 500 that says nothing internal.
    async fn read_ledger(
        &self,
        what: &'static str,
        read: impl FnOnce(&Reader) -> Result<String, report::ReportError> + Send + 'static,
    ) -> Result<String, Response<GatewayBody>> {
        let ledger = self.ledger.clone();
        let out = tokio::task::spawn_blocking(move || {
            // Every request that completed before this read is in it.
            ledger.flush(crate::ledger::FLUSH_WAIT);
            let conn = ledger.store.reader()?;
            read(&conn)
        })
        .await;
        let failure = match out {
            Ok(Ok(text)) => return Ok(text),
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::error!(error = %failure, "{what} failed");
        Err(error(&GatewayError::LedgerRead))
    }

    fn route<B>(&self, req: &Request<B>) -> Response<GatewayBody> {
        let path = req.uri().path();
        match (req.method(), path) {
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/readyz") if self.draining.load(Ordering::Relaxed) => {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            }
            (&Method::GET, "/readyz") => text(StatusCode::OK, "ready\n"),
            _ if !self.authorized(req) => error(&GatewayError::AdminKey),
            (&Method::GET, "/admin/backends") => json(StatusCode::OK, backends(&self.live.load())),
            (&Method::POST, "/admin/reload") => match self.reload() {
                Ok(()) => json(StatusCode::OK, serde_json::json!({"reloaded": true})),
                Err(message) => error(&GatewayError::InvalidConfig(message)),
            },
            _ => error(&GatewayError::UnknownPath(
                crate::error::prefix_chars(path, 200).to_string(),
            )),
        }
    }

    fn authorized<B>(&self, req: &Request<B>) -> bool {
        let live = self.live.load();
        let Some(expected) = &live.config.server.admin_key else {
            return true;
        };
        let presented = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::auth::bearer_token);
        // Comparing hashes keeps the comparison's timing independent of the key's prefix.
        presented.is_some_and(|p| hash_key(p) == hash_key(expected.expose()))
            // The console's cookie reads, never writes: GET only.
            || (req.method() == Method::GET && dashboard::has_session(req, expected.expose()))
    }

    /// Re-reads the config file and swaps it in whole; a bad file keeps the running config.
    pub fn reload(&self) -> Result<(), String> {
        let path = self
            .config_path
            .as_ref()
            .ok_or("this gateway was not started from a config file")?;
        let config = config::load(path, &config::process_env).map_err(|e| e.to_string())?;
        if !config.missing_keys.is_empty() {
            return Err(config.missing_keys.join("; "));
        }
        let old = self.live.load();
        // The budget store holds the counters; swapping it would drop or double spend.
        if config.budget_store != old.config.budget_store {
            return Err(
                "store.budgets and its settings changed: they take effect at the next restart, \
                 so the reload is refused"
                    .into(),
            );
        }
        if config.server.listen != old.config.server.listen
            || config.server.admin_listen != old.config.server.admin_listen
        {
            tracing::warn!(
                "listen addresses changed in the config; they take effect at the next restart"
            );
        }
        // Encodings new models need load off the runtime, before most requests need them.
        let encodings: Vec<_> = config
            .backends
            .iter()
            .flat_map(|b| {
                b.models
                    .iter()
                    .map(|m| crate::tokens::Encoding::for_model(&m.name).encoding)
            })
            .collect();
        self.tasks.spawn_blocking(move || {
            encodings
                .into_iter()
                .for_each(|e| crate::tokens::Tokenizers::shared().load(e))
        });
        self.live
            .store(Arc::new(LiveState::build(config, Some(&old))));
        crate::probe::ensure_probes(&self.live, &self.tasks);
        tracing::info!(path = %path.display(), "config reloaded");
        Ok(())
    }
}

fn backends(live: &LiveState) -> serde_json::Value {
    let now = live.clock.now_us();
    let m = &live.config.metrics;
    serde_json::Value::Array(
        live.backends
            .iter()
            .map(|b| {
                // GPU economics since the backend was configured, as on /metrics.
                let gpu = (b.cfg.hosting == crate::config::Hosting::SelfHosted).then(|| {
                    let r = b.state.occupancy.read(now, m.busy_window, m.idle_after);
                    let usd = report::usd_number;
                    let priced = b.cfg.gpu.is_some();
                    serde_json::json!({
                        "busy_ratio": r.busy_ratio,
                        "concurrency_ratio": r.concurrency_ratio,
                        "idle": r.idle,
                        "gpu_hours": priced.then_some(r.gpu_seconds / 3600.0),
                        "paid_usd": priced.then(|| usd(r.paid_nusd)),
                        "charged_usd": priced.then(|| usd(r.charged_nusd)),
                        "idle_cost_usd": priced.then(|| usd(r.idle_nusd)),
                    })
                });
                serde_json::json!({
                    "gpu": gpu,
                    "name": &*b.cfg.name,
                    "url": b.cfg.base_url,
                    "hosting": b.cfg.hosting.as_str(),
                    "region": b.cfg.region.as_deref(),
                    "up": b.state.is_up(),
                    "state": state_json(b.state.availability()),
                    "latency_ms": b.state.latency().map(|l| l.as_secs_f64() * 1000.0),
                    "health_check": b.cfg.health_check.as_ref().map(|h| h.path.as_str()),
                    "in_flight": b.state.in_flight(),
                    "max_concurrency": b.cfg.max_concurrency,
                    "models": b.cfg.models.iter().map(|m| serde_json::json!({"name": &*m.name, "aliases": m.aliases.iter().map(|a| &**a).collect::<Vec<_>>()})).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

fn state_json(a: crate::route::health::Availability) -> serde_json::Value {
    use crate::route::health::Availability as A;
    match a {
        A::Up => serde_json::json!({"circuit": "closed"}),
        A::HalfOpen => serde_json::json!({"circuit": "half_open"}),
        A::Probing => serde_json::json!({"circuit": "half_open", "probe_in_flight": true}),
        A::Open { reason, for_ms } => serde_json::json!({
            "circuit": "open",
            "reason": reason.map(|r| r.as_str()),
            "retry_in_s": for_ms as f64 / 1000.0,
        }),
        A::Busy { for_ms } => {
            serde_json::json!({"circuit": "closed", "rate_limited_for_s": for_ms as f64 / 1000.0})
        }
    }
}

fn error(e: &GatewayError) -> Response<GatewayBody> {
    GatewayBody::error(e)
}

/// A query parameter the report cannot use.
fn bad_query(e: report::ReportError) -> Response<GatewayBody> {
    error(&GatewayError::InvalidField {
        param: "query",
        message: e.to_string(),
    })
}

/// The first value of `name` in a query string, decoded.
fn param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| percent_decode(v))
}

/// A report's `from` and `to`, each optional.
fn period(query: &str) -> Result<(Option<i64>, Option<i64>), report::ReportError> {
    let now = crate::clock::unix_now_us();
    let at = |name| {
        param(query, name)
            .map(|v| report::parse_time(&v, now))
            .transpose()
    };
    Ok((at("from")?, at("to")?))
}

/// `%XX` and `+` in a query value.
fn percent_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(x) => {
                        out.push(x);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn budgets(f: &Forecasts) -> serde_json::Value {
    let now_us = f.now_us;
    let usd = |n: Option<i64>| n.map(|n| serde_json::Value::String(crate::meter::format_usd(n)));
    serde_json::Value::Array(
        f.views
            .iter()
            .zip(&f.forecasts)
            .map(|(v, f)| {
                let used_nusd = v.spent.nusd + v.reserved.nusd;
                let used_tokens = v.spent.tokens + v.reserved.tokens;
                serde_json::json!({
                    "team": &*v.team,
                    "key_id": v.key_id.as_deref(),
                    "window": v.window.as_str(),
                    "limit_usd": usd(v.limit_nusd),
                    "spent_usd": crate::meter::format_usd(v.spent.nusd),
                    "reserved_usd": crate::meter::format_usd(v.reserved.nusd),
                    "remaining_usd": usd(v.limit_nusd.map(|l| (l - used_nusd).max(0))),
                    "limit_tokens": v.limit_tokens,
                    "spent_tokens": v.spent.tokens,
                    "reserved_tokens": v.reserved.tokens,
                    "remaining_tokens": v.limit_tokens.map(|l| (l - used_tokens).max(0)),
                    "soft_ratio": v.soft_ratio,
                    "resets_at": crate::clock::format_time(v.resets_at_us),
                    "forecast": forecast_json(f, now_us),
                })
            })
            .collect(),
    )
}

/// The burn-rate forecast of one budget: the rate, what it was measured over, and when the
/// budget runs out at it (`null` when nothing burns or the window resets first).
fn forecast_json(f: &crate::budget::forecast::Forecast, now_us: i64) -> serde_json::Value {
    let round = |x: f64, places: i32| {
        let p = 10f64.powi(places);
        (x * p).round() / p
    };
    serde_json::json!({
        "burn_usd_per_hour": round(f.nusd_per_hour / 1e9, 9),
        "burn_tokens_per_hour": round(f.tokens_per_hour, 1),
        "rate_basis": f.basis.as_str(),
        "rate_window": f.describe_window(),
        "rate_from": crate::clock::format_time(f.rate_from_us),
        "rate_to": crate::clock::format_time(f.rate_to_us),
        "exhausts_at": f.exhausts_at_us.map(crate::clock::format_time),
        "seconds_left": f.seconds_left(now_us),
        "runs_out_on": f.limit.map(|k| match k {
            crate::budget::LimitKind::Usd => "usd",
            crate::budget::LimitKind::Tokens => "tokens",
        }),
    })
}

fn text(status: StatusCode, body: &'static str) -> Response<GatewayBody> {
    let mut resp = Response::new(GatewayBody::full(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<GatewayBody> {
    let mut resp = Response::new(GatewayBody::full(Bytes::from(
        serde_json::to_vec(&value).unwrap_or_default(),
    )));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
