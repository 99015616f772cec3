//! The relayer: the account whose key pays the gas of the settlement transactions tollgate
//! sends itself (`settle via rpc "URL" relayer KEY`). It never holds the money: each transfer
//! moves USDC from the buyer straight to `pay_to`.
//!
//! It behaves like production infrastructure:
//! - **nonces are managed here**: one lock hands out the account's next nonce, read from the
//!   node's pending count once and after any doubt, so concurrent bundles never collide;
//! - **fees** are EIP-1559: `2 × base fee + tip`, capped by `settlement.max_fee_per_gas`; a base
//!   fee above the cap sends nothing (the payments wait);
//! - **a stuck transaction is replaced**, never duplicated: after `settlement.replace_after`
//!   without a receipt it is signed again with the same nonce and fees raised by a quarter
//!   (up to the cap); every hash sent for a nonce is watched until one of them is mined;
//! - **receipts are awaited to `settlement.confirmations` blocks**, and the block is checked to
//!   be still canonical at that depth; a transaction a reorganisation dropped is broadcast again
//!   (the same signed bytes: the token's nonces make a second transfer impossible).
//!
//! [`Relayer::submit`] answers [`TxError::NotSent`] only when nothing can have reached the
//! chain, and [`TxError::Unknown`] whenever it may have: the caller's evidence decides those.

use std::time::{Duration, Instant};

use alloy::consensus::{SignableTransaction, TxEip1559, TxEnvelope};
use alloy::eips::eip2718::Encodable2718;
use alloy::network::TxSignerSync;
use alloy::primitives::{Address, B256, Bytes, TxKind, U256};
use alloy::providers::{Provider, RootProvider};
use alloy::rpc::client::RpcClient;
use alloy::rpc::types::{BlockNumberOrTag, Log};
use alloy::signers::local::PrivateKeySigner;
use alloy::transports::{RpcError, TransportError, TransportErrorKind};

/// How long one JSON-RPC call may take.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a sent transaction's receipt is looked for.
const POLL: Duration = Duration::from_millis(250);

/// How long a transaction is watched before its outcome is called unknown.
const GIVE_UP_AFTER: Duration = Duration::from_secs(15 * 60);

/// The relayer's settings (from `tollgate.yaml`'s `settlement` section).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Blocks a transaction must have (its own counts as one) before it is final.
    pub confirmations: u64,
    /// Most wei per gas the relayer will pay.
    pub max_fee_per_gas: u128,
    /// How long a transaction may wait unmined before it is replaced.
    pub replace_after: Duration,
}

/// Why a transaction has no outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxError {
    /// Nothing reached the chain (the node could not be reached, or refused the transaction).
    NotSent(String),
    /// It may have reached the chain: only evidence can tell.
    Unknown(String),
}

/// A transaction mined and buried under `confirmations` blocks.
#[derive(Debug, Clone)]
pub struct Mined {
    pub tx: B256,
    pub block: u64,
    pub gas_used: u64,
    /// Wei per gas actually paid.
    pub gas_price: u128,
    /// Whether the transaction itself succeeded (a reverted one moved nothing).
    pub success: bool,
    pub logs: Vec<Log>,
}

#[derive(Debug, Clone, Copy)]
struct Fees {
    max_fee: u128,
    tip: u128,
}

/// The gas account and the node it sends through.
pub struct Relayer {
    provider: RootProvider,
    signer: PrivateKeySigner,
    chain_id: u64,
    settings: Settings,
    /// The next nonce to use, when known; `None` makes the next send read it from the node.
    next_nonce: tokio::sync::Mutex<Option<u64>>,
    /// Nonces whose transaction this process is watching.
    watching: std::sync::Mutex<std::collections::BTreeSet<u64>>,
    /// Nonces held in the node's pool by transactions this process did not send (sent before
    /// a restart), with when they were first seen.
    leftovers: std::sync::Mutex<std::collections::BTreeMap<u64, Instant>>,
}

/// Stops watching a nonce when its [`Relayer::submit`] ends, however it ends.
struct Watching<'a> {
    relayer: &'a Relayer,
    nonce: u64,
}

