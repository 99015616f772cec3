//! The payment ledger: every x402 payment admitted, and every step of its settlement.
//!
//! An [`Entry`] is written once, in the same sled transaction (and so the same fsync) as the
//! nonce claim it belongs to: a payment is on the books before the upstream sees its request,
//! or it was never admitted. What happens to it afterwards is a [`Fact`]: a state change
//! appended to its own gap-free sequence, never an edit. The entry's current [`Status`] is an
//! index folded from its facts (`ledger verify` folds them again and compares).
//!
//! Trees (keys big-endian, so sled's order is numeric order):
//! - `payments`: entry seq → [`Entry`] (JSON), written once;
//! - `authorizations`: entry seq → [`Authorization`] (JSON): what the backend needs to settle
//!   the payment (the payload as the buyer signed it, the requirements it was verified
//!   against). Kept apart so listings and exports never carry a signature;
//! - `payment_facts`: fact seq → [`Fact`] (JSON), append-only;
//! - `payment_status`: entry seq → [`Status`] (JSON), the entry's facts folded;
//! - `open_payments`: entry seq → () while the entry's state is not final;
//! - `bundles`: bundle id → [`Bundle`] (JSON), written when the bundle is submitted;
//! - `meta` counters `payment`, `payment_fact`, `bundle`: 1, 2, 3, … without gaps.
//!
//! States: `recorded → queued → submitted → confirmed | failed`, with `refunded` (the payment
//! will not be collected: its request was not served) and `unresolved` (the backend may or may
//! not have settled it; only evidence decides). [`State::may_become`] is the whole machine.

use alloy::primitives::{Address, B256};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

use serde_json::Value;
use sled::Transactional;

use super::accounts::{Tx, answer, json, json_tx, next, parse, parse_tx, settle_tx};
use super::{NonceKey, Store, StoreError, Trees};

/// Where a payment's settlement stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Admitted and on the books; nothing asked of the backend yet.
    Recorded,
    /// Waiting for its deferred bundle.
    Queued,
    /// Handed to the backend; its answer is awaited.
    Submitted,
    /// Settled: the transfer is on chain.
    Confirmed,
    /// Will not settle (refused by the backend, expired, the payer's funds short).
    Failed,
    /// Not collected because its request was not served (upstream error, `refund on 5xx`).
    Refunded,
    /// The backend may or may not have settled it: decided only by evidence from the chain.
    Unresolved,
}

impl State {
    pub const ALL: [State; 7] = [
        State::Recorded,
        State::Queued,
        State::Submitted,
        State::Confirmed,
        State::Failed,
        State::Refunded,
        State::Unresolved,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Recorded => "recorded",
            State::Queued => "queued",
            State::Submitted => "submitted",
            State::Confirmed => "confirmed",
            State::Failed => "failed",
            State::Refunded => "refunded",
            State::Unresolved => "unresolved",
        }
    }

    pub fn parse(text: &str) -> Option<State> {
        State::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// No later fact changes a final state.
    pub fn is_final(self) -> bool {
        matches!(self, State::Confirmed | State::Failed | State::Refunded)
    }

    /// The state machine: the changes a fact may record. `submitted → queued` is only for a
    /// call that provably never left (the backend could not be reached); `unresolved →
    /// submitted` only when the chain shows the nonce unused (settlement tries again; the
    /// token's nonce check makes a second transfer impossible).
    pub fn may_become(self, next: State) -> bool {
        use State::*;
        matches!(
            (self, next),
            (
                Recorded,
                Queued | Submitted | Failed | Refunded | Unresolved
            ) | (Queued, Submitted | Failed | Refunded)
                | (Submitted, Confirmed | Failed | Unresolved | Queued)
                | (Unresolved, Confirmed | Failed | Submitted)
        )
    }
}

/// When the payment settles, as the policy said when it was admitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "timing")]
pub enum Timing {
    BeforeResponse,
    AfterResponse,
    /// In bundles closed by whichever comes first.
    Deferred {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        every_secs: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        payments: Option<u64>,
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            with = "crate::money::opt_as_string"
        )]
        value: Option<u128>,
    },
}

