//! Settlement: everything after "this payment is admitted", with one owner.
//!
//! The proxy records a payment ([`Store::record_payment`], with its nonce, before the upstream
//! sees the request) and hands the entry here. [`Settlement`] owns the rest:
//! - `before response` / `after response`: [`Settlement::settle_now`] marks the entry
//!   `submitted` (on disk before the facilitator is called), calls the backend, records the
//!   outcome, and answers the proxy, which serves or refuses on it;
//! - `deferred`: [`Settlement::request_done`] queues the entry once the upstream answered
//!   below 400 (or marks it `refunded`), before that answer goes to the buyer; the worker ([`Settlement::run`], a background
//!   service) closes bundles by count, value, window, or the earliest `validBefore` minus
//!   [`DEADLINE_MARGIN_SECS`], whichever comes first, submits each bundle durably, and settles
//!   its authorizations one `/settle` each through a facilitator (its API has no batch call; the
//!   bundle is the unit of accounting) with at most [`MAX_CALLS`] calls in flight, or — `settle
//!   via rpc` — in one transaction of tollgate's own relayer ([`onchain`], [`relayer`]).
//!
//! Outcomes: a receipt with a transaction is `confirmed`; a refusal is `failed` with the
//! facilitator's reason; a call that never left (connection refused) puts a deferred entry
//! back in the queue, with backoff; a call whose outcome is unknown (timeout, 5xx, unreadable
//! answer) is `unresolved` and is never retried: only evidence from the chain may decide it.
//!
//! Backends are keyed by their address, not by the policy snapshot: a reload never strands a
//! queued payment. After a crash, [`Settlement::recover`] puts the books right before the
//! first request: `submitted` entries become `unresolved` (the call may have gone out), and
//! `recorded` entries are `refunded` — a deferred payment is `queued` durably before the
//! upstream's answer goes to its buyer, and the others settle before it, so an entry still
//! `recorded` is one whose buyer got nothing.
//!
//! The per-buyer unsettled value of deferred payments is held in the [`Limiter`] from admission
//! until the entry's final state, and re-held from the ledger at startup, so a restart cannot
//! reset `limit buyer unsettled`.

pub mod evidence;
pub mod evm;
pub mod facilitator;
pub mod onchain;
pub mod relayer;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pingora::server::ShutdownWatch;
use tokio::sync::{Notify, Semaphore};

pub use facilitator::{Facilitator, Kind, SETTLE_TIMEOUT, SettleError};

use crate::limits::{BuyerId, Limiter};
use crate::metrics::Metrics;
use crate::reload::Live;
use crate::store::ledger::{Bundle, Change, Detail, Entry, State, Timing};
use crate::store::sale::CreditSale;
use crate::store::{Store, StoreError};
use crate::x402::wire::SettleResponse;
use onchain::{Outcome, Rpc};

/// A bundle closes this long before the earliest `validBefore` among its payments, whatever
/// its own rule says, so every authorization reaches the chain while it is still valid.
pub const DEADLINE_MARGIN_SECS: u64 = 30;

/// At most this many payments submitted again in one transaction (see `settle_again`).
const MAX_AGAIN: usize = 100;

/// An evidence round submits the payments it found unused (deferred, still valid) again once
/// it has this many, and at its end.
const AGAIN_EVERY: usize = 20;

/// An unresolved payment with less validity than this left is not submitted again (evidence
/// waits until it is expired by a margin, then calls it never settled).
pub const MIN_VALIDITY_SECS: u64 = 5;

/// Payments examined in one batch by an evidence round (one `aggregate3` of nonce states, one
/// log query per token), and decisions recorded in one durable write.
const EVIDENCE_BATCH: usize = 500;

/// How far back startup looks for confirmed sales whose credits were not granted (a stop
/// between the two): a week of ledger, found by binary search.
const SALE_RECOVERY_SECS: u64 = 7 * 24 * 3_600;

/// Most payments in one bundle.
pub const MAX_BUNDLE: usize = 1_000;

/// Most `/settle` calls of deferred bundles in flight at once, across every bundle and backend.
/// (A `before`/`after response` call is made by its request, outside this bound, so a large
/// bundle never holds a buyer's answer back.)
pub const MAX_CALLS: usize = 16;

/// How often the worker looks at the queue.
const TICK: Duration = Duration::from_millis(250);

/// How long past `validBefore` an unused nonce is taken as never settling.
const EXPIRY_MARGIN_SECS: u64 = 60;

/// How often unresolved payments are examined on chain.
const EVIDENCE_EVERY_SECS: u64 = 5;

/// First wait after a backend could not be reached; doubles up to [`MAX_BACKOFF_SECS`].
const FIRST_BACKOFF_SECS: u64 = 1;
const MAX_BACKOFF_SECS: u64 = 10;

/// The settlement service; cheap to clone.
#[derive(Clone)]
pub struct Settlement {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    limiter: Arc<Limiter>,
    metrics: Arc<Metrics>,
    clock: fn() -> u64,
    backends: Mutex<HashMap<String, Backend>>,
    /// One connection to a settlement node at a time: two relayers for one account would
    /// hand out the same nonces.
    connecting: tokio::sync::Mutex<()>,
    /// The policy in force: where `settle via rpc` finds its relayer key.
    live: Arc<Live>,
    relayer: relayer::Settings,
    /// Every entry whose state is not final, as the ledger says: the worker's view.
    open: Mutex<BTreeMap<u64, Open>>,
    calls: Semaphore,
    wake: Notify,
    /// The node read for evidence about facilitator-settled payments (`settlement.rpc`).
    evidence_url: Option<String>,
    /// Evidence readers by node URL, with each node's chain id once known. A payment settled
    /// `via rpc` is examined through its own node.
    evidence: Mutex<HashMap<String, (evidence::Chain, Option<u64>)>>,
    /// The (asset, network) series of `tollgate_unsettled_atomic` set so far.
    unsettled_shown: Mutex<std::collections::HashSet<(String, String)>>,
}

/// Who settles a payment.
#[derive(Clone)]
enum Client {
    Facilitator(Facilitator),
    /// tollgate itself, through a node (`settle via rpc`).
    Rpc(Arc<Rpc>),
}

struct Backend {
    /// `None` while it could not be made (the node unreachable).
    client: Option<Client>,
    /// The relayer key reference an `Rpc` client was made with.
    key_source: Option<crate::config::SecretRef>,
    /// Unix seconds before which the backend is not called again (it could not be reached).
    down_until: u64,
    backoff_secs: u64,
}

#[derive(Clone)]
struct Open {
    entry: Arc<Entry>,
    state: State,
    /// When the entry reached `state`.
    since: u64,
}

/// What [`Settlement::recover`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    pub unresolved: usize,
    pub refunded: usize,
    pub open: usize,
    /// Confirmed sales credited at startup (stopped between confirmation and credit).
    pub sales_credited: usize,
}

/// Why a bundle closed.
/// The bundles one route's queue (oldest first) closes this tick, with what closed each.
///
/// As many as the queue fills, oldest first: one per tick would cap a route at the rule's
/// count per tick however fast payments arrive. Backpressure: a closed bundle waits for one
/// of the `free_slots` call slots; while none is free, payments wait in the queue instead,
/// where the next bundle takes them all (up to [`MAX_BUNDLE`]), so a backlog goes out in
/// fewer, fuller transactions rather than as a line of small bundles that outgrows the
/// authorizations' validity (found by the 30-minute soak). And a queue longer than the free
/// slots can take in bundles of the rule's size is spread over them.
fn plan_bundles<'a>(
    queue: &[&'a Open],
    free_slots: usize,
    now: u64,
) -> Vec<(Vec<&'a Open>, &'static str)> {
    if free_slots == 0 || queue.is_empty() {
        return Vec::new();
    }
    let rule = match queue.first().map(|o| &o.entry.timing) {
        Some(Timing::Deferred {
            payments: Some(n), ..
        }) => usize::try_from(*n).unwrap_or(MAX_BUNDLE),
        _ => MAX_BUNDLE,
    };
    let most = rule
        .max(queue.len().div_ceil(free_slots))
        .clamp(1, MAX_BUNDLE);
    let mut bundles = Vec::new();
    for chunk in queue.chunks(most) {
        match close_reason(chunk, now) {
            Some(closed_by) => bundles.push((chunk.to_vec(), closed_by)),
            None => break, // the rest are younger
        }
    }
    bundles
}

