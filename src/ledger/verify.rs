//! `tollgate ledger verify`: every invariant of the books, checked from what is on disk.
//!
//! Payment ledger ([`crate::store::ledger`]):
//! - entry sequence numbers are 1..n without gaps, each stored under its own number, and n is
//!   the `payment` counter;
//! - fact sequence numbers likewise (the `payment_fact` counter), and bundle ids (`bundle`);
//! - every entry's facts start with `recorded` and each later one is a change
//!   [`State::may_become`] allows; every fact is about an entry that exists;
//! - the status index equals the entry's facts folded ([`Status::after`]), and the
//!   `open_payments` index holds exactly the entries whose state is not final;
//! - a bundle's `total` is the sum of its entries' amounts, its entries exist, are of its
//!   network and asset, and each has a `submitted` fact with the bundle's id;
//!
//! and the credit ledger: for every account, top-ups − debits + refunds == balance
//! ([`Store::audit`]).
//!
//! A broken invariant is a [`Break`] with a stable `kind` and the entry, fact, bundle or account
//! it is about; verification goes on after one, so the report lists them all. The report also
//! counts entries by state and sums the unsettled value (entries not yet final) per asset.
//!
//! Memory: the facts are folded per entry in one pass, so verification holds one folded status
//! per entry (about 150 bytes each).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::money::format_atomic;
use crate::store::accounts::Audit;
use crate::store::ledger::{Entry, State, Status};
use crate::store::{Store, StoreError};

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Break {
    /// Stable code: `entry_gap`, `entry_count`, `entry_key`, `entry_unreadable`, `fact_gap`,
    /// `fact_count`, `fact_key`, `fact_unreadable`, `fact_orphan`, `first_fact`,
    /// `bad_transition`, `no_facts`, `status_missing`, `status_mismatch`, `status_orphan`,
    /// `status_unreadable`, `open_missing`, `open_extra`, `bundle_gap`, `bundle_count`,
    /// `bundle_key`, `bundle_unreadable`, `bundle_total`, `bundle_entry_missing`,
    /// `bundle_mismatch`, `bundle_not_submitted`, `bundle_unknown`, `credit_balance`.
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fact: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<u64>,
    pub message: String,
}

impl Break {
    fn new(kind: &'static str, message: String) -> Break {
        Break {
            kind,
            entry: None,
            fact: None,
            bundle: None,
            account: None,
            message,
        }
    }

    fn entry(mut self, seq: Option<u64>) -> Break {
        self.entry = seq;
        self
    }

    fn fact(mut self, seq: Option<u64>) -> Break {
        self.fact = seq;
        self
    }

    fn bundle(mut self, id: Option<u64>) -> Break {
        self.bundle = id;
        self
    }
}

/// Value not yet settled (entries in a state that is not final), per network and asset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unsettled {
    pub network: String,
    pub asset: String,
    pub symbol: String,
    pub count: u64,
    #[serde(with = "crate::money::as_string")]
    pub amount_atomic: u128,
    pub amount: String,
    #[serde(skip)]
    decimals: u8,
}

/// What verification found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// No invariant is broken.
    pub consistent: bool,
    pub entries: u64,
    pub facts: u64,
    pub bundles: u64,
    /// Entries by their current state (as folded from their facts).
    pub by_state: BTreeMap<&'static str, u64>,
    pub unsettled: Vec<Unsettled>,
    /// The credit ledger's audit.
    pub credits: Audit,
    pub breaks: Vec<Break>,
}

