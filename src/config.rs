//! The sidecar's own configuration: `tollgate.yaml` plus `TOLLGATE_*` environment overrides.
//!
//! This module owns reading that text into a resolved, validated [`Config`]. It does no
//! networking, binds nothing and reads no policy files (it only records their paths), nor
//! does it read secrets: `admin.token` stays a [`SecretRef`] until the admin API needs it.
//!
//! Two stages, in the style of ripgrep's low/high-level arguments:
//!
//! 1. **raw**: the YAML document is parsed into a [`serde_yaml::Value`] and walked by hand
//!    (so every error keeps its field path and all of them are collected), then the
//!    environment overrides are layered on top. The result is still plain text per field,
//!    each value remembering where it came from ([`Origin`]).
//! 2. **resolved**: every field's text is parsed and validated into the typed [`Config`];
//!    fields that were not set keep their defaults.
//!
//! Environment overrides follow the field path with `.` → `_`, upper case and a `TOLLGATE_`
//! prefix (`admin.listen` → `TOLLGATE_ADMIN_LISTEN`). Two exceptions:
//! `TOLLGATE_POLICIES` is a comma-separated list, and `TOLLGATE_ADMIN_TOKEN` holds the admin
//! token *itself* (as a Kubernetes `secretKeyRef` would inject it), so setting it makes
//! `admin.token` = `env:TOLLGATE_ADMIN_TOKEN`; its value is never parsed or shown.
//! `TOLLGATE_CONFIG` is reserved for the command line (the path of the file).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde_yaml::{Mapping, Value};

/// Prefix of every environment variable this module reads.
pub const ENV_PREFIX: &str = "TOLLGATE_";
/// Environment variable reserved for the command line: the path of `tollgate.yaml`.
pub const CONFIG_ENV: &str = "TOLLGATE_CONFIG";

const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8402);
const DEFAULT_OPS_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 9402);
const DEFAULT_ADMIN_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9403);
const DEFAULT_UPSTREAM_HOST: &str = "127.0.0.1";
const DEFAULT_UPSTREAM_PORT: u16 = 8080;
const DEFAULT_POLICIES: &str = "policies";
const DEFAULT_STORE: &str = "tollgate-data";
const DEFAULT_LOG_LEVEL: &str = "info";

// ---------------------------------------------------------------------------------------------
// Resolved types
// ---------------------------------------------------------------------------------------------

/// The resolved, validated sidecar configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The proxy listener: the address clients call. Default `0.0.0.0:8402`.
    pub listen: SocketAddr,
    /// The service tollgate protects. Default `http://127.0.0.1:8080`.
    pub upstream: Upstream,
    /// Absolute base URL used in x402 `resource` URLs, without a trailing slash.
    /// Default derived from `listen`: `http://localhost:<port>` when its IP is unspecified,
    /// else `http://<ip>:<port>`.
    pub public_url: String,
    /// Policy files or folders. Default `["policies"]`.
    pub policies: Vec<PathBuf>,
    /// The sled store directory. Default `tollgate-data`.
    pub store: PathBuf,
    /// The operations listener (`/healthz`, `/readyz`, `/metrics`).
    pub ops: OpsConfig,
    /// The admin API listener and its token.
    pub admin: AdminConfig,
    /// Logging.
    pub log: LogConfig,
    /// How many client connections, and how long they may idle or dawdle.
    pub connections: ConnectionLimits,
    /// Settlement's own settings.
    pub settlement: SettlementConfig,
}

/// Settlement settings that belong to the deployment, not to the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettlementConfig {
    /// A JSON-RPC node of the chain payments settle on (`settlement.rpc`), read for evidence:
    /// a payment whose settlement outcome is unknown (`unresolved`) is decided from the token's
    /// `authorizationState` and `AuthorizationUsed`/`Transfer` events. Without it, unresolved
    /// payments stay unresolved and are reported, never guessed.
    pub rpc: Option<String>,
    /// Blocks a settlement transaction sent by tollgate's relayer (`settle via rpc`) must have,
    /// the block that includes it counting as 1, before its payments are `confirmed`
    /// (`settlement.confirmations`). From 1 to [`MAX_CONFIRMATIONS`]; default 1.
    pub confirmations: u64,
    /// The most, in wei, the relayer offers per gas for a settlement transaction
    /// (`settlement.max_fee_per_gas`, written with a unit: `50 gwei`, `1500000 wei`), replacements
    /// included. At least 1 wei; default 100 gwei.
    pub max_fee_per_gas: u128,
    /// Seconds a settlement transaction sent by the relayer may wait unmined before it is
    /// replaced: the same nonce with a higher fee, never above `max_fee_per_gas`
    /// (`settlement.replace_after`). At least 1; default 30.
    pub replace_after_secs: u64,
}

/// The most `settlement.confirmations` may ask for.
pub const MAX_CONFIRMATIONS: u64 = 1000;

impl Default for SettlementConfig {
    fn default() -> Self {
        SettlementConfig {
            rpc: None,
            confirmations: 1,
            max_fee_per_gas: 100_000_000_000,
            replace_after_secs: 30,
        }
    }
}

/// Protection of the proxy listener against idle and slow clients (README "Security").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Concurrent client connections; more are answered `503 connection_limit` and closed.
    /// `None` (`auto`, the default): as many as the file-descriptor limit allows, at most
    /// [`DEFAULT_MAX_CONNECTIONS`] (each client connection may need an upstream one too).
    pub max: Option<usize>,
    /// Seconds a kept-alive connection may wait for its next request. Default 60.
    pub idle_timeout_secs: u64,
    /// Seconds to receive a whole request head, from its first byte (from the connection's
    /// start for the first request). Default 10.
    pub head_timeout_secs: u64,
    /// Seconds the request body may pause between two reads, and a response between two
    /// writes (a client that stopped reading). Default 30.
    pub body_timeout_secs: u64,
    /// Bytes per second a request body must average once it has taken longer than
    /// `body_timeout`. Default 1024.
    pub body_min_rate: u64,
}

