//! The admission phase: a request reserves its worst case against every budget of its team
//! and key before it is sent, at the prices of the backend that will serve it.
//!
//! The prompt is first taken at its free upper bound (the byte count). Only near a limit,
//! where that slack would refuse a request that fits or hold room others could use, is it
//! counted exactly and tried again. A fallback to a dearer backend reserves the difference.

use super::{BudgetBook, Demand, Refusal, Remaining, Reservation};
use crate::api::endpoint::Endpoint;
use crate::auth::Principal;
use crate::config::prices::Price;
use crate::ctx::RequestCtx;
use crate::error::GatewayError;
use crate::meter::price::{self, Egress, Rounding, Tokens};
use crate::metrics as m;
use crate::route::Candidate;
use crate::tokens::Counter;
use bytes::Bytes;

/// Output tokens reserved for a request that sets no `max_tokens` on a model with no known cap.
pub const DEFAULT_OUTPUT_RESERVE: u64 = 4096;

/// A request whose rough worst case is over 1/NEAR_LIMIT_FRACTION of the room left in a budget
/// is counted exactly before it is admitted.
const NEAR_LIMIT_FRACTION: i64 = 16;

/// What a request holds against its budgets, and what that leaves it.
#[derive(Debug, Clone, Copy)]
pub struct Admission {
    /// The prompt as counted for admission.
    pub prompt_tokens: u64,
    /// The most it may generate, all choices together.
    pub output: u64,
    /// The most one choice may generate: what the upstream is told when the client set no cap.
    pub per_choice: u64,
    /// The worst case reserved.
    pub demand: Demand,
    /// Room left in its tightest budgets after the reservation.
    pub remaining: Remaining,
    /// Generated tokens a stream may produce before it would run past a hard budget.
    pub output_limit: Option<u64>,
}

/// The backend side of a request's admission: its price, and how its prompt is counted.
#[derive(Debug, Clone, Copy)]
pub struct Terms<'a> {
    pub price: Option<&'a Price>,
    pub counter: Counter,
}

/// What a request may make the upstream generate: `choices` completions (`n`, `best_of`) of
/// at most `per_choice` tokens each (its own `max_tokens`, when it set one).
#[derive(Debug, Clone, Copy)]
pub struct OutputAsk {
    pub per_choice: Option<u64>,
    pub choices: u64,
}

impl OutputAsk {
    /// The most one choice may generate, and all of them together, on a model whose own
    /// cap is `model_cap`.
    pub fn worst_case(self, endpoint: Endpoint, model_cap: Option<u64>) -> (u64, u64) {
        let per_choice = match endpoint {
            Endpoint::Embeddings => 0,
            _ => self
                .per_choice
                .or(model_cap)
                .unwrap_or(DEFAULT_OUTPUT_RESERVE),
        };
        (per_choice, per_choice.saturating_mul(self.choices.max(1)))
    }
}

/// The admission phase of a request on its chosen backend, for a team with budgets (`None`
/// without). The worst case is every choice at its cap: the request's own `max_tokens`, else
/// the model's cap, else [`DEFAULT_OUTPUT_RESERVE`] (which the caller then sends upstream, so
/// that no choice can outgrow it); an exact prompt count made while routing is reused.
pub async fn for_request(
    book: &BudgetBook,
    ctx: &RequestCtx,
    ask: OutputAsk,
    candidate: &Candidate,
    counts: &[(Counter, u64)],
) -> Result<Option<(Reservation, Admission)>, GatewayError> {
    if ctx.principal.team.budgets.is_empty() {
        return Ok(None);
    }
    let (per_choice, output) = ask.worst_case(ctx.endpoint, candidate.max_output_tokens);
    let known = counts
        .iter()
        .find(|(c, _)| *c == candidate.counter)
        .map(|&(_, n)| n);
    let terms = Terms {
        price: candidate.price.as_deref(),
        counter: candidate.counter,
    };
    let (reservation, mut admission) = admit(
        book,
        &ctx.principal,
        terms,
        output,
        known,
        ctx.endpoint,
        &ctx.body,
    )
    .await?;
    admission.per_choice = per_choice;
    Ok(Some((reservation, admission)))
}

