//! The record guard: opened with the request's context right after authentication, it owns
//! that context for the phases to fill in, and however the request ends (refused, finished,
//! refused upstream, upstream broke, client went away) writes its ledger record, once.
//!
//! ```text
//! open(ctx) ─► phases fill ctx ─┬► reject(error)   ─► record: rejected, no tokens, no cost
//!                               └► send_to(backend) ─► finish(outcome)
//!        finish(outcome) ─► usage: upstream's, else the engine's, else counted here
//!                        ─► cost = tokens x prices (+ egress)   ─► budget settled ─► metrics
//!                        ─► ledger record ─► Settled (committed?) ─► last bytes to the client
//! ```
//!
//! Dropping a guard that was never finished records the request as `client_closed`: the
//! caller's future or body was dropped because the client left.

use crate::budget::{BudgetBook, Demand, Reservation};
use crate::config::prices::Price;
use crate::ctx::RequestCtx;
use crate::ledger::{Ledger, Record};
use crate::meter::{self, Generated, Outcome, Settled, Status, TokenSource, Usage};
use crate::metrics as m;
use crate::route::health::InFlight;
use crate::tasks::Tasks;
use crate::tokens::{count_chat_prompt, ChatPrompt, Tokenizers};
use crate::upstream::engine::EngineCounter;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::oneshot;

/// Everything needed to settle a request; travels with the response.
pub struct Completion {
    /// Taken when settled, so a request settles once.
    job: Option<Job>,
    _in_flight: Option<InFlight>,
}

/// Where every request's record goes, and where settling work that outlives a response runs
/// (counting, learning). One per gateway: a request holds it by one pointer.
#[derive(Debug)]
pub struct Recorder {
    pub ledger: Arc<Ledger>,
    pub tasks: Tasks,
}

struct Job {
    /// The request, lent to the phases until it is settled.
    ctx: RequestCtx,
    price: Option<Arc<Price>>,
    egress_usd_per_gb: Option<f64>,
    recorder: Arc<Recorder>,
    budget: Option<(Reservation, Arc<BudgetBook>)>,
    /// Counts with the serving engine's tokenizer, when it has one.
    engine: Option<EngineCounter>,
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completion")
            .field("settled", &self.job.is_none())
            .finish()
    }
}

// === impl Completion ===

impl Completion {
    /// Opens the record of an authenticated request.
    pub fn open(ctx: RequestCtx, recorder: &Arc<Recorder>) -> Self {
        Self {
            job: Some(Job {
                ctx,
                price: None,
                egress_usd_per_gb: None,
                recorder: recorder.clone(),
                budget: None,
                engine: None,
            }),
            _in_flight: None,
        }
    }

    /// Where work that outlives the response runs; `None` once settled.
    pub fn tasks(&self) -> Option<&Tasks> {
        self.job.as_ref().map(|j| &j.recorder.tasks)
    }

    /// The request's context; `None` once settled.
    pub fn ctx(&self) -> Option<&RequestCtx> {
        self.job.as_ref().map(|j| &j.ctx)
    }

    /// The request's context, lent to a phase.
    pub fn ctx_mut(&mut self) -> &mut RequestCtx {
        &mut self
            .job
            .as_mut()
            .expect("a request is settled once, after its last phase")
            .ctx
    }

    /// Holds the request's budget reservation until it is settled (or released, unsettled).
    pub fn hold(&mut self, reservation: Reservation, book: Arc<BudgetBook>) {
        if let Some(job) = self.job.as_mut() {
            job.budget = Some((reservation, book));
        }
    }

    /// The budget reservation, to grow it when a fallback may cost more.
    pub fn reservation_mut(&mut self) -> Option<&mut Reservation> {
        self.job.as_mut()?.budget.as_mut().map(|(r, _)| r)
    }

    /// Refused before any backend answered: a record with no tokens and no cost, its
    /// reservation released.
    pub fn reject(mut self, error: &crate::error::GatewayError) {
        self._in_flight = None;
        if let Some(job) = self.job.take() {
            let http_status = error.status().as_u16();
            job.write_unsent(Status::Rejected, http_status);
        }
    }

