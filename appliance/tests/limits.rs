//! License limits against a real SQLite store: each limit, revocation of
//! hosts and pairs, persistence of the call count across a restart.

use std::sync::{Arc, Mutex};

use trustbind_appliance::admin::Change;
use trustbind_appliance::limits::{LicenseKey, LimitExceeded, Limits};
use trustbind_appliance::store::{HostState, LicenseTerms, Mode, Store};

const T0: i64 = 1_800_000_000_000;

fn store(dir: &tempfile::TempDir) -> Arc<Store> {
    Arc::new(Store::open(&dir.path().join("a.db")).unwrap())
}

fn host(h: &str) -> LicenseKey {
    LicenseKey::Host { host: h.into() }
}

fn pair() -> LicenseKey {
    LicenseKey::Pair {
        client: "a".repeat(64),
        server: "b".repeat(64),
    }
}

fn enrolled(store: &Store, name: &str) {
    store.set_host_group("web", Mode::Enforce, "t").unwrap();
    let token_hash = "c".repeat(64);
    store
        .add_pending_host(name, "web", &token_hash, "t")
        .unwrap();
    store.enrol_host(name, &token_hash, "01").unwrap();
}

fn with_hook(l: Limits) -> (Limits, Arc<Mutex<Vec<Change>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = Arc::clone(&seen);
    (
        l.with_hook(Arc::new(move |c: &Change| {
            s2.lock().unwrap().push(c.clone())
        })),
        seen,
    )
}

fn kinds(store: &Store) -> Vec<String> {
    store
        .audit_rows(0, 10_000)
        .unwrap()
        .into_iter()
        .map(|r| r.kind)
        .collect()
}

#[test]
fn unlicensed_subjects_are_not_limited() {
    let dir = tempfile::tempdir().unwrap();
    let l = Limits::new(store(&dir)).unwrap();
    for i in 0..1000 {
        l.check(&host("free"), T0 + i).unwrap();
        l.check(&pair(), T0 + i).unwrap();
    }
}

#[test]
fn max_calls_revokes_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    enrolled(&s, "web1");
    let (l, seen) = with_hook(Limits::new(Arc::clone(&s)).unwrap());
    let terms = LicenseTerms {
        max_calls: Some(3),
        ..LicenseTerms::default()
    };
    l.set(&host("web1"), &terms, false, "admin:alice").unwrap();
    for i in 0..3 {
        l.check(&host("web1"), T0 + i).unwrap();
    }
    assert_eq!(s.host("web1").unwrap().unwrap().0, HostState::Enrolled);
    let e = l.check(&host("web1"), T0 + 3).unwrap_err();
    assert!(
        matches!(e, LimitExceeded::MaxCalls { max_calls: 3, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("host `web1`"), "{e}");
    assert_eq!(s.host("web1").unwrap().unwrap().0, HostState::Revoked);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![Change::HostRevoked {
            host: "web1".into()
        }]
    );
    let k = kinds(&s);
    assert!(k.contains(&"limit.exceeded".to_owned()), "{k:?}");
    assert!(k.contains(&"host.revoke".to_owned()), "{k:?}");
    // Refused from then on, and the listing says why.
    assert!(matches!(
        l.check(&host("web1"), T0 + 10_000_000),
        Err(LimitExceeded::Revoked { .. })
    ));
    let v = l.list().unwrap();
    assert_eq!(v[0].calls, 3);
    assert!(v[0].license.exceeded.as_ref().unwrap().contains("3 calls"));
    assert!(s.verify_audit().unwrap().is_ok());
}

#[test]
fn max_calls_survive_a_restart_exactly_when_small() {
    let dir = tempfile::tempdir().unwrap();
    {
        let l = Limits::new(store(&dir)).unwrap();
        let terms = LicenseTerms {
            max_calls: Some(10),
            ..LicenseTerms::default()
        };
        l.set(&pair(), &terms, false, "admin:alice").unwrap();
        for i in 0..4 {
            l.check(&pair(), T0 + i).unwrap();
        }
    }
    let l = Limits::new(store(&dir)).unwrap();
    let mut ok = 0;
    while l.check(&pair(), T0 + 100 + ok).is_ok() {
        ok += 1;
        assert!(ok <= 10, "the restart reset the count");
    }
    assert_eq!(ok, 6);
    // Still refused after another restart.
    let l = Limits::new(store(&dir)).unwrap();
    assert!(matches!(
        l.check(&pair(), T0 + 1000),
        Err(LimitExceeded::Revoked { .. })
    ));
}