/// Checks every invariant; `Err` only when the store cannot be read at all.
pub fn verify(store: &Store) -> Result<Report, StoreError> {
    let (entry_counter, fact_counter, bundle_counter) = store.payment_counts()?;
    let mut breaks = Vec::new();

    // Facts, in order: gap-free, and folded per entry through the state machine.
    let mut folded: HashMap<u64, Status> = HashMap::new();
    let mut submitted_in: HashSet<(u64, u64)> = HashSet::new();
    let (mut facts, mut last_fact) = (0u64, 0u64);
    // A running sidecar keeps writing: everything numbered after the counters read above is
    // newer than this check and left out of it.
    store.scan_payment_facts(|(key, fact)| {
        if key.is_some_and(|k| k > fact_counter) {
            return false;
        }
        facts += 1;
        if let Some(expected) = missing(&mut last_fact, key) {
            breaks.push(
                Break::new(
                    "fact_gap",
                    format!(
                        "fact {expected} is missing: the next fact is stored under {}",
                        shown(key)
                    ),
                )
                .fact(Some(expected)),
            );
        }
        let fact = match fact {
            Ok(fact) => fact,
            Err(e) => {
                breaks.push(
                    Break::new("fact_unreadable", format!("fact {} cannot be read: {e}", shown(key)))
                        .fact(key),
                );
                return true;
            }
        };
        if Some(fact.seq) != key {
            breaks.push(
                Break::new(
                    "fact_key",
                    format!("fact {} is stored under {}", fact.seq, shown(key)),
                )
                .fact(key)
                .entry(Some(fact.entry)),
            );
        }
        if fact.state == State::Submitted
            && let Some(bundle) = fact.detail.bundle
        {
            submitted_in.insert((fact.entry, bundle));
        }
        let next = match folded.get(&fact.entry) {
            None => {
                if fact.state != State::Recorded {
                    breaks.push(
                        Break::new(
                            "first_fact",
                            format!(
                                "entry {}'s first fact ({}) is `{}`, not `recorded`",
                                fact.entry,
                                fact.seq,
                                fact.state.as_str()
                            ),
                        )
                        .entry(Some(fact.entry))
                        .fact(Some(fact.seq)),
                    );
                }
                Status {
                    state: fact.state,
                    since: fact.at,
                    fact: fact.seq,
                    detail: fact.detail.clone(),
                }
            }
            Some(now) => {
                if !now.state.may_become(fact.state) {
                    breaks.push(
                        Break::new(
                            "bad_transition",
                            format!(
                                "entry {} went from `{}` to `{}` (fact {}), which the state machine forbids",
                                fact.entry,
                                now.state.as_str(),
                                fact.state.as_str(),
                                fact.seq
                            ),
                        )
                        .entry(Some(fact.entry))
                        .fact(Some(fact.seq)),
                    );
                }
                now.after(&fact)
            }
        };
        folded.insert(fact.entry, next);
        true
    })?;
    if last_fact != fact_counter {
        breaks.push(Break::new(
            "fact_count",
            format!(
                "the last fact is {last_fact} but the `payment_fact` counter says {fact_counter}"
            ),
        ));
    }

    // Entries, in order: gap-free, each with facts, a status equal to them, open iff not final.
    let (mut entries, mut last_entry) = (0u64, 0u64);
    let mut seen: HashSet<u64> = HashSet::new();
    let mut by_state: BTreeMap<&'static str, u64> =
        State::ALL.iter().map(|s| (s.as_str(), 0)).collect();
    let mut unsettled: BTreeMap<(String, String), Unsettled> = BTreeMap::new();
    let mut sales: Vec<(u64, u128, String)> = Vec::new();
    let mut failure: Option<StoreError> = None;
    store.scan_payments(|(key, entry)| {
        if key.is_some_and(|k| k > entry_counter) {
            return false;
        }
        entries += 1;
        if let Some(expected) = missing(&mut last_entry, key) {
            breaks.push(
                Break::new(
                    "entry_gap",
                    format!(
                        "entry {expected} is missing: the next entry is stored under {}",
                        shown(key)
                    ),
                )
                .entry(Some(expected)),
            );
        }
        let Some(seq) = key else {
            breaks.push(Break::new(
                "entry_key",
                "an entry is stored under a key that is not a sequence number".into(),
            ));
            return true;
        };
        seen.insert(seq);
        match &entry {
            Ok(e) if e.seq != seq => breaks.push(
                Break::new(
                    "entry_key",
                    format!("entry {} is stored under {seq}", e.seq),
                )
                .entry(Some(seq)),
            ),
            Ok(_) => {}
            Err(e) => breaks.push(
                Break::new(
                    "entry_unreadable",
                    format!("entry {seq} cannot be read: {e}"),
                )
                .entry(Some(seq)),
            ),
        }
        if let (Ok(e), Some(status)) = (&entry, folded.get(&seq))
            && let Some(credits) = e.credits
            && status.state == State::Confirmed
        {
            sales.push((seq, credits, e.sale_reference().unwrap_or_default()));
        }
        if let Err(e) = check_entry(
            store,
            fact_counter,
            seq,
            entry.ok().as_ref(),
            folded.get(&seq),
            &mut breaks,
            &mut by_state,
            &mut unsettled,
        ) {
            failure = Some(e);
            return false;
        }
        true
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    // A settled credit sale has its top-up: the reference names the payment that bought it.
    if !sales.is_empty() {
        let credited = store.topup_references()?;
        for (seq, credits, reference) in sales {
            if !credited.contains(&reference) {
                breaks.push(
                    Break::new(
                        "sale_uncredited",
                        format!(
                            "entry {seq} bought {credits} credits and settled, but no top-up has the reference {reference}: credit it with that reference (a repeat credits once)"
                        ),
                    )
                    .entry(Some(seq)),
                );
            }
        }
    }
    if last_entry != entry_counter {
        breaks.push(Break::new(
            "entry_count",
            format!(
                "the last entry is {last_entry} but the `payment` counter says {entry_counter}"
            ),
        ));
    }
    // An index or fact about an entry the scan did not see is an orphan — unless the entry is
    // numbered past the counter read first and exists now: written while the check ran (the
    // counters are read one by one, so a fact counted may belong to a newer entry; found by
    // the 30-minute soak).
    let orphan = |seq: u64| {
        !seen.contains(&seq) && (seq <= entry_counter || matches!(store.payment(seq), Ok(None)))
    };
    let mut orphans: Vec<u64> = folded.keys().copied().filter(|&e| orphan(e)).collect();
    orphans.sort_unstable();
    for entry in orphans {
        breaks.push(
            Break::new(
                "fact_orphan",
                format!("facts are recorded about entry {entry}, which does not exist"),
            )
            .entry(Some(entry)),
        );
    }
    store.scan_payment_statuses(|(key, _)| {
        if let Some(seq) = key.filter(|&seq| orphan(seq)) {
            breaks.push(
                Break::new(
                    "status_orphan",
                    format!("the status index has entry {seq}, which does not exist"),
                )
                .entry(Some(seq)),
            );
        }
        true
    })?;
    for key in store.open_payment_keys()? {
        if key.is_none_or(orphan) {
            breaks.push(
                Break::new(
                    "open_extra",
                    format!(
                        "the open-payments index has entry {}, which does not exist",
                        shown(key)
                    ),
                )
                .entry(key),
            );
        }
    }

    let bundles = check_bundles(store, bundle_counter, &submitted_in, &mut breaks)?;
    for (entry, status) in &folded {
        // A bundle numbered past its counter was submitted during the check: it is unknown
        // only when it does not exist now either.
        if let Some(bundle) = status.detail.bundle
            && !bundles.contains(&bundle)
            && (bundle <= bundle_counter || matches!(store.bundle(bundle), Ok(None)))
        {
            breaks.push(
                Break::new(
                    "bundle_unknown",
                    format!("entry {entry} is in bundle {bundle}, which does not exist"),
                )
                .entry(Some(*entry))
                .bundle(Some(bundle)),
            );
        }
    }

    let credits = store.audit()?;
    for d in &credits.discrepancies {
        let mut b = Break::new(
            "credit_balance",
            format!(
                "account {}: the balance is {} but top-ups − debits + refunds is {}{}",
                d.account,
                d.balance,
                if d.negative { "−" } else { "" },
                d.ledger
            ),
        );
        b.account = Some(d.account);
        breaks.push(b);
    }

    Ok(Report {
        consistent: breaks.is_empty(),
        entries,
        facts,
        bundles: u64::try_from(bundles.len()).unwrap_or(u64::MAX),
        by_state,
        unsettled: unsettled
            .into_values()
            .map(|mut u| {
                u.amount = format_atomic(u.amount_atomic, u.decimals);
                u
            })
            .collect(),
        credits,
        breaks,
    })
}

fn shown(key: Option<u64>) -> String {
    key.map_or_else(
        || "a key that is not a sequence number".into(),
        |k| k.to_string(),
    )
}

/// Steps a gap-free numbering on to the record stored under `key`: the number that should
/// have come instead, when it did not (then the count goes on from `key`).
fn missing(last: &mut u64, key: Option<u64>) -> Option<u64> {
    let expected = *last + 1;
    *last = key.unwrap_or(expected);
    (key != Some(expected)).then_some(expected)
}

/// The top-up reference a credit sale writes (`proxy::sell`): `x402:<caip2>:<payer>:<nonce>`.
#[expect(
    clippy::too_many_arguments,
    reason = "the check's running totals, passed down rather than kept in a struct for one caller"
)]
fn check_entry(
    store: &Store,
    fact_counter: u64,
    seq: u64,
    entry: Option<&Entry>,
    folded: Option<&Status>,
    breaks: &mut Vec<Break>,
    by_state: &mut BTreeMap<&'static str, u64>,
    unsettled: &mut BTreeMap<(String, String), Unsettled>,
) -> Result<(), StoreError> {
    let stored = store.payment_status_raw(seq)?;
    let Some(folded) = folded else {
        breaks.push(
            Break::new(
                "no_facts",
                format!("entry {seq} has no facts (not even `recorded`)"),
            )
            .entry(Some(seq)),
        );
        return Ok(());
    };
    if let Some(count) = by_state.get_mut(folded.state.as_str()) {
        *count += 1;
    }
    // A fact newer than this check changed the entry meanwhile: its indexes are ahead of the
    // facts read, not broken.
    if matches!(&stored, Some(Ok(status)) if status.fact > fact_counter) {
        return Ok(());
    }
    match stored {
        None => breaks.push(Break::new("status_missing", format!("entry {seq} is not in the status index")).entry(Some(seq))),
        Some(Err(e)) => breaks.push(
            Break::new("status_unreadable", format!("entry {seq}'s status cannot be read: {e}")).entry(Some(seq)),
        ),
        Some(Ok(status)) if &status != folded => breaks.push(
            Break::new(
                "status_mismatch",
                format!(
                    "entry {seq}'s status index says `{}` (fact {}) but its facts fold to `{}` (fact {})",
                    status.state.as_str(),
                    status.fact,
                    folded.state.as_str(),
                    folded.fact
                ),
            )
            .entry(Some(seq))
            .fact(Some(folded.fact)),
        ),
        Some(Ok(_)) => {}
    }
    let open = store.payment_is_open(seq)?;
    if open == folded.state.is_final() {
        let message = if open {
            format!(
                "entry {seq} is `{}`, final, yet in the open-payments index",
                folded.state.as_str()
            )
        } else {
            format!(
                "entry {seq} is `{}`, not final, yet missing from the open-payments index",
                folded.state.as_str()
            )
        };
        breaks.push(
            Break::new(if open { "open_extra" } else { "open_missing" }, message).entry(Some(seq)),
        );
    }
    if let Some(e) = entry
        && !folded.state.is_final()
    {
        let asset = e.asset.to_string();
        let u = unsettled
            .entry((e.network.clone(), asset.clone()))
            .or_insert_with(|| Unsettled {
                network: e.network.clone(),
                asset,
                symbol: e.symbol.clone(),
                count: 0,
                amount_atomic: 0,
                amount: String::new(),
                decimals: e.decimals,
            });
        u.count += 1;
        u.amount_atomic = u.amount_atomic.saturating_add(e.amount);
    }
    Ok(())
}