fn close_reason(entries: &[&Open], now: u64) -> Option<&'static str> {
    let first = entries.first()?;
    let Timing::Deferred {
        every_secs,
        payments,
        value,
    } = &first.entry.timing
    else {
        return None; // only deferred payments are queued
    };
    let count = entries.len() as u64;
    let total: u128 = entries.iter().map(|o| o.entry.amount).sum();
    let oldest = entries.iter().map(|o| o.since).min().unwrap_or(now);
    let deadline = entries
        .iter()
        .map(|o| o.entry.valid_before)
        .min()
        .unwrap_or(u64::MAX);
    if payments.is_some_and(|n| count >= n) || entries.len() >= MAX_BUNDLE {
        Some("count")
    } else if value.is_some_and(|v| total >= v) {
        Some("value")
    } else if every_secs.is_some_and(|w| now.saturating_sub(oldest) >= w) {
        Some("window")
    } else if deadline.saturating_sub(DEADLINE_MARGIN_SECS) <= now {
        Some("deadline")
    } else {
        None
    }
}

/// The payments that may share a bundle: one backend, one token on one chain, one recipient,
/// one bundle rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BundleKey {
    backend: String,
    chain_id: u64,
    asset: alloy::primitives::Address,
    pay_to: alloy::primitives::Address,
    rule: String,
}

impl BundleKey {
    fn of(entry: &Entry) -> BundleKey {
        BundleKey {
            backend: entry.backend.clone(),
            chain_id: entry.chain_id,
            asset: entry.asset,
            pay_to: entry.pay_to,
            rule: serde_json::to_string(&entry.timing).unwrap_or_default(),
        }
    }
}

impl Settlement {
    /// `rpc`: a JSON-RPC node read for evidence about unknown outcomes (`settlement.rpc`);
    /// `relayer`: how `settle via rpc` sends its transactions.
    pub fn new(
        store: Store,
        limiter: Arc<Limiter>,
        metrics: Arc<Metrics>,
        live: Arc<Live>,
        rpc: Option<&str>,
        relayer: relayer::Settings,
    ) -> Result<Settlement, String> {
        let mut evidence = HashMap::new();
        if let Some(url) = rpc {
            evidence.insert(url.to_string(), (evidence::Chain::new(url)?, None));
        }
        Ok(Settlement {
            inner: Arc::new(Inner {
                store,
                limiter,
                metrics,
                clock: crate::clock::now,
                backends: Mutex::new(HashMap::new()),
                connecting: tokio::sync::Mutex::new(()),
                live,
                relayer,
                open: Mutex::new(BTreeMap::new()),
                calls: Semaphore::new(MAX_CALLS),
                wake: Notify::new(),
                evidence_url: rpc.map(str::to_string),
                evidence: Mutex::new(evidence),
                unsettled_shown: Mutex::new(std::collections::HashSet::new()),
            }),
        })
    }

    /// Puts the books right after a stop (see the module docs) and loads the open entries.
    /// Runs before the proxy takes its first request.
    pub async fn recover(&self) -> Result<Recovery, StoreError> {
        let i = &self.inner;
        let now = (i.clock)();
        let mut recovery = Recovery::default();
        let mut changes = Vec::new();
        for row in i.store.open_payments()? {
            let deferred = matches!(row.entry.timing, Timing::Deferred { .. });
            let change = match row.status.state {
                State::Submitted => Some((
                    State::Unresolved,
                    "tollgate stopped while the settlement was in flight; the chain decides",
                )),
                State::Recorded if deferred => Some((
                    State::Queued,
                    "tollgate stopped before the upstream's answer was recorded; queued",
                )),
                State::Recorded => Some((
                    State::Refunded,
                    "tollgate stopped before the payment was settled; the buyer was not served",
                )),
                _ => None,
            };
            if let Some((state, reason)) = change {
                match state {
                    State::Unresolved => recovery.unresolved += 1,
                    _ => recovery.refunded += 1,
                }
                changes.push(Change {
                    entry: row.entry.seq,
                    state,
                    detail: Detail {
                        reason: Some(reason.into()),
                        ..Detail::default()
                    },
                });
            }
        }
        if !changes.is_empty() {
            i.store
                .record_changes(&changes, now, true)
                .await?
                .map_err(|bad| StoreError(format!("recovery: {bad:?}")))?;
        }
        {
            let mut open = i.open.lock().unwrap_or_else(|p| p.into_inner());
            open.clear();
            for row in i.store.open_payments()? {
                if row.entry.unsettled_held {
                    i.limiter.hold_unsettled(
                        &BuyerId::Payer(row.entry.payer),
                        &row.entry.symbol,
                        row.entry.amount,
                    );
                }
                open.insert(
                    row.entry.seq,
                    Open {
                        entry: Arc::new(row.entry),
                        state: row.status.state,
                        since: row.status.since,
                    },
                );
            }
            recovery.open = open.len();
        }
        // A sale confirmed just before a stop, whose credits were not granted yet.
        let mut sales = Vec::new();
        let recent = crate::store::ledger::Query {
            from: Some(now.saturating_sub(SALE_RECOVERY_SECS)),
            state: Some(State::Confirmed),
            ..Default::default()
        };
        i.store.each_payment(&recent, |row| {
            if row.entry.credits.is_some() {
                sales.push(row.entry);
            }
            true
        })?;
        if !sales.is_empty() {
            let credited = i.store.topup_references()?;
            for sale in sales {
                if sale
                    .sale_reference()
                    .is_some_and(|r| !credited.contains(&r))
                {
                    self.credit_sale(&sale).await;
                    recovery.sales_credited += 1;
                }
            }
        }
        self.refresh_gauges(now);
        Ok(recovery)
    }

    /// Grants the credits a confirmed sale bought when its buyer was cut off before they were
    /// (a crash, an unknown outcome the chain decided later): to the key's account the buyer
    /// sent, or to a new account named after the payer, whose key an operator issues when the
    /// buyer asks (the one the sale would have shown was never sent). Once per reference,
    /// across accounts: a sale already credited anywhere is left alone.
    async fn credit_sale(&self, entry: &Entry) {
        let (Some(credits), Some(reference)) = (entry.credits, entry.sale_reference()) else {
            return;
        };
        let store = &self.inner.store;
        match store.topup_references() {
            Ok(credited) if credited.contains(&reference) => return,
            Ok(_) => {}
            Err(e) => {
                tracing::error!(entry = entry.seq, %reference, error = %e, "a confirmed sale could not be checked for its credits; credit it by hand with its reference");
                return;
            }
        }
        let name = format!("x402 {}", entry.payer.to_checksum(None));
        let sale = CreditSale {
            account: entry.sale_account,
            name: &name,
            key_label: "bought with x402",
            credits,
            reference: &reference,
        };
        match store.sell_credits(&sale, (self.inner.clock)()).await {
            Ok(Ok(sold)) => {
                self.inner
                    .metrics
                    .credits_sold
                    .inc_by(u64::try_from(credits).unwrap_or(u64::MAX));
                tracing::warn!(
                    entry = entry.seq,
                    account = sold.account,
                    %reference,
                    credits = %credits,
                    new_account = entry.sale_account.is_none(),
                    "a sale its buyer was cut off from is credited now that the chain shows it paid"
                );
            }
            Ok(Err(refused)) => {
                tracing::error!(entry = entry.seq, %reference, ?refused, "a confirmed sale could not be credited; credit it by hand with its reference")
            }
            Err(e) => {
                tracing::error!(entry = entry.seq, %reference, error = %e, "a confirmed sale could not be credited; credit it by hand with its reference")
            }
        }
    }

