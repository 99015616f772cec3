//! `tollgate ledger …` against a store populated through the library: listings, the bundle
//! summary, the reconciliation export (CSV read back by Python's `csv` module, JSON totals
//! against the rows) and `verify`, also on a store broken on purpose.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use alloy::primitives::{Address, B256};
use serde_json::Value;
use tollgate::store::ledger::{Authorization, Bundle, Change, Detail, Entry, State, Timing};
use tollgate::store::{NonceKey, Store};

const T0: u64 = 1_796_040_000; // 2026-11-30T12:00:00Z
const RATES: &str = "currency,rate,source,as_of\r\nEUR,0.9234,\"ECB reference rate, daily\",2026-11-30\r\nGBP,0.7891,BoE,2026-11-30\r\n";

fn scratch() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tollgate-ledger-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tollgate.yaml"), "store: data\n").unwrap();
    std::fs::write(dir.join("rates.csv"), RATES).unwrap();
    dir
}

fn tollgate(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .current_dir(dir)
        .env_remove("TOLLGATE_CONFIG")
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

fn ok_json(dir: &Path, args: &[&str]) -> Value {
    let o = tollgate(dir, args);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn payer(n: u8) -> Address {
    Address::repeat_byte(0x10 + n)
}

/// Entry `i` (from 1): payer i % 3, route by parity, amounts that are not round.
fn draft(i: u64) -> (NonceKey, Entry) {
    let n = u8::try_from(i % 3).unwrap();
    let key = NonceKey {
        chain_id: 84532,
        asset: Address::repeat_byte(1),
        from: payer(n),
        nonce: B256::from(alloy::primitives::U256::from(i)),
    };
    let route = if i.is_multiple_of(2) {
        "GET /v1/forecast/{city}"
    } else {
        "POST /v1/reports"
    };
    let entry = Entry {
        seq: 0,
        at: T0 + i * 60,
        request_id: format!("req-{i}"),
        service: "weather".into(),
        route: route.into(),
        method: route.split(' ').next().unwrap().into(),
        path: format!("/v1/forecast/city-{i}"),
        payer: key.from,
        rail: "x402".into(),
        amount: 1_000 + u128::from(i) * 1_234,
        asset: key.asset,
        symbol: "USDC".into(),
        decimals: 6,
        network: "base-sepolia".into(),
        chain_id: 84532,
        pay_to: Address::repeat_byte(3),
        nonce: key.nonce,
        valid_after: 0,
        valid_before: T0 + 86_400,
        timing: Timing::Deferred {
            every_secs: Some(60),
            payments: Some(4),
            value: None,
        },
        backend: "https://x402.org/facilitator".into(),
        unsettled_held: false,
        sale_account: None,
        credits: None,
    };
    (key, entry)
}

/// `n` entries; 1..=4 submitted in bundle 1 (1–3 confirmed, 4 failed with an awkward reason),
/// 5 queued, the rest recorded. The store is closed when this returns.
fn populate(dir: &Path, n: u64) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = Store::open(&dir.join("data")).unwrap();
        let auth = Authorization {
            version: 2,
            payload: serde_json::json!({}),
            requirements: serde_json::json!({}),
        };
        let mut total = 0;
        for i in 1..=n {
            let (key, entry) = draft(i);
            if i <= 4 {
                total += entry.amount;
            }
            store.record_payment(&key, entry, &auth).await.unwrap();
        }
        let bundle = Bundle {
            id: 0,
            at: 0,
            backend: "https://x402.org/facilitator".into(),
            network: "base-sepolia".into(),
            asset: Address::repeat_byte(1),
            symbol: "USDC".into(),
            decimals: 6,
            pay_to: Address::repeat_byte(3),
            entries: vec![1, 2, 3, 4],
            total,
            closed_by: "count".into(),
        };
        store
            .submit_bundle(bundle, T0 + 3_600)
            .await
            .unwrap()
            .unwrap();
        let mut changes: Vec<Change> = (1..=3)
            .map(|entry| Change {
                entry,
                state: State::Confirmed,
                detail: Detail {
                    tx: Some(format!("0x{entry:064x}")),
                    block: Some(1_000 + entry),
                    ..Detail::default()
                },
            })
            .collect();
        changes.push(Change {
            entry: 4,
            state: State::Failed,
            detail: Detail {
                reason: Some(
                    "transfer reverted: \"insufficient funds\", payer short\r\nby 1".into(),
                ),
                ..Detail::default()
            },
        });
        changes.push(Change {
            entry: 5,
            state: State::Queued,
            detail: Detail::default(),
        });
        store
            .record_changes(&changes, T0 + 3_700, true)
            .await
            .unwrap()
            .unwrap();
        let account = store.create_account("acme", T0).await.unwrap();
        store
            .top_up(account.id, 100, "inv-1", T0)
            .await
            .unwrap()
            .unwrap();
        store.flush().unwrap();
    });
}

