//! Evidence from the chain, for a payment whose settlement outcome nobody knows.
//!
//! A used nonce alone proves nothing: the payer may have cancelled the authorization
//! (`cancelAuthorization`) or spent it in a transfer elsewhere. So [`Chain::examine`] reads
//! the token's `authorizationState(from, nonce)`, then the `AuthorizationUsed(from, nonce)`
//! event and, in the same transaction's receipt, the `Transfer(from, pay_to, amount)` that
//! makes it this payment — buried under the configured confirmations, or it is not evidence
//! yet. Read through alloy's provider, like everything tollgate asks of a node.

use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::{Provider, RootProvider};
use alloy::rpc::types::{Filter, Log, TransactionRequest};
use alloy::sol_types::{SolCall, SolEvent};

use super::evm::{
    AuthorizationCanceled, AuthorizationUsed, Call3, MULTICALL3, Transfer, aggregate3Call,
    authorizationStateCall,
};
use super::relayer::{self, short};
use crate::store::ledger::Entry;

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
    /// The nonce is unused: the payment did not settle (yet). `chain_time`: the latest
    /// block's timestamp, the clock the token checks `validBefore` against (not this host's,
    /// which may have jumped).
    Unused { chain_time: u64 },
    /// The nonce is used but its event is out of reach, or not yet deep enough: still unknown.
    Unclear { why: String },
}

/// The authorization a verdict is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subject {
    pub payer: Address,
    pub nonce: B256,
    pub asset: Address,
    pub pay_to: Address,
    pub amount: U256,
}

impl From<&Entry> for Subject {
    fn from(entry: &Entry) -> Subject {
        Subject {
            payer: entry.payer,
            nonce: entry.nonce,
            asset: entry.asset,
            pay_to: entry.pay_to,
            amount: U256::from(entry.amount),
        }
    }
}

/// A JSON-RPC node of one chain.
#[derive(Debug, Clone)]
pub struct Chain {
    provider: RootProvider,
}

impl Chain {
    pub fn new(url: &str) -> Result<Chain, String> {
        Ok(Chain::with(relayer::provider(url)?))
    }

    /// Reads through a provider already made (the relayer's).
    pub fn with(provider: RootProvider) -> Chain {
        Chain { provider }
    }

    /// The node's chain id.
    pub async fn chain_id(&self) -> Result<u64, String> {
        self.provider
            .get_chain_id()
            .await
            .map_err(|e| format!("eth_chainId: {}", short(&e)))
    }

    /// Which of `subjects`' nonces are used, read in one Multicall3 `aggregate3` of
    /// `authorizationState` calls at the latest block, with that block's timestamp: an evidence
    /// round after a crash reads hundreds of nonces in a few calls, not one each. The used
    /// ones still need [`Chain::examine`] (which transfer used them).
    pub async fn used(&self, subjects: &[Subject]) -> Result<(Vec<bool>, u64), String> {
        let latest = self
            .provider
            .get_block_by_number(alloy::rpc::types::BlockNumberOrTag::Latest)
            .await
            .map_err(|e| format!("reading the latest block: {}", short(&e)))?
            .ok_or("the node has no latest block")?;
        let calls = subjects
            .iter()
            .map(|s| Call3 {
                target: s.asset,
                allowFailure: true,
                callData: authorizationStateCall {
                    authorizer: s.payer,
                    nonce: s.nonce,
                }
                .abi_encode()
                .into(),
            })
            .collect();
        let answer = self
            .provider
            .call(
                TransactionRequest::default()
                    .to(MULTICALL3)
                    .input(Bytes::from(aggregate3Call { calls }.abi_encode()).into()),
            )
            .block(alloy::eips::BlockId::number(latest.header.number))
            .await
            .map_err(|e| format!("aggregate3 of authorizationState: {}", short(&e)))?;
        let results = aggregate3Call::abi_decode_returns(&answer)
            .map_err(|e| format!("aggregate3 answered something else: {e}"))?;
        if results.len() != subjects.len() {
            return Err("aggregate3 answered a different number of calls".into());
        }
        let used = results
            .iter()
            .map(|r| {
                if !r.success {
                    return Err("an authorizationState call failed".to_string());
                }
                authorizationStateCall::abi_decode_returns(&r.returnData)
                    .map_err(|e| format!("authorizationState answered something else: {e}"))
            })
            .collect::<Result<Vec<bool>, String>>()?;
        Ok((used, latest.header.timestamp))
    }

