//! Log setup, and the one bridge from the `log` crate into `tracing`.
//!
//! tollgate's own lines are `tracing` events and never carry a header value, key, token or
//! payment. The libraries it runs on — Pingora above all, also sled, rustls and reqwest — log
//! through `log`, and at `debug`/`trace` Pingora prints whole request and response heads
//! (`Request header: RequestHeader { … headers: {"x-api-key": "tg_…"} … }`, the raw
//! `name: value\r\n` text written upstream) and bodies. Those records reach the output only
//! through [`Bridge`], which, for every record at every level:
//!
//! 1. drops it unless the tracing filter enables its level and target — before the message is
//!    formatted, so a filtered-out record costs one filter check; `log`'s global maximum level
//!    is set from the filter, so most never reach the bridge at all;
//! 2. downgrades an ERROR or WARN that a client caused (a malformed request, a disconnect:
//!    what Pingora calls a downstream error) to WARN, at most [`BURST`] lines per second per
//!    call site, then one line saying how many were suppressed ([`Noise`]);
//! 3. redacts secrets from the message ([`redact`]): every header value in a header dump
//!    except a few harmless headers ([`HARMLESS`]), credentials after `Bearer`/`Basic`/
//!    `Digest`, anything shaped like a tollgate API key or admin token (`tg_…`, `tga_…`),
//!    user information and query values in URLs, and request and response bodies (reduced to
//!    a marker);
//! 4. hands it to the tracing subscriber with its original target, so filters such as
//!    `pingora_proxy=trace` keep working and the text and JSON formats show it as before.
//!
//! The redaction is deny-by-default because the prepaid key header is whatever the policy
//! names: a header not in [`HARMLESS`] is redacted, whatever it is called.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::{Mutex, Once, PoisonError};
use std::time::{Duration, Instant};

use tracing_log::AsTrace as _;

use crate::config::{Config, LogFormat};

/// What replaces a redacted value.
pub const REDACTED: &str = "[redacted]";

/// What replaces a request or response body.
pub const REDACTED_BODY: &str = "[body redacted]";

/// Header names whose values may appear in logs (compared case-insensitively; every
/// `accept…` header too): none carries a credential. Everything else is redacted in header
/// dumps, whatever its name — the policy's prepaid key header can be called anything.
pub const HARMLESS: [&str; 24] = [
    "host",
    "user-agent",
    "content-type",
    "content-length",
    "content-encoding",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "upgrade",
    "expect",
    "date",
    "server",
    "vary",
    "x-request-id",
    // What tollgate tells the upstream (`proxy::forward`); the key id's `tg_…` is redacted
    // with every other key-shaped token.
    "x-tollgate-rail",
    "x-tollgate-route",
    "x-tollgate-payer",
    "x-tollgate-amount",
    "x-tollgate-asset",
    "x-tollgate-network",
    "x-tollgate-account",
    "x-tollgate-key-id",
    "x-tollgate-credits",
];

/// Client-caused lines let through per call site and [`WINDOW`].
pub const BURST: u32 = 5;

/// The rate limit's window.
pub const WINDOW: Duration = Duration::from_secs(1);

/// Installs the subscriber (`log.format`, `log.level` or `RUST_LOG`) and the bridge. A second
/// call (tests embedding the server twice) keeps the first subscriber and bridge.
pub fn init(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // Not `try_init`: with tracing-subscriber's `tracing-log` feature (kept for the formatters,
    // which show a bridged record's own target), it would install `tracing_log::LogTracer`,
    // which passes records on verbatim. `log` takes one logger per process: ours.
    let installed = match config.log.format {
        LogFormat::Json => tracing::subscriber::set_global_default(builder.json().finish()),
        LogFormat::Text => tracing::subscriber::set_global_default(builder.finish()),
    };
    if installed.is_err() {
        return;
    }
    if log::set_logger(&BRIDGE).is_ok() {
        log::set_max_level(log_level_filter(
            tracing::level_filters::LevelFilter::current(),
        ));
    } else {
        tracing::error!("another `log` logger is installed; library log records are not redacted");
    }
}

fn log_level_filter(filter: tracing::level_filters::LevelFilter) -> log::LevelFilter {
    use tracing::level_filters::LevelFilter;
    match filter {
        LevelFilter::OFF => log::LevelFilter::Off,
        LevelFilter::ERROR => log::LevelFilter::Error,
        LevelFilter::WARN => log::LevelFilter::Warn,
        LevelFilter::INFO => log::LevelFilter::Info,
        LevelFilter::DEBUG => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    }
}

