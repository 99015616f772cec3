//! The request the upstream sees: the client's, minus what is not the upstream's business,
//! plus what tollgate knows.
//!
//! The target is the one that was priced ([`crate::target`]), never the client's bytes.
//!
//! Removed: hop-by-hop headers (RFC 9110 §7.6.1: `Connection` and the headers it names,
//! `Keep-Alive`, `Proxy-Connection`, `Proxy-Authorization`, `TE`, `Trailer`), `Upgrade` unless
//! the route allows that protocol (`upgrade websocket`; then `Connection: upgrade` is sent), the
//! payment headers (`X-PAYMENT`, `PAYMENT-SIGNATURE`), the prepaid key header, any
//! `x-tollgate-*` header the client sent (they cannot be spoofed), and every header whose name
//! contains `_` (some servers read `X_Tollgate_Account` as `x-tollgate-account`).
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

/// Rewrites the upstream request; `Ok(true)` when it carries a protocol upgrade the route allows.
pub fn prepare(upstream: &mut RequestHeader, ctx: &Ctx) -> pingora::Result<bool> {
    let Some(loaded) = ctx.loaded.as_ref() else {
        return Err(pingora::Error::explain(
            pingora::ErrorType::InternalError,
            "a request without a policy reached the upstream phase",
        ));
    };
    let policy = &loaded.policy;
    // The target that was priced, never the client's bytes (crate::target).
    let Some(target) = ctx.target.as_ref() else {
        return Err(pingora::Error::explain(
            pingora::ErrorType::InternalError,
            "a request without a decided target reached the upstream phase",
        ));
    };
    if upstream.raw_path() != target.as_str().as_bytes() {
        upstream.set_raw_path(target.as_str().as_bytes())?;
    }
    // Names that depend on the request (owned); the fixed ones are removed directly below.
    let mut named: Vec<String> = upstream
        .headers
        .keys()
        .map(|name| name.as_str())
        .filter(|name| name.starts_with("x-tollgate-"))
        .map(str::to_string)
        .collect();
    // Names some servers read with `_` as `-` (`X_Tollgate_Account`): dropped, as nginx does.
    named.extend(
        upstream
            .headers
            .keys()
            .map(|name| name.as_str())
            .filter(|name| name.contains('_'))
            .map(str::to_string),
    );
    for value in upstream.headers.get_all("connection") {
        if let Ok(text) = value.to_str() {
            named.extend(
                text.split(',')
                    .map(|t| t.trim().to_ascii_lowercase())
                    .filter(|t| !t.is_empty() && t != "upgrade"),
            );
        }
    }
    upstream.remove_header("connection");
    let upgrade = upgrade_allowed(ctx, upstream);
    if upgrade {
        upstream.insert_header("connection", "upgrade")?;
    } else {
        upstream.remove_header("upgrade");
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
    Ok(upgrade)
}

/// Whether the request asks for a protocol upgrade that its route allows (`upgrade websocket`):
/// every protocol named in `Upgrade` must be on the route's list. Anything else is not
/// forwarded, so no upstream can turn the connection into an unpriced tunnel.
fn upgrade_allowed(ctx: &Ctx, request: &RequestHeader) -> bool {
    let Some(requested) = request.headers.get("upgrade").and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(route) = ctx
        .loaded
        .as_ref()
        .and_then(|l| ctx.route.and_then(|id| l.policy.route(id)))
    else {
        return false;
    };
    let allowed: &[String] = &route.upgrade;
    let mut protocols = requested
        .split(',')
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .peekable();
    protocols.peek().is_some()
        && protocols.all(|p| {
            let name = p.split('/').next().unwrap_or(p);
            allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
        })
}
