//! Local x402 verification per payment: decode the base64 header, match the offer, hash the
//! EIP-712 message, recover the signer. Real headers captured from the official clients.
//! Run: `cargo bench --bench verify`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use tollgate::policy::{self, Source};
use tollgate::x402::{Terms, verify};

const NOW: u64 = 1_795_215_800;

fn terms() -> Terms {
    let text = "service \"bench\" {\n  pay_to 0x710D094d04ac8B4eE234D26c53ba15A1Dce203d1\n  accept x402 on base-sepolia, base\n  settle via facilitator \"http://127.0.0.1:1\" after response\n  default deny\n  route GET \"/weather\" {\n    price 0.01 USDC\n  }\n}\n";
    let policy = policy::check(Source::new("bench.toll", text.to_string()))
        .policy
        .unwrap_or_else(|| std::process::exit(1));
    Terms::new(&policy)
}

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/x402/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .as_bytes()
        .to_vec()
}

fn bench(c: &mut Criterion) {
    let terms = terms();
    let Some(route) = terms.route(0) else { return };
    let v2 = fixture("x402-fetch-2.27.0-v2.PAYMENT-SIGNATURE.b64");
    let v1 = fixture("x402-fetch-2.27.0-v1.X-PAYMENT.b64");
    assert!(verify::verify(&v2, route, NOW).is_ok() && verify::verify(&v1, route, NOW).is_ok());
    let mut group = c.benchmark_group("verify");
    group.bench_function("v2 header (decode + match + EIP-712 + recover)", |b| {
        b.iter(|| verify::verify(black_box(&v2), route, NOW))
    });
    group.bench_function("v1 header (decode + match + EIP-712 + recover)", |b| {
        b.iter(|| verify::verify(black_box(&v1), route, NOW))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
