//! The prepaid rail's store work per request: resolve an API key (SHA-256 + two lookups), and
//! debit its account (one sled transaction over balance, ledger and index, then the group
//! commit's fsync). Run: `cargo bench --bench debit`. The debit figure is dominated by the
//! fsync of the machine's disk; under concurrency the group commit shares one fsync among
//! every debit waiting for it, which the `8 concurrent` case shows.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use tollgate::store::Store;
use tollgate::store::accounts::{Charge, Debit};

fn bench(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("tollgate-bench-debit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let Ok(runtime) = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
    else {
        return;
    };
    let Ok(store) = Store::open(&dir) else { return };
    let (secret, key) = runtime
        .block_on(async {
            let account = store.create_account("bench", 1).await.ok()?;
            store
                .top_up(account.id, u128::from(u64::MAX), "seed", 1)
                .await
                .ok()?
                .ok()?;
            store.issue_key(account.id, "", None, 1).await.ok()?
        })
        .unwrap_or_else(|| std::process::exit(1));

    let mut group = c.benchmark_group("prepaid");
    group.bench_function("resolve key (sha-256 + 2 lookups)", |b| {
        b.iter(|| store.resolve_key(black_box(&secret), 2))
    });
    let charge = || Charge {
        key_id: key.id.clone(),
        account: key.account,
        credits: 1,
        request_id: "bench".into(),
        route: "GET /bench".into(),
        idempotency: None,
    };
    group.bench_function("debit (transaction + fsync)", |b| {
        b.iter(|| runtime.block_on(store.debit(black_box(charge()), 2)))
    });
    group.bench_function("8 concurrent debits (one group commit)", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let tasks: Vec<_> = (0..8)
                    .map(|_| {
                        let (store, charge) = (store.clone(), charge());
                        tokio::spawn(async move {
                            matches!(store.debit(charge, 2).await, Ok(Debit::Charged(_)))
                        })
                    })
                    .collect();
                for task in tasks {
                    let _ = task.await;
                }
            })
        })
    });
    group.finish();
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
