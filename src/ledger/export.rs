//! The reconciliation export: one row per paid request (ledger entry), as CSV or JSON, streamed
//! as the entries are read — an export holds one row in memory, plus the running totals.
//!
//! Columns, in order: `seq, recorded_at, request_id, service, route, method, path, buyer, rail,
//! network, asset, symbol, amount_atomic, amount, state, bundle, tx_hash, block, settled_at,
//! upstream_status, reason`, and with a rate table `currency, rate, rate_source, rate_as_of,
//! fiat_amount`. Instants are RFC 3339 in UTC; `settled_at` is when the entry reached its final
//! state (`confirmed`, `failed`, `refunded`), empty while it has none.
//!
//! Money is exact: `amount_atomic` is the integer the buyer signed, `amount` the same as an
//! exact decimal ([`crate::money::format_atomic`]), and `fiat_amount` the exact product of
//! `amount` and the rate ([`super::decimal`]: integer mantissas multiplied, places added) —
//! never a float, never rounded; it shows every digit the product has.
//!
//! - CSV follows RFC 4180 ([`super::csv`]): a header row, CRLF line ends, fields with a comma,
//!   quote, CR or LF quoted and quotes doubled. It holds the rows only.
//! - JSON is one object: `currency` and `rate` (the rate used, its source and date, or `null`),
//!   `rows` (objects with the columns above; amounts as strings, `bundle`, `block` and
//!   `upstream_status` as numbers or `null`), `count`, and `totals`: per network, asset and
//!   state, the count and the sum (atomic, decimal, and fiat when a rate is given). A total is
//!   the sum of its rows, exactly.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{self, Write};

use alloy::primitives::Address;
use serde::Serialize;

use super::csv;
use super::decimal::Decimal;
use super::rates::Rate;
use super::time::format_rfc3339;
use crate::money::format_atomic;
use crate::store::ledger::{Query, Row, State};
use crate::store::{Store, StoreError};

/// CSV or JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Json,
}

impl Format {
    pub fn parse(text: &str) -> Option<Format> {
        match text {
            "csv" => Some(Format::Csv),
            "json" => Some(Format::Json),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Json => "json",
        }
    }

    /// The media type an HTTP answer carries.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Csv => "text/csv; charset=utf-8; header=present",
            Format::Json => "application/json",
        }
    }
}

/// A field a client chose (the request id, the path), made safe to open in a spreadsheet: a
/// leading `=`, `+`, `-`, `@`, tab or carriage return would make it a formula, so it gets a `'`
/// in front (OWASP's advice for CSV injection). The JSON export keeps the text as sent.
fn defused(text: &str) -> String {
    if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{text}")
    } else {
        text.to_string()
    }
}

/// The columns of every row.
pub const COLUMNS: [&str; 21] = [
    "seq",
    "recorded_at",
    "request_id",
    "service",
    "route",
    "method",
    "path",
    "buyer",
    "rail",
    "network",
    "asset",
    "symbol",
    "amount_atomic",
    "amount",
    "state",
    "bundle",
    "tx_hash",
    "block",
    "settled_at",
    "upstream_status",
    "reason",
];

/// The columns a rate table adds.
pub const FIAT_COLUMNS: [&str; 5] = [
    "currency",
    "rate",
    "rate_source",
    "rate_as_of",
    "fiat_amount",
];

/// Why an export stopped. Rows already written stay written: a CSV or JSON cut short by an
/// error is incomplete (JSON does not parse; the HTTP answer ends without its last chunk).
#[derive(Debug)]
pub enum ExportError {
    Store(StoreError),
    Io(io::Error),
    /// A total past what exact arithmetic holds (2^128 atomic units).
    Overflow(String),
}

impl fmt::Display for ExportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExportError::Store(e) => write!(f, "{e}"),
            ExportError::Io(e) => write!(f, "cannot write the export: {e}"),
            ExportError::Overflow(what) => write!(f, "{what} is too large to total exactly"),
        }
    }
}

impl std::error::Error for ExportError {}

impl From<io::Error> for ExportError {
    fn from(e: io::Error) -> Self {
        ExportError::Io(e)
    }
}

impl From<StoreError> for ExportError {
    fn from(e: StoreError) -> Self {
        ExportError::Store(e)
    }
}

