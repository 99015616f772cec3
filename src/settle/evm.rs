//! The contracts on-chain settlement talks to, and the pure parts of talking to them.
//!
//! The ABI of an EIP-3009 token (USDC's FiatToken v2 functions and events) and of Multicall3
//! (`aggregate3`, at its canonical address on every chain that has it); turning a recorded
//! authorization into a `transferWithAuthorization` call; naming why a call reverted. No I/O:
//! [`super::onchain`] sends what this builds.

use alloy::primitives::{Address, B256, Bytes, U256, address};
use alloy::sol_types::{SolCall, SolEvent};

use crate::store::ledger::{Authorization, Entry};
use crate::x402::verify::{self, Signed};
use crate::x402::wire::PaymentPayload;

alloy::sol! {
    function transferWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external;
    function authorizationState(address authorizer, bytes32 nonce) external view returns (bool);
    function balanceOf(address owner) external view returns (uint256);

    event AuthorizationUsed(address indexed authorizer, bytes32 indexed nonce);
    event AuthorizationCanceled(address indexed authorizer, bytes32 indexed nonce);
    event Transfer(address indexed from, address indexed to, uint256 value);

    struct Call3 {
        address target;
        bool allowFailure;
        bytes callData;
    }
    struct Result3 {
        bool success;
        bytes returnData;
    }
    function aggregate3(Call3[] calls) external payable returns (Result3[] returnData);
}

/// Multicall3's address: the same on every chain that has it (Base and Base Sepolia do).
pub const MULTICALL3: Address = address!("cA11bde05977b3631167028862bE2a173976CA11");

/// One authorization ready for the chain.
#[derive(Debug, Clone)]
pub struct Transfer3009 {
    pub seq: u64,
    pub token: Address,
    pub signed: Signed,
}

impl Transfer3009 {
    /// The recorded authorization of `entry`, checked against the entry it belongs to.
    pub fn of(entry: &Entry, authorization: &Authorization) -> Result<Transfer3009, String> {
        let payload: PaymentPayload = serde_json::from_value(authorization.payload.clone())
            .map_err(|e| format!("the recorded payment payload cannot be read: {e}"))?;
        let signed = verify::parse(&payload.payload.authorization, &payload.payload.signature)
            .map_err(|e| format!("the recorded authorization cannot be read: {e:?}"))?;
        if signed.from != entry.payer
            || signed.to != entry.pay_to
            || signed.nonce != entry.nonce
            || signed.value != U256::from(entry.amount)
        {
            return Err("the recorded authorization does not match its ledger entry".into());
        }
        if signed.signature.len() != 65 {
            return Err(format!(
                "a {}-byte signature cannot be split into v, r, s",
                signed.signature.len()
            ));
        }
        Ok(Transfer3009 {
            seq: entry.seq,
            token: entry.asset,
            signed,
        })
    }

    /// `transferWithAuthorization(from, to, value, validAfter, validBefore, nonce, v, r, s)`.
    pub fn calldata(&self) -> Bytes {
        let s = &self.signed;
        let part = |range: std::ops::Range<usize>| {
            s.signature
                .get(range)
                .map(B256::from_slice)
                .unwrap_or_default()
        };
        let v = s.signature.get(64).copied().unwrap_or_default();
        transferWithAuthorizationCall {
            from: s.from,
            to: s.to,
            value: s.value,
            validAfter: U256::from(s.valid_after),
            validBefore: U256::from(s.valid_before),
            nonce: s.nonce,
            // Wallets write v as 27/28 or as the parity 0/1; the token wants 27/28.
            v: if v < 27 { v + 27 } else { v },
            r: part(0..32),
            s: part(32..64),
        }
        .abi_encode()
        .into()
    }
}

