//! What the phases before sending decided, and how it changes when the request moves to a
//! fallback backend: a bigger reservation if the fallback is dearer (a budget that cannot
//! hold it ends the fallbacks), the body shaped for it, and its terms on the record.

use crate::api::openai;
use crate::budget::admit::{self, Admission};
use crate::budget::BudgetBook;
use crate::record::Completion;
use crate::route::{Candidate, Claim};
use crate::upstream::exchange::Retarget;
use std::sync::Arc;

/// What the phases before sending decided.
pub struct Prepared {
    pub request: openai::ClientRequest,
    pub admission: Option<Admission>,
    /// The body for the current candidate, and whether usage must be hidden from the client.
    pub body: bytes::Bytes,
    pub strip_usage: bool,
}

/// Moving to a fallback: a bigger reservation if it is dearer, its body, its terms on record.
pub struct Fallback<'a> {
    pub record: &'a mut Completion,
    pub prepared: &'a mut Prepared,
    pub book: &'a BudgetBook,
}

impl Retarget for Fallback<'_> {
    fn retarget(&mut self, to: &Arc<Candidate>, claim: Claim) -> Option<bytes::Bytes> {
        let Fallback {
            record,
            prepared,
            book,
        } = self;
        if let Some(admission) = prepared.admission.as_mut() {
            let principal = record.ctx_mut().principal.clone();
            match admit::grow(book, &principal, admission, to.price.as_deref()) {
                Ok(Some(more)) => {
                    if let Some(held) = record.reservation_mut() {
                        held.absorb(more);
                    }
                }
                Ok(None) => {}
                Err(_) => return None,
            }
        }
        let (body, strip_usage) = prepared
            .request
            .shape
            .for_backend(&to.model, to.backend.cfg.stream_usage);
        record.send_to(to, claim, body.len() as u64);
        prepared.strip_usage = strip_usage;
        Some(body)
    }

    fn attempts(&self) -> u32 {
        self.record.ctx().map_or(u32::MAX, |c| c.attempts)
    }

    fn resent(&mut self) {
        self.record.ctx_mut().resent += 1;
    }
}
