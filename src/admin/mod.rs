//! Account administration: the operations behind the admin API and `tollgate accounts|keys|
//! credits`, independent of how they arrive.
//!
//! An [`Op`] is parsed from an HTTP request ([`Op::from_http`]) or built by the CLI, and
//! [`apply`] runs it against the store. The CLI either applies it directly (no sidecar holds
//! the store) or sends it to a running sidecar's admin API ([`Op::to_http`] is the exact
//! inverse of [`Op::from_http`]), so both paths answer the same [`Reply`].
//!
//! [`service`] serves the API (bearer token, loopback by default); [`token`] owns the token.
//!
//! Endpoints (JSON; amounts are decimal strings):
//!
//! | method | path | does |
//! |---|---|---|
//! | `POST` | `/v1/accounts` `{"name"}` | open an account |
//! | `GET` | `/v1/accounts?after=&limit=` | list accounts with balances |
//! | `GET` | `/v1/accounts/{id}` | one account and its balance |
//! | `POST` | `/v1/accounts/{id}/keys` `{"label", "expires_in_secs"}` | issue a key (shown once) |
//! | `GET` | `/v1/accounts/{id}/keys` | the account's keys (ids, never the keys) |
//! | `DELETE` | `/v1/keys/{key_id}` | revoke a key |
//! | `POST` | `/v1/accounts/{id}/topups` `{"credits", "reference"}` | credit, once per reference |
//! | `GET` | `/v1/accounts/{id}/usage?after=&limit=` | the account's ledger facts, paged |
//! | `GET` | `/v1/audit` | check top-ups − debits + refunds == balance for every account |
//! | `GET` | `/v1/ledger?from=&to=&buyer=&route=&state=&bundle=&after=&limit=` | payment entries with their status, paged (`next_after`) |
//! | `GET` | `/v1/ledger/{seq}` | one entry, its status and its facts (its whole history) |
//! | `GET` | `/v1/ledger/verify` | check every ledger invariant; `500` with the breaks when one fails |
//! | `GET` | `/v1/ledger/export?from=&to=&format=csv\|json&…` | the reconciliation export, streamed |
//! | `POST` | `/v1/ledger/export?…&currency=EUR` body: rate table CSV | the same with fiat columns |
//! | `GET` | `/v1/bundles?after=&limit=` | settlement bundles, paged |
//! | `GET` | `/v1/bundles/{id}` | one bundle: its entries, count, total, states |
//!
//! Ledger filters: `from` (inclusive) and `to` (exclusive) are RFC 3339 or Unix seconds;
//! `buyer` is the payer address, `route` the route as the policy names it
//! (`GET /v1/forecast/{city}`, percent-encoded), `state` one of `recorded`, `queued`,
//! `submitted`, `confirmed`, `failed`, `refunded`, `unresolved`. The export is not an [`Op`]
//! (its answer is CSV or JSON streamed as it is read, not one JSON value): see [`Export`].

pub mod service;
pub mod token;

use serde::Deserialize;
use serde_json::{Value, json};

use alloy::primitives::Address;
use percent_encoding::{NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

use crate::ledger::export::Format;
use crate::ledger::rates::{self, RateTable};
use crate::ledger::time::parse_instant;
use crate::money::format_atomic;
use crate::store::accounts::{AccountId, MAX_REFERENCE_LEN, TopUp, TopUpRefused};
use crate::store::ledger::{Query, State};
use crate::store::{Store, StoreError};

/// Largest page a listing returns.
pub const MAX_PAGE: usize = 1_000;
/// Page size when none is asked for.
pub const DEFAULT_PAGE: usize = 100;

/// One administrative operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    CreateAccount {
        name: String,
    },
    ListAccounts {
        after: AccountId,
        limit: usize,
    },
    ShowAccount {
        account: AccountId,
    },
    IssueKey {
        account: AccountId,
        label: String,
        expires_in_secs: Option<u64>,
    },
    ListKeys {
        account: AccountId,
    },
    RevokeKey {
        key: String,
    },
    TopUp {
        account: AccountId,
        credits: u128,
        reference: String,
    },
    Usage {
        account: AccountId,
        after: u64,
        limit: usize,
    },
    Audit,
    /// Payment entries matching `query` (its `after` pages), at most `limit`.
    Payments {
        query: Query,
        limit: usize,
    },
    Payment {
        seq: u64,
    },
    Verify,
    Bundles {
        after: u64,
        limit: usize,
    },
    Bundle {
        id: u64,
    },
}

