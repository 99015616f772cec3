//! The logs hold no secret at any level, and client mistakes cannot flood them (README "Logs",
//! `src/logging.rs`): the real binary at `trace` — where Pingora prints every request head and
//! body — gets every kind of secret a client or an operator sends, in good and malformed
//! requests, then the whole log is searched for them.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use super::World;
use super::harness::{self, Facilitator, Launch, Tweak, Upstream};

/// The prepaid key header of these tests' policy: a name no built-in list of secrets knows.
const KEY_HEADER: &str = "x-acme-credential";

/// The e2e policy with [`KEY_HEADER`] as its prepaid header; `x-api-key` is then an ordinary
/// header, forwarded to the upstream (which echoes it back in its body).
fn policy(facilitator: &str) -> String {
    let policy = super::policy(facilitator);
    let prepaid = "accept prepaid header \"x-api-key\"";
    assert!(policy.contains(prepaid));
    policy.replace(prepaid, &format!("accept prepaid header \"{KEY_HEADER}\""))
}

/// A secret no other request in the run uses.
fn unique(label: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{label}{nanos:x}")
}

/// The policy with [`KEY_HEADER`], served by a sidecar started as `launch` says.
async fn world(name: &str, launch: Launch<'_>) -> World {
    let upstream = Upstream::start().await;
    let url = upstream.url();
    let facilitator = Facilitator::start().await;
    World::launch_policy(name, upstream, facilitator, &url, launch, policy).await
}

/// Writes `bytes` on a fresh connection and closes it without reading (a client that gives
/// up mid-request); with `reset`, the close is an RST.
async fn send_and_leave(port: u16, bytes: &[u8], reset: bool) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream.write_all(bytes).await.unwrap();
    if reset {
        stream.set_zero_linger().unwrap();
    }
    drop(stream);
}

