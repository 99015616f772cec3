//! The payment ledger's write cost per entry: `record_payment` claims the nonce and writes the
//! entry, its authorization, its `recorded` fact, status and open index in one sled
//! transaction, then waits for the group commit's fsync. Alone, each entry pays a whole fsync;
//! with N concurrent writers the fsync is shared (group commit), which the `N concurrent`
//! cases show per entry.
//!
//! Then, once (not a criterion loop): an export of `TOLLGATE_BENCH_EXPORT` entries (default
//! 1,000,000) to CSV and JSON, written to a sink, with the store's bytes per entry on disk.
//! Set `TOLLGATE_BENCH_EXPORT=0` to skip it. Run: `cargo bench --bench ledger`.

use std::hint::black_box;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use alloy::primitives::{Address, B256, U256};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tollgate::ledger::export::{Format, export};
use tollgate::ledger::rates::RateTable;
use tollgate::store::ledger::{Authorization, Entry, Query, Timing};
use tollgate::store::{NonceKey, Store};

static NEXT: AtomicU64 = AtomicU64::new(1);

fn draft() -> (NonceKey, Entry) {
    let i = NEXT.fetch_add(1, Ordering::Relaxed);
    let key = NonceKey {
        chain_id: 84532,
        asset: Address::repeat_byte(1),
        from: Address::repeat_byte(2),
        nonce: B256::from(U256::from(i)),
    };
    let entry = Entry {
        seq: 0,
        at: 1_796_040_000 + i / 100,
        request_id: format!("01JDQ8Z5X7K2M4N6P8R0T{i:08}"),
        service: "weather".into(),
        route: "GET /v1/forecast/{city}".into(),
        method: "GET".into(),
        path: "/v1/forecast/paris".into(),
        payer: key.from,
        rail: "x402".into(),
        amount: 1_000,
        asset: key.asset,
        symbol: "USDC".into(),
        decimals: 6,
        network: "base-sepolia".into(),
        chain_id: 84532,
        pay_to: Address::repeat_byte(3),
        nonce: key.nonce,
        valid_after: 0,
        valid_before: 1_796_043_600,
        timing: Timing::AfterResponse,
        backend: "https://x402.org/facilitator".into(),
        unsettled_held: false,
        sale_account: None,
        credits: None,
    };
    (key, entry)
}

fn authorization() -> Authorization {
    // About the size of a real v2 payload: signature, authorization, requirements.
    Authorization {
        version: 2,
        payload: serde_json::json!({
            "signature": format!("0x{}", "ab".repeat(65)),
            "authorization": {
                "from": Address::repeat_byte(2), "to": Address::repeat_byte(3), "value": "1000",
                "validAfter": "0", "validBefore": "1796043600", "nonce": B256::repeat_byte(9),
            },
        }),
        requirements: serde_json::json!({
            "scheme": "exact", "network": "eip155:84532", "amount": "1000",
            "asset": Address::repeat_byte(1), "payTo": Address::repeat_byte(3),
            "maxTimeoutSeconds": 60, "extra": {"name": "USDC", "version": "2"},
        }),
    }
}

fn bench(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("tollgate-bench-ledger-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let Ok(runtime) = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()
    else {
        return;
    };
    let Ok(store) = Store::open(&dir) else { return };
    let auth = authorization();

    let mut group = c.benchmark_group("ledger");
    group.throughput(Throughput::Elements(1));
    group.bench_function("record_payment (transaction + fsync)", |b| {
        b.iter(|| {
            let (key, entry) = draft();
            runtime.block_on(store.record_payment(black_box(&key), entry, &auth))
        })
    });
    for writers in [8u64, 64] {
        group.throughput(Throughput::Elements(writers));
        group.bench_function(
            format!("{writers} concurrent record_payment (group commit)"),
            |b| {
                b.iter(|| {
                    runtime.block_on(async {
                        let tasks: Vec<_> = (0..writers)
                            .map(|_| {
                                let (store, auth) = (store.clone(), auth.clone());
                                let (key, entry) = draft();
                                tokio::spawn(async move {
                                    store.record_payment(&key, entry, &auth).await.is_ok()
                                })
                            })
                            .collect();
                        for task in tasks {
                            let _ = task.await;
                        }
                    })
                })
            },
        );
    }
    group.finish();
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);

    let entries: u64 = std::env::var("TOLLGATE_BENCH_EXPORT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    if entries > 0 {
        export_once(&runtime, entries);
    }
}

/// Counts the bytes an export writes, and drops them.
struct Sink(u64);

impl Write for Sink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0 += data.len() as u64;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn export_once(runtime: &tokio::runtime::Runtime, entries: u64) {
    let dir = std::env::temp_dir().join(format!("tollgate-bench-export-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let Ok(store) = Store::open(&dir) else { return };
    let auth = authorization();
    let started = Instant::now();
    runtime.block_on(async {
        // 256 writers at a time: the group commit makes filling the store quick.
        let mut left = entries;
        while left > 0 {
            let batch = left.min(256);
            let tasks: Vec<_> = (0..batch)
                .map(|_| {
                    let (store, auth) = (store.clone(), auth.clone());
                    let (key, entry) = draft();
                    tokio::spawn(
                        async move { store.record_payment(&key, entry, &auth).await.is_ok() },
                    )
                })
                .collect();
            for task in tasks {
                let _ = task.await;
            }
            left -= batch;
        }
    });
    let filled = started.elapsed();
    let _ = store.flush();
    let size = store.size_on_disk();
    println!(
        "ledger fill: {entries} entries in {filled:.1?} ({:.0} entries/s with 256 writers); {size} bytes on disk, {} bytes per entry",
        entries as f64 / filled.as_secs_f64(),
        size / entries.max(1)
    );
    let Ok(rates) = RateTable::parse(
        "currency,rate,source,as_of\nEUR,0.9234,ECB,2026-11-30\n",
        "bench",
    ) else {
        return;
    };
    let rate = rates.get("EUR").ok();
    for (format, rate, label) in [
        (Format::Csv, None, "csv"),
        (Format::Csv, rate, "csv + EUR"),
        (Format::Json, rate, "json + EUR"),
    ] {
        let mut sink = Sink(0);
        let started = Instant::now();
        let summary = export(&store, &Query::default(), format, rate, &mut sink);
        let took = started.elapsed();
        let count = summary.map(|s| s.count).unwrap_or(0);
        println!(
            "ledger export ({label}): {count} rows, {} MB in {took:.2?} ({:.0} rows/s)",
            sink.0 / 1_000_000,
            count as f64 / took.as_secs_f64()
        );
    }
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
