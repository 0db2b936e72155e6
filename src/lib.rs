//! Tollgate: an inference gateway with cost metering.
//!
//! After the process-wide pieces (clock, tasks, config, the live snapshot), modules are
//! declared in the order a request meets them:
//!
//! ```text
//! accept ─ limits ─ request id ─ authenticate ─► context, inside its record guard
//!   ─ read & parse (api) ─ tag ─ plan & claim a slot (route) ─ admit (budget)
//!   ─ send, fall back (upstream) ──────────────────────────────────────────────┐
//!                                                                              │
//! client ◄── stream / body, x-tollgate-* headers ◄── answer, meter (usage, cost) ┘
//!                     └─► record: settle the budget, ledger (stored in its journal
//!                         or committed before the last byte), metrics
//! ```
//!
//! Two departures from DESIGN.md's path, on purpose: tags come after the body is read (its
//! `metadata` carries request tags), and admission comes after routing (a budget reserves
//! the worst case at the prices of the backend that will serve the request).
//!
//! Beside the path: the FinOps wing (`finops`: reports, FOCUS, GPU economics), the admin
//! port, the simulator, the demo and the command line.

// Library code returns typed errors; an `unwrap` that can fail in production is a bug.
#![deny(clippy::unwrap_used)]
// Tasks through the tracker and time through the clock (see clippy.toml for why).
#![deny(clippy::disallowed_methods)]

pub mod clock;
pub mod tasks;
pub mod config;
pub mod secret;
pub mod live;
pub mod app;
pub mod server;
pub mod auth;
pub mod ctx;
pub mod pipeline;
pub mod send;
pub mod api;
pub mod tags;
pub mod tokens;
pub mod route;
pub mod probe;
pub mod budget;
pub mod upstream;
pub mod body;
pub mod answer;
pub mod meter;
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
