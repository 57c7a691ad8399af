//! Nothing acknowledged is lost when the appliance is killed under load
//! (issue 16 item 2): the fleet generator (`benches/fleet/`) runs 8 agents
//! against a real `trustbind-appliance serve` on 127.0.0.1, SIGKILLs it
//! twice mid-load and restarts it on the same data directory and ports;
//! then the appliance is stopped and its audit log checked: the chain
//! verifies (`trustbind-appliance audit verify`) and every decision and
//! report record an agent got an answer for has its row.
//!
//! An appliance that answered before its audit row committed fails here:
//! with every agent's next call sent as soon as the last is answered, a
//! kill almost always lands while some answered row is still waiting for
//! its commit.

#[allow(dead_code)]
#[path = "../benches/fleet/generator.rs"]
mod generator;

#[test]
fn killed_twice_under_load_loses_nothing_acknowledged() {
    let opts = generator::Options::parse(
        &[
            "--agents",
            "8",
            "--seconds",
            "10",
            "--concurrency",
            "8",
            "--kill-at",
            "2.5",
            "--kills",
            "2",
            // Exec and connect decisions, report records, some pairs.
            "--mix",
            "exec=75,connect=10,pair=5,report=10,sign=0,reconnect=0",
        ]
        .map(String::from),
    )
    .unwrap()
    .unwrap();
    assert!(opts.check_audit, "--kill-at implies the audit check");
    let r = generator::run(opts, env!("CARGO_BIN_EXE_trustbind-appliance").as_ref())
        .unwrap_or_else(|e| panic!("fleet run failed: {e}"));
    println!("{r}");
    assert_eq!(r.enrolled, 8, "{r}");
    assert_eq!(r.kills.len(), 2, "both kills done and restarted: {r}");
    // The restarted appliance served the fleet (so the rows after the
    // kills were checked too).
    assert!(
        r.kills.last().is_some_and(|k| !k.served_s.is_empty()),
        "agents were answered by the restarted appliance: {r}"
    );
    let a = r.audit.as_ref().expect("the audit was checked");
    assert!(a.verify_ok, "{r}");
    assert!(a.missing.is_empty(), "acknowledged and lost: {r}");
    assert!(
        a.acked.get("decisions").copied().unwrap_or(0) > 100,
        "decisions were acknowledged: {r}"
    );
    assert!(
        a.acked.get("report records").copied().unwrap_or(0) > 0,
        "report records were acknowledged: {r}"
    );
    assert_eq!(r.failure(), None, "{r}");
}
