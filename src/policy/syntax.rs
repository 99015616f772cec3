//! Text → syntax tree ([`ast::PolicyFile`]). The only module of the crate that sees pest types.
//!
//! The grammar (`grammar/policy.pest`) keeps every line that fits no clause as a `bad_line`;
//! this module turns each one into a precise diagnostic (unknown keyword with a suggestion,
//! misplaced clause, unterminated string, or "expected …, found …" from re-parsing the line
//! alone) and leaves it out of the tree, so one run reports every syntax error of a file.
//! Only a broken block structure (a `{` never closed) stops parsing early.

use pest::Parser;
use pest::error::{Error as PestError, ErrorVariant, InputLocation};
use pest::iterators::{Pair, Pairs};

use super::ast::*;
use super::diag::Diagnostic;
use super::source::{Span, Spanned};

#[derive(pest_derive::Parser)]
#[grammar = "../grammar/policy.pest"]
struct Grammar;

/// The result of parsing: a tree (absent only when the block structure is broken) and every
/// syntax diagnostic.
#[derive(Debug)]
pub struct Parsed {
    pub file: Option<PolicyFile>,
    pub diagnostics: Vec<Diagnostic>,
}

/// Parses a policy file.
pub fn parse(text: &str) -> Parsed {
    match Grammar::parse(Rule::file, text) {
        Err(error) => Parsed {
            file: None,
            diagnostics: vec![fatal(error, text)],
        },
        Ok(pairs) => {
            let mut lower = Lower {
                diagnostics: Vec::new(),
            };
            let comments = pairs
                .clone()
                .flatten()
                .filter(|p| p.as_rule() == Rule::COMMENT)
                .map(|p| {
                    Spanned::new(
                        p.as_str().trim_start_matches('#').trim_end().to_string(),
                        span(&p),
                    )
                })
                .collect();
            let mut items = Vec::new();
            for pair in pairs
                .flatten()
                .filter(|p| p.as_rule() == Rule::file)
                .take(1)
            {
                items = lower.file(pair);
            }
            Parsed {
                file: Some(PolicyFile { items, comments }),
                diagnostics: lower.diagnostics,
            }
        }
    }
}

/// Where a line sits; decides which keywords are valid there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Context {
    Top,
    Service,
    Route,
    Network,
    Test,
}

impl Context {
    const ALL: [Context; 5] = [
        Context::Top,
        Context::Service,
        Context::Route,
        Context::Network,
        Context::Test,
    ];

    fn keywords(self) -> &'static [&'static str] {
        match self {
            Context::Top => &["service", "network", "test"],
            Context::Service => &[
                "pay_to", "accept", "settle", "timeout", "limit", "allow", "deny", "default",
                "route",
            ],
            Context::Route => &[
                "free",
                "deny",
                "price",
                "prefer",
                "refund",
                "sells",
                "description",
                "mime",
                "timeout",
                "limit",
                "allow",
                "settle",
                "upgrade",
            ],
            Context::Network => &["chain", "asset"],
            Context::Test => &["request", "header", "payer", "balance", "expect"],
        }
    }

    fn entry(self) -> Rule {
        match self {
            Context::Top => Rule::item_line,
            Context::Service => Rule::service_line,
            Context::Route => Rule::route_line,
            Context::Network => Rule::network_line,
            Context::Test => Rule::test_line,
        }
    }

    fn place(self) -> &'static str {
        match self {
            Context::Top => "at the top level of a file",
            Context::Service => "in a `service` block",
            Context::Route => "in a `route` block",
            Context::Network => "in a `network` block",
            Context::Test => "in a `test` block",
        }
    }
}

/// A pair whose children do not have the shape the grammar guarantees: a bug in this module.
struct Shape(Span);

type Lowered<T> = Result<T, Shape>;

struct Lower {
    diagnostics: Vec<Diagnostic>,
}

