//! The proxy: the only module that touches Pingora sessions.
//!
//! Connections are [`listener`]'s: it caps them, times their idle waits and request heads,
//! and refuses a head it cannot take before Pingora parses it. One [`Gate`] per process,
//! shared by every connection. Per request, in Pingora's phases:
//!
//! 1. `request_filter` — assign the request id, decide the target ([`crate::target`]: what is
//!    priced is what the upstream gets), answer `/.well-known/x402`, gather the facts
//!    and ask [`policy::decide`]. Free and pass-through requests go on; denials, malformed
//!    paths and challenges are answered here ([`refusal`]); an attached x402 payment goes to
//!    [`admit`], which verifies it, applies payer lists and buyer limits, claims its nonce
//!    durably and (for `before response`) settles it; an API key goes to [`prepaid`], which
//!    resolves it, applies limits and debits the account durably.
//!    `request_body_filter` — refuse a body that arrives too slowly (408).
//! 2. `upstream_peer` / `upstream_request_filter` — forward to the one configured upstream:
//!    the decided target, without hop-by-hop, payment or key headers, `Upgrade` only where
//!    the route allows it, with `x-request-id` and `x-tollgate-*` headers saying what was
//!    paid ([`forward`]).
//! 3. `response_filter` — refuse a `101` the route did not allow (502); for `after
//!    response`: settle when the upstream answered below 400, before any byte reaches the
//!    client; add the receipt header. A failed settlement turns
//!    the response into a 402 (via `fail_to_proxy`).
//! 4. `fail_to_proxy` — upstream unreachable (502), upstream timeout (504), or a refusal
//!    raised in `response_filter`; all JSON.
//! 5. `logging` — gives back what limits held for the request; counts it in the metrics;
//!    writes its access-log line (`tollgate::access`).

mod admit;
mod forward;
pub mod listener;
mod prepaid;
pub mod refusal;
mod sell;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType};
use tracing::Instrument;

use crate::limits::{Holds, Limiter};
use crate::metrics::Metrics;
use crate::policy::{self, Buyer, Outcome, PaymentHeader, Request, Why};
use crate::reload::{Live, Loaded};
use crate::settle::Settlement;
use crate::store::Store;
use crate::target::Target;
use crate::x402::RouteTerms;
use crate::x402::wire::{PAYMENT_SIGNATURE, X_PAYMENT};
pub use admit::Admitted;
pub use prepaid::Debited;
use prepaid::Prepaid;
use refusal::Refusal;

/// Where tollgate answers machine-readable prices.
pub const DISCOVERY_PATH: &str = "/.well-known/x402";

/// Everything a request needs, built once at startup.
pub struct Gate {
    /// The policy in force and its x402 terms; each request keeps the one it started with.
    live: Arc<Live>,
    store: Store,
    upstream: HttpPeer,
    /// Absolute base URL for x402 `resource` URLs.
    public_url: String,
    clock: fn() -> u64,
    ids: Arc<RequestIds>,
    limiter: Arc<Limiter>,
    metrics: Arc<Metrics>,
    /// Settles what `admit` recorded: now (`before`/`after response`) or in bundles.
    settlement: Settlement,
    /// How slowly a request body may arrive.
    body_pace: BodyPace,
}

/// The pace a request body must keep (`connections.body_timeout`, `connections.body_min_rate`).
#[derive(Debug, Clone, Copy)]
pub struct BodyPace {
    /// The longest pause between two reads; also the grace before the rate counts.
    pub timeout: Duration,
    /// Bytes per second, averaged since the head arrived.
    pub min_rate: u64,
}