/// One x402 payment as admitted. Written once; never changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    /// Unix seconds when it was recorded.
    pub at: u64,
    pub request_id: String,
    pub service: String,
    /// `GET /v1/forecast/{city}`.
    pub route: String,
    pub method: String,
    pub path: String,
    /// The buyer: the authorization's `from`.
    #[serde(with = "text")]
    pub payer: Address,
    /// `x402` (credit sales are x402 payments whose route `sells` credits).
    pub rail: String,
    #[serde(with = "crate::money::as_string")]
    pub amount: u128,
    #[serde(with = "text")]
    pub asset: Address,
    /// `USDC`.
    pub symbol: String,
    pub decimals: u8,
    /// `base-sepolia`.
    pub network: String,
    pub chain_id: u64,
    #[serde(with = "text")]
    pub pay_to: Address,
    #[serde(with = "text")]
    pub nonce: B256,
    pub valid_after: u64,
    pub valid_before: u64,
    #[serde(flatten)]
    pub timing: Timing,
    /// The settlement backend, by its address (`https://x402.org/facilitator`).
    pub backend: String,
    /// Whether the payment counts against its buyer's `limit buyer unsettled` until it is
    /// final (a deferred payment on a route with that limit): what the settlement service
    /// releases at the end, and holds again after a restart.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unsettled_held: bool,
    /// Credits the payment bought, on a route that sells them.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::money::opt_as_string"
    )]
    pub credits: Option<u128>,
    /// On a route that sells credits: the account they go to, the buyer's key's (`Some`) or a
    /// new one (`None`) — what the settlement service needs to credit a sale whose buyer was
    /// cut off (a crash, an unknown outcome) once the chain shows it paid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sale_account: Option<u64>,
}

impl Entry {
    /// A deferred payment of `amount` by one payer, nonce `n`, recorded `at`: for tests.
    #[cfg(test)]
    pub(crate) fn sample(n: u8, amount: u128, at: u64) -> Entry {
        Entry {
            seq: 0,
            at,
            request_id: format!("req-{n}"),
            service: "weather".into(),
            route: "GET /v1/forecast/{city}".into(),
            method: "GET".into(),
            path: format!("/v1/forecast/{n}"),
            payer: Address::repeat_byte(2),
            rail: "x402".into(),
            amount,
            asset: Address::repeat_byte(1),
            symbol: "USDC".into(),
            decimals: 6,
            network: "base-sepolia".into(),
            chain_id: 84532,
            pay_to: Address::repeat_byte(9),
            nonce: B256::repeat_byte(n),
            valid_after: 0,
            valid_before: at + 60,
            timing: Timing::Deferred {
                every_secs: Some(60),
                payments: Some(10),
                value: None,
            },
            backend: "http://127.0.0.1:1".into(),
            unsettled_held: false,
            sale_account: None,
            credits: None,
        }
    }

    /// The top-up reference of the credits this payment bought (`x402:eip155:<chain>:<payer>:
    /// <nonce>`), on a route that sells them.
    pub fn sale_reference(&self) -> Option<String> {
        self.credits.map(|_| {
            format!(
                "x402:eip155:{}:{}:{}",
                self.chain_id,
                self.payer.to_checksum(None),
                self.nonce
            )
        })
    }
}

/// What a backend needs to settle a payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Authorization {
    /// The x402 protocol version of the payment (1 or 2).
    pub version: u8,
    /// The payment payload as the buyer sent it.
    pub payload: Value,
    /// The requirements it was verified against, in its version's shape.
    pub requirements: Value,
}

/// A state change of an entry. Facts are never edited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fact {
    pub seq: u64,
    /// The entry it is about.
    pub entry: u64,
    pub at: u64,
    pub state: State,
    #[serde(flatten)]
    pub detail: Detail,
}

/// What a fact says beside the state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Detail {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<u64>,
    /// Gas used by the whole transaction (`settle via rpc`; a bundle's payments share it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gas_used: Option<u64>,
    /// The upstream's status, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<u16>,
    /// Why: the backend's error, the evidence that resolved an unknown outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// An entry's facts folded: where it stands now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub state: State,
    /// When the entry reached this state.
    pub since: u64,
    /// The last fact about it.
    pub fact: u64,
    #[serde(flatten)]
    pub detail: Detail,
}

