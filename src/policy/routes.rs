//! Route matching: path patterns, their precedence, and the precomputed matcher.
//!
//! A pattern is a list of segments: literal text, `{param}` (exactly one segment) and a
//! trailing `**` (zero or more segments). **Precedence — most specific wins:** patterns are
//! compared segment by segment from the left; at the first difference a literal beats a
//! `{param}`, which beats `**`, and a pattern that ends beats `**` matching nothing. When the
//! paths tie, a route naming the method beats one with `*`. Under this order two routes can
//! only tie when they have the same method and the same shape (`/a/{x}` and `/a/{y}`): that is
//! a duplicate, refused by `policy::compile`. Declaration order never matters.
//!
//! The matcher is a segment trie walked depth-first in precedence order, so a lookup costs
//! O(path length), not O(number of routes). Request paths are split on `/`, empty segments are
//! dropped, and each segment is percent-decoded before comparison; `.`/`..` segments and
//! encoded slashes are refused (the upstream could resolve them to a different route).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

/// The deepest pattern a policy may hold; request paths may be longer (a `**` matches the rest).
pub const MAX_SEGMENTS: usize = 64;

/// Index of a route in `Policy::routes`.
pub type RouteId = usize;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Segment {
    Literal(String),
    Param(String),
    /// `**`: the rest of the path, possibly nothing.
    CatchAll,
}

/// A parsed path pattern such as `/v1/forecast/{city}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    pub segments: Vec<Segment>,
}

/// Why a path pattern is not valid; `at` is a byte offset into the pattern text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatternError {
    pub at: usize,
    pub len: usize,
    pub message: String,
    pub help: &'static str,
}

impl PathPattern {
    pub fn parse(text: &str) -> Result<PathPattern, PatternError> {
        let err = |at: usize, len: usize, message: &str, help: &'static str| PatternError {
            at,
            len: len.max(1),
            message: message.to_string(),
            help,
        };
        if !text.starts_with('/') {
            return Err(err(
                0,
                1,
                "a path pattern must start with `/`",
                "write it as `/…`",
            ));
        }
        if let Some(i) = text.find(['?', '#']) {
            return Err(err(
                i,
                text.len() - i,
                "a path pattern cannot contain a query or fragment",
                "match on the path only",
            ));
        }
        if text.len() > 1 && text.ends_with('/') {
            return Err(err(
                text.len() - 1,
                1,
                "trailing `/` in a path pattern",
                "remove it: `/a` also matches a request for `/a/`",
            ));
        }
        if text.split('/').count() > MAX_SEGMENTS + 1 {
            return Err(err(
                0,
                text.len(),
                "a path pattern has at most 64 segments",
                "shorten the pattern, or end it with `**`",
            ));
        }
        let mut segments = Vec::new();
        let mut offset = 1;
        let body = text.get(1..).unwrap_or("");
        let parts: Vec<&str> = if body.is_empty() {
            Vec::new()
        } else {
            body.split('/').collect()
        };
        let count = parts.len();
        for (i, part) in parts.into_iter().enumerate() {
            let segment = if part.is_empty() {
                return Err(err(
                    offset,
                    1,
                    "empty segment (`//`) in a path pattern",
                    "remove the extra `/`",
                ));
            } else if part == "**" {
                if i + 1 != count {
                    return Err(err(
                        offset,
                        2,
                        "`**` must be the last segment",
                        "use `{name}` to match one segment in the middle of a path",
                    ));
                }
                Segment::CatchAll
            } else if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                let valid = name
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    return Err(err(
                        offset,
                        part.len(),
                        "a parameter name must be letters, digits and `_`",
                        "write it as `{city}`",
                    ));
                }
                if segments.contains(&Segment::Param(name.to_string())) {
                    return Err(err(
                        offset,
                        part.len(),
                        "this parameter name is used twice in the pattern",
                        "give each parameter its own name",
                    ));
                }
                Segment::Param(name.to_string())
            } else if part.contains(['{', '}', '*']) {
                return Err(err(
                    offset,
                    part.len(),
                    "`{`, `}` and `*` must form a whole segment",
                    "use `{name}` for one segment or a trailing `**` for the rest of the path",
                ));
            } else if part.contains('%') {
                return Err(err(
                    offset,
                    part.len(),
                    "a path pattern is written decoded, without `%` escapes",
                    "request paths are percent-decoded before matching: write `my doc`, not `my%20doc`",
                ));
            } else if part == "." || part == ".." {
                return Err(err(
                    offset,
                    part.len(),
                    "`.` and `..` segments are not allowed",
                    "write the path as the upstream resolves it",
                ));
            } else {
                Segment::Literal(part.to_string())
            };
            segments.push(segment);
            offset += part.len() + 1;
        }
        Ok(PathPattern { segments })
    }

    /// The shape two routes must not share: parameter names do not count.
    pub fn shape(&self) -> Vec<Option<&str>> {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => Some(l.as_str()),
                Segment::Param(_) => Some("{}"),
                Segment::CatchAll => None,
            })
            .collect()
    }

    /// The parameter values a request path gives this pattern (for `explain`).
    pub fn captures<'a>(&self, segments: &'a [Cow<'a, str>]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (i, seg) in self.segments.iter().enumerate() {
            match seg {
                Segment::Param(name) => {
                    if let Some(v) = segments.get(i) {
                        out.push((name.clone(), v.to_string()));
                    }
                }
                Segment::CatchAll => {
                    let rest: Vec<&str> = segments.iter().skip(i).map(|s| s.as_ref()).collect();
                    out.push(("**".to_string(), rest.join("/")));
                }
                Segment::Literal(_) => {}
            }
        }
        out
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.segments.is_empty() {
            return f.write_str("/");
        }
        for s in &self.segments {
            match s {
                Segment::Literal(l) => write!(f, "/{l}")?,
                Segment::Param(p) => write!(f, "/{{{p}}}")?,
                Segment::CatchAll => f.write_str("/**")?,
            }
        }
        Ok(())
    }
}

