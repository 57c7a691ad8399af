//! The fleet load generator (`benches/fleet/`), short: 20 agents for 5 s
//! against a real `trustbind-appliance serve` on 127.0.0.1. Fails unless
//! every agent enrolled and stayed connected, decisions came back, channel
//! pairs got their keys pushed to both ends, nothing failed, and every
//! answered decision has its audit row (`--check-audit`).

#[allow(dead_code)]
#[path = "../benches/fleet/generator.rs"]
mod generator;

#[test]
fn twenty_agents_for_five_seconds_get_decisions() {
    let opts = generator::Options {
        agents: 20,
        seconds: 5,
        concurrency: 8,
        // Pairs often enough to see some in 5 s.
        mix: generator::Options::parse(&[
            "--mix".into(),
            "exec=70,connect=10,pair=10,report=5,sign=3,reconnect=2".into(),
        ])
        .unwrap()
        .unwrap()
        .mix,
        check_audit: true,
        ..generator::Options::default()
    };
    let r = generator::run(opts, env!("CARGO_BIN_EXE_trustbind-appliance").as_ref())
        .unwrap_or_else(|e| panic!("fleet run failed: {e}"));
    println!("{r}");
    assert_eq!(r.enrolled, 20, "{r}");
    assert_eq!(r.connected_at_start, 20, "{r}");
    // Every agent is connected at the end, or in the middle of one of the
    // mix's deliberate reconnects (never dropped by the appliance).
    assert_eq!(r.connected_end + r.reconnecting_end, 20, "{r}");
    assert!(r.decisions > 100, "{r}");
    assert!(
        r.allowed > 0 && r.denied > 0,
        "cold hashes are denied, known ones allowed: {r}"
    );
    assert!(r.pairs > 0 && r.keys >= r.pairs, "{r}");
    assert!(r.errors.is_empty(), "{r}");
    assert!(r.exited.is_none(), "{r}");
    assert!(r.end.rss_kib > 0 && r.end.fds > 20, "{r}");
    let rows = r.audit_rows.unwrap_or(0);
    assert!(rows >= r.decisions, "every decision is audited: {r}");
    // Every answered decision and report record has its row, by id.
    let a = r.audit.as_ref().expect("the audit was checked");
    assert!(
        a.acked.get("decisions").copied().unwrap_or(0) >= r.decisions,
        "{r}"
    );
    assert_eq!(r.failure(), None, "{r}");
}

#[test]
fn only_loopback() {
    let e = generator::Options::parse(&["--listen".into(), "0.0.0.0".into()]).unwrap_err();
    assert!(e.contains("not loopback"), "{e}");
    assert!(generator::Options::parse(&["--listen".into(), "::1".into()]).is_ok());
}
