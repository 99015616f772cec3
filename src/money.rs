//! Money as integers: decimal text ↔ atomic units. No floating point anywhere.
//!
//! An amount written `0.001` for an asset with 6 decimals is `1000` atomic units. The
//! conversion happens once, when a policy is compiled; a value that would need rounding or that
//! does not fit a `u128` is an error, never an approximation.

use std::fmt;

/// Why decimal text is not an exact amount of an asset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AmountError {
    /// More digits after the point than the asset has decimals.
    TooManyDecimals { given: usize, allowed: u8 },
    /// Larger than the biggest representable amount.
    Overflow,
    /// Not of the form `123` or `123.45`.
    Malformed,
}

impl fmt::Display for AmountError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AmountError::TooManyDecimals { given, allowed: 0 } => {
                write!(
                    f,
                    "{given} decimal places given, but this unit has no fractions"
                )
            }
            AmountError::TooManyDecimals { given, allowed } => {
                write!(
                    f,
                    "{given} decimal places given, but this unit has {allowed}"
                )
            }
            AmountError::Overflow => f.write_str("amount is too large"),
            AmountError::Malformed => f.write_str("not a decimal amount"),
        }
    }
}

/// Converts decimal text (`"0.001"`) to atomic units of an asset with `decimals` decimals.
///
/// ```
/// use tollgate::money::{AmountError, parse_decimal};
/// assert_eq!(parse_decimal("0.001", 6), Ok(1_000)); // 0.001 USDC
/// assert_eq!(parse_decimal("0.0000001", 6), Err(AmountError::TooManyDecimals { given: 7, allowed: 6 }));
/// ```
pub fn parse_decimal(text: &str, decimals: u8) -> Result<u128, AmountError> {
    let (whole, fraction) = match text.split_once('.') {
        Some((w, f)) => (w, f),
        None => (text, ""),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || (text.contains('.') && !digits(fraction)) {
        return Err(AmountError::Malformed);
    }
    let significant = fraction.trim_end_matches('0');
    if significant.len() > usize::from(decimals) {
        return Err(AmountError::TooManyDecimals {
            given: significant.len(),
            allowed: decimals,
        });
    }
    let scale = 10u128
        .checked_pow(u32::from(decimals))
        .ok_or(AmountError::Overflow)?;
    let mut atomic = whole
        .bytes()
        .try_fold(0u128, |acc, b| {
            acc.checked_mul(10)?.checked_add(u128::from(b - b'0'))
        })
        .and_then(|w| w.checked_mul(scale))
        .ok_or(AmountError::Overflow)?;
    let mut place = scale;
    for b in significant.bytes() {
        place /= 10;
        atomic = atomic
            .checked_add(u128::from(b - b'0') * place)
            .ok_or(AmountError::Overflow)?;
    }
    Ok(atomic)
}

/// Formats atomic units as decimal text without trailing zeros (`1000`, 6 → `"0.001"`).
pub fn format_atomic(atomic: u128, decimals: u8) -> String {
    let Some(scale) = 10u128.checked_pow(u32::from(decimals)) else {
        return atomic.to_string();
    };
    let whole = atomic / scale;
    let fraction = atomic % scale;
    if fraction == 0 {
        return whole.to_string();
    }
    let digits = format!("{fraction:0width$}", width = usize::from(decimals));
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

/// Serde for atomic amounts as decimal strings (`"1000"`), as x402 writes them: JSON numbers
/// above 2^53 lose precision in JavaScript. Reading also takes a JSON integer.
pub mod as_string {
    use serde::de::{Error, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(atomic: &u128, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(atomic)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u128, D::Error> {
        deserializer.deserialize_any(Atomic)
    }

    struct Atomic;

    impl Visitor<'_> for Atomic {
        type Value = u128;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a whole number of atomic units, such as \"1000\"")
        }

        fn visit_u64<E: Error>(self, n: u64) -> Result<u128, E> {
            Ok(n.into())
        }

        fn visit_u128<E: Error>(self, n: u128) -> Result<u128, E> {
            Ok(n)
        }

        fn visit_str<E: Error>(self, s: &str) -> Result<u128, E> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(E::invalid_value(serde::de::Unexpected::Str(s), &self));
            }
            s.parse().map_err(|_| E::custom("the amount is too large"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_exactly() {
        assert_eq!(parse_decimal("0.001", 6), Ok(1000));
        assert_eq!(parse_decimal("5", 6), Ok(5_000_000));
        assert_eq!(parse_decimal("1.500000", 6), Ok(1_500_000));
        assert_eq!(parse_decimal("0.000001", 6), Ok(1));
        assert_eq!(parse_decimal("3", 0), Ok(3));
    }

    #[test]
    fn refuses_to_round() {
        assert_eq!(
            parse_decimal("0.0000001", 6),
            Err(AmountError::TooManyDecimals {
                given: 7,
                allowed: 6
            })
        );
        assert_eq!(
            parse_decimal("1.5", 0),
            Err(AmountError::TooManyDecimals {
                given: 1,
                allowed: 0
            })
        );
    }

    #[test]
    fn refuses_overflow_and_garbage() {
        assert_eq!(
            parse_decimal("340282366920938463463374607431768211456", 0),
            Err(AmountError::Overflow)
        );
        assert_eq!(
            parse_decimal("1000000000000000000000", 18),
            Err(AmountError::Overflow)
        );
        assert_eq!(parse_decimal("1", 39), Err(AmountError::Overflow));
        assert_eq!(parse_decimal("", 6), Err(AmountError::Malformed));
        assert_eq!(parse_decimal("1.", 6), Err(AmountError::Malformed));
        assert_eq!(parse_decimal("-1", 6), Err(AmountError::Malformed));
    }

    #[test]
    fn formats_back() {
        assert_eq!(format_atomic(1000, 6), "0.001");
        assert_eq!(format_atomic(5_000_000, 6), "5");
        assert_eq!(format_atomic(1_500_000, 6), "1.5");
        assert_eq!(format_atomic(7, 0), "7");
    }
}

/// [`as_string`] for an optional amount (`null` or absent is `None`).
pub mod opt_as_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        atomic: &Option<u128>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match atomic {
            Some(n) => serializer.collect_str(n),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<u128>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapped(#[serde(with = "super::as_string")] u128);
        Ok(Option::<Wrapped>::deserialize(deserializer)?.map(|Wrapped(n)| n))
    }
}
