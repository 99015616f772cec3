//! Spend-limit counters: how much one buyer spent in one window, persisted so a restart does
//! not reset a daily cap.
//!
//! Tree `spend`: an opaque counter key (built by [`crate::limits`]) → amount (u128) ++ expiry
//! (u64), both big-endian. A reservation checks and adds in one atomic step, so concurrent
//! requests cannot together pass a cap; a request that is then not charged releases it. The
//! write becomes durable with the nonce claim or debit that follows it (same group commit);
//! a crash in between over-counts, which errs on the buyer's cap, never on the seller's money.

use super::{Store, StoreError};

fn decode(bytes: Option<&[u8]>) -> (u128, u64) {
    let Some(bytes) = bytes else { return (0, 0) };
    let amount = bytes
        .get(..16)
        .and_then(|b| <[u8; 16]>::try_from(b).ok())
        .map_or(0, u128::from_be_bytes);
    let expires = bytes
        .get(16..24)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_be_bytes);
    (amount, expires)
}

fn encode(amount: u128, expires_at: u64) -> Vec<u8> {
    let mut out = amount.to_be_bytes().to_vec();
    out.extend_from_slice(&expires_at.to_be_bytes());
    out
}

impl Store {
    /// Adds `amount` to the counter if the total stays within `max`; else changes nothing and
    /// answers `Err(spent so far)`.
    pub fn reserve_spend(
        &self,
        key: &[u8],
        amount: u128,
        max: u128,
        expires_at: u64,
    ) -> Result<Result<(), u128>, StoreError> {
        let mut outcome = Ok(());
        self.trees.spend.fetch_and_update(key, |old| {
            let (spent, _) = decode(old);
            match spent.checked_add(amount).filter(|total| *total <= max) {
                Some(total) => {
                    outcome = Ok(());
                    Some(encode(total, expires_at))
                }
                None => {
                    outcome = Err(spent);
                    old.map(<[u8]>::to_vec)
                }
            }
        })?;
        Ok(outcome)
    }

    /// Takes back a reservation whose request was not charged.
    pub fn release_spend(&self, key: &[u8], amount: u128) -> Result<(), StoreError> {
        self.trees.spend.fetch_and_update(key, |old| {
            let (spent, expires) = decode(old);
            old.map(|_| encode(spent.saturating_sub(amount), expires))
        })?;
        Ok(())
    }

    /// Deletes counters of windows that ended before `now`; returns how many.
    pub fn forget_expired_spend(&self, now: u64) -> Result<usize, StoreError> {
        let mut removed = 0;
        for entry in self.trees.spend.iter() {
            let (key, value) = entry?;
            if decode(Some(&value)).1 <= now {
                self.trees.spend.remove(key)?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}
