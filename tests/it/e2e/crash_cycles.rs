//! Crash cycles across every rail at once: mixed load (free, prepaid, x402 `after response`,
//! x402 `deferred`, credit sales with and without a key) against one sidecar settling on the
//! dev chain through its relayer, `kill -9`ed at a random moment of each cycle and started
//! again on the same store. Proves, after every kill:
//! - `tollgate ledger verify` and `tollgate credits audit`, run on the store the kill left,
//!   find nothing broken;
//! - every x402 payment a client was served (2xx) is refused when sent again
//!   (`payment_replayed`): its nonce is still claimed;
//! - the credit ledger: every served prepaid call has exactly one debit naming its request id,
//!   no request id is debited twice (a debit whose response the kill swallowed is allowed: it
//!   is on the books), and the balance is top-ups − debits + refunds of the facts read;
//! - every served credit sale's top-up (reference `x402:<network>:<payer>:<nonce>`) exists
//!   exactly once, in the account the buyer was told.
//!
//! and at the end, once deferred settlement drained: the chain's `AuthorizationUsed` events of
//! the buyer are exactly the ledger's confirmed entries (each nonce once, each in the
//! transaction the ledger names, sent by the relayer), every served x402 payment is among them,
//! the token's transfers to `pay_to` are those entries and their sum, the reconciliation
//! export's confirmed totals equal the transfers, and the upstream saw nothing unpaid.
//!
//! The kill moments come from a seeded generator: the seed is printed;
//! `TOLLGATE_CRASH_SEED=<seed>` replays a run's moments, `TOLLGATE_CRASH_CYCLES=<n>` runs
//! more cycles (default 20).
//!
//! A credit sale in flight at a kill is credited once the chain shows it paid: by evidence
//! after the restart, or by the restart itself when it was confirmed and not yet credited (see
//! [`books_are_sound`] and `a_sale_killed_in_flight_is_credited_after_restart`).
//!
//! A crash loop longer than the authorizations' validity (100 cycles of ~1.8 s, seed 20261201)
//! passes too: each restart's evidence round decides the whole backlog of `unresolved`
//! payments in a few batched reads (`evidence::Chain::examine_all`) and sends the unused ones
//! again before the next kill. Reading each payment on its own (a log query and a receipt
//! apiece) let the backlog outgrow what a ~1.8 s life could drain, and the oldest served
//! payments expired unsettled.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::chain_relayer::{entries, metric, pay_to};
use super::chain_relayer_faults::books_match_the_chain;
use super::harness::Sidecar;
use super::mixed::{Mix, Rail, SOLD, Seen, Served, hammer_all};

/// splitmix64: a seeded sequence of kill moments, the same for the same seed.
struct Moments(u64);

impl Moments {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `low..=high`.
    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }
}

fn env_number(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    Some(
        text.parse()
            .unwrap_or_else(|_| panic!("{name}={text}: not a number")),
    )
}

