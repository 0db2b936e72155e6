//! The one price function: tokens (and egress bytes) x prices, in integer arithmetic, with
//! its rounding named. Expected cost (routing), worst case (budget admission) and actual cost
//! (the bill) all come from here, so they can never disagree on a rounding rule.
//!
//! Prices are USD per token in the config; here each becomes an integer number of
//! femto-dollars (1e-15 USD) per token, exact to far below a nano-dollar per million
//! tokens, and every term is summed in femto-dollars before the one rounding to whole
//! nano-dollars, which is what the ledger, budgets and metrics hold.

use super::Usage;
use crate::config::prices::Price;

/// Femto-dollars per nano-dollar.
const FEMTO_PER_NANO: u128 = 1_000_000;

/// How a sum of femto-dollars becomes whole nano-dollars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    /// The nearest nano-dollar, halves up: the bill, and the expected cost routing compares.
    Nearest,
    /// Up to the next nano-dollar: a reservation, which must cover whatever the bill comes to.
    Up,
}

/// Tokens of one request by the rate each is priced at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    /// All prompt tokens, cached and cache-written ones included.
    pub prompt: u64,
    pub cached: u64,
    pub cache_write: u64,
    /// Of `cache_write`, those written for an hour.
    pub cache_write_1h: u64,
    pub completion: u64,
}

impl From<&Usage> for Tokens {
    fn from(u: &Usage) -> Tokens {
        Tokens {
            prompt: u.prompt,
            cached: u.cached,
            cache_write: u.cache_write,
            cache_write_1h: u.cache_write_1h,
            completion: u.completion,
        }
    }
}

/// Egress charged for the bytes of a request and its answer.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Egress {
    pub bytes: u64,
    pub usd_per_gb: Option<f64>,
}

/// The cost in nano-dollars of `tokens` at `price` (the long-context tier when the prompt
/// is over its threshold) plus egress. No price: egress only.
pub fn cost_nusd(price: Option<&Price>, tokens: Tokens, egress: Egress, rounding: Rounding) -> i64 {
    let mut femto: u128 = 0;
    if let Some(p) = price {
        let p = p.for_prompt(tokens.prompt);
        let uncached = tokens
            .prompt
            .saturating_sub(tokens.cached.saturating_add(tokens.cache_write));
        femto += u128::from(uncached) * femto_per_unit(p.input)
            + u128::from(tokens.cached) * femto_per_unit(p.cached_input)
            + u128::from(tokens.cache_write.saturating_sub(tokens.cache_write_1h))
                * femto_per_unit(p.cache_write)
            + u128::from(tokens.cache_write_1h.min(tokens.cache_write))
                * femto_per_unit(p.cache_write_1h)
            + u128::from(tokens.completion) * femto_per_unit(p.output);
    }
    if let Some(per_gb) = egress.usd_per_gb {
        // USD per GB is femto-dollars per byte times 1e6.
        femto += u128::from(egress.bytes) * femto_per_unit(per_gb / 1e9);
    }
    let nano = match rounding {
        Rounding::Nearest => (femto + FEMTO_PER_NANO / 2) / FEMTO_PER_NANO,
        Rounding::Up => femto.div_ceil(FEMTO_PER_NANO),
    };
    i64::try_from(nano).unwrap_or(i64::MAX)
}

/// How many whole tokens at the output price `nusd` pays for (the room a budget leaves a
/// stream); `None` when output is free.
pub fn output_tokens_for(price: &Price, nusd: i64) -> Option<u64> {
    let per = femto_per_unit(price.output);
    (per > 0).then(|| (u128::from(nusd.max(0) as u64) * FEMTO_PER_NANO / per) as u64)
}

/// A USD amount per unit as whole femto-dollars (negative or non-finite: 0; validation
/// refuses those, this keeps the arithmetic total).
fn femto_per_unit(usd: f64) -> u128 {
    if usd.is_finite() && usd > 0.0 {
        (usd * 1e15).round() as u128
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::prices::PriceSource;

    fn per_m(input: f64, output: f64) -> Price {
        Price {
            input: input / 1e6,
            output: output / 1e6,
            cached_input: input / 2e6,
            cache_write: input * 1.25 / 1e6,
            cache_write_1h: input * 2.0 / 1e6,
            long_context: None,
            source: PriceSource::Config,
        }
    }

    #[test]
    fn prices_sum_exactly_and_round_once() {
        let p = per_m(0.15, 0.60);
        let t = Tokens {
            prompt: 1000,
            cached: 600,
            cache_write: 0,
            cache_write_1h: 0,
            completion: 200,
        };
        // 400 x 0.15 + 600 x 0.075 + 200 x 0.60 = 225 micro-dollars... per 1M: 225_000 n$.
        assert_eq!(
            cost_nusd(Some(&p), t, Egress::default(), Rounding::Nearest),
            225_000
        );
        // One token at $0.15/1M is 150 n$ exactly; at $0.0375/1M it is 37.5 n$, which the
        // bill rounds to 38 and a reservation takes as 38 too, but 2 tokens are exactly 75.
        let cheap = per_m(0.0375, 0.0);
        let one = Tokens {
            prompt: 1,
            ..Default::default()
        };
        assert_eq!(
            cost_nusd(Some(&cheap), one, Egress::default(), Rounding::Nearest),
            38
        );
        let two = Tokens {
            prompt: 2,
            ..Default::default()
        };
        assert_eq!(
            cost_nusd(Some(&cheap), two, Egress::default(), Rounding::Up),
            75
        );
        // A third of a nano-dollar a token.
        let third = per_m(1.0 / 3000.0, 0.0);
        assert_eq!(
            cost_nusd(Some(&third), one, Egress::default(), Rounding::Nearest),
            0
        );
        assert_eq!(
            cost_nusd(Some(&third), one, Egress::default(), Rounding::Up),
            1
        );
    }

    #[test]
    fn egress_and_the_room_a_budget_leaves() {
        let egress = Egress {
            bytes: 1_000_000,
            usd_per_gb: Some(0.09),
        };
        assert_eq!(
            cost_nusd(None, Tokens::default(), egress, Rounding::Nearest),
            90_000
        );
        let p = per_m(0.15, 0.60);
        assert_eq!(output_tokens_for(&p, 600_000), Some(1000));
        assert_eq!(output_tokens_for(&p, 599), Some(0));
        assert_eq!(output_tokens_for(&per_m(1.0, 0.0), 1_000), None);
    }
}
