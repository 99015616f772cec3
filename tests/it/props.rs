//! Property tests of the policy language, through the public API only.
//!
//! - `fmt_round_trip`: for generated policy texts that parse cleanly, `parse(format(x)) ==
//!   parse(x)` (syntax trees compare without spans, comments included) and `format` is
//!   idempotent. The generator knows the grammar (`grammar/policy.pest`): every block and
//!   clause kind, and a layout the formatter must normalise (odd spacing, tabs, blank and
//!   comment lines, trailing comments, clauses on the `{` / `}` line, CRLF, CR, no final
//!   newline).
//! - `fmt_keeps_comment_placement*`: the formatter's documented comment contract: a comment
//!   alone on its line stays alone, one after a clause or a `}` stays after it.
//! - `*_never_panics`: the whole `check` pipeline and `format` never panic, every diagnostic's
//!   span lies inside the text on char boundaries, and every diagnostic renders, for arbitrary
//!   strings, token soup, and random edits of `policies/weather.toll` or a generated policy.
//!
//! Failures are kept in `props.proptest-regressions` next to this file and replayed first.

use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::{FileFailurePersistence, TestCaseError, TestRunner};

use tollgate::policy::{self, Source, Style, diag, fmt};

const WEATHER: &str = include_str!("../../policies/weather.toll");

/// Cases are few: the crate is not optimised in the debug profile and the machine is small.
/// `PROPTEST_CASES=20000 cargo test --release --test it props` runs a longer campaign.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(cases),
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

// ═══════════════════════════════ generator ═══════════════════════════════

/// A generated policy: blocks of clauses as tokens, laid out later.
#[derive(Debug, Clone)]
enum Node {
    Line(Vec<String>),
    Block(Vec<String>, Vec<Laid>),
}

/// A node and the layout noise of its own text (see [`Layout`]): a node's layout does not
/// depend on its siblings, so shrinking can drop a clause without reshuffling the others.
#[derive(Debug, Clone)]
struct Laid {
    node: Node,
    noise: Vec<u8>,
    /// The text of the node's comments.
    comment: String,
}

fn laid(node: impl Strategy<Value = Node> + Clone) -> impl Strategy<Value = Laid> + Clone {
    (node, vec(any::<u8>(), 0..24), comment_text()).prop_map(|(node, noise, comment)| Laid {
        node,
        noise,
        comment,
    })
}

/// The text of a comment, after the `#`.
fn comment_text() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        2 => "[ a-z#{}\"]{0,12}",
        1 => "[^\r\n]{0,12}",
    ]
}

#[derive(Debug, Clone, Copy)]
enum LineEnd {
    Lf,
    Crlf,
    /// `\n` and `\r\n` alternately.
    Mixed,
    /// Old Mac line ends: pest's `NEWLINE` accepts a lone `\r`.
    Cr,
}

fn words(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| (*w).to_string()).collect()
}

fn cat(parts: Vec<Vec<String>>) -> Vec<String> {
    parts.into_iter().flatten().collect()
}

fn ident() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        3 => select(&[
            "USDC", "credit", "credits", "base", "base-sepolia", "devnet", "deny", "pass",
            "prepaid", "x402", "free", "challenge", "EURC", "or", "per",
        ][..])
        .prop_map(str::to_string),
        2 => "[a-zA-Z][a-zA-Z0-9_-]{0,8}",
    ]
}

fn integer() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        select(&["1", "10", "60", "0", "007"][..]).prop_map(str::to_string),
        "[0-9]{1,6}"
    ]
}

fn amount() -> impl Strategy<Value = String> + Clone {
    "[0-9]{1,4}(\\.[0-9]{1,6})?"
}

fn duration() -> impl Strategy<Value = String> + Clone {
    "[0-9]{1,4}(ms|s|m|h|d)"
}

fn hex() -> impl Strategy<Value = String> + Clone {
    prop_oneof![3 => "0x[0-9a-fA-F]{40}", 1 => "0x[0-9a-f]{0,6}"]
}

fn method() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        3 => select(&["GET", "POST", "PUT", "DELETE", "*"][..]).prop_map(str::to_string),
        1 => "[a-zA-Z]{1,7}",
    ]
}

