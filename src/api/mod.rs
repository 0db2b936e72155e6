//! The client-facing wire formats: what we read from a request body, and the answers the
//! gateway gives itself (`/v1/models`).

pub mod endpoint;
pub mod error;
pub mod headers;
pub mod models;
pub mod openai;