/// The cap on client connections when `connections.max` is `auto`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max: None,
            idle_timeout_secs: 60,
            head_timeout_secs: 10,
            body_timeout_secs: 30,
            body_min_rate: 1024,
        }
    }
}

/// The upstream service, a base URL without path, query or fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// Host as written in the URL, lower-cased; an IPv6 literal keeps its brackets (`[::1]`).
    pub host: String,
    /// The explicit port, else 80 for http and 443 for https.
    pub port: u16,
    /// Normalised URL: lower-case scheme and host, default port omitted, no trailing slash.
    pub url: String,
}

/// URL scheme accepted for the upstream and the public URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `http://`
    Http,
    /// `https://`
    Https,
}

impl Scheme {
    /// 80 for http, 443 for https.
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The operations listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpsConfig {
    /// Default `0.0.0.0:9402` (reachable by Kubernetes probes).
    pub listen: SocketAddr,
}

/// The admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Default `127.0.0.1:9403`.
    pub listen: SocketAddr,
    /// Where the admin bearer token is kept. Default `None`: `tollgate run` generates one into
    /// `<store>/admin.token` ([`crate::admin::token`]).
    pub token: Option<SecretRef>,
}

/// Where a secret is kept; never the secret itself.
///
/// Text form: `env:NAME` for an environment variable, anything else is a file path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    /// The secret is the value of this environment variable.
    Env(String),
    /// The secret is the content of this file.
    File(PathBuf),
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env(name) => write!(f, "env:{name}"),
            SecretRef::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// Default `text`.
    pub format: LogFormat,
    /// A tracing filter (`info`, `info,tollgate=debug`, ...). Default `info`.
    pub level: String,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Default for Upstream {
    fn default() -> Self {
        let scheme = Scheme::Http;
        Upstream {
            scheme,
            host: DEFAULT_UPSTREAM_HOST.to_owned(),
            port: DEFAULT_UPSTREAM_PORT,
            url: base_url(scheme, DEFAULT_UPSTREAM_HOST, DEFAULT_UPSTREAM_PORT, ""),
        }
    }
}

impl Default for OpsConfig {
    fn default() -> Self {
        OpsConfig {
            listen: DEFAULT_OPS_LISTEN,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: DEFAULT_ADMIN_LISTEN,
            token: None,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: DEFAULT_LOG_LEVEL.to_owned(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN,
            upstream: Upstream::default(),
            public_url: public_url_for(DEFAULT_LISTEN),
            policies: vec![PathBuf::from(DEFAULT_POLICIES)],
            store: PathBuf::from(DEFAULT_STORE),
            ops: OpsConfig::default(),
            admin: AdminConfig::default(),
            log: LogConfig::default(),
            connections: ConnectionLimits::default(),
            settlement: SettlementConfig::default(),
        }
    }
}

/// A resolved configuration and the non-fatal findings made on the way.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The configuration.
    pub config: Config,
    /// Warnings for the operator (unknown `TOLLGATE_*` variables, ...), one sentence each.
    pub warnings: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The configuration file, by display name.
    File(String),
    /// An environment variable, by name.
    Env(String),
}