impl Drop for Watching<'_> {
    fn drop(&mut self) {
        self.relayer
            .watching
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.nonce);
    }
}

/// A JSON-RPC provider with timeouts (alloy's default HTTP client has none).
pub fn provider(url: &str) -> Result<RootProvider, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(RPC_TIMEOUT)
        .connect_timeout(Duration::from_secs(5))
        .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build the RPC client: {e}"))?;
    let url = url
        .parse()
        .map_err(|e| format!("invalid RPC URL {}: {e}", redact_url(url)))?;
    Ok(RootProvider::new(
        RpcClient::builder().http_with_client(client, url),
    ))
}

/// A node's URL fit for a log line or an error: scheme, host and port; a path or query (where
/// hosted nodes put their API key) shows as `/…`.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let cut = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(cut);
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let tail = if tail.is_empty() || tail == "/" {
        ""
    } else {
        "/…"
    };
    if scheme.is_empty() {
        format!("{authority}{tail}")
    } else {
        format!("{scheme}://{authority}{tail}")
    }
}

/// A private key from its text (0x + 64 hex digits, surrounding whitespace ignored). The
/// error never repeats the text.
pub fn parse_key(text: &str) -> Result<PrivateKeySigner, String> {
    text.trim()
        .parse::<PrivateKeySigner>()
        .map_err(|_| "the relayer key is not a private key (0x followed by 64 hex digits)".into())
}

impl Relayer {
    pub fn new(
        provider: RootProvider,
        signer: PrivateKeySigner,
        chain_id: u64,
        settings: Settings,
    ) -> Relayer {
        Relayer {
            provider,
            signer,
            chain_id,
            settings,
            next_nonce: tokio::sync::Mutex::new(None),
            watching: std::sync::Mutex::new(std::collections::BTreeSet::new()),
            leftovers: std::sync::Mutex::new(std::collections::BTreeMap::new()),
        }
    }

    pub fn address(&self) -> Address {
        self.signer.address()
    }

    pub fn confirmations(&self) -> u64 {
        self.settings.confirmations
    }

    pub fn provider(&self) -> &RootProvider {
        &self.provider
    }

    /// The relayer's nonces the node holds unmined transactions for that this process is not
    /// watching: sent before a restart, or given up on. One of them may carry a payment whose
    /// outcome is unknown.
    async fn leftover_nonces(&self) -> Result<std::ops::Range<u64>, String> {
        let address = self.address();
        let mined = self
            .provider
            .get_transaction_count(address)
            .latest()
            .await
            .map_err(|e| short(&e))?;
        let pending = self
            .provider
            .get_transaction_count(address)
            .pending()
            .await
            .map_err(|e| short(&e))?;
        Ok(mined..pending.max(mined))
    }

    /// Whether any transaction in the node's pool may carry a payment whose outcome is unknown
    /// (one this process is not watching).
    pub async fn has_leftovers(&self) -> Result<bool, String> {
        let range = self.leftover_nonces().await?;
        let watching = self.watching.lock().unwrap_or_else(|p| p.into_inner());
        Ok(range.into_iter().any(|n| !watching.contains(&n)))
    }

