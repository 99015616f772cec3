//! `settle via rpc`: tollgate settles on anvil itself, through its relayer, with no
//! facilitator. Bundles are one transaction (Multicall3 `aggregate3`); the ledger, the receipts
//! and the chain are compared transaction by transaction.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use alloy::primitives::Address;
use serde_json::{Value, json};

use super::chain::{DevChain, RELAYER_KEY, Relay};
use super::harness::{self, Launch, PAY_TO, Sidecar, Tweak, Upstream, Wallet};

pub const PRICE: u128 = 10_000; // 0.01 USDC

/// Writes the relayer's key to `<dir>/relayer.key`, the file a policy names; returns its path.
pub fn relayer_key(dir: &std::path::Path) -> std::path::PathBuf {
    let key = dir.join("relayer.key");
    std::fs::write(&key, format!("{RELAYER_KEY}\n")).unwrap();
    key
}

/// A policy settling through `node` with the relayer key in `<dir>/relayer.key`.
pub fn policy(node: &str, dir: &std::path::Path, timing: &str) -> String {
    let key = relayer_key(dir);
    format!(
        r#"service "relayed" {{
  pay_to {PAY_TO}
  accept x402 on base-sepolia
  settle via rpc "{node}" relayer "{key}" {timing}
  default deny

  route GET "/paid/**" {{ price 0.01 USDC }}
  route GET "/one/**" {{
    price 0.01 USDC
    settle deferred every 60s or 1 payments
  }}
  route GET "/ten/**" {{
    price 0.01 USDC
    settle deferred every 60s or 10 payments
  }}
  route GET "/hundred/**" {{
    price 0.01 USDC
    settle deferred every 60s or 100 payments
  }}
  route GET "/after/**" {{
    price 0.01 USDC
    settle after response
  }}
  route GET "/first/**" {{
    price 0.01 USDC
    settle before response
  }}
}}
"#,
        key = key.display()
    )
}

/// A dev chain, an upstream and a sidecar settling through the relayer.
pub struct Setup {
    pub chain: DevChain,
    pub sidecar: Sidecar,
    pub upstream: Upstream,
    pub dir: std::path::PathBuf,
    pub yaml: String,
}

/// `node`: the URL the policy names (the chain's own, or a [`Relay`] in front of it).
pub async fn setup_on(
    name: &str,
    chain: DevChain,
    node: Option<&str>,
    timing: &str,
    yaml: &str,
) -> Setup {
    let upstream = Upstream::start().await;
    let dir = harness::scratch_dir(name);
    let node = node.map_or_else(|| chain.rpc_url(), str::to_string);
    std::fs::write(dir.join("policy.toll"), policy(&node, &dir, timing)).unwrap();
    let sidecar = launch(&dir, &upstream, yaml).await;
    Setup {
        chain,
        sidecar,
        upstream,
        dir,
        yaml: yaml.to_string(),
    }
}

pub async fn launch(dir: &std::path::Path, upstream: &Upstream, yaml: &str) -> Sidecar {
    Sidecar::launch(
        dir,
        &upstream.url(),
        Launch {
            yaml,
            ..Launch::default()
        },
    )
    .await
}

pub fn funding(wallets: &[&Wallet], each: u128) -> Vec<(Address, u128)> {
    wallets.iter().map(|w| (w.address(), each)).collect()
}

/// A payment header for `path` signed by `wallet`, and the decoded payload.
pub async fn sign(sidecar: &Sidecar, wallet: &Wallet, path: &str) -> (String, Value) {
    let response = harness::client()
        .get(sidecar.url(path))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 402, "{path}");
    let required = harness::decode(response.headers()["payment-required"].to_str().unwrap());
    let header = wallet.pay_v2(&required["accepts"][0], &Tweak::default());
    let payload = harness::decode(&header);
    (header, payload)
}

pub async fn pay(sidecar: &Sidecar, wallet: &Wallet, path: &str) -> reqwest::Response {
    let (header, _) = sign(sidecar, wallet, path).await;
    send(sidecar, path, &header).await
}

