//! The Cedar schema in `policies/` and the example policy set: the schema
//! parses, the example validates against it in strict mode, and it decides
//! as its comments say.

use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Decision, Entities, EntityUid, PolicyId, PolicySet, Request, Schema,
    ValidationMode, Validator,
};
use serde_json::json;

const SCHEMA: &str = include_str!("../../policies/trustbind.cedarschema");
const EXAMPLE: &str = include_str!("../../policies/example.cedar");

fn schema() -> Schema {
    let (schema, _warnings) = Schema::from_cedarschema_str(SCHEMA).unwrap();
    schema
}

fn uid(ty: &str, id: &str) -> EntityUid {
    EntityUid::from_str(&format!("Trustbind::{ty}::{}", json!(id))).unwrap()
}

fn entities(schema: &Schema) -> Entities {
    let e = |ty: &str, id: &str| json!({ "type": format!("Trustbind::{ty}"), "id": id });
    Entities::from_json_value(
        json!([
            { "uid": e("User", "alice"), "attrs": { "name": "alice" }, "parents": [e("Role", "admin")] },
            { "uid": e("User", "bob"), "attrs": { "name": "bob" }, "parents": [] },
            { "uid": e("Role", "admin"), "attrs": {}, "parents": [] },
            { "uid": e("Host", "web1"), "attrs": {}, "parents": [e("HostGroup", "web")] },
            { "uid": e("Host", "db1"), "attrs": {}, "parents": [e("HostGroup", "db")] },
            { "uid": e("HostGroup", "web"), "attrs": {}, "parents": [] },
            { "uid": e("HostGroup", "db"), "attrs": {}, "parents": [] },
            { "uid": e("Program", "ls"), "attrs": {}, "parents": [e("ProgramGroup", "coreutils")] },
            { "uid": e("Program", "tcpdump"), "attrs": {}, "parents": [e("ProgramGroup", "admin-tools")] },
            { "uid": e("Program", "nc"), "attrs": {}, "parents": [e("ProgramGroup", "netcat")] },
            { "uid": e("Program", "unknown"), "attrs": {}, "parents": [] },
            { "uid": e("Program", "nginx"), "attrs": {}, "parents": [e("ProgramGroup", "web-servers")] },
            { "uid": e("Program", "postgres"), "attrs": {}, "parents": [e("ProgramGroup", "db-servers")] },
            { "uid": e("ProgramGroup", "web-servers"), "attrs": {}, "parents": [] },
            { "uid": e("ProgramGroup", "db-servers"), "attrs": {}, "parents": [] },
            { "uid": e("Service", "db1:5432/tcp"), "attrs": { "host": "db1", "port": 5432, "proto": "tcp" }, "parents": [] },
            { "uid": e("ProgramGroup", "coreutils"), "attrs": {}, "parents": [] },
            { "uid": e("ProgramGroup", "admin-tools"), "attrs": {}, "parents": [] },
            { "uid": e("ProgramGroup", "netcat"), "attrs": {}, "parents": [] },
        ]),
        Some(schema),
    )
    .unwrap()
}

