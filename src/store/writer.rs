//! The store's writer thread: the one place that flushes, and the one place that debits.
//!
//! Group commit. Callers queue a job and await its answer; the writer takes everything queued,
//! applies all the debits in one sled transaction and all the payment records and ledger
//! changes in another, flushes once (fsync), and answers them all.
//! N concurrent debits cost one transaction and one fsync rather than N of each — and that is
//! what the prepaid and paid routes' throughput hangs on, because sled 0.34 runs every
//! multi-tree transaction under a process-wide lock (README, Performance). Other writes
//! (top-ups, refunds, keys, bundles) are made by their callers, which then queue a flush and
//! await it.
//!
//! A charged debit is answered only after its flush succeeded. When the flush fails (or the turn
//! fails unexpectedly), every debit of the batch gets the error and those charged are taken
//! back (in memory at least; the refund becomes durable with the next flush that succeeds), so
//! a refused request is never left charged. A request cancelled while queued is not charged;
//! one cancelled while its debit was applied gets it taken back.
//!
//! One flusher also keeps tollgate off sled 0.34's `flush_async`, which deadlocks when called
//! concurrently (sled issue #1308, fixed only on its unreleased main branch).

use std::sync::{Arc, mpsc};

use tokio::sync::oneshot;

use super::accounts::{Charge, Debit, Fact};
use super::health::{Health, describe};
use super::ledger::{self, BadTransition, Change, ChangeSet, PaymentRecord, Recorded};
use super::{StoreError, Trees};

enum Job {
    /// Answered once the writes made before it was queued are on disk.
    Flush(oneshot::Sender<Result<(), StoreError>>),
    Debit {
        charge: Box<Charge>,
        now: u64,
        answer: oneshot::Sender<Result<Debit, StoreError>>,
    },
    /// A payment to record with its nonce claim; answered once on disk.
    Record {
        record: Box<PaymentRecord>,
        answer: oneshot::Sender<Result<Recorded, StoreError>>,
    },
    /// Ledger state changes; answered once on disk when `durable`.
    Change {
        set: ChangeSet,
        durable: bool,
        answer: oneshot::Sender<Result<Result<Vec<ledger::Fact>, BadTransition>, StoreError>>,
    },
}

type ChangeAnswer = oneshot::Sender<Result<Result<Vec<ledger::Fact>, BadTransition>, StoreError>>;

