//! Admission of an x402 payment: the steps between "a payment is attached" and "forward".
//!
//! verify locally ([`x402::verify`]) → payer allow/deny lists ([`policy::decide`] again, now
//! with the payer) → buyer limits ([`crate::limits`]) → claim the nonce and record the payment
//! in the ledger, in one durable write, before anything is forwarded → for `before response`
//! (and credit sales), settle now through [`crate::settle`]. Every failure is a [`Refusal`];
//! nothing here forwards a request that was not paid for.

use std::sync::Arc;

use super::Gate;
use super::refusal::Refusal;
use crate::limits::{Ask, BuyerId, Holds, Refused, Spent};
use crate::policy::{self, Buyer, Outcome, Request, Timing, Why};
use crate::reload::Loaded;
use crate::settle::SettleError;
use crate::store::NonceKey;
use crate::store::ledger::{self, Authorization, Entry, Recorded};
use crate::x402::verify::{self, Payment, Version};
use crate::x402::wire::{SettleResponse, encode_header};
use crate::x402::{Rejection, RouteTerms};

/// A verified, recorded payment whose request goes to the upstream.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub payment: Payment,
    pub terms: Arc<RouteTerms>,
    /// The resource URL the payment was verified for.
    pub resource: String,
    /// The payment's entry in the ledger.
    pub seq: u64,
    /// Settle once the upstream answered below 400 (else it was settled before forwarding,
    /// or it is deferred).
    pub settle_after: bool,
    /// Settled later, in a bundle: the buyer is answered without waiting.
    pub deferred: bool,
    /// The base64 receipt, once settled.
    pub receipt: Option<String>,
}

impl Admitted {
    /// The offer the payment paid.
    pub fn offer(&self) -> Option<&crate::x402::terms::Offer> {
        self.terms.offers.get(self.payment.offer)
    }
}

