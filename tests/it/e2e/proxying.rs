//! Forwarding and refusals that involve no payment: free, deny, default, the 402's shape,
//! discovery, malformed requests, an unreachable upstream.

use serde_json::Value;

use super::harness::{self, BASE_SEPOLIA_USDC, PAY_TO};
use super::{World, expect_error};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_free_route_is_forwarded_intact_and_annotated() {
    let w = World::start("free").await;
    let response = w
        .http
        .post(w.sidecar.url("/free/a/b?x=1&y=%20z"))
        .header("x-custom", "kept")
        .header("x-payment", "stripped")
        .header("payment-signature", "stripped")
        .header("x-api-key", "tg_secret")
        .header("x-tollgate-payer", "0xspoofed")
        .header("keep-alive", "timeout=5")
        .header("x-request-id", "req-123")
        .body("hello")
        .send()
        .await
        .unwrap();
    // POST on a GET-only free route: no route matches, default deny.
    assert_eq!(response.status(), 403);

    let response = w
        .get("/free/a/b?x=1&y=%20z")
        .header("x-custom", "kept")
        .header("x-payment", "stripped")
        .header("payment-signature", "stripped")
        .header("x-api-key", "tg_secret")
        .header("x-tollgate-payer", "0xspoofed")
        .header("x-request-id", "req-123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-123");
    let seen: Value = response.json().await.unwrap();
    assert_eq!(seen["method"], "GET");
    assert_eq!(seen["uri"], "/free/a/b?x=1&y=%20z");
    let headers = &seen["headers"];
    assert_eq!(headers["x-custom"], "kept");
    assert_eq!(headers["x-request-id"], "req-123");
    assert_eq!(headers["x-tollgate-rail"], "free");
    assert_eq!(headers["x-tollgate-route"], "GET /free/**");
    for gone in [
        "x-payment",
        "payment-signature",
        "x-api-key",
        "x-tollgate-payer",
        "keep-alive",
    ] {
        assert!(
            headers.get(gone).is_none(),
            "{gone} reached the upstream: {headers:#}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_and_chunked_bodies_stream_both_ways() {
    let w = World::start("bodies").await;
    let big: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let response = w
        .http
        .put(w.sidecar.url("/echo/big"))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["x-upstream-body-len"],
        big.len().to_string().as_str()
    );
    assert_eq!(response.bytes().await.unwrap().as_ref(), big.as_slice());

    // A chunked request body (no content-length), written by hand.
    let mut raw = b"POST /echo/chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for i in 0..64u8 {
        raw.extend_from_slice(format!("{:x}\r\n", 10_000).as_bytes());
        raw.extend_from_slice(&[i; 10_000]);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let text = harness::raw_request(w.sidecar.port, &raw).await;
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..200.min(text.len())]
    );
    assert!(
        text.to_ascii_lowercase()
            .contains("x-upstream-body-len: 640000")
    );

    // Keep-alive: many requests, one client, all answered.
    for i in 0..50 {
        let r = w.get(&format!("/free/{i}")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_unmatched_and_malformed_requests_are_refused_with_json() {
    let w = World::start("deny").await;
    expect_error(
        w.http
            .delete(w.sidecar.url("/internal/cache"))
            .send()
            .await
            .unwrap(),
        403,
        "route_denied",
    )
    .await;
    expect_error(w.get("/nowhere").send().await.unwrap(), 403, "no_route").await;
    // Dot segments would let a free prefix reach a paid route; HTTP clients normalise them
    // away, so write the request by hand.
    for target in ["/free/../paid/x", "/free/%2e%2e/paid/x"] {
        let answer = harness::raw_request(
            w.sidecar.port,
            format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{target}: {answer}");
        assert!(answer.contains("\"malformed_request\""), "{answer}");
    }
    expect_error(
        w.get("/free/a%2Fb").send().await.unwrap(),
        400,
        "malformed_request",
    )
    .await;
    assert_eq!(
        w.upstream.seen(),
        0,
        "refused requests never reach the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_402_carries_v2_header_and_v1_body_field_by_field() {
    let w = World::start("challenge").await;
    let first = w.get("/paid/report?id=7").send().await.unwrap();
    assert_eq!(first.status(), 402);
    assert_eq!(first.headers()["content-type"], "application/json");
    let header = first.headers()["payment-required"]
        .to_str()
        .unwrap()
        .to_string();
    let v1: Value = first.json().await.unwrap();

    let v2 = harness::decode(&header);
    assert_eq!(v2["x402Version"], 2);
    assert_eq!(v2["error"], "payment_required");
    assert_eq!(
        v2["resource"]["url"],
        "https://api.example.com/paid/report?id=7"
    );
    assert_eq!(v2["resource"]["description"], "A paid thing");
    assert_eq!(v2["resource"]["mimeType"], "application/json");
    let accepts = v2["accepts"].as_array().unwrap();
    assert_eq!(accepts.len(), 2, "one entry per accepted network");
    let expected = serde_json::json!({
        "scheme": "exact",
        "network": "eip155:84532",
        "amount": "10000",
        "asset": BASE_SEPOLIA_USDC,
        "payTo": PAY_TO,
        "maxTimeoutSeconds": 60,
        "extra": {"name": "USDC", "version": "2"}
    });
    assert_eq!(accepts[0], expected);
    assert_eq!(accepts[1]["network"], "eip155:8453");
    assert_eq!(
        accepts[1]["asset"],
        "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
    );
    assert_eq!(accepts[1]["extra"]["name"], "USD Coin");

    assert_eq!(v1["x402Version"], 1);
    assert_eq!(v1["error"], "payment_required");
    assert!(
        v1["message"]
            .as_str()
            .unwrap()
            .contains("PAYMENT-SIGNATURE")
    );
    let entry = &v1["accepts"][0];
    let keys: Vec<&str> = entry
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        [
            "asset",
            "description",
            "extra",
            "maxAmountRequired",
            "maxTimeoutSeconds",
            "mimeType",
            "network",
            "payTo",
            "resource",
            "scheme"
        ],
        "no outputSchema, nothing missing"
    );
    assert_eq!(entry["network"], "base-sepolia");
    assert_eq!(entry["maxAmountRequired"], "10000");
    assert_eq!(
        entry["resource"],
        "https://api.example.com/paid/report?id=7"
    );
    assert_eq!(entry["description"], "A paid thing");
    assert_eq!(entry["mimeType"], "application/json");
    assert_eq!(entry["payTo"], PAY_TO);
    assert_eq!(entry["asset"], BASE_SEPOLIA_USDC);
    assert_eq!(entry["maxTimeoutSeconds"], 60);
    assert_eq!(
        entry["extra"],
        serde_json::json!({"name": "USDC", "version": "2"})
    );
    assert_eq!(v1["accepts"][1]["network"], "base");

    // Deterministic: the same bytes on the next call.
    let again = w.get("/paid/report?id=7").send().await.unwrap();
    assert_eq!(
        again.headers()["payment-required"].to_str().unwrap(),
        header
    );
    // Default description and mime type are still strings.
    let (v2, v1) = w.challenge("/hybrid").await;
    assert!(v2["resource"]["description"].is_string() && v1["accepts"][0]["mimeType"].is_string());
    assert_eq!(w.upstream.seen(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_only_routes_ask_for_a_key() {
    let w = World::start("credits").await;
    let response = w.get("/credits").send().await.unwrap();
    assert!(response.headers().get("payment-required").is_none());
    let body = expect_error(response, 402, "api_key_required").await;
    assert_eq!(body["accepts"], serde_json::json!([]));
    assert!(body["message"].as_str().unwrap().contains("x-api-key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_lists_every_paid_route_with_its_offers() {
    let w = World::start("discovery").await;
    let response = w.get("/.well-known/x402").send().await.unwrap();
    assert_eq!(response.status(), 200);
    let doc: Value = response.json().await.unwrap();
    assert_eq!(doc["service"], "e2e");
    assert_eq!(doc["prepaidHeader"], "x-api-key");
    let routes = doc["routes"].as_array().unwrap();
    let names: Vec<String> = routes
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r["method"].as_str().unwrap(),
                r["path"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            "* /paid/**",
            "GET /first/**",
            "GET /hybrid",
            "GET /credits",
            "GET /vip/**",
            "GET /impatient/**",
            "* /refundable/**",
            "GET /metered/**",
            "GET /limited/**",
            "POST /buy-credits"
        ]
    );
    let (v2, _) = w.challenge("/paid/x").await;
    assert_eq!(
        routes[0]["accepts"], v2["accepts"],
        "discovery offers exactly what a 402 offers"
    );
    assert_eq!(routes[0]["description"], "A paid thing");
    assert_eq!(routes[2]["credits"], "2");
    assert_eq!(routes[3]["accepts"], serde_json::json!([]));
    assert_eq!(routes[9]["sellsCredits"], "100");
    assert!(routes[0].get("sellsCredits").is_none());
    assert_eq!(w.upstream.seen(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_a_502_and_nothing_is_settled() {
    let upstream = harness::Upstream::start().await;
    let facilitator = harness::Facilitator::start().await;
    let down = format!("http://127.0.0.1:{}", harness::free_port());
    let w = World::start_with("down", upstream, facilitator, Some(down)).await;
    expect_error(
        w.get("/free/x").send().await.unwrap(),
        502,
        "upstream_unavailable",
    )
    .await;
    let response = w.pay_v2("/paid/x", &harness::Tweak::default()).await;
    expect_error(response, 502, "upstream_unavailable").await;
    assert!(w.facilitator.settled().is_empty());
}