/// An answer: an HTTP status and a JSON body (`{error, message}` when it is an error).
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    fn ok(status: u16, body: Value) -> Reply {
        Reply { status, body }
    }

    pub fn error(status: u16, code: &str, message: impl Into<String>) -> Reply {
        Reply {
            status,
            body: json!({ "error": code, "message": message.into() }),
        }
    }

    fn store(e: &StoreError) -> Reply {
        tracing::error!(error = %e, "admin operation failed in the store");
        Reply::error(
            503,
            "store_unavailable",
            "the store could not complete the operation; retry later",
        )
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAccount {
    #[serde(default)]
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    #[serde(default)]
    label: String,
    expires_in_secs: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTopUp {
    #[serde(with = "crate::money::as_string")]
    credits: u128,
    reference: String,
}

impl Op {
    /// Parses a request to the admin API. `Err` is the reply for a request that names no
    /// operation or carries a bad body.
    pub fn from_http(method: &str, path: &str, query: &str, body: &[u8]) -> Result<Op, Reply> {
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        let not_found = || Reply::error(404, "not_found", format!("no admin endpoint {path}"));
        let account = |text: &str| {
            text.parse::<AccountId>().map_err(|_| {
                Reply::error(
                    404,
                    "account_not_found",
                    format!("`{text}` is not an account id"),
                )
            })
        };
        let number = |what: &str, code: &str, text: &str| {
            text.parse::<u64>()
                .map_err(|_| Reply::error(404, code, format!("`{text}` is not a {what}")))
        };
        match (method, segments.as_slice()) {
            ("GET", ["v1", "ledger"]) => {
                let (query, limit) = ledger_query(query, true)?;
                return Ok(Op::Payments { query, limit });
            }
            ("GET", ["v1", "ledger", "verify"]) => return Ok(Op::Verify),
            ("GET", ["v1", "ledger", seq]) if *seq != "export" => {
                return Ok(Op::Payment {
                    seq: number("ledger sequence number", "payment_not_found", seq)?,
                });
            }
            ("GET", ["v1", "bundles", id]) => {
                return Ok(Op::Bundle {
                    id: number("bundle id", "bundle_not_found", id)?,
                });
            }
            (_, ["v1", "ledger"] | ["v1", "ledger", _] | ["v1", "bundles", _]) => {
                return Err(Reply::error(
                    405,
                    "method_not_allowed",
                    format!("{method} is not allowed on {path}"),
                ));
            }
            _ => {}
        }
        let (after, limit) = paging(query)?;
        let op = match (method, segments.as_slice()) {
            ("GET", ["v1", "bundles"]) => Op::Bundles { after, limit },
            ("POST", ["v1", "accounts"]) => {
                let new: NewAccount = body_json(body)?;
                Op::CreateAccount { name: new.name }
            }
            ("GET", ["v1", "accounts"]) => Op::ListAccounts { after, limit },
            ("GET", ["v1", "accounts", id]) => Op::ShowAccount {
                account: account(id)?,
            },
            ("POST", ["v1", "accounts", id, "keys"]) => {
                let new: NewKey = body_json(body)?;
                Op::IssueKey {
                    account: account(id)?,
                    label: new.label,
                    expires_in_secs: new.expires_in_secs,
                }
            }
            ("GET", ["v1", "accounts", id, "keys"]) => Op::ListKeys {
                account: account(id)?,
            },
            ("DELETE", ["v1", "keys", key]) => Op::RevokeKey {
                key: (*key).to_string(),
            },
            ("POST", ["v1", "accounts", id, "topups"]) => {
                let new: NewTopUp = body_json(body)?;
                Op::TopUp {
                    account: account(id)?,
                    credits: new.credits,
                    reference: new.reference,
                }
            }
            ("GET", ["v1", "accounts", id, "usage"]) => Op::Usage {
                account: account(id)?,
                after,
                limit,
            },
            ("GET", ["v1", "audit"]) => Op::Audit,
            (_, ["v1", "accounts"] | ["v1", "accounts", _, "keys" | "topups" | "usage"])
            | (_, ["v1", "accounts", _] | ["v1", "keys", _] | ["v1", "audit"])
            | (_, ["v1", "bundles"]) => {
                return Err(Reply::error(
                    405,
                    "method_not_allowed",
                    format!("{method} is not allowed on {path}"),
                ));
            }
            _ => return Err(not_found()),
        };
        Ok(op)
    }

    /// The request that [`Op::from_http`] parses back into this operation: method, path with
    /// query, JSON body.
    pub fn to_http(&self) -> (&'static str, String, Option<Value>) {
        match self {
            Op::CreateAccount { name } => {
                ("POST", "/v1/accounts".into(), Some(json!({ "name": name })))
            }
            Op::ListAccounts { after, limit } => (
                "GET",
                format!("/v1/accounts?after={after}&limit={limit}"),
                None,
            ),
            Op::ShowAccount { account } => ("GET", format!("/v1/accounts/{account}"), None),
            Op::IssueKey {
                account,
                label,
                expires_in_secs,
            } => (
                "POST",
                format!("/v1/accounts/{account}/keys"),
                Some(json!({ "label": label, "expires_in_secs": expires_in_secs })),
            ),
            Op::ListKeys { account } => ("GET", format!("/v1/accounts/{account}/keys"), None),
            Op::RevokeKey { key } => ("DELETE", format!("/v1/keys/{key}"), None),
            Op::TopUp {
                account,
                credits,
                reference,
            } => (
                "POST",
                format!("/v1/accounts/{account}/topups"),
                Some(json!({ "credits": credits.to_string(), "reference": reference })),
            ),
            Op::Usage {
                account,
                after,
                limit,
            } => (
                "GET",
                format!("/v1/accounts/{account}/usage?after={after}&limit={limit}"),
                None,
            ),
            Op::Audit => ("GET", "/v1/audit".into(), None),
            Op::Payments { query, limit } => (
                "GET",
                format!("/v1/ledger?{}", query_string(query, Some(*limit))),
                None,
            ),
            Op::Payment { seq } => ("GET", format!("/v1/ledger/{seq}"), None),
            Op::Verify => ("GET", "/v1/ledger/verify".into(), None),
            Op::Bundles { after, limit } => (
                "GET",
                format!("/v1/bundles?after={after}&limit={limit}"),
                None,
            ),
            Op::Bundle { id } => ("GET", format!("/v1/bundles/{id}"), None),
        }
    }
}

/// A reconciliation export asked of the admin API: `GET /v1/ledger/export?…` without rates,
/// `POST` with the operator's rate table (CSV, as the file holds it) as the body for fiat
/// columns. The answer streams; [`crate::ledger::export`] writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// The entries to export (`after` is unused).
    pub query: Query,
    pub format: Format,
    /// The fiat currency, with a rate table: `EUR` unless another is named.
    pub currency: Option<String>,
    /// The rate table's text.
    pub rates: Option<String>,
}

impl Export {
    /// The path the export answers on.
    pub const PATH: &str = "/v1/ledger/export";

    /// Parses an export request; `Err` is the reply for a bad one (`400`, the rate table's
    /// mistake with its line, or the missing currency).
    pub fn from_http(method: &str, query: &str, body: &[u8]) -> Result<Export, Reply> {
        let bad = |message: String| Reply::error(400, "invalid_request", message);
        let mut format = Format::Csv;
        let mut currency = None;
        let mut rest = Vec::new();
        for (name, value) in pairs(query)? {
            match name.as_str() {
                "format" => {
                    format = Format::parse(&value).ok_or_else(|| {
                        bad(format!("`format` is `csv` or `json`, not `{value}`"))
                    })?;
                }
                "currency" => currency = Some(value),
                _ => rest.push((name, value)),
            }
        }
        let (query, _) = ledger_filter(rest, false)?;
        let rates = match method {
            "GET" => None,
            "POST" => Some(
                String::from_utf8(body.to_vec())
                    .map_err(|_| bad("the rate table is not UTF-8 text".into()))?,
            ),
            _ => {
                return Err(Reply::error(
                    405,
                    "method_not_allowed",
                    format!("{method} is not allowed on {}", Export::PATH),
                ));
            }
        };
        let export = Export {
            query,
            format,
            currency,
            rates,
        };
        if export.rates.is_none() && export.currency.is_some() {
            return Err(bad(
                "`currency` needs a rate table: POST it as the body (CSV: currency,rate,source,as_of)".into(),
            ));
        }
        export.rate_table("the request body")?;
        Ok(export)
    }

    /// The request [`Export::from_http`] parses back into this export.
    pub fn to_http(&self) -> (&'static str, String, Option<String>) {
        let mut target = format!(
            "{}?format={}&{}",
            Export::PATH,
            self.format.as_str(),
            query_string(&self.query, None)
        );
        if let Some(currency) = &self.currency {
            target.push_str(&format!("&currency={}", encode(currency)));
        }
        let target = target.trim_end_matches('&').replace("&&", "&");
        match &self.rates {
            Some(rates) => ("POST", target, Some(rates.clone())),
            None => ("GET", target, None),
        }
    }

    /// The rate to use, when a table was given; `origin` names the table in errors.
    pub fn rate_table(&self, origin: &str) -> Result<Option<rates::Rate>, Reply> {
        let Some(text) = &self.rates else {
            return Ok(None);
        };
        let unusable = |e: rates::RateError| Reply::error(400, "rate_table_invalid", e.to_string());
        let table = RateTable::parse(text, origin).map_err(unusable)?;
        let currency = self.currency.as_deref().unwrap_or(rates::DEFAULT_CURRENCY);
        table.get(currency).cloned().map(Some).map_err(unusable)
    }
}

fn encode(text: &str) -> String {
    utf8_percent_encode(text, NON_ALPHANUMERIC).to_string()
}

/// A query string's pairs, percent-decoded (`+` is a space).
fn pairs(query: &str) -> Result<Vec<(String, String)>, Reply> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                percent_decode_str(&s.replace('+', " "))
                    .decode_utf8()
                    .map(|c| c.into_owned())
                    .map_err(|_| {
                        Reply::error(
                            400,
                            "invalid_request",
                            format!("`{s}` is not percent-encoded UTF-8"),
                        )
                    })
            };
            Ok((decode(name)?, decode(value)?))
        })
        .collect()
}