/// The text of a string literal, unescaped: quotes, backslashes, `#`, braces, unicode.
fn text() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        2 => "[a-z \"\\\\é…🦀#{}\t]{0,12}",
        1 => "[^\r\n]{0,12}",
        1 => select(&["", "application/json", "x-api-key", "Seven-day forecast"][..])
            .prop_map(str::to_string),
    ]
}

/// A path pattern: literal segments, `{param}` and a trailing `**`.
fn path() -> impl Strategy<Value = String> + Clone {
    let segment = prop_oneof![
        3 => "[a-z0-9._-]{1,8}",
        1 => "[a-z]{1,5}".prop_map(|p| format!("{{{p}}}")),
    ];
    prop_oneof![
        4 => (vec(segment, 0..4), any::<bool>()).prop_map(|(segments, glob)| {
            let mut p: String = segments.iter().map(|s| format!("/{s}")).collect();
            if glob {
                p.push_str("/**");
            }
            if p.is_empty() {
                p.push('/');
            }
            p
        }),
        1 => text(),
    ]
}

/// A string literal as written: quoted and escaped.
fn quoted(content: &str) -> String {
    format!("\"{}\"", content.replace('\\', "\\\\").replace('"', "\\\""))
}

fn string() -> impl Strategy<Value = String> + Clone {
    text().prop_map(|t| quoted(&t))
}

fn money() -> impl Strategy<Value = Vec<String>> + Clone {
    (amount(), ident()).prop_map(|(a, u)| vec![a, u])
}

fn window() -> impl Strategy<Value = Vec<String>> + Clone {
    let unit = select(
        &[
            "second", "seconds", "minute", "minutes", "hour", "hours", "day", "days",
        ][..],
    );
    prop_oneof![
        duration().prop_map(|d| vec!["per".to_string(), d]),
        (proptest::option::of(integer()), unit).prop_map(|(n, u)| {
            cat(vec![words(&["per"]), n.into_iter().collect(), words(&[u])])
        }),
    ]
}

fn limit() -> impl Strategy<Value = Vec<String>> + Clone {
    prop_oneof![
        (
            integer(),
            select(&["requests", "request"][..]),
            proptest::option::of(window())
        )
            .prop_map(|(n, kw, w)| cat(vec![
                words(&["limit", "buyer"]),
                vec![n],
                words(&[kw]),
                w.unwrap_or_default()
            ])),
        (money(), proptest::option::of(window())).prop_map(|(m, w)| cat(vec![
            words(&["limit", "buyer"]),
            m,
            w.unwrap_or_default()
        ])),
        money().prop_map(|m| cat(vec![words(&["limit", "buyer", "unsettled"]), m])),
    ]
}

fn payers() -> impl Strategy<Value = Vec<String>> + Clone {
    (select(&["allow", "deny"][..]), vec(hex(), 1..4)).prop_map(|(verb, addresses)| {
        let mut t = words(&[verb, "payers"]);
        for (i, a) in addresses.into_iter().enumerate() {
            if i > 0 {
                t.push(",".to_string());
            }
            t.push(a);
        }
        t
    })
}

fn settle() -> impl Strategy<Value = Vec<String>> + Clone {
    let relayer = prop_oneof![
        3 => "[A-Z0-9_]{1,10}".prop_map(|n| format!("env:{n}")),
        2 => string(),
        1 => hex(),
    ];
    let backend = prop_oneof![
        string().prop_map(|url| cat(vec![words(&["via", "facilitator"]), vec![url]])),
        (string(), relayer).prop_map(|(url, key)| cat(vec![
            words(&["via", "rpc"]),
            vec![url],
            words(&["relayer"]),
            vec![key]
        ])),
    ];
    let trigger = prop_oneof![
        duration().prop_map(|d| vec![d]),
        (integer(), select(&["payments", "payment"][..]))
            .prop_map(|(n, kw)| cat(vec![vec![n], words(&[kw])])),
        money(),
    ];
    let timing = prop_oneof![
        Just(words(&["before", "response"])),
        Just(words(&["after", "response"])),
        vec(trigger, 0..4).prop_map(|triggers| {
            let mut t = words(&["deferred"]);
            for (i, trigger) in triggers.into_iter().enumerate() {
                t.push(if i == 0 { "every" } else { "or" }.to_string());
                t.extend(trigger);
            }
            t
        }),
    ];
    (proptest::option::of(backend), proptest::option::of(timing)).prop_map(|(b, t)| {
        cat(vec![
            words(&["settle"]),
            b.unwrap_or_default(),
            t.unwrap_or_default(),
        ])
    })
}

