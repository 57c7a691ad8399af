//! Decision audit events are serialised straight to text (borrowed
//! structs, no `serde_json::Value` tree). Their bytes are what the chain
//! hashes, so they must be exactly what the earlier code wrote (a
//! `json!` object serialised): rows written before and after read, hash
//! and replay alike. This compares both for a spread of requests and
//! decisions, and pins one row's bytes and hash.

use std::collections::BTreeMap;
use std::sync::Arc;

use trustbind_policy::audit::{row_hash, AuditEvent, GENESIS};
use trustbind_policy::engine::{decision_event, pair_event, Decision};
use trustbind_policy::request::{
    Action, FiveTuple, Program, Proto, QualifyRequest, Subject, Target,
};
use trustbind_policy::source::Mode;
use trustbind_policy::{Diagnosis, Outcome, Verdict};

/// The decision event as the code before wrote it.
fn decision_event_before(req: &QualifyRequest, d: &Decision) -> AuditEvent {
    AuditEvent::new(
        "decision",
        &req.host,
        serde_json::json!({
            "request": req,
            "outcome": d.outcome,
            "generation": d.generation,
            "cacheable": d.cacheable,
            "cache_hit": d.cache_hit,
            "groups": d.groups,
        }),
    )
}

/// The pair event as the code before wrote it.
fn pair_event_before(c: &QualifyRequest, a: &QualifyRequest, d: &Decision) -> AuditEvent {
    AuditEvent::new(
        "decision.pair",
        &c.host,
        serde_json::json!({
            "connect": c,
            "accept": a,
            "outcome": d.outcome,
            "generation": d.generation,
            "groups": d.groups,
        }),
    )
}

/// Strings that need escaping or are not ASCII, and plain ones.
const WORDS: [&str; 8] = [
    "web1",
    "",
    "a \"quoted\" \\ path",
    "tab\there\nnewline\r\u{0}\u{1f}",
    "unicodé ✓ 日本 \u{1F600}",
    "/usr/bin/python3.11",
    "</script>&'",
    "\u{7f}\u{2028}\u{2029}",
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn word(&mut self) -> String {
        WORDS[self.below(WORDS.len())].to_owned()
    }
    fn words(&mut self) -> Vec<String> {
        (0..self.below(4)).map(|_| self.word()).collect()
    }
    fn flag(&mut self) -> bool {
        self.next() & 1 == 1
    }
    fn program(&mut self) -> Program {
        Program {
            sha256: format!("{:064x}", self.next()),
            sha1: format!("{:040x}", self.next()),
            size: self.next(),
            path: self.word(),
        }
    }
}

fn request(r: &mut Rng) -> QualifyRequest {
    let action = Action::ALL[r.below(Action::ALL.len())];
    let target = match r.below(4) {
        0 => Target::Exec {
            loader_direct: r.flag(),
        },
        1 => Target::File {
            path: r.word(),
            to: r.flag().then(|| r.word()),
            create: r.flag(),
            truncate: r.flag(),
            link: r.flag(),
        },
        _ => Target::Net(FiveTuple {
            proto: if r.flag() { Proto::Tcp } else { Proto::Unix },
            src_addr: r.word(),
            src_port: r.next() as u16,
            dst_addr: "2001:db8::1".into(),
            dst_port: r.next() as u16,
            established: r.flag(),
        }),
    };
    QualifyRequest {
        host: r.word(),
        action,
        subject: Subject {
            user: r.word(),
            uid: r.next() as u32,
            euid: r.next() as u32,
            gid: 0,
            loginuid: u32::MAX,
            session: r.next() as u32,
            pid: r.next() as u32,
            ancestry: r.words(),
        },
        program: r.program(),
        target,
        at_ms: r.next() as i64,
        peer: r.flag().then(|| r.program()),
    }
}

fn decision(r: &mut Rng) -> Decision {
    let verdict = match r.below(3) {
        0 => Verdict::Allow,
        1 => Verdict::AllowWithConditions {
            obligations: (0..1 + r.below(3))
                .map(|_| (r.word(), r.word()))
                .collect::<BTreeMap<_, _>>(),
        },
        _ => Verdict::Deny,
    };
    let explain = r.flag().then(|| {
        Arc::new(Diagnosis {
            host_group: r.word(),
            roles: r.words(),
            groups: r.words(),
            missing: r.words(),
            errors: r.words(),
        })
    });
    Decision {
        outcome: Outcome {
            verdict,
            reasons: r.words(),
            would_deny: r.flag(),
            errors: r.below(3),
            alerts: r.words(),
            explain,
        },
        generation: r.next() as i64,
        cacheable: r.flag(),
        cache_hit: r.flag(),
        groups: r.words(),
        mode: Mode::Enforce,
    }
}

#[test]
fn decision_events_keep_the_bytes_they_had() {
    let mut r = Rng(0x5eed_0fa0_d17e_57ab);
    for _ in 0..2_000 {
        let (q, d) = (request(&mut r), decision(&mut r));
        assert_eq!(decision_event(&q, &d), decision_event_before(&q, &d));
        let a = request(&mut r);
        assert_eq!(pair_event(&q, &a, &d), pair_event_before(&q, &a, &d));
    }
}

/// One decision's row, byte for byte and hashed, as rows have been
/// written (fields in the order the code names them: the detail's
/// objects keep their order, `serde_json`'s `preserve_order`). A change
/// here changes what every new row says and hashes.
#[test]
fn a_decision_row_is_pinned() {
    let mut q = QualifyRequest::exec("web1", "bob", "1".repeat(64), "/bin/x");
    q.subject.ancestry = vec!["/bin/sh".into()];
    q.at_ms = 1_704_067_200_000;
    let d = Decision {
        outcome: Outcome {
            verdict: Verdict::AllowWithConditions {
                obligations: [("nice".to_owned(), "5".to_owned())].into(),
            },
            reasons: vec!["g1-exec".into()],
            would_deny: false,
            errors: 0,
            alerts: vec![],
            explain: None,
        },
        generation: 7,
        cacheable: true,
        cache_hit: false,
        groups: vec!["g1".into()],
        mode: Mode::Enforce,
    };
    let ev = decision_event(&q, &d);
    let detail = concat!(
        r#"{"request":{"host":"web1","action":"exec","subject":{"user":"bob","uid":1,"#,
        r#""euid":1,"gid":1,"loginuid":1,"session":1,"pid":1,"ancestry":["/bin/sh"]},"#,
        r#""program":{"sha256":"1111111111111111111111111111111111111111111111111111111111111111","#,
        r#""sha1":"2222222222222222222222222222222222222222","size":1,"path":"/bin/x"},"#,
        r#""target":{"kind":"exec"},"at_ms":1704067200000},"#,
        r#""outcome":{"verdict":{"verdict":"allow_with_conditions","obligations":{"nice":"5"}},"#,
        r#""reasons":["g1-exec"],"would_deny":false,"errors":0},"#,
        r#""generation":7,"cacheable":true,"cache_hit":false,"groups":["g1"]}"#,
    );
    assert_eq!(ev.detail, detail);
    assert_eq!((ev.kind.as_str(), ev.actor.as_str()), ("decision", "web1"));
    assert_eq!(
        row_hash(
            GENESIS,
            1,
            1_704_067_200_123,
            &ev.kind,
            &ev.actor,
            &ev.detail
        ),
        PINNED_HASH
    );
}

/// `row_hash` of the pinned row (main at bfa0f52 gave the same bytes and hash).
const PINNED_HASH: &str = "7d19c86b30803daf167b42387f6d38a1f3ee304995a7d6c319debcceb4ec8e97";