/// The span of a pair without trailing spaces and comments: pest's implicit skip before an
/// optional or repeated tail (`money?`, `(or money)*`) can leave them inside the pair.
fn span(pair: &Pair<'_, Rule>) -> Span {
    let s = pair.as_span();
    let start = s.start();
    let mut end = s.end();
    let comments: Vec<(usize, usize)> = pair
        .clone()
        .into_inner()
        .flatten()
        .filter(|p| p.as_rule() == Rule::COMMENT)
        .map(|p| (p.as_span().start(), p.as_span().end()))
        .collect();
    let text = s.get_input();
    loop {
        if let Some((comment_start, _)) = comments.iter().find(|(_, e)| *e == end) {
            end = *comment_start;
            continue;
        }
        let trimmed = text
            .get(start..end)
            .map_or(end, |t| start + t.trim_end_matches([' ', '\t']).len());
        if trimmed == end {
            return Span::new(start, end);
        }
        end = trimmed;
    }
}

fn text(pair: &Pair<'_, Rule>) -> Text {
    Spanned::new(
        pair.as_str()
            .get(..span(pair).end - pair.as_span().start())
            .unwrap_or("")
            .to_string(),
        span(pair),
    )
}

fn is_keyword(rule: Rule) -> bool {
    format!("{rule:?}").starts_with("kw_")
}

/// The children of a pair that carry meaning (comments and keywords skipped).
struct Kids<'i> {
    parent: Span,
    inner: std::iter::Peekable<Pairs<'i, Rule>>,
}

impl<'i> Kids<'i> {
    fn of(pair: Pair<'i, Rule>) -> Self {
        Kids {
            parent: span(&pair),
            inner: pair.into_inner().peekable(),
        }
    }

    fn skip_trivia(&mut self) {
        while self
            .inner
            .next_if(|p| p.as_rule() == Rule::COMMENT || is_keyword(p.as_rule()))
            .is_some()
        {}
    }

    fn next(&mut self) -> Option<Pair<'i, Rule>> {
        self.skip_trivia();
        self.inner.next()
    }

    fn peek_rule(&mut self) -> Option<Rule> {
        self.skip_trivia();
        self.inner.peek().map(|p| p.as_rule())
    }

    fn want(&mut self, rule: Rule) -> Lowered<Pair<'i, Rule>> {
        match self.next() {
            Some(p) if p.as_rule() == rule => Ok(p),
            Some(p) => Err(Shape(span(&p))),
            None => Err(Shape(self.parent)),
        }
    }

    fn maybe(&mut self, rule: Rule) -> Option<Pair<'i, Rule>> {
        if self.peek_rule() == Some(rule) {
            self.next()
        } else {
            None
        }
    }
}

/// Unescapes the text of a `string` pair.
fn string(pair: Pair<'_, Rule>) -> Lowered<Text> {
    let whole = span(&pair);
    let inner = Kids::of(pair).want(Rule::string_text)?;
    let mut out = String::with_capacity(inner.as_str().len());
    let mut chars = inner.as_str().chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            out.extend(chars.next());
        } else {
            out.push(c);
        }
    }
    Ok(Spanned::new(out, whole))
}

impl Lower {
    fn shape_error(&mut self, Shape(span): Shape) {
        self.diagnostics.push(
            Diagnostic::error(
                "internal",
                span,
                "the parser could not read this part of the file",
            )
            .help("this is a bug in tollgate; please report it with the policy file"),
        );
    }

    fn file(&mut self, pair: Pair<'_, Rule>) -> Vec<Spanned<Item>> {
        let mut items = Vec::new();
        for child in pair.into_inner() {
            let s = span(&child);
            let item = match child.as_rule() {
                Rule::network_decl => self.network(child).map(Item::Network),
                Rule::service_decl => self.service(child).map(Item::Service),
                Rule::test_decl => self.test(child).map(Item::Test),
                Rule::bad_line => {
                    self.bad_line(&child, Context::Top);
                    continue;
                }
                _ => continue,
            };
            match item {
                Ok(item) => items.push(Spanned::new(item, s)),
                Err(shape) => self.shape_error(shape),
            }
        }
        items
    }