    /// Points the request at a backend (the first, or a fallback): one more attempt, its
    /// prices and its slot.
    pub fn send_to(
        &mut self,
        candidate: &crate::route::Candidate,
        claim: crate::route::Claim,
        upstream_request_bytes: u64,
    ) {
        // The failed backend's slot is free before the next one is used.
        self._in_flight = Some(claim.in_flight);
        if let Some(job) = self.job.as_mut() {
            job.ctx.backend = Some(candidate.backend.cfg.name.clone());
            job.ctx.served_model = Some(candidate.model.clone());
            job.ctx.counter = candidate.counter;
            job.ctx.upstream_request_bytes = upstream_request_bytes;
            job.ctx.attempts += 1;
            job.price = candidate.price.clone();
            job.egress_usd_per_gb = candidate.backend.cfg.egress_usd_per_gb;
            job.engine = EngineCounter::new(&candidate.backend, &candidate.model);
        }
    }

    /// Settles the request; the receiver resolves once its record is safe from a killed
    /// process (stored in the ledger's journal, or committed).
    pub fn finish(mut self, outcome: Outcome) -> oneshot::Receiver<Settled> {
        let (tx, rx) = oneshot::channel();
        self.settle(outcome, Some(tx));
        rx
    }

    /// Settles without waiting for the ledger (nobody is left to tell).
    pub fn finish_detached(mut self, outcome: Outcome) {
        self.settle(outcome, None);
    }

    fn settle(&mut self, outcome: Outcome, reply: Option<oneshot::Sender<Settled>>) {
        let in_flight = self._in_flight.take();
        let backend_state = in_flight.as_ref().map(|g| g.backend().clone());
        let Some(job) = self.job.take() else { return };
        let mut job = Settle {
            job,
            outcome,
            ended: crate::clock::now(),
            backend_state,
            engine_counts: (None, None),
        };
        job.distrust_empty_usage();
        let engine = job.job.engine.clone();
        // Outside a runtime (a guard dropped at exit) nothing can be awaited: settle inline.
        let runtime = tokio::runtime::Handle::try_current()
            .ok()
            .map(|_| job.job.recorder.tasks.clone());
        match (engine, runtime) {
            // No usage: the engine counts, while the request still holds its slot (see
            // `upstream::engine`), then the record is written as usual.
            (Some(engine), Some(rt)) if job.needs_count() => {
                rt.spawn(async move {
                    job.count_with_engine(&engine).await;
                    drop(in_flight);
                    job.run_counted(reply).await;
                });
            }
            // Usage came: the record needs nothing more, but an engine that cannot render
            // its template learns the template's overhead from it, still holding the slot.
            (Some(engine), Some(rt)) if job.teaches(&engine) => {
                let body = job.job.ctx.body.clone();
                let prompt = job.outcome.usage.map_or(0, |u| u.prompt);
                job.run(reply);
                rt.spawn(async move {
                    if let Err(e) = engine.learn(&body, prompt).await {
                        tracing::debug!(error = %e, "could not learn the template overhead");
                    }
                    drop(in_flight);
                });
            }
            (_, rt) => {
                // The slot is free before the record is written; the backend still learns
                // the cost.
                drop(in_flight);
                match rt {
                    Some(rt) if job.local_count_bytes() > crate::tokens::INLINE_COUNT_MAX_BYTES => {
                        rt.spawn(job.run_counted(reply));
                    }
                    _ => job.run(reply),
                }
            }
        }
    }
}

impl crate::upstream::stream::StreamEnd for Completion {
    fn finish(self: Box<Self>, outcome: Outcome) -> oneshot::Receiver<Settled> {
        (*self).finish(outcome)
    }

    fn abandon(self: Box<Self>, outcome: Outcome) {
        (*self).finish_detached(outcome)
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        // Ended by the client, or by shutdown past its grace period.
        let (status, http_status) = match &self.job {
            Some(j) if j.recorder.tasks.streams_ended() => (Status::ShutDown, 503),
            _ => (Status::ClientClosed, 499),
        };
        if self.job.as_ref().is_some_and(|j| j.ctx.attempts == 0) {
            // Before any backend was asked: nothing to count or bill.
            if let Some(job) = self.job.take() {
                job.write_unsent(status, http_status);
            }
            return;
        }
        if self.job.is_some() {
            let outcome = Outcome {
                status,
                http_status,
                usage: None,
                generated: None,
                response_bytes: 0,
                first_token_at: None,
            };
            self.settle(outcome, None);
        }
    }
}

