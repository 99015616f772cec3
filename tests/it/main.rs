//! Integration tests: one binary, so the crate and its dependencies link once.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a test fails by panicking"
)]

// The sidecar config: defaults, file, environment overrides, every error message.
mod config;
// (policy, request, buyer) → decision: precedence, rails, payer lists, defaults.
mod decide_table;
// The `tollgate` binary: check, fmt, explain, test as an operator runs them.
mod cli;
// `tollgate ledger`: listings, bundle summaries, the reconciliation export, verify.
mod ledger;
// Golden snapshots of rendered diagnostics, one bad policy per mistake.
mod diagnostics;
// Property tests: the fmt round trip, comment placement, the parser never panics.
mod props;
// The request target: what is priced is what is forwarded, for every input.
mod target_props;
// x402 known answers: the golden signature and captured official-client payments.
mod x402_vectors;
// The real binary between a real client, upstream and facilitator: proxying, payments,
// replay, settlement, lifecycle.
mod e2e;