    /// Lowers the clauses of a block; bad lines become diagnostics.
    fn clauses<T>(
        &mut self,
        kids: Kids<'_>,
        context: Context,
        mut lower: impl FnMut(&mut Self, Pair<'_, Rule>) -> Lowered<T>,
    ) -> Vec<Spanned<T>> {
        let mut out = Vec::new();
        for child in kids.inner {
            if child.as_rule() == Rule::COMMENT || is_keyword(child.as_rule()) {
                continue;
            }
            if child.as_rule() == Rule::bad_line {
                self.bad_line(&child, context);
                continue;
            }
            let s = span(&child);
            match lower(self, child) {
                Ok(clause) => out.push(Spanned::new(clause, s)),
                Err(shape) => self.shape_error(shape),
            }
        }
        out
    }

    fn network(&mut self, pair: Pair<'_, Rule>) -> Lowered<NetworkDecl> {
        let mut kids = Kids::of(pair);
        let name = text(&kids.want(Rule::ident)?);
        let clauses = self.clauses(kids, Context::Network, |_, p| match p.as_rule() {
            Rule::chain_clause => Ok(NetworkClause::Chain(text(
                &Kids::of(p).want(Rule::integer)?,
            ))),
            Rule::asset_clause => asset(p).map(NetworkClause::Asset),
            _ => Err(Shape(span(&p))),
        });
        Ok(NetworkDecl { name, clauses })
    }

    fn service(&mut self, pair: Pair<'_, Rule>) -> Lowered<ServiceDecl> {
        let mut kids = Kids::of(pair);
        let name = string(kids.want(Rule::string)?)?;
        let clauses = self.clauses(kids, Context::Service, |this, p| {
            Ok(match p.as_rule() {
                Rule::pay_to_clause => ServiceClause::PayTo(text(&Kids::of(p).want(Rule::hex)?)),
                Rule::accept_x402_clause => {
                    let mut kids = Kids::of(p);
                    let mut networks = Vec::new();
                    while let Some(n) = kids.maybe(Rule::ident) {
                        networks.push(text(&n));
                    }
                    ServiceClause::AcceptX402(networks)
                }
                Rule::accept_prepaid_clause => {
                    let header = Kids::of(p).maybe(Rule::string).map(string).transpose()?;
                    ServiceClause::AcceptPrepaid { header }
                }
                Rule::settle_clause => ServiceClause::Settle(settle(p)?),
                Rule::timeout_clause => {
                    ServiceClause::Timeout(text(&Kids::of(p).want(Rule::duration)?))
                }
                Rule::limit_clause => ServiceClause::Limit(limit(p)?),
                Rule::payers_clause => ServiceClause::Payers(payers(p)?),
                Rule::default_clause => {
                    ServiceClause::Default(text(&Kids::of(p).want(Rule::ident)?))
                }
                Rule::route_decl => ServiceClause::Route(this.route(p)?),
                _ => return Err(Shape(span(&p))),
            })
        });
        Ok(ServiceDecl { name, clauses })
    }

    fn route(&mut self, pair: Pair<'_, Rule>) -> Lowered<RouteDecl> {
        let mut kids = Kids::of(pair);
        let method = text(&kids.want(Rule::method)?);
        let path = string(kids.want(Rule::string)?)?;
        let clauses = self.clauses(kids, Context::Route, |_, p| {
            Ok(match p.as_rule() {
                Rule::free_clause => RouteClause::Free,
                Rule::deny_clause => RouteClause::Deny,
                Rule::price_clause => {
                    let mut kids = Kids::of(p);
                    let mut terms = Vec::new();
                    while let Some(m) = kids.maybe(Rule::money) {
                        terms.push(money(m)?);
                    }
                    RouteClause::Price(terms)
                }
                Rule::prefer_clause => RouteClause::Prefer(text(&Kids::of(p).want(Rule::ident)?)),
                Rule::refund_clause => {
                    RouteClause::RefundOn(text(&Kids::of(p).want(Rule::status_class)?))
                }
                Rule::sells_clause => RouteClause::Sells(money(Kids::of(p).want(Rule::money)?)?),
                Rule::description_clause => {
                    RouteClause::Description(string(Kids::of(p).want(Rule::string)?)?)
                }
                Rule::mime_clause => RouteClause::Mime(string(Kids::of(p).want(Rule::string)?)?),
                Rule::timeout_clause => {
                    RouteClause::Timeout(text(&Kids::of(p).want(Rule::duration)?))
                }
                Rule::limit_clause => RouteClause::Limit(limit(p)?),
                Rule::payers_clause => RouteClause::Payers(payers(p)?),
                Rule::settle_clause => RouteClause::Settle(settle(p)?),
                Rule::upgrade_clause => {
                    let mut kids = Kids::of(p);
                    let mut protocols = Vec::new();
                    while let Some(protocol) = kids.maybe(Rule::protocol) {
                        protocols.push(text(&protocol));
                    }
                    RouteClause::Upgrade(protocols)
                }
                _ => return Err(Shape(span(&p))),
            })
        });
        Ok(RouteDecl {
            method,
            path,
            clauses,
        })
    }

    fn test(&mut self, pair: Pair<'_, Rule>) -> Lowered<TestDecl> {
        let mut kids = Kids::of(pair);
        let name = string(kids.want(Rule::string)?)?;
        let clauses = self.clauses(kids, Context::Test, |_, p| {
            Ok(match p.as_rule() {
                Rule::request_clause => {
                    let mut kids = Kids::of(p);
                    let method = text(&kids.want(Rule::method)?);
                    let target = string(kids.want(Rule::string)?)?;
                    TestClause::Request { method, target }
                }
                Rule::header_clause => {
                    let mut kids = Kids::of(p);
                    let name = string(kids.want(Rule::string)?)?;
                    let value = string(kids.want(Rule::string)?)?;
                    TestClause::Header { name, value }
                }
                Rule::payer_clause => TestClause::Payer(text(&Kids::of(p).want(Rule::hex)?)),
                Rule::balance_clause => TestClause::Balance(money(Kids::of(p).want(Rule::money)?)?),
                Rule::expect_clause => {
                    let mut kids = Kids::of(p);
                    let outcome = text(&kids.want(Rule::ident)?);
                    let price = kids.maybe(Rule::money).map(money).transpose()?;
                    TestClause::Expect { outcome, price }
                }
                _ => return Err(Shape(span(&p))),
            })
        });
        Ok(TestDecl { name, clauses })
    }

    /// Explains a line that fit no clause of its block.
    fn bad_line(&mut self, pair: &Pair<'_, Rule>, context: Context) {
        let line = pair.as_str().trim_end();
        let start = pair.as_span().start();
        let line_span = Span::new(start, start + line.len());
        let word_len = line
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
            .unwrap_or(line.len());
        let word = line.get(..word_len).unwrap_or("");
        let word_span = Span::new(start, start + word_len);
        let starts_with_name = word.chars().next().is_some_and(|c| c.is_ascii_alphabetic());

        if starts_with_name && !context.keywords().contains(&word) {
            let home = Context::ALL.iter().find(|c| c.keywords().contains(&word));
            let diagnostic = match home {
                Some(home) => Diagnostic::error(
                    "misplaced_clause",
                    word_span,
                    format!("`{word}` is not allowed {}", context.place()),
                )
                .label("not allowed here")
                .help(format!("`{word}` belongs {}", home.place())),
                None => {
                    let elsewhere: Vec<&str> = Context::ALL
                        .iter()
                        .flat_map(|c| c.keywords().iter().copied())
                        .collect();
                    let help = match (closest(word, context.keywords()), closest(word, &elsewhere))
                    {
                        (Some(s), _) => format!("did you mean `{s}`?"),
                        (None, Some(s)) => {
                            let home = Context::ALL
                                .iter()
                                .find(|c| c.keywords().contains(&s))
                                .map_or("elsewhere", |c| c.place());
                            format!("did you mean `{s}`? it belongs {home}")
                        }
                        (None, None) => {
                            format!("expected one of: {}", context.keywords().join(", "))
                        }
                    };
                    Diagnostic::error(
                        "unknown_keyword",
                        word_span,
                        format!("unknown keyword `{word}`"),
                    )
                    .label(format!("not a keyword {}", context.place()))
                    .help(help)
                }
            };
            self.diagnostics.push(diagnostic);
            return;
        }
        if let Some(quote) = unterminated_quote(line) {
            self.diagnostics.push(
                Diagnostic::error(
                    "unterminated_string",
                    Span::new(start + quote, start + line.len()),
                    "unterminated string",
                )
                .label("this string is never closed")
                .help("close it with `\"` on the same line; strings cannot span lines"),
            );
            return;
        }
        let diagnostic = match Grammar::parse(context.entry(), line) {
            Err(error) => from_pest(error, line, start, true),
            Ok(_) => Diagnostic::error("syntax", line_span, "this line could not be read here")
                .label("unexpected line")
                .help(format!(
                    "expected one of: {}",
                    context.keywords().join(", ")
                )),
        };
        self.diagnostics.push(diagnostic);
    }
}

fn asset(pair: Pair<'_, Rule>) -> Lowered<AssetDecl> {
    let mut kids = Kids::of(pair);
    let symbol = text(&kids.want(Rule::ident)?);
    let address = text(&kids.want(Rule::hex)?);
    let mut options = Vec::new();
    while let Some(p) = kids.next() {
        let s = span(&p);
        let option = match p.as_rule() {
            Rule::asset_name => AssetOption::Name(string(Kids::of(p).want(Rule::string)?)?),
            Rule::asset_version => AssetOption::Version(string(Kids::of(p).want(Rule::string)?)?),
            Rule::asset_decimals => AssetOption::Decimals(text(&Kids::of(p).want(Rule::integer)?)),
            _ => return Err(Shape(s)),
        };
        options.push(Spanned::new(option, s));
    }
    Ok(AssetDecl {
        symbol,
        address,
        options,
    })
}

fn money(pair: Pair<'_, Rule>) -> Lowered<Money> {
    let mut kids = Kids::of(pair);
    let amount = text(&kids.want(Rule::amount)?);
    let unit = text(&kids.want(Rule::ident)?);
    Ok(Money { amount, unit })
}

fn settle(pair: Pair<'_, Rule>) -> Lowered<Settle> {
    let mut kids = Kids::of(pair);
    let mut settle = Settle {
        backend: None,
        timing: None,
    };
    while let Some(p) = kids.next() {
        let s = span(&p);
        match p.as_rule() {
            Rule::facilitator => {
                let url = string(Kids::of(p).want(Rule::string)?)?;
                settle.backend = Some(Spanned::new(Backend::Facilitator(url), s));
            }
            Rule::rpc => {
                let mut kids = Kids::of(p);
                let url = string(kids.want(Rule::string)?)?;
                let key = kids.next().ok_or(Shape(s))?;
                let key_span = span(&key);
                let relayer = match key.as_rule() {
                    Rule::env_ref => {
                        KeyRef::Env(key.as_str().trim_start_matches("env:").to_string())
                    }
                    Rule::string => KeyRef::Path(string(key)?.node),
                    Rule::hex => KeyRef::Inline(key.as_str().to_string()),
                    _ => return Err(Shape(key_span)),
                };
                settle.backend = Some(Spanned::new(
                    Backend::Rpc {
                        url,
                        relayer: Spanned::new(relayer, key_span),
                    },
                    s,
                ));
            }
            Rule::before_response => settle.timing = Some(Spanned::new(Timing::BeforeResponse, s)),
            Rule::after_response => settle.timing = Some(Spanned::new(Timing::AfterResponse, s)),
            Rule::deferred => {
                let mut triggers = Vec::new();
                let mut kids = Kids::of(p);
                while let Some(t) = kids.next() {
                    let ts = span(&t);
                    let trigger = match t.as_rule() {
                        Rule::duration => Trigger::Every(t.as_str().to_string()),
                        Rule::payment_count => {
                            Trigger::Payments(Kids::of(t).want(Rule::integer)?.as_str().to_string())
                        }
                        Rule::money => Trigger::Value(money(t)?),
                        _ => return Err(Shape(ts)),
                    };
                    triggers.push(Spanned::new(trigger, ts));
                }
                settle.timing = Some(Spanned::new(Timing::Deferred(triggers), s));
            }
            _ => return Err(Shape(s)),
        }
    }
    Ok(settle)
}

fn limit(pair: Pair<'_, Rule>) -> Lowered<Limit> {
    let mut kids = Kids::of(pair);
    let body = kids.next().ok_or(Shape(kids.parent))?;
    match body.as_rule() {
        Rule::unsettled_limit => Ok(Limit::Unsettled(money(Kids::of(body).want(Rule::money)?)?)),
        Rule::rate_limit => {
            let mut kids = Kids::of(body);
            let q = kids.next().ok_or(Shape(kids.parent))?;
            let qs = span(&q);
            let quantity = match q.as_rule() {
                Rule::request_count => {
                    Quantity::Requests(Kids::of(q).want(Rule::integer)?.as_str().to_string())
                }
                Rule::money => Quantity::Spend(money(q)?),
                _ => return Err(Shape(qs)),
            };
            let window = match kids.maybe(Rule::window) {
                None => None,
                Some(w) => {
                    let ws = span(&w);
                    let mut kids = Kids::of(w);
                    let window = match kids.maybe(Rule::duration) {
                        Some(d) => Window::Duration(d.as_str().to_string()),
                        None => {
                            let count = kids.maybe(Rule::integer).map(|c| c.as_str().to_string());
                            let unit = kids.want(Rule::time_unit)?.as_str().to_string();
                            Window::Units { count, unit }
                        }
                    };
                    Some(Spanned::new(window, ws))
                }
            };
            Ok(Limit::Rate {
                quantity: Spanned::new(quantity, qs),
                window,
            })
        }
        _ => Err(Shape(span(&body))),
    }
}

fn payers(pair: Pair<'_, Rule>) -> Lowered<Payers> {
    let mut kids = Kids::of(pair);
    let verb = kids.want(Rule::payers_verb)?;
    let allow = verb.as_str() == "allow";
    let mut addresses = Vec::new();
    while let Some(a) = kids.maybe(Rule::hex) {
        addresses.push(text(&a));
    }
    Ok(Payers { allow, addresses })
}

/// Byte offset of a quote that opens a string never closed on this line.
fn unterminated_quote(line: &str) -> Option<usize> {
    let mut open = None;
    let mut still_open = false;
    for (i, c, before, after) in scan_line(line) {
        if c == '#' && !before {
            break;
        }
        if c == '"' && !before {
            open = Some(i);
        }
        still_open = after;
    }
    open.filter(|_| still_open)
}

/// Walks a line's characters with, for each, whether it sits inside a string literal before
/// and after it (so an opening quote is `(false, true)` and a closing one `(true, false)`).
fn scan_line(line: &str) -> impl Iterator<Item = (usize, char, bool, bool)> + '_ {
    let mut in_string = false;
    let mut escaped = false;
    line.char_indices().map(move |(i, c)| {
        let before = in_string;
        if !in_string {
            in_string = c == '"';
        } else if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '"' {
            in_string = false;
        }
        (i, c, before, in_string)
    })
}

