//! Ledgers for unit tests: a real SQLite file with the gateway's schema, and records to fill it.

use super::{sqlite, Record};
use crate::meter::TokenSource;
use rusqlite::Connection;
use std::path::PathBuf;

/// A ledger file in a directory of its own, removed when dropped.
pub struct TempLedger {
    dir: PathBuf,
    pub conn: Connection,
}

impl TempLedger {
    pub fn with(name: &str, records: &[Record]) -> TempLedger {
        let dir =
            std::env::temp_dir().join(format!("tollgate-ledger-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut conn = sqlite::open(&dir.join("ledger.db"), false).unwrap();
        sqlite::insert_batch(&mut conn, records.iter()).unwrap();
        TempLedger { dir, conn }
    }
}

impl Drop for TempLedger {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A successful request with no tokens yet; tests fill in what they need.
pub fn rec(at_us: i64, team: &str, backend: Option<&str>, model: &str, tags: &str) -> Record {
    Record {
        id: format!("r{at_us}"),
        started_at_us: at_us,
        ended_at_us: at_us + 1_000,
        team: team.into(),
        key_id: "k1".into(),
        tags: tags.into(),
        endpoint: "/v1/chat/completions",
        requested_model: model.into(),
        backend: backend.map(Into::into),
        served_model: backend.map(|_| model.into()),
        prompt_tokens: Some(0),
        completion_tokens: Some(0),
        cached_tokens: Some(0),
        cache_write_tokens: Some(0),
        cache_write_1h_tokens: Some(0),
        reasoning_tokens: Some(0),
        token_source: Some(TokenSource::Upstream),
        cost_nusd: 0,
        priced: true,
        egress_bytes: 0,
        status: "ok",
        http_status: 200,
        attempts: 1,
        resent: 0,
        latency_ms: 1.0,
        ttft_ms: None,
        stream: false,
    }
}

pub fn tokens(r: Record, prompt: u64, completion: u64, cost_nusd: i64) -> Record {
    Record {
        prompt_tokens: Some(prompt),
        completion_tokens: Some(completion),
        cost_nusd,
        ..r
    }
}