impl Status {
    /// The status after `fact`: a detail a fact does not repeat is kept.
    pub fn after(&self, fact: &Fact) -> Status {
        let d = &fact.detail;
        let old = &self.detail;
        Status {
            state: fact.state,
            since: if fact.state == self.state {
                self.since
            } else {
                fact.at
            },
            fact: fact.seq,
            detail: Detail {
                bundle: d.bundle.or(old.bundle),
                tx: d.tx.clone().or_else(|| old.tx.clone()),
                block: d.block.or(old.block),
                gas_used: d.gas_used.or(old.gas_used),
                upstream_status: d.upstream_status.or(old.upstream_status),
                // A reason belongs to its fact: a later state without one has none.
                reason: d.reason.clone(),
            },
        }
    }

    fn first(fact: &Fact) -> Status {
        Status {
            state: fact.state,
            since: fact.at,
            fact: fact.seq,
            detail: fact.detail.clone(),
        }
    }
}

/// A deferred bundle: the unit of accounting for the payments settled together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    pub id: u64,
    /// When it was submitted.
    pub at: u64,
    pub backend: String,
    pub network: String,
    #[serde(with = "text")]
    pub asset: Address,
    pub symbol: String,
    pub decimals: u8,
    #[serde(with = "text")]
    pub pay_to: Address,
    /// Entry sequence numbers, in order.
    pub entries: Vec<u64>,
    /// Sum of the entries' amounts.
    #[serde(with = "crate::money::as_string")]
    pub total: u128,
    /// What closed it: `count` (its payment count, or 1,000), `value`, `window`, `deadline`
    /// (the earliest `validBefore` minus the margin).
    pub closed_by: String,
}

/// The answer to recording a payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// First use of the authorization: entry `seq` is on disk.
    Fresh { seq: u64 },
    /// The authorization was used before: nothing written.
    Used,
}

/// Why a ledger transaction stopped without writing: the state machine refused a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Stop {
    Bad(BadTransition),
}

/// A state change refused by the state machine (a bug, or a second worker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadTransition {
    pub entry: u64,
    pub from: Option<State>,
    pub to: State,
}

/// An entry with its current status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    #[serde(flatten)]
    pub entry: Entry,
    pub status: Status,
}

/// Which entries a listing or export wants. Every field narrows; `None` is "any".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// Recorded at or after (unix seconds).
    pub from: Option<u64>,
    /// Recorded before (unix seconds).
    pub to: Option<u64>,
    pub buyer: Option<Address>,
    pub route: Option<String>,
    pub state: Option<State>,
    pub bundle: Option<u64>,
    /// Entries after this sequence number (the previous page's `next`).
    pub after: Option<u64>,
}

impl Query {
    fn wants(&self, row: &Row) -> bool {
        let e = &row.entry;
        self.from.is_none_or(|from| e.at >= from)
            && self.to.is_none_or(|to| e.at < to)
            && self.buyer.is_none_or(|b| e.payer == b)
            && self.route.as_ref().is_none_or(|r| &e.route == r)
            && self.state.is_none_or(|s| row.status.state == s)
            && self
                .bundle
                .is_none_or(|b| row.status.detail.bundle == Some(b))
    }
}

/// One page of a listing; `next` continues it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    pub entries: Vec<Row>,
    pub next: Option<u64>,
}

/// Inside a transaction: the trees every fact writes.
pub(super) struct Books<'a> {
    meta: &'a sled::transaction::TransactionalTree,
    facts: &'a sled::transaction::TransactionalTree,
    status: &'a sled::transaction::TransactionalTree,
    open: &'a sled::transaction::TransactionalTree,
}