    /// Cancels the transactions a previous run of tollgate left in the node's pool, once they
    /// have waited `replace_after` here too: each is replaced by an empty transfer to the
    /// relayer itself at the fee cap, so its nonce stops blocking every later transaction. The
    /// payments it carried are `unresolved` since the restart; once their nonces show unused,
    /// evidence submits them again. Returns how many were cancelled.
    pub async fn cancel_leftovers(&self) -> Result<usize, String> {
        let range = self.leftover_nonces().await?;
        let due: Vec<u64> = {
            let watching = self.watching.lock().unwrap_or_else(|p| p.into_inner());
            let mut leftovers = self.leftovers.lock().unwrap_or_else(|p| p.into_inner());
            leftovers.retain(|n, _| range.contains(n) && !watching.contains(n));
            for n in range.clone() {
                if !watching.contains(&n) {
                    leftovers.entry(n).or_insert_with(Instant::now);
                }
            }
            leftovers
                .iter()
                .filter(|(_, seen)| seen.elapsed() >= self.settings.replace_after)
                .map(|(n, _)| *n)
                .collect()
        };
        let mut cancelled = 0;
        for nonce in due {
            match self.cancel(nonce).await {
                Ok(hash) => {
                    tracing::warn!(%hash, nonce, "a transaction this process is not watching (sent before a restart, or given up on) blocked the relayer; cancelled it at the fee cap (its payments are settled again once the chain shows them unused)");
                    cancelled += 1;
                    // Watched again only if it is still there after another period.
                    self.leftovers
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(nonce, Instant::now());
                }
                Err(e) => {
                    tracing::warn!(nonce, error = %e, "cancelling a transaction left in the pool failed; trying again later");
                }
            }
        }
        Ok(cancelled)
    }

    /// Replaces whatever the pool holds at `nonce` by an empty transfer to the relayer itself
    /// at the fee cap.
    async fn cancel(&self, nonce: u64) -> Result<B256, String> {
        let cap = self.settings.max_fee_per_gas;
        let fees = Fees {
            max_fee: cap,
            tip: cap,
        };
        let (hash, raw) = self.sign(nonce, self.address(), &Bytes::new(), 21_000, fees)?;
        let _pending = self
            .provider
            .send_raw_transaction(&raw)
            .await
            .map_err(|e| short(&e))?;
        Ok(hash)
    }

    /// Sends a call to `to` and waits until it is mined under enough blocks.
    pub async fn submit(&self, to: Address, data: Bytes, gas_limit: u64) -> Result<Mined, TxError> {
        let mut fees = self.fees().await.map_err(TxError::NotSent)?;
        let (nonce, first) = self.send_new(to, &data, gas_limit, fees).await?;
        let _watching = Watching {
            relayer: self,
            nonce,
        };
        let mut sent = vec![first];
        // Since the last time the transaction was seen unmined: waiting for depth is not
        // being stuck.
        let mut unmined_since = Instant::now();
        let mut last_send = Instant::now();
        // The receipt seen last, to notice a reorganisation.
        let mut seen: Option<(B256, u64)> = None;
        loop {
            tokio::time::sleep(POLL).await;
            if unmined_since.elapsed() > GIVE_UP_AFTER {
                // Cancel it, so a payment whose buyer is told "unknown" is not settled much
                // later by a transaction nobody watches; evidence decides what it carried.
                let cancelled = self.cancel(nonce).await;
                return Err(TxError::Unknown(format!(
                    "transaction {} not mined after {} s ({})",
                    sent.last().map(|(h, _)| *h).unwrap_or_default(),
                    GIVE_UP_AFTER.as_secs(),
                    match cancelled {
                        Ok(hash) => format!("cancelled by {hash}"),
                        Err(e) => format!("cancelling it failed: {e}"),
                    }
                )));
            }
            match self.mined(&sent).await {
                Ok(Some(mined)) => {
                    unmined_since = Instant::now();
                    let latest = match self.provider.get_block_number().await {
                        Ok(n) => n,
                        Err(_) => continue,
                    };
                    seen = Some((mined.tx, mined.block));
                    if latest.saturating_add(1).saturating_sub(mined.block)
                        >= self.settings.confirmations
                        && self.canonical(&mined).await
                    {
                        return Ok(mined);
                    }
                    continue;
                }
                Ok(None) => {}
                Err(_) => continue, // the node is unreachable for now: keep watching
            }
            if let Some((tx, block)) = seen.take() {
                tracing::warn!(%tx, block, "a settlement transaction left the chain (reorganisation); sending it again");
                self.rebroadcast(&sent).await;
                last_send = Instant::now();
                continue;
            }
            if last_send.elapsed() >= self.settings.replace_after {
                last_send = Instant::now();
                match self.replace(nonce, to, &data, gas_limit, &mut fees).await {
                    Ok(Some(replacement)) => sent.push(replacement),
                    Ok(None) => self.rebroadcast(&sent).await,
                    Err(e) => {
                        tracing::warn!(nonce, error = %e, "replacing a stuck settlement transaction failed; still watching");
                    }
                }
            }
        }
    }