/// One invalid configuration value.
///
/// Displays as `tollgate.yaml: admin.listen: <message>` or
/// `TOLLGATE_ADMIN_LISTEN (admin.listen): <message>`; an empty `field` (a YAML syntax error,
/// an unreadable file) is left out: `tollgate.yaml: <message>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted field path such as `admin.listen`, `policies[1]`; empty for the whole file.
    pub field: String,
    /// Where the value came from.
    pub origin: Origin,
    /// What is wrong, without the field or origin.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.origin, self.field.is_empty()) {
            (Origin::File(name), true) => write!(f, "{name}: {}", self.message),
            (Origin::File(name), false) => write!(f, "{name}: {}: {}", self.field, self.message),
            (Origin::Env(var), true) => write!(f, "{var}: {}", self.message),
            (Origin::Env(var), false) => write!(f, "{var} ({}): {}", self.field, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Every invalid configuration value found; displays one error per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

fn error(field: &str, origin: &Origin, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_owned(),
        origin: origin.clone(),
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Fields and the YAML schema
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Field {
    Listen,
    Upstream,
    PublicUrl,
    Policies,
    Store,
    OpsListen,
    AdminListen,
    AdminToken,
    LogFormat,
    LogLevel,
    ConnectionsMax,
    IdleTimeout,
    HeadTimeout,
    BodyTimeout,
    BodyMinRate,
    SettlementRpc,
    SettlementConfirmations,
    SettlementMaxFeePerGas,
    SettlementReplaceAfter,
}

impl Field {
    const ALL: [Field; 19] = [
        Field::Listen,
        Field::Upstream,
        Field::PublicUrl,
        Field::Policies,
        Field::Store,
        Field::OpsListen,
        Field::AdminListen,
        Field::AdminToken,
        Field::LogFormat,
        Field::LogLevel,
        Field::ConnectionsMax,
        Field::IdleTimeout,
        Field::HeadTimeout,
        Field::BodyTimeout,
        Field::BodyMinRate,
        Field::SettlementRpc,
        Field::SettlementConfirmations,
        Field::SettlementMaxFeePerGas,
        Field::SettlementReplaceAfter,
    ];

    fn path(self) -> &'static str {
        match self {
            Field::Listen => "listen",
            Field::Upstream => "upstream",
            Field::PublicUrl => "public_url",
            Field::Policies => "policies",
            Field::Store => "store",
            Field::OpsListen => "ops.listen",
            Field::AdminListen => "admin.listen",
            Field::AdminToken => "admin.token",
            Field::LogFormat => "log.format",
            Field::LogLevel => "log.level",
            Field::ConnectionsMax => "connections.max",
            Field::IdleTimeout => "connections.idle_timeout",
            Field::HeadTimeout => "connections.head_timeout",
            Field::BodyTimeout => "connections.body_timeout",
            Field::BodyMinRate => "connections.body_min_rate",
            Field::SettlementRpc => "settlement.rpc",
            Field::SettlementConfirmations => "settlement.confirmations",
            Field::SettlementMaxFeePerGas => "settlement.max_fee_per_gas",
            Field::SettlementReplaceAfter => "settlement.replace_after",
        }
    }

    fn env(self) -> &'static str {
        match self {
            Field::Listen => "TOLLGATE_LISTEN",
            Field::Upstream => "TOLLGATE_UPSTREAM",
            Field::PublicUrl => "TOLLGATE_PUBLIC_URL",
            Field::Policies => "TOLLGATE_POLICIES",
            Field::Store => "TOLLGATE_STORE",
            Field::OpsListen => "TOLLGATE_OPS_LISTEN",
            Field::AdminListen => "TOLLGATE_ADMIN_LISTEN",
            Field::AdminToken => "TOLLGATE_ADMIN_TOKEN",
            Field::LogFormat => "TOLLGATE_LOG_FORMAT",
            Field::LogLevel => "TOLLGATE_LOG_LEVEL",
            Field::ConnectionsMax => "TOLLGATE_CONNECTIONS_MAX",
            Field::IdleTimeout => "TOLLGATE_CONNECTIONS_IDLE_TIMEOUT",
            Field::HeadTimeout => "TOLLGATE_CONNECTIONS_HEAD_TIMEOUT",
            Field::BodyTimeout => "TOLLGATE_CONNECTIONS_BODY_TIMEOUT",
            Field::BodyMinRate => "TOLLGATE_CONNECTIONS_BODY_MIN_RATE",
            Field::SettlementRpc => "TOLLGATE_SETTLEMENT_RPC",
            Field::SettlementConfirmations => "TOLLGATE_SETTLEMENT_CONFIRMATIONS",
            Field::SettlementMaxFeePerGas => "TOLLGATE_SETTLEMENT_MAX_FEE_PER_GAS",
            Field::SettlementReplaceAfter => "TOLLGATE_SETTLEMENT_REPLACE_AFTER",
        }
    }

    /// Whether a YAML number is taken as text (a directory called `2024` is plausible; a
    /// number where an address, URL or name is expected is a mistake). A fee is taken too, so
    /// that a number without its unit is refused for that, not as "expected a string".
    fn accepts_numbers(self) -> bool {
        matches!(
            self,
            Field::Policies
                | Field::Store
                | Field::ConnectionsMax
                | Field::IdleTimeout
                | Field::HeadTimeout
                | Field::BodyTimeout
                | Field::BodyMinRate
                | Field::SettlementConfirmations
                | Field::SettlementMaxFeePerGas
                | Field::SettlementReplaceAfter
        )
    }
}

enum Node {
    Leaf(Field),
    Section(&'static [(&'static str, Node)]),
}

const TOP_KEYS: &[(&str, Node)] = &[
    ("listen", Node::Leaf(Field::Listen)),
    ("upstream", Node::Leaf(Field::Upstream)),
    ("public_url", Node::Leaf(Field::PublicUrl)),
    ("policies", Node::Leaf(Field::Policies)),
    ("store", Node::Leaf(Field::Store)),
    ("ops", Node::Section(OPS_KEYS)),
    ("admin", Node::Section(ADMIN_KEYS)),
    ("log", Node::Section(LOG_KEYS)),
    ("connections", Node::Section(CONNECTION_KEYS)),
    ("settlement", Node::Section(SETTLEMENT_KEYS)),
];
const SETTLEMENT_KEYS: &[(&str, Node)] = &[
    ("rpc", Node::Leaf(Field::SettlementRpc)),
    ("confirmations", Node::Leaf(Field::SettlementConfirmations)),
    ("max_fee_per_gas", Node::Leaf(Field::SettlementMaxFeePerGas)),
    ("replace_after", Node::Leaf(Field::SettlementReplaceAfter)),
];
const OPS_KEYS: &[(&str, Node)] = &[("listen", Node::Leaf(Field::OpsListen))];
const ADMIN_KEYS: &[(&str, Node)] = &[
    ("listen", Node::Leaf(Field::AdminListen)),
    ("token", Node::Leaf(Field::AdminToken)),
];
const CONNECTION_KEYS: &[(&str, Node)] = &[
    ("max", Node::Leaf(Field::ConnectionsMax)),
    ("idle_timeout", Node::Leaf(Field::IdleTimeout)),
    ("head_timeout", Node::Leaf(Field::HeadTimeout)),
    ("body_timeout", Node::Leaf(Field::BodyTimeout)),
    ("body_min_rate", Node::Leaf(Field::BodyMinRate)),
];
const LOG_KEYS: &[(&str, Node)] = &[
    ("format", Node::Leaf(Field::LogFormat)),
    ("level", Node::Leaf(Field::LogLevel)),
];

// ---------------------------------------------------------------------------------------------
// Stage 1: raw text per field
// ---------------------------------------------------------------------------------------------

struct Sourced<T> {
    value: T,
    origin: Origin,
}

/// Text per field, later sources replacing earlier ones.
#[derive(Default)]
struct Raw {
    scalars: BTreeMap<Field, Sourced<String>>,
    policies: Option<Sourced<Vec<String>>>,
}

impl Raw {
    fn origin(&self, field: Field) -> Option<&Origin> {
        match field {
            Field::Policies => self.policies.as_ref().map(|p| &p.origin),
            _ => self.scalars.get(&field).map(|s| &s.origin),
        }
    }
}