    /// Who settles the payments of backend `name`, made once: a facilitator client, or for
    /// `rpc:URL` a relayer on that node with the key the policy in force names.
    async fn client(&self, name: &str) -> Result<Client, SettleError> {
        let Some(shown) = onchain::node_url(name) else {
            return self.facilitator(name).map(Client::Facilitator);
        };
        // The ledger names the node without what may be an API key; the policy has its URL.
        let (url, key) = match &self.inner.live.current().policy.settlement.backend {
            crate::policy::Backend::Rpc { url, relayer } if onchain::backend_name(url) == name => {
                (url.clone(), relayer.clone())
            }
            _ => {
                return Err(SettleError::NotSent(format!(
                    "the policy in force does not settle through {shown}; these payments wait for one that does"
                )));
            }
        };
        let now = (self.inner.clock)();
        let cached = |backends: &HashMap<String, Backend>| match backends.get(name) {
            Some(Backend {
                client: Some(Client::Rpc(rpc)),
                key_source: Some(k),
                ..
            }) if *k == key => Ok(Some(Client::Rpc(rpc.clone()))),
            Some(Backend {
                client: None,
                down_until,
                ..
            }) if *down_until > now => Err(SettleError::NotSent(format!(
                "the settlement node {shown} could not be reached; trying again shortly"
            ))),
            _ => Ok(None),
        };
        if let Some(client) = cached(&self.lock_backends())? {
            return Ok(client);
        }
        let _one = self.inner.connecting.lock().await;
        if let Some(client) = cached(&self.lock_backends())? {
            return Ok(client);
        }
        let signer = onchain::read_key(&key)
            .and_then(|text| relayer::parse_key(&text))
            .map_err(SettleError::NotSent)?;
        // The same account under another key reference (a reload moved it from env to a
        // file): keep its relayer, or two would hand out the same nonces.
        let same_account = match self.lock_backends().get(name) {
            Some(Backend {
                client: Some(Client::Rpc(rpc)),
                ..
            }) if rpc.relayer() == signer.address() => Some(rpc.clone()),
            _ => None,
        };
        let rpc = match same_account {
            Some(rpc) => rpc,
            None => match Rpc::connect(&url, signer, self.inner.relayer).await {
                Ok(rpc) => {
                    tracing::info!(node = %shown, chain_id = rpc.chain_id(), relayer = %rpc.relayer(), "settling on chain through the relayer");
                    Arc::new(rpc)
                }
                Err(why) => {
                    self.lock_backends()
                        .entry(name.to_string())
                        .or_insert_with(|| Backend {
                            client: None,
                            key_source: None,
                            down_until: 0,
                            backoff_secs: FIRST_BACKOFF_SECS,
                        });
                    self.backend_reached(name, Some(&why));
                    return Err(SettleError::NotSent(why));
                }
            },
        };
        let client = Client::Rpc(rpc);
        let mut backends = self.lock_backends();
        let backend = backends.entry(name.to_string()).or_insert_with(|| Backend {
            client: None,
            key_source: None,
            down_until: 0,
            backoff_secs: FIRST_BACKOFF_SECS,
        });
        backend.client = Some(client.clone());
        backend.key_source = Some(key);
        Ok(client)
    }

    fn lock_backends(&self) -> std::sync::MutexGuard<'_, HashMap<String, Backend>> {
        self.inner
            .backends
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The client of the facilitator at `url`, made once.
    fn facilitator(&self, url: &str) -> Result<Facilitator, SettleError> {
        let mut backends = self.lock_backends();
        if let Some(Backend {
            client: Some(Client::Facilitator(f)),
            ..
        }) = backends.get(url)
        {
            return Ok(f.clone());
        }
        let client = Facilitator::new(url, SETTLE_TIMEOUT).map_err(SettleError::NotSent)?;
        backends.insert(
            url.to_string(),
            Backend {
                client: Some(Client::Facilitator(client.clone())),
                key_source: None,
                down_until: 0,
                backoff_secs: FIRST_BACKOFF_SECS,
            },
        );
        Ok(client)
    }

    /// A just-recorded entry (state `recorded`), from the proxy.
    pub fn admitted(&self, entry: Entry) {
        let now = (self.inner.clock)();
        self.inner.metrics.ledger_facts.with(["recorded"]).inc();
        let mut open = self.inner.open.lock().unwrap_or_else(|p| p.into_inner());
        open.insert(
            entry.seq,
            Open {
                entry: Arc::new(entry),
                state: State::Recorded,
                since: now,
            },
        );
    }

    /// Settles one payment now (`before response`, `after response`, credit sales): the entry
    /// is `submitted` on disk before the backend is called, and its outcome is on disk before
    /// this answers.
    pub async fn settle_now(&self, seq: u64) -> Result<SettleResponse, SettleError> {
        let entry = self
            .open_entry(seq)
            .ok_or_else(|| SettleError::NotSent(format!("payment {seq} is not open")))?;
        let client = self.client(&entry.backend).await?;
        let submitted = Change {
            entry: seq,
            state: State::Submitted,
            detail: Detail::default(),
        };
        self.record(&[submitted], true)
            .await
            .map_err(|e| SettleError::NotSent(e.to_string()))?;
        let client = match client {
            Client::Facilitator(f) => f,
            Client::Rpc(rpc) => {
                let outcome = self
                    .on_chain(&rpc, std::slice::from_ref(&entry), false)
                    .await
                    .into_iter()
                    .next()
                    .map_or_else(|| Outcome::Unknown("no outcome".into()), |(_, o)| o);
                let change = match &outcome {
                    // Nothing left tollgate: the buyer is refused, the authorization untouched.
                    Outcome::NotSent(why) => failed(seq, why.clone()),
                    other => change_of(seq, other),
                };
                if let Err(e) = self.record(&[change], true).await {
                    tracing::error!(entry = seq, error = %e, "a settlement outcome could not be recorded; the entry stays submitted and is resolved by evidence after a restart");
                }
                return self.receipt(&entry, outcome);
            }
        };
        let outcome = self.call(&client, seq, false).await;
        let change = match &outcome {
            Ok(receipt) => confirmed(seq, receipt),
            // Nothing left tollgate: the authorization is untouched and the buyer is refused.
            Err(e @ SettleError::NotSent(_)) | Err(e @ SettleError::Refused(_)) => {
                failed(seq, e.reason())
            }
            Err(e @ SettleError::Unknown(_)) => Change {
                entry: seq,
                state: State::Unresolved,
                detail: reason(e.reason()),
            },
        };
        if let Err(e) = self.record(&[change], true).await {
            tracing::error!(entry = seq, error = %e, "a settlement outcome could not be recorded; the entry stays submitted and is resolved by evidence after a restart");
        }
        outcome
    }

