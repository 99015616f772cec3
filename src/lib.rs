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
//! `tollgate run` puts that in front of a service: a Pingora proxy that answers 402 challenges,
//! verifies x402 payments locally (EIP-712 + secp256k1, no network round trip), records each
//! authorization durably before forwarding (replay protection), debits prepaid accounts
//! atomically and durably, applies buyer limits, forwards to the upstream, and settles with an
//! x402 facilitator. An admin API (and the same operations from the CLI) manages accounts,
//! keys and credits; policies reload while serving; `/metrics` exports Prometheus metrics.
//!
//! # Request flow (one owner per step)
//!
//! ```text
//! client ─▶ proxy::listener ──────────────── connection cap, head deadline, idle timeout
//!            │                                 (heads Pingora would refuse: JSON 400/414/431)
//!          proxy (Pingora session, request id)
//!            ├─ target::parse ──────────────── pure: the one target priced and forwarded
//!            ├─ policy::decide ─────────────── pure: route, rail, outcome
//!            ├─ x402::verify ───────────────── pure: decode, match offer, window, signature
//!            │    or store resolve_key ─────── prepaid: SHA-256 lookup, revoked/expired
//!            ├─ limits::Limiter::admit ─────── requests / spend / unsettled per buyer
//!            ├─ store::Store::record_payment ─ durable: nonce claim + ledger entry, one fsync
//!            │    or store debit ───────────── durable: atomic, never below zero
//!            ├─ settle::Settlement (before) ── submitted → backend → outcome, all recorded
//!            ├─ proxy::forward ─────────────── headers the upstream sees
//!            ▼
//!         upstream ─▶ proxy::response_filter ─ settle (after, status < 400), receipt header
//!                     proxy logging ────────── settle::Settlement::request_done: deferred
//!                                              payments queued (or refunded on >= 400)
//!
//!         settle::Settlement::run (background) ─ bundles by count/value/window/deadline,
//!                                              one /settle per authorization (facilitator)
//!                                              or one transaction per bundle (settle::onchain
//!                                              → settle::relayer), outcomes and evidence
//!                                              (settle::evidence) in the ledger
//! ```
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
//! - [`target`] — the request target, pure: raw bytes → the canonical origin form that is both
//!   priced and forwarded, or a refusal (other forms, foreign hosts, backslashes, `;`).
//! - [`config`] — `tollgate.yaml` + `TOLLGATE_*` environment → resolved [`config::Config`].
//! - [`x402`] — the protocol, pure: [`x402::wire`] (v1/v2 JSON shapes, base64 headers),
//!   [`x402::terms`] (the deterministic `accepts` entries per route, the 402 challenge, the
//!   discovery document), [`x402::verify`] (local EIP-3009 verification), [`x402::Rejection`]
//!   (stable error codes).
//! - [`proxy`] — the only module that touches Pingora sessions: the listener's connection loop
//!   ([`proxy::listener`]: cap, deadlines, heads read and checked before Pingora parses them),
//!   the request phases, admission of a payment (`admit`) or a key (`prepaid`), credit sales
//!   (`sell`), the forwarded request (target and headers), refusals.
//! - [`store`] — the only module that touches sled: the durable nonce set,
//!   [`store::ledger`] (the payment ledger: an entry per x402 payment written with its nonce,
//!   append-only state facts, bundles), [`store::accounts`] (accounts, key hashes, balances,
//!   the append-only credit ledger, idempotency keys, refunds), [`store::sale`] (a credit sale
//!   as one transaction) and spend-limit counters. One writer thread owns every flush
//!   and every debit: concurrent debits share one transaction and one fsync (group commit).
//!   [`store::health`]: the first failed write (disk full, read-only) marks the store failed;
//!   [`server`] then refuses paid and prepaid calls, says so on `/readyz`, and restarts in
//!   place once the directory takes writes again.
//! - [`ledger`] — the payment ledger for operators and accountants: listings, the
//!   reconciliation export (CSV/JSON, exact fiat columns from an operator's rate table,
//!   [`ledger::export`]) and `ledger verify` ([`ledger::verify`]: gap-free sequences, the state
//!   machine, the status and open indexes, bundle totals, the credit audit).
//! - [`clock`] — the time payments are decided by: the wall clock, held against stepping back
//!   (a clock stepped back cannot revive an expired authorization).
//! - [`limits`] — buyer limits at run time (windows, counters, what a request holds).
//! - [`reload`] — the policy in force ([`reload::Live`], swapped whole on reload; each request
//!   keeps the one it started with) and the watcher (file content, SIGHUP).
//! - [`metrics`] — the Prometheus families and their exposition on the ops listener.
//! - [`admin`] — account administration as operations ([`admin::Op`]) shared by the admin API
//!   ([`admin::service`], bearer token from [`admin::token`]) and the CLI.
//! - [`settle`] — settlement as a service of its own: [`settle::Settlement`] owns every
//!   payment after it is recorded (settle now, or queue and bundle; outcomes, recovery after a
//!   crash, the unsettled holds of deferred payments), [`settle::facilitator`] the x402
//!   facilitator client (`/settle`, `/supported`), [`settle::onchain`] settlement by tollgate
//!   itself (`settle via rpc`: simulate, one transaction per batch, receipts matched back;
//!   the startup check), [`settle::relayer`] the gas account (local nonces, capped EIP-1559
//!   fees, replacement, confirmations, reorgs), [`settle::evm`] the token and Multicall3 ABI,
//!   [`settle::evidence`] the chain reads that decide an unknown outcome.
//! - [`logging`] — log setup and the one `log` → `tracing` bridge: what Pingora and other
//!   libraries log is redacted (header values, credentials, API keys, bodies) at every level,
//!   and client mistakes are warnings, rate-limited.
//! - [`server`] — `tollgate run`: startup checks, the Pingora server (proxy, ops listener with
//!   `/healthz`, `/readyz` and `/metrics`, admin API, policy watcher, housekeeping), signals
//!   and shutdown.
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
//! - **What is priced is what is served.** The upstream receives exactly the target the
//!   decision matched ([`target`]), never the client's bytes; a target that could be read two
//!   ways (other forms, backslashes, `;`, letter case that changes the route) is refused.
//!   Protocol upgrades pass only where the route allows them; an unrequested `101` is refused.
//! - **Paid content is never served unpaid.** A paid route forwards only after the payment
//!   verified locally and its nonce was claimed durably; every error on that path refuses the
//!   call (400/402/403/503). With `after response`, settlement happens before any byte of the
//!   upstream's answer reaches the client, and a failed settlement replaces that answer with a
//!   402; the upstream failing (status ≥ 400, unreachable, timeout) is never settled.
//! - **An authorization is used once**, also across concurrent requests and restarts: the
//!   (chain, asset, from, nonce) key is claimed in a transaction and flushed before the
//!   upstream sees the request.
//! - **Every payment is on the books before its request is forwarded**: its ledger entry is
//!   written in the same transaction as its nonce claim. Ledger history is append-only (a state
//!   change is a new fact, sequence numbers have no gaps) and follows one state machine
//!   ([`store::ledger::State::may_become`]).
//! - **Nothing is settled twice, nothing is guessed.** An entry is `submitted` on disk before
//!   its backend is called; a call whose outcome is unknown is `unresolved` and is decided only
//!   by evidence from the chain ([`settle::evidence`]); after a crash, entries found
//!   `submitted` become `unresolved`.
//! - **A debit is atomic and durable before the upstream sees the request**, and never drives a
//!   balance below zero; for every account, top-ups − debits + refunds == balance
//!   ([`store::Store::audit`]), also across `kill -9`.
//! - **Secrets never leave**: API keys are stored as SHA-256 digests and shown once; the admin
//!   token is compared in constant time; neither appears in logs, metrics or error bodies.
//!   tollgate's own log lines carry no header value; what libraries log passes through
//!   [`logging`], which redacts header values, credentials, keys and bodies at every level.
//! - **Only `proxy` touches Pingora sessions; only `store` touches sled.** Verification and
//!   decisions take the clock as a parameter.
//!
//! # Cross-cutting concerns
//!
//! - *Errors for operators*: policy mistakes are [`policy::Diagnostic`]s with a stable code, a
//!   span, a label and a hint, all collected (never just the first), rendered rustc-style with
//!   `file:line:col` and a caret. Config mistakes name their field (`admin.listen: …`).
//! - *Testing*: `tests/it` is one integration binary (config, decision table, CLI, golden
//!   diagnostics, property tests, x402 known answers, and `e2e`: the real binary against a real
//!   upstream and a signature-checking facilitator on loopback); `tests/benches/` holds the
//!   criterion benchmarks; `tests/load/run.sh` is the loopback load test (wrk, nginx).

pub mod admin;
pub mod cli;
pub mod clock;
pub mod config;
pub mod ledger;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod money;
pub mod networks;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod settle;
pub mod store;
pub mod target;
pub mod x402;

/// Seconds since the Unix epoch, as the wall clock says. Payments are decided by
/// [`clock::now`], which is held against stepping back.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