fn read_yaml(name: &str, text: &str, raw: &mut Raw, errors: &mut Vec<ConfigError>) {
    let origin = Origin::File(name.to_owned());
    let mut document: Value = match serde_yaml::from_str(text) {
        Ok(document) => document,
        Err(e) => {
            errors.push(error("", &origin, e.to_string()));
            return;
        }
    };
    if let Err(e) = document.apply_merge() {
        errors.push(error("", &origin, e.to_string()));
        return;
    }
    match &document {
        Value::Null => {}
        Value::Mapping(map) => walk(map, "", TOP_KEYS, &origin, raw, errors),
        _ => errors.push(error("", &origin, "expected a mapping")),
    }
}

fn walk(
    map: &Mapping,
    prefix: &str,
    schema: &[(&str, Node)],
    origin: &Origin,
    raw: &mut Raw,
    errors: &mut Vec<ConfigError>,
) {
    for (key, value) in map {
        let Some(key) = key.as_str() else {
            let message = format!("keys must be strings, found {}", describe(key));
            errors.push(error(prefix, origin, message));
            continue;
        };
        let path = if prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{prefix}.{key}")
        };
        match schema.iter().find(|(name, _)| *name == key) {
            None => {
                let names: Vec<&str> = schema.iter().map(|(name, _)| *name).collect();
                let mut message = format!("unknown field (expected one of: {})", names.join(", "));
                if let Some(close) = suggest(key, names.iter().copied()) {
                    message.push_str(&format!("; did you mean {close}?"));
                }
                errors.push(error(&path, origin, message));
            }
            Some((_, Node::Section(keys))) => match value {
                Value::Null => {}
                Value::Mapping(inner) => walk(inner, &path, keys, origin, raw, errors),
                _ => errors.push(error(&path, origin, "expected a mapping")),
            },
            Some((_, Node::Leaf(Field::Policies))) => {
                read_policies(&path, value, origin, raw, errors)
            }
            Some((_, Node::Leaf(field))) => match scalar_text(value, field.accepts_numbers()) {
                Ok(None) => {}
                Ok(Some(text)) => {
                    let sourced = Sourced {
                        value: text,
                        origin: origin.clone(),
                    };
                    raw.scalars.insert(*field, sourced);
                }
                Err(message) => errors.push(error(&path, origin, message)),
            },
        }
    }
}

fn read_policies(
    path: &str,
    value: &Value,
    origin: &Origin,
    raw: &mut Raw,
    errors: &mut Vec<ConfigError>,
) {
    let list = match value {
        Value::Null => return,
        Value::Sequence(items) => {
            let mut list = Vec::with_capacity(items.len());
            let mut ok = true;
            for (i, item) in items.iter().enumerate() {
                match scalar_text(item, true) {
                    Ok(Some(text)) => list.push(text),
                    Ok(None) | Err(_) => {
                        ok = false;
                        errors.push(error(&format!("{path}[{i}]"), origin, "expected a string"));
                    }
                }
            }
            if !ok {
                return;
            }
            list
        }
        other => match scalar_text(other, true) {
            Ok(text) => text.into_iter().collect(),
            Err(_) => {
                errors.push(error(
                    path,
                    origin,
                    "expected a string or a list of strings",
                ));
                return;
            }
        },
    };
    raw.policies = Some(Sourced {
        value: list,
        origin: origin.clone(),
    });
}

/// `Ok(None)` for null (the key is present but unset), trimmed text for a string.
fn scalar_text(value: &Value, numbers: bool) -> Result<Option<String>, &'static str> {
    match value {
        Value::Null => Ok(None),
        Value::String(text) => Ok(Some(text.trim().to_owned())),
        Value::Number(n) if numbers => Ok(Some(n.to_string())),
        _ => Err("expected a string"),
    }
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

fn read_env(
    env: impl IntoIterator<Item = (String, String)>,
    raw: &mut Raw,
    warnings: &mut Vec<String>,
) {
    // Sorted, so warnings come out in a stable order whatever the environment's order.
    let env: BTreeMap<String, String> = env
        .into_iter()
        .filter(|(name, _)| name.starts_with(ENV_PREFIX))
        .collect();
    for (name, value) in &env {
        if name == CONFIG_ENV {
            continue;
        }
        let Some(field) = Field::ALL.iter().copied().find(|f| f.env() == name) else {
            if !is_kubernetes_service_link(name, value) {
                warnings.push(unknown_env_warning(name));
            }
            continue;
        };
        let value = value.trim();
        if value.is_empty() {
            warnings.push(format!("{name} is set but empty; ignored"));
            continue;
        }
        let origin = Origin::Env(name.clone());
        match field {
            Field::Policies => {
                let value = value.split(',').map(|p| p.trim().to_owned()).collect();
                raw.policies = Some(Sourced { value, origin });
            }
            // The variable holds the token itself: refer to it, never copy it.
            Field::AdminToken => {
                let value = format!("env:{name}");
                raw.scalars.insert(field, Sourced { value, origin });
            }
            _ => {
                let value = value.to_owned();
                raw.scalars.insert(field, Sourced { value, origin });
            }
        }
    }
}

fn unknown_env_warning(name: &str) -> String {
    let known = Field::ALL.iter().map(|f| f.env()).chain([CONFIG_ENV]);
    let suffix = name.strip_prefix(ENV_PREFIX).unwrap_or(name);
    let close = known
        .filter_map(|k| k.strip_prefix(ENV_PREFIX).map(|s| (k, s)))
        .filter(|(_, s)| is_close(suffix, s))
        .min_by_key(|(_, s)| edit_distance(&suffix.to_ascii_uppercase(), s));
    match close {
        Some((known, _)) => format!("unknown environment variable {name}; did you mean {known}?"),
        None => format!("unknown environment variable {name}"),
    }
}