/// Decision and the `@id`s of the determining policies.
fn exec(user: &str, program: &str, host: &str, hour: i64, weekday: i64) -> (Decision, Vec<String>) {
    let schema = schema();
    let pset = PolicySet::from_str(EXAMPLE).unwrap();
    let action = uid("Action", "exec");
    let ctx = Context::from_json_value(
        json!({
            "host": { "__entity": { "type": "Trustbind::Host", "id": host } },
            "time": 1_700_000_000_i64, "hour": hour, "weekday": weekday, "session": 1,
            "ancestry": [], "mode": "enforce", "loader_direct": false,
        }),
        Some((&schema, &action)),
    )
    .unwrap();
    let req = Request::new(
        uid("User", user),
        action,
        uid("Program", program),
        ctx,
        Some(&schema),
    )
    .unwrap();
    let resp = Authorizer::new().is_authorized(&req, &pset, &entities(&schema));
    let ids = resp
        .diagnostics()
        .reason()
        .map(|id: &PolicyId| {
            pset.policy(id)
                .unwrap()
                .annotation("id")
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(
        resp.diagnostics().errors().next().is_none(),
        "evaluation errors"
    );
    (resp.decision(), ids)
}

#[test]
fn example_validates_against_schema() {
    let pset = PolicySet::from_str(EXAMPLE).unwrap();
    let result = Validator::new(schema()).validate(&pset, ValidationMode::Strict);
    assert!(
        result.validation_passed(),
        "{:?}",
        result.validation_errors().collect::<Vec<_>>()
    );
    for p in pset.policies() {
        assert!(
            p.annotation("id").is_some(),
            "every example policy carries @id"
        );
    }
}

#[test]
fn schema_rejects_policy_on_unknown_attribute() {
    let pset = PolicySet::from_str(
        r#"permit(principal, action == Trustbind::Action::"exec", resource) when { context.colour == "red" };"#,
    )
    .unwrap();
    let result = Validator::new(schema()).validate(&pset, ValidationMode::Strict);
    assert!(!result.validation_passed());
}

#[test]
fn example_decides_by_group_role_host_and_time() {
    assert_eq!(
        exec("bob", "ls", "web1", 3, 6),
        (Decision::Allow, vec!["exec-coreutils".into()])
    );
    assert_eq!(
        exec("bob", "unknown", "web1", 10, 1),
        (Decision::Deny, vec![]),
        "unknown program: default deny"
    );
    assert_eq!(
        exec("alice", "tcpdump", "web1", 10, 1),
        (
            Decision::Allow,
            vec!["exec-admin-tools-office-hours".into()]
        )
    );
    assert_eq!(
        exec("alice", "tcpdump", "web1", 20, 1).0,
        Decision::Deny,
        "outside office hours"
    );
    assert_eq!(
        exec("alice", "tcpdump", "web1", 10, 6).0,
        Decision::Deny,
        "weekend"
    );
    assert_eq!(
        exec("bob", "tcpdump", "web1", 10, 1).0,
        Decision::Deny,
        "not in role admin"
    );
    assert_eq!(
        exec("bob", "nc", "web1", 10, 1),
        (Decision::Allow, vec!["exec-netcat".into()])
    );
    assert_eq!(
        exec("bob", "nc", "db1", 10, 1),
        (Decision::Deny, vec!["no-netcat-on-db".into()]),
        "forbid wins"
    );
}

mod verdicts {
    use super::*;
    use std::collections::BTreeMap;
    use trustbind_appliance::policy::{load, outcome, Outcome, PolicyError, Verdict};
    use trustbind_appliance::store::Mode;

    fn decide(
        action: &str,
        user: &str,
        resource: EntityUid,
        ctx: serde_json::Value,
        mode: Mode,
    ) -> Outcome {
        let (schema, loaded) = load(SCHEMA, EXAMPLE).unwrap();
        let action = uid("Action", action);
        let ctx = Context::from_json_value(ctx, Some((&schema, &action))).unwrap();
        let req = Request::new(uid("User", user), action, resource, ctx, Some(&schema)).unwrap();
        let resp = Authorizer::new().is_authorized(&req, &loaded.set, &entities(&schema));
        outcome(&loaded.set, &resp, mode)
    }

    fn exec_ctx(host: &str, hour: i64) -> serde_json::Value {
        json!({
            "host": { "__entity": { "type": "Trustbind::Host", "id": host } },
            "time": 0, "hour": hour, "weekday": 1, "session": 1, "ancestry": [], "mode": "enforce",
            "loader_direct": false,
        })
    }

    #[test]
    fn obligations_come_from_determining_permit_annotations() {
        let o = decide(
            "exec",
            "alice",
            uid("Program", "tcpdump"),
            exec_ctx("web1", 10),
            Mode::Enforce,
        );
        let want: BTreeMap<String, String> =
            [("alert".into(), "soc".into()), ("nice".into(), "10".into())]
                .into_iter()
                .collect();
        assert_eq!(
            o.verdict,
            Verdict::AllowWithConditions { obligations: want }
        );
        assert_eq!(o.reasons, ["exec-admin-tools-office-hours"]);
        let o = decide(
            "exec",
            "bob",
            uid("Program", "ls"),
            exec_ctx("web1", 10),
            Mode::Enforce,
        );
        assert_eq!((o.verdict, o.would_deny), (Verdict::Allow, false));
    }

    #[test]
    fn connect_pair_by_program_groups_gets_encrypt_obligation() {
        let e = |ty: &str, id: &str| json!({ "__entity": { "type": format!("Trustbind::{ty}"), "id": id } });
        let ctx = |prog: &str, peer: &str, port: i64| {
            json!({
                "host": e("Host", "web1"), "program": e("Program", prog), "peer_host": e("Host", "db1"),
                "peer_program": e("Program", peer), "src_addr": "10.0.0.1", "src_port": 40000,
                "dst_addr": "10.0.0.2", "dst_port": port, "time": 0, "hour": 1, "weekday": 1, "session": 1,
                "ancestry": [], "mode": "enforce",
            })
        };
        let o = decide(
            "connect",
            "bob",
            uid("Service", "db1:5432/tcp"),
            ctx("nginx", "postgres", 5432),
            Mode::Enforce,
        );
        let want: BTreeMap<String, String> = [("encrypt".into(), "required".into())]
            .into_iter()
            .collect();
        assert_eq!(
            o.verdict,
            Verdict::AllowWithConditions { obligations: want }
        );
        assert_eq!(o.reasons, ["web-to-db"]);
        // Wrong program pair: default deny, no reasons, no obligations.
        let o = decide(
            "connect",
            "bob",
            uid("Service", "db1:5432/tcp"),
            ctx("ls", "nc", 5432),
            Mode::Enforce,
        );
        assert_eq!((o.verdict, o.reasons.len()), (Verdict::Deny, 0));
    }

    #[test]
    fn permissive_allows_and_records_would_deny_enforce_denies_disabled_allows() {
        let deny = |mode| {
            decide(
                "exec",
                "bob",
                uid("Program", "nc"),
                exec_ctx("db1", 10),
                mode,
            )
        };
        let o = deny(Mode::Enforce);
        assert_eq!(
            (o.verdict, o.would_deny, o.reasons),
            (Verdict::Deny, false, vec!["no-netcat-on-db".to_owned()])
        );
        let o = deny(Mode::Permissive);
        assert_eq!(
            (o.verdict, o.would_deny, o.reasons),
            (Verdict::Allow, true, vec!["no-netcat-on-db".to_owned()])
        );
        let o = deny(Mode::Disabled);
        assert_eq!((o.verdict, o.would_deny), (Verdict::Allow, false));
        let o = decide(
            "exec",
            "bob",
            uid("Program", "unknown"),
            exec_ctx("web1", 10),
            Mode::Enforce,
        );
        assert_eq!(
            o.verdict,
            Verdict::Deny,
            "unknown program falls to default deny"
        );
    }

    #[test]
    fn load_refuses_bad_text_and_names_the_ruleset() {
        assert!(matches!(
            load(SCHEMA, "permit(principal"),
            Err(PolicyError::Syntax(_))
        ));
        assert!(matches!(
            load(
                SCHEMA,
                r#"permit(principal, action, resource) when { context.nope };"#
            ),
            Err(PolicyError::Validation(_))
        ));
        assert!(matches!(
            load("namespace {", EXAMPLE),
            Err(PolicyError::Schema(_))
        ));
        let (_, a) = load(SCHEMA, EXAMPLE).unwrap();
        let (_, b) = load(SCHEMA, &format!("{EXAMPLE}\n")).unwrap();
        assert_eq!(a.identity.len(), 64);
        assert_ne!(a.identity, b.identity);
    }
}