fn route_clause() -> impl Strategy<Value = Node> + Clone {
    prop_oneof![
        2 => Just(words(&["free"])),
        1 => Just(words(&["deny"])),
        3 => (money(), vec(money(), 0..3)).prop_map(|(first, more)| {
            let mut t = cat(vec![words(&["price"]), first]);
            for m in more {
                t.push("or".to_string());
                t.extend(m);
            }
            t
        }),
        1 => ident().prop_map(|r| vec!["prefer".to_string(), r]),
        1 => "[0-9]xx".prop_map(|c| cat(vec![words(&["refund", "on"]), vec![c]])),
        2 => string().prop_map(|s| vec!["description".to_string(), s]),
        1 => string().prop_map(|s| vec!["mime".to_string(), s]),
        1 => duration().prop_map(|d| vec!["timeout".to_string(), d]),
        1 => limit(),
        1 => payers(),
        1 => settle(),
        1 => vec(protocol(), 1..4).prop_map(|protocols| {
            let mut t = words(&["upgrade"]);
            for (i, p) in protocols.into_iter().enumerate() {
                if i > 0 {
                    t.push(",".to_string());
                }
                t.push(p);
            }
            t
        }),
    ]
    .prop_map(Node::Line)
}

/// A protocol of an `upgrade` clause: usually a name, sometimes one `compile` refuses (a
/// version, a character outside HTTP tokens). Never a space, `,`, `#`, brace or quote.
fn protocol() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        3 => select(&["websocket", "WebSocket", "h2c", "HTTP/2.0", "TLS"][..])
            .prop_map(str::to_string),
        2 => "[a-zA-Z0-9!$%\\&'*+.^_`|\\~/@é-]{1,8}",
    ]
}

fn route() -> impl Strategy<Value = Node> + Clone {
    (method(), path(), vec(laid(route_clause()), 0..5))
        .prop_map(|(m, p, clauses)| Node::Block(vec!["route".to_string(), m, quoted(&p)], clauses))
}

fn service_clause() -> impl Strategy<Value = Node> + Clone {
    let line = prop_oneof![
        hex().prop_map(|a| vec!["pay_to".to_string(), a]),
        vec(ident(), 1..4).prop_map(|networks| {
            let mut t = words(&["accept", "x402", "on"]);
            for (i, n) in networks.into_iter().enumerate() {
                if i > 0 {
                    t.push(",".to_string());
                }
                t.push(n);
            }
            t
        }),
        proptest::option::of(string()).prop_map(|h| match h {
            None => words(&["accept", "prepaid"]),
            Some(h) => cat(vec![words(&["accept", "prepaid", "header"]), vec![h]]),
        }),
        settle(),
        duration().prop_map(|d| vec!["timeout".to_string(), d]),
        limit(),
        payers(),
        ident().prop_map(|d| vec!["default".to_string(), d]),
    ]
    .prop_map(Node::Line);
    prop_oneof![3 => line, 2 => route()]
}

fn network_clause() -> impl Strategy<Value = Node> + Clone {
    let option = prop_oneof![
        string().prop_map(|s| vec!["name".to_string(), s]),
        string().prop_map(|s| vec!["version".to_string(), s]),
        integer().prop_map(|n| vec!["decimals".to_string(), n]),
    ];
    prop_oneof![
        integer().prop_map(|n| vec!["chain".to_string(), n]),
        (ident(), hex(), vec(option, 0..4)).prop_map(|(symbol, address, options)| {
            cat(vec![
                words(&["asset"]),
                vec![symbol, "at".to_string(), address],
                options.into_iter().flatten().collect(),
            ])
        }),
    ]
    .prop_map(Node::Line)
}

fn test_clause() -> impl Strategy<Value = Node> + Clone {
    prop_oneof![
        (method(), path()).prop_map(|(m, p)| vec!["request".to_string(), m, quoted(&p)]),
        (string(), string()).prop_map(|(n, v)| vec!["header".to_string(), n, v]),
        hex().prop_map(|a| vec!["payer".to_string(), a]),
        money().prop_map(|m| cat(vec![words(&["balance"]), m])),
        (ident(), proptest::option::of(money())).prop_map(|(o, m)| cat(vec![
            words(&["expect"]),
            vec![o],
            m.unwrap_or_default()
        ])),
    ]
    .prop_map(Node::Line)
}

