//! The decision: what one request gets, as a pure function of (policy, request facts, buyer).
//!
//! No I/O, no clock, no allocation beyond splitting the path. The caller gathers the facts
//! (which headers are present, the payer once a payment is verified, the key's balance) and
//! acts on the [`Outcome`]: forward, refuse, challenge with 402, debit a key, or verify the
//! attached x402 payment against the route's offers.
//!
//! Rail choice on a paid route, in order:
//! 1. A request with both an API key (on a route priced in credits) and an x402 payment uses
//!    the route's `prefer` rail (prepaid unless the route says `prefer x402`); a key whose
//!    balance is short falls through to the payment.
//! 2. A key alone is debited; when its balance is short the answer is a 402 with the
//!    `credits_exhausted` hint (offering x402 when the route has an x402 price).
//! 3. A payment alone is verified. Payer allow/deny lists apply once the payer is known.
//! 4. Neither: a 402 challenge.

use alloy::primitives::Address;

use super::model::{Action, DefaultAction, Policy, Price, Rail, Route};
use super::routes::{Malformed, check_method, split_path};

/// What the caller knows about the request before any payment is verified.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// Path with optional query, `/v1/forecast/paris?days=3`, or `*` (`OPTIONS *`): the
    /// canonical target from [`crate::target::parse`], which is also what the upstream gets.
    pub target: &'a str,
    /// The policy's prepaid header is present.
    pub api_key: bool,
    /// An x402 payment header is present.
    pub payment: Option<PaymentHeader>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentHeader {
    /// `X-PAYMENT`.
    V1,
    /// `PAYMENT-SIGNATURE`.
    V2,
}

/// What the caller knows about the buyer, when it knows it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Buyer {
    /// The verified payer of an x402 payment.
    pub payer: Option<Address>,
    /// The balance, in credits, of the account behind the API key.
    pub prepaid_balance: Option<u128>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Forward: the route is free.
    Free,
    /// Forward: no route matched and the policy's default is `pass`.
    Pass,
    /// 403.
    Deny,
    /// 400: the path cannot be matched safely.
    BadRequest(Malformed),
    /// 402 with the route's offers.
    Challenge { hint: Option<Hint> },
    /// Debit this many credits from the key's account, then forward.
    Prepaid { credits: u128 },
    /// Verify the attached payment against the route's offers, then forward.
    X402,
}

impl Outcome {
    /// The outcome's name, as `explain`, policy tests and logs spell it.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Free => "free",
            Outcome::Pass => "pass",
            Outcome::Deny => "deny",
            Outcome::BadRequest(_) => "bad_request",
            Outcome::Challenge { .. } => "challenge",
            Outcome::Prepaid { .. } => "prepaid",
            Outcome::X402 => "x402",
        }
    }

    pub const NAMES: [&'static str; 7] = [
        "free",
        "pass",
        "deny",
        "bad_request",
        "challenge",
        "prepaid",
        "x402",
    ];
}

/// Extra advice carried by a 402.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    /// The key's balance does not cover the price.
    CreditsExhausted,
}

/// The rule that produced an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    Malformed,
    NoRoute(DefaultAction),
    RouteFree,
    RouteDenied,
    PayerDenied,
    PayerNotAllowed,
    KeyDebited,
    KeyPreferred,
    KeyShortPaymentUsed,
    KeyShort,
    PaymentAttached,
    PaymentPreferred,
    KeyNotAccepted,
    PaymentNotAccepted,
    NoCredentials,
}

#[derive(Debug, Clone)]
pub struct Decision<'p> {
    pub route: Option<&'p Route>,
    pub outcome: Outcome,
    pub why: Why,
}

/// Decides what a request gets.
pub fn decide<'p>(policy: &'p Policy, request: &Request<'_>, buyer: &Buyer) -> Decision<'p> {
    let malformed = |e| Decision {
        route: None,
        outcome: Outcome::BadRequest(e),
        why: Why::Malformed,
    };
    if let Err(e) = check_method(request.method) {
        return malformed(e);
    }
    // `OPTIONS *` names the server, not a path: no route matches it.
    let found = if request.target == "*" {
        if request.method == "OPTIONS" {
            Ok(None)
        } else {
            Err(Malformed::Asterisk)
        }
    } else {
        split_path(request.target)
            .and_then(|segments| policy.matcher.find(request.method, &segments))
    };
    let id = match found {
        Ok(id) => id,
        Err(e) => return malformed(e),
    };
    let Some(route) = id.and_then(|id| policy.route(id)) else {
        let outcome = match policy.default {
            DefaultAction::Deny => Outcome::Deny,
            DefaultAction::Pass => Outcome::Pass,
        };
        return Decision {
            route: None,
            outcome,
            why: Why::NoRoute(policy.default),
        };
    };
    let (outcome, why) = match &route.action {
        Action::Free => (Outcome::Free, Why::RouteFree),
        Action::Deny => (Outcome::Deny, Why::RouteDenied),
        Action::Charge(price) => charge(route, price, request, buyer),
    };
    Decision {
        route: Some(route),
        outcome,
        why,
    }
}

