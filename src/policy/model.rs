//! The compiled policy: immutable, validated, every amount in integer atomic units.
//!
//! This is what the rest of tollgate consumes. Nothing here refers back to syntax except the
//! source line of each route (for `explain` and logs). A reload builds a new [`Policy`] and
//! swaps it whole; a `Policy` never changes after `policy::compile` returns it.

use alloy::primitives::Address;

use super::routes::{PathPattern, RouteId, RouteMatcher};
pub use crate::config::SecretRef;
use crate::networks::{Asset, Network};

#[derive(Debug, Clone)]
pub struct Policy {
    pub service: String,
    /// The file it came from, as given to `tollgate`.
    pub origin: String,
    /// First 16 hex digits of the SHA-256 of the source text: the policy's version.
    pub version: String,
    /// Receives every x402 payment. `None` only when no route takes x402.
    pub pay_to: Option<Address>,
    /// Networks offered to x402 buyers, in the order the policy lists them.
    pub networks: Vec<Network>,
    pub prepaid: Option<Prepaid>,
    pub settlement: Settlement,
    pub default: DefaultAction,
    pub routes: Vec<Route>,
    pub(crate) matcher: RouteMatcher,
}

/// Prepaid credits: where the API key travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepaid {
    /// Lower-case header name, `x-api-key` unless the policy says otherwise.
    pub header: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub backend: Backend,
    /// The service-wide timing; routes may override it.
    pub timing: Timing,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// No x402 on this service, so nothing to settle.
    None,
    /// An x402 facilitator (`/verify`, `/settle`, `/supported`).
    Facilitator { url: String },
    /// Direct `transferWithAuthorization` through a JSON-RPC node, gas paid by a relayer key.
    Rpc { url: String, relayer: SecretRef },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Timing {
    /// Settle, then forward.
    BeforeResponse,
    /// Forward, buffer, settle only when the upstream answered below 400 (the x402 reference).
    AfterResponse,
    /// Admit after local verification and a durable ledger write; settle later in bundles.
    Deferred(Bundle),
}

/// When a deferred bundle closes: whichever comes first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bundle {
    pub every_secs: Option<u64>,
    pub payments: Option<u64>,
    pub value: Option<Quantity>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultAction {
    /// Unmatched requests get 403.
    Deny,
    /// Unmatched requests go to the upstream, free.
    Pass,
}

/// The rail a request pays on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rail {
    Prepaid,
    X402,
}

impl Rail {
    pub fn as_str(self) -> &'static str {
        match self {
            Rail::Prepaid => "prepaid",
            Rail::X402 => "x402",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Route {
    pub id: RouteId,
    /// `None` matches any method (`*`).
    pub method: Option<String>,
    pub pattern: PathPattern,
    /// 1-based line of the `route` keyword in the policy file.
    pub line: usize,
    pub action: Action,
    pub description: String,
    pub mime: String,
    /// `maxTimeoutSeconds` offered to x402 buyers.
    pub timeout_secs: u64,
    /// Which rail wins when a request carries both an API key and an x402 payment.
    pub prefer: Rail,
    pub refund_on_5xx: bool,
    /// `sells N credits`: a paid call credits the caller's prepaid account (tollgate answers
    /// it; the upstream never sees it).
    pub sells: Option<u128>,
    /// `upgrade websocket, h2c`: the protocols a request on this route may switch to with
    /// `Upgrade` (answered `101 Switching Protocols`), lower case, in policy order, each once.
    /// Empty (the default): upgrades are not allowed on this route. On a paid route the price
    /// pays for the whole upgraded connection (priced per connection, not per message).
    pub upgrade: Vec<String>,
    pub settle: Timing,
    /// Service limits with this route's overrides applied.
    pub limits: Limits,
    /// Service payer lists with this route's overrides applied.
    pub payers: PayerRules,
}

impl Route {
    /// `GET /v1/forecast/{city}` or `* /internal/**`.
    pub fn display(&self) -> String {
        format!("{} {}", self.method.as_deref().unwrap_or("*"), self.pattern)
    }

    pub fn price(&self) -> Option<&Price> {
        match &self.action {
            Action::Charge(price) => Some(price),
            Action::Free | Action::Deny => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Free,
    Deny,
    Charge(Price),
}

/// What a paid route costs on each rail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Price {
    /// One x402 offer per accepted network that carries the priced asset, in policy order.
    pub offers: Vec<Offer>,
    /// Credits debited from a prepaid key, when the route takes prepaid.
    pub credits: Option<u128>,
}

/// One x402 `accepts` entry in the making.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// Index into `Policy::networks`.
    pub network: usize,
    pub asset: Asset,
    /// Atomic units of `asset`.
    pub amount: u128,
}

/// An amount of credits or of one asset (by symbol), in atomic units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quantity {
    pub unit: Unit,
    pub atomic: u128,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Unit {
    Credits,
    /// An asset symbol with its decimals (identical on every network that carries it).
    Asset {
        symbol: String,
        decimals: u8,
    },
}

impl std::fmt::Display for Quantity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.unit {
            Unit::Credits if self.atomic == 1 => f.write_str("1 credit"),
            Unit::Credits => write!(f, "{} credits", self.atomic),
            Unit::Asset { symbol, decimals } => {
                write!(
                    f,
                    "{} {symbol}",
                    crate::money::format_atomic(self.atomic, *decimals)
                )
            }
        }
    }
}

/// Buyer limits that apply to one route.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Limits {
    pub requests: Option<RequestLimit>,
    /// At most one per unit.
    pub spend: Vec<SpendLimit>,
    /// Maximum value not yet settled, at most one per asset.
    pub unsettled: Vec<Quantity>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimit {
    pub count: u64,
    pub window_secs: u64,
    pub scope: LimitScope,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendLimit {
    pub max: Quantity,
    pub window_secs: u64,
    pub scope: LimitScope,
}

/// What a limit counts: a buyer's calls to every route that inherits the service's limit, or
/// to the one route that set its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitScope {
    Service,
    Route,
}

/// Allow and deny lists of payer addresses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PayerRules {
    /// When set, only these payers may pay.
    pub allow: Option<Vec<Address>>,
    pub deny: Vec<Address>,
}

impl PayerRules {
    pub fn admits(&self, payer: &Address) -> bool {
        !self.deny.contains(payer)
            && self
                .allow
                .as_ref()
                .is_none_or(|allow| allow.contains(payer))
    }
}

impl Policy {
    pub fn route(&self, id: RouteId) -> Option<&Route> {
        self.routes.get(id)
    }
}

/// A window in words: `per minute`, `per 10 minutes`.
pub fn window_text(secs: u64) -> String {
    for (unit, size) in [
        ("day", 86_400),
        ("hour", 3_600),
        ("minute", 60),
        ("second", 1),
    ] {
        if secs.is_multiple_of(size) {
            let n = secs / size;
            return if n == 1 {
                format!("per {unit}")
            } else {
                format!("per {n} {unit}s")
            };
        }
    }
    format!("per {secs} seconds")
}
