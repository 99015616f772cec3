//! Golden tests of rendered policy diagnostics, through the public API only.
//!
//! `tests/fixtures/policy/err/` holds one small, otherwise valid policy per mistake (a few,
//! such as `many_errors_at_once.toll`, hold several on purpose). Each is checked and rendered
//! as `tollgate check` prints it (plain style, file name only), followed by a summary line, and
//! the result is snapshotted in `snapshots/`. The targeted tests at the end pin the code,
//! message, help and underlined text of the key mistakes, whatever miette's layout.

use std::path::Path;

use tollgate::policy::{self, Checked, Diagnostic, Source, Style, diag};

/// Fixtures whose mistake `check` does not report yet: each must still check clean, so the
/// day it is caught this list fails and asks to be shortened.
const NOT_CAUGHT_YET: &[&str] = &[];

/// Fixtures with a diagnostic that renders without a `^` caret yet (a zero-width span at the
/// end of the file, or a one-character span whose label replaces the caret). Each must still
/// lack one, so a fix shows up here.
const NO_CARET_YET: &[&str] = &[];

/// The file name a fixture is checked under: no folders, so snapshots do not depend on
/// where the repository lives.
fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Everything an operator sees for one file: every diagnostic, then a summary line.
fn report(checked: &Checked) -> String {
    format!(
        "{}errors: {}, warnings: {}\n",
        checked.render(Style::Plain),
        checked.errors(),
        checked.warnings()
    )
}

/// `file:line:col` of a diagnostic's primary span, as the rendering must show it.
fn location(checked: &Checked, d: &Diagnostic) -> String {
    let (line, col) = checked.source.line_col(d.span.start);
    format!("{}:{line}:{col}", checked.source.name)
}

#[test]
fn rendered() {
    // Three-argument form: insta refuses `..` in the pattern itself.
    insta::glob!("../fixtures/policy/err", "*.toll", |path| {
        let name = file_name(path);
        let text = std::fs::read_to_string(path).unwrap();
        let checked = policy::check(Source::new(name.as_str(), text));

        if NOT_CAUGHT_YET.contains(&name.as_str()) {
            assert!(
                checked.diagnostics.is_empty(),
                "{name} is now diagnosed: remove it from NOT_CAUGHT_YET"
            );
        } else {
            assert!(
                !checked.diagnostics.is_empty(),
                "{name} checks clean: a fixture must hold a mistake"
            );
        }
        let mut caret_missing = false;
        for d in &checked.diagnostics {
            let one = diag::render(d, &checked.source, Style::Plain);
            let at = location(&checked, d);
            assert!(
                one.contains(&at),
                "{name}: `{}` does not show {at}:\n{one}",
                d.code
            );
            caret_missing |= !one.contains('^');
        }
        if NO_CARET_YET.contains(&name.as_str()) {
            assert!(
                caret_missing,
                "{name} now has carets everywhere: remove it from NO_CARET_YET"
            );
        } else {
            assert!(
                !caret_missing,
                "{name}: a diagnostic has no `^` caret:\n{}",
                checked.render(Style::Plain)
            );
        }

        let out = report(&checked);
        assert!(
            !out.contains('\u{1b}'),
            "{name}: colour codes in plain output"
        );
        assert!(
            !out.contains(env!("CARGO_MANIFEST_DIR")),
            "{name}: an absolute path in the output"
        );
        insta::assert_snapshot!(out);
    });
}

// ───────────────────────── targeted expectations (cedar's ExpectedErrorMessage) ─────────────────────────

/// What one diagnostic must say, independent of how it is drawn.
struct Expected<'a> {
    code: &'a str,
    message: &'a str,
    help: Option<&'a str>,
    /// The text under the primary span.
    underlined: &'a str,
}