/// A listing's filters and page from a query string.
fn ledger_query(query: &str, paged: bool) -> Result<(Query, usize), Reply> {
    ledger_filter(pairs(query)?, paged)
}

fn ledger_filter(pairs: Vec<(String, String)>, paged: bool) -> Result<(Query, usize), Reply> {
    let bad = |message: String| Reply::error(400, "invalid_request", message);
    let mut query = Query::default();
    let mut limit = DEFAULT_PAGE;
    for (name, value) in pairs {
        let whole = || {
            value
                .parse::<u64>()
                .map_err(|_| bad(format!("`{name}` must be a whole number, not `{value}`")))
        };
        match name.as_str() {
            "from" => {
                query.from = Some(parse_instant(&value).map_err(|e| bad(format!("`from`: {e}")))?)
            }
            "to" => query.to = Some(parse_instant(&value).map_err(|e| bad(format!("`to`: {e}")))?),
            "buyer" => {
                query.buyer = Some(value.parse::<Address>().map_err(|_| {
                    bad(format!(
                        "`buyer` is a payer address (0x and 40 hex digits), not `{value}`"
                    ))
                })?);
            }
            "route" => query.route = Some(value),
            "state" => {
                query.state = Some(State::parse(&value).ok_or_else(|| {
                    let states: Vec<&str> = State::ALL.iter().map(|s| s.as_str()).collect();
                    bad(format!(
                        "`state` is one of {}, not `{value}`",
                        states.join(", ")
                    ))
                })?);
            }
            "bundle" => query.bundle = Some(whole()?),
            "after" if paged => query.after = Some(whole()?),
            "limit" if paged => {
                limit = usize::try_from(whole()?)
                    .unwrap_or(MAX_PAGE)
                    .clamp(1, MAX_PAGE);
            }
            _ => {
                let known = if paged {
                    "`from`, `to`, `buyer`, `route`, `state`, `bundle`, `after`, `limit`"
                } else {
                    "`from`, `to`, `buyer`, `route`, `state`, `bundle`, `format`, `currency`"
                };
                return Err(bad(format!(
                    "unknown query parameter `{name}` (expected {known})"
                )));
            }
        }
    }
    Ok((query, limit))
}

