//! Process-wide counters for the appliance, exposed at `GET /metrics` in
//! the OpenMetrics text format (which Prometheus scrapes) by the
//! `prometheus-client` crate.
//!
//! Every metric is an atomic, so the decision path can record without
//! contending with a scrape. Labels are fixed sets (the actions of
//! [`crate::request::Action`] and the three verdicts), every combination
//! present from the start; an action name outside the set is counted as
//! `other` rather than growing the label space.

use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

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

/// Alert sink label values.
const ALERT_SINKS: [&str; 2] = ["webhook", "syslog"];
/// Alert delivery results.
const ALERT_RESULTS: [&str; 3] = ["sent", "failed", "dropped"];

/// Verdict label values.
const VERDICTS: [&str; 3] = ["allow", "allow_with_conditions", "deny"];

/// Upper bounds of the decision latency histogram buckets, in microseconds.
/// The `+Inf` bucket is implicit.
const LATENCY_BUCKETS_US: [u64; 12] = [
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000,
];

/// Upper bounds of the buckets of the `Qualify` stage and audit commit
/// histograms, in microseconds (finer than [`LATENCY_BUCKETS_US`] around
/// the 5 ms goal of a decision through TLS).
const STAGE_BUCKETS_US: [u64; 18] = [
    50, 100, 200, 300, 500, 750, 1_000, 1_500, 2_000, 3_000, 4_000, 5_000, 7_500, 10_000, 25_000,
    50_000, 100_000, 1_000_000,
];

/// Upper bounds of the buckets of rows per audit commit.
const BATCH_BUCKETS: [u64; 11] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of one sample: `(name, value)` pairs.
type Labels<const N: usize> = [(&'static str, &'static str); N];

/// The appliance's metrics. Obtain the process-wide instance with [`metrics`];
/// tests may build a private one with [`Metrics::new`].
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    decisions: Family<Labels<2>, Counter>,
    would_deny: Family<Labels<1>, Counter>,
    latency: Histogram,
    cache_hits: Counter,
    cache_misses: Counter,
    keys_issued: Counter,
    enrolments: Family<Labels<1>, Counter>,
    agents_connected: Gauge<u64, AtomicU64>,
    agents_unsealed: Gauge<u64, AtomicU64>,
    limits_exceeded: Counter,
    refused: Family<Labels<1>, Counter>,
    alerts: Family<Labels<2>, Counter>,
    retention: Retention,
    stages: Stages,
}

/// Where a `Qualify` spends its time, and the audit writer's commits.
#[derive(Debug)]
struct Stages {
    qualify: Histogram,
    decide: Histogram,
    audit_wait: Histogram,
    commit: Histogram,
    batch_rows: Histogram,
}

impl Stages {
    fn new() -> Self {
        let seconds = || Histogram::new(STAGE_BUCKETS_US.iter().map(|us| *us as f64 / 1e6));
        Self {
            qualify: seconds(),
            decide: seconds(),
            audit_wait: seconds(),
            commit: seconds(),
            batch_rows: Histogram::new(BATCH_BUCKETS.iter().map(|n| *n as f64)),
        }
    }
}

/// Tables retention prunes (the `table` label).
pub const RETENTION_TABLES: [&str; 3] = ["audit", "channels", "agent_reports"];

/// Retention and disk metrics (`crate::retention`).
#[derive(Debug, Default)]
struct Retention {
    exported: Family<Labels<1>, Counter>,
    exported_bytes: Family<Labels<1>, Counter>,
    pruned: Family<Labels<1>, Counter>,
    forwarded: Family<Labels<1>, Counter>,
    audit_gap: Counter,
    export_files_removed: Counter,
    checkpoints_consolidated: Family<Labels<1>, Counter>,
    checkpoints: Gauge<u64, AtomicU64>,
    seals: Family<Labels<1>, Counter>,
    seal_epoch: Gauge<u64, AtomicU64>,
    disk_free: Gauge<u64, AtomicU64>,
    disk_size: Gauge<u64, AtomicU64>,
    db_bytes: Gauge<u64, AtomicU64>,
    export_bytes: Gauge<u64, AtomicU64>,
    alarm: Gauge<u64, AtomicU64>,
    reserve_released: Gauge<u64, AtomicU64>,
}