/// Per-request state, owned by Pingora between phases.
#[derive(Default)]
pub struct Ctx {
    /// The request's tracing span (its id), entered by the work done for it.
    span: Option<tracing::Span>,
    /// The policy this request is decided by, taken when it arrived.
    loaded: Option<Arc<Loaded>>,
    request_id: String,
    /// The request target as priced and forwarded ([`crate::target`]); `None` until decided,
    /// and for a target that was refused.
    target: Option<Target>,
    outcome: &'static str,
    route: Option<usize>,
    /// A verified payment whose request was forwarded.
    paid: Option<Admitted>,
    /// Credits debited for a request that was forwarded.
    prepaid: Option<Debited>,
    /// What the buyer's limits hold for this request, given back when it ends.
    holds: Option<Holds>,
    /// A refusal raised after the upstream answered (failed settlement).
    refusal: Option<Refusal>,
    upstream_status: u16,
    /// When the request was handed to the upstream.
    forwarded_at: Option<std::time::Instant>,
    /// Counted in `tollgate_settlement_queue_depth` (admitted, settlement not decided yet).
    queued: bool,
    /// The upstream request carries an `Upgrade` the route allows: a 101 may open a tunnel.
    upgrade: bool,
    /// When the request head was taken, and the body bytes received since.
    body_started: Option<std::time::Instant>,
    body_bytes: u64,
}

impl Gate {
    #[expect(
        clippy::too_many_arguments,
        reason = "one handle per shared part of the sidecar, assembled once in `server`"
    )]
    pub fn new(
        live: Arc<Live>,
        store: Store,
        upstream: HttpPeer,
        public_url: String,
        limiter: Arc<Limiter>,
        metrics: Arc<Metrics>,
        settlement: Settlement,
        body_pace: BodyPace,
    ) -> Gate {
        Gate {
            live,
            store,
            upstream,
            public_url,
            clock: crate::clock::now,
            ids: Arc::new(RequestIds::new()),
            limiter,
            metrics,
            settlement,
            body_pace,
        }
    }

    /// The request id source, shared with the [`listener`] for the requests it refuses.
    pub fn request_ids(&self) -> Arc<RequestIds> {
        self.ids.clone()
    }

    fn route_terms(loaded: &Loaded, route: Option<usize>) -> Option<Arc<RouteTerms>> {
        route.and_then(|id| loaded.terms.route(id).cloned())
    }

    /// The 402 for a paid route: the challenge and, for a credits-only route, the key header.
    fn challenge(
        &self,
        loaded: &Loaded,
        route: Option<usize>,
        target: &str,
        why: Why,
        hint: Option<&'static str>,
    ) -> Refusal {
        let terms = Gate::route_terms(loaded, route);
        let (code, message) = match (why, &terms) {
            (Why::KeyShort, Some(_)) => (
                "payment_required",
                "the API key's credits do not cover this call; pay with x402 instead".to_string(),
            ),
            (Why::KeyShort, None) => (
                "credits_exhausted",
                "the API key's credits do not cover this call".to_string(),
            ),
            (_, Some(_)) => (
                "payment_required",
                "this route is paid: sign one of `accepts` and retry with PAYMENT-SIGNATURE (v2) or X-PAYMENT (v1)".to_string(),
            ),
            (_, None) => {
                let header = loaded.policy.prepaid.as_ref().map_or("x-api-key", |p| p.header.as_str());
                ("api_key_required", format!("this route is paid with prepaid credits: send an API key in `{header}`"))
            }
        };
        let mut refusal =
            Refusal::new(402, code, message).with_challenge(terms, self.resource_url(target));
        refusal.hint = hint;
        refusal
    }

    /// Takes a request out of the settlement queue gauge, once.
    fn unqueue(&self, queued: &mut bool) {
        if std::mem::take(queued) {
            self.metrics.settlement_queue.dec();
        }
    }

    fn resource_url(&self, target: &str) -> String {
        format!("{}{}", self.public_url, target)
    }

    async fn refuse(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        refusal: Refusal,
    ) -> pingora::Result<bool> {
        ctx.outcome = refusal.code;
        let (head, body) = refusal.render(&ctx.request_id)?;
        refusal::write(session, head, body).await?;
        Ok(true)
    }
}

