//! The decision table: (policy, request, buyer) → outcome, route and rule, one row per case.
//!
//! Rows cover route precedence, methods, path normalisation, every rail choice of a hybrid
//! route, payer lists and the default for unmatched requests.

use tollgate::policy::{self, Buyer, PaymentHeader, Policy, Request, Source, Why};

const SHOP: &str = r#"
network devnet {
  chain 31337
  asset USDC at 0x5FbDB2315678afecb367f032d93F642f64180aa3 name "USD Coin" version "2" decimals 6
}

service "shop" {
  pay_to 0x209693Bc6afc0C5328bA36FaF03C514EF312287C
  accept x402 on base-sepolia, devnet
  accept prepaid header "X-Key"
  settle via facilitator "https://x402.org/facilitator"
  deny payers 0x000000000000000000000000000000000000dEaD
  default deny

  route * "/**" { deny }
  route GET "/" { free }
  route GET "/a/{x}" { price 0.01 USDC }
  route GET "/{y}/b" { price 0.02 USDC }
  route GET "/a/b" { free }
  route * "/a/b" { deny }
  route GET "/files" { free }
  route GET "/files/**" { price 1 credit }
  route GET "/deep/lit/end" { free }
  route GET "/{p}/lit/other" { price 3 credits }
  route GET "/café" { free }
  route GET "/hybrid" {
    price 0.001 USDC or 2 credits
  }
  route GET "/hybrid-x402" {
    price 0.001 USDC or 2 credits
    prefer x402
  }
  route GET "/credits-only" { price 5 credits }
  route GET "/vip" {
    price 0.1 USDC
    allow payers 0x857b06519E91e3A54538791bDbb0E22373e36b66
  }
}
"#;

const OPEN: &str = r#"
service "open" {
  default pass
  route GET "/blocked" { deny }
}
"#;

const PAYER: &str = "0x857b06519E91e3A54538791bDbb0E22373e36b66";
const OTHER: &str = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C";
const DEAD: &str = "0x000000000000000000000000000000000000dEaD";

/// One row: the request, what the buyer is known to be, and the expected decision.
struct Row {
    policy: &'static str,
    method: &'static str,
    target: &'static str,
    key: bool,
    payment: Option<PaymentHeader>,
    balance: Option<u128>,
    payer: Option<&'static str>,
    outcome: &'static str,
    route: Option<&'static str>,
    why: Why,
}

const fn row(
    method: &'static str,
    target: &'static str,
    outcome: &'static str,
    route: Option<&'static str>,
    why: Why,
) -> Row {
    Row {
        policy: SHOP,
        method,
        target,
        key: false,
        payment: None,
        balance: None,
        payer: None,
        outcome,
        route,
        why,
    }
}

impl Row {
    const fn key(mut self, balance: Option<u128>) -> Self {
        self.key = true;
        self.balance = balance;
        self
    }
    const fn paid(mut self, version: PaymentHeader) -> Self {
        self.payment = Some(version);
        self
    }
    const fn payer(mut self, payer: &'static str) -> Self {
        self.payer = Some(payer);
        self
    }
    const fn on(mut self, policy: &'static str) -> Self {
        self.policy = policy;
        self
    }
}

use PaymentHeader::{V1, V2};
use Why::*;

