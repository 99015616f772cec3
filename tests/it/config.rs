//! `tollgate.yaml` + `TOLLGATE_*` resolution, through the public API only.

use std::net::SocketAddr;
use std::path::PathBuf;

use tollgate::config::*;

const FILE: &str = "tollgate.yaml";

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn resolve(yaml: Option<&str>, vars: &[(&str, &str)]) -> Result<Resolved, ConfigErrors> {
    Config::resolve(yaml.map(|text| (FILE, text)), env(vars))
}

fn ok(yaml: Option<&str>, vars: &[(&str, &str)]) -> Resolved {
    resolve(yaml, vars).unwrap()
}

fn errors(yaml: Option<&str>, vars: &[(&str, &str)]) -> String {
    resolve(yaml, vars).unwrap_err().to_string()
}

fn addr(text: &str) -> SocketAddr {
    text.parse()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 1)))
}

const FULL: &str = "\
listen: 127.0.0.1:18402
upstream: https://API.internal:8443/
public_url: https://api.example.com/v1/
policies: [pricing, extra/free.policy]
store: /var/lib/tollgate
ops:
  listen: 0.0.0.0:19402
admin:
  listen: 127.0.0.1:19403
  token: /run/secrets/admin-token
log:
  format: json
  level: info,tollgate=debug
";

#[test]
fn defaults_with_no_file_and_empty_env() {
    let resolved = ok(None, &[]);
    assert_eq!(resolved.warnings, Vec::<String>::new());
    let config = resolved.config;
    assert_eq!(config, Config::default());
    assert_eq!(config.listen, addr("0.0.0.0:8402"));
    assert_eq!(config.upstream.scheme, Scheme::Http);
    assert_eq!(config.upstream.host, "127.0.0.1");
    assert_eq!(config.upstream.port, 8080);
    assert_eq!(config.upstream.url, "http://127.0.0.1:8080");
    assert_eq!(config.public_url, "http://localhost:8402");
    assert_eq!(config.policies, vec![PathBuf::from("policies")]);
    assert_eq!(config.store, PathBuf::from("tollgate-data"));
    assert_eq!(config.ops.listen, addr("0.0.0.0:9402"));
    assert_eq!(config.admin.listen, addr("127.0.0.1:9403"));
    assert_eq!(config.admin.token, None);
    assert_eq!(config.log.format, LogFormat::Text);
    assert_eq!(config.log.level, "info");
    assert_eq!(config.settlement.rpc, None);
    assert_eq!(config.settlement.confirmations, 1);
    assert_eq!(config.settlement.max_fee_per_gas, 100_000_000_000);
    assert_eq!(config.settlement.replace_after_secs, 30);
}

#[test]
fn empty_or_commented_file_or_empty_sections_are_defaults() {
    for text in [
        "",
        "# nothing here\n",
        "admin:\nlog:\n",
        "public_url:\nadmin:\n  token:\n",
    ] {
        assert_eq!(ok(Some(text), &[]).config, Config::default(), "{text:?}");
    }
}

#[test]
fn full_file() {
    let config = ok(Some(FULL), &[]).config;
    assert_eq!(config.listen, addr("127.0.0.1:18402"));
    assert_eq!(
        config.upstream,
        Upstream {
            scheme: Scheme::Https,
            host: "api.internal".to_owned(),
            port: 8443,
            url: "https://api.internal:8443".to_owned(),
        }
    );
    assert_eq!(config.public_url, "https://api.example.com/v1");
    assert_eq!(
        config.policies,
        vec![PathBuf::from("pricing"), PathBuf::from("extra/free.policy")]
    );
    assert_eq!(config.store, PathBuf::from("/var/lib/tollgate"));
    assert_eq!(config.ops.listen, addr("0.0.0.0:19402"));
    assert_eq!(config.admin.listen, addr("127.0.0.1:19403"));
    assert_eq!(
        config.admin.token,
        Some(SecretRef::File(PathBuf::from("/run/secrets/admin-token")))
    );
    assert_eq!(config.log.format, LogFormat::Json);
    assert_eq!(config.log.level, "info,tollgate=debug");
}

#[test]
fn to_yaml_re_resolves_to_the_same_config() {
    for config in [Config::default(), ok(Some(FULL), &[]).config] {
        let text = config.to_yaml();
        assert_eq!(ok(Some(&text), &[]).config, config, "{text}");
    }
    let with_env_token = ok(None, &[("TOLLGATE_ADMIN_TOKEN", "s3cret")]).config;
    let text = with_env_token.to_yaml();
    assert!(text.contains("token: env:TOLLGATE_ADMIN_TOKEN"), "{text}");
    assert_eq!(ok(Some(&text), &[]).config, with_env_token);
    // Found by the `config` fuzz target (tests/fuzz): a port-0 listener's derived public URL,
    // `http://localhost:0`, was spelled out and then refused.
    for listen in ["listen: 0.0.0.0:0\n", "listen: 127.0.0.1:0\n"] {
        let config = ok(Some(listen), &[]).config;
        let text = config.to_yaml();
        assert_eq!(ok(Some(&text), &[]).config, config, "{text}");
    }
}