/// The closest candidate by edit distance, if it is close enough to be a likely typo.
pub(crate) fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// A structural error that stopped the parse: usually a block never closed, or a stray `}`.
fn fatal(error: PestError<Rule>, text: &str) -> Diagnostic {
    if let Some(open) = unclosed_block(text) {
        let line_end = text
            .get(open..)
            .and_then(|t| t.find('\n'))
            .map_or(text.len(), |n| open + n);
        let header_start = text
            .get(..open)
            .and_then(|t| t.rfind('\n'))
            .map_or(0, |n| n + 1);
        let header = text.get(header_start..line_end).unwrap_or("").trim();
        return Diagnostic::error(
            "unclosed_block",
            Span::new(open, open + 1),
            "this block is never closed",
        )
        .label("opened here")
        .help(format!("add a line with `}}` where `{header}` ends"));
    }
    let diagnostic = from_pest(error, text, 0, false);
    if text.get(diagnostic.span.start..diagnostic.span.end) == Some("}") {
        return Diagnostic::error("syntax", diagnostic.span, "unexpected `}`")
            .label("closes no block")
            .help("remove it, or check the `{` of the block above");
    }
    diagnostic.help("each clause goes on its own line, and every `{` needs a matching `}`")
}

/// The `{` of a block whose `}` is missing. Braces in strings and comments do not count. When
/// braces do not balance, the structure tells which block lost its `}`: a `route` line while a
/// route is open, or a `service`/`network`/`test` line while any block is open, shows that the
/// innermost open block ended without one; failing that, indentation does (the first line as
/// shallow as an open block's header that is not its `}`); failing that, the innermost block.
fn unclosed_block(text: &str) -> Option<usize> {
    struct Open {
        brace: usize,
        indent: usize,
        route: bool,
    }
    let mut stack: Vec<Open> = Vec::new();
    let (mut by_structure, mut by_indent) = (None, None);
    let indented = text.lines().any(|l| l.starts_with([' ', '\t']));
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let indent = line.len() - line.trim_start().len();
        let code = strip_comment(line);
        let trimmed = code.trim();
        let word = trimmed.split([' ', '\t', '"', '{']).next().unwrap_or("");
        if let Some(innermost) = stack.last().filter(|_| by_structure.is_none()) {
            let top_level = matches!(word, "service" | "network" | "test");
            if top_level || (word == "route" && innermost.route) {
                by_structure = Some(innermost.brace);
            }
        }
        if indented && by_indent.is_none() && !trimmed.is_empty() && !trimmed.starts_with('}') {
            by_indent = stack.iter().find(|o| indent <= o.indent).map(|o| o.brace);
        }
        for (i, c, inside, _) in scan_line(code) {
            match c {
                '{' if !inside => stack.push(Open {
                    brace: offset + i,
                    indent,
                    route: word == "route",
                }),
                '}' if !inside => {
                    stack.pop();
                }
                _ => {}
            }
        }
        offset += line.len();
    }
    let innermost = stack.last()?.brace;
    Some(by_structure.or(by_indent).unwrap_or(innermost))
}

