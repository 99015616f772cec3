//! Selling credits for x402 (`sells N credits`): the bridge from the agent rail to the key rail.
//!
//! Tollgate answers these routes itself. Before any money moves, the API key the buyer sent
//! (if any) is resolved: a bad key is refused and nothing is charged. Then the payment is
//! admitted like any other ([`Gate::admit`]) but always settled *before* credits are granted
//! (credits are spendable at once, so they must be paid for first). The credits go to the key's
//! account, or to a new account whose new key is returned once. The top-up's reference is the
//! authorization (`x402:<network>:<payer>:<nonce>`), so the ledger names the payment that
//! bought each credit.

use serde_json::json;

use super::Gate;
use super::admit::Admitted;
use super::prepaid::bad_key;
use super::refusal::Refusal;
use crate::reload::Loaded;
use crate::store::accounts::{KeyLookup, KeyRecord};
use crate::store::sale::CreditSale;

/// Tollgate's own answer to a credit purchase: status and JSON body.
pub struct Sale {
    pub status: u16,
    pub body: serde_json::Value,
}

impl Gate {
    /// The account that will receive the credits: the key's (`Some`), or a new one (`None`).
    pub(super) fn buyer_account(
        &self,
        loaded: &Loaded,
        secret: Option<&str>,
    ) -> Result<Option<KeyRecord>, Box<Refusal>> {
        let Some(secret) = secret else {
            return Ok(None);
        };
        let header = loaded
            .policy
            .prepaid
            .as_ref()
            .map_or("x-api-key", |p| p.header.as_str());
        match self.store.resolve_key(secret, (self.clock)()) {
            Ok(record) => Ok(Some(record)),
            Err(KeyLookup::Problem(problem)) => Err(Box::new(bad_key(problem, header))),
            Err(KeyLookup::Store(e)) => Err(Refusal::store_unavailable(&e)),
        }
    }

    /// Credits a settled purchase.
    pub(super) async fn sell(
        &self,
        paid: &Admitted,
        credits: u128,
        key: Option<KeyRecord>,
    ) -> Result<Sale, Box<Refusal>> {
        let now = (self.clock)();
        let payer = paid.payment.payer.to_checksum(None);
        let network = paid.offer().map_or("", |o| o.caip2.as_str());
        let reference = format!("x402:{network}:{payer}:{}", paid.payment.nonce);
        let failed = |e: crate::store::StoreError| {
            // Paid and settled, but not credited: the operator credits it by hand (the
            // reference makes a retried top-up safe).
            tracing::error!(error = %e, %reference, credits = %credits, "a settled credit purchase could not be credited");
            Refusal::store_unavailable(&e)
        };
        let name = format!("x402 {payer}");
        let sale = CreditSale {
            account: key.map(|record| record.account),
            name: &name,
            key_label: "bought with x402",
            credits,
            reference: &reference,
        };
        // One durable step: the account, its new key and the top-up, or none of them.
        let sold = match self.store.sell_credits(&sale, now).await {
            Ok(Ok(sold)) => sold,
            Ok(Err(refused)) => {
                return Err(failed(crate::store::StoreError(format!("{refused:?}"))));
            }
            Err(e) => return Err(failed(e)),
        };
        let (account, new_key, fact) = (sold.account, sold.key, sold.fact);
        self.metrics
            .credits_sold
            .inc_by(u64::try_from(credits).unwrap_or(u64::MAX));
        let mut body = serde_json::Map::new();
        body.insert("account".into(), json!(account));
        body.insert("credits".into(), json!(credits.to_string()));
        body.insert("balance".into(), json!(fact.balance.to_string()));
        body.insert("reference".into(), json!(reference));
        let status = match new_key {
            Some((secret, record)) => {
                body.insert("key".into(), json!(secret));
                body.insert("key_id".into(), json!(record.id));
                body.insert(
                    "note".into(),
                    json!("store this key now: it is shown once; send it in the prepaid header to spend the credits"),
                );
                201
            }
            None => 200,
        };
        Ok(Sale {
            status,
            body: body.into(),
        })
    }
}