/// Why the network's demands were refused ([`Metrics::record_refused`]):
/// enrolment refusals past their rate, `Report` and `SignBundle` past the
/// host's quota, connections past a port's admission limits, push streams
/// ended for falling behind, learning mode's observations past its
/// pending map (`learn_pending`) or its table's caps (`learn_cap`).
pub const REFUSALS: [&str; 9] = [
    "enrol_rate",
    "report_quota",
    "bundle_quota",
    "connection",
    "slow_stream",
    "learn_pending",
    "learn_cap",
    // A channel half naming an address its host does not own (T-68).
    "channel_address",
    // A channel half past its host's share of the correlator (T-71).
    "channel_share",
];

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

/// `action` if it is one of [`ACTIONS`], else `other`.
fn action_label(action: &str) -> &'static str {
    ACTIONS
        .iter()
        .find(|a| **a == action)
        .copied()
        .unwrap_or("other")
}

/// `verdict` if it is one of [`VERDICTS`], else `deny`.
fn verdict_label(verdict: &str) -> &'static str {
    VERDICTS
        .iter()
        .find(|v| **v == verdict)
        .copied()
        .unwrap_or("deny")
}

/// The labels of an alert sample, if `sink` and `result` are known values.
fn alert_labels(sink: &str, result: &str) -> Option<Labels<2>> {
    let s = ALERT_SINKS.iter().find(|x| **x == sink)?;
    let r = ALERT_RESULTS.iter().find(|x| **x == result)?;
    Some([("sink", s), ("result", r)])
}

