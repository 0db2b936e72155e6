//! Talking to backends: the pooled client, one forwarding attempt, and the streaming body.

pub mod client;
pub mod engine;
pub mod exchange;
pub mod forward;
pub mod h1;
pub mod headers;
pub mod stream;