#[async_trait]
impl ProxyHttp for Gate {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::default()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> pingora::Result<bool> {
        ctx.request_id = self.ids.take_or_make(session.req_header());
        ctx.body_started = Some(std::time::Instant::now());
        session.set_read_timeout(Some(self.body_pace.timeout));
        // Every log line of this request's work carries its id.
        let span = tracing::info_span!("request", request_id = %ctx.request_id);
        ctx.span = Some(span.clone());
        self.admission(session, ctx).instrument(span).await
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        ctx.body_bytes += body.as_ref().map_or(0, |b| b.len() as u64);
        let Some(started) = ctx.body_started else {
            return Ok(());
        };
        let elapsed = started.elapsed();
        if elapsed > self.body_pace.timeout
            && u128::from(ctx.body_bytes) * 1000
                < u128::from(self.body_pace.min_rate) * elapsed.as_millis()
        {
            self.metrics.client_timeouts.with(["body"]).inc();
            ctx.refusal = Some(Refusal::new(
                408,
                "request_timeout",
                format!(
                    "the request body arrives slower than {} bytes per second",
                    self.body_pace.min_rate
                ),
            ));
            // The client's doing, like a client that leaves mid-body: a debit stands.
            let mut error = Error::explain(ErrorType::HTTPStatus(408), "request body too slow");
            error.as_down();
            return Err(error);
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Ctx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let mut peer = self.upstream.clone();
        if let Some(route) = ctx
            .loaded
            .as_ref()
            .and_then(|l| ctx.route.and_then(|id| l.policy.route(id)))
        {
            peer.options.read_timeout = Some(Duration::from_secs(route.timeout_secs));
        }
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        ctx.forwarded_at = Some(std::time::Instant::now());
        ctx.upgrade = forward::prepare(upstream, ctx)?;
        if !ctx.upgrade {
            // Pingora decides from the client's header whether a 101 opens a tunnel.
            session.req_header_mut().remove_header("upgrade");
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        if response.status == http::StatusCode::SWITCHING_PROTOCOLS && !ctx.upgrade {
            // A tunnel nobody priced: every later byte would bypass the policy.
            ctx.refusal = Some(Refusal::new(
                502,
                "upstream_protocol_switch",
                "the upstream switched protocols, which this route does not allow",
            ));
            return Err(Error::explain(
                ErrorType::HTTPStatus(502),
                "the upstream answered 101 to a request without an allowed upgrade",
            ));
        }
        // `100 Continue` and other interim answers are not the response: nothing is settled,
        // refunded or measured on them (101 Switching Protocols is final).
        if response.status.is_informational()
            && response.status != http::StatusCode::SWITCHING_PROTOCOLS
        {
            return Ok(());
        }
        ctx.upstream_status = response.status.as_u16();
        if let Some(at) = ctx.forwarded_at {
            self.metrics
                .upstream_seconds
                .observe(at.elapsed().as_secs_f64());
        }
        response.insert_header("x-request-id", ctx.request_id.as_str())?;
        if let Some(debited) = ctx.prepaid.as_mut() {
            if debited.refund_on_5xx && ctx.upstream_status >= 500 {
                self.refund(debited, &ctx.request_id)
                    .instrument(ctx.span.clone().unwrap_or_else(tracing::Span::none))
                    .await;
            }
            response.insert_header("x-tollgate-credits-charged", debited.charged.to_string())?;
            response.insert_header("x-tollgate-credits-balance", debited.balance.to_string())?;
        }
        let Some(paid) = ctx.paid.as_mut() else {
            return Ok(());
        };
        if paid.receipt.is_none() && paid.settle_after && ctx.upstream_status < 400 {
            let settled = self
                .settle(paid)
                .instrument(ctx.span.clone().unwrap_or_else(tracing::Span::none))
                .await;
            self.unqueue(&mut ctx.queued);
            match settled {
                Ok(receipt) => paid.receipt = Some(receipt),
                Err(refusal) => {
                    ctx.refusal = Some(*refusal);
                    return Err(Error::explain(
                        ErrorType::HTTPStatus(402),
                        "settlement failed",
                    ));
                }
            }
        }
        // Not settled (the upstream answered 400 or more): no longer awaiting settlement.
        self.unqueue(&mut ctx.queued);
        // The ledger learns the upstream's answer before the buyer does: a deferred payment is
        // `queued` (or, on 400 and above, not collected) durably first, so after a crash an
        // entry still `recorded` is one whose buyer got nothing.
        self.settlement
            .request_done(paid.seq, ctx.upstream_status)
            .instrument(ctx.span.clone().unwrap_or_else(tracing::Span::none))
            .await;
        if let Some(receipt) = &paid.receipt {
            response.insert_header(paid.payment.version.receipt_header(), receipt.as_str())?;
            response.insert_header(
                "access-control-expose-headers",
                "PAYMENT-RESPONSE, X-PAYMENT-RESPONSE",
            )?;
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let refusal = ctx.refusal.take().unwrap_or_else(|| upstream_failure(e));
        if let Some(debited) = ctx.prepaid.as_mut()
            && ctx.upstream_status == 0
            && e.esource() != &ErrorSource::Downstream
        {
            // The upstream gave no answer: the request was not served, so it costs nothing.
            // (An error after the response head — the client leaving mid-body — is charged.)
            self.refund(debited, &ctx.request_id)
                .instrument(ctx.span.clone().unwrap_or_else(tracing::Span::none))
                .await;
        }
        let status = refusal.status;
        ctx.outcome = refusal.code;
        let written = match refusal.render(&ctx.request_id) {
            Ok((head, body)) => {
                session.set_keepalive(None);
                session
                    .write_response_header(Box::new(head), false)
                    .await
                    .is_ok()
                    && session.write_response_body(Some(body), true).await.is_ok()
            }
            Err(_) => false,
        };
        FailToProxy {
            error_code: if written { status } else { 0 },
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut Ctx) {
        if let Some(paid) = &ctx.paid {
            // A request that ended without the upstream's answer (`response_filter` did not
            // run): its payment is not collected. Otherwise this changes nothing.
            self.settlement
                .request_done(paid.seq, ctx.upstream_status)
                .instrument(ctx.span.clone().unwrap_or_else(tracing::Span::none))
                .await;
        }
        if let Some(holds) = ctx.holds.take() {
            let charged = match (&ctx.paid, &ctx.prepaid) {
                (Some(paid), _) => {
                    paid.receipt.is_some()
                        || (paid.deferred && (100..400).contains(&ctx.upstream_status))
                }
                (None, Some(debited)) => debited.charged > 0,
                (None, None) => false,
            };
            self.limiter.finish(&self.store, holds, charged);
        }
        self.unqueue(&mut ctx.queued);
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let rail = match (&ctx.paid, &ctx.prepaid, ctx.outcome) {
            (Some(_), _, _) => "x402",
            (None, Some(_), _) => "prepaid",
            (None, None, outcome @ ("free" | "pass")) => outcome,
            _ => "none",
        };
        let (service, route) = match &ctx.loaded {
            Some(loaded) => (
                loaded.policy.service.as_str(),
                ctx.route.map_or("", |id| loaded.label(id)),
            ),
            None => ("", ""),
        };
        let outcome = if ctx.outcome.is_empty() {
            "unanswered"
        } else {
            ctx.outcome
        };
        self.metrics
            .requests
            .with([service, route, rail, outcome])
            .inc();
        match outcome {
            "payment_required" | "api_key_required" | "credits_exhausted" => {
                self.metrics.challenges.with([route]).inc();
            }
            "rate_limited" | "spend_limit_exceeded" | "unsettled_limit_exceeded" => {
                self.metrics.limit_refusals.with([outcome]).inc();
            }
            _ => {}
        }
        Access {
            request_id: &ctx.request_id,
            method: session.req_header().method.as_str(),
            path: &LoggedPath(ctx.target.as_ref(), session.req_header().raw_path()),
            route,
            rail,
            outcome,
            status,
            upstream_status: ctx.upstream_status,
            payer: ctx.paid.as_ref().map(|p| p.payment.payer.to_string()),
            account: ctx.prepaid.as_ref().map(|d| d.account),
            error: error.map(|e| e.etype().as_str()),
        }
        .log();
    }
}

impl Gate {
    /// `request_filter`'s work: decide, then answer or admit (see the module docs).
    async fn admission(&self, session: &mut Session, ctx: &mut Ctx) -> pingora::Result<bool> {
        let loaded = self.live.current();
        ctx.loaded = Some(loaded.clone());
        let header = session.req_header();
        // What is priced is what the upstream gets: the target, decided once from its bytes.
        let host = header.headers.get(http::header::HOST).map(|h| h.as_bytes());
        let parsed = match crate::target::parse(header.method.as_str(), header.raw_path(), host) {
            Ok(parsed) => parsed,
            Err(malformed) => {
                let refusal = Refusal::new(400, "malformed_request", malformed.to_string());
                return self.refuse(session, ctx, refusal).await;
            }
        };
        let target = parsed.as_str().to_string();
        let discovery = parsed.path() == DISCOVERY_PATH;
        ctx.target = Some(parsed);
        if discovery {
            return self.discovery(session, ctx, &loaded).await;
        }
        let payment = if header.headers.contains_key(PAYMENT_SIGNATURE) {
            Some(PaymentHeader::V2)
        } else if header.headers.contains_key(X_PAYMENT) {
            Some(PaymentHeader::V1)
        } else {
            None
        };
        let api_key = loaded
            .policy
            .prepaid
            .as_ref()
            .is_some_and(|p| header.headers.contains_key(p.header.as_str()));
        let mut request = Request {
            method: header.method.as_str(),
            target: &target,
            api_key,
            payment,
        };
        let mut decision = policy::decide(&loaded.policy, &request, &Buyer::default());
        if let (Outcome::Prepaid { credits }, Some(route)) = (&decision.outcome, decision.route) {
            let secret = loaded
                .policy
                .prepaid
                .as_ref()
                .and_then(|p| header_text(header, &p.header))
                .unwrap_or_default();
            let idempotency = header_text(header, prepaid::IDEMPOTENCY_KEY);
            let fingerprint = format!("{} {target}", header.method);
            let charged = self
                .debit(
                    &loaded,
                    &secret,
                    *credits,
                    route.id,
                    &ctx.request_id,
                    idempotency.as_deref().map(|k| (k, fingerprint.as_str())),
                )
                .await;
            match charged {
                Ok(Prepaid::Debited(debited, holds)) => {
                    ctx.route = Some(route.id);
                    ctx.outcome = "prepaid";
                    ctx.prepaid = Some(debited);
                    ctx.holds = Some(holds);
                    return Ok(false);
                }
                Ok(Prepaid::Short { balance }) => {
                    let buyer = Buyer {
                        payer: None,
                        prepaid_balance: Some(balance),
                    };
                    decision = policy::decide(&loaded.policy, &request, &buyer);
                }
                Ok(Prepaid::BadKey(problem)) if payment.is_none() => {
                    let header_name = loaded
                        .policy
                        .prepaid
                        .as_ref()
                        .map_or("x-api-key", |p| p.header.as_str());
                    let refusal = prepaid::bad_key(problem, header_name);
                    return self.refuse(session, ctx, refusal).await;
                }
                Ok(Prepaid::BadKey(_)) => {
                    // A key that cannot pay, and a payment that can: the payment pays.
                    request.api_key = false;
                    decision = policy::decide(&loaded.policy, &request, &Buyer::default());
                }
                Err(refusal) => return self.refuse(session, ctx, *refusal).await,
            }
        }
        ctx.route = decision.route.map(|r| r.id);
        ctx.outcome = decision.outcome.name();
        match decision.outcome {
            Outcome::Free | Outcome::Pass => Ok(false),
            Outcome::Deny => {
                let (code, message) = match decision.why {
                    Why::NoRoute(_) => ("no_route", "no route of this service matches the request"),
                    _ => ("route_denied", "this route is closed"),
                };
                self.refuse(session, ctx, Refusal::new(403, code, message))
                    .await
            }
            Outcome::BadRequest(malformed) => {
                let refusal = Refusal::new(400, "malformed_request", malformed.to_string());
                self.refuse(session, ctx, refusal).await
            }
            Outcome::Challenge { hint } => {
                let hint = hint.map(|_| "credits_exhausted");
                let refusal = self.challenge(&loaded, ctx.route, &target, decision.why, hint);
                self.refuse(session, ctx, refusal).await
            }
            Outcome::Prepaid { .. } => {
                // Deciding again with the balance known never debits; fail closed if it did.
                let refusal =
                    Refusal::new(503, "internal_error", "the prepaid rail answered twice");
                self.refuse(session, ctx, refusal).await
            }
            Outcome::X402 => {
                let header_name = match payment {
                    Some(PaymentHeader::V1) => X_PAYMENT,
                    _ => PAYMENT_SIGNATURE,
                };
                let value = session
                    .req_header()
                    .headers
                    .get(header_name)
                    .map(|v| v.as_bytes().to_vec())
                    .unwrap_or_default();
                let sells = decision.route.and_then(|r| r.sells);
                let mut buyer_key = None;
                if sells.is_some() {
                    let secret = loaded
                        .policy
                        .prepaid
                        .as_ref()
                        .and_then(|p| header_text(session.req_header(), &p.header));
                    match self.buyer_account(&loaded, secret.as_deref()) {
                        Ok(key) => buyer_key = key,
                        Err(refusal) => return self.refuse(session, ctx, *refusal).await,
                    }
                }
                let (admitted, holds) = match self
                    .admit(
                        &loaded,
                        &request,
                        ctx.route,
                        &value,
                        &target,
                        &ctx.request_id,
                        buyer_key.as_ref().map(|key| key.account),
                    )
                    .await
                {
                    Ok(admitted) => admitted,
                    Err(refusal) => return self.refuse(session, ctx, *refusal).await,
                };
                ctx.holds = Some(holds);
                if admitted.settle_after {
                    // Awaiting settlement until the upstream's response head arrives.
                    self.metrics.settlement_queue.inc();
                    ctx.queued = true;
                }
                let sale = match sells {
                    Some(credits) => Some(self.sell(&admitted, credits, buyer_key).await),
                    None => None,
                };
                ctx.paid = Some(admitted);
                match sale {
                    Some(sale) => self.answer_sale(session, ctx, sale).await,
                    None => Ok(false),
                }
            }
        }
    }
}

/// One access-log line (`tollgate::access`): every request gets exactly one, refused,
/// forwarded, or refused by the [`listener`] before a session existed.
pub struct Access<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    pub path: &'a dyn std::fmt::Display,
    pub route: &'a str,
    pub rail: &'a str,
    pub outcome: &'a str,
    pub status: u16,
    pub upstream_status: u16,
    pub payer: Option<String>,
    pub account: Option<u64>,
    pub error: Option<&'a str>,
}

impl Access<'_> {
    pub fn log(&self) {
        tracing::info!(
            target: "tollgate::access",
            request_id = %self.request_id,
            method = %self.method,
            path = %self.path,
            route = self.route,
            rail = self.rail,
            outcome = self.outcome,
            status = self.status,
            upstream_status = self.upstream_status,
            payer = self.payer,
            account = self.account,
            error = self.error,
            "request"
        );
    }
}

/// The access log's `path`: the priced path, or the start of a refused target's bytes.
struct LoggedPath<'a>(Option<&'a Target>, &'a [u8]);

impl std::fmt::Display for LoggedPath<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(target) => f.write_str(target.path()),
            None => {
                let raw = self.1.get(..self.1.len().min(200)).unwrap_or_default();
                f.write_str(&String::from_utf8_lossy(raw).escape_debug().to_string())
            }
        }
    }
}

