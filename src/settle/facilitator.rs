//! The x402 facilitator client: `POST {url}/settle` for one authorization, `GET
//! {url}/supported` for what it can settle.
//!
//! Failure is never success, and an unknown outcome is never called a failure: a connection
//! that could not be opened is [`SettleError::NotSent`] (nothing reached the facilitator, so
//! the authorization is untouched); a timeout, a 5xx or an unreadable answer after the request
//! went out is [`SettleError::Unknown`] (the facilitator may have settled it); an answer with
//! `success: false` and an x402 error code is [`SettleError::Refused`] with its receipt — but
//! one that names a transaction, says `settlement_pending` or gives free text is `Unknown`.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::policy::Policy;
use crate::x402::Terms;
use crate::x402::wire::SettleResponse;

/// How long one `/settle` call may take (it waits for the transaction receipt).
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

/// A facilitator client; cheap to clone (one connection pool).
#[derive(Debug, Clone)]
pub struct Facilitator {
    client: reqwest::Client,
    base_url: String,
    settle_url: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettleError {
    /// The facilitator could not be reached: the request never left.
    NotSent(String),
    /// The request went out but no usable answer came back: it may have settled.
    Unknown(String),
    /// The facilitator refused to settle; the receipt says why.
    Refused(SettleResponse),
}

impl SettleError {
    /// The reason, for the ledger and the log.
    pub fn reason(&self) -> String {
        match self {
            SettleError::NotSent(why) => format!("not sent: {why}"),
            SettleError::Unknown(why) => format!("outcome unknown: {why}"),
            SettleError::Refused(receipt) => receipt
                .error_reason
                .clone()
                .unwrap_or_else(|| "refused without a reason".into()),
        }
    }
}

/// Whether a `success: false` answer means the payment did not and will not settle. Not when
/// it names a transaction (one was broadcast: the official facilitator answers
/// `settlement_pending` with its hash when waiting for the receipt fails), nor when its reason
/// is free text rather than an x402 error code (the official v1 path answers any exception
/// after broadcasting with the exception's message).
fn is_definite_refusal(receipt: &SettleResponse) -> bool {
    let reason = receipt.error_reason.as_deref().unwrap_or("");
    receipt.transaction.is_empty()
        && !reason.is_empty()
        && reason != "settlement_pending"
        && reason
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// One kind of payment a facilitator settles (`/supported`'s `kinds`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Kind {
    pub x402_version: u8,
    pub scheme: String,
    pub network: String,
}

#[derive(Deserialize)]
struct Supported {
    kinds: Vec<Kind>,
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
            base_url: base_url.trim_end_matches('/').to_string(),
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
        let failed = |e: reqwest::Error| {
            let not_sent = e.is_connect() || e.is_builder();
            let why = e.without_url().to_string();
            if not_sent {
                SettleError::NotSent(why)
            } else {
                SettleError::Unknown(why)
            }
        };
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
            .map_err(failed)?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| SettleError::Unknown(e.without_url().to_string()))?;
        if status.is_server_error() {
            return Err(SettleError::Unknown(format!(
                "the facilitator answered {status}"
            )));
        }
        match serde_json::from_slice::<SettleResponse>(&body) {
            Ok(receipt) if receipt.success && status.is_success() => Ok(receipt),
            Ok(receipt) if !receipt.success && is_definite_refusal(&receipt) => {
                Err(SettleError::Refused(receipt))
            }
            Ok(receipt) if !receipt.success => Err(SettleError::Unknown(format!(
                "the facilitator answered success: false without a definite refusal ({}{})",
                receipt.error_reason.as_deref().unwrap_or("no reason"),
                if receipt.transaction.is_empty() {
                    String::new()
                } else {
                    format!(", transaction {}", receipt.transaction)
                }
            ))),
            _ => Err(SettleError::Unknown(format!(
                "the facilitator answered {status} without a settlement result"
            ))),
        }
    }

    /// What the facilitator settles (`GET /supported`).
    pub async fn supported(&self) -> Result<Vec<Kind>, String> {
        let url = format!("{}/supported", self.base_url);
        let response = self
            .client
            .get(&url)
            .timeout(SUPPORTED_TIMEOUT)
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("GET /supported answered {status}"));
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| e.without_url().to_string())?;
        serde_json::from_slice::<Supported>(&body)
            .map(|s| s.kinds)
            .map_err(|e| {
                format!("GET /supported answered something else than a list of kinds: {e}")
            })
    }

    /// The facilitator's address, as the policy wrote it (without a trailing `/`).
    pub fn url(&self) -> &str {
        &self.base_url
    }
}

/// How long `GET /supported` may take at startup or reload.
pub const SUPPORTED_TIMEOUT: Duration = Duration::from_secs(5);

/// Refuses a policy whose quotes the facilitator at `url` cannot settle, from its `GET
/// /supported` (at startup and at each reload): a quote that can never be collected is a bug.
/// A facilitator that cannot be asked right now is a warning, not a refusal — payments are
/// recorded and settle once it answers (or fail closed, for `before`/`after response`).
pub fn check_supported(url: &str, policy: &Policy, terms: &Terms) -> Result<(), String> {
    let mut needed: BTreeSet<(String, String)> = BTreeSet::new();
    for id in 0..policy.routes.len() {
        for offer in terms
            .route(id)
            .map(|t| t.offers.as_slice())
            .unwrap_or_default()
        {
            needed.insert((offer.network.clone(), offer.caip2.clone()));
        }
    }
    if needed.is_empty() {
        return Ok(());
    }
    let client = Facilitator::new(url, SUPPORTED_TIMEOUT)?;
    // Startup runs outside any runtime and a reload inside one: ask from a thread of its own.
    let asked = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|runtime| runtime.block_on(client.supported()))
    })
    .join()
    .unwrap_or_else(|_| Err("the check failed unexpectedly".into()));
    let kinds = match asked {
        Ok(kinds) => kinds,
        Err(why) => {
            tracing::warn!(facilitator = url, error = %why, "cannot read what the facilitator settles (GET /supported); going on without checking");
            return Ok(());
        }
    };
    let settles = |name: &str| {
        kinds
            .iter()
            .any(|k| k.scheme == "exact" && k.network == name)
    };
    let missing: Vec<String> = needed
        .iter()
        .filter(|(v1, caip2)| !settles(v1) && !settles(caip2))
        .map(|(v1, caip2)| format!("{v1} ({caip2})"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let offered: BTreeSet<String> = kinds
        .iter()
        .map(|k| format!("{} on {} (x402 v{})", k.scheme, k.network, k.x402_version))
        .collect();
    Err(format!(
        "{}: the facilitator at {url} cannot settle `exact` payments on {}; it settles: {}. A price it cannot collect would be paid for nothing: accept only networks it settles, or settle through another facilitator",
        policy.origin,
        missing.join(", "),
        if offered.is_empty() {
            "nothing".to_string()
        } else {
            offered.into_iter().collect::<Vec<_>>().join(", ")
        }
    ))
}
