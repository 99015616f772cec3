//! The request the upstream sees: the client's, minus what is not the upstream's business,
//! plus what tollgate knows.
//!
//! Removed: hop-by-hop headers (RFC 9110 §7.6.1: `Connection` and the headers it names,
//! `Keep-Alive`, `Proxy-Connection`, `Proxy-Authorization`, `TE`, `Trailer`; an `Upgrade`
//! handshake is kept), the payment headers (`X-PAYMENT`, `PAYMENT-SIGNATURE`), the prepaid key
//! header, and any `x-tollgate-*` header the client sent (they cannot be spoofed).
//!
//! Added (README "Headers the upstream receives"):
//! - `x-request-id` — the client's, or one tollgate made.
//! - `x-tollgate-rail` — `free`, `pass`, `x402` or `prepaid`.
//! - `x-tollgate-route` — the matched route, `GET /v1/forecast/{city}`.
//! - for x402: `x-tollgate-payer` (EIP-55), `x-tollgate-amount` (atomic units),
//!   `x-tollgate-asset` (token address), `x-tollgate-network` (policy network name).
//! - for prepaid: `x-tollgate-account` (account id), `x-tollgate-key-id` (the key's visible
//!   id, never the key), `x-tollgate-credits` (credits charged; 0 for an idempotent repeat).

use pingora::http::RequestHeader;

use super::Ctx;
use crate::x402::wire::{PAYMENT_SIGNATURE, X_PAYMENT};

const HOP_BY_HOP: [&str; 5] = [
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
];

pub fn prepare(upstream: &mut RequestHeader, ctx: &Ctx) -> pingora::Result<()> {
    let Some(loaded) = ctx.loaded.as_ref() else {
        return Err(pingora::Error::explain(
            pingora::ErrorType::InternalError,
            "a request without a policy reached the upstream phase",
        ));
    };
    let policy = &loaded.policy;
    // Names that depend on the request (owned); the fixed ones are removed directly below.
    let mut named: Vec<String> = upstream
        .headers
        .keys()
        .map(|name| name.as_str())
        .filter(|name| name.starts_with("x-tollgate-"))
        .map(str::to_string)
        .collect();
    if !upstream.headers.contains_key("upgrade") {
        for value in upstream.headers.get_all("connection") {
            if let Ok(text) = value.to_str() {
                named.extend(
                    text.split(',')
                        .map(|t| t.trim().to_ascii_lowercase())
                        .filter(|t| !t.is_empty()),
                );
            }
        }
        upstream.remove_header("connection");
    }
    for name in &named {
        upstream.remove_header(name.as_str());
    }
    for name in HOP_BY_HOP.into_iter().chain([X_PAYMENT, PAYMENT_SIGNATURE]) {
        upstream.remove_header(name);
    }
    if let Some(prepaid) = &policy.prepaid {
        upstream.remove_header(prepaid.header.as_str());
    }

    upstream.insert_header("x-request-id", ctx.request_id.as_str())?;
    let rail = match (&ctx.paid, &ctx.prepaid, ctx.route) {
        (Some(_), _, _) => "x402",
        (None, Some(_), _) => "prepaid",
        (None, None, Some(_)) => "free",
        (None, None, None) => "pass",
    };
    upstream.insert_header("x-tollgate-rail", rail)?;
    if let Some(route) = ctx.route {
        upstream.insert_header("x-tollgate-route", loaded.label(route))?;
    }
    if let Some(paid) = &ctx.paid
        && let Some(offer) = paid.offer()
    {
        upstream.insert_header("x-tollgate-payer", paid.payment.payer.to_checksum(None))?;
        upstream.insert_header("x-tollgate-amount", paid.payment.amount.to_string())?;
        upstream.insert_header("x-tollgate-asset", offer.asset.to_checksum(None))?;
        upstream.insert_header("x-tollgate-network", offer.network.as_str())?;
    }
    if let Some(debited) = &ctx.prepaid {
        upstream.insert_header("x-tollgate-account", debited.account.to_string())?;
        upstream.insert_header("x-tollgate-key-id", debited.key.as_str())?;
        upstream.insert_header("x-tollgate-credits", debited.charged.to_string())?;
    }
    Ok(())
}