fn item() -> impl Strategy<Value = Node> + Clone {
    prop_oneof![
        1 => (ident(), vec(laid(network_clause()), 0..4))
            .prop_map(|(n, c)| Node::Block(vec!["network".to_string(), n], c)),
        2 => (string(), vec(laid(service_clause()), 0..10))
            .prop_map(|(n, c)| Node::Block(vec!["service".to_string(), n], c)),
        1 => (string(), vec(laid(test_clause()), 0..5))
            .prop_map(|(n, c)| Node::Block(vec!["test".to_string(), n], c)),
    ]
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// Lays tokens out as text. Every layout decision reads the next byte of the current node's
/// noise; an exhausted (or shrunk to zeros) noise gives the canonical layout, so failures
/// shrink to the few odd choices that matter.
struct Layout<'a> {
    out: String,
    noise: &'a [u8],
    at: usize,
    comment: &'a str,
}

impl<'a> Layout<'a> {
    /// Lays out `f` with the noise and comment of one node.
    fn scoped(&mut self, laid: &'a Laid, f: impl FnOnce(&mut Self)) {
        let noise = std::mem::replace(&mut self.noise, &laid.noise);
        let at = std::mem::replace(&mut self.at, 0);
        let comment = std::mem::replace(&mut self.comment, &laid.comment);
        f(self);
        (self.noise, self.at, self.comment) = (noise, at, comment);
    }

    fn pick(&mut self, n: u8) -> u8 {
        let b = self.noise.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b % n
    }

    fn push(&mut self, s: &str) {
        self.out.push_str(s);
    }

    /// Between two tokens; none at all where neither side is a name character.
    fn space(&mut self, required: bool) {
        let s = match self.pick(10) {
            1 if !required => "",
            2 => "  ",
            3 => "\t",
            4 => " \t  ",
            _ => " ",
        };
        self.push(s);
    }

    fn comment(&mut self) {
        self.out.push('#');
        self.out.push_str(self.comment);
    }

    fn tokens(&mut self, tokens: &[String]) {
        let mut prev: Option<char> = None;
        for t in tokens {
            if let Some(p) = prev {
                let required = is_ident_char(p) && t.chars().next().is_some_and(is_ident_char);
                self.space(required);
            }
            self.push(t);
            prev = t.chars().last();
        }
    }

    fn indent(&mut self, depth: usize) {
        let unit = match self.pick(8) {
            1 => "",
            2 => "\t",
            3 => "    ",
            4 => " \t",
            _ => "  ",
        };
        for _ in 0..depth {
            self.push(unit);
        }
    }

    /// What may follow a clause on its line: a comment or trailing blanks.
    fn end_of_clause(&mut self) {
        match self.pick(6) {
            1 => {
                self.space(false);
                self.comment();
            }
            2 => self.push(" \t"),
            _ => {}
        }
    }

    /// A line end, then blank and comment-only lines, then the next line's indentation.
    fn newline(&mut self, comment_depth: usize, depth: usize) {
        self.push("\n");
        loop {
            match self.pick(12) {
                1 => self.push("\n"),
                2 => self.push("  \t\n\n"),
                3 | 4 => {
                    self.indent(comment_depth);
                    self.comment();
                    self.push("\n");
                }
                5 => {
                    self.push("\n");
                    self.indent(comment_depth);
                    self.comment();
                    self.push(" \t\n");
                }
                _ => break,
            }
        }
        self.indent(depth);
    }

    fn node(&mut self, node: &'a Node, depth: usize) {
        match node {
            Node::Line(tokens) => self.tokens(tokens),
            Node::Block(header, body) => self.block(header, body, depth),
        }
    }

