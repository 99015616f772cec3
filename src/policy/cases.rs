//! Policy test cases: `test "…" { request …  expect … }` blocks, run by `tollgate test`.
//!
//! A case states a request (method, target, headers, the payer, the key's balance) and the
//! decision the operator expects: an outcome name (`free`, `pass`, `deny`, `bad_request`,
//! `challenge`, `prepaid`, `x402`), optionally with a price (`expect prepaid 1 credit`,
//! `expect challenge 0.001 USDC`). Cases live in the policy file or in a side file named
//! `<policy>.test.toll` next to it. Running a case is pure: it calls `policy::decide`.

use alloy::primitives::Address;

use super::ast::{self, PolicyFile, TestClause, Text};
use super::decide::{Buyer, Decision, Outcome, PaymentHeader, Request, decide};
use super::diag::Diagnostic;
use super::model::{Policy, Unit};
use super::source::{Source, Span};
use super::syntax::closest;
use crate::money::parse_decimal;

/// One test case, checked for shape but not yet run.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    /// `file:line` of the `test` keyword.
    pub origin: String,
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub payer: Option<Address>,
    pub balance: Option<ast::Money>,
    pub expects: Vec<Expect>,
}

#[derive(Debug, Clone)]
pub struct Expect {
    pub outcome: String,
    pub price: Option<ast::Money>,
}

/// Why a case failed: what it expected and what the policy decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub expected: String,
    pub actual: String,
    pub why: String,
}

/// The test blocks of a file, with diagnostics for malformed ones.
pub fn collect(file: &PolicyFile, source: &Source) -> (Vec<Case>, Vec<Diagnostic>) {
    let mut cases = Vec::new();
    let mut diagnostics = Vec::new();
    for item in &file.items {
        let ast::Item::Test(test) = &item.node else {
            continue;
        };
        let origin = format!("{}:{}", source.name, source.line_col(item.span.start).0);
        let mut case = Case {
            name: test.name.node.clone(),
            origin,
            method: String::new(),
            target: String::new(),
            headers: Vec::new(),
            payer: None,
            balance: None,
            expects: Vec::new(),
        };
        let mut request_at: Option<Span> = None;
        for clause in &test.clauses {
            match &clause.node {
                TestClause::Request { method, target } => {
                    if let Some(first) = request_at {
                        diagnostics.push(
                            Diagnostic::error("duplicate_clause", clause.span, "`request` is given twice")
                                .related(first, "first one here")
                                .help("a test case sends one request; write another `test` for another request"),
                        );
                    }
                    request_at = Some(clause.span);
                    if let Err(d) = super::compile::check_method(method) {
                        diagnostics.push(*d);
                    }
                    if !target.node.starts_with('/') {
                        diagnostics.push(
                            Diagnostic::error(
                                "bad_target",
                                target.span,
                                "a test request goes to a path starting with `/`",
                            )
                            .help("e.g. `request GET \"/v1/forecast/paris?days=3\"`"),
                        );
                    }
                    case.method = method.node.clone();
                    case.target = target.node.clone();
                }
                TestClause::Header { name, value } => case
                    .headers
                    .push((name.node.to_ascii_lowercase(), value.node.clone())),
                TestClause::Payer(a) => match super::compile::check_address(a) {
                    Ok(address) => case.payer = Some(address),
                    Err(d) => diagnostics.push(*d),
                },
                TestClause::Balance(m) => {
                    if !super::compile::is_credits(&m.unit.node) {
                        diagnostics.push(
                            Diagnostic::error(
                                "bad_balance",
                                m.unit.span,
                                "a key's balance is counted in credits",
                            )
                            .help(format!("write `balance {} credits`", m.amount.node)),
                        );
                    }
                    case.balance = Some(m.clone());
                }
                TestClause::Expect { outcome, price } => {
                    if !Outcome::NAMES.contains(&outcome.node.as_str()) {
                        diagnostics.push(unknown_outcome(outcome));
                    }
                    case.expects.push(Expect {
                        outcome: outcome.node.clone(),
                        price: price.clone(),
                    });
                }
            }
        }
        if request_at.is_none() {
            diagnostics.push(
                Diagnostic::error(
                    "test_without_request",
                    test.name.span,
                    "this test sends no request",
                )
                .help("add `request GET \"/path\"`"),
            );
        }
        if case.expects.is_empty() {
            diagnostics.push(
                Diagnostic::error(
                    "test_without_expect",
                    test.name.span,
                    "this test expects nothing",
                )
                .help("add `expect <outcome>`, e.g. `expect challenge 0.001 USDC`"),
            );
        }
        cases.push(case);
    }
    (cases, diagnostics)
}

