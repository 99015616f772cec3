//! The embedded durable store: the only module that touches sled.
//!
//! Today it holds the replay-protection nonce set; prepaid accounts and the settlement ledger
//! join it in later issues. Every write that admits a request is flushed (fsync) before the
//! caller goes on, so a crash right after admission cannot forget it. Concurrent flushes
//! share one fsync (sled's log makes everything up to the highest reserved position stable).

use std::fmt;
use std::path::Path;

use alloy::primitives::{Address, B256};

/// The sled directory, opened once per process.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    nonces: sled::Tree,
}

/// One EIP-3009 authorization's identity: the token contract dedupes on (from, nonce), and the
/// chain and token make it global.
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

/// The answer to a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// First use: recorded and durable.
    Fresh,
    /// Seen before.
    Used,
}

/// A store failure: the caller fails closed (503).
#[derive(Debug)]
pub struct StoreError(sled::Error);

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "store error: {}", self.0)
    }
}

impl std::error::Error for StoreError {}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError(e)
    }
}

/// How long past `validBefore` a used nonce is kept: covers clock skew between tollgate and
/// the chain. After that the token contract itself refuses the authorization as expired.
pub const NONCE_RETENTION_SECS: u64 = 3_600;

impl Store {
    /// Opens (or creates) the store directory.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = sled::Config::new().path(path).open()?;
        let nonces = db.open_tree("nonces")?;
        Ok(Store { db, nonces })
    }

    /// Records an authorization as used, atomically: of any number of concurrent claims of one
    /// key, exactly one gets [`Claim::Fresh`], and only after the record is on disk.
    /// `valid_before` is kept so [`Store::forget_expired_nonces`] can collect it later.
    pub async fn claim_nonce(
        &self,
        key: &NonceKey,
        valid_before: u64,
    ) -> Result<Claim, StoreError> {
        let swapped = self.nonces.compare_and_swap(
            key.bytes(),
            None::<&[u8]>,
            Some(&valid_before.to_be_bytes()[..]),
        )?;
        if swapped.is_err() {
            return Ok(Claim::Used);
        }
        self.db.flush_async().await?;
        Ok(Claim::Fresh)
    }

    /// Deletes nonces whose authorization expired more than [`NONCE_RETENTION_SECS`] before
    /// `now`; returns how many. Safe at any time: an expired authorization is refused by
    /// verification before the nonce store is asked.
    pub fn forget_expired_nonces(&self, now: u64) -> Result<usize, StoreError> {
        let mut removed = 0;
        for entry in self.nonces.iter() {
            let (key, value) = entry?;
            let valid_before = <[u8; 8]>::try_from(value.as_ref()).map_or(0, u64::from_be_bytes);
            if valid_before.saturating_add(NONCE_RETENTION_SECS) < now {
                self.nonces.remove(key)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Number of nonces held.
    pub fn nonce_count(&self) -> usize {
        self.nonces.len()
    }

    /// Writes everything to disk (on shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> NonceKey {
        NonceKey {
            chain_id: 84532,
            asset: Address::repeat_byte(1),
            from: Address::repeat_byte(2),
            nonce: B256::repeat_byte(n),
        }
    }

    fn temp_store(name: &str) -> (Store, std::path::PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("tollgate-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        (Store::open(&dir).unwrap(), dir)
    }

    #[tokio::test]
    async fn a_nonce_is_claimed_once_and_survives_reopening() -> Result<(), StoreError> {
        let (store, dir) = temp_store("claim");
        assert_eq!(store.claim_nonce(&key(1), 100).await?, Claim::Fresh);
        assert_eq!(store.claim_nonce(&key(1), 100).await?, Claim::Used);
        assert_eq!(store.claim_nonce(&key(2), 100).await?, Claim::Fresh);
        drop(store);
        let store = Store::open(&dir)?;
        assert_eq!(store.claim_nonce(&key(1), 100).await?, Claim::Used);
        assert_eq!(store.forget_expired_nonces(100 + NONCE_RETENTION_SECS)?, 0);
        assert_eq!(store.forget_expired_nonces(101 + NONCE_RETENTION_SECS)?, 2);
        assert_eq!(store.claim_nonce(&key(1), 100).await?, Claim::Fresh);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