static BRIDGE: Bridge = Bridge {
    noise: Noise::new(),
};

/// The `log` → `tracing` bridge: filter, downgrade and rate-limit client noise, redact.
pub struct Bridge {
    noise: Noise,
}

/// Whether the tracing subscriber wants a record with this level and target.
fn wanted(metadata: &log::Metadata<'_>) -> bool {
    tracing::dispatcher::get_default(|dispatch| dispatch.enabled(&metadata.as_trace()))
}

impl log::Log for Bridge {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        wanted(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        // Downgrading only ever lowers a level: what is not wanted as is is not wanted at all.
        if !wanted(record.metadata()) {
            return;
        }
        let message = record.args().to_string();
        let mut level = record.level();
        if level <= log::Level::Warn && from_client(record.target(), &message) {
            level = log::Level::Warn;
            let warn = log::Metadata::builder()
                .level(level)
                .target(record.target())
                .build();
            if !wanted(&warn) {
                return;
            }
            let site = (
                record.module_path_static().unwrap_or("?"),
                record.line().unwrap_or(0),
            );
            if !self.noise.admit(site, Instant::now()) {
                start_reporter();
                return;
            }
        }
        let clean = redact(&message);
        let _ = tracing_log::format_trace(
            &log::Record::builder()
                .args(format_args!("{clean}"))
                .level(level)
                .target(record.target())
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .build(),
        );
    }

    fn flush(&self) {}
}

/// Reports suppressed lines once per [`WINDOW`], from a thread started at the first
/// suppression.
fn start_reporter() {
    static STARTED: Once = Once::new();
    STARTED.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("log-noise".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(WINDOW);
                    for ((module, line), suppressed) in BRIDGE.noise.take_suppressed() {
                        tracing::warn!(
                            target: "tollgate::logging",
                            site = %format_args!("{module}:{line}"),
                            suppressed,
                            "suppressed client-error log lines (at most {BURST} per second per site)"
                        );
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the log rate limit's reporter");
        }
    });
}

/// Where a record was logged: module path and line.
pub type Site = (&'static str, u32);

#[derive(Debug, Clone, Copy)]
struct Bucket {
    window: Instant,
    lines: u32,
    suppressed: u64,
}

/// The rate limit on client-caused lines: [`BURST`] per call site and [`WINDOW`]; the rest
/// are counted until [`Noise::take_suppressed`] reports them.
#[derive(Debug)]
pub struct Noise {
    // One entry per call site that ever logged a client mistake: a handful.
    sites: Mutex<BTreeMap<Site, Bucket>>,
}

impl Noise {
    pub const fn new() -> Noise {
        Noise {
            sites: Mutex::new(BTreeMap::new()),
        }
    }

    /// Whether a line from `site` may be written at `now`.
    pub fn admit(&self, site: Site, now: Instant) -> bool {
        let mut sites = self.sites.lock().unwrap_or_else(PoisonError::into_inner);
        let bucket = sites.entry(site).or_insert(Bucket {
            window: now,
            lines: 0,
            suppressed: 0,
        });
        if now.saturating_duration_since(bucket.window) >= WINDOW {
            bucket.window = now;
            bucket.lines = 0;
        }
        if bucket.lines < BURST {
            bucket.lines += 1;
            true
        } else {
            bucket.suppressed += 1;
            false
        }
    }

    /// The sites with suppressed lines and how many, since the last call.
    pub fn take_suppressed(&self) -> Vec<(Site, u64)> {
        let mut sites = self.sites.lock().unwrap_or_else(PoisonError::into_inner);
        sites
            .iter_mut()
            .filter(|(_, bucket)| bucket.suppressed > 0)
            .map(|(site, bucket)| (*site, std::mem::take(&mut bucket.suppressed)))
            .collect()
    }
}

impl Default for Noise {
    fn default() -> Noise {
        Noise::new()
    }
}

/// Whether a Pingora ERROR/WARN record is about the client (a malformed request, a client
/// that went away) rather than the upstream or tollgate itself.
///
/// Pingora names the side in its fixed text ("failed to send error response to downstream",
/// "Downstream handshake error") and in its errors' display, whose first word is the error's
/// source ("Fail to proxy: Downstream ReadError …", "Fail to proxy: Upstream ConnectRefused
/// …"): the first side a message names is the one at fault. A few framing warnings name no
/// side and are counted as the client's.
pub fn from_client(target: &str, message: &str) -> bool {
    if !target.starts_with("pingora") {
        return false;
    }
    let lower = message.to_ascii_lowercase();
    let first = |word: &str| lower.find(word).unwrap_or(usize::MAX);
    let downstream = first("downstream");
    let elsewhere = first("upstream").min(first("internal"));
    if downstream != elsewhere {
        return downstream < elsewhere;
    }
    [
        "peer sent more data than expected",
        "content-length header",
        "h2 handshake error",
    ]
    .iter()
    .any(|needle| lower.contains(needle))
}

/// `message` with every secret replaced (see the module docs).
pub fn redact(message: &str) -> Cow<'_, str> {
    let mut text = Cow::Borrowed(message);
    for pass in [
        char_lists as fn(&str) -> Option<String>,
        byte_strings,
        quoted_pairs,
        header_lines,
        credentials,
        url_parts,
        api_keys,
    ] {
        if let Some(changed) = pass(&text) {
            text = Cow::Owned(changed);
        }
    }
    text
}

