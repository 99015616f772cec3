//! Settlement: turning a verified authorization into a transfer on chain.
//!
//! Today one backend: an x402 facilitator over HTTP (`POST {url}/settle`), called by the proxy
//! after the upstream answered below 400 (`after response`) or before forwarding (`before
//! response`). The facilitator pays the gas and submits `transferWithAuthorization`; funds go
//! from the buyer straight to `pay_to`. Direct on-chain submission and deferred bundles come
//! with the settlement ledger.
//!
//! Failure is never success: a timeout, a refused connection, a 5xx or an unreadable answer is
//! [`SettleError::Unavailable`]; a facilitator that answers `success: false` is
//! [`SettleError::Refused`] with its receipt. Either way the buyer is not served.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::x402::wire::SettleResponse;

/// How long one `/settle` call may take (it waits for the transaction receipt).
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

/// A facilitator client; cheap to clone (one connection pool).
#[derive(Debug, Clone)]
pub struct Facilitator {
    client: reqwest::Client,
    settle_url: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettleError {
    /// The facilitator could not be reached or did not answer usefully.
    Unavailable(String),
    /// The facilitator refused to settle; the receipt says why.
    Refused(SettleResponse),
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SettleRequest<'a> {
    x402_version: u8,
    payment_payload: &'a Value,
    payment_requirements: &'a Value,
}

impl Facilitator {
    /// A client for the facilitator at `base_url` (`https://x402.org/facilitator`).
    pub fn new(base_url: &str, timeout: Duration) -> Result<Facilitator, String> {
        // reqwest is built without a TLS provider of its own: use ring, like Pingora. Installing
        // twice is harmless (the second call reports the first).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the facilitator client: {e}"))?;
        Ok(Facilitator {
            client,
            settle_url: format!("{}/settle", base_url.trim_end_matches('/')),
        })
    }

    /// Asks the facilitator to settle one payment: the payload as the buyer sent it and the
    /// requirements it was verified against, in the payment's protocol version.
    pub async fn settle(
        &self,
        x402_version: u8,
        payload: &Value,
        requirements: &Value,
    ) -> Result<SettleResponse, SettleError> {
        let unavailable = |e: reqwest::Error| SettleError::Unavailable(e.without_url().to_string());
        let response = self
            .client
            .post(&self.settle_url)
            .json(&SettleRequest {
                x402_version,
                payment_payload: payload,
                payment_requirements: requirements,
            })
            .send()
            .await
            .map_err(unavailable)?;
        let status = response.status();
        let body = response.bytes().await.map_err(unavailable)?;
        if status.is_server_error() {
            return Err(SettleError::Unavailable(format!(
                "the facilitator answered {status}"
            )));
        }
        match serde_json::from_slice::<SettleResponse>(&body) {
            Ok(receipt) if receipt.success && status.is_success() => Ok(receipt),
            Ok(receipt) if !receipt.success => Err(SettleError::Refused(receipt)),
            _ => Err(SettleError::Unavailable(format!(
                "the facilitator answered {status} without a settlement result"
            ))),
        }
    }
}