impl Metrics {
    /// A fresh set of metrics, all zero.
    pub fn new() -> Self {
        let m = Self {
            registry: Registry::default(),
            decisions: Family::default(),
            would_deny: Family::default(),
            latency: Histogram::new(LATENCY_BUCKETS_US.iter().map(|us| *us as f64 / 1e6)),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            keys_issued: Counter::default(),
            enrolments: Family::default(),
            agents_connected: Gauge::default(),
            agents_unsealed: Gauge::default(),
            limits_exceeded: Counter::default(),
            refused: Family::default(),
            alerts: Family::default(),
            retention: Retention::default(),
            stages: Stages::new(),
        };
        for t in RETENTION_TABLES {
            let _ = m.retention.exported.get_or_create(&[("table", t)]);
            let _ = m.retention.exported_bytes.get_or_create(&[("table", t)]);
            let _ = m.retention.pruned.get_or_create(&[("table", t)]);
        }
        for result in ["sent", "failed", "dropped"] {
            let _ = m.retention.forwarded.get_or_create(&[("result", result)]);
        }
        for result in ["merged", "refused"] {
            let _ = m
                .retention
                .checkpoints_consolidated
                .get_or_create(&[("result", result)]);
        }
        for result in ["ok", "failed"] {
            let _ = m.retention.seals.get_or_create(&[("result", result)]);
        }
        for reason in REFUSALS {
            let _ = m.refused.get_or_create(&[("reason", reason)]);
        }
        // Every label combination from the start, so each series exists
        // (at 0) before its first event.
        for action in ACTIONS {
            for verdict in VERDICTS {
                let _ = m
                    .decisions
                    .get_or_create(&[("action", action), ("verdict", verdict)]);
            }
            let _ = m.would_deny.get_or_create(&[("action", action)]);
        }
        for result in ["ok", "failed"] {
            let _ = m.enrolments.get_or_create(&[("result", result)]);
        }
        for sink in ALERT_SINKS {
            for result in ALERT_RESULTS {
                let _ = m
                    .alerts
                    .get_or_create(&[("sink", sink), ("result", result)]);
            }
        }
        let mut m = m;
        let r = &mut m.registry;
        // Counter names get their `_total` suffix from the encoder.
        r.register(
            "trustbind_decisions",
            "Qualification decisions by action and verdict",
            m.decisions.clone(),
        );
        r.register(
            "trustbind_would_deny",
            "Allows in audit mode that enforce mode would deny",
            m.would_deny.clone(),
        );
        r.register(
            "trustbind_decision_duration_seconds",
            "Time to reach a decision",
            m.latency.clone(),
        );
        for (name, help, counter) in [
            ("trustbind_cache_hits", "Decision cache hits", &m.cache_hits),
            (
                "trustbind_cache_misses",
                "Decision cache misses",
                &m.cache_misses,
            ),
            (
                "trustbind_keys_issued",
                "Channel keys issued",
                &m.keys_issued,
            ),
            (
                "trustbind_limits_exceeded",
                "License limits exceeded",
                &m.limits_exceeded,
            ),
        ] {
            r.register(name, help, counter.clone());
        }
        r.register(
            "trustbind_enrolments",
            "Enrolment attempts by result",
            m.enrolments.clone(),
        );
        r.register(
            "trustbind_refused",
            "Demands refused by the appliance's bounds, by reason",
            m.refused.clone(),
        );
        r.register(
            "trustbind_alerts",
            "Alerts by sink and result (sent, failed after retries, dropped on a full queue)",
            m.alerts.clone(),
        );
        r.register(
            "trustbind_agents_connected",
            "Agents connected now",
            m.agents_connected.clone(),
        );
        r.register(
            "trustbind_agents_unsealed",
            "Connected agents whose module has no session with this appliance (loaded without its authority key): root on those hosts can switch enforcement off",
            m.agents_unsealed.clone(),
        );
        let st = &m.stages;
        for (name, help, h) in [
            (
                "trustbind_qualify_seconds",
                "Qualify calls: from the handler's start to the reply (TLS and HTTP/2 not included)",
                &st.qualify,
            ),
            (
                "trustbind_qualify_decide_seconds",
                "Qualify calls: deciding the batch, the wait for a blocking thread included",
                &st.decide,
            ),
            (
                "trustbind_audit_wait_seconds",
                "Qualify calls: waiting for the batch's audit rows to commit (queue and commit)",
                &st.audit_wait,
            ),
            (
                "trustbind_audit_commit_seconds",
                "Audit writer: one transaction of queued rows, fsync included",
                &st.commit,
            ),
            (
                "trustbind_audit_batch_rows",
                "Audit writer: rows per transaction",
                &st.batch_rows,
            ),
        ] {
            r.register(name, help, h.clone());
        }
        let t = &m.retention;
        r.register(
            "trustbind_retention_exported_rows",
            "Rows exported to the retention files before pruning, by table",
            t.exported.clone(),
        );
        r.register(
            "trustbind_retention_exported_bytes",
            "Bytes written to the retention files, by table",
            t.exported_bytes.clone(),
        );
        r.register(
            "trustbind_retention_pruned_rows",
            "Rows pruned after export, by table",
            t.pruned.clone(),
        );
        r.register(
            "trustbind_retention_forwarded",
            "Exported audit rows forwarded to the syslog receiver, by result (sent, failed after retries, dropped on a full queue)",
            t.forwarded.clone(),
        );
        r.register(
            "trustbind_retention_export_files_removed",
            "Oldest export files removed to keep the export budget",
            t.export_files_removed.clone(),
        );
        r.register(
            "trustbind_retention_checkpoints_consolidated",
            "Consolidations of the oldest audit checkpoints into one, by result (merged; refused: they did not verify and were kept)",
            t.checkpoints_consolidated.clone(),
        );
        r.register(
            "trustbind_audit_seals",
            "Forward-secure seals of the audit log by result (failed: logged as AUDIT SEAL FAILED)",
            t.seals.clone(),
        );
        r.register(
            "trustbind_audit_gap_events",
            "Events answered but not audited because the data partition was full",
            t.audit_gap.clone(),
        );
        for (name, help, g) in [
            (
                "trustbind_data_free_bytes",
                "Free bytes on the data partition (for unprivileged writers)",
                &t.disk_free,
            ),
            (
                "trustbind_data_size_bytes",
                "Size of the data partition's file system",
                &t.disk_size,
            ),
            (
                "trustbind_database_bytes",
                "Bytes of the database in use by rows (free pages excluded)",
                &t.db_bytes,
            ),
            (
                "trustbind_retention_export_file_bytes",
                "Bytes of the retention export files kept",
                &t.export_bytes,
            ),
            (
                "trustbind_audit_checkpoints",
                "Audit checkpoints stored (bounded by consolidation)",
                &t.checkpoints,
            ),
            (
                "trustbind_audit_seal_epoch",
                "Epoch of the last forward-secure seal this daemon made",
                &t.seal_epoch,
            ),
            (
                "trustbind_disk_alarm",
                "1 while the data partition is nearly full",
                &t.alarm,
            ),
            (
                "trustbind_disk_reserve_released",
                "1 while the space reserve is released (the disk was full)",
                &t.reserve_released,
            ),
        ] {
            r.register(name, help, g.clone());
        }
        m
    }