/// Checks every bundle; returns the ids that exist.
fn check_bundles(
    store: &Store,
    counter: u64,
    submitted_in: &HashSet<(u64, u64)>,
    breaks: &mut Vec<Break>,
) -> Result<HashSet<u64>, StoreError> {
    let mut stored = Vec::new();
    let mut ids = HashSet::new();
    let mut expected = 0u64;
    store.scan_bundles(|(key, bundle)| {
        // Like facts and entries: a bundle numbered after the counter read at the start was
        // submitted during the check (its `submitted` facts are past the fact counter too).
        if key.is_some_and(|k| k > counter) {
            return false;
        }
        expected += 1;
        if key != Some(expected) {
            breaks.push(
                Break::new(
                    "bundle_gap",
                    format!(
                        "bundle {expected} is missing: the next bundle is stored under {}",
                        shown(key)
                    ),
                )
                .bundle(Some(expected)),
            );
            expected = key.unwrap_or(expected);
        }
        match bundle {
            Ok(b) if Some(b.id) != key => {
                breaks.push(
                    Break::new(
                        "bundle_key",
                        format!("bundle {} is stored under {}", b.id, shown(key)),
                    )
                    .bundle(key),
                );
            }
            Ok(b) => {
                ids.insert(b.id);
                stored.push(b);
            }
            Err(e) => breaks.push(
                Break::new(
                    "bundle_unreadable",
                    format!("bundle {} cannot be read: {e}", shown(key)),
                )
                .bundle(key),
            ),
        }
        true
    })?;
    if expected != counter {
        breaks.push(Break::new(
            "bundle_count",
            format!("the last bundle is {expected} but the `bundle` counter says {counter}"),
        ));
    }
    for bundle in stored {
        let id = Some(bundle.id);
        let mut sum: Option<u128> = Some(0);
        for &seq in &bundle.entries {
            let entry = match store.payment_raw(seq)? {
                Some(Ok(entry)) => entry,
                _ => {
                    breaks.push(
                        Break::new(
                            "bundle_entry_missing",
                            format!(
                                "bundle {} lists entry {seq}, which cannot be read",
                                bundle.id
                            ),
                        )
                        .bundle(id)
                        .entry(Some(seq)),
                    );
                    sum = None;
                    continue;
                }
            };
            sum = sum.and_then(|s| s.checked_add(entry.amount));
            if entry.network != bundle.network
                || entry.asset != bundle.asset
                || entry.pay_to != bundle.pay_to
            {
                breaks.push(
                    Break::new(
                        "bundle_mismatch",
                        format!(
                            "bundle {} is {} {} to {}, but its entry {seq} is {} {} to {}",
                            bundle.id,
                            bundle.network,
                            bundle.asset,
                            bundle.pay_to,
                            entry.network,
                            entry.asset,
                            entry.pay_to
                        ),
                    )
                    .bundle(id)
                    .entry(Some(seq)),
                );
            }
            if !submitted_in.contains(&(seq, bundle.id)) {
                breaks.push(
                    Break::new(
                        "bundle_not_submitted",
                        format!("bundle {} lists entry {seq}, which has no `submitted` fact with that bundle", bundle.id),
                    )
                    .bundle(id)
                    .entry(Some(seq)),
                );
            }
        }
        if let Some(sum) = sum
            && sum != bundle.total
        {
            breaks.push(
                Break::new(
                    "bundle_total",
                    format!(
                        "bundle {}'s total is {} but its entries add up to {}",
                        bundle.id, bundle.total, sum
                    ),
                )
                .bundle(id),
            );
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use alloy::primitives::{Address, B256};

    use super::*;
    use crate::store::NonceKey;
    use crate::store::ledger::{Authorization, Bundle, Change, Detail, Fact, Timing};

    fn entry(n: u8, amount: u128) -> (NonceKey, Entry) {
        let key = NonceKey {
            chain_id: 84532,
            asset: Address::repeat_byte(1),
            from: Address::repeat_byte(2),
            nonce: B256::repeat_byte(n),
        };
        let entry = Entry {
            seq: 0,
            at: 1_796_040_000 + u64::from(n),
            request_id: format!("req-{n}"),
            service: "weather".into(),
            route: "GET /v1/forecast/{city}".into(),
            method: "GET".into(),
            path: "/v1/forecast/paris".into(),
            payer: key.from,
            rail: "x402".into(),
            amount,
            asset: key.asset,
            symbol: "USDC".into(),
            decimals: 6,
            network: "base-sepolia".into(),
            chain_id: 84532,
            pay_to: Address::repeat_byte(3),
            nonce: key.nonce,
            valid_after: 0,
            valid_before: 1_796_040_600,
            timing: Timing::Deferred {
                every_secs: Some(60),
                payments: None,
                value: None,
            },
            backend: "https://x402.org/facilitator".into(),
            unsettled_held: false,
            sale_account: None,
            credits: None,
        };
        (key, entry)
    }

    /// Three entries: 1 confirmed and 2 submitted in bundle 1, 3 recorded; one credit account.
    async fn books(name: &str) -> (Store, std::path::PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("tollgate-verify-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).unwrap();
        let auth = Authorization {
            version: 2,
            payload: serde_json::json!({}),
            requirements: serde_json::json!({}),
        };
        for (n, amount) in [(1, 1_000), (2, 2_500), (3, 10)] {
            let (key, e) = entry(n, amount);
            store.record_payment(&key, e, &auth).await.unwrap();
        }
        let queued = Change {
            entry: 1,
            state: State::Queued,
            detail: Detail::default(),
        };
        store
            .record_changes(&[queued], 1_796_040_010, true)
            .await
            .unwrap()
            .unwrap();
        let bundle = Bundle {
            id: 0,
            at: 0,
            backend: "https://x402.org/facilitator".into(),
            network: "base-sepolia".into(),
            asset: Address::repeat_byte(1),
            symbol: "USDC".into(),
            decimals: 6,
            pay_to: Address::repeat_byte(3),
            entries: vec![1, 2],
            total: 3_500,
            closed_by: "count".into(),
        };
        store
            .submit_bundle(bundle, 1_796_040_020)
            .await
            .unwrap()
            .unwrap();
        let confirmed = Change {
            entry: 1,
            state: State::Confirmed,
            detail: Detail {
                tx: Some("0xabc".into()),
                block: Some(7),
                ..Detail::default()
            },
        };
        store
            .record_changes(&[confirmed], 1_796_040_030, true)
            .await
            .unwrap()
            .unwrap();
        let account = store.create_account("acme", 1).await.unwrap();
        store
            .top_up(account.id, 50, "inv-1", 1)
            .await
            .unwrap()
            .unwrap();
        (store, dir)
    }

    fn tree(store: &Store, name: &str) -> sled::Tree {
        store.ledger_tree_for_tests(name).unwrap()
    }

    fn kinds(store: &Store) -> Vec<&'static str> {
        let report = verify(store).unwrap();
        assert_eq!(report.consistent, report.breaks.is_empty());
        report.breaks.iter().map(|b| b.kind).collect()
    }

    fn json<T: serde::Serialize>(value: &T) -> Vec<u8> {
        serde_json::to_vec(value).unwrap()
    }

    fn status(store: &Store, seq: u64) -> Status {
        store.payment_status_raw(seq).unwrap().unwrap().unwrap()
    }

    #[tokio::test]
    async fn sound_books_verify_and_are_summarised() {
        let (store, dir) = books("sound").await;
        let report = verify(&store).unwrap();
        assert!(report.consistent, "{:?}", report.breaks);
        assert_eq!((report.entries, report.facts, report.bundles), (3, 7, 1));
        assert_eq!(report.by_state["confirmed"], 1);
        assert_eq!(report.by_state["submitted"], 1);
        assert_eq!(report.by_state["recorded"], 1);
        assert_eq!(report.unsettled.len(), 1);
        assert_eq!(report.unsettled[0].count, 2);
        assert_eq!(report.unsettled[0].amount, "0.00251");
        assert_eq!(report.credits.accounts, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_missing_entry_is_a_gap_and_its_facts_are_orphans() {
        let (store, dir) = books("entry-gap").await;
        tree(&store, "payments").remove(2u64.to_be_bytes()).unwrap();
        let report = verify(&store).unwrap();
        let gap = report
            .breaks
            .iter()
            .find(|b| b.kind == "entry_gap")
            .unwrap();
        assert_eq!(gap.entry, Some(2));
        let k = kinds(&store);
        for kind in [
            "entry_gap",
            "fact_orphan",
            "status_orphan",
            "open_extra",
            "bundle_entry_missing",
        ] {
            assert!(k.contains(&kind), "{kind} in {k:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn counters_must_match_what_is_stored() {
        let (store, dir) = books("counters").await;
        let meta = tree(&store, "meta");
        meta.insert("payment", &4u64.to_be_bytes()).unwrap();
        meta.insert("payment_fact", &9u64.to_be_bytes()).unwrap();
        // (the facts' last is 7, the entries' 3, the bundles' 1)
        meta.insert("bundle", &2u64.to_be_bytes()).unwrap();
        assert_eq!(kinds(&store), ["fact_count", "entry_count", "bundle_count"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_bundle_submitted_during_the_check_is_left_out() {
        // Found by the soak (`tests/it/e2e/soak.rs`): `ledger verify` on a running sidecar
        // reported `bundle_count` and `bundle_not_submitted` for bundles written while it ran.
        let (store, dir) = books("bundle-during").await;
        let bundles = tree(&store, "bundles");
        let mut b: Bundle =
            serde_json::from_slice(&bundles.get(1u64.to_be_bytes()).unwrap().unwrap()).unwrap();
        b.id = 2;
        b.entries = vec![3];
        b.total = 10;
        // Stored, but numbered past the counter the check read first: written after it began.
        bundles.insert(2u64.to_be_bytes(), json(&b)).unwrap();
        let report = verify(&store).unwrap();
        assert!(report.consistent, "{:?}", report.breaks);
        assert_eq!(report.bundles, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_payment_or_bundle_written_between_the_counter_reads_is_left_out() {
        // Found by the 30-minute soak: a payment recorded after the check read the `payment`
        // counter and before it read `payment_fact` had its `recorded` fact counted, and
        // `fact_orphan` was reported for an entry that exists.
        let (store, dir) = books("entry-during").await;
        let (key, e) = entry(4, 7);
        let auth = Authorization {
            version: 2,
            payload: serde_json::json!({}),
            requirements: serde_json::json!({}),
        };
        store.record_payment(&key, e, &auth).await.unwrap();
        tree(&store, "meta")
            .insert("payment", &3u64.to_be_bytes())
            .unwrap();
        let report = verify(&store).unwrap();
        assert!(report.consistent, "{:?}", report.breaks);
        assert_eq!((report.entries, report.facts), (3, 8));
        // A bundle submitted after the `bundle` counter was read, before `payment_fact`.
        let b = Bundle {
            entries: vec![3],
            total: 10,
            ..store.bundle(1).unwrap().unwrap()
        };
        store
            .submit_bundle(b, 1_796_040_040)
            .await
            .unwrap()
            .unwrap();
        tree(&store, "meta")
            .insert("bundle", &1u64.to_be_bytes())
            .unwrap();
        let report = verify(&store).unwrap();
        assert!(report.consistent, "{:?}", report.breaks);
        assert_eq!(report.bundles, 1);
        // An entry that does not exist is an orphan whatever its number.
        tree(&store, "payments").remove(4u64.to_be_bytes()).unwrap();
        assert!(kinds(&store).contains(&"fact_orphan"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_missing_fact_is_a_gap() {
        let (store, dir) = books("fact-gap").await;
        // Fact 4 is entry 1's `queued`: without it, entry 1 went recorded → submitted, which
        // the machine allows, so the gap itself is what verify reports.
        tree(&store, "payment_facts")
            .remove(4u64.to_be_bytes())
            .unwrap();
        let report = verify(&store).unwrap();
        let gap = report.breaks.iter().find(|b| b.kind == "fact_gap").unwrap();
        assert_eq!(gap.fact, Some(4));
        assert_eq!(kinds(&store), ["fact_gap"]);
        assert_eq!(report.facts, 6);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn facts_must_start_recorded_and_follow_the_machine() {
        let (store, dir) = books("machine").await;
        let facts = tree(&store, "payment_facts");
        // Entry 3's only fact claims `queued` from the start.
        let mut first: Fact =
            serde_json::from_slice(&facts.get(3u64.to_be_bytes()).unwrap().unwrap()).unwrap();
        first.state = State::Queued;
        facts.insert(3u64.to_be_bytes(), json(&first)).unwrap();
        // Entry 1, confirmed, becomes `queued` again (a later fact).
        let back = Fact {
            seq: 8,
            entry: 1,
            at: 1_796_040_040,
            state: State::Queued,
            detail: Detail::default(),
        };
        facts.insert(8u64.to_be_bytes(), json(&back)).unwrap();
        tree(&store, "meta")
            .insert("payment_fact", &8u64.to_be_bytes())
            .unwrap();
        let report = verify(&store).unwrap();
        let first = report
            .breaks
            .iter()
            .find(|b| b.kind == "first_fact")
            .unwrap();
        assert_eq!((first.entry, first.fact), (Some(3), Some(3)));
        let bad = report
            .breaks
            .iter()
            .find(|b| b.kind == "bad_transition")
            .unwrap();
        assert_eq!((bad.entry, bad.fact), (Some(1), Some(8)));
        assert!(
            bad.message.contains("from `confirmed` to `queued`"),
            "{}",
            bad.message
        );
        // Both statuses now disagree with their folded facts.
        let mismatches: Vec<_> = report
            .breaks
            .iter()
            .filter(|b| b.kind == "status_mismatch")
            .map(|b| b.entry)
            .collect();
        assert_eq!(mismatches, [Some(1), Some(3)]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn the_status_index_must_equal_the_folded_facts() {
        let (store, dir) = books("status").await;
        let mut s = status(&store, 2);
        s.detail.tx = Some("0xforged".into());
        tree(&store, "payment_status")
            .insert(2u64.to_be_bytes(), json(&s))
            .unwrap();
        let report = verify(&store).unwrap();
        assert_eq!(kinds(&store), ["status_mismatch"]);
        assert_eq!(report.breaks[0].entry, Some(2));
        tree(&store, "payment_status")
            .remove(2u64.to_be_bytes())
            .unwrap();
        assert_eq!(kinds(&store), ["status_missing"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn open_payments_holds_exactly_the_entries_not_final() {
        let (store, dir) = books("open").await;
        let open = tree(&store, "open_payments");
        open.remove(3u64.to_be_bytes()).unwrap();
        open.insert(1u64.to_be_bytes(), &[]).unwrap();
        open.insert(9u64.to_be_bytes(), &[]).unwrap();
        let report = verify(&store).unwrap();
        let found: Vec<_> = report.breaks.iter().map(|b| (b.kind, b.entry)).collect();
        assert_eq!(
            found,
            [
                ("open_extra", Some(1)),
                ("open_missing", Some(3)),
                ("open_extra", Some(9))
            ]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_bundle_adds_up_and_its_entries_were_submitted_in_it() {
        let (store, dir) = books("bundle").await;
        let bundles = tree(&store, "bundles");
        let mut b: Bundle =
            serde_json::from_slice(&bundles.get(1u64.to_be_bytes()).unwrap().unwrap()).unwrap();
        b.total += 1;
        bundles.insert(1u64.to_be_bytes(), json(&b)).unwrap();
        let report = verify(&store).unwrap();
        assert_eq!(kinds(&store), ["bundle_total"]);
        assert_eq!(report.breaks[0].bundle, Some(1));
        assert!(
            report.breaks[0].message.contains("3501"),
            "{}",
            report.breaks[0].message
        );
        // Entry 3 listed, with the total to match: it was never submitted in bundle 1.
        b.total = 3_510;
        b.entries.push(3);
        bundles.insert(1u64.to_be_bytes(), json(&b)).unwrap();
        let report = verify(&store).unwrap();
        assert_eq!(kinds(&store), ["bundle_not_submitted"]);
        assert_eq!(
            (report.breaks[0].bundle, report.breaks[0].entry),
            (Some(1), Some(3))
        );
        // A status naming a bundle that does not exist.
        bundles.remove(1u64.to_be_bytes()).unwrap();
        let k = kinds(&store);
        assert!(
            k.contains(&"bundle_count") && k.contains(&"bundle_unknown"),
            "{k:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn the_credit_audit_is_part_of_verify() {
        let (store, dir) = books("credits").await;
        let balances = tree(&store, "balances");
        let (key, _) = balances.iter().next().unwrap().unwrap();
        balances.insert(key, &51u128.to_be_bytes()).unwrap();
        let report = verify(&store).unwrap();
        assert_eq!(kinds(&store), ["credit_balance"]);
        assert_eq!(report.breaks[0].account, Some(1));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_settled_credit_sale_without_its_top_up_is_a_break() {
        let dir = std::env::temp_dir().join(format!("tollgate-verify-sale-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).unwrap();
        let auth = Authorization {
            version: 2,
            payload: serde_json::json!({}),
            requirements: serde_json::json!({}),
        };
        let (key, mut e) = entry(7, 50_000);
        e.credits = Some(100);
        e.timing = Timing::BeforeResponse;
        let reference = e.sale_reference().unwrap();
        store.record_payment(&key, e, &auth).await.unwrap();
        let settle = |state| Change {
            entry: 1,
            state,
            detail: Detail::default(),
        };
        store
            .record_changes(
                &[settle(State::Submitted), settle(State::Confirmed)],
                1,
                true,
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(kinds(&store), ["sale_uncredited"]);
        let account = store.create_account("buyer", 1).await.unwrap();
        store
            .top_up(account.id, 100, &reference, 2)
            .await
            .unwrap()
            .unwrap();
        assert!(kinds(&store).is_empty());
        assert!(reference.starts_with("x402:eip155:84532:0x"), "{reference}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