fn charge(route: &Route, price: &Price, request: &Request<'_>, buyer: &Buyer) -> (Outcome, Why) {
    let key = request.api_key && price.credits.is_some();
    let payment = request.payment.is_some() && !price.offers.is_empty();
    let credits = price.credits.unwrap_or(0);
    let short = buyer
        .prepaid_balance
        .is_some_and(|balance| balance < credits);

    if key && !(payment && route.prefer == Rail::X402) && !short {
        let why = if payment {
            Why::KeyPreferred
        } else {
            Why::KeyDebited
        };
        return (Outcome::Prepaid { credits }, why);
    }
    if payment {
        let why = match (key, route.prefer, short) {
            (false, ..) => Why::PaymentAttached,
            (true, Rail::X402, _) => Why::PaymentPreferred,
            (true, Rail::Prepaid, _) => Why::KeyShortPaymentUsed,
        };
        return match buyer.payer {
            Some(payer) if route.payers.deny.contains(&payer) => (Outcome::Deny, Why::PayerDenied),
            Some(payer) if !route.payers.admits(&payer) => (Outcome::Deny, Why::PayerNotAllowed),
            _ => (Outcome::X402, why),
        };
    }
    if key {
        return (
            Outcome::Challenge {
                hint: Some(Hint::CreditsExhausted),
            },
            Why::KeyShort,
        );
    }
    let why = if request.api_key {
        Why::KeyNotAccepted
    } else if request.payment.is_some() {
        Why::PaymentNotAccepted
    } else {
        Why::NoCredentials
    };
    (Outcome::Challenge { hint: None }, why)
}

impl Why {
    /// One sentence for `explain` and policy-test failures.
    pub fn describe(self, route: Option<&Route>, policy: &Policy) -> String {
        let header = policy
            .prepaid
            .as_ref()
            .map_or("the API key header", |p| p.header.as_str());
        let offers = route
            .and_then(Route::price)
            .is_some_and(|p| !p.offers.is_empty());
        match self {
            Why::Malformed => {
                "the request is malformed, so it cannot be matched to a route safely".into()
            }
            Why::NoRoute(DefaultAction::Deny) => {
                "no route matches and the policy says `default deny`".into()
            }
            Why::NoRoute(DefaultAction::Pass) => {
                "no route matches and the policy says `default pass`".into()
            }
            Why::RouteFree => "the route is free".into(),
            Why::RouteDenied => "the route is denied".into(),
            Why::PayerDenied => "the payer is on a deny list".into(),
            Why::PayerNotAllowed => "the payer is not on the allow list".into(),
            Why::KeyDebited => {
                format!("an API key is in `{header}` and the route has a price in credits")
            }
            Why::KeyPreferred => {
                "both an API key and a payment came; the route prefers prepaid".into()
            }
            Why::KeyShortPaymentUsed => {
                "the key's balance is short, so the attached x402 payment is used".into()
            }
            Why::KeyShort if offers => {
                "the key's balance is short; the 402 offers x402 instead (hint: credits_exhausted)"
                    .into()
            }
            Why::KeyShort => "the key's balance is short and the route takes only credits".into(),
            Why::PaymentAttached => "an x402 payment is attached".into(),
            Why::PaymentPreferred => {
                "both an API key and a payment came; the route says `prefer x402`".into()
            }
            Why::KeyNotAccepted => "an API key came, but this route has no price in credits".into(),
            Why::PaymentNotAccepted => {
                "an x402 payment came, but this route is paid only with credits".into()
            }
            Why::NoCredentials if offers => {
                "no API key and no payment: the 402 tells the buyer how to pay".into()
            }
            Why::NoCredentials => {
                format!("no API key: this route is paid with credits, sent in `{header}`")
            }
        }
    }
}
