//! Answers tollgate writes itself instead of forwarding: refusals (400/402/403/502/503/504)
//! and the discovery document.
//!
//! Every refusal body is JSON with a stable `error` code and a human `message`. A 402 body is
//! also a valid x402 v1 challenge (`x402Version: 1`, `accepts`), and carries the v2 challenge
//! in the `PAYMENT-REQUIRED` header, so any client can pay and retry.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use serde::Serialize;

use crate::x402::RouteTerms;
use crate::x402::wire::PAYMENT_REQUIRED;

/// A response tollgate writes in place of the upstream's.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: u16,
    /// Stable machine-readable code (README "Error codes").
    pub code: &'static str,
    pub message: String,
    /// For 402s: the absolute URL of the resource, so the challenge can name it.
    pub resource: Option<String>,
    /// For 402s on routes with an x402 price.
    pub challenge: Option<std::sync::Arc<RouteTerms>>,
    pub hint: Option<&'static str>,
    /// A receipt header (failed settlement), name and base64 value.
    pub receipt: Option<(&'static str, String)>,
    pub retry_after: Option<u64>,
}

impl Refusal {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            code,
            message: message.into(),
            resource: None,
            challenge: None,
            hint: None,
            receipt: None,
            retry_after: None,
        }
    }

    /// 503 when the store fails on the payment path: fail closed, and log why (never a secret:
    /// store errors carry no request data).
    pub fn store_unavailable(e: &crate::store::StoreError) -> Box<Refusal> {
        tracing::error!(error = %e, "the store failed; refusing the request");
        let mut refusal = Refusal::new(
            503,
            "store_unavailable",
            "tollgate cannot record payments right now; retry later",
        );
        refusal.retry_after = Some(5);
        Box::new(refusal)
    }

    /// A 402 (or a 400 about a payment) that repeats the route's challenge.
    pub fn with_challenge(
        mut self,
        terms: Option<std::sync::Arc<RouteTerms>>,
        resource: String,
    ) -> Refusal {
        self.challenge = terms;
        self.resource = Some(resource);
        self
    }

    /// The response head and body.
    pub fn render(&self, request_id: &str) -> pingora::Result<(ResponseHeader, Bytes)> {
        let (challenge_header, body) = match (&self.challenge, &self.resource) {
            (Some(terms), Some(resource)) => {
                let (header, body) = terms.challenge(resource, self.code, &self.message, self.hint);
                (Some(header), body)
            }
            _ if self.status == 402 => (
                None,
                json(&Body402 {
                    x402_version: 1,
                    error: self.code,
                    message: &self.message,
                    hint: self.hint,
                    accepts: [],
                }),
            ),
            _ => (
                None,
                json(&Body {
                    error: self.code,
                    message: &self.message,
                }),
            ),
        };
        let mut head = ResponseHeader::build(self.status, Some(8))?;
        head.insert_header("content-type", "application/json")?;
        head.insert_header("content-length", body.len().to_string())?;
        head.insert_header("cache-control", "no-store")?;
        head.insert_header("x-request-id", request_id)?;
        if let Some(value) = challenge_header {
            head.insert_header(PAYMENT_REQUIRED, value)?;
            head.insert_header(
                "access-control-expose-headers",
                "PAYMENT-REQUIRED, PAYMENT-RESPONSE, X-PAYMENT-RESPONSE",
            )?;
        }
        if let Some((name, value)) = &self.receipt {
            head.insert_header(*name, value.as_str())?;
        }
        if let Some(secs) = self.retry_after {
            head.insert_header("retry-after", secs.to_string())?;
        }
        Ok((head, Bytes::from(body)))
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    message: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body402<'a> {
    x402_version: u8,
    error: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    hint: Option<&'a str>,
    accepts: [(); 0],
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// Writes a response in place of the upstream's. The connection stays open for the next
/// request unless the client sent a body tollgate did not read.
pub async fn write(
    session: &mut Session,
    head: ResponseHeader,
    body: Bytes,
) -> pingora::Result<()> {
    if !session.is_body_empty() {
        session.set_keepalive(None);
    }
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(head), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}
