//! File access decisions with the real engine over a real store:
//! `File` entities in the `FileSet`s the administrator defined (on path
//! component boundaries), `context.to` for renames and hard links into a
//! set, the `create`/`truncate`/`link` flags, slicing and the decision
//! cache across a change of the sets, and the intent of
//! `policies/file-protection.cedar` (allowed and denied cases).

use std::sync::Arc;

use trustbind_appliance::policy::engine::Engine;
use trustbind_appliance::policy::Verdict;
use trustbind_appliance::request::{Action, Program, QualifyRequest, Subject, Target};
use trustbind_appliance::store::{FileSetEdit, Mode, Signature, Store};

const SCHEMA: &str = include_str!("../../policies/trustbind.cedarschema");
const FILE_PROTECTION: &str = include_str!("../../policies/file-protection.cedar");
/// Monday 2024-01-01 09:30 UTC.
const AT: i64 = 1_704_101_400_000;

/// Programs by the group they are approved in (`unknown` is in none).
const PROGRAMS: [(&str, &str); 7] = [
    ("postgres", "db-servers"),
    ("pgbackrest", "backup-tools"),
    ("nginx", "web-servers"),
    ("vim", "editors"),
    ("auditd", "log-daemons"),
    ("cat", "coreutils"),
    ("unknown", ""),
];

fn sha(name: &str) -> String {
    use sha2::Digest as _;
    trustbind_appliance::store::hex(&sha2::Sha256::digest(name.as_bytes()))
}

/// Host web1 (enforce); the programs above; users dba (no role), bak
/// (backup), sec (secops), eve (none); the file sets of the example.
fn store() -> (tempfile::TempDir, Arc<Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("a.db")).unwrap());
    store
        .set_host_group("web", Mode::Enforce, "admin:t")
        .unwrap();
    store
        .add_pending_host("web1", "web", &sha("token"), "admin:t")
        .unwrap();
    for (name, group) in PROGRAMS {
        let s = Signature {
            sha256: sha(name),
            sha1: None,
            size: 1,
            name: name.into(),
            source: "t".into(),
        };
        store.put_signature(&s, "admin:t").unwrap();
        if !group.is_empty() {
            store.create_group(group, "", "admin:t").unwrap();
            store.add_member(group, &sha(name), "admin:t").unwrap();
        }
    }
    for (user, role) in [("bak", "backup"), ("sec", "secops")] {
        store.set_user_roles(user, &[role], "admin:t").unwrap();
    }
    for (set, paths) in [
        ("pgdata", &["/var/lib/postgresql"][..]),
        ("audit-logs", &["/var/log/audit"][..]),
        ("webroot", &["/srv/www"][..]),
        (
            "secrets",
            &["/etc/app/secrets.conf", "/etc/app/secrets.d"][..],
        ),
    ] {
        let paths: Vec<String> = paths.iter().map(|p| (*p).to_owned()).collect();
        store
            .edit_file_set(set, FileSetEdit::Add, &paths, "admin:t")
            .unwrap();
    }
    (dir, store)
}

fn engine(store: &Arc<Store>, policy: &str) -> Engine {
    let id = store.create_policy_draft(policy, "", "admin:t").unwrap();
    store.activate_policy(id, "admin:t").unwrap();
    Engine::new(Arc::clone(store), SCHEMA).unwrap()
}

/// `user` running `program` does `action` on `path`.
fn file(user: &str, program: &str, action: Action, path: &str) -> QualifyRequest {
    QualifyRequest {
        host: "web1".into(),
        action,
        subject: Subject {
            user: user.into(),
            uid: 1000,
            euid: 1000,
            gid: 1000,
            loginuid: 1000,
            session: 3,
            pid: 77,
            ancestry: Vec::new(),
        },
        // As the module asks: the SHA-256 only.
        program: Program {
            sha256: sha(program),
            sha1: String::new(),
            size: 0,
            path: String::new(),
        },
        target: Target::file(path, None),
        at_ms: AT,
        peer: None,
    }
}

