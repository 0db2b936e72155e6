//! Tollgate: an inference gateway with cost metering.
//!
//! Modules are declared in the order a request meets them:
//!
//! ```text
//! accept ─ limits ─ authenticate ─ tag ─ parse & estimate ─ route ─ forward ─┐
//!                                                                           │
//! client ◄── stream / body (x-tollgate-* headers) ◄── meter (usage, cost) ◄──┘
//!                                  └─► record: ledger (committed before the last byte), metrics
//! ```

// Library code returns typed errors; an `unwrap` that can fail in production is a bug.
#![deny(clippy::unwrap_used)]
// Tasks through the tracker and time through the clock (see clippy.toml for why).
#![deny(clippy::disallowed_methods)]

pub mod clock;
pub mod tasks;
pub mod config;
pub mod secret;
pub mod app;
pub mod live;
pub mod server;
pub mod ctx;
pub mod pipeline;
pub mod auth;
pub mod tags;
pub mod api;
pub mod tokens;
pub mod budget;
pub mod route;
pub mod probe;
pub mod upstream;
pub mod body;
pub mod meter;
pub mod answer;
pub mod record;
pub mod ledger;
pub mod metrics;
pub mod error;
pub mod admin;
pub mod finops;
pub mod keys;
pub mod sim;
pub mod demo;
pub mod cli;
