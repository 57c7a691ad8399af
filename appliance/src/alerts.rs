//! Alert delivery: every audited decision whose determining policies carry
//! `@alert("NAME")` goes to the configured sinks, an HTTPS webhook (a JSON
//! body per alert) and syslog over TLS (RFC 5424 messages, RFC 5425
//! octet-counting framing).
//!
//! The decision path only queues: [`Alerts::send`] puts the alert on each
//! sink's bounded queue with `try_send` and returns; a full queue drops the
//! alert, counts it (`trustbind_alerts_total{sink,result="dropped"}`) and
//! logs it (the first drop, then at most one summary line per
//! [`DROP_LOG_INTERVAL`]). Each sink runs one task that delivers in order,
//! retrying a failed delivery with exponential backoff and jitter
//! (`backon`) before counting it `failed` and logging it.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::metrics;
use crate::policy::{Outcome, Verdict};
use crate::request::{QualifyRequest, Target};

/// Default length of each sink's queue.
pub const DEFAULT_QUEUE: u32 = 1024;

/// Least time between two log lines about dropped alerts.
pub const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The default syslog-over-TLS port (RFC 5425).
pub const SYSLOG_TLS_PORT: u16 = 6514;

/// The structured-data id of the alert parameters in syslog messages.
/// 32473 is the private enterprise number IANA reserves for documentation
/// (RFC 5612): Trustbind has none of its own.
pub const SD_ID: &str = "trustbind@32473";

/// One alert, as the webhook's JSON body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Alert {
    /// The `@alert` name.
    pub alert: String,
    /// The host that asked.
    pub host: String,
    /// The user on the host.
    pub user: String,
    /// The program's SHA-256.
    pub program: String,
    /// The program's path on the host.
    pub path: String,
    /// The action (`exec`, `connect`, …).
    pub action: String,
    /// What the action applied to: the program's path for `exec`, the file
    /// for file actions, `ADDR:PORT/PROTO` for network actions.
    pub resource: String,
    /// `allow`, `deny`, or `would_deny` (permissive mode, allowed).
    pub decision: String,
    /// The determining policies (`@id`s).
    pub policies: Vec<String>,
    /// The decision's audit row.
    pub audit_seq: i64,
    /// Appliance time of the request, milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// The verdict generation.
    pub generation: i64,
}

impl Alert {
    /// The alerts of one decision (one per `@alert` name of `outcome`),
    /// audited as row `audit_seq`.
    pub fn of(
        req: &QualifyRequest,
        outcome: &Outcome,
        generation: i64,
        audit_seq: i64,
    ) -> Vec<Alert> {
        let decision = match (&outcome.verdict, outcome.would_deny) {
            (Verdict::Deny, _) => "deny",
            (_, true) => "would_deny",
            _ => "allow",
        };
        let resource = match &req.target {
            Target::Exec { .. } => req.program.path.clone(),
            Target::File { path, .. } => path.clone(),
            Target::Net(t) => format!("{}:{}/{}", t.dst_addr, t.dst_port, t.proto.as_str()),
        };
        outcome
            .alerts
            .iter()
            .map(|name| Alert {
                alert: name.clone(),
                host: req.host.clone(),
                user: req.subject.user.clone(),
                program: req.program.sha256.clone(),
                path: req.program.path.clone(),
                action: req.action.as_str().to_owned(),
                resource: resource.clone(),
                decision: decision.to_owned(),
                policies: outcome.reasons.clone(),
                audit_seq,
                at_ms: req.at_ms,
                generation,
            })
            .collect()
    }
}

/// Why the alert sinks could not be set up; names the offending option.
#[derive(Debug, thiserror::Error)]
#[error("{option} `{value}`: {why}")]
pub struct AlertConfigError {
    /// The option (`--alert-webhook`, …).
    pub option: &'static str,
    /// Its value.
    pub value: String,
    /// What is wrong.
    pub why: String,
}

fn bad(option: &'static str, value: &str, why: impl Into<String>) -> AlertConfigError {
    AlertConfigError {
        option,
        value: value.to_owned(),
        why: why.into(),
    }
}

