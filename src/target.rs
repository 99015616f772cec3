//! The request target: what tollgate prices is exactly what the upstream receives.
//!
//! HTTP/1.1 allows four forms of request target (RFC 9112 §3.2). Pingora keeps the bytes of
//! any of them for the upstream, but stores `/` as the URI of a target that is neither
//! origin-form nor an `http(s)` URL, so a decision made on the stored URI could price
//! `GET foo:/paid/1` as `/` while an upstream such as Werkzeug routes it to `/paid/1`. This
//! module decides, once and from the raw bytes, what "the request" is: [`parse`] turns the
//! target into one canonical origin-form text (path and query), which the decision matches
//! and the forwarded request carries, or refuses it. The proxy never forwards the client's
//! bytes themselves.
//!
//! Accepted:
//! - origin-form `/path?query`: the path's runs of `/` are collapsed to one (route matching
//!   ignores empty segments, and some upstreams read a leading `//x` as an authority);
//! - absolute-form `http://authority/path?query` whose authority equals the `Host` header
//!   (RFC 9112 §3.2.2 has clients send both the same): forwarded in origin form;
//! - `*` for `OPTIONS` only (asterisk-form): it names no path, so no route matches it.
//!
//! Refused with `400 malformed_request`: every other form (`foo:/x`, `x/y`, `%2Fx`, a
//! `CONNECT` authority), an absolute-form URL naming another host or carrying userinfo, bytes
//! that are not printable ASCII, and the printable ones the URI parser Pingora builds request
//! heads with refuses (`<`, `>`, `` ` `` in the path; `"`, `<`, `>` in the query). The path's
//! own rules (dot segments, encoded slashes, backslashes, `;` path parameters) are
//! [`crate::policy::routes::split_path`]'s, applied by the decision to the canonical text — so
//! `explain` and policy tests apply them too.
//!
//! Pure: no I/O, no allocation beyond the canonical text.

use crate::policy::routes::Malformed;

/// A request target tollgate accepts, in the form it is priced and forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Origin form, canonical: `/` followed by the path (no empty segments) and the query.
    Origin(String),
    /// `OPTIONS *`: the server as a whole, no path.
    Asterisk,
}

impl Target {
    /// The text the decision matches and the upstream receives: `/path?query` or `*`.
    pub fn as_str(&self) -> &str {
        match self {
            Target::Origin(text) => text,
            Target::Asterisk => "*",
        }
    }

    /// The path without the query (`*` for the asterisk form).
    pub fn path(&self) -> &str {
        let text = self.as_str();
        text.split_once('?').map_or(text, |(path, _)| path)
    }
}

/// Decides what a request's target is. `host` is the `Host` header, when there is one.
pub fn parse(method: &str, raw: &[u8], host: Option<&[u8]>) -> Result<Target, Malformed> {
    if raw.iter().any(|b| !b.is_ascii_graphic()) {
        return Err(Malformed::TargetBytes);
    }
    // Every byte is printable ASCII, so this never fails.
    let text = std::str::from_utf8(raw).map_err(|_| Malformed::TargetBytes)?;
    if text == "*" {
        return if method == "OPTIONS" {
            Ok(Target::Asterisk)
        } else {
            Err(Malformed::Asterisk)
        };
    }
    if text.starts_with('/') {
        return origin(text);
    }
    let Some(rest) = strip_http_scheme(text) else {
        return Err(Malformed::TargetForm);
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path_and_query) = rest.split_at(end);
    if authority.is_empty() || authority.contains('@') {
        return Err(Malformed::Authority);
    }
    let same_host = host.is_some_and(|h| h.eq_ignore_ascii_case(authority.as_bytes()));
    if !same_host {
        return Err(Malformed::Authority);
    }
    match path_and_query.as_bytes().first() {
        None => Ok(Target::Origin("/".to_string())),
        Some(b'?') => origin(&format!("/{path_and_query}")),
        _ => origin(path_and_query),
    }
}

/// Printable ASCII that `http::Uri` refuses in a path, and in a query.
const URI_PATH_REFUSES: [char; 3] = ['<', '>', '`'];
const URI_QUERY_REFUSES: [char; 3] = ['"', '<', '>'];

/// `http://` or `https://` in any letter case, removed.
fn strip_http_scheme(text: &str) -> Option<&str> {
    ["http://", "https://"].into_iter().find_map(|scheme| {
        let head = text.get(..scheme.len())?;
        head.eq_ignore_ascii_case(scheme)
            .then(|| text.get(scheme.len()..))
            .flatten()
    })
}

