//! Local verification of an x402 `exact` payment on EVM: no network round trip, no clock read.
//!
//! Order of checks (the first failure is reported): decode → version → match an offer (v1:
//! scheme + network; v2: `accepted` equal to an offered entry) → field formats → recipient →
//! amount → time window → signature shape → EIP-712 recovery.
//!
//! Rules, and why:
//! - **Amount: `value` must equal the price exactly.** The v2 spec and the reference v2
//!   facilitators require equality; an over-payment would be refused at settlement by them, and
//!   no official client ever signs more than asked.
//! - **Time: `validAfter <= now` with no slack, `validBefore >= now + 6 s`** (the reference
//!   margin: an authorization must stay valid long enough to be settled), and
//!   **`validBefore <= now + maxTimeoutSeconds + 600 s`**: clients sign now + maxTimeoutSeconds,
//!   600 s absorbs their clock running ahead (they back-date `validAfter` by as much). A nonce
//!   is kept until its `validBefore`, so without this cap an unfunded wallet could fill the
//!   store with records that are never collected.
//! - **Signature: 65-byte ECDSA only, low-s only, `v` = 27 or 28.** Recovery would accept a
//!   high-s signature after normalising it, and a `v` of 0, 1 or 36 after reducing it, but
//!   USDC's `ecrecover` refuses both on chain: admitting one would serve a call that can never
//!   be paid. Smart-wallet (ERC-1271/6492) signatures need a chain to verify and
//!   are refused with `unsupported_signature`.

use alloy::primitives::{Address, B256, Keccak256, Signature, U256};
use alloy::sol_types::SolStruct;
use serde_json::Value;

use super::Rejection;
use super::terms::{Offer, RouteTerms};
use super::wire::{self, Authorization, DecodeError};

alloy::sol! {
    /// EIP-3009 `TransferWithAuthorization`, the message an x402 buyer signs.
    #[derive(Debug)]
    struct TransferWithAuthorization {
        address from;
        address to;
        uint256 value;
        uint256 validAfter;
        uint256 validBefore;
        bytes32 nonce;
    }
}

/// `validBefore` must be at least this far in the future (the reference "3 blocks" margin).
pub const VALID_BEFORE_MARGIN_SECS: u64 = 6;
/// Seconds a buyer's clock may run ahead of ours: `validBefore` may exceed now +
/// `maxTimeoutSeconds` by this much (the reference clients back-date `validAfter` by as much).
pub const CLOCK_SKEW_SECS: u64 = 600;

/// The x402 protocol version a payment speaks; the receipt header follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    pub fn number(self) -> u8 {
        match self {
            Version::V1 => 1,
            Version::V2 => 2,
        }
    }

    /// The response header that carries the receipt.
    pub fn receipt_header(self) -> &'static str {
        match self {
            Version::V1 => wire::X_PAYMENT_RESPONSE,
            Version::V2 => wire::PAYMENT_RESPONSE,
        }
    }
}

/// A verified payment: signed by `payer`, for exactly one offer of the route, inside its window.
#[derive(Debug, Clone)]
pub struct Payment {
    pub version: Version,
    pub payer: Address,
    /// Index into the route's offers.
    pub offer: usize,
    pub amount: u128,
    pub valid_after: u64,
    pub valid_before: u64,
    pub nonce: B256,
    /// The decoded payload as the client sent it, for the facilitator.
    pub raw: Value,
}

/// An authorization with every field parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    pub from: Address,
    pub to: Address,
    pub value: U256,
    pub valid_after: u64,
    pub valid_before: u64,
    pub nonce: B256,
    pub signature: Vec<u8>,
}

/// Decodes a payment header and verifies it against a route's offers at time `now` (unix s).
pub fn verify(header: &[u8], terms: &RouteTerms, now: u64) -> Result<Payment, Rejection> {
    let (payload, raw) = wire::decode_payment(header).map_err(|e| match e {
        DecodeError::TooLarge { bytes } => Rejection::TooLarge { bytes },
        DecodeError::Base64 => Rejection::Malformed("not base64".into()),
        DecodeError::Json(why) => Rejection::Malformed(why),
    })?;
    let version = match payload.x402_version {
        1 => Version::V1,
        2 => Version::V2,
        other => return Err(Rejection::UnsupportedVersion(other)),
    };
    let index = match version {
        Version::V1 => {
            let scheme = payload
                .scheme
                .as_deref()
                .ok_or_else(|| Rejection::Malformed("missing field `scheme`".into()))?;
            if scheme != "exact" {
                return Err(Rejection::UnsupportedScheme(scheme.to_string()));
            }
            let network = payload
                .network
                .as_deref()
                .ok_or_else(|| Rejection::Malformed("missing field `network`".into()))?;
            terms
                .offer_on(network)
                .ok_or_else(|| Rejection::NetworkMismatch(network.to_string()))?
        }
        Version::V2 => {
            let accepted = payload
                .accepted
                .as_ref()
                .ok_or_else(|| Rejection::Malformed("missing field `accepted`".into()))?;
            match accepted.get("scheme").and_then(Value::as_str) {
                Some("exact") | None => {}
                Some(other) => return Err(Rejection::UnsupportedScheme(other.to_string())),
            }
            terms
                .accepted_offer(accepted)
                .ok_or(Rejection::AcceptedMismatch)?
        }
    };
    let offer = terms.offers.get(index).ok_or(Rejection::AcceptedMismatch)?;
    let signed = parse(&payload.payload.authorization, &payload.payload.signature)?;
    let payer = check(&signed, offer, now)?;
    Ok(Payment {
        version,
        payer,
        offer: index,
        amount: offer.amount,
        valid_after: signed.valid_after,
        valid_before: signed.valid_before,
        nonce: signed.nonce,
        raw,
    })
}

