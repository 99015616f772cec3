//! Health, readiness, timeouts and shutdown.

use std::time::Duration;

use super::harness::{self, Tweak};
use super::{World, expect_error};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_answer_on_the_ops_listener() {
    let w = World::start("health").await;
    let health = harness::client()
        .get(w.sidecar.ops_url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let ready = harness::client()
        .get(w.sidecar.ops_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let other = harness::client()
        .get(w.sidecar.ops_url("/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_timeout_is_a_504_and_nothing_is_settled() {
    let w = World::start("timeout").await;
    // The route's 1 s timeout is also its `maxTimeoutSeconds`; the buyer signs for longer.
    let tweak = Tweak {
        valid_before: Some(harness::now() + 60),
        ..Tweak::default()
    };
    let response = w.pay_v2("/impatient/slow/3000", &tweak).await;
    expect_error(response, 504, "upstream_timeout").await;
    assert!(w.facilitator.settled().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish() {
    let mut w = World::start("sigterm").await;
    // A paid request first, so shutdown also has a store with writes to flush.
    assert_eq!(w.pay_v2("/paid/x", &Tweak::default()).await.status(), 200);
    let slow = w.get("/free/slow/1500").send();
    let in_flight = tokio::spawn(slow);
    tokio::time::sleep(Duration::from_millis(300)).await;
    w.sidecar.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ready = harness::client()
        .get(w.sidecar.ops_url("/readyz"))
        .send()
        .await
        .map(|r| r.status().as_u16());
    assert!(
        matches!(ready, Ok(503) | Err(_)),
        "not ready once shutdown began: {ready:?}"
    );
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200, "the in-flight request finished");
    let status = tokio::task::spawn_blocking(move || w.sidecar.wait_exit(Duration::from_secs(20)))
        .await
        .unwrap();
    assert!(status.success(), "{status}");
}