#[test]
fn list_filters_and_pages() {
    let dir = scratch();
    populate(&dir, 12);
    let all = ok_json(&dir, &["ledger", "list"]);
    assert_eq!(all["entries"].as_array().unwrap().len(), 12);
    assert_eq!(all["next_after"], Value::Null);

    let page = ok_json(&dir, &["ledger", "list", "--limit", "5"]);
    let seqs: Vec<u64> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    assert_eq!(page["next_after"], 5);
    let next = ok_json(&dir, &["ledger", "list", "--limit", "5", "--after", "5"]);
    assert_eq!(next["entries"][0]["seq"], 6);

    let confirmed = ok_json(&dir, &["ledger", "list", "--state", "confirmed"]);
    assert_eq!(confirmed["entries"].as_array().unwrap().len(), 3);
    assert_eq!(
        confirmed["entries"][0]["status"]["tx"],
        format!("0x{:064x}", 1)
    );

    let buyer = payer(1).to_string();
    let by_buyer = ok_json(&dir, &["ledger", "list", "--buyer", &buyer]);
    assert!(
        by_buyer["entries"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["payer"] == buyer.as_str())
    );
    assert_eq!(by_buyer["entries"].as_array().unwrap().len(), 4);

    let by_route = ok_json(
        &dir,
        &["ledger", "list", "--route", "GET /v1/forecast/{city}"],
    );
    assert_eq!(by_route["entries"].as_array().unwrap().len(), 6);

    // 12:03 (RFC 3339, inclusive) to 12:06 (Unix seconds, exclusive): entries 3, 4 and 5.
    let range = ok_json(
        &dir,
        &[
            "ledger",
            "list",
            "--from",
            "2026-11-30T13:03:00+01:00",
            "--to",
            &(T0 + 360).to_string(),
        ],
    );
    let seqs: Vec<u64> = range["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [3, 4, 5]);

    let in_bundle = ok_json(
        &dir,
        &["ledger", "list", "--bundle", "1", "--state", "failed"],
    );
    assert_eq!(in_bundle["entries"][0]["seq"], 4);

    let bad = tollgate(&dir, &["ledger", "list", "--state", "paid"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("not a state"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let bad = tollgate(&dir, &["ledger", "list", "--from", "last tuesday"]);
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn show_gives_an_entry_its_whole_history() {
    let dir = scratch();
    populate(&dir, 6);
    let shown = ok_json(&dir, &["ledger", "show", "4"]);
    assert_eq!(shown["entry"]["seq"], 4);
    assert_eq!(shown["status"]["state"], "failed");
    let states: Vec<&str> = shown["facts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["recorded", "submitted", "failed"]);
    assert_eq!(shown["facts"][1]["bundle"], 1);
    let missing = tollgate(&dir, &["ledger", "show", "99"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("error[payment_not_found]"));
}

#[test]
fn a_bundle_summary_adds_up_to_its_rows() {
    let dir = scratch();
    populate(&dir, 6);
    let list = ok_json(&dir, &["ledger", "bundles"]);
    assert_eq!(list["bundles"].as_array().unwrap().len(), 1);
    let summary = ok_json(&dir, &["ledger", "bundle", "1"]);
    let rows = summary["entries"].as_array().unwrap();
    let sum: u128 = rows
        .iter()
        .map(|r| r["amount"].as_str().unwrap().parse::<u128>().unwrap())
        .sum();
    assert_eq!(summary["count"], 4);
    assert_eq!(summary["total_atomic"], sum.to_string());
    assert_eq!(summary["bundle"]["total"], sum.to_string());
    assert_eq!(summary["consistent"], true);
    assert_eq!(summary["by_state"]["confirmed"]["count"], 3);
    assert_eq!(summary["by_state"]["failed"]["count"], 1);
    let by_state: u128 = ["confirmed", "failed"]
        .iter()
        .map(|s| {
            summary["by_state"][s]["amount_atomic"]
                .as_str()
                .unwrap()
                .parse::<u128>()
                .unwrap()
        })
        .sum();
    assert_eq!(by_state, sum);
    assert_eq!(
        tollgate(&dir, &["ledger", "bundle", "2"]).status.code(),
        Some(1)
    );
}

/// Python's `csv` module in strict mode: the export's rows, fiat amounts recomputed with
/// `decimal.Decimal`, totals per state.
const CHECK_CSV: &str = r#"
import csv, decimal, json, sys
decimal.getcontext().prec = 200
with open(sys.argv[1], newline="") as f:
    raw = f.read()
assert raw.endswith("\r\n")
rows = list(csv.DictReader(raw.splitlines(keepends=True), strict=True))
out = {"count": len(rows), "header": list(rows[0].keys()), "reasons": [r["reason"] for r in rows if r["reason"]]}
totals = {}
for r in rows:
    amount = decimal.Decimal(r["amount"])
    assert amount == decimal.Decimal(r["amount_atomic"]) / 10**6, r
    fiat = amount * decimal.Decimal(r["rate"])
    assert decimal.Decimal(r["fiat_amount"]) == fiat, (r["fiat_amount"], fiat)
    t = totals.setdefault(r["state"], [0, 0, decimal.Decimal(0)])
    t[0] += 1; t[1] += int(r["amount_atomic"]); t[2] += decimal.Decimal(r["fiat_amount"])
out["totals"] = {k: [v[0], str(v[1]), str(v[2].normalize())] for k, v in totals.items()}
print(json.dumps(out))
"#;

#[test]
fn the_csv_export_opens_as_is_and_its_fiat_is_exact() {
    let dir = scratch();
    populate(&dir, 30);
    let o = tollgate(
        &dir,
        &[
            "ledger",
            "export",
            "--format",
            "csv",
            "--rates",
            "rates.csv",
            "--output",
            "out.csv",
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("exported 30 entries with EUR at 0.9234"));
    assert!(!dir.join("out.csv.partial").exists());
    let checked = Command::new("python3")
        .arg("-c")
        .arg(CHECK_CSV)
        .arg(dir.join("out.csv"))
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    let checked: Value = serde_json::from_slice(&checked.stdout).unwrap();
    assert_eq!(checked["count"], 30);
    let header: Vec<&str> = checked["header"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    let mut expected: Vec<&str> = tollgate::ledger::export::COLUMNS.to_vec();
    expected.extend(tollgate::ledger::export::FIAT_COLUMNS);
    assert_eq!(header, expected);
    assert_eq!(
        checked["reasons"][0],
        "transfer reverted: \"insufficient funds\", payer short\r\nby 1"
    );

    // The JSON export of the same range: its totals are the CSV's rows summed.
    let json = ok_json(
        &dir,
        &[
            "ledger",
            "export",
            "--format",
            "json",
            "--rates",
            "rates.csv",
        ],
    );
    assert_eq!(json["currency"], "EUR");
    assert_eq!(json["rate"]["rate"], "0.9234");
    assert_eq!(json["rate"]["source"], "ECB reference rate, daily");
    assert_eq!(json["count"], 30);
    assert_eq!(json["rows"].as_array().unwrap().len(), 30);
    for total in json["totals"].as_array().unwrap() {
        let state = total["state"].as_str().unwrap();
        let from_csv = &checked["totals"][state];
        assert_eq!(total["count"], from_csv[0], "{state}");
        assert_eq!(total["amount_atomic"], from_csv[1], "{state}");
        assert_eq!(total["fiat_amount"], from_csv[2], "{state}");
        let rows: u128 = json["rows"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["state"] == state)
            .map(|r| {
                r["amount_atomic"]
                    .as_str()
                    .unwrap()
                    .parse::<u128>()
                    .unwrap()
            })
            .sum();
        assert_eq!(total["amount_atomic"], rows.to_string());
    }
    let row = &json["rows"][0];
    assert_eq!(row["recorded_at"], "2026-11-30T12:01:00Z");
    assert_eq!(row["settled_at"], "2026-11-30T13:01:40Z");
    assert_eq!(row["block"], 1_001);
    assert_eq!(row["bundle"], 1);
    assert_eq!(row["amount"], "0.002234");
    assert_eq!(row["fiat_amount"], "0.0020628756");
}

#[test]
fn an_export_without_rates_has_no_fiat_and_keeps_to_its_range() {
    let dir = scratch();
    populate(&dir, 10);
    let o = tollgate(
        &dir,
        &[
            "ledger",
            "export",
            "--from",
            "2026-11-30T12:05:00Z",
            "--to",
            "2026-11-30T12:08:00Z",
        ],
    );
    assert_eq!(o.status.code(), Some(0));
    let text = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<&str> = text.split("\r\n").collect();
    assert_eq!(lines[0], tollgate::ledger::export::COLUMNS.join(","));
    assert_eq!(lines.len(), 5, "{text}"); // header, entries 5–7, and the empty tail
    assert!(lines[1].starts_with("5,2026-11-30T12:05:00Z,req-5,weather,POST /v1/reports,POST,"));
    assert!(lines[1].contains(",queued,,,,,,"), "{}", lines[1]);
}

#[test]
fn a_bad_rate_table_names_its_file_and_line() {
    let dir = scratch();
    populate(&dir, 6);
    std::fs::write(
        dir.join("bad.csv"),
        "currency,rate,source,as_of\nEUR,0.92,ECB,2026-11-30\nGBP,\"0,79\",BoE,2026-11-30\n",
    )
    .unwrap();
    let o = tollgate(&dir, &["ledger", "export", "--rates", "bad.csv"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("bad.csv:3: the rate `0,79` of GBP is not an exact decimal"),
        "{err}"
    );
    let o = tollgate(
        &dir,
        &[
            "ledger",
            "export",
            "--rates",
            "rates.csv",
            "--currency",
            "chf",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("rates.csv: no rate for CHF (the table has EUR, GBP)")
    );
    assert!(o.stdout.is_empty());
}

#[test]
fn verify_passes_sound_books_and_names_each_break() {
    let dir = scratch();
    populate(&dir, 8);
    let o = tollgate(&dir, &["ledger", "verify"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(
        out.contains("payment ledger: 8 entries, 17 facts, 1 bundle"),
        "{out}"
    );
    assert!(
        out.contains("confirmed 3") && out.contains("failed 1") && out.contains("queued 1"),
        "{out}"
    );
    assert!(out.contains("ok: every invariant holds"), "{out}");
    let report = ok_json(&dir, &["ledger", "verify", "--json"]);
    assert_eq!(report["consistent"], true);
    assert_eq!(report["unsettled"][0]["count"], 4);

    // Break it: entry 6 disappears, bundle 1's total is off by one.
    {
        let db = sled::open(dir.join("data")).unwrap();
        db.open_tree("payments")
            .unwrap()
            .remove(6u64.to_be_bytes())
            .unwrap();
        let bundles = db.open_tree("bundles").unwrap();
        let mut bundle: Value =
            serde_json::from_slice(&bundles.get(1u64.to_be_bytes()).unwrap().unwrap()).unwrap();
        let total: u128 = bundle["total"].as_str().unwrap().parse().unwrap();
        bundle["total"] = Value::String((total + 1).to_string());
        bundles
            .insert(1u64.to_be_bytes(), serde_json::to_vec(&bundle).unwrap())
            .unwrap();
        db.flush().unwrap();
    }
    let o = tollgate(&dir, &["ledger", "verify"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("[entry_gap] entry 6 is missing"), "{out}");
    assert!(out.contains("[bundle_total] bundle 1's total is"), "{out}");
    let report: Value =
        serde_json::from_slice(&tollgate(&dir, &["ledger", "verify", "--json"]).stdout).unwrap();
    assert_eq!(report["consistent"], false);
    let kinds: Vec<&str> = report["breaks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"entry_gap") && kinds.contains(&"bundle_total"),
        "{kinds:?}"
    );
}
