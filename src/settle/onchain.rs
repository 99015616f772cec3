//! `settle via rpc "URL" relayer KEY`: tollgate settles on chain itself, no facilitator.
//!
//! [`Rpc::settle`] takes a batch of authorizations (one for `before`/`after response`, a whole
//! bundle for `deferred`) and:
//! 1. **simulates** them in one `eth_call` of Multicall3 `aggregate3` (each call allowed to
//!    fail): an authorization that can no longer succeed — nonce already used, expired, the
//!    payer's balance short, a bad signature — is dropped and `failed` with the token's reason,
//!    so it never costs gas and never sinks the others;
//! 2. **sends one transaction** through the [`Relayer`]: the lone `transferWithAuthorization`
//!    straight to the token, or `aggregate3` over the bundle with `allowFailure` — a bundle
//!    larger than [`MAX_PER_TRANSACTION`] is sent as several, one after the other, so none
//!    outgrows a block;
//! 3. **matches the receipt back** to entries: an authorization is `confirmed` when the receipt
//!    holds its `AuthorizationUsed(payer, nonce)` and its `Transfer(payer, pay_to, value)`.
//!
//! [`check`] is what startup, reload and `tollgate check --online` ask of a node before any
//! payment depends on it.

use alloy::eips::BlockId;
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::Provider;
use alloy::rpc::types::TransactionRequest;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolCall;

use super::evm::{self, MULTICALL3, Transfer3009};
use super::relayer::{self, Relayer, Settings, TxError};
use crate::config::SecretRef;
use crate::policy::{Backend, Policy};
use crate::x402::Terms;

/// How the ledger names the backend of a payment settled through the node at `url`: `rpc:`
/// and the URL without its path or query, where hosted nodes put their API key
/// ([`relayer::redact_url`]); the policy holds the whole URL.
pub fn backend_name(url: &str) -> String {
    format!("rpc:{}", relayer::redact_url(url))
}

/// The node of a backend named by [`backend_name`], as shown.
pub fn node_url(backend: &str) -> Option<&str> {
    backend.strip_prefix("rpc:")
}

/// Most authorizations in one transaction: a bundle larger than this is sent as several.
/// Each costs ~38,900 gas in a batch (measured: "Settlement gas on chain" in the README), so
/// 200 take ~7.8M — a quarter of a 30M-gas block (anvil's default; Base's blocks are larger).
/// A bundle of 1,000 in one transaction (~39M) could never be mined, and its gas estimate
/// failed on every attempt while the payments waited (found by the 30-minute soak).
pub const MAX_PER_TRANSACTION: usize = 200;

/// What became of one authorization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Moved on chain, buried under the configured confirmations; `gas_used` by the relayer's
    /// transaction (none when someone else's transaction settled it).
    Confirmed {
        tx: B256,
        block: u64,
        gas_used: Option<u64>,
    },
    /// Cannot succeed: the token's reason.
    Failed(String),
    /// Nothing happened on chain; it may be tried again.
    NotSent(String),
    /// May have happened: the chain's evidence decides.
    Unknown(String),
}

/// One node and the relayer that sends through it.
pub struct Rpc {
    relayer: Relayer,
    /// The same node, read for evidence.
    evidence: super::evidence::Chain,
    chain_id: u64,
}

impl Rpc {
    /// Connects to `url` (reads its chain id) with the relayer's key.
    pub async fn connect(
        url: &str,
        signer: PrivateKeySigner,
        settings: Settings,
    ) -> Result<Rpc, String> {
        let provider = relayer::provider(url)?;
        let chain_id = provider
            .get_chain_id()
            .await
            .map_err(|e| format!("the settlement node cannot be read: {}", relayer::short(&e)))?;
        Ok(Rpc {
            evidence: super::evidence::Chain::with(provider.clone()),
            relayer: Relayer::new(provider, signer, chain_id, settings),
            chain_id,
        })
    }

    pub fn chain_id(&self) -> u64 {
        self.chain_id
    }

    /// The node, read for evidence.
    pub fn evidence(&self) -> &super::evidence::Chain {
        &self.evidence
    }

    pub fn relayer(&self) -> Address {
        self.relayer.address()
    }

    /// Whether the node holds a transaction of the relayer this process is not watching (sent
    /// before a restart, or given up on): it may carry a payment whose outcome is unknown.
    pub async fn has_leftovers(&self) -> Result<bool, String> {
        self.relayer.has_leftovers().await
    }