/// Checks `text` and asserts that exactly one diagnostic has `expected.code` and that it says
/// what `expected` says.
fn assert_diagnostic(name: &str, text: &str, expected: &Expected<'_>) {
    let checked = policy::check(Source::new(name, text));
    let found: Vec<&Diagnostic> = checked
        .diagnostics
        .iter()
        .filter(|d| d.code == expected.code)
        .collect();
    let [d] = found.as_slice() else {
        let codes: Vec<&str> = checked.diagnostics.iter().map(|d| d.code).collect();
        assert_eq!(
            found.len(),
            1,
            "{name}: expected one `{}`, got {codes:?}",
            expected.code
        );
        return;
    };
    assert_eq!(d.message, expected.message, "{name}: message");
    assert_eq!(d.help.as_deref(), expected.help, "{name}: help");
    assert_eq!(
        text.get(d.span.start..d.span.end),
        Some(expected.underlined),
        "{name}: underlined text"
    );
}

#[test]
fn duplicate_route_points_at_the_second_route_header() {
    assert_diagnostic(
        "duplicate_route.toll",
        include_str!("../fixtures/policy/err/duplicate_route.toll"),
        &Expected {
            code: "duplicate_route",
            message: "duplicate route `GET /v1/forecast/{town}`",
            help: Some(
                "both routes match exactly the same requests, so neither is more specific: \
                 merge them or change one",
            ),
            underlined: "route GET \"/v1/forecast/{town}\"",
        },
    );
}

#[test]
fn too_many_decimals_underlines_the_amount() {
    assert_diagnostic(
        "too_many_decimals.toll",
        include_str!("../fixtures/policy/err/too_many_decimals.toll"),
        &Expected {
            code: "too_many_decimals",
            message: "`0.0000005` has too many decimals",
            help: Some("USDC has 6 decimals; amounts are never rounded"),
            underlined: "0.0000005",
        },
    );
}

#[test]
fn unknown_network_suggests_the_closest_name() {
    assert_diagnostic(
        "unknown_network.toll",
        include_str!("../fixtures/policy/err/unknown_network.toll"),
        &Expected {
            code: "unknown_network",
            message: "unknown network `base-sepolai`",
            help: Some("did you mean `base-sepolia`?"),
            underlined: "base-sepolai",
        },
    );
}

#[test]
fn bad_checksum_gives_the_checksummed_form() {
    assert_diagnostic(
        "bad_checksum.toll",
        include_str!("../fixtures/policy/err/bad_checksum.toll"),
        &Expected {
            code: "bad_checksum",
            message: "address checksum does not match (EIP-55)",
            help: Some(
                "a typo? the checksummed form of these digits is \
                 `0x209693Bc6afc0C5328bA36FaF03C514EF312287C`; write all lower case to skip the check",
            ),
            underlined: "0x209693Bc6Afc0C5328bA36FaF03C514EF312287C",
        },
    );
}

#[test]
fn misplaced_clause_names_where_it_belongs() {
    assert_diagnostic(
        "misplaced_clause.toll",
        include_str!("../fixtures/policy/err/misplaced_clause.toll"),
        &Expected {
            code: "misplaced_clause",
            message: "`pay_to` is not allowed in a `route` block",
            help: Some("`pay_to` belongs in a `service` block"),
            underlined: "pay_to",
        },
    );
}

#[test]
fn limit_without_window_underlines_the_quantity() {
    assert_diagnostic(
        "limit_without_window.toll",
        include_str!("../fixtures/policy/err/limit_without_window.toll"),
        &Expected {
            code: "limit_without_window",
            message: "this limit has no window",
            help: Some(
                "add a window, e.g. `per minute`, `per hour`, `per 10 minutes` or `per day`",
            ),
            underlined: "60 requests",
        },
    );
}

#[test]
fn inline_relayer_key_is_refused() {
    assert_diagnostic(
        "inline_secret.toll",
        include_str!("../fixtures/policy/err/inline_secret.toll"),
        &Expected {
            code: "inline_secret",
            message: "a relayer key must not be written in the policy",
            help: Some(
                "keep it out of the policy: `relayer env:RELAYER_KEY`, or a file with \
                 `relayer \"/run/secrets/relayer.key\"`",
            ),
            underlined: "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
        },
    );
}