/// How deliveries are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// First wait.
    pub min_delay: Duration,
    /// Longest wait.
    pub max_delay: Duration,
    /// Retries after the first attempt.
    pub max_times: usize,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            min_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            max_times: 6,
        }
    }
}

impl Retry {
    fn backoff(self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_max_times(self.max_times)
    }
}

/// Where alerts go.
#[derive(Debug, Clone)]
pub enum Sink {
    /// POST the JSON body to this HTTPS URL.
    Webhook {
        /// The URL.
        url: reqwest::Url,
        /// Trusted roots for the server's certificate.
        tls: Arc<rustls::ClientConfig>,
    },
    /// RFC 5424 messages over TLS, octet-counted (RFC 5425).
    Syslog {
        /// `HOST:PORT` to connect to.
        addr: String,
        /// The name the server's certificate must carry.
        server_name: ServerName<'static>,
        /// Trusted roots for the server's certificate.
        tls: Arc<rustls::ClientConfig>,
        /// HOSTNAME of the messages (this appliance's).
        hostname: String,
    },
}

impl std::fmt::Display for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sink::Webhook { url, .. } => write!(f, "webhook {url}"),
            Sink::Syslog { addr, .. } => write!(f, "syslog over TLS {addr}"),
        }
    }
}

impl Sink {
    fn label(&self) -> &'static str {
        match self {
            Sink::Webhook { .. } => "webhook",
            Sink::Syslog { .. } => "syslog",
        }
    }

    /// A webhook sink: `url` must be `https://`; `ca` is a PEM file of the
    /// certificates the server's must chain to (the appliance has no
    /// system trust store).
    pub fn webhook(url: &str, ca: Option<&Path>) -> Result<Sink, AlertConfigError> {
        const OPT: &str = "--alert-webhook";
        let u = reqwest::Url::parse(url).map_err(|e| bad(OPT, url, e.to_string()))?;
        if u.scheme() != "https" {
            return Err(bad(OPT, url, "must be an https:// URL"));
        }
        if u.host_str().is_none() {
            return Err(bad(OPT, url, "has no host"));
        }
        let ca = ca.ok_or_else(|| {
            bad(
                OPT,
                url,
                "needs --alert-webhook-ca FILE, the CA certificates (PEM) the server's certificate chains to",
            )
        })?;
        Ok(Sink::Webhook {
            url: u,
            tls: client_tls("--alert-webhook-ca", ca)?,
        })
    }

    /// A syslog-over-TLS sink to `HOST[:PORT]` (port 6514 by default);
    /// `ca` as for [`Sink::webhook`]; `hostname` goes into each message.
    pub fn syslog(addr: &str, ca: Option<&Path>, hostname: &str) -> Result<Sink, AlertConfigError> {
        const OPT: &str = "--alert-syslog";
        let (host, port) = split_host_port(addr).map_err(|why| bad(OPT, addr, why))?;
        if host.is_empty() {
            return Err(bad(OPT, addr, "has no host"));
        }
        let server_name = ServerName::try_from(host.to_owned())
            .map_err(|e| bad(OPT, addr, format!("`{host}` is no host name: {e}")))?;
        let ca = ca.ok_or_else(|| {
            bad(
                OPT,
                addr,
                "needs --alert-syslog-ca FILE, the CA certificates (PEM) the server's certificate chains to",
            )
        })?;
        let addr = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Sink::Syslog {
            addr,
            server_name,
            tls: client_tls("--alert-syslog-ca", ca)?,
            hostname: syslog_name(hostname),
        })
    }
}