    /// The receipt of whichever of `sent` was mined.
    async fn mined(&self, sent: &[(B256, Bytes)]) -> Result<Option<Mined>, TransportError> {
        for (hash, _) in sent.iter().rev() {
            if let Some(receipt) = self.provider.get_transaction_receipt(*hash).await? {
                let Some(block) = receipt.block_number else {
                    continue;
                };
                return Ok(Some(Mined {
                    tx: *hash,
                    block,
                    gas_used: receipt.gas_used,
                    gas_price: receipt.effective_gas_price,
                    success: receipt.status(),
                    logs: receipt.inner.logs().to_vec(),
                }));
            }
        }
        Ok(None)
    }

    /// Whether the receipt's block is still the chain's block at that height.
    async fn canonical(&self, mined: &Mined) -> bool {
        let Ok(Some(receipt)) = self.provider.get_transaction_receipt(mined.tx).await else {
            return false;
        };
        let Ok(Some(block)) = self
            .provider
            .get_block_by_number(BlockNumberOrTag::Number(mined.block))
            .await
        else {
            return false;
        };
        receipt.block_hash == Some(block.header.hash)
    }

    /// Current fees under the cap, or why nothing should be sent now.
    async fn fees(&self) -> Result<Fees, String> {
        let block = self
            .provider
            .get_block_by_number(BlockNumberOrTag::Latest)
            .await
            .map_err(|e| format!("reading the latest block: {}", short(&e)))?
            .ok_or("the node has no latest block")?;
        let base = u128::from(block.header.base_fee_per_gas.unwrap_or(0));
        let tip = self
            .provider
            .get_max_priority_fee_per_gas()
            .await
            .unwrap_or(1_000_000);
        let cap = self.settings.max_fee_per_gas;
        if base >= cap {
            return Err(format!(
                "the base fee ({base} wei per gas) is at or above settlement.max_fee_per_gas ({cap} wei); settlement waits for it to fall"
            ));
        }
        let max_fee = base.saturating_mul(2).saturating_add(tip).min(cap);
        Ok(Fees {
            max_fee,
            tip: tip.min(max_fee),
        })
    }

    fn sign(
        &self,
        nonce: u64,
        to: Address,
        data: &Bytes,
        gas_limit: u64,
        fees: Fees,
    ) -> Result<(B256, Bytes), String> {
        let mut tx = TxEip1559 {
            chain_id: self.chain_id,
            nonce,
            gas_limit,
            max_fee_per_gas: fees.max_fee,
            max_priority_fee_per_gas: fees.tip,
            to: TxKind::Call(to),
            value: U256::ZERO,
            access_list: Default::default(),
            input: data.clone(),
        };
        let signature = self
            .signer
            .sign_transaction_sync(&mut tx)
            .map_err(|e| format!("signing the settlement transaction: {e}"))?;
        let signed = tx.into_signed(signature);
        let hash = *signed.hash();
        Ok((hash, TxEnvelope::from(signed).encoded_2718().into()))
    }

