//! Settlement with a facilitator: after the upstream answered below 400 (or before forwarding,
//! for `settle before response`), never when the upstream failed, and fail closed when the
//! facilitator refuses or is unreachable.

use std::time::Duration;

use super::harness::{self, FacilitatorMode, Tweak};
use super::{World, expect_error};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_error_is_passed_through_and_not_settled() {
    let w = World::start("upstream-500").await;
    let response = w.pay_v2("/paid/status/500", &Tweak::default()).await;
    assert_eq!(response.status(), 500);
    assert!(response.headers().get("payment-response").is_none());
    let response = w.pay_v1("/paid/status/404", &Tweak::default()).await;
    assert_eq!(response.status(), 404);
    assert!(w.facilitator.settled().is_empty());
    // A redirect is a success: settled.
    let response = w.pay_v2("/paid/status/302", &Tweak::default()).await;
    assert_eq!(response.status(), 302);
    assert_eq!(w.facilitator.settled().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_settlement_replaces_the_response_with_a_402_and_a_failure_receipt() {
    let w = World::start("settle-refused").await;
    w.facilitator.set_mode(FacilitatorMode::Refuse);
    let response = w.pay_v2("/paid/secret", &Tweak::default()).await;
    let receipt = harness::decode(response.headers()["payment-response"].to_str().unwrap());
    assert!(response.headers().get("payment-required").is_some());
    let body = expect_error(response, 402, "settlement_failed").await;
    assert_eq!(receipt["success"], false);
    assert_eq!(receipt["errorReason"], "insufficient_funds");
    assert_eq!(receipt["transaction"], "");
    assert_eq!(receipt["network"], "eip155:84532");
    assert_eq!(receipt["payer"], w.wallet.address().to_checksum(None));
    assert!(
        body.get("uri").is_none(),
        "the upstream's answer is not leaked: {body:#}"
    );

    let response = w.pay_v1("/paid/secret", &Tweak::default()).await;
    let receipt = harness::decode(response.headers()["x-payment-response"].to_str().unwrap());
    assert_eq!(receipt["network"], "base-sepolia");
    expect_error(response, 402, "settlement_failed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_or_unreachable_facilitator_fails_closed() {
    let w = World::start("settle-broken").await;
    w.facilitator.set_mode(FacilitatorMode::Broken);
    let response = w.pay_v2("/paid/secret", &Tweak::default()).await;
    let body = expect_error(response, 503, "settlement_unavailable").await;
    assert!(body.get("uri").is_none());

    // Down: point a fresh sidecar at a port nothing listens on.
    let upstream = harness::Upstream::start().await;
    let facilitator = harness::Facilitator::start().await;
    let dir = harness::scratch_dir("settle-down");
    let down = format!("http://127.0.0.1:{}", harness::free_port());
    std::fs::write(dir.join("policy.toll"), super::policy(&down)).unwrap();
    let sidecar = harness::Sidecar::start(&dir, &upstream.url()).await;
    let (v2, _) = {
        let r = harness::client()
            .get(sidecar.url("/paid/x"))
            .send()
            .await
            .unwrap();
        let h = harness::decode(r.headers()["payment-required"].to_str().unwrap());
        (h, ())
    };
    let header = w.wallet.pay_v2(&v2["accepts"][0], &Tweak::default());
    let response = harness::client()
        .get(sidecar.url("/paid/x"))
        .header("payment-signature", header)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap();
    let response_status = response.status();
    let retry = response.headers().get("retry-after").cloned();
    expect_error(response, 503, "settlement_unavailable").await;
    assert_eq!(response_status, 503);
    assert!(retry.is_some());
    assert!(facilitator.settled().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_before_response_pays_first_and_never_forwards_unpaid() {
    let w = World::start("settle-first").await;
    let response = w.pay_v2("/first/report", &Tweak::default()).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("payment-response").is_some());
    assert_eq!(w.facilitator.settled().len(), 1);
    assert_eq!(w.upstream.seen(), 1);

    w.facilitator.set_mode(FacilitatorMode::Refuse);
    let response = w.pay_v2("/first/report", &Tweak::default()).await;
    expect_error(response, 402, "settlement_failed").await;
    assert_eq!(
        w.upstream.seen(),
        1,
        "the upstream never saw the unpaid request"
    );
}

/// `Expect: 100-continue` (curl's default for larger bodies): the upstream's interim `100` is
/// not its answer, so nothing is settled until the final status — and not at all when it fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interim_100_continue_is_not_the_answer_that_settles() {
    let w = World::start("continue").await;
    for (path, status, settled) in [("/paid/status/500", "500", 0), ("/paid/ok", "200", 1)] {
        let header = w.signed_v2(path, &Tweak::default()).await;
        let body = "x".repeat(2048);
        let raw = format!(
            "POST {path} HTTP/1.1\r\nHost: api.example.com\r\nPayment-Signature: {header}\r\nExpect: 100-continue\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let answer = harness::raw_request(w.sidecar.port, raw.as_bytes()).await;
        let final_status = answer
            .split("\r\n\r\n")
            .filter_map(|part| part.lines().find(|l| l.starts_with("HTTP/1.1 ")))
            .map(|l| l.split(' ').nth(1).unwrap_or("").to_string())
            .find(|s| s != "100")
            .unwrap_or_default();
        assert_eq!(final_status, status, "{answer}");
        assert_eq!(w.facilitator.settled().len(), settled, "{path}: {answer}");
        let receipt = answer.to_ascii_lowercase().contains("payment-response:");
        assert_eq!(receipt, settled == 1, "{answer}");
    }
}