/// Variables Kubernetes injects for a Service named `tollgate` (or `tollgate-…`):
/// `TOLLGATE_SERVICE_HOST`, `TOLLGATE_SERVICE_PORT[_NAME]`, `TOLLGATE_PORT=tcp://…`,
/// `TOLLGATE_PORT_8402_TCP[_PROTO|_PORT|_ADDR]`. They are not settings, so not warned about.
fn is_kubernetes_service_link(name: &str, value: &str) -> bool {
    if name.ends_with("_SERVICE_HOST") || name.contains("_SERVICE_PORT") {
        return true;
    }
    if name.ends_with("_PORT")
        && ["tcp://", "udp://", "sctp://"]
            .iter()
            .any(|p| value.starts_with(p))
    {
        return true;
    }
    // ..._PORT_<digits>_<TCP|UDP|SCTP>[_...]
    name.split('_')
        .collect::<Vec<_>>()
        .windows(3)
        .any(|w| match w {
            [port, digits, proto] => {
                *port == "PORT"
                    && !digits.is_empty()
                    && digits.bytes().all(|b| b.is_ascii_digit())
                    && matches!(*proto, "TCP" | "UDP" | "SCTP")
            }
            _ => false,
        })
}

// ---------------------------------------------------------------------------------------------
// "Did you mean"
// ---------------------------------------------------------------------------------------------

fn edit_distance(a: &str, b: &str) -> usize {
    strsim::levenshtein(a, b)
}

fn is_close(input: &str, candidate: &str) -> bool {
    let distance = edit_distance(&input.to_ascii_lowercase(), &candidate.to_ascii_lowercase());
    distance <= (candidate.chars().count() / 3).max(2) && distance < candidate.chars().count()
}

fn suggest<'a>(input: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let input_lower = input.to_ascii_lowercase();
    candidates
        .into_iter()
        .filter(|c| is_close(input, c))
        .min_by_key(|c| edit_distance(&input_lower, c))
}

// ---------------------------------------------------------------------------------------------
// Stage 2: typed values
// ---------------------------------------------------------------------------------------------

struct Resolver<'a> {
    raw: &'a Raw,
    errors: &'a mut Vec<ConfigError>,
}

impl Resolver<'_> {
    /// The parsed value when the field was set and is valid; records an error when invalid.
    fn scalar<T>(
        &mut self,
        field: Field,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let sourced = self.raw.scalars.get(&field)?;
        match parse(&sourced.value) {
            Ok(value) => Some(value),
            Err(message) => {
                self.errors
                    .push(error(field.path(), &sourced.origin, message));
                None
            }
        }
    }

    fn policies(&mut self) -> Option<Vec<PathBuf>> {
        let sourced = self.raw.policies.as_ref()?;
        let field = Field::Policies.path();
        if sourced.value.is_empty() {
            let message = "expected at least one policy file or folder";
            self.errors.push(error(field, &sourced.origin, message));
            return None;
        }
        let mut ok = true;
        for (i, entry) in sourced.value.iter().enumerate() {
            if entry.is_empty() {
                ok = false;
                self.errors.push(error(
                    &format!("{field}[{i}]"),
                    &sourced.origin,
                    "must not be empty",
                ));
            }
        }
        ok.then(|| sourced.value.iter().map(PathBuf::from).collect())
    }
}

fn build(raw: &Raw, errors: &mut Vec<ConfigError>, warnings: &mut Vec<String>) -> Config {
    let errors_before = errors.len();
    let mut config = Config::default();
    let mut r = Resolver { raw, errors };

    if let Some(v) = r.scalar(Field::Listen, |s| parse_socket_addr(s, DEFAULT_LISTEN)) {
        config.listen = v;
    }
    if let Some(v) = r.scalar(Field::Upstream, parse_upstream) {
        config.upstream = v;
    }
    config.public_url = r
        .scalar(Field::PublicUrl, parse_public_url)
        .unwrap_or_else(|| public_url_for(config.listen));
    if let Some(v) = r.policies() {
        config.policies = v;
    }
    if let Some(v) = r.scalar(Field::Store, parse_store) {
        config.store = v;
    }
    if let Some(v) = r.scalar(Field::OpsListen, |s| {
        parse_socket_addr(s, DEFAULT_OPS_LISTEN)
    }) {
        config.ops.listen = v;
    }
    if let Some(v) = r.scalar(Field::AdminListen, |s| {
        parse_socket_addr(s, DEFAULT_ADMIN_LISTEN)
    }) {
        config.admin.listen = v;
    }
    if let Some(v) = r.scalar(Field::AdminToken, parse_secret_ref) {
        config.admin.token = Some(v);
    }
    if let Some(v) = r.scalar(Field::LogFormat, parse_log_format) {
        config.log.format = v;
    }
    if let Some(v) = r.scalar(Field::LogLevel, parse_log_level) {
        config.log.level = v;
    }
    let limits = &mut config.connections;
    if let Some(v) = r.scalar(Field::ConnectionsMax, parse_max_connections) {
        limits.max = v;
    }
    for (field, slot) in [
        (Field::IdleTimeout, &mut limits.idle_timeout_secs),
        (Field::HeadTimeout, &mut limits.head_timeout_secs),
        (Field::BodyTimeout, &mut limits.body_timeout_secs),
    ] {
        if let Some(v) = r.scalar(field, parse_timeout) {
            *slot = v;
        }
    }
    if let Some(v) = r.scalar(Field::BodyMinRate, |s| parse_count(s, "bytes per second")) {
        limits.body_min_rate = v;
    }
    let settlement = &mut config.settlement;
    if let Some(v) = r.scalar(Field::SettlementRpc, parse_rpc_url) {
        settlement.rpc = Some(v);
    }
    if let Some(v) = r.scalar(Field::SettlementConfirmations, parse_confirmations) {
        settlement.confirmations = v;
    }
    if let Some(v) = r.scalar(Field::SettlementMaxFeePerGas, parse_fee_per_gas) {
        settlement.max_fee_per_gas = v;
    }
    if let Some(v) = r.scalar(Field::SettlementReplaceAfter, |s| {
        parse_secs_at_least_one(s, "the wait before a replacement")
    }) {
        settlement.replace_after_secs = v;
    }

    // Cross-field checks only on fully valid values (an invalid field holds its default).
    if errors.len() == errors_before {
        check_listeners(&config, raw, errors);
        if !config.admin.listen.ip().is_loopback() && config.admin.token.is_none() {
            warnings.push(format!(
                "admin API on {} is reachable from other hosts but admin.token is not set (a generated token in the store directory protects it)",
                config.admin.listen
            ));
        }
    }
    config
}