    /// The upstream answered a paid entry's request (`upstream_status`, from `response_filter`,
    /// before the answer goes to the buyer), or the request ended without an answer (0, from
    /// `logging`). Deferred: `queued` when the upstream answered below 400, else `refunded`
    /// (the buyer is not charged for an error). `after response` entries the request did not
    /// settle are `refunded` too. Entries already past `recorded` are left alone, so a second
    /// call changes nothing.
    pub async fn request_done(&self, seq: u64, upstream_status: u16) {
        let Some(open) = self.open_state(seq) else {
            return;
        };
        if open.state != State::Recorded {
            return;
        }
        let served = (100..400).contains(&upstream_status);
        let deferred = matches!(open.entry.timing, Timing::Deferred { .. });
        let detail = Detail {
            upstream_status: (upstream_status > 0).then_some(upstream_status),
            reason: (!served).then(|| {
                if upstream_status == 0 {
                    "the upstream gave no answer; not collected".to_string()
                } else {
                    format!("the upstream answered {upstream_status}; not collected")
                }
            }),
            ..Detail::default()
        };
        let state = if deferred && served {
            State::Queued
        } else {
            State::Refunded
        };
        // Durable before the answer goes on: after a crash, `recorded` means "never answered".
        let durable = true;
        let change = Change {
            entry: seq,
            state,
            detail,
        };
        if let Err(e) = self.record(&[change], durable).await {
            tracing::error!(entry = seq, error = %e, "recording the end of a paid request failed");
        }
        if state == State::Queued {
            self.inner.wake.notify_one();
        }
    }

    fn open_state(&self, seq: u64) -> Option<Open> {
        let open = self.inner.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(&seq).cloned()
    }

    fn open_entry(&self, seq: u64) -> Option<Arc<Entry>> {
        self.open_state(seq).map(|o| o.entry)
    }

    /// One `/settle` call, measured; a bundle's calls (`bounded`) share [`MAX_CALLS`].
    async fn call(
        &self,
        client: &Facilitator,
        seq: u64,
        bounded: bool,
    ) -> Result<SettleResponse, SettleError> {
        let i = &self.inner;
        let authorization = match i.store.authorization(seq) {
            Ok(Some(a)) => a,
            Ok(None) => {
                return Err(SettleError::NotSent(format!(
                    "payment {seq} has no authorization on record"
                )));
            }
            Err(e) => return Err(SettleError::NotSent(e.to_string())),
        };
        let _permit = if bounded {
            Some(
                i.calls
                    .acquire()
                    .await
                    .map_err(|_| SettleError::NotSent("settlement is shutting down".into()))?,
            )
        } else {
            None
        };
        let started = std::time::Instant::now();
        let outcome = client
            .settle(
                authorization.version,
                &authorization.payload,
                &authorization.requirements,
            )
            .await;
        i.metrics
            .settlement_seconds
            .observe(started.elapsed().as_secs_f64());
        let result = match &outcome {
            Ok(_) => "settled",
            Err(SettleError::Refused(_)) => "refused",
            Err(SettleError::NotSent(_)) => "unavailable",
            Err(SettleError::Unknown(_)) => "unknown",
        };
        i.metrics.settlements.with([result]).inc();
        outcome
    }

    /// Records changes in the ledger and in the worker's view; releases what a final deferred
    /// entry held of its buyer's unsettled limit. When the store answers an error, the changes
    /// may still have been applied (a failed flush leaves them in sled's memory, durable with
    /// the next flush that succeeds): the entries are read back and the view follows the store.
    async fn record(&self, changes: &[Change], durable: bool) -> Result<(), StoreError> {
        let i = &self.inner;
        let now = (i.clock)();
        let recorded = i.store.record_changes(changes, now, durable).await;
        let facts = match recorded {
            Ok(Ok(facts)) => facts,
            Ok(Err(bad)) => {
                self.reconcile(changes.iter().map(|c| c.entry));
                return Err(StoreError(format!(
                    "the ledger refused a state change: {bad:?}"
                )));
            }
            Err(e) => {
                self.reconcile(changes.iter().map(|c| c.entry));
                return Err(e);
            }
        };
        let mut open = i.open.lock().unwrap_or_else(|p| p.into_inner());
        for fact in &facts {
            i.metrics.ledger_facts.with([fact.state.as_str()]).inc();
            if fact.state.is_final() {
                if let Some(gone) = open.remove(&fact.entry) {
                    self.finished(&gone.entry, fact.state, now);
                }
            } else if let Some(o) = open.get_mut(&fact.entry) {
                if o.state != fact.state {
                    o.since = now;
                }
                o.state = fact.state;
            }
        }
        Ok(())
    }