/// `aggregate3` over `transfers`; with `allow_failure`, each may fail on its own without
/// reverting the others.
pub fn aggregate(transfers: &[Transfer3009], allow_failure: bool) -> Bytes {
    aggregate3Call {
        calls: transfers
            .iter()
            .map(|t| Call3 {
                target: t.token,
                allowFailure: allow_failure,
                callData: t.calldata(),
            })
            .collect(),
    }
    .abi_encode()
    .into()
}

/// The per-call results of a simulated `aggregate3`.
pub fn aggregate_results(returned: &[u8]) -> Result<Vec<Result3>, String> {
    aggregate3Call::abi_decode_returns(returned)
        .map_err(|e| format!("aggregate3 answered something else: {e}"))
}

/// Why a call reverted, as a stable code and the contract's words: `nonce_already_used:
/// FiatTokenV2: authorization is used or canceled`.
pub fn revert_reason(data: &[u8]) -> String {
    let text = alloy::sol_types::decode_revert_reason(data)
        .map(|t| t.strip_prefix("revert: ").map(str::to_string).unwrap_or(t))
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "reverted without a reason".to_string());
    let code = revert_code(&text);
    format!("{code}: {text}")
}

/// The stable code of a revert message from FiatToken (and tokens that copy its messages).
pub fn revert_code(text: &str) -> &'static str {
    let t = text.to_ascii_lowercase();
    if t.contains("used or canceled") || t.contains("used or cancelled") {
        "nonce_already_used"
    } else if t.contains("expired") {
        "authorization_expired"
    } else if t.contains("not yet valid") {
        "authorization_not_yet_valid"
    } else if t.contains("exceeds balance") || t.contains("insufficient") {
        "insufficient_balance"
    } else if t.contains("signature") {
        "invalid_signature"
    } else if t.contains("blacklisted") || t.contains("paused") {
        "token_refused"
    } else {
        "reverted"
    }
}

/// Whether a receipt log is `AuthorizationUsed(payer, nonce)` of `token`.
pub fn is_authorization_used(log: &alloy::rpc::types::Log, t: &Transfer3009) -> bool {
    let topics = log.topics();
    log.address() == t.token
        && topics.first() == Some(&AuthorizationUsed::SIGNATURE_HASH)
        && topics.get(1) == Some(&B256::left_padding_from(t.signed.from.as_slice()))
        && topics.get(2) == Some(&t.signed.nonce)
}

/// Whether a receipt log is the `Transfer(payer, pay_to, value)` of `t`.
pub fn is_transfer(log: &alloy::rpc::types::Log, t: &Transfer3009) -> bool {
    let topics = log.topics();
    log.address() == t.token
        && topics.first() == Some(&Transfer::SIGNATURE_HASH)
        && topics.get(1) == Some(&B256::left_padding_from(t.signed.from.as_slice()))
        && topics.get(2) == Some(&B256::left_padding_from(t.signed.to.as_slice()))
        && log.data().data.as_ref() == t.signed.value.to_be_bytes::<32>().as_slice()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revert_messages_get_stable_codes() {
        assert_eq!(
            revert_code("FiatTokenV2: authorization is used or canceled"),
            "nonce_already_used"
        );
        assert_eq!(
            revert_code("FiatTokenV2: authorization is expired"),
            "authorization_expired"
        );
        assert_eq!(
            revert_code("ERC20: transfer amount exceeds balance"),
            "insufficient_balance"
        );
        assert_eq!(
            revert_code("FiatTokenV2: invalid signature"),
            "invalid_signature"
        );
        assert_eq!(revert_code("something else"), "reverted");
        // Error(string) with "FiatTokenV2: authorization is expired".
        let data = alloy::sol_types::Revert::from("FiatTokenV2: authorization is expired");
        let encoded = alloy::sol_types::SolError::abi_encode(&data);
        assert_eq!(
            revert_reason(&encoded),
            "authorization_expired: FiatTokenV2: authorization is expired"
        );
        assert_eq!(revert_reason(&[]), "reverted: reverted without a reason");
    }
}
