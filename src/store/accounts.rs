//! Prepaid accounts: balances in credits, API keys, and the ledger of every credit movement.
//!
//! Trees (all keys big-endian so sled's order is numeric order):
//! - `meta`: counters for account ids and ledger sequence numbers (1, 2, 3, … without gaps).
//! - `accounts`: account id → [`Account`] (JSON).
//! - `balances`: account id → balance in credits (u128).
//! - `keys`: key id → [`KeyRecord`] (JSON); `key_hashes`: SHA-256 of the key → key id. The key
//!   itself is never stored: it is shown once, when issued.
//! - `ledger`: sequence number → [`Fact`] (JSON), append-only; `account_ledger`: account id ++
//!   sequence → () to page one account's history.
//! - `topup_refs`: account id ++ external reference → sequence of the top-up it made.
//! - `idempotency`: account id ++ `Idempotency-Key` → [`IdempotentDebit`] (JSON).
//! - `refunds`: debit sequence → refund sequence (a debit is refunded at most once).
//!
//! Every movement is one sled transaction over the balance, the ledger and its indexes, so for
//! every account `top-ups − debits + refunds == balance` holds after any crash ([`Store::audit`]
//! checks it). Every mutation is flushed before it returns, like a nonce claim.

use std::convert::Infallible;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};

use super::{Store, StoreError, Trees};

pub type AccountId = u64;

/// How long an `Idempotency-Key` is remembered after the debit it made.
pub const IDEMPOTENCY_RETENTION_SECS: u64 = 86_400;

/// Longest external reference or idempotency key accepted.
pub const MAX_REFERENCE_LEN: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub id: AccountId,
    pub name: String,
    pub created_at: u64,
}

/// An API key as stored: everything but the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// The key's visible identifier, also its first characters: `tg_3f9a1c2b7d0e`.
    pub id: String,
    /// Issue order across all keys: listings show keys oldest first.
    pub serial: u64,
    pub account: AccountId,
    pub label: String,
    pub created_at: u64,
    pub expires_at: Option<u64>,
    pub revoked_at: Option<u64>,
}

impl KeyRecord {
    /// Why the key cannot pay at `now`, if it cannot.
    pub fn problem(&self, now: u64) -> Option<KeyProblem> {
        if self.revoked_at.is_some() {
            Some(KeyProblem::Revoked)
        } else if self.expires_at.is_some_and(|at| at <= now) {
            Some(KeyProblem::Expired)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyProblem {
    Unknown,
    Revoked,
    Expired,
}

/// One credit movement. Facts are never edited: a refund is a new fact pointing at its debit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fact {
    pub seq: u64,
    pub at: u64,
    pub account: AccountId,
    pub kind: FactKind,
    #[serde(with = "crate::money::as_string")]
    pub credits: u128,
    /// The account's balance right after this fact.
    #[serde(with = "crate::money::as_string")]
    pub balance: u128,
    /// Top-ups: the external reference (payment id, invoice number, x402 transaction).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Debits: the request that spent the credits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Debits: `GET /v1/forecast/{city}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// Debits: the key id that paid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Refunds: the debit refunded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refund_of: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FactKind {
    Topup,
    Debit,
    Refund,
}

/// What a debit is asked to do.
#[derive(Debug, Clone)]
pub struct Charge {
    /// The paying key's id and account; the debit re-reads the key's record, so a key revoked
    /// since it was resolved does not pay.
    pub key_id: String,
    pub account: AccountId,
    pub credits: u128,
    pub request_id: String,
    pub route: String,
    /// The client's `Idempotency-Key` and what identifies its request (method and target):
    /// the same key on another request is refused rather than silently not charged.
    pub idempotency: Option<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Debit {
    /// Charged now.
    Charged(Fact),
    /// The balance does not cover the charge; nothing changed.
    Short { balance: u128 },
    /// An earlier request with the same `Idempotency-Key` was charged (and is in flight or was
    /// served); this one is not charged and must not be served.
    Repeated(Fact),
    /// The `Idempotency-Key` was used for a different request.
    KeyReused,
    /// The key was revoked or expired since it was resolved; nothing changed.
    KeyUnusable(KeyProblem),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct IdempotentDebit {
    debit: u64,
    request: String,
    expires_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopUp {
    /// Credited now.
    Credited(Fact),
    /// This reference already credited the account (same amount): nothing changed.
    Repeated(Fact),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopUpRefused {
    NoAccount,
    /// The reference was used for a different amount.
    ReferenceReused(Box<Fact>),
    /// The balance would exceed u128.
    Overflow,
}

/// An account whose balance disagrees with its ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Discrepancy {
    pub account: AccountId,
    #[serde(with = "crate::money::as_string")]
    pub balance: u128,
    /// top-ups − debits + refunds; negative sums are shown as 0 with `negative: true`.
    #[serde(with = "crate::money::as_string")]
    pub ledger: u128,
    pub negative: bool,
}

/// The totals [`Store::audit`] checked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Audit {
    pub accounts: u64,
    pub facts: u64,
    pub discrepancies: Vec<Discrepancy>,
}

/// A fresh API key: `tg_` and 64 hex digits (256 random bits).
fn new_secret() -> Result<String, StoreError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| StoreError(format!("no randomness for a new key: {e}")))?;
    Ok(format!("tg_{}", alloy::hex::encode(bytes)))
}

/// A new key for `account` 0 (the caller sets the account): the secret, its record, its hash.
pub(super) fn new_key(
    label: &str,
    now: u64,
    db: &sled::Db,
) -> Result<(String, KeyRecord, [u8; 32]), StoreError> {
    let secret = new_secret()?;
    let record = KeyRecord {
        id: key_id(&secret),
        serial: db.generate_id()?,
        account: 0,
        label: label.to_string(),
        created_at: now,
        expires_at: None,
        revoked_at: None,
    };
    let hash = key_hash(&secret);
    Ok((secret, record, hash))
}

/// The key id: its first 15 characters (`tg_` and 12 hex digits), enough to recognise it in
/// a list and useless to an attacker (48 of 256 bits).
fn key_id(secret: &str) -> String {
    secret.chars().take(15).collect()
}

fn key_hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

pub(super) fn pair(account: AccountId, rest: &[u8]) -> Vec<u8> {
    let mut key = account.to_be_bytes().to_vec();
    key.extend_from_slice(rest);
    key
}

pub(super) fn u128_of(bytes: Option<sled::IVec>) -> u128 {
    bytes
        .and_then(|b| <[u8; 16]>::try_from(b.as_ref()).ok())
        .map_or(0, u128::from_be_bytes)
}

pub(super) fn u64_of(bytes: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(bytes).ok().map(u64::from_be_bytes)
}

pub(super) fn json<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError(format!("cannot encode a record: {e}")))
}

