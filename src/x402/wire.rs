//! x402 on the wire: the JSON shapes of v1 and v2, and base64 header encoding.
//!
//! Shapes follow the reference TypeScript implementation (x402-notes §1), including what its
//! strict legacy client demands: `description` and `mimeType` are always strings, `resource`
//! is an absolute URL, `outputSchema` is never sent (`null` breaks `x402-fetch`).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The largest payment header tollgate decodes, in bytes of base64. Real ones are ~1 KiB
/// (v2 echoes the requirement); anything far larger is refused before decoding.
pub const MAX_PAYMENT_HEADER_BYTES: usize = 8 * 1024;

/// v1 request header carrying a payment.
pub const X_PAYMENT: &str = "x-payment";
/// v2 request header carrying a payment.
pub const PAYMENT_SIGNATURE: &str = "payment-signature";
/// v2 challenge header on a 402.
pub const PAYMENT_REQUIRED: &str = "payment-required";
/// v1 receipt header.
pub const X_PAYMENT_RESPONSE: &str = "x-payment-response";
/// v2 receipt header.
pub const PAYMENT_RESPONSE: &str = "payment-response";

/// The EIP-712 domain fields a client needs to sign (`extra` in an offer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Extra {
    pub name: String,
    pub version: String,
}

/// One v2 `accepts` entry (`PaymentRequirements`): exactly these fields, in this order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequirementsV2 {
    pub scheme: &'static str,
    /// CAIP-2: `eip155:84532`.
    pub network: String,
    /// Atomic units, decimal.
    pub amount: String,
    /// EIP-55 token address.
    pub asset: String,
    pub pay_to: String,
    pub max_timeout_seconds: u64,
    pub extra: Extra,
}

/// One v1 `accepts` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequirementsV1<'a> {
    pub scheme: &'static str,
    /// Network name: `base-sepolia`.
    pub network: &'a str,
    pub max_amount_required: &'a str,
    pub resource: &'a str,
    pub description: &'a str,
    pub mime_type: &'a str,
    pub pay_to: &'a str,
    pub max_timeout_seconds: u64,
    pub asset: &'a str,
    pub extra: &'a Extra,
}

/// v2 `resource`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Resource<'a> {
    pub url: &'a str,
    pub description: &'a str,
    pub mime_type: &'a str,
}

/// The v2 challenge, sent base64-encoded in `PAYMENT-REQUIRED`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequiredV2<'a> {
    pub x402_version: u8,
    pub error: &'a str,
    pub resource: Resource<'a>,
    pub accepts: &'a [RequirementsV2],
}

/// The body of every 402: the v1 challenge plus tollgate's human `message`.
///
/// `error` is tollgate's stable error code, as on every other error body.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequiredV1<'a> {
    pub x402_version: u8,
    pub error: &'a str,
    pub message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<&'a str>,
    pub accepts: Vec<RequirementsV1<'a>>,
}

/// A payment header, decoded (`PaymentPayload`, v1 or v2).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentPayload {
    pub x402_version: u64,
    /// v1: the scheme paid.
    #[serde(default)]
    pub scheme: Option<String>,
    /// v1: the network paid on, by name.
    #[serde(default)]
    pub network: Option<String>,
    /// v2: the `accepts` entry the client chose, echoed whole.
    #[serde(default)]
    pub accepted: Option<Value>,
    pub payload: ExactEvmPayload,
}

/// The `exact` scheme's EVM payload: an EIP-3009 authorization and its signature.
#[derive(Debug, Clone, Deserialize)]
pub struct ExactEvmPayload {
    pub signature: String,
    pub authorization: Authorization,
}

/// `TransferWithAuthorization` as sent: every number a decimal string, the nonce 0x + 64 hex.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Authorization {
    pub from: String,
    pub to: String,
    pub value: String,
    pub valid_after: String,
    pub valid_before: String,
    pub nonce: String,
}

/// The receipt (`SettleResponse`), sent base64-encoded in `PAYMENT-RESPONSE` or
/// `X-PAYMENT-RESPONSE`, and what a facilitator's `/settle` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SettleResponse {
    pub success: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer: Option<String>,
    /// Transaction hash; `""` on failure.
    #[serde(default)]
    pub transaction: String,
    #[serde(default)]
    pub network: String,
}

/// Standard base64 with padding, as every x402 implementation writes it.
pub fn encode_header<T: Serialize>(value: &T) -> String {
    // Serializing these plain structs cannot fail; an empty object is the defensive fallback.
    let json = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    STANDARD.encode(json)
}

/// Why a header could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    TooLarge { bytes: usize },
    Base64,
    Json(String),
}

/// Decodes a base64 JSON header (whitespace around it tolerated, size-limited).
pub fn decode_header(header: &[u8]) -> Result<Vec<u8>, DecodeError> {
    if header.len() > MAX_PAYMENT_HEADER_BYTES {
        return Err(DecodeError::TooLarge {
            bytes: header.len(),
        });
    }
    STANDARD
        .decode(header.trim_ascii())
        .map_err(|_| DecodeError::Base64)
}

/// Decodes a payment header into the typed payload and the raw JSON (forwarded to the
/// facilitator as the client sent it).
pub fn decode_payment(header: &[u8]) -> Result<(PaymentPayload, Value), DecodeError> {
    let json = decode_header(header)?;
    let raw: Value = serde_json::from_slice(&json).map_err(|e| DecodeError::Json(e.to_string()))?;
    let typed = PaymentPayload::deserialize(&raw).map_err(|e| DecodeError::Json(e.to_string()))?;
    Ok((typed, raw))
}