#[test]
fn to_yaml_of_defaults() {
    assert_eq!(
        Config::default().to_yaml(),
        "\
listen: 0.0.0.0:8402
upstream: http://127.0.0.1:8080
public_url: http://localhost:8402
policies:
- policies
store: tollgate-data
ops:
  listen: 0.0.0.0:9402
admin:
  listen: 127.0.0.1:9403
  token: null
log:
  format: text
  level: info
connections:
  max: auto
  idle_timeout: 60s
  head_timeout: 10s
  body_timeout: 30s
  body_min_rate: 1024
settlement:
  rpc: null
  confirmations: 1
  max_fee_per_gas: 100 gwei
  replace_after: 30s
"
    );
}

#[test]
fn the_settlement_rpc_comes_from_file_or_environment_and_must_be_a_url() {
    let config = ok(Some("settlement:\n  rpc: http://127.0.0.1:8545\n"), &[]).config;
    assert_eq!(
        config.settlement.rpc.as_deref(),
        Some("http://127.0.0.1:8545")
    );
    let config = ok(
        None,
        &[("TOLLGATE_SETTLEMENT_RPC", "https://rpc.example:443/v1")],
    )
    .config;
    assert_eq!(
        config.settlement.rpc.as_deref(),
        Some("https://rpc.example/v1")
    );
    let text = config.to_yaml();
    assert_eq!(ok(Some(&text), &[]).config, config, "{text}");
    assert!(
        errors(Some("settlement:\n  rpc: ftp://x\n"), &[])
            .starts_with("tollgate.yaml: settlement.rpc: invalid RPC URL"),
        "{}",
        errors(Some("settlement:\n  rpc: ftp://x\n"), &[])
    );
}

#[test]
fn settlement_confirmations_from_file_or_environment_from_1_to_1000() {
    let config = ok(Some("settlement:\n  confirmations: 12\n"), &[]).config;
    assert_eq!(config.settlement.confirmations, 12);
    let config = ok(Some("settlement:\n  confirmations: '3'\n"), &[]).config;
    assert_eq!(config.settlement.confirmations, 3);
    let config = ok(
        Some("settlement:\n  confirmations: 12\n"),
        &[("TOLLGATE_SETTLEMENT_CONFIRMATIONS", "1000")],
    )
    .config;
    assert_eq!(config.settlement.confirmations, 1000);

    let expected = "expected a number of blocks from 1 to 1000 (the block that includes the transaction counts as 1)";
    assert_eq!(
        errors(Some("settlement:\n  confirmations: 0\n"), &[]),
        format!("tollgate.yaml: settlement.confirmations: {expected}, found \"0\"")
    );
    assert_eq!(
        errors(None, &[("TOLLGATE_SETTLEMENT_CONFIRMATIONS", "1001")]),
        format!(
            "TOLLGATE_SETTLEMENT_CONFIRMATIONS (settlement.confirmations): {expected}, found \"1001\""
        )
    );
    assert_eq!(
        errors(Some("settlement:\n  confirmations: many\n"), &[]),
        format!("tollgate.yaml: settlement.confirmations: {expected}, found \"many\"")
    );
    assert_eq!(
        errors(Some("settlement:\n  confirmations: 1.5\n"), &[]),
        format!("tollgate.yaml: settlement.confirmations: {expected}, found \"1.5\"")
    );
    assert_eq!(
        errors(Some("settlement:\n  confirmation: 2\n"), &[]),
        "tollgate.yaml: settlement.confirmation: unknown field (expected one of: rpc, confirmations, max_fee_per_gas, replace_after); did you mean confirmations?"
    );
}

#[test]
fn settlement_max_fee_per_gas_is_exact_wei_from_a_number_and_a_unit() {
    let cases: [(&str, u128); 13] = [
        ("50 gwei", 50_000_000_000),
        ("0.05 gwei", 50_000_000),
        ("1500000 wei", 1_500_000),
        ("0.000000001 eth", 1_000_000_000),
        ("50gwei", 50_000_000_000),
        ("50 GWEI", 50_000_000_000),
        ("2 Eth", 2_000_000_000_000_000_000),
        ("1 wei", 1),
        ("0.000000001 gwei", 1),
        ("0.000000000000000001 eth", 1),
        ("007.25 gwei", 7_250_000_000),
        // Trailing zeros are exact, however many.
        ("1.50 gwei", 1_500_000_000),
        ("3.0000000000000 wei", 3),
    ];
    for (text, wei) in cases {
        let file = format!("settlement:\n  max_fee_per_gas: {text}\n");
        let config = ok(Some(&file), &[]).config;
        assert_eq!(config.settlement.max_fee_per_gas, wei, "{text}");
        let config = ok(None, &[("TOLLGATE_SETTLEMENT_MAX_FEE_PER_GAS", text)]).config;
        assert_eq!(config.settlement.max_fee_per_gas, wei, "{text}");
    }
    // The environment wins over the file.
    let config = ok(
        Some("settlement:\n  max_fee_per_gas: 5 gwei\n"),
        &[("TOLLGATE_SETTLEMENT_MAX_FEE_PER_GAS", "7 gwei")],
    )
    .config;
    assert_eq!(config.settlement.max_fee_per_gas, 7_000_000_000);
}

