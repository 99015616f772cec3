//! SIGKILL, SIGTERM and SIGHUP at every stage of a paid request, each stage held
//! deterministically: the payment header half sent (before the nonce write), a slow upstream
//! (after the nonce write), a slow facilitator (during settlement), a deferred bundle whose
//! `/settle` is slow (during a bundle submission; `settle via rpc` bundles killed mid-flight are
//! in `chain_relayer_faults.rs` and `chain_settlement.rs`).
//!
//! - SIGKILL: after a restart a nonce is claimed iff its payment is on the books, nothing is
//!   settled twice, an entry cut off mid-settlement is `unresolved` (never sent again), one cut
//!   off before settlement is `refunded`, and `tollgate ledger verify` passes.
//! - SIGTERM: the request in flight finishes (settled once, with its receipt) and tollgate exits
//!   0; a bundle in flight finishes its calls; a half-sent request is not admitted.
//! - SIGHUP: a reload while a request is in flight changes nothing for it (it settles at the
//!   price it was admitted at); the next request sees the new policy.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::chain_relayer::{admin, metric};
use super::expect_error;
use super::faults::{entry_for, ledger_consistent, policy, send, sign, wait_metric, wait_state};
use super::harness::{self, Facilitator, Launch, Sidecar, Tweak, Upstream, Wallet};

/// How long a held stage lasts: the upstream's `/slow/` and the facilitator's `/slow/`.
const HOLD_MS: u64 = 1500;

/// A scratch folder whose policy settles through `facilitator`, every call of which takes
/// [`HOLD_MS`].
fn slow_settling_dir(name: &str, facilitator: &Facilitator) -> std::path::PathBuf {
    let dir = harness::scratch_dir(name);
    let slow = format!("{}/slow/{HOLD_MS}", facilitator.url());
    std::fs::write(dir.join("policy.toll"), policy(&slow)).unwrap();
    dir
}

async fn start(dir: &Path, upstream: &Upstream) -> Sidecar {
    Sidecar::launch(dir, &upstream.url(), Launch::default()).await
}

/// Sends the head of a paid GET up to the middle of its payment header, and holds the
/// connection: the request is still being read, nothing is verified or recorded yet.
async fn half_sent(sidecar: &Sidecar, path: &str, header: &str) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", sidecar.port))
        .await
        .unwrap();
    let part = format!(
        "GET {path} HTTP/1.1\r\nHost: api.example.com\r\nPayment-Signature: {}",
        &header[..header.len() / 2]
    );
    stream.write_all(part.as_bytes()).await.unwrap();
    stream
}