#[test]
fn upgrade_on_a_denied_route_points_at_the_clause() {
    assert_diagnostic(
        "upgrade_on_deny.toll",
        include_str!("../fixtures/policy/err/upgrade_on_deny.toll"),
        &Expected {
            code: "upgrade_on_deny",
            message: "`upgrade` on a route that is denied",
            help: Some("remove `upgrade`, or give the route `free` or a `price`"),
            underlined: "upgrade websocket",
        },
    );
}

#[test]
fn bad_protocol_underlines_the_protocol() {
    assert_diagnostic(
        "p.toll",
        "service \"s\" {\n  default deny\n  route GET \"/ws\" {\n    free\n    upgrade web@socket\n  }\n}\n",
        &Expected {
            code: "bad_protocol",
            message: "`web@socket` is not a protocol name",
            help: Some(
                "a protocol name is letters, digits and `-` (an HTTP token), e.g. `websocket` or `h2c`",
            ),
            underlined: "web@socket",
        },
    );
}

#[test]
fn upgrade_compiles_to_lower_case_protocols_in_order() {
    let text = "service \"s\" {\n  accept prepaid\n  default deny\n  route GET \"/ws\" {\n    price 1 credit\n    upgrade WebSocket, h2c\n  }\n  route GET \"/plain\" { free }\n}\n";
    let checked = policy::check(Source::new("s.toll", text));
    assert!(
        checked.diagnostics.is_empty(),
        "{}",
        checked.render(Style::Plain)
    );
    let policy = checked.policy.unwrap();
    assert_eq!(policy.routes[0].upgrade, ["websocket", "h2c"]);
    assert!(policy.routes[1].upgrade.is_empty(), "off by default");
}

/// A policy whose only prepaid header is `name`.
fn with_key_header(name: &str) -> String {
    format!(
        "service \"s\" {{\n  accept prepaid header \"{name}\"\n  default deny\n  route GET \"/x\" {{ price 1 credit }}\n}}\n"
    )
}

#[test]
fn reserved_key_headers_are_refused_whatever_their_case() {
    for name in [
        "content-length",
        "Transfer-Encoding",
        "HOST",
        "connection",
        "keep-alive",
        "TE",
        "trailer",
        "Upgrade",
        "proxy-authorization",
        "proxy-connection",
        "expect",
        "Idempotency-Key",
        "x-request-id",
        "x-tollgate-account",
        "X-Tollgate-Anything",
        "X-PAYMENT",
        "payment-signature",
        "payment-required",
        "payment-response",
        "x-payment-response",
    ] {
        let text = with_key_header(name);
        let checked = policy::check(Source::new("s.toll", text.as_str()));
        let codes: Vec<&str> = checked.diagnostics.iter().map(|d| d.code).collect();
        assert_eq!(codes, ["reserved_header"], "{name}");
        let d = &checked.diagnostics[0];
        assert_eq!(
            text.get(d.span.start..d.span.end),
            Some(format!("\"{name}\"").as_str()),
            "{name}: underlined text"
        );
        let help = d.help.as_deref().unwrap_or("");
        assert!(
            help.ends_with("; choose another header for keys, e.g. `x-api-key`") && help.len() > 60,
            "{name}: the hint says why: {help}"
        );
        assert!(checked.policy.is_none(), "{name}: an error, not a warning");
    }
}

#[test]
fn key_headers_with_underscores_or_outside_http_tokens_are_refused() {
    for (name, message) in [
        ("x_api_key", "`x_api_key` contains `_`"),
        ("X-Api_Key", "`X-Api_Key` contains `_`"),
        ("x api key", "`x api key` is not a valid header name"),
        ("x-api-key:", "`x-api-key:` is not a valid header name"),
        ("clé", "`clé` is not a valid header name"),
        ("", "`` is not a valid header name"),
    ] {
        let checked = policy::check(Source::new("s.toll", with_key_header(name)));
        let found: Vec<(&str, &str)> = checked
            .diagnostics
            .iter()
            .map(|d| (d.code, d.message.as_str()))
            .collect();
        assert_eq!(found, [("bad_header_name", message)], "{name}");
    }
}