/// Parses the authorization's text fields.
pub fn parse(auth: &Authorization, signature: &str) -> Result<Signed, Rejection> {
    let malformed = |field: &str, expected: &str| {
        Rejection::Malformed(format!("`authorization.{field}` must be {expected}"))
    };
    let address = |field: &str, text: &str| {
        parse_hex_exact::<20>(text)
            .map(Address::from)
            .ok_or_else(|| malformed(field, "0x followed by 40 hex digits"))
    };
    let seconds = |field: &str, text: &str| {
        decimal(text)
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(|| malformed(field, "a decimal string of unix seconds"))
    };
    let signature = signature
        .strip_prefix("0x")
        .and_then(|hex| alloy::hex::decode(hex).ok())
        .ok_or_else(|| Rejection::Malformed("`signature` must be 0x-prefixed hex".into()))?;
    Ok(Signed {
        from: address("from", &auth.from)?,
        to: address("to", &auth.to)?,
        value: decimal(&auth.value)
            .ok_or_else(|| malformed("value", "a decimal string of atomic units"))?,
        valid_after: seconds("validAfter", &auth.valid_after)?,
        valid_before: seconds("validBefore", &auth.valid_before)?,
        nonce: parse_hex_exact::<32>(&auth.nonce)
            .map(B256::from)
            .ok_or_else(|| malformed("nonce", "0x followed by 64 hex digits"))?,
        signature,
    })
}

/// Checks a parsed authorization against one offer at time `now`; returns the payer.
pub fn check(signed: &Signed, offer: &Offer, now: u64) -> Result<Address, Rejection> {
    if signed.to != offer.pay_to {
        return Err(Rejection::RecipientMismatch);
    }
    if signed.value != U256::from(offer.amount) {
        return Err(Rejection::AmountMismatch {
            expected: offer.amount,
            got: u128::try_from(signed.value).unwrap_or(u128::MAX),
        });
    }
    if signed.valid_after > now {
        return Err(Rejection::NotYetValid {
            valid_after: signed.valid_after,
            now,
        });
    }
    if signed.valid_before < now.saturating_add(VALID_BEFORE_MARGIN_SECS) {
        return Err(Rejection::Expired {
            valid_before: signed.valid_before,
            now,
        });
    }
    let latest = now
        .saturating_add(offer.timeout_secs)
        .saturating_add(CLOCK_SKEW_SECS);
    if signed.valid_before > latest {
        return Err(Rejection::ValidTooLong {
            valid_before: signed.valid_before,
            latest,
        });
    }
    let signer = recover(signed, offer.domain_separator)?;
    if signer != signed.from {
        return Err(Rejection::InvalidSignature);
    }
    Ok(signer)
}

/// The EIP-712 digest a buyer signs for this authorization under a domain.
pub fn digest(signed: &Signed, domain_separator: B256) -> B256 {
    let message = TransferWithAuthorization {
        from: signed.from,
        to: signed.to,
        value: signed.value,
        validAfter: U256::from(signed.valid_after),
        validBefore: U256::from(signed.valid_before),
        nonce: signed.nonce,
    };
    let mut hasher = Keccak256::new();
    hasher.update([0x19, 0x01]);
    hasher.update(domain_separator);
    hasher.update(message.eip712_hash_struct());
    hasher.finalize()
}

/// Recovers the signer of the authorization; refuses non-65-byte and high-s signatures.
fn recover(signed: &Signed, domain_separator: B256) -> Result<Address, Rejection> {
    if signed.signature.len() != 65 {
        return Err(Rejection::UnsupportedSignature {
            bytes: signed.signature.len(),
        });
    }
    // `ecrecover` on chain takes v = 27 or 28 only; `from_raw` would also take 0, 1, 35+.
    if !matches!(signed.signature.last(), Some(27 | 28)) {
        return Err(Rejection::NonCanonicalSignature);
    }
    let signature =
        Signature::from_raw(&signed.signature).map_err(|_| Rejection::InvalidSignature)?;
    if signature.normalize_s().is_some() {
        return Err(Rejection::NonCanonicalSignature);
    }
    signature
        .recover_address_from_prehash(&digest(signed, domain_separator))
        .map_err(|_| Rejection::InvalidSignature)
}

/// A non-empty decimal string of at most 78 digits (U256), no sign, no spaces.
fn decimal(text: &str) -> Option<U256> {
    if text.is_empty() || text.len() > 78 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    U256::from_str_radix(text, 10).ok()
}

/// `0x` + exactly `2 * N` hex digits, any case.
fn parse_hex_exact<const N: usize>(text: &str) -> Option<[u8; N]> {
    let hex = text.strip_prefix("0x")?;
    if hex.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    alloy::hex::decode_to_slice(hex, &mut out).ok()?;
    Some(out)
}