    fn block(&mut self, header: &[String], body: &'a [Laid], depth: usize) {
        self.tokens(header);
        self.space(false);
        self.push("{");
        match self.pick(5) {
            // The first clause (or the `}`) on the `{` line.
            1 => self.space(false),
            2 => {
                self.space(false);
                self.comment();
                self.newline(depth + 1, depth + 1);
            }
            _ => self.newline(depth + 1, depth + 1),
        }
        for (i, child) in body.iter().enumerate() {
            let last = i + 1 == body.len();
            self.scoped(child, |l| {
                l.node(&child.node, depth + 1);
                if !last {
                    l.end_of_clause();
                    l.newline(depth + 1, depth + 1);
                } else if l.pick(4) == 1 {
                    // The `}` on the last clause's line.
                    l.space(false);
                } else {
                    l.end_of_clause();
                    l.newline(depth + 1, depth);
                }
            });
        }
        self.push("}");
    }
}

fn render(
    items: &[Laid],
    comment: &str,
    noise: &[u8],
    line_end: LineEnd,
    final_newline: bool,
) -> String {
    let mut l = Layout {
        out: String::new(),
        noise,
        at: 0,
        comment,
    };
    match l.pick(4) {
        1 => {
            l.comment();
            l.newline(0, 0);
        }
        2 => l.push("\n \n"),
        3 => l.push("  "),
        _ => {}
    }
    for (i, item) in items.iter().enumerate() {
        let last = i + 1 == items.len();
        l.scoped(item, |l| {
            l.node(&item.node, 0);
            if !last {
                l.end_of_clause();
                l.newline(0, 0);
            }
        });
    }
    l.end_of_clause();
    match l.pick(4) {
        1 => {
            l.push("\n");
            l.comment();
            l.push("\n");
        }
        2 => l.push("\n\n\n"),
        3 => {
            l.newline(0, 0);
            l.comment();
        }
        _ => l.push("\n"),
    }
    let mut text = l.out;
    if !final_newline {
        while text.ends_with('\n') {
            text.pop();
        }
    }
    match line_end {
        LineEnd::Lf => text,
        LineEnd::Crlf => text.replace('\n', "\r\n"),
        LineEnd::Cr => text.replace('\n', "\r"),
        LineEnd::Mixed => {
            let mut out = String::with_capacity(text.len());
            for (i, line) in text.split('\n').enumerate() {
                if i > 0 {
                    out.push_str(if i % 2 == 0 { "\r\n" } else { "\n" });
                }
                out.push_str(line);
            }
            out
        }
    }
}

/// A policy text that should parse with no diagnostic, with any line ends.
fn policy_text() -> impl Strategy<Value = String> + Clone {
    policy_text_ending(prop_oneof![
        6 => Just(LineEnd::Lf),
        3 => Just(LineEnd::Crlf),
        1 => Just(LineEnd::Mixed),
        1 => Just(LineEnd::Cr),
    ])
}

fn policy_text_ending(
    line_end: impl Strategy<Value = LineEnd> + Clone,
) -> impl Strategy<Value = String> + Clone {
    (
        vec(laid(item()), 0..4),
        comment_text(),
        vec(any::<u8>(), 0..8),
        line_end,
        prop::bool::weighted(0.8),
    )
        .prop_map(|(items, comment, noise, line_end, final_newline)| {
            render(&items, &comment, &noise, line_end, final_newline)
        })
}

// ═══════════════════════════════ round trip ═══════════════════════════════

fn round_trip(text: &str) -> Result<(), TestCaseError> {
    let first = policy::parse(text);
    let file = match first.file {
        Some(file) if first.diagnostics.is_empty() => file,
        _ => {
            return Err(TestCaseError::reject(format!(
                "generated text does not parse: {:?}",
                first.diagnostics
            )));
        }
    };
    let formatted = fmt::format(&file, text);
    let second = policy::parse(&formatted);
    prop_assert!(
        second.diagnostics.is_empty(),
        "the formatted text does not parse: {:?}\n--- formatted ---\n{formatted}",
        second.diagnostics
    );
    prop_assert!(
        second.file.as_ref() == Some(&file),
        "parse(format(x)) != parse(x)\n--- formatted ---\n{formatted}\n--- parse(x) ---\n{file:#?}\n--- parse(format(x)) ---\n{:#?}",
        second.file
    );
    let again = second
        .file
        .as_ref()
        .map(|f| fmt::format(f, &formatted))
        .unwrap_or_default();
    prop_assert!(
        again == formatted,
        "format is not idempotent\n--- format(x) ---\n{formatted}\n--- format(format(x)) ---\n{again}"
    );
    Ok(())
}