pub async fn send(sidecar: &Sidecar, path: &str, header: &str) -> reqwest::Response {
    harness::client()
        .get(sidecar.url(path))
        .header("payment-signature", header)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap()
}

/// One metric series' value (0 when absent).
pub async fn metric(sidecar: &Sidecar, series: &str) -> f64 {
    let text = sidecar.metrics().await;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Waits until no payment is open.
pub async fn settled(sidecar: &Sidecar, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let mut open = 0.0;
        for state in ["recorded", "queued", "submitted", "unresolved"] {
            open += metric(
                sidecar,
                &format!("tollgate_payments_open{{state=\"{state}\"}}"),
            )
            .await;
        }
        if open == 0.0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{open} payments still open\n{}",
            sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// GETs an admin API path as JSON, with its status.
pub async fn admin(sidecar: &Sidecar, path: &str) -> (u16, Value) {
    let response = harness::client()
        .get(sidecar.admin_url(path))
        .bearer_auth(sidecar.admin_token())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Every ledger entry in `state` (the admin API pages by 100; this reads them all).
pub async fn entries(sidecar: &Sidecar, state: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after = 0u64;
    loop {
        let (status, page) = admin(
            sidecar,
            &format!("/v1/ledger?state={state}&after={after}&limit=1000"),
        )
        .await;
        assert_eq!(status, 200, "{page}");
        let list = page["entries"].as_array().cloned().unwrap_or_default();
        if list.is_empty() {
            return all;
        }
        after = list
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .max()
            .unwrap();
        all.extend(list);
    }
}

pub fn pay_to() -> Address {
    PAY_TO.parse().unwrap()
}

/// A transaction's receipt from the node (JSON).
pub async fn receipt(chain: &DevChain, tx: &str) -> Value {
    chain.rpc("eth_getTransactionReceipt", json!([tx])).await
}

fn quantity(v: &Value) -> u64 {
    u64::from_str_radix(v.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
}

/// Bundles of 1, 10 and 100 each settle in one transaction, and `after response` in one of
/// its own; prints the gas per payment of each (the README's figures).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_of_1_10_and_100_settle_in_one_transaction_each() {
    let buyer = Wallet::new(71);
    let chain = DevChain::start_with(&funding(&[&buyer], 10_000_000)).await;
    let s = setup_on("relayer-sizes", chain, None, "after response", "").await;
    let routes = [("after", 1usize), ("one", 1), ("ten", 10), ("hundred", 100)];
    let mut served = 0;
    for (route, count) in routes {
        for i in 0..count {
            let response = pay(&s.sidecar, &buyer, &format!("/{route}/{i}")).await;
            assert_eq!(response.status(), 200, "{route} {i}");
            if route == "after" {
                let receipt =
                    harness::decode(response.headers()["payment-response"].to_str().unwrap());
                assert_eq!(receipt["success"], true, "{receipt}");
                assert_eq!(receipt["network"], "eip155:84532");
                assert_eq!(receipt["payer"], buyer.address().to_string());
            }
            served += 1;
        }
    }
    settled(&s.sidecar, Duration::from_secs(120)).await;

    let confirmed = entries(&s.sidecar, "confirmed").await;
    assert_eq!(confirmed.len(), served, "{}", s.sidecar.log());
    // Group the confirmed entries by transaction, per route.
    let mut by_tx: BTreeMap<String, (String, usize, u64)> = BTreeMap::new();
    for e in &confirmed {
        let tx = e["status"]["tx"].as_str().unwrap().to_string();
        let route = e["route"].as_str().unwrap().to_string();
        let gas = e["status"]["gas_used"].as_u64().unwrap();
        let slot = by_tx.entry(tx).or_insert((route.clone(), 0, gas));
        assert_eq!(slot.0, route, "one transaction, one route");
        slot.1 += 1;
    }
    let mut sizes: Vec<usize> = by_tx.values().map(|(_, n, _)| *n).collect();
    sizes.sort();
    assert_eq!(sizes, vec![1, 1, 10, 100], "{by_tx:?}");
    for (tx, (route, n, gas)) in &by_tx {
        let r = receipt(&s.chain, tx).await;
        assert_eq!(r["status"], "0x1");
        assert_eq!(
            quantity(&r["gasUsed"]),
            *gas,
            "the ledger's gas is the receipt's"
        );
        assert_eq!(
            r["from"].as_str().unwrap().to_lowercase(),
            super::chain::RELAYER_ADDRESS.to_string().to_lowercase()
        );
        eprintln!(
            "GAS route={route} payments={n} gas={gas} per_payment={}",
            gas / *n as u64
        );
    }
    // Nothing moved twice, and nothing but the payments moved.
    let used = s.chain.authorizations_used(buyer.address()).await;
    assert_eq!(used.len(), served);
    assert_eq!(s.chain.transfers_to(pay_to()).await.len(), served);
    assert_eq!(s.chain.balance_of(pay_to()).await, served as u128 * PRICE);
    assert_eq!(
        s.chain.relayer_nonce().await,
        4,
        "one transaction per bundle"
    );
    assert_eq!(
        metric(&s.sidecar, "tollgate_settlement_gas_total").await as u64,
        by_tx.values().map(|(_, _, g)| g).sum::<u64>()
    );
    let (status, report) = admin(&s.sidecar, "/v1/ledger/verify").await;
    assert_eq!(status, 200, "{report}");
}

/// A bundle mixing a good authorization, one whose payer has no funds, one whose nonce the
/// payer used for another transfer first, and one that someone else already settled to
/// `pay_to`: the simulation takes the three out before they cost gas; the chain's events tell
/// the settled one (`confirmed`, naming the other transaction: the money arrived) from the one
/// spent elsewhere (`failed`, with the reason); the good one settles alone, straight to the
/// token, in the only transaction the relayer sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_with_bad_authorizations_confirms_the_good_one_and_names_the_failures() {
    let rich = Wallet::new(72);
    let broke = Wallet::new(73);
    let chain = DevChain::start_with(&funding(&[&rich], 1_000_000)).await;
    let s = setup_on(
        "relayer-mixed",
        chain,
        None,
        "deferred every 60s or 4 payments",
        "",
    )
    .await;
    let facilitator_settle = |payload: Value, requirements: Value| {
        let url = format!("{}/settle", s.chain.facilitator_url());
        async move {
            let answer: Value = harness::client()
                .post(url)
                .json(&json!({
                    "x402Version": 2,
                    "paymentPayload": payload,
                    "paymentRequirements": requirements,
                }))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(answer["success"], true, "{answer}");
            answer["transaction"].as_str().unwrap().to_string()
        }
    };
    assert_eq!(pay(&s.sidecar, &rich, "/paid/good").await.status(), 200);
    assert_eq!(pay(&s.sidecar, &broke, "/paid/broke").await.status(), 200);
    // Someone holding this payment settles it first (through the official facilitator).
    let (header, payload) = sign(&s.sidecar, &rich, "/paid/settled").await;
    let settled_elsewhere = facilitator_settle(payload.clone(), payload["accepted"].clone()).await;
    assert_eq!(
        send(&s.sidecar, "/paid/settled", &header).await.status(),
        200
    );
    // The payer uses this payment's nonce for a transfer to someone else first.
    let (_, required) = {
        let response = harness::client()
            .get(s.sidecar.url("/paid/spent"))
            .send()
            .await
            .unwrap();
        let required = harness::decode(response.headers()["payment-required"].to_str().unwrap());
        (response, required)
    };
    let offer = &required["accepts"][0];
    let nonce = alloy::primitives::B256::repeat_byte(0x5e);
    let other: Address = "0x000000000000000000000000000000000000dEaD"
        .parse()
        .unwrap();
    let elsewhere = harness::decode(&rich.pay_v2(
        offer,
        &Tweak {
            to: Some(other),
            nonce: Some(nonce),
            ..Tweak::default()
        },
    ));
    let mut requirements = offer.clone();
    requirements["payTo"] = json!(other.to_string());
    facilitator_settle(elsewhere, requirements).await;
    let header = rich.pay_v2(
        offer,
        &Tweak {
            nonce: Some(nonce),
            ..Tweak::default()
        },
    );
    assert_eq!(send(&s.sidecar, "/paid/spent", &header).await.status(), 200);
    settled(&s.sidecar, Duration::from_secs(60)).await;

    let confirmed: BTreeMap<String, String> = entries(&s.sidecar, "confirmed")
        .await
        .iter()
        .map(|e| {
            (
                e["path"].as_str().unwrap().to_string(),
                e["status"]["tx"].as_str().unwrap().to_lowercase(),
            )
        })
        .collect();
    assert_eq!(confirmed.len(), 2, "{confirmed:?}\n{}", s.sidecar.log());
    assert_eq!(
        confirmed["/paid/settled"],
        settled_elsewhere.to_lowercase(),
        "settled by someone else: confirmed with their transaction"
    );
    let failed: BTreeMap<String, String> = entries(&s.sidecar, "failed")
        .await
        .iter()
        .map(|e| {
            (
                e["path"].as_str().unwrap().to_string(),
                e["status"]["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert!(
        failed["/paid/broke"].starts_with("insufficient_balance"),
        "{failed:?}"
    );
    assert!(
        failed["/paid/spent"].starts_with("nonce_already_used")
            && failed["/paid/spent"].contains("without a transfer"),
        "{failed:?}"
    );
    // The failures cost no gas: one transaction, the good transfer, sent to the token itself.
    assert_eq!(s.chain.relayer_nonce().await, 1);
    let r = receipt(&s.chain, &confirmed["/paid/good"]).await;
    assert_eq!(
        r["to"].as_str().unwrap().to_lowercase(),
        s.chain.token().to_string().to_lowercase()
    );
    assert_eq!(
        s.chain.balance_of(pay_to()).await,
        2 * PRICE,
        "good + settled"
    );
    assert_eq!(
        metric(
            &s.sidecar,
            r#"tollgate_settlements_total{result="refused"}"#
        )
        .await,
        2.0
    );
    let (status, report) = admin(&s.sidecar, "/v1/ledger/verify").await;
    assert_eq!(status, 200, "{report}");
}

/// `before response` and `after response` through the relayer: the receipt names the
/// transaction; a payer without funds is refused (402 `settlement_failed`) and, before the
/// response, the upstream never sees the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_and_after_response_settle_through_the_relayer_and_refuse_what_cannot_settle() {
    let buyer = Wallet::new(74);
    let broke = Wallet::new(75);
    let chain = DevChain::start_with(&funding(&[&buyer], 1_000_000)).await;
    let s = setup_on("relayer-now", chain, None, "after response", "").await;
    for path in ["/after/x", "/first/y"] {
        let response = pay(&s.sidecar, &buyer, path).await;
        assert_eq!(response.status(), 200, "{path}");
        let receipt = harness::decode(response.headers()["payment-response"].to_str().unwrap());
        assert_eq!(receipt["success"], true);
        let tx = receipt["transaction"].as_str().unwrap().to_string();
        let used = s.chain.authorizations_used(buyer.address()).await;
        assert!(
            used.iter().any(|(_, hash, _)| hash.to_string() == tx),
            "{path}: {tx} is not an AuthorizationUsed transaction: {used:?}"
        );
    }
    let seen = s.upstream.seen();
    let refused = pay(&s.sidecar, &broke, "/first/broke").await;
    let body = super::expect_error(refused, 402, "settlement_failed").await;
    assert!(body.to_string().contains("insufficient_balance"), "{body}");
    assert_eq!(s.upstream.seen(), seen, "before response: never forwarded");
    let refused = pay(&s.sidecar, &broke, "/after/broke").await;
    super::expect_error(refused, 402, "settlement_failed").await;
    assert_eq!(s.chain.balance_of(pay_to()).await, 2 * PRICE);
    assert_eq!(s.chain.relayer_nonce().await, 2, "refusals cost no gas");
    settled(&s.sidecar, Duration::from_secs(30)).await;
    assert_eq!(entries(&s.sidecar, "failed").await.len(), 2);
}

/// The node goes down: deferred payments are served and wait, `before`/`after response` fail
/// closed (503, nothing served unpaid, counted); when the node is back everything waiting
/// settles. A slow node only makes settlement slower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_holds_deferred_payments_and_fails_immediate_ones_closed() {
    let buyer = Wallet::new(76);
    let chain = DevChain::start_with(&funding(&[&buyer], 1_000_000)).await;
    let relay = Relay::start(chain.rpc_port()).await;
    let s = setup_on(
        "relayer-down",
        chain,
        Some(&relay.url()),
        "deferred every 1s",
        "",
    )
    .await;
    assert_eq!(pay(&s.sidecar, &buyer, "/paid/up").await.status(), 200);
    settled(&s.sidecar, Duration::from_secs(30)).await;

    relay.down();
    for i in 0..3 {
        assert_eq!(
            pay(&s.sidecar, &buyer, &format!("/paid/down-{i}"))
                .await
                .status(),
            200,
            "deferred: served, settled later"
        );
    }
    let seen = s.upstream.seen();
    let response = pay(&s.sidecar, &buyer, "/first/down").await;
    super::expect_error(response, 503, "settlement_unavailable").await;
    assert_eq!(s.upstream.seen(), seen, "before response: not forwarded");
    let response = pay(&s.sidecar, &buyer, "/after/down").await;
    super::expect_error(response, 503, "settlement_unavailable").await;
    assert!(
        metric(
            &s.sidecar,
            r#"tollgate_settlements_total{result="unavailable"}"#
        )
        .await
            >= 2.0
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        s.chain.transfers_to(pay_to()).await.len(),
        1,
        "nothing settles while the node is down"
    );
    assert!(
        metric(&s.sidecar, r#"tollgate_payments_open{state="queued"}"#).await >= 3.0,
        "{}",
        s.sidecar.log()
    );

    relay.set_delay(Duration::from_millis(1500));
    relay.up();
    settled(&s.sidecar, Duration::from_secs(90)).await;
    assert_eq!(s.chain.transfers_to(pay_to()).await.len(), 4);
    assert_eq!(s.chain.balance_of(pay_to()).await, 4 * PRICE);
    let failed: BTreeSet<String> = entries(&s.sidecar, "failed")
        .await
        .iter()
        .map(|e| e["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        failed,
        BTreeSet::from(["/first/down".to_string(), "/after/down".to_string()]),
        "the refused buyers were never charged"
    );
    let (status, report) = admin(&s.sidecar, "/v1/ledger/verify").await;
    assert_eq!(status, 200, "{report}");
}

/// The accountant's question with tollgate as its own settler: 1,000 paid requests in one
/// deferred bundle of up to 1,000 — sent as transactions of at most 200 authorizations (a
/// single transaction of 1,000, ~39M gas, would outgrow anvil's 30M block and never be mined)
/// — and the export adds up to exactly what reached `pay_to` on chain, each row naming the
/// transaction that carried its transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_payments_in_bundles_reconcile_exactly_with_the_chain() {
    let buyer = Wallet::new(77);
    let chain = DevChain::start_with(&funding(&[&buyer], 20_000_000)).await;
    let s = setup_on(
        "relayer-thousand",
        chain,
        None,
        "deferred every 60s or 1000 payments",
        "",
    )
    .await;
    let response = harness::client()
        .get(s.sidecar.url("/paid/0"))
        .send()
        .await
        .unwrap();
    let required = harness::decode(response.headers()["payment-required"].to_str().unwrap());
    let offer = required["accepts"][0].clone();
    let total = 1_000;
    let mut served = 0;
    for batch in 0..(total / 50) {
        let mut calls = Vec::new();
        for i in 0..50 {
            let header = buyer.pay_v2(&offer, &Tweak::default());
            let url = s.sidecar.url(&format!("/paid/{batch}-{i}"));
            calls.push(tokio::spawn(async move {
                harness::client()
                    .get(url)
                    .header("payment-signature", header)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            }));
        }
        for call in calls {
            if call.await.unwrap().unwrap() == 200 {
                served += 1;
            }
        }
    }
    assert_eq!(served, total);
    settled(&s.sidecar, Duration::from_secs(180)).await;

    let export: Value = harness::client()
        .get(s.sidecar.admin_url("/v1/ledger/export?format=json"))
        .bearer_auth(s.sidecar.admin_token())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rows = export["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), total);
    assert!(
        rows.iter().all(|r| r["state"] == "confirmed"),
        "every payment settled"
    );
    let exported: u128 = rows
        .iter()
        .map(|r| {
            r["amount_atomic"]
                .as_str()
                .unwrap()
                .parse::<u128>()
                .unwrap()
        })
        .sum();
    let transfers = s.chain.transfers_to(pay_to()).await;
    let on_chain: u128 = transfers.iter().map(|(_, value, _, _)| value).sum();
    assert_eq!(exported, on_chain);
    assert_eq!(on_chain, total as u128 * PRICE);
    assert_eq!(s.chain.balance_of(pay_to()).await, on_chain);
    let mut hashes: Vec<String> = transfers.iter().map(|t| t.2.to_string()).collect();
    let mut exported_hashes: Vec<String> = rows
        .iter()
        .map(|r| r["tx_hash"].as_str().unwrap().to_lowercase())
        .collect();
    hashes.sort();
    exported_hashes.sort();
    assert_eq!(hashes, exported_hashes, "each row names its own transfer");
    let transactions: BTreeSet<&String> = hashes.iter().collect();
    assert!(
        transactions.len() <= 12,
        "bundled: {} transactions for {total} payments",
        transactions.len()
    );
    for tx in &transactions {
        let carried = hashes.iter().filter(|h| h == tx).count();
        assert!(
            carried <= tollgate::settle::onchain::MAX_PER_TRANSACTION,
            "{tx} carried {carried} authorizations"
        );
    }
    let bundles: BTreeSet<String> = rows.iter().map(|r| r["bundle"].to_string()).collect();
    assert!(
        bundles.len() < transactions.len(),
        "bundles of up to 1,000 go out as transactions of at most {}: {} bundles, {} transactions",
        tollgate::settle::onchain::MAX_PER_TRANSACTION,
        bundles.len(),
        transactions.len()
    );
    assert_eq!(
        s.chain.relayer_nonce().await as usize,
        transactions.len(),
        "one relayer transaction per bundle, none wasted"
    );
    assert_eq!(
        s.chain.authorizations_used(buyer.address()).await.len(),
        total
    );
    let verified = harness::client()
        .get(s.sidecar.admin_url("/v1/ledger/verify"))
        .bearer_auth(s.sidecar.admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(verified.status(), 200, "{}", verified.text().await.unwrap());
}

/// Twenty transactions sent at once through one relayer, with blocks every second so they
/// all wait in the pool together: each gets its own nonce, all are mined, none is lost or sent
/// twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transactions_of_one_relayer_never_collide_on_a_nonce() {
    use alloy::sol_types::SolCall;
    use tollgate::settle::evm::balanceOfCall;
    use tollgate::settle::relayer::{self, Relayer, Settings};

    let chain = DevChain::start_opts(&[], Some(1)).await;
    let relayer = std::sync::Arc::new(Relayer::new(
        relayer::provider(&chain.rpc_url()).unwrap(),
        relayer::parse_key(RELAYER_KEY).unwrap(),
        super::chain::CHAIN_ID,
        Settings {
            confirmations: 1,
            max_fee_per_gas: 100_000_000_000,
            replace_after: Duration::from_secs(30),
        },
    ));
    let data: alloy::primitives::Bytes = balanceOfCall { owner: pay_to() }.abi_encode().into();
    let mut sends = Vec::new();
    for _ in 0..20 {
        let relayer = relayer.clone();
        let data = data.clone();
        let token = chain.token();
        sends.push(tokio::spawn(async move {
            relayer.submit(token, data, 100_000).await
        }));
    }
    let mut hashes = BTreeSet::new();
    for send in sends {
        let mined = send.await.unwrap().expect("mined");
        assert!(mined.success);
        hashes.insert(mined.tx);
    }
    assert_eq!(hashes.len(), 20);
    assert_eq!(chain.relayer_nonce().await, 20);
}
