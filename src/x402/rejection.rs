//! Every way a payment is refused: a stable machine-readable code, an HTTP status, a message.
//!
//! Status per the x402 HTTP transport: 400 for a header that cannot be read, 402 for a payment
//! that is readable but does not pay (the 402 carries the challenge again so the client can
//! retry). Codes are part of tollgate's API: the README lists them; never rename one.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// 400: the header is not base64 JSON of a payment payload.
    Malformed(String),
    /// 400: the header is larger than `wire::MAX_PAYMENT_HEADER_BYTES`.
    TooLarge { bytes: usize },
    /// 400: `x402Version` is neither 1 nor 2.
    UnsupportedVersion(u64),
    /// 402: a scheme other than `exact`.
    UnsupportedScheme(String),
    /// 402: v1 `network` is not one the route offers.
    NetworkMismatch(String),
    /// 402: v2 `accepted` equals none of the offered `accepts` entries.
    AcceptedMismatch,
    /// 402: `authorization.to` is not the service's `pay_to`.
    RecipientMismatch,
    /// 402: `authorization.value` differs from the price.
    AmountMismatch { expected: u128, got: u128 },
    /// 402: `validAfter` is in the future.
    NotYetValid { valid_after: u64, now: u64 },
    /// 402: `validBefore` is past, or too close to settle (< now + 6 s).
    Expired { valid_before: u64, now: u64 },
    /// 402: `validBefore` is further ahead than the route's timeout allows (plus 600 s of clock
    /// skew): its nonce would have to be kept that long.
    ValidTooLong { valid_before: u64, latest: u64 },
    /// 402: not a 65-byte ECDSA signature (smart-wallet signatures are not accepted).
    UnsupportedSignature { bytes: usize },
    /// 402: a high-s signature, or a recovery byte other than 27/28, which USDC refuses on chain.
    NonCanonicalSignature,
    /// 402: the signature does not recover to `authorization.from`.
    InvalidSignature,
    /// 402: this authorization (chain, asset, from, nonce) was already used.
    Replayed,
}

impl Rejection {
    /// The stable code, sent as `error` in bodies and as the receipt's `errorReason`.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::Malformed(_) => "payment_malformed",
            Rejection::TooLarge { .. } => "payment_too_large",
            Rejection::UnsupportedVersion(_) => "unsupported_x402_version",
            Rejection::UnsupportedScheme(_) => "unsupported_scheme",
            Rejection::NetworkMismatch(_) => "network_mismatch",
            Rejection::AcceptedMismatch => "accepted_mismatch",
            Rejection::RecipientMismatch => "recipient_mismatch",
            Rejection::AmountMismatch { .. } => "amount_mismatch",
            Rejection::NotYetValid { .. } => "authorization_not_yet_valid",
            Rejection::Expired { .. } => "authorization_expired",
            Rejection::ValidTooLong { .. } => "authorization_too_long",
            Rejection::UnsupportedSignature { .. } => "unsupported_signature",
            Rejection::NonCanonicalSignature => "non_canonical_signature",
            Rejection::InvalidSignature => "invalid_signature",
            Rejection::Replayed => "payment_replayed",
        }
    }

    /// 400 when the header cannot be read, 402 when it does not pay.
    pub fn status(&self) -> u16 {
        match self {
            Rejection::Malformed(_)
            | Rejection::TooLarge { .. }
            | Rejection::UnsupportedVersion(_) => 400,
            _ => 402,
        }
    }

    /// Every code with its status, for the README table and tests.
    pub const CODES: [(&'static str, u16); 15] = [
        ("payment_malformed", 400),
        ("payment_too_large", 400),
        ("unsupported_x402_version", 400),
        ("unsupported_scheme", 402),
        ("network_mismatch", 402),
        ("accepted_mismatch", 402),
        ("recipient_mismatch", 402),
        ("amount_mismatch", 402),
        ("authorization_not_yet_valid", 402),
        ("authorization_expired", 402),
        ("authorization_too_long", 402),
        ("unsupported_signature", 402),
        ("non_canonical_signature", 402),
        ("invalid_signature", 402),
        ("payment_replayed", 402),
    ];
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Malformed(why) => write!(f, "the payment header is not a valid x402 payment: {why}"),
            Rejection::TooLarge { bytes } => write!(
                f,
                "the payment header is {bytes} bytes; at most {} are accepted",
                super::wire::MAX_PAYMENT_HEADER_BYTES
            ),
            Rejection::UnsupportedVersion(v) => {
                write!(f, "x402Version {v} is not supported; send 1 (X-PAYMENT) or 2 (PAYMENT-SIGNATURE)")
            }
            Rejection::UnsupportedScheme(s) => {
                write!(f, "scheme {s:?} is not offered; this route takes \"exact\"")
            }
            Rejection::NetworkMismatch(n) => {
                write!(f, "network {n:?} is not offered for this route; see `accepts`")
            }
            Rejection::AcceptedMismatch => f.write_str(
                "`accepted` must equal one of the offered `accepts` entries exactly; fetch the 402 again",
            ),
            Rejection::RecipientMismatch => {
                f.write_str("the authorization pays someone other than this service's payTo")
            }
            Rejection::AmountMismatch { expected, got } => write!(
                f,
                "the authorization is for {got} atomic units; the price is exactly {expected}"
            ),
            Rejection::NotYetValid { valid_after, now } => write!(
                f,
                "the authorization is valid only after {valid_after} (now {now})"
            ),
            Rejection::Expired { valid_before, now } => write!(
                f,
                "the authorization expires at {valid_before}; it must stay valid at least 6 s past now ({now})"
            ),
            Rejection::ValidTooLong { valid_before, latest } => write!(
                f,
                "the authorization stays valid until {valid_before}; this route accepts at most {latest} (now + maxTimeoutSeconds + 600 s)"
            ),
            Rejection::UnsupportedSignature { bytes } => write!(
                f,
                "the signature is {bytes} bytes; only 65-byte ECDSA signatures (EOA wallets) are accepted"
            ),
            Rejection::NonCanonicalSignature => {
                f.write_str("the signature is not canonical (v must be 27 or 28 and s in the lower half), which USDC refuses; normalize it (EIP-2)")
            }
            Rejection::InvalidSignature => f.write_str(
                "the signature does not match the authorization's `from` under the offered EIP-712 domain",
            ),
            Rejection::Replayed => f.write_str(
                "this authorization was already used; sign a new one with a fresh nonce",
            ),
        }
    }
}
