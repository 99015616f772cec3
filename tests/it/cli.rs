//! The `tollgate` binary as an operator runs it: exit codes, stdout and stderr.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

const WEATHER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/policies/weather.toll");
const POLICIES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/policies");
/// Example policies that `tollgate run` does not serve by default (a local dev chain).
const EXAMPLE_POLICIES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/policies");

fn tollgate(args: &[&str]) -> Output {
    tollgate_in(Path::new(env!("CARGO_MANIFEST_DIR")), args)
}

fn tollgate_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .current_dir(dir)
        .env_remove("TOLLGATE_CONFIG")
        .env("NO_COLOR", "1")
        .output()
        .expect("run tollgate")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fresh, empty folder under the system temp dir.
fn scratch() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tollgate-cli-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write file");
}

#[test]
fn check_accepts_the_shipped_policies() {
    let o = tollgate(&["check", POLICIES, EXAMPLE_POLICIES]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("0 errors, 0 warnings"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("ok    ") && stdout(&o).contains("weather.toll"));
}

#[test]
fn check_defaults_to_the_policies_folder() {
    let o = tollgate(&["check"]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("policies/weather.toll"));
}

#[test]
fn check_reports_every_error_with_location_caret_and_hint() {
    let dir = scratch();
    write(
        &dir.join("bad.toll"),
        "service \"s\" {\n  pay_to 0x209693Bc6afc0C5328bA36FaF03C514EF312287C\n  accept x402 on base-sepolai\n  settle via facilitator \"https://x402.org/facilitator\"\n  default deny\n  route GET \"/a\" { fre }\n}\n",
    );
    let o = tollgate_in(&dir, &["check", "bad.toll"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("bad.toll:3:18"), "{err}");
    assert!(err.contains("did you mean `base-sepolia`?"), "{err}");
    assert!(err.contains("bad.toll:6:20"), "{err}");
    assert!(err.contains("did you mean `free`?"), "{err}");
    assert!(err.contains("^^^"), "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "no colour codes when NO_COLOR is set: {err}"
    );
    assert!(stdout(&o).contains("2 errors"), "{}", stdout(&o));
}

#[test]
fn check_config_reports_field_paths() {
    let dir = scratch();
    write(
        &dir.join("tollgate.yaml"),
        "admin:\n  listen: x\nlog:\n  format: xml\n",
    );
    let o = tollgate_in(&dir, &["check", "--config", "tollgate.yaml", WEATHER]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("admin.listen: invalid socket address \"x\""),
        "{err}"
    );
    assert!(
        err.contains("log.format: unknown log format \"xml\""),
        "{err}"
    );

    write(&dir.join("tollgate.yaml"), "listen: 127.0.0.1:9000\n");
    let o = tollgate_in(&dir, &["check", "--config", "tollgate.yaml", WEATHER]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("ok    config tollgate.yaml"));
}

#[test]
fn check_without_policies_is_a_usage_error() {
    let dir = scratch();
    let o = tollgate_in(&dir, &["check"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("error: "), "{}", stderr(&o));
}

#[test]
fn fmt_rewrites_and_checks() {
    let dir = scratch();
    let messy = "# header\nservice   \"s\"   {\n\n\n  default    deny # trailing\n  route GET \"/h\"   {\n    free\n  }\n}";
    write(&dir.join("s.toll"), messy);
    let o = tollgate_in(&dir, &["fmt", "--check", "s.toll"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("would reformat s.toll"));

    let o = tollgate_in(&dir, &["fmt", "s.toll"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let formatted = std::fs::read_to_string(dir.join("s.toll")).unwrap_or_default();
    assert_eq!(
        formatted,
        "# header\nservice \"s\" {\n  default deny  # trailing\n  route GET \"/h\" { free }\n}\n"
    );

    let o = tollgate_in(&dir, &["fmt", "--check", "s.toll"]);
    assert_eq!(o.status.code(), Some(0));
}

#[test]
fn fmt_refuses_files_with_syntax_errors() {
    let dir = scratch();
    write(&dir.join("s.toll"), "service \"s\" {\n  defualt deny\n}\n");
    let o = tollgate_in(&dir, &["fmt", "s.toll"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("unknown keyword `defualt`"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("s.toll")).unwrap_or_default(),
        "service \"s\" {\n  defualt deny\n}\n"
    );
}

#[test]
fn shipped_policies_are_canonical() {
    let o = tollgate(&["fmt", "--check", POLICIES, EXAMPLE_POLICIES]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "run `tollgate fmt policies`: {}",
        stdout(&o)
    );
}

#[test]
fn explain_shows_route_prices_limits_and_reasons() {
    let o = tollgate(&[
        "explain",
        "--policy",
        WEATHER,
        "GET",
        "https://api.example.com/v1/forecast/paris?days=3",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    for expected in [
        "route     GET /v1/forecast/{city}",
        "params    city = paris",
        "0.001 USDC on base-sepolia (eip155:84532) = 1000 atomic units",
        "prepaid  1 credit from the key in `x-api-key`",
        "limits    60 requests per minute; 5 USDC per day",
        "decision  challenge — 402 Payment Required",
        "because   no API key and no payment",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }

    let o = tollgate(&[
        "explain",
        "--policy",
        WEATHER,
        "GET",
        "/v1/forecast/paris",
        "-H",
        "X-Api-Key: tg_x",
        "--balance",
        "0",
    ]);
    assert!(
        stdout(&o).contains("hint credits_exhausted"),
        "{}",
        stdout(&o)
    );

    let o = tollgate(&[
        "explain",
        "--policy",
        WEATHER,
        "GET",
        "/v1/forecast/paris",
        "-H",
        "x-api-key: tg_x",
    ]);
    assert!(
        stdout(&o).contains("decision  prepaid — debit 1 credit"),
        "{}",
        stdout(&o)
    );

    // Lower-case methods are refused, as the sidecar will refuse them.
    let o = tollgate(&["explain", "--policy", WEATHER, "get", "/health"]);
    assert!(
        stdout(&o).contains("decision  bad_request"),
        "{}",
        stdout(&o)
    );

    // So are paths an upstream could read another way than the policy does.
    for path in [
        "/v1/forecast;x=1/paris",
        "/v1\\forecast/paris",
        "/V1/Forecast/paris",
    ] {
        let o = tollgate(&["explain", "--policy", WEATHER, "GET", path]);
        assert!(
            stdout(&o).contains("decision  bad_request"),
            "{path}: {}",
            stdout(&o)
        );
    }

    let o = tollgate(&["explain", "--policy", WEATHER, "GET", "/nowhere"]);
    assert!(
        stdout(&o).contains("route     none matches"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("`default deny`"), "{}", stdout(&o));
}

/// A service with an upgradable paid route, an upgradable free one, and a plain paid one.
const UPGRADES: &str = "service \"chat\" {\n  pay_to 0x209693Bc6afc0C5328bA36FaF03C514EF312287C\n  accept x402 on base-sepolia\n  settle via facilitator \"https://x402.org/facilitator\"\n  default deny\n  route GET \"/v1/stream\" {\n    price 0.01 USDC\n    upgrade WebSocket\n  }\n  route GET \"/v1/echo\" {\n    free\n    upgrade websocket, h2c\n  }\n  route GET \"/v1/plain\" { price 0.01 USDC }\n}\n";

#[test]
fn explain_shows_upgrades_priced_per_connection() {
    let dir = scratch();
    write(&dir.join("chat.toll"), UPGRADES);
    let o = tollgate_in(
        &dir,
        &["explain", "--policy", "chat.toll", "GET", "/v1/stream"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains(
            "upgrade   websocket allowed, priced per connection: the price pays for the whole upgraded connection"
        ),
        "{}",
        stdout(&o)
    );

    let o = tollgate_in(
        &dir,
        &["explain", "--policy", "chat.toll", "GET", "/v1/echo"],
    );
    assert!(
        stdout(&o).contains("upgrade   websocket, h2c allowed; the upgraded connection is free"),
        "{}",
        stdout(&o)
    );

    let o = tollgate_in(
        &dir,
        &["explain", "--policy", "chat.toll", "GET", "/v1/plain"],
    );
    assert!(!stdout(&o).contains("upgrade"), "{}", stdout(&o));
}

#[test]
fn check_reports_upgrade_mistakes() {
    let dir = scratch();
    write(
        &dir.join("bad.toll"),
        "service \"s\" {\n  default deny\n  route GET \"/ws\" {\n    deny\n    upgrade websocket\n  }\n}\n",
    );
    let o = tollgate_in(&dir, &["check", "bad.toll"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("error[upgrade_on_deny]: `upgrade` on a route that is denied"),
        "{err}"
    );
    assert!(err.contains("bad.toll:5:5"), "{err}");
}

#[test]
fn check_warns_when_a_route_takes_testnet_and_mainnet_but_passes() {
    let dir = scratch();
    write(
        &dir.join("mixed.toll"),
        &UPGRADES.replace(
            "accept x402 on base-sepolia",
            "accept x402 on base-sepolia, base",
        ),
    );
    let o = tollgate_in(&dir, &["check", "mixed.toll"]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(
            "warning[mixed_networks]: routes can be paid on testnet `base-sepolia` and on mainnet `base`"
        ),
        "{err}"
    );
    assert!(err.contains("mixed.toll:3:3"), "{err}");
    assert!(err.contains("offered on both, as is 1 more route"), "{err}");
    assert!(stdout(&o).contains("0 errors, 1 warning"), "{}", stdout(&o));
    // A warning never keeps the sidecar from starting: `tollgate run` loads the policy.
    let loaded = tollgate::reload::load(&[dir.join("mixed.toll")]);
    assert!(loaded.is_ok(), "{loaded:?}");
}

#[test]
fn explain_rejects_bad_input_clearly() {
    let o = tollgate(&["explain", "--policy", WEATHER, "GET", "v1/x"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("neither a URL"), "{}", stderr(&o));
    let o = tollgate(&["explain", "--policy", WEATHER, "GET", "/x", "-H", "novalue"]);
    assert_eq!(o.status.code(), Some(2));
    let o = tollgate(&["explain", "--policy", "/no/such.toll", "GET", "/x"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cannot read policy"), "{}", stderr(&o));
}

#[test]
fn test_command_passes_on_shipped_policies() {
    let o = tollgate(&["test", POLICIES, EXAMPLE_POLICIES]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains(" passed, 0 failed"), "{}", stdout(&o));
}

#[test]
fn test_command_shows_the_failing_case_and_the_difference() {
    let dir = scratch();
    write(
        &dir.join("api.toll"),
        "service \"api\" {\n  accept prepaid\n  default deny\n  route GET \"/x\" { price 2 credits }\n}\n\ntest \"x costs one credit\" {\n  request GET \"/x\"\n  header \"x-api-key\" \"k\"\n  expect prepaid 1 credit\n}\n",
    );
    write(
        &dir.join("api.test.toll"),
        "test \"side file case\" {\n  request GET \"/y\"\n  expect deny\n}\n",
    );
    let o = tollgate_in(&dir, &["test", "."]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(
        out.contains("FAIL  x costs one credit (./api.toll:7)"),
        "{out}"
    );
    assert!(out.contains("expected  prepaid 1 credit"), "{out}");
    assert!(
        out.contains("actual    prepaid 2 credits (route GET /x"),
        "{out}"
    );
    assert!(out.contains("ok    side file case"), "{out}");
    assert!(out.contains("1 passed, 1 failed"), "{out}");
}

#[test]
fn help_speaks_the_operators_language() {
    let o = tollgate(&["--help"]);
    let out = stdout(&o);
    assert!(out.contains("x402") && out.contains("prepaid"), "{out}");
    for cmd in ["check", "fmt", "explain", "test"] {
        assert!(out.contains(cmd), "{out}");
    }
}

/// A port another process listens on is refused at startup, in words, instead of Pingora
/// retrying it for 30 s while readiness says yes.
#[test]
fn run_refuses_an_address_another_process_listens_on() {
    let dir = scratch();
    write(
        &dir.join("policy.toll"),
        &std::fs::read_to_string(WEATHER).unwrap(),
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let config = format!(
        "listen: 127.0.0.1:{port}\npolicies: [policy.toll]\nstore: data\nops:\n  listen: 127.0.0.1:{}\nadmin:\n  listen: 127.0.0.1:{}\n",
        free(),
        free()
    );
    write(&dir.join("tollgate.yaml"), &config);
    let o = tollgate_in(&dir, &["run", "--config", "tollgate.yaml"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!(
            "listen 127.0.0.1:{port}: cannot listen: another process listens there"
        )),
        "{}",
        stderr(&o)
    );
}
