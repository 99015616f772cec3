//! Exact decimals for fiat columns: an integer mantissa and a count of decimal places.
//!
//! A fiat amount is the payment's atomic amount times the operator's rate, both exact
//! decimals, so their product is exact too: the mantissas multiply (as 256-bit integers, so a
//! `u128` amount times any rate up to 38 digits cannot overflow) and the places add. Nothing is
//! rounded and no float is involved; the text shows every digit the product has (trailing zeros
//! dropped). Rounding to cents, if the books want it, is the accountant's step, made once on the
//! totals.

use std::fmt;

use alloy::primitives::U256;

/// A non-negative exact decimal: `mantissa × 10^-scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decimal {
    mantissa: U256,
    scale: u32,
}

/// Most digits a rate may have (before and after the point together).
pub const MAX_DIGITS: usize = 38;

impl Decimal {
    pub const ZERO: Decimal = Decimal {
        mantissa: U256::ZERO,
        scale: 0,
    };

    /// Decimal text: digits, optionally a point and more digits (`0.9234`, `12`, `1.50`).
    /// No sign, exponent, separators or spaces.
    pub fn parse(text: &str) -> Option<Decimal> {
        let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty()
            || !digits(whole)
            || !digits(fraction)
            || (text.contains('.') && fraction.is_empty())
            || whole.len() + fraction.len() > MAX_DIGITS
        {
            return None;
        }
        let mut mantissa = U256::ZERO;
        for b in whole.bytes().chain(fraction.bytes()) {
            mantissa = mantissa
                .checked_mul(U256::from(10u8))?
                .checked_add(U256::from(b - b'0'))?;
        }
        Some(Decimal {
            mantissa,
            scale: u32::try_from(fraction.len()).ok()?,
        })
    }

    /// Atomic units of an asset with `decimals` places, as the decimal amount they are.
    pub fn from_atomic(atomic: u128, decimals: u8) -> Decimal {
        Decimal {
            mantissa: U256::from(atomic),
            scale: u32::from(decimals),
        }
    }

    /// The exact product; `None` only past 2^256.
    pub fn checked_mul(self, other: Decimal) -> Option<Decimal> {
        Some(Decimal {
            mantissa: self.mantissa.checked_mul(other.mantissa)?,
            scale: self.scale.checked_add(other.scale)?,
        })
    }

    /// The exact sum; `None` only past 2^256.
    pub fn checked_add(self, other: Decimal) -> Option<Decimal> {
        let scale = self.scale.max(other.scale);
        let widen = |d: Decimal| -> Option<U256> {
            if d.scale == scale {
                return Some(d.mantissa);
            }
            let factor = U256::from(10u8).checked_pow(U256::from(scale - d.scale))?;
            d.mantissa.checked_mul(factor)
        };
        Some(Decimal {
            mantissa: widen(self)?.checked_add(widen(other)?)?,
            scale,
        })
    }
}

impl fmt::Display for Decimal {
    /// Every digit, no trailing zeros after the point, no point for a whole number.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // u128's formatting is several times faster than U256's, and nearly every amount fits.
        let digits = match u128::try_from(self.mantissa) {
            Ok(small) => small.to_string(),
            Err(_) => self.mantissa.to_string(),
        };
        let scale = usize::try_from(self.scale).unwrap_or(usize::MAX);
        let padded = if digits.len() <= scale {
            format!("{}{digits}", "0".repeat(scale - digits.len() + 1))
        } else {
            digits
        };
        let (whole, fraction) = padded.split_at(padded.len() - scale);
        let fraction = fraction.trim_end_matches('0');
        if fraction.is_empty() {
            f.write_str(whole)
        } else {
            write!(f, "{whole}.{fraction}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(text: &str) -> Decimal {
        Decimal::parse(text).unwrap()
    }

    #[test]
    fn parses_only_plain_decimals() {
        assert_eq!(d("0.9234").to_string(), "0.9234");
        assert_eq!(d("12").to_string(), "12");
        assert_eq!(d("1.50").to_string(), "1.5");
        assert_eq!(d("000.000").to_string(), "0");
        for bad in [
            "",
            ".5",
            "1.",
            "-1",
            "+1",
            "1e3",
            "1,5",
            " 1",
            "1 000",
            "0x10",
            "NaN",
            "123456789012345678901234567890123456789",
        ] {
            assert_eq!(Decimal::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn multiplies_exactly_without_rounding() {
        // 0.001 USDC at 0.9234 EUR/USDC is 0.0009234 EUR, every digit kept.
        let fiat = Decimal::from_atomic(1_000, 6)
            .checked_mul(d("0.9234"))
            .unwrap();
        assert_eq!(fiat.to_string(), "0.0009234");
        // 1 atomic unit at a rate with many places: 10^-6 × 1.23456789 = 0.00000123456789.
        let fiat = Decimal::from_atomic(1, 6)
            .checked_mul(d("1.23456789"))
            .unwrap();
        assert_eq!(fiat.to_string(), "0.00000123456789");
        // 123.456789 × 0.1 = 12.3456789 (a float would print 12.345678900000001).
        let fiat = Decimal::from_atomic(123_456_789, 6)
            .checked_mul(d("0.1"))
            .unwrap();
        assert_eq!(fiat.to_string(), "12.3456789");
        // The largest amount times a 38-digit rate still fits.
        let big = Decimal::from_atomic(u128::MAX, 0)
            .checked_mul(d("99999999999999999999999999999999999999"))
            .unwrap();
        assert_eq!(
            big.to_string(),
            "34028236692093846346337460743176821145159717633079061536536625392568231788545"
        );
        assert_eq!(Decimal::from_atomic(5_000_000, 6).to_string(), "5");
        assert_eq!(Decimal::from_atomic(0, 6).to_string(), "0");
    }

    #[test]
    fn sums_are_exact_and_agree_with_the_product_of_the_sum() {
        let rate = d("0.9234");
        let amounts = [1_000u128, 2_500, 999_999, 1];
        let mut sum_of_products = Decimal::ZERO;
        for a in amounts {
            let p = Decimal::from_atomic(a, 6).checked_mul(rate).unwrap();
            sum_of_products = sum_of_products.checked_add(p).unwrap();
        }
        let product_of_sum = Decimal::from_atomic(amounts.iter().sum(), 6)
            .checked_mul(rate)
            .unwrap();
        assert_eq!(sum_of_products.to_string(), product_of_sum.to_string());
        assert_eq!(product_of_sum.to_string(), "0.9266319");
        assert_eq!(d("0.5").checked_add(d("1.25")).unwrap().to_string(), "1.75");
    }
}
