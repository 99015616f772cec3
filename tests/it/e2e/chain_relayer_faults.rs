//! `settle via rpc` when things go wrong: tollgate killed between sending a transaction and
//! recording it, a reorganisation before the confirmation depth, a transaction stuck in the
//! pool, a fee cap below the base fee, and a node, a key or a relayer that cannot settle at
//! startup. In every case each payment moves exactly once, or tollgate refuses to start.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::chain::{DevChain, RELAYER_ADDRESS, RELAYER_KEY};
use super::chain_relayer::{
    PRICE, admin, entries, funding, launch, pay, pay_to, policy, receipt, settled, setup_on,
};
use super::harness::{Wallet, free_port, scratch_dir};

/// A hexadecimal JSON-RPC quantity.
fn quantity(v: &Value) -> u128 {
    u128::from_str_radix(
        v.as_str()
            .unwrap_or_else(|| panic!("not a quantity: {v}"))
            .trim_start_matches("0x"),
        16,
    )
    .unwrap()
}

/// A `key=value` count of a log line (0 when absent).
fn count(line: &str, key: &str) -> usize {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.parse().ok())
        .unwrap_or(0)
}

/// The relayer's transactions waiting in the node's pool (`txpool_content`), pending or queued.
async fn pooled(chain: &DevChain) -> Vec<Value> {
    let content = chain.rpc("txpool_content", json!([])).await;
    let relayer = RELAYER_ADDRESS.to_string().to_lowercase();
    let mut found = Vec::new();
    for section in ["pending", "queued"] {
        let Some(by_sender) = content[section].as_object() else {
            continue;
        };
        for (sender, by_nonce) in by_sender {
            if sender.to_lowercase() != relayer {
                continue;
            }
            if let Some(by_nonce) = by_nonce.as_object() {
                found.extend(by_nonce.values().cloned());
            }
        }
    }
    found
}

/// `metric` of `tollgate_payments_open{state=…}`.
async fn open_in(sidecar: &super::harness::Sidecar, state: &str) -> f64 {
    super::chain_relayer::metric(
        sidecar,
        &format!("tollgate_payments_open{{state=\"{state}\"}}"),
    )
    .await
}

/// Every confirmed entry names a transaction that is on the chain now, succeeded, and holds
/// the entry's own `AuthorizationUsed`; the chain's `AuthorizationUsed` events of `payer` are
/// exactly the confirmed entries' nonces, each once. Returns the transactions.
pub(super) async fn books_match_the_chain(
    chain: &DevChain,
    sidecar: &super::harness::Sidecar,
    payer: alloy::primitives::Address,
    expected: usize,
) -> BTreeSet<String> {
    let confirmed = entries(sidecar, "confirmed").await;
    assert_eq!(confirmed.len(), expected, "{}", sidecar.log());
    let used = chain.authorizations_used(payer).await;
    assert_eq!(
        used.len(),
        expected,
        "every authorization used once: {used:?}"
    );
    let on_chain: BTreeMap<String, String> = used
        .iter()
        .map(|(nonce, tx, _)| (nonce.to_string(), tx.to_string()))
        .collect();
    assert_eq!(on_chain.len(), expected, "distinct nonces: {used:?}");
    let mut txs = BTreeSet::new();
    for e in &confirmed {
        let nonce = e["nonce"].as_str().unwrap().to_lowercase();
        let tx = e["status"]["tx"].as_str().unwrap().to_lowercase();
        assert_eq!(
            on_chain.get(&nonce),
            Some(&tx),
            "entry {}: the ledger's transaction is the one that used its nonce",
            e["seq"]
        );
        txs.insert(tx);
    }
    for tx in &txs {
        let r = receipt(chain, tx).await;
        assert_eq!(r["status"], "0x1", "{tx}: {r}");
        assert_eq!(
            r["from"].as_str().unwrap().to_lowercase(),
            RELAYER_ADDRESS.to_string().to_lowercase()
        );
    }
    txs
}