pub(super) fn parse<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError(format!("corrupt record: {e}")))
}

/// What a transaction closure returns: a value, or an abort carrying a business answer `A`.
pub(super) type Tx<T, A> = Result<T, ConflictableTransactionError<Abort<A>>>;

/// Why a transaction stopped without writing: a business answer, or a broken record.
pub(super) enum Abort<A> {
    Answer(A),
    Store(StoreError),
}

/// Inside a transaction: a JSON record, or an abort carrying the decoding error.
pub(super) fn parse_tx<T: for<'de> Deserialize<'de>, A>(bytes: &[u8]) -> Tx<T, A> {
    parse(bytes).map_err(|e| ConflictableTransactionError::Abort(Abort::Store(e)))
}

pub(super) fn json_tx<T: Serialize, A>(value: &T) -> Tx<Vec<u8>, A> {
    json(value).map_err(|e| ConflictableTransactionError::Abort(Abort::Store(e)))
}

pub(super) fn answer<T, A>(a: A) -> Tx<T, A> {
    Err(ConflictableTransactionError::Abort(Abort::Answer(a)))
}

/// Splits a transaction's result into business answer and store failure.
pub(super) fn settle_tx<T, A>(
    result: Result<T, TransactionError<Abort<A>>>,
) -> Result<Result<T, A>, StoreError> {
    match result {
        Ok(value) => Ok(Ok(value)),
        Err(TransactionError::Abort(Abort::Answer(a))) => Ok(Err(a)),
        Err(TransactionError::Abort(Abort::Store(e))) => Err(e),
        Err(TransactionError::Storage(e)) => Err(e.into()),
    }
}

/// The next number of a counter kept in the `meta` tree: 1, 2, 3, … with no gap, also across
/// crashes (the counter commits with the record that uses it).
pub(super) fn next<A>(meta: &TransactionalTree, counter: &str) -> Tx<u64, A> {
    let last = meta.get(counter)?.and_then(|b| u64_of(&b)).unwrap_or(0);
    let next = last + 1;
    meta.insert(counter, &next.to_be_bytes())?;
    Ok(next)
}

/// Inside a transaction: what every credit movement writes — the balance, the ledger, its
/// per-account index, and the sequence counter in `meta`.
pub(super) struct Books<'a> {
    pub(super) meta: &'a TransactionalTree,
    pub(super) balances: &'a TransactionalTree,
    pub(super) ledger: &'a TransactionalTree,
    pub(super) index: &'a TransactionalTree,
}

/// Appends a fact to the ledger and the account's index; returns it with its sequence.
pub(super) fn append<A>(books: &Books<'_>, mut fact: Fact) -> Tx<Fact, A> {
    fact.seq = next(books.meta, "ledger")?;
    books
        .ledger
        .insert(&fact.seq.to_be_bytes(), json_tx(&fact)?)?;
    books
        .index
        .insert(pair(fact.account, &fact.seq.to_be_bytes()), &[])?;
    Ok(fact)
}

impl Fact {
    pub(super) fn new(
        account: AccountId,
        kind: FactKind,
        credits: u128,
        balance: u128,
        at: u64,
    ) -> Fact {
        Fact {
            seq: 0,
            at,
            account,
            kind,
            credits,
            balance,
            reference: None,
            request_id: None,
            route: None,
            key: None,
            idempotency_key: None,
            refund_of: None,
        }
    }
}