    /// Reads what the chain knows about `entry`'s authorization; a transfer counts once its
    /// block has `confirmations` blocks (its own included).
    pub async fn examine(&self, entry: &Subject, confirmations: u64) -> Result<Verdict, String> {
        let call = authorizationStateCall {
            authorizer: entry.payer,
            nonce: entry.nonce,
        };
        let answer = self
            .provider
            .call(
                TransactionRequest::default()
                    .to(entry.asset)
                    .input(Bytes::from(call.abi_encode()).into()),
            )
            .block(alloy::eips::BlockId::latest())
            .await
            .map_err(|e| format!("authorizationState: {}", short(&e)))?;
        let used = authorizationStateCall::abi_decode_returns(&answer)
            .map_err(|e| format!("authorizationState answered something else: {e}"))?;
        if !used {
            let latest = self
                .provider
                .get_block_by_number(alloy::rpc::types::BlockNumberOrTag::Latest)
                .await
                .map_err(|e| format!("reading the latest block: {}", short(&e)))?
                .ok_or("the node has no latest block")?;
            return Ok(Verdict::Unused {
                chain_time: latest.header.timestamp,
            });
        }
        let latest = self
            .provider
            .get_block_number()
            .await
            .map_err(|e| format!("eth_blockNumber: {}", short(&e)))?;
        let events = |signature: B256| {
            Filter::new()
                .address(entry.asset)
                .from_block(latest.saturating_sub(LOOKBACK_BLOCKS))
                .event_signature(signature)
                .topic1(B256::left_padding_from(entry.payer.as_slice()))
                .topic2(entry.nonce)
        };
        let logs = self
            .provider
            .get_logs(&events(AuthorizationUsed::SIGNATURE_HASH))
            .await
            .map_err(|e| format!("eth_getLogs: {}", short(&e)))?;
        let Some(log) = logs.first() else {
            let cancelled = self
                .provider
                .get_logs(&events(AuthorizationCanceled::SIGNATURE_HASH))
                .await
                .map_err(|e| format!("eth_getLogs: {}", short(&e)))?;
            if !cancelled.is_empty() {
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
            .transaction_hash
            .ok_or("an AuthorizationUsed log without a transaction")?;
        let block = log.block_number.unwrap_or(0);
        if latest.saturating_add(1).saturating_sub(block) < confirmations {
            return Ok(Verdict::Unclear {
                why: format!("settled in block {block}, waiting for {confirmations} confirmations"),
            });
        }
        let receipt = self
            .provider
            .get_transaction_receipt(tx)
            .await
            .map_err(|e| format!("eth_getTransactionReceipt: {}", short(&e)))?
            .ok_or_else(|| format!("no receipt for {tx}"))?;
        let paid = receipt.inner.logs().iter().any(|l| is_transfer(l, entry));
        if paid {
            Ok(Verdict::Settled {
                tx: tx.to_string(),
                block,
            })
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
fn is_transfer(log: &Log, entry: &Subject) -> bool {
    let topics = log.topics();
    log.address() == entry.asset
        && topics.first() == Some(&Transfer::SIGNATURE_HASH)
        && topics.get(1) == Some(&B256::left_padding_from(entry.payer.as_slice()))
        && topics.get(2) == Some(&B256::left_padding_from(entry.pay_to.as_slice()))
        && log.data().data.as_ref() == entry.amount.to_be_bytes::<32>().as_slice()
}