/// The query string of a ledger filter (and page size); [`ledger_query`] reads it back.
fn query_string(query: &Query, limit: Option<usize>) -> String {
    let mut parts = Vec::new();
    if let Some(from) = query.from {
        parts.push(format!("from={from}"));
    }
    if let Some(to) = query.to {
        parts.push(format!("to={to}"));
    }
    if let Some(buyer) = query.buyer {
        parts.push(format!("buyer={buyer}"));
    }
    if let Some(route) = &query.route {
        parts.push(format!("route={}", encode(route)));
    }
    if let Some(state) = query.state {
        parts.push(format!("state={}", state.as_str()));
    }
    if let Some(bundle) = query.bundle {
        parts.push(format!("bundle={bundle}"));
    }
    if let Some(after) = query.after {
        parts.push(format!("after={after}"));
    }
    if let Some(limit) = limit {
        parts.push(format!("limit={limit}"));
    }
    parts.join("&")
}

fn body_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Reply> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| {
        Reply::error(
            400,
            "invalid_request",
            format!("the request body is not what this endpoint takes: {e}"),
        )
    })
}

/// `after` and `limit` from a query string.
fn paging(query: &str) -> Result<(u64, usize), Reply> {
    let mut after = 0;
    let mut limit = DEFAULT_PAGE;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let bad = || {
            Reply::error(
                400,
                "invalid_request",
                format!("`{name}` must be a whole number, not `{value}`"),
            )
        };
        match name {
            "after" => after = value.parse().map_err(|_| bad())?,
            "limit" => {
                limit = value
                    .parse::<usize>()
                    .map_err(|_| bad())?
                    .clamp(1, MAX_PAGE)
            }
            _ => {
                return Err(Reply::error(
                    400,
                    "invalid_request",
                    format!("unknown query parameter `{name}` (expected `after`, `limit`)"),
                ));
            }
        }
    }
    Ok((after, limit))
}