    /// Takes the next nonce and sends a new transaction with it.
    async fn send_new(
        &self,
        to: Address,
        data: &Bytes,
        gas_limit: u64,
        fees: Fees,
    ) -> Result<(u64, (B256, Bytes)), TxError> {
        let mut next = self.next_nonce.lock().await;
        for attempt in 0..2 {
            let pending = self
                .provider
                .get_transaction_count(self.address())
                .pending()
                .await
                .map_err(|e| {
                    TxError::NotSent(format!("reading the relayer's nonce: {}", short(&e)))
                })?;
            let nonce = {
                let mut watching = self.watching.lock().unwrap_or_else(|p| p.into_inner());
                let nonce = match *next {
                    // A nonce below ours that the node does not hold and nobody watches (the
                    // node forgot it, or it was given up on): every later transaction would wait
                    // behind it, so fill it first.
                    Some(n) if pending < n => {
                        (pending..n).find(|k| !watching.contains(k)).unwrap_or(n)
                    }
                    Some(n) => n.max(pending),
                    None => pending,
                };
                // Watched from before it is sent: never taken for a leftover.
                watching.insert(nonce);
                nonce
            };
            let unwatch = || {
                self.watching
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&nonce);
            };
            let (hash, raw) = match self.sign(nonce, to, data, gas_limit, fees) {
                Ok(signed) => signed,
                Err(e) => {
                    unwatch();
                    return Err(TxError::NotSent(e));
                }
            };
            let sent = match self.provider.send_raw_transaction(&raw).await {
                Ok(_) => Ok(()),
                Err(e) => Err(Sent::of(&e)),
            };
            match sent {
                // "already known": the node has it.
                Ok(()) | Err(Sent::AlreadyKnown) => {
                    *next = Some(next.map_or(nonce + 1, |n| n.max(nonce + 1)));
                    tracing::debug!(%hash, nonce, "settlement transaction sent");
                    return Ok((nonce, (hash, raw)));
                }
                Err(Sent::Refused(why)) => {
                    unwatch();
                    *next = None; // whatever the node holds, read it again
                    if attempt == 0 && why.to_ascii_lowercase().contains("nonce") {
                        continue; // a stale nonce: once more with the node's
                    }
                    return Err(TxError::NotSent(format!(
                        "the node refused the transaction: {why}"
                    )));
                }
                Err(Sent::Unreachable(why)) => {
                    unwatch();
                    return Err(TxError::NotSent(format!(
                        "the node cannot be reached: {why}"
                    )));
                }
                Err(Sent::Unknown(why)) => {
                    // It may be in the pool: unwatched, it is cancelled as a leftover after
                    // `replace_after`; evidence decides what it carried.
                    unwatch();
                    *next = None;
                    return Err(TxError::Unknown(format!(
                        "sending transaction {hash} (nonce {nonce}): {why}"
                    )));
                }
            }
        }
        Err(TxError::NotSent(
            "the node keeps refusing the relayer's nonce".into(),
        ))
    }

    /// A replacement with raised fees, or `None` when the fees are already at the cap.
    async fn replace(
        &self,
        nonce: u64,
        to: Address,
        data: &Bytes,
        gas_limit: u64,
        fees: &mut Fees,
    ) -> Result<Option<(B256, Bytes)>, String> {
        let cap = self.settings.max_fee_per_gas;
        if fees.max_fee >= cap {
            return Ok(None);
        }
        // Nodes accept a replacement that raises both fees by at least 10%.
        let raise = |v: u128| v.saturating_add(v / 4).saturating_add(1);
        let now = self.fees().await.unwrap_or(*fees);
        let bumped = Fees {
            max_fee: raise(fees.max_fee).max(now.max_fee).min(cap),
            tip: raise(fees.tip).max(now.tip),
        };
        let bumped = Fees {
            tip: bumped.tip.min(bumped.max_fee),
            ..bumped
        };
        // Under a 10% raise (the cap is near) no node takes it: as good as at the cap.
        if bumped.max_fee
            < fees
                .max_fee
                .saturating_add(fees.max_fee / 10)
                .saturating_add(1)
        {
            fees.max_fee = cap;
            return Ok(None);
        }
        let (hash, raw) = self.sign(nonce, to, data, gas_limit, bumped)?;
        match self.provider.send_raw_transaction(&raw).await {
            Ok(_) => {
                tracing::warn!(%hash, nonce, max_fee_per_gas = bumped.max_fee, "a settlement transaction was stuck; replaced with higher fees");
                *fees = bumped;
                Ok(Some((hash, raw)))
            }
            Err(e) => Err(short(&e)),
        }
    }

    /// Sends the transactions already signed again (after a reorganisation dropped them, or
    /// when a node forgot them). A node that already has one answers an error: harmless.
    async fn rebroadcast(&self, sent: &[(B256, Bytes)]) {
        for (hash, raw) in sent {
            if let Err(e) = self.provider.send_raw_transaction(raw).await {
                tracing::debug!(%hash, error = %short(&e), "rebroadcast not taken");
            }
        }
    }
}

