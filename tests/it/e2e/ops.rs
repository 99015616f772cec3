//! Operations: metrics that follow each kind of request, hot reload under load, SIGTERM under
//! load, the access log, and the idle memory footprint.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::harness::Tweak;
use super::{World, expect_error};

/// `/metrics` as series → value (`name{labels}` exactly as exposed).
async fn scrape(w: &World) -> BTreeMap<String, f64> {
    let response = w
        .http
        .get(w.sidecar.ops_url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = response.text().await.unwrap();
    let mut series = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample: {line}"));
        let name_ok = name.split('{').next().is_some_and(|n| {
            !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        });
        assert!(name_ok, "bad metric name in {line}");
        series.insert(
            name.to_string(),
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("bad value in {line}")),
        );
    }
    series
}

fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, series: &str) -> f64 {
    after.get(series).copied().unwrap_or(0.0) - before.get(series).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_every_kind_of_request() {
    let w = World::start("metrics").await;
    let (_, key) = w.funded_key(10).await;
    let before = scrape(&w).await;

    assert_eq!(w.get("/free/a").send().await.unwrap().status(), 200);
    assert_eq!(w.get("/internal/x").send().await.unwrap().status(), 403);
    assert_eq!(w.pay_v2("/paid/x", &Tweak::default()).await.status(), 200);
    assert_eq!(w.send_v2("/paid/y", "garbage").await.status(), 400);
    assert_eq!(w.with_key("/credits", &key).await.status(), 200);
    assert_eq!(
        w.with_key("/refundable/status/503", &key).await.status(),
        503
    );

    let after = scrape(&w).await;
    let d = |series: &str| delta(&before, &after, series);
    let requests = |route: &str, rail: &str, outcome: &str| {
        format!(
            r#"tollgate_requests_total{{outcome="{outcome}",rail="{rail}",route="{route}",service="e2e"}}"#
        )
    };
    assert_eq!(
        d(&requests("GET /free/**", "free", "free")),
        1.0,
        "{after:#?}"
    );
    assert_eq!(d(&requests("* /internal/**", "none", "route_denied")), 1.0);
    assert_eq!(
        d(&requests("* /paid/**", "none", "payment_required")),
        1.0,
        "the challenge the buyer read"
    );
    assert_eq!(d(&requests("* /paid/**", "x402", "x402")), 1.0);
    assert_eq!(d(&requests("* /paid/**", "none", "payment_malformed")), 1.0);
    assert_eq!(d(&requests("GET /credits", "prepaid", "prepaid")), 1.0);
    assert_eq!(d(r#"tollgate_challenges_total{route="* /paid/**"}"#), 1.0);
    assert_eq!(
        d(r#"tollgate_payments_verified_total{network="base-sepolia"}"#),
        1.0
    );
    assert_eq!(
        d(r#"tollgate_payments_rejected_total{reason="payment_malformed"}"#),
        1.0
    );
    assert_eq!(
        d(r#"tollgate_revenue_atomic_total{asset="USDC",network="base-sepolia"}"#),
        10_000.0
    );
    assert_eq!(d(r#"tollgate_settlements_total{result="settled"}"#), 1.0);
    assert_eq!(d("tollgate_credits_debited_total"), 8.0, "5 + 3");
    assert_eq!(d("tollgate_credits_refunded_total"), 3.0);
    assert_eq!(
        d("tollgate_verification_duration_seconds_count"),
        2.0,
        "the good and the garbage one"
    );
    assert_eq!(d("tollgate_settlement_duration_seconds_count"), 1.0);
    assert!(d("tollgate_upstream_duration_seconds_count") >= 4.0);
    assert_eq!(after.get("tollgate_settlement_queue_depth"), Some(&0.0));
    assert!(
        after
            .get("tollgate_store_size_bytes")
            .is_some_and(|b| *b > 0.0)
    );
    let version = w.admin("GET", "/v1/policy", None).await.1["version"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        after.get(&format!(
            r#"tollgate_policy_info{{service="e2e",version="{version}"}}"#
        )),
        Some(&1.0)
    );

    // No unbounded or secret value is ever a label.
    let text = w
        .http
        .get(w.sidecar.ops_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let payer = w.wallet.address().to_string();
    for secret in [
        payer.as_str(),
        &payer.to_lowercase(),
        &key,
        &key[..15],
        "account",
    ] {
        assert!(!text.contains(secret), "{secret} appears in /metrics");
    }
}

/// A policy with another price on `/paid/**`.
fn priced(w: &World, price: &str) -> String {
    super::policy(&w.facilitator.url()).replace(
        "price 0.01 USDC\n    description \"A paid thing\"",
        &format!("price {price} USDC\n    description \"A paid thing\""),
    )
}

async fn paid_amount(w: &World) -> String {
    let (v2, _) = w.challenge("/paid/x").await;
    v2["accepts"][0]["amount"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_reload_under_load_without_a_failed_request() {
    let w = Arc::new(World::start("reload").await);
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (w, stop, served, failed) = (w.clone(), stop.clone(), served.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let free = w.get("/free/x").send().await.map(|r| r.status().as_u16());
                let paid = w.get("/paid/x").send().await.map(|r| r.status().as_u16());
                if free.ok() == Some(200) && paid.ok() == Some(402) {
                    served.fetch_add(2, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    assert_eq!(paid_amount(&w).await, "10000");

    // A valid policy, through the admin API.
    std::fs::write(w.dir.join("policy.toll"), priced(&w, "0.02")).unwrap();
    let (status, reply) = w.admin("POST", "/v1/policy/reload", None).await;
    assert_eq!(
        (status, reply["reload"].as_str()),
        (200, Some("swapped")),
        "{reply:#}"
    );
    assert_eq!(paid_amount(&w).await, "20000");
    let (_, again) = w.admin("POST", "/v1/policy/reload", None).await;
    assert_eq!(again["reload"], "unchanged");

    // An invalid one is refused with its diagnostics; the old one keeps serving.
    std::fs::write(w.dir.join("policy.toll"), priced(&w, "0.0000001")).unwrap();
    let (status, reply) = w.admin("POST", "/v1/policy/reload", None).await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (422, Some("policy_invalid")),
        "{reply:#}"
    );
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains("error[too_many_decimals]"),
        "{reply:#}"
    );
    assert_eq!(paid_amount(&w).await, "20000");

    // The watcher sees a changed file by itself (as after a ConfigMap update).
    std::fs::write(w.dir.join("policy.toll"), priced(&w, "0.03")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while paid_amount(&w).await != "30000" {
        assert!(
            Instant::now() < deadline,
            "the watcher did not reload:\n{}",
            w.sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // SIGHUP reloads at once.
    std::fs::write(w.dir.join("policy.toll"), priced(&w, "0.04")).unwrap();
    w.sidecar.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while paid_amount(&w).await != "40000" {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload:\n{}",
            w.sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    assert!(served.load(Ordering::Relaxed) > 50, "the load ran");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no request failed during reloads"
    );
    let metrics = scrape(&w).await;
    assert!(metrics[r#"tollgate_policy_reloads_total{result="failed"}"#] >= 1.0);
    assert!(metrics[r#"tollgate_policy_reloads_total{result="ok"}"#] >= 3.0);
    let log = w.sidecar.log();
    assert!(
        log.contains("error[too_many_decimals]"),
        "a refused policy is logged with its diagnostics"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_no_accepted_request() {
    let mut w = World::start("drain").await;
    let mut in_flight = Vec::new();
    for n in 0..40 {
        let request = w.get(&format!("/free/slow/{}", 400 + n * 10)).send();
        in_flight.push(tokio::spawn(request));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    w.sidecar.signal("TERM");
    for request in in_flight {
        let response = request
            .await
            .unwrap()
            .expect("an accepted request got an answer");
        assert_eq!(response.status(), 200);
    }
    let status = tokio::task::spawn_blocking(move || w.sidecar.wait_exit(Duration::from_secs(20)))
        .await
        .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gets_one_access_log_line_with_its_id() {
    let w = World::start("access-log").await;
    let response = w
        .get("/paid/x")
        .header("x-request-id", "req-0123456789")
        .send()
        .await
        .unwrap();
    expect_error(response, 402, "payment_required").await;
    assert_eq!(
        w.get("/free/x")
            .header("x-request-id", "req-free-1")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = w.sidecar.log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("tollgate::access"))
            .collect();
        let paid = lines
            .iter()
            .filter(|l| l.contains("req-0123456789"))
            .count();
        let free = lines.iter().find(|l| l.contains("req-free-1"));
        if paid == 1
            && let Some(free) = free
        {
            assert!(
                free.contains("rail=\"free\"") || free.contains("rail=free"),
                "{free}"
            );
            assert!(
                lines
                    .iter()
                    .any(|l| l.contains("req-0123456789") && l.contains("payment_required"))
            );
            break;
        }
        assert!(Instant::now() < deadline, "no access line:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Lines logged by the work done for a request carry its id too (its span).
    w.facilitator
        .set_mode(super::harness::FacilitatorMode::Broken);
    let header = w.signed_v2("/paid/x", &Tweak::default()).await;
    let response = w
        .get("/paid/x")
        .header("payment-signature", header)
        .header("x-request-id", "req-broken-7")
        .send()
        .await
        .unwrap();
    expect_error(response, 503, "settlement_unavailable").await;
    let log = w.sidecar.log();
    assert!(
        log.lines()
            .any(|l| l.contains("settlement outcome unknown") && l.contains("req-broken-7")),
        "{log}"
    );
}

/// The kubelet updates a mounted ConfigMap by writing a new timestamped folder and swapping the
/// `..data` symlink atomically; the policy file itself is a symlink through `..data`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_symlink_swap_is_picked_up() {
    use std::os::unix::fs::symlink;
    let w = World::start("configmap").await;
    let dir = &w.dir;
    std::fs::create_dir(dir.join("..2026_11_21_01")).unwrap();
    std::fs::write(dir.join("..2026_11_21_01/policy.toll"), priced(&w, "0.01")).unwrap();
    symlink("..2026_11_21_01", dir.join("..data")).unwrap();
    std::fs::remove_file(dir.join("policy.toll")).unwrap();
    symlink("..data/policy.toll", dir.join("policy.toll")).unwrap();
    assert_eq!(paid_amount(&w).await, "10000");

    std::fs::create_dir(dir.join("..2026_11_21_02")).unwrap();
    std::fs::write(dir.join("..2026_11_21_02/policy.toll"), priced(&w, "0.05")).unwrap();
    symlink("..2026_11_21_02", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(dir.join("..2026_11_21_01")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while paid_amount(&w).await != "50000" {
        assert!(
            Instant::now() < deadline,
            "the swap was not picked up:\n{}",
            w.sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The sidecar's resident memory in KiB, from `/proc/<pid>/status`.
pub(super) fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_sidecar_stays_under_50_mib() {
    // Caught a real regression: mimalloc with transparent huge pages idled at 55 MiB.
    let w = World::start("idle-rss").await;
    let response = w.get("/free/warm").send().await.unwrap();
    assert_eq!(response.status(), 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let kib = resident_kib(w.sidecar.child.id());
    assert!(kib < 50 * 1024, "idle RSS is {kib} KiB");
}
