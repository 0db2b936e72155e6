//! The FinOps wing: what is read from the ledger and the live counters, away from the request
//! path. Reports and unit economics (`report`, `backends`), the FOCUS export (`focus`), the
//! monthly statement per team (`statement`), re-pricing under another config (`whatif`), and
//! the GPU-economics exposition (`gpu`).

pub mod backends;
#[cfg(test)]
mod fixture;
pub mod focus;
pub mod gpu;
pub mod report;
pub mod statement;
pub mod whatif;
