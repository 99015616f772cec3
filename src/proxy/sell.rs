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
use crate::store::accounts::{KeyLookup, KeyRecord, TopUp};

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
            // Paid and settled, but not credited: the operator must credit it by hand.
            tracing::error!(error = %e, %reference, "a settled credit purchase could not be credited");
            Refusal::store_unavailable(&e)
        };
        let (account, new_key) = match key {
            Some(record) => (record.account, None),
            None => {
                let account = self
                    .store
                    .create_account(&format!("x402 {payer}"), now)
                    .await
                    .map_err(failed)?;
                let issued = self
                    .store
                    .issue_key(account.id, "bought with x402", None, now)
                    .await
                    .map_err(failed)?;
                (account.id, issued)
            }
        };
        let key_id = new_key.as_ref().map(|(_, record)| record.id.clone());
        let topped = match self.store.top_up(account, credits, &reference, now).await {
            Ok(Ok(TopUp::Credited(fact) | TopUp::Repeated(fact))) => Ok(fact),
            Ok(Err(refused)) => Err(crate::store::StoreError(format!("{refused:?}"))),
            Err(e) => Err(e),
        };
        let fact = topped.map_err(|e| {
            // Paid and settled, but not credited: the operator credits it by hand (the
            // reference makes a retried top-up safe). A new key was not shown to the buyer.
            tracing::error!(error = %e, %reference, account, key_id = ?key_id, credits = %credits, "a settled credit purchase could not be credited");
            Refusal::store_unavailable(&e)
        })?;
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