/// `HOST`, `HOST:PORT`, `[V6]`, `[V6]:PORT` or a bare IPv6 address; the
/// port defaults to [`SYSLOG_TLS_PORT`].
fn split_host_port(addr: &str) -> Result<(&str, u16), String> {
    let port = |p: &str| match p.parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("port `{p}` is not 1 to 65535")),
    };
    if let Some(rest) = addr.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| "`[` without `]`".to_owned())?;
        return match after.strip_prefix(':') {
            Some(p) => Ok((host, port(p)?)),
            None if after.is_empty() => Ok((host, SYSLOG_TLS_PORT)),
            None => Err(format!("`{after}` after the address")),
        };
    }
    match addr.split_once(':') {
        Some((h, p)) if !p.contains(':') => Ok((h, port(p)?)),
        _ => Ok((addr, SYSLOG_TLS_PORT)),
    }
}

/// A TLS client config trusting the certificates in the PEM file `ca`.
fn client_tls(
    option: &'static str,
    ca: &Path,
) -> Result<Arc<rustls::ClientConfig>, AlertConfigError> {
    let shown = ca.display().to_string();
    let pem = std::fs::read(ca).map_err(|e| bad(option, &shown, format!("cannot read: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| bad(option, &shown, format!("not PEM certificates: {e}")))?;
        roots
            .add(c)
            .map_err(|e| bad(option, &shown, format!("a certificate is unusable: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad(option, &shown, "holds no certificate"));
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad(option, &shown, e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// RFC 5424 HOSTNAME: printable US-ASCII, at most 255, `-` when empty.
fn syslog_name(s: &str) -> String {
    let n: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(255)
        .collect();
    if n.is_empty() {
        "-".to_owned()
    } else {
        n
    }
}

/// An SD-PARAM value with `"`, `\` and `]` escaped (RFC 5424 §6.3.3).
fn sd_escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The RFC 5424 message for `a`: facility 4 (security/authorization),
/// severity warning for a deny or would-deny, notice for an allow.
pub fn rfc5424(a: &Alert, hostname: &str, pid: u32) -> String {
    let severity = if a.decision == "allow" { 5 } else { 4 };
    let ts = jiff::Timestamp::from_millisecond(a.at_ms).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    let time = format!(
        "{}.{:03}Z",
        ts.strftime("%Y-%m-%dT%H:%M:%S"),
        a.at_ms.rem_euclid(1000)
    );
    let seq = a.audit_seq.to_string();
    let policies = a.policies.join(",");
    let params: [(&str, &str); 10] = [
        ("alert", &a.alert),
        ("host", &a.host),
        ("user", &a.user),
        ("program", &a.program),
        ("path", &a.path),
        ("action", &a.action),
        ("resource", &a.resource),
        ("decision", &a.decision),
        ("audit_seq", &seq),
        ("policies", &policies),
    ];
    let sd: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", sd_escape(v)))
        .collect();
    format!(
        "<{}>1 {time} {} trustbind {pid} alert [{SD_ID} {}] \u{feff}alert {}: {} {} {} by {} on {} (audit {})",
        4 * 8 + severity,
        syslog_name(hostname),
        sd.join(" "),
        a.alert,
        a.decision,
        a.action,
        a.resource,
        a.user,
        a.host,
        a.audit_seq,
    )
}

/// RFC 5425 octet counting: `MSG-LEN SP SYSLOG-MSG`.
pub fn frame(msg: &str) -> String {
    format!("{} {msg}", msg.len())
}

/// Dropped alerts since the last log line about them.
#[derive(Debug)]
struct DropLog {
    since_logged: AtomicU64,
    last: Mutex<Option<Instant>>,
}

impl DropLog {
    fn dropped(&self, sink: &str, a: &Alert) {
        metrics::metrics().record_alert(sink, "dropped");
        let n = self.since_logged.fetch_add(1, Ordering::Relaxed) + 1;
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        if last.is_some_and(|t| t.elapsed() < DROP_LOG_INTERVAL) {
            return;
        }
        *last = Some(Instant::now());
        self.since_logged.fetch_sub(n, Ordering::Relaxed);
        tracing::warn!(
            sink,
            dropped = n,
            alert = %a.alert,
            audit_seq = a.audit_seq,
            "alert queue full: {n} alert(s) dropped (this one: `{}` for audit row {})",
            a.alert,
            a.audit_seq
        );
    }
}

/// The sinks' queues. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Alerts {
    queues: Vec<(&'static str, mpsc::Sender<Arc<Alert>>)>,
    drops: Arc<DropLog>,
}

impl Alerts {
    /// No sinks: every alert is discarded (nothing is configured to get it).
    pub fn none() -> Self {
        Alerts {
            queues: Vec::new(),
            drops: Arc::new(DropLog {
                since_logged: AtomicU64::new(0),
                last: Mutex::new(None),
            }),
        }
    }

    /// Starts one delivery task per sink on the current tokio runtime (call
    /// from within one), each behind a queue of `queue` alerts.
    pub fn start(sinks: Vec<Sink>, queue: usize, retry: Retry) -> Self {
        let mut a = Alerts::none();
        for s in sinks {
            let (tx, rx) = mpsc::channel(queue.max(1));
            a.queues.push((s.label(), tx));
            match s {
                Sink::Webhook { url, tls } => {
                    tokio::spawn(webhook(url, tls, rx, retry));
                }
                Sink::Syslog {
                    addr,
                    server_name,
                    tls,
                    hostname,
                } => {
                    tokio::spawn(syslog(addr, server_name, tls, hostname, rx, retry));
                }
            }
        }
        a
    }

    /// Whether any sink is configured.
    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    /// Queues `a` for every sink without waiting; a full queue drops it
    /// (counted and logged).
    pub fn send(&self, a: Alert) {
        let a = Arc::new(a);
        for (sink, q) in &self.queues {
            match q.try_send(Arc::clone(&a)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(a)) => self.drops.dropped(sink, &a),
                Err(mpsc::error::TrySendError::Closed(a)) => {
                    metrics::metrics().record_alert(sink, "failed");
                    tracing::error!(
                        sink = *sink,
                        "alert `{}` for audit row {} not delivered: the sink's task has ended",
                        a.alert,
                        a.audit_seq
                    );
                }
            }
        }
    }
}

/// Counts and logs the end of one delivery.
fn delivered(sink: &'static str, a: &Alert, r: Result<(), String>) {
    match r {
        Ok(()) => metrics::metrics().record_alert(sink, "sent"),
        Err(e) => {
            metrics::metrics().record_alert(sink, "failed");
            tracing::warn!(
                sink,
                alert = %a.alert,
                audit_seq = a.audit_seq,
                "alert `{}` for audit row {} not delivered after retries: {e}",
                a.alert,
                a.audit_seq
            );
        }
    }
}

async fn webhook(
    url: reqwest::Url,
    tls: Arc<rustls::ClientConfig>,
    mut rx: mpsc::Receiver<Arc<Alert>>,
    retry: Retry,
) {
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(Arc::unwrap_or_clone(tls))
        .timeout(Duration::from_secs(10))
        .build();
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("alert webhook {url}: no HTTP client: {e}");
            return;
        }
    };
    while let Some(a) = rx.recv().await {
        let body = match serde_json::to_vec(&*a) {
            Ok(b) => b,
            Err(e) => {
                delivered("webhook", &a, Err(e.to_string()));
                continue;
            }
        };
        let post = || async {
            let r = client
                .post(url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone())
                .send()
                .await
                .map_err(|e| format!("POST {url}: {e}"))?;
            if r.status().is_success() {
                Ok(())
            } else {
                Err(format!("POST {url}: HTTP {}", r.status()))
            }
        };
        let r = post
            .retry(retry.backoff())
            .notify(|e, wait| tracing::debug!("alert webhook: {e}; again in {wait:?}"))
            .await;
        delivered("webhook", &a, r);
    }
}

type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn syslog(
    addr: String,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    hostname: String,
    rx: mpsc::Receiver<Arc<Alert>>,
    retry: Retry,
) {
    let pid = std::process::id();
    syslog_messages(
        SyslogTarget {
            addr,
            server_name,
            tls,
            what: "alert",
        },
        rx,
        retry,
        move |a: &Arc<Alert>| frame(&rfc5424(a, &hostname, pid)),
        |a: &Arc<Alert>, r| delivered("syslog", a, r),
    )
    .await;
}

/// Where a syslog-over-TLS task sends.
struct SyslogTarget {
    addr: String,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    /// What is sent, for the debug log (`alert`, `audit export`).
    what: &'static str,
}

/// Sends each item of `rx`, framed by `framed`, over one TLS connection
/// (made again after a failure), retrying each with `retry`'s backoff;
/// `done` hears how each ended.
async fn syslog_messages<T>(
    target: SyslogTarget,
    mut rx: mpsc::Receiver<T>,
    retry: Retry,
    framed: impl Fn(&T) -> String,
    done: impl Fn(&T, Result<(), String>),
) {
    let SyslogTarget {
        addr,
        server_name,
        tls,
        what,
    } = target;
    let connector = tokio_rustls::TlsConnector::from(tls);
    let conn: Arc<tokio::sync::Mutex<Option<TlsStream>>> = Arc::default();
    while let Some(item) = rx.recv().await {
        let framed = framed(&item);
        let send = || async {
            let mut c = conn.lock().await;
            if c.is_none() {
                let tcp = tokio::time::timeout(
                    Duration::from_secs(10),
                    tokio::net::TcpStream::connect(&addr),
                )
                .await
                .map_err(|_| format!("connect {addr}: timed out"))?
                .map_err(|e| format!("connect {addr}: {e}"))?;
                let s = connector
                    .connect(server_name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS with {addr}: {e}"))?;
                *c = Some(s);
            }
            let Some(s) = c.as_mut() else {
                return Err(format!("{addr}: no connection"));
            };
            let w = async {
                s.write_all(framed.as_bytes()).await?;
                s.flush().await
            };
            match w.await {
                Ok(()) => Ok(()),
                Err(e) => {
                    // The next attempt connects again.
                    *c = None;
                    Err(format!("write to {addr}: {e}"))
                }
            }
        };
        let r = send
            .retry(retry.backoff())
            .notify(|e, wait| tracing::debug!("{what} syslog: {e}; again in {wait:?}"))
            .await;
        done(&item, r);
    }
}

/// Exported audit rows on their way to a syslog receiver (retention's
/// forwarding): a bounded queue in front of the same sender as alerts.
#[derive(Debug, Clone)]
pub struct AuditForward {
    tx: mpsc::Sender<String>,
    hostname: String,
}

/// The RFC 5424 message for an exported audit row: facility 13 (log
/// audit), severity informational, MSGID `audit`, the row's sequence
/// number, kind, actor and hash as structured data and the row (the JSON
/// line of the export file) as the message.
pub fn rfc5424_audit(row: &crate::store::AuditRow, hostname: &str, pid: u32) -> String {
    let ts = jiff::Timestamp::from_millisecond(row.at_ms).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    let time = format!(
        "{}.{:03}Z",
        ts.strftime("%Y-%m-%dT%H:%M:%S"),
        row.at_ms.rem_euclid(1000)
    );
    let json = serde_json::to_string(row).unwrap_or_default();
    format!(
        "<{}>1 {time} {} trustbind {pid} audit [{SD_ID} audit_seq=\"{}\" kind=\"{}\" actor=\"{}\" hash=\"{}\"] \u{feff}{json}",
        13 * 8 + 6,
        syslog_name(hostname),
        row.seq,
        sd_escape(&row.kind),
        sd_escape(&row.actor),
        row.hash,
    )
}

impl AuditForward {
    /// Starts forwarding to `sink` (a syslog sink; `None` for a webhook)
    /// behind a queue of `queue` rows, on the current tokio runtime.
    pub fn start(sink: &Sink, queue: usize, retry: Retry) -> Option<Self> {
        let Sink::Syslog {
            addr,
            server_name,
            tls,
            hostname,
        } = sink
        else {
            return None;
        };
        let (tx, rx) = mpsc::channel::<String>(queue.max(1));
        tokio::spawn(syslog_messages(
            SyslogTarget {
                addr: addr.clone(),
                server_name: server_name.clone(),
                tls: Arc::clone(tls),
                what: "audit export",
            },
            rx,
            retry,
            |m: &String| m.clone(),
            |_, r: Result<(), String>| match r {
                Ok(()) => metrics::metrics().record_forwarded("sent"),
                Err(e) => {
                    metrics::metrics().record_forwarded("failed");
                    tracing::debug!("exported audit row not forwarded: {e}");
                }
            },
        ));
        Some(AuditForward {
            tx,
            hostname: hostname.clone(),
        })
    }

    /// Queues `row` without waiting; a full queue drops it (counted; the
    /// row is in the export file).
    pub fn send(&self, row: &crate::store::AuditRow) {
        let msg = frame(&rfc5424_audit(row, &self.hostname, std::process::id()));
        if self.tx.try_send(msg).is_err() {
            metrics::metrics().record_forwarded("dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert() -> Alert {
        Alert {
            alert: "soc".into(),
            host: "web1".into(),
            user: "bob".into(),
            program: "ab".repeat(32),
            path: "/usr/sbin/shut\"down]".into(),
            action: "exec".into(),
            resource: "/usr/sbin/shut\"down]".into(),
            decision: "deny".into(),
            policies: vec!["root-tools-only-for-admins".into()],
            audit_seq: 42,
            at_ms: 1_704_101_400_123,
            generation: 3,
        }
    }

    #[test]
    fn rfc5424_message_with_escaped_structured_data() {
        let m = rfc5424(&alert(), "tb appliance", 7);
        let expected = format!(
            "<36>1 2024-01-01T09:30:00.123Z tbappliance trustbind 7 alert [trustbind@32473 alert=\"soc\" host=\"web1\" user=\"bob\" program=\"{}\" path=\"/usr/sbin/shut\\\"down\\]\" action=\"exec\" resource=\"/usr/sbin/shut\\\"down\\]\" decision=\"deny\" audit_seq=\"42\" policies=\"root-tools-only-for-admins\"] \u{feff}alert soc: deny exec /usr/sbin/shut\"down] by bob on web1 (audit 42)",
            "ab".repeat(32)
        );
        assert_eq!(m, expected);
        let mut allow = alert();
        allow.decision = "allow".into();
        assert!(rfc5424(&allow, "", 1)
            .starts_with("<37>1 2024-01-01T09:30:00.123Z - trustbind 1 alert "));
    }

    #[test]
    fn frames_count_octets_not_characters() {
        assert_eq!(frame("<36>1 é"), "8 <36>1 é");
    }

    #[test]
    fn sink_options_are_checked_naming_the_option() {
        let e = Sink::webhook("http://x/", None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--alert-webhook `http://x/`: must be an https:// URL"
        );
        let e = Sink::webhook("https://x/", None).unwrap_err();
        assert!(
            e.to_string().contains("needs --alert-webhook-ca FILE"),
            "{e}"
        );
        let e = Sink::webhook("https://x/", Some(Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--alert-webhook-ca `/nonexistent/ca.pem`: cannot read"),
            "{e}"
        );
        let e = Sink::syslog("logs:99999", None, "h").unwrap_err();
        assert!(
            e.to_string().contains("port `99999` is not 1 to 65535"),
            "{e}"
        );
        let e = Sink::syslog("logs", None, "h").unwrap_err();
        assert!(
            e.to_string().contains("needs --alert-syslog-ca FILE"),
            "{e}"
        );
    }

    #[test]
    fn a_full_queue_drops_without_waiting_and_counts() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _g = rt.enter();
        let (tx, _rx) = mpsc::channel(1);
        let mut a = Alerts::none();
        a.queues.push(("webhook", tx));
        let before = metrics::metrics().alerts("webhook", "dropped");
        let t = Instant::now();
        for _ in 0..100 {
            a.send(alert());
        }
        assert!(t.elapsed() < Duration::from_millis(500));
        assert_eq!(metrics::metrics().alerts("webhook", "dropped") - before, 99);
    }
}
