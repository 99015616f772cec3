//! The canonical form of a policy file, printed from its syntax tree (`tollgate fmt`).
//!
//! Two-space indentation, one clause per line, single spaces between tokens, one blank line
//! between top-level blocks, at most one blank line where the author left any, and every
//! comment kept: a comment on its own line stays before the clause that follows it, a comment
//! after a clause stays on that clause's line. A route with a single `free` or `deny` and no
//! comment prints on one line. Numbers, addresses and durations print exactly as written.
//! Formatting is idempotent and `parse(format(x)) == parse(x)`, both property-tested.

use super::ast::*;
use super::source::Span;

/// Formats a parsed file; `source` is the text it was parsed from (for blank lines).
pub fn format(file: &PolicyFile, source: &str) -> String {
    let mut p = Printer {
        out: String::new(),
        source,
        comments: &file.comments,
        next: 0,
        last_end: 0,
    };
    for (i, item) in file.items.iter().enumerate() {
        if i > 0 {
            p.out.push('\n');
        }
        p.leading(item.span, 0, i > 0);
        match &item.node {
            Item::Network(n) => p.network(n, item.span),
            Item::Service(s) => p.service(s, item.span),
            Item::Test(t) => p.test(t, item.span),
        }
        p.trailing(item.span);
    }
    p.rest(source.len(), 0, !file.items.is_empty());
    p.out
}

struct Printer<'a> {
    out: String,
    source: &'a str,
    comments: &'a [Text],
    /// Index of the first comment not printed yet.
    next: usize,
    /// End of the last thing printed, as a source offset.
    last_end: usize,
}

const INDENT: &str = "  ";

