//! Deferred settlement against the stub facilitator: the buyer is answered at once, payments
//! settle later in bundles (closed by count or window), an upstream error is not collected, an
//! unknown outcome is never retried, and a `kill -9` loses nothing and settles nothing twice.
//! The same against a real chain and the official facilitator lives in `chain_settlement.rs`.

use std::time::Duration;

use super::harness::{self, Facilitator, FacilitatorMode, Tweak, Upstream};
use super::{World, expect_error};

fn policy(facilitator: &str) -> String {
    format!(
        r#"service "deferred" {{
  pay_to 0x209693Bc6afc0C5328bA36FaF03C514EF312287C
  accept x402 on base-sepolia
  settle via facilitator "{facilitator}" deferred every 60s or 3 payments
  default deny

  route GET "/bundled/**" {{ price 0.01 USDC }}
  route GET "/windowed/**" {{
    price 0.01 USDC
    settle deferred every 1s
  }}
  route GET "/valued/**" {{
    price 0.01 USDC
    settle deferred every 60s or 0.03 USDC
  }}
  route GET "/capped/**" {{
    price 0.01 USDC
    limit buyer unsettled 0.02 USDC
  }}
}}
"#
    )
}

async fn world(name: &str) -> World {
    let upstream = Upstream::start().await;
    let facilitator = Facilitator::start().await;
    let url = upstream.url();
    World::launch_policy(
        name,
        upstream,
        facilitator,
        &url,
        harness::Launch::default(),
        policy,
    )
    .await
}

/// Waits until the facilitator settled `n` payments (or fails after 15 s).
async fn settled(w: &World, n: usize) {
    for _ in 0..150 {
        if w.facilitator.settled().len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "the facilitator settled {} payments, expected {n}\n{}",
        w.facilitator.settled().len(),
        w.sidecar.log()
    );
}