/// Appends a fact, checking the state machine, and folds it into the status index.
fn append_fact(
    books: &Books<'_>,
    entry: u64,
    state: State,
    detail: Detail,
    at: u64,
) -> Tx<Fact, Stop> {
    let Books {
        meta,
        facts,
        status,
        open,
    } = books;
    let key = entry.to_be_bytes();
    let current: Option<Status> = match status.get(key)? {
        Some(bytes) => Some(parse_tx(&bytes)?),
        None => None,
    };
    let allowed = match &current {
        None => state == State::Recorded,
        Some(now) => now.state.may_become(state),
    };
    if !allowed {
        return answer(Stop::Bad(BadTransition {
            entry,
            from: current.map(|s| s.state),
            to: state,
        }));
    }
    let fact = Fact {
        seq: next(meta, "payment_fact")?,
        entry,
        at,
        state,
        detail,
    };
    facts.insert(&fact.seq.to_be_bytes(), json_tx(&fact)?)?;
    let folded = match &current {
        Some(now) => now.after(&fact),
        None => Status::first(&fact),
    };
    status.insert(&key, json_tx(&folded)?)?;
    if state.is_final() {
        open.remove(&key)?;
    } else {
        open.insert(&key, &[])?;
    }
    Ok(fact)
}

/// A payment on its way to the writer thread.
#[derive(Debug, Clone)]
pub(super) struct PaymentRecord {
    pub(super) key: NonceKey,
    pub(super) entry: Entry,
    /// The [`Authorization`] as JSON.
    pub(super) authorization: Vec<u8>,
}

/// One caller's changes on their way to the writer thread.
#[derive(Debug, Clone)]
pub(super) struct ChangeSet {
    pub(super) changes: Vec<Change>,
    pub(super) now: u64,
}

/// What a writer batch answers each record and each change set.
pub(super) type BatchAnswers = (
    Vec<Result<Recorded, StoreError>>,
    Vec<Result<Result<Vec<Fact>, BadTransition>, StoreError>>,
);

impl Trees {
    /// Applies a writer batch in one transaction: every record (nonce claim, entry,
    /// authorization, `recorded` fact) and every change set (all of a set or none of it). A
    /// record whose nonce is used — before or earlier in the batch — is [`Recorded::Used`].
    pub(super) fn ledger_batch(
        &self,
        records: &[PaymentRecord],
        sets: &[ChangeSet],
    ) -> BatchAnswers {
        let result = (
            &self.nonces,
            &self.meta,
            &self.payments,
            &self.authorizations,
            &self.payment_facts,
            &self.payment_status,
            &self.open_payments,
        )
            .transaction(|(nonces, meta, payments, auths, facts, status, open)| {
                let books = Books {
                    meta,
                    facts,
                    status,
                    open,
                };
                let mut recorded = Vec::with_capacity(records.len());
                for record in records {
                    let nonce = record.key.bytes();
                    if nonces.get(nonce)?.is_some() {
                        recorded.push(Recorded::Used);
                        continue;
                    }
                    nonces.insert(&nonce[..], &record.entry.valid_before.to_be_bytes())?;
                    let mut entry = record.entry.clone();
                    entry.seq = next(meta, "payment")?;
                    payments.insert(&entry.seq.to_be_bytes(), json_tx(&entry)?)?;
                    auths.insert(&entry.seq.to_be_bytes(), record.authorization.as_slice())?;
                    append_fact(
                        &books,
                        entry.seq,
                        State::Recorded,
                        Detail::default(),
                        entry.at,
                    )?;
                    recorded.push(Recorded::Fresh { seq: entry.seq });
                }
                let mut changed = Vec::with_capacity(sets.len());
                for set in sets {
                    changed.push(apply_set(&books, set)?);
                }
                Ok((recorded, changed))
            });
        match settle_tx::<_, Stop>(result) {
            Ok(Ok((recorded, changed))) => (
                recorded.into_iter().map(Ok).collect(),
                changed.into_iter().map(Ok).collect(),
            ),
            Ok(Err(stop)) => {
                let why = format!("the ledger batch stopped: {stop:?}");
                (
                    records
                        .iter()
                        .map(|_| Err(StoreError(why.clone())))
                        .collect(),
                    sets.iter().map(|_| Err(StoreError(why.clone()))).collect(),
                )
            }
            Err(e) => (
                records
                    .iter()
                    .map(|_| Err(StoreError(e.0.clone())))
                    .collect(),
                sets.iter().map(|_| Err(StoreError(e.0.clone()))).collect(),
            ),
        }
    }
}