fn rows() -> Vec<Row> {
    vec![
        // Precedence: literal beats {param} beats **, position by position; then method beats *.
        row("GET", "/a/b", "free", Some("GET /a/b"), RouteFree),
        row("POST", "/a/b", "deny", Some("* /a/b"), RouteDenied),
        row(
            "GET",
            "/a/c",
            "challenge",
            Some("GET /a/{x}"),
            NoCredentials,
        ),
        row(
            "GET",
            "/z/b",
            "challenge",
            Some("GET /{y}/b"),
            NoCredentials,
        ),
        row("GET", "/z/z", "deny", Some("* /**"), RouteDenied),
        row("GET", "/", "free", Some("GET /"), RouteFree),
        row("POST", "/", "deny", Some("* /**"), RouteDenied),
        // `**` matches zero or more segments; an exact end beats it.
        row("GET", "/files", "free", Some("GET /files"), RouteFree),
        row("GET", "/files/", "free", Some("GET /files"), RouteFree),
        row(
            "GET",
            "/files/x/y/z",
            "challenge",
            Some("GET /files/**"),
            NoCredentials,
        ),
        // A dead-end literal branch falls back to the parameter branch.
        row(
            "GET",
            "/deep/lit/other",
            "challenge",
            Some("GET /{p}/lit/other"),
            NoCredentials,
        ),
        row(
            "GET",
            "/deep/lit/end",
            "free",
            Some("GET /deep/lit/end"),
            RouteFree,
        ),
        // Path normalisation: queries ignored, empty segments dropped, segments percent-decoded.
        row("GET", "/a/b?x=1", "free", Some("GET /a/b"), RouteFree),
        // A fragment never reaches a server legitimately, and `#/../` must not dodge a price.
        row("GET", "/a/b#frag", "bad_request", None, Malformed),
        row(
            "GET",
            "/files#/../credits-only",
            "bad_request",
            None,
            Malformed,
        ),
        // Methods are case-sensitive: `get` must not dodge the `GET` route's price.
        row("get", "/credits-only", "bad_request", None, Malformed),
        // HEAD is answered by the GET route (frameworks run the GET handler for it).
        row("HEAD", "/a/b", "free", Some("GET /a/b"), RouteFree),
        row(
            "HEAD",
            "/credits-only",
            "challenge",
            Some("GET /credits-only"),
            NoCredentials,
        ),
        row("HEAD", "/z/z", "deny", Some("* /**"), RouteDenied),
        row("GET", "//a///b/", "free", Some("GET /a/b"), RouteFree),
        row("GET", "/caf%C3%A9", "free", Some("GET /café"), RouteFree),
        row("GET", "/a/%62", "free", Some("GET /a/b"), RouteFree),
        // Unsafe paths are refused before matching.
        row("GET", "/files/../a/b", "bad_request", None, Malformed),
        row("GET", "/a%2Fb", "bad_request", None, Malformed),
        row("GET", "/%2e%2e/x", "bad_request", None, Malformed),
        // Hybrid route, prefer prepaid (the default).
        row(
            "GET",
            "/hybrid",
            "challenge",
            Some("GET /hybrid"),
            NoCredentials,
        ),
        row("GET", "/hybrid", "prepaid", Some("GET /hybrid"), KeyDebited).key(None),
        row("GET", "/hybrid", "prepaid", Some("GET /hybrid"), KeyDebited).key(Some(2)),
        row("GET", "/hybrid", "challenge", Some("GET /hybrid"), KeyShort).key(Some(1)),
        row(
            "GET",
            "/hybrid",
            "x402",
            Some("GET /hybrid"),
            PaymentAttached,
        )
        .paid(V1),
        row(
            "GET",
            "/hybrid",
            "x402",
            Some("GET /hybrid"),
            PaymentAttached,
        )
        .paid(V2),
        row(
            "GET",
            "/hybrid",
            "prepaid",
            Some("GET /hybrid"),
            KeyPreferred,
        )
        .key(Some(10))
        .paid(V2),
        row(
            "GET",
            "/hybrid",
            "x402",
            Some("GET /hybrid"),
            KeyShortPaymentUsed,
        )
        .key(Some(0))
        .paid(V2),
        // Hybrid route with `prefer x402`.
        row(
            "GET",
            "/hybrid-x402",
            "x402",
            Some("GET /hybrid-x402"),
            PaymentPreferred,
        )
        .key(Some(10))
        .paid(V1),
        row(
            "GET",
            "/hybrid-x402",
            "prepaid",
            Some("GET /hybrid-x402"),
            KeyDebited,
        )
        .key(Some(10)),
        // Credits-only and x402-only routes ignore the other rail's credentials.
        row(
            "GET",
            "/credits-only",
            "challenge",
            Some("GET /credits-only"),
            NoCredentials,
        ),
        row(
            "GET",
            "/credits-only",
            "challenge",
            Some("GET /credits-only"),
            PaymentNotAccepted,
        )
        .paid(V2),
        row(
            "GET",
            "/credits-only",
            "challenge",
            Some("GET /credits-only"),
            KeyShort,
        )
        .key(Some(4)),
        row(
            "GET",
            "/credits-only",
            "prepaid",
            Some("GET /credits-only"),
            KeyDebited,
        )
        .key(Some(5)),
        row(
            "GET",
            "/a/c",
            "challenge",
            Some("GET /a/{x}"),
            KeyNotAccepted,
        )
        .key(Some(100)),
        row("GET", "/a/c", "x402", Some("GET /a/{x}"), PaymentAttached)
            .key(Some(100))
            .paid(V1),
        // Payer lists apply once the payer is known: service deny list, route allow list.
        row("GET", "/a/c", "deny", Some("GET /a/{x}"), PayerDenied)
            .paid(V2)
            .payer(DEAD),
        row("GET", "/a/c", "x402", Some("GET /a/{x}"), PaymentAttached)
            .paid(V2)
            .payer(OTHER),
        row("GET", "/vip", "x402", Some("GET /vip"), PaymentAttached)
            .paid(V2)
            .payer(PAYER),
        row("GET", "/vip", "deny", Some("GET /vip"), PayerNotAllowed)
            .paid(V2)
            .payer(OTHER),
        row("GET", "/vip", "deny", Some("GET /vip"), PayerDenied)
            .paid(V2)
            .payer(DEAD),
        row("GET", "/vip", "x402", Some("GET /vip"), PaymentAttached).paid(V2),
        // The default for unmatched requests.
        row(
            "GET",
            "/anything",
            "pass",
            None,
            NoRoute(policy::DefaultAction::Pass),
        )
        .on(OPEN),
        row("GET", "/blocked", "deny", Some("GET /blocked"), RouteDenied).on(OPEN),
        row(
            "GET",
            "/blocked/more",
            "pass",
            None,
            NoRoute(policy::DefaultAction::Pass),
        )
        .on(OPEN),
    ]
}

