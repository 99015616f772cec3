//! Fault injection around a paid request, each with an exact expectation: what the buyer got
//! (status and error code), whether the upstream saw the request, the payment's ledger state,
//! and the metric or log line that tells the operator. Nothing is ever served unpaid, and no
//! payment, nonce or settlement is lost or doubled.
//!
//! - The upstream resetting mid-body, answering bytes that are not HTTP, hanging past the
//!   route's timeout ([`BadUpstream`]).
//! - The facilitator answering 500 or an unreadable 200, settling and then hanging up, settling
//!   and then stalling past tollgate's `SETTLE_TIMEOUT` (x402-foundation/x402#1062: "wallet
//!   debited, no data"), down and back ([`Relay`] in front of it).
//! - The node of `settle via rpc` answering 500 or garbage, and taking a transaction but
//!   answering 500 ([`BadNode`] in front of anvil).
//! - The clock: buyers' clocks skewed both ways within and beyond the window; tollgate's own
//!   clock jumping back and forward while it runs (libfaketime, [`FakeClock`]).
//!
//! Where the outcome is a limit of the design rather than a bug (the buyer of a `before
//! response` route is charged when the upstream then fails; a clock jump back admits an
//! authorization that expired in the real world), the test pins the behaviour and says so.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::chain::{DevChain, Relay};
use super::chain_relayer::{self, admin, entries, metric};
use super::expect_error;
use super::harness::{self, Facilitator, FacilitatorMode, Launch, PAY_TO, Sidecar, Tweak, Wallet};

/// What the raw upstream answers when it behaves: the paid content.
pub const SECRET: &str = "the paid content";

/// A raw TCP upstream that misbehaves by path: `/reset/` sends a 200 head and part of the body,
/// then resets the connection; `/garbage/` answers bytes that are not HTTP and closes; `/hang/`
/// reads the request and never answers; anything else is a proper 200 with [`SECRET`].
pub struct BadUpstream {
    pub port: u16,
    seen: Arc<AtomicUsize>,
}

impl BadUpstream {
    pub async fn start() -> BadUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move { misbehave(stream, counter).await });
            }
        });
        BadUpstream { port, seen }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Requests that reached the upstream.
    pub fn seen(&self) -> usize {
        self.seen.load(Ordering::SeqCst)
    }
}

async fn misbehave(mut stream: tokio::net::TcpStream, seen: Arc<AtomicUsize>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    seen.fetch_add(1, Ordering::SeqCst);
    let line = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    let path = line.split(' ').nth(1).unwrap_or("/").to_string();
    if path.contains("/reset/") {
        let part = format!(
            "{{\"secret\": \"{SECRET}\", \"padding\": \"{}",
            "x".repeat(1000)
        );
        let head =
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n";
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.write_all(part.as_bytes()).await;
        let _ = stream.flush().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        // SO_LINGER 0: the close is a reset, not an orderly end of the body.
        #[expect(deprecated, reason = "a zero linger never blocks the thread on drop")]
        let _ = stream.set_linger(Some(Duration::ZERO));
        drop(stream);
    } else if path.contains("/garbage/") {
        let _ = stream
            .write_all(b"SSH-2.0-OpenSSH_9.6\r\n\x00\x01\x02 not http at all\r\n\r\n")
            .await;
        let _ = stream.shutdown().await;
    } else if path.contains("/hang/") {
        // Holds the connection until tollgate gives up on it.
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                return;
            }
        }
    } else {
        let body = json!({ "secret": SECRET }).to_string();
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
    }
}

/// Three routes, one per timing, with a 2 s upstream timeout (buyers sign for longer: see
/// [`sign`]), and `/hold/**`: deferred, a bundle closes after 60 s or 30 s before the earliest
/// `validBefore` in it.
pub(super) fn policy(facilitator: &str) -> String {
    format!(
        r#"service "faults" {{
  pay_to {PAY_TO}
  accept x402 on base-sepolia
  settle via facilitator "{facilitator}" after response
  default deny

  route GET "/after/**" {{
    price 0.01 USDC
    timeout 2s
  }}
  route GET "/before/**" {{
    price 0.01 USDC
    settle before response
    timeout 2s
  }}
  route GET "/deferred/**" {{
    price 0.01 USDC
    settle deferred every 1s
    timeout 2s
  }}
  route GET "/hold/**" {{
    price 0.01 USDC
    settle deferred every 60s
  }}
}}
"#
    )
}

/// The three timings, as the route prefix that selects each.
const TIMINGS: [&str; 3] = ["after", "before", "deferred"];

/// A sidecar with [`policy`] in front of `upstream`, settling with `facilitator`.
pub(super) async fn sidecar(
    name: &str,
    upstream: &str,
    facilitator: &str,
    launch: Launch<'_>,
) -> Sidecar {
    let dir = harness::scratch_dir(name);
    std::fs::write(dir.join("policy.toll"), policy(facilitator)).unwrap();
    Sidecar::launch(&dir, upstream, launch).await
}