    /// Makes the worker's view of `entries` what the store says (after an error).
    fn reconcile(&self, entries: impl Iterator<Item = u64>) {
        let i = &self.inner;
        let now = (i.clock)();
        let mut open = i.open.lock().unwrap_or_else(|p| p.into_inner());
        for seq in entries {
            let status = match i.store.payment(seq) {
                Ok(Some(row)) => row.status,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(entry = seq, error = %e, "cannot read a payment back after a store error");
                    continue;
                }
            };
            if status.state.is_final() {
                if let Some(gone) = open.remove(&seq) {
                    self.finished(&gone.entry, status.state, now);
                }
            } else if let Some(o) = open.get_mut(&seq) {
                o.state = status.state;
                o.since = status.since;
            }
        }
    }

    fn finished(&self, entry: &Entry, state: State, now: u64) {
        let i = &self.inner;
        if matches!(entry.timing, Timing::Deferred { .. }) {
            i.limiter
                .release_unsettled(&BuyerId::Payer(entry.payer), &entry.symbol, entry.amount);
        }
        if state == State::Confirmed {
            i.metrics
                .revenue
                .with([entry.symbol.as_str(), entry.network.as_str()])
                .inc_by(u64::try_from(entry.amount).unwrap_or(u64::MAX));
            i.metrics
                .settlement_lag_seconds
                .observe(now.saturating_sub(entry.at) as f64);
        }
    }

    /// The worker: closes and settles bundles until shutdown.
    pub async fn run(&self, mut shutdown: ShutdownWatch) {
        let mut bundles = tokio::task::JoinSet::new();
        let mut evidence: Option<tokio::task::JoinHandle<()>> = None;
        let mut examined_at = 0;
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                () = self.inner.wake.notified() => {}
                () = tokio::time::sleep(TICK) => {}
            }
            while bundles.try_join_next().is_some() {}
            let now = (self.inner.clock)();
            for bundle in self.close_bundles(now).await {
                let me = self.clone();
                bundles.spawn(async move { me.settle_bundle(bundle).await });
            }
            // Reading the chain may take a while: in its own task, one at a time, so bundles
            // keep closing meanwhile.
            if now >= examined_at + EVIDENCE_EVERY_SECS
                && evidence.as_ref().is_none_or(|task| task.is_finished())
            {
                examined_at = now;
                let me = self.clone();
                evidence = Some(tokio::spawn(
                    async move { me.resolve_by_evidence(now).await },
                ));
            }
            self.refresh_gauges(now);
        }
        // Bundles in flight finish their calls (each bounded by SETTLE_TIMEOUT) if the
        // runtime lets them; what is cut off is `submitted`, resolved by evidence later.
        while bundles.join_next().await.is_some() {}
    }

    /// Closes every bundle whose rule says so; submits each durably.
    async fn close_bundles(&self, now: u64) -> Vec<Bundle> {
        let i = &self.inner;
        let mut groups: HashMap<BundleKey, Vec<Open>> = HashMap::new();
        {
            let open = i.open.lock().unwrap_or_else(|p| p.into_inner());
            let backends = i.backends.lock().unwrap_or_else(|p| p.into_inner());
            // A payment that looks expired by this host's clock is submitted all the same: a
            // clock that jumped ahead must not write off what buyers were served for. The
            // chain's clock decides (the facilitator, or the simulation before a transaction,
            // refuses an expired authorization and the entry is `failed` with its reason).
            for o in open.values().filter(|o| o.state == State::Queued) {
                if o.entry.valid_after >= now {
                    continue; // not valid on chain yet
                }
                if backends
                    .get(&o.entry.backend)
                    .is_some_and(|b| b.down_until > now)
                {
                    continue;
                }
                groups
                    .entry(BundleKey::of(&o.entry))
                    .or_default()
                    .push(o.clone());
            }
        }
        let mut submitted = Vec::new();
        let free = i.calls.available_permits();
        let mut ready: Vec<(Vec<&Open>, &'static str)> = Vec::new();
        for group in groups.values() {
            let mut queue: Vec<&Open> = group.iter().collect();
            queue.sort_by_key(|o| o.entry.seq);
            ready.extend(plan_bundles(&queue, free, now));
        }
        for (refs, closed_by) in ready {
            let Some(first) = refs.first() else { continue };
            let e = &first.entry;
            let bundle = Bundle {
                id: 0,
                at: now,
                backend: e.backend.clone(),
                network: e.network.clone(),
                asset: e.asset,
                symbol: e.symbol.clone(),
                decimals: e.decimals,
                pay_to: e.pay_to,
                entries: refs.iter().map(|o| o.entry.seq).collect(),
                total: refs.iter().map(|o| o.entry.amount).sum(),
                closed_by: closed_by.into(),
            };
            match i.store.submit_bundle(bundle, now).await {
                Ok(Ok(bundle)) => {
                    let mut open = i.open.lock().unwrap_or_else(|p| p.into_inner());
                    for seq in &bundle.entries {
                        if let Some(o) = open.get_mut(seq) {
                            o.state = State::Submitted;
                            o.since = now;
                        }
                    }
                    i.metrics
                        .ledger_facts
                        .with(["submitted"])
                        .inc_by(bundle.entries.len() as u64);
                    i.metrics
                        .bundle_payments
                        .observe(bundle.entries.len() as f64);
                    i.metrics.bundles.with([bundle.symbol.as_str()]).inc();
                    i.metrics
                        .bundle_value
                        .with([bundle.symbol.as_str()])
                        .inc_by(u64::try_from(bundle.total).unwrap_or(u64::MAX));
                    tracing::info!(
                        bundle = bundle.id,
                        payments = bundle.entries.len(),
                        total = %bundle.total,
                        asset = %bundle.symbol,
                        network = %bundle.network,
                        closed_by = %bundle.closed_by,
                        "settlement bundle submitted"
                    );
                    submitted.push(bundle);
                }
                Ok(Err(bad)) => {
                    tracing::error!(
                        ?bad,
                        "the ledger refused a bundle; its payments stay queued"
                    );
                    self.reconcile(refs.iter().map(|o| o.entry.seq));
                }
                Err(e) => {
                    // Maybe applied and not durable: follow the store. Entries it shows
                    // `submitted` are resolved like any unknown outcome after a restart.
                    tracing::error!(error = %e, "submitting a bundle failed; its payments stay queued");
                    self.reconcile(refs.iter().map(|o| o.entry.seq));
                }
            }
        }
        submitted
    }

    /// Settles every payment of a submitted bundle and records each outcome.
    async fn settle_bundle(&self, bundle: Bundle) {
        let client = match self.client(&bundle.backend).await {
            Ok(Client::Facilitator(f)) => f,
            Ok(Client::Rpc(rpc)) => return self.settle_bundle_on_chain(&rpc, bundle).await,
            Err(e) => {
                // No call was made: back to the queue.
                let back: Vec<Change> = bundle
                    .entries
                    .iter()
                    .map(|&seq| requeued(seq, e.reason()))
                    .collect();
                let _ = self.record(&back, true).await;
                return;
            }
        };
        let mut calls = tokio::task::JoinSet::new();
        for &seq in &bundle.entries {
            let me = self.clone();
            let client = client.clone();
            calls.spawn(async move { (seq, me.call(&client, seq, true).await) });
        }
        let mut changes = Vec::new();
        let mut unreachable: Option<String> = None;
        let mut confirmed_count = 0usize;
        while let Some(done) = calls.join_next().await {
            let Ok((seq, outcome)) = done else {
                continue; // its entry is found unanswered below
            };
            changes.push(match outcome {
                Ok(receipt) => {
                    confirmed_count += 1;
                    confirmed(seq, &receipt)
                }
                Err(e @ SettleError::Refused(_)) => failed(seq, e.reason()),
                Err(e @ SettleError::NotSent(_)) => {
                    unreachable = Some(e.reason());
                    requeued(seq, e.reason())
                }
                Err(e @ SettleError::Unknown(_)) => Change {
                    entry: seq,
                    state: State::Unresolved,
                    detail: reason(e.reason()),
                },
            });
        }
        // A call whose task failed: nobody knows what it did.
        for &seq in &bundle.entries {
            if !changes.iter().any(|c| c.entry == seq) {
                changes.push(Change {
                    entry: seq,
                    state: State::Unresolved,
                    detail: reason("outcome unknown: the settlement task failed".into()),
                });
            }
        }
        changes.sort_by_key(|c| c.entry);
        if let Err(e) = self.record(&changes, true).await {
            tracing::error!(bundle = bundle.id, error = %e, "recording a bundle's outcomes failed; its payments stay submitted and are resolved by evidence after a restart");
        }
        self.backend_reached(&bundle.backend, unreachable.as_deref());
        tracing::info!(
            bundle = bundle.id,
            payments = bundle.entries.len(),
            confirmed = confirmed_count,
            "settlement bundle done"
        );
    }

    /// Decides unresolved payments from the chain, when a node is configured: settled there
    /// (`confirmed`, with its transaction and block), used otherwise or expired unused
    /// (`failed`), or — for a deferred payment whose buyer was served — unused and still valid:
    /// submitted again (the token's nonce makes a second transfer impossible). A payment whose
    /// buyer was refused (`before`/`after response`) is never submitted again.
    async fn resolve_by_evidence(&self, now: u64) {
        // Relayers first: a transaction nobody watches may block every later one.
        let relayers: Vec<Arc<Rpc>> = self
            .lock_backends()
            .values()
            .filter_map(|b| match &b.client {
                Some(Client::Rpc(rpc)) => Some(rpc.clone()),
                _ => None,
            })
            .collect();
        for rpc in relayers {
            if let Err(e) = rpc.tend().await {
                tracing::debug!(error = %e, "looking for leftover relayer transactions failed");
            }
        }
        let mut unresolved: Vec<Arc<Entry>> = {
            let open = self.inner.open.lock().unwrap_or_else(|p| p.into_inner());
            open.values()
                .filter(|o| o.state == State::Unresolved)
                .map(|o| o.entry.clone())
                .collect()
        };
        // The soonest to expire first: a round may be cut short (a restart, a crash loop), and
        // a payment examined too late cannot be settled any more.
        unresolved.sort_by_key(|e| (e.valid_before, e.seq));
        let mut verdicts = self.verdicts(&unresolved).await;
        // Those the batch showed unused first: sending them again is what a life cut short by
        // the next crash must get done.
        let unused = |e: &Entry, verdicts: &HashMap<u64, evidence::Verdict>| {
            matches!(verdicts.get(&e.seq), Some(evidence::Verdict::Unused { .. }))
        };
        unresolved.sort_by_key(|e| (!unused(e, &verdicts), e.valid_before, e.seq));
        // Whether a backend's relayer has transactions of an earlier run in the pool, asked once
        // per round (it changes only when they are tended, at the start of the round).
        let mut busy: HashMap<String, bool> = HashMap::new();
        // Deferred payments the chain shows unused, to submit again; batches already sent.
        let mut again = Vec::new();
        let mut sending = tokio::task::JoinSet::new();
        // Decisions, recorded together (one durable write per chunk, not one per payment).
        let mut decided: Vec<(Change, Arc<Entry>)> = Vec::new();
        for entry in unresolved {
            let verdict = match verdicts.remove(&entry.seq) {
                Some(verdict) => verdict,
                None => {
                    // Not in a batch (its node could not answer one): on its own.
                    let Some(chain) = self.evidence_for(&entry).await else {
                        continue;
                    };
                    match chain
                        .examine(
                            &evidence::Subject::from(entry.as_ref()),
                            self.inner.relayer.confirmations,
                        )
                        .await
                    {
                        Ok(v) => v,
                        Err(e) => {
                            tracing::warn!(entry = entry.seq, error = %e, "reading evidence for an unresolved payment failed; trying again later");
                            continue;
                        }
                    }
                }
            };
            let seq = entry.seq;
            let deferred = matches!(entry.timing, Timing::Deferred { .. });
            let change = match verdict {
                evidence::Verdict::Settled { tx, block } => Change {
                    entry: seq,
                    state: State::Confirmed,
                    detail: Detail {
                        reason: Some(format!(
                            "evidence: AuthorizationUsed and the transfer in {tx}"
                        )),
                        tx: Some(tx),
                        block: Some(block),
                        ..Detail::default()
                    },
                },
                evidence::Verdict::UsedOtherwise { why } => failed(seq, format!("evidence: {why}")),
                // Expired by a margin on the chain's clock (not this host's, which may have
                // jumped): a transaction already sent may still be mined in a block stamped
                // before `validBefore` (block lag).
                evidence::Verdict::Unused { chain_time }
                    if entry.valid_before.saturating_add(EXPIRY_MARGIN_SECS) <= chain_time =>
                {
                    failed(
                        seq,
                        "evidence: the nonce is unused and the authorization expired; it never settled"
                            .into(),
                    )
                }
                // Too late to submit, too early to call it never settled: by the chain's clock,
                // which decides, not this host's (a clock stepped ahead must not stop a
                // still-valid payment from being sent again).
                evidence::Verdict::Unused { chain_time }
                    if entry.valid_before <= chain_time.saturating_add(MIN_VALIDITY_SECS) =>
                {
                    continue;
                }
                evidence::Verdict::Unused { .. } if deferred && entry.valid_after < now => {
                    let relayer_busy = match busy.get(&entry.backend) {
                        Some(&known) => known,
                        None => {
                            let known = self.relayer_busy(&entry).await;
                            busy.insert(entry.backend.clone(), known);
                            known
                        }
                    };
                    if relayer_busy {
                        continue; // a transaction of ours may still carry it: wait for it
                    }
                    again.push(entry);
                    // Sent as they are found, without waiting for the last to be mined:
                    // the soonest to expire come first, and a life cut short by a crash must
                    // have sent them.
                    if again.len() >= AGAIN_EVERY {
                        let (me, batch) = (self.clone(), std::mem::take(&mut again));
                        sending.spawn(async move { me.settle_again(batch).await });
                    }
                    continue;
                }
                evidence::Verdict::Unused { .. } => continue,
                evidence::Verdict::Unclear { why } => {
                    tracing::warn!(entry = seq, why, "an unresolved payment stays unresolved");
                    continue;
                }
            };
            decided.push((change, entry));
        }
        if !again.is_empty() {
            let me = self.clone();
            sending.spawn(async move { me.settle_again(again).await });
        }
        // Decisions first, while what was sent again is being mined: a kill now must not lose
        // them (they would only be read again, but sales would wait for their credits and
        // buyers' unsettled holds for their release).
        for chunk in decided.chunks(EVIDENCE_BATCH) {
            let changes: Vec<Change> = chunk.iter().map(|(c, _)| c.clone()).collect();
            let recorded: Vec<&(Change, Arc<Entry>)> = match self.record(&changes, true).await {
                Ok(()) => chunk.iter().collect(),
                // One refused change must not hold back the others: each on its own.
                Err(_) => {
                    let mut recorded = Vec::new();
                    for decision in chunk {
                        match self.record(std::slice::from_ref(&decision.0), true).await {
                            Ok(()) => recorded.push(decision),
                            Err(e) => {
                                tracing::error!(entry = decision.1.seq, error = %e, "recording evidence failed; it is read again next round");
                            }
                        }
                    }
                    recorded
                }
            };
            for (change, entry) in recorded {
                if change.state == State::Confirmed {
                    self.credit_sale(entry).await;
                }
            }
        }
        // The round ends when what it sent again is decided.
        while sending.join_next().await.is_some() {}
    }

    /// What the chain says about `entries`, read in batches ([`evidence::Chain::examine_all`])
    /// per node and chain, keyed by ledger sequence. An entry missing here (its node could not
    /// answer the batch) is examined on its own.
    async fn verdicts(&self, entries: &[Arc<Entry>]) -> HashMap<u64, evidence::Verdict> {
        // (node, chain id) → the node and its entries.
        type Groups = HashMap<(String, u64), (evidence::Chain, Vec<Arc<Entry>>)>;
        let mut groups = Groups::new();
        for entry in entries {
            let Some(chain) = self.evidence_for(entry).await else {
                continue;
            };
            let node = match onchain::node_url(&entry.backend) {
                Some(_) => entry.backend.clone(),
                None => String::new(), // `settlement.rpc`
            };
            groups
                .entry((node, entry.chain_id))
                .or_insert_with(|| (chain, Vec::new()))
                .1
                .push(entry.clone());
        }
        let mut verdicts = HashMap::new();
        for (chain, group) in groups.into_values() {
            for batch in group.chunks(EVIDENCE_BATCH) {
                let subjects: Vec<evidence::Subject> = batch
                    .iter()
                    .map(|e| evidence::Subject::from(e.as_ref()))
                    .collect();
                match chain
                    .examine_all(&subjects, self.inner.relayer.confirmations)
                    .await
                {
                    Ok(found) => {
                        verdicts.extend(batch.iter().map(|e| e.seq).zip(found));
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "a batched read of evidence failed; each payment is examined on its own");
                    }
                }
            }
        }
        verdicts
    }

    /// The node that can tell what became of `entry`: its own (`settle via rpc`), else
    /// `settlement.rpc`; only when that node is on the entry's chain.
    async fn evidence_for(&self, entry: &Entry) -> Option<evidence::Chain> {
        if onchain::node_url(&entry.backend).is_some() {
            return match self.client(&entry.backend).await {
                Ok(Client::Rpc(rpc)) => {
                    (rpc.chain_id() == entry.chain_id).then(|| rpc.evidence().clone())
                }
                _ => None,
            };
        }
        let url = self.inner.evidence_url.clone()?;
        let known = {
            let mut chains = self
                .inner
                .evidence
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if !chains.contains_key(&url) {
                match evidence::Chain::new(&url) {
                    Ok(chain) => {
                        chains.insert(url.clone(), (chain, None));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the evidence node cannot be used");
                        return None;
                    }
                }
            }
            chains.get(&url).cloned()
        };
        let (chain, chain_id) = known?;
        let chain_id = match chain_id {
            Some(id) => id,
            None => match chain.chain_id().await {
                Ok(id) => {
                    if let Some(known) = self
                        .inner
                        .evidence
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_mut(&url)
                    {
                        known.1 = Some(id);
                    }
                    id
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the settlement RPC node cannot be read; unresolved payments wait");
                    return None;
                }
            },
        };
        (chain_id == entry.chain_id).then_some(chain)
    }

    /// Whether `entry` settles through a relayer that has transactions in the node's pool
    /// (or cannot be asked): one of them may carry the authorization, sent before a crash.
    async fn relayer_busy(&self, entry: &Entry) -> bool {
        if onchain::node_url(&entry.backend).is_none() {
            return false;
        }
        match self.client(&entry.backend).await {
            Ok(Client::Rpc(rpc)) => rpc.has_leftovers().await.unwrap_or(true),
            Ok(Client::Facilitator(_)) => false,
            Err(_) => true,
        }
    }

    /// Submits again the unresolved deferred payments whose nonces the chain shows unused. A
    /// crash can leave whole bundles unresolved: on chain they go again as bundles, one
    /// transaction per backend, chain, asset and payee (at most [`MAX_AGAIN`] payments each,
    /// the soonest to expire first) — one transaction per payment, one after the other, let
    /// the last ones expire unsettled (found by the crash cycles, `tests/it/e2e/crash_cycles.rs`).
    /// Through a facilitator, one call each.
    async fn settle_again(&self, mut entries: Vec<Arc<Entry>>) {
        entries.sort_by_key(|e| (e.valid_before, e.seq));
        let mut groups: Vec<(BundleKey, Vec<Arc<Entry>>)> = Vec::new();
        for entry in entries {
            let key = BundleKey::of(&entry);
            let key = BundleKey {
                rule: String::new(),
                ..key
            };
            match groups
                .iter_mut()
                .find(|(k, g)| *k == key && g.len() < MAX_AGAIN)
            {
                Some((_, group)) => group.push(entry),
                None => groups.push((key, vec![entry])),
            }
        }
        for (key, group) in groups {
            let again: Vec<Change> = group
                .iter()
                .map(|e| Change {
                    entry: e.seq,
                    state: State::Submitted,
                    detail: reason(
                        "evidence: the nonce is unused on chain; submitted again".into(),
                    ),
                })
                .collect();
            if self.record(&again, true).await.is_err() {
                continue;
            }
            let unresolved = |seq: u64, why: String| Change {
                entry: seq,
                state: State::Unresolved,
                detail: reason(why),
            };
            let changes: Vec<Change> = match self.client(&key.backend).await {
                Ok(Client::Rpc(rpc)) => self
                    .on_chain(&rpc, &group, true)
                    .await
                    .into_iter()
                    .map(|(seq, outcome)| match outcome {
                        Outcome::Confirmed { .. } => change_of(seq, &outcome),
                        // Refused now may mean the first attempt landed meanwhile: the chain
                        // decides.
                        Outcome::Failed(why) | Outcome::NotSent(why) | Outcome::Unknown(why) => {
                            unresolved(seq, why)
                        }
                    })
                    .collect(),
                Ok(Client::Facilitator(client)) => {
                    let mut changes = Vec::with_capacity(group.len());
                    for entry in &group {
                        changes.push(match self.call(&client, entry.seq, true).await {
                            Ok(receipt) => confirmed(entry.seq, &receipt),
                            // Refused now may mean the first attempt landed meanwhile.
                            Err(e) => unresolved(entry.seq, e.reason()),
                        });
                    }
                    changes
                }
                Err(e) => group
                    .iter()
                    .map(|entry| unresolved(entry.seq, e.reason()))
                    .collect(),
            };
            if let Err(e) = self.record(&changes, true).await {
                tracing::error!(error = %e, "recording settlement outcomes failed");
            }
        }
    }

    /// Settles `entries` on chain in one transaction (see [`onchain`]); counts and times it.
    /// A bundle (`bounded`) takes one of the [`MAX_CALLS`] permits.
    async fn on_chain(
        &self,
        rpc: &Rpc,
        entries: &[Arc<Entry>],
        bounded: bool,
    ) -> Vec<(u64, Outcome)> {
        let i = &self.inner;
        let mut outcomes = Vec::new();
        let mut batch = Vec::with_capacity(entries.len());
        for entry in entries {
            match i.store.authorization(entry.seq) {
                Ok(Some(a)) => match evm::Transfer3009::of(entry, &a) {
                    Ok(t) => batch.push(t),
                    Err(why) => outcomes.push((entry.seq, Outcome::Failed(why))),
                },
                Ok(None) => outcomes.push((
                    entry.seq,
                    Outcome::Failed("no authorization on record".into()),
                )),
                Err(e) => outcomes.push((entry.seq, Outcome::NotSent(e.to_string()))),
            }
        }
        let _permit = if bounded {
            match i.calls.acquire().await {
                Ok(p) => Some(p),
                Err(_) => {
                    outcomes.extend(batch.iter().map(|t| {
                        (
                            t.seq,
                            Outcome::NotSent("settlement is shutting down".into()),
                        )
                    }));
                    return outcomes;
                }
            }
        } else {
            None
        };
        let started = std::time::Instant::now();
        let settled = rpc.settle(batch).await;
        i.metrics
            .settlement_seconds
            .observe(started.elapsed().as_secs_f64());
        let mut gas_counted = std::collections::HashSet::new();
        for (_, outcome) in &settled {
            let result = match outcome {
                Outcome::Confirmed { tx, gas_used, .. } => {
                    if let Some(gas) = gas_used
                        && gas_counted.insert(*tx)
                    {
                        i.metrics.settlement_gas.inc_by(*gas);
                    }
                    "settled"
                }
                Outcome::Failed(_) => "refused",
                Outcome::NotSent(_) => "unavailable",
                Outcome::Unknown(_) => "unknown",
            };
            i.metrics.settlements.with([result]).inc();
        }
        outcomes.extend(settled);
        outcomes
    }

    /// A deferred bundle settled on chain: one transaction, each outcome recorded.
    async fn settle_bundle_on_chain(&self, rpc: &Rpc, bundle: Bundle) {
        let mut entries = Vec::with_capacity(bundle.entries.len());
        let mut changes = Vec::new();
        for &seq in &bundle.entries {
            match self.open_entry(seq) {
                Some(entry) => entries.push(entry),
                None => match self.inner.store.payment(seq) {
                    Ok(Some(row)) => entries.push(Arc::new(row.entry)),
                    _ => changes.push(Change {
                        entry: seq,
                        state: State::Unresolved,
                        detail: reason("outcome unknown: the entry could not be read".into()),
                    }),
                },
            }
        }
        let outcomes = self.on_chain(rpc, &entries, true).await;
        // Nothing could be sent (node down, fees above the cap): wait before trying again.
        let not_sent: Vec<&str> = outcomes
            .iter()
            .filter_map(|(_, o)| match o {
                Outcome::NotSent(why) => Some(why.as_str()),
                _ => None,
            })
            .collect();
        let unreachable = (!outcomes.is_empty() && not_sent.len() == outcomes.len())
            .then(|| not_sent.first().map(|w| w.to_string()).unwrap_or_default());
        let confirmed_count = outcomes
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Confirmed { .. }))
            .count();
        let tx = outcomes.iter().find_map(|(_, o)| match o {
            Outcome::Confirmed { tx, .. } => Some(*tx),
            _ => None,
        });
        changes.extend(outcomes.iter().map(|(seq, o)| change_of(*seq, o)));
        changes.sort_by_key(|c| c.entry);
        if let Err(e) = self.record(&changes, true).await {
            tracing::error!(bundle = bundle.id, error = %e, "recording a bundle's outcomes failed; its payments stay submitted and are resolved by evidence after a restart");
        }
        self.backend_reached(&bundle.backend, unreachable.as_deref());
        tracing::info!(
            bundle = bundle.id,
            payments = bundle.entries.len(),
            confirmed = confirmed_count,
            tx = ?tx,
            "settlement bundle done"
        );
    }

    /// The receipt a buyer gets for a payment settled on chain now, or why it was refused.
    fn receipt(&self, entry: &Entry, outcome: Outcome) -> Result<SettleResponse, SettleError> {
        let version = self
            .inner
            .store
            .authorization(entry.seq)
            .ok()
            .flatten()
            .map_or(2, |a| a.version);
        let network = if version == 1 {
            entry.network.clone()
        } else {
            format!("eip155:{}", entry.chain_id)
        };
        let answer =
            |success: bool, error_reason: Option<String>, transaction: String| SettleResponse {
                success,
                error_reason,
                payer: Some(entry.payer.to_string()),
                transaction,
                network: network.clone(),
            };
        match outcome {
            Outcome::Confirmed { tx, .. } => Ok(answer(true, None, tx.to_string())),
            Outcome::Failed(why) => {
                let code = why.split(':').next().unwrap_or("reverted").to_string();
                Err(SettleError::Refused(answer(
                    false,
                    Some(code),
                    String::new(),
                )))
            }
            Outcome::NotSent(why) => Err(SettleError::NotSent(why)),
            Outcome::Unknown(why) => Err(SettleError::Unknown(why)),
        }
    }

    /// Records whether a backend could be used: `Some(why)` when nothing could be sent, which
    /// holds its payments back with backoff.
    fn backend_reached(&self, url: &str, not_sent: Option<&str>) {
        let now = (self.inner.clock)();
        let mut backends = self
            .inner
            .backends
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(b) = backends.get_mut(url) {
            if let Some(why) = not_sent {
                b.down_until = now + b.backoff_secs;
                tracing::warn!(
                    backend = %relayer::redact_url(url),
                    retry_in_secs = b.backoff_secs,
                    error = why,
                    "nothing could be sent to the settlement backend; its payments stay queued"
                );
                b.backoff_secs = (b.backoff_secs * 2).min(MAX_BACKOFF_SECS);
            } else {
                b.down_until = 0;
                b.backoff_secs = FIRST_BACKOFF_SECS;
            }
        }
    }

    /// Refreshes the gauges that describe the open entries.
    fn refresh_gauges(&self, now: u64) {
        let i = &self.inner;
        let open = i.open.lock().unwrap_or_else(|p| p.into_inner());
        let mut by_state: HashMap<State, i64> = HashMap::new();
        let mut unsettled: HashMap<(&str, &str), u128> = HashMap::new();
        let mut oldest = now;
        for o in open.values() {
            *by_state.entry(o.state).or_default() += 1;
            *unsettled
                .entry((o.entry.symbol.as_str(), o.entry.network.as_str()))
                .or_default() += o.entry.amount;
            oldest = oldest.min(o.entry.at);
        }
        for state in [
            State::Recorded,
            State::Queued,
            State::Submitted,
            State::Unresolved,
        ] {
            i.metrics
                .payments_open
                .with([state.as_str()])
                .set(by_state.get(&state).copied().unwrap_or(0));
        }
        // Series once set go back to 0 rather than vanish: dashboards keep their line.
        let mut shown = i.unsettled_shown.lock().unwrap_or_else(|p| p.into_inner());
        for (symbol, network) in shown.iter() {
            if !unsettled.contains_key(&(symbol.as_str(), network.as_str())) {
                i.metrics.unsettled.with([symbol, network]).set(0);
            }
        }
        for ((symbol, network), value) in unsettled {
            shown.insert((symbol.to_string(), network.to_string()));
            i.metrics
                .unsettled
                .with([symbol, network])
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        }
        i.metrics
            .oldest_unsettled_seconds
            .set(i64::try_from(now.saturating_sub(oldest)).unwrap_or(i64::MAX));
    }
}