    /// Counts `n` rows of `table` exported (`bytes` written).
    pub fn record_exported(&self, table: &'static str, n: u64, bytes: u64) {
        self.retention
            .exported
            .get_or_create(&[("table", table)])
            .inc_by(n);
        self.retention
            .exported_bytes
            .get_or_create(&[("table", table)])
            .inc_by(bytes);
    }

    /// Counts `n` rows of `table` pruned.
    pub fn record_pruned(&self, table: &'static str, n: u64) {
        self.retention
            .pruned
            .get_or_create(&[("table", table)])
            .inc_by(n);
    }

    /// Rows of `table` pruned so far (tests).
    pub fn pruned(&self, table: &'static str) -> u64 {
        self.retention
            .pruned
            .get_or_create(&[("table", table)])
            .get()
    }

    /// Counts one exported audit row forwarded with `result` (`sent`,
    /// `failed`, `dropped`).
    pub fn record_forwarded(&self, result: &'static str) {
        self.retention
            .forwarded
            .get_or_create(&[("result", result)])
            .inc();
    }

    /// Counts one export file removed to keep the budget.
    pub fn record_export_file_removed(&self) {
        self.retention.export_files_removed.inc();
    }

    /// Counts one consolidation of audit checkpoints with `result`
    /// (`merged`, `refused`).
    pub fn record_checkpoints_consolidated(&self, result: &'static str) {
        self.retention
            .checkpoints_consolidated
            .get_or_create(&[("result", result)])
            .inc();
    }

    /// Consolidations with `result` so far (tests).
    pub fn checkpoints_consolidated(&self, result: &'static str) -> u64 {
        self.retention
            .checkpoints_consolidated
            .get_or_create(&[("result", result)])
            .get()
    }

    /// Counts one seal of the audit log (`ok` with its epoch, or `failed`).
    pub fn record_seal(&self, epoch: Option<u64>) {
        let result = if epoch.is_some() { "ok" } else { "failed" };
        self.retention
            .seals
            .get_or_create(&[("result", result)])
            .inc();
        if let Some(e) = epoch {
            self.retention.seal_epoch.set(e);
        }
    }

    /// Seals counted with `result` (`ok`, `failed`).
    pub fn seals(&self, result: &'static str) -> u64 {
        self.retention
            .seals
            .get_or_create(&[("result", result)])
            .get()
    }

    /// Sets the number of audit checkpoints stored.
    pub fn set_audit_checkpoints(&self, n: u64) {
        self.retention.checkpoints.set(n);
    }

    /// Counts `n` events not audited (disk full).
    pub fn record_audit_gap(&self, n: u64) {
        self.retention.audit_gap.inc_by(n);
    }

    /// Events not audited so far (tests).
    pub fn audit_gap(&self) -> u64 {
        self.retention.audit_gap.get()
    }

    /// Sets the disk gauges.
    pub fn set_disk(&self, free: u64, size: u64, db: u64, exports: u64) {
        self.retention.disk_free.set(free);
        self.retention.disk_size.set(size);
        self.retention.db_bytes.set(db);
        self.retention.export_bytes.set(exports);
    }

    /// Sets the disk alarm and the reserve flags.
    pub fn set_disk_alarm(&self, alarm: bool, reserve_released: bool) {
        self.retention.alarm.set(u64::from(alarm));
        self.retention
            .reserve_released
            .set(u64::from(reserve_released));
    }