/// Why a request path cannot be matched safely (answered with 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Malformed {
    /// Not an origin-form path (`/…`).
    NotAbsolute,
    /// A `.` or `..` segment, plain or percent-encoded.
    DotSegment,
    /// A percent-encoded `/` or a decoded segment that is not UTF-8.
    BadEncoding,
    /// A `#` fragment: clients never send one, and upstreams disagree on what it means.
    Fragment,
    /// A method that is not upper case (`get`): methods are case-sensitive, frameworks are not.
    Method,
    /// A request target that is not origin-form, an `http(s)` URL of this host, or `OPTIONS *`.
    TargetForm,
    /// An absolute-form target naming another host than `Host`, or carrying userinfo.
    Authority,
    /// `*` as the target of a method other than `OPTIONS`.
    Asterisk,
    /// Bytes in the target that must be percent-encoded: not printable ASCII, or refused by
    /// URI parsers where they stand (`<`, `>`, `` ` `` in the path; `"`, `<`, `>` in the query).
    TargetBytes,
    /// A backslash in the path, plain or percent-encoded: some servers read it as `/`.
    Backslash,
    /// A `;` in the path: servlet containers strip `;…` path parameters before routing.
    PathParameter,
    /// The path's letter case decides the route: matched exactly it reaches one route,
    /// ignoring case another (upstreams disagree on case, so neither can be priced safely).
    AmbiguousCase,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Malformed::NotAbsolute => "the request path must start with `/`",
            Malformed::Fragment => "the request target contains a `#` fragment",
            Malformed::Method => "the request method must be upper case",
            Malformed::DotSegment => "the request path contains a `.` or `..` segment",
            Malformed::BadEncoding => {
                "the request path contains an encoded `/`, an encoded control character or invalid percent-encoding"
            }
            Malformed::TargetForm => {
                "the request target must be a path starting with `/` (or an http URL of this host)"
            }
            Malformed::Authority => {
                "an absolute request URL must name this host, as the Host header does, without userinfo"
            }
            Malformed::Asterisk => "`*` is a request target for OPTIONS only",
            Malformed::TargetBytes => {
                "the request target contains bytes that must be percent-encoded (not printable ASCII, or `<`, `>`, `` ` `` in the path, `\"`, `<`, `>` in the query)"
            }
            Malformed::Backslash => "the request path contains a backslash",
            Malformed::PathParameter => {
                "the request path contains `;` (path parameters are not accepted)"
            }
            Malformed::AmbiguousCase => {
                "the request path's letter case makes it match a different route than its lower-case form"
            }
        })
    }
}

