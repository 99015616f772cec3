//! Settlement for real: tollgate in front of a real upstream, the official x402 facilitator
//! settling on anvil ([`DevChain`]), buyers signing with real keys. The ledger is compared with
//! the chain (Transfer and AuthorizationUsed events, balances).

use std::time::Duration;

use alloy::primitives::Address;
use serde_json::{Value, json};

use super::chain::DevChain;
use super::harness::{self, Launch, PAY_TO, Sidecar, Tweak, Upstream, Wallet};

const PRICE: u128 = 10_000; // 0.01 USDC

fn policy(facilitator: &str, bundle: &str) -> String {
    format!(
        r#"service "chain" {{
  pay_to {PAY_TO}
  accept x402 on base-sepolia
  settle via facilitator "{facilitator}" {bundle}
  default deny

  route GET "/paid/**" {{ price 0.01 USDC }}
  route GET "/after/**" {{
    price 0.01 USDC
    settle after response
  }}
  route GET "/first/**" {{
    price 0.01 USDC
    settle before response
  }}
  route GET "/windowed/**" {{
    price 0.01 USDC
    settle deferred every 2s
  }}
  route GET "/valued/**" {{
    price 0.01 USDC
    settle deferred every 60s or 0.03 USDC
  }}
}}
"#
    )
}

struct Setup {
    chain: DevChain,
    sidecar: Sidecar,
    upstream: Upstream,
    dir: std::path::PathBuf,
    yaml: String,
}

async fn setup(name: &str, funded: &[&Wallet], bundle: &str, evidence: bool) -> Setup {
    let funding: Vec<(Address, u128)> = funded.iter().map(|w| (w.address(), 1_000_000)).collect();
    let chain = DevChain::start_with(&funding).await;
    let upstream = Upstream::start().await;
    let dir = harness::scratch_dir(name);
    std::fs::write(
        dir.join("policy.toll"),
        policy(&chain.facilitator_url(), bundle),
    )
    .unwrap();
    let yaml = if evidence {
        format!("settlement:\n  rpc: {}\n", chain.rpc_url())
    } else {
        String::new()
    };
    let sidecar = launch(&dir, &upstream, &yaml).await;
    Setup {
        chain,
        sidecar,
        upstream,
        dir,
        yaml,
    }
}