struct Settle {
    job: Job,
    outcome: Outcome,
    ended: Instant,
    backend_state: Option<Arc<crate::route::health::BackendState>>,
    /// The engine's prompt and completion counts, where it could count one but not both:
    /// they replace the local ones.
    engine_counts: (Option<u64>, Option<u64>),
}

impl Settle {
    /// A usage that says nothing was generated, beside generated text, is wrong: the text is
    /// what was served, so it is what is billed.
    fn distrust_empty_usage(&mut self) {
        if self.outcome.usage.is_some_and(|u| u.completion == 0) && self.generated_text() > 0 {
            tracing::warn!(
                request_id = self.job.ctx.id.as_str(),
                "upstream usage reports 0 completion tokens for a non-empty answer; counting it"
            );
            self.outcome.usage = None;
        }
    }

    /// The upstream reported no usage for something it may bill.
    fn needs_count(&self) -> bool {
        self.outcome.usage.is_none() && self.outcome.status != Status::UpstreamError
    }

    fn teaches(&self, engine: &EngineCounter) -> bool {
        !engine.renders_template()
            && self
                .outcome
                .usage
                .is_some_and(|u| u.source == TokenSource::Upstream)
            && self.job.ctx.endpoint == crate::api::endpoint::Endpoint::ChatCompletions
    }

    /// Fills the usage from the engine's own counts; where the engine cannot count, the local
    /// count fills in later and the source says `local`.
    async fn count_with_engine(&mut self, engine: &EngineCounter) {
        let ctx = &self.job.ctx;
        let (text, overflow) = self
            .outcome
            .generated
            .as_ref()
            .map_or(("", 0), |g| (g.text.as_str(), g.overflow_bytes));
        let prompt = engine.prompt(ctx.endpoint, &ctx.body).await;
        let completion = engine.text(text).await;
        match (prompt, completion) {
            (Ok(prompt), Ok(completion)) => {
                self.outcome.usage = Some(Usage {
                    prompt,
                    completion: completion + overflow.div_ceil(4),
                    cached: 0,
                    cache_write: 0,
                    cache_write_1h: 0,
                    reasoning: 0,
                    source: TokenSource::Engine,
                });
            }
            (prompt, completion) => {
                for e in [prompt.as_ref().err(), completion.as_ref().err()]
                    .into_iter()
                    .flatten()
                {
                    tracing::debug!(request_id = ctx.id.as_str(), error = %e, "engine count failed; counting locally");
                }
                self.engine_counts = (
                    prompt.ok(),
                    completion.ok().map(|c| c + overflow.div_ceil(4)),
                );
            }
        }
    }

    /// Counts locally what is still missing (off the runtime when large), then records.
    async fn run_counted(self, reply: Option<oneshot::Sender<Settled>>) {
        let job = if self.local_count_bytes() > crate::tokens::INLINE_COUNT_MAX_BYTES {
            let tok = Tokenizers::shared();
            let bytes = self.local_count_bytes();
            tok.off_runtime(bytes, move |_| self.with_local_usage())
                .await
        } else {
            self
        };
        job.run(reply);
    }

    fn generated_text(&self) -> usize {
        self.outcome.generated.as_ref().map_or(0, |g| g.text.len())
    }

    /// Bytes a local count would tokenize (none when the usage is known).
    fn local_count_bytes(&self) -> usize {
        match self.outcome.usage {
            Some(_) => 0,
            None => self.job.ctx.body.len() + self.generated_text(),
        }
    }

    /// Counts locally what the upstream did not report.
    fn with_local_usage(mut self) -> Self {
        if self.outcome.usage.is_none() {
            let mut usage = local_usage(&self.job.ctx, self.outcome.generated.as_ref());
            let (prompt, completion) = self.engine_counts;
            usage.prompt = prompt.unwrap_or(usage.prompt);
            usage.completion = completion.unwrap_or(usage.completion);
            self.outcome.usage = Some(usage);
        }
        self
    }

