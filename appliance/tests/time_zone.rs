//! `office-hours` in a named time zone: the engine reads `hour` and
//! `weekday` in the zone `serve --time-zone` sets (here Europe/Berlin),
//! daylight saving time included. Its own test binary: the zone is
//! process-wide.

use std::sync::Arc;

use trustbind_appliance::clock;
use trustbind_appliance::policy::engine::Engine;
use trustbind_appliance::policy::Verdict;
use trustbind_appliance::request::{Action, Program, QualifyRequest, Subject, Target};
use trustbind_appliance::store::{Mode, Signature, Store};

const SCHEMA: &str = include_str!("../../policies/trustbind.cedarschema");
const OFFICE_HOURS: &str = include_str!("../../policies/office-hours.cedar");

fn sha(c: char) -> String {
    std::iter::repeat_n(c, 64).collect()
}

fn at(utc: &str) -> i64 {
    utc.parse::<jiff::Timestamp>().unwrap().as_millisecond()
}

fn exec(prog: char, at_ms: i64) -> QualifyRequest {
    QualifyRequest {
        host: "db1".into(),
        action: Action::Exec,
        subject: Subject {
            user: "ops".into(),
            uid: 1000,
            euid: 1000,
            gid: 1000,
            loginuid: 1000,
            session: 1,
            pid: 42,
            ancestry: vec![],
        },
        program: Program {
            sha256: sha(prog),
            sha1: std::iter::repeat_n(prog, 40).collect(),
            size: 1,
            path: "/usr/bin/pg_dump".into(),
        },
        target: Target::Exec {
            loader_direct: false,
        },
        at_ms,
        peer: None,
    }
}

#[test]
fn office_hours_follow_berlin_across_the_dst_change() {
    assert!(clock::set_zone(clock::zone_named("Europe/Berlin").unwrap()));
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("appliance.db")).unwrap());
    store
        .set_host_group("db", Mode::Enforce, "admin:t")
        .unwrap();
    store
        .add_pending_host("db1", "db", &sha('a'), "admin:t")
        .unwrap();
    store
        .put_signature(
            &Signature {
                sha256: sha('7'),
                sha1: None,
                size: 1,
                name: "pg_dump".into(),
                source: "admin".into(),
            },
            "admin:t",
        )
        .unwrap();
    for g in ["system", "maintenance-tools"] {
        store.create_group(g, "", "admin:t").unwrap();
    }
    store
        .add_member("maintenance-tools", &sha('7'), "admin:t")
        .unwrap();
    let id = store
        .create_policy_draft(OFFICE_HOURS, "", "admin:t")
        .unwrap();
    store.activate_policy(id, "admin:t").unwrap();
    let e = Engine::new(store, SCHEMA).unwrap();
    let allowed = |utc: &str| {
        let d = e.decide(&exec('7', at(utc))).unwrap();
        !matches!(d.outcome.verdict, Verdict::Deny)
    };
    // Friday, CET (UTC+1): 06:30Z is 07:30, 16:30Z is 17:30, 17:30Z is 18:30.
    assert!(!allowed("2026-03-27T06:30:00Z"));
    assert!(allowed("2026-03-27T16:30:00Z"));
    assert!(!allowed("2026-03-27T17:30:00Z"));
    // Monday after the change, CEST (UTC+2): 06:30Z is 08:30, 16:30Z 18:30.
    assert!(allowed("2026-03-30T06:30:00Z"));
    assert!(!allowed("2026-03-30T16:30:00Z"));
    // Sunday 22:30Z is Monday 00:30 in Berlin: a weekday, but at night.
    assert!(!allowed("2026-03-29T22:30:00Z"));
    // Saturday 10:00 local is the weekend whatever the zone.
    assert!(!allowed("2026-03-28T09:00:00Z"));
}