/// A request header's value as text (lossy: a key with invalid bytes simply matches nothing).
fn header_text(header: &RequestHeader, name: &str) -> Option<String> {
    header
        .headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// 502 when the upstream cannot be reached or breaks, 504 when it is too slow.
fn upstream_failure(e: &Error) -> Refusal {
    match (e.esource(), e.etype()) {
        (_, ErrorType::HTTPStatus(code)) => Refusal::new(
            *code,
            "internal_error",
            "tollgate could not complete the request",
        ),
        (
            ErrorSource::Upstream,
            ErrorType::ReadTimedout | ErrorType::ConnectTimedout | ErrorType::WriteTimedout,
        ) => Refusal::new(
            504,
            "upstream_timeout",
            "the upstream service did not answer in time",
        ),
        (ErrorSource::Upstream, _)
        | (_, ErrorType::ConnectRefused | ErrorType::ConnectError | ErrorType::ConnectTimedout) => {
            Refusal::new(
                502,
                "upstream_unavailable",
                "the upstream service is unreachable or closed the connection",
            )
        }
        (ErrorSource::Downstream, ErrorType::ReadTimedout) => Refusal::new(
            408,
            "request_timeout",
            "the request body paused for longer than tollgate waits",
        ),
        (ErrorSource::Downstream, _) => {
            Refusal::new(400, "bad_request", "the request could not be read")
        }
        _ => Refusal::new(
            502,
            "upstream_unavailable",
            "the request could not be proxied to the upstream service",
        ),
    }
}

impl Gate {
    /// Answers a credit purchase (tollgate's own response; the upstream never sees it). The
    /// payment was settled, so its receipt goes with every answer, success or not.
    async fn answer_sale(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        sale: Result<sell::Sale, Box<Refusal>>,
    ) -> pingora::Result<bool> {
        let receipt = ctx.paid.as_ref().and_then(|p| {
            p.receipt
                .clone()
                .map(|r| (p.payment.version.receipt_header(), r))
        });
        let sale = match sale {
            Ok(sale) => sale,
            Err(mut refusal) => {
                refusal.receipt = receipt;
                return self.refuse(session, ctx, *refusal).await;
            }
        };
        ctx.outcome = "credits_sold";
        let body = serde_json::to_vec_pretty(&sale.body).unwrap_or_default();
        let mut head = ResponseHeader::build(sale.status, Some(6))?;
        head.insert_header("content-type", "application/json")?;
        head.insert_header("content-length", body.len().to_string())?;
        head.insert_header("cache-control", "no-store")?;
        head.insert_header("x-request-id", ctx.request_id.as_str())?;
        if let Some((name, value)) = receipt {
            head.insert_header(name, value)?;
            head.insert_header(
                "access-control-expose-headers",
                "PAYMENT-RESPONSE, X-PAYMENT-RESPONSE",
            )?;
        }
        refusal::write(session, head, bytes::Bytes::from(body)).await?;
        Ok(true)
    }

    async fn discovery(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        loaded: &Loaded,
    ) -> pingora::Result<bool> {
        ctx.outcome = "discovery";
        let method = &session.req_header().method;
        if method != http::Method::GET && method != http::Method::HEAD {
            let refusal = Refusal::new(405, "method_not_allowed", "use GET");
            return self.refuse(session, ctx, refusal).await;
        }
        let mut head = ResponseHeader::build(200, Some(4))?;
        head.insert_header("content-type", "application/json")?;
        let document = loaded.terms.discovery();
        head.insert_header("content-length", document.len().to_string())?;
        head.insert_header("x-request-id", ctx.request_id.as_str())?;
        refusal::write(session, head, document).await?;
        Ok(true)
    }
}

/// Request ids: the client's `x-request-id` when it is short printable ASCII, else a fresh
/// one (process start time and a counter, hex: unique per process, sortable).
pub struct RequestIds {
    prefix: String,
    next: AtomicU64,
}

impl RequestIds {
    fn new() -> RequestIds {
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        RequestIds {
            prefix: format!("{:012x}", start & 0xffff_ffff_ffff),
            next: AtomicU64::new(1),
        }
    }

    fn take_or_make(&self, header: &RequestHeader) -> String {
        self.take_or_make_from(
            header
                .headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok()),
        )
    }

    /// The client's id when it is acceptable, else a fresh one.
    pub fn take_or_make_from(&self, given: Option<&str>) -> String {
        if let Some(given) = given
            && !given.is_empty()
            && given.len() <= 128
            && given.bytes().all(|b| b.is_ascii_graphic())
        {
            return given.to_string();
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n:08x}", self.prefix)
    }
}