#[test]
fn settlement_max_fee_per_gas_errors() {
    let field = "tollgate.yaml: settlement.max_fee_per_gas";
    let no_unit =
        "has no unit: write the fee with one, such as \"50 gwei\" (units: wei, gwei, eth)";
    // A number without its unit, in YAML or in the environment.
    assert_eq!(
        errors(Some("settlement:\n  max_fee_per_gas: 50\n"), &[]),
        format!("{field}: \"50\" {no_unit}")
    );
    assert_eq!(
        errors(Some("settlement:\n  max_fee_per_gas: 0.05\n"), &[]),
        format!("{field}: \"0.05\" {no_unit}")
    );
    assert_eq!(
        errors(None, &[("TOLLGATE_SETTLEMENT_MAX_FEE_PER_GAS", "50")]),
        format!(
            "TOLLGATE_SETTLEMENT_MAX_FEE_PER_GAS (settlement.max_fee_per_gas): \"50\" {no_unit}"
        )
    );
    let cases = [
        (
            "0.0000000001 gwei",
            "\"0.0000000001 gwei\" is not a whole number of wei: gwei has at most 9 decimals",
        ),
        (
            "0.0000000000000000001 eth",
            "\"0.0000000000000000001 eth\" is not a whole number of wei: eth has at most 18 decimals",
        ),
        (
            "1.5 wei",
            "\"1.5 wei\" is not a whole number of wei: wei has no decimals",
        ),
        (
            "0 gwei",
            "\"0 gwei\" is too low: a fee cap is at least 1 wei",
        ),
        (
            "0.000 eth",
            "\"0.000 eth\" is too low: a fee cap is at least 1 wei",
        ),
        (
            "340282366920938463463374607431768211456 wei",
            "\"340282366920938463463374607431768211456 wei\" is too large for a fee",
        ),
        (
            "1000000000000000000000 eth",
            "\"1000000000000000000000 eth\" is too large for a fee",
        ),
        (
            "50 gwie",
            "unknown unit \"gwie\" in \"50 gwie\" (expected wei, gwei or eth, as in \"50 gwei\")",
        ),
        (
            "50  gwei",
            "unknown unit \" gwei\" in \"50  gwei\" (expected wei, gwei or eth, as in \"50 gwei\")",
        ),
    ];
    for (text, message) in cases {
        assert_eq!(
            errors(None, &[("TOLLGATE_SETTLEMENT_MAX_FEE_PER_GAS", text)]),
            format!("TOLLGATE_SETTLEMENT_MAX_FEE_PER_GAS (settlement.max_fee_per_gas): {message}"),
            "{text}"
        );
    }
    for text in [
        "gwei",
        "fast",
        "-1 gwei",
        ".5 gwei",
        "5. gwei",
        "1.2.3 gwei",
    ] {
        assert_eq!(
            errors(None, &[("TOLLGATE_SETTLEMENT_MAX_FEE_PER_GAS", text)]),
            format!(
                "TOLLGATE_SETTLEMENT_MAX_FEE_PER_GAS (settlement.max_fee_per_gas): expected a fee with a unit such as \"50 gwei\", found {text:?}"
            ),
            "{text}"
        );
    }
}

#[test]
fn settlement_replace_after_is_a_duration_of_at_least_1s() {
    let config = ok(Some("settlement:\n  replace_after: 2m\n"), &[]).config;
    assert_eq!(config.settlement.replace_after_secs, 120);
    // A bare number is seconds, as for the connection timeouts.
    let config = ok(Some("settlement:\n  replace_after: 45\n"), &[]).config;
    assert_eq!(config.settlement.replace_after_secs, 45);
    let config = ok(None, &[("TOLLGATE_SETTLEMENT_REPLACE_AFTER", "90s")]).config;
    assert_eq!(config.settlement.replace_after_secs, 90);
    assert_eq!(
        errors(Some("settlement:\n  replace_after: 0s\n"), &[]),
        "tollgate.yaml: settlement.replace_after: \"0s\" is too short: the wait before a replacement is at least 1s"
    );
    assert_eq!(
        errors(None, &[("TOLLGATE_SETTLEMENT_REPLACE_AFTER", "soon")]),
        "TOLLGATE_SETTLEMENT_REPLACE_AFTER (settlement.replace_after): `soon` is not a duration such as 90s, 30m, 12h or 30d"
    );
}

