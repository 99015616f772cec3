//! Paying with x402, v1 and v2, and every way a payment is refused.

use alloy::primitives::{Address, U256};
use serde_json::Value;

use super::harness::{self, Tweak, now};
use super::{World, expect_error};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v2_payment_is_verified_forwarded_settled_and_receipted() {
    let w = World::start("paid-v2").await;
    let response = w.pay_v2("/paid/report", &Tweak::default()).await;
    assert_eq!(response.status(), 200);
    let receipt = harness::decode(response.headers()["payment-response"].to_str().unwrap());
    assert!(response.headers().get("x-payment-response").is_none());
    assert_eq!(receipt["success"], true);
    assert_eq!(receipt["network"], "eip155:84532");
    assert_eq!(receipt["payer"], w.wallet.address().to_checksum(None));
    assert!(receipt["transaction"].as_str().unwrap().starts_with("0x"));

    let seen: Value = response.json().await.unwrap();
    let headers = &seen["headers"];
    assert_eq!(headers["x-tollgate-rail"], "x402");
    assert_eq!(
        headers["x-tollgate-payer"],
        w.wallet.address().to_checksum(None)
    );
    assert_eq!(headers["x-tollgate-amount"], "10000");
    assert_eq!(headers["x-tollgate-asset"], harness::BASE_SEPOLIA_USDC);
    assert_eq!(headers["x-tollgate-network"], "base-sepolia");
    assert!(headers.get("payment-signature").is_none());

    let settled = w.facilitator.settled();
    assert_eq!(settled.len(), 1);
    assert_eq!(settled[0].x402_version, 2);
    assert_eq!(settled[0].payer, w.wallet.address());
    assert_eq!(settled[0].value, U256::from(10_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_payment_is_verified_forwarded_settled_and_receipted() {
    let w = World::start("paid-v1").await;
    let response = w.pay_v1("/paid/report", &Tweak::default()).await;
    assert_eq!(response.status(), 200);
    let receipt = harness::decode(response.headers()["x-payment-response"].to_str().unwrap());
    assert_eq!(receipt["success"], true);
    assert_eq!(receipt["network"], "base-sepolia");
    assert_eq!(receipt["payer"], w.wallet.address().to_checksum(None));
    assert_eq!(w.facilitator.settled().len(), 1);
    assert_eq!(w.facilitator.settled()[0].x402_version, 1);

    // The second network of the route, paid in v1 by name.
    let (_, v1) = w.challenge("/paid/other").await;
    let header = w.wallet.pay_v1(&v1["accepts"][1], &Tweak::default());
    let response = w
        .get("/paid/other")
        .header("x-payment", header)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let receipt = harness::decode(response.headers()["x-payment-response"].to_str().unwrap());
    assert_eq!(receipt["network"], "base");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_is_used_once_sequentially() {
    let w = World::start("replay").await;
    let header = w.signed_v2("/paid/a", &Tweak::default()).await;
    let first = w.send_v2("/paid/a", &header).await;
    assert_eq!(first.status(), 200);
    let again = w.send_v2("/paid/a", &header).await;
    assert!(
        again.headers().get("payment-required").is_some(),
        "a replay gets the challenge again"
    );
    expect_error(again, 402, "payment_replayed").await;
    assert_eq!(w.upstream.seen(), 1);
    assert_eq!(w.facilitator.settled().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_100_concurrent_identical_payments_exactly_one_is_served() {
    let w = World::start("replay-concurrent").await;
    let header = w.signed_v2("/paid/a", &Tweak::default()).await;
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let request = w.get("/paid/a").header("payment-signature", &header);
        tasks.push(tokio::spawn(async move {
            request.send().await.unwrap().status().as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    let served = statuses.iter().filter(|s| **s == 200).count();
    let replayed = statuses.iter().filter(|s| **s == 402).count();
    assert_eq!((served, replayed), (1, 99), "{statuses:?}");
    assert_eq!(w.upstream.seen(), 1);
    assert_eq!(w.facilitator.settled().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_payment_stays_used_after_kill_9_and_restart() {
    let mut w = World::start("replay-restart").await;
    let header = w.signed_v2("/paid/a", &Tweak::default()).await;
    let first = w.send_v2("/paid/a", &header).await;
    assert_eq!(first.status(), 200);

    w.sidecar.kill();
    let upstream = w.upstream.url();
    w.sidecar = harness::Sidecar::start(&w.dir, &upstream).await;
    let again = w.send_v2("/paid/a", &header).await;
    expect_error(again, 402, "payment_replayed").await;
    assert_eq!(w.upstream.seen(), 1);
}

/// Each bent payment is refused with its code, never reaches the upstream, is never settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_payments_are_refused_with_their_codes() {
    let w = World::start("invalid").await;
    let t = now();
    let cases: Vec<(&str, Tweak, &str)> = vec![
        (
            "expired",
            Tweak {
                valid_before: Some(t + 3),
                ..Tweak::default()
            },
            "authorization_expired",
        ),
        (
            "long expired",
            Tweak {
                valid_after: Some(t - 900),
                valid_before: Some(t - 300),
                ..Tweak::default()
            },
            "authorization_expired",
        ),
        (
            "not yet valid",
            Tweak {
                valid_after: Some(t + 120),
                ..Tweak::default()
            },
            "authorization_not_yet_valid",
        ),
        (
            "wrong pay_to",
            Tweak {
                to: Some(Address::repeat_byte(7)),
                ..Tweak::default()
            },
            "recipient_mismatch",
        ),
        (
            "underpaid",
            Tweak {
                value: Some(U256::from(9_999)),
                ..Tweak::default()
            },
            "amount_mismatch",
        ),
        (
            "overpaid",
            Tweak {
                value: Some(U256::from(10_001)),
                ..Tweak::default()
            },
            "amount_mismatch",
        ),
        (
            "wrong domain name",
            Tweak {
                domain_name: Some("USD Coin".into()),
                ..Tweak::default()
            },
            "invalid_signature",
        ),
        (
            "wrong chain",
            Tweak {
                chain_id: Some(8453),
                ..Tweak::default()
            },
            "invalid_signature",
        ),
        (
            "impostor",
            Tweak {
                impostor: true,
                ..Tweak::default()
            },
            "invalid_signature",
        ),
        (
            "high s",
            Tweak {
                high_s: true,
                ..Tweak::default()
            },
            "non_canonical_signature",
        ),
        (
            "v = 0 or 1",
            Tweak {
                v_base: Some(0),
                ..Tweak::default()
            },
            "non_canonical_signature",
        ),
        (
            "v = 35 or 36 (EIP-155 style)",
            Tweak {
                v_base: Some(35),
                ..Tweak::default()
            },
            "non_canonical_signature",
        ),
        (
            "v = 254 or 255",
            Tweak {
                v_base: Some(254),
                ..Tweak::default()
            },
            "non_canonical_signature",
        ),
        (
            "valid for a day (its nonce would be kept that long)",
            Tweak {
                valid_before: Some(t + 86_400),
                ..Tweak::default()
            },
            "authorization_too_long",
        ),
        (
            "valid until u64::MAX",
            Tweak {
                valid_before: Some(u64::MAX),
                ..Tweak::default()
            },
            "authorization_too_long",
        ),
    ];
    for (name, tweak, code) in &cases {
        for version in [1, 2] {
            let response = if version == 1 {
                w.pay_v1("/paid/x", tweak).await
            } else {
                w.pay_v2("/paid/x", tweak).await
            };
            assert!(
                response.headers().get("payment-required").is_some(),
                "{name} v{version}"
            );
            let body = expect_error(response, 402, code).await;
            assert_eq!(
                body["accepts"].as_array().map(Vec::len),
                Some(2),
                "{name}: the challenge comes again"
            );
        }
    }
    assert_eq!(w.upstream.seen(), 0);
    assert!(w.facilitator.settled().is_empty());
}

/// Pays `/paid/x` with an authorization signed for `entry` (v1 or v2 shape); expects `code`.
async fn refused_for(w: &World, version: u8, entry: &Value, code: &str) {
    let (name, header) = if version == 1 {
        ("x-payment", w.wallet.pay_v1(entry, &Tweak::default()))
    } else {
        (
            "payment-signature",
            w.wallet.pay_v2(entry, &Tweak::default()),
        )
    };
    let response = w.get("/paid/x").header(name, header).send().await.unwrap();
    expect_error(response, 402, code).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_for_other_terms_are_refused() {
    let w = World::start("mismatch").await;
    let (v2, v1) = w.challenge("/paid/x").await;
    let other_usdc = Value::from("0x1c7D4B196Cb0C7B01d743Fbc6116a902379C7238");
    let cases = [
        // v2: `accepted` must be an offered entry, exactly.
        (2, "network", Value::from("eip155:1"), "accepted_mismatch"),
        (2, "asset", other_usdc.clone(), "accepted_mismatch"),
        (2, "amount", Value::from("1"), "accepted_mismatch"),
        (
            2,
            "payTo",
            Value::from("0x0000000000000000000000000000000000000001"),
            "accepted_mismatch",
        ),
        (
            2,
            "maxTimeoutSeconds",
            Value::from(600),
            "accepted_mismatch",
        ),
        (2, "scheme", Value::from("upto"), "unsupported_scheme"),
        // v1: the network must be offered; a signature for another asset does not verify.
        (1, "network", Value::from("polygon"), "network_mismatch"),
        (1, "asset", other_usdc, "invalid_signature"),
    ];
    for (version, field, value, code) in cases {
        let mut entry = if version == 1 {
            v1["accepts"][0].clone()
        } else {
            v2["accepts"][0].clone()
        };
        entry[field] = value;
        refused_for(&w, version, &entry, code).await;
    }
    // A payment made for another route's price.
    let (first, _) = w.challenge("/first/x").await;
    refused_for(&w, 2, &first["accepts"][0], "accepted_mismatch").await;
    assert_eq!(w.upstream.seen(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_payment_headers_are_400s() {
    let w = World::start("garbage").await;
    let garbage = [
        ("payment-signature", "not base64 at all!!".to_string()),
        (
            "payment-signature",
            harness::encode(&serde_json::json!({"hello": "world"})),
        ),
        ("x-payment", harness::encode(&serde_json::json!([1, 2, 3]))),
        ("payment-signature", base64_of("{\"x402Version\":2,")),
        (
            "x-payment",
            harness::encode(
                &serde_json::json!({"x402Version": 1, "scheme": "exact", "network": "base-sepolia", "payload": {"signature": "0x00", "authorization": {"from": "0x12", "to": "0x34", "value": "1", "validAfter": "0", "validBefore": "1", "nonce": "0x00"}}}),
            ),
        ),
    ];
    for (name, value) in garbage {
        let response = w.get("/paid/x").header(name, value).send().await.unwrap();
        expect_error(response, 400, "payment_malformed").await;
    }
    let version_3 = harness::encode(
        &serde_json::json!({"x402Version": 3, "payload": {"signature": "0x", "authorization": {"from": "", "to": "", "value": "", "validAfter": "", "validBefore": "", "nonce": ""}}}),
    );
    expect_error(
        w.get("/paid/x")
            .header("payment-signature", version_3)
            .send()
            .await
            .unwrap(),
        400,
        "unsupported_x402_version",
    )
    .await;
    let huge = "A".repeat(20_000);
    expect_error(
        w.get("/paid/x")
            .header("payment-signature", huge)
            .send()
            .await
            .unwrap(),
        400,
        "payment_too_large",
    )
    .await;
    // A smart-wallet-length signature is refused, not mis-verified.
    let (v2, _) = w.challenge("/paid/x").await;
    let mut payload = harness::decode(&w.wallet.pay_v2(&v2["accepts"][0], &Tweak::default()));
    payload["payload"]["signature"] = format!("0x{}", "ab".repeat(130)).into();
    let response = w
        .get("/paid/x")
        .header("payment-signature", harness::encode(&payload))
        .send()
        .await
        .unwrap();
    expect_error(response, 402, "unsupported_signature").await;
    assert_eq!(w.upstream.seen(), 0);
}

fn base64_of(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payer_lists_apply_once_the_payer_is_known() {
    let w = World::start("payers").await;
    let response = w.pay_v2("/vip/x", &Tweak::default()).await;
    expect_error(response, 403, "payer_not_allowed").await;
    assert_eq!(w.upstream.seen(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_hybrid_route_an_attached_payment_pays_for_a_key_that_cannot() {
    let w = World::start("hybrid").await;
    let header = w.signed_v2("/hybrid", &Tweak::default()).await;
    let response = w
        .get("/hybrid")
        .header("x-api-key", "tg_key")
        .header("payment-signature", header)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen: Value = response.json().await.unwrap();
    assert_eq!(seen["headers"]["x-tollgate-rail"], "x402");
    assert!(
        seen["headers"].get("x-api-key").is_none(),
        "the key never reaches the upstream"
    );
    let response = w
        .get("/hybrid")
        .header("x-api-key", "tg_key")
        .send()
        .await
        .unwrap();
    expect_error(response, 401, "api_key_invalid").await;
    assert_eq!(w.upstream.seen(), 1);
}
