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

pub mod service;
pub mod token;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::store::accounts::{AccountId, MAX_REFERENCE_LEN, TopUp, TopUpRefused};
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
        let (after, limit) = paging(query)?;
        let op = match (method, segments.as_slice()) {
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
            | (_, ["v1", "accounts", _] | ["v1", "keys", _] | ["v1", "audit"]) => {
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
        }
    }
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
    fn durations() {
        assert_eq!(parse_duration_secs("30d"), Ok(2_592_000));
        assert_eq!(parse_duration_secs("90"), Ok(90));
        assert!(parse_duration_secs("1w").is_err());
        assert!(parse_duration_secs("d").is_err());
    }
}