/// A line without its `#` comment (a `#` inside a string is text).
fn strip_comment(line: &str) -> &str {
    scan_line(line)
        .find(|(_, c, inside, _)| *c == '#' && !inside)
        .and_then(|(i, ..)| line.get(..i))
        .unwrap_or(line)
}

/// Turns a pest error on `text` (which starts at byte `offset` of the file) into a diagnostic.
fn from_pest(error: PestError<Rule>, text: &str, offset: usize, single_line: bool) -> Diagnostic {
    let pos = match error.location {
        InputLocation::Pos(p) => p,
        InputLocation::Span((s, _)) => s,
    };
    let rest = text.get(pos..).unwrap_or("");
    let found_len = match rest.chars().next() {
        None => 0,
        Some(c) if c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.' => rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.'))
            .unwrap_or(rest.len()),
        Some('\n' | '\r') => 0,
        Some(c) => c.len_utf8(),
    };
    let found = match rest.get(..found_len) {
        Some("") | None if single_line => "end of line".to_string(),
        Some("") | None if rest.is_empty() => "end of file".to_string(),
        Some("") | None => "end of line".to_string(),
        Some(tok) => format!("`{tok}`"),
    };
    let expected = match &error.variant {
        ErrorVariant::ParsingError { positives, .. } => describe(positives, single_line),
        // pest's only custom error here is its recursion guard.
        ErrorVariant::CustomError { .. } => {
            return Diagnostic::error(
                "too_deep",
                Span::new(offset + pos, offset + pos + found_len),
                "blocks are nested too deeply",
            )
            .help(
                "a policy needs at most three levels: service, route, and nothing inside a route",
            );
        }
    };
    let span = Span::new(offset + pos, offset + pos + found_len);
    let message = if expected.is_empty() {
        format!("unexpected {found}")
    } else {
        format!("expected {expected}, found {found}")
    };
    let label = if expected.is_empty() {
        "unexpected".to_string()
    } else {
        format!("expected {expected}")
    };
    let diagnostic = Diagnostic::error("syntax", span, message).label(label);
    if single_line && expected.contains("end of line") {
        diagnostic.help("one clause per line: move the rest to a line of its own, or remove it")
    } else {
        diagnostic
    }
}

