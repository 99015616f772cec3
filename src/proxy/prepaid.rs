//! Admission on the prepaid rail: the steps between "the route takes this key" and "forward".
//!
//! resolve the key (unknown, revoked, expired → 401) → buyer limits (429) → debit the account
//! atomically and durably, honouring `Idempotency-Key` → forward. A balance that does not cover the price is
//! not an error here: the caller decides again with the balance known, which offers x402 (or
//! uses the attached payment) where the route has an x402 price.
//!
//! After the upstream answers, [`Gate::refund`] gives the credits back when the upstream
//! could not be reached (always) or answered 5xx (with `refund on 5xx`).

use super::Gate;
use super::refusal::Refusal;
use crate::limits::{BuyerId, Holds, Spent};
use crate::reload::Loaded;
use crate::store::accounts::{Charge, Debit, KeyLookup, KeyProblem};

/// Header a client sets so that a retried request is charged once.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Credits taken from an account for a request that was forwarded.
#[derive(Debug, Clone)]
pub struct Debited {
    /// The ledger entry of the debit (the earlier one, for an idempotent repeat).
    pub seq: u64,
    pub account: u64,
    /// The key id (never the key).
    pub key: String,
    /// Credits charged by this request: 0 for an idempotent repeat.
    pub charged: u128,
    /// The account's balance after this request.
    pub balance: u128,
    pub refund_on_5xx: bool,
}

/// What the prepaid rail says about one request.
pub enum Prepaid {
    Debited(Debited, Holds),
    /// The balance does not cover the price; decide again with it.
    Short {
        balance: u128,
    },
    /// The key cannot pay (unknown, revoked, expired).
    BadKey(KeyProblem),
}

impl Gate {
    /// Charges `credits` to the account behind `secret` for this request.
    pub(super) async fn debit(
        &self,
        loaded: &Loaded,
        secret: &str,
        credits: u128,
        route: usize,
        request_id: &str,
        idempotency: Option<(&str, &str)>,
    ) -> Result<Prepaid, Box<Refusal>> {
        let now = (self.clock)();
        let key = match self.store.resolve_key(secret, now) {
            Ok(key) => key,
            Err(KeyLookup::Problem(problem)) => return Ok(Prepaid::BadKey(problem)),
            Err(KeyLookup::Store(e)) => return Err(Refusal::store_unavailable(&e)),
        };
        let Some(route) = loaded.policy.route(route) else {
            return Err(Box::new(Refusal::new(
                503,
                "internal_error",
                "the route is gone",
            )));
        };
        if let Some((key, _)) = idempotency
            && (key.is_empty() || key.len() > crate::store::accounts::MAX_REFERENCE_LEN)
        {
            return Err(Box::new(Refusal::new(
                400,
                "malformed_request",
                "Idempotency-Key must be 1 to 200 bytes",
            )));
        }
        let buyer = BuyerId::Account(key.account);
        let mut holds = self.hold_limits(loaded, route, &buyer, Spent::Credits(credits), now)?;
        let charge = Charge {
            key_id: key.id.clone(),
            account: key.account,
            credits,
            request_id: request_id.to_string(),
            route: loaded.label(route.id).to_string(),
            idempotency: idempotency.map(|(key, request)| (key.to_string(), request.to_string())),
        };
        let debit = self.store.debit(charge, now).await;
        if !matches!(debit, Ok(Debit::Charged(_))) {
            self.limiter.finish(&self.store, holds, false);
            holds = Holds::default();
        }
        let debit = debit.map_err(|e| Refusal::store_unavailable(&e))?;
        if let Debit::Charged(fact) = &debit {
            self.metrics
                .credits_debited
                .inc_by(u64::try_from(fact.credits).unwrap_or(u64::MAX));
        }
        Ok(match debit {
            Debit::Charged(fact) => Prepaid::Debited(
                Debited {
                    seq: fact.seq,
                    account: fact.account,
                    key: key.id.clone(),
                    charged: fact.credits,
                    balance: fact.balance,
                    refund_on_5xx: route.refund_on_5xx,
                },
                holds,
            ),
            Debit::Repeated(fact) => {
                // Served at most once per charge: a repeat is never forwarded (the upstream
                // cannot tell a retry from a new request with another body).
                return Err(Box::new(Refusal::new(
                    409,
                    "idempotency_key_used",
                    format!(
                        "this Idempotency-Key already paid for request {} (ledger entry {}), which is in flight or was served; nothing was charged",
                        fact.request_id.as_deref().unwrap_or("?"),
                        fact.seq
                    ),
                )));
            }
            Debit::KeyUnusable(problem) => Prepaid::BadKey(problem),
            Debit::Short { balance } => Prepaid::Short { balance },
            Debit::KeyReused => {
                return Err(Box::new(Refusal::new(
                    422,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used for a different request; use a new key per request",
                )));
            }
        })
    }

    /// Gives back the credits of a forwarded request whose upstream failed. A failure to
    /// refund is logged; the debit stays in the ledger for the operator to correct.
    pub(super) async fn refund(&self, debited: &mut Debited, request_id: &str) {
        if debited.charged == 0 {
            return;
        }
        match self.store.refund(debited.seq, (self.clock)()).await {
            Ok(Some(fact)) => {
                self.metrics
                    .credits_refunded
                    .inc_by(u64::try_from(fact.credits).unwrap_or(u64::MAX));
                debited.charged = 0;
                debited.balance = fact.balance;
            }
            Ok(None) => {}
            Err(e) => tracing::error!(
                error = %e,
                request_id,
                debit = debited.seq,
                "refunding a failed request's credits failed"
            ),
        }
    }
}

/// The refusal for a key that cannot pay.
pub fn bad_key(problem: KeyProblem, header: &str) -> Refusal {
    let (code, message) = match problem {
        KeyProblem::Unknown => (
            "api_key_invalid",
            format!("the API key in `{header}` is not one this service issued"),
        ),
        KeyProblem::Revoked => (
            "api_key_revoked",
            format!("the API key in `{header}` was revoked"),
        ),
        KeyProblem::Expired => (
            "api_key_expired",
            format!("the API key in `{header}` has expired"),
        ),
    };
    Refusal::new(401, code, message)
}