/// Whether a header's value may be logged.
pub fn harmless(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    HARMLESS.contains(&name.as_str()) || name.starts_with("accept")
}

/// The byte at `i`, or 0 past the end (0 matches nothing the scanners look for).
fn at(bytes: &[u8], i: usize) -> u8 {
    bytes.get(i).copied().unwrap_or(0)
}

/// An HTTP token character (RFC 9110 §5.6.2): what header names are made of.
fn is_token(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// The index of the quote closing a Debug-formatted string whose content starts at `from`.
fn closing_quote(bytes: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < bytes.len() {
        match at(bytes, i) {
            b'\\' => i += 2,
            b'"' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

/// Rewrites `text` by replacing the given byte ranges (sorted, disjoint, on ASCII boundaries).
fn splice(text: &str, ranges: &[(usize, usize, &str)]) -> Option<String> {
    if ranges.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    for &(start, end, with) in ranges {
        out.push_str(text.get(copied..start)?);
        out.push_str(with);
        copied = end;
    }
    out.push_str(text.get(copied..)?);
    Some(out)
}

/// Debug-formatted `Chars([…])` (Pingora's chunked-body traces print
/// `String::from_utf8_lossy(buf).escape_default()`, one character at a time): body bytes.
fn char_lists(text: &str) -> Option<String> {
    const OPEN: &str = "Chars([";
    let mut ranges = Vec::new();
    let mut from = 0;
    while let Some(found) = text.get(from..).and_then(|rest| rest.find(OPEN)) {
        let start = from + found + OPEN.len();
        // Each character is quoted ('a', ']'), so the first `])` closes the list.
        let Some(len) = text.get(start..).and_then(|rest| rest.find("])")) else {
            break;
        };
        if len > 0 {
            ranges.push((start, start + len, REDACTED_BODY));
        }
        from = start + len;
    }
    splice(text, &ranges)
}

/// Debug-formatted byte strings, `b"…"`: Pingora prints bodies this way (`Response body:
/// Some(b"…")`, `Body(Some(b"…"), true)`), and also heads written to the upstream and
/// case-preserved header names. A head keeps its header lines (redacted by [`header_lines`])
/// and loses what follows the blank line; a header name (`CaseHeaderName(b"X-Api-Key")`) is
/// kept; anything else is a body.
fn byte_strings(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut ranges = Vec::new();
    let mut i = 0;
    while i + 1 < bytes.len() {
        let starts = at(bytes, i) == b'b'
            && at(bytes, i + 1) == b'"'
            && (i == 0 || !is_word(at(bytes, i - 1)));
        if !starts {
            i += 1;
            continue;
        }
        let content = i + 2;
        let Some(end) = closing_quote(bytes, content) else {
            break;
        };
        let inner = text.get(content..end).unwrap_or("");
        let name = text.get(..i).unwrap_or("").ends_with("CaseHeaderName(");
        if !inner.is_empty() && !name {
            if is_head(inner) {
                const BLANK: &str = "\\r\\n\\r\\n";
                if let Some(blank) = inner.find(BLANK)
                    && content + blank + BLANK.len() < end
                {
                    ranges.push((content + blank + BLANK.len(), end, REDACTED_BODY));
                }
            } else {
                ranges.push((content, end, REDACTED_BODY));
            }
        }
        i = end + 1;
    }
    splice(text, &ranges)
}

fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Whether text starts like an HTTP/1 request or status line.
fn is_head(text: &str) -> bool {
    if text.starts_with("HTTP/") {
        return true;
    }
    let method_len = text.bytes().take_while(u8::is_ascii_uppercase).count();
    method_len > 0
        && text
            .get(method_len..)
            .is_some_and(|rest| rest.starts_with(' '))
}

/// Debug-formatted header maps and pairs: `"x-api-key": "tg_…"` (also `"name":"value"` and
/// byte-string values) — every value whose name is not [`harmless`]. Quoted strings are
/// skipped whole, so a value is never mistaken for a name.
fn quoted_pairs(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut ranges = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if at(bytes, i) != b'"' {
            i += 1;
            continue;
        }
        let Some(close) = closing_quote(bytes, i + 1) else {
            i += 1;
            continue;
        };
        let name = text.get(i + 1..close).unwrap_or("");
        if !name.is_empty() && name.bytes().all(is_token) && at(bytes, close + 1) == b':' {
            let mut v = close + 2;
            if at(bytes, v) == b' ' {
                v += 1;
            }
            if at(bytes, v) == b'b' {
                v += 1;
            }
            if at(bytes, v) == b'"'
                && let Some(end) = closing_quote(bytes, v + 1)
            {
                if end > v + 1 && !harmless(name) {
                    ranges.push((v + 1, end, REDACTED));
                }
                i = end + 1;
                continue;
            }
        }
        i = close + 1;
    }
    splice(text, &ranges)
}

/// Raw header text, `name: value` at the start of a line. After a real newline the value runs
/// to the next CR or LF; after an escaped one (`\n` inside a Debug-formatted string) to the
/// next escaped CR or LF or the end of the string (an unescaped quote).
fn header_lines(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut ranges = Vec::new();
    let mut i = 1;
    while i < bytes.len() {
        let real = at(bytes, i - 1) == b'\n';
        let escaped = i > 1 && at(bytes, i - 2) == b'\\' && at(bytes, i - 1) == b'n';
        if !real && !escaped {
            i += 1;
            continue;
        }
        let mut j = i;
        while is_token(at(bytes, j)) {
            j += 1;
        }
        if j == i || at(bytes, j) != b':' {
            i = j.max(i + 1);
            continue;
        }
        let mut v = j + 1;
        while matches!(at(bytes, v), b' ' | b'\t') {
            v += 1;
        }
        let mut end = v;
        while end < bytes.len() {
            match (at(bytes, end), at(bytes, end + 1)) {
                (b'\r' | b'\n', _) => break,
                (b'"', _) | (b'\\', b'r' | b'n') if escaped => break,
                (b'\\', _) if escaped => end += 2,
                _ => end += 1,
            }
        }
        let end = end.min(bytes.len());
        let name = text.get(i..j).unwrap_or("");
        if end > v && !harmless(name) {
            ranges.push((v, end, REDACTED));
        }
        i = end.max(i + 1);
    }
    splice(text, &ranges)
}

/// Credentials after an authorization scheme, anywhere: `Bearer …`, `Basic …`, `Digest …`.
fn credentials(text: &str) -> Option<String> {
    const SCHEMES: [&str; 3] = ["bearer", "basic", "digest"];
    let bytes = text.as_bytes();
    let lower = text.to_ascii_lowercase();
    let mut ranges = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let scheme = SCHEMES
            .iter()
            .find(|scheme| lower.get(i..).is_some_and(|rest| rest.starts_with(*scheme)));
        let Some(scheme) = scheme.filter(|_| i == 0 || !is_word(at(bytes, i - 1))) else {
            i += 1;
            continue;
        };
        let mut v = i + scheme.len();
        if at(bytes, v) != b' ' {
            i = v;
            continue;
        }
        while at(bytes, v) == b' ' {
            v += 1;
        }
        let mut end = v;
        while end < bytes.len() && is_credential(at(bytes, end)) {
            end += 1;
        }
        if end > v && text.get(v..end) != Some(REDACTED) {
            ranges.push((v, end, REDACTED));
        }
        i = end.max(v);
    }
    splice(text, &ranges)
}

/// What a credential after a scheme is made of: anything up to a delimiter of the text
/// around it (whitespace, quotes, escapes, separators, brackets).
fn is_credential(c: u8) -> bool {
    c != 0 && !c.is_ascii_whitespace() && !b"\"'\\,;()<>{}".contains(&c)
}

/// The secret parts of URLs, anywhere: the user information (`http://user:password@host`)
/// and every query parameter's value (`?api_key=…&page=2`) — tollgate's access log leaves the
/// query out for the same reason.
fn url_parts(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut ranges = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match at(bytes, i) {
            b':' if at(bytes, i + 1) == b'/' && at(bytes, i + 2) == b'/' => {
                let start = i + 3;
                let mut end = start;
                while is_url_char(at(bytes, end)) && !matches!(at(bytes, end), b'/' | b'?' | b'@') {
                    end += 1;
                }
                if at(bytes, end) == b'@' && end > start {
                    ranges.push((start, end, REDACTED));
                }
                i = end.max(i + 1);
            }
            b'?' | b'&' => {
                let mut name = i + 1;
                while is_url_char(at(bytes, name)) && !matches!(at(bytes, name), b'=' | b'&') {
                    name += 1;
                }
                if name == i + 1 || at(bytes, name) != b'=' {
                    i += 1;
                    continue;
                }
                let value = name + 1;
                let mut end = value;
                while is_url_char(at(bytes, end)) && !matches!(at(bytes, end), b'&' | b'#') {
                    end += 1;
                }
                if end > value && text.get(value..end) != Some(REDACTED) {
                    ranges.push((value, end, REDACTED));
                }
                i = end.max(i + 1);
            }
            _ => i += 1,
        }
    }
    splice(text, &ranges)
}

/// What a URL is made of, up to a delimiter of the text around it.
fn is_url_char(c: u8) -> bool {
    c.is_ascii_graphic() && !b"\"'\\,<>{}()[]".contains(&c)
}

/// Anything shaped like a tollgate secret, anywhere: API keys (`tg_` and 64 hex digits) and
/// the generated admin token (`tga_…`), issued or guessed — whatever key characters follow
/// the prefix are replaced.
fn api_keys(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut ranges = Vec::new();
    let mut from = 0;
    while let Some(found) = text.get(from..).and_then(|rest| rest.find("tg")) {
        let start = from + found;
        let prefix = match (at(bytes, start + 2), at(bytes, start + 3)) {
            (b'_', _) => 3,
            (b'a', b'_') => 4,
            _ => 2,
        };
        let key = start + prefix;
        let mut end = key;
        if prefix > 2 && (start == 0 || !at(bytes, start - 1).is_ascii_alphanumeric()) {
            while at(bytes, end).is_ascii_alphanumeric() || matches!(at(bytes, end), b'_' | b'-') {
                end += 1;
            }
        }
        if end > key {
            ranges.push((key, end, REDACTED));
        }
        from = end;
    }
    splice(text, &ranges)
}

/// `text` with every run of exactly 64 hex digits (`0x`-prefixed or not) — the shape of a
/// private key or another 256-bit secret — replaced. For tollgate's own lines that quote a
/// policy: a relayer key pasted into it is refused (`inline_secret`), and the diagnostic
/// shows the line it is on.
pub fn redact_hex_secrets(text: &str) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    let mut ranges = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if !at(bytes, i).is_ascii_alphanumeric() {
            i += 1;
            continue;
        }
        // A word starts here; words are skipped whole.
        let mut end = i;
        while at(bytes, end).is_ascii_alphanumeric() {
            end += 1;
        }
        let word = bytes.get(i..end).unwrap_or_default();
        let digits = if word.starts_with(b"0x") { i + 2 } else { i };
        if end - digits == 64
            && bytes
                .get(digits..end)
                .is_some_and(|run| run.iter().all(u8::is_ascii_hexdigit))
        {
            ranges.push((digits, end, REDACTED));
        }
        i = end;
    }
    splice(text, &ranges).map_or(Cow::Borrowed(text), Cow::Owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key as the store issues them, and the generated admin token.
    const KEY: &str = "tg_b5e098d0afbe9f0c46111e9e5e660d703bc62cd7b4b023ca599110c3401d6e8e";
    const TOKEN: &str = "tga_d3c9b2e7a011e56cf918bea67adcaef27164f0bfb2f6a945323c72a5e4bc7b6a";

    /// `redact(line)`, checked to hold none of `secrets` and to be a fixed point.
    fn clean(line: &str, secrets: &[&str]) -> String {
        let once = redact(line).into_owned();
        for secret in secrets {
            assert!(!once.contains(secret), "{secret} survived in {once}");
        }
        assert_eq!(redact(&once), once, "redacting twice changes nothing");
        once
    }

    #[test]
    fn header_maps_lose_every_value_but_the_harmless_ones() {
        // pingora_proxy, trace: the client's request head; the prepaid header is the policy's.
        let line = format!(
            r#"Request header: Parts {{ method: GET, uri: /credits, version: HTTP/1.1, headers: {{"x-acme-credential": "{KEY}", "accept": "*/*", "host": "127.0.0.1:40153"}} }}"#
        );
        assert_eq!(
            clean(&line, &[KEY]),
            r#"Request header: Parts { method: GET, uri: /credits, version: HTTP/1.1, headers: {"x-acme-credential": "[redacted]", "accept": "*/*", "host": "127.0.0.1:40153"} }"#
        );
        // pingora_core::apps::http_app, trace: the admin API's request head.
        let line = format!(
            r#"RequestHeader {{ base: Parts {{ method: GET, uri: /v1/audit, version: HTTP/1.1, headers: {{"authorization": "Bearer {TOKEN}", "accept": "*/*", "host": "127.0.0.1:41949"}} }}, header_name_map: Some({{"authorization": CaseHeaderName(b"authorization"), "accept": CaseHeaderName(b"accept"), "host": CaseHeaderName(b"host")}}), raw_target: FromUri, send_end_stream: true }}"#
        );
        assert_eq!(
            clean(&line, &[TOKEN]),
            r#"RequestHeader { base: Parts { method: GET, uri: /v1/audit, version: HTTP/1.1, headers: {"authorization": "[redacted]", "accept": "*/*", "host": "127.0.0.1:41949"} }, header_name_map: Some({"authorization": CaseHeaderName(b"authorization"), "accept": CaseHeaderName(b"accept"), "host": CaseHeaderName(b"host")}), raw_target: FromUri, send_end_stream: true }"#
        );
    }

    #[test]
    fn every_named_secret_header_is_redacted_and_so_is_any_unknown_one() {
        for name in [
            "authorization",
            "Proxy-Authorization",
            "cookie",
            "set-cookie",
            "x-api-key",
            "X-PAYMENT",
            "payment-signature",
            "x-whatever-the-policy-says",
        ] {
            let line = format!(r#"headers: {{"{name}": "s3cr3t \"quoted\" value", "host": "h"}}"#);
            assert_eq!(
                clean(&line, &["s3cr3t", "quoted"]),
                format!(r#"headers: {{"{name}": "[redacted]", "host": "h"}}"#)
            );
            let raw = format!(r#"b"GET / HTTP/1.1\r\n{name}: s3cr3t value\r\nHost: h\r\n\r\n""#);
            assert_eq!(
                clean(&raw, &["s3cr3t"]),
                format!(r#"b"GET / HTTP/1.1\r\n{name}: [redacted]\r\nHost: h\r\n\r\n""#)
            );
        }
        // Compact pairs and byte-string values too.
        assert_eq!(
            clean(
                r#"{"cookie":"a=1", "x-api-key": b"k\xff"}"#,
                &["a=1", "xff"]
            ),
            r#"{"cookie":"[redacted]", "x-api-key": b"[redacted]"}"#
        );
    }

    #[test]
    fn raw_heads_keep_their_harmless_lines() {
        // pingora_core::protocols::http::v1::client, trace: the head written to the upstream.
        let line = format!(
            r#"Writing request header: b"GET /free/secrets HTTP/1.1\r\nx-api-key: {KEY}\r\ncookie: session=abc; theme=dark\r\nauthorization: Bearer xyz\r\nhost: 127.0.0.1:45125\r\naccept: */*\r\nx-request-id: 6185493cfc77-00000004\r\nx-tollgate-rail: free\r\nx-tollgate-key-id: tg_b5e098d0afbe\r\n\r\n""#
        );
        assert_eq!(
            clean(&line, &[KEY, "abc", "xyz"]),
            r#"Writing request header: b"GET /free/secrets HTTP/1.1\r\nx-api-key: [redacted]\r\ncookie: [redacted]\r\nauthorization: [redacted]\r\nhost: 127.0.0.1:45125\r\naccept: */*\r\nx-request-id: 6185493cfc77-00000004\r\nx-tollgate-rail: free\r\nx-tollgate-key-id: tg_[redacted]\r\n\r\n""#
        );
        // The upstream's response head, as a Debug-formatted str.
        let line = r#"Raw Response header: "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nset-cookie: sid=42; HttpOnly\r\ncontent-length: 287\r\n\r\n""#;
        assert_eq!(
            clean(line, &["sid=42"]),
            r#"Raw Response header: "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nset-cookie: [redacted]\r\ncontent-length: 287\r\n\r\n""#
        );
        // Real line breaks (a library printing the head as text).
        assert_eq!(
            clean(
                "GET / HTTP/1.1\r\nCookie: a=\"b\"\r\nHost: h\r\n\r\n",
                &["a=", "\"b\""]
            ),
            "GET / HTTP/1.1\r\nCookie: [redacted]\r\nHost: h\r\n\r\n"
        );
    }

    #[test]
    fn bodies_are_reduced_to_a_marker() {
        // pingora_core::protocols::http::v1::client, trace: the upstream's body (here it
        // echoes the request's headers).
        let line = format!(
            r#"Response body: Some(b"{{\"headers\":{{\"cookie\":\"session=abc\",\"x-api-key\":\"{KEY}\"}},\"password\":\"hunter2\"}}"), upgraded: false"#
        );
        assert_eq!(
            clean(&line, &[KEY, "abc", "hunter2"]),
            r#"Response body: Some(b"[body redacted]"), upgraded: false"#
        );
        // pingora_proxy::proxy_h1, debug: the same body as a task.
        assert_eq!(
            clean(
                r#"upstream event now: Some(Body(Some(b"{\"key\":\"k\"}"), true))"#,
                &["\\\"k\\\""]
            ),
            r#"upstream event now: Some(Body(Some(b"[body redacted]"), true))"#
        );
        // A head and its body in one buffer: the head stays.
        assert_eq!(
            clean(
                r#"write: b"POST /settle HTTP/1.1\r\nhost: f\r\n\r\n{\"signature\":\"0xabc\"}""#,
                &["0xabc"]
            ),
            r#"write: b"POST /settle HTTP/1.1\r\nhost: f\r\n\r\n[body redacted]""#
        );
        // pingora_core::protocols::http::v1::body, trace: a chunk, one character at a time.
        let line = r#"Got size 119, payload_index: 4, chunk: EscapeDefault { inner: FlatMap { inner: FlattenCompat { iter: Fuse { iter: Some(Map { iter: Chars(['7', '7', '\r', '\n', '{', '"', 'p', 'w', '"', ':', '"', ']', ')', '"', '}']) }) }, frontiter: None, backiter: None } } }"#;
        assert_eq!(
            clean(line, &["'p', 'w'"]),
            r#"Got size 119, payload_index: 4, chunk: EscapeDefault { inner: FlatMap { inner: FlattenCompat { iter: Fuse { iter: Some(Map { iter: Chars([[body redacted]]) }) }, frontiter: None, backiter: None } } }"#
        );
        // Empty bodies and header names stay as they are.
        for line in [
            r#"Response body: Some(b""), upgraded: false"#,
            r#"header_name_map: Some({"x-api-key": CaseHeaderName(b"X-Api-Key")})"#,
        ] {
            assert_eq!(redact(line), line);
        }
    }

    #[test]
    fn credentials_and_key_shaped_tokens_go_anywhere() {
        assert_eq!(
            clean("auth failed for Bearer abc.def-ghi, retrying", &["abc"]),
            "auth failed for Bearer [redacted], retrying"
        );
        assert_eq!(
            clean(
                r#"sent "Authorization: Basic dXNlcjpwdw==" and digest   x"#,
                &["dXNlcjpwdw"]
            ),
            r#"sent "Authorization: Basic [redacted]" and digest   [redacted]"#
        );
        assert_eq!(
            clean(
                &format!("DELETE /v1/keys/{KEY}, Host: h; token={TOKEN} (tg_guess-1)"),
                &[KEY, TOKEN, "guess"]
            ),
            "DELETE /v1/keys/tg_[redacted], Host: h; token=tga_[redacted] (tg_[redacted])"
        );
        // Not credentials: words that merely contain the prefixes or schemes.
        for line in [
            "setting_up stg_x tga tg basically bearers basic",
            "Fail to proxy: Downstream ConnectionClosed context: while reading request headers, bytes already read: 69, downstream session type: h1",
            "finish body (response body writer), upgraded: false",
        ] {
            assert!(matches!(redact(line), Cow::Borrowed(_)), "{line}");
        }
    }

    #[test]
    fn urls_lose_their_user_information_and_query_values() {
        // pingora_proxy, error: a request summary.
        assert_eq!(
            clean(
                "Fail to proxy: Upstream ConnectRefused, status: 502, GET /v1/x?api_key=abc123&page=2#top, Host: h",
                &["abc123"]
            ),
            "Fail to proxy: Upstream ConnectRefused, status: 502, GET /v1/x?api_key=[redacted]&page=[redacted]#top, Host: h"
        );
        assert_eq!(
            clean(
                r#"Parts { method: GET, uri: http://bob:hunter2@example.com/a?token=t0k, version: HTTP/1.1, headers: {} }"#,
                &["hunter2", "t0k"]
            ),
            r#"Parts { method: GET, uri: http://[redacted]@example.com/a?token=[redacted], version: HTTP/1.1, headers: {} }"#
        );
        for line in [
            "connected to new server: 127.0.0.1:40707",
            "No reusable connection found for addr: 127.0.0.1:40707, scheme: HTTP",
            "uri: http://example.com/a?flag, x && y",
        ] {
            assert!(matches!(redact(line), Cow::Borrowed(_)), "{line}");
        }
    }

    #[test]
    fn harmless_headers_are_few_and_named() {
        for name in [
            "Host",
            "accept-encoding",
            "Accept",
            "content-length",
            "x-request-id",
        ] {
            assert!(harmless(name), "{name}");
        }
        for name in [
            "authorization",
            "cookie",
            "x-tollgate-secret",
            "x-request-ids",
            "location",
        ] {
            assert!(!harmless(name), "{name}");
        }
    }

    #[test]
    fn client_mistakes_are_told_from_real_errors() {
        for message in [
            "Fail to proxy: Downstream ConnectionClosed context: while reading request headers, bytes already read: 69, downstream session type: h1",
            "Fail to proxy: Downstream ReadError context: while reading request headers cause: Connection reset by peer (os error 104), downstream session type: h1",
            "HTTP server fails to read from downstream:  ReadError context: while reading request headers cause: Connection reset by peer (os error 104)",
            "failed to send error response to downstream: Downstream WriteError context: writing response header cause: Broken pipe (os error 32)",
            "HTTP server fails to write to downstream: Downstream WriteError, GET /readyz, Host: h",
            "Downstream handshake error from 127.0.0.1:5000: TLSHandshakeFailure",
            "Fail to proxy: Downstream WriteError context: writing response body, status: 0, tries: 1, retry: false, GET /x, Host: h",
            "Peer sent more data than expected: extra 3 bytes",
        ] {
            assert!(from_client("pingora_proxy", message), "{message}");
        }
        for message in [
            "Fail to proxy: Upstream ConnectRefused context: Fail to connect to addr: 127.0.0.1:1, status: 502, tries: 1, retry: false, GET /x, Host: h",
            "Fail to proxy: Internal InternalError context: a request without a policy reached the upstream phase cause: Downstream ReadError",
            "Accept() failed Too many open files (os error 24)",
            "send error, draining read buf: Upstream WriteError",
        ] {
            assert!(!from_client("pingora_proxy", message), "{message}");
        }
        assert!(!from_client(
            "sled::pagecache",
            "failed to send error response to downstream"
        ));
    }

    #[test]
    fn the_rate_limit_lets_a_burst_through_per_site_and_second_then_counts() {
        let noise = Noise::new();
        let (a, b) = (("pingora_proxy", 363), ("pingora_core::apps::http_app", 66));
        let t0 = Instant::now();
        let admitted = (0..20).filter(|_| noise.admit(a, t0)).count();
        assert_eq!(admitted, BURST as usize);
        assert!(noise.admit(b, t0), "another site has its own budget");
        assert!(!noise.admit(a, t0 + WINDOW / 2));
        assert_eq!(noise.take_suppressed(), vec![(a, 16)]);
        assert_eq!(noise.take_suppressed(), vec![], "counted once");
        let t1 = t0 + WINDOW;
        let admitted = (0..20).filter(|_| noise.admit(a, t1)).count();
        assert_eq!(admitted, BURST as usize, "a new second, a new burst");
        assert_eq!(noise.take_suppressed(), vec![(a, 15)]);
    }

    #[test]
    fn a_pasted_private_key_is_masked_where_tollgate_quotes_a_policy() {
        // `inline_secret`, as `tollgate check` renders it (the golden snapshot).
        let key = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
        let rendered = format!(
            "error[inline_secret]: a relayer key must not be written in the policy\n --> inline_secret.toll:5:50\n  |\n5 |   settle via rpc \"http://127.0.0.1:8545\" relayer 0x{key}\n  |                                                  ^^^^ a private key, in plain text\n"
        );
        let masked = redact_hex_secrets(&rendered);
        assert!(!masked.contains(key), "{masked}");
        assert!(masked.contains("relayer 0x[redacted]\n"), "{masked}");
        assert_eq!(redact_hex_secrets(key), REDACTED);
        // Addresses (40 digits), longer or shorter runs and words are not keys.
        for text in [
            "pay_to 0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
            "version afcc23f3fd382be3",
            &format!("{key}0"),
            &format!("g{key}"),
        ] {
            assert!(
                matches!(redact_hex_secrets(text), Cow::Borrowed(_)),
                "{text}"
            );
        }
    }
}