impl Store {
    /// Opens a new account with a zero balance.
    pub async fn create_account(&self, name: &str, now: u64) -> Result<Account, StoreError> {
        let i = &*self.trees;
        let result = (&i.meta, &i.accounts).transaction(|(meta, accounts)| {
            let account = Account {
                id: next(meta, "account")?,
                name: name.to_string(),
                created_at: now,
            };
            accounts.insert(&account.id.to_be_bytes(), json_tx(&account)?)?;
            Ok(account)
        });
        let account = settle_tx::<_, Infallible>(result)?.unwrap_or_else(|never| match never {});
        self.durable().await?;
        Ok(account)
    }

    /// An account and its balance.
    pub fn account(&self, id: AccountId) -> Result<Option<(Account, u128)>, StoreError> {
        let Some(bytes) = self.trees.accounts.get(id.to_be_bytes())? else {
            return Ok(None);
        };
        let balance = u128_of(self.trees.balances.get(id.to_be_bytes())?);
        Ok(Some((parse(&bytes)?, balance)))
    }

    /// Accounts with an id above `after`, at most `limit`, with their balances.
    pub fn accounts(
        &self,
        after: AccountId,
        limit: usize,
    ) -> Result<Vec<(Account, u128)>, StoreError> {
        let start = after.saturating_add(1).to_be_bytes();
        let mut page = Vec::new();
        for entry in self.trees.accounts.range(start..).take(limit) {
            let (id, bytes) = entry?;
            let balance = u128_of(self.trees.balances.get(&id)?);
            page.push((parse(&bytes)?, balance));
        }
        Ok(page)
    }

    /// Issues an API key for an account; returns the key (the only time it exists outside the
    /// caller) and its record. `None` when the account does not exist.
    pub async fn issue_key(
        &self,
        account: AccountId,
        label: &str,
        expires_at: Option<u64>,
        now: u64,
    ) -> Result<Option<(String, KeyRecord)>, StoreError> {
        if !self.trees.accounts.contains_key(account.to_be_bytes())? {
            return Ok(None);
        }
        loop {
            let secret = new_secret()?;
            let record = KeyRecord {
                id: key_id(&secret),
                serial: self.trees.db.generate_id()?,
                account,
                label: label.to_string(),
                created_at: now,
                expires_at,
                revoked_at: None,
            };
            let hash = key_hash(&secret);
            let keys = &self.trees.keys;
            let hashes = &self.trees.key_hashes;
            let inserted = (keys, hashes).transaction(|(keys, hashes)| {
                if keys.get(record.id.as_bytes())?.is_some() {
                    return answer(());
                }
                keys.insert(record.id.as_bytes(), json_tx(&record)?)?;
                hashes.insert(&hash, record.id.as_bytes())?;
                Ok(())
            });
            // A clash of 48-bit ids is astronomically rare; draw again.
            if settle_tx(inserted)?.is_err() {
                continue;
            }
            self.durable().await?;
            return Ok(Some((secret, record)));
        }
    }

    /// The key's record, if the key is one tollgate issued and it can pay at `now`.
    pub fn resolve_key(&self, secret: &str, now: u64) -> Result<KeyRecord, KeyLookup> {
        let id = self
            .trees
            .key_hashes
            .get(key_hash(secret))
            .map_err(|e| KeyLookup::Store(e.into()))?
            .ok_or(KeyLookup::Problem(KeyProblem::Unknown))?;
        let bytes = self
            .trees
            .keys
            .get(&id)
            .map_err(|e| KeyLookup::Store(e.into()))?
            .ok_or(KeyLookup::Problem(KeyProblem::Unknown))?;
        let record: KeyRecord = parse(&bytes).map_err(KeyLookup::Store)?;
        match record.problem(now) {
            Some(problem) => Err(KeyLookup::Problem(problem)),
            None => Ok(record),
        }
    }

    /// The keys of one account, oldest first.
    pub fn keys(&self, account: AccountId) -> Result<Vec<KeyRecord>, StoreError> {
        let mut keys = Vec::new();
        for entry in self.trees.keys.iter() {
            let record: KeyRecord = parse(&entry?.1)?;
            if record.account == account {
                keys.push(record);
            }
        }
        keys.sort_by_key(|k| k.serial);
        Ok(keys)
    }

    /// Revokes a key by its id; `None` when there is no such key. Revoking twice keeps the
    /// first revocation time.
    pub async fn revoke_key(&self, id: &str, now: u64) -> Result<Option<KeyRecord>, StoreError> {
        let mut revoked = None;
        self.trees.keys.fetch_and_update(id.as_bytes(), |old| {
            let mut record: KeyRecord = old.and_then(|b| serde_json::from_slice(b).ok())?;
            record.revoked_at.get_or_insert(now);
            let bytes = serde_json::to_vec(&record).ok();
            revoked = Some(record);
            bytes
        })?;
        self.durable().await?;
        Ok(revoked)
    }