fn reason(text: String) -> Detail {
    Detail {
        reason: Some(text),
        ..Detail::default()
    }
}

fn confirmed(seq: u64, receipt: &SettleResponse) -> Change {
    Change {
        entry: seq,
        state: State::Confirmed,
        detail: Detail {
            tx: (!receipt.transaction.is_empty()).then(|| receipt.transaction.clone()),
            ..Detail::default()
        },
    }
}

/// The ledger change of an on-chain outcome (a deferred entry that was not sent is queued again).
fn change_of(seq: u64, outcome: &Outcome) -> Change {
    match outcome {
        Outcome::Confirmed {
            tx,
            block,
            gas_used,
        } => Change {
            entry: seq,
            state: State::Confirmed,
            detail: Detail {
                tx: Some(tx.to_string()),
                block: Some(*block),
                gas_used: *gas_used,
                ..Detail::default()
            },
        },
        Outcome::Failed(why) => failed(seq, why.clone()),
        Outcome::NotSent(why) => requeued(seq, why.clone()),
        Outcome::Unknown(why) => Change {
            entry: seq,
            state: State::Unresolved,
            detail: reason(why.clone()),
        },
    }
}

fn failed(seq: u64, why: String) -> Change {
    Change {
        entry: seq,
        state: State::Failed,
        detail: reason(why),
    }
}