impl Gate {
    #[expect(
        clippy::too_many_arguments,
        reason = "the request's facts, each from a different step of the proxy's filter"
    )]
    pub(super) async fn admit(
        &self,
        loaded: &Loaded,
        request: &Request<'_>,
        route: Option<usize>,
        header: &[u8],
        target: &str,
        request_id: &str,
        sale_account: Option<u64>,
    ) -> Result<(Admitted, Holds), Box<Refusal>> {
        let resource = self.resource_url(target);
        let (Some(terms), Some(route)) = (
            Gate::route_terms(loaded, route),
            route.and_then(|id| loaded.policy.route(id)),
        ) else {
            return Err(Box::new(Refusal::new(
                503,
                "internal_error",
                "the route has no x402 terms",
            )));
        };
        let refuse = |rejection: Rejection| {
            self.metrics
                .payments_rejected
                .with([rejection.code()])
                .inc();
            Box::new(
                Refusal::new(rejection.status(), rejection.code(), rejection.to_string())
                    .with_challenge(Some(terms.clone()), resource.clone()),
            )
        };
        let started = std::time::Instant::now();
        let verified = verify::verify(header, &terms, (self.clock)());
        self.metrics
            .verification_seconds
            .observe(started.elapsed().as_secs_f64());
        let payment = verified.map_err(refuse)?;
        if let Some(offer) = terms.offers.get(payment.offer) {
            self.metrics
                .payments_verified
                .with([offer.network.as_str()])
                .inc();
        }

        let buyer = Buyer {
            payer: Some(payment.payer),
            prepaid_balance: None,
        };
        let decision = policy::decide(&loaded.policy, request, &buyer);
        if decision.outcome == Outcome::Deny {
            let code = if decision.why == Why::PayerDenied {
                "payer_denied"
            } else {
                "payer_not_allowed"
            };
            return Err(Box::new(Refusal::new(
                403,
                code,
                "this payer may not pay for this route",
            )));
        }

        let Some(offer) = terms.offers.get(payment.offer) else {
            return Err(Box::new(Refusal::new(
                503,
                "internal_error",
                "the paid offer is gone",
            )));
        };
        let spent = Spent::Asset {
            symbol: &offer.asset_symbol,
            atomic: payment.amount,
        };
        let buyer = BuyerId::Payer(payment.payer);
        let holds = self.hold_limits(loaded, route, &buyer, spent, (self.clock)())?;
        let key = NonceKey {
            chain_id: offer.chain_id,
            asset: offer.asset,
            from: payment.payer,
            nonce: payment.nonce,
        };
        let timing = match &route.settle {
            Timing::BeforeResponse => ledger::Timing::BeforeResponse,
            Timing::AfterResponse => ledger::Timing::AfterResponse,
            Timing::Deferred(bundle) => ledger::Timing::Deferred {
                every_secs: bundle.every_secs,
                payments: bundle.payments,
                value: bundle.value.as_ref().map(|q| q.atomic),
            },
        };
        // A route selling credits settles first: credits are spendable the moment they exist.
        let deferred = matches!(timing, ledger::Timing::Deferred { .. }) && route.sells.is_none();
        let settle_after = matches!(timing, ledger::Timing::AfterResponse) && route.sells.is_none();
        let backend = match &loaded.policy.settlement.backend {
            policy::Backend::Facilitator { url } => url.clone(),
            policy::Backend::Rpc { url, .. } => crate::settle::onchain::backend_name(url),
            policy::Backend::None => String::new(),
        };
        let version = payment.version;
        let authorization = Authorization {
            version: version.number(),
            payload: payment.raw.clone(),
            requirements: match version {
                Version::V1 => offer.v1_json(&resource, &terms),
                Version::V2 => offer.v2_json(),
            },
        };
        let mut entry = Entry {
            seq: 0,
            at: (self.clock)(),
            request_id: request_id.to_string(),
            service: loaded.policy.service.clone(),
            route: loaded.label(route.id).to_string(),
            method: request.method.to_string(),
            path: request.target.to_string(),
            payer: payment.payer,
            rail: "x402".into(),
            amount: payment.amount,
            asset: offer.asset,
            symbol: offer.asset_symbol.clone(),
            decimals: offer.decimals,
            network: offer.network.clone(),
            chain_id: offer.chain_id,
            pay_to: offer.pay_to,
            nonce: payment.nonce,
            valid_after: payment.valid_after,
            valid_before: payment.valid_before,
            timing: if route.sells.is_some() {
                ledger::Timing::BeforeResponse
            } else {
                timing
            },
            backend,
            unsettled_held: deferred && holds.holds_unsettled(),
            credits: route.sells,
            sale_account: route.sells.and(sale_account),
        };
        let recorded = self
            .store
            .record_payment(&key, entry.clone(), &authorization)
            .await;
        let seq = match recorded {
            Ok(Recorded::Fresh { seq }) => seq,
            Ok(Recorded::Used) => {
                self.limiter.finish(&self.store, holds, false);
                return Err(refuse(Rejection::Replayed));
            }
            Err(e) => {
                self.limiter.finish(&self.store, holds, false);
                return Err(Refusal::store_unavailable(&e));
            }
        };
        entry.seq = seq;
        self.settlement.admitted(entry);
        let mut holds = holds;
        if deferred {
            // Unsettled until its bundle settles, not until this request ends.
            holds.hand_over_unsettled();
        }

        let mut admitted = Admitted {
            payment,
            terms,
            resource,
            seq,
            settle_after,
            deferred,
            receipt: None,
        };
        if !settle_after && !deferred {
            match self.settle(&admitted).await {
                Ok(receipt) => admitted.receipt = Some(receipt),
                Err(refusal) => {
                    // Not settled before the call could go out: not collected (an entry that
                    // reached the facilitator is already `failed` or `unresolved`).
                    self.settlement.request_done(seq, 0).await;
                    self.limiter.finish(&self.store, holds, false);
                    return Err(refusal);
                }
            }
        }
        Ok((admitted, holds))
    }

    /// Settles an admitted payment now; returns the base64 receipt.
    pub(super) async fn settle(&self, paid: &Admitted) -> Result<String, Box<Refusal>> {
        let unavailable = |message: &str| {
            let mut refusal = Refusal::new(503, "settlement_unavailable", message.to_string());
            refusal.retry_after = Some(5);
            Box::new(refusal)
        };
        let Some(offer) = paid.offer() else {
            return Err(unavailable("the paid offer is gone"));
        };
        let version = paid.payment.version;
        let network = match version {
            Version::V1 => offer.network.clone(),
            Version::V2 => offer.caip2.clone(),
        };
        let payer = paid.payment.payer.to_checksum(None);
        match self.settlement.settle_now(paid.seq).await {
            Ok(mut receipt) => {
                receipt.payer.get_or_insert(payer);
                if receipt.network.is_empty() {
                    receipt.network = network;
                }
                Ok(encode_header(&receipt))
            }
            Err(SettleError::NotSent(why)) => {
                tracing::warn!(error = %why, entry = paid.seq, "settlement unavailable; refusing the paid request");
                Err(unavailable(
                    "the payment could not be settled right now; nothing was charged, retry with a new authorization",
                ))
            }
            Err(SettleError::Unknown(why)) => {
                tracing::warn!(error = %why, entry = paid.seq, "settlement outcome unknown; refusing the paid request, the payment is unresolved");
                Err(unavailable(
                    "the settlement did not complete in time; if it went through after all, the ledger shows it under this request id",
                ))
            }
            Err(SettleError::Refused(receipt)) => {
                let reason = receipt
                    .error_reason
                    .clone()
                    .unwrap_or_else(|| "unknown".into());
                let receipt = SettleResponse {
                    success: false,
                    error_reason: Some(reason.clone()),
                    payer: Some(payer),
                    transaction: String::new(),
                    network,
                };
                let mut refusal = Refusal::new(
                    402,
                    "settlement_failed",
                    format!("the facilitator refused to settle the payment: {reason}"),
                )
                .with_challenge(Some(paid.terms.clone()), paid.resource.clone());
                refusal.receipt = Some((version.receipt_header(), encode_header(&receipt)));
                Err(Box::new(refusal))
            }
        }
    }
}

impl Gate {
    /// Applies the route's buyer limits to one request: what they hold for it, or the 429
    /// (503 when the store fails).
    pub(super) fn hold_limits(
        &self,
        loaded: &Loaded,
        route: &crate::policy::Route,
        buyer: &BuyerId,
        spent: Spent<'_>,
        now: u64,
    ) -> Result<Holds, Box<Refusal>> {
        let ask = Ask {
            limits: &route.limits,
            route: loaded.label(route.id),
            buyer,
            spent,
            now,
        };
        self.limiter.admit(&self.store, &ask).map_err(over_limit)
    }
}

/// The refusal for a buyer over a limit (429), or a store failure (503).
fn over_limit(refused: Refused) -> Box<Refusal> {
    match refused {
        Refused::Exceeded(e) => {
            let mut refusal = Refusal::new(429, e.code, e.message);
            refusal.retry_after = Some(e.retry_after);
            Box::new(refusal)
        }
        Refused::Store(e) => Refusal::store_unavailable(&e),
    }
}