/// Checks an origin-form target (starts with `/`) and collapses the path's repeated slashes.
fn origin(text: &str) -> Result<Target, Malformed> {
    if text.contains('#') {
        return Err(Malformed::Fragment);
    }
    let (path, query) = match text.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (text, None),
    };
    // Printable, but refused by the URI parser Pingora builds every request head with (the
    // `http` crate): Pingora would answer such a head with an empty 400, and no upstream head
    // could carry it.
    if path.contains(URI_PATH_REFUSES) || query.is_some_and(|q| q.contains(URI_QUERY_REFUSES)) {
        return Err(Malformed::TargetBytes);
    }
    let mut canonical = String::with_capacity(text.len());
    let mut last_slash = false;
    for c in path.chars() {
        if c == '/' && last_slash {
            continue;
        }
        last_slash = c == '/';
        canonical.push(c);
    }
    if let Some(query) = query {
        canonical.push('?');
        canonical.push_str(query);
    }
    Ok(Target::Origin(canonical))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(method: &str, raw: &str, host: Option<&str>) -> String {
        match parse(method, raw.as_bytes(), host.map(str::as_bytes)) {
            Ok(t) => t.as_str().to_string(),
            Err(e) => format!("ERR {e:?}"),
        }
    }

    #[test]
    fn origin_form_is_kept_and_collapsed() {
        assert_eq!(ok("GET", "/paid/1?a=b", None), "/paid/1?a=b");
        assert_eq!(ok("GET", "/", None), "/");
        assert_eq!(ok("GET", "//free/paid/1", None), "/free/paid/1");
        assert_eq!(ok("GET", "/a//b///c/?x=//y", None), "/a/b/c/?x=//y");
        assert_eq!(ok("GET", "/a?b\\c", None), "/a?b\\c");
    }

    #[test]
    fn other_forms_are_refused() {
        for raw in [
            "foo:/paid/1",
            "paid/1",
            "%2Fpaid/1",
            "x:/paid/42?a=b",
            "host:443",
            "ftp://x/paid",
            "http:/paid",
        ] {
            assert_eq!(
                parse("GET", raw.as_bytes(), Some(b"x")),
                Err(Malformed::TargetForm),
                "{raw}"
            );
        }
        assert_eq!(ok("GET", "*", None), "ERR Asterisk");
        assert_eq!(ok("OPTIONS", "*", None), "*");
        assert_eq!(ok("GET", "/a#b", None), "ERR Fragment");
        assert_eq!(
            parse("GET", b"/caf\xc3\xa9", None),
            Err(Malformed::TargetBytes)
        );
        assert_eq!(parse("GET", b"/a\x7fb", None), Err(Malformed::TargetBytes));
    }

    #[test]
    fn what_the_uri_parser_refuses_is_refused() {
        // Found by the `target` fuzz target: accepted here, then refused by Pingora's head
        // parser (`http::Uri`) with an empty 400.
        for raw in [
            "/`",
            "/a<b",
            "/a>b/c",
            "/?q=\"x\"",
            "/p?<",
            "/p?a>b",
            "http://h/`x",
        ] {
            assert_eq!(
                parse("GET", raw.as_bytes(), Some(b"h")),
                Err(Malformed::TargetBytes),
                "{raw}"
            );
        }
        // What it takes stays accepted: `"` in the path, `` ` `` in the query, `{}|^`.
        for raw in ["/\"x\"", "/p?`", "/{a}|^b?{}|^"] {
            assert_eq!(ok("GET", raw, None), raw);
        }
    }

    #[test]
    fn absolute_form_must_name_this_host() {
        let host = Some("api.example.com:8402");
        assert_eq!(
            ok("GET", "http://api.example.com:8402/paid/1?q=1", host),
            "/paid/1?q=1"
        );
        assert_eq!(ok("GET", "HTTPS://API.example.com:8402", host), "/");
        assert_eq!(ok("GET", "http://api.example.com:8402?q", host), "/?q");
        assert_eq!(
            ok("GET", "http://other.example.com/paid/1", host),
            "ERR Authority"
        );
        assert_eq!(
            ok("GET", "http://u@api.example.com:8402/", host),
            "ERR Authority"
        );
        assert_eq!(ok("GET", "http:///paid", host), "ERR Authority");
        assert_eq!(ok("GET", "http://x/paid", None), "ERR Authority");
    }

    #[test]
    fn path_and_text_agree() {
        let t = parse("GET", b"//a//b?c=d", None).unwrap();
        assert_eq!(t.path(), "/a/b");
        assert_eq!(Target::Asterisk.path(), "*");
    }
}