/// Names the rules pest expected, in words an operator knows.
fn describe(rules: &[Rule], single_line: bool) -> String {
    let mut words: Vec<String> = Vec::new();
    for rule in rules {
        let name = format!("{rule:?}");
        let word = match rule {
            Rule::string | Rule::string_text => "a quoted string".to_string(),
            Rule::amount => "an amount such as `0.01`".to_string(),
            Rule::money => "an amount and unit such as `0.01 USDC`".to_string(),
            Rule::integer => "a whole number".to_string(),
            Rule::hex => "an address such as `0x…`".to_string(),
            Rule::duration => "a duration such as `30s`".to_string(),
            Rule::time_unit => "a unit of time (`second`, `minute`, `hour`, `day`)".to_string(),
            Rule::method => "an HTTP method or `*`".to_string(),
            Rule::ident => "a name".to_string(),
            Rule::env_ref => "`env:NAME`".to_string(),
            Rule::status_class => "`5xx`".to_string(),
            Rule::protocol => "a protocol such as `websocket`".to_string(),
            Rule::window => "a window such as `per minute`".to_string(),
            Rule::EOI if single_line => "end of line".to_string(),
            Rule::EOI => "end of file".to_string(),
            // Internal rules: never worth naming to an operator.
            Rule::COMMENT | Rule::bad_line => continue,
            Rule::payers_verb => "`allow` or `deny`".to_string(),
            Rule::request_count => "a number of requests such as `60 requests`".to_string(),
            Rule::payment_count => "a number of payments such as `100 payments`".to_string(),
            Rule::rate_limit => "a limit such as `60 requests per minute`".to_string(),
            Rule::unsettled_limit => "`unsettled`".to_string(),
            Rule::facilitator => "`via facilitator \"URL\"`".to_string(),
            Rule::rpc => "`via rpc \"URL\" relayer env:NAME`".to_string(),
            Rule::before_response => "`before response`".to_string(),
            Rule::after_response => "`after response`".to_string(),
            Rule::deferred => "`deferred`".to_string(),
            Rule::accept_x402_clause => "`accept x402 on …`".to_string(),
            Rule::accept_prepaid_clause => "`accept prepaid`".to_string(),
            Rule::asset_name => "`name`".to_string(),
            Rule::asset_version => "`version`".to_string(),
            Rule::asset_decimals => "`decimals`".to_string(),
            _ if name.ends_with("_clause") || name.ends_with("_decl") => {
                format!(
                    "`{}`",
                    name.trim_end_matches("_clause").trim_end_matches("_decl")
                )
            }
            _ if name.starts_with("kw_") => format!("`{}`", name.trim_start_matches("kw_")),
            _ => name.replace('_', " "),
        };
        if !words.contains(&word) {
            words.push(word);
        }
    }
    match words.len() {
        0 => String::new(),
        1 => words.concat(),
        n => {
            let (head, last) = words.split_at(n - 1);
            format!("{} or {}", head.join(", "), last.concat())
        }
    }
}