/// Errors of `eth_sendRawTransaction` (geth, reth, anvil, hosted nodes) that prove the
/// transaction was refused, not taken: nothing of it can reach the chain.
const DEFINITE_REFUSALS: &[&str] = &[
    "nonce too low",
    "nonce too high",
    "underpriced",
    "insufficient funds",
    "intrinsic gas",
    "less than block base fee",
    "fee cap",
    "exceeds block gas limit",
    "gas limit reached",
    "invalid sender",
    "invalid signature",
    "invalid chain",
    "chain id",
    "tip higher than",
    "priority fee per gas higher",
];

/// What a failed `eth_sendRawTransaction` means.
enum Sent {
    /// The node holds it already.
    AlreadyKnown,
    /// The node refused it for a reason that proves it is not in its pool.
    Refused(String),
    /// No connection: nothing was sent.
    Unreachable(String),
    /// The request may have arrived.
    Unknown(String),
}

impl Sent {
    fn of(e: &TransportError) -> Sent {
        match e {
            RpcError::ErrorResp(payload) => {
                let message = payload.message.to_string();
                let m = message.to_ascii_lowercase();
                if ["already known", "known transaction", "already imported"]
                    .iter()
                    .any(|k| m.contains(k))
                {
                    Sent::AlreadyKnown
                } else if DEFINITE_REFUSALS.iter().any(|k| m.contains(k)) {
                    Sent::Refused(message)
                } else {
                    // "internal error", "timeout"…: a hosted node may have forwarded it.
                    Sent::Unknown(message)
                }
            }
            RpcError::Transport(TransportErrorKind::Custom(inner))
                if inner
                    .downcast_ref::<reqwest::Error>()
                    .is_some_and(reqwest::Error::is_connect) =>
            {
                Sent::Unreachable(short(e))
            }
            _ => Sent::Unknown(short(e)),
        }
    }
}

/// A transport error in one line, without the URL (it may carry an API key).
pub fn short(e: &TransportError) -> String {
    match e {
        RpcError::Transport(TransportErrorKind::Custom(inner)) => without_url(&inner.to_string()),
        other => without_url(other.to_string().lines().next().unwrap_or_default()),
    }
}

/// `error sending request for url (http://…)` without the parenthesis.
fn without_url(text: &str) -> String {
    match text.find(" for url (") {
        Some(start) => {
            let rest = text.get(start + " for url (".len()..).unwrap_or_default();
            let after = rest
                .find(')')
                .map_or("", |end| rest.get(end + 1..).unwrap_or_default());
            format!("{}{after}", text.get(..start).unwrap_or_default())
        }
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_what_may_be_a_key() {
        assert_eq!(redact_url("http://127.0.0.1:8545"), "http://127.0.0.1:8545");
        assert_eq!(
            redact_url("http://127.0.0.1:8545/"),
            "http://127.0.0.1:8545"
        );
        assert_eq!(
            redact_url("https://base-mainnet.g.alchemy.com/v2/SECRETKEY"),
            "https://base-mainnet.g.alchemy.com/…"
        );
        assert_eq!(
            redact_url("https://user:pass@node.example?key=SECRET"),
            "https://node.example/…"
        );
    }

    #[test]
    fn only_definite_refusals_mean_nothing_was_sent() {
        let refused = |m: &str| {
            DEFINITE_REFUSALS
                .iter()
                .any(|k| m.to_ascii_lowercase().contains(k))
        };
        assert!(refused("nonce too low"));
        assert!(refused("replacement transaction underpriced"));
        assert!(refused("insufficient funds for gas * price + value"));
        assert!(refused("max fee per gas less than block base fee"));
        assert!(!refused("internal error"));
        assert!(!refused("request timed out"));
        assert!(!refused("already known"));
    }
}