/// The handle to the writer thread; dropping it stops the thread and waits for it.
pub(super) struct Writer {
    /// `None` only while dropping.
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    pub(super) fn start(trees: Arc<Trees>, health: Arc<Health>) -> Result<Writer, StoreError> {
        let (jobs, queue) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("store writer".into())
            .spawn(move || run(&trees, &health, &queue))
            .map_err(|e| StoreError(format!("cannot start the store's writer thread: {e}")))?;
        Ok(Writer {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    fn send(&self, job: Job) -> Result<(), StoreError> {
        self.jobs
            .as_ref()
            .and_then(|jobs| jobs.send(job).ok())
            .ok_or_else(stopped)
    }

    /// Waits until every write made before this call is on disk.
    pub(super) async fn flush(&self) -> Result<(), StoreError> {
        let (answer, done) = oneshot::channel();
        self.send(Job::Flush(answer))?;
        done.await.map_err(|_| stopped())?
    }

    /// Applies a debit in the next batch; answers once it is on disk.
    pub(super) async fn debit(&self, charge: Charge, now: u64) -> Result<Debit, StoreError> {
        let (answer, done) = oneshot::channel();
        self.send(Job::Debit {
            charge: Box::new(charge),
            now,
            answer,
        })?;
        done.await.map_err(|_| stopped())?
    }
}

impl Writer {
    /// Records a payment in the next batch; answers once it is on disk.
    pub(super) async fn record(&self, record: PaymentRecord) -> Result<Recorded, StoreError> {
        let (answer, done) = oneshot::channel();
        self.send(Job::Record {
            record: Box::new(record),
            answer,
        })?;
        done.await.map_err(|_| stopped())?
    }

    /// Records ledger changes in the next batch.
    pub(super) async fn change(
        &self,
        changes: Vec<Change>,
        now: u64,
        durable: bool,
    ) -> Result<Result<Vec<ledger::Fact>, BadTransition>, StoreError> {
        let (answer, done) = oneshot::channel();
        self.send(Job::Change {
            set: ChangeSet { changes, now },
            durable,
            answer,
        })?;
        done.await.map_err(|_| stopped())?
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn stopped() -> StoreError {
    StoreError("the store's writer thread stopped".into())
}

/// Most debits applied in one transaction: a transaction holds sled's process-wide lock.
const MAX_BATCH: usize = 512;

/// One batch per turn: everything queued since the last turn, until every handle is dropped.
fn run(trees: &Trees, health: &Health, queue: &mpsc::Receiver<Job>) {
    while let Ok(first) = queue.recv() {
        let mut flushes = Vec::new();
        let mut debits = Vec::new();
        let mut answers = Vec::new();
        let mut records = Vec::new();
        let mut recorded_answers = Vec::new();
        let mut sets = Vec::new();
        let mut set_answers: Vec<(ChangeAnswer, bool)> = Vec::new();
        for job in std::iter::once(first).chain(queue.try_iter().take(MAX_BATCH - 1)) {
            match job {
                Job::Flush(answer) => flushes.push(answer),
                // A request cancelled while queued is not charged, nor recorded.
                Job::Debit { answer, .. } if answer.is_closed() => {}
                Job::Record { answer, .. } if answer.is_closed() => {}
                Job::Debit {
                    charge,
                    now,
                    answer,
                } => {
                    debits.push((*charge, now));
                    answers.push(answer);
                }
                Job::Record { record, answer } => {
                    records.push(*record);
                    recorded_answers.push(answer);
                }
                Job::Change {
                    set,
                    durable,
                    answer,
                } => {
                    sets.push(set);
                    set_answers.push((answer, durable));
                }
            }
        }
        let durable_needed = !flushes.is_empty()
            || !debits.is_empty()
            || !records.is_empty()
            || set_answers.iter().any(|(_, durable)| *durable);
        let mut results = Vec::new();
        let mut ledger_results: ledger::BatchAnswers = (Vec::new(), Vec::new());
        let turn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            results = trees.debit_batch(&debits);
            if !records.is_empty() || !sets.is_empty() {
                ledger_results = trees.ledger_batch(&records, &sets);
            }
            if durable_needed {
                trees.db.flush().map(drop).map_err(|e| describe(&e))
            } else {
                Ok(())
            }
        }));
        let flushed = turn.unwrap_or_else(|_| Err("the store's writer failed unexpectedly".into()));
        let (mut recorded, mut changed) = ledger_results;
        if recorded.len() != records.len() || changed.len() != sets.len() {
            let why = "the store's writer failed unexpectedly".to_string();
            recorded = records
                .iter()
                .map(|_| Err(StoreError(why.clone())))
                .collect();
            changed = sets.iter().map(|_| Err(StoreError(why.clone()))).collect();
        }
        if let Err(e) = &flushed {
            if health.fail(e, crate::unix_now()) {
                tracing::error!(
                    error = %e,
                    "the store cannot write: paid and prepaid requests are refused (503) until its directory takes writes again; tollgate then restarts in place to reopen it"
                );
            }
            // Fail closed: every debit of the batch gets the error; those charged are taken back.
            for (result, (_, now)) in results.iter().zip(&debits) {
                if let Ok(Debit::Charged(fact)) = result {
                    take_back(trees, fact, *now, e, false);
                }
            }
            results = debits.iter().map(|_| Err(StoreError(e.clone()))).collect();
            // Payments recorded but not durable are refused: their entries are not collected.
            for result in &recorded {
                if let Ok(Recorded::Fresh { seq }) = result {
                    not_collected(trees, *seq, e);
                }
            }
            recorded = records.iter().map(|_| Err(StoreError(e.clone()))).collect();
            for (result, (_, durable)) in changed.iter_mut().zip(&set_answers) {
                if *durable {
                    *result = Err(StoreError(e.clone()));
                }
            }
        }
        for ((answer, (_, now)), result) in answers.into_iter().zip(&debits).zip(results) {
            if let Err(Ok(Debit::Charged(fact))) = answer.send(result) {
                take_back(
                    trees,
                    &fact,
                    *now,
                    "the request was cancelled while it was debited",
                    true,
                );
            }
        }
        for (answer, result) in recorded_answers.into_iter().zip(recorded) {
            if let Err(Ok(Recorded::Fresh { seq })) = answer.send(result) {
                not_collected(
                    trees,
                    seq,
                    "the request was cancelled while its payment was recorded",
                );
            }
        }
        for ((answer, _), result) in set_answers.into_iter().zip(changed) {
            let _ = answer.send(result);
        }
        for answer in flushes {
            let _ = answer.send(flushed.clone().map_err(StoreError));
        }
    }
}

/// Marks a recorded payment whose request will not be served as not collected (`refunded`);
/// durable with the next flush that succeeds.
fn not_collected(trees: &Trees, seq: u64, why: &str) {
    let now = crate::unix_now();
    let set = ChangeSet {
        changes: vec![Change {
            entry: seq,
            state: ledger::State::Refunded,
            detail: ledger::Detail {
                reason: Some(format!("not collected: {why}")),
                ..ledger::Detail::default()
            },
        }],
        now,
    };
    let (_, answers) = trees.ledger_batch(&[], &[set]);
    match answers.into_iter().next() {
        Some(Ok(Ok(_))) => tracing::warn!(
            entry = seq,
            why,
            "a payment's request will not be served; it is not collected"
        ),
        other => {
            tracing::error!(entry = seq, why, outcome = ?other, "a payment whose request will not be served could not be marked: it stays recorded")
        }
    }
}

/// Refunds a debit whose request will not be served (durable with the next flush that
/// succeeds).
///
/// `durable`: whether the debit reached the disk. One that did not (its flush failed) and
/// cannot be taken back either is gone anyway once the failed store is reopened.
fn take_back(trees: &Trees, fact: &Fact, now: u64, why: &str, durable: bool) {
    match trees.refund(fact.seq, now) {
        Ok(_) => tracing::warn!(
            debit = fact.seq,
            account = fact.account,
            why,
            "a debit was taken back"
        ),
        Err(e) if !durable => tracing::debug!(
            debit = fact.seq,
            account = fact.account,
            error = %e,
            "a debit that never reached the disk stays in memory until the store is reopened"
        ),
        Err(e) => tracing::error!(
            debit = fact.seq,
            account = fact.account,
            why,
            error = %e,
            "a debit could not be taken back: the account stays charged for a request that was not served"
        ),
    }
}
