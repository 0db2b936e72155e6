//! Routing decisions in words: the compact `x-tollgate-route` header on every response, the
//! reasons in a refusal, and the table of `tollgate check --explain`.

use super::{Basis, Exclusion, Plan, Ranked};
use crate::meter::format_usd;
use http::HeaderValue;
use std::fmt::Write;
use std::sync::Arc;

/// Most exclusions listed in the header; the rest are counted.
const HEADER_MAX_EXCLUDED: usize = 8;

/// One reason in plain words.
pub fn describe(why: &Exclusion) -> String {
    match why {
        Exclusion::Region { region } => format!(
            "region {} is not among the team's regions",
            region.as_deref().unwrap_or("(none)")
        ),
        Exclusion::Features { missing } => format!("does not support {missing}"),
        Exclusion::Endpoint { endpoint } => {
            format!("speaks Anthropic's API, which has no {}", endpoint.path())
        }
        Exclusion::Context { needed, window } => {
            format!("needs {needed} tokens (prompt + max_tokens), context window is {window}")
        }
        Exclusion::Circuit { reason, for_ms } => format!(
            "down (circuit open after {} failures; next try in {})",
            reason.map_or("repeated", |r| r.as_str()),
            seconds(*for_ms)
        ),
        Exclusion::Probing => "recovering (a probe request is in flight)".into(),
        Exclusion::Busy { for_ms } => {
            format!("rate limited by the backend (429) for {}", seconds(*for_ms))
        }
        Exclusion::Capacity { in_flight, max } => {
            format!("at capacity ({in_flight}/{max} in flight)")
        }
    }
}

fn seconds(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

/// Why the first of `ranked` beat the second.
fn edge(chosen: &Ranked, next: Option<&Ranked>) -> &'static str {
    if chosen.queued {
        return "queued";
    }
    match next {
        None => "only",
        Some(n) if chosen.cost_nusd < n.cost_nusd => "cheapest",
        Some(n) if chosen.load_permille < n.load_permille => "least_loaded",
        Some(n) if chosen.latency_us < n.latency_us => "fastest",
        Some(_) => "first",
    }
}

/// `x-tollgate-route`: `backend=gpt; reason=fallback; cost=list; est_usd=0.000120; eligible=3;
/// tried=llama:connect; excluded=gpt-eu:region,mini:context`.
///
/// `tried` lists the candidates before the chosen one that were attempted or skipped, with why.
pub fn header(plan: &Plan, chosen: usize, tried: &[(Arc<str>, &'static str)]) -> HeaderValue {
    let r = &plan.ranked[chosen];
    let reason = if tried.is_empty() {
        edge(r, plan.ranked.get(chosen + 1))
    } else if tried.iter().all(|(_, why)| *why == "capacity") {
        // The cheaper ones filled up between planning and sending.
        "overflow"
    } else {
        "fallback"
    };
    let mut s = String::with_capacity(160);
    let _ = write!(
        s,
        "backend={}; reason={reason}; cost={}",
        r.candidate.backend.cfg.name,
        r.basis.as_str()
    );
    if r.basis != Basis::Unpriced {
        let _ = write!(s, "; est_usd={}", format_usd(r.cost_nusd));
    }
    let _ = write!(s, "; eligible={}", plan.ranked.len());
    if !tried.is_empty() {
        s.push_str("; tried=");
        for (i, (name, why)) in tried.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(s, "{name}:{why}");
        }
    }
    if !plan.excluded.is_empty() {
        s.push_str("; excluded=");
        for (i, e) in plan.excluded.iter().take(HEADER_MAX_EXCLUDED).enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(s, "{}:{}", e.candidate.backend.cfg.name, e.why.as_str());
        }
        if plan.excluded.len() > HEADER_MAX_EXCLUDED {
            let _ = write!(s, ",+{}", plan.excluded.len() - HEADER_MAX_EXCLUDED);
        }
    }
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("unprintable"))
}

/// Every candidate, ranked ones first in order, then the excluded with their reason.
pub fn table(plan: &Plan) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<4} {:<18} {:<34} {:<12} {:<7} {:>12} {:<10} verdict",
        "rank", "backend", "model", "hosting", "region", "est. USD", "cost basis"
    );
    for (i, r) in plan.ranked.iter().enumerate() {
        let c = &r.candidate;
        let b = &c.backend.cfg;
        let verdict = if i == 0 {
            format!("chosen ({})", edge(r, plan.ranked.get(1)))
        } else {
            "fallback".into()
        };
        let _ = writeln!(
            s,
            "{:<4} {:<18} {:<34} {:<12} {:<7} {:>12} {:<10} {verdict}",
            i + 1,
            b.name,
            c.model,
            b.hosting.as_str(),
            b.region.as_deref().unwrap_or("-"),
            if r.basis == Basis::Unpriced {
                "-".into()
            } else {
                format_usd(r.cost_nusd)
            },
            r.basis.as_str(),
        );
    }
    for e in &plan.excluded {
        let c = &e.candidate;
        let b = &c.backend.cfg;
        let _ = writeln!(
            s,
            "{:<4} {:<18} {:<34} {:<12} {:<7} {:>12} {:<10} excluded: {}",
            "-",
            b.name,
            c.model,
            b.hosting.as_str(),
            b.region.as_deref().unwrap_or("-"),
            "-",
            "-",
            describe(&e.why)
        );
    }
    s
}