/// Applies one change set inside a batch: all of it, or — when the state machine refuses one
/// change — none of it, answered with the refusal.
fn apply_set(books: &Books<'_>, set: &ChangeSet) -> Tx<Result<Vec<Fact>, BadTransition>, Stop> {
    // Check the whole set first, following the states it moves through.
    let mut states: HashMap<u64, Option<State>> = HashMap::new();
    for change in &set.changes {
        let from = match states.get(&change.entry) {
            Some(state) => *state,
            None => match books.status.get(change.entry.to_be_bytes())? {
                Some(bytes) => Some(parse_tx::<Status, Stop>(&bytes)?.state),
                None => None,
            },
        };
        if !from.is_some_and(|f| f.may_become(change.state)) {
            return Ok(Err(BadTransition {
                entry: change.entry,
                from,
                to: change.state,
            }));
        }
        states.insert(change.entry, Some(change.state));
    }
    let mut written = Vec::with_capacity(set.changes.len());
    for change in &set.changes {
        written.push(append_fact(
            books,
            change.entry,
            change.state,
            change.detail.clone(),
            set.now,
        )?);
    }
    Ok(Ok(written))
}

/// How far an entry's time may run ahead of a later-numbered entry's: time ranges are searched
/// and cut with this margin, then filtered exactly.
pub const RECORD_SKEW_SECS: u64 = 60;

/// What one transaction of changes wrote: its facts, and the bundle it submitted.
type Applied = (Vec<Fact>, Option<Bundle>);

/// A change to record: which entry, to what, with what detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub entry: u64,
    pub state: State,
    pub detail: Detail,
}

impl Store {
    /// Claims the authorization's nonce and records its payment in one transaction, then waits
    /// until both are on disk. The writer thread applies every record queued meanwhile in one
    /// transaction and one fsync (group commit). Of any number of concurrent attempts with one
    /// nonce, exactly one is [`Recorded::Fresh`].
    pub async fn record_payment(
        &self,
        key: &NonceKey,
        entry: Entry,
        authorization: &Authorization,
    ) -> Result<Recorded, StoreError> {
        let record = PaymentRecord {
            key: *key,
            entry,
            authorization: json(authorization)?,
        };
        self.writer.record(record).await
    }

    /// Records state changes in one transaction (a change the state machine refuses leaves the
    /// others of this call unwritten); with `durable`, answers once they are on disk. Changes
    /// from concurrent callers share the writer's transaction and fsync.
    pub async fn record_changes(
        &self,
        changes: &[Change],
        now: u64,
        durable: bool,
    ) -> Result<Result<Vec<Fact>, BadTransition>, StoreError> {
        self.writer.change(changes.to_vec(), now, durable).await
    }

    /// Submits a bundle: every entry becomes `submitted` with the bundle's id, and the bundle
    /// is written, in one transaction, on disk before this returns (so a crash after it finds
    /// the entries submitted, and resolves them by evidence rather than submitting again).
    pub async fn submit_bundle(
        &self,
        mut bundle: Bundle,
        now: u64,
    ) -> Result<Result<Bundle, BadTransition>, StoreError> {
        let changes: Vec<Change> = bundle
            .entries
            .iter()
            .map(|&entry| Change {
                entry,
                state: State::Submitted,
                detail: Detail::default(),
            })
            .collect();
        bundle.at = now;
        let (_, bundle) = match self.apply_changes(&changes, Some(bundle), now)? {
            Ok(done) => done,
            Err(bad) => return Ok(Err(bad)),
        };
        self.durable().await?;
        bundle
            .map(Ok)
            .ok_or_else(|| StoreError("a submitted bundle was not written".into()))
    }

    fn apply_changes(
        &self,
        changes: &[Change],
        bundle: Option<Bundle>,
        now: u64,
    ) -> Result<Result<Applied, BadTransition>, StoreError> {
        let t = &self.trees;
        let result = (
            &t.meta,
            &t.payment_facts,
            &t.payment_status,
            &t.open_payments,
            &t.bundles,
        )
            .transaction(|(meta, facts, status, open, bundles)| {
                let mut bundle = bundle.clone();
                if let Some(b) = bundle.as_mut() {
                    b.id = next(meta, "bundle")?;
                    bundles.insert(&b.id.to_be_bytes(), json_tx(b)?)?;
                }
                let books = Books {
                    meta,
                    facts,
                    status,
                    open,
                };
                let mut written = Vec::with_capacity(changes.len());
                for change in changes {
                    let mut detail = change.detail.clone();
                    if let Some(b) = &bundle {
                        detail.bundle = Some(b.id);
                    }
                    written.push(append_fact(
                        &books,
                        change.entry,
                        change.state,
                        detail,
                        now,
                    )?);
                }
                Ok((written, bundle))
            });
        Ok(match settle_tx(result)? {
            Ok(done) => Ok(done),
            Err(Stop::Bad(bad)) => Err(bad),
        })
    }

