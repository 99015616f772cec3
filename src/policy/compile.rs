//! Syntax tree → compiled [`Policy`], validating as it goes.
//!
//! Every check that needs meaning lives here: known networks, EIP-55 checksums, decimal
//! precision, duplicate and conflicting clauses, route collisions, limit windows, secret
//! references. All problems are collected (errors and warnings) with spans; a policy is
//! produced only when there is no error. Amounts are converted to atomic units exactly once,
//! here, with the decimals of the asset on each network.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use alloy::primitives::Address;
use sha2::{Digest, Sha256};

use super::ast::{self, Text};
use super::diag::Diagnostic;
use super::model::*;
use super::routes::{PathPattern, RouteMatcher};
use super::source::{Source, Span, Spanned};
use super::syntax::closest;
use crate::money::{AmountError, parse_decimal};
use crate::networks::{self, Asset, Network};

/// Default `maxTimeoutSeconds` offered to x402 buyers.
pub const DEFAULT_TIMEOUT_SECS: u64 = 60;
/// Default header that carries an API key.
pub const DEFAULT_KEY_HEADER: &str = "x-api-key";
/// Headers an API key may not travel in (lower case), each with the reason. Prefix matches
/// are in [`RESERVED_HEADER_PREFIXES`].
const RESERVED_HEADERS: [(&str, &str); 18] = [
    ("content-length", FRAMING),
    ("transfer-encoding", FRAMING),
    (
        "host",
        "it names the server a request is for, and the upstream routes on it",
    ),
    ("connection", HOP_BY_HOP),
    ("keep-alive", HOP_BY_HOP),
    ("te", HOP_BY_HOP),
    ("trailer", HOP_BY_HOP),
    ("upgrade", HOP_BY_HOP),
    ("proxy-connection", HOP_BY_HOP),
    (
        "proxy-authorization",
        "it carries credentials for a proxy, which consumes it (tollgate strips it too)",
    ),
    (
        "expect",
        "it asks the HTTP layer to act (`100-continue`) before the body is sent",
    ),
    (
        "idempotency-key",
        "tollgate reads it to charge a retried prepaid request once",
    ),
    (
        "x-request-id",
        "tollgate uses it as the request id and sets it on the forwarded request and the answer",
    ),
    ("x-payment", X402),
    ("payment-signature", X402),
    ("payment-required", X402),
    ("payment-response", X402),
    ("x-payment-response", X402),
];
const RESERVED_HEADER_PREFIXES: [(&str, &str); 1] = [(
    "x-tollgate-",
    "tollgate sets the `x-tollgate-*` headers itself and removes any a client sends",
)];
const FRAMING: &str =
    "it frames the request body: the HTTP layer reads it, and a key in it would break the request";
const HOP_BY_HOP: &str = "it is a hop-by-hop header: proxies consume or remove it, so a key in it would not arrive (tollgate strips it too)";
const X402: &str = "it is an x402 header: payments and their receipts travel in it";
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
];

/// Compiles a parsed file. `partial` says syntax errors were already reported, so checks for
/// missing clauses stay quiet (the clause may be on a line that did not parse).
pub fn compile(
    file: &ast::PolicyFile,
    source: &Source,
    partial: bool,
) -> (Option<Policy>, Vec<Diagnostic>) {
    let mut cx = Cx {
        source,
        broken: HashSet::new(),
        x402_unresolved: false,
        diagnostics: Vec::new(),
        partial,
    };
    let policy = cx.file(file);
    let failed = cx.diagnostics.iter().any(Diagnostic::is_error);
    (if failed { None } else { policy }, cx.diagnostics)
}

/// Where a clause that may appear once was first seen.
type Seen = Option<(Span, ())>;

struct Cx<'s> {
    source: &'s Source,
    /// Declared networks that had errors: naming them later is not a second mistake.
    broken: HashSet<String>,
    /// An `accept x402` network did not resolve, so asset names cannot be checked.
    x402_unresolved: bool,
    diagnostics: Vec<Diagnostic>,
    partial: bool,
}

/// Service-level settings a route inherits.
struct Inherited<'a> {
    networks: &'a [Network],
    /// `accept x402` is written, even if none of its networks resolved.
    x402_declared: bool,
    prepaid: bool,
    timeout_secs: u64,
    settle: &'a Timing,
    limits: &'a Limits,
    payers: &'a PayerRules,
}