/// What the server wrote on `stream` before closing it (10 s at most).
async fn answer_of(mut stream: TcpStream) -> String {
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// Every ledger entry, by path.
async fn ledger(sidecar: &Sidecar) -> Vec<Value> {
    let (status, page) = admin(sidecar, "/v1/ledger?limit=1000").await;
    assert_eq!(status, 200, "{page}");
    page["entries"].as_array().unwrap().clone()
}

/// `tollgate ledger verify --json` on the store in `dir` (no sidecar running).
fn cli_verify(dir: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["ledger", "verify", "--json"])
        .current_dir(dir)
        .env_remove("TOLLGATE_CONFIG")
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{report:#}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report["consistent"], true, "{report:#}");
}

/// SIGKILL at each stage, one restart after each, in one store:
/// 1. before the nonce write (payment header half sent): nothing recorded; after the restart
///    the same authorization pays (200) — its nonce was never claimed;
/// 2. after the nonce write, upstream answering (`after response`): the buyer gets nothing;
///    after the restart the entry is `refunded` (recovery: `recorded` means "never answered"),
///    never settled, and the authorization is `payment_replayed` — claimed and recorded;
/// 3. during settlement (`before response`, `/settle` in flight): `unresolved` after the
///    restart (the call may have gone out), never sent again, the upstream never saw it;
/// 4. during a bundle submission (`deferred`, `/settle` in flight): `unresolved`, never sent
///    again.
///
/// Signals: `tollgate_payments_open{state="unresolved"}` and the startup line `… unresolved
/// until evidence from the chain decides them`. In the end `tollgate ledger verify` passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_every_stage_of_a_paid_request_loses_and_doubles_nothing() {
    let upstream = Upstream::start().await;
    let facilitator = Facilitator::start().await;
    let dir = slow_settling_dir("sig-kill", &facilitator);
    let wallet = Wallet::new(0x61);
    let mut s = start(&dir, &upstream).await;

    // 1. Before the nonce write.
    let header = sign(&s, &wallet, "/after/one", Tweak::default()).await;
    let held = half_sent(&s, "/after/one", &header).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.kill();
    assert!(!answer_of(held).await.contains("200 OK"));
    s = start(&dir, &upstream).await;
    assert!(
        ledger(&s).await.is_empty(),
        "a half-read request was recorded"
    );
    let response = send(&s, "/after/one", &header).await;
    assert_eq!(response.status(), 200, "the unrecorded nonce was claimed");
    assert_eq!(
        entry_for(&s, "/after/one").await["status"]["state"],
        "confirmed"
    );
    assert_eq!(upstream.seen(), 1);

    // 2. After the nonce write: the upstream holds the request.
    let path = format!("/after/slow/{HOLD_MS}");
    let header = sign(&s, &wallet, &path, Tweak::default()).await;
    let request = tokio::spawn({
        let url = s.url(&path);
        let header = header.clone();
        async move {
            harness::client()
                .get(url)
                .header("payment-signature", header)
                .send()
                .await
        }
    });
    // Recorded, forwarded, the upstream not answered yet (it answers after HOLD_MS).
    wait_metric(&s, r#"tollgate_payments_open{state="recorded"}"#, 1.0).await;
    s.kill();
    assert!(request.await.unwrap().is_err(), "the buyer got an answer");
    s = start(&dir, &upstream).await;
    let entry = entry_for(&s, &path).await;
    assert_eq!(entry["status"]["state"], "refunded", "{entry:#}");
    // The upstream's handler may still finish the request tollgate was killed in: settle.
    tokio::time::sleep(Duration::from_millis(HOLD_MS + 200)).await;
    let seen = upstream.seen();
    expect_error(send(&s, &path, &header).await, 402, "payment_replayed").await;
    assert_eq!(upstream.seen(), seen, "the replay was forwarded");

    // 3. During settlement (`before response`): `/settle` is in flight.
    let calls = facilitator.calls();
    let header = sign(&s, &wallet, "/before/settling", Tweak::default()).await;
    let request = tokio::spawn({
        let url = s.url("/before/settling");
        let header = header.clone();
        async move {
            harness::client()
                .get(url)
                .header("payment-signature", header)
                .send()
                .await
        }
    });
    wait_metric(&s, r#"tollgate_payments_open{state="submitted"}"#, 1.0).await;
    s.kill();
    assert!(request.await.unwrap().is_err(), "the buyer got an answer");
    s = start(&dir, &upstream).await;
    let entry = entry_for(&s, "/before/settling").await;
    assert_eq!(entry["status"]["state"], "unresolved", "{entry:#}");
    expect_error(
        send(&s, "/before/settling", &header).await,
        402,
        "payment_replayed",
    )
    .await;
    assert_eq!(upstream.seen(), seen, "before response: never forwarded");

    // 4. During a bundle submission (`deferred`): the bundle's `/settle` is in flight.
    let header = sign(&s, &wallet, "/deferred/bundled", Tweak::default()).await;
    assert_eq!(send(&s, "/deferred/bundled", &header).await.status(), 200);
    wait_metric(&s, r#"tollgate_payments_open{state="submitted"}"#, 1.0).await;
    s.kill();
    s = start(&dir, &upstream).await;
    let entry = entry_for(&s, "/deferred/bundled").await;
    assert_eq!(entry["status"]["state"], "unresolved", "{entry:#}");
    assert_eq!(
        metric(&s, r#"tollgate_payments_open{state="unresolved"}"#).await,
        2.0
    );
    assert!(
        s.log()
            .contains("unresolved until evidence from the chain decides them"),
        "{}",
        s.log()
    );
    // Never sent again: at most the two cut-off calls ever reach the facilitator.
    let now_calls = facilitator.calls();
    tokio::time::sleep(Duration::from_millis(3 * HOLD_MS)).await;
    assert_eq!(
        facilitator.calls(),
        now_calls,
        "an unresolved payment was sent again"
    );
    assert!(now_calls <= calls + 2, "{now_calls} calls, {calls} before");
    assert!(
        facilitator.settled().len() <= 3,
        "settled twice: {:?}",
        facilitator.settled()
    );
    assert_eq!(ledger(&s).await.len(), 4, "one entry per admitted payment");
    ledger_consistent(&s).await;
    s.kill();
    cli_verify(&dir);
}

/// SIGTERM at each stage, each on a fresh start of the same store:
/// 1. after the nonce write (`after response`, the upstream answering slowly): the request
///    finishes — 200 with its receipt, `confirmed`, settled once — and tollgate exits 0;
/// 2. during settlement (`before response`, `/settle` slow): the same;
/// 3. during a bundle submission (`deferred`): the bundle's call finishes before the exit, the
///    entry is `confirmed` after the restart and was sent once;
/// 4. before the nonce write (payment header half sent): not admitted — the connection is
///    closed without a paid answer, nothing is recorded, and the authorization pays later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_at_every_stage_finishes_the_paid_request_or_never_admits_it() {
    let upstream = Upstream::start().await;
    let facilitator = Facilitator::start().await;
    let dir = slow_settling_dir("sig-term", &facilitator);
    let wallet = Wallet::new(0x62);
    let exit = |mut s: Sidecar| async move {
        let status = tokio::task::spawn_blocking(move || s.wait_exit(Duration::from_secs(20)))
            .await
            .unwrap();
        assert!(status.success(), "{status}");
    };

    for (stage, path) in [
        ("upstream", format!("/after/slow/{HOLD_MS}")),
        ("settlement", "/before/settling".to_string()),
    ] {
        let s = start(&dir, &upstream).await;
        let header = sign(&s, &wallet, &path, Tweak::default()).await;
        let request = tokio::spawn({
            let url = s.url(&path);
            async move {
                harness::client()
                    .get(url)
                    .header("payment-signature", header)
                    .send()
                    .await
            }
        });
        // Held: the entry is recorded (upstream stage) or submitted (settlement stage).
        let held = if stage == "upstream" {
            "recorded"
        } else {
            "submitted"
        };
        wait_metric(
            &s,
            &format!("tollgate_payments_open{{state=\"{held}\"}}"),
            1.0,
        )
        .await;
        s.signal("TERM");
        let response = request
            .await
            .unwrap()
            .expect("the in-flight request was answered");
        assert_eq!(response.status(), 200, "{stage}");
        assert!(
            response.headers().get("payment-response").is_some(),
            "{stage}"
        );
        exit(s).await;
        let s = start(&dir, &upstream).await;
        assert_eq!(
            entry_for(&s, &path).await["status"]["state"],
            "confirmed",
            "{stage}"
        );
        s.signal("TERM");
        exit(s).await;
    }
    assert_eq!(facilitator.settled().len(), 2);

    // 3. During a bundle submission.
    let s = start(&dir, &upstream).await;
    assert_eq!(
        send(
            &s,
            "/deferred/bundled",
            &sign(&s, &wallet, "/deferred/bundled", Tweak::default()).await
        )
        .await
        .status(),
        200
    );
    wait_metric(&s, r#"tollgate_payments_open{state="submitted"}"#, 1.0).await;
    s.signal("TERM");
    exit(s).await;
    let s = start(&dir, &upstream).await;
    assert_eq!(
        entry_for(&s, "/deferred/bundled").await["status"]["state"],
        "confirmed",
        "the bundle in flight finished before the exit\n{}",
        s.log()
    );
    assert_eq!(facilitator.settled().len(), 3);
    assert_eq!(facilitator.calls(), 3, "sent once each");

    // 4. Before the nonce write.
    let header = sign(&s, &wallet, "/after/half", Tweak::default()).await;
    let held = half_sent(&s, "/after/half", &header).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.signal("TERM");
    let answer = answer_of(held).await;
    assert!(!answer.contains("200 OK"), "{answer}");
    exit(s).await;
    let s = start(&dir, &upstream).await;
    assert_eq!(
        ledger(&s).await.len(),
        3,
        "the half-sent request was recorded"
    );
    assert_eq!(send(&s, "/after/half", &header).await.status(), 200);
    assert_eq!(facilitator.calls(), 4);
    ledger_consistent(&s).await;
}

/// SIGHUP while a paid request is in flight (`before response`: settling, then the upstream
/// answering slowly) with a policy that doubles the price: the request completes under the
/// policy it started with — 200, settled and recorded at 0.01 USDC — and the next challenge
/// asks 0.02 USDC. Signal: `tollgate_policy_reloads_total{result="ok"}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_while_a_paid_request_is_in_flight_changes_nothing_for_it() {
    let upstream = Upstream::start().await;
    let facilitator = Facilitator::start().await;
    let dir = slow_settling_dir("sig-hup", &facilitator);
    let wallet = Wallet::new(0x63);
    let s = start(&dir, &upstream).await;
    let path = format!("/before/slow/{HOLD_MS}");
    let header = sign(&s, &wallet, &path, Tweak::default()).await;
    let request = tokio::spawn({
        let url = s.url(&path);
        async move {
            harness::client()
                .get(url)
                .header("payment-signature", header)
                .send()
                .await
        }
    });
    wait_metric(&s, r#"tollgate_payments_open{state="submitted"}"#, 1.0).await;
    let text = std::fs::read_to_string(dir.join("policy.toll")).unwrap();
    std::fs::write(
        dir.join("policy.toll"),
        text.replace("price 0.01 USDC", "price 0.02 USDC"),
    )
    .unwrap();
    s.signal("HUP");
    wait_metric(&s, r#"tollgate_policy_reloads_total{result="ok"}"#, 1.0).await;
    assert!(
        !request.is_finished(),
        "the request ended before the reload: the test did not test anything"
    );
    let response = request.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("payment-response").is_some());
    let settled = facilitator.settled();
    assert_eq!(settled.len(), 1);
    assert_eq!(settled[0].value, alloy::primitives::U256::from(10_000));
    let entry = wait_state(&s, &path, "confirmed").await;
    assert_eq!(entry["amount"], "10000", "{entry:#}");
    assert_eq!(upstream.seen(), 1);
    let challenge = harness::client()
        .get(s.url("/before/next"))
        .send()
        .await
        .unwrap();
    let required = harness::decode(challenge.headers()["payment-required"].to_str().unwrap());
    assert_eq!(required["accepts"][0]["amount"], "20000");
}