#[test]
fn settlement_settings_render_and_re_resolve() {
    let file = "\
settlement:
  rpc: http://127.0.0.1:8545
  confirmations: 3
  max_fee_per_gas: 0.05 gwei
  replace_after: 1m
";
    let config = ok(Some(file), &[]).config;
    let text = config.to_yaml();
    assert!(
        text.ends_with(
            "\
settlement:
  rpc: http://127.0.0.1:8545
  confirmations: 3
  max_fee_per_gas: 0.05 gwei
  replace_after: 60s
"
        ),
        "{text}"
    );
    assert_eq!(ok(Some(&text), &[]).config, config, "{text}");

    // The fee's text is its shortest exact form, in the unit that gives it.
    let rendered = [
        (100_000_000_000, "100 gwei"),
        (50_000_000, "0.05 gwei"),
        (1_500, "1500 wei"),
        (1, "1 wei"),
        (1_000_000_000, "1 gwei"),
        (1_000_000_001, "1000000001 wei"),
        (2_000_000_000_000_000_000, "2 eth"),
        (1_500_000_000_000_000_000, "1.5 eth"),
    ];
    for (wei, expected) in rendered {
        let mut config = Config::default();
        config.settlement.max_fee_per_gas = wei;
        let text = config.to_yaml();
        assert!(
            text.contains(&format!("\n  max_fee_per_gas: {expected}\n")),
            "{wei}: {text}"
        );
    }

    // Every fee reads back exactly: powers of ten, their neighbours, and the largest.
    let mut fees = vec![
        u128::MAX,
        u128::MAX - 1,
        123_456_789_012_345_678_901_234_567,
    ];
    let mut power: u128 = 1;
    while let Some(next) = power.checked_mul(10) {
        fees.extend([power, power + 1, power * 7 + 3, next - 1]);
        power = next;
    }
    for wei in fees {
        let mut config = Config::default();
        config.settlement.max_fee_per_gas = wei;
        let text = config.to_yaml();
        assert_eq!(ok(Some(&text), &[]).config, config, "{text}");
    }
}

#[test]
fn connection_limits_from_file_and_environment() {
    let file =
        "connections:\n  max: 500\n  idle_timeout: 2m\n  head_timeout: 5\n  body_min_rate: 0\n";
    let config = ok(Some(file), &[("TOLLGATE_CONNECTIONS_BODY_TIMEOUT", "45s")]).config;
    let limits = &config.connections;
    assert_eq!(limits.max, Some(500));
    assert_eq!(limits.idle_timeout_secs, 120);
    assert_eq!(limits.head_timeout_secs, 5);
    assert_eq!(limits.body_timeout_secs, 45);
    assert_eq!(limits.body_min_rate, 0);
    let config = ok(Some("connections:\n  max: auto\n"), &[]).config;
    assert_eq!(config.connections.max, None);
    let text = config.to_yaml();
    assert_eq!(ok(Some(&text), &[]).config, config, "{text}");

    assert_eq!(
        errors(
            Some(
                "connections:\n  max: 0\n  head_timeout: 0s\n  idle_timeout: soon\n  body_min_rate: fast\n"
            ),
            &[]
        ),
        "tollgate.yaml: connections.max: expected `auto` or a positive number of connections, found \"0\"\n\
tollgate.yaml: connections.idle_timeout: `soon` is not a duration such as 90s, 30m, 12h or 30d\n\
tollgate.yaml: connections.head_timeout: \"0s\" is too short: a timeout is at least 1s\n\
tollgate.yaml: connections.body_min_rate: expected a whole number of bytes per second, found \"fast\""
    );
}

#[test]
fn env_overrides_file() {
    let resolved = ok(
        Some(FULL),
        &[
            ("TOLLGATE_LISTEN", "0.0.0.0:7000"),
            ("TOLLGATE_UPSTREAM", "http://backend"),
            ("TOLLGATE_PUBLIC_URL", "https://pay.example.com"),
            ("TOLLGATE_STORE", "/data"),
            ("TOLLGATE_OPS_LISTEN", "0.0.0.0:7001"),
            ("TOLLGATE_ADMIN_LISTEN", "127.0.0.1:7002"),
            ("TOLLGATE_LOG_FORMAT", "text"),
            ("TOLLGATE_LOG_LEVEL", "debug"),
            ("TOLLGATE_CONFIG", "/etc/tollgate/tollgate.yaml"),
            ("PATH", "/usr/bin"),
        ],
    );
    assert_eq!(resolved.warnings, Vec::<String>::new());
    let config = resolved.config;
    assert_eq!(config.listen, addr("0.0.0.0:7000"));
    assert_eq!(config.upstream.url, "http://backend");
    assert_eq!(config.upstream.port, 80);
    assert_eq!(config.public_url, "https://pay.example.com");
    assert_eq!(config.store, PathBuf::from("/data"));
    assert_eq!(config.ops.listen, addr("0.0.0.0:7001"));
    assert_eq!(config.admin.listen, addr("127.0.0.1:7002"));
    assert_eq!(config.log.format, LogFormat::Text);
    assert_eq!(config.log.level, "debug");
    // Not overridden: kept from the file.
    assert_eq!(config.policies.len(), 2);
    assert_eq!(
        config.admin.token,
        Some(SecretRef::File(PathBuf::from("/run/secrets/admin-token")))
    );
}

