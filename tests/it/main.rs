//! Integration tests: one binary, so the crate and its dependencies link once.

// The sidecar config: defaults, file, environment overrides, every error message.
mod config;
// (policy, request, buyer) → decision: precedence, rails, payer lists, defaults.
mod decide_table;
// The `tollgate` binary: check, fmt, explain, test as an operator runs them.
mod cli;
// Golden snapshots of rendered diagnostics, one bad policy per mistake.
mod diagnostics;
// Property tests: the fmt round trip, comment placement, the parser never panics.
mod props;
