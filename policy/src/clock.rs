//! The policy clock: the `time`, `hour` and `weekday` a policy reads, of
//! the appliance's clock in the appliance's time zone.
//!
//! The zone is UTC unless `serve --time-zone` set another: `system` (the
//! host's, from `TZ` or `/etc/localtime`) or an IANA name such as
//! `Europe/Berlin`. Date maths, daylight saving time included, are the
//! `jiff` crate's, with its time-zone database bundled (the appliance
//! image has no `/usr/share/zoneinfo`; a host that has one is preferred).

use std::sync::OnceLock;

use jiff::tz::TimeZone;
use jiff::Timestamp;

static ZONE: OnceLock<TimeZone> = OnceLock::new();

/// The zone `name` names: `UTC`, `system`, or an IANA name.
pub fn zone_named(name: &str) -> Result<TimeZone, String> {
    match name {
        "" | "UTC" | "utc" => Ok(TimeZone::UTC),
        "system" => {
            TimeZone::try_system().map_err(|e| format!("the host's time zone cannot be read: {e}"))
        }
        _ => TimeZone::get(name).map_err(|e| format!("unknown time zone `{name}`: {e}")),
    }
}

/// Sets the zone of [`civil`] for this process, once (before the first
/// decision); `false` if it was already set.
pub fn set_zone(tz: TimeZone) -> bool {
    ZONE.set(tz).is_ok()
}

/// The zone of [`civil`]: the one set, else UTC.
pub fn zone() -> &'static TimeZone {
    ZONE.get_or_init(|| TimeZone::UTC)
}

/// The zone's name (`UTC` for UTC, an IANA name, or an offset).
pub fn zone_name(tz: &TimeZone) -> String {
    tz.iana_name().map_or_else(
        || {
            if *tz == TimeZone::UTC {
                "UTC".to_owned()
            } else {
                format!("{tz:?}")
            }
        },
        str::to_owned,
    )
}

/// `(time_s, hour, weekday)` of `at_ms` in [`zone`]: seconds since the
/// epoch, the local hour 0..23 and the local weekday, 0 = Monday.
pub fn civil(at_ms: i64) -> (i64, i64, i64) {
    civil_in(at_ms, zone())
}

/// [`civil`] in the zone `tz`.
pub fn civil_in(at_ms: i64, tz: &TimeZone) -> (i64, i64, i64) {
    let secs = at_ms.div_euclid(1000);
    let Ok(ts) = Timestamp::from_second(secs) else {
        // Outside jiff's range (years -9999..9999): the UTC arithmetic.
        let hour = secs.rem_euclid(86_400) / 3600;
        // 1970-01-01 was a Thursday (3 when Monday is 0).
        let weekday = secs.div_euclid(86_400).saturating_add(3).rem_euclid(7);
        return (secs, hour, weekday);
    };
    let local = ts.to_zoned(tz.clone());
    (
        secs,
        i64::from(local.hour()),
        i64::from(local.weekday().to_monday_zero_offset()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Milliseconds of a UTC date and time.
    fn utc(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_millisecond()
    }

    #[test]
    fn utc_is_the_default_arithmetic() {
        // Monday 2024-01-01 09:30 UTC.
        assert_eq!(
            civil_in(1_704_101_400_000, &TimeZone::UTC),
            (1_704_101_400, 9, 0)
        );
        // 1970-01-01 was a Thursday; before the epoch too.
        assert_eq!(civil_in(0, &TimeZone::UTC), (0, 0, 3));
        assert_eq!(civil_in(-1, &TimeZone::UTC), (-1, 23, 2));
        // Far outside jiff's range: still an answer.
        let (_, h, w) = civil_in(i64::MAX, &TimeZone::UTC);
        assert!((0..24).contains(&h) && (0..7).contains(&w));
    }

    #[test]
    fn named_zone_across_the_spring_dst_change() {
        // Europe/Berlin: CET (+1) until 2026-03-29 01:00 UTC, then CEST (+2).
        let berlin = zone_named("Europe/Berlin").unwrap();
        // Friday 06:30 UTC = 07:30 CET.
        assert_eq!(civil_in(utc("2026-03-27T06:30:00Z"), &berlin).1, 7);
        assert_eq!(civil_in(utc("2026-03-27T06:30:00Z"), &berlin).2, 4);
        // Sunday 00:59 UTC = 01:59 CET; 01:00 UTC = 03:00 CEST (02:xx never happens).
        assert_eq!(civil_in(utc("2026-03-29T00:59:00Z"), &berlin).1, 1);
        assert_eq!(civil_in(utc("2026-03-29T01:00:00Z"), &berlin).1, 3);
        // Monday 06:30 UTC = 08:30 CEST: inside office hours now.
        assert_eq!(civil_in(utc("2026-03-30T06:30:00Z"), &berlin).1, 8);
        assert_eq!(civil_in(utc("2026-03-30T06:30:00Z"), &berlin).2, 0);
        // Sunday 22:30 UTC is already Monday 00:30 in Berlin.
        let (_, h, w) = civil_in(utc("2026-03-29T22:30:00Z"), &berlin);
        assert_eq!((h, w), (0, 0));
    }

    #[test]
    fn named_zone_across_the_autumn_dst_change() {
        // America/New_York: EDT (-4) until 2026-11-01 06:00 UTC, then EST (-5).
        let ny = zone_named("America/New_York").unwrap();
        // 01:30 happens twice: 05:30 UTC (EDT) and 06:30 UTC (EST).
        assert_eq!(civil_in(utc("2026-11-01T05:30:00Z"), &ny).1, 1);
        assert_eq!(civil_in(utc("2026-11-01T06:30:00Z"), &ny).1, 1);
        assert_eq!(civil_in(utc("2026-11-01T07:30:00Z"), &ny).1, 2);
        // Monday 13:30 UTC: 09:30 EDT in October, 08:30 EST in November.
        assert_eq!(civil_in(utc("2026-10-26T13:30:00Z"), &ny).1, 9);
        assert_eq!(civil_in(utc("2026-11-02T13:30:00Z"), &ny).1, 8);
    }

    #[test]
    fn zone_names() {
        assert_eq!(zone_named("UTC").unwrap(), TimeZone::UTC);
        assert!(zone_named("system").is_ok());
        let e = zone_named("Mars/Olympus_Mons").unwrap_err();
        assert!(e.contains("unknown time zone `Mars/Olympus_Mons`"), "{e}");
        assert_eq!(
            zone_name(&zone_named("Europe/Berlin").unwrap()),
            "Europe/Berlin"
        );
        assert_eq!(zone_name(&TimeZone::UTC), "UTC");
    }
}