impl Printer<'_> {
    fn line(&mut self, depth: usize, text: &str) {
        for _ in 0..depth {
            self.out.push_str(INDENT);
        }
        self.out.push_str(text);
    }

    fn blank_line_between(&self, from: usize, to: usize) -> bool {
        // Line ends may be `\n`, `\r\n` or a lone `\r`, as the grammar accepts.
        let gap = self
            .source
            .get(from..to)
            .unwrap_or("")
            .replace("\r\n", "\n")
            .replace('\r', "\n");
        let mut lines = gap.split('\n');
        lines.next();
        let mut inner: Vec<&str> = lines.collect();
        inner.pop();
        inner.iter().any(|l| l.trim().is_empty())
    }

    /// Comments that sit before `span`, each on its own line; keeps one blank line where the
    /// author left one (never at the top of a block when `allow_blank` is false).
    fn leading(&mut self, span: Span, depth: usize, allow_blank: bool) {
        let mut first = true;
        while let Some(c) = self
            .comments
            .get(self.next)
            .filter(|c| c.span.start < span.start)
        {
            if (allow_blank || !first)
                && self.blank_line_between(self.last_end, c.span.start)
                && !self.out.ends_with("\n\n")
            {
                self.out.push('\n');
            }
            let text = format!("#{}\n", c.node);
            self.line(depth, &text);
            self.last_end = c.span.end;
            self.next += 1;
            first = false;
        }
        if (allow_blank || !first)
            && self.blank_line_between(self.last_end, span.start)
            && !self.out.ends_with("\n\n")
        {
            self.out.push('\n');
        }
    }

    /// A comment on the same line after `span`.
    fn trailing(&mut self, span: Span) {
        if let Some(c) = self.comments.get(self.next) {
            // Trailing means only blanks between the clause and the `#` (not a `}` or a line end).
            let gap = self.source.get(span.end..c.span.start).unwrap_or("\n");
            if c.span.start >= span.end && gap.chars().all(|ch| ch == ' ' || ch == '\t') {
                self.out.push_str(&format!("  #{}", c.node));
                self.next += 1;
                self.last_end = c.span.end;
            }
        }
        if self.last_end < span.end {
            self.last_end = span.end;
        }
        self.out.push('\n');
    }

    /// Comments left before `end` (the inside of a block before its `}`, or the file's end).
    fn rest(&mut self, end: usize, depth: usize, allow_blank: bool) {
        while let Some(c) = self.comments.get(self.next).filter(|c| c.span.start < end) {
            if allow_blank
                && self.blank_line_between(self.last_end, c.span.start)
                && !self.out.ends_with("\n\n")
            {
                self.out.push('\n');
            }
            let text = format!("#{}\n", c.node);
            self.line(depth, &text);
            self.last_end = c.span.end;
            self.next += 1;
        }
    }

    fn block<T>(
        &mut self,
        header: &str,
        clauses: &[super::source::Spanned<T>],
        span: Span,
        depth: usize,
        mut each: impl FnMut(&mut Self, &T, Span, usize),
    ) {
        self.line(depth, &format!("{header} {{\n"));
        self.last_end = span.start;
        for (i, clause) in clauses.iter().enumerate() {
            self.leading(clause.span, depth + 1, i > 0);
            each(self, &clause.node, clause.span, depth + 1);
        }
        self.rest(span.end.saturating_sub(1), depth + 1, true);
        self.line(depth, "}");
        self.last_end = span.end;
    }

    fn network(&mut self, n: &NetworkDecl, span: Span) {
        self.block(
            &format!("network {}", n.name.node),
            &n.clauses,
            span,
            0,
            |p, clause, s, depth| {
                let text = match clause {
                    NetworkClause::Chain(id) => format!("chain {}", id.node),
                    NetworkClause::Asset(a) => {
                        let mut t = format!("asset {} at {}", a.symbol.node, a.address.node);
                        for o in &a.options {
                            match &o.node {
                                AssetOption::Name(v) => {
                                    t.push_str(&format!(" name {}", quote(&v.node)))
                                }
                                AssetOption::Version(v) => {
                                    t.push_str(&format!(" version {}", quote(&v.node)))
                                }
                                AssetOption::Decimals(v) => {
                                    t.push_str(&format!(" decimals {}", v.node))
                                }
                            }
                        }
                        t
                    }
                };
                p.line(depth, &text);
                p.trailing(s);
            },
        );
    }

    fn service(&mut self, s: &ServiceDecl, span: Span) {
        self.block(
            &format!("service {}", quote(&s.name.node)),
            &s.clauses,
            span,
            0,
            |p, clause, cs, depth| {
                let text = match clause {
                    ServiceClause::PayTo(a) => format!("pay_to {}", a.node),
                    ServiceClause::AcceptX402(networks) => {
                        format!(
                            "accept x402 on {}",
                            networks
                                .iter()
                                .map(|n| n.node.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    }
                    ServiceClause::AcceptPrepaid { header: None } => "accept prepaid".to_string(),
                    ServiceClause::AcceptPrepaid { header: Some(h) } => {
                        format!("accept prepaid header {}", quote(&h.node))
                    }
                    ServiceClause::Settle(settle) => settle_text(settle),
                    ServiceClause::Timeout(t) => format!("timeout {}", t.node),
                    ServiceClause::Limit(l) => limit_text(l),
                    ServiceClause::Payers(pl) => payers_text(pl),
                    ServiceClause::Default(d) => format!("default {}", d.node),
                    ServiceClause::Route(r) => {
                        p.route(r, cs, depth);
                        p.trailing(cs);
                        return;
                    }
                };
                p.line(depth, &text);
                p.trailing(cs);
            },
        );
    }

    fn route(&mut self, r: &RouteDecl, span: Span, depth: usize) {
        let header = format!("route {} {}", r.method.node, quote(&r.path.node));
        let has_comment_inside = self
            .comments
            .get(self.next)
            .is_some_and(|c| c.span.start < span.end);
        if let ([only], false) = (r.clauses.as_slice(), has_comment_inside)
            && matches!(only.node, RouteClause::Free | RouteClause::Deny)
        {
            self.line(
                depth,
                &format!("{header} {{ {} }}", route_clause_text(&only.node)),
            );
            self.last_end = span.end;
            return;
        }
        self.block(&header, &r.clauses, span, depth, |p, clause, cs, depth| {
            p.line(depth, &route_clause_text(clause));
            p.trailing(cs);
        });
    }

    fn test(&mut self, t: &TestDecl, span: Span) {
        self.block(
            &format!("test {}", quote(&t.name.node)),
            &t.clauses,
            span,
            0,
            |p, clause, cs, depth| {
                let text = match clause {
                    TestClause::Request { method, target } => {
                        format!("request {} {}", method.node, quote(&target.node))
                    }
                    TestClause::Header { name, value } => {
                        format!("header {} {}", quote(&name.node), quote(&value.node))
                    }
                    TestClause::Payer(a) => format!("payer {}", a.node),
                    TestClause::Balance(m) => format!("balance {}", money_text(m)),
                    TestClause::Expect {
                        outcome,
                        price: None,
                    } => format!("expect {}", outcome.node),
                    TestClause::Expect {
                        outcome,
                        price: Some(m),
                    } => format!("expect {} {}", outcome.node, money_text(m)),
                };
                p.line(depth, &text);
                p.trailing(cs);
            },
        );
    }
}

fn route_clause_text(clause: &RouteClause) -> String {
    match clause {
        RouteClause::Free => "free".to_string(),
        RouteClause::Deny => "deny".to_string(),
        RouteClause::Price(terms) => format!(
            "price {}",
            terms
                .iter()
                .map(money_text)
                .collect::<Vec<_>>()
                .join(" or ")
        ),
        RouteClause::Prefer(r) => format!("prefer {}", r.node),
        RouteClause::Sells(m) => format!("sells {}", money_text(m)),
        RouteClause::RefundOn(c) => format!("refund on {}", c.node),
        RouteClause::Description(d) => format!("description {}", quote(&d.node)),
        RouteClause::Mime(m) => format!("mime {}", quote(&m.node)),
        RouteClause::Timeout(t) => format!("timeout {}", t.node),
        RouteClause::Limit(l) => limit_text(l),
        RouteClause::Payers(pl) => payers_text(pl),
        RouteClause::Settle(s) => settle_text(s),
        RouteClause::Upgrade(protocols) => format!(
            "upgrade {}",
            protocols
                .iter()
                .map(|p| p.node.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn money_text(m: &Money) -> String {
    format!("{} {}", m.amount.node, m.unit.node)
}

fn plural(n: &str, one: &str, many: &str) -> String {
    format!("{n} {}", if n == "1" { one } else { many })
}

fn settle_text(s: &Settle) -> String {
    let mut t = "settle".to_string();
    match s.backend.as_ref().map(|b| &b.node) {
        None => {}
        Some(Backend::Facilitator(url)) => {
            t.push_str(&format!(" via facilitator {}", quote(&url.node)))
        }
        Some(Backend::Rpc { url, relayer }) => {
            let key = match &relayer.node {
                KeyRef::Env(name) => format!("env:{name}"),
                KeyRef::Path(path) => quote(path),
                KeyRef::Inline(hex) => hex.clone(),
            };
            t.push_str(&format!(" via rpc {} relayer {key}", quote(&url.node)));
        }
    }
    match s.timing.as_ref().map(|t| &t.node) {
        None => {}
        Some(Timing::BeforeResponse) => t.push_str(" before response"),
        Some(Timing::AfterResponse) => t.push_str(" after response"),
        Some(Timing::Deferred(triggers)) => {
            t.push_str(" deferred");
            for (i, trigger) in triggers.iter().enumerate() {
                t.push_str(if i == 0 { " every " } else { " or " });
                match &trigger.node {
                    Trigger::Every(d) => t.push_str(d),
                    Trigger::Payments(n) => t.push_str(&plural(n, "payment", "payments")),
                    Trigger::Value(m) => t.push_str(&money_text(m)),
                }
            }
        }
    }
    t
}

fn limit_text(l: &Limit) -> String {
    match l {
        Limit::Unsettled(m) => format!("limit buyer unsettled {}", money_text(m)),
        Limit::Rate { quantity, window } => {
            let q = match &quantity.node {
                Quantity::Requests(n) => plural(n, "request", "requests"),
                Quantity::Spend(m) => money_text(m),
            };
            match window.as_ref().map(|w| &w.node) {
                None => format!("limit buyer {q}"),
                Some(Window::Duration(d)) => format!("limit buyer {q} per {d}"),
                Some(Window::Units { count: None, unit }) => format!("limit buyer {q} per {unit}"),
                Some(Window::Units {
                    count: Some(n),
                    unit,
                }) => format!("limit buyer {q} per {n} {unit}"),
            }
        }
    }
}

fn payers_text(p: &Payers) -> String {
    let verb = if p.allow { "allow" } else { "deny" };
    format!(
        "{verb} payers {}",
        p.addresses
            .iter()
            .map(|a| a.node.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
}