/// The header paying `path` (first offer), signed by `wallet` with validity from
/// `valid_after` to `valid_before` (default: ten minutes ago to a minute from now).
pub(super) async fn sign(sidecar: &Sidecar, wallet: &Wallet, path: &str, tweak: Tweak) -> String {
    let response = harness::client()
        .get(sidecar.url(path))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 402, "{path}");
    let required = harness::decode(response.headers()["payment-required"].to_str().unwrap());
    let tweak = Tweak {
        valid_before: tweak.valid_before.or(Some(harness::now() + 60)),
        ..tweak
    };
    wallet.pay_v2(&required["accepts"][0], &tweak)
}

pub(super) async fn send(sidecar: &Sidecar, path: &str, header: &str) -> reqwest::Response {
    harness::client()
        .get(sidecar.url(path))
        .header("payment-signature", header)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap()
}

/// Pays `path` once with a fresh authorization.
pub(super) async fn pay(sidecar: &Sidecar, wallet: &Wallet, path: &str) -> reqwest::Response {
    let header = sign(sidecar, wallet, path, Tweak::default()).await;
    send(sidecar, path, &header).await
}

/// The one ledger entry recorded for `path` (panics unless there is exactly one).
pub(super) async fn entry_for(sidecar: &Sidecar, path: &str) -> Value {
    let (status, page) = admin(sidecar, "/v1/ledger?limit=1000").await;
    assert_eq!(status, 200, "{page}");
    let found: Vec<&Value> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["path"] == path)
        .collect();
    assert_eq!(found.len(), 1, "entries for {path}: {page:#}");
    found[0].clone()
}