    /// The entry with this sequence number, and where it stands.
    pub fn payment(&self, seq: u64) -> Result<Option<Row>, StoreError> {
        let t = &self.trees;
        let Some(entry) = t.payments.get(seq.to_be_bytes())? else {
            return Ok(None);
        };
        let entry: Entry = parse(&entry)?;
        Ok(Some(Row {
            status: self.status_of(seq)?,
            entry,
        }))
    }

    fn status_of(&self, seq: u64) -> Result<Status, StoreError> {
        match self.trees.payment_status.get(seq.to_be_bytes())? {
            Some(bytes) => parse(&bytes),
            None => Err(StoreError(format!("payment {seq} has no status"))),
        }
    }

    /// What a backend needs to settle entry `seq`.
    pub fn authorization(&self, seq: u64) -> Result<Option<Authorization>, StoreError> {
        match self.trees.authorizations.get(seq.to_be_bytes())? {
            Some(bytes) => parse(&bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Every entry whose state is not final, oldest first.
    pub fn open_payments(&self) -> Result<Vec<Row>, StoreError> {
        let mut rows = Vec::new();
        for key in self.trees.open_payments.iter().keys() {
            let key = key?;
            let seq = super::accounts::u64_of(&key)
                .ok_or_else(|| StoreError("corrupt open-payment key".into()))?;
            if let Some(row) = self.payment(seq)? {
                rows.push(row);
            }
        }
        Ok(rows)
    }

    /// Entries matching `query`, at most `limit`, in sequence order.
    pub fn payments(&self, query: &Query, limit: usize) -> Result<Page, StoreError> {
        let mut entries = Vec::new();
        let mut next = None;
        self.each_payment(query, |row| {
            if entries.len() == limit {
                next = entries.last().map(|r: &Row| r.entry.seq);
                return false;
            }
            entries.push(row);
            true
        })?;
        Ok(Page { entries, next })
    }

    /// Calls `visit` with every entry matching `query`, in sequence order, until it says stop.
    pub fn each_payment(
        &self,
        query: &Query,
        mut visit: impl FnMut(Row) -> bool,
    ) -> Result<(), StoreError> {
        let mut start = query.after.map_or(1, |a| a.saturating_add(1));
        if let Some(from) = query.from {
            start = start.max(self.first_recorded_since(from.saturating_sub(RECORD_SKEW_SECS))?);
        }
        let stop = query.to.map(|to| to.saturating_add(RECORD_SKEW_SECS));
        for item in self.trees.payments.range(start.to_be_bytes()..) {
            let (key, bytes) = item?;
            let entry: Entry = parse(&bytes)?;
            if stop.is_some_and(|stop| entry.at >= stop) {
                break;
            }
            let seq = super::accounts::u64_of(&key).unwrap_or(entry.seq);
            let row = Row {
                status: self.status_of(seq)?,
                entry,
            };
            if query.wants(&row) && !visit(row) {
                break;
            }
        }
        Ok(())
    }

    /// The first entry recorded at or after `since`, by binary search: entries are numbered in
    /// the order they were written, and their times follow that order to within
    /// [`RECORD_SKEW_SECS`] (a time is taken when the payment is admitted, its number when the
    /// writer records it).
    fn first_recorded_since(&self, since: u64) -> Result<u64, StoreError> {
        let (last, _, _) = self.payment_counts()?;
        let (mut lo, mut hi) = (1u64, last.saturating_add(1));
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let at = match self.trees.payments.get(mid.to_be_bytes())? {
                Some(bytes) => parse::<Entry>(&bytes)?.at,
                None => return Ok(1), // a gap: scan from the start (verify reports it)
            };
            if at < since {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }

    /// The facts of one entry, in order.
    pub fn facts_of(&self, entry: u64) -> Result<Vec<Fact>, StoreError> {
        let mut facts = Vec::new();
        // An entry's facts lie between its `recorded` fact — whose sequence number is at least
        // the entry's, since every entry has one — and the last fact its status names.
        let last = match self.trees.payment_status.get(entry.to_be_bytes())? {
            Some(bytes) => parse::<Status>(&bytes)?.fact,
            None => return Ok(facts),
        };
        let range = entry.to_be_bytes()..=last.to_be_bytes();
        for item in self.trees.payment_facts.range(range) {
            let (_, bytes) = item?;
            let fact: Fact = parse(&bytes)?;
            if fact.entry == entry {
                facts.push(fact);
            }
        }
        Ok(facts)
    }

    /// The bundle with this id.
    pub fn bundle(&self, id: u64) -> Result<Option<Bundle>, StoreError> {
        match self.trees.bundles.get(id.to_be_bytes())? {
            Some(bytes) => parse(&bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Counters of the payment ledger: entries, facts, bundles.
    ///
    /// Read one by one while the sidecar may write, facts last: a bundle or an entry is
    /// written in one transaction with its facts, so every bundle and entry counted has its
    /// facts counted too (a fact counted may belong to a newer entry or bundle).
    pub fn payment_counts(&self) -> Result<(u64, u64, u64), StoreError> {
        let read = |name: &str| -> Result<u64, StoreError> {
            Ok(self
                .trees
                .meta
                .get(name)?
                .and_then(|b| super::accounts::u64_of(&b))
                .unwrap_or(0))
        };
        let (bundles, entries) = (read("bundle")?, read("payment")?);
        Ok((entries, read("payment_fact")?, bundles))
    }
}

/// Serde for addresses and hashes as their hex text (`0x…`, addresses checksummed).
mod text {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<T: Display, S: Serializer>(
        value: &T,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_str(value)
    }

    pub fn deserialize<'de, T, D>(deserializer: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NONCE_RETENTION_SECS;

    fn temp_store(name: &str) -> (Store, std::path::PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("tollgate-ledger-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        (Store::open(&dir).unwrap(), dir)
    }

    fn key(n: u8) -> NonceKey {
        NonceKey {
            chain_id: 84532,
            asset: Address::repeat_byte(1),
            from: Address::repeat_byte(2),
            nonce: B256::repeat_byte(n),
        }
    }

    fn auth() -> Authorization {
        Authorization {
            version: 2,
            payload: serde_json::json!({"x402Version": 2}),
            requirements: serde_json::json!({"scheme": "exact"}),
        }
    }

    fn change(entry: u64, state: State) -> Change {
        Change {
            entry,
            state,
            detail: Detail::default(),
        }
    }

    #[tokio::test]
    async fn a_payment_is_recorded_once_with_its_nonce_and_survives_reopening() {
        let (store, dir) = temp_store("once");
        let first = store
            .record_payment(&key(1), Entry::sample(1, 1000, 100), &auth())
            .await;
        assert_eq!(first.unwrap(), Recorded::Fresh { seq: 1 });
        let again = store
            .record_payment(&key(1), Entry::sample(1, 1000, 100), &auth())
            .await;
        assert_eq!(again.unwrap(), Recorded::Used);
        let other = store
            .record_payment(&key(2), Entry::sample(2, 1000, 100), &auth())
            .await;
        assert_eq!(other.unwrap(), Recorded::Fresh { seq: 2 });
        drop(store);

        let store = Store::open(&dir).unwrap();
        let again = store
            .record_payment(&key(1), Entry::sample(1, 1000, 100), &auth())
            .await;
        assert_eq!(
            again.unwrap(),
            Recorded::Used,
            "a restart forgot a used nonce"
        );
        let row = store.payment(1).unwrap().unwrap();
        assert_eq!(row.entry.request_id, "req-1");
        assert_eq!(row.status.state, State::Recorded);
        assert_eq!(store.authorization(1).unwrap(), Some(auth()));
        assert_eq!(store.payment_counts().unwrap(), (2, 2, 0));
        // The nonce outlives its authorization by the retention, then may be forgotten.
        assert_eq!(
            store
                .forget_expired_nonces(160 + NONCE_RETENTION_SECS)
                .unwrap(),
            0
        );
        assert_eq!(
            store
                .forget_expired_nonces(161 + NONCE_RETENTION_SECS)
                .unwrap(),
            2
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_records_of_one_nonce_admit_exactly_one_and_number_without_gaps() {
        let (store, dir) = temp_store("race");
        let mut tasks = Vec::new();
        for i in 0..200u8 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .record_payment(&key(i % 4), Entry::sample(i % 4, 1, 100), &auth())
                    .await
            }));
        }
        let mut seqs = Vec::new();
        for task in tasks {
            if let Recorded::Fresh { seq } = task.await.unwrap().unwrap() {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        assert_eq!(seqs, vec![1, 2, 3, 4]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn state_changes_are_new_facts_and_the_machine_refuses_the_rest() {
        let (store, dir) = temp_store("machine");
        store
            .record_payment(&key(1), Entry::sample(1, 5, 100), &auth())
            .await
            .unwrap();
        let queued = store
            .record_changes(&[change(1, State::Queued)], 101, false)
            .await
            .unwrap();
        assert!(queued.is_ok());
        // Queued cannot be confirmed without being submitted; nothing is written.
        let refused = store
            .record_changes(&[change(1, State::Confirmed)], 102, true)
            .await
            .unwrap();
        assert_eq!(
            refused,
            Err(BadTransition {
                entry: 1,
                from: Some(State::Queued),
                to: State::Confirmed
            })
        );
        let bundle = Bundle {
            id: 0,
            at: 0,
            backend: "b".into(),
            network: "base-sepolia".into(),
            asset: Address::repeat_byte(1),
            symbol: "USDC".into(),
            decimals: 6,
            pay_to: Address::repeat_byte(9),
            entries: vec![1],
            total: 5,
            closed_by: "count".into(),
        };
        let bundle = store.submit_bundle(bundle, 103).await.unwrap().unwrap();
        assert_eq!(bundle.id, 1);
        let confirmed = Change {
            entry: 1,
            state: State::Confirmed,
            detail: Detail {
                tx: Some("0xabc".into()),
                ..Detail::default()
            },
        };
        store
            .record_changes(&[confirmed], 104, true)
            .await
            .unwrap()
            .unwrap();
        let row = store.payment(1).unwrap().unwrap();
        assert_eq!(row.status.state, State::Confirmed);
        assert_eq!(row.status.detail.bundle, Some(1));
        assert_eq!(row.status.detail.tx.as_deref(), Some("0xabc"));
        let history: Vec<State> = store.facts_of(1).unwrap().iter().map(|f| f.state).collect();
        assert_eq!(
            history,
            [
                State::Recorded,
                State::Queued,
                State::Submitted,
                State::Confirmed
            ]
        );
        // Final: nothing changes it, and it is no longer open.
        let late = store
            .record_changes(&[change(1, State::Failed)], 105, true)
            .await
            .unwrap();
        assert!(late.is_err());
        assert!(store.open_payments().unwrap().is_empty());
        let page = store
            .payments(
                &Query {
                    bundle: Some(1),
                    ..Query::default()
                },
                10,
            )
            .unwrap();
        assert_eq!(page.entries.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_time_range_finds_its_entries_without_reading_the_others() {
        let (store, dir) = temp_store("range");
        // Times follow numbers only roughly: entry 61 was admitted before entry 60.
        for i in 0..100u8 {
            let at = match i {
                60 => 1_049,
                _ => 1_000 + u64::from(i),
            };
            let mut e = Entry::sample(i, 1, at);
            e.nonce = B256::repeat_byte(i);
            store.record_payment(&key(i), e, &auth()).await.unwrap();
        }
        let query = Query {
            from: Some(1_050),
            to: Some(1_060),
            ..Query::default()
        };
        let page = store.payments(&query, 100).unwrap();
        let times: Vec<u64> = page.entries.iter().map(|r| r.entry.at).collect();
        assert_eq!(
            times,
            (1_050..1_060).filter(|t| *t != 1_060).collect::<Vec<_>>()
        );
        let all = store.payments(&Query::default(), 1_000).unwrap();
        assert_eq!(all.entries.len(), 100);
        assert_eq!(store.first_recorded_since(1_050).unwrap(), 51);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