/// Two listeners on the same port conflict when their IPs are equal or one is unspecified.
fn check_listeners(config: &Config, raw: &Raw, errors: &mut Vec<ConfigError>) {
    let listeners = [
        (Field::Listen, config.listen),
        (Field::OpsListen, config.ops.listen),
        (Field::AdminListen, config.admin.listen),
    ];
    for (i, &(later, later_addr)) in listeners.iter().enumerate() {
        for &(earlier, earlier_addr) in listeners.iter().take(i) {
            if !overlaps(later_addr, earlier_addr) {
                continue;
            }
            // Blame a field that was set explicitly (the defaults do not conflict).
            let (field, addr, other, other_addr) = if raw.origin(later).is_some() {
                (later, later_addr, earlier, earlier_addr)
            } else {
                (earlier, earlier_addr, later, later_addr)
            };
            let Some(origin) = raw.origin(field) else {
                continue;
            };
            let message = format!(
                "address {addr} conflicts with {} ({other_addr}); each listener needs its own port",
                other.path()
            );
            errors.push(error(field.path(), origin, message));
        }
    }
}

fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn parse_socket_addr(text: &str, example: SocketAddr) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        format!("invalid socket address {text:?} (expected host:port such as {example})")
    })
}

/// `auto` or a positive number of connections.
fn parse_max_connections(text: &str) -> Result<Option<usize>, String> {
    if text == "auto" {
        return Ok(None);
    }
    match text.parse::<usize>() {
        Ok(n) if n > 0 => Ok(Some(n)),
        _ => Err(format!(
            "expected `auto` or a positive number of connections, found {text:?}"
        )),
    }
}

/// A duration such as `30s`, `2m` (a bare number is seconds); at least one second.
fn parse_timeout(text: &str) -> Result<u64, String> {
    parse_secs_at_least_one(text, "a timeout")
}

/// A duration such as `30s`, `2m` (a bare number is seconds); at least one second. `what`
/// names it in the error: `"0s" is too short: <what> is at least 1s`.
fn parse_secs_at_least_one(text: &str, what: &str) -> Result<u64, String> {
    match crate::admin::parse_duration_secs(text)? {
        0 => Err(format!("{text:?} is too short: {what} is at least 1s")),
        secs => Ok(secs),
    }
}

/// Blocks from 1 (the including block alone) to [`MAX_CONFIRMATIONS`].
fn parse_confirmations(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(n) if (1..=MAX_CONFIRMATIONS).contains(&n) => Ok(n),
        _ => Err(format!(
            "expected a number of blocks from 1 to {MAX_CONFIRMATIONS} (the block that includes the transaction counts as 1), found {text:?}"
        )),
    }
}

/// The units a fee is written in and their decimals (wei per unit = 10^decimals), in the
/// order [`format_fee_per_gas`] prefers them when two forms are as short.
const FEE_UNITS: [(&str, u32); 3] = [("gwei", 9), ("wei", 0), ("eth", 18)];

/// A fee per gas written with its unit, as exact wei: `50 gwei`, `0.05 gwei`, `1500000 wei`,
/// `0.000000001 eth` (the unit case-insensitive, one space before it optional). No floating
/// point: the digits are read as an integer, so a fee that is not a whole number of wei (more
/// decimals than the unit has, short of trailing zeros), zero, or beyond `u128` is refused.
fn parse_fee_per_gas(text: &str) -> Result<u128, String> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit = unit.strip_prefix(' ').unwrap_or(unit);
    let malformed = || format!("expected a fee with a unit such as \"50 gwei\", found {text:?}");
    if number.is_empty() {
        return Err(malformed());
    }
    if unit.is_empty() {
        return Err(format!(
            "{text:?} has no unit: write the fee with one, such as \"50 gwei\" (units: wei, gwei, eth)"
        ));
    }
    let Some(&(unit, decimals)) = FEE_UNITS
        .iter()
        .find(|(name, _)| unit.eq_ignore_ascii_case(name))
    else {
        return Err(format!(
            "unknown unit {unit:?} in {text:?} (expected wei, gwei or eth, as in \"50 gwei\")"
        ));
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() || fraction.contains('.') || (number.contains('.') && fraction.is_empty()) {
        return Err(malformed());
    }
    // Trailing zeros are exact whatever their number: `1.50 gwei`, `1.0 wei`.
    let fraction = fraction.trim_end_matches('0');
    let Some(padding) = (decimals as usize).checked_sub(fraction.len()) else {
        let allowed = match decimals {
            0 => "wei has no decimals".to_owned(),
            n => format!("{unit} has at most {n} decimals"),
        };
        return Err(format!("{text:?} is not a whole number of wei: {allowed}"));
    };
    // The digits with the decimal point moved `decimals` places right: an integer of wei.
    let digits = whole
        .chars()
        .chain(fraction.chars())
        .chain(std::iter::repeat_n('0', padding));
    let mut wei: u128 = 0;
    for digit in digits {
        let digit = digit.to_digit(10).ok_or_else(malformed)?;
        wei = wei
            .checked_mul(10)
            .and_then(|w| w.checked_add(u128::from(digit)))
            .ok_or_else(|| format!("{text:?} is too large for a fee"))?;
    }
    if wei == 0 {
        return Err(format!("{text:?} is too low: a fee cap is at least 1 wei"));
    }
    Ok(wei)
}