/// Refuses a method that is not upper case: `get` must not dodge a `GET` route.
pub fn check_method(method: &str) -> Result<(), Malformed> {
    if method.bytes().any(|b| b.is_ascii_lowercase()) {
        Err(Malformed::Method)
    } else {
        Ok(())
    }
}

/// Splits a request target (path and optional query) into decoded, non-empty segments.
pub fn split_path(target: &str) -> Result<Vec<Cow<'_, str>>, Malformed> {
    if target.contains('#') {
        return Err(Malformed::Fragment);
    }
    let path = target.split('?').next().unwrap_or("");
    if !path.starts_with('/') {
        return Err(Malformed::NotAbsolute);
    }
    let mut segments = Vec::with_capacity(8);
    for raw in path.split('/').filter(|s| !s.is_empty()) {
        // IIS and Windows servers read `\` as `/`; Tomcat and Spring strip `;…` path
        // parameters before routing, so `/paid;x/1` would reach `/paid/1` unpriced.
        if raw.contains('\\') {
            return Err(Malformed::Backslash);
        }
        if raw.contains(';') {
            return Err(Malformed::PathParameter);
        }
        let segment = if raw.contains('%') {
            let decoded = percent_encoding::percent_decode_str(raw)
                .decode_utf8()
                .map_err(|_| Malformed::BadEncoding)?;
            if decoded.contains('/') || decoded.chars().any(char::is_control) {
                return Err(Malformed::BadEncoding);
            }
            if decoded.contains('\\') {
                return Err(Malformed::Backslash);
            }
            Cow::Owned(decoded.into_owned())
        } else {
            Cow::Borrowed(raw)
        };
        if segment == "." || segment == ".." {
            return Err(Malformed::DotSegment);
        }
        segments.push(segment);
    }
    Ok(segments)
}

/// Routes that end at one trie node, by method.
#[derive(Debug, Default, Clone)]
struct Terminal {
    by_method: Vec<(String, RouteId)>,
    any: Option<RouteId>,
}

impl Terminal {
    /// The route for a method: its own, else (for `HEAD`) the `GET` route, else the `*` one.
    fn get(&self, method: &str) -> Option<RouteId> {
        let exact = |m: &str| {
            self.by_method
                .iter()
                .find(|(x, _)| x == m)
                .map(|(_, id)| *id)
        };
        exact(method)
            .or_else(|| if method == "HEAD" { exact("GET") } else { None })
            .or(self.any)
    }

    /// Whether every request with this method (`None`: any method) ends here.
    fn covers(&self, method: Option<&str>) -> bool {
        match method {
            None => self.any.is_some(),
            Some(m) => self.get(m).is_some(),
        }
    }