    /// Credits an account, once per external reference: the same reference with the same
    /// amount answers the first top-up again; with another amount it is refused.
    pub async fn top_up(
        &self,
        account: AccountId,
        credits: u128,
        reference: &str,
        now: u64,
    ) -> Result<Result<TopUp, TopUpRefused>, StoreError> {
        let i = &*self.trees;
        let result = (
            &i.meta,
            &i.accounts,
            &i.balances,
            &i.ledger,
            &i.account_ledger,
            &i.topup_refs,
        )
            .transaction(|(meta, accounts, balances, ledger, index, refs)| {
                let id = account.to_be_bytes();
                if accounts.get(id)?.is_none() {
                    return answer(TopUpRefused::NoAccount);
                }
                let reference_key = pair(account, reference.as_bytes());
                if let Some(seq) = refs.get(&reference_key)? {
                    let earlier = ledger.get(seq)?;
                    let earlier: Fact = match earlier {
                        Some(bytes) => parse_tx(&bytes)?,
                        None => return answer(TopUpRefused::NoAccount),
                    };
                    if earlier.credits == credits {
                        return Ok(TopUp::Repeated(earlier));
                    }
                    return answer(TopUpRefused::ReferenceReused(Box::new(earlier)));
                }
                let Some(balance) = u128_of(balances.get(id)?).checked_add(credits) else {
                    return answer(TopUpRefused::Overflow);
                };
                balances.insert(&id, &balance.to_be_bytes())?;
                let mut fact = Fact::new(account, FactKind::Topup, credits, balance, now);
                fact.reference = Some(reference.to_string());
                let books = Books {
                    meta,
                    balances,
                    ledger,
                    index,
                };
                let fact = append(&books, fact)?;
                refs.insert(reference_key, &fact.seq.to_be_bytes())?;
                Ok(TopUp::Credited(fact))
            });
        let result = settle_tx(result)?;
        if matches!(result, Ok(TopUp::Credited(_))) {
            self.durable().await?;
        }
        Ok(result)
    }

    /// Debits a key's account, atomically: the balance never goes below zero, concurrent
    /// debits of one account never spend the same credits twice (sled transactions are
    /// serialisable), and a key revoked before the debit commits does not pay. Durable before
    /// it returns [`Debit::Charged`]; when the flush fails, the debit is taken back before the
    /// error is returned, so a refused request is never left charged. Concurrent debits share
    /// one transaction and one flush (the store's writer thread).
    pub async fn debit(&self, charge: Charge, now: u64) -> Result<Debit, StoreError> {
        self.writer.debit(charge, now).await
    }

    /// Gives a debit's credits back (the upstream failed). Idempotent: a debit is refunded at
    /// most once; `None` when it was already refunded or is not a debit. A refunded debit's
    /// `Idempotency-Key` is forgotten, so a retry is a new attempt (charged and served).
    pub async fn refund(&self, debit: u64, now: u64) -> Result<Option<Fact>, StoreError> {
        let refund = self.trees.refund(debit, now)?;
        if refund.is_some() {
            self.durable().await?;
        }
        Ok(refund)
    }

