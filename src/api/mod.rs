//! The client-facing wire formats: what we read from a request body, the answers the gateway
//! gives itself (`/v1/models`), and the translation between OpenAI's and Anthropic's formats.

pub mod anthropic;
pub mod count_tokens;
pub mod endpoint;
pub mod error;
pub mod headers;
pub mod models;
pub mod openai;
