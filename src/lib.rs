//! tollgate: a payment sidecar that lets any HTTP API charge AI agents and people per call.
//!
//! # Bird's-eye view
//!
//! An operator writes one policy file per service (`policies/<service>.toll`) saying, route by
//! route, whether a call is free, denied, paid per request with x402 (a USDC authorization
//! signed by the buyer, EIP-3009), or paid from prepaid credits bound to an API key — or either
//! (hybrid). tollgate compiles that file into an immutable [`policy::Policy`] and answers every
//! request with a pure decision: forward, refuse, challenge with `402 Payment Required`, debit a
//! key, or verify the attached payment. A YAML file (`tollgate.yaml`, [`config`]) says where
//! tollgate listens and what it protects.
//!
//! Today the crate holds the policy language, its command line (`tollgate check | fmt | explain
//! | test`) and the sidecar configuration; the proxy, payment verification, the store and
//! settlement plug into the compiled policy (see README "Roadmap").
//!
//! # Code map
//!
//! - [`policy`] — the language, one module per step: `syntax` (text → [`policy::ast`], the only
//!   user of pest; grammar in `grammar/policy.pest`), [`policy::compile`] (validation with
//!   spans, lowering to [`policy::model`]), [`policy::routes`] (path patterns, precedence, the
//!   route trie), [`policy::decide`] (request facts → outcome), [`policy::fmt`] (canonical
//!   form), [`policy::cases`] (the operator's `test` blocks), [`policy::diag`] (rendering).
//! - [`networks`] — the built-in x402 network registry (Base, Base Sepolia USDC and their
//!   EIP-712 domains).
//! - [`money`] — decimal text ↔ integer atomic units.
//! - [`config`] — `tollgate.yaml` + `TOLLGATE_*` environment → resolved [`config::Config`].
//! - [`cli`] — the `tollgate` binary's subcommands; `main.rs` only calls [`cli::main`].
//!
//! # Invariants
//!
//! - **Money is integers.** Amounts are `u128` atomic units from the moment a policy compiles;
//!   decimal text is converted once, exactly, or refused (too many decimals, overflow). No
//!   floating point anywhere.
//! - **Decisions are pure.** [`policy::decide`] does no I/O, reads no clock and allocates only
//!   the split path; its cost does not grow with the number of routes (a segment trie).
//! - **Only `policy::syntax` sees pest types**; everything else works on the typed AST or the
//!   compiled model.
//! - **A compiled policy is immutable**; changing a policy means compiling a new one.
//! - **Secrets are references** (`env:NAME` or a file path), never values, in policies and in
//!   the config; a key pasted into a policy is an error.
//!
//! # Cross-cutting concerns
//!
//! - *Errors for operators*: policy mistakes are [`policy::Diagnostic`]s with a stable code, a
//!   span, a label and a hint, all collected (never just the first), rendered rustc-style with
//!   `file:line:col` and a caret. Config mistakes name their field (`admin.listen: …`).
//! - *Testing*: `tests/it` is one integration binary (config, decision table, CLI, golden
//!   diagnostics, property tests); `tests/benches/decide.rs` is the criterion benchmark.

pub mod cli;
pub mod config;
pub mod money;
pub mod networks;
pub mod policy;
pub mod proxy;
pub mod server;
pub mod settle;
pub mod store;
pub mod x402;
