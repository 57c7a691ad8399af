//! Process-wide counters for the appliance, rendered in the Prometheus text
//! exposition format at `GET /metrics`.
//!
//! Everything is a lock-free atomic, so the decision path can record without
//! contending with a scrape. Labels are fixed sets (the actions of
//! [`crate::request::Action`] and the three verdicts); an action name outside
//! the set is counted as `other` rather than growing the label space.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// Action label values, in [`crate::request::Action::as_str`] spelling, plus `other`.
const ACTIONS: [&str; 9] = [
    "exec",
    "open_read",
    "open_write",
    "delete",
    "rename",
    "connect",
    "accept",
    "ipc_connect",
    "other",
];

/// Verdict label values.
const VERDICTS: [&str; 3] = ["allow", "allow_with_conditions", "deny"];

/// Upper bounds of the decision latency histogram buckets, in microseconds.
/// The `+Inf` bucket is implicit.
const LATENCY_BUCKETS_US: [u64; 12] = [
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000,
];

const N_DECISIONS: usize = ACTIONS.len() * VERDICTS.len();

/// The appliance's counters. Obtain the process-wide instance with [`metrics`];
/// tests may build a private one with [`Metrics::new`].
#[derive(Debug)]
pub struct Metrics {
    decisions: [AtomicU64; N_DECISIONS],
    would_deny: [AtomicU64; ACTIONS.len()],
    /// Per-bucket (non-cumulative) counts; the last slot is `+Inf`.
    latency_buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    latency_sum_us: AtomicU64,
    latency_count: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    keys_issued: AtomicU64,
    enrolments_ok: AtomicU64,
    enrolments_failed: AtomicU64,
    agents_connected: AtomicU64,
    limits_exceeded: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The process-wide metrics instance.
pub fn metrics() -> &'static Metrics {
    static GLOBAL: OnceLock<Metrics> = OnceLock::new();
    GLOBAL.get_or_init(Metrics::new)
}

fn action_index(action: &str) -> usize {
    ACTIONS
        .iter()
        .position(|a| *a == action)
        .unwrap_or(ACTIONS.len() - 1)
}

fn bump(slots: &[AtomicU64], i: usize) {
    if let Some(slot) = slots.get(i) {
        slot.fetch_add(1, Ordering::Relaxed);
    }
}

fn load(slots: &[AtomicU64], i: usize) -> u64 {
    slots.get(i).map_or(0, |s| s.load(Ordering::Relaxed))
}

impl Metrics {
    /// A fresh set of counters, all zero.
    pub fn new() -> Self {
        Self {
            decisions: std::array::from_fn(|_| AtomicU64::new(0)),
            would_deny: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_sum_us: AtomicU64::new(0),
            latency_count: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            keys_issued: AtomicU64::new(0),
            enrolments_ok: AtomicU64::new(0),
            enrolments_failed: AtomicU64::new(0),
            agents_connected: AtomicU64::new(0),
            limits_exceeded: AtomicU64::new(0),
        }
    }