/// `tollgate ARGS` in `dir` (its `tollgate.yaml` names the store): exit code, stdout, stderr.
pub fn cli(dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .current_dir(dir)
        .env_remove("TOLLGATE_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `ledger verify --json` and `credits audit` on the store in `dir`, which no sidecar holds.
///
/// One break is expected right after a kill: a credit sale confirmed on chain whose credits
/// were not granted yet (`sale_uncredited`) — killed between the two, or settled by evidence
/// the kill cut short. Its buyer was never answered, so it must not be a served sale, and the
/// restart must grant it: `pending` holds the references found at the previous kill, and one
/// still uncredited now (a restart later) fails the test. `pending: None` (the end, every
/// payment settled and tollgate run since the last kill): no break at all. Returns how many
/// such sales this check found.
fn books_are_sound(
    dir: &Path,
    served: &HashSet<String>,
    pending: Option<&mut HashSet<String>>,
    when: &str,
) -> usize {
    let (code, out, err) = cli(dir, &["ledger", "verify", "--json"]);
    let report: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("{when}: `ledger verify --json`: {e}: {err}\n{out}"));
    let breaks = report["breaks"].as_array().unwrap();
    let Some(pending) = pending else {
        assert_eq!(
            code,
            Some(0),
            "{when}: `tollgate ledger verify`: {report:#}"
        );
        assert!(breaks.is_empty(), "{when}: {report:#}");
        return 0;
    };
    let mut uncredited = HashSet::new();
    for b in breaks {
        let message = b["message"].as_str().unwrap();
        assert_eq!(
            b["kind"], "sale_uncredited",
            "{when}: `tollgate ledger verify` found a break: {report:#}"
        );
        let reference = message
            .split("no top-up has the reference ")
            .nth(1)
            .and_then(|r| r.split(": credit it").next())
            .unwrap_or_else(|| panic!("{when}: no reference in {message}"));
        let nonce = reference.rsplit(':').next().unwrap().to_lowercase();
        assert!(
            !served.contains(&nonce),
            "{when}: a SERVED credit sale is uncredited: {message}"
        );
        assert!(
            !pending.contains(reference),
            "{when}: the sale {reference} is still uncredited after a restart"
        );
        uncredited.insert(reference.to_string());
    }
    let found = uncredited.len();
    *pending = uncredited;
    found
}

/// `tollgate credits audit` on the store in `dir`.
fn credits_audit(dir: &Path, when: &str) {
    let (code, out, err) = cli(dir, &["credits", "audit"]);
    assert_eq!(
        code,
        Some(0),
        "{when}: `tollgate credits audit` failed: {err}\n{out}"
    );
    let audit: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(audit["consistent"], true, "{when}: {audit:#}");
}

/// One page of an account's credit ledger after fact `after`: the facts, the next cursor and
/// the balance now.
async fn usage(sidecar: &Sidecar, account: u64, after: u64) -> (Vec<Value>, Option<u64>, u128) {
    let response = super::harness::client()
        .get(sidecar.admin_url(&format!(
            "/v1/accounts/{account}/usage?after={after}&limit=1000"
        )))
        .bearer_auth(sidecar.admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "usage of account {account}");
    let page: Value = response.json().await.unwrap();
    (
        page["facts"].as_array().unwrap().clone(),
        page["next_after"].as_u64(),
        page["balance"].as_str().unwrap().parse().unwrap(),
    )
}

fn credits(fact: &Value) -> u128 {
    fact["credits"].as_str().unwrap().parse().unwrap()
}

/// The prepaid account's credit ledger as read so far (facts are append-only, so each restart
/// reads only the new ones; one lost since would break the balance).
struct CreditBook {
    account: u64,
    after: u64,
    /// Debits by request id, top-ups by reference: how many of each.
    debits: HashMap<String, u32>,
    topups: HashMap<String, u32>,
    /// Σ top-ups − Σ debits + Σ refunds.
    net: i128,
    facts: u64,
}

impl CreditBook {
    fn new(account: u64) -> CreditBook {
        CreditBook {
            account,
            after: 0,
            debits: HashMap::new(),
            topups: HashMap::new(),
            net: 0,
            facts: 0,
        }
    }

    /// Reads the facts written since the last read and checks the balance against them all.
    async fn read(&mut self, sidecar: &Sidecar, when: &str) {
        let balance = loop {
            let (facts, next, balance) = usage(sidecar, self.account, self.after).await;
            for fact in &facts {
                let seq = fact["seq"].as_u64().unwrap();
                assert!(seq > self.after, "{when}: facts out of order: {fact}");
                self.after = seq;
                self.facts += 1;
                let amount = i128::try_from(credits(fact)).unwrap();
                match fact["kind"].as_str().unwrap() {
                    "debit" => {
                        let id = fact["request_id"].as_str().unwrap().to_string();
                        let n = self.debits.entry(id).or_default();
                        *n += 1;
                        assert_eq!(*n, 1, "{when}: a request debited twice: {fact}");
                        self.net -= amount;
                    }
                    "topup" => {
                        let reference = fact["reference"].as_str().unwrap().to_string();
                        let n = self.topups.entry(reference).or_default();
                        *n += 1;
                        assert_eq!(*n, 1, "{when}: a reference credited twice: {fact}");
                        self.net += amount;
                    }
                    "refund" => self.net += amount,
                    other => panic!("{when}: unknown fact kind {other}: {fact}"),
                }
            }
            if next.is_none() {
                break balance;
            }
        };
        assert_eq!(
            i128::try_from(balance).unwrap(),
            self.net,
            "{when}: the balance is not top-ups − debits + refunds of its {} facts",
            self.facts
        );
    }

    /// Every served prepaid call is debited once; every served sale to this account credited
    /// once.
    fn explains(&self, served: &[Served], when: &str) {
        for s in served {
            match s.rail {
                Rail::Prepaid => assert_eq!(
                    self.debits.get(&s.request_id),
                    Some(&1),
                    "{when}: served prepaid call {} ({}) is not debited exactly once",
                    s.request_id,
                    s.path
                ),
                Rail::Sale => {
                    let (account, reference) = s.sale.as_ref().unwrap();
                    assert_eq!(*account, self.account, "{when}: {s:?}");
                    assert_eq!(
                        self.topups.get(reference),
                        Some(&1),
                        "{when}: served sale {reference} is not credited exactly once"
                    );
                }
                _ => {}
            }
        }
    }
}

/// A served sale without a key opened an account: it holds exactly that sale's top-up.
async fn new_account_holds_its_sale(sidecar: &Sidecar, served: &Served, when: &str) {
    let (account, reference) = served.sale.as_ref().unwrap();
    let (facts, _, balance) = usage(sidecar, *account, 0).await;
    let topups: Vec<&Value> = facts
        .iter()
        .filter(|f| f["reference"].as_str() == Some(reference.as_str()))
        .collect();
    assert_eq!(
        (facts.len(), topups.len(), balance),
        (1, 1, SOLD),
        "{when}: account {account} of sale {reference}: {facts:?}"
    );
    assert_eq!(credits(topups[0]), SOLD, "{when}: {facts:?}");
}

/// Waits until settlement has nothing left to do but wait: no payment `recorded`, `queued` or
/// `submitted`, and every `unresolved` one (its call was in flight at a kill) unused on chain
/// and never to be sent again — not deferred (those are settled again while they are valid),
/// or too close to its `validBefore` to be sent. The chain decided those never moved; tollgate
/// marks them `failed` once their authorization has expired by a margin (a minute and more:
/// not waited for). Returns the ledger as that listing showed it (read from the ledger itself:
/// the metrics' gauges lag behind it).
async fn drained(mix: &Mix) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let listed = ledger(&mix.sidecar).await;
        let mut busy = 0;
        for e in &listed {
            busy += match e["status"]["state"].as_str().unwrap() {
                "confirmed" | "failed" | "refunded" => 0,
                "unresolved" => usize::from(unresolved_may_move(mix, e).await),
                _ => 1,
            };
        }
        if busy == 0 {
            return listed;
        }
        assert!(
            Instant::now() < deadline,
            "not drained in 120 s: {busy} payments still to be decided\n{}",
            mix.sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Whether an `unresolved` entry may still change: its nonce is used on chain (evidence will
/// confirm it), or it is deferred and valid long enough to be settled again.
async fn unresolved_may_move(mix: &Mix, e: &Value) -> bool {
    let nonce: alloy::primitives::B256 = e["nonce"].as_str().unwrap().parse().unwrap();
    let deferred = e["route"].as_str().unwrap().contains("/deferred/");
    let valid_before = e["valid_before"].as_u64().unwrap();
    mix.chain
        .authorization_state(mix.client.buyer.address(), nonce)
        .await
        || (deferred && valid_before > super::harness::now() + 6)
}

/// Every ledger entry with its status, each once (one listing, not one per state).
async fn ledger(sidecar: &Sidecar) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after = 0u64;
    loop {
        let (status, page) =
            super::chain_relayer::admin(sidecar, &format!("/v1/ledger?after={after}&limit=1000"))
                .await;
        assert_eq!(status, 200, "{page}");
        all.extend(page["entries"].as_array().unwrap().iter().cloned());
        match page["next_after"].as_u64() {
            Some(next) => after = next,
            None => return all,
        }
    }
}

fn count_by_rail(served: &[Served]) -> BTreeMap<Rail, usize> {
    let mut by = BTreeMap::new();
    for s in served {
        *by.entry(s.rail).or_default() += 1;
    }
    by
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_under_mixed_load_loses_and_doubles_nothing() {
    let seed = env_number("TOLLGATE_CRASH_SEED").unwrap_or_else(|| {
        u64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
                % 1_000_000_007,
        )
        .unwrap()
    });
    let cycles = env_number("TOLLGATE_CRASH_CYCLES").unwrap_or(20);
    eprintln!(
        "crash cycles: seed {seed}, {cycles} cycles (replay with TOLLGATE_CRASH_SEED={seed})"
    );
    let started = Instant::now();
    let mut moments = Moments(seed);
    let mut mix = Mix::start("crash-cycles", 1_000_000_000).await;
    let client = mix.client.clone();
    let mut book = CreditBook::new(client.account);
    let mut all: Vec<Served> = Vec::new();
    let mut sent: BTreeMap<Rail, u64> = BTreeMap::new();
    // Nonces of served sales; sales a kill left confirmed but uncredited (see
    // `books_are_sound`), and how many there were.
    let mut served_sales: HashSet<String> = HashSet::new();
    let mut uncredited = HashSet::new();
    let mut credited_late = 0;
    for cycle in 1..=cycles {
        let base = mix.sidecar.url("");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let clients = hammer_all(&client, &base, &seen, None);
        let ms = moments.between(100, 1500);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        mix.sidecar.kill();
        for c in clients {
            c.await.unwrap();
        }
        let seen = std::mem::take(&mut *seen.lock().unwrap());
        let when = format!("cycle {cycle} (seed {seed}, killed after {ms} ms)");
        assert!(
            seen.unexpected.is_empty(),
            "{when}: answers no served call gets: {:?}",
            seen.unexpected
        );
        for (rail, n) in &seen.sent {
            *sent.entry(*rail).or_default() += n;
        }

        for s in &seen.served {
            if let (Rail::Sale | Rail::SaleNewAccount, Some((_, nonce))) = (s.rail, &s.payment) {
                served_sales.insert(nonce.clone());
            }
        }

        // The store as the kill left it.
        credited_late += books_are_sound(&mix.dir, &served_sales, Some(&mut uncredited), &when);
        credits_audit(&mix.dir, &when);

        mix.restart().await;
        let base = mix.sidecar.url("");
        for s in &seen.served {
            if let Err(why) = client.replay(&base, s, false).await {
                panic!("{when}: {why}");
            }
        }
        book.read(&mix.sidecar, &when).await;
        book.explains(&seen.served, &when);
        for s in seen
            .served
            .iter()
            .filter(|s| s.rail == Rail::SaleNewAccount)
        {
            new_account_holds_its_sale(&mix.sidecar, s, &when).await;
        }
        eprintln!("{when}: served {:?}", count_by_rail(&seen.served));
        all.extend(seen.served);
    }
    // Every served call so far is still on the books after all the kills.
    book.read(&mix.sidecar, "the end").await;
    book.explains(&all, "the end");

    eprintln!(
        "{cycles} cycles in {:.1} s; draining",
        started.elapsed().as_secs_f64()
    );

    // Deferred settlement drains; then the ledger and the chain agree, payment by payment.
    let listed = drained(&mix).await;
    let in_state = |state: &str| -> Vec<Value> {
        listed
            .iter()
            .filter(|e| e["status"]["state"] == state)
            .cloned()
            .collect()
    };
    let (confirmed, failed, refunded, unresolved) = (
        in_state("confirmed"),
        in_state("failed"),
        in_state("refunded"),
        in_state("unresolved"),
    );
    assert_eq!(
        confirmed.len() + failed.len() + refunded.len() + unresolved.len(),
        listed.len(),
        "every entry is final or unresolved"
    );
    for e in &unresolved {
        assert!(
            !unresolved_may_move(&mix, e).await,
            "unresolved entry {} moved after the drain: {e}",
            e["seq"]
        );
    }
    let mut by_nonce: HashMap<String, Vec<u64>> = HashMap::new();
    for e in confirmed
        .iter()
        .chain(&failed)
        .chain(&refunded)
        .chain(&unresolved)
    {
        by_nonce
            .entry(e["nonce"].as_str().unwrap().to_lowercase())
            .or_default()
            .push(e["seq"].as_u64().unwrap());
    }
    for (nonce, seqs) in &by_nonce {
        assert_eq!(seqs.len(), 1, "nonce {nonce} is in entries {seqs:?}");
    }
    let confirmed_nonces: HashMap<String, &Value> = confirmed
        .iter()
        .map(|e| (e["nonce"].as_str().unwrap().to_lowercase(), e))
        .collect();
    for s in &all {
        if let Some((_, nonce)) = &s.payment {
            assert!(
                confirmed_nonces.contains_key(nonce),
                "served {:?} payment {nonce} ({}) is not confirmed: {:?}",
                s.rail,
                s.path,
                by_nonce.get(nonce)
            );
        }
    }
    let txs = books_match_the_chain(
        &mix.chain,
        &mix.sidecar,
        client.buyer.address(),
        confirmed.len(),
    )
    .await;
    let transfers = mix.chain.transfers_to(pay_to()).await;
    let moved: u128 = transfers.iter().map(|t| t.1).sum();
    let booked: u128 = confirmed
        .iter()
        .map(|e| e["amount"].as_str().unwrap().parse::<u128>().unwrap())
        .sum();
    assert_eq!(
        (transfers.len(), moved),
        (confirmed.len(), booked),
        "the token's transfers to pay_to are the confirmed entries"
    );
    assert_eq!(mix.chain.balance_of(pay_to()).await, moved);
    // Nothing unpaid reached the upstream: every call it saw was free, debited, or an x402
    // payment on the books.
    let forwarded_paid = confirmed
        .iter()
        .chain(&failed)
        .chain(&refunded)
        .chain(&unresolved)
        .filter(|e| e["credits"].is_null())
        .count();
    let free = usize::try_from(sent.get(&Rail::Free).copied().unwrap_or(0)).unwrap();
    assert!(
        mix.upstream.seen() <= free + book.debits.len() + forwarded_paid,
        "the upstream saw {} calls: {free} free sent, {} debited, {forwarded_paid} paid",
        mix.upstream.seen(),
        book.debits.len()
    );
    for s in &all {
        if let Err(why) = client.replay(&mix.sidecar.url(""), s, true).await {
            panic!("the end: {why}");
        }
    }

    // The reconciliation export, on the store at rest, says the same.
    mix.sidecar.kill();
    books_are_sound(&mix.dir, &served_sales, None, "the end");
    credits_audit(&mix.dir, "the end");
    let (code, out, err) = cli(&mix.dir, &["ledger", "export", "--format", "json"]);
    assert_eq!(code, Some(0), "{err}");
    let export: Value = serde_json::from_str(&out).unwrap();
    let totals: Vec<&Value> = export["totals"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["state"] == "confirmed")
        .collect();
    assert_eq!(totals.len(), 1, "one network and asset: {export:#}");
    assert_eq!(
        (
            totals[0]["count"].as_u64(),
            totals[0]["amount_atomic"].as_str()
        ),
        (
            Some(transfers.len() as u64),
            Some(moved.to_string().as_str())
        ),
        "export totals == transfers"
    );

    let by_rail = count_by_rail(&all);
    eprintln!(
        "crash cycles done: seed {seed}, {cycles} cycles in {:.1} s; served {by_rail:?}; sent {sent:?}; \
         ledger {} confirmed / {} failed / {} refunded / {} unresolved (never sent) in {} transactions; {} credit facts, {} debits; \
         {credited_late} unserved sales confirmed at a kill and credited by the restart",
        started.elapsed().as_secs_f64(),
        confirmed.len(),
        failed.len(),
        refunded.len(),
        unresolved.len(),
        txs.len(),
        book.facts,
        book.debits.len(),
    );
}

/// A credit sale with a key is killed while its settlement transaction waits in the pool; the
/// transaction is mined, the sidecar starts again and the chain's evidence confirms the
/// payment. The buyer paid, so the buyer's account holds the credits (granted by the
/// settlement service, once per reference) and `ledger verify` is sound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_killed_in_flight_is_credited_after_restart() {
    let mut mix = Mix::start("sale-killed", 1).await;
    let client = mix.client.clone();
    mix.chain
        .rpc("evm_setAutomine", serde_json::json!([false]))
        .await;
    let (sale_client, base) = (client.clone(), mix.sidecar.url(""));
    let sale = tokio::spawn(async move { sale_client.call(&base, Rail::Sale).await });
    // The sale's transaction is sent and waits in the pool: the entry is `submitted`.
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&mix.sidecar, "tollgate_payments_open{state=\"submitted\"}").await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "never submitted\n{}",
            mix.sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    mix.sidecar.kill();
    let answer = sale.await.unwrap();
    assert!(
        matches!(answer, super::mixed::Answer::Lost(_)),
        "the buyer got no answer: {answer:?}"
    );
    mix.chain
        .rpc("evm_setAutomine", serde_json::json!([true]))
        .await;
    mix.chain.rpc("evm_mine", serde_json::json!([])).await;
    mix.restart().await;
    super::chain_relayer::settled(&mix.sidecar, Duration::from_secs(60)).await;
    let confirmed = entries(&mix.sidecar, "confirmed").await;
    assert_eq!(
        confirmed.len(),
        1,
        "the chain says the sale settled: {confirmed:?}"
    );
    let (status, report) = super::chain_relayer::admin(&mix.sidecar, "/v1/ledger/verify").await;
    assert_eq!(
        status, 200,
        "a settled sale without its credits: {report:#}"
    );
    let (_, _, balance) = usage(&mix.sidecar, client.account, 0).await;
    assert_eq!(
        balance,
        1 + SOLD,
        "the buyer's account got the credits it paid for"
    );
}