    fn run(self, reply: Option<oneshot::Sender<Settled>>) {
        let mut this = self.with_local_usage();
        let usage = this.outcome.usage.expect("with_local_usage fills it");
        // The provider bills what it generated; an upstream that refused the request (or could
        // not be reached) bills nothing, but the prompt's tokens are still recorded.
        let billable = this.outcome.status != Status::UpstreamError;
        let egress_bytes = this.job.ctx.upstream_request_bytes + this.outcome.response_bytes;
        let cost_nusd = if billable {
            meter::cost_nusd(
                this.job.price.as_deref(),
                &usage,
                egress_bytes,
                this.job.egress_usd_per_gb,
            )
        } else {
            0
        };
        let priced = this.job.price.is_some();
        if let Some(state) = &this.backend_state {
            state.occupancy.charge(cost_nusd);
        }
        this.job
            .settle_budget(billable.then_some((&usage, cost_nusd)));
        let (ctx, o) = (&this.job.ctx, &this.outcome);
        let team = ctx.principal.team.name.clone();
        let backend = ctx.backend.clone();
        let model = ctx
            .served_model
            .clone()
            .unwrap_or_else(|| ctx.requested_model.clone());
        let latency = this.ended.duration_since(ctx.started);
        record_metrics(
            &team,
            &model,
            backend.as_ref(),
            o,
            &usage,
            priced || !billable,
            ctx,
            cost_nusd,
            priced,
            latency,
        );

        let record = record(
            ctx,
            &this.job.recorder.ledger.replica,
            o.status,
            o.http_status,
            Some(Figures {
                usage: &usage,
                cost_nusd,
                priced,
                egress_bytes,
                first_token_at: o.first_token_at,
            }),
            latency,
        );
        let settled = Settled {
            usage: Some(usage),
            cost_nusd,
            priced,
            committed: false,
            ended: this.ended,
        };
        let reply = reply.map(|tx| -> Box<dyn FnOnce(bool) + Send> {
            Box::new(move |committed| {
                let _ = tx.send(Settled {
                    committed,
                    ..settled
                });
            })
        });
        this.job.recorder.ledger.submit(record, reply);
    }
}

impl Job {
    /// What was billed replaces the worst case that was held; nothing billed (a refusal
    /// upstream) only releases it.
    fn settle_budget(&mut self, billed: Option<(&Usage, i64)>) {
        let Some((reservation, book)) = self.budget.take() else {
            return;
        };
        if let Some((usage, nusd)) = billed {
            let tokens = (usage.prompt + usage.completion) as i64;
            reservation.settle(Demand { nusd, tokens }, book.now_us());
        }
    }

    /// The record of a request no backend was asked to serve: no tokens, no cost.
    fn write_unsent(self, status: Status, http_status: u16) {
        let latency = self.ctx.started.elapsed();
        let replica = &self.recorder.ledger.replica;
        let record = record(&self.ctx, replica, status, http_status, None, latency);
        self.recorder.ledger.submit(record, None);
    }
}

/// What a settled request consumed and cost.
struct Figures<'a> {
    usage: &'a Usage,
    cost_nusd: i64,
    priced: bool,
    egress_bytes: u64,
    first_token_at: Option<Instant>,
}