#[test]
fn policies_from_env_are_a_comma_list() {
    let config = ok(
        Some("policies: one"),
        &[("TOLLGATE_POLICIES", "pricing, extra/free.policy ,/abs")],
    )
    .config;
    assert_eq!(
        config.policies,
        vec![
            PathBuf::from("pricing"),
            PathBuf::from("extra/free.policy"),
            PathBuf::from("/abs")
        ]
    );
    assert_eq!(
        ok(Some("policies: one"), &[]).config.policies,
        vec![PathBuf::from("one")]
    );
}

#[test]
fn admin_token_env_var_holds_the_token_itself() {
    let config = ok(
        Some("admin:\n  token: /run/secrets/t"),
        &[("TOLLGATE_ADMIN_TOKEN", "s3cret-value")],
    )
    .config;
    let token = SecretRef::Env("TOLLGATE_ADMIN_TOKEN".to_owned());
    assert_eq!(config.admin.token, Some(token));
    assert!(!format!("{config:?}").contains("s3cret-value"));
    assert!(!config.to_yaml().contains("s3cret-value"));
}

#[test]
fn secret_ref_text_forms() {
    let config = ok(Some("admin:\n  token: env:MY_TOKEN_1"), &[]).config;
    let token = SecretRef::Env("MY_TOKEN_1".to_owned());
    assert_eq!(token.to_string(), "env:MY_TOKEN_1");
    assert_eq!(config.admin.token, Some(token));
    let file = SecretRef::File(PathBuf::from("/run/secrets/t"));
    assert_eq!(file.to_string(), "/run/secrets/t");
}

#[test]
fn empty_env_values_are_ignored_with_a_warning() {
    let resolved = ok(Some("listen: 127.0.0.1:1234"), &[("TOLLGATE_LISTEN", " ")]);
    assert_eq!(resolved.config.listen, addr("127.0.0.1:1234"));
    assert_eq!(
        resolved.warnings,
        vec!["TOLLGATE_LISTEN is set but empty; ignored".to_owned()]
    );
}

#[test]
fn public_url_is_derived_from_listen() {
    let cases = [
        ("0.0.0.0:8402", "http://localhost:8402"),
        ("[::]:8402", "http://localhost:8402"),
        ("127.0.0.1:9000", "http://127.0.0.1:9000"),
        ("[::1]:9000", "http://[::1]:9000"),
        ("10.1.2.3:80", "http://10.1.2.3"),
    ];
    for (listen, expected) in cases {
        let config = ok(None, &[("TOLLGATE_LISTEN", listen)]).config;
        assert_eq!(config.public_url, expected, "{listen}");
    }
    // An explicit public_url wins.
    let config = ok(
        Some("listen: 127.0.0.1:9000\npublic_url: https://x.example/"),
        &[],
    )
    .config;
    assert_eq!(config.public_url, "https://x.example");
}

#[test]
fn upstream_normalisation() {
    let cases = [
        (
            "HTTPS://Example.COM:443/",
            Scheme::Https,
            "example.com",
            443,
            "https://example.com",
        ),
        (
            "http://example.com:8080",
            Scheme::Http,
            "example.com",
            8080,
            "http://example.com:8080",
        ),
        (
            "http://[::1]:8080/",
            Scheme::Http,
            "[::1]",
            8080,
            "http://[::1]:8080",
        ),
        (
            "https://svc.ns.svc.cluster.local",
            Scheme::Https,
            "svc.ns.svc.cluster.local",
            443,
            "https://svc.ns.svc.cluster.local",
        ),
    ];
    for (text, scheme, host, port, url) in cases {
        let upstream = ok(None, &[("TOLLGATE_UPSTREAM", text)]).config.upstream;
        let expected = Upstream {
            scheme,
            host: host.to_owned(),
            port,
            url: url.to_owned(),
        };
        assert_eq!(upstream, expected, "{text}");
    }
}