/// The shortest exact text of a fee that [`parse_fee_per_gas`] reads back: `100 gwei`,
/// `0.05 gwei`, `1500 wei`, `2 eth`.
fn format_fee_per_gas(wei: u128) -> String {
    let in_unit = |&(unit, decimals): &(&str, u32)| {
        let scale = 10u128.pow(decimals);
        let (whole, fraction) = (wei / scale, wei % scale);
        if fraction == 0 {
            format!("{whole} {unit}")
        } else {
            let digits = format!("{fraction:0width$}", width = decimals as usize);
            format!("{whole}.{} {unit}", digits.trim_end_matches('0'))
        }
    };
    FEE_UNITS
        .iter()
        .map(in_unit)
        .min_by_key(String::len)
        .unwrap_or_else(|| format!("{wei} wei"))
}

fn parse_count(text: &str, what: &str) -> Result<u64, String> {
    text.parse::<u64>()
        .map_err(|_| format!("expected a whole number of {what}, found {text:?}"))
}

fn parse_store(text: &str) -> Result<PathBuf, String> {
    if text.is_empty() {
        return Err("must not be empty".to_owned());
    }
    Ok(PathBuf::from(text))
}

fn parse_log_format(text: &str) -> Result<LogFormat, String> {
    match text.to_ascii_lowercase().as_str() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!(
            "unknown log format {text:?} (expected text or json)"
        )),
    }
}

fn parse_log_level(text: &str) -> Result<String, String> {
    let valid = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '=' | ',' | ':' | '.' | '-'));
    if valid {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "invalid log level {text:?} (expected error, warn, info, debug, trace or directives like \"info,tollgate=debug\")"
        ))
    }
}

fn parse_secret_ref(text: &str) -> Result<SecretRef, String> {
    if text.is_empty() {
        return Err("must not be empty (expected env:NAME or a file path)".to_owned());
    }
    let Some(name) = text.strip_prefix("env:") else {
        return Ok(SecretRef::File(PathBuf::from(text)));
    };
    if name.is_empty() {
        return Err("missing variable name after \"env:\" (expected env:NAME)".to_owned());
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "invalid environment variable name {name:?} (expected letters, digits and _)"
        ));
    }
    Ok(SecretRef::Env(name.to_owned()))
}

// ---------------------------------------------------------------------------------------------
// URLs (hand-parsed: http(s), host, optional port, optional path)
// ---------------------------------------------------------------------------------------------

struct HttpUrl {
    scheme: Scheme,
    host: String,
    port: u16,
    /// Empty or starting with `/`.
    path: String,
}

fn parse_http_url(text: &str) -> Result<HttpUrl, String> {
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain spaces or control characters".to_owned());
    }
    let Some((scheme, rest)) = text.split_once("://") else {
        return Err("expected http:// or https:// followed by a host".to_owned());
    };
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        _ => return Err("scheme must be http or https".to_owned()),
    };
    if rest.contains(['?', '#']) {
        return Err("must not have a query or fragment".to_owned());
    }
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if authority.contains('@') {
        return Err("must not contain user info".to_owned());
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let Some((inner, after)) = bracketed.split_once(']') else {
            return Err(format!("invalid host {authority:?}"));
        };
        if inner.parse::<Ipv6Addr>().is_err() {
            return Err(format!("invalid host \"[{inner}]\""));
        }
        let port = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(port) => Some(port),
                None => return Err(format!("invalid host {authority:?}")),
            },
        };
        (format!("[{}]", inner.to_ascii_lowercase()), port)
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        };
        if host.is_empty() {
            return Err("missing host".to_owned());
        }
        if !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        {
            return Err(format!("invalid host {host:?}"));
        }
        (host.to_ascii_lowercase(), port)
    };
    let port = match port {
        None => scheme.default_port(),
        Some(port) => match port.parse::<u16>() {
            Ok(n) if n != 0 && port.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(format!("invalid port {port:?}")),
        },
    };
    Ok(HttpUrl {
        scheme,
        host,
        port,
        path: path.to_owned(),
    })
}

/// `scheme://host[:port]path`, the port only when not the scheme's default.
fn base_url(scheme: Scheme, host: &str, port: u16, path: &str) -> String {
    if port == scheme.default_port() {
        format!("{scheme}://{host}{path}")
    } else {
        format!("{scheme}://{host}:{port}{path}")
    }
}

fn parse_upstream(text: &str) -> Result<Upstream, String> {
    let invalid = |reason: String| format!("invalid upstream URL {text:?}: {reason}");
    let url = parse_http_url(text).map_err(invalid)?;
    if !matches!(url.path.as_str(), "" | "/") {
        return Err(invalid(
            "upstream must be a base URL without a path".to_owned(),
        ));
    }
    Ok(Upstream {
        url: base_url(url.scheme, &url.host, url.port, ""),
        scheme: url.scheme,
        host: url.host,
        port: url.port,
    })
}

fn parse_rpc_url(text: &str) -> Result<String, String> {
    let url =
        parse_http_url(text).map_err(|reason| format!("invalid RPC URL {text:?}: {reason}"))?;
    Ok(base_url(url.scheme, &url.host, url.port, &url.path))
}

fn parse_public_url(text: &str) -> Result<String, String> {
    let url =
        parse_http_url(text).map_err(|reason| format!("invalid public URL {text:?}: {reason}"))?;
    Ok(base_url(
        url.scheme,
        &url.host,
        url.port,
        url.path.trim_end_matches('/'),
    ))
}

