//! Tollgate: an inference gateway with cost metering.
//!
//! Modules are declared in the order a request meets them:
//!
//! ```text
//! accept ─ limits ─ authenticate ─ parse ─ route ─ forward ─┐
//!                                                           │
//! client ◄── stream / body (x-tollgate-* headers) ◄─────────┘
//!                       └─► record (metrics)
//! ```

pub mod admin;
pub mod api;
pub mod app;
pub mod auth;
pub mod body;
pub mod config;
pub mod ctx;
pub mod demo;
pub mod error;
pub mod keys;
pub mod live;
pub mod metrics;
pub mod pipeline;
pub mod record;
pub mod route;
pub mod secret;
pub mod server;
pub mod sim;
pub mod upstream;
