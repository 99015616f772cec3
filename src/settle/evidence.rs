//! Evidence from the chain, for a payment whose settlement outcome nobody knows.
//!
//! A used nonce alone proves nothing: the payer may have cancelled the authorization
//! (`cancelAuthorization`) or spent it in a transfer elsewhere. So [`Chain::examine`] reads
//! the token's `authorizationState(from, nonce)`, then the `AuthorizationUsed(from, nonce)`
//! event and, in the same transaction's receipt, the `Transfer(from, pay_to, amount)` that
//! makes it this payment. Plain JSON-RPC over HTTP (`eth_chainId`, `eth_call`, `eth_getLogs`,
//! `eth_getTransactionReceipt`); the ABI encoding is alloy's.

use std::time::Duration;

use alloy::primitives::{Address, B256, U256};
use alloy::sol_types::{SolCall, SolEvent};
use serde_json::{Value, json};

use crate::store::ledger::Entry;

alloy::sol! {
    function authorizationState(address authorizer, bytes32 nonce) external view returns (bool);
    event AuthorizationUsed(address indexed authorizer, bytes32 indexed nonce);
    event AuthorizationCanceled(address indexed authorizer, bytes32 indexed nonce);
    event Transfer(address indexed from, address indexed to, uint256 value);
}

/// How far back (in blocks) the events of a nonce are looked for: about a day on Base (2 s
/// blocks). Older unknown outcomes stay unresolved, with the reason.
pub const LOOKBACK_BLOCKS: u64 = 50_000;

/// What the chain says about one payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The authorization moved `amount` from the payer to `pay_to` in `tx`.
    Settled { tx: String, block: u64 },
    /// The nonce was used, but not by this payment's transfer (cancelled, or spent elsewhere).
    UsedOtherwise { why: String },
    /// The nonce is unused: the payment did not settle (yet).
    Unused,
    /// The nonce is used but its event is out of reach: still unknown.
    Unclear { why: String },
}

/// A JSON-RPC node of one chain.
#[derive(Debug, Clone)]
pub struct Chain {
    client: reqwest::Client,
    url: String,
}

impl Chain {
    pub fn new(url: &str) -> Result<Chain, String> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("cannot build the RPC client: {e}"))?;
        Ok(Chain {
            client,
            url: url.to_string(),
        })
    }

    async fn rpc(&self, method: &str, params: Value) -> Result<Value, String> {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        let answer: Value = self
            .client
            .post(&self.url)
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("{method}: {}", e.without_url()))?
            .json()
            .await
            .map_err(|e| format!("{method}: {}", e.without_url()))?;
        if let Some(error) = answer.get("error") {
            return Err(format!("{method}: {error}"));
        }
        answer
            .get("result")
            .cloned()
            .ok_or_else(|| format!("{method}: no result"))
    }

    /// The node's chain id.
    pub async fn chain_id(&self) -> Result<u64, String> {
        let id = self.rpc("eth_chainId", json!([])).await?;
        quantity(&id).ok_or_else(|| format!("eth_chainId answered {id}"))
    }

    /// Reads what the chain knows about `entry`'s authorization.
    pub async fn examine(&self, entry: &Entry) -> Result<Verdict, String> {
        let call = authorizationStateCall {
            authorizer: entry.payer,
            nonce: entry.nonce,
        };
        let data = format!("0x{}", alloy::hex::encode(call.abi_encode()));
        let answer = self
            .rpc(
                "eth_call",
                json!([{"to": entry.asset.to_string(), "data": data}, "latest"]),
            )
            .await?;
        let bytes = answer
            .as_str()
            .and_then(|h| alloy::hex::decode(h).ok())
            .ok_or_else(|| format!("authorizationState answered {answer}"))?;
        let used = authorizationStateCall::abi_decode_returns(&bytes)
            .map_err(|e| format!("authorizationState answered something else: {e}"))?;
        if !used {
            return Ok(Verdict::Unused);
        }
        let latest = quantity(&self.rpc("eth_blockNumber", json!([])).await?).unwrap_or(0);
        let from_block = latest.saturating_sub(LOOKBACK_BLOCKS);
        let topics = |signature: B256| {
            json!([
                signature.to_string(),
                B256::left_padding_from(entry.payer.as_slice()).to_string(),
                entry.nonce.to_string()
            ])
        };
        let logs = self
            .rpc(
                "eth_getLogs",
                json!([{
                    "address": entry.asset.to_string(),
                    "fromBlock": format!("0x{from_block:x}"),
                    "toBlock": "latest",
                    "topics": topics(AuthorizationUsed::SIGNATURE_HASH),
                }]),
            )
            .await?;
        let Some(log) = logs.as_array().and_then(|l| l.first()) else {
            let cancelled = self
                .rpc(
                    "eth_getLogs",
                    json!([{
                        "address": entry.asset.to_string(),
                        "fromBlock": format!("0x{from_block:x}"),
                        "toBlock": "latest",
                        "topics": topics(AuthorizationCanceled::SIGNATURE_HASH),
                    }]),
                )
                .await?;
            if cancelled.as_array().is_some_and(|l| !l.is_empty()) {
                return Ok(Verdict::UsedOtherwise {
                    why: "the payer cancelled the authorization on chain".into(),
                });
            }
            return Ok(Verdict::Unclear {
                why: format!(
                    "the nonce is used but no AuthorizationUsed event was found in the last {LOOKBACK_BLOCKS} blocks"
                ),
            });
        };
        let tx = log
            .get("transactionHash")
            .and_then(Value::as_str)
            .ok_or("an AuthorizationUsed log without a transaction")?
            .to_string();
        let block = log.get("blockNumber").and_then(quantity).unwrap_or(0);
        let receipt = self.rpc("eth_getTransactionReceipt", json!([tx])).await?;
        let paid = receipt
            .get("logs")
            .and_then(Value::as_array)
            .is_some_and(|logs| logs.iter().any(|l| is_transfer(l, entry)));
        if paid {
            Ok(Verdict::Settled { tx, block })
        } else {
            Ok(Verdict::UsedOtherwise {
                why: format!(
                    "the nonce was used in {tx} without a transfer of {} to {}",
                    entry.amount, entry.pay_to
                ),
            })
        }
    }
}

/// Whether a receipt log is the `Transfer(payer, pay_to, amount)` of `entry`'s token.
fn is_transfer(log: &Value, entry: &Entry) -> bool {
    let address = log
        .get("address")
        .and_then(Value::as_str)
        .and_then(|a| a.parse::<Address>().ok());
    let topics: Vec<B256> = log
        .get("topics")
        .and_then(Value::as_array)
        .map(|t| t.iter().filter_map(|v| v.as_str()?.parse().ok()).collect())
        .unwrap_or_default();
    let data = log
        .get("data")
        .and_then(Value::as_str)
        .and_then(|d| alloy::hex::decode(d).ok())
        .unwrap_or_default();
    let value = (data.len() == 32).then(|| U256::from_be_slice(&data));
    address == Some(entry.asset)
        && topics.first() == Some(&Transfer::SIGNATURE_HASH)
        && topics.get(1) == Some(&B256::left_padding_from(entry.payer.as_slice()))
        && topics.get(2) == Some(&B256::left_padding_from(entry.pay_to.as_slice()))
        && value == Some(U256::from(entry.amount))
}

/// A JSON-RPC quantity (`"0x1a"`).
fn quantity(value: &Value) -> Option<u64> {
    u64::from_str_radix(value.as_str()?.strip_prefix("0x")?, 16).ok()
}