    fn insert(&mut self, method: Option<&str>, id: RouteId) -> Result<(), RouteId> {
        let slot = match method {
            None => &mut self.any,
            Some(m) => match self.by_method.iter().position(|(x, _)| x == m) {
                Some(i) => return Err(self.by_method.get(i).map_or(id, |(_, existing)| *existing)),
                None => {
                    self.by_method.push((m.to_string(), id));
                    return Ok(());
                }
            },
        };
        match slot {
            Some(existing) => Err(*existing),
            None => {
                *slot = Some(id);
                Ok(())
            }
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Node {
    literals: HashMap<String, Node>,
    param: Option<Box<Node>>,
    end: Terminal,
    catch_all: Terminal,
}

/// The precomputed route table of one policy.
///
/// Two tries: the routes as written, and the same routes with their literals in lower case.
/// Many upstreams route without regard to letter case (Express by default, ASP.NET, IIS), so
/// a request whose case decides its route (`/PAID/1` reaching `/**` exactly but `/paid/{id}`
/// ignoring case) is refused rather than priced by the cheaper reading.
#[derive(Debug, Default, Clone)]
pub struct RouteMatcher {
    root: Node,
    folded: Node,
    /// Some pattern has an upper-case literal: every lookup is checked against `folded`.
    upper_literals: bool,
}

impl RouteMatcher {
    /// Adds a route; on a duplicate (same method and shape) returns the route already there.
    pub fn insert(
        &mut self,
        method: Option<&str>,
        pattern: &PathPattern,
        id: RouteId,
    ) -> Result<(), RouteId> {
        // Folded first: a shape taken up to letter case is refused before anything is stored
        // (and every exact duplicate is one up to case too).
        insert_in(&mut self.folded, method, pattern, id, true)?;
        insert_in(&mut self.root, method, pattern, id, false)?;
        self.upper_literals |= pattern
            .segments
            .iter()
            .any(|s| matches!(s, Segment::Literal(l) if l.bytes().any(|b| b.is_ascii_uppercase())));
        Ok(())
    }

    /// Routes ending in `**` that can never be chosen: more specific routes take every path
    /// they match (the path they end at, and every longer one through a `{param}` branch).
    pub fn shadowed(&self) -> Vec<RouteId> {
        let mut out = Vec::new();
        shadowed_in(&self.root, &mut out);
        out
    }

    /// The most specific route for a method and a split request path, or
    /// [`Malformed::AmbiguousCase`] when ignoring letter case would choose another route.
    pub fn find<S: AsRef<str>>(
        &self,
        method: &str,
        segments: &[S],
    ) -> Result<Option<RouteId>, Malformed> {
        let exact = find_in(&self.root, method, segments);
        let has_upper = || {
            segments
                .iter()
                .any(|s| s.as_ref().bytes().any(|b| b.is_ascii_uppercase()))
        };
        if !self.upper_literals && !has_upper() {
            return Ok(exact);
        }
        let lower: Vec<String> = segments
            .iter()
            .map(|s| s.as_ref().to_ascii_lowercase())
            .collect();
        if find_in(&self.folded, method, &lower) == exact {
            Ok(exact)
        } else {
            Err(Malformed::AmbiguousCase)
        }
    }
}

fn insert_in(
    root: &mut Node,
    method: Option<&str>,
    pattern: &PathPattern,
    id: RouteId,
    fold: bool,
) -> Result<(), RouteId> {
    let mut node = root;
    for segment in &pattern.segments {
        node = match segment {
            Segment::Literal(l) if fold => node.literals.entry(l.to_ascii_lowercase()).or_default(),
            Segment::Literal(l) => node.literals.entry(l.clone()).or_default(),
            Segment::Param(_) => node.param.get_or_insert_with(Box::default),
            Segment::CatchAll => return node.catch_all.insert(method, id),
        };
    }
    node.end.insert(method, id)
}

fn shadowed_in(node: &Node, out: &mut Vec<RouteId>) {
    let catch_alls = node
        .catch_all
        .by_method
        .iter()
        .map(|(m, id)| (Some(m.as_str()), *id));
    for (method, id) in catch_alls.chain(node.catch_all.any.map(|id| (None, id))) {
        if node.end.covers(method) && node.param.as_deref().is_some_and(|p| covers_all(p, method)) {
            out.push(id);
        }
    }
    for child in node.literals.values().chain(node.param.as_deref()) {
        shadowed_in(child, out);
    }
}

/// Whether every path below `node` (zero or more segments) is taken by a route for `method`.
fn covers_all(node: &Node, method: Option<&str>) -> bool {
    node.catch_all.covers(method)
        || (node.end.covers(method) && node.param.as_deref().is_some_and(|p| covers_all(p, method)))
}

fn find_in<S: AsRef<str>>(node: &Node, method: &str, segments: &[S]) -> Option<RouteId> {
    match segments.split_first() {
        None => {
            if let Some(id) = node.end.get(method) {
                return Some(id);
            }
        }
        Some((first, rest)) => {
            if let Some(id) = node
                .literals
                .get(first.as_ref())
                .and_then(|child| find_in(child, method, rest))
            {
                return Some(id);
            }
            if let Some(id) = node
                .param
                .as_deref()
                .and_then(|child| find_in(child, method, rest))
            {
                return Some(id);
            }
        }
    }
    node.catch_all.get(method)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(routes: &[(&str, &str)]) -> RouteMatcher {
        let mut m = RouteMatcher::default();
        for (id, (method, pattern)) in routes.iter().enumerate() {
            let method = if *method == "*" { None } else { Some(*method) };
            m.insert(method, &PathPattern::parse(pattern).unwrap(), id)
                .unwrap();
        }
        m
    }

    fn find(m: &RouteMatcher, method: &str, path: &str) -> Option<RouteId> {
        m.find(method, &split_path(path).unwrap()).unwrap()
    }

    #[test]
    fn most_specific_wins_regardless_of_order() {
        let m = matcher(&[
            ("*", "/**"),
            ("GET", "/a/{x}"),
            ("GET", "/{y}/b"),
            ("GET", "/a/b"),
            ("*", "/a/b"),
        ]);
        assert_eq!(find(&m, "GET", "/a/b"), Some(3));
        assert_eq!(find(&m, "POST", "/a/b"), Some(4));
        assert_eq!(find(&m, "GET", "/a/c"), Some(1));
        assert_eq!(find(&m, "GET", "/z/b"), Some(2));
        assert_eq!(find(&m, "GET", "/z/z"), Some(0));
        assert_eq!(find(&m, "GET", "/"), Some(0));
    }

    #[test]
    fn letter_case_that_decides_the_route_is_refused() {
        let m = matcher(&[("*", "/**"), ("GET", "/paid/{id}")]);
        let split = |p| split_path(p).unwrap();
        assert_eq!(m.find("GET", &split("/paid/1")), Ok(Some(1)));
        assert_eq!(
            m.find("GET", &split("/PAID/1")),
            Err(Malformed::AmbiguousCase)
        );
        assert_eq!(
            m.find("GET", &split("/Paid/X")),
            Err(Malformed::AmbiguousCase)
        );
        // Case that does not change the route is fine (the parameter keeps its case).
        assert_eq!(m.find("GET", &split("/paid/ABC")), Ok(Some(1)));
        assert_eq!(m.find("GET", &split("/Other")), Ok(Some(0)));
        // An upper-case pattern is checked even for a lower-case request.
        let m = matcher(&[("*", "/**"), ("GET", "/Paid/{id}")]);
        assert_eq!(
            m.find("GET", &split("/paid/1")),
            Err(Malformed::AmbiguousCase)
        );
        assert_eq!(m.find("GET", &split("/Paid/1")), Ok(Some(1)));
        // Two routes that differ only in case are one route to a case-blind upstream.
        let mut m = matcher(&[("GET", "/a")]);
        let upper = PathPattern::parse("/A").unwrap();
        assert_eq!(m.insert(Some("GET"), &upper, 1), Err(0));
        assert_eq!(m.find("GET", &split("/a")), Ok(Some(0)));
    }

    #[test]
    fn backtracks_when_a_literal_branch_dead_ends() {
        let m = matcher(&[("GET", "/a/b/c"), ("GET", "/{x}/b/d")]);
        assert_eq!(find(&m, "GET", "/a/b/d"), Some(1));
        assert_eq!(find(&m, "GET", "/a/b/e"), None);
    }

    #[test]
    fn catch_all_matches_zero_or_more() {
        let m = matcher(&[("GET", "/files/**"), ("GET", "/files")]);
        assert_eq!(find(&m, "GET", "/files"), Some(1));
        assert_eq!(find(&m, "GET", "/files/"), Some(1));
        assert_eq!(find(&m, "GET", "/files/a/b"), Some(0));
    }

    #[test]
    fn fully_covered_catch_alls_are_shadowed() {
        let m = matcher(&[("GET", "/a"), ("GET", "/a/{x}/**"), ("GET", "/a/**")]);
        assert_eq!(m.shadowed(), vec![2]);
        // A `*` catch-all is only covered by `*` routes: other methods still reach it.
        let m = matcher(&[("GET", "/a"), ("GET", "/a/{x}/**"), ("*", "/a/**")]);
        assert_eq!(m.shadowed(), Vec::<RouteId>::new());
        // A gap (no route for `/a` itself) keeps the catch-all reachable.
        let m = matcher(&[("GET", "/a/{x}/**"), ("GET", "/a/**")]);
        assert_eq!(m.shadowed(), Vec::<RouteId>::new());
        // Covered through a deeper chain: /a, /a/{x}, /a/{x}/{y}/**.
        let m = matcher(&[
            ("GET", "/a"),
            ("GET", "/a/{x}"),
            ("GET", "/a/{x}/{y}/**"),
            ("GET", "/a/**"),
        ]);
        assert_eq!(m.shadowed(), vec![3]);
    }

    #[test]
    fn head_is_answered_by_the_get_route() {
        let m = matcher(&[("GET", "/a"), ("*", "/**"), ("HEAD", "/h"), ("GET", "/h")]);
        assert_eq!(find(&m, "HEAD", "/a"), Some(0));
        assert_eq!(find(&m, "HEAD", "/h"), Some(2));
        assert_eq!(find(&m, "POST", "/a"), Some(1));
    }

    #[test]
    fn duplicates_are_refused() {
        let mut m = matcher(&[("GET", "/a/{x}")]);
        assert_eq!(
            m.insert(Some("GET"), &PathPattern::parse("/a/{y}").unwrap(), 1),
            Err(0)
        );
        assert_eq!(
            m.insert(None, &PathPattern::parse("/a/{y}").unwrap(), 1),
            Ok(())
        );
    }

    #[test]
    fn request_paths_are_normalised_or_refused() {
        assert_eq!(split_path("//a///b/?q=1").unwrap(), vec!["a", "b"]);
        assert_eq!(split_path("/caf%C3%A9").unwrap(), vec!["café"]);
        assert_eq!(split_path("/a/../b"), Err(Malformed::DotSegment));
        assert_eq!(split_path("/a/%2e%2E/b"), Err(Malformed::DotSegment));
        assert_eq!(split_path("/a%2Fb"), Err(Malformed::BadEncoding));
        assert_eq!(split_path("a"), Err(Malformed::NotAbsolute));
        assert_eq!(split_path("/a#/../b"), Err(Malformed::Fragment));
        assert_eq!(split_path("/a\\b"), Err(Malformed::Backslash));
        assert_eq!(split_path("/a/%5c"), Err(Malformed::Backslash));
        assert_eq!(split_path("/paid;x=1/1"), Err(Malformed::PathParameter));
        assert_eq!(split_path("/a/%00"), Err(Malformed::BadEncoding));
        assert!(split_path("/a?b\\c;d").is_ok());
    }

    #[test]
    fn patterns_are_checked() {
        assert!(PathPattern::parse("/a/**/b").is_err());
        assert!(PathPattern::parse("/a/{x}/{x}").is_err());
        assert!(PathPattern::parse("/a/x{y}").is_err());
        assert!(PathPattern::parse("a").is_err());
        assert!(PathPattern::parse("/a/").is_err());
        assert!(PathPattern::parse("/my%20doc").is_err());
        assert!(PathPattern::parse(&"/a".repeat(65)).is_err());
        assert!(PathPattern::parse(&"/a".repeat(64)).is_ok());
        assert_eq!(PathPattern::parse("/").unwrap().segments, vec![]);
        assert_eq!(
            PathPattern::parse("/v1/{city}/**").unwrap().to_string(),
            "/v1/{city}/**"
        );
    }
}
