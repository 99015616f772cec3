//! Typed syntax tree of a policy file: what the operator wrote, with spans, no meaning yet.
//!
//! Numbers, addresses and durations stay as the text that was written (the formatter prints
//! them back verbatim); `policy::compile` gives them meaning. Strings are unescaped. Lines that
//! did not parse are not in the tree: they became diagnostics in `policy::syntax`.

use super::source::Spanned;

pub type Text = Spanned<String>;

/// A whole `.toll` file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyFile {
    pub items: Vec<Spanned<Item>>,
    /// Every `#` comment in source order (text after the `#`), kept for the formatter.
    pub comments: Vec<Text>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Network(NetworkDecl),
    Service(ServiceDecl),
    Test(TestDecl),
}

/// `network devnet { chain 31337  asset USDC at 0x… name "USDC" version "2" decimals 6 }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkDecl {
    pub name: Text,
    pub clauses: Vec<Spanned<NetworkClause>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkClause {
    Chain(Text),
    Asset(AssetDecl),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetDecl {
    pub symbol: Text,
    pub address: Text,
    pub options: Vec<Spanned<AssetOption>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssetOption {
    /// EIP-712 domain name.
    Name(Text),
    /// EIP-712 domain version.
    Version(Text),
    Decimals(Text),
}

/// `service "weather" { … }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceDecl {
    pub name: Text,
    pub clauses: Vec<Spanned<ServiceClause>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceClause {
    PayTo(Text),
    AcceptX402(Vec<Text>),
    AcceptPrepaid { header: Option<Text> },
    Settle(Settle),
    Timeout(Text),
    Limit(Limit),
    Payers(Payers),
    Default(Text),
    Route(RouteDecl),
}

/// `settle [via facilitator "URL" | via rpc "URL" relayer KEY] [TIMING]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settle {
    pub backend: Option<Spanned<Backend>>,
    pub timing: Option<Spanned<Timing>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Facilitator(Text),
    Rpc { url: Text, relayer: Spanned<KeyRef> },
}

/// Where a secret comes from. `Inline` is parsed only to be refused with a clear error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRef {
    Env(String),
    Path(String),
    Inline(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Timing {
    BeforeResponse,
    AfterResponse,
    Deferred(Vec<Spanned<Trigger>>),
}

/// What closes a settlement bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    Every(String),
    Payments(String),
    Value(Money),
}

/// `0.001 USDC`, `1 credit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Money {
    pub amount: Text,
    pub unit: Text,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Limit {
    /// `limit buyer unsettled 1 USDC`.
    Unsettled(Money),
    /// `limit buyer 60 requests per minute`, `limit buyer 5 USDC per day`.
    Rate {
        quantity: Spanned<Quantity>,
        window: Option<Spanned<Window>>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Quantity {
    Requests(String),
    Spend(Money),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Window {
    /// `per 30s`.
    Duration(String),
    /// `per minute`, `per 10 minutes`.
    Units { count: Option<String>, unit: String },
}

/// `allow payers 0x…, 0x…` or `deny payers 0x…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payers {
    pub allow: bool,
    pub addresses: Vec<Text>,
}

/// `route GET "/v1/forecast/{city}" { … }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteDecl {
    pub method: Text,
    pub path: Text,
    pub clauses: Vec<Spanned<RouteClause>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteClause {
    Free,
    Deny,
    Price(Vec<Money>),
    Prefer(Text),
    RefundOn(Text),
    /// `sells 1000 credits`.
    Sells(Money),
    Description(Text),
    Mime(Text),
    Timeout(Text),
    Limit(Limit),
    Payers(Payers),
    Settle(Settle),
    /// `upgrade websocket, h2c`: protocols as written, checked by `policy::compile`.
    Upgrade(Vec<Text>),
}

/// `test "name" { request … expect … }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestDecl {
    pub name: Text,
    pub clauses: Vec<Spanned<TestClause>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TestClause {
    Request { method: Text, target: Text },
    Header { name: Text, value: Text },
    Payer(Text),
    Balance(Money),
    Expect { outcome: Text, price: Option<Money> },
}