/// The generator must almost never write a text that does not parse: at most 1% of its
/// cases may be rejected (they are counted, not failed, so a rare slip does not break CI).
#[test]
fn fmt_round_trip() {
    static CASES: AtomicUsize = AtomicUsize::new(0);
    static REJECTED: AtomicUsize = AtomicUsize::new(0);
    let mut runner = TestRunner::new(config(3000));
    let result = runner.run(&policy_text(), |text| {
        CASES.fetch_add(1, Ordering::Relaxed);
        let result = round_trip(&text);
        if let Err(TestCaseError::Reject(_)) = &result {
            REJECTED.fetch_add(1, Ordering::Relaxed);
        }
        result
    });
    let (cases, rejected) = (
        CASES.load(Ordering::Relaxed),
        REJECTED.load(Ordering::Relaxed),
    );
    eprintln!("fmt_round_trip: {cases} cases, {rejected} rejected by the parser");
    if let Err(error) = result {
        panic!("{error}");
    }
    assert!(
        rejected * 100 <= cases,
        "the generator wrote {rejected} texts of {cases} that do not parse"
    );
}

/// Where a comment sits on its line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Alone on its line.
    Own,
    /// After a clause.
    Clause,
    /// After the `}` of a block.
    Close,
    /// Right after a `{`: the formatter moves it to its own line, by design.
    Open,
}

fn placements(text: &str, comments: &[tollgate::policy::ast::Text]) -> Vec<Place> {
    comments
        .iter()
        .map(|c| {
            let before = text.get(..c.span.start).unwrap_or("");
            let line = before.rsplit(['\n', '\r']).next().unwrap_or("");
            match line.trim_end_matches([' ', '\t']).chars().last() {
                None => Place::Own,
                Some('{') => Place::Open,
                Some('}') => Place::Close,
                Some(_) => Place::Clause,
            }
        })
        .collect()
}

fn comment_placement(text: &str) -> Result<(), TestCaseError> {
    let first = policy::parse(text);
    let file = match first.file {
        Some(file) if first.diagnostics.is_empty() => file,
        _ => return Err(TestCaseError::reject("generated text does not parse")),
    };
    let formatted = fmt::format(&file, text);
    let second = policy::parse(&formatted);
    let after = second
        .file
        .map(|f| placements(&formatted, &f.comments))
        .unwrap_or_default();
    let before = placements(text, &file.comments);
    prop_assert_eq!(before.len(), after.len());
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        prop_assert!(
            *b == Place::Open || b == a,
            "comment #{i} `{}` was {b:?} and is {a:?} after formatting\n--- formatted ---\n{formatted}",
            file.comments.get(i).map_or("", |c| c.node.as_str()),
        );
    }
    Ok(())
}

/// `fmt`'s contract: "a comment on its own line stays before the clause that follows it, a
/// comment after a clause stays on that clause's line".
#[test]
fn fmt_keeps_comment_placement() {
    let lf = prop_oneof![Just(LineEnd::Lf), Just(LineEnd::Crlf), Just(LineEnd::Mixed)];
    let mut runner = TestRunner::new(config(1000));
    if let Err(error) = runner.run(&policy_text_ending(lf), |text| comment_placement(&text)) {
        panic!("{error}");
    }
}

/// The same with old Mac line ends (a lone `\r`), which the grammar accepts as line ends.
#[test]
fn fmt_keeps_comment_placement_with_cr_line_ends() {
    let mut runner = TestRunner::new(config(300));
    let cr = Just(LineEnd::Cr);
    if let Err(error) = runner.run(&policy_text_ending(cr), |text| comment_placement(&text)) {
        panic!("{error}");
    }
}

// ═══════════════════════════════ never panics ═══════════════════════════════

/// Runs the whole pipeline on `text`: nothing may panic, every span must be a valid slice.
fn survives(text: &str) -> Result<(), TestCaseError> {
    let source = Source::new("fuzz.toll", text);
    let checked = policy::check(source.clone());
    for d in &checked.diagnostics {
        let spans = std::iter::once(d.span).chain(d.related.iter().map(|(s, _)| *s));
        for span in spans {
            prop_assert!(
                text.get(span.start..span.end).is_some(),
                "span {span:?} of `{}` ({}) is not a slice of the {}-byte text",
                d.code,
                d.message,
                text.len()
            );
        }
        let _ = diag::render(d, &source, Style::Plain);
    }
    if let Some(file) = &checked.file {
        let _ = fmt::format(file, text);
    }
    Ok(())
}