#[test]
fn socket_address_errors() {
    assert_eq!(
        errors(Some("admin:\n  listen: x"), &[]),
        "tollgate.yaml: admin.listen: invalid socket address \"x\" (expected host:port such as 127.0.0.1:9403)"
    );
    assert_eq!(
        errors(None, &[("TOLLGATE_ADMIN_LISTEN", "x")]),
        "TOLLGATE_ADMIN_LISTEN (admin.listen): invalid socket address \"x\" (expected host:port such as 127.0.0.1:9403)"
    );
    assert_eq!(
        errors(Some("listen: localhost:8402"), &[]),
        "tollgate.yaml: listen: invalid socket address \"localhost:8402\" (expected host:port such as 0.0.0.0:8402)"
    );
    assert_eq!(
        errors(None, &[("TOLLGATE_OPS_LISTEN", "9402")]),
        "TOLLGATE_OPS_LISTEN (ops.listen): invalid socket address \"9402\" (expected host:port such as 0.0.0.0:9402)"
    );
}

#[test]
fn upstream_errors() {
    let cases = [
        ("ftp://x", "scheme must be http or https"),
        (
            "127.0.0.1:8080",
            "expected http:// or https:// followed by a host",
        ),
        ("http://", "missing host"),
        ("http://:8080", "missing host"),
        ("http://x/api", "upstream must be a base URL without a path"),
        ("http://x?a=1", "must not have a query or fragment"),
        ("http://x/#top", "must not have a query or fragment"),
        ("http://user:pw@x", "must not contain user info"),
        ("http://x:0", "invalid port \"0\""),
        ("http://x:99999", "invalid port \"99999\""),
        ("http://x:", "invalid port \"\""),
        ("http://x:+80", "invalid port \"+80\""),
        (
            "http://ex ample",
            "must not contain spaces or control characters",
        ),
        ("http://ex!ample", "invalid host \"ex!ample\""),
        ("http://[zz]:80", "invalid host \"[zz]\""),
    ];
    for (text, reason) in cases {
        assert_eq!(
            errors(None, &[("TOLLGATE_UPSTREAM", text)]),
            format!("TOLLGATE_UPSTREAM (upstream): invalid upstream URL \"{text}\": {reason}"),
        );
    }
    assert_eq!(
        errors(Some("upstream: ftp://x"), &[]),
        "tollgate.yaml: upstream: invalid upstream URL \"ftp://x\": scheme must be http or https"
    );
}

#[test]
fn public_url_errors() {
    assert_eq!(
        errors(Some("public_url: example.com"), &[]),
        "tollgate.yaml: public_url: invalid public URL \"example.com\": expected http:// or https:// followed by a host"
    );
    assert_eq!(
        errors(Some("public_url: https://x.example/a?b"), &[]),
        "tollgate.yaml: public_url: invalid public URL \"https://x.example/a?b\": must not have a query or fragment"
    );
}

#[test]
fn log_errors() {
    assert_eq!(
        errors(Some("log:\n  format: xml"), &[]),
        "tollgate.yaml: log.format: unknown log format \"xml\" (expected text or json)"
    );
    assert_eq!(
        errors(None, &[("TOLLGATE_LOG_LEVEL", "info; rm")]),
        "TOLLGATE_LOG_LEVEL (log.level): invalid log level \"info; rm\" (expected error, warn, info, debug, trace or directives like \"info,tollgate=debug\")"
    );
    assert_eq!(
        errors(Some("log:\n  level: ''"), &[]),
        "tollgate.yaml: log.level: invalid log level \"\" (expected error, warn, info, debug, trace or directives like \"info,tollgate=debug\")"
    );
    assert_eq!(
        ok(None, &[("TOLLGATE_LOG_FORMAT", "JSON")])
            .config
            .log
            .format,
        LogFormat::Json
    );
}

#[test]
fn policies_and_store_errors() {
    assert_eq!(
        errors(Some("policies: []"), &[]),
        "tollgate.yaml: policies: expected at least one policy file or folder"
    );
    assert_eq!(
        errors(Some("policies: [a, '']"), &[]),
        "tollgate.yaml: policies[1]: must not be empty"
    );
    assert_eq!(
        errors(None, &[("TOLLGATE_POLICIES", "a,,b")]),
        "TOLLGATE_POLICIES (policies[1]): must not be empty"
    );
    assert_eq!(
        errors(Some("policies: [a, [b], {c: d}]"), &[]),
        "tollgate.yaml: policies[1]: expected a string\ntollgate.yaml: policies[2]: expected a string"
    );
    assert_eq!(
        errors(Some("policies: {a: b}"), &[]),
        "tollgate.yaml: policies: expected a string or a list of strings"
    );
    assert_eq!(
        errors(Some("store: ''"), &[]),
        "tollgate.yaml: store: must not be empty"
    );
    // Numbers make sense as names of folders.
    let config = ok(Some("store: 2024\npolicies: [2025]"), &[]).config;
    assert_eq!(config.store, PathBuf::from("2024"));
    assert_eq!(config.policies, vec![PathBuf::from("2025")]);
}