/// Runs an operation against the store at `now`.
pub async fn apply(store: &Store, op: Op, now: u64) -> Reply {
    match run(store, op, now).await {
        Ok(reply) => reply,
        Err(e) => Reply::store(&e),
    }
}

async fn run(store: &Store, op: Op, now: u64) -> Result<Reply, StoreError> {
    let no_account =
        |id: AccountId| Reply::error(404, "account_not_found", format!("no account {id}"));
    Ok(match op {
        Op::CreateAccount { name } => {
            if name.len() > MAX_REFERENCE_LEN {
                return Ok(too_long("name"));
            }
            let account = store.create_account(&name, now).await?;
            Reply::ok(201, json!({ "account": account, "balance": "0" }))
        }
        Op::ListAccounts { after, limit } => {
            let page = store.accounts(after, limit)?;
            let next = (page.len() == limit).then(|| page.last().map(|(a, _)| a.id));
            let accounts: Vec<Value> = page
                .into_iter()
                .map(|(account, balance)| json!({ "account": account, "balance": balance.to_string() }))
                .collect();
            Reply::ok(
                200,
                json!({ "accounts": accounts, "next_after": next.flatten() }),
            )
        }
        Op::ShowAccount { account } => match store.account(account)? {
            Some((account, balance)) => Reply::ok(
                200,
                json!({ "account": account, "balance": balance.to_string() }),
            ),
            None => no_account(account),
        },
        Op::IssueKey {
            account,
            label,
            expires_in_secs,
        } => {
            if label.len() > MAX_REFERENCE_LEN {
                return Ok(too_long("label"));
            }
            let expires_at = expires_in_secs.map(|secs| now.saturating_add(secs));
            match store.issue_key(account, &label, expires_at, now).await? {
                Some((key, record)) => Reply::ok(
                    201,
                    json!({
                        "key": key,
                        "record": record,
                        "note": "store this key now: tollgate keeps only its hash and cannot show it again",
                    }),
                ),
                None => no_account(account),
            }
        }
        Op::ListKeys { account } => {
            if store.account(account)?.is_none() {
                return Ok(no_account(account));
            }
            Reply::ok(200, json!({ "keys": store.keys(account)? }))
        }
        Op::RevokeKey { key } => match store.revoke_key(&key, now).await? {
            Some(record) => Reply::ok(200, json!({ "record": record })),
            None => Reply::error(404, "key_not_found", format!("no key with id `{key}`")),
        },
        Op::TopUp {
            account,
            credits,
            reference,
        } => {
            if reference.is_empty() {
                return Ok(Reply::error(
                    400,
                    "invalid_request",
                    "a top-up needs a `reference` (the payment or invoice it comes from); it makes retries safe",
                ));
            }
            if reference.len() > MAX_REFERENCE_LEN {
                return Ok(too_long("reference"));
            }
            if credits == 0 {
                return Ok(Reply::error(
                    400,
                    "invalid_request",
                    "a top-up credits at least 1",
                ));
            }
            match store.top_up(account, credits, &reference, now).await? {
                Ok(TopUp::Credited(fact)) => {
                    Reply::ok(201, json!({ "fact": fact, "repeated": false }))
                }
                Ok(TopUp::Repeated(fact)) => {
                    Reply::ok(200, json!({ "fact": fact, "repeated": true }))
                }
                Err(TopUpRefused::NoAccount) => no_account(account),
                Err(TopUpRefused::ReferenceReused(fact)) => Reply::error(
                    409,
                    "reference_reused",
                    format!(
                        "reference `{reference}` already credited {} credits (ledger entry {}); a reference credits once",
                        fact.credits, fact.seq
                    ),
                ),
                Err(TopUpRefused::Overflow) => Reply::error(
                    400,
                    "invalid_request",
                    "the balance would exceed the largest amount tollgate can hold",
                ),
            }
        }
        Op::Usage {
            account,
            after,
            limit,
        } => {
            let Some((_, balance)) = store.account(account)? else {
                return Ok(no_account(account));
            };
            let facts = store.usage(account, after, limit)?;
            let next = (facts.len() == limit).then(|| facts.last().map(|f| f.seq));
            Reply::ok(
                200,
                json!({ "balance": balance.to_string(), "facts": facts, "next_after": next.flatten() }),
            )
        }
        Op::Payments { query, limit } => {
            let page = store.payments(&query, limit)?;
            Reply::ok(
                200,
                json!({ "entries": page.entries, "next_after": page.next }),
            )
        }
        Op::Payment { seq } => match store.payment(seq)? {
            Some(row) => Reply::ok(
                200,
                json!({
                    "entry": row.entry,
                    "amount": format_atomic(row.entry.amount, row.entry.decimals),
                    "status": row.status,
                    "facts": store.facts_of(seq)?,
                }),
            ),
            None => Reply::error(404, "payment_not_found", format!("no ledger entry {seq}")),
        },
        Op::Verify => {
            let store = store.clone();
            let report = tokio::task::spawn_blocking(move || crate::ledger::verify::verify(&store))
                .await
                .map_err(|e| StoreError(format!("verification stopped: {e}")))??;
            let status = if report.consistent { 200 } else { 500 };
            Reply::ok(status, json!(report))
        }
        Op::Bundles { after, limit } => {
            let (bundles, next) = store.bundles_page(after, limit)?;
            Reply::ok(200, json!({ "bundles": bundles, "next_after": next }))
        }
        Op::Bundle { id } => match store.bundle(id)? {
            Some(bundle) => bundle_summary(store, bundle)?,
            None => Reply::error(404, "bundle_not_found", format!("no bundle {id}")),
        },
        Op::Audit => {
            let audit = store.audit()?;
            let status = if audit.discrepancies.is_empty() {
                200
            } else {
                500
            };
            Reply::ok(
                status,
                json!({ "consistent": audit.discrepancies.is_empty(), "audit": audit }),
            )
        }
    })
}

