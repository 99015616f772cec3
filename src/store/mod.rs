//! The embedded durable store: the only module that touches sled.
//!
//! It holds the replay-protection nonce set (here), prepaid accounts, API keys and the credit
//! ledger ([`accounts`]), the payment ledger and its settlement states ([`ledger`]: a payment's
//! entry is written in the same transaction as its nonce claim), and spend-limit counters. Every write that admits a request or moves
//! credits is flushed (fsync) before the caller goes on, so a crash right after it cannot
//! forget it. The flushes, and the debits, belong to one writer thread ([`writer`]), which
//! batches them (group commit).

pub mod accounts;
pub mod health;
pub mod ledger;
pub mod ledger_read;
pub mod sale;
mod spend;
mod writer;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use alloy::primitives::{Address, B256};

/// The sled directory, opened once per process. Clones share it.
#[derive(Clone)]
pub struct Store {
    // The writer thread holds its own `Trees`; dropping the last `Store` joins it, so the
    // directory is unlocked when the last `Store` is gone (a restart in the same process can
    // reopen it).
    trees: Arc<Trees>,
    writer: Arc<writer::Writer>,
    /// Set by the writer at the first flush that fails ([`health`]).
    health: Arc<health::Health>,
    dir: Arc<PathBuf>,
}

/// The database and its trees, shared by the store's handles and its writer thread.
struct Trees {
    db: sled::Db,
    nonces: sled::Tree,
    meta: sled::Tree,
    accounts: sled::Tree,
    balances: sled::Tree,
    keys: sled::Tree,
    key_hashes: sled::Tree,
    ledger: sled::Tree,
    account_ledger: sled::Tree,
    topup_refs: sled::Tree,
    idempotency: sled::Tree,
    refunds: sled::Tree,
    spend: sled::Tree,
    payments: sled::Tree,
    authorizations: sled::Tree,
    payment_facts: sled::Tree,
    payment_status: sled::Tree,
    open_payments: sled::Tree,
    bundles: sled::Tree,
}

/// One EIP-3009 authorization's identity: the token contract dedupes on (from, nonce), and the
/// chain and token make it global. Claimed with its payment's ledger entry
/// ([`Store::record_payment`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NonceKey {
    pub chain_id: u64,
    pub asset: Address,
    pub from: Address,
    pub nonce: B256,
}

impl NonceKey {
    fn bytes(&self) -> [u8; 80] {
        let mut out = [0u8; 80];
        let parts: [&[u8]; 4] = [
            &self.chain_id.to_be_bytes(),
            self.asset.as_slice(),
            self.from.as_slice(),
            self.nonce.as_slice(),
        ];
        let mut at = 0;
        for part in parts {
            if let Some(slot) = out.get_mut(at..at + part.len()) {
                slot.copy_from_slice(part);
            }
            at += part.len();
        }
        out
    }
}

/// A store failure: the caller fails closed (503).
#[derive(Debug)]
pub struct StoreError(pub(crate) String);

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "store error: {}", self.0)
    }
}

impl std::error::Error for StoreError {}

const IN_USE: &str = "it is in use by another process (a running sidecar holds its lock)";

impl StoreError {
    /// The store is locked by another process, most likely a running sidecar.
    pub fn in_use(&self) -> bool {
        self.0 == IN_USE
    }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError(health::describe(&e))
    }
}

/// sled's page cache. Its default (1 GiB) lets resident memory follow the store's size up to
/// that (the soak run: +67 MiB RSS for +56 MiB of store in 150 s), far past a sidecar's memory
/// limit; what is read after the cache is full comes from the OS page cache.
const CACHE_BYTES: u64 = 64 << 20;

/// How long past `validBefore` a used nonce is kept: covers clock skew between tollgate and
/// the chain. After that the token contract itself refuses the authorization as expired.
pub const NONCE_RETENTION_SECS: u64 = 3_600;

impl Store {
    /// Opens (or creates) the store directory.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(CACHE_BYTES)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                    StoreError(IN_USE.into())
                }
                e => e.into(),
            })?;
        let tree = |name: &str| db.open_tree(name);
        let trees = Arc::new(Trees {
            nonces: tree("nonces")?,
            meta: tree("meta")?,
            accounts: tree("accounts")?,
            balances: tree("balances")?,
            keys: tree("keys")?,
            key_hashes: tree("key_hashes")?,
            ledger: tree("ledger")?,
            account_ledger: tree("account_ledger")?,
            topup_refs: tree("topup_refs")?,
            idempotency: tree("idempotency")?,
            refunds: tree("refunds")?,
            spend: tree("spend")?,
            payments: tree("payments")?,
            authorizations: tree("authorizations")?,
            payment_facts: tree("payment_facts")?,
            payment_status: tree("payment_status")?,
            open_payments: tree("open_payments")?,
            bundles: tree("bundles")?,
            db,
        });
        let health = Arc::new(health::Health::default());
        let writer = writer::Writer::start(Arc::clone(&trees), Arc::clone(&health))?;
        Ok(Store {
            trees,
            writer: Arc::new(writer),
            health,
            dir: Arc::new(path.to_path_buf()),
        })
    }

    /// The first write that failed in this process, if one did: from then on every write
    /// fails until the store is opened anew ([`health`]).
    pub fn failure(&self) -> Option<health::Failure> {
        self.health.failure()
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Waits until every write made before this call is on disk.
    async fn durable(&self) -> Result<(), StoreError> {
        self.writer.flush().await
    }

    /// Deletes nonces whose authorization expired more than [`NONCE_RETENTION_SECS`] before
    /// `now`; returns how many. Safe at any time: an expired authorization is refused by
    /// verification before the nonce store is asked.
    pub fn forget_expired_nonces(&self, now: u64) -> Result<usize, StoreError> {
        let mut removed = 0;
        for entry in self.trees.nonces.iter() {
            let (key, value) = entry?;
            let valid_before = <[u8; 8]>::try_from(value.as_ref()).map_or(0, u64::from_be_bytes);
            if valid_before.saturating_add(NONCE_RETENTION_SECS) < now {
                self.trees.nonces.remove(key)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The time of the latest record in the books (payment entries, their facts, credit
    /// facts), 0 for an empty store: a lower bound on the real time ([`crate::clock`]).
    pub fn latest_time(&self) -> Result<u64, StoreError> {
        #[derive(serde::Deserialize)]
        struct At {
            at: u64,
        }
        let mut latest = 0;
        for tree in [
            &self.trees.payments,
            &self.trees.payment_facts,
            &self.trees.ledger,
        ] {
            if let Some((_, value)) = tree.last()? {
                // Each is keyed by an increasing sequence, so its last record is its latest.
                if let Ok(record) = serde_json::from_slice::<At>(&value) {
                    latest = latest.max(record.at);
                }
            }
        }
        Ok(latest)
    }

    /// Bytes the store takes on disk (0 when it cannot tell).
    pub fn size_on_disk(&self) -> u64 {
        self.trees.db.size_on_disk().unwrap_or(0)
    }

    /// Number of nonces held.
    pub fn nonce_count(&self) -> usize {
        self.trees.nonces.len()
    }

    /// Writes everything to disk (on shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.trees.db.flush()?;
        Ok(())
    }
}