    /// Whether the disk alarm is raised (tests).
    pub fn disk_alarm(&self) -> bool {
        self.retention.alarm.get() != 0
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
        let action = action_label(action);
        self.decisions
            .get_or_create(&[("action", action), ("verdict", verdict_label(verdict))])
            .inc();
        if would_deny {
            self.would_deny.get_or_create(&[("action", action)]).inc();
        }
        self.latency.observe(elapsed.as_secs_f64());
    }

    /// Times one `Qualify` call: `total` from the handler's start to the
    /// reply, `decide` of it deciding, `audit` of it waiting for the commit.
    pub fn record_qualify(&self, total: Duration, decide: Duration, audit: Duration) {
        self.stages.qualify.observe(total.as_secs_f64());
        self.stages.decide.observe(decide.as_secs_f64());
        self.stages.audit_wait.observe(audit.as_secs_f64());
    }

    /// Times one audit transaction of `rows` rows.
    pub fn record_audit_commit(&self, elapsed: Duration, rows: usize) {
        self.stages.commit.observe(elapsed.as_secs_f64());
        self.stages.batch_rows.observe(rows as f64);
    }

    /// Counts one decision-cache lookup.
    pub fn record_cache(&self, hit: bool) {
        if hit {
            self.cache_hits.inc();
        } else {
            self.cache_misses.inc();
        }
    }

    /// Counts one channel key issued.
    pub fn record_key_issued(&self) {
        self.keys_issued.inc();
    }

    /// Counts one enrolment attempt, successful or not.
    pub fn record_enrolment(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.enrolments.get_or_create(&[("result", result)]).inc();
    }

    /// Counts one demand refused by a bound; `reason` is one of
    /// [`REFUSALS`] (anything else is not counted).
    pub fn record_refused(&self, reason: &str) {
        if let Some(r) = REFUSALS.iter().find(|r| **r == reason) {
            self.refused.get_or_create(&[("reason", *r)]).inc();
        }
    }

    /// Count of refusals for `reason` (tests).
    pub fn refused(&self, reason: &str) -> u64 {
        REFUSALS
            .iter()
            .find(|r| **r == reason)
            .map_or(0, |r| self.refused.get_or_create(&[("reason", *r)]).get())
    }

    /// Counts one license limit exceeded (see `crate::limits`).
    pub fn record_limit_exceeded(&self) {
        self.limits_exceeded.inc();
    }

    /// Counts one alert for `sink` (`webhook`, `syslog`) with `result`
    /// (`sent`, `failed`, `dropped`); other values are not counted.
    pub fn record_alert(&self, sink: &str, result: &str) {
        if let Some(l) = alert_labels(sink, result) {
            self.alerts.get_or_create(&l).inc();
        }
    }

    /// Alerts counted for `sink` with `result` (for tests).
    pub fn alerts(&self, sink: &str, result: &str) -> u64 {
        alert_labels(sink, result).map_or(0, |l| self.alerts.get_or_create(&l).get())
    }

    /// Sets the number of agents currently connected (a gauge).
    pub fn set_agents_connected(&self, n: u64) {
        self.agents_connected.set(n);
    }

    /// Sets the number of connected agents whose module is not sealed
    /// (no `module_session` in their `Hello`; a gauge).
    pub fn set_agents_unsealed(&self, n: u64) {
        self.agents_unsealed.set(n);
    }

    /// Total decisions recorded for `action` with `verdict` (for tests and the CLI).
    pub fn decisions(&self, action: &str, verdict: &str) -> u64 {
        if !VERDICTS.contains(&verdict) {
            return 0;
        }
        self.decisions
            .get_or_create(&[
                ("action", action_label(action)),
                ("verdict", verdict_label(verdict)),
            ])
            .get()
    }