impl Cx<'_> {
    fn error(
        &mut self,
        code: &'static str,
        span: Span,
        message: impl Into<String>,
    ) -> &mut Diagnostic {
        self.push(Diagnostic::error(code, span, message))
    }

    fn warning(
        &mut self,
        code: &'static str,
        span: Span,
        message: impl Into<String>,
    ) -> &mut Diagnostic {
        self.push(Diagnostic::warning(code, span, message))
    }

    fn push(&mut self, diagnostic: Diagnostic) -> &mut Diagnostic {
        self.diagnostics.push(diagnostic);
        let last = self.diagnostics.len() - 1;
        #[expect(clippy::indexing_slicing, reason = "index of the element just pushed")]
        &mut self.diagnostics[last]
    }

    /// Reports a second occurrence of a clause that may appear once.
    fn once<T>(&mut self, slot: &mut Option<(Span, T)>, span: Span, value: T, what: &str) {
        if let Some((first, _)) = slot {
            let first = *first;
            self.push(
                Diagnostic::error("duplicate_clause", span, format!("`{what}` is given twice"))
                    .label("second one")
                    .related(first, "first one here")
                    .help("keep one of them"),
            );
        } else {
            *slot = Some((span, value));
        }
    }

    fn file(&mut self, file: &ast::PolicyFile) -> Option<Policy> {
        let networks = self.networks(file);
        let mut service = None;
        for item in &file.items {
            if let ast::Item::Service(s) = &item.node {
                match service {
                    None => service = Some((s.name.span, s)),
                    Some((first, _)) => {
                        self.push(
                            Diagnostic::error(
                                "second_service",
                                s.name.span,
                                "a policy file holds one service",
                            )
                            .related(first, "the first service")
                            .help("put each service in its own file: `policies/<service>.toll`"),
                        );
                    }
                }
            }
        }
        let Some((_, service)) = service else {
            if !self.partial {
                let at = first_code_line(&self.source.text);
                self.push(
                    Diagnostic::error(
                        "missing_service",
                        at,
                        "this policy file has no `service` block",
                    )
                    .help("start with `service \"name\" { … }`"),
                );
            }
            return None;
        };
        self.service(service, networks)
    }

    // ───────────────────────────── networks ─────────────────────────────

    fn networks(&mut self, file: &ast::PolicyFile) -> Vec<Network> {
        let mut all = networks::builtin();
        let mut declared: HashMap<String, Span> = HashMap::new();
        for item in &file.items {
            let ast::Item::Network(decl) = &item.node else {
                continue;
            };
            let name = decl.name.node.clone();
            if let Some(first) = declared.get(&name) {
                let first = *first;
                self.push(
                    Diagnostic::error(
                        "duplicate_network",
                        decl.name.span,
                        format!("network `{name}` is declared twice"),
                    )
                    .related(first, "first declared here")
                    .help("merge the two blocks"),
                );
                continue;
            }
            declared.insert(name.clone(), decl.name.span);
            let builtin_index = all.iter().position(|n| n.name == name);
            let mut chain: Option<(Span, u64)> = None;
            let mut chain_given = false;
            let mut asset_clauses = 0;
            let mut assets: Vec<(Span, Asset)> = Vec::new();
            for clause in &decl.clauses {
                match &clause.node {
                    ast::NetworkClause::Chain(id) => {
                        chain_given = true;
                        if let Some(index) = builtin_index {
                            let fixed = all.get(index).map_or(0, |n| n.chain_id);
                            self.push(Diagnostic::error("builtin_network_chain", clause.span, format!("the chain of built-in network `{name}` is fixed")).label(format!("`{name}` is chain {fixed}")).help("a block for a built-in network may only add assets; give a new network another name"));
                            continue;
                        }
                        match id.node.parse::<u64>() {
                            Ok(n) if n > 0 => self.once(&mut chain, clause.span, n, "chain"),
                            _ => {
                                self.error(
                                    "bad_chain_id",
                                    id.span,
                                    format!("`{}` is not a chain id", id.node),
                                )
                                .help = Some(
                                    "a chain id is a whole number from 1 to 18446744073709551615"
                                        .into(),
                                );
                            }
                        }
                    }
                    ast::NetworkClause::Asset(a) => {
                        asset_clauses += 1;
                        if let Some(asset) = self.asset(a, clause.span) {
                            let existing = assets
                                .iter()
                                .map(|(s, a)| (Some(*s), a))
                                .chain(
                                    builtin_index
                                        .and_then(|i| all.get(i))
                                        .into_iter()
                                        .flat_map(|n| n.assets.iter().map(|a| (None, a))),
                                )
                                .find(|(_, x)| x.symbol == asset.symbol)
                                .map(|(s, _)| s);
                            match existing {
                                Some(first) => {
                                    let mut d = Diagnostic::error(
                                        "duplicate_asset",
                                        a.symbol.span,
                                        format!(
                                            "asset `{}` is already defined on `{name}`",
                                            asset.symbol
                                        ),
                                    );
                                    d = match first {
                                        Some(first) => d.related(first, "first defined here"),
                                        None => d.help(format!(
                                            "`{}` is built in on `{name}`; remove this line",
                                            asset.symbol
                                        )),
                                    };
                                    self.push(d);
                                }
                                None => assets.push((clause.span, asset)),
                            }
                        }
                    }
                }
            }
            match builtin_index.and_then(|i| all.get_mut(i)) {
                Some(builtin) => builtin.assets.extend(assets.into_iter().map(|(_, a)| a)),
                None => {
                    let Some((chain_span, chain_id)) = chain else {
                        self.broken.insert(name.clone());
                        if !self.partial && !chain_given {
                            self.push(
                                Diagnostic::error(
                                    "missing_chain",
                                    decl.name.span,
                                    format!("network `{name}` has no `chain`"),
                                )
                                .help("add its EIP-155 chain id, e.g. `chain 31337`"),
                            );
                        }
                        continue;
                    };
                    if let Some(other) = all.iter().find(|n| n.chain_id == chain_id) {
                        self.push(
                            Diagnostic::error(
                                "duplicate_chain",
                                chain_span,
                                format!("chain {chain_id} is already network `{}`", other.name),
                            )
                            .help(format!(
                                "use `{}`, or add assets to it with `network {} {{ asset … }}`",
                                other.name, other.name
                            )),
                        );
                        self.broken.insert(name);
                        continue;
                    }
                    if assets.is_empty() && asset_clauses > 0 {
                        // Each asset clause already reported its own mistake.
                        self.broken.insert(name);
                        continue;
                    }
                    if assets.is_empty() && !self.partial {
                        self.push(Diagnostic::error("missing_asset", decl.name.span, format!("network `{name}` has no `asset`")).help("declare the token buyers pay with: `asset USDC at 0x… name \"USDC\" version \"2\" decimals 6`"));
                    }
                    all.push(Network {
                        name,
                        chain_id,
                        assets: assets.into_iter().map(|(_, a)| a).collect(),
                        testnet: networks::is_testnet_chain(chain_id),
                    });
                }
            }
        }
        all
    }

    fn asset(&mut self, decl: &ast::AssetDecl, span: Span) -> Option<Asset> {
        let symbol = decl.symbol.node.clone();
        if is_credits(&symbol) {
            self.push(
                Diagnostic::error(
                    "reserved_unit",
                    decl.symbol.span,
                    format!("`{symbol}` is reserved for prepaid credits"),
                )
                .help("give the asset its token symbol, e.g. `USDC`"),
            );
        }
        let address = self.address(&decl.address);
        let (mut name, mut version, mut decimals) = (None, None, None);
        let mut decimals_given = false;
        for option in &decl.options {
            match &option.node {
                ast::AssetOption::Name(n) => {
                    self.once(&mut name, option.span, n.node.clone(), "name")
                }
                ast::AssetOption::Version(v) => {
                    self.once(&mut version, option.span, v.node.clone(), "version")
                }
                ast::AssetOption::Decimals(d) => match d.node.parse::<u8>() {
                    Ok(n) if n <= 38 => self.once(&mut decimals, option.span, n, "decimals"),
                    _ => {
                        decimals_given = true;
                        self.push(
                            Diagnostic::error(
                                "bad_decimals",
                                d.span,
                                format!("`{}` decimals is out of range", d.node),
                            )
                            .help("decimals go from 0 to 38 (USDC has 6)"),
                        );
                    }
                },
            }
        }
        let mut missing = Vec::new();
        if name.is_none() {
            missing.push("name \"…\" (the token's EIP-712 domain name)");
        }
        if version.is_none() {
            missing.push("version \"…\" (the token's EIP-712 domain version)");
        }
        if decimals.is_none() && !decimals_given {
            missing.push("decimals N");
        }
        if missing.is_empty() && decimals.is_none() {
            return None;
        }
        if !missing.is_empty() {
            self.push(
                Diagnostic::error(
                    "incomplete_asset",
                    span,
                    format!("asset `{symbol}` is missing {}", missing.join(", ")),
                )
                .help(
                    "buyers sign with the token's EIP-712 domain, so tollgate must know it exactly",
                ),
            );
            return None;
        }
        Some(Asset {
            symbol,
            address: address?,
            eip712_name: name.map(|(_, n)| n)?,
            eip712_version: version.map(|(_, v)| v)?,
            decimals: decimals.map(|(_, d)| d)?,
        })
    }

    fn address(&mut self, text: &Text) -> Option<Address> {
        check_address(text).map_err(|d| self.push(*d)).ok()
    }

    fn network_ref(&mut self, name: &Text, networks: &[Network]) -> Option<Network> {
        if let Some(n) = networks.iter().find(|n| n.name == name.node) {
            return Some(n.clone());
        }
        if self.broken.contains(&name.node) {
            return None;
        }
        let names: Vec<&str> = networks.iter().map(|n| n.name.as_str()).collect();
        let help = match closest(&name.node, &names) {
            Some(s) => format!("did you mean `{s}`?"),
            None => format!(
                "known networks: {}; declare others with `network {} {{ chain … asset … }}`",
                names.join(", "),
                name.node
            ),
        };
        self.push(
            Diagnostic::error(
                "unknown_network",
                name.span,
                format!("unknown network `{}`", name.node),
            )
            .label("not a known network")
            .help(help),
        );
        None
    }

    // ───────────────────────────── service ─────────────────────────────

    fn service(&mut self, decl: &ast::ServiceDecl, all_networks: Vec<Network>) -> Option<Policy> {
        let mut pay_to = None;
        let mut accept_x402: Option<(Span, Vec<Network>)> = None;
        let mut accept_prepaid: Option<(Span, String)> = None;
        let mut settle: Option<(Span, &ast::Settle)> = None;
        let mut timeout = None;
        let mut default = None;
        let mut limit_clauses = Vec::new();
        let mut payer_clauses = Vec::new();
        let mut routes = Vec::new();

        for clause in &decl.clauses {
            let span = clause.span;
            match &clause.node {
                ast::ServiceClause::PayTo(a) => {
                    let address = self.address(a);
                    if address.is_some_and(|x| x.is_zero()) {
                        self.push(
                            Diagnostic::error("zero_address", a.span, "payments to the zero address would be burned")
                                .help("USDC refuses transfers to the zero address: give the address that should receive payments"),
                        );
                    }
                    self.once(&mut pay_to, span, address, "pay_to");
                }
                ast::ServiceClause::AcceptX402(names) => {
                    let mut resolved: Vec<Network> = Vec::new();
                    for name in names {
                        if resolved.iter().any(|n| n.name == name.node) {
                            self.warning(
                                "repeated_network",
                                name.span,
                                format!("network `{}` is listed twice", name.node),
                            )
                            .help = Some(
                                "list each network once; the first place sets its order".into(),
                            );
                            continue;
                        }
                        match self.network_ref(name, &all_networks) {
                            Some(n) => resolved.push(n),
                            None => self.x402_unresolved = true,
                        }
                    }
                    self.once(&mut accept_x402, span, resolved, "accept x402");
                }
                ast::ServiceClause::AcceptPrepaid { header } => {
                    let name = match header {
                        None => DEFAULT_KEY_HEADER.to_string(),
                        Some(h) => {
                            if let Err(d) = check_key_header(h) {
                                self.push(*d);
                            }
                            h.node.to_ascii_lowercase()
                        }
                    };
                    self.once(&mut accept_prepaid, span, name, "accept prepaid");
                }
                ast::ServiceClause::Settle(s) => self.once(&mut settle, span, s, "settle"),
                ast::ServiceClause::Timeout(t) => {
                    if let Some(secs) = self.timeout(t) {
                        self.once(&mut timeout, span, secs, "timeout");
                    }
                }
                ast::ServiceClause::Default(d) => match d.node.as_str() {
                    "deny" => self.once(&mut default, span, DefaultAction::Deny, "default"),
                    "pass" => self.once(&mut default, span, DefaultAction::Pass, "default"),
                    other => {
                        let help = closest(other, &["deny", "pass"]).map_or_else(
                            || "write `default deny` or `default pass`".to_string(),
                            |s| format!("did you mean `{s}`?"),
                        );
                        self.push(
                            Diagnostic::error(
                                "bad_default",
                                d.span,
                                format!("unknown default `{other}`"),
                            )
                            .label("expected `deny` or `pass`")
                            .help(help),
                        );
                    }
                },
                ast::ServiceClause::Limit(l) => limit_clauses.push((span, l)),
                ast::ServiceClause::Payers(p) => payer_clauses.push((span, p)),
                ast::ServiceClause::Route(r) => routes.push((span, r)),
            }
        }

        let networks = accept_x402
            .as_ref()
            .map(|(_, n)| n.clone())
            .unwrap_or_default();
        let pay_to_given = pay_to.is_some();
        let pay_to = pay_to.and_then(|(_, a)| a);
        let settlement = self.settlement(settle, &networks, accept_x402.as_ref().map(|(s, _)| *s));
        let limits = self.limits(&limit_clauses, &networks, None);
        let payers = self.payers(&payer_clauses, None);

        let default_given = decl
            .clauses
            .iter()
            .any(|c| matches!(c.node, ast::ServiceClause::Default(_)));
        if !default_given && !self.partial {
            self.push(Diagnostic::error("missing_default", decl.name.span, "the service does not say what happens to unmatched requests").help("add `default deny` (403 for any path no route matches) or `default pass` (forward it, free)"));
        }
        if let (Some((span, _)), false, false) = (&accept_x402, pay_to_given, self.partial) {
            self.push(
                Diagnostic::error(
                    "missing_pay_to",
                    *span,
                    "x402 is accepted but the service has no `pay_to` address",
                )
                .help("add `pay_to 0x…`: the address that receives every payment"),
            );
        }

        if let (Some((span, secs)), true) = (timeout, accept_x402.is_some()) {
            self.short_timeout(span, secs);
        }
        let inherited = Inherited {
            networks: &networks,
            x402_declared: accept_x402.is_some(),
            prepaid: accept_prepaid.is_some(),
            timeout_secs: timeout.map_or(DEFAULT_TIMEOUT_SECS, |(_, t)| t),
            settle: &settlement.timing,
            limits: &limits,
            payers: &payers,
        };
        let mut matcher = RouteMatcher::default();
        let mut compiled: Vec<Route> = Vec::new();
        let mut route_spans: Vec<Span> = Vec::new();
        for (span, decl) in routes {
            let Some(mut route) = self.route(decl, span, &inherited) else {
                continue;
            };
            route.id = compiled.len();
            self.bundle_window(&route, span);
            match matcher.insert(route.method.as_deref(), &route.pattern, route.id) {
                Ok(()) => {
                    compiled.push(route);
                    route_spans.push(span);
                }
                Err(first) => {
                    let first_span = route_spans.get(first).copied().unwrap_or_default();
                    let header = Span::new(span.start, decl.path.span.end);
                    let same_case = compiled
                        .get(first)
                        .is_some_and(|f| f.pattern.shape() == route.pattern.shape());
                    let label = if same_case {
                        "same method and path shape as an earlier route"
                    } else {
                        "same method and path as an earlier route when letter case is ignored (many upstreams ignore it)"
                    };
                    self.push(
                        Diagnostic::error("duplicate_route", header, format!("duplicate route `{}`", route.display()))
                        .label(label)
                        .related(Span::new(first_span.start, first_span.start + 5), "first defined here")
                        .help("both routes match exactly the same requests, so neither is more specific: merge them or change one"),
                    );
                }
            }
        }

        for id in matcher.shadowed() {
            let (Some(route), Some(span)) = (compiled.get(id), route_spans.get(id)) else {
                continue;
            };
            let header = Span::new(span.start, span.start + 5);
            self.push(
                Diagnostic::error("shadowed_route", header, format!("route `{}` can never match", route.display()))
                    .label("every request it matches goes to a more specific route")
                    .help(format!(
                        "routes for `{}` and for `{}/{{…}}/**` (or deeper) take all its paths: remove it, or one of them",
                        route.pattern.to_string().trim_end_matches("/**").trim_end_matches('/').to_string() + if route.pattern.segments.len() == 1 { "/" } else { "" },
                        route.pattern.to_string().trim_end_matches("/**"),
                    )),
            );
        }

        if let Some((accept_span, _)) = &accept_x402 {
            self.mixed_networks(*accept_span, &networks, &compiled, &route_spans);
        }

        let takes_credits = decl.clauses.iter().any(|c| match &c.node {
            ast::ServiceClause::Route(r) => r.clauses.iter().any(|rc| match &rc.node {
                ast::RouteClause::Price(terms) => terms.iter().any(|t| is_credits(&t.unit.node)),
                ast::RouteClause::Sells(_) => true,
                _ => false,
            }),
            _ => false,
        });
        if let (Some((span, _)), false, false) = (&accept_prepaid, takes_credits, self.partial) {
            self.push(
                Diagnostic::warning(
                    "unused_prepaid",
                    *span,
                    "prepaid keys are accepted but no route has a price in credits",
                )
                .help("add a credits price to a route, e.g. `price 0.001 USDC or 1 credit`"),
            );
        }
        let prepaid = accept_prepaid.map(|(_, header)| Prepaid { header });

        Some(Policy {
            service: decl.name.node.clone(),
            origin: self.source.name.to_string(),
            version: version(&self.source.text),
            pay_to,
            networks,
            prepaid,
            settlement,
            default: default.map_or(DefaultAction::Deny, |(_, d)| d),
            routes: compiled,
            matcher,
        })
    }

    /// Warns when a route can be paid on a testnet and on a mainnet: test tokens are free, so
    /// a buyer could pay the mainnet price with them. Reported once, at `accept x402`.
    fn mixed_networks(
        &mut self,
        accept: Span,
        networks: &[Network],
        routes: &[Route],
        route_spans: &[Span],
    ) {
        let mixed: Vec<(usize, &Network, &Network)> = routes
            .iter()
            .enumerate()
            .filter_map(|(i, route)| {
                let offered = route
                    .price()?
                    .offers
                    .iter()
                    .map(|o| networks.get(o.network));
                let mut test = None;
                let mut main = None;
                for network in offered.flatten() {
                    let slot = if network.testnet {
                        &mut test
                    } else {
                        &mut main
                    };
                    slot.get_or_insert(network);
                }
                Some((i, test?, main?))
            })
            .collect();
        let Some((first, test, main)) = mixed.first().copied() else {
            return;
        };
        let mut d = Diagnostic::warning(
            "mixed_networks",
            accept,
            format!(
                "routes can be paid on testnet `{}` and on mainnet `{}`",
                test.name, main.name
            ),
        )
        .label("test and real money in one list")
        .help(format!(
            "test tokens cost nothing, so a buyer could pick the `{}` offer and pay the mainnet price with free test money: accept testnets and mainnets in separate policies (e.g. staging and production)",
            test.name
        ));
        if let Some(span) = route_spans.get(first) {
            let others = mixed.len() - 1;
            let label = match others {
                0 => "offered on both".to_string(),
                1 => "offered on both, as is 1 more route".to_string(),
                n => format!("offered on both, as are {n} more routes"),
            };
            d = d.related(Span::new(span.start, span.start + 5), label);
        }
        self.push(d);
    }

    fn settlement(
        &mut self,
        clause: Option<(Span, &ast::Settle)>,
        networks: &[Network],
        x402: Option<Span>,
    ) -> Settlement {
        let Some((span, settle)) = clause else {
            if let (Some(at), false) = (x402, self.partial) {
                self.push(
                    Diagnostic::error("missing_settlement", at, "x402 is accepted but the service does not say how payments settle")
                        .help("add `settle via facilitator \"https://x402.org/facilitator\" after response`, or `settle via rpc \"http://…\" relayer env:NAME`"),
                );
            }
            return Settlement {
                backend: Backend::None,
                timing: Timing::AfterResponse,
            };
        };
        let backend = match &settle.backend {
            None => {
                self.push(Diagnostic::error("missing_settlement_backend", span, "the service's `settle` clause does not say how to settle").help("write `settle via facilitator \"https://…\"` or `settle via rpc \"http://…\" relayer env:NAME`"));
                Backend::None
            }
            Some(b) => match &b.node {
                ast::Backend::Facilitator(url) => {
                    self.url(url);
                    Backend::Facilitator {
                        url: url.node.trim_end_matches('/').to_string(),
                    }
                }
                ast::Backend::Rpc { url, relayer } => {
                    self.url(url);
                    let relayer = match &relayer.node {
                        ast::KeyRef::Env(name) => SecretRef::Env(name.clone()),
                        ast::KeyRef::Path(path) if looks_like_key(path) => {
                            self.inline_secret(relayer.span);
                            SecretRef::File(PathBuf::from(path))
                        }
                        ast::KeyRef::Path(path) => SecretRef::File(PathBuf::from(path)),
                        ast::KeyRef::Inline(_) => {
                            self.inline_secret(relayer.span);
                            SecretRef::Env(String::new())
                        }
                    };
                    Backend::Rpc {
                        url: url.node.clone(),
                        relayer,
                    }
                }
            },
        };
        if x402.is_none() && backend != Backend::None {
            self.warning(
                "unused_settlement",
                span,
                "settlement is configured but the service does not accept x402",
            )
            .help = Some(
                "settlement applies to x402 payments: add `accept x402 on …`, or remove the clause"
                    .into(),
            );
        }
        let timing = settle
            .timing
            .as_ref()
            .map_or(Timing::AfterResponse, |t| self.timing(t, networks));
        Settlement { backend, timing }
    }

    fn inline_secret(&mut self, span: Span) {
        self.push(
            Diagnostic::error("inline_secret", span, "a relayer key must not be written in the policy")
            .label("a private key, in plain text")
            .help("keep it out of the policy: `relayer env:RELAYER_KEY`, or a file with `relayer \"/run/secrets/relayer.key\"`"),
        );
    }

    fn url(&mut self, url: &Text) {
        let ok = ["http://", "https://"].iter().any(|p| {
            url.node
                .strip_prefix(p)
                .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
        });
        if !ok {
            self.push(
                Diagnostic::error(
                    "bad_url",
                    url.span,
                    format!("`{}` is not an http(s) URL", url.node),
                )
                .help("write the full URL, e.g. \"https://x402.org/facilitator\""),
            );
        }
    }

    fn timing(&mut self, timing: &Spanned<ast::Timing>, networks: &[Network]) -> Timing {
        match &timing.node {
            ast::Timing::BeforeResponse => Timing::BeforeResponse,
            ast::Timing::AfterResponse => Timing::AfterResponse,
            ast::Timing::Deferred(triggers) => {
                let mut bundle = Bundle::default();
                let (mut every_at, mut payments_at, mut value_at): (Seen, Seen, Seen) =
                    (None, None, None);
                for trigger in triggers {
                    match &trigger.node {
                        ast::Trigger::Every(d) => {
                            self.once(&mut every_at, trigger.span, (), "every <duration>");
                            bundle.every_secs = self.duration_secs(
                                &Spanned::new(d.clone(), trigger.span),
                                "a bundle window",
                            );
                        }
                        ast::Trigger::Payments(n) => {
                            self.once(&mut payments_at, trigger.span, (), "<n> payments");
                            match self.count(n, trigger.span) {
                                Some(n) if n > 0 => bundle.payments = Some(n),
                                None => {}
                                Some(_) => {
                                    self.error(
                                        "bad_count",
                                        trigger.span,
                                        "a bundle needs at least 1 payment",
                                    )
                                    .help =
                                        Some("e.g. `deferred every 60s or 100 payments`".into());
                                }
                            }
                        }
                        ast::Trigger::Value(m) => {
                            self.once(&mut value_at, trigger.span, (), "<amount>");
                            bundle.value = self.quantity(m, networks, false);
                            if bundle.value.as_ref().is_some_and(|q| q.atomic == 0) {
                                self.error(
                                    "bad_count",
                                    trigger.span,
                                    "a bundle value must be more than zero",
                                );
                            }
                        }
                    }
                }
                if triggers.is_empty() {
                    self.push(Diagnostic::error("empty_bundle", timing.span, "deferred settlement needs a bundle rule").help("say when a bundle closes, e.g. `deferred every 60s or 100 payments or 5 USDC`"));
                }
                Timing::Deferred(bundle)
            }
        }
    }

    /// x402 clients sign authorizations valid for `timeout` seconds, and tollgate refuses one
    /// with less than 6 s to live: a timeout near that refuses most payments as expired.
    fn short_timeout(&mut self, span: Span, secs: u64) {
        let margin = crate::x402::verify::VALID_BEFORE_MARGIN_SECS;
        if secs < 10 {
            self.warning(
                "short_timeout",
                span,
                format!("x402 buyers sign authorizations valid for {secs}s, and a payment that arrives with less than {margin}s left is refused as expired"),
            )
            .help = Some("official clients set validBefore = now + timeout: use at least 10s".into());
        }
    }

    /// A deferred bundle must reach the chain while its authorizations are valid, so it closes
    /// [`crate::settle::DEADLINE_MARGIN_SECS`] before the earliest `validBefore`, and buyers
    /// sign for the route's `timeout`: a window longer than that never runs its course.
    fn bundle_window(&mut self, route: &Route, span: Span) {
        let margin = crate::settle::DEADLINE_MARGIN_SECS;
        let (Timing::Deferred(bundle), Some(price)) = (&route.settle, route.price()) else {
            return;
        };
        if price.offers.is_empty() {
            return;
        }
        let Some(window) = bundle.every_secs else {
            return;
        };
        let reach = route.timeout_secs.saturating_sub(margin);
        if window > reach {
            self.warning(
                "bundle_window_too_long",
                span,
                format!(
                    "bundles here wait up to {window}s, but buyers' authorizations are valid for {}s (the route's timeout): a bundle closes {reach}s after its first payment, {margin}s before they expire",
                    route.timeout_secs
                ),
            )
            .help = Some(format!(
                "raise the route's `timeout` to at least {}s to bundle for {window}s (tollgate keeps each nonce until its authorization expires)",
                window + margin
            ));
        }
    }

    fn timeout(&mut self, text: &Text) -> Option<u64> {
        self.duration_secs(text, "a timeout")
    }

    /// Whole seconds of a duration literal.
    fn duration_secs(&mut self, text: &Text, what: &str) -> Option<u64> {
        let s = text.node.as_str();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: Option<u64> = digits.parse().ok();
        let scale = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3_600,
            "d" => 86_400,
            _ => {
                self.push(
                    Diagnostic::error(
                        "bad_duration",
                        text.span,
                        format!("{what} is counted in whole seconds"),
                    )
                    .help("use `s`, `m`, `h` or `d`, e.g. `30s`"),
                );
                return None;
            }
        };
        match n.map(|n| n.checked_mul(scale)) {
            Some(Some(secs)) if secs > 0 => Some(secs),
            Some(Some(_)) => {
                self.error(
                    "bad_duration",
                    text.span,
                    format!("{what} must be longer than zero"),
                );
                None
            }
            _ => {
                self.error("bad_duration", text.span, format!("{what} is too long"));
                None
            }
        }
    }

    // ───────────────────────────── money ─────────────────────────────

    /// Resolves `amount unit` to a quantity. Asset decimals must agree across the networks
    /// that carry the asset, since a per-buyer total adds them up.
    fn quantity(
        &mut self,
        money: &ast::Money,
        networks: &[Network],
        credits_ok: bool,
    ) -> Option<Quantity> {
        let unit = self.unit(&money.unit, networks, credits_ok)?;
        let decimals = match &unit {
            Unit::Credits => 0,
            Unit::Asset { decimals, .. } => *decimals,
        };
        let atomic = self.amount(&money.amount, decimals, &unit)?;
        Some(Quantity { unit, atomic })
    }

    fn unit(&mut self, unit: &Text, networks: &[Network], credits_ok: bool) -> Option<Unit> {
        if is_credits(&unit.node) {
            if !credits_ok {
                self.push(
                    Diagnostic::error(
                        "credits_not_allowed",
                        unit.span,
                        "credits are not settled on chain, so they cannot be used here",
                    )
                    .help("give this amount in an asset such as `USDC`"),
                );
                return None;
            }
            return Some(Unit::Credits);
        }
        let carriers: Vec<(&Network, &Asset)> = networks
            .iter()
            .filter_map(|n| n.asset(&unit.node).map(|a| (n, a)))
            .collect();
        let Some((_, first)) = carriers.first() else {
            self.unknown_unit(unit, networks, credits_ok);
            return None;
        };
        if let Some((other, asset)) = carriers.iter().find(|(_, a)| a.decimals != first.decimals) {
            self.push(Diagnostic::error("mixed_decimals", unit.span, format!("`{}` has different decimals on different networks", unit.node)).help(format!("{} decimals on one, {} on `{}`: declare the asset with the same decimals everywhere", first.decimals, asset.decimals, other.name)));
            return None;
        }
        Some(Unit::Asset {
            symbol: unit.node.clone(),
            decimals: first.decimals,
        })
    }

    fn unknown_unit(&mut self, unit: &Text, networks: &[Network], credits_ok: bool) {
        let mut known: Vec<&str> = networks
            .iter()
            .flat_map(|n| n.assets.iter().map(|a| a.symbol.as_str()))
            .collect();
        known.sort_unstable();
        known.dedup();
        if credits_ok {
            known.push("credits");
        }
        if self.x402_unresolved {
            // An `accept x402` network did not resolve (already reported): its assets are unknown.
            return;
        }
        let help = match closest(&unit.node, &known) {
            Some(s) => format!("did you mean `{s}`?"),
            None if networks.is_empty() && credits_ok => {
                "the service accepts no x402 network: price in credits, or add `accept x402 on …`"
                    .to_string()
            }
            None if networks.is_empty() => {
                "the service accepts no x402 network: add `accept x402 on …` to use an asset"
                    .to_string()
            }
            None => format!("units here: {}", known.join(", ")),
        };
        self.push(
            Diagnostic::error(
                "unknown_unit",
                unit.span,
                format!("unknown unit `{}`", unit.node),
            )
            .label("no accepted network has this asset")
            .help(help),
        );
    }

    fn amount(&mut self, amount: &Text, decimals: u8, unit: &Unit) -> Option<u128> {
        match parse_decimal(&amount.node, decimals) {
            Ok(atomic) => Some(atomic),
            Err(error @ AmountError::TooManyDecimals { .. }) => {
                let name = match unit {
                    Unit::Credits => "credits are whole numbers".to_string(),
                    Unit::Asset { symbol, decimals } => {
                        format!("{symbol} has {decimals} decimals; amounts are never rounded")
                    }
                };
                self.push(
                    Diagnostic::error(
                        "too_many_decimals",
                        amount.span,
                        format!("`{}` has too many decimals", amount.node),
                    )
                    .label(error.to_string())
                    .help(name),
                );
                None
            }
            Err(error) => {
                self.error(
                    "bad_amount",
                    amount.span,
                    format!("`{}`: {error}", amount.node),
                );
                None
            }
        }
    }

    // ───────────────────────────── limits and payers ─────────────────────────────

    fn limits(
        &mut self,
        clauses: &[(Span, &ast::Limit)],
        networks: &[Network],
        inherit: Option<&Limits>,
    ) -> Limits {
        let mut own = Limits::default();
        // Service limits count a buyer across every route; a route's own limits count it there.
        let scope = if inherit.is_some() {
            LimitScope::Route
        } else {
            LimitScope::Service
        };
        let mut requests_at: Option<(Span, ())> = None;
        let mut spend_at: HashMap<Unit, Span> = HashMap::new();
        let mut unsettled_at: HashMap<Unit, Span> = HashMap::new();
        for (span, limit) in clauses {
            match limit {
                ast::Limit::Unsettled(money) => {
                    let Some(q) = self.quantity(money, networks, false) else {
                        continue;
                    };
                    if q.atomic == 0 {
                        self.zero_limit(money.amount.span);
                        continue;
                    }
                    if let Some(first) = unsettled_at.insert(q.unit.clone(), *span) {
                        self.push(
                            Diagnostic::error(
                                "duplicate_limit",
                                *span,
                                format!("a second unsettled limit in {}", money.unit.node),
                            )
                            .related(first, "first one here"),
                        );
                        continue;
                    }
                    own.unsettled.push(q);
                }
                ast::Limit::Rate { quantity, window } => {
                    let Some(window_secs) = self.window(window.as_ref(), quantity.span) else {
                        continue;
                    };
                    match &quantity.node {
                        ast::Quantity::Requests(n) => {
                            let count = match self.count(n, quantity.span) {
                                Some(c) if c > 0 => c,
                                None => continue,
                                Some(_) => {
                                    self.zero_limit(quantity.span);
                                    continue;
                                }
                            };
                            self.once(&mut requests_at, *span, (), "limit buyer … requests");
                            own.requests = Some(RequestLimit {
                                count,
                                window_secs,
                                scope,
                            });
                        }
                        ast::Quantity::Spend(money) => {
                            let Some(max) = self.quantity(money, networks, true) else {
                                continue;
                            };
                            if max.atomic == 0 {
                                self.zero_limit(money.amount.span);
                                continue;
                            }
                            if let Some(first) = spend_at.insert(max.unit.clone(), *span) {
                                self.push(
                                    Diagnostic::error(
                                        "duplicate_limit",
                                        *span,
                                        format!("a second spend limit in {}", money.unit.node),
                                    )
                                    .related(first, "first one here")
                                    .help("one spend limit per unit; keep the one you mean"),
                                );
                                continue;
                            }
                            own.spend.push(SpendLimit {
                                max,
                                window_secs,
                                scope,
                            });
                        }
                    }
                }
            }
        }
        let Some(parent) = inherit else { return own };
        // A route limit replaces the service limit of the same kind (and unit); others are inherited.
        let mut merged = parent.clone();
        if own.requests.is_some() {
            merged.requests = own.requests;
        }
        for s in own.spend {
            merged.spend.retain(|p| p.max.unit != s.max.unit);
            merged.spend.push(s);
        }
        for u in own.unsettled {
            merged.unsettled.retain(|p| p.unit != u.unit);
            merged.unsettled.push(u);
        }
        merged
    }

    fn zero_limit(&mut self, span: Span) {
        self.push(
            Diagnostic::error("zero_limit", span, "a limit of zero blocks every request")
                .help("to refuse every request, use `deny` on the route"),
        );
    }

    /// A positive whole number; zero is the caller's to report.
    fn count(&mut self, text: &str, span: Span) -> Option<u64> {
        match text.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                self.error("bad_count", span, format!("`{text}` is too large"));
                None
            }
        }
    }

    fn window(&mut self, window: Option<&Spanned<ast::Window>>, quantity: Span) -> Option<u64> {
        let Some(window) = window else {
            self.push(Diagnostic::error("limit_without_window", quantity, "this limit has no window").label("per what?").help("add a window, e.g. `per minute`, `per hour`, `per 10 minutes` or `per day`"));
            return None;
        };
        match &window.node {
            ast::Window::Duration(d) => {
                self.duration_secs(&Spanned::new(d.clone(), window.span), "a limit window")
            }
            ast::Window::Units { count, unit } => {
                let size = match unit.trim_end_matches('s') {
                    "second" => 1,
                    "minute" => 60,
                    "hour" => 3_600,
                    _ => 86_400,
                };
                let n = match count {
                    None => 1,
                    Some(c) => match c.parse::<u64>() {
                        Ok(n) if n > 0 => n,
                        _ => {
                            self.error(
                                "bad_duration",
                                window.span,
                                "a limit window must be longer than zero",
                            );
                            return None;
                        }
                    },
                };
                let secs = n.checked_mul(size);
                if secs.is_none() {
                    self.error("bad_duration", window.span, "this window is too long");
                }
                secs
            }
        }
    }

    fn payers(
        &mut self,
        clauses: &[(Span, &ast::Payers)],
        inherit: Option<&PayerRules>,
    ) -> PayerRules {
        let mut allow: Option<Vec<Address>> = None;
        let mut allow_at: Option<(Span, ())> = None;
        let mut deny: Vec<(Address, Span)> = Vec::new();
        let mut allowed: Vec<(Address, Span)> = Vec::new();
        for (span, clause) in clauses {
            let addresses: Vec<(Address, Span)> = clause
                .addresses
                .iter()
                .filter_map(|a| self.address(a).map(|x| (x, a.span)))
                .collect();
            if clause.allow {
                self.once(&mut allow_at, *span, (), "allow payers");
                allow
                    .get_or_insert_with(Vec::new)
                    .extend(addresses.iter().map(|(a, _)| *a));
                allowed.extend(addresses);
            } else {
                deny.extend(addresses);
            }
        }
        for (address, span) in &allowed {
            if let Some((_, denied_at)) = deny.iter().find(|(d, _)| d == address) {
                self.push(
                    Diagnostic::error(
                        "payer_allowed_and_denied",
                        *span,
                        format!("payer `{address}` is both allowed and denied"),
                    )
                    .label("allowed here")
                    .related(*denied_at, "denied here")
                    .help("remove it from one of the lists; denying wins, so it would never be served"),
                );
            }
        }
        let deny: Vec<Address> = deny.into_iter().map(|(a, _)| a).collect();
        let Some(parent) = inherit else {
            return PayerRules { allow, deny };
        };
        // A route's allow list replaces the service's; deny lists add up (denying is never undone).
        let mut merged = parent.clone();
        if allow.is_some() {
            merged.allow = allow;
        }
        merged.deny.extend(deny);
        merged
    }

    // ───────────────────────────── routes ─────────────────────────────

    fn route(&mut self, decl: &ast::RouteDecl, span: Span, up: &Inherited<'_>) -> Option<Route> {
        let method = self.method(&decl.method);
        let pattern = match PathPattern::parse(&decl.path.node) {
            Ok(p) => Some(p),
            Err(e) => {
                let span = self.inside_string(&decl.path, e.at, e.len);
                self.push(Diagnostic::error("bad_path_pattern", span, e.message).help(e.help));
                None
            }
        };

        let mut action: Option<(Span, Action)> = None;
        let mut prices: Option<(Span, &Vec<ast::Money>)> = None;
        let mut prefer: Option<(Span, Rail)> = None;
        let mut refund: Option<(Span, ())> = None;
        let mut sells: Option<(Span, u128)> = None;
        let mut upgrade: Option<(Span, Vec<String>)> = None;
        let mut description = None;
        let mut mime = None;
        let mut timeout = None;
        let mut settle_timing: Option<(Span, Timing)> = None;
        let mut limit_clauses = Vec::new();
        let mut payer_clauses = Vec::new();
        let mut price_related: Vec<(Span, &'static str)> = Vec::new();

        for clause in &decl.clauses {
            let cs = clause.span;
            match &clause.node {
                ast::RouteClause::Free | ast::RouteClause::Deny | ast::RouteClause::Price(_) => {
                    let (word, this) = match &clause.node {
                        ast::RouteClause::Free => ("free", Action::Free),
                        ast::RouteClause::Deny => ("deny", Action::Deny),
                        _ => (
                            "price",
                            Action::Charge(Price {
                                offers: Vec::new(),
                                credits: None,
                            }),
                        ),
                    };
                    if let ast::RouteClause::Price(terms) = &clause.node {
                        prices = Some((cs, terms));
                    }
                    match &action {
                        Some((first, existing)) => {
                            let first_word = match existing {
                                Action::Free => "free",
                                Action::Deny => "deny",
                                Action::Charge(_) => "price",
                            };
                            let message = if first_word == word {
                                format!("`{word}` is given twice")
                            } else {
                                format!("conflicting clauses: `{first_word}` and `{word}`")
                            };
                            self.push(
                                Diagnostic::error("conflicting_action", cs, message)
                                    .related(*first, "first one here")
                                    .help("a route is either `free`, `deny`, or has one `price`"),
                            );
                        }
                        None => action = Some((cs, this)),
                    }
                }
                ast::RouteClause::Prefer(rail) => {
                    let value = match rail.node.as_str() {
                        "prepaid" => Some(Rail::Prepaid),
                        "x402" => Some(Rail::X402),
                        other => {
                            self.push(
                                Diagnostic::error(
                                    "bad_prefer",
                                    rail.span,
                                    format!("unknown rail `{other}`"),
                                )
                                .help("write `prefer prepaid` or `prefer x402`"),
                            );
                            None
                        }
                    };
                    if let Some(v) = value {
                        self.once(&mut prefer, cs, v, "prefer");
                    }
                    price_related.push((cs, "prefer"));
                }
                ast::RouteClause::RefundOn(class) => {
                    if class.node != "5xx" {
                        self.push(
                            Diagnostic::error(
                                "bad_refund",
                                class.span,
                                format!("refunds are only given on `5xx`, not `{}`", class.node),
                            )
                            .help("write `refund on 5xx`: a failed upstream returns the debit"),
                        );
                    }
                    self.once(&mut refund, cs, (), "refund on 5xx");
                    price_related.push((cs, "refund on 5xx"));
                }
                ast::RouteClause::Sells(money) => {
                    if !is_credits(&money.unit.node) {
                        self.push(
                            Diagnostic::error(
                                "bad_sells",
                                money.unit.span,
                                format!("a route sells prepaid credits, not `{}`", money.unit.node),
                            )
                            .help("write e.g. `sells 1000 credits`; the route's x402 price is what they cost"),
                        );
                    } else if let Some(q) = self.quantity(money, up.networks, true) {
                        if q.atomic == 0 {
                            self.error(
                                "bad_sells",
                                money.amount.span,
                                "a route must sell at least 1 credit",
                            );
                        } else {
                            self.once(&mut sells, cs, q.atomic, "sells");
                        }
                    }
                    price_related.push((cs, "sells"));
                }
                ast::RouteClause::Upgrade(protocols) => {
                    let protocols = self.protocols(protocols);
                    self.once(&mut upgrade, cs, protocols, "upgrade");
                }
                ast::RouteClause::Description(d) => {
                    self.once(&mut description, cs, d.node.clone(), "description")
                }
                ast::RouteClause::Mime(m) => {
                    if !m.node.contains('/') || m.node.contains(char::is_whitespace) {
                        self.push(
                            Diagnostic::error(
                                "bad_mime",
                                m.span,
                                format!("`{}` is not a MIME type", m.node),
                            )
                            .help("e.g. \"application/json\""),
                        );
                    }
                    self.once(&mut mime, cs, m.node.clone(), "mime");
                }
                ast::RouteClause::Timeout(t) => {
                    if let Some(secs) = self.timeout(t) {
                        self.once(&mut timeout, cs, secs, "timeout");
                    }
                    price_related.push((cs, "timeout"));
                }
                ast::RouteClause::Limit(l) => {
                    limit_clauses.push((cs, l));
                    price_related.push((cs, "limit"));
                }
                ast::RouteClause::Payers(p) => {
                    payer_clauses.push((cs, p));
                    price_related.push((
                        cs,
                        if p.allow {
                            "allow payers"
                        } else {
                            "deny payers"
                        },
                    ));
                }
                ast::RouteClause::Settle(s) => {
                    if let Some(b) = &s.backend {
                        self.push(
                            Diagnostic::error(
                                "route_settlement_backend",
                                b.span,
                                "the settlement backend is chosen once, for the whole service",
                            )
                            .help("keep only the timing on a route, e.g. `settle before response`"),
                        );
                    }
                    if let Some(t) = &s.timing {
                        let timing = self.timing(t, up.networks);
                        self.once(&mut settle_timing, cs, timing, "settle");
                    }
                    price_related.push((cs, "settle"));
                }
            }
        }

        if let Some((s, _)) = &upgrade {
            let s = *s;
            let sells_at = decl
                .clauses
                .iter()
                .find(|c| matches!(c.node, ast::RouteClause::Sells(_)))
                .map(|c| c.span);
            match (&action, sells_at) {
                (Some((deny, Action::Deny)), _) => {
                    let deny = *deny;
                    self.push(
                        Diagnostic::error(
                            "upgrade_on_deny",
                            s,
                            "`upgrade` on a route that is denied",
                        )
                        .label("no request reaches the upstream here")
                        .related(deny, "the route is denied here")
                        .help("remove `upgrade`, or give the route `free` or a `price`"),
                    );
                }
                (_, Some(sells_at)) => {
                    self.push(
                        Diagnostic::error(
                            "upgrade_on_sells",
                            s,
                            "`upgrade` on a route that sells credits",
                        )
                        .label("never forwarded")
                        .related(sells_at, "tollgate answers this route itself")
                        .help("a route that sells credits never reaches the upstream, so there is no connection to upgrade: remove `upgrade`, or put it on another route"),
                    );
                }
                _ => {}
            }
        }

        let action = match action {
            // A price with errors still yields a route (denied) so later checks, such as
            // duplicate detection, see it; the errors keep the policy from compiling.
            Some((_, Action::Charge(_))) => self
                .price(
                    prices.map(|(_, p)| p.as_slice()).unwrap_or(&[]),
                    prices.map_or(span, |(s, _)| s),
                    up,
                )
                .map_or(Action::Deny, Action::Charge),
            Some((_, a)) => a,
            None => {
                if !self.partial {
                    self.push(
                        Diagnostic::error(
                            "missing_action",
                            Span::new(span.start, decl.path.span.end),
                            format!(
                                "route `{} {}` does not say what it costs",
                                decl.method.node, decl.path.node
                            ),
                        )
                        .help("add `free`, `deny`, or a `price`, e.g. `price 0.001 USDC`"),
                    );
                }
                return None;
            }
        };

        let (is_free, hybrid, has_credits) = match &action {
            Action::Charge(p) => (
                false,
                p.credits.is_some() && !p.offers.is_empty(),
                p.credits.is_some(),
            ),
            Action::Free | Action::Deny => (true, false, false),
        };
        for (s, what) in &price_related {
            if is_free {
                self.warning(
                    "no_effect",
                    *s,
                    format!("`{what}` has no effect on a route that is free or denied"),
                )
                .help = Some("remove it, or give the route a `price`".into());
            }
        }
        if let (Some((s, _)), false, false) = (prefer, hybrid, is_free) {
            self.warning("no_effect", s, "`prefer` has no effect unless the route has both an x402 price and a price in credits").help =
                Some("`prefer` picks the rail when a request carries both an API key and a payment".into());
        }
        if let (Some((s, _)), false, false) = (refund, has_credits, is_free) {
            self.push(Diagnostic::warning("no_effect", s, "`refund on 5xx` has no effect without a price in credits").help("x402 payments are never settled when the upstream fails, so there is nothing to refund"));
        }
        if let (Some((s, _)), Action::Charge(price)) = (sells, &action) {
            if price.offers.is_empty() || price.credits.is_some() {
                self.push(
                    Diagnostic::error(
                        "bad_sells",
                        s,
                        "a route that sells credits must be paid with x402 only",
                    )
                    .help(
                        "give it a price in an asset, e.g. `price 1 USDC`, and no price in credits",
                    ),
                );
            }
            if !up.prepaid {
                self.push(
                    Diagnostic::error(
                        "prepaid_not_accepted",
                        s,
                        "this route sells credits, but the service does not accept prepaid keys",
                    )
                    .help("add `accept prepaid header \"x-api-key\"` to the service"),
                );
            }
        }
        if let (Some((s, secs)), Action::Charge(price)) = (timeout, &action)
            && !price.offers.is_empty()
        {
            self.short_timeout(s, secs);
        }

        let limits = self.limits(&limit_clauses, up.networks, Some(up.limits));
        let payers = self.payers(&payer_clauses, Some(up.payers));
        Some(Route {
            id: 0,
            method: method?,
            pattern: pattern?,
            line: self.source.line_col(span.start).0,
            action,
            description: description.map(|(_, d)| d).unwrap_or_default(),
            mime: mime.map_or_else(|| "application/json".to_string(), |(_, m)| m),
            timeout_secs: timeout.map_or(up.timeout_secs, |(_, t)| t),
            prefer: prefer.map_or(Rail::Prepaid, |(_, r)| r),
            refund_on_5xx: refund.is_some(),
            sells: sells.map(|(_, n)| n),
            upgrade: upgrade.map(|(_, p)| p).unwrap_or_default(),
            settle: settle_timing.map_or_else(|| up.settle.clone(), |(_, t)| t),
            limits,
            payers,
        })
    }

    /// The protocols of an `upgrade` clause: HTTP tokens, lower case, each once.
    fn protocols(&mut self, written: &[Text]) -> Vec<String> {
        let mut out: Vec<(String, Span)> = Vec::new();
        for protocol in written {
            if !is_token(&protocol.node) {
                let help = if protocol.node.contains('/') {
                    "write the protocol's name without a version, e.g. `websocket` or `h2c`"
                } else {
                    "a protocol name is letters, digits and `-` (an HTTP token), e.g. `websocket` or `h2c`"
                };
                self.push(
                    Diagnostic::error(
                        "bad_protocol",
                        protocol.span,
                        format!("`{}` is not a protocol name", protocol.node),
                    )
                    .label("not an HTTP token")
                    .help(help),
                );
                continue;
            }
            let name = protocol.node.to_ascii_lowercase();
            if let Some((_, first)) = out.iter().find(|(n, _)| *n == name) {
                let first = *first;
                self.push(
                    Diagnostic::error(
                        "duplicate_protocol",
                        protocol.span,
                        format!("protocol `{name}` is listed twice"),
                    )
                    .label("second one")
                    .related(first, "first one here")
                    .help("list each protocol once (names are compared ignoring case)"),
                );
                continue;
            }
            out.push((name, protocol.span));
        }
        out.into_iter().map(|(n, _)| n).collect()
    }

    /// The span of `len` bytes at byte `at` of a string's unescaped value. When the source
    /// spells the string with escapes, offsets differ, so the whole string is underlined.
    fn inside_string(&self, string: &Text, at: usize, len: usize) -> Span {
        let raw = self.source.slice(string.span);
        let unescaped_in_place =
            raw.len() >= 2 && raw.get(1..raw.len() - 1) == Some(string.node.as_str());
        if !unescaped_in_place {
            return string.span;
        }
        let text = string.node.as_str();
        let mut start = at.min(text.len());
        while !text.is_char_boundary(start) {
            start -= 1;
        }
        let mut end = (at + len.max(1)).min(text.len()).max(start);
        while !text.is_char_boundary(end) {
            end += 1;
        }
        let base = string.span.start + 1;
        Span::new(base + start, base + end.max(start))
    }

    /// `Some(None)` is any method (`*`).
    fn method(&mut self, method: &Text) -> Option<Option<String>> {
        if method.node == "*" {
            return Some(None);
        }
        check_method(method)
            .map_err(|d| self.push(*d))
            .ok()
            .map(Some)
    }

    fn price(&mut self, terms: &[ast::Money], span: Span, up: &Inherited<'_>) -> Option<Price> {
        let mut price = Price {
            offers: Vec::new(),
            credits: None,
        };
        let mut seen: HashMap<String, Span> = HashMap::new();
        let mut ok = true;
        for term in terms {
            let unit_key = if is_credits(&term.unit.node) {
                "credits".to_string()
            } else {
                term.unit.node.clone()
            };
            if let Some(first) = seen.insert(unit_key.clone(), term.unit.span) {
                self.push(
                    Diagnostic::error(
                        "duplicate_price",
                        term.unit.span,
                        format!("two prices in {unit_key}"),
                    )
                    .related(first, "first one here")
                    .help("give one price per unit"),
                );
                ok = false;
                continue;
            }
            let zero = term.amount.node.bytes().all(|b| b == b'0' || b == b'.');
            if zero {
                self.push(
                    Diagnostic::error(
                        "zero_price",
                        term.amount.span,
                        "a price must be more than zero",
                    )
                    .help("use `free` for a route that costs nothing"),
                );
                ok = false;
                continue;
            }
            if is_credits(&term.unit.node) {
                if !up.prepaid {
                    self.push(
                        Diagnostic::error(
                            "prepaid_not_accepted",
                            term.unit.span,
                            "a price in credits, but the service does not accept prepaid keys",
                        )
                        .help("add `accept prepaid header \"x-api-key\"` to the service"),
                    );
                    ok = false;
                    continue;
                }
                match self.amount(&term.amount, 0, &Unit::Credits) {
                    Some(c) => price.credits = Some(c),
                    None => ok = false,
                }
                continue;
            }
            if up.networks.is_empty() && up.x402_declared {
                // `accept x402` is there but its networks did not resolve (already reported).
                ok = false;
                continue;
            }
            if up.networks.is_empty() {
                self.push(
                    Diagnostic::error(
                        "x402_not_accepted",
                        term.unit.span,
                        format!(
                            "a price in {}, but the service accepts no x402 network",
                            term.unit.node
                        ),
                    )
                    .help("add `accept x402 on base-sepolia` (or another network) to the service"),
                );
                ok = false;
                continue;
            }
            let mut offered = false;
            for (index, network) in up.networks.iter().enumerate() {
                let Some(asset) = network.asset(&term.unit.node) else {
                    continue;
                };
                offered = true;
                match self.amount(
                    &term.amount,
                    asset.decimals,
                    &Unit::Asset {
                        symbol: asset.symbol.clone(),
                        decimals: asset.decimals,
                    },
                ) {
                    Some(amount) => price.offers.push(Offer {
                        network: index,
                        asset: asset.clone(),
                        amount,
                    }),
                    None => {
                        ok = false;
                        break;
                    }
                }
            }
            if !offered {
                self.unknown_unit(&term.unit, up.networks, up.prepaid);
                ok = false;
            }
        }
        // Offers in network order, whatever order the terms were written in.
        price.offers.sort_by_key(|o| o.network);
        if terms.is_empty() {
            self.error("empty_price", span, "a price needs an amount");
            ok = false;
        }
        ok.then_some(price)
    }
}