/// Waits until the entry of `path` is in `state` (15 s at most); returns it.
pub(super) async fn wait_state(sidecar: &Sidecar, path: &str, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let entry = entry_for(sidecar, path).await;
        if entry["status"]["state"] == state {
            return entry;
        }
        assert!(
            Instant::now() < deadline,
            "{path} is not {state}: {entry:#}\n{}",
            sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `/metrics` shows `series` at `value` (15 s at most; gauges such as
/// `tollgate_payments_open` are refreshed every 250 ms).
pub(super) async fn wait_metric(sidecar: &Sidecar, series: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while metric(sidecar, series).await != value {
        assert!(
            Instant::now() < deadline,
            "{series} never reached {value}\n{}",
            sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET /v1/ledger/verify` passes.
pub(super) async fn ledger_consistent(sidecar: &Sidecar) {
    let (status, report) = admin(sidecar, "/v1/ledger/verify").await;
    assert_eq!(status, 200, "{report:#}");
    assert_eq!(report["consistent"], true, "{report:#}");
}

fn requests_series(route: &str, outcome: &str) -> String {
    format!(
        r#"tollgate_requests_total{{outcome="{outcome}",rail="x402",route="{route}",service="faults"}}"#
    )
}

/// The upstream resets the connection after a 200 head and part of the body. The head decides:
/// `after response` settled on it, `before response` before forwarding, `deferred` queued it —
/// so every timing charges the buyer, who got a 200, the receipt (not for deferred) and a
/// truncated body. This is the documented "seller's risk" row of the settlement table (an
/// upstream that fails mid-body was paid for): exactly one settlement each, nothing doubled.
/// The operator sees it in the access log line (`outcome="upstream_unavailable" status=200
/// upstream_status=200 … error="ReadError"`), Pingora's `Fail to proxy: Upstream ReadError`
/// line, and `tollgate_requests_total{outcome="upstream_unavailable"}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_reset_mid_body_was_paid_for_once_and_the_buyer_gets_a_truncated_answer() {
    let upstream = BadUpstream::start().await;
    let facilitator = Facilitator::start().await;
    let s = sidecar(
        "fault-reset",
        &upstream.url(),
        &facilitator.url(),
        Launch::default(),
    )
    .await;
    let wallet = Wallet::new(0x51);
    for (i, timing) in TIMINGS.iter().enumerate() {
        let path = format!("/{timing}/reset/x");
        let response = pay(&s, &wallet, &path).await;
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(
            response.headers().get("payment-response").is_some(),
            *timing != "deferred",
            "{path}: a receipt for what settled"
        );
        let body = response.bytes().await;
        assert!(
            body.is_err(),
            "{path}: the truncated body ended cleanly: {body:?}"
        );
        assert_eq!(upstream.seen(), i + 1, "{path}");
        let entry = wait_state(&s, &path, "confirmed").await;
        assert!(entry["status"]["tx"].is_string(), "{entry:#}");
    }
    assert_eq!(facilitator.settled().len(), 3, "one settlement each");
    assert_eq!(facilitator.calls(), 3, "nothing sent twice");
    let log = s.log();
    let resets = log
        .lines()
        .filter(|l| l.contains("tollgate::access") && l.contains("rail=\"x402\""))
        .collect::<Vec<_>>();
    assert_eq!(resets.len(), 3, "{log}");
    assert!(
        resets.iter().all(|l| l
            .contains("outcome=\"upstream_unavailable\" status=200 upstream_status=200")
            && l.contains("error=\"ReadError\"")),
        "the access log names the upstream's error: {resets:#?}"
    );
    for timing in TIMINGS {
        let series = requests_series(&format!("GET /{timing}/**"), "upstream_unavailable");
        assert_eq!(metric(&s, &series).await, 1.0, "{series}");
    }
    ledger_consistent(&s).await;
}

/// The upstream answers bytes that are not HTTP (`502 upstream_unavailable`) or hangs past the
/// route's 2 s timeout (`504 upstream_timeout`). `after response` and `deferred` collect
/// nothing: the entry is `refunded` ("the upstream gave no answer; not collected") and the
/// facilitator is never called. `before response` settled before forwarding, so its buyer is
/// charged and gets the error: the entry is `confirmed` — the one case where a buyer pays and
/// gets no data through no fault of the facilitator (the README's table says "buyer's risk:
/// none" for it). Signal: `tollgate_requests_total{outcome="upstream_unavailable"|
/// "upstream_timeout"}` per route, `tollgate_ledger_facts_total{state="refunded"}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_answering_garbage_or_hanging_is_refused_and_collected_only_if_settled_first() {
    let upstream = BadUpstream::start().await;
    let facilitator = Facilitator::start().await;
    let s = sidecar(
        "fault-garbage",
        &upstream.url(),
        &facilitator.url(),
        Launch::default(),
    )
    .await;
    let wallet = Wallet::new(0x52);
    let mut seen = 0;
    for (fault, status, code) in [
        ("garbage", 502, "upstream_unavailable"),
        ("hang", 504, "upstream_timeout"),
    ] {
        for timing in TIMINGS {
            let path = format!("/{timing}/{fault}/x");
            let settled_before = facilitator.settled().len();
            let response = pay(&s, &wallet, &path).await;
            let body = expect_error(response, status, code).await;
            assert!(!body.to_string().contains(SECRET), "{body}");
            seen += 1;
            assert_eq!(upstream.seen(), seen, "{path}: forwarded once");
            if timing == "before" {
                let entry = wait_state(&s, &path, "confirmed").await;
                assert!(entry["status"]["tx"].is_string(), "{entry:#}");
                assert_eq!(facilitator.settled().len(), settled_before + 1, "{path}");
            } else {
                let entry = wait_state(&s, &path, "refunded").await;
                assert_eq!(
                    entry["status"]["reason"], "the upstream gave no answer; not collected",
                    "{entry:#}"
                );
                assert_eq!(facilitator.settled().len(), settled_before, "{path}");
            }
            assert_eq!(
                metric(&s, &requests_series(&format!("GET /{timing}/**"), code)).await,
                1.0,
                "{path}\n{}",
                s.metrics().await
            );
        }
    }
    // Deferred: nothing was queued, so no bundle ever goes out for them.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        facilitator.calls(),
        2,
        "only the two `before response` settlements"
    );
    assert_eq!(
        metric(&s, r#"tollgate_ledger_facts_total{state="refunded"}"#).await,
        4.0
    );
    ledger_consistent(&s).await;
}

/// A sidecar with [`policy`] in front of a well-behaved [`BadUpstream`], and its facilitator.
async fn facilitator_world(name: &str) -> (BadUpstream, Facilitator, Sidecar) {
    let upstream = BadUpstream::start().await;
    let facilitator = Facilitator::start().await;
    let s = sidecar(name, &upstream.url(), &facilitator.url(), Launch::default()).await;
    (upstream, facilitator, s)
}

/// `before`/`after response` with a facilitator whose answer is unusable: the buyer gets `503
/// settlement_unavailable` with `Retry-After` and never the upstream's body (`after`: the
/// upstream answered, its body was discarded; `before`: the upstream never saw the request);
/// the entry is `unresolved` with the reason, never sent again; the same authorization sent
/// again is `payment_replayed`. Signals: `tollgate_settlements_total{result="unknown"}`,
/// `tollgate_payments_open{state="unresolved"}`, and the log line `settlement outcome unknown;
/// refusing the paid request, the payment is unresolved`.
async fn unusable_answer(name: &str, mode: FacilitatorMode, reason: &str, settles: bool) {
    let (upstream, facilitator, s) = facilitator_world(name).await;
    let wallet = Wallet::new(0x53);
    facilitator.set_mode(mode);
    for (i, timing) in ["after", "before"].iter().enumerate() {
        let path = format!("/{timing}/ok");
        let header = sign(&s, &wallet, &path, Tweak::default()).await;
        let seen = upstream.seen();
        let response = send(&s, &path, &header).await;
        assert!(response.headers().get("retry-after").is_some(), "{path}");
        assert!(
            response.headers().get("payment-response").is_none(),
            "{path}"
        );
        let body = expect_error(response, 503, "settlement_unavailable").await;
        assert!(!body.to_string().contains(SECRET), "{path}: {body}");
        let forwarded = usize::from(*timing == "after");
        assert_eq!(upstream.seen(), seen + forwarded, "{path}");
        let entry = entry_for(&s, &path).await;
        assert_eq!(entry["status"]["state"], "unresolved", "{entry:#}");
        let why = entry["status"]["reason"].as_str().unwrap_or_default();
        assert!(
            why.starts_with("outcome unknown: ") && why.contains(reason),
            "{path}: {entry:#}"
        );
        assert_eq!(
            metric(&s, r#"tollgate_settlements_total{result="unknown"}"#).await,
            (i + 1) as f64
        );
        // The buyer cannot have the data for this authorization: it is used.
        facilitator.set_mode(FacilitatorMode::Honest);
        expect_error(send(&s, &path, &header).await, 402, "payment_replayed").await;
        facilitator.set_mode(mode);
        assert_eq!(
            upstream.seen(),
            seen + forwarded,
            "{path}: replay forwarded"
        );
    }
    assert_eq!(
        facilitator.calls(),
        2,
        "an unresolved payment was sent again"
    );
    assert_eq!(
        facilitator.settled().len(),
        if settles { 2 } else { 0 },
        "what the facilitator did with the money"
    );
    wait_metric(&s, r#"tollgate_payments_open{state="unresolved"}"#, 2.0).await;
    let log = s.log();
    assert_eq!(
        log.matches(
            "settlement outcome unknown; refusing the paid request, the payment is unresolved"
        )
        .count(),
        2,
        "{log}"
    );
    ledger_consistent(&s).await;
}

/// A 500 from `/settle` (the existing test checks the 503 for `after response` only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_facilitator_answering_500_leaves_before_and_after_payments_unresolved_and_unserved() {
    unusable_answer(
        "fault-fac-500",
        FacilitatorMode::Broken,
        "the facilitator answered 500",
        false,
    )
    .await;
}

/// A 200 whose body is not a settlement result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_facilitator_answering_a_malformed_success_leaves_the_payment_unresolved_and_unserved() {
    unusable_answer(
        "fault-fac-garbage",
        FacilitatorMode::Garbage,
        "without a settlement result",
        false,
    )
    .await;
}

/// The facilitator settles, then closes the connection without answering: the money moved,
/// tollgate cannot know it, so the buyer is refused (503) and the entry is `unresolved`; only
/// evidence from the chain (`settlement.rpc`) can later mark it `confirmed`. The buyer paid and
/// has no data, and tollgate has no way to give it to them: the authorization is used (a retry
/// is `payment_replayed`); a refund is the operator's business, off chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_facilitator_that_settles_then_hangs_up_leaves_a_paid_unresolved_entry_and_no_data() {
    unusable_answer(
        "fault-fac-hangup",
        FacilitatorMode::SettleThenHangUp,
        "",
        true,
    )
    .await;
}

/// x402-foundation/x402#1062 exactly: the facilitator settles, then answers after tollgate's
/// 20 s `SETTLE_TIMEOUT`. The buyer of the `after response` route waits the 20 s and gets `503
/// settlement_unavailable`, not the upstream's body; the payment is `unresolved` ("outcome
/// unknown"), the transfer happened once, it is never sent again. (About 21 s: the timeout is
/// a constant.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_facilitator_that_settles_then_stalls_past_the_timeout_wallet_debited_no_data() {
    let (upstream, facilitator, s) = facilitator_world("fault-fac-stall").await;
    let wallet = Wallet::new(0x54);
    facilitator.set_mode(FacilitatorMode::SettleThenStall);
    let header = sign(&s, &wallet, "/after/stall", Tweak::default()).await;
    let started = Instant::now();
    let response = send(&s, "/after/stall", &header).await;
    let waited = started.elapsed();
    let body = expect_error(response, 503, "settlement_unavailable").await;
    assert!(!body.to_string().contains(SECRET), "{body}");
    assert!(
        waited < harness::STALL,
        "tollgate waited for the facilitator's late answer ({waited:?})"
    );
    assert_eq!(upstream.seen(), 1);
    assert_eq!(facilitator.settled().len(), 1, "the wallet was debited");
    let entry = entry_for(&s, "/after/stall").await;
    assert_eq!(entry["status"]["state"], "unresolved", "{entry:#}");
    assert!(
        entry["status"]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("outcome unknown: ")),
        "{entry:#}"
    );
    assert_eq!(
        metric(&s, r#"tollgate_settlements_total{result="unknown"}"#).await,
        1.0
    );
    wait_metric(&s, r#"tollgate_payments_open{state="unresolved"}"#, 1.0).await;
    expect_error(
        send(&s, "/after/stall", &header).await,
        402,
        "payment_replayed",
    )
    .await;
    assert_eq!(facilitator.calls(), 1, "sent again");
    ledger_consistent(&s).await;
}

/// The facilitator goes down (connections refused) and comes back. `before`/`after response`:
/// `503 settlement_unavailable`, nothing was sent, so the entry is `failed` ("not sent: …") and
/// nothing is charged (`before`: the upstream never saw it). `deferred`: served at once,
/// `queued` while the facilitator is down (`tollgate_payments_open{state="queued"}`), settled
/// exactly once when it is back. Signal: `tollgate_settlements_total{result="unavailable"}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_facilitator_down_fails_immediate_payments_closed_and_holds_deferred_ones_until_back() {
    let upstream = BadUpstream::start().await;
    let facilitator = Facilitator::start().await;
    let relay = Relay::start(facilitator.addr.port()).await;
    let s = sidecar(
        "fault-fac-down",
        &upstream.url(),
        &relay.url(),
        Launch::default(),
    )
    .await;
    let wallet = Wallet::new(0x55);
    relay.down();
    for timing in TIMINGS {
        let path = format!("/{timing}/down");
        let seen = upstream.seen();
        let response = pay(&s, &wallet, &path).await;
        if timing == "deferred" {
            assert_eq!(response.status(), 200, "{path}");
            assert_eq!(upstream.seen(), seen + 1);
            continue;
        }
        assert!(response.headers().get("retry-after").is_some(), "{path}");
        let body = expect_error(response, 503, "settlement_unavailable").await;
        assert!(!body.to_string().contains(SECRET), "{path}: {body}");
        assert_eq!(
            upstream.seen(),
            seen + usize::from(timing == "after"),
            "{path}"
        );
        let entry = entry_for(&s, &path).await;
        assert_eq!(entry["status"]["state"], "failed", "{entry:#}");
        assert!(
            entry["status"]["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("not sent: ")),
            "{entry:#}"
        );
    }
    assert!(
        metric(&s, r#"tollgate_settlements_total{result="unavailable"}"#).await >= 2.0,
        "{}",
        s.metrics().await
    );
    // The deferred payment waits while the facilitator is down (its bundle closes within 1 s).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        entry_for(&s, "/deferred/down").await["status"]["state"],
        "queued"
    );
    wait_metric(&s, r#"tollgate_payments_open{state="queued"}"#, 1.0).await;
    assert_eq!(facilitator.calls(), 0);
    relay.up();
    let deadline = Instant::now() + Duration::from_secs(30);
    while entry_for(&s, "/deferred/down").await["status"]["state"] != "confirmed" {
        assert!(Instant::now() < deadline, "{}", s.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(facilitator.settled().len(), 1, "only the deferred payment");
    assert_eq!(facilitator.calls(), 1, "settled once");
    ledger_consistent(&s).await;
}

/// How [`BadNode`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum NodeMode {
    /// Passes every call to the node and its answer back.
    Pass = 0,
    /// Answers every call `500 Internal Server Error`.
    Status500 = 1,
    /// Answers every call 200 with a body that is not JSON-RPC.
    Garbage = 2,
    /// Passes every call to the node, but answers `eth_sendRawTransaction` with a 500 after
    /// the node took the transaction: sent, and nobody told.
    SentThen500 = 3,
}

/// A loopback HTTP server in front of a JSON-RPC node that answers as its [`NodeMode`] says.
pub struct BadNode {
    pub addr: std::net::SocketAddr,
    mode: Arc<AtomicU8>,
}

impl BadNode {
    pub async fn start(node: String) -> BadNode {
        use http_body_util::{BodyExt, Full};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(NodeMode::Pass as u8));
        let current = mode.clone();
        let http = harness::client();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (current, http, node) = (current.clone(), http.clone(), node.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (current, http, node) =
                                (current.clone(), http.clone(), node.clone());
                            async move {
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let answer = |status: u16, body: bytes::Bytes| {
                                    hyper::Response::builder()
                                        .status(status)
                                        .header("content-type", "application/json")
                                        .body(Full::new(body))
                                        .unwrap()
                                };
                                let mode = current.load(Ordering::SeqCst);
                                if mode == NodeMode::Status500 as u8 {
                                    return Ok::<_, std::convert::Infallible>(answer(
                                        500,
                                        "internal error".into(),
                                    ));
                                }
                                if mode == NodeMode::Garbage as u8 {
                                    return Ok(answer(
                                        200,
                                        "{\"jsonrpc\": \"2.0\", \"id\": 1, \"resu".into(),
                                    ));
                                }
                                let sending = String::from_utf8_lossy(&body)
                                    .contains("eth_sendRawTransaction");
                                let passed = http
                                    .post(&node)
                                    .header("content-type", "application/json")
                                    .body(body)
                                    .send()
                                    .await;
                                let Ok(passed) = passed else {
                                    return Ok(answer(502, "node unreachable".into()));
                                };
                                let status = passed.status().as_u16();
                                let bytes = passed.bytes().await.unwrap_or_default();
                                if sending && mode == NodeMode::SentThen500 as u8 {
                                    return Ok(answer(500, "internal error".into()));
                                }
                                Ok(answer(status, bytes))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        BadNode { addr, mode }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, mode: NodeMode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }
}

/// `settle via rpc`, the node answering 500 or a body that is not JSON-RPC (the existing tests
/// cover it down and slow): `before`/`after response` fail closed — `503
/// settlement_unavailable`, `refunded` (never submitted), nothing on chain, the relayer's nonce
/// unused, `before`: the upstream never saw it; `deferred`: served, `queued` while the node
/// misbehaves, settled exactly once when it answers again. Signals:
/// `tollgate_requests_total{outcome="settlement_unavailable"}` and the log lines `settlement
/// unavailable; refusing the paid request error=the settlement node cannot be read: HTTP error
/// 500 …` and `nothing could be sent to the settlement backend; its payments stay queued`
/// (`tollgate_settlements_total` does not count these: the backend was never called).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_answering_500_or_garbage_fails_immediate_payments_closed_and_holds_deferred_ones() {
    let buyer = Wallet::new(0x56);
    let chain = DevChain::start_with(&chain_relayer::funding(&[&buyer], 1_000_000)).await;
    let node = BadNode::start(chain.rpc_url()).await;
    let s = chain_relayer::setup_on(
        "fault-node-500",
        chain,
        Some(&node.url()),
        "deferred every 1s",
        "",
    )
    .await;
    for (mode, name) in [(NodeMode::Status500, "500"), (NodeMode::Garbage, "garbage")] {
        node.set(mode);
        for route in ["first", "after"] {
            let path = format!("/{route}/{name}");
            let seen = s.upstream.seen();
            let response = chain_relayer::pay(&s.sidecar, &buyer, &path).await;
            super::expect_error(response, 503, "settlement_unavailable").await;
            assert_eq!(
                s.upstream.seen(),
                seen + usize::from(route == "after"),
                "{path}"
            );
            // Refused before anything was submitted: not collected.
            let entry = entry_for(&s.sidecar, &path).await;
            assert_eq!(entry["status"]["state"], "refunded", "{path}: {entry:#}");
        }
        let path = format!("/paid/{name}");
        assert_eq!(
            chain_relayer::pay(&s.sidecar, &buyer, &path).await.status(),
            200,
            "deferred: served"
        );
        tokio::time::sleep(Duration::from_millis(2500)).await;
        // Each bundle attempt marks it `submitted` until the node's answer puts it back: it
        // waits, `queued` between attempts, and is never decided while the node misbehaves.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let state = entry_for(&s.sidecar, &path).await["status"]["state"].clone();
            assert!(
                state == "queued" || state == "submitted",
                "{path}: waits while the node misbehaves, not {state}\n{}",
                s.sidecar.log()
            );
            if state == "queued" {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{path}: never back to queued"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Refused before the backend was called: counted by outcome, and said in the log.
    // (`before response` is refused inside admission, so its request is counted with rail
    // "none" although its payment was verified and recorded.)
    for (route, rail) in [("first", "none"), ("after", "x402")] {
        let series = format!(
            r#"tollgate_requests_total{{outcome="settlement_unavailable",rail="{rail}",route="GET /{route}/**",service="relayed"}}"#
        );
        assert_eq!(metric(&s.sidecar, &series).await, 2.0, "{series}");
    }
    let log = s.sidecar.log();
    assert_eq!(
        log.matches("settlement unavailable; refusing the paid request")
            .count(),
        4,
        "{log}"
    );
    assert!(
        log.contains("nothing could be sent to the settlement backend; its payments stay queued"),
        "{log}"
    );
    assert_eq!(s.chain.relayer_nonce().await, 0, "nothing was sent");
    assert!(
        s.chain
            .transfers_to(chain_relayer::pay_to())
            .await
            .is_empty()
    );
    node.set(NodeMode::Pass);
    chain_relayer::settled(&s.sidecar, Duration::from_secs(60)).await;
    let transfers = s.chain.transfers_to(chain_relayer::pay_to()).await;
    assert_eq!(transfers.len(), 2, "the two deferred payments, once each");
    assert_eq!(entries(&s.sidecar, "confirmed").await.len(), 2);
    assert_eq!(entries(&s.sidecar, "refunded").await.len(), 4);
    ledger_consistent(&s.sidecar).await;
}

/// `settle via rpc`, the node takes the transaction and answers `eth_sendRawTransaction` with a
/// 500 — the relayer's own "wallet debited, no data": the `after response` buyer gets `503
/// settlement_unavailable` and not the body; the entry is `unresolved` ("outcome unknown"),
/// never sent again, and decided by the chain's evidence through the same node: `confirmed`
/// with the one transaction that moved the money. Signals:
/// `tollgate_settlements_total{result="unknown"}` and `tollgate_payments_open{state=
/// "unresolved"}` until evidence decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_takes_the_transaction_but_answers_500_is_unresolved_then_confirmed_once() {
    let buyer = Wallet::new(0x57);
    let chain = DevChain::start_with(&chain_relayer::funding(&[&buyer], 1_000_000)).await;
    let node = BadNode::start(chain.rpc_url()).await;
    let s = chain_relayer::setup_on(
        "fault-node-sent",
        chain,
        Some(&node.url()),
        "after response",
        "",
    )
    .await;
    node.set(NodeMode::SentThen500);
    let response = chain_relayer::pay(&s.sidecar, &buyer, "/after/x").await;
    let body = super::expect_error(response, 503, "settlement_unavailable").await;
    assert!(!body.to_string().contains("\"uri\""), "{body}");
    assert_eq!(s.upstream.seen(), 1);
    let entry = entry_for(&s.sidecar, "/after/x").await;
    assert_eq!(entry["status"]["state"], "unresolved", "{entry:#}");
    assert_eq!(
        metric(
            &s.sidecar,
            r#"tollgate_settlements_total{result="unknown"}"#
        )
        .await,
        1.0
    );
    node.set(NodeMode::Pass);
    let deadline = Instant::now() + Duration::from_secs(30);
    let entry = loop {
        let entry = entry_for(&s.sidecar, "/after/x").await;
        if entry["status"]["state"] != "unresolved" {
            break entry;
        }
        assert!(Instant::now() < deadline, "{}", s.sidecar.log());
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(entry["status"]["state"], "confirmed", "{entry:#}");
    let used = s.chain.authorizations_used(buyer.address()).await;
    assert_eq!(used.len(), 1, "moved once: {used:?}");
    assert_eq!(
        entry["status"]["tx"].as_str(),
        Some(used[0].1.to_string().as_str()),
        "{entry:#}"
    );
    assert_eq!(s.chain.relayer_nonce().await, 1, "one transaction");
    ledger_consistent(&s.sidecar).await;
}

/// Buyers sign as the official clients do: `validAfter` = their now − 600 s, `validBefore` =
/// their now + `maxTimeoutSeconds` (60 s here). tollgate's rules (no slack on `validAfter`,
/// `validBefore` ≥ now + 6 s, at most now + timeout + 600 s) give a buyer's clock this much
/// room: up to 54 s behind, up to 600 s ahead. Beyond: `authorization_expired` /
/// `authorization_not_yet_valid`, 402 with the challenge, never forwarded, never settled.
/// Signal: `tollgate_payments_rejected_total{reason=…}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buyer_clocks_skewed_within_the_window_pay_and_beyond_it_are_refused_with_the_reason() {
    let (upstream, facilitator, s) = facilitator_world("fault-skew").await;
    let wallet = Wallet::new(0x58);
    let cases: [(i64, Option<&str>); 4] = [
        (-45, None),
        (-60, Some("authorization_expired")),
        (590, None),
        (610, Some("authorization_not_yet_valid")),
    ];
    let mut served = 0;
    for (skew, refusal) in cases {
        let path = format!("/hold/skew{skew}");
        let buyer_now = harness::now().checked_add_signed(skew).unwrap();
        let response = harness::client().get(s.url(&path)).send().await.unwrap();
        let required = harness::decode(response.headers()["payment-required"].to_str().unwrap());
        let offer = &required["accepts"][0];
        assert_eq!(offer["maxTimeoutSeconds"], 60);
        let tweak = Tweak {
            valid_after: Some(buyer_now - 600),
            valid_before: Some(buyer_now + 60),
            ..Tweak::default()
        };
        let response = send(&s, &path, &wallet.pay_v2(offer, &tweak)).await;
        match refusal {
            None => {
                assert_eq!(response.status(), 200, "skew {skew} s");
                served += 1;
            }
            Some(code) => {
                assert!(response.headers().get("payment-required").is_some());
                expect_error(response, 402, code).await;
                assert_eq!(
                    metric(
                        &s,
                        &format!(r#"tollgate_payments_rejected_total{{reason="{code}"}}"#)
                    )
                    .await,
                    1.0,
                    "skew {skew} s"
                );
            }
        }
        assert_eq!(upstream.seen(), served, "skew {skew} s");
    }
    let (_, page) = admin(&s, "/v1/ledger?limit=1000").await;
    assert_eq!(page["entries"].as_array().unwrap().len(), 2, "{page:#}");
    // The buyer 45 s behind signed a `validBefore` 15 s away: its bundle closes at once (30 s
    // before it), not after the 60 s window; the one 590 s ahead waits for its window.
    wait_state(&s, "/hold/skew-45", "confirmed").await;
    assert_eq!(
        entry_for(&s, "/hold/skew590").await["status"]["state"],
        "queued"
    );
    assert_eq!(facilitator.calls(), 1);
}

/// tollgate's wall clock, moved while it runs: libfaketime preloaded into the sidecar, reading
/// its offset from a file on every call (`FAKETIME_NO_CACHE=1`). Only the wall clock moves
/// (`FAKETIME_DONT_FAKE_MONOTONIC=1`), as when NTP steps it or an operator sets it.
struct FakeClock {
    file: PathBuf,
    library: PathBuf,
}

impl FakeClock {
    fn new(dir: &Path) -> FakeClock {
        let library = [
            "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
            "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
            "/usr/lib/faketime/libfaketimeMT.so.1",
            "/usr/local/lib/faketime/libfaketimeMT.so.1",
        ]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("libfaketime is not installed (apt-get install faketime; .ci/run does it)");
        let clock = FakeClock {
            file: dir.join("faketime"),
            library,
        };
        clock.set(0);
        clock
    }

    /// tollgate's clock is `offset` seconds off the real one from now on.
    fn set(&self, offset: i64) {
        std::fs::write(&self.file, format!("{offset:+}\n")).unwrap();
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("LD_PRELOAD", self.library.display().to_string()),
            ("FAKETIME_TIMESTAMP_FILE", self.file.display().to_string()),
            ("FAKETIME_NO_CACHE", "1".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
        ]
    }
}

/// A sidecar with [`policy`] whose wall clock is `clock`'s.
async fn sidecar_on_clock(
    name: &str,
    upstream: &BadUpstream,
    facilitator: &Facilitator,
) -> (Sidecar, FakeClock) {
    let dir = harness::scratch_dir(name);
    std::fs::write(dir.join("policy.toll"), policy(&facilitator.url())).unwrap();
    let clock = FakeClock::new(&dir);
    let s = launch_on_clock(&dir, upstream, &clock).await;
    (s, clock)
}

/// A sidecar on the store and policy in `dir` whose wall clock is `clock`'s.
async fn launch_on_clock(dir: &Path, upstream: &BadUpstream, clock: &FakeClock) -> Sidecar {
    let env = clock.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Sidecar::launch(
        dir,
        &upstream.url(),
        Launch {
            env: &env,
            ..Launch::default()
        },
    )
    .await
}

/// An authorization that expired 10 s ago in the real world, on every timing: refused
/// `authorization_expired`, and the upstream saw only the one paid call before it.
async fn expired_is_refused_everywhere(s: &Sidecar, wallet: &Wallet, upstream: &BadUpstream) {
    let real = harness::now();
    let expired = Tweak {
        valid_after: Some(real - 600),
        valid_before: Some(real - 10),
        ..Tweak::default()
    };
    for timing in ["before", "after", "deferred"] {
        let path = format!("/{timing}/expired");
        let header = sign(s, wallet, &path, expired.clone()).await;
        expect_error(send(s, &path, &header).await, 402, "authorization_expired").await;
    }
    assert_eq!(upstream.seen(), 1, "nothing expired reached the upstream");
}

/// tollgate's clock jumps 100 s back. A used nonce stays used (`payment_replayed`): the nonce
/// set does not depend on the clock. An authorization that expired 10 s ago in the real world
/// looks valid by the stepped-back wall clock, but payments are decided by a clock that never
/// goes back (`tollgate::clock`: the time already run, on the monotonic clock): it is refused
/// `authorization_expired` with every timing, never forwarded, never recorded — `deferred` no
/// longer serves it unpaid. After a restart with the clock still behind, the store's latest
/// record is the floor: still refused. Signals: `tollgate_clock_behind_seconds` ≈ 100 and a
/// warning in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tollgates_clock_jumping_back_keeps_used_nonces_and_revives_no_expired_authorization() {
    let upstream = BadUpstream::start().await;
    let facilitator = Facilitator::start().await;
    let (mut s, clock) = sidecar_on_clock("fault-clock-back", &upstream, &facilitator).await;
    let wallet = Wallet::new(0x59);
    let used = sign(&s, &wallet, "/after/used", Tweak::default()).await;
    assert_eq!(send(&s, "/after/used", &used).await.status(), 200);
    assert_eq!(upstream.seen(), 1);

    clock.set(-100);
    expect_error(
        send(&s, "/after/used", &used).await,
        402,
        "payment_replayed",
    )
    .await;
    expired_is_refused_everywhere(&s, &wallet, &upstream).await;
    let behind = metric(&s, "tollgate_clock_behind_seconds").await;
    assert!((95.0..=105.0).contains(&behind), "behind {behind}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.log().contains("this host's clock went back") {
        assert!(Instant::now() < deadline, "no warning\n{}", s.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        metric(
            &s,
            r#"tollgate_payments_rejected_total{reason="authorization_expired"}"#
        )
        .await,
        3.0
    );

    // A restart on the stepped-back clock: the store's latest record holds the time.
    s.kill();
    let s = launch_on_clock(&s.dir.clone(), &upstream, &clock).await;
    assert!(
        s.log().contains("behind the latest record in the store"),
        "{}",
        s.log()
    );
    expired_is_refused_everywhere(&s, &wallet, &upstream).await;
    assert_eq!(facilitator.settled().len(), 1, "only the first payment");
    ledger_consistent(&s).await;
}

/// tollgate's clock jumps forward. 40 s: a queued deferred payment's bundle closes early (its
/// deadline, 30 s before `validBefore`, looks passed) and settles — early, not lost. An hour:
/// fresh authorizations are refused `authorization_expired` (402, never forwarded; signal
/// `tollgate_payments_rejected_total{reason="authorization_expired"}` climbing for every
/// buyer), and a payment queued before the jump, which looks expired to tollgate alone, is
/// still submitted: the facilitator, on the real clock, settles it (a clock that jumps ahead
/// must never write off what a buyer was served for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tollgates_clock_jumping_forward_closes_bundles_early_and_never_writes_off_a_served_payment()
 {
    let upstream = BadUpstream::start().await;
    let facilitator = Facilitator::start().await;
    let (s, clock) = sidecar_on_clock("fault-clock-forward", &upstream, &facilitator).await;
    let wallet = Wallet::new(0x5a);
    assert_eq!(pay(&s, &wallet, "/hold/early").await.status(), 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        entry_for(&s, "/hold/early").await["status"]["state"],
        "queued"
    );

    clock.set(40);
    let entry = wait_state(&s, "/hold/early", "confirmed").await;
    assert!(entry["status"]["tx"].is_string(), "{entry:#}");
    assert_eq!(facilitator.settled().len(), 1);
    let log = s.log();
    assert!(
        log.lines()
            .any(|l| l.contains("settlement bundle submitted") && l.contains("closed_by=deadline")),
        "the bundle closed by its deadline, not its 60 s window:\n{log}"
    );

    clock.set(0);
    assert_eq!(pay(&s, &wallet, "/hold/late").await.status(), 200);
    clock.set(3600);
    let seen = upstream.seen();
    let response = pay(&s, &wallet, "/after/fresh").await;
    expect_error(response, 402, "authorization_expired").await;
    assert_eq!(upstream.seen(), seen, "not forwarded");
    assert_eq!(
        metric(
            &s,
            r#"tollgate_payments_rejected_total{reason="authorization_expired"}"#
        )
        .await,
        1.0
    );
    let entry = wait_state(&s, "/hold/late", "confirmed").await;
    assert!(entry["status"]["tx"].is_string(), "{entry:#}");
    assert_eq!(
        facilitator.settled().len(),
        2,
        "the payment that looked expired to tollgate alone was collected, once"
    );
    ledger_consistent(&s).await;
}
