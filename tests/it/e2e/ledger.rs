//! The ledger through a running sidecar's admin API: the export streams (chunked) and takes a
//! rate table as its body; `tollgate ledger …` reaches it when the sidecar holds the store.

use std::process::Command;

use serde_json::Value;

use super::World;
use super::harness::Tweak;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_through_the_admin_api_and_the_cli() {
    let w = World::start("ledger-api").await;
    // Whatever the proxy records for a paid request is what the export and verify see.
    let _ = w.pay_v2("/paid/report", &Tweak::default()).await;
    let token = w.sidecar.admin_token();

    let response = w
        .http
        .get(w.sidecar.admin_url("/v1/ledger/export?format=csv"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["transfer-encoding"], "chunked");
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let text = response.text().await.unwrap();
    assert!(text.starts_with("seq,recorded_at,request_id,"), "{text}");
    assert!(text.ends_with("\r\n"));

    let refused = w
        .http
        .post(
            w.sidecar
                .admin_url("/v1/ledger/export?format=json&currency=EUR"),
        )
        .bearer_auth(&token)
        .body("currency,rate,source,as_of\nEUR,0.9e0,ECB,2026-11-30\n")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "rate_table_invalid");
    assert!(body["message"].as_str().unwrap().contains(":2:"), "{body}");

    let unauthorized = w
        .http
        .get(w.sidecar.admin_url("/v1/ledger/export"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);

    // The CLI finds the store held and goes through the API: same answers.
    std::fs::write(
        w.dir.join("rates.csv"),
        "currency,rate,source,as_of\nEUR,0.9234,ECB,2026-11-30\n",
    )
    .unwrap();
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(args)
            .current_dir(&w.dir)
            .env_remove("TOLLGATE_CONFIG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), out.stdout, stderr)
    };
    let (code, out, err) = cli(&[
        "ledger",
        "export",
        "--format",
        "json",
        "--rates",
        "rates.csv",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let export: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(export["rate"]["rate"], "0.9234");
    let rows = export["rows"].as_array().unwrap();
    assert_eq!(export["count"], rows.len());
    let (code, out, err) = cli(&["ledger", "list"]);
    assert_eq!(code, Some(0), "{err}");
    let list: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(list["entries"].as_array().unwrap().len(), rows.len());
    let (code, out, err) = cli(&["ledger", "verify", "--json"]);
    let report: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(code, Some(0), "{err}{report:#}");
    assert_eq!(report["consistent"], true);
}