/// Tokens of the language and the characters that break it, for token soup and insertions.
const PIECES: &[&str] = &[
    "{",
    "}",
    "\"",
    "#",
    "\n",
    "\r\n",
    "\r",
    "\\",
    ",",
    "*",
    "**",
    ".",
    ":",
    "0x",
    "0x12ab",
    "5xx",
    "…",
    "é",
    "🦀",
    "\u{0}",
    "\t",
    " ",
    "service",
    "network",
    "test",
    "route",
    "GET",
    "free",
    "deny",
    "price",
    "1",
    "0.001",
    "USDC",
    "or",
    "per",
    "minute",
    "60s",
    "limit buyer",
    "settle",
    "via",
    "rpc",
    "relayer",
    "env:KEY",
    "deferred every",
    "payments",
    "accept",
    "x402 on",
    "prepaid header",
    "{ free }",
    "\"\\\"",
    "\"/v1/{city}/**\"",
    "expect",
    "request",
    "header",
    "balance",
    "payer",
    "chain",
    "asset",
    "at",
    "name",
    "decimals",
    "pay_to",
    "default",
    "timeout",
    "allow payers",
    "unsettled",
    "prefer",
    "refund on",
    "description",
    "mime",
    "upgrade websocket",
];

fn piece() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        4 => select(PIECES).prop_map(str::to_string),
        1 => "[ -~]{1,6}",
        1 => "\\PC{1,3}",
        1 => any::<char>().prop_map(String::from),
    ]
}

#[derive(Debug, Clone)]
enum Edit {
    Delete(Index, usize),
    Insert(Index, String),
    DuplicateLine(Index),
    SwapLines(Index, Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<Index>(), 1..40usize).prop_map(|(at, len)| Edit::Delete(at, len)),
        (any::<Index>(), piece()).prop_map(|(at, s)| Edit::Insert(at, s)),
        any::<Index>().prop_map(Edit::DuplicateLine),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Edit::SwapLines(a, b)),
    ]
}

/// The char boundary at or before a byte offset.
fn boundary(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn apply(text: &str, edit: &Edit) -> String {
    match edit {
        Edit::Delete(at, len) => {
            let start = boundary(text, at.index(text.len() + 1));
            let end = boundary(text, start + len);
            format!(
                "{}{}",
                text.get(..start).unwrap_or(""),
                text.get(end..).unwrap_or("")
            )
        }
        Edit::Insert(at, s) => {
            let at = boundary(text, at.index(text.len() + 1));
            format!(
                "{}{s}{}",
                text.get(..at).unwrap_or(""),
                text.get(at..).unwrap_or("")
            )
        }
        Edit::DuplicateLine(at) => {
            let mut lines: Vec<&str> = text.split_inclusive('\n').collect();
            if !lines.is_empty() {
                let i = at.index(lines.len());
                lines.insert(i, lines.get(i).copied().unwrap_or(""));
            }
            lines.concat()
        }
        Edit::SwapLines(a, b) => {
            let mut lines: Vec<&str> = text.split_inclusive('\n').collect();
            if !lines.is_empty() {
                let (a, b) = (a.index(lines.len()), b.index(lines.len()));
                lines.swap(a, b);
            }
            lines.concat()
        }
    }
}

fn mutated() -> impl Strategy<Value = String> {
    let base = prop_oneof![2 => Just(WEATHER.to_string()), 1 => policy_text()];
    (base, vec(edit(), 1..6))
        .prop_map(|(base, edits)| edits.iter().fold(base, |text, edit| apply(&text, edit)))
}

fn soup() -> impl Strategy<Value = String> {
    vec((piece(), select(&["", " ", "\n", "  "][..])), 0..40).prop_map(|pieces| {
        pieces
            .into_iter()
            .map(|(p, sep)| format!("{p}{sep}"))
            .collect()
    })
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn arbitrary_text_never_panics(text in ".*") {
        survives(&text)?;
    }

    #[test]
    fn arbitrary_string_never_panics(text in any::<String>()) {
        survives(&text)?;
    }

    #[test]
    fn token_soup_never_panics(text in soup()) {
        survives(&text)?;
    }
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn edited_policy_never_panics(text in mutated()) {
        survives(&text)?;
    }
}
