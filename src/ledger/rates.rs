//! The operator's rate table: what one unit of the payment asset was worth, per currency.
//!
//! A CSV file (RFC 4180) with the header `currency,rate,source,as_of` and one row per currency:
//!
//! ```text
//! currency,rate,source,as_of
//! EUR,0.9234,ECB reference rate,2026-11-30
//! GBP,0.7891,"BoE spot, 16:00",2026-11-30
//! ```
//!
//! `rate` is units of that currency per one unit of the payment asset (1 USDC, not one atomic
//! unit), an exact decimal (digits and a point; no sign, exponent or separators). `source` and
//! `as_of` are written into the export beside the rate, as given. Every mistake names the
//! file and line.

use std::fmt;

use super::csv;
use super::decimal::Decimal;

/// One currency's rate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rate {
    /// ISO 4217 code, upper case: `EUR`.
    pub currency: String,
    pub rate: Decimal,
    /// The rate as the table wrote it (for the export's `rate` column).
    pub text: String,
    pub source: String,
    pub as_of: String,
}

/// The currency an export is in when a rate table is given and none is named.
pub const DEFAULT_CURRENCY: &str = "EUR";

/// A rate table, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateTable {
    /// Where it came from (a file path, `request body`), for messages.
    pub origin: String,
    pub rates: Vec<Rate>,
}

/// Why a rate table cannot be used: `file:line: message`, or `file: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateError {
    pub origin: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for RateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.origin, self.message),
            None => write!(f, "{}: {}", self.origin, self.message),
        }
    }
}

impl std::error::Error for RateError {}

const HEADER: [&str; 4] = ["currency", "rate", "source", "as_of"];

