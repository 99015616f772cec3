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
    let mut facts = 0u64;
    store.scan_payment_facts(|(key, fact)| {
        facts += 1;
        let expected = facts;
        if key != Some(expected) {
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
            facts = key.unwrap_or(expected);
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
    if facts != fact_counter {
        breaks.push(Break::new(
            "fact_count",
            format!("{facts} facts are stored but the `payment_fact` counter says {fact_counter}"),
        ));
    }

    // Entries, in order: gap-free, each with facts, a status equal to them, open iff not final.
    let mut entries = 0u64;
    let mut seen: HashSet<u64> = HashSet::new();
    let mut by_state: BTreeMap<&'static str, u64> =
        State::ALL.iter().map(|s| (s.as_str(), 0)).collect();
    let mut unsettled: BTreeMap<(String, String), Unsettled> = BTreeMap::new();
    let mut failure: Option<StoreError> = None;
    store.scan_payments(|(key, entry)| {
        entries += 1;
        let expected = entries;
        if key != Some(expected) {
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
            entries = key.unwrap_or(expected);
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
        if let Err(e) = check_entry(
            store,
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
    if entries != entry_counter {
        breaks.push(Break::new(
            "entry_count",
            format!("{entries} entries are stored but the `payment` counter says {entry_counter}"),
        ));
    }
    let mut orphans: Vec<u64> = folded
        .keys()
        .filter(|e| !seen.contains(e))
        .copied()
        .collect();
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
        if let Some(seq) = key.filter(|s| !seen.contains(s)) {
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
        if key.is_none_or(|seq| !seen.contains(&seq)) {
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
        if let Some(bundle) = status.detail.bundle
            && !bundles.contains(&bundle)
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

fn check_entry(
    store: &Store,
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
            format!("{expected} bundles are stored but the `bundle` counter says {counter}"),
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