#[test]
fn max_calls_survive_a_restart_conservatively_when_large() {
    let dir = tempfile::tempdir().unwrap();
    let terms = LicenseTerms {
        max_calls: Some(1000),
        ..LicenseTerms::default()
    };
    {
        let l = Limits::new(store(&dir)).unwrap();
        l.set(&pair(), &terms, false, "admin:alice").unwrap();
        for i in 0..5 {
            l.check(&pair(), T0 + i).unwrap();
        }
    }
    let l = Limits::new(store(&dir)).unwrap();
    let before = l.list().unwrap()[0].calls;
    assert!((5..=15).contains(&before), "{before}");
    let mut ok = 0;
    while l.check(&pair(), T0 + 100 + ok).is_ok() {
        ok += 1;
    }
    // Never more than the limit in all; at most one reservation (10) forfeited.
    assert!(ok + 5 <= 1000 && ok + 5 >= 990, "{ok}");
}

#[test]
fn time_window_refuses_early_and_revokes_late() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    enrolled(&s, "web1");
    let l = Limits::new(Arc::clone(&s)).unwrap();
    let terms = LicenseTerms {
        not_before_ms: Some(T0),
        not_after_ms: Some(T0 + 3_600_000),
        ..LicenseTerms::default()
    };
    l.set(&host("web1"), &terms, false, "admin:alice").unwrap();
    let e = l.check(&host("web1"), T0 - 1).unwrap_err();
    assert!(matches!(e, LimitExceeded::NotYetValid { .. }), "{e}");
    assert_eq!(s.host("web1").unwrap().unwrap().0, HostState::Enrolled);
    l.check(&host("web1"), T0).unwrap();
    l.check(&host("web1"), T0 + 3_599_999).unwrap();
    let e = l.check(&host("web1"), T0 + 3_600_000).unwrap_err();
    assert!(matches!(e, LimitExceeded::Expired { .. }), "{e}");
    assert_eq!(s.host("web1").unwrap().unwrap().0, HostState::Revoked);
}