/// Whether `s` is an HTTP token (RFC 9110 §5.6.2): one or more `tchar`s.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Whether a unit names prepaid credits.
pub(crate) fn is_credits(unit: &str) -> bool {
    unit == "credit" || unit == "credits"
}

/// A relayer "path" that is really a pasted private key.
fn looks_like_key(path: &str) -> bool {
    let hex = path.strip_prefix("0x").unwrap_or(path);
    hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

fn version(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The first line that is neither blank nor a comment (where a missing block is reported).
fn first_code_line(text: &str) -> Span {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim();
        if !trimmed.is_empty() && !trimmed.starts_with('#') {
            return Span::new(offset, offset + line.trim_end().len());
        }
        offset += line.len();
    }
    Span::new(0, 0)
}

/// An address: `0x` and 40 hex digits; mixed case must be the EIP-55 checksum.
/// Boxed: a diagnostic is large and this is a cold path.
pub(crate) fn check_address(text: &Text) -> Result<Address, Box<Diagnostic>> {
    let s = text.node.as_str();
    let hex = s.get(2..).unwrap_or("");
    let not_an_address = || {
        Box::new(
            Diagnostic::error("bad_address", text.span, format!("`{s}` is not an address"))
                .label(format!("{} hex digits", hex.len()))
                .help("an address is `0x` followed by 40 hex digits"),
        )
    };
    if hex.len() != 40 {
        return Err(not_an_address());
    }
    let address = s.parse::<Address>().map_err(|_| not_an_address())?;
    let mixed =
        hex.chars().any(|c| c.is_ascii_lowercase()) && hex.chars().any(|c| c.is_ascii_uppercase());
    if mixed && Address::parse_checksummed(s, None).is_err() {
        return Err(Box::new(Diagnostic::error("bad_checksum", text.span, "address checksum does not match (EIP-55)")
            .label("mixed case, but not the checksummed form")
            .help(format!(
                "a typo? the checksummed form of these digits is `{}`; write all lower case to skip the check",
                address.to_checksum(None)
            ))));
    }
    Ok(address)
}

/// A header that may carry API keys: an HTTP token without `_`, and none of the headers HTTP,
/// proxies, x402 or tollgate itself give a meaning (compared ignoring case).
fn check_key_header(header: &Text) -> Result<(), Box<Diagnostic>> {
    let written = header.node.as_str();
    if !is_token(written) {
        return Err(Box::new(
            Diagnostic::error(
                "bad_header_name",
                header.span,
                format!("`{written}` is not a valid header name"),
            )
            .help("header names are letters, digits and `-`, e.g. `x-api-key`"),
        ));
    }
    let name = written.to_ascii_lowercase();
    let reason = RESERVED_HEADERS
        .iter()
        .find(|(reserved, _)| *reserved == name)
        .or_else(|| {
            RESERVED_HEADER_PREFIXES
                .iter()
                .find(|(prefix, _)| name.starts_with(prefix))
        })
        .map(|(_, reason)| *reason);
    if let Some(reason) = reason {
        return Err(Box::new(
            Diagnostic::error(
                "reserved_header",
                header.span,
                format!("`{written}` cannot carry API keys"),
            )
            .label("a reserved header")
            .help(format!(
                "{reason}; choose another header for keys, e.g. `x-api-key`"
            )),
        ));
    }
    if name.contains('_') {
        return Err(Box::new(
            Diagnostic::error(
                "bad_header_name",
                header.span,
                format!("`{written}` contains `_`"),
            )
            .label("`_` in a header name")
            .help("some servers treat `_` as `-` (and nginx drops such headers), so another header could pass for this one: use `-`, e.g. `x-api-key`"),
        ));
    }
    Ok(())
}

/// An upper-case HTTP method (not `*`).
pub(crate) fn check_method(method: &Text) -> Result<String, Box<Diagnostic>> {
    let m = method.node.as_str();
    if METHODS.contains(&m) {
        return Ok(m.to_string());
    }
    let upper = m.to_ascii_uppercase();
    let help = if METHODS.contains(&upper.as_str()) {
        format!("methods are written in upper case: `{upper}`")
    } else {
        match closest(&upper, &METHODS) {
            Some(s) => format!("did you mean `{s}`?"),
            None => format!("use one of {} or `*` for any", METHODS.join(", ")),
        }
    };
    Err(Box::new(
        Diagnostic::error(
            "bad_method",
            method.span,
            format!("unknown HTTP method `{m}`"),
        )
        .help(help),
    ))
}