/// Reserves the request's worst case. `known` is an exact prompt count made already (for
/// routing); `output` the most it may generate.
pub async fn admit(
    book: &BudgetBook,
    principal: &Principal,
    terms: Terms<'_>,
    output: u64,
    known: Option<u64>,
    endpoint: Endpoint,
    body: &Bytes,
) -> Result<(Reservation, Admission), GatewayError> {
    let team = &principal.team;
    let reserve = |prompt: u64| async move {
        let demand = worst_case(terms.price, prompt, output);
        book.admit(team, &principal.key_id, demand)
            .await
            .map(|(reservation, remaining)| {
                (
                    reservation,
                    Admission {
                        prompt_tokens: prompt,
                        output,
                        per_choice: output,
                        demand,
                        remaining,
                        output_limit: output_limit(&remaining, output, terms.price),
                    },
                )
            })
    };
    let prompt = match known {
        Some(n) => n,
        None => {
            let estimate = crate::tokens::estimate_prompt_tokens(body.len());
            let rough = worst_case(terms.price, estimate, output);
            let room = book.room(team, &principal.key_id);
            let far = room
                .nusd
                .is_none_or(|r| rough.nusd <= r / NEAR_LIMIT_FRACTION)
                && room
                    .tokens
                    .is_none_or(|r| rough.tokens <= r / NEAR_LIMIT_FRACTION);
            if far {
                match reserve(estimate).await {
                    Ok(admitted) => return Ok(admitted),
                    // Counting exactly would not bring the store back.
                    Err(Refusal::StoreUnavailable) => {
                        return Err(refused(Refusal::StoreUnavailable))
                    }
                    Err(Refusal::Over(_)) => {}
                }
            }
            crate::tokens::count_prompt(terms.counter, endpoint, body).await
        }
    };
    reserve(prompt).await.map_err(refused)
}

/// Reserves what a fallback to a dearer backend adds to the worst case; `Ok(None)` when it
/// costs no more. The admission then describes the new backend.
pub async fn grow(
    book: &BudgetBook,
    principal: &Principal,
    admission: &mut Admission,
    price: Option<&Price>,
) -> Result<Option<Reservation>, Refusal> {
    let demand = worst_case(price, admission.prompt_tokens, admission.output);
    let extra = Demand {
        nusd: (demand.nusd - admission.demand.nusd).max(0),
        tokens: (demand.tokens - admission.demand.tokens).max(0),
    };
    if extra == Demand::default() {
        return Ok(None);
    }
    let (more, remaining) = book
        .admit(&principal.team, &principal.key_id, extra)
        .await?;
    admission.demand = demand;
    admission.remaining = remaining;
    admission.output_limit = output_limit(&remaining, admission.output, price);
    Ok(Some(more))
}

/// A request's worst case: its prompt plus the most it may generate, rounded up.
fn worst_case(price: Option<&Price>, prompt: u64, output: u64) -> Demand {
    let tokens = Tokens {
        prompt,
        completion: output,
        ..Default::default()
    };
    Demand {
        nusd: price::cost_nusd(price, tokens, Egress::default(), Rounding::Up),
        tokens: (prompt + output) as i64,
    }
}

/// Generated tokens a stream may produce before it would run past a hard budget: what it
/// reserved, plus the room left after its reservation (in tokens, or dollars at the output
/// price). A stream whose server ignores its cap is ended there.
fn output_limit(room: &Remaining, reserved: u64, price: Option<&Price>) -> Option<u64> {
    let by_tokens = room.tokens.map(|t| reserved + t.max(0) as u64);
    let by_usd = match (room.nusd, price) {
        (Some(n), Some(p)) => price::output_tokens_for(p, n).map(|t| reserved + t),
        _ => None,
    };
    [by_tokens, by_usd].into_iter().flatten().min()
}

fn refused(refusal: Refusal) -> GatewayError {
    match refusal {
        Refusal::Over(over) => {
            metrics::counter!(m::BUDGET_REJECTIONS_TOTAL, "team" => over.team.clone(), "window" => over.window.as_str())
                .increment(1);
            GatewayError::OverBudget(Box::new(over))
        }
        Refusal::StoreUnavailable => GatewayError::BudgetStoreUnavailable,
    }
}