#[test]
fn calls_per_minute_slide_and_an_excess_denies_the_pair_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let (l, seen) = with_hook(Limits::new(Arc::clone(&s)).unwrap());
    let terms = LicenseTerms {
        max_per_minute: Some(2),
        ..LicenseTerms::default()
    };
    l.set(&pair(), &terms, false, "admin:alice").unwrap();
    l.check(&pair(), T0).unwrap();
    l.check(&pair(), T0 + 30_000).unwrap();
    // The first call has left the window.
    l.check(&pair(), T0 + 60_000).unwrap();
    let e = l.check(&pair(), T0 + 61_000).unwrap_err();
    assert!(
        matches!(
            e,
            LimitExceeded::Rate {
                max_per_minute: 2,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(*seen.lock().unwrap(), vec![Change::Limits]);
    // Denied from then on, even when the rate is low again, and after a restart.
    assert!(l.check(&pair(), T0 + 3_600_000).is_err());
    drop(l);
    let l = Limits::new(Arc::clone(&s)).unwrap();
    assert!(matches!(
        l.check(&pair(), T0 + 7_200_000),
        Err(LimitExceeded::Revoked { .. })
    ));
    // Another pair is unaffected.
    let other = LicenseKey::Pair {
        client: "b".repeat(64),
        server: "a".repeat(64),
    };
    l.check(&other, T0).unwrap();

    // An admin reset re-activates it; removing the license unlimits it.
    let v = l.set(&pair(), &terms, true, "admin:alice").unwrap();
    assert_eq!((v.calls, v.license.exceeded.clone()), (0, None));
    l.check(&pair(), T0 + 7_200_000).unwrap();
    l.remove(v.license.id, "admin:alice").unwrap();
    for i in 0..10 {
        l.check(&pair(), T0 + 7_200_001 + i).unwrap();
    }
    let k = kinds(&s);
    for want in ["limit.set", "limit.exceeded", "limit.remove"] {
        assert!(k.contains(&want.to_owned()), "{want} in {k:?}");
    }
}

#[test]
fn a_crash_between_excess_and_revocation_is_repaired_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    enrolled(&s, "web1");
    let terms = LicenseTerms {
        max_calls: Some(1),
        ..LicenseTerms::default()
    };
    let row = s
        .put_license(&host("web1"), &terms, false, "admin:alice")
        .unwrap();
    // As if the appliance died right after persisting the excess.
    assert!(s.license_exceeded(row.id, "test excess").unwrap());
    assert_eq!(s.host("web1").unwrap().unwrap().0, HostState::Enrolled);
    let _l = Limits::new(Arc::clone(&s)).unwrap();
    assert_eq!(s.host("web1").unwrap().unwrap().0, HostState::Revoked);
}

#[test]
fn clock_jumps_neither_revoke_nor_trip_the_rate_limit() {
    use trustbind_appliance::limits::{LicenseTime, CLOCK_TOLERANCE_MS};
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    enrolled(&s, "web1");
    let l = Limits::new(Arc::clone(&s)).unwrap();
    let terms = LicenseTerms {
        not_after_ms: Some(T0 + 3_600_000),
        max_per_minute: Some(3),
        ..LicenseTerms::default()
    };
    l.set(&host("web1"), &terms, false, "admin:alice").unwrap();
    let at = |wall: i64, steady: i64| LicenseTime {
        wall_ms: T0 + wall,
        steady_ms: T0 + steady,
    };
    // The wall clock jumps two hours ahead, past the expiry; the monotonic
    // clock saw ten seconds: refused, not revoked.
    let e = l
        .check_at(&host("web1"), at(7_200_000, 10_000))
        .unwrap_err();
    assert!(matches!(e, LimitExceeded::ClockJump { .. }), "{e}");
    assert_eq!(s.host("web1").unwrap().unwrap().0, HostState::Enrolled);
    assert_eq!(l.list().unwrap()[0].license.exceeded, None);
    // The clock is set right again: calls go through.
    l.check_at(&host("web1"), at(20_000, 20_000)).unwrap();
    l.check_at(&host("web1"), at(21_000, 21_000)).unwrap();
    l.check_at(&host("web1"), at(22_000, 22_000)).unwrap();
    // It jumps an hour back: three calls a minute later (monotonic) are
    // within the rate, though the wall clock puts them beside the others.
    for i in 0..3 {
        l.check_at(&host("web1"), at(-3_600_000 + i, 90_000 + i))
            .unwrap();
    }
    assert_eq!(s.host("web1").unwrap().unwrap().0, HostState::Enrolled);
    // A real expiry, seen by both clocks (within the tolerance), revokes.
    let e = l
        .check_at(
            &host("web1"),
            at(3_600_000, 3_600_000 - CLOCK_TOLERANCE_MS + 1),
        )
        .unwrap_err();
    assert!(matches!(e, LimitExceeded::Expired { .. }), "{e}");
    assert_eq!(s.host("web1").unwrap().unwrap().0, HostState::Revoked);
}

/// Channel keys v2 (T-70): each holder has its own share of a license:
/// one holder's excess refuses only that holder and revokes nothing; the
/// license's other limits still hold; a reset gives every share back.
#[test]
fn each_holder_has_its_own_share_of_a_license() {
    use trustbind_appliance::limits::LicenseTime;
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let (l, seen) = with_hook(Limits::new(Arc::clone(&s)).unwrap());
    let terms = LicenseTerms {
        max_calls: Some(2),
        ..LicenseTerms::default()
    };
    l.set(&pair(), &terms, false, "admin").unwrap();
    let at = LicenseTime::at(T0);
    for _ in 0..2 {
        l.check_share_at(&pair(), "rogue", at).unwrap();
    }
    let e = l.check_share_at(&pair(), "rogue", at).unwrap_err();
    assert!(matches!(e, LimitExceeded::MaxCalls { .. }), "{e}");
    assert!(e.to_string().contains("client host `rogue`'s share"), "{e}");
    assert!(matches!(
        l.check_share_at(&pair(), "rogue", at),
        Err(LimitExceeded::Revoked { .. })
    ));
    // Others keep theirs; the license is not exceeded, nothing revoked.
    for _ in 0..2 {
        l.check_share_at(&pair(), "a", at).unwrap();
    }
    assert!(l.list().unwrap()[0].license.exceeded.is_none());
    assert!(seen.lock().unwrap().is_empty());
    assert!(s.licenses().unwrap()[0].exceeded.is_none());
    // Unlicensed pairs are not limited.
    let other = LicenseKey::Pair {
        client: "d".repeat(64),
        server: "e".repeat(64),
    };
    for _ in 0..5 {
        l.check_share_at(&other, "rogue", at).unwrap();
    }
    // Validity still holds for every share, without revoking.
    let later = LicenseTerms {
        not_before_ms: Some(T0 + 1),
        ..terms
    };
    l.set(&pair(), &later, true, "admin").unwrap();
    assert!(matches!(
        l.check_share_at(&pair(), "b", at),
        Err(LimitExceeded::NotYetValid { .. })
    ));
    // A reset gave the rogue its share back.
    l.check_share_at(&pair(), "rogue", LicenseTime::at(T0 + 1))
        .unwrap();
}