#[test]
fn admin_token_errors() {
    assert_eq!(
        errors(Some("admin:\n  token: 'env:'"), &[]),
        "tollgate.yaml: admin.token: missing variable name after \"env:\" (expected env:NAME)"
    );
    assert_eq!(
        errors(Some("admin:\n  token: env:MY-TOKEN"), &[]),
        "tollgate.yaml: admin.token: invalid environment variable name \"MY-TOKEN\" (expected letters, digits and _)"
    );
    assert_eq!(
        errors(Some("admin:\n  token: ''"), &[]),
        "tollgate.yaml: admin.token: must not be empty (expected env:NAME or a file path)"
    );
}

#[test]
fn wrong_yaml_types() {
    assert_eq!(
        errors(Some("admin: 5"), &[]),
        "tollgate.yaml: admin: expected a mapping"
    );
    assert_eq!(
        errors(Some("listen: [1, 2]"), &[]),
        "tollgate.yaml: listen: expected a string"
    );
    assert_eq!(
        errors(Some("listen: 8402"), &[]),
        "tollgate.yaml: listen: expected a string"
    );
    assert_eq!(
        errors(Some("log:\n  format: true"), &[]),
        "tollgate.yaml: log.format: expected a string"
    );
    assert_eq!(
        errors(Some("- listen"), &[]),
        "tollgate.yaml: expected a mapping"
    );
    assert_eq!(
        errors(Some("1: x"), &[]),
        "tollgate.yaml: keys must be strings, found a number"
    );
}

#[test]
fn unknown_keys_are_errors_with_suggestions() {
    assert_eq!(
        errors(Some("admin:\n  lisen: 127.0.0.1:1"), &[]),
        "tollgate.yaml: admin.lisen: unknown field (expected one of: listen, token); did you mean listen?"
    );
    assert_eq!(
        errors(Some("storage: x"), &[]),
        "tollgate.yaml: storage: unknown field (expected one of: listen, upstream, public_url, policies, store, ops, admin, log, connections, settlement); did you mean store?"
    );
    assert_eq!(
        errors(Some("log:\n  colour: true"), &[]),
        "tollgate.yaml: log.colour: unknown field (expected one of: format, level)"
    );
}

#[test]
fn yaml_syntax_error_is_one_error_for_the_whole_file() {
    let err = resolve(Some("listen: [1,\n store: x"), &[]);
    let Err(ConfigErrors(list)) = err else {
        unreachable!("expected an error, got {err:?}");
    };
    assert_eq!(list.len(), 1);
    let first = list.first().map(|e| {
        (
            e.field.as_str(),
            e.origin.clone(),
            e.message.contains("line"),
        )
    });
    assert_eq!(first, Some(("", Origin::File(FILE.to_owned()), true)));
    let text = ConfigErrors(list).to_string();
    assert!(text.starts_with("tollgate.yaml: "), "{text}");
    assert!(!text.starts_with("tollgate.yaml: : "), "{text}");
}

#[test]
fn all_errors_are_reported_at_once() {
    let yaml = "\
listen: nope
upstream: ftp://x
admin:
  listen: x
  tokn: y
log:
  format: xml
";
    let vars = [
        ("TOLLGATE_STORE", "ok"),
        ("TOLLGATE_OPS_LISTEN", "bad"),
        ("TOLLGATE_LOG_LEVEL", "a b"),
    ];
    assert_eq!(
        errors(Some(yaml), &vars),
        "\
tollgate.yaml: admin.tokn: unknown field (expected one of: listen, token); did you mean token?
tollgate.yaml: listen: invalid socket address \"nope\" (expected host:port such as 0.0.0.0:8402)
tollgate.yaml: upstream: invalid upstream URL \"ftp://x\": scheme must be http or https
TOLLGATE_OPS_LISTEN (ops.listen): invalid socket address \"bad\" (expected host:port such as 0.0.0.0:9402)
tollgate.yaml: admin.listen: invalid socket address \"x\" (expected host:port such as 127.0.0.1:9403)
tollgate.yaml: log.format: unknown log format \"xml\" (expected text or json)
TOLLGATE_LOG_LEVEL (log.level): invalid log level \"a b\" (expected error, warn, info, debug, trace or directives like \"info,tollgate=debug\")"
    );
}

#[test]
fn unknown_env_vars_are_warnings() {
    let resolved = ok(
        None,
        &[
            ("TOLLGATE_LISTNE", "0.0.0.0:1"),
            ("TOLLGATE_FOO", "x"),
            ("TOLLGATE_CONFIG", "tollgate.yaml"),
            ("TOLLGATE_ADMIN_TOKN", "secret-value"),
            // Injected by Kubernetes for a Service named `tollgate`: not settings.
            ("TOLLGATE_SERVICE_HOST", "10.0.0.7"),
            ("TOLLGATE_PORT", "tcp://10.0.0.7:8402"),
            ("TOLLGATE_PORT_8402_TCP_ADDR", "10.0.0.7"),
            ("OTHER_LISTEN", "x"),
        ],
    );
    assert_eq!(
        resolved.warnings,
        vec![
            "unknown environment variable TOLLGATE_ADMIN_TOKN; did you mean TOLLGATE_ADMIN_TOKEN?"
                .to_owned(),
            "unknown environment variable TOLLGATE_FOO".to_owned(),
            "unknown environment variable TOLLGATE_LISTNE; did you mean TOLLGATE_LISTEN?"
                .to_owned(),
        ]
    );
    assert_eq!(resolved.config, Config::default());
}