impl RateTable {
    /// Reads a rate table's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<RateTable, RateError> {
        let error = |line: Option<usize>, message: String| RateError {
            origin: origin.to_string(),
            line,
            message,
        };
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let records = csv::read_records(text).map_err(|m| error(Some(m.line), m.message))?;
        let mut records = records.into_iter();
        let Some((line, header)) = records.next() else {
            return Err(error(
                None,
                format!(
                    "the rate table is empty; it needs the header `{}`",
                    HEADER.join(",")
                ),
            ));
        };
        let names: Vec<String> = header
            .iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .collect();
        if names != HEADER {
            return Err(error(
                Some(line),
                format!(
                    "the header is `{}`; it must be `{}`",
                    header.join(","),
                    HEADER.join(",")
                ),
            ));
        }
        let mut rates: Vec<(usize, Rate)> = Vec::new();
        for (line, fields) in records {
            let [currency, rate, source, as_of] = <[String; 4]>::try_from(fields).map_err(|f| {
                error(
                    Some(line),
                    format!("{} fields; a row has 4: {}", f.len(), HEADER.join(",")),
                )
            })?;
            let currency = currency.trim().to_ascii_uppercase();
            if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(error(
                    Some(line),
                    format!("`{currency}` is not a currency code (three letters, such as EUR)"),
                ));
            }
            if let Some((first, _)) = rates.iter().find(|(_, r)| r.currency == currency) {
                return Err(error(
                    Some(line),
                    format!("a second rate for {currency} (the first is on line {first})"),
                ));
            }
            let text = rate.trim().to_string();
            let Some(value) = Decimal::parse(&text) else {
                let hint = if text.contains(',') {
                    " (write the decimal point as `.`)"
                } else {
                    ""
                };
                return Err(error(
                    Some(line),
                    format!(
                        "the rate `{text}` of {currency} is not an exact decimal such as 0.9234{hint}"
                    ),
                ));
            };
            if value == Decimal::ZERO || text.bytes().all(|b| b == b'0' || b == b'.') {
                return Err(error(Some(line), format!("the rate of {currency} is zero")));
            }
            let (source, as_of) = (source.trim().to_string(), as_of.trim().to_string());
            if source.is_empty() || as_of.is_empty() {
                return Err(error(
                    Some(line),
                    format!("the rate of {currency} needs a `source` and an `as_of`"),
                ));
            }
            rates.push((
                line,
                Rate {
                    currency,
                    rate: value,
                    text,
                    source,
                    as_of,
                },
            ));
        }
        if rates.is_empty() {
            return Err(error(
                None,
                "the rate table has a header but no rates".into(),
            ));
        }
        Ok(RateTable {
            origin: origin.to_string(),
            rates: rates.into_iter().map(|(_, r)| r).collect(),
        })
    }

    /// The rate of `currency` (any letter case).
    pub fn get(&self, currency: &str) -> Result<&Rate, RateError> {
        let wanted = currency.trim().to_ascii_uppercase();
        self.rates
            .iter()
            .find(|r| r.currency == wanted)
            .ok_or_else(|| {
                let have: Vec<&str> = self.rates.iter().map(|r| r.currency.as_str()).collect();
                RateError {
                    origin: self.origin.clone(),
                    line: None,
                    message: format!("no rate for {wanted} (the table has {})", have.join(", ")),
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "currency,rate,source,as_of\r\nEUR,0.9234,ECB reference rate,2026-11-30\r\ngbp,0.7891,\"BoE spot, 16:00\",2026-11-30\r\n";

    fn error(text: &str) -> String {
        RateTable::parse(text, "rates.csv").unwrap_err().to_string()
    }

    #[test]
    fn reads_a_table() {
        let table = RateTable::parse(GOOD, "rates.csv").unwrap();
        let eur = table.get("eur").unwrap();
        assert_eq!(eur.text, "0.9234");
        assert_eq!(eur.source, "ECB reference rate");
        assert_eq!(eur.as_of, "2026-11-30");
        assert_eq!(table.get("GBP").unwrap().source, "BoE spot, 16:00");
        assert_eq!(
            table.get("USD").unwrap_err().to_string(),
            "rates.csv: no rate for USD (the table has EUR, GBP)"
        );
    }

    #[test]
    fn every_mistake_names_the_file_and_line() {
        let h = "currency,rate,source,as_of\n";
        assert_eq!(
            error(&format!("{h}EUR,0,9234,ECB,2026-11-30\n")),
            "rates.csv:2: 5 fields; a row has 4: currency,rate,source,as_of"
        );
        assert_eq!(
            error(&format!("{h}EUR,\"0,9234\",ECB,2026-11-30\n")),
            "rates.csv:2: the rate `0,9234` of EUR is not an exact decimal such as 0.9234 (write the decimal point as `.`)"
        );
        assert_eq!(
            error(&format!("{h}USD,1,x,y\nEUR,9.2e-1,ECB,2026-11-30\n")),
            "rates.csv:3: the rate `9.2e-1` of EUR is not an exact decimal such as 0.9234"
        );
        assert_eq!(
            error(&format!("{h}EUR,-0.9,ECB,2026-11-30\n")),
            "rates.csv:2: the rate `-0.9` of EUR is not an exact decimal such as 0.9234"
        );
        assert_eq!(
            error(&format!("{h}EUR,0.00,ECB,2026-11-30\n")),
            "rates.csv:2: the rate of EUR is zero"
        );
        assert_eq!(
            error(&format!(
                "{h}EUR,1,ECB,2026-11-30\n\nEUR,2,ECB,2026-12-01\n"
            )),
            "rates.csv:4: a second rate for EUR (the first is on line 2)"
        );
        assert_eq!(
            error(&format!("{h}EURO,1,ECB,2026-11-30\n")),
            "rates.csv:2: `EURO` is not a currency code (three letters, such as EUR)"
        );
        assert_eq!(
            error(&format!("{h}EUR,1,,2026-11-30\n")),
            "rates.csv:2: the rate of EUR needs a `source` and an `as_of`"
        );
        assert_eq!(
            error("currency,rate,source\nEUR,1,ECB\n"),
            "rates.csv:1: the header is `currency,rate,source`; it must be `currency,rate,source,as_of`"
        );
        assert_eq!(
            error(""),
            "rates.csv: the rate table is empty; it needs the header `currency,rate,source,as_of`"
        );
        assert_eq!(
            error(h),
            "rates.csv: the rate table has a header but no rates"
        );
        assert_eq!(
            error(&format!("{h}EUR,1,\"ECB,2026-11-30\n")),
            "rates.csv:2: a quoted field is not closed"
        );
    }
}