    /// Renders every metric in the OpenMetrics text format ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
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
        assert!(t.contains("trustbind_decision_duration_seconds_bucket{le=\"1.0\"} 2\n"));
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
        m.set_agents_unsealed(2);
        let t = m.render();
        assert!(t.contains("trustbind_agents_unsealed 2\n"), "{t}");
        assert!(t.contains("# TYPE trustbind_agents_connected gauge\n"));
    }

    #[test]
    fn every_sample_line_is_well_formed() {
        let m = Metrics::new();
        m.record_decision("accept", "deny", false, Duration::from_millis(3));
        let text = m.render();
        // OpenMetrics: the exposition ends with `# EOF`.
        assert!(text.ends_with("\n# EOF\n"), "{text}");
        for l in text.lines() {
            if l.starts_with('#') {
                assert!(
                    l.starts_with("# HELP ") || l.starts_with("# TYPE ") || l == "# EOF",
                    "{l}"
                );
                continue;
            }
            let (name, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("{l}"));
            assert!(name.starts_with("trustbind_"), "{l}");
            assert!(value.parse::<f64>().is_ok(), "{l}");
        }
    }

    #[test]
    fn sample_names_are_stable() {
        // The names scraped before the move to prometheus-client
        // (appliance/API.md), each present from the start.
        let text = Metrics::new().render();
        let names: std::collections::BTreeSet<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split(['{', ' ']).next().unwrap_or(""))
            .collect();
        let expected = [
            "trustbind_agents_connected",
            "trustbind_agents_unsealed",
            "trustbind_alerts_total",
            "trustbind_audit_batch_rows_bucket",
            "trustbind_audit_batch_rows_count",
            "trustbind_audit_batch_rows_sum",
            "trustbind_audit_checkpoints",
            "trustbind_audit_commit_seconds_bucket",
            "trustbind_audit_commit_seconds_count",
            "trustbind_audit_commit_seconds_sum",
            "trustbind_audit_gap_events_total",
            "trustbind_audit_seal_epoch",
            "trustbind_audit_seals_total",
            "trustbind_audit_wait_seconds_bucket",
            "trustbind_audit_wait_seconds_count",
            "trustbind_audit_wait_seconds_sum",
            "trustbind_cache_hits_total",
            "trustbind_cache_misses_total",
            "trustbind_data_free_bytes",
            "trustbind_data_size_bytes",
            "trustbind_database_bytes",
            "trustbind_decision_duration_seconds_bucket",
            "trustbind_decision_duration_seconds_count",
            "trustbind_decision_duration_seconds_sum",
            "trustbind_decisions_total",
            "trustbind_disk_alarm",
            "trustbind_disk_reserve_released",
            "trustbind_enrolments_total",
            "trustbind_keys_issued_total",
            "trustbind_limits_exceeded_total",
            "trustbind_qualify_decide_seconds_bucket",
            "trustbind_qualify_decide_seconds_count",
            "trustbind_qualify_decide_seconds_sum",
            "trustbind_qualify_seconds_bucket",
            "trustbind_qualify_seconds_count",
            "trustbind_qualify_seconds_sum",
            "trustbind_refused_total",
            "trustbind_retention_checkpoints_consolidated_total",
            "trustbind_retention_export_file_bytes",
            "trustbind_retention_export_files_removed_total",
            "trustbind_retention_exported_bytes_total",
            "trustbind_retention_exported_rows_total",
            "trustbind_retention_forwarded_total",
            "trustbind_retention_pruned_rows_total",
            "trustbind_would_deny_total",
        ];
        assert_eq!(names.into_iter().collect::<Vec<_>>(), expected, "{text}");
        let series = |prefix: &str| text.lines().filter(|l| l.starts_with(prefix)).count();
        assert_eq!(
            series("trustbind_decisions_total{"),
            ACTIONS.len() * VERDICTS.len()
        );
        assert_eq!(series("trustbind_would_deny_total{"), ACTIONS.len());
        assert_eq!(series("trustbind_enrolments_total{"), 2);
        assert_eq!(series("trustbind_refused_total{"), REFUSALS.len());
        assert_eq!(
            series("trustbind_alerts_total{"),
            ALERT_SINKS.len() * ALERT_RESULTS.len()
        );
        assert_eq!(
            series("trustbind_decision_duration_seconds_bucket{"),
            LATENCY_BUCKETS_US.len() + 1
        );
    }

    #[test]
    fn global_instance_is_shared() {
        let before = metrics().decisions("rename", "deny");
        metrics().record_decision("rename", "deny", false, Duration::ZERO);
        assert!(metrics().decisions("rename", "deny") > before);
        assert!(std::ptr::eq(metrics(), metrics()));
    }
}