async fn launch(dir: &std::path::Path, upstream: &Upstream, yaml: &str) -> Sidecar {
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

/// A payment header for `path` signed by `wallet`, and the decoded payload.
async fn sign(sidecar: &Sidecar, wallet: &Wallet, path: &str) -> (String, Value) {
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

async fn pay(sidecar: &Sidecar, wallet: &Wallet, path: &str) -> reqwest::Response {
    let (header, _) = sign(sidecar, wallet, path).await;
    send(sidecar, path, &header).await
}

async fn send(sidecar: &Sidecar, path: &str, header: &str) -> reqwest::Response {
    harness::client()
        .get(sidecar.url(path))
        .header("payment-signature", header)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap()
}

/// One metric series' value (0 when absent).
async fn metric(sidecar: &Sidecar, series: &str) -> f64 {
    let text = sidecar.metrics().await;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Waits until no payment is open (every one confirmed, failed or refunded).
async fn settled(sidecar: &Sidecar, within: Duration) {
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
async fn admin(sidecar: &Sidecar, path: &str) -> (u16, Value) {
    let response = harness::client()
        .get(sidecar.admin_url(path))
        .bearer_auth(sidecar.admin_token())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn pay_to() -> Address {
    PAY_TO.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_bundle_settles_on_chain_and_a_bad_authorization_fails_alone() {
    let rich = Wallet::new(61);
    let broke = Wallet::new(62);
    let s = setup(
        "chain-bundle",
        &[&rich],
        "deferred every 60s or 6 payments",
        false,
    )
    .await;
    for i in 0..3 {
        assert_eq!(
            pay(&s.sidecar, &rich, &format!("/paid/{i}")).await.status(),
            200
        );
    }
    // A payer without funds is served (verification is local) but cannot settle.
    assert_eq!(pay(&s.sidecar, &broke, "/paid/broke").await.status(), 200);
    // The payer spends an authorization elsewhere before its bundle settles.
    let (header, payload) = sign(&s.sidecar, &rich, "/paid/spent").await;
    assert_eq!(send(&s.sidecar, "/paid/spent", &header).await.status(), 200);
    let direct: Value = harness::client()
        .post(format!("{}/settle", s.chain.facilitator_url()))
        .json(&json!({
            "x402Version": 2,
            "paymentPayload": payload,
            "paymentRequirements": payload["accepted"],
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(direct["success"], true, "{direct}");
    assert!(s.chain.transfers_to(pay_to()).await.len() == 1);
    // The sixth payment closes the bundle.
    assert_eq!(pay(&s.sidecar, &rich, "/paid/last").await.status(), 200);
    settled(&s.sidecar, Duration::from_secs(60)).await;

    assert_eq!(
        metric(
            &s.sidecar,
            r#"tollgate_ledger_facts_total{state="confirmed"}"#
        )
        .await,
        4.0
    );
    assert_eq!(
        metric(&s.sidecar, r#"tollgate_ledger_facts_total{state="failed"}"#).await,
        2.0
    );
    assert_eq!(
        metric(
            &s.sidecar,
            r#"tollgate_settlement_bundles_total{asset="USDC"}"#
        )
        .await,
        1.0
    );
    let transfers = s.chain.transfers_to(pay_to()).await;
    assert_eq!(transfers.len(), 5, "4 from the bundle, 1 settled directly");
    assert!(
        transfers
            .iter()
            .all(|(from, value, _, _)| *from == rich.address() && *value == PRICE)
    );
    assert_eq!(s.chain.balance_of(pay_to()).await, 5 * PRICE);
    assert_eq!(s.chain.balance_of(broke.address()).await, 0);
    assert_eq!(s.upstream.seen(), 6, "every buyer was served at once");
    // The ledger says which failed and why, in the facilitator's words.
    let (_, failed) = admin(&s.sidecar, "/v1/ledger?state=failed").await;
    let reasons: Vec<String> = failed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| format!("{} {}", e["payer"], e["status"]["reason"]))
        .collect();
    assert_eq!(reasons.len(), 2, "{failed}");
    assert!(
        reasons.iter().any(|r| r.contains("insufficient_balance")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("nonce_already_used")),
        "{reasons:?}"
    );
    let (_, confirmed) = admin(&s.sidecar, "/v1/ledger?state=confirmed").await;
    let mut ledger_txs: Vec<String> = confirmed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"]["tx"].as_str().unwrap().to_lowercase())
        .collect();
    ledger_txs.sort();
    let mut chain_txs: Vec<String> = transfers.iter().map(|t| t.2.to_string()).collect();
    chain_txs.sort();
    chain_txs.retain(|tx| ledger_txs.contains(tx));
    assert_eq!(ledger_txs.len(), 4);
    assert_eq!(
        chain_txs, ledger_txs,
        "every confirmed entry names its transfer"
    );
    let (status, report) = admin(&s.sidecar, "/v1/ledger/verify").await;
    assert_eq!(status, 200, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_and_after_response_settle_on_chain_with_the_official_facilitator() {
    let buyer = Wallet::new(63);
    let s = setup("chain-now", &[&buyer], "after response", false).await;
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
    assert_eq!(s.chain.balance_of(pay_to()).await, 2 * PRICE);
}

/// `kill -9` while bundles are being settled, three times: after each restart the payments
/// that were in flight are `unresolved`, decided by evidence from the chain (and submitted again
/// only when their nonce is unused); in the end every payment settled exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_deferred_settlement_settles_every_payment_exactly_once() {
    let buyer = Wallet::new(64);
    let mut s = setup(
        "chain-kill",
        &[&buyer],
        "deferred every 60s or 8 payments",
        true,
    )
    .await;
    let rounds = 3;
    let mut caught_in_flight = 0;
    for round in 0..rounds {
        for i in 0..8 {
            let path = format!("/paid/{round}-{i}");
            assert_eq!(pay(&s.sidecar, &buyer, &path).await.status(), 200);
        }
        // The eighth payment closed a bundle: kill while it is being settled.
        tokio::time::sleep(Duration::from_millis(20 + 30 * round)).await;
        s.sidecar.kill();
        s.sidecar = launch(&s.dir, &s.upstream, &s.yaml).await;
        let log = s.sidecar.log();
        let recovered = log
            .lines()
            .rev()
            .find(|l| l.contains("payment ledger recovered"))
            .unwrap_or("");
        eprintln!("round {round}: {recovered}");
        let count = |key: &str| -> usize {
            recovered
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.parse().ok())
                .unwrap_or(0)
        };
        caught_in_flight += count("open=");
    }
    assert!(
        caught_in_flight > 0,
        "no kill landed while payments were open"
    );
    settled(&s.sidecar, Duration::from_secs(90)).await;
    let transfers = s.chain.transfers_to(pay_to()).await;
    let used = s.chain.authorizations_used(buyer.address()).await;
    let mut nonces: Vec<_> = used.iter().map(|(nonce, _, _)| *nonce).collect();
    nonces.sort();
    nonces.dedup();
    assert_eq!(transfers.len(), 8 * rounds as usize, "{}", s.sidecar.log());
    assert_eq!(nonces.len(), 8 * rounds as usize);
    assert_eq!(
        s.chain.balance_of(pay_to()).await,
        8 * rounds as u128 * PRICE
    );
    assert_eq!(s.upstream.seen(), 8 * rounds as usize);
}

/// The accountant's question: after 1,000 paid requests settled in deferred bundles, does the
/// export add up to exactly what reached `pay_to` on chain, transaction by transaction?
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_export_of_a_thousand_payments_equals_the_transfers_on_chain() {
    let buyer = Wallet::new(65);
    let chain = DevChain::start_with(&[(buyer.address(), 20_000_000)]).await;
    let upstream = Upstream::start().await;
    let dir = harness::scratch_dir("chain-export");
    std::fs::write(
        dir.join("policy.toll"),
        policy(
            &chain.facilitator_url(),
            "deferred every 5s or 100 payments",
        ),
    )
    .unwrap();
    let sidecar = launch(&dir, &upstream, "").await;
    let response = harness::client()
        .get(sidecar.url("/paid/0"))
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
            let url = sidecar.url(&format!("/paid/{batch}-{i}"));
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
    settled(&sidecar, Duration::from_secs(120)).await;

    let admin = |path: &str| {
        harness::client()
            .get(sidecar.admin_url(path))
            .bearer_auth(sidecar.admin_token())
    };
    let export: Value = admin("/v1/ledger/export?format=json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rows = export["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), total);
    let confirmed: Vec<&Value> = rows.iter().filter(|r| r["state"] == "confirmed").collect();
    assert_eq!(confirmed.len(), total, "every payment settled");
    let exported: u128 = confirmed
        .iter()
        .map(|r| {
            r["amount_atomic"]
                .as_str()
                .unwrap()
                .parse::<u128>()
                .unwrap()
        })
        .sum();
    let transfers = chain.transfers_to(pay_to()).await;
    let on_chain: u128 = transfers.iter().map(|(_, value, _, _)| value).sum();
    assert_eq!(exported, on_chain);
    assert_eq!(on_chain, total as u128 * PRICE);
    assert_eq!(chain.balance_of(pay_to()).await, on_chain);
    let mut hashes: Vec<String> = transfers
        .iter()
        .map(|(_, _, tx, _)| tx.to_string())
        .collect();
    let mut exported_hashes: Vec<String> = confirmed
        .iter()
        .map(|r| r["tx_hash"].as_str().unwrap().to_lowercase())
        .collect();
    hashes.sort();
    exported_hashes.sort();
    assert_eq!(hashes, exported_hashes, "each row names its own transfer");
    let verified = admin("/v1/ledger/verify").send().await.unwrap();
    assert_eq!(verified.status(), 200, "{}", verified.text().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_close_by_window_and_by_value_on_chain() {
    let buyer = Wallet::new(66);
    let s = setup("chain-triggers", &[&buyer], "after response", false).await;
    // Value: 0.02 of 0.03 USDC stays queued; the third payment closes the bundle.
    for i in 0..2 {
        assert_eq!(
            pay(&s.sidecar, &buyer, &format!("/valued/{i}"))
                .await
                .status(),
            200
        );
    }
    // Window: two payments, settled once the oldest has waited 2 s.
    for i in 0..2 {
        assert_eq!(
            pay(&s.sidecar, &buyer, &format!("/windowed/{i}"))
                .await
                .status(),
            200
        );
    }
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(
        s.chain.transfers_to(pay_to()).await.len(),
        2,
        "the window bundle"
    );
    assert_eq!(
        metric(&s.sidecar, r#"tollgate_payments_open{state="queued"}"#).await,
        2.0
    );
    assert_eq!(pay(&s.sidecar, &buyer, "/valued/2").await.status(), 200);
    settled(&s.sidecar, Duration::from_secs(30)).await;
    assert_eq!(s.chain.transfers_to(pay_to()).await.len(), 5);
    let (_, bundles) = admin(&s.sidecar, "/v1/bundles").await;
    let closed: Vec<String> = bundles["bundles"]
        .as_array()
        .map(|b| {
            b.iter()
                .map(|b| b["closed_by"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(closed, ["window", "value"], "{bundles}");
    let (status, report) = admin(&s.sidecar, "/v1/ledger/verify").await;
    assert_eq!(status, 200, "{report}");
}
