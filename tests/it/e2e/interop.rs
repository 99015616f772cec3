//! The official x402 clients paying tollgate: `@x402/fetch` 2.27 (v2, `PAYMENT-SIGNATURE`) and
//! the legacy `x402-fetch` 1.2 (v1, `X-PAYMENT`, strict zod parsing of the 402 body), run with
//! Node from `tests/interop/` (versions pinned in its `package-lock.json`; `npm ci` runs once
//! when `node_modules` is missing).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

use super::World;

/// Installs the pinned clients once per test run.
fn interop_dir() -> PathBuf {
    static READY: OnceLock<PathBuf> = OnceLock::new();
    READY
        .get_or_init(|| {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop");
            if !dir.join("node_modules/@x402/fetch").is_dir() {
                let status = Command::new("npm")
                    .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                    .current_dir(&dir)
                    .status()
                    .expect("npm is needed for the interop tests (Node 20)");
                assert!(status.success(), "npm ci in tests/interop failed");
            }
            dir
        })
        .clone()
}

/// Runs `node pay.mjs` off the async runtime; returns its JSON report.
async fn pay(url: String, client: &'static str, key: String) -> Value {
    let dir = interop_dir();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .args(["pay.mjs", &url, client, &key])
            .current_dir(dir)
            .output()
            .expect("node")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!(
            "{client}: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn key(w: &World) -> String {
    format!("0x{}", alloy::hex::encode(w.wallet.signer.to_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_v2_client_pays_and_gets_the_resource() {
    let w = World::start("interop-v2").await;
    let report = pay(w.sidecar.url("/paid/report"), "v2", key(&w)).await;
    assert_eq!(report["status"], 200, "{report:#}");
    assert_eq!(report["receipt"]["success"], true, "{report:#}");
    assert_eq!(report["receipt"]["network"], "eip155:84532");
    assert_eq!(
        report["receipt"]["payer"],
        w.wallet.address().to_checksum(None)
    );
    let seen: Value = serde_json::from_str(report["body"].as_str().unwrap()).unwrap();
    assert_eq!(seen["headers"]["x-tollgate-rail"], "x402");
    let settled = w.facilitator.settled();
    assert_eq!((settled.len(), settled[0].x402_version), (1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_legacy_v1_client_pays_and_gets_the_resource() {
    let w = World::start("interop-v1").await;
    let report = pay(w.sidecar.url("/paid/report"), "legacy-v1", key(&w)).await;
    assert_eq!(report["status"], 200, "{report:#}");
    assert_eq!(report["legacyReceipt"]["success"], true, "{report:#}");
    assert_eq!(report["legacyReceipt"]["network"], "base-sepolia");
    let settled = w.facilitator.settled();
    assert_eq!((settled.len(), settled[0].x402_version), (1, 1));
}