/// The value of one metric series in the sidecar's `/metrics`.
async fn metric(w: &World, series: &str) -> f64 {
    let text = w.sidecar.metrics().await;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} is not in /metrics:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_payments_are_served_at_once_and_settled_in_a_bundle_by_count() {
    let w = world("deferred-count").await;
    for i in 0..2 {
        let response = w.pay_v2(&format!("/bundled/{i}"), &Tweak::default()).await;
        assert_eq!(response.status(), 200);
        assert!(response.headers().get("payment-response").is_none());
    }
    // Two of three: the bundle stays open.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(w.facilitator.settled().is_empty());
    assert_eq!(w.upstream.seen(), 2, "served before settling");
    let response = w.pay_v2("/bundled/2", &Tweak::default()).await;
    assert_eq!(response.status(), 200);
    settled(&w, 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(w.facilitator.settled().len(), 3, "settled once each");
    assert_eq!(
        metric(&w, r#"tollgate_settlement_bundles_total{asset="USDC"}"#).await,
        1.0
    );
    assert_eq!(
        metric(&w, r#"tollgate_ledger_facts_total{state="confirmed"}"#).await,
        3.0
    );
    assert_eq!(
        metric(
            &w,
            r#"tollgate_revenue_atomic_total{asset="USDC",network="base-sepolia"}"#
        )
        .await,
        30_000.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_closes_a_bundle_and_an_upstream_error_is_not_collected() {
    let w = world("deferred-window").await;
    let failed = w.pay_v2("/windowed/status/503", &Tweak::default()).await;
    assert_eq!(failed.status(), 503);
    let served = w.pay_v2("/windowed/ok", &Tweak::default()).await;
    assert_eq!(served.status(), 200);
    settled(&w, 1).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        w.facilitator.settled().len(),
        1,
        "the payment whose upstream answered 503 was settled"
    );
    assert_eq!(
        metric(&w, r#"tollgate_ledger_facts_total{state="refunded"}"#).await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_outcome_is_unresolved_and_never_sent_again() {
    unknown_outcome(FacilitatorMode::Broken).await;
}

/// The official facilitator's `success: false` + `settlement_pending` + a transaction hash is
/// not a refusal: the transfer may land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_settlement_is_unresolved_not_failed() {
    unknown_outcome(FacilitatorMode::Pending).await;
}

/// A 200 whose body is not a settlement result says nothing about the transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_success_is_unresolved_not_confirmed() {
    unknown_outcome(FacilitatorMode::Garbage).await;
}

async fn unknown_outcome(mode: FacilitatorMode) {
    let w = world("deferred-unknown").await;
    w.facilitator.set_mode(mode);
    let served = w.pay_v2("/windowed/a", &Tweak::default()).await;
    assert_eq!(served.status(), 200);
    for _ in 0..100 {
        if metric(&w, r#"tollgate_payments_open{state="unresolved"}"#).await == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        metric(&w, r#"tollgate_payments_open{state="unresolved"}"#).await,
        1.0
    );
    let calls = w.facilitator.calls();
    w.facilitator.set_mode(FacilitatorMode::Honest);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        w.facilitator.calls(),
        calls,
        "an unresolved payment was sent to the facilitator again"
    );
    assert_eq!(
        metric(&w, r#"tollgate_ledger_facts_total{state="failed"}"#).await,
        0.0
    );
    assert_eq!(
        metric(&w, r#"tollgate_ledger_facts_total{state="confirmed"}"#).await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_queued_payment_and_keeps_the_unsettled_limit() {
    let mut w = world("deferred-kill").await;
    for i in 0..2 {
        assert_eq!(
            w.pay_v2(&format!("/capped/{i}"), &Tweak::default())
                .await
                .status(),
            200
        );
    }
    expect_error(
        w.pay_v2("/capped/2", &Tweak::default()).await,
        429,
        "unsettled_limit_exceeded",
    )
    .await;
    w.sidecar.kill();
    let upstream = w.upstream.url();
    w.sidecar = harness::Sidecar::launch(&w.dir, &upstream, harness::Launch::default()).await;
    // The two queued payments are still unsettled after the restart: the limit holds.
    expect_error(
        w.pay_v2("/capped/3", &Tweak::default()).await,
        429,
        "unsettled_limit_exceeded",
    )
    .await;
    assert!(w.facilitator.settled().is_empty());
    // A third payment on another route completes the bundle of three (same rule and payee).
    assert_eq!(
        w.pay_v2("/bundled/x", &Tweak::default()).await.status(),
        200
    );
    settled(&w, 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(w.facilitator.settled().len(), 3);
    // Settled: the buyer may spend again.
    assert_eq!(w.pay_v2("/capped/4", &Tweak::default()).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_closes_when_its_value_is_reached() {
    let w = world("deferred-value").await;
    for i in 0..2 {
        assert_eq!(
            w.pay_v2(&format!("/valued/{i}"), &Tweak::default())
                .await
                .status(),
            200
        );
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        w.facilitator.settled().is_empty(),
        "0.02 of 0.03 USDC closed a bundle"
    );
    assert_eq!(w.pay_v2("/valued/2", &Tweak::default()).await.status(), 200);
    settled(&w, 3).await;
}

/// `kill -9` while the facilitator is settling an `after response` payment: the buyer gets no
/// answer, nobody at tollgate knows whether the facilitator settled, and after the restart the
/// ledger says so — `unresolved` — instead of forgetting the payment, calling it failed, or
/// sending it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_facilitator_call_leaves_the_payment_unresolved_not_lost() {
    let upstream = Upstream::start().await;
    let facilitator = Facilitator::start().await;
    let url = upstream.url();
    let mut w = World::launch_policy(
        "kill-in-call",
        upstream,
        facilitator,
        &url,
        harness::Launch::default(),
        |facilitator| super::policy(&format!("{facilitator}/slow/2000")),
    )
    .await;
    let header = w.signed_v2("/paid/in-flight", &Tweak::default()).await;
    let request = w
        .get("/paid/in-flight")
        .header("payment-signature", header)
        .send();
    let pending = tokio::spawn(request);
    tokio::time::sleep(Duration::from_millis(800)).await;
    w.sidecar.kill();
    assert!(pending.await.unwrap().is_err(), "the buyer got an answer");
    let upstream = w.upstream.url();
    w.sidecar = harness::Sidecar::launch(&w.dir, &upstream, harness::Launch::default()).await;
    assert_eq!(
        metric(&w, r#"tollgate_payments_open{state="unresolved"}"#).await,
        1.0,
        "{}",
        w.sidecar.log()
    );
    // Only evidence may decide it (no settlement.rpc here): it is never sent again.
    let calls = w.facilitator.calls();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        w.facilitator.calls(),
        calls,
        "an unresolved payment was sent again"
    );
    assert_eq!(
        metric(&w, r#"tollgate_payments_open{state="unresolved"}"#).await,
        1.0
    );
    assert!(
        w.sidecar
            .log()
            .contains("unresolved until evidence from the chain decides them")
    );
}