/// The `payload.signature` inside an x402 header.
fn signature(header: &str) -> String {
    harness::decode(header)["payload"]["signature"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Sends every kind of secret tollgate sees, in requests good and malformed; returns them.
async fn send_secrets(w: &World) -> Vec<String> {
    let mut secrets = Vec::new();

    // The admin API: the right token (opening an account and issuing a key, shown in the
    // answer's body) and a wrong guess.
    let token = w.sidecar.admin_token().trim().to_string();
    let (_, key) = w.funded_key(10).await;
    let wrong_token = unique("wrong-admin-token-");
    let response = w
        .http
        .get(w.sidecar.admin_url("/v1/audit"))
        .bearer_auth(&wrong_token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);

    // Prepaid: the key in the policy's header, a wrong key-shaped guess, a wrong anything.
    let send_key = |value: String| {
        let request = w.get("/credits").header(KEY_HEADER, value);
        async move { request.send().await.unwrap().status() }
    };
    assert_eq!(send_key(key.clone()).await, 200);
    let guess = format!("tg_{}", unique("feed"));
    assert_eq!(send_key(guess.clone()).await, 401);
    let not_a_key = unique("not-a-key-");
    assert_eq!(send_key(not_a_key.clone()).await, 401);

    // What a client sends its upstream: an API key, a cookie, credentials, a token in the
    // query. The upstream echoes the headers it got in its body, which Pingora prints at
    // trace too.
    let cookie = unique("cookie-");
    let bearer = unique("client-bearer-");
    let basic = base64::engine::general_purpose::STANDARD.encode(unique("user:password-"));
    let in_query = unique("query-token-");
    let response = w
        .get(&format!("/free/secrets?token={in_query}&page=2"))
        .header("x-api-key", &key)
        .header("cookie", format!("session={cookie}; theme=dark"))
        .header("authorization", format!("Bearer {bearer}"))
        .header("proxy-authorization", format!("Basic {basic}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echoed: Value = response.json().await.unwrap();
    assert_eq!(echoed["headers"]["x-api-key"].as_str(), Some(key.as_str()));

    // x402, v2 and v1.
    let v2 = w.signed_v2("/paid/v2", &Tweak::default()).await;
    assert_eq!(w.send_v2("/paid/v2", &v2).await.status(), 200);
    let (_, challenge) = w.challenge("/paid/v1").await;
    let v1 = w.wallet.pay_v1(&challenge["accepts"][0], &Tweak::default());
    let response = w
        .get("/paid/v1")
        .header("x-payment", &v1)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // Buying credits: the new key is in tollgate's own answer.
    let response = w
        .http
        .post(w.sidecar.url("/buy-credits"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 402);
    let offer = harness::decode(response.headers()["payment-required"].to_str().unwrap());
    let purchase = w.wallet.pay_v2(&offer["accepts"][0], &Tweak::default());
    let response = w
        .http
        .post(w.sidecar.url("/buy-credits"))
        .header("payment-signature", &purchase)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let sold: Value = response.json().await.unwrap();
    let sold_key = sold["key"].as_str().unwrap().to_string();

    // Malformed requests carrying secrets: a bad header, a request cut short, a body.
    let malformed_key = unique("malformed-key-");
    let answer = harness::raw_request(
        w.sidecar.port,
        format!(
            "GET /credits HTTP/1.1\r\nHost: x\r\n{KEY_HEADER}: {malformed_key}\r\nContent-Length: nope\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let cut_cookie = unique("cut-cookie-");
    send_and_leave(
        w.sidecar.port,
        format!("GET /credits HTTP/1.1\r\nHost: x\r\nCookie: {cut_cookie}\r\n").as_bytes(),
        false,
    )
    .await;
    send_and_leave(
        w.sidecar.admin_port,
        format!("GET /v1/audit HTTP/1.1\r\nAuthorization: Bearer {token}\r\n").as_bytes(),
        true,
    )
    .await;
    let body_secret = unique("body-secret-");
    let body = format!("{{\"password\":\"{body_secret}\",\"key\":\"{key}\"}}");
    let answer = harness::raw_request(
        w.sidecar.port,
        format!(
            "POST /echo/body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(&body_secret), "{answer}");
    // A relayer key pasted into the policy: the reload is refused with diagnostics that quote
    // the policy, and the refusal is logged.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let relayer_key = format!("{nanos:032x}{:032x}", nanos.rotate_left(64));
    let facilitator = format!("settle via facilitator \"{}\"", w.facilitator.url());
    let pasted = policy(&w.facilitator.url()).replace(
        &facilitator,
        &format!("settle via rpc \"http://127.0.0.1:8545\" relayer 0x{relayer_key}"),
    );
    std::fs::write(w.dir.join("policy.toll"), pasted).unwrap();
    let (status, reply) = w.admin("POST", "/v1/policy/reload", None).await;
    let message = reply["message"].as_str().unwrap_or_default();
    assert_eq!(status, 422, "{reply:#}");
    assert!(
        message.contains("inline_secret") && message.contains(&relayer_key),
        "{reply:#}"
    );
    std::fs::write(w.dir.join("policy.toll"), policy(&w.facilitator.url())).unwrap();

    // Give Pingora time to log the connections that were left.
    tokio::time::sleep(Duration::from_millis(300)).await;

    secrets.extend([
        key.clone(),
        key[15..].to_string(),
        token,
        wrong_token,
        guess,
        not_a_key,
        cookie,
        bearer,
        basic,
        in_query,
        v2.clone(),
        signature(&v2),
        v1.clone(),
        signature(&v1),
        purchase.clone(),
        signature(&purchase),
        sold_key.clone(),
        sold_key[15..].to_string(),
        malformed_key,
        cut_cookie,
        body_secret,
        relayer_key,
    ]);
    secrets
}

/// The log holds Pingora's trace lines (so there was something to leak) and none of
/// `secrets`.
fn assert_clean(log: &str, secrets: &[String], trace_marker: &str) {
    let traced = log
        .lines()
        .filter(|line| line.contains(trace_marker) && line.contains("pingora"))
        .count();
    assert!(
        traced > 20,
        "Pingora's trace lines are in the log ({traced}):\n{log}"
    );
    assert!(
        log.lines()
            .any(|line| line.contains("pingora_proxy") && line.contains("Request header")),
        "Pingora's request header dumps are in the log:\n{log}"
    );
    let leaks: Vec<String> = secrets
        .iter()
        .filter_map(|secret| {
            let line = log.lines().find(|line| line.contains(secret.as_str()))?;
            Some(format!("{secret}\n    in: {line}"))
        })
        .collect();
    assert!(
        leaks.is_empty(),
        "{} of {} secrets reached the log:\n{}",
        leaks.len(),
        secrets.len(),
        leaks.join("\n")
    );
    assert!(
        log.contains(tollgate::logging::REDACTED),
        "something was redacted:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_log_at_trace_level() {
    let launch = Launch {
        level: "trace",
        ..Launch::default()
    };
    let w = world("secrets-trace", launch).await;
    let secrets = send_secrets(&w).await;
    assert_clean(&w.sidecar.log(), &secrets, " TRACE ");
}

/// The level from `RUST_LOG` (which wins over the config's `info`), the JSON format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_log_with_rust_log_trace_in_json() {
    // `RUST_LOG` wins over the config's `info`.
    let launch = Launch {
        format: "json",
        env: &[("RUST_LOG", "trace")],
        ..Launch::default()
    };
    let w = world("secrets-rust-log", launch).await;
    let secrets = send_secrets(&w).await;
    let log = w.sidecar.log();
    for line in log.lines() {
        assert!(
            serde_json::from_str::<Value>(line).is_ok(),
            "every line is JSON: {line}"
        );
    }
    assert_clean(&log, &secrets, "\"level\":\"TRACE\"");
}

/// 200 malformed or abandoned requests: heads cut short are dropped by the listener without
/// a word; a body cut short reaches Pingora, which logs it as an error; they are the
/// client's, so they come out as a few warnings and a count of the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_client_mistakes_logs_no_error_and_few_warnings() {
    let w = World::start("secrets-flood").await;
    let (port, admin_port) = (w.sidecar.port, w.sidecar.admin_port);
    let started = Instant::now();
    let mut clients = Vec::new();
    for i in 0..200 {
        clients.push(tokio::spawn(async move {
            match i % 4 {
                // A head cut short, then gone.
                0 => send_and_leave(port, b"GET /free/x HTTP/1.1\r\nHost: x\r\n", false).await,
                // The same, reset.
                1 => send_and_leave(port, b"GET /free/x HTTP/1.1\r\nHost: x\r\n", true).await,
                // The admin API, cut short (the listener drops it without a word), and a
                // body cut short (Pingora's proxy sees that one).
                2 if i % 8 == 2 => {
                    send_and_leave(admin_port, b"GET /v1/audit HTTP/1.1\r\n", true).await
                }
                2 => {
                    let cut =
                        b"POST /echo/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc";
                    send_and_leave(port, cut, true).await
                }
                // Not HTTP at all; the answer is read.
                _ => {
                    let answer = harness::raw_request(port, b"\x16\x03\x01 not http\r\n\r\n").await;
                    assert!(
                        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
                        "{answer}"
                    );
                }
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    let flood = started.elapsed();
    // The rate limit reports what it suppressed once a second.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    // The sidecar still serves.
    assert_eq!(w.get("/free/after").send().await.unwrap().status(), 200);
    let log = w.sidecar.log();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert!(errors.is_empty(), "client mistakes are not errors:\n{log}");
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ")).collect();
    let from_pingora = warnings.iter().filter(|l| l.contains("pingora")).count();
    assert!(
        from_pingora > 0,
        "the mistakes are logged, as warnings:\n{log}"
    );
    // At most BURST lines per call site (two or three here) and second, plus one count per
    // site and second.
    let windows = flood.as_secs() + 2;
    let bound = 3 * u64::from(tollgate::logging::BURST) * windows + 3 * (windows + 1);
    assert!(
        (warnings.len() as u64) <= bound,
        "{} warnings for 200 mistakes in {flood:?} (at most {bound}):\n{log}",
        warnings.len()
    );
    assert!(
        log.contains("suppressed client-error log lines"),
        "what was suppressed is counted:\n{log}"
    );
}