    /// One account's facts with a sequence above `after`, oldest first, at most `limit`.
    pub fn usage(
        &self,
        account: AccountId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Fact>, StoreError> {
        let from = pair(account, &after.saturating_add(1).to_be_bytes());
        let to = pair(account.saturating_add(1), &[]);
        let mut facts = Vec::new();
        for entry in self.trees.account_ledger.range(from..to).take(limit) {
            let (key, _) = entry?;
            let Some(seq) = key.get(8..).and_then(u64_of) else {
                continue;
            };
            if let Some(bytes) = self.trees.ledger.get(seq.to_be_bytes())? {
                facts.push(parse(&bytes)?);
            }
        }
        Ok(facts)
    }

    /// Checks, for every account, that top-ups − debits + refunds equals the balance.
    ///
    /// Safe while the sidecar writes, by construction rather than by retrying a racy read:
    /// - the credit ledger is append-only and numbered in commit order, so the facts up to the
    ///   last one present when the check starts are a complete, immutable prefix; for each
    ///   account, the running sum of its facts in that prefix must equal the balance each fact
    ///   records ("balance right after this fact");
    /// - the balance itself must equal the balance recorded by the account's latest fact — the
    ///   two are written in one transaction, so a read of both that a commit did not split
    ///   agrees; a disagreement is read again ([`Store::balance_matches_latest_fact`]) and
    ///   reported only when it persists.
    pub fn audit(&self) -> Result<Audit, StoreError> {
        #[derive(Default)]
        struct Books {
            sum: i128,
            /// The first fact whose recorded balance is not the running sum.
            broken: Option<u128>,
        }
        let mut books: std::collections::BTreeMap<AccountId, Books> = Default::default();
        let mut audit = Audit::default();
        let cut = match self.trees.ledger.last()? {
            Some((key, _)) => u64_of(&key).unwrap_or(u64::MAX),
            None => 0,
        };
        for entry in self.trees.ledger.range(..=cut.to_be_bytes()) {
            let fact: Fact = parse(&entry?.1)?;
            let credits = i128::try_from(fact.credits).unwrap_or(i128::MAX);
            let account = books.entry(fact.account).or_default();
            account.sum = match fact.kind {
                FactKind::Topup | FactKind::Refund => account.sum.saturating_add(credits),
                FactKind::Debit => account.sum.saturating_sub(credits),
            };
            if account.broken.is_none() && i128::try_from(fact.balance).ok() != Some(account.sum) {
                account.broken = Some(fact.balance);
            }
            audit.facts += 1;
        }
        for entry in self.trees.accounts.iter() {
            let (id, _) = entry?;
            let Some(account) = u64_of(&id) else {
                continue;
            };
            audit.accounts += 1;
            let (sum, broken) = books.get(&account).map_or((0, None), |b| (b.sum, b.broken));
            let discrepancy = |balance: u128| Discrepancy {
                account,
                balance,
                ledger: u128::try_from(sum).unwrap_or(0),
                negative: sum < 0,
            };
            if let Some(recorded) = broken {
                audit.discrepancies.push(discrepancy(recorded));
            } else if let Some(balance) = self.balance_matches_latest_fact(account)? {
                audit.discrepancies.push(discrepancy(balance));
            }
        }
        Ok(audit)
    }

    /// `None` when `account`'s balance equals the balance its latest fact recorded (0 without
    /// facts) in a read no commit split (the balance read before and after the fact agree);
    /// else the balance, once such reads keep disagreeing.
    fn balance_matches_latest_fact(&self, account: AccountId) -> Result<Option<u128>, StoreError> {
        const READS: u32 = 50;
        let id = account.to_be_bytes();
        let (from, to) = (pair(account, &[]), pair(account.saturating_add(1), &[]));
        let mut disagrees = None;
        for read in 0..READS {
            let before = u128_of(self.trees.balances.get(id)?);
            let latest = match self
                .trees
                .account_ledger
                .range(from.clone()..to.clone())
                .next_back()
            {
                Some(entry) => {
                    let (key, _) = entry?;
                    let seq = key.get(8..).and_then(u64_of).unwrap_or(0);
                    match self.trees.ledger.get(seq.to_be_bytes())? {
                        Some(bytes) => Some(parse::<Fact>(&bytes)?),
                        None => None,
                    }
                }
                None => None,
            };
            let after = u128_of(self.trees.balances.get(id)?);
            if before == after {
                let recorded = match &latest {
                    Some(fact) if fact.account == account => Some(fact.balance),
                    Some(_) => None, // filed under another account: never agrees
                    None => Some(0),
                };
                if recorded == Some(after) {
                    return Ok(None);
                }
                disagrees = Some(after);
            }
            if read >= 10 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        Ok(Some(disagrees.unwrap_or_else(|| {
            u128_of(self.trees.balances.get(id).ok().flatten())
        })))
    }

    /// Deletes `Idempotency-Key` records past their retention; returns how many.
    pub fn forget_expired_idempotency(&self, now: u64) -> Result<usize, StoreError> {
        let mut removed = 0;
        for entry in self.trees.idempotency.iter() {
            let (key, bytes) = entry?;
            // An unreadable record is left alone rather than stopping the sweep.
            let expired = parse::<IdempotentDebit>(&bytes).is_ok_and(|r| r.expires_at <= now);
            // Compare-and-swap: a debit that renewed this key meanwhile keeps its record.
            if expired
                && self
                    .trees
                    .idempotency
                    .compare_and_swap(&key, Some(&bytes), None::<&[u8]>)?
                    .is_ok()
            {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

impl Trees {
    /// Applies a batch of debits in order, in one transaction: a debit sees the balance the
    /// ones before it left. One answer per debit, in the same order. Not yet flushed.
    pub(super) fn debit_batch(&self, debits: &[(Charge, u64)]) -> Vec<Result<Debit, StoreError>> {
        if debits.is_empty() {
            return Vec::new();
        }
        match self.debit_all(debits) {
            Ok(done) => done.into_iter().map(Ok).collect(),
            // A record that cannot be read aborts the batch before anything is written; one at
            // a time, it refuses only its own debit.
            Err(BatchFailed::Record(_)) if debits.len() > 1 => debits
                .iter()
                .map(|debit| match self.debit_all(std::slice::from_ref(debit)) {
                    Ok(done) => done
                        .into_iter()
                        .next()
                        .ok_or_else(|| StoreError("a debit got no answer".into())),
                    Err(BatchFailed::Record(e) | BatchFailed::Storage(e)) => Err(e),
                })
                .collect(),
            // A storage failure may have stopped the commit half-way: never retried.
            Err(BatchFailed::Record(e) | BatchFailed::Storage(e)) => debits
                .iter()
                .map(|_| Err(StoreError(e.0.clone())))
                .collect(),
        }
    }

    fn debit_all(&self, debits: &[(Charge, u64)]) -> Result<Vec<Debit>, BatchFailed> {
        let result = (
            &self.meta,
            &self.balances,
            &self.ledger,
            &self.account_ledger,
            &self.idempotency,
            &self.keys,
        )
            .transaction(|(meta, balances, ledger, index, idempotency, keys)| {
                let books = Books {
                    meta,
                    balances,
                    ledger,
                    index,
                };
                debits
                    .iter()
                    .map(|(charge, now)| debit_one(&books, idempotency, keys, charge, *now))
                    .collect::<Tx<Vec<Debit>, Infallible>>()
            });
        match result {
            Ok(done) => Ok(done),
            Err(TransactionError::Abort(Abort::Store(e))) => Err(BatchFailed::Record(e)),
            Err(TransactionError::Abort(Abort::Answer(never))) => match never {},
            Err(TransactionError::Storage(e)) => Err(BatchFailed::Storage(e.into())),
        }
    }

    /// Refunds a debit (see [`Store::refund`]); not yet flushed.
    pub(super) fn refund(&self, debit: u64, now: u64) -> Result<Option<Fact>, StoreError> {
        let result = (
            &self.meta,
            &self.balances,
            &self.ledger,
            &self.account_ledger,
            &self.refunds,
            &self.idempotency,
        )
            .transaction(|(meta, balances, ledger, index, refunds, idempotency)| {
                if refunds.get(debit.to_be_bytes())?.is_some() {
                    return Ok(None);
                }
                let Some(bytes) = ledger.get(debit.to_be_bytes())? else {
                    return Ok(None);
                };
                let original: Fact = parse_tx(&bytes)?;
                if original.kind != FactKind::Debit {
                    return Ok(None);
                }
                let id = original.account.to_be_bytes();
                let balance = u128_of(balances.get(id)?).saturating_add(original.credits);
                balances.insert(&id, &balance.to_be_bytes())?;
                let mut fact = Fact::new(
                    original.account,
                    FactKind::Refund,
                    original.credits,
                    balance,
                    now,
                );
                fact.refund_of = Some(debit);
                fact.request_id = original.request_id.clone();
                fact.route = original.route.clone();
                fact.key = original.key.clone();
                let books = Books {
                    meta,
                    balances,
                    ledger,
                    index,
                };
                let fact = append(&books, fact)?;
                refunds.insert(&debit.to_be_bytes(), &fact.seq.to_be_bytes())?;
                if let Some(key) = &original.idempotency_key {
                    idempotency.remove(pair(original.account, key.as_bytes()))?;
                }
                Ok(Some(fact))
            });
        Ok(settle_tx::<_, Infallible>(result)?.unwrap_or_else(|never| match never {}))
    }
}

/// Why a batch of debits wrote nothing.
enum BatchFailed {
    /// A record could not be read: the transaction aborted before its commit.
    Record(StoreError),
    /// sled failed, possibly during the commit.
    Storage(StoreError),
}

/// One debit inside a batch's transaction.
fn debit_one<A>(
    books: &Books<'_>,
    idempotency: &TransactionalTree,
    keys: &TransactionalTree,
    charge: &Charge,
    now: u64,
) -> Tx<Debit, A> {
    let account = charge.account;
    let id = account.to_be_bytes();
    let current: KeyRecord = match keys.get(charge.key_id.as_bytes())? {
        Some(bytes) => parse_tx(&bytes)?,
        None => return Ok(Debit::KeyUnusable(KeyProblem::Unknown)),
    };
    if let Some(problem) = current.problem(now) {
        return Ok(Debit::KeyUnusable(problem));
    }
    let idem_key = charge
        .idempotency
        .as_ref()
        .map(|(key, _)| pair(account, key.as_bytes()));
    if let (Some(idem_key), Some((_, request))) = (&idem_key, &charge.idempotency)
        && let Some(bytes) = idempotency.get(idem_key)?
    {
        let earlier: IdempotentDebit = parse_tx(&bytes)?;
        if earlier.expires_at > now {
            if earlier.request != *request {
                return Ok(Debit::KeyReused);
            }
            if let Some(bytes) = books.ledger.get(earlier.debit.to_be_bytes())? {
                return Ok(Debit::Repeated(parse_tx(&bytes)?));
            }
        }
    }
    let balance = u128_of(books.balances.get(id)?);
    let Some(left) = balance.checked_sub(charge.credits) else {
        return Ok(Debit::Short { balance });
    };
    books.balances.insert(&id, &left.to_be_bytes())?;
    let mut fact = Fact::new(account, FactKind::Debit, charge.credits, left, now);
    fact.request_id = Some(charge.request_id.clone());
    fact.route = Some(charge.route.clone());
    fact.key = Some(charge.key_id.clone());
    fact.idempotency_key = charge.idempotency.as_ref().map(|(key, _)| key.clone());
    let fact = append(books, fact)?;
    if let (Some(idem_key), Some((_, request))) = (idem_key, &charge.idempotency) {
        let record = IdempotentDebit {
            debit: fact.seq,
            request: request.clone(),
            expires_at: now.saturating_add(IDEMPOTENCY_RETENTION_SECS),
        };
        idempotency.insert(idem_key, json_tx(&record)?)?;
    }
    Ok(Debit::Charged(fact))
}

/// Why [`Store::resolve_key`] found no usable key.
#[derive(Debug)]
pub enum KeyLookup {
    Problem(KeyProblem),
    Store(StoreError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store(name: &str) -> (Store, std::path::PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("tollgate-accounts-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        (Store::open(&dir).unwrap(), dir)
    }

    /// Account 1 of a fresh store, funded with `credits`, and a key for it.
    async fn funded_key(store: &Store, credits: u128) -> KeyRecord {
        store.create_account("", 1).await.unwrap();
        let (_, key) = store.issue_key(1, "", None, 1).await.unwrap().unwrap();
        store.top_up(1, credits, "seed", 1).await.unwrap().unwrap();
        key
    }

    fn charge(key: &KeyRecord, credits: u128, idem: Option<(&str, &str)>) -> Charge {
        Charge {
            key_id: key.id.clone(),
            account: key.account,
            credits,
            request_id: "req".into(),
            route: "GET /x".into(),
            idempotency: idem.map(|(key, request)| (key.into(), request.into())),
        }
    }

    #[tokio::test]
    async fn debits_top_ups_and_refunds_keep_the_ledger_equal_to_the_balance() {
        let (store, dir) = temp_store("ledger");
        let account = store.create_account("acme", 1).await.unwrap();
        assert_eq!(account.id, 1);
        assert_eq!(store.create_account("other", 1).await.unwrap().id, 2);
        let (secret, key) = store.issue_key(1, "", None, 1).await.unwrap().unwrap();
        assert_eq!(store.resolve_key(&secret, 2).unwrap(), key);
        assert!(store.issue_key(99, "", None, 1).await.unwrap().is_none());

        assert!(matches!(
            store.top_up(1, 10, "a", 2).await.unwrap(),
            Ok(TopUp::Credited(_))
        ));
        assert!(matches!(
            store.top_up(1, 10, "a", 3).await.unwrap(),
            Ok(TopUp::Repeated(_))
        ));
        assert!(matches!(
            store.top_up(1, 9, "a", 3).await.unwrap(),
            Err(TopUpRefused::ReferenceReused(_))
        ));
        assert_eq!(
            store.top_up(9, 1, "a", 3).await.unwrap(),
            Err(TopUpRefused::NoAccount)
        );

        let Debit::Charged(debit) = store.debit(charge(&key, 4, None), 4).await.unwrap() else {
            panic!("not charged")
        };
        assert_eq!(debit.balance, 6);
        assert_eq!(
            store.debit(charge(&key, 7, None), 4).await.unwrap(),
            Debit::Short { balance: 6 }
        );
        let refund = store.refund(debit.seq, 5).await.unwrap().unwrap();
        assert_eq!((refund.balance, refund.refund_of), (10, Some(debit.seq)));
        assert_eq!(
            store.refund(debit.seq, 5).await.unwrap(),
            None,
            "refunded once"
        );
        assert_eq!(
            store.refund(1, 5).await.unwrap(),
            None,
            "a top-up is not refundable"
        );

        let facts = store.usage(1, 0, 100).unwrap();
        let seqs: Vec<u64> = facts.iter().map(|f| f.seq).collect();
        assert_eq!(seqs, [1, 2, 3], "ledger sequence numbers have no gaps");
        drop(store);
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.account(1).unwrap().unwrap().1, 10);
        assert_eq!(store.audit().unwrap().discrepancies, []);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn an_idempotency_key_charges_once_per_request() {
        let (store, dir) = temp_store("idem");
        store.create_account("", 1).await.unwrap();
        let (_, key) = store.issue_key(1, "", None, 1).await.unwrap().unwrap();
        store.top_up(1, 10, "seed", 1).await.unwrap().unwrap();
        // A key revoked after it was resolved does not pay.
        let (_, doomed) = store.issue_key(1, "", None, 1).await.unwrap().unwrap();
        store.revoke_key(&doomed.id, 2).await.unwrap();
        assert_eq!(
            store.debit(charge(&doomed, 1, None), 2).await.unwrap(),
            Debit::KeyUnusable(KeyProblem::Revoked)
        );
        let first = store
            .debit(charge(&key, 3, Some(("k", "GET /a"))), 2)
            .await
            .unwrap();
        let Debit::Charged(fact) = first else {
            panic!("{first:?}")
        };
        assert_eq!(
            store
                .debit(charge(&key, 3, Some(("k", "GET /a"))), 3)
                .await
                .unwrap(),
            Debit::Repeated(fact.clone())
        );
        assert_eq!(
            store
                .debit(charge(&key, 3, Some(("k", "GET /b"))), 3)
                .await
                .unwrap(),
            Debit::KeyReused
        );
        let later = 2 + IDEMPOTENCY_RETENTION_SECS;
        assert_eq!(store.forget_expired_idempotency(later - 1).unwrap(), 0);
        assert!(matches!(
            store
                .debit(charge(&key, 3, Some(("k", "GET /b"))), later)
                .await
                .unwrap(),
            Debit::Charged(_)
        ));
        assert_eq!(
            store.forget_expired_idempotency(later).unwrap(),
            0,
            "renewed by the new debit"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The live `ledger verify` (admin API) audits while the sidecar writes: new accounts
    /// topped up, a busy account credited, debited and refunded (its balance returning to a
    /// value it had) during the check must not look like discrepancies (the soak found both).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_audit_while_accounts_are_written_reports_no_false_discrepancy() {
        let (store, dir) = temp_store("audit-live");
        let busy = store.create_account("busy", 1).await.unwrap().id;
        // A ledger long enough that one pass over it takes a while.
        for i in 0..1_000 {
            let topped = store
                .top_up(busy, 1, &format!("seed {i}"), 1)
                .await
                .unwrap();
            assert!(topped.is_ok());
        }
        let (_, key) = store.issue_key(busy, "", None, 1).await.unwrap().unwrap();
        let writer = {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..200 {
                    let sold = store.create_account("sale", 2).await.unwrap().id;
                    let topped = store.top_up(sold, 100, &format!("sale {i}"), 2).await;
                    assert!(topped.unwrap().is_ok());
                    let topped = store.top_up(busy, 1, &format!("more {i}"), 2).await;
                    assert!(topped.unwrap().is_ok());
                    // A debit and its refund: the balance comes back to where it was (A→B→A).
                    let Debit::Charged(debit) =
                        store.debit(charge(&key, 2, None), 2).await.unwrap()
                    else {
                        panic!("not charged")
                    };
                    assert!(store.refund(debit.seq, 2).await.unwrap().is_some());
                }
            })
        };
        let mut audits = 0;
        while !writer.is_finished() {
            let audit = tokio::task::block_in_place(|| store.audit()).unwrap();
            assert_eq!(audit.discrepancies, vec![], "audit {audits}");
            audits += 1;
        }
        writer.await.unwrap();
        assert!(audits > 0);
        let audit = store.audit().unwrap();
        assert_eq!((audit.accounts, audit.discrepancies), (201, vec![]));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_batch_applies_debits_in_order_and_isolates_a_broken_record() {
        let (store, dir) = temp_store("batch");
        for name in ["a", "b"] {
            store.create_account(name, 1).await.unwrap();
        }
        let (_, a) = store.issue_key(1, "", None, 1).await.unwrap().unwrap();
        let (_, b) = store.issue_key(2, "", None, 1).await.unwrap().unwrap();
        store.top_up(1, 5, "seed", 1).await.unwrap().unwrap();
        store.top_up(2, 5, "seed", 1).await.unwrap().unwrap();

        // In order: each debit sees the balance the ones before it left; the same
        // Idempotency-Key twice in one batch charges once.
        let batch = [
            (charge(&a, 3, Some(("k", "GET /a"))), 2),
            (charge(&a, 3, Some(("k", "GET /a"))), 2),
            (charge(&a, 3, None), 2),
            (charge(&a, 2, None), 2),
        ];
        let answers: Vec<Debit> = store
            .trees
            .debit_batch(&batch)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert!(matches!(&answers[0], Debit::Charged(f) if f.balance == 2));
        assert!(matches!(&answers[1], Debit::Repeated(f) if f.seq == 3));
        assert_eq!(answers[2], Debit::Short { balance: 2 });
        assert!(matches!(&answers[3], Debit::Charged(f) if f.balance == 0 && f.seq == 4));

        // A key record that cannot be read fails its own debit, not its neighbours': the batch
        // is thrown away and replayed one debit at a time, each applied exactly once.
        store.top_up(1, 10, "more", 3).await.unwrap().unwrap();
        store
            .trees
            .keys
            .insert(b.id.as_bytes(), &b"{broken"[..])
            .unwrap();
        let batch = [
            (charge(&a, 2, None), 3),
            (charge(&b, 1, None), 3),
            (charge(&a, 3, None), 3),
        ];
        let answers = store.trees.debit_batch(&batch);
        assert!(matches!(&answers[0], Ok(Debit::Charged(f)) if f.balance == 8));
        assert!(answers[1].is_err());
        assert!(matches!(&answers[2], Ok(Debit::Charged(f)) if f.balance == 5));
        assert_eq!(store.account(1).unwrap().unwrap().1, 5);
        assert_eq!(store.account(2).unwrap().unwrap().1, 5);
        assert_eq!(store.usage(1, 0, 100).unwrap().len(), 6);
        assert_eq!(store.audit().unwrap().discrepancies, vec![]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_debit_cancelled_in_flight_leaves_the_account_as_it_was() {
        let (store, dir) = temp_store("cancel");
        let key = funded_key(&store, 10).await;
        let mut answered = 0;
        for _ in 0..20 {
            // Polled once (queued), then dropped: the request is gone before its answer. (On a
            // busy machine the writer may answer within that poll: then it was charged.)
            let mut debit = std::pin::pin!(store.debit(charge(&key, 1, None), 2));
            tokio::select! {
                biased;
                done = &mut debit => {
                    assert!(matches!(done, Ok(Debit::Charged(_))));
                    answered += 1;
                }
                () = std::future::ready(()) => {}
            }
        }
        assert!(answered < 20, "no debit was ever cancelled in flight");
        store.durable().await.unwrap();
        assert_eq!(store.account(1).unwrap().unwrap().1, 10 - answered);
        assert_eq!(store.audit().unwrap().discrepancies, vec![]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_debits_never_overspend() {
        let (store, dir) = temp_store("race");
        let key = funded_key(&store, 100).await;
        let mut tasks = Vec::new();
        for _ in 0..300 {
            let (store, key) = (store.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                matches!(
                    store.debit(charge(&key, 1, None), 2).await.unwrap(),
                    Debit::Charged(_)
                )
            }));
        }
        let mut charged = 0;
        for task in tasks {
            charged += usize::from(task.await.unwrap());
        }
        assert_eq!(charged, 100);
        assert_eq!(store.account(1).unwrap().unwrap().1, 0);
        assert_eq!(
            store.audit().unwrap(),
            Audit {
                accounts: 1,
                facts: 101,
                discrepancies: vec![]
            }
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
