//! Small UTC time helpers; the calendar is `jiff`'s.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{CliError, Exit, Result};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `YYYY-MM-DD HH:MM:SS` UTC of a millisecond timestamp (`@SECONDS` past
/// the years 9999).
pub fn fmt_ms(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map_or_else(
        |_| format!("@{}", ms.div_euclid(1000)),
        |t| t.strftime("%Y-%m-%d %H:%M:%S").to_string(),
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
    // Dates and times, UTC (jiff's ISO 8601 parser; `T` or a space).
    let t = t.strip_suffix(['Z', 'z']).unwrap_or(t);
    let dt = if t.len() == 10 {
        t.parse::<jiff::civil::Date>()
            .map(|d| d.to_datetime(jiff::civil::Time::midnight()))
    } else {
        t.parse::<jiff::civil::DateTime>()
    }
    .map_err(|_| bad())?;
    let at = dt.to_zoned(jiff::tz::TimeZone::UTC).map_err(|_| bad())?;
    Ok(at.timestamp().as_millisecond())
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
        assert_eq!(parse_since("2024-01-01 09:30:00", now).unwrap(), now);
        assert_eq!(
            parse_since("2024-02-29T00:00Z", now).unwrap(),
            1_709_164_800_000
        );
        assert_eq!(fmt_ms(-1), "1969-12-31 23:59:59");
        for bad in [
            "yesterday",
            "24x",
            "2024-13-01",
            "2024-01-01T25:00",
            "2024-02-30",
            "-3h",
            "",
        ] {
            assert!(parse_since(bad, now).is_err(), "{bad}");
        }
    }
}