/// A bundle with its entries, their count and sum, and the sum per state. `consistent` says
/// whether the bundle's recorded `total` equals the sum of its rows.
fn bundle_summary(
    store: &Store,
    bundle: crate::store::ledger::Bundle,
) -> Result<Reply, StoreError> {
    let mut rows = Vec::with_capacity(bundle.entries.len());
    let mut sum: u128 = 0;
    let mut states: std::collections::BTreeMap<&'static str, (u64, u128)> = Default::default();
    let mut missing = Vec::new();
    for &seq in &bundle.entries {
        let Some(row) = store.payment(seq)? else {
            missing.push(seq);
            continue;
        };
        sum = sum.saturating_add(row.entry.amount);
        let slot = states.entry(row.status.state.as_str()).or_default();
        slot.0 += 1;
        slot.1 = slot.1.saturating_add(row.entry.amount);
        rows.push(row);
    }
    let decimals = bundle.decimals;
    let by_state: serde_json::Map<String, Value> = states
        .into_iter()
        .map(|(state, (count, amount))| {
            (
                state.to_string(),
                json!({
                    "count": count,
                    "amount_atomic": amount.to_string(),
                    "amount": format_atomic(amount, decimals),
                }),
            )
        })
        .collect();
    Ok(Reply::ok(
        200,
        json!({
            "bundle": bundle,
            "count": rows.len(),
            "total_atomic": sum.to_string(),
            "total": format_atomic(sum, decimals),
            "consistent": sum == bundle.total && missing.is_empty(),
            "missing_entries": missing,
            "by_state": by_state,
            "entries": rows,
        }),
    ))
}