fn requeued(seq: u64, why: String) -> Change {
    Change {
        entry: seq,
        state: State::Queued,
        detail: reason(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` queued deferred payments closed by `payments` or a 60-second window, the first
    /// `old` of them queued at 0 and the rest at 100.
    fn queue(n: usize, payments: u64, old: usize) -> Vec<Open> {
        (0..n)
            .map(|k| {
                let mut entry = Entry::sample(0, 1, 0);
                entry.seq = k as u64 + 1;
                entry.valid_before = 10_000;
                entry.timing = Timing::Deferred {
                    every_secs: Some(60),
                    payments: Some(payments),
                    value: None,
                };
                Open {
                    entry: Arc::new(entry),
                    state: State::Queued,
                    since: if k < old { 0 } else { 100 },
                }
            })
            .collect()
    }

    /// Sizes and reasons of the bundles planned at second 100.
    fn plan(open: &[Open], free_slots: usize) -> Vec<(usize, &'static str)> {
        let refs: Vec<&Open> = open.iter().collect();
        let planned = plan_bundles(&refs, free_slots, 100);
        let seqs: Vec<u64> = planned
            .iter()
            .flat_map(|(b, _)| b.iter().map(|o| o.entry.seq))
            .collect();
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1) && seqs.first().is_none_or(|&s| s == 1),
            "bundles take the queue oldest first, each payment once: {seqs:?}"
        );
        planned.iter().map(|(b, why)| (b.len(), *why)).collect()
    }

    #[test]
    fn a_tick_closes_every_bundle_the_queue_fills() {
        // Ten payments on a rule of two, eight free slots: five bundles at once, not one.
        assert_eq!(plan(&queue(10, 2, 0), 8), vec![(2, "count"); 5]);
        // An odd one out stays queued until its window closes it.
        assert_eq!(plan(&queue(7, 2, 0), 16), vec![(2, "count"); 3]);
        assert_eq!(
            plan(&queue(7, 2, 7), 16),
            vec![(2, "count"), (2, "count"), (2, "count"), (1, "window")]
        );
    }

    #[test]
    fn no_bundle_closes_while_every_call_slot_is_busy() {
        assert_eq!(plan(&queue(5_000, 2, 5_000), 0), vec![]);
    }

    #[test]
    fn a_backlog_is_spread_over_the_free_slots_in_fuller_bundles() {
        // 100 payments, rule of 10, 4 free slots: bundles of 25, not ten of 10 waiting in line.
        assert_eq!(plan(&queue(100, 10, 0), 4), vec![(25, "count"); 4]);
        // One free slot takes the whole queue, up to the most a bundle holds.
        assert_eq!(plan(&queue(30, 10, 0), 1), vec![(30, "count")]);
        assert_eq!(
            plan(&queue(2_005, 10, 0), 1),
            vec![(MAX_BUNDLE, "count"), (MAX_BUNDLE, "count")]
        );
        // What is left short of the rule waits for its window.
        assert_eq!(
            plan(&queue(2_005, 10, 2_005), 1),
            vec![(MAX_BUNDLE, "count"), (MAX_BUNDLE, "count"), (5, "window")]
        );
    }

    #[test]
    fn a_short_queue_waits_for_its_rule() {
        assert_eq!(plan(&queue(9, 10, 0), 16), vec![]);
        assert_eq!(plan(&queue(9, 10, 1), 16), vec![(9, "window")]);
        assert_eq!(plan(&[], 16), vec![]);
    }
}