fn with_to(mut r: QualifyRequest, to: &str) -> QualifyRequest {
    if let Target::File { to: t, link, .. } = &mut r.target {
        *t = Some(to.into());
        *link = r.action == Action::OpenWrite;
    }
    r
}

fn truncating(mut r: QualifyRequest) -> QualifyRequest {
    if let Target::File { truncate, .. } = &mut r.target {
        *truncate = true;
    }
    r
}

fn allowed(e: &Engine, r: &QualifyRequest) -> bool {
    let d = e.decide(r).unwrap();
    !matches!(d.outcome.verdict, Verdict::Deny)
}

#[test]
fn file_protection_example_decides_as_its_comments_say() {
    use Action::{Delete, OpenRead, OpenWrite, Rename};
    let (_d, store) = store();
    let e = engine(&store, FILE_PROTECTION);
    let pg = "/var/lib/postgresql/16/main/base/1";
    let cases: &[(QualifyRequest, bool, &str)] = &[
        // pgdata: the database server, and reads by the backup tool as role backup.
        (
            file("dba", "postgres", OpenRead, pg),
            true,
            "db server reads",
        ),
        (
            file("dba", "postgres", OpenWrite, pg),
            true,
            "db server writes",
        ),
        (
            file("dba", "postgres", Delete, pg),
            true,
            "db server deletes",
        ),
        (file("dba", "cat", OpenRead, pg), false, "cat reads pgdata"),
        (
            file("root", "unknown", OpenWrite, pg),
            false,
            "unknown writes pgdata",
        ),
        (
            file("bak", "pgbackrest", OpenRead, pg),
            true,
            "backup tool as backup reads",
        ),
        (
            file("eve", "pgbackrest", OpenRead, pg),
            false,
            "backup tool without the role",
        ),
        (
            file("bak", "cat", OpenRead, pg),
            false,
            "role backup with another program",
        ),
        (
            file("bak", "pgbackrest", OpenWrite, pg),
            false,
            "backup tool writes",
        ),
        // Component boundary: a sibling directory is not protected by pgdata
        // (and no policy allows it: nothing would ask about it on a host).
        (
            file("dba", "postgres", OpenRead, "/var/lib/postgresql-old/x"),
            false,
            "sibling dir",
        ),
        // A file moved or linked into pgdata by anything but the server.
        (
            with_to(file("eve", "cat", Rename, "/tmp/evil"), pg),
            false,
            "rename into pgdata",
        ),
        (
            with_to(file("eve", "cat", OpenWrite, "/tmp/evil"), pg),
            false,
            "link into pgdata",
        ),
        // Audit logs: read by all, appended by the log daemon, never
        // deleted, renamed, truncated or replaced.
        (
            file("eve", "cat", OpenRead, "/var/log/audit/audit.log"),
            true,
            "read audit log",
        ),
        (
            file("root", "auditd", OpenWrite, "/var/log/audit/audit.log"),
            true,
            "auditd appends",
        ),
        (
            truncating(file(
                "root",
                "auditd",
                OpenWrite,
                "/var/log/audit/audit.log",
            )),
            false,
            "truncate audit log",
        ),
        (
            file("root", "postgres", Delete, "/var/log/audit/audit.log"),
            false,
            "delete audit log",
        ),
        (
            with_to(
                file("root", "auditd", Rename, "/var/log/audit/audit.log"),
                "/var/log/audit/audit.log.1",
            ),
            false,
            "logrotate rename",
        ),
        (
            with_to(
                file("root", "postgres", Rename, "/var/lib/postgresql/x"),
                "/var/log/audit/audit.log",
            ),
            false,
            "rename over audit log",
        ),
        (
            file("root", "cat", OpenWrite, "/var/log/audit/audit.log"),
            false,
            "cat writes audit log",
        ),
        // Web root: read by the web server, never written by it.
        (
            file("www", "nginx", OpenRead, "/srv/www/index.html"),
            true,
            "nginx reads web root",
        ),
        (
            file("www", "nginx", OpenWrite, "/srv/www/index.html"),
            false,
            "nginx writes web root",
        ),
        (
            file("www", "nginx", Delete, "/srv/www/index.html"),
            false,
            "nginx deletes from web root",
        ),
        (
            file("www", "cat", OpenRead, "/srv/www/index.html"),
            false,
            "cat reads web root",
        ),
        // Secrets: the approved editor, role secops only.
        (
            file("sec", "vim", OpenWrite, "/etc/app/secrets.conf"),
            true,
            "editor as secops",
        ),
        (
            file("sec", "vim", OpenRead, "/etc/app/secrets.d/db.key"),
            true,
            "editor reads secrets dir",
        ),
        (
            file("eve", "vim", OpenWrite, "/etc/app/secrets.conf"),
            false,
            "editor without the role",
        ),
        (
            file("sec", "cat", OpenRead, "/etc/app/secrets.conf"),
            false,
            "secops with another program",
        ),
        (
            file("sec", "vim", OpenWrite, "/etc/app/secrets.conf.bak"),
            false,
            "a file next to secrets.conf",
        ),
    ];
    let mut wrong = Vec::new();
    for (r, want, what) in cases {
        if allowed(&e, r) != *want {
            wrong.push(format!(
                "{what}: expected {}",
                if *want { "allow" } else { "deny" }
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn a_change_of_the_sets_changes_decisions_and_the_cache_follows() {
    let (_d, store) = store();
    let e = engine(
        &store,
        r#"@id("cat-reads-pgdata")
           permit (principal, action == Trustbind::Action::"open_read", resource in Trustbind::FileSet::"pgdata")
           when { context.program in Trustbind::ProgramGroup::"coreutils" };"#,
    );
    let r = file("eve", "cat", Action::OpenRead, "/srv/pg/x");
    assert!(!allowed(&e, &r));
    let d = e.decide(&r).unwrap();
    assert!(d.cache_hit, "the second decision comes from the cache");
    let g = d.generation;
    store
        .edit_file_set("pgdata", FileSetEdit::Add, &["/srv/pg".into()], "admin:t")
        .unwrap();
    let d = e.decide(&r).unwrap();
    assert!(!d.cache_hit);
    assert_eq!(d.generation, g + 1);
    assert_eq!(d.outcome.reasons, ["cat-reads-pgdata"]);
    // The membership of a path is on component boundaries.
    assert!(!allowed(
        &e,
        &file("eve", "cat", Action::OpenRead, "/srv/pgx")
    ));
    store
        .edit_file_set(
            "pgdata",
            FileSetEdit::Remove,
            &["/srv/pg".into()],
            "admin:t",
        )
        .unwrap();
    assert!(!allowed(&e, &r));
}

#[test]
fn the_flags_and_the_new_path_are_part_of_the_cache_key() {
    let (_d, store) = store();
    let e = engine(
        &store,
        r#"@id("write-webroot")
           permit (principal, action in [Trustbind::Action::"open_write", Trustbind::Action::"rename"],
                   resource in Trustbind::FileSet::"webroot");
           @id("no-truncate")
           forbid (principal, action == Trustbind::Action::"open_write", resource)
           when { context.truncate };
           @id("no-rename-into-secrets")
           forbid (principal, action == Trustbind::Action::"rename", resource)
           when { context has to && context.to in Trustbind::FileSet::"secrets" };"#,
    );
    let w = file("eve", "cat", Action::OpenWrite, "/srv/www/a");
    assert!(allowed(&e, &w));
    assert!(allowed(&e, &w), "cached");
    assert!(
        !allowed(&e, &truncating(w.clone())),
        "a truncate is another key"
    );
    let mv = file("eve", "cat", Action::Rename, "/srv/www/a");
    assert!(allowed(&e, &with_to(mv.clone(), "/srv/www/b")));
    let d = e
        .decide(&with_to(mv.clone(), "/etc/app/secrets.d/a"))
        .unwrap();
    assert_eq!(d.outcome.verdict, Verdict::Deny);
    assert_eq!(d.outcome.reasons, ["no-rename-into-secrets"]);
    assert!(
        !d.cacheable,
        "a verdict reading `to` is never cached by the module"
    );
}