/// One row, in column order.
#[derive(Serialize)]
struct Line<'a> {
    seq: u64,
    recorded_at: String,
    request_id: &'a str,
    service: &'a str,
    route: &'a str,
    method: &'a str,
    path: &'a str,
    buyer: String,
    rail: &'a str,
    network: &'a str,
    asset: String,
    symbol: &'a str,
    amount_atomic: String,
    amount: String,
    state: &'static str,
    bundle: Option<u64>,
    tx_hash: Option<&'a str>,
    block: Option<u64>,
    settled_at: Option<String>,
    upstream_status: Option<u16>,
    reason: Option<&'a str>,
    #[serde(flatten)]
    fiat: Option<FiatColumns<'a>>,
}

#[derive(Serialize)]
struct FiatColumns<'a> {
    currency: &'a str,
    rate: &'a str,
    rate_source: &'a str,
    rate_as_of: &'a str,
    fiat_amount: String,
}

/// Addresses as text, each checksummed (a Keccak hash) once per export, not once per row.
#[derive(Default)]
struct Names(HashMap<Address, String>);

impl Names {
    fn of(&mut self, address: Address) -> String {
        self.0
            .entry(address)
            .or_insert_with(|| address.to_string())
            .clone()
    }
}

impl<'a> Line<'a> {
    fn new(
        row: &'a Row,
        rate: Option<&'a Rate>,
        names: &mut Names,
    ) -> Result<Line<'a>, ExportError> {
        let (e, s) = (&row.entry, &row.status);
        let fiat = match rate {
            Some(rate) => Some(FiatColumns {
                currency: &rate.currency,
                rate: &rate.text,
                rate_source: &rate.source,
                rate_as_of: &rate.as_of,
                fiat_amount: fiat(e.amount, e.decimals, rate)?.to_string(),
            }),
            None => None,
        };
        Ok(Line {
            seq: e.seq,
            recorded_at: format_rfc3339(e.at),
            request_id: &e.request_id,
            service: &e.service,
            route: &e.route,
            method: &e.method,
            path: &e.path,
            buyer: names.of(e.payer),
            rail: &e.rail,
            network: &e.network,
            asset: names.of(e.asset),
            symbol: &e.symbol,
            amount_atomic: e.amount.to_string(),
            amount: format_atomic(e.amount, e.decimals),
            state: s.state.as_str(),
            bundle: s.detail.bundle,
            tx_hash: s.detail.tx.as_deref(),
            block: s.detail.block,
            settled_at: s.state.is_final().then(|| format_rfc3339(s.since)),
            upstream_status: s.detail.upstream_status,
            reason: s.detail.reason.as_deref(),
            fiat,
        })
    }

    fn write_csv(&self, out: &mut impl Write) -> io::Result<()> {
        let opt = |v: Option<String>| v.unwrap_or_default();
        let mut fields: Vec<String> = vec![
            self.seq.to_string(),
            self.recorded_at.clone(),
            defused(self.request_id),
            self.service.into(),
            self.route.into(),
            self.method.into(),
            defused(self.path),
            self.buyer.clone(),
            self.rail.into(),
            self.network.into(),
            self.asset.clone(),
            self.symbol.into(),
            self.amount_atomic.clone(),
            self.amount.clone(),
            self.state.into(),
            opt(self.bundle.map(|b| b.to_string())),
            opt(self.tx_hash.map(str::to_string)),
            opt(self.block.map(|b| b.to_string())),
            opt(self.settled_at.clone()),
            opt(self.upstream_status.map(|s| s.to_string())),
            opt(self.reason.map(str::to_string)),
        ];
        if let Some(f) = &self.fiat {
            fields.extend([
                f.currency.to_string(),
                f.rate.to_string(),
                f.rate_source.to_string(),
                f.rate_as_of.to_string(),
                f.fiat_amount.clone(),
            ]);
        }
        csv::write_record(out, &fields)
    }
}

/// The exact fiat value of `atomic` units of an asset with `decimals` places at `rate`.
pub fn fiat(atomic: u128, decimals: u8, rate: &Rate) -> Result<Decimal, ExportError> {
    Decimal::from_atomic(atomic, decimals)
        .checked_mul(rate.rate)
        .ok_or_else(|| ExportError::Overflow("a fiat amount".into()))
}

/// What the rows of one network, asset and state add up to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Total {
    pub network: String,
    pub asset: String,
    pub symbol: String,
    pub state: State,
    pub count: u64,
    #[serde(with = "crate::money::as_string")]
    pub amount_atomic: u128,
    /// The sum as an exact decimal.
    pub amount: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fiat_amount: Option<String>,
    #[serde(skip)]
    decimals: u8,
    #[serde(skip)]
    fiat: Option<Decimal>,
}

/// What an export wrote: its row count and totals.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub count: u64,
    pub totals: Vec<Total>,
}

