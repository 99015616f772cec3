//! Prepaid credits end to end: the admin API (and its token), keys, debits, the hybrid
//! fallback to x402, refunds, idempotent retries, concurrency, crashes, and the CLI.

use std::collections::HashSet;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::harness::{Sidecar, Tweak};
use super::{World, expect_error};

const ENDPOINTS: [(&str, &str); 9] = [
    ("POST", "/v1/accounts"),
    ("GET", "/v1/accounts"),
    ("GET", "/v1/accounts/1"),
    ("POST", "/v1/accounts/1/keys"),
    ("GET", "/v1/accounts/1/keys"),
    ("DELETE", "/v1/keys/tg_000000000000"),
    ("POST", "/v1/accounts/1/topups"),
    ("GET", "/v1/accounts/1/usage"),
    ("GET", "/v1/audit"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_endpoint_refuses_a_missing_or_wrong_token() {
    let w = World::start("admin-auth").await;
    let token = w.sidecar.admin_token();
    assert!(token.len() >= 64, "a generated token has 256 bits");
    for (method, path) in ENDPOINTS.iter().chain(&[("GET", "/no/such/endpoint")]) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        for auth in [None, Some("Bearer wrong"), Some(token.as_str())] {
            let mut request = w.http.request(method.clone(), w.sidecar.admin_url(path));
            if let Some(auth) = auth {
                request = request.header("authorization", auth);
            }
            let response = request.send().await.unwrap();
            assert_eq!(
                response.headers()["www-authenticate"],
                "Bearer",
                "{method} {path}"
            );
            let body = expect_error(response, 401, "unauthorized").await;
            assert!(!body.to_string().contains(&token));
        }
    }
    // With the token, the same requests get past authentication.
    let (status, _) = w.admin("GET", "/v1/audit", None).await;
    assert_eq!(status, 200);
    let (status, body) = w.admin("GET", "/no/such/endpoint", None).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_keys_and_top_ups_through_the_admin_api() {
    let w = World::start("admin-api").await;
    let (status, created) = w
        .admin("POST", "/v1/accounts", Some(json!({"name": "acme"})))
        .await;
    assert_eq!(status, 201);
    assert_eq!(created["account"]["name"], "acme");
    assert_eq!(created["balance"], "0");
    let id = created["account"]["id"].as_u64().unwrap();

    let keys = format!("/v1/accounts/{id}/keys");
    let (status, issued) = w.admin("POST", &keys, Some(json!({"label": "ci"}))).await;
    assert_eq!(status, 201, "{issued:#}");
    let key = issued["key"].as_str().unwrap();
    assert!(key.starts_with("tg_") && key.len() == 67, "{key}");
    let key_id = issued["record"]["id"].as_str().unwrap().to_string();
    assert!(key.starts_with(&key_id) && key_id.len() == 15);
    let (_, second) = w.admin("POST", &keys, Some(json!({}))).await;
    assert_ne!(second["key"], issued["key"]);

    let (status, listed) = w.admin("GET", &keys, None).await;
    assert_eq!(status, 200);
    let listed_text = listed.to_string();
    assert_eq!(listed["keys"].as_array().unwrap().len(), 2);
    assert!(!listed_text.contains(key), "a listing never shows a key");
    assert_eq!(listed["keys"][0]["label"], "ci");

    let topups = format!("/v1/accounts/{id}/topups");
    let (status, first) = w
        .admin(
            "POST",
            &topups,
            Some(json!({"credits": "10", "reference": "inv-1"})),
        )
        .await;
    assert_eq!(status, 201, "{first:#}");
    assert_eq!(
        (
            first["fact"]["kind"].as_str(),
            first["fact"]["balance"].as_str()
        ),
        (Some("topup"), Some("10"))
    );
    let (status, again) = w
        .admin(
            "POST",
            &topups,
            Some(json!({"credits": 10, "reference": "inv-1"})),
        )
        .await;
    assert_eq!(
        (status, again["repeated"].as_bool()),
        (200, Some(true)),
        "same reference, same amount: answered again"
    );
    assert_eq!(again["fact"], first["fact"]);
    let (status, body) = w
        .admin(
            "POST",
            &topups,
            Some(json!({"credits": "11", "reference": "inv-1"})),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("reference_reused"))
    );
    let (status, _) = w
        .admin(
            "POST",
            &topups,
            Some(json!({"credits": "5", "reference": "inv-2"})),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(w.balance(id).await, 15);

    for (body, why) in [
        (json!({"credits": "1.5", "reference": "x"}), "fractional"),
        (json!({"credits": "-1", "reference": "x"}), "negative"),
        (json!({"credits": "0", "reference": "x"}), "zero"),
        (json!({"credits": "1"}), "no reference"),
        (json!({"credits": "1", "reference": ""}), "empty reference"),
        (
            json!({"credits": "1", "reference": "x", "extra": 1}),
            "unknown field",
        ),
    ] {
        let (status, reply) = w.admin("POST", &topups, Some(body)).await;
        assert_eq!(
            (status, reply["error"].as_str()),
            (400, Some("invalid_request")),
            "{why}"
        );
    }
    let (status, body) = w
        .admin(
            "POST",
            "/v1/accounts/999/topups",
            Some(json!({"credits": "1", "reference": "x"})),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("account_not_found"))
    );

    // Usage, paged one fact at a time.
    let (status, page) = w
        .admin("GET", &format!("/v1/accounts/{id}/usage?limit=1"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["facts"].as_array().unwrap().len(), 1);
    assert_eq!(page["facts"][0]["reference"], "inv-1");
    let next = page["next_after"].as_u64().unwrap();
    let (_, page) = w
        .admin(
            "GET",
            &format!("/v1/accounts/{id}/usage?after={next}&limit=1"),
            None,
        )
        .await;
    assert_eq!(page["facts"][0]["reference"], "inv-2");
    let next = page["next_after"].as_u64().unwrap();
    let (_, page) = w
        .admin(
            "GET",
            &format!("/v1/accounts/{id}/usage?after={next}"),
            None,
        )
        .await;
    assert_eq!(
        (page["facts"].as_array().unwrap().len(), &page["next_after"]),
        (0, &Value::Null)
    );

    // Revocation.
    let (status, revoked) = w.admin("DELETE", &format!("/v1/keys/{key_id}"), None).await;
    assert_eq!(status, 200);
    assert!(revoked["record"]["revoked_at"].as_u64().is_some());
    let (status, body) = w.admin("DELETE", "/v1/keys/tg_nothing", None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("key_not_found"))
    );

    let (status, accounts) = w.admin("GET", "/v1/accounts", None).await;
    assert_eq!(
        (status, accounts["accounts"][0]["balance"].as_str()),
        (200, Some("15"))
    );
    let (status, audit) = w.admin("GET", "/v1/audit", None).await;
    assert_eq!(
        (status, audit["consistent"].as_bool()),
        (200, Some(true)),
        "{audit:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_with_credits_is_debited_and_its_request_forwarded() {
    let w = World::start("prepaid-debit").await;
    let (account, key) = w.funded_key(12).await;
    for balance in [7, 2] {
        let response = w.with_key("/credits", &key).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-tollgate-credits-charged"], "5");
        assert_eq!(
            response.headers()["x-tollgate-credits-balance"],
            balance.to_string()
        );
        let seen: Value = response.json().await.unwrap();
        let headers = &seen["headers"];
        assert_eq!(headers["x-tollgate-rail"], "prepaid");
        assert_eq!(headers["x-tollgate-account"], account.to_string());
        assert_eq!(headers["x-tollgate-credits"], "5");
        assert!(key.starts_with(headers["x-tollgate-key-id"].as_str().unwrap()));
        assert!(
            headers.get("x-api-key").is_none(),
            "the key never reaches the upstream"
        );
    }
    // 2 credits left, the route costs 5 and takes only credits.
    let response = w.with_key("/credits", &key).await;
    assert!(response.headers().get("payment-required").is_none());
    let body = expect_error(response, 402, "credits_exhausted").await;
    assert_eq!(body["hint"], "credits_exhausted");
    assert_eq!(w.upstream.seen(), 2);
    assert_eq!(w.balance(account).await, 2);

    let (_, usage) = w
        .admin("GET", &format!("/v1/accounts/{account}/usage"), None)
        .await;
    let kinds: Vec<_> = usage["facts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["topup", "debit", "debit"]);
    assert_eq!(usage["facts"][1]["route"], "GET /credits");
    assert!(usage["facts"][1]["request_id"].as_str().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_run_dry_is_offered_x402_and_a_payment_then_pays() {
    let w = World::start("prepaid-hybrid").await;
    let (account, key) = w.funded_key(2).await;
    let response = w.with_key("/hybrid", &key).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tollgate-credits-balance"], "0");

    let response = w.with_key("/hybrid", &key).await;
    assert!(
        response.headers().contains_key("payment-required"),
        "the 402 offers x402"
    );
    let body = expect_error(response, 402, "payment_required").await;
    assert_eq!(body["hint"], "credits_exhausted");
    assert_eq!(body["accepts"].as_array().unwrap().len(), 2);

    let header = w.signed_v2("/hybrid", &Tweak::default()).await;
    let response = w
        .get("/hybrid")
        .header("x-api-key", &key)
        .header("payment-signature", header)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("payment-response"));
    let seen: Value = response.json().await.unwrap();
    assert_eq!(seen["headers"]["x-tollgate-rail"], "x402");
    assert_eq!(w.facilitator.settled().len(), 1);
    assert_eq!(w.balance(account).await, 0);

    // Topped up again, the key pays first (the route prefers prepaid); the payment is unused.
    w.admin(
        "POST",
        &format!("/v1/accounts/{account}/topups"),
        Some(json!({"credits": "2", "reference": "more"})),
    )
    .await;
    let header = w.signed_v2("/hybrid", &Tweak::default()).await;
    let response = w
        .get("/hybrid")
        .header("x-api-key", &key)
        .header("payment-signature", header)
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-tollgate-credits-charged"], "2");
    assert_eq!(w.facilitator.settled().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_revoked_and_expired_keys_are_refused() {
    let w = World::start("prepaid-keys").await;
    let (account, key) = w.funded_key(100).await;
    let response = w
        .with_key(
            "/credits",
            "tg_0000000000000000000000000000000000000000000000000000000000000000",
        )
        .await;
    expect_error(response, 401, "api_key_invalid").await;
    let response = w.with_key("/credits", "not even a key").await;
    expect_error(response, 401, "api_key_invalid").await;

    let (status, expiring) = w
        .admin(
            "POST",
            &format!("/v1/accounts/{account}/keys"),
            Some(json!({"expires_in_secs": 0})),
        )
        .await;
    assert_eq!(status, 201);
    let response = w
        .with_key("/credits", expiring["key"].as_str().unwrap())
        .await;
    expect_error(response, 401, "api_key_expired").await;

    assert_eq!(w.with_key("/credits", &key).await.status(), 200);
    let key_id = &key[..15];
    let (status, _) = w.admin("DELETE", &format!("/v1/keys/{key_id}"), None).await;
    assert_eq!(status, 200);
    let response = w.with_key("/credits", &key).await;
    let body = expect_error(response, 401, "api_key_revoked").await;
    assert!(!body.to_string().contains(&key));
    assert_eq!(w.upstream.seen(), 1);
    assert_eq!(w.balance(account).await, 95);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_upstream_calls_give_the_credits_back() {
    let w = World::start("prepaid-refund").await;
    let (account, key) = w.funded_key(10).await;
    // `refund on 5xx`: the upstream's 503 costs nothing.
    let response = w.with_key("/refundable/status/503", &key).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["x-tollgate-credits-charged"], "0");
    assert_eq!(response.headers()["x-tollgate-credits-balance"], "10");
    // A 4xx is the buyer's mistake: charged.
    let response = w.with_key("/refundable/status/404", &key).await;
    assert_eq!(response.status(), 404);
    assert_eq!(w.balance(account).await, 7);
    // Without `refund on 5xx`, a 5xx is charged.
    let response = w.with_key("/metered/status/500", &key).await;
    assert_eq!(response.status(), 500);
    assert_eq!(w.balance(account).await, 6);

    let (_, usage) = w
        .admin("GET", &format!("/v1/accounts/{account}/usage"), None)
        .await;
    let facts = usage["facts"].as_array().unwrap();
    let kinds: Vec<_> = facts.iter().map(|f| f["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["topup", "debit", "refund", "debit", "debit"]);
    assert_eq!(facts[2]["refund_of"], facts[1]["seq"]);
    let (_, audit) = w.admin("GET", "/v1/audit", None).await;
    assert_eq!(audit["consistent"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_costs_nothing() {
    let upstream = super::harness::Upstream::start().await;
    let facilitator = super::harness::Facilitator::start().await;
    let dead = format!("http://127.0.0.1:{}", super::harness::free_port());
    let w = World::start_with("prepaid-dead", upstream, facilitator, Some(dead)).await;
    let (account, key) = w.funded_key(10).await;
    let response = w.with_key("/metered/x", &key).await;
    expect_error(response, 502, "upstream_unavailable").await;
    assert_eq!(w.balance(account).await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_the_same_idempotency_key_is_charged_once() {
    let w = World::start("prepaid-idempotent").await;
    let (account, key) = w.funded_key(10).await;
    let call = |path: &'static str, idem: &'static str| {
        w.get(path)
            .header("x-api-key", &key)
            .header("idempotency-key", idem)
            .send()
    };
    let first = call("/credits", "order-1").await.unwrap();
    assert_eq!(first.headers()["x-tollgate-credits-charged"], "5");
    let retry = call("/credits", "order-1").await.unwrap();
    let body = expect_error(retry, 409, "idempotency_key_used").await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("nothing was charged")
    );
    assert_eq!(w.balance(account).await, 5, "charged once");
    assert_eq!(w.upstream.seen(), 1, "and served once");

    let other = call("/metered/x", "order-1").await.unwrap();
    expect_error(other, 422, "idempotency_key_reused").await;
    let fresh = call("/credits", "order-2").await.unwrap();
    assert_eq!(fresh.headers()["x-tollgate-credits-charged"], "5");
    assert_eq!(w.balance(account).await, 0);

    // A refunded request's key charges again on retry (the retry is a new attempt).
    w.admin(
        "POST",
        &format!("/v1/accounts/{account}/topups"),
        Some(json!({"credits": "6", "reference": "r"})),
    )
    .await;
    let failed = call("/refundable/status/502", "order-3").await.unwrap();
    assert_eq!(failed.headers()["x-tollgate-credits-charged"], "0");
    let retried = call("/refundable/ok", "order-3").await.unwrap();
    assert_eq!(retried.headers()["x-tollgate-credits-charged"], "3");
    assert_eq!(w.balance(account).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_never_overspend_one_key() {
    let w = Arc::new(World::start("prepaid-race").await);
    // /metered costs 1 credit: the balance covers exactly 500 calls.
    let (account, key) = w.funded_key(500).await;
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let (w, key) = (w.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            w.with_key("/metered/race", &key).await.status().as_u16()
        }));
    }
    let mut statuses = std::collections::BTreeMap::new();
    for task in tasks {
        *statuses.entry(task.await.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(
        statuses,
        [(200, 500), (402, 500)].into_iter().collect(),
        "{statuses:?}"
    );
    assert_eq!(w.balance(account).await, 0);
    assert_eq!(w.upstream.seen(), 500);
    let (_, audit) = w.admin("GET", "/v1/audit", None).await;
    assert_eq!(
        (
            audit["consistent"].as_bool(),
            audit["audit"]["facts"].as_u64()
        ),
        (Some(true), Some(501))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_tokens_never_reach_the_logs() {
    let upstream = super::harness::Upstream::start().await;
    let url = upstream.url();
    let facilitator = super::harness::Facilitator::start().await;
    let launch = super::harness::Launch {
        level: "debug",
        ..Default::default()
    };
    let w = World::launch("prepaid-logs", upstream, facilitator, &url, launch).await;
    let (account, key) = w.funded_key(10).await;
    assert_eq!(w.with_key("/credits", &key).await.status(), 200);
    let revoked_key = key.clone();
    w.admin("DELETE", &format!("/v1/keys/{}", &key[..15]), None)
        .await;
    assert_eq!(w.with_key("/credits", &revoked_key).await.status(), 401);
    let payment = w.signed_v2("/paid/x", &Tweak::default()).await;
    assert_eq!(w.send_v2("/paid/x", &payment).await.status(), 200);
    w.http
        .get(w.sidecar.admin_url("/v1/audit"))
        .bearer_auth("guessed-token")
        .send()
        .await
        .unwrap();

    let log = w.sidecar.log();
    assert!(
        log.contains("request_id"),
        "debug logs carry one line per request:\n{log}"
    );
    assert!(
        log.contains(&format!("account={account}"))
            || log.contains(&format!("\"account\":{account}")),
        "{log}"
    );
    let signature = super::harness::decode(&payment)["payload"]["signature"]
        .as_str()
        .unwrap()
        .to_string();
    for secret in [
        key.as_str(),
        &key[15..],
        &w.sidecar.admin_token(),
        "guessed-token",
        &signature,
    ] {
        assert!(!log.contains(secret), "a secret reached the log:\n{log}");
    }
}

/// Kills the sidecar with SIGKILL in the middle of debits and top-ups; after a restart the
/// ledger explains every balance, every served request was debited, and nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_debits_and_top_ups_loses_and_doubles_nothing() {
    let mut w = World::start("prepaid-crash").await;
    let (account, key) = w.funded_key(100_000).await;
    let token = w.sidecar.admin_token();
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let credited = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut load = Vec::new();
    for worker in 0..8 {
        let (http, url, key, served) = (
            w.http.clone(),
            w.sidecar.url("/metered/load"),
            key.clone(),
            served.clone(),
        );
        load.push(tokio::spawn(async move {
            for _ in 0..10_000 {
                match http.get(&url).header("x-api-key", &key).send().await {
                    Ok(r) if r.status() == 200 => {
                        served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    _ => return,
                }
            }
        }));
        let (http, url, token, credited) = (
            w.http.clone(),
            w.sidecar
                .admin_url(&format!("/v1/accounts/{account}/topups")),
            token.clone(),
            credited.clone(),
        );
        load.push(tokio::spawn(async move {
            for n in 0..10_000 {
                let reference = format!("w{worker}-{n}");
                let sent = http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&json!({"credits": "7", "reference": reference}))
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == 201 => credited.lock().unwrap().push(reference),
                    _ => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    w.sidecar.kill();
    for task in load {
        task.await.unwrap();
    }
    let served = served.load(std::sync::atomic::Ordering::SeqCst);
    let credited = credited.lock().unwrap().clone();
    assert!(
        served > 20 && credited.len() > 20,
        "the load ran: {served} debits, {} top-ups",
        credited.len()
    );

    w.sidecar = Sidecar::start(&w.dir, &w.upstream.url()).await;
    let (status, audit) = w.admin("GET", "/v1/audit", None).await;
    assert_eq!(
        (status, audit["consistent"].as_bool()),
        (200, Some(true)),
        "{audit:#}"
    );

    let mut facts = Vec::new();
    let mut after = 0;
    loop {
        let (_, page) = w
            .admin(
                "GET",
                &format!("/v1/accounts/{account}/usage?after={after}&limit=1000"),
                None,
            )
            .await;
        let page_facts = page["facts"].as_array().unwrap().clone();
        facts.extend(page_facts);
        match page["next_after"].as_u64() {
            Some(next) => after = next,
            None => break,
        }
    }
    let debits: Vec<&Value> = facts.iter().filter(|f| f["kind"] == "debit").collect();
    let request_ids: HashSet<&str> = debits
        .iter()
        .map(|f| f["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        request_ids.len(),
        debits.len(),
        "no request was debited twice"
    );
    assert!(
        debits.len() >= served,
        "every served request was debited: {} debits, {served} served",
        debits.len()
    );
    assert!(
        w.upstream.seen() <= debits.len(),
        "the upstream saw only debited requests"
    );
    let references: HashSet<&str> = facts
        .iter()
        .filter(|f| f["kind"] == "topup")
        .filter_map(|f| f["reference"].as_str())
        .collect();
    for reference in &credited {
        assert!(
            references.contains(reference.as_str()),
            "acknowledged top-up {reference} was lost"
        );
    }
    let topups = facts.iter().filter(|f| f["kind"] == "topup").count() as u128;
    eprintln!(
        "crash test: {served} served / {} debited, {} acknowledged / {topups} recorded top-ups",
        debits.len(),
        credited.len()
    );
    let expected = 100_000 + 7 * (topups - 1) - debits.len() as u128;
    assert_eq!(w.balance(account).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_works_on_the_store_and_through_a_running_sidecar() {
    let dir = super::harness::scratch_dir("prepaid-cli");
    let facilitator = super::harness::Facilitator::start().await;
    let upstream = super::harness::Upstream::start().await;
    std::fs::write(dir.join("policy.toll"), super::policy(&facilitator.url())).unwrap();
    std::fs::write(
        dir.join("tollgate.yaml"),
        "policies: [policy.toll]\nstore: data\n",
    )
    .unwrap();
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(args)
            .current_dir(&dir)
            .env_remove("TOLLGATE_CONFIG")
            .output()
            .unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        (out.status.code(), stdout, stderr)
    };
    let json_of = |text: &str| -> Value { serde_json::from_str(text).unwrap() };

    // No sidecar: the CLI opens the store itself.
    let (code, out, err) = cli(&["accounts", "create", "--name", "offline"]);
    assert_eq!(code, Some(0), "{err}");
    let account = json_of(&out)["account"]["id"].as_u64().unwrap();
    let (code, out, _) = cli(&[
        "keys",
        "issue",
        "--account",
        &account.to_string(),
        "--expires-in",
        "30d",
    ]);
    assert_eq!(code, Some(0));
    let key = json_of(&out)["key"].as_str().unwrap().to_string();
    let (code, _, _) = cli(&[
        "credits",
        "top-up",
        "--account",
        &account.to_string(),
        "--credits",
        "20",
        "--reference",
        "inv-9",
    ]);
    assert_eq!(code, Some(0));
    let (code, _, err) = cli(&[
        "credits",
        "top-up",
        "--account",
        "424242",
        "--credits",
        "1",
        "--reference",
        "x",
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("account_not_found"), "{err}");

    // A sidecar runs on the same store: the CLI goes through its admin API.
    let sidecar = Sidecar::start(&dir, &upstream.url()).await;
    let response = super::harness::client()
        .get(sidecar.url("/credits"))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The sidecar rewrote tollgate.yaml with its ports: the CLI reads the admin address there.
    let (code, out, err) = cli(&["credits", "balance", "--account", &account.to_string()]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(json_of(&out)["balance"], "15");
    let (code, out, _) = cli(&["credits", "usage", "--account", &account.to_string()]);
    assert_eq!(code, Some(0));
    assert_eq!(json_of(&out)["facts"].as_array().unwrap().len(), 2);
    let (code, out, _) = cli(&["keys", "list", "--account", &account.to_string()]);
    assert_eq!(code, Some(0));
    assert!(!out.contains(&key));
    let (code, out, _) = cli(&["credits", "audit"]);
    assert_eq!(code, Some(0));
    assert_eq!(json_of(&out)["consistent"], true);
    drop(sidecar);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buyer_limits_refuse_with_retry_after_and_spend_survives_a_restart() {
    let mut w = World::start("limits").await;
    let (account, key) = w.funded_key(10).await;
    // `limit buyer 2 requests per hour`, counted per prepaid account.
    for _ in 0..2 {
        assert_eq!(w.with_key("/limited/a", &key).await.status(), 200);
    }
    let response = w.with_key("/limited/a", &key).await;
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=3600).contains(&retry), "{retry}");
    expect_error(response, 429, "rate_limited").await;
    assert_eq!(w.balance(account).await, 8, "a refused call is not charged");
    let (_, other_key) = w.funded_key(10).await;
    assert_eq!(
        w.with_key("/limited/a", &other_key).await.status(),
        200,
        "another buyer has its own count"
    );

    // `limit buyer 0.015 USDC per day`: one 0.01 payment fits, a second does not.
    assert_eq!(
        w.pay_v2("/limited/b", &Tweak::default()).await.status(),
        200
    );
    let header = w.signed_v2("/limited/b", &Tweak::default()).await;
    let response = w.send_v2("/limited/b", &header).await;
    assert!(response.headers().contains_key("retry-after"));
    expect_error(response, 429, "spend_limit_exceeded").await;
    assert_eq!(w.facilitator.settled().len(), 1);

    // The day's spend is kept across a restart.
    w.sidecar.kill();
    w.sidecar = Sidecar::start(&w.dir, &w.upstream.url()).await;
    let response = w.send_v2("/limited/b", &header).await;
    expect_error(response, 429, "spend_limit_exceeded").await;
    // A payment the upstream did not serve is not counted: a different payer still fits once.
    assert_eq!(w.upstream.seen(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_buys_credits_with_x402_then_spends_them() {
    let w = World::start("buy-credits").await;
    let buy = |key: Option<String>| {
        let w = &w;
        async move {
            let (v2, _) = {
                let response = w
                    .http
                    .post(w.sidecar.url("/buy-credits"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 402);
                let v2 = super::harness::decode(
                    response.headers()["payment-required"].to_str().unwrap(),
                );
                (v2, ())
            };
            let header = w.wallet.pay_v2(&v2["accepts"][0], &Tweak::default());
            let mut request = w
                .http
                .post(w.sidecar.url("/buy-credits"))
                .header("payment-signature", header);
            if let Some(key) = key {
                request = request.header("x-api-key", key);
            }
            request.send().await.unwrap()
        }
    };
    // No key: a new account and key, shown once.
    let response = buy(None).await;
    assert_eq!(response.status(), 201);
    assert!(response.headers().contains_key("payment-response"));
    let sold: Value = response.json().await.unwrap();
    assert_eq!(
        (sold["credits"].as_str(), sold["balance"].as_str()),
        (Some("100"), Some("100"))
    );
    let key = sold["key"].as_str().unwrap().to_string();
    let account = sold["account"].as_u64().unwrap();
    assert_eq!(
        w.facilitator.settled().len(),
        1,
        "settled before the credits exist"
    );
    assert_eq!(w.upstream.seen(), 0, "tollgate answers purchases itself");

    // With a key: its account is topped up.
    let response = buy(Some(key.clone())).await;
    assert_eq!(response.status(), 200);
    let sold: Value = response.json().await.unwrap();
    assert_eq!(
        (sold["account"].as_u64(), sold["balance"].as_str()),
        (Some(account), Some("200"))
    );
    assert!(sold.get("key").is_none());

    // Spent on a prepaid route.
    let response = w.with_key("/credits", &key).await;
    assert_eq!(response.headers()["x-tollgate-credits-balance"], "195");
    let (_, usage) = w
        .admin("GET", &format!("/v1/accounts/{account}/usage"), None)
        .await;
    let reference = usage["facts"][0]["reference"].as_str().unwrap();
    assert!(reference.starts_with("x402:eip155:84532:0x"), "{reference}");

    // A bad key is refused before any money moves.
    let response = buy(Some("tg_bogus".into())).await;
    expect_error(response, 401, "api_key_invalid").await;
    assert_eq!(w.facilitator.settled().len(), 2);
    // A refused settlement grants nothing.
    w.facilitator
        .set_mode(super::harness::FacilitatorMode::Refuse);
    let response = buy(Some(key.clone())).await;
    expect_error(response, 402, "settlement_failed").await;
    assert_eq!(w.balance(account).await, 195);
    // Each settled sale has its top-up: the ledger's two books agree.
    let (status, report) = w.admin("GET", "/v1/ledger/verify", None).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["entries"], 3, "{report}");
}