/// The ledger record of a request, settled (with its figures) or not sent (without).
fn record(
    ctx: &RequestCtx,
    replica: &Arc<str>,
    status: Status,
    http_status: u16,
    figures: Option<Figures<'_>>,
    latency: std::time::Duration,
) -> Record {
    let ended_at_us = crate::clock::unix_now_us();
    let usage = figures.as_ref().map(|f| f.usage);
    Record {
        id: ctx.id.as_str().to_string(),
        started_at_us: ended_at_us - latency.as_micros() as i64,
        ended_at_us,
        team: ctx.principal.team.name.clone(),
        key_id: ctx.principal.key_id.clone(),
        tags: serde_json::to_string(&ctx.tags).unwrap_or_else(|_| "{}".into()),
        // The path the client called: an Anthropic client's chat is `/v1/messages`.
        endpoint: match ctx.client_protocol {
            crate::config::Protocol::Anthropic => "/v1/messages",
            crate::config::Protocol::OpenAi => ctx.endpoint.path(),
        },
        // Caller-chosen text: bounded, so refused requests cannot fill the disk.
        requested_model: Arc::from(crate::error::prefix_chars(&ctx.requested_model, 200)),
        backend: ctx.backend.clone(),
        served_model: ctx.served_model.clone(),
        prompt_tokens: usage.map(|u| u.prompt),
        completion_tokens: usage.map(|u| u.completion),
        cached_tokens: usage.map(|u| u.cached),
        cache_write_tokens: usage.map(|u| u.cache_write),
        cache_write_1h_tokens: usage.map(|u| u.cache_write_1h),
        reasoning_tokens: usage.map(|u| u.reasoning),
        token_source: usage.map(|u| u.source),
        cost_nusd: figures.as_ref().map_or(0, |f| f.cost_nusd),
        // Nothing was priced: nothing is unpriced either.
        priced: figures.as_ref().is_none_or(|f| f.priced),
        egress_bytes: figures.as_ref().map_or(0, |f| f.egress_bytes),
        status: status.as_str(),
        http_status,
        attempts: ctx.attempts,
        resent: ctx.resent,
        latency_ms: latency.as_secs_f64() * 1e3,
        ttft_ms: figures
            .as_ref()
            .and_then(|f| f.first_token_at)
            .map(|t| t.duration_since(ctx.started).as_secs_f64() * 1e3),
        stream: ctx.stream,
        replica: replica.clone(),
    }
}

fn local_usage(ctx: &RequestCtx, generated: Option<&Generated>) -> Usage {
    let tok = Tokenizers::shared();
    let counter = ctx.counter;
    let prompt = ChatPrompt::parse(ctx.endpoint, &ctx.body)
        .map(|p| counter.scale(count_chat_prompt(&tok, counter.encoding, &p)))
        .unwrap_or(0);
    let completion = generated.map_or(0, |g| {
        counter.scale(tok.count(counter.encoding, &g.text)) + g.overflow_bytes.div_ceil(4)
    });
    Usage {
        prompt,
        completion,
        cached: 0,
        cache_write: 0,
        cache_write_1h: 0,
        reasoning: 0,
        source: TokenSource::Local,
    }
}

// Every status has its place among a series' per-status handles.
const _: () = assert!((Status::ShutDown as usize) < m::STATUSES);

#[allow(clippy::too_many_arguments)]
fn record_metrics(
    team: &Arc<str>,
    model: &Arc<str>,
    backend: Option<&Arc<str>>,
    o: &Outcome,
    usage: &Usage,
    priced: bool,
    ctx: &RequestCtx,
    cost_nusd: i64,
    priced_model: bool,
    duration: std::time::Duration,
) {
    let series = m::RequestSeries::of(m::SpendLabels {
        team: team.clone(),
        model: model.clone(),
        backend: backend.cloned(),
        tags: ctx.metric_tags.clone(),
    });
    let (took, count) = series.ended(o.status as usize, o.status.as_str());
    took.record(duration.as_secs_f64());
    count.increment(1);
    let [prompt, completion] = series.tokens();
    prompt.increment(usage.prompt);
    completion.increment(usage.completion);
    if !priced && o.status == Status::Ok {
        series.unpriced().increment(1);
    }
    if let Some(first) = o.first_token_at {
        series
            .first_token()
            .record(first.duration_since(ctx.started).as_secs_f64());
    }
    // Spend: every billed request adds its cost, so the counter sums to the ledger; the
    // histogram describes priced inferences only (an unpriced one has no cost to show).
    if cost_nusd > 0 || (priced_model && o.status == Status::Ok) {
        m::usd().add(series.labels(), cost_nusd);
    }
    if priced_model && o.status == Status::Ok {
        series.cost().record(cost_nusd as f64 / 1e9);
    }
}