/// Writes the entries `query` selects to `out`, row by row, as `format`, with fiat columns
/// when `rate` is given. `query.after` is ignored: an export is the whole range.
pub fn export(
    store: &Store,
    query: &Query,
    format: Format,
    rate: Option<&Rate>,
    out: &mut impl Write,
) -> Result<Summary, ExportError> {
    let mut query = query.clone();
    query.after = None;
    let mut totals: BTreeMap<(String, Address, State), Total> = BTreeMap::new();
    let mut names = Names::default();
    let mut count = 0u64;
    let mut failure: Option<ExportError> = None;
    match format {
        Format::Csv => {
            let mut header: Vec<&str> = COLUMNS.to_vec();
            if rate.is_some() {
                header.extend(FIAT_COLUMNS);
            }
            csv::write_record(out, &header)?;
        }
        Format::Json => {
            out.write_all(b"{\n\"currency\": ")?;
            serde_json::to_writer(&mut *out, &rate.map(|r| &r.currency))
                .map_err(io::Error::from)?;
            out.write_all(b",\n\"rate\": ")?;
            let rate_json = rate.map(|r| {
                serde_json::json!({
                    "currency": r.currency, "rate": r.text, "source": r.source, "as_of": r.as_of,
                    "per": "one unit of the payment asset",
                })
            });
            serde_json::to_writer(&mut *out, &rate_json).map_err(io::Error::from)?;
            out.write_all(b",\n\"rows\": [")?;
        }
    }
    store.each_payment(&query, |row| {
        let mut step = || -> Result<(), ExportError> {
            let line = Line::new(&row, rate, &mut names)?;
            match format {
                Format::Csv => line.write_csv(out)?,
                Format::Json => {
                    out.write_all(if count == 0 { b"\n" } else { b",\n" })?;
                    serde_json::to_writer(&mut *out, &line).map_err(io::Error::from)?;
                }
            }
            add(&mut totals, &row, rate, &line.asset)?;
            Ok(())
        };
        match step() {
            Ok(()) => {
                count += 1;
                true
            }
            Err(e) => {
                failure = Some(e);
                false
            }
        }
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    let summary = Summary {
        count,
        totals: totals
            .into_values()
            .map(|mut t| {
                t.amount = format_atomic(t.amount_atomic, t.decimals);
                t.fiat_amount = t.fiat.map(|f| f.to_string());
                t
            })
            .collect(),
    };
    if format == Format::Json {
        out.write_all(b"\n],\n\"count\": ")?;
        serde_json::to_writer(&mut *out, &summary.count).map_err(io::Error::from)?;
        out.write_all(b",\n\"totals\": ")?;
        serde_json::to_writer_pretty(&mut *out, &summary.totals).map_err(io::Error::from)?;
        out.write_all(b"\n}\n")?;
    }
    out.flush()?;
    Ok(summary)
}

fn add(
    totals: &mut BTreeMap<(String, Address, State), Total>,
    row: &Row,
    rate: Option<&Rate>,
    asset: &str,
) -> Result<(), ExportError> {
    let e = &row.entry;
    let total = totals
        .entry((e.network.clone(), e.asset, row.status.state))
        .or_insert_with(|| Total {
            network: e.network.clone(),
            asset: asset.to_string(),
            symbol: e.symbol.clone(),
            state: row.status.state,
            count: 0,
            amount_atomic: 0,
            amount: String::new(),
            fiat_amount: None,
            decimals: e.decimals,
            fiat: rate.map(|_| Decimal::ZERO),
        });
    let overflow = || ExportError::Overflow(format!("the total of {} {}", e.network, e.symbol));
    total.count += 1;
    total.amount_atomic = total
        .amount_atomic
        .checked_add(e.amount)
        .ok_or_else(overflow)?;
    if let (Some(sum), Some(rate)) = (total.fiat, rate) {
        let sum = sum
            .checked_add(fiat(e.amount, e.decimals, rate)?)
            .ok_or_else(overflow)?;
        total.fiat = Some(sum);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::defused;

    #[test]
    fn client_text_that_a_spreadsheet_would_run_is_defused() {
        assert_eq!(defused("=HYPERLINK(\"x\")"), "'=HYPERLINK(\"x\")");
        assert_eq!(defused("+1"), "'+1");
        assert_eq!(defused("-2"), "'-2");
        assert_eq!(defused("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(defused("req-1"), "req-1");
        assert_eq!(defused("/v1/forecast"), "/v1/forecast");
    }
}
