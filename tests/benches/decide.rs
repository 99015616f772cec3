//! Route match + decision on generated policies of 10, 1,000 and 10,000 routes, and the
//! one-off cost of compiling a 1,000-route policy. Run: `cargo bench --bench decide`.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tollgate::policy::{self, Buyer, PaymentHeader, Policy, Request, Source};

/// A request target, method, whether an API key is sent, and which payment header.
type Sample = (String, &'static str, bool, Option<PaymentHeader>);

/// A policy with `n` routes of four shapes, and requests that hit each shape and miss.
fn generated(n: usize) -> (String, Vec<Sample>) {
    let mut text = String::from(
        "service \"bench\" {\n  pay_to 0x209693Bc6afc0C5328bA36FaF03C514EF312287C\n  accept x402 on base-sepolia, base\n  accept prepaid\n  settle via facilitator \"https://x402.org/facilitator\"\n  limit buyer 60 requests per minute\n  default deny\n",
    );
    for i in 0..n {
        let v = i % 7;
        let route = match i % 4 {
            0 => format!(
                "  route GET \"/api/v{v}/res{i}/{{id}}\" {{\n    price 0.001 USDC or 1 credit\n  }}\n"
            ),
            1 => format!("  route * \"/static/s{i}/**\" {{ free }}\n"),
            2 => format!(
                "  route POST \"/api/v{v}/res{i}/{{id}}/items/{{item}}\" {{\n    price 0.01 USDC\n  }}\n"
            ),
            _ => format!("  route GET \"/u{i}\" {{ deny }}\n"),
        };
        text.push_str(&route);
    }
    text.push_str("}\n");
    let mut requests = Vec::new();
    for k in 0..64 {
        let i = (k * 7919) % n;
        let v = i % 7;
        let request = match (i % 4, k % 3) {
            (0, 0) => (
                format!("/api/v{v}/res{i}/42?units=metric"),
                "GET",
                false,
                None,
            ),
            (0, 1) => (format!("/api/v{v}/res{i}/42"), "GET", true, None),
            (0, _) => (
                format!("/api/v{v}/res{i}/42"),
                "GET",
                false,
                Some(PaymentHeader::V2),
            ),
            (1, _) => (format!("/static/s{i}/css/site.css"), "GET", false, None),
            (2, _) => (
                format!("/api/v{v}/res{i}/42/items/7"),
                "POST",
                false,
                Some(PaymentHeader::V1),
            ),
            _ => (format!("/nowhere/{k}"), "GET", false, None),
        };
        requests.push(request);
    }
    (text, requests)
}

fn compile(text: &str) -> Option<Policy> {
    let checked = policy::check(Source::new("bench.toll", text));
    checked.policy
}

fn decide(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide");
    for n in [10usize, 1_000, 10_000] {
        let (text, requests) = generated(n);
        let Some(policy) = compile(&text) else {
            eprintln!("generated policy with {n} routes does not compile");
            return;
        };
        group.bench_with_input(BenchmarkId::from_parameter(n), &requests, |b, requests| {
            let mut k = 0usize;
            b.iter(|| {
                k = (k + 1) % requests.len();
                let Some((target, method, key, payment)) = requests.get(k) else {
                    return;
                };
                let request = Request {
                    method,
                    target,
                    api_key: *key,
                    payment: *payment,
                };
                black_box(
                    policy::decide(black_box(&policy), black_box(&request), &Buyer::default())
                        .outcome,
                );
            });
        });
    }
    group.finish();
}

fn compile_1000(c: &mut Criterion) {
    let (text, _) = generated(1_000);
    c.bench_function("compile/1000", |b| {
        b.iter(|| black_box(compile(black_box(&text))))
    });
}

criterion_group!(benches, decide, compile_1000);
criterion_main!(benches);