fn unknown_outcome(outcome: &Text) -> Diagnostic {
    let help = match closest(&outcome.node, &Outcome::NAMES) {
        Some(s) => format!("did you mean `{s}`?"),
        None => format!("expected one of: {}", Outcome::NAMES.join(", ")),
    };
    Diagnostic::error(
        "unknown_outcome",
        outcome.span,
        format!("unknown outcome `{}`", outcome.node),
    )
    .help(help)
}

impl Case {
    /// The request facts this case describes, for `policy`.
    pub fn request<'a>(&'a self, policy: &Policy) -> Request<'a> {
        let header = |name: &str| self.headers.iter().any(|(n, _)| n == name);
        let key_header = policy.prepaid.as_ref().map(|p| p.header.as_str());
        let payment = if header("payment-signature") {
            Some(PaymentHeader::V2)
        } else if header("x-payment") {
            Some(PaymentHeader::V1)
        } else {
            None
        };
        Request {
            method: &self.method,
            target: &self.target,
            api_key: key_header.is_some_and(header),
            payment,
        }
    }

    /// Runs the case against a compiled policy.
    pub fn run(&self, policy: &Policy) -> Result<(), Failure> {
        let balance = match &self.balance {
            None => None,
            Some(m) => Some(parse_decimal(&m.amount.node, 0).map_err(|e| Failure {
                expected: format!("balance {} {}", m.amount.node, m.unit.node),
                actual: format!("a balance in whole credits ({e})"),
                why: "balances are given in credits".into(),
            })?),
        };
        let buyer = Buyer {
            payer: self.payer,
            prepaid_balance: balance,
        };
        let decision = decide(policy, &self.request(policy), &buyer);
        for expect in &self.expects {
            let outcome_ok = expect.outcome == decision.outcome.name();
            let price_ok = match &expect.price {
                None => true,
                Some(m) => price_matches(&decision, m),
            };
            if !(outcome_ok && price_ok) {
                return Err(Failure {
                    expected: match &expect.price {
                        None => expect.outcome.clone(),
                        Some(m) => format!("{} {} {}", expect.outcome, m.amount.node, m.unit.node),
                    },
                    actual: describe(&decision, policy),
                    why: decision.why.describe(decision.route, policy),
                });
            }
        }
        Ok(())
    }
}

/// Whether the decision's price on the matching rail equals the expected amount.
fn price_matches(decision: &Decision<'_>, expected: &ast::Money) -> bool {
    let Some(price) = decision.route.and_then(|r| r.price()) else {
        return false;
    };
    let unit = expected.unit.node.as_str();
    if super::compile::is_credits(unit) {
        let credits = match decision.outcome {
            Outcome::Prepaid { credits } => Some(credits),
            _ => price.credits,
        };
        return parse_decimal(&expected.amount.node, 0).ok() == credits && credits.is_some();
    }
    let offers: Vec<_> = price
        .offers
        .iter()
        .filter(|o| o.asset.symbol == unit)
        .collect();
    !offers.is_empty()
        && offers
            .iter()
            .all(|o| parse_decimal(&expected.amount.node, o.asset.decimals).ok() == Some(o.amount))
}

/// `prepaid 1 credit (route GET /v1/forecast/{city})`.
pub fn describe(decision: &Decision<'_>, policy: &Policy) -> String {
    let mut out = decision.outcome.name().to_string();
    let price = decision.route.and_then(|r| r.price());
    match (&decision.outcome, price) {
        (Outcome::Prepaid { credits }, _) => out.push_str(&format!(
            " {}",
            super::model::Quantity {
                unit: Unit::Credits,
                atomic: *credits
            }
        )),
        (Outcome::Challenge { .. } | Outcome::X402, Some(p)) => {
            let mut terms: Vec<String> = Vec::new();
            for o in &p.offers {
                let term = format!(
                    "{} {}",
                    crate::money::format_atomic(o.amount, o.asset.decimals),
                    o.asset.symbol
                );
                if !terms.contains(&term) {
                    terms.push(term);
                }
            }
            if let (Some(c), Outcome::Challenge { .. }) = (p.credits, &decision.outcome) {
                terms.push(
                    super::model::Quantity {
                        unit: Unit::Credits,
                        atomic: c,
                    }
                    .to_string(),
                );
            }
            if !terms.is_empty() {
                out.push_str(&format!(" {}", terms.join(" or ")));
            }
        }
        _ => {}
    }
    match decision.route {
        Some(r) => out.push_str(&format!(
            " (route {}, {}:{})",
            r.display(),
            policy.origin,
            r.line
        )),
        None => out.push_str(" (no route matched)"),
    }
    out
}