    /// Cancels the leftovers that have waited long enough ([`Relayer::cancel_leftovers`]).
    pub async fn tend(&self) -> Result<usize, String> {
        self.relayer.cancel_leftovers().await
    }

    /// Settles `batch` (see the module docs) in transactions of at most
    /// [`MAX_PER_TRANSACTION`] authorizations, one after the other; one outcome per entry.
    pub async fn settle(&self, mut batch: Vec<Transfer3009>) -> Vec<(u64, Outcome)> {
        let mut outcomes = Vec::with_capacity(batch.len());
        while !batch.is_empty() {
            let rest = batch.split_off(batch.len().min(MAX_PER_TRANSACTION));
            outcomes.extend(self.settle_in_one(batch).await);
            batch = rest;
        }
        outcomes
    }

    /// Settles `batch` in one transaction; one outcome per entry.
    async fn settle_in_one(&self, batch: Vec<Transfer3009>) -> Vec<(u64, Outcome)> {
        let mut outcomes = Vec::with_capacity(batch.len());
        let every = |batch: &[Transfer3009], outcome: Outcome| {
            batch
                .iter()
                .map(|t| (t.seq, outcome.clone()))
                .collect::<Vec<_>>()
        };
        let results = match self.simulate(&batch, BlockId::latest()).await {
            Ok(r) if r.len() == batch.len() => r,
            Ok(_) => {
                return every(
                    &batch,
                    Outcome::NotSent(
                        "the simulation answered a different number of results".into(),
                    ),
                );
            }
            Err(why) => return every(&batch, Outcome::NotSent(why)),
        };
        let mut live = self.sort_out(batch, results, &mut outcomes).await;
        let mut retried = false;
        let (to, data, gas_limit) = loop {
            let (to, data, strict) = match live.as_slice() {
                [] => return outcomes,
                [one] => (one.token, one.calldata(), one.calldata()),
                many => (
                    MULTICALL3,
                    evm::aggregate(many, true),
                    evm::aggregate(many, false),
                ),
            };
            // Estimated with every call required to succeed (they all did in the simulation):
            // an estimate of calls allowed to fail would stop at the gas where they fail
            // quietly. At the latest block, like the simulation: the pending block is the
            // node's guess (anvil's, under load, had every authorization expired while the
            // latest block took them; found by the 30-minute soak).
            let estimate = self
                .relayer
                .provider()
                .estimate_gas(self.request(to, strict))
                .block(BlockId::latest())
                .await;
            match estimate {
                // A margin: state may move between the estimate and the block.
                Ok(gas) => break (to, data, gas.saturating_add(gas / 5).saturating_add(10_000)),
                // A block mined since the simulation may have moved what a call needs (another
                // settlement of it, the payer's balance): once, simulate again and set aside
                // what fails now, so it does not hold the others back.
                Err(e) if !retried && live.len() > 1 => {
                    retried = true;
                    let why = format!("estimating gas: {}", relayer::short(&e));
                    let results = match self.simulate(&live, BlockId::latest()).await {
                        Ok(r) if r.len() == live.len() && r.iter().any(|r| !r.success) => r,
                        _ => {
                            outcomes.extend(every(&live, Outcome::NotSent(why)));
                            return outcomes;
                        }
                    };
                    let before = outcomes.len();
                    live = self.sort_out(live, results, &mut outcomes).await;
                    let reasons: Vec<String> = outcomes
                        .iter()
                        .skip(before)
                        .take(3)
                        .map(|(seq, o)| format!("{seq}: {o:?}"))
                        .collect();
                    tracing::warn!(
                        set_aside = outcomes.len() - before,
                        sending = live.len(),
                        first = ?reasons,
                        "authorizations that passed the simulation fail now; sending the others"
                    );
                }
                Err(e) => {
                    outcomes.extend(every(
                        &live,
                        Outcome::NotSent(format!("estimating gas: {}", relayer::short(&e))),
                    ));
                    return outcomes;
                }
            }
        };
        match self.relayer.submit(to, data, gas_limit).await {
            Ok(mined) if !mined.success => outcomes.extend(every(
                &live,
                Outcome::NotSent(format!(
                    "transaction {} reverted as a whole in block {}; nothing moved",
                    mined.tx, mined.block
                )),
            )),
            Ok(mined) => {
                for t in live {
                    let used = mined.logs.iter().any(|l| evm::is_authorization_used(l, &t));
                    let paid = mined.logs.iter().any(|l| evm::is_transfer(l, &t));
                    let outcome = if used && paid {
                        Outcome::Confirmed {
                            tx: mined.tx,
                            block: mined.block,
                            gas_used: Some(mined.gas_used),
                        }
                    } else {
                        // Something moved between the simulation and the block (another
                        // settlement of it, the payer's balance): the chain decides.
                        Outcome::Unknown(format!(
                            "the authorization's call failed inside transaction {} (block {}); decided by evidence",
                            mined.tx, mined.block
                        ))
                    };
                    outcomes.push((t.seq, outcome));
                }
            }
            Err(TxError::NotSent(why)) => outcomes.extend(every(&live, Outcome::NotSent(why))),
            Err(TxError::Unknown(why)) => outcomes.extend(every(&live, Outcome::Unknown(why))),
        }
        outcomes
    }

