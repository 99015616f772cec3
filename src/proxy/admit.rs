//! Admission of an x402 payment: the steps between "a payment is attached" and "forward".
//!
//! verify locally ([`x402::verify`]) → payer allow/deny lists ([`policy::decide`] again, now
//! with the payer) → buyer limits ([`crate::limits`]) → claim the nonce in the store, durably,
//! before anything is forwarded → for `before response`, settle now. Every failure is a [`Refusal`]; nothing here forwards a
//! request that was not paid for.

use std::sync::Arc;

use super::Gate;
use super::refusal::Refusal;
use crate::limits::{Ask, BuyerId, Holds, Refused, Spent};
use crate::policy::{self, Buyer, Outcome, Request, Timing, Why};
use crate::reload::Loaded;
use crate::settle::SettleError;
use crate::store::{Claim, NonceKey};
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
    /// Settle once the upstream answered below 400 (else it was settled before forwarding).
    pub settle_after: bool,
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
    pub(super) async fn admit(
        &self,
        loaded: &Loaded,
        request: &Request<'_>,
        route: Option<usize>,
        header: &[u8],
        target: &str,
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
        let claim = self.store.claim_nonce(&key, payment.valid_before).await;
        match claim {
            Ok(Claim::Fresh) => {}
            Ok(Claim::Used) => {
                self.limiter.finish(&self.store, holds, false);
                return Err(refuse(Rejection::Replayed));
            }
            Err(e) => {
                self.limiter.finish(&self.store, holds, false);
                return Err(Refusal::store_unavailable(&e));
            }
        }

        // A route selling credits settles first: credits are spendable the moment they exist.
        let settle_after = matches!(route.settle, Timing::AfterResponse) && route.sells.is_none();
        let mut admitted = Admitted {
            payment,
            terms,
            resource,
            settle_after,
            receipt: None,
        };
        if !settle_after {
            match self.settle(loaded, &admitted).await {
                Ok(receipt) => admitted.receipt = Some(receipt),
                Err(refusal) => {
                    self.limiter.finish(&self.store, holds, false);
                    return Err(refusal);
                }
            }
        }
        Ok((admitted, holds))
    }

    /// Settles an admitted payment with the facilitator; returns the base64 receipt.
    pub(super) async fn settle(
        &self,
        loaded: &Loaded,
        paid: &Admitted,
    ) -> Result<String, Box<Refusal>> {
        let unavailable = |why: String| {
            tracing::warn!(error = %why, "settlement unavailable; refusing the paid request");
            let mut refusal = Refusal::new(
                503,
                "settlement_unavailable",
                "the payment could not be settled right now; nothing was charged, retry with a new authorization",
            );
            refusal.retry_after = Some(5);
            Box::new(refusal)
        };
        let (Some(facilitator), Some(offer)) = (&loaded.facilitator, paid.offer()) else {
            return Err(unavailable("no facilitator configured".into()));
        };
        let version = paid.payment.version;
        let requirements = match version {
            Version::V1 => offer.v1_json(&paid.resource, &paid.terms),
            Version::V2 => offer.v2_json(),
        };
        let network = match version {
            Version::V1 => offer.network.clone(),
            Version::V2 => offer.caip2.clone(),
        };
        let payer = paid.payment.payer.to_checksum(None);
        let started = std::time::Instant::now();
        let settled = facilitator
            .settle(version.number(), &paid.payment.raw, &requirements)
            .await;
        self.metrics
            .settlement_seconds
            .observe(started.elapsed().as_secs_f64());
        let result = match &settled {
            Ok(_) => "settled",
            Err(SettleError::Refused(_)) => "refused",
            Err(SettleError::Unavailable(_)) => "unavailable",
        };
        self.metrics.settlements.with([result]).inc();
        match settled {
            Ok(mut receipt) => {
                self.metrics
                    .revenue
                    .with([offer.asset_symbol.as_str(), offer.network.as_str()])
                    .inc_by(u64::try_from(paid.payment.amount).unwrap_or(u64::MAX));
                receipt.payer.get_or_insert(payer);
                if receipt.network.is_empty() {
                    receipt.network = network;
                }
                Ok(encode_header(&receipt))
            }
            Err(SettleError::Unavailable(why)) => Err(unavailable(why)),
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