    /// Counts one decision. `action` is an [`crate::request::Action::as_str`]
    /// name (anything else counts as `other`); `verdict` is `allow`,
    /// `allow_with_conditions` or `deny` (anything else counts as `deny`).
    /// `would_deny` marks an allow that a host group in audit mode would
    /// otherwise have denied. `elapsed` goes into the latency histogram.
    pub fn record_decision(
        &self,
        action: &str,
        verdict: &str,
        would_deny: bool,
        elapsed: Duration,
    ) {
        let a = action_index(action);
        let v = VERDICTS
            .iter()
            .position(|x| *x == verdict)
            .unwrap_or(VERDICTS.len() - 1);
        bump(&self.decisions, a * VERDICTS.len() + v);
        if would_deny {
            bump(&self.would_deny, a);
        }
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let b = LATENCY_BUCKETS_US
            .iter()
            .position(|le| us <= *le)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        bump(&self.latency_buckets, b);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
        self.latency_count.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one decision-cache lookup.
    pub fn record_cache(&self, hit: bool) {
        let c = if hit {
            &self.cache_hits
        } else {
            &self.cache_misses
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one channel key issued.
    pub fn record_key_issued(&self) {
        self.keys_issued.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one enrolment attempt, successful or not.
    pub fn record_enrolment(&self, ok: bool) {
        let c = if ok {
            &self.enrolments_ok
        } else {
            &self.enrolments_failed
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one license limit exceeded (see `crate::limits`).
    pub fn record_limit_exceeded(&self) {
        self.limits_exceeded.fetch_add(1, Ordering::Relaxed);
    }

    /// Sets the number of agents currently connected (a gauge).
    pub fn set_agents_connected(&self, n: u64) {
        self.agents_connected.store(n, Ordering::Relaxed);
    }

    /// Total decisions recorded for `action` with `verdict` (for tests and the CLI).
    pub fn decisions(&self, action: &str, verdict: &str) -> u64 {
        let a = action_index(action);
        VERDICTS
            .iter()
            .position(|x| *x == verdict)
            .map_or(0, |v| load(&self.decisions, a * VERDICTS.len() + v))
    }

    /// Renders every metric in the Prometheus text exposition format (0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing to a String cannot fail; the results are ignored on purpose.
        let _ = writeln!(
            out,
            "# HELP trustbind_decisions_total Qualification decisions by action and verdict."
        );
        let _ = writeln!(out, "# TYPE trustbind_decisions_total counter");
        for (ai, action) in ACTIONS.iter().enumerate() {
            for (vi, verdict) in VERDICTS.iter().enumerate() {
                let n = load(&self.decisions, ai * VERDICTS.len() + vi);
                let _ = writeln!(
                    out,
                    "trustbind_decisions_total{{action=\"{action}\",verdict=\"{verdict}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP trustbind_would_deny_total Allows in audit mode that enforce mode would deny."
        );
        let _ = writeln!(out, "# TYPE trustbind_would_deny_total counter");
        for (ai, action) in ACTIONS.iter().enumerate() {
            let n = load(&self.would_deny, ai);
            let _ = writeln!(out, "trustbind_would_deny_total{{action=\"{action}\"}} {n}");
        }

        let _ = writeln!(
            out,
            "# HELP trustbind_decision_duration_seconds Time to reach a decision."
        );
        let _ = writeln!(out, "# TYPE trustbind_decision_duration_seconds histogram");
        let mut cumulative = 0u64;
        for (i, le) in LATENCY_BUCKETS_US.iter().enumerate() {
            cumulative = cumulative.saturating_add(load(&self.latency_buckets, i));
            let _ = writeln!(
                out,
                "trustbind_decision_duration_seconds_bucket{{le=\"{}\"}} {cumulative}",
                seconds(*le)
            );
        }
        cumulative =
            cumulative.saturating_add(load(&self.latency_buckets, LATENCY_BUCKETS_US.len()));
        let _ = writeln!(
            out,
            "trustbind_decision_duration_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            out,
            "trustbind_decision_duration_seconds_sum {}",
            seconds(self.latency_sum_us.load(Ordering::Relaxed))
        );
        let _ = writeln!(
            out,
            "trustbind_decision_duration_seconds_count {}",
            self.latency_count.load(Ordering::Relaxed)
        );

        counter(
            &mut out,
            "trustbind_cache_hits_total",
            "Decision cache hits.",
            &self.cache_hits,
        );
        counter(
            &mut out,
            "trustbind_cache_misses_total",
            "Decision cache misses.",
            &self.cache_misses,
        );
        counter(
            &mut out,
            "trustbind_keys_issued_total",
            "Channel keys issued.",
            &self.keys_issued,
        );
        let _ = writeln!(
            out,
            "# HELP trustbind_enrolments_total Enrolment attempts by result."
        );
        let _ = writeln!(out, "# TYPE trustbind_enrolments_total counter");
        let _ = writeln!(
            out,
            "trustbind_enrolments_total{{result=\"ok\"}} {}",
            self.enrolments_ok.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "trustbind_enrolments_total{{result=\"failed\"}} {}",
            self.enrolments_failed.load(Ordering::Relaxed)
        );
        counter(
            &mut out,
            "trustbind_limits_exceeded_total",
            "License limits exceeded.",
            &self.limits_exceeded,
        );
        let _ = writeln!(
            out,
            "# HELP trustbind_agents_connected Agents connected now."
        );
        let _ = writeln!(out, "# TYPE trustbind_agents_connected gauge");
        let _ = writeln!(
            out,
            "trustbind_agents_connected {}",
            self.agents_connected.load(Ordering::Relaxed)
        );
        out
    }
}

fn counter(out: &mut String, name: &str, help: &str, value: &AtomicU64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} counter");
    let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
}

/// Microseconds as a decimal number of seconds, exact (no float rounding).
fn seconds(us: u64) -> String {
    let whole = us / 1_000_000;
    let frac = us % 1_000_000;
    if frac == 0 {
        format!("{whole}")
    } else {
        let s = format!("{whole}.{frac:06}");
        s.trim_end_matches('0').to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting with {prefix:?} in\n{text}"))
    }

    #[test]
    fn render_counts_decisions_by_label() {
        let m = Metrics::new();
        m.record_decision("exec", "allow", false, Duration::from_micros(10));
        m.record_decision("exec", "allow", true, Duration::from_micros(10));
        m.record_decision("connect", "deny", false, Duration::from_micros(10));
        m.record_decision("bogus", "allow_with_conditions", false, Duration::ZERO);
        let t = m.render();
        assert_eq!(
            line(
                &t,
                "trustbind_decisions_total{action=\"exec\",verdict=\"allow\"}"
            ),
            "trustbind_decisions_total{action=\"exec\",verdict=\"allow\"} 2"
        );
        assert!(t.contains("trustbind_decisions_total{action=\"exec\",verdict=\"deny\"} 0\n"));
        assert!(t.contains("trustbind_decisions_total{action=\"connect\",verdict=\"deny\"} 1\n"));
        assert!(t.contains(
            "trustbind_decisions_total{action=\"other\",verdict=\"allow_with_conditions\"} 1\n"
        ));
        assert!(t.contains("trustbind_would_deny_total{action=\"exec\"} 1\n"));
        assert_eq!(m.decisions("exec", "allow"), 2);
    }

    #[test]
    fn histogram_is_cumulative_with_sum_and_count() {
        let m = Metrics::new();
        m.record_decision("exec", "allow", false, Duration::from_micros(20));
        m.record_decision("exec", "allow", false, Duration::from_micros(300));
        m.record_decision("exec", "allow", false, Duration::from_secs(5));
        let t = m.render();
        assert!(t.contains("trustbind_decision_duration_seconds_bucket{le=\"0.000025\"} 1\n"));
        assert!(t.contains("trustbind_decision_duration_seconds_bucket{le=\"0.00025\"} 1\n"));
        assert!(t.contains("trustbind_decision_duration_seconds_bucket{le=\"0.0005\"} 2\n"));
        assert!(t.contains("trustbind_decision_duration_seconds_bucket{le=\"1\"} 2\n"));
        assert!(t.contains("trustbind_decision_duration_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(t.contains("trustbind_decision_duration_seconds_sum 5.00032\n"));
        assert!(t.contains("trustbind_decision_duration_seconds_count 3\n"));
    }

    #[test]
    fn render_other_counters_and_gauge() {
        let m = Metrics::new();
        m.record_cache(true);
        m.record_cache(true);
        m.record_cache(false);
        m.record_key_issued();
        m.record_enrolment(true);
        m.record_enrolment(false);
        m.record_enrolment(false);
        m.record_limit_exceeded();
        m.set_agents_connected(7);
        m.set_agents_connected(4);
        let t = m.render();
        assert!(t.contains("trustbind_cache_hits_total 2\n"));
        assert!(t.contains("trustbind_cache_misses_total 1\n"));
        assert!(t.contains("trustbind_keys_issued_total 1\n"));
        assert!(t.contains("trustbind_enrolments_total{result=\"ok\"} 1\n"));
        assert!(t.contains("trustbind_enrolments_total{result=\"failed\"} 2\n"));
        assert!(t.contains("trustbind_limits_exceeded_total 1\n"));
        assert!(t.contains("trustbind_agents_connected 4\n"));
        assert!(t.contains("# TYPE trustbind_agents_connected gauge\n"));
    }

    #[test]
    fn every_sample_line_is_well_formed() {
        let m = Metrics::new();
        m.record_decision("accept", "deny", false, Duration::from_millis(3));
        for l in m.render().lines() {
            if l.starts_with('#') {
                assert!(l.starts_with("# HELP ") || l.starts_with("# TYPE "), "{l}");
                continue;
            }
            let (name, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("{l}"));
            assert!(name.starts_with("trustbind_"), "{l}");
            assert!(value.parse::<f64>().is_ok(), "{l}");
        }
    }

    #[test]
    fn global_instance_is_shared() {
        let before = metrics().decisions("rename", "deny");
        metrics().record_decision("rename", "deny", false, Duration::ZERO);
        assert!(metrics().decisions("rename", "deny") > before);
        assert!(std::ptr::eq(metrics(), metrics()));
    }
}