#[test]
fn listeners_must_not_share_a_port() {
    assert_eq!(
        errors(None, &[("TOLLGATE_OPS_LISTEN", "127.0.0.1:8402")]),
        "TOLLGATE_OPS_LISTEN (ops.listen): address 127.0.0.1:8402 conflicts with listen (0.0.0.0:8402); each listener needs its own port"
    );
    assert_eq!(
        errors(Some("listen: 0.0.0.0:9403"), &[]),
        "tollgate.yaml: listen: address 0.0.0.0:9403 conflicts with admin.listen (127.0.0.1:9403); each listener needs its own port"
    );
    // Different IPs on the same port, and port 0, are fine.
    ok(
        None,
        &[
            ("TOLLGATE_LISTEN", "127.0.0.1:9403"),
            ("TOLLGATE_ADMIN_LISTEN", "127.0.0.2:9403"),
        ],
    );
    ok(
        None,
        &[
            ("TOLLGATE_LISTEN", "127.0.0.1:0"),
            ("TOLLGATE_OPS_LISTEN", "127.0.0.1:0"),
        ],
    );
}

#[test]
fn exposed_admin_without_token_is_a_warning() {
    let resolved = ok(None, &[("TOLLGATE_ADMIN_LISTEN", "0.0.0.0:9403")]);
    assert_eq!(
        resolved.warnings,
        vec![
            "admin API on 0.0.0.0:9403 is reachable from other hosts but admin.token is not set (a generated token in the store directory protects it)"
                .to_owned()
        ]
    );
    let resolved = ok(
        None,
        &[
            ("TOLLGATE_ADMIN_LISTEN", "0.0.0.0:9403"),
            ("TOLLGATE_ADMIN_TOKEN", "t"),
        ],
    );
    assert_eq!(resolved.warnings, Vec::<String>::new());
}

#[test]
fn error_display_formats() {
    let file = ConfigError {
        field: "admin.listen".to_owned(),
        origin: Origin::File("tollgate.yaml".to_owned()),
        message: "m".to_owned(),
    };
    let env = ConfigError {
        field: "admin.listen".to_owned(),
        origin: Origin::Env("TOLLGATE_ADMIN_LISTEN".to_owned()),
        message: "m".to_owned(),
    };
    assert_eq!(file.to_string(), "tollgate.yaml: admin.listen: m");
    assert_eq!(env.to_string(), "TOLLGATE_ADMIN_LISTEN (admin.listen): m");
    assert_eq!(
        ConfigErrors(vec![file, env]).to_string(),
        "tollgate.yaml: admin.listen: m\nTOLLGATE_ADMIN_LISTEN (admin.listen): m"
    );
}

#[test]
fn load_reports_an_unreadable_file() {
    let missing = std::path::Path::new("/nonexistent/tollgate.yaml");
    let Err(ConfigErrors(list)) = Config::load(Some(missing)) else {
        unreachable!("a missing file must be an error");
    };
    let text = ConfigErrors(list).to_string();
    assert!(
        text.starts_with("/nonexistent/tollgate.yaml: cannot read configuration file: "),
        "{text}"
    );
}

#[test]
fn example_settlement_section_uncommented_is_the_defaults_plus_an_rpc() {
    let text = include_str!("../../examples/tollgate.yaml");
    let (_, commented) = text
        .split_once("# settlement:\n")
        .expect("the example has a commented settlement section");
    let section: String = commented
        .lines()
        .map(|line| format!("{}\n", line.strip_prefix("# ").unwrap_or(line)))
        .collect();
    let resolved = ok(Some(&format!("settlement:\n{section}")), &[]);
    assert_eq!(resolved.warnings, Vec::<String>::new());
    let mut expected = Config::default();
    expected.settlement.rpc = Some("https://sepolia.base.org".to_owned());
    assert_eq!(resolved.config, expected);
}

#[test]
fn example_file_is_the_defaults_plus_an_admin_token() {
    let text = include_str!("../../examples/tollgate.yaml");
    let resolved = ok(Some(text), &[]);
    assert_eq!(resolved.warnings, Vec::<String>::new());
    let mut expected = Config::default();
    expected.admin.token = Some(SecretRef::Env("TOLLGATE_ADMIN_TOKEN".to_owned()));
    assert_eq!(resolved.config, expected);
}