    /// The outcome of an authorization whose nonce the token already shows used.
    async fn used_nonce(&self, t: &Transfer3009, reason: String) -> Outcome {
        use super::evidence::{Subject, Verdict};
        let subject = Subject {
            payer: t.signed.from,
            nonce: t.signed.nonce,
            asset: t.token,
            pay_to: t.signed.to,
            amount: t.signed.value,
        };
        match self
            .evidence
            .examine(&subject, self.relayer.confirmations())
            .await
        {
            Ok(Verdict::Settled { tx, block }) => match tx.parse() {
                Ok(tx) => Outcome::Confirmed {
                    tx,
                    block,
                    gas_used: None,
                },
                Err(_) => Outcome::Unknown(format!("{reason}; settled in {tx}")),
            },
            Ok(Verdict::UsedOtherwise { why }) => {
                Outcome::Failed(format!("nonce_already_used: {why}"))
            }
            Ok(Verdict::Unused { .. }) | Ok(Verdict::Unclear { .. }) | Err(_) => {
                Outcome::Unknown(reason)
            }
        }
    }

    fn request(&self, to: Address, data: Bytes) -> TransactionRequest {
        TransactionRequest::default()
            .from(self.relayer.address())
            .to(to)
            .input(data.into())
    }

    /// The transfers of `batch` whose simulated call succeeded; the others get their outcome
    /// in `outcomes`: not yet valid → not sent (again later), nonce already used → the chain's
    /// evidence decides, anything else → failed with the token's reason.
    async fn sort_out(
        &self,
        batch: Vec<Transfer3009>,
        results: Vec<evm::Result3>,
        outcomes: &mut Vec<(u64, Outcome)>,
    ) -> Vec<Transfer3009> {
        let mut live = Vec::with_capacity(batch.len());
        for (transfer, result) in batch.into_iter().zip(results) {
            if result.success {
                live.push(transfer);
                continue;
            }
            let reason = evm::revert_reason(&result.returnData);
            let outcome = if reason.starts_with("authorization_not_yet_valid") {
                Outcome::NotSent(reason)
            } else if reason.starts_with("nonce_already_used") {
                // Anyone holding the signed authorization may have settled it — to `pay_to`:
                // only the chain's events tell paid from cancelled or spent elsewhere.
                self.used_nonce(&transfer, reason).await
            } else {
                Outcome::Failed(reason)
            };
            outcomes.push((transfer.seq, outcome));
        }
        live
    }

    /// Every transfer of `batch` simulated at `block`, in order, each on its own.
    async fn simulate(
        &self,
        batch: &[Transfer3009],
        block: BlockId,
    ) -> Result<Vec<evm::Result3>, String> {
        let answer = self
            .relayer
            .provider()
            .call(self.request(MULTICALL3, evm::aggregate(batch, true)))
            .block(block)
            .await
            .map_err(|e| format!("simulating the settlement: {}", relayer::short(&e)))?;
        evm::aggregate_results(&answer)
    }
}

