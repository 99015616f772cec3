//! Instants as operators write them: RFC 3339 (`2026-11-30T12:00:00Z`, any offset, a bare
//! date `2026-11-30` for its midnight UTC) or Unix seconds (`1796040000`), and back to RFC 3339
//! in UTC for exports.
//!
//! Civil-date arithmetic on integers (proleptic Gregorian calendar, Howard Hinnant's
//! `days_from_civil`); fractions of a second are dropped (the ledger keeps whole seconds).

/// Unix seconds of an instant written as RFC 3339 or as Unix seconds.
pub fn parse_instant(text: &str) -> Result<u64, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse()
            .map_err(|_| format!("`{text}` is too large for Unix seconds"));
    }
    rfc3339(text).ok_or_else(|| {
        format!(
            "`{text}` is not an instant: write RFC 3339 (2026-11-30T12:00:00Z, 2026-11-30) or Unix seconds"
        )
    })
}

fn number(text: &str, from: usize, to: usize) -> Option<i64> {
    let part = text.get(from..to)?;
    if part.bytes().all(|b| b.is_ascii_digit()) {
        part.parse().ok()
    } else {
        None
    }
}

fn rfc3339(text: &str) -> Option<u64> {
    let byte = |i: usize| text.as_bytes().get(i).copied();
    if byte(4) != Some(b'-') || byte(7) != Some(b'-') {
        return None;
    }
    let (year, month, day) = (
        number(text, 0, 4)?,
        number(text, 5, 7)?,
        number(text, 8, 10)?,
    );
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let mut seconds = days.checked_mul(86_400)?;
    if text.len() > 10 {
        if !matches!(byte(10), Some(b'T' | b't' | b' ')) || byte(13) != Some(b':') {
            return None;
        }
        if byte(16) != Some(b':') {
            return None;
        }
        let (h, m, s) = (
            number(text, 11, 13)?,
            number(text, 14, 16)?,
            number(text, 17, 19)?,
        );
        if h > 23 || m > 59 || s > 59 {
            return None;
        }
        let mut rest = text.get(19..)?;
        if let Some(fraction) = rest.strip_prefix('.') {
            let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return None;
            }
            rest = fraction.get(digits..)?;
        }
        let offset = match rest {
            "Z" | "z" => 0,
            _ => {
                let sign = match rest.as_bytes().first() {
                    Some(b'+') => 1,
                    Some(b'-') => -1,
                    _ => return None,
                };
                if rest.len() != 6 || rest.as_bytes().get(3) != Some(&b':') {
                    return None;
                }
                let (oh, om) = (number(rest, 1, 3)?, number(rest, 4, 6)?);
                if oh > 23 || om > 59 {
                    return None;
                }
                sign * (oh * 3_600 + om * 60)
            }
        };
        seconds = seconds
            .checked_add(h * 3_600 + m * 60 + s)?
            .checked_sub(offset)?;
    }
    u64::try_from(seconds).ok()
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a civil date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Unix seconds as RFC 3339 in UTC: `2026-11-30T12:00:00Z`.
pub fn format_rfc3339(unix: u64) -> String {
    let secs = i64::try_from(unix).unwrap_or(i64::MAX / 2);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, mo, d) = civil_from_days(days);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rest / 3_600,
        rest % 3_600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rfc3339_and_unix_seconds() {
        assert_eq!(parse_instant("0"), Ok(0));
        assert_eq!(parse_instant("1796040000"), Ok(1_796_040_000));
        assert_eq!(parse_instant("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_instant("2026-11-30"), Ok(1_795_996_800));
        assert_eq!(parse_instant("2026-11-30T12:00:00Z"), Ok(1_796_040_000));
        assert_eq!(parse_instant("2026-11-30T12:00:00.999Z"), Ok(1_796_040_000));
        assert_eq!(
            parse_instant("2026-11-30T13:30:00+01:30"),
            Ok(1_796_040_000)
        );
        assert_eq!(
            parse_instant("2026-11-30t10:00:00-02:00"),
            Ok(1_796_040_000)
        );
        assert_eq!(parse_instant("2024-02-29T00:00:00Z"), Ok(1_709_164_800));
        for bad in [
            "",
            "2026-13-01",
            "2025-02-29",
            "2026-11-30T24:00:00Z",
            "2026-11-30T12:00:00",
            "2026-11-30T12:00Z",
            "2026-11-30T12:00:00+0100",
            "1969-12-31T23:59:59Z",
            "yesterday",
            "-5",
        ] {
            assert!(parse_instant(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formats_utc_and_round_trips() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(1_796_040_000), "2026-11-30T12:00:00Z");
        assert_eq!(format_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        for t in (0..4_102_444_800u64).step_by(86_399 * 37) {
            assert_eq!(parse_instant(&format_rfc3339(t)), Ok(t));
        }
    }
}
