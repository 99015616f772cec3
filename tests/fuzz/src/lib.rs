//! What the fuzz targets share: the policies they decide with and the terms they verify against.
//!
//! Each policy is compiled once per process (`LazyLock`); a policy that stops compiling is a
//! bug in this crate, reported by the first input of any target that uses it.

use std::sync::LazyLock;

use tollgate::policy::{self, Policy, Source, Style};
use tollgate::x402::Terms;

/// The instant every verification is made at: inside the windows of the captured official
/// client payments (`tests/fixtures/x402/`), so their seeds verify and mutations of them reach
/// every check, the signature's included.
pub const NOW: u64 = 1_795_215_800;

/// Compiles a policy text, or panics with its diagnostics.
pub fn compile(name: &str, text: &str) -> Policy {
    let checked = policy::check(Source::new(name, text));
    match checked.policy {
        Some(policy) => policy,
        None => panic!("{name} does not compile:\n{}", checked.render(Style::Plain)),
    }
}

/// A policy with every kind of route pattern and outcome: literals beating parameters beating
/// `**`, methods and `*`, letter case that could decide a route, a `default pass`.
pub const ROUTES: &str = r#"
service "fuzz" {
  pay_to 0x209693Bc6afc0C5328bA36FaF03C514EF312287C
  accept x402 on base-sepolia
  accept prepaid header "x-api-key"
  settle via facilitator "https://x402.org/facilitator" after response
  default pass
  route GET "/" { free }
  route GET "/paid/{id}" { price 0.01 USDC }
  route GET "/paid/free" { free }
  route * "/files/**" { price 0.001 USDC or 1 credit }
  route GET "/Admin/{x}" { deny }
  route GET "/admin/secret" { price 2 credits }
  route POST "/v1/{a}/x/{b}/**" { price 1 credit }
  route HEAD "/h" { deny }
  route GET "/h/**" { price 0.02 USDC }
  route * "/internal/**" { deny }
}
"#;

/// The policies decisions are fuzzed against: [`ROUTES`] and the two shipped ones.
pub static POLICIES: LazyLock<Vec<Policy>> = LazyLock::new(|| {
    vec![
        compile("fuzz.toll", ROUTES),
        compile(
            "weather.toll",
            include_str!("../../../policies/weather.toll"),
        ),
        compile(
            "devnet.toll",
            include_str!("../../../examples/policies/devnet.toll"),
        ),
    ]
});

/// The terms the captured payments were made against (x402-fetch 2.27.0 v1 and v2, 1.2.0 v1:
/// base-sepolia USDC, 0.01 USDC to `0x710D…03d1`, 60 s), plus a route offering two networks
/// so a payment is also matched against more than one offer.
pub static TERMS: LazyLock<Vec<Terms>> = LazyLock::new(|| {
    let capture = r#"
service "capture" {
  pay_to 0x710D094d04ac8B4eE234D26c53ba15A1Dce203d1
  accept x402 on base-sepolia
  settle via facilitator "http://127.0.0.1:1" after response
  default deny
  route GET "/weather" {
    price 0.01 USDC
    description "local x402 v2 test resource"
    mime "application/json"
  }
}
"#;
    let two = r#"
service "two" {
  pay_to 0x710D094d04ac8B4eE234D26c53ba15A1Dce203d1
  accept x402 on base, base-sepolia
  settle via facilitator "http://127.0.0.1:1" after response
  default deny
  route GET "/x" { price 0.01 USDC }
}
"#;
    vec![
        Terms::new(&compile("capture.toll", capture)),
        Terms::new(&compile("two.toll", two)),
    ]
});

/// A request as the target and decision fuzzers read their input: `METHOD raw-target` on the
/// first line, then optionally `\n` and the `Host` header's bytes. A line without a space is
/// a target for `GET`.
pub struct RequestLine<'a> {
    pub method: &'a str,
    pub raw: &'a [u8],
    pub host: Option<&'a [u8]>,
}

impl<'a> RequestLine<'a> {
    pub fn read(data: &'a [u8]) -> Option<RequestLine<'a>> {
        let (line, host) = match data.iter().position(|&b| b == b'\n') {
            Some(at) => (&data[..at], Some(&data[at + 1..])),
            None => (data, None),
        };
        let (method, raw) = match line.iter().position(|&b| b == b' ') {
            Some(at) => (std::str::from_utf8(&line[..at]).ok()?, &line[at + 1..]),
            None => ("GET", line),
        };
        Some(RequestLine { method, raw, host })
    }

    /// The method as a request head can carry it (an HTTP token), else `GET`: what Pingora is
    /// given when the fuzzers build a head.
    pub fn head_method(&self) -> &'a str {
        match http::Method::from_bytes(self.method.as_bytes()) {
            Ok(_) if !self.method.is_empty() => self.method,
            _ => "GET",
        }
    }
}