/// `kill -9` three times between sending a bundle's transaction and recording its outcome:
/// the chain mines a block a second, the eighth payment of each bundle of 8 is paid just
/// after a block, and the sidecar is killed 200 to 700 ms later, while the transaction it sent
/// waits in the pool for the next block. After each restart the 8 payments are `unresolved`
/// and the chain decides them: the transaction already sent is found, never sent again. In
/// the end every payment moved exactly once, in one transaction per bundle, and every
/// confirmed entry names the transaction that used its nonce.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_sending_and_before_recording_never_submits_twice() {
    let buyer = Wallet::new(80);
    let chain = DevChain::start_opts(&funding(&[&buyer], 10_000_000), Some(1)).await;
    let mut s = setup_on(
        "relayer-kill",
        chain,
        None,
        "deferred every 60s or 8 payments",
        "",
    )
    .await;
    let rounds = 3u64;
    let mut caught_open = 0;
    for round in 0..rounds {
        for i in 0..7 {
            let path = format!("/paid/{round}-{i}");
            assert_eq!(pay(&s.sidecar, &buyer, &path).await.status(), 200, "{path}");
        }
        // Just after a block: the bundle's transaction has a whole second to wait in the pool.
        let block = s.chain.block_number().await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.chain.block_number().await == block {
            assert!(Instant::now() < deadline, "no block in 10 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let path = format!("/paid/{round}-7");
        assert_eq!(pay(&s.sidecar, &buyer, &path).await.status(), 200, "{path}");
        // The eighth payment closed the bundle; its transaction is sent and waits.
        tokio::time::sleep(Duration::from_millis(200 + 250 * round)).await;
        let in_pool = pooled(&s.chain).await;
        s.sidecar.kill();
        assert_eq!(
            in_pool.len(),
            1,
            "round {round}: the bundle's transaction, sent and not mined: {in_pool:?}\n{}",
            s.sidecar.log()
        );
        s.sidecar = launch(&s.dir, &s.upstream, &s.yaml).await;
        let log = s.sidecar.log();
        let recovered = log
            .lines()
            .rev()
            .find(|l| l.contains("payment ledger recovered"))
            .unwrap_or("")
            .to_string();
        eprintln!("round {round}: {recovered}");
        assert_eq!(
            count(&recovered, "unresolved="),
            8,
            "round {round}: the bundle was in flight: {recovered}"
        );
        caught_open += count(&recovered, "open=");
    }
    assert!(caught_open > 0, "no kill landed while payments were open");
    settled(&s.sidecar, Duration::from_secs(120)).await;

    let total = 8 * rounds as usize;
    let txs = books_match_the_chain(&s.chain, &s.sidecar, buyer.address(), total).await;
    assert_eq!(
        txs.len(),
        rounds as usize,
        "one transaction per bundle: {txs:?}"
    );
    assert_eq!(
        s.chain.relayer_nonce().await,
        rounds,
        "nothing was sent again\n{}",
        s.sidecar.log()
    );
    assert_eq!(s.chain.transfers_to(pay_to()).await.len(), total);
    assert_eq!(s.chain.balance_of(pay_to()).await, total as u128 * PRICE);
    assert_eq!(s.upstream.seen(), total);
    let (status, report) = admin(&s.sidecar, "/v1/ledger/verify").await;
    assert_eq!(status, 200, "{report}");
}

/// A reorganisation drops the bundle's transaction after it was mined but before it had the
/// 3 confirmations asked for: the ledger still says `submitted` (nothing was confirmed on a
/// block that left the chain), the relayer notices the receipt vanished and broadcasts the
/// transaction again; it lands on the new chain and only then is each payment confirmed, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reorg_before_the_confirmation_depth_sends_the_bundle_again() {
    let buyer = Wallet::new(81);
    let chain = DevChain::start_opts(&funding(&[&buyer], 1_000_000), Some(1)).await;
    let s = setup_on(
        "relayer-reorg",
        chain,
        None,
        "deferred every 60s or 3 payments",
        "settlement:\n  confirmations: 3\n",
    )
    .await;
    let snapshot = s.chain.snapshot().await;
    for i in 0..3 {
        assert_eq!(
            pay(&s.sidecar, &buyer, &format!("/paid/{i}"))
                .await
                .status(),
            200
        );
    }
    // The bundle's transaction is mined…
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.chain.relayer_nonce().await == 0 {
        assert!(
            Instant::now() < deadline,
            "never mined\n{}",
            s.sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // …and the relayer has seen its receipt (it polls every 250 ms), but 3 blocks take 2 s.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let used = s.chain.authorizations_used(buyer.address()).await;
    assert_eq!(used.len(), 3, "{used:?}");
    let first_tx = used[0].1;
    let mined_in = used[0].2;
    assert!(
        used.iter().all(|(_, tx, _)| *tx == first_tx),
        "one transaction: {used:?}"
    );
    let latest = s.chain.block_number().await;
    assert!(
        latest + 1 - mined_in < 3,
        "the depth was reached before the reorganisation (mined in {mined_in}, latest {latest}): the test proves nothing"
    );
    assert!(
        entries(&s.sidecar, "confirmed").await.is_empty(),
        "confirmed before 3 blocks\n{}",
        s.sidecar.log()
    );
    assert_eq!(entries(&s.sidecar, "submitted").await.len(), 3);

    s.chain.revert(&snapshot).await;
    assert_eq!(
        s.chain.transfers_to(pay_to()).await.len(),
        0,
        "the reorg undid the transfers"
    );
    assert_eq!(s.chain.relayer_nonce().await, 0);
    assert!(receipt(&s.chain, &first_tx.to_string()).await.is_null());

    settled(&s.sidecar, Duration::from_secs(60)).await;
    let txs = books_match_the_chain(&s.chain, &s.sidecar, buyer.address(), 3).await;
    assert_eq!(txs.len(), 1, "one bundle, one transaction: {txs:?}");
    assert_eq!(
        txs.iter().next().unwrap(),
        &first_tx.to_string().to_lowercase(),
        "the same signed transaction, broadcast again"
    );
    assert_eq!(s.chain.transfers_to(pay_to()).await.len(), 3);
    assert_eq!(s.chain.balance_of(pay_to()).await, 3 * PRICE);
    assert_eq!(s.chain.relayer_nonce().await, 1);
    for e in entries(&s.sidecar, "confirmed").await {
        let block = e["status"]["block"].as_u64().unwrap();
        let r = receipt(&s.chain, e["status"]["tx"].as_str().unwrap()).await;
        assert_eq!(
            quantity(&r["blockNumber"]) as u64,
            block,
            "the block on the chain now"
        );
    }
    assert!(
        s.sidecar.log().contains("left the chain"),
        "{}",
        s.sidecar.log()
    );
    let (status, report) = admin(&s.sidecar, "/v1/ledger/verify").await;
    assert_eq!(status, 200, "{report}");
}

/// A transaction that is not mined (the node stops mining) is replaced after
/// `replace_after` with the same nonce and higher fees — not duplicated: the pool holds one
/// transaction of the relayer all along, the one mined in the end is the last replacement,
/// and the relayer used one nonce for the bundle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_transaction_is_replaced_with_a_higher_fee_not_duplicated() {
    let buyer = Wallet::new(82);
    let chain = DevChain::start_with(&funding(&[&buyer], 1_000_000)).await;
    let s = setup_on(
        "relayer-stuck",
        chain,
        None,
        "deferred every 60s or 3 payments",
        "settlement:\n  replace_after: 1s\n",
    )
    .await;
    s.chain.rpc("evm_setAutomine", json!([false])).await;
    for i in 0..3 {
        assert_eq!(
            pay(&s.sidecar, &buyer, &format!("/paid/{i}"))
                .await
                .status(),
            200
        );
    }
    // The bundle's first transaction, waiting in the pool.
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        let pool = pooled(&s.chain).await;
        if let Some(tx) = pool.first() {
            assert_eq!(pool.len(), 1, "{pool:?}");
            break tx.clone();
        }
        assert!(
            Instant::now() < deadline,
            "nothing sent\n{}",
            s.sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let first_hash = first["hash"].as_str().unwrap().to_lowercase();
    let first_fee = quantity(&first["maxFeePerGas"]);
    assert_eq!(quantity(&first["nonce"]), 0);
    // Two replacement periods and more; the pool never holds two of the relayer's.
    let until = Instant::now() + Duration::from_millis(3500);
    let mut hashes = BTreeSet::from([first_hash.clone()]);
    while Instant::now() < until {
        let pool = pooled(&s.chain).await;
        assert_eq!(pool.len(), 1, "replaced, not added: {pool:?}");
        assert_eq!(quantity(&pool[0]["nonce"]), 0);
        hashes.insert(pool[0]["hash"].as_str().unwrap().to_lowercase());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        hashes.len() >= 2,
        "no replacement in 3.5 s: {hashes:?}\n{}",
        s.sidecar.log()
    );
    s.chain.rpc("evm_mine", json!([])).await;
    s.chain.rpc("evm_setAutomine", json!([true])).await;
    s.chain.rpc("evm_mine", json!([])).await;
    settled(&s.sidecar, Duration::from_secs(60)).await;

    assert_eq!(s.chain.relayer_nonce().await, 1, "one nonce for the bundle");
    let txs = books_match_the_chain(&s.chain, &s.sidecar, buyer.address(), 3).await;
    assert_eq!(txs.len(), 1, "{txs:?}");
    let tx = txs.iter().next().unwrap().clone();
    assert_ne!(tx, first_hash, "the mined transaction is a replacement");
    assert!(
        hashes.contains(&tx),
        "{tx} was seen in the pool: {hashes:?}"
    );
    let mined = s.chain.rpc("eth_getTransactionByHash", json!([tx])).await;
    assert_eq!(quantity(&mined["nonce"]), 0);
    assert!(
        quantity(&mined["maxFeePerGas"]) > first_fee,
        "{mined} vs first fee {first_fee}"
    );
    assert!(
        quantity(&mined["maxPriorityFeePerGas"]) > quantity(&first["maxPriorityFeePerGas"]),
        "{mined} vs {first}"
    );
    // The replaced transactions left no trace.
    for hash in hashes.iter().filter(|h| **h != tx) {
        assert!(
            receipt(&s.chain, hash).await.is_null(),
            "{hash} was mined too"
        );
    }
    assert!(
        s.sidecar.log().contains("replaced with higher fees"),
        "{}",
        s.sidecar.log()
    );
    assert_eq!(s.chain.transfers_to(pay_to()).await.len(), 3);
    assert_eq!(s.chain.balance_of(pay_to()).await, 3 * PRICE);
    let (status, report) = admin(&s.sidecar, "/v1/ledger/verify").await;
    assert_eq!(status, 200, "{report}");
}

/// The end of `tollgate run` that refused to start in `dir` (which holds `policy.toll`): its
/// exit status and standard error. Panics if it is still running after 30 s (it started).
async fn refused_start(dir: &Path) -> (Option<i32>, String) {
    let config = format!(
        "listen: 127.0.0.1:{}\nupstream: http://127.0.0.1:{}\npublic_url: https://api.example.com\npolicies: [policy.toll]\nstore: data\nops:\n  listen: 127.0.0.1:{}\nadmin:\n  listen: 127.0.0.1:{}\n",
        free_port(),
        free_port(),
        free_port(),
        free_port()
    );
    std::fs::write(dir.join("tollgate.yaml"), config).unwrap();
    let stderr = std::fs::File::create(dir.join("stderr.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["run", "--config", "tollgate.yaml"])
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .env_remove("TOLLGATE_CONFIG")
        .env_remove("TOLLGATE_LOG_LEVEL")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "tollgate started instead of refusing:\n{}",
                std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let said = std::fs::read_to_string(dir.join("stderr.log")).unwrap();
    assert!(
        !dir.join("data").exists(),
        "refused before the store was opened:\n{said}"
    );
    (status.code(), said)
}

/// `tollgate check …` in `dir`: exit status, stdout, stderr.
fn check(dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("check")
        .args(args)
        .current_dir(dir)
        .env_remove("TOLLGATE_CONFIG")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A scratch folder with a policy settling through `node` (the relayer key file holds anvil's
/// relayer key), with `edit` applied to the policy text.
fn policy_dir(name: &str, node: &str, edit: impl Fn(String) -> String) -> std::path::PathBuf {
    let dir = scratch_dir(name);
    let text = edit(policy(node, &dir, "after response"));
    std::fs::write(dir.join("policy.toll"), text).unwrap();
    dir
}

/// Startup refuses, in words and before any port or store is opened, a policy whose
/// `settle via rpc` cannot work: a node on another chain than the network quoted (both chains
/// named), a relayer without gas (its address named), a node that cannot be reached, and a
/// key file that does not hold a key (said so, without repeating what it holds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_refuses_a_wrong_chain_an_empty_relayer_a_dead_node_and_a_bad_key() {
    let chain = DevChain::start().await;
    let node = chain.rpc_url();

    // (a) The policy quotes Base (8453); the node is Base Sepolia's (84532).
    let dir = policy_dir("refuse-chain", &node, |p| {
        let edited = p.replace("accept x402 on base-sepolia", "accept x402 on base");
        assert_ne!(edited, p);
        edited
    });
    let (code, said) = refused_start(&dir).await;
    assert_eq!(code, Some(2), "{said}");
    assert!(
        said.contains("the node is on chain 84532, but the policy quotes base (chain 8453)"),
        "{said}"
    );

    // (b) A relayer key with no ETH on this chain.
    let broke = Wallet::new(86);
    assert_eq!(
        quantity(
            &chain
                .rpc("eth_getBalance", json!([broke.address(), "latest"]))
                .await
        ),
        0
    );
    let dir = policy_dir("refuse-gas", &node, |p| p);
    std::fs::write(
        dir.join("relayer.key"),
        format!("{}\n", broke.signer.to_bytes()),
    )
    .unwrap();
    let (code, said) = refused_start(&dir).await;
    assert_eq!(code, Some(2), "{said}");
    assert!(
        said.contains(&format!(
            "the relayer {} has no gas on chain 84532",
            broke.address()
        )),
        "{said}"
    );

    // (c) Nothing listens where the node should be.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let dir = policy_dir("refuse-dead", &dead, |p| p);
    let (code, said) = refused_start(&dir).await;
    assert_eq!(code, Some(2), "{said}");
    assert!(
        said.contains("the settlement node cannot be read"),
        "{said}"
    );

    // (d) A key file holding something else: a real key with its last digit lost in the paste.
    let garbage = &RELAYER_KEY[..RELAYER_KEY.len() - 1];
    let dir = policy_dir("refuse-key", &node, |p| p);
    std::fs::write(dir.join("relayer.key"), format!("{garbage}\n")).unwrap();
    let (code, said) = refused_start(&dir).await;
    assert_eq!(code, Some(2), "{said}");
    assert!(
        said.contains("the relayer key is not a private key"),
        "{said}"
    );
    assert!(
        !said.contains(garbage.trim_start_matches("0x")),
        "the key file's text is repeated: {said}"
    );
    assert!(!said.contains(&garbage[2..20]), "{said}");
}

/// `tollgate check --online` asks the node what startup asks: on a good policy it names the
/// chain and the relayer; on a policy quoting another chain it fails with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_online_names_the_chain_and_the_relayer_and_fails_a_wrong_chain() {
    let chain = DevChain::start().await;
    let node = chain.rpc_url();

    let dir = policy_dir("check-online", &node, |p| p);
    let (code, out, err) = check(&dir, &["--online", "policy.toll"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let line = out
        .lines()
        .find(|l| l.contains("online:"))
        .unwrap_or_else(|| panic!("no online line: {out}{err}"));
    assert!(line.starts_with("ok "), "{line}");
    assert!(line.contains("chain 84532"), "{line}");
    assert!(line.contains(&RELAYER_ADDRESS.to_string()), "{line}");
    assert!(line.contains(&node), "{line}");

    let dir = policy_dir("check-online-wrong", &node, |p| {
        p.replace("accept x402 on base-sepolia", "accept x402 on base")
    });
    let (code, out, err) = check(&dir, &["--online", "policy.toll"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL") && l.contains("online")),
        "{out}"
    );
    assert!(
        err.contains("the node is on chain 84532, but the policy quotes base (chain 8453)"),
        "{err}"
    );
}

/// `settlement.max_fee_per_gas` below the chain's base fee: deferred payments are served and
/// wait in the queue, the relayer sends nothing, and why is said. Restarted with a cap above
/// the base fee, the waiting payment settles, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fee_cap_below_the_base_fee_holds_payments_until_it_is_raised() {
    let buyer = Wallet::new(84);
    let chain = DevChain::start_with(&funding(&[&buyer], 1_000_000)).await;
    let base_fee = quantity(
        &chain
            .rpc("eth_getBlockByNumber", json!(["latest", false]))
            .await["baseFeePerGas"],
    );
    assert!(base_fee > 1, "base fee {base_fee}");
    let mut s = setup_on(
        "relayer-fee-cap",
        chain,
        None,
        "deferred every 60s or 1 payments",
        "settlement:\n  max_fee_per_gas: 1 wei\n",
    )
    .await;
    assert_eq!(pay(&s.sidecar, &buyer, "/one/x").await.status(), 200);
    // The bundle was tried (the entry's reason says why it waits) and is queued again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let reason = loop {
        let queued = entries(&s.sidecar, "queued").await;
        if let Some(reason) = queued.first().and_then(|e| e["status"]["reason"].as_str()) {
            break reason.to_string();
        }
        assert!(Instant::now() < deadline, "{}", s.sidecar.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(reason.contains("max_fee_per_gas"), "{reason}");
    // A few more attempts: still nothing sent.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        open_in(&s.sidecar, "queued").await + open_in(&s.sidecar, "submitted").await,
        1.0
    );
    assert_eq!(entries(&s.sidecar, "confirmed").await.len(), 0);
    assert_eq!(s.chain.relayer_nonce().await, 0, "nothing sent");
    assert!(pooled(&s.chain).await.is_empty());
    assert_eq!(s.chain.transfers_to(pay_to()).await.len(), 0);
    let held_log = s.sidecar.log();

    s.sidecar.kill();
    s.yaml = "settlement:\n  max_fee_per_gas: 100 gwei\n".into();
    s.sidecar = launch(&s.dir, &s.upstream, &s.yaml).await;
    settled(&s.sidecar, Duration::from_secs(60)).await;
    books_match_the_chain(&s.chain, &s.sidecar, buyer.address(), 1).await;
    assert_eq!(s.chain.transfers_to(pay_to()).await.len(), 1);
    assert_eq!(s.chain.balance_of(pay_to()).await, PRICE);
    assert_eq!(s.chain.relayer_nonce().await, 1);
    let (status, report) = admin(&s.sidecar, "/v1/ledger/verify").await;
    assert_eq!(status, 200, "{report}");
    // The operator's log says why the payments waited (not that the node was unreachable).
    let said: Vec<&str> = held_log
        .lines()
        .filter(|l| l.contains("tollgate::settle"))
        .collect();
    assert!(
        said.iter().any(|l| l.contains("max_fee_per_gas")),
        "the log does not say why the payments waited:\n{}",
        said.join("\n")
    );
}

/// A transaction tollgate sent just before it was killed is still unmined after the restart
/// (the node mines nothing meanwhile): the restarted sidecar did not send it, yet it holds the
/// relayer's nonce. Once it has waited `replace_after`, tollgate cancels it with an empty
/// transfer at the fee cap (same nonce, replacing it in the pool); when blocks come, the
/// cancellation is mined instead, the chain shows the payments' nonces unused, and evidence
/// submits them again, together in one transaction: each moves exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_stuck_before_a_restart_is_cancelled_and_its_payments_settle_again() {
    let buyer = Wallet::new(97);
    let chain = DevChain::start_with(&funding(&[&buyer], 1_000_000)).await;
    let yaml = "settlement:\n  max_fee_per_gas: 100 gwei\n  replace_after: 1s\n";
    let mut s = setup_on(
        "relayer-leftover",
        chain,
        None,
        "deferred every 60s or 3 payments",
        yaml,
    )
    .await;
    s.chain.rpc("evm_setAutomine", json!([false])).await;
    for i in 0..3 {
        assert_eq!(
            pay(&s.sidecar, &buyer, &format!("/paid/{i}"))
                .await
                .status(),
            200
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pooled(&s.chain).await.is_empty() {
        assert!(Instant::now() < deadline, "the bundle was never sent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.sidecar.kill();
    let stuck = pooled(&s.chain).await;
    assert_eq!(stuck.len(), 1, "{stuck:?}");
    let stuck_hash = stuck[0]["hash"].as_str().unwrap().to_string();

    s.sidecar = launch(&s.dir, &s.upstream, &s.yaml).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !s.sidecar.log().contains("cancelled it at the fee cap") {
        assert!(
            Instant::now() < deadline,
            "the leftover was never cancelled\n{}",
            s.sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pool = pooled(&s.chain).await;
    assert_eq!(pool.len(), 1, "replaced, not added: {pool:?}");
    assert_ne!(pool[0]["hash"].as_str().unwrap(), stuck_hash);
    assert_eq!(
        pool[0]["to"].as_str().unwrap().to_lowercase(),
        RELAYER_ADDRESS.to_string().to_lowercase(),
        "an empty transfer to the relayer itself"
    );
    s.chain.rpc("evm_setAutomine", json!([true])).await;
    s.chain.rpc("evm_mine", json!([])).await;
    settled(&s.sidecar, Duration::from_secs(90)).await;
    assert!(
        receipt(&s.chain, &stuck_hash).await.is_null(),
        "the stuck transaction never mined"
    );
    let txs = books_match_the_chain(&s.chain, &s.sidecar, buyer.address(), 3).await;
    // Submitted again as the bundle they were: one transaction, not one a payment (one after
    // the other, the last ones of a large bundle would expire unsettled).
    assert_eq!(
        txs.len(),
        1,
        "one transaction for the bundle sent again: {txs:?}"
    );
    assert_eq!(
        s.chain.relayer_nonce().await,
        2,
        "the cancellation, then the bundle\n{}",
        s.sidecar.log()
    );
    assert_eq!(s.chain.transfers_to(pay_to()).await.len(), 3);
    assert_eq!(s.chain.balance_of(pay_to()).await, 3 * PRICE);
    assert!(pooled(&s.chain).await.is_empty());
    let (status, report) = admin(&s.sidecar, "/v1/ledger/verify").await;
    assert_eq!(status, 200, "{report}");
}

/// The node itself is stopped and started again while a bundle's transaction waits for its
/// block: the restarted node has forgotten its pool. tollgate keeps watching through the
/// outage, sends the transaction again with the same nonce once `replace_after` passes, and
/// the bundle settles once — no payment lost, none moved twice, one nonce used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_mid_bundle_forgets_the_transaction_and_it_is_sent_again() {
    let buyer = Wallet::new(98);
    let chain = DevChain::start_restartable(&funding(&[&buyer], 1_000_000), Some(2)).await;
    let yaml = "settlement:\n  replace_after: 1s\n";
    let s = setup_on(
        "relayer-node-restart",
        chain,
        None,
        "deferred every 60s or 5 payments",
        yaml,
    )
    .await;
    // Pay right after a block, so the bundle's transaction waits in the pool.
    let start = s.chain.block_number().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.chain.block_number().await == start {
        assert!(Instant::now() < deadline, "no block in 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..5 {
        assert_eq!(
            pay(&s.sidecar, &buyer, &format!("/paid/{i}"))
                .await
                .status(),
            200
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pooled(&s.chain).await.is_empty() {
        assert!(Instant::now() < deadline, "the bundle was never sent");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.chain.restart_node().await;
    assert!(
        pooled(&s.chain).await.is_empty(),
        "the restarted node forgot its pool"
    );
    assert_eq!(
        s.chain.relayer_nonce().await,
        0,
        "not mined before the stop"
    );
    let open_after_restart = open_in(&s.sidecar, "submitted").await;
    assert_eq!(open_after_restart, 5.0);
    settled(&s.sidecar, Duration::from_secs(60)).await;
    assert!(
        s.sidecar.log().contains("replaced with higher fees"),
        "sent again with the same nonce: {}",
        s.sidecar.log()
    );
    books_match_the_chain(&s.chain, &s.sidecar, buyer.address(), 5).await;
    assert_eq!(s.chain.transfers_to(pay_to()).await.len(), 5);
    assert_eq!(s.chain.balance_of(pay_to()).await, 5 * PRICE);
    assert_eq!(
        s.chain.relayer_nonce().await,
        1,
        "one transaction, one nonce"
    );
    let (status, report) = admin(&s.sidecar, "/v1/ledger/verify").await;
    assert_eq!(status, 200, "{report}");
}
