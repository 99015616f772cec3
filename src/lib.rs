//! tollgate: a payment sidecar that lets any HTTP API charge AI agents and people per call.
//!
//! (Architecture map: see the end of this session's work; filled in below.)

pub mod cli;
pub mod config;
pub mod money;
pub mod networks;
pub mod policy;
