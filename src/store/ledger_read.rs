//! Reading the payment ledger as it is on disk, for the tools that check and page it
//! (`tollgate ledger verify`, `ledger bundles`).
//!
//! [`super::ledger`]'s readers stop at the first broken record: right for the sidecar, which
//! must fail closed. `verify` needs the opposite — every record, readable or not, with the key
//! it sits under — so these scans hand each record over as `Result<T, String>` (the decoding
//! error as text) beside its key, and fail only when sled itself does.

use serde::de::DeserializeOwned;

use super::accounts::u64_of;
use super::ledger::{Bundle, Entry, Fact, Status};
use super::{Store, StoreError};

/// A record as read: its key as a sequence number (`None` when the key is not 8 bytes) and the
/// record, or why it could not be decoded.
pub type Raw<T> = (Option<u64>, Result<T, String>);

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

/// Every record of `tree` from key `start` on, in key order, until `visit` says stop.
fn scan<T: DeserializeOwned>(
    tree: &sled::Tree,
    start: u64,
    mut visit: impl FnMut(Raw<T>) -> bool,
) -> Result<(), StoreError> {
    for item in tree.range(start.to_be_bytes()..) {
        let (key, bytes) = item?;
        if !visit((u64_of(&key), decode(&bytes))) {
            break;
        }
    }
    Ok(())
}

impl Store {
    /// Every entry as stored, in sequence order.
    pub fn scan_payments(&self, visit: impl FnMut(Raw<Entry>) -> bool) -> Result<(), StoreError> {
        scan(&self.trees.payments, 0, visit)
    }

    /// Every fact as stored, in sequence order.
    pub fn scan_payment_facts(
        &self,
        visit: impl FnMut(Raw<Fact>) -> bool,
    ) -> Result<(), StoreError> {
        scan(&self.trees.payment_facts, 0, visit)
    }

    /// Every status in the index, in entry order.
    pub fn scan_payment_statuses(
        &self,
        visit: impl FnMut(Raw<Status>) -> bool,
    ) -> Result<(), StoreError> {
        scan(&self.trees.payment_status, 0, visit)
    }

    /// Every bundle as stored, in id order.
    pub fn scan_bundles(&self, visit: impl FnMut(Raw<Bundle>) -> bool) -> Result<(), StoreError> {
        scan(&self.trees.bundles, 0, visit)
    }

    /// The keys of the `open_payments` index (`None` for a key that is not 8 bytes).
    pub fn open_payment_keys(&self) -> Result<Vec<Option<u64>>, StoreError> {
        self.trees
            .open_payments
            .iter()
            .keys()
            .map(|k| Ok(u64_of(&k?)))
            .collect()
    }

    /// Entry `seq` as stored, or why it cannot be read.
    pub fn payment_raw(&self, seq: u64) -> Result<Option<Result<Entry, String>>, StoreError> {
        Ok(self
            .trees
            .payments
            .get(seq.to_be_bytes())?
            .map(|b| decode(&b)))
    }

    /// Entry `seq`'s status in the index, or why it cannot be read.
    pub fn payment_status_raw(
        &self,
        seq: u64,
    ) -> Result<Option<Result<Status, String>>, StoreError> {
        Ok(self
            .trees
            .payment_status
            .get(seq.to_be_bytes())?
            .map(|b| decode(&b)))
    }

    /// Whether entry `seq` is in the `open_payments` index.
    pub fn payment_is_open(&self, seq: u64) -> Result<bool, StoreError> {
        Ok(self.trees.open_payments.contains_key(seq.to_be_bytes())?)
    }

    /// Bundles with an id above `after`, at most `limit`, oldest first; the second value
    /// continues the listing when there are more.
    pub fn bundles_page(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<Bundle>, Option<u64>), StoreError> {
        let mut page = Vec::new();
        let mut next = None;
        let mut failure = None;
        scan::<Bundle>(
            &self.trees.bundles,
            after.saturating_add(1),
            |(_, bundle)| {
                if page.len() == limit {
                    next = page.last().map(|b: &Bundle| b.id);
                    return false;
                }
                match bundle {
                    Ok(b) => {
                        page.push(b);
                        true
                    }
                    Err(e) => {
                        failure = Some(StoreError(format!("corrupt bundle record: {e}")));
                        false
                    }
                }
            },
        )?;
        match failure {
            Some(e) => Err(e),
            None => Ok((page, next)),
        }
    }

    /// The raw tree of the payment ledger named `name`, for tests that break a store on purpose.
    #[cfg(test)]
    pub(crate) fn ledger_tree_for_tests(&self, name: &str) -> Option<sled::Tree> {
        let t = &self.trees;
        Some(match name {
            "meta" => t.meta.clone(),
            "payments" => t.payments.clone(),
            "payment_facts" => t.payment_facts.clone(),
            "payment_status" => t.payment_status.clone(),
            "open_payments" => t.open_payments.clone(),
            "bundles" => t.bundles.clone(),
            "balances" => t.balances.clone(),
            _ => return None,
        })
    }
}

impl Store {
    /// The references of every credit top-up (`ledger verify` matches credit sales with them).
    pub fn topup_references(&self) -> Result<std::collections::HashSet<String>, StoreError> {
        let mut references = std::collections::HashSet::new();
        for item in self.trees.ledger.iter() {
            let (_, bytes) = item?;
            if let Ok(fact) = decode::<super::accounts::Fact>(&bytes)
                && fact.kind == super::accounts::FactKind::Topup
                && let Some(reference) = fact.reference
            {
                references.insert(reference);
            }
        }
        Ok(references)
    }
}
