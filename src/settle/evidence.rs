//! Evidence from the chain, for a payment whose settlement outcome nobody knows.
//!
//! A used nonce alone proves nothing: the payer may have cancelled the authorization
//! (`cancelAuthorization`) or spent it in a transfer elsewhere. So [`Chain::examine`] reads
//! the token's `authorizationState(from, nonce)`, then the `AuthorizationUsed(from, nonce)`
//! event and, in the same transaction's receipt, the `Transfer(from, pay_to, amount)` that
//! makes it this payment — buried under the configured confirmations, or it is not evidence
//! yet. Read through alloy's provider, like everything tollgate asks of a node.
//!
//! [`Chain::examine_all`] decides a whole backlog in a few reads (batched nonce states, one log
//! query per token, one receipt per transaction); [`Chain::examine`] decides one payment.

use std::collections::HashMap;

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
    /// `authorizationState` calls at the latest block: an evidence round after a crash reads
    /// hundreds of nonces in a few calls, not one each.
    async fn used(&self, subjects: &[Subject]) -> Result<Reading, String> {
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
        Ok(Reading {
            used,
            block: latest.header.number,
            time: latest.header.timestamp,
        })
    }

    /// What the chain knows about each of `subjects` (in the same order), in a few reads
    /// whatever their number: one `aggregate3` of `authorizationState` per call, one
    /// `eth_getLogs` per token for the `AuthorizationUsed` events of the used nonces, and one
    /// receipt per transaction that used them (a bundle's payments share theirs). After a
    /// crash loop an evidence round decides thousands of payments in seconds, where reading
    /// each on its own took a few round trips apiece and let served payments expire unsettled.
    pub async fn examine_all(
        &self,
        subjects: &[Subject],
        confirmations: u64,
    ) -> Result<Vec<Verdict>, String> {
        let reading = self.used(subjects).await?;
        let used: Vec<&Subject> = subjects
            .iter()
            .zip(&reading.used)
            .filter_map(|(s, &used)| used.then_some(s))
            .collect();
        let mut judged = self
            .judge_used(&used, reading.block, confirmations)
            .await
            .into_iter();
        Ok(reading
            .used
            .iter()
            .map(|&used| match used {
                false => Verdict::Unused {
                    chain_time: reading.time,
                },
                true => judged.next().unwrap_or(Verdict::Unclear {
                    why: "no verdict".into(),
                }),
            })
            .collect())
    }

    /// Reads what the chain knows about `entry`'s authorization; a transfer counts once its
    /// block has `confirmations` blocks (its own included). Asks the token directly, without
    /// Multicall3: this is also the fallback when a batched read fails.
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
        let latest = self
            .provider
            .get_block_by_number(alloy::rpc::types::BlockNumberOrTag::Latest)
            .await
            .map_err(|e| format!("reading the latest block: {}", short(&e)))?
            .ok_or("the node has no latest block")?;
        if !used {
            return Ok(Verdict::Unused {
                chain_time: latest.header.timestamp,
            });
        }
        let mut verdicts = self
            .judge_used(&[entry], latest.header.number, confirmations)
            .await;
        Ok(verdicts.pop().unwrap_or(Verdict::Unclear {
            why: "no verdict".into(),
        }))
    }

    /// The verdicts (in order) for authorizations whose nonces are used as of block `latest`:
    /// which transaction used each (`AuthorizationUsed`, read per token in one `eth_getLogs`
    /// filtered on the payers and nonces), and whether that transaction's receipt holds this
    /// payment's transfer. What cannot be read is `Unclear` (read again next round), each
    /// payment on its own.
    async fn judge_used(&self, used: &[&Subject], latest: u64, confirmations: u64) -> Vec<Verdict> {
        let from = latest.saturating_sub(LOOKBACK_BLOCKS);
        // (token, payer, nonce) → (transaction, block) of its first AuthorizationUsed.
        let mut events: HashMap<(Address, Address, B256), (B256, u64)> = HashMap::new();
        // Tokens whose events could not be read, with why.
        let mut unreadable: HashMap<Address, String> = HashMap::new();
        let mut tokens: Vec<Address> = used.iter().map(|s| s.asset).collect();
        tokens.sort_unstable();
        tokens.dedup();
        for token in tokens {
            let of_token = || used.iter().filter(|s| s.asset == token);
            let distinct = |mut words: Vec<B256>| {
                words.sort_unstable();
                words.dedup();
                words
            };
            let payers = distinct(
                of_token()
                    .map(|s| B256::left_padding_from(s.payer.as_slice()))
                    .collect(),
            );
            let nonces = distinct(of_token().map(|s| s.nonce).collect());
            let filter = Filter::new()
                .address(token)
                .from_block(from)
                .to_block(latest)
                .event_signature(AuthorizationUsed::SIGNATURE_HASH)
                .topic1(payers)
                .topic2(nonces);
            // A node that cannot answer for one token leaves its payments unclear this round,
            // not the whole batch undecided.
            let logs = match self.provider.get_logs(&filter).await {
                Ok(logs) => logs,
                Err(e) => {
                    unreadable.insert(token, format!("eth_getLogs: {}", short(&e)));
                    continue;
                }
            };
            for log in logs {
                let (Some(payer), Some(nonce), Some(tx)) = (
                    log.topics().get(1),
                    log.topics().get(2),
                    log.transaction_hash,
                ) else {
                    continue;
                };
                let payer = Address::from_word(*payer);
                events
                    .entry((token, payer, *nonce))
                    .or_insert((tx, log.block_number.unwrap_or(0)));
            }
        }
        // Transaction → its receipt's logs (or why not), read once however many payments it
        // carried.
        let mut receipts: HashMap<B256, Result<Vec<Log>, String>> = HashMap::new();
        let mut verdicts = Vec::with_capacity(used.len());
        for subject in used {
            if let Some(why) = unreadable.get(&subject.asset) {
                verdicts.push(Verdict::Unclear { why: why.clone() });
                continue;
            }
            let Some(&(tx, block)) = events.get(&(subject.asset, subject.payer, subject.nonce))
            else {
                verdicts.push(
                    self.without_event(subject, from, latest)
                        .await
                        .unwrap_or_else(|why| Verdict::Unclear { why }),
                );
                continue;
            };
            if latest.saturating_add(1).saturating_sub(block) < confirmations {
                verdicts.push(Verdict::Unclear {
                    why: format!(
                        "settled in block {block}, waiting for {confirmations} confirmations"
                    ),
                });
                continue;
            }
            let logs = match receipts.entry(tx) {
                std::collections::hash_map::Entry::Occupied(known) => known.into_mut(),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(self.receipt_logs(tx).await)
                }
            };
            let logs = match logs {
                Ok(logs) => logs,
                Err(why) => {
                    verdicts.push(Verdict::Unclear { why: why.clone() });
                    continue;
                }
            };
            let paid = logs.iter().any(|l| is_transfer(l, subject));
            verdicts.push(if paid {
                Verdict::Settled {
                    tx: tx.to_string(),
                    block,
                }
            } else {
                Verdict::UsedOtherwise {
                    why: format!(
                        "the nonce was used in {tx} without a transfer of {} to {}",
                        subject.amount, subject.pay_to
                    ),
                }
            });
        }
        verdicts
    }

    /// The logs of `tx`'s receipt.
    async fn receipt_logs(&self, tx: B256) -> Result<Vec<Log>, String> {
        let receipt = self
            .provider
            .get_transaction_receipt(tx)
            .await
            .map_err(|e| format!("eth_getTransactionReceipt: {}", short(&e)))?
            .ok_or_else(|| format!("no receipt for {tx}"))?;
        Ok(receipt.inner.logs().to_vec())
    }

    /// The verdict on a used nonce without an `AuthorizationUsed` event in reach: cancelled by
    /// the payer, or unclear.
    async fn without_event(
        &self,
        subject: &Subject,
        from: u64,
        latest: u64,
    ) -> Result<Verdict, String> {
        let filter = Filter::new()
            .address(subject.asset)
            .from_block(from)
            .to_block(latest)
            .event_signature(AuthorizationCanceled::SIGNATURE_HASH)
            .topic1(B256::left_padding_from(subject.payer.as_slice()))
            .topic2(subject.nonce);
        let cancelled = self
            .provider
            .get_logs(&filter)
            .await
            .map_err(|e| format!("eth_getLogs: {}", short(&e)))?;
        if !cancelled.is_empty() {
            return Ok(Verdict::UsedOtherwise {
                why: "the payer cancelled the authorization on chain".into(),
            });
        }
        Ok(Verdict::Unclear {
            why: format!(
                "the nonce is used but no AuthorizationUsed event was found in the last {LOOKBACK_BLOCKS} blocks"
            ),
        })
    }
}

/// One batched read of nonces: used or not, at `block`, stamped `time`.
struct Reading {
    used: Vec<bool>,
    block: u64,
    time: u64,
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