/// The default public URL for a listener: `localhost` for an unspecified IP.
fn public_url_for(listen: SocketAddr) -> String {
    let host = match listen {
        _ if listen.ip().is_unspecified() => "localhost".to_owned(),
        SocketAddr::V4(v4) => v4.ip().to_string(),
        SocketAddr::V6(v6) => format!("[{}]", v6.ip()),
    };
    base_url(Scheme::Http, &host, listen.port(), "")
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

impl Config {
    /// Resolves a configuration from the file's text (when one was read) and the environment.
    ///
    /// `yaml`: `Some((display_name, text))` when a file was read; `display_name` prefixes its
    /// errors. `env`: the process environment (see [`Config::load`]) or a list in tests; only
    /// `TOLLGATE_*` names are looked at. Every invalid value is reported, not just the first.
    pub fn resolve(
        yaml: Option<(&str, &str)>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Resolved, ConfigErrors> {
        let mut raw = Raw::default();
        let mut errors = Vec::new();
        let mut warnings = Vec::new();
        if let Some((name, text)) = yaml {
            read_yaml(name, text, &mut raw, &mut errors);
        }
        read_env(env, &mut raw, &mut warnings);
        let config = build(&raw, &mut errors, &mut warnings);
        if errors.is_empty() {
            Ok(Resolved { config, warnings })
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Reads the file (when `path` is `Some`) and the process environment, then resolves.
    ///
    /// Environment entries that are not valid UTF-8 are converted lossily (an invalid
    /// `TOLLGATE_*` value is then reported rather than ignored).
    pub fn load(path: Option<&Path>) -> Result<Resolved, ConfigErrors> {
        let env = std::env::vars_os().map(|(name, value)| {
            let lossy = |s: std::ffi::OsString| {
                s.into_string()
                    .unwrap_or_else(|s| s.to_string_lossy().into_owned())
            };
            (lossy(name), lossy(value))
        });
        let Some(path) = path else {
            return Config::resolve(None, env);
        };
        let name = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Config::resolve(Some((&name, &text)), env),
            Err(e) => Err(ConfigErrors(vec![error(
                "",
                &Origin::File(name),
                format!("cannot read configuration file: {e}"),
            )])),
        }
    }

    /// The configuration as `tollgate.yaml` text with every field spelled out (the admin
    /// token as its reference, never its value). Resolving this text gives back `self`.
    pub fn to_yaml(&self) -> String {
        let text = |s: &str| Value::String(s.to_owned());
        let path = |p: &Path| Value::String(p.to_string_lossy().into_owned());
        let mapping = |entries: Vec<(&str, Value)>| {
            Value::Mapping(entries.into_iter().map(|(k, v)| (text(k), v)).collect())
        };
        let mut entries = vec![
            ("listen", text(&self.listen.to_string())),
            ("upstream", text(&self.upstream.url)),
            ("public_url", text(&self.public_url)),
            (
                "policies",
                Value::Sequence(self.policies.iter().map(|p| path(p)).collect()),
            ),
            ("store", path(&self.store)),
            (
                "ops",
                mapping(vec![("listen", text(&self.ops.listen.to_string()))]),
            ),
            (
                "admin",
                mapping(vec![
                    ("listen", text(&self.admin.listen.to_string())),
                    (
                        "token",
                        self.admin
                            .token
                            .as_ref()
                            .map_or(Value::Null, |t| text(&t.to_string())),
                    ),
                ]),
            ),
            (
                "log",
                mapping(vec![
                    ("format", text(self.log.format.as_str())),
                    ("level", text(&self.log.level)),
                ]),
            ),
            (
                "connections",
                mapping(vec![
                    (
                        "max",
                        self.connections.max.map_or_else(
                            || text("auto"),
                            |n| Value::Number(u64::try_from(n).unwrap_or(u64::MAX).into()),
                        ),
                    ),
                    (
                        "idle_timeout",
                        text(&format!("{}s", self.connections.idle_timeout_secs)),
                    ),
                    (
                        "head_timeout",
                        text(&format!("{}s", self.connections.head_timeout_secs)),
                    ),
                    (
                        "body_timeout",
                        text(&format!("{}s", self.connections.body_timeout_secs)),
                    ),
                    (
                        "body_min_rate",
                        Value::Number(self.connections.body_min_rate.into()),
                    ),
                ]),
            ),
            (
                "settlement",
                mapping(vec![
                    (
                        "rpc",
                        self.settlement
                            .rpc
                            .as_ref()
                            .map_or(Value::Null, |u| text(u)),
                    ),
                    (
                        "confirmations",
                        Value::Number(self.settlement.confirmations.into()),
                    ),
                    (
                        "max_fee_per_gas",
                        text(&format_fee_per_gas(self.settlement.max_fee_per_gas)),
                    ),
                    (
                        "replace_after",
                        text(&format!("{}s", self.settlement.replace_after_secs)),
                    ),
                ]),
            ),
        ];
        // A listener on port 0 (the OS picks one) derives `http://host:0`, which is no public
        // URL (its port is refused): leave it out, and resolving derives it again.
        if self.listen.port() == 0 && self.public_url == public_url_for(self.listen) {
            entries.retain(|(key, _)| *key != "public_url");
        }
        let document = mapping(entries);
        serde_yaml::to_string(&document)
            .unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_service_links_are_recognised() {
        assert!(is_kubernetes_service_link(
            "TOLLGATE_SERVICE_HOST",
            "10.0.0.1"
        ));
        assert!(is_kubernetes_service_link(
            "TOLLGATE_SERVICE_PORT_HTTP",
            "8402"
        ));
        assert!(is_kubernetes_service_link(
            "TOLLGATE_PORT",
            "tcp://10.0.0.1:8402"
        ));
        assert!(is_kubernetes_service_link(
            "TOLLGATE_PORT_8402_TCP_ADDR",
            "10.0.0.1"
        ));
        assert!(!is_kubernetes_service_link("TOLLGATE_PORT", "8402"));
        assert!(!is_kubernetes_service_link("TOLLGATE_LISTNE", "x"));
    }
}