fn too_long(field: &str) -> Reply {
    Reply::error(
        400,
        "invalid_request",
        format!("`{field}` is longer than {MAX_REFERENCE_LEN} bytes"),
    )
}

/// A duration in words an operator types: `90s`, `30m`, `12h`, `30d`.
pub fn parse_duration_secs(text: &str) -> Result<u64, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration such as 90s, 30m, 12h or 30d"))?;
    let scale = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(format!("`{text}`: the unit must be s, m, h or d")),
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("`{text}` is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_survives_the_http_round_trip() {
        let ops = [
            Op::CreateAccount {
                name: "acme".into(),
            },
            Op::ListAccounts {
                after: 3,
                limit: 10,
            },
            Op::ShowAccount { account: 7 },
            Op::IssueKey {
                account: 7,
                label: "ci".into(),
                expires_in_secs: Some(60),
            },
            Op::IssueKey {
                account: 7,
                label: String::new(),
                expires_in_secs: None,
            },
            Op::ListKeys { account: 7 },
            Op::RevokeKey {
                key: "tg_0123456789ab".into(),
            },
            Op::TopUp {
                account: 7,
                credits: u128::MAX,
                reference: "inv-1".into(),
            },
            Op::Usage {
                account: 7,
                after: 41,
                limit: 5,
            },
            Op::Audit,
            Op::Payments {
                query: Query::default(),
                limit: DEFAULT_PAGE,
            },
            Op::Payments {
                query: Query {
                    from: Some(1_796_040_000),
                    to: Some(1_796_126_400),
                    buyer: Some(Address::repeat_byte(0xab)),
                    route: Some("GET /v1/forecast/{city} & more+?".into()),
                    state: Some(State::Unresolved),
                    bundle: Some(4),
                    after: Some(99),
                },
                limit: 7,
            },
            Op::Payment { seq: 12 },
            Op::Verify,
            Op::Bundles { after: 2, limit: 3 },
            Op::Bundle { id: 5 },
        ];
        for op in ops {
            let (method, target, body) = op.to_http();
            let (path, query) = target.split_once('?').unwrap_or((&target, ""));
            let body = body.map(|b| b.to_string()).unwrap_or_default();
            assert_eq!(Op::from_http(method, path, query, body.as_bytes()), Ok(op));
        }
    }

    #[test]
    fn bad_requests_get_precise_codes() {
        let code = |m, p, q, b: &str| Op::from_http(m, p, q, b.as_bytes()).err().map(|r| r.status);
        assert_eq!(code("GET", "/v1/nothing", "", ""), Some(404));
        assert_eq!(code("PUT", "/v1/accounts", "", ""), Some(405));
        assert_eq!(code("GET", "/v1/accounts/x", "", ""), Some(404));
        assert_eq!(code("GET", "/v1/accounts", "limit=x", ""), Some(400));
        assert_eq!(code("POST", "/v1/accounts/1/topups", "", "{}"), Some(400));
        assert_eq!(
            code(
                "POST",
                "/v1/accounts/1/topups",
                "",
                r#"{"credits":"1.5","reference":"r"}"#
            ),
            Some(400)
        );
        assert_eq!(
            code("POST", "/v1/accounts", "", r#"{"nme":"x"}"#),
            Some(400)
        );
    }

    #[test]
    fn exports_survive_the_http_round_trip() {
        let rates = "currency,rate,source,as_of\nEUR,0.9234,ECB,2026-11-30\nUSD,1,par,2026-11-30\n";
        let exports = [
            Export {
                query: Query::default(),
                format: Format::Csv,
                currency: None,
                rates: None,
            },
            Export {
                query: Query {
                    from: Some(10),
                    to: Some(20),
                    route: Some("POST /v1/reports".into()),
                    state: Some(State::Confirmed),
                    ..Query::default()
                },
                format: Format::Json,
                currency: Some("USD".into()),
                rates: Some(rates.into()),
            },
            Export {
                query: Query::default(),
                format: Format::Json,
                currency: None,
                rates: Some(rates.into()),
            },
        ];
        for export in exports {
            let (method, target, body) = export.to_http();
            let (path, query) = target.split_once('?').unwrap_or((&target, ""));
            assert_eq!(path, Export::PATH);
            let body = body.unwrap_or_default();
            assert_eq!(
                Export::from_http(method, query, body.as_bytes()),
                Ok(export)
            );
        }
    }

    #[test]
    fn ledger_requests_get_precise_codes() {
        let op =
            |m, p, q| Op::from_http(m, p, q, b"").map_err(|r| (r.status, r.body["error"].clone()));
        assert_eq!(
            op("GET", "/v1/ledger", "from=2026-11-30&to=1796126400"),
            Ok(Op::Payments {
                query: Query {
                    from: Some(1_795_996_800),
                    to: Some(1_796_126_400),
                    ..Query::default()
                },
                limit: DEFAULT_PAGE,
            })
        );
        assert_eq!(op("GET", "/v1/ledger", "state=paid").unwrap_err().0, 400);
        assert_eq!(
            op("GET", "/v1/ledger", "from=yesterday").unwrap_err().0,
            400
        );
        assert_eq!(op("GET", "/v1/ledger", "buyer=0x12").unwrap_err().0, 400);
        assert_eq!(op("GET", "/v1/ledger", "sort=desc").unwrap_err().0, 400);
        assert_eq!(op("GET", "/v1/ledger/x", "").unwrap_err().0, 404);
        assert_eq!(op("DELETE", "/v1/ledger/3", "").unwrap_err().0, 405);
        assert_eq!(op("GET", "/v1/bundles/x", "").unwrap_err().0, 404);
        assert_eq!(op("POST", "/v1/bundles", "").unwrap_err().0, 405);
        let export = |m, q, b: &str| {
            Export::from_http(m, q, b.as_bytes()).map_err(|r| {
                (
                    r.status,
                    r.body["message"].as_str().unwrap_or("").to_string(),
                )
            })
        };
        assert_eq!(export("GET", "format=xml", "").unwrap_err().0, 400);
        assert_eq!(export("GET", "currency=EUR", "").unwrap_err().0, 400);
        assert_eq!(export("GET", "limit=5", "").unwrap_err().0, 400);
        assert_eq!(export("PUT", "", "").unwrap_err().0, 405);
        assert_eq!(
            export(
                "POST",
                "currency=GBP",
                "currency,rate,source,as_of\nEUR,0.9,ECB,2026-11-30\n"
            )
            .unwrap_err(),
            (
                400,
                "the request body: no rate for GBP (the table has EUR)".to_string()
            )
        );
        assert_eq!(
            export(
                "POST",
                "",
                "currency,rate,source,as_of\nEUR,0;9,ECB,2026-11-30\n"
            )
            .unwrap_err(),
            (
                400,
                "the request body:2: the rate `0;9` of EUR is not an exact decimal such as 0.9234"
                    .to_string()
            )
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_secs("30d"), Ok(2_592_000));
        assert_eq!(parse_duration_secs("90"), Ok(90));
        assert!(parse_duration_secs("1w").is_err());
        assert!(parse_duration_secs("d").is_err());
    }
}
