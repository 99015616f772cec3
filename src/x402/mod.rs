//! The x402 protocol, pure: what buyers are offered, what they send back, and whether it pays.
//!
//! - [`wire`] — the JSON shapes of v1 and v2 and their base64 header encoding, with size limits.
//! - [`terms`] — per route, the `accepts` entries a buyer is offered (deterministic, built once
//!   per policy), the 402 challenge, the discovery document.
//! - [`verify`] — decoding a payment header, matching it to an offer, and checking the EIP-3009
//!   authorization locally (time window, recipient, amount, EIP-712 signature). No I/O; the
//!   clock is a parameter.
//! - [`Rejection`] — every way a payment is refused, with its stable code and HTTP status.
//!
//! Replay protection (the nonce store) and settlement are I/O and live in `store` and `settle`.

pub mod terms;
pub mod verify;
pub mod wire;

mod rejection;

pub use rejection::Rejection;
pub use terms::{RouteTerms, Terms};