fn compile(text: &str) -> Policy {
    let checked = policy::check(Source::new("table.toll", text));
    let rendered = checked.render(policy::Style::Plain);
    match checked.policy {
        Some(p) if checked.diagnostics.is_empty() => p,
        _ => unreachable_policy(&rendered),
    }
}

#[expect(
    clippy::panic,
    reason = "a test policy that does not compile is a broken test"
)]
fn unreachable_policy(rendered: &str) -> ! {
    panic!("table policy does not compile cleanly:\n{rendered}")
}

#[test]
fn decision_table() {
    let shop = compile(SHOP);
    let open = compile(OPEN);
    let mut failures = Vec::new();
    for r in rows() {
        let policy = if r.policy == SHOP { &shop } else { &open };
        let request = Request {
            method: r.method,
            target: r.target,
            api_key: r.key,
            payment: r.payment,
        };
        let buyer = Buyer {
            payer: r.payer.and_then(|p| p.parse().ok()),
            prepaid_balance: r.balance,
        };
        let d = policy::decide(policy, &request, &buyer);
        let route = d.route.map(|x| x.display());
        if d.outcome.name() != r.outcome || route.as_deref() != r.route || d.why != r.why {
            failures.push(format!(
                "{} {} key={} balance={:?} payment={:?} payer={:?}\n    expected {} {:?} {:?}\n    actual   {} {:?} {:?}",
                r.method, r.target, r.key, r.balance, r.payment, r.payer, r.outcome, r.route, r.why, d.outcome.name(), route, d.why
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows differ:\n{}",
        failures.len(),
        rows().len(),
        failures.join("\n")
    );
}

#[test]
fn prices_are_integer_atomic_units_per_network() {
    let shop = compile(SHOP);
    let d = policy::decide(
        &shop,
        &Request {
            method: "GET",
            target: "/hybrid",
            api_key: false,
            payment: None,
        },
        &Buyer::default(),
    );
    let price = d.route.and_then(|r| r.price()).cloned();
    let price = price.unwrap_or_else(|| unreachable_policy("no price"));
    let offers: Vec<(String, u128)> = price
        .offers
        .iter()
        .map(|o| {
            (
                shop.networks
                    .get(o.network)
                    .map(|n| n.caip2())
                    .unwrap_or_default(),
                o.amount,
            )
        })
        .collect();
    assert_eq!(
        offers,
        vec![
            ("eip155:84532".to_string(), 1000),
            ("eip155:31337".to_string(), 1000)
        ]
    );
    assert_eq!(price.credits, Some(2));
}
