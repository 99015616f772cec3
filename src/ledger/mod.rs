//! The payment ledger for people: listings, reconciliation exports and verification, over what
//! [`crate::store::ledger`] keeps.
//!
//! - [`time`] — instants as operators write them (RFC 3339, Unix seconds) and as exports show
//!   them (RFC 3339 UTC).
//! - [`decimal`] — exact decimals on integers: amount × rate with every digit, no float.
//! - [`csv`] — RFC 4180 writing (exports) and reading (rate tables).
//! - [`rates`] — the operator's rate table (`currency,rate,source,as_of`).
//! - [`export`] — the reconciliation export, CSV or JSON, streamed row by row.
//! - [`verify`] — every invariant of the payment and credit ledgers, checked from disk.
//!
//! The admin operations that expose these ([`crate::admin`]) and the `tollgate ledger`
//! subcommands ([`crate::cli`]) only parse arguments and call in here.

pub mod csv;
pub mod decimal;
pub mod export;
pub mod rates;
pub mod time;
pub mod verify;