/// Reads the relayer key from where the policy says it is. Never shows the key.
pub fn read_key(source: &SecretRef) -> Result<String, String> {
    match source {
        SecretRef::Env(name) => std::env::var(name).map_err(|_| {
            format!(
                "the relayer key is read from the environment variable {name}, which is not set"
            )
        }),
        SecretRef::File(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the relayer key file {}: {e}", path.display())),
    }
}

/// What the startup check found.
#[derive(Debug, Clone)]
pub struct Checked {
    pub chain_id: u64,
    pub relayer: Address,
    /// The relayer's balance, in wei.
    pub gas_balance: U256,
}

/// Refuses a policy whose `settle via rpc` cannot work: the key unreadable, the node
/// unreachable or on another chain than a network the policy quotes, an asset that is not an
/// EIP-3009 token there, no Multicall3 for bundles, or a relayer without gas.
pub fn check(policy: &Policy, terms: &Terms) -> Result<Option<Checked>, String> {
    let Backend::Rpc { url, relayer } = &policy.settlement.backend else {
        return Ok(None);
    };
    let mut assets: Vec<(String, u64, Address)> = Vec::new();
    for id in 0..policy.routes.len() {
        for offer in terms
            .route(id)
            .map(|t| t.offers.as_slice())
            .unwrap_or_default()
        {
            let key = (offer.network.clone(), offer.chain_id, offer.asset);
            if !assets.contains(&key) {
                assets.push(key);
            }
        }
    }
    let url = url.clone();
    let key = relayer.clone();
    let origin = policy.origin.clone();
    // Startup runs outside any runtime and a reload inside one: ask from a thread of its own.
    let checked = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|runtime| runtime.block_on(check_node(&url, &key, &assets)))
    })
    .join()
    .unwrap_or_else(|_| Err("the check failed unexpectedly".into()));
    checked
        .map(Some)
        .map_err(|why| format!("{origin}: `settle via rpc`: {why}"))
}

async fn check_node(
    url: &str,
    key: &SecretRef,
    assets: &[(String, u64, Address)],
) -> Result<Checked, String> {
    let settings = Settings {
        confirmations: 1,
        max_fee_per_gas: u128::MAX,
        replace_after: std::time::Duration::from_secs(60),
    };
    let signer = relayer::parse_key(&read_key(key)?)?;
    let rpc = Rpc::connect(url, signer, settings).await?;
    let provider = rpc.relayer.provider();
    for (network, chain_id, asset) in assets {
        if *chain_id != rpc.chain_id {
            return Err(format!(
                "the node is on chain {}, but the policy quotes {network} (chain {chain_id}); point `via rpc` at a node of {network}",
                rpc.chain_id
            ));
        }
        let code = provider
            .get_code_at(*asset)
            .await
            .map_err(|e| format!("reading the token {asset}: {}", relayer::short(&e)))?;
        if code.is_empty() {
            return Err(format!(
                "there is no contract at the asset address {asset} on {network}"
            ));
        }
        let probe = evm::authorizationStateCall {
            authorizer: Address::ZERO,
            nonce: B256::ZERO,
        };
        let answer = provider
            .call(
                TransactionRequest::default()
                    .to(*asset)
                    .input(Bytes::from(probe.abi_encode()).into()),
            )
            .block(alloy::eips::BlockId::latest())
            .await
            .map_err(|e| {
                format!(
                    "the asset {asset} on {network} does not answer authorizationState (EIP-3009): {}",
                    relayer::short(&e)
                )
            })?;
        evm::authorizationStateCall::abi_decode_returns(&answer).map_err(|_| {
            format!("the asset {asset} on {network} does not answer authorizationState (EIP-3009)")
        })?;
    }
    let multicall = provider
        .get_code_at(MULTICALL3)
        .await
        .map_err(|e| format!("reading Multicall3: {}", relayer::short(&e)))?;
    if multicall.is_empty() {
        return Err(format!(
            "there is no Multicall3 at {MULTICALL3} on chain {}: settlement transactions need it",
            rpc.chain_id
        ));
    }
    let gas_balance = provider
        .get_balance(rpc.relayer())
        .await
        .map_err(|e| format!("reading the relayer's balance: {}", relayer::short(&e)))?;
    if gas_balance.is_zero() {
        return Err(format!(
            "the relayer {} has no gas on chain {}: send it some of the chain's native currency (it pays gas only; payments go straight to pay_to)",
            rpc.relayer(),
            rpc.chain_id
        ));
    }
    Ok(Checked {
        chain_id: rpc.chain_id,
        relayer: rpc.relayer(),
        gas_balance,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_names_a_node_without_its_api_key() {
        let name = backend_name("https://base-mainnet.g.alchemy.com/v2/SECRETKEY");
        assert_eq!(name, "rpc:https://base-mainnet.g.alchemy.com/…");
        assert_eq!(
            node_url(&name),
            Some("https://base-mainnet.g.alchemy.com/…")
        );
        assert_eq!(
            backend_name("http://127.0.0.1:8545"),
            "rpc:http://127.0.0.1:8545"
        );
        assert_eq!(node_url("https://x402.org/facilitator"), None);
    }
}