#[test]
fn ordinary_key_headers_are_accepted() {
    for name in [
        "x-api-key",
        "X-Key",
        "authorization",
        "api-key",
        "x-tollgate",
    ] {
        let checked = policy::check(Source::new("s.toll", with_key_header(name)));
        assert!(
            checked.diagnostics.is_empty(),
            "{name}: {}",
            checked.render(Style::Plain)
        );
    }
}

#[test]
fn mixed_networks_warn_at_the_accept_clause() {
    let text = "service \"s\" {\n  pay_to 0x209693Bc6afc0C5328bA36FaF03C514EF312287C\n  accept x402 on base-sepolia, base\n  settle via facilitator \"https://x402.org/facilitator\"\n  default deny\n  route GET \"/x\" { price 0.01 USDC }\n}\n";
    assert_diagnostic(
        "mixed.toll",
        text,
        &Expected {
            code: "mixed_networks",
            message: "routes can be paid on testnet `base-sepolia` and on mainnet `base`",
            help: Some(
                "test tokens cost nothing, so a buyer could pick the `base-sepolia` offer and pay \
                 the mainnet price with free test money: accept testnets and mainnets in separate \
                 policies (e.g. staging and production)",
            ),
            underlined: "accept x402 on base-sepolia, base",
        },
    );
    let checked = policy::check(Source::new("mixed.toll", text));
    assert_eq!(checked.errors(), 0);
    assert!(
        checked.policy.is_some(),
        "a warning: the policy still compiles"
    );
}

#[test]
fn networks_of_one_kind_do_not_warn() {
    let devnet = "network devnet {\n  chain 31337\n  asset USDC at 0x5FbDB2315678afecb367f032d93F642f64180aa3 name \"USD Coin\" version \"2\" decimals 6\n}\n";
    let mainnet = "network other {\n  chain 10\n  asset USDC at 0x0b2c639c533813f4aa9d7837caf62653d097ff85 name \"USD Coin\" version \"2\" decimals 6\n}\n";
    for (networks, extra) in [
        ("base-sepolia, devnet", devnet),
        ("base, other", mainnet),
        ("base", ""),
    ] {
        let text = format!(
            "{extra}service \"s\" {{\n  pay_to 0x209693Bc6afc0C5328bA36FaF03C514EF312287C\n  accept x402 on {networks}\n  settle via facilitator \"https://x402.org/facilitator\"\n  default deny\n  route GET \"/x\" {{ price 0.01 USDC }}\n}}\n"
        );
        let checked = policy::check(Source::new("s.toll", text));
        assert!(
            checked.diagnostics.is_empty(),
            "{networks}: {}",
            checked.render(Style::Plain)
        );
    }
}

#[test]
fn a_bundle_window_longer_than_the_authorizations_warns_at_the_route() {
    let policy = |timeout: &str| {
        format!(
            "service \"s\" {{\n  pay_to 0x209693Bc6afc0C5328bA36FaF03C514EF312287C\n  accept x402 on base-sepolia\n  settle via facilitator \"https://x402.org/facilitator\" deferred every 5m\n  {timeout}\n  default deny\n  route GET \"/x\" {{ price 0.01 USDC }}\n}}\n"
        )
    };
    assert_diagnostic(
        "window.toll",
        &policy(""),
        &Expected {
            code: "bundle_window_too_long",
            message: "bundles here wait up to 300s, but buyers' authorizations are valid for 60s \
                      (the route's timeout): a bundle closes 30s after its first payment, 30s \
                      before they expire",
            help: Some(
                "raise the route's `timeout` to at least 330s to bundle for 300s (tollgate keeps \
                 each nonce until its authorization expires)",
            ),
            underlined: "route GET \"/x\" { price 0.01 USDC }",
        },
    );
    let checked = policy::check(Source::new("window.toll", policy("timeout 10m")));
    assert!(checked.diagnostics.is_empty(), "{:?}", checked.diagnostics);
}
