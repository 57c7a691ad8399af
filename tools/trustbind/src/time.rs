//! Small UTC time helpers (no time-zone database needed).

use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{CliError, Exit, Result};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Civil date of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `YYYY-MM-DD HH:MM:SS` UTC of a millisecond timestamp.
pub fn fmt_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        s / 3600,
        (s / 60) % 60,
        s % 60
    )
}

/// Parses a point in time for `--since`: a duration back from now (`90s`,
/// `30m`, `24h`, `7d`, `2w`), a UTC date `YYYY-MM-DD`, a UTC date and time
/// `YYYY-MM-DDTHH:MM[:SS][Z]`, or `@SECONDS` since the epoch. Returns ms.
pub fn parse_since(s: &str, now: i64) -> Result<i64> {
    let bad = || {
        CliError::new(
            Exit::Usage,
            format!(
                "`{s}` is not a time: use a duration like 24h, 30m or 7d, a date like 2026-11-22, \
                 a UTC time like 2026-11-22T08:00Z, or @SECONDS"
            ),
        )
    };
    let t = s.trim();
    if let Some(secs) = t.strip_prefix('@') {
        let n: i64 = secs.parse().map_err(|_| bad())?;
        return n.checked_mul(1000).ok_or_else(bad);
    }
    if let Some(unit) = t.chars().last().filter(char::is_ascii_alphabetic) {
        let num = t.get(..t.len().saturating_sub(1)).ok_or_else(bad)?;
        if let Ok(n) = num.parse::<i64>() {
            let mul: i64 = match unit {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86_400,
                'w' => 604_800,
                _ => return Err(bad()),
            };
            if n < 0 {
                return Err(bad());
            }
            let back = n
                .checked_mul(mul)
                .and_then(|x| x.checked_mul(1000))
                .ok_or_else(bad)?;
            return Ok(now.saturating_sub(back));
        }
    }
    // Dates and times.
    let t = t.trim_end_matches('Z');
    let (date, clock) = match t.split_once(['T', ' ']) {
        Some((d, c)) => (d, Some(c)),
        None => (t, None),
    };
    let mut dp = date.split('-');
    let (Some(y), Some(m), Some(d), None) = (dp.next(), dp.next(), dp.next(), dp.next()) else {
        return Err(bad());
    };
    let (y, m, d): (i64, i64, i64) = (
        y.parse().map_err(|_| bad())?,
        m.parse().map_err(|_| bad())?,
        d.parse().map_err(|_| bad())?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    let mut secs = days_from_civil(y, m, d) * 86_400;
    if let Some(c) = clock {
        let parts: Vec<&str> = c.split(':').collect();
        if parts.len() < 2 || parts.len() > 3 {
            return Err(bad());
        }
        let mut mul = 3600;
        for p in parts {
            let v: i64 = p.parse().map_err(|_| bad())?;
            if !(0..60).contains(&v) || (mul == 3600 && v > 23) {
                return Err(bad());
            }
            secs += v * mul;
            mul /= 60;
        }
    }
    Ok(secs * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses() {
        assert_eq!(fmt_ms(0), "1970-01-01 00:00:00");
        assert_eq!(fmt_ms(1_704_101_400_000), "2024-01-01 09:30:00");
        let now = 1_704_101_400_000;
        assert_eq!(parse_since("24h", now).unwrap(), now - 86_400_000);
        assert_eq!(parse_since("30m", now).unwrap(), now - 1_800_000);
        assert_eq!(parse_since("2024-01-01", now).unwrap(), 1_704_067_200_000);
        assert_eq!(parse_since("2024-01-01T09:30Z", now).unwrap(), now);
        assert_eq!(parse_since("@1704101400", now).unwrap(), now);
        for bad in [
            "yesterday",
            "24x",
            "2024-13-01",
            "2024-01-01T25:00",
            "-3h",
            "",
        ] {
            assert!(parse_since(bad, now).is_err(), "{bad}");
        }
    }
}
