//! Channel keys v2 over the real agent API (mutual TLS on loopback, SQLite
//! in a temp dir, enrolled test hosts): `Listen` registers a server
//! program, `Grant` issues a ticket sealed to the server host's key, each
//! host's push stream carries its own host keys and the revocations in
//! force. Host `a` (10.99.0.11) is the client, `b` (10.99.0.12) the
//! server, `rogue` (10.99.0.66) an enrolled host under an attacker's
//! control. Tickets are opened with the appliance's reference
//! (`tickets::open`), as the server's module will open them.

mod common;

use common::sealing::{digest, Module};
use trustbind_api::module;
use trustbind_proto::{self as proto, Record, MODULE_VERSION_TICKETS};

use std::sync::Arc;
use std::time::Duration;

use common::{sha256_hex, start_in, Appliance};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Streaming;
use trustbind_appliance::agent_api::pb::agent_client::AgentClient;
use trustbind_appliance::agent_api::pb::{self, push, Hello, Push};
use trustbind_appliance::gate::Gate;
use trustbind_appliance::grants::Grants;
use trustbind_appliance::limits::{LicenseKey, Limits};
use trustbind_appliance::policy::engine::Engine;
use trustbind_appliance::store::{LicenseTerms, Mode};
use trustbind_appliance::tickets::{self, Farm, HostKey};
use trustbind_proto::ticket::{self as wire, Accepting, Addr, HostKeys, Revocations, TicketError};

const SCHEMA: &str = include_str!("../../policies/trustbind.cedarschema");

/// psql (clients) may reach port 5432; postgres (servers) may serve any
/// client (and, registering, serve at all); nc is in neither group.
const POLICY: &str = concat!(
    connect_5432_policy!(),
    r#"
@id("servers-accept-clients")
@encrypt("required")
permit (principal, action == Trustbind::Action::"accept", resource)
when {
    context.program in Trustbind::ProgramGroup::"servers" &&
    (if context has peer_program
        then context.peer_program in Trustbind::ProgramGroup::"clients"
        else true)
};
"#
);

struct V2 {
    app: Appliance,
    limits: Option<Arc<Limits>>,
}

/// An appliance in `dir` serving v2 with the farm secret of `dir` (made
/// there, or imported beforehand), licenses enforced when `limits`.
async fn appliance_in(dir: tempfile::TempDir, limits: bool) -> V2 {
    let farm = Farm::open_or_create(dir.path()).unwrap();
    let mut made = None;
    let app = start_in(dir, |store, hub| {
        let engine = Arc::new(Engine::new(Arc::clone(&store), SCHEMA).unwrap());
        let l = limits.then(|| Arc::new(Limits::new(Arc::clone(&store)).unwrap()));
        let grants = Grants::new(
            farm,
            Arc::clone(&engine),
            Arc::clone(&store),
            Arc::clone(&hub),
            l.clone(),
        );
        made = Some((grants, l.clone()));
        Arc::new(Gate::new(engine, store, hub, l, Duration::from_secs(5), 64))
    })
    .await;
    let (grants, limits) = made.unwrap();
    assert!(app.api.set_grants(Arc::new(grants)));
    let store = &app.api.store;
    common::named_sig(store, "psql", "clients");
    common::named_sig(store, "postgres", "servers");
    common::named_sig(store, "nc", "netcat");
    let id = store.create_policy_draft(POLICY, "", "admin:t").unwrap();
    store.activate_policy(id, "admin:t").unwrap();
    V2 { app, limits }
}

async fn appliance(limits: bool) -> V2 {
    appliance_in(tempfile::tempdir().unwrap(), limits).await
}

type Client = AgentClient<Channel>;

/// Enrols `host` with `addr` assigned; its client and push stream.
async fn host(app: &Appliance, name: &str, addr: &str) -> (Client, Streaming<Push>) {
    host_with(app, name, addr, Vec::new()).await
}

/// [`host`], its stream's orders sealed for the module session
/// `module_session` (none if empty).
async fn host_with(
    app: &Appliance,
    name: &str,
    addr: &str,
    module_session: Vec<u8>,
) -> (Client, Streaming<Push>) {
    let cfg = app.enrolled_in(name, "fleet", Mode::Enforce).await;
    app.assign(name, &[addr]);
    let mut c = app.agent_client(cfg).await.unwrap();
    let s = c
        .subscribe(Hello {
            agent_version: "test".into(),
            module_session,
            ..Hello::default()
        })
        .await
        .unwrap()
        .into_inner();
    (c, s)
}

fn subject() -> pb::Subject {
    pb::Subject {
        user: "postgres".into(),
        uid: 100,
        euid: 100,
        gid: 100,
        loginuid: 1000,
        session: u32::MAX,
        pid: 42,
        ancestry: vec![],
    }
}

fn program(name: &str) -> pb::Program {
    pb::Program {
        sha256: sha(name).to_vec(),
        sha1: Vec::new(),
        size: 0,
        path: String::new(),
        package: String::new(),
    }
}

fn sha(name: &str) -> [u8; 32] {
    let mut b = [0u8; 32];
    hex::decode_to_slice(sha256_hex(name), &mut b).unwrap();
    b
}

async fn listen(c: &mut Client, program_name: &str, port: u32) -> pb::ListenReply {
    c.listen(pb::ListenRequest {
        subject: Some(subject()),
        program: Some(program(program_name)),
        port,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

async fn grant(c: &mut Client, program_name: &str, server: &str, port: u32) -> pb::GrantReply {
    c.grant(pb::GrantRequest {
        subject: Some(subject()),
        program: Some(program(program_name)),
        server_addr: server.into(),
        port,
    })
    .await
    .unwrap()
    .into_inner()
}

/// The next push of the kind `pick` takes, skipping the others.
async fn next<T>(s: &mut Streaming<Push>, pick: impl Fn(push::Kind) -> Option<T>) -> T {
    loop {
        let p = tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("no push within 10 s")
            .expect("stream ended")
            .expect("stream error");
        if let Some(t) = p.kind.and_then(&pick) {
            return t;
        }
    }
}

async fn host_keys(s: &mut Streaming<Push>) -> HostKeys {
    let k = next(s, |k| match k {
        push::Kind::HostKeys(k) => Some(k),
        _ => None,
    })
    .await;
    let keys = HostKeys::decode(&k.record).unwrap();
    assert_eq!(keys.epoch, k.epoch);
    keys
}

/// Reads what `s` holds until it stays quiet (the generation moves of the
/// set-up announced), so that the next push follows what the test does.
async fn drain(s: &mut Streaming<Push>) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(400), s.next()).await {
        p.expect("stream error");
    }
}

async fn revocations(s: &mut Streaming<Push>) -> pb::TicketRevocations {
    next(s, |k| match k {
        push::Kind::Revocations(r) => Some(r),
        _ => None,
    })
    .await
}

fn v4(a: [u8; 4]) -> Addr {
    Addr::v4(a)
}

/// The in-band message of `g` for one connection with `nonce`.
fn message(g: &pb::GrantReply, nonce: &[u8; 16]) -> Vec<u8> {
    let (gcm, rest) = g.ticket.split_at(wire::GCM_NONCE_LEN);
    let (ct, tag) = rest.split_at(wire::PLAIN_LEN);
    wire::assemble(
        nonce,
        g.epoch,
        gcm.try_into().unwrap(),
        ct.try_into().unwrap(),
        tag.try_into().unwrap(),
    )
    .to_vec()
}

/// What `b`'s kernel knows when `peer` connects to its postgres on 5432.
fn accepting<'a>(host: &'a [u8; 16], program: &'a [u8; 32], peer: Addr) -> Accepting<'a> {
    Accepting {
        host,
        port: 5432,
        program,
        peer,
        now_s: trustbind_appliance::grants::now_s(),
        min_generation: 0,
    }
}

const NEVER: fn(&[u8; 16], &[u8; 16]) -> bool = |_, _| false;

/// The grant's client host is the caller, the ticket opens only under the
/// server's host key, lists only the client's addresses as the appliance
/// knows them and only the registered program that policy allows; no
/// registration, a denied pair or an address nobody owns get nothing.
#[tokio::test]
async fn a_grant_is_the_callers_for_a_registered_program_and_opens_only_at_the_server() {
    let v = appliance(false).await;
    let (mut a, mut sa) = host(&v.app, "a", "10.99.0.11").await;
    let (mut b, mut sb) = host(&v.app, "b", "10.99.0.12").await;
    let (mut rogue, _sr) = host(&v.app, "rogue", "10.99.0.66").await;

    // Nothing registered yet.
    let g = grant(&mut a, "psql", "10.99.0.12", 5432).await;
    assert!(
        !g.granted && g.reason.contains("no server program is registered"),
        "{g:?}"
    );
    assert!(g.ticket.is_empty() && g.pair_secret.is_empty());

    let l = listen(&mut b, "postgres", 5432).await;
    assert!(l.allowed, "{l:?}");
    // nc may not serve: not registered, never in a ticket.
    let l = listen(&mut b, "nc", 5432).await;
    assert!(!l.allowed, "{l:?}");

    let g = grant(&mut a, "psql", "10.99.0.12", 5432).await;
    assert!(g.granted, "{g:?}");
    assert_eq!((g.pair_secret.len(), g.ticket_id.len()), (32, 16));
    let b_keys = host_keys(&mut sb).await;
    assert_eq!(b_keys.host, tickets::host_id("b"));
    let b_key = HostKey::from_record(&b_keys, g.epoch).unwrap();
    let nonce = [7u8; 16];
    let stream = message(&g, &nonce);
    let (bid, pg) = (tickets::host_id("b"), sha("postgres"));
    let (t, got_nonce) = tickets::open(
        &b_key,
        &stream,
        &accepting(&bid, &pg, v4([10, 99, 0, 11])),
        NEVER,
    )
    .unwrap();
    assert_eq!(got_nonce, nonce);
    assert_eq!(
        t.client_host,
        tickets::host_id("a"),
        "the caller, by its certificate"
    );
    assert_eq!(t.client_program, sha("psql"));
    assert_eq!(&t.id[..], &g.ticket_id[..]);
    assert_eq!(&t.pair_secret[..], &g.pair_secret[..]);
    assert_eq!(t.port, 5432);
    // Only what the appliance knows of a: its assigned address.
    assert_eq!(t.n_client_addrs, 1);
    assert_eq!(t.client_addrs[0], v4([10, 99, 0, 11]));
    // Only the registered program policy allows.
    assert_eq!((t.n_server_programs, t.server_programs[0]), (1, pg));
    // What b's kernel says to the same bytes with another key, program or peer.
    let refused = |key: &HostKey, program: &[u8; 32], peer: Addr| {
        tickets::open(key, &stream, &accepting(&bid, program, peer), NEVER).err()
    };
    let bad = |e| Some(tickets::Error::Ticket(e));
    let nc = sha("nc");
    assert_eq!(
        refused(&b_key, &nc, v4([10, 99, 0, 11])),
        bad(TicketError::WrongProgram)
    );
    // Replayed from the rogue's address: refused.
    assert_eq!(
        refused(&b_key, &pg, v4([10, 99, 0, 66])),
        bad(TicketError::WrongPeer)
    );
    // The client's own key does not open it.
    let a_keys = host_keys(&mut sa).await;
    let a_key = HostKey::from_record(&a_keys, g.epoch).unwrap();
    assert_eq!(
        refused(&a_key, &pg, v4([10, 99, 0, 11])),
        Some(tickets::Error::Open)
    );

    // The rogue's grant names the rogue, whatever it connects for.
    let g = grant(&mut rogue, "psql", "10.99.0.12", 5432).await;
    assert!(g.granted, "{g:?}");
    let (t, _) = tickets::open(
        &b_key,
        &message(&g, &nonce),
        &accepting(&bid, &pg, v4([10, 99, 0, 66])),
        NEVER,
    )
    .unwrap();
    assert_eq!(t.client_host, tickets::host_id("rogue"));
    assert_eq!(
        (t.n_client_addrs, t.client_addrs[0]),
        (1, v4([10, 99, 0, 66]))
    );

    // A pair policy denies: nothing.
    let g = grant(&mut a, "nc", "10.99.0.12", 5432).await;
    assert!(!g.granted && g.reason.contains("denied by policy"), "{g:?}");
    assert!(g.pair_secret.is_empty());
    // Another port, nothing registered.
    let g = grant(&mut a, "psql", "10.99.0.12", 5433).await;
    assert!(!g.granted && g.reason.contains("port 5433"), "{g:?}");
    // An address no host owns.
    let g = grant(&mut a, "psql", "10.99.0.200", 5432).await;
    assert!(
        !g.granted && g.reason.contains("no enrolled host owns"),
        "{g:?}"
    );
    // A client whose address the appliance does not know (its agent calls
    // from loopback, nothing assigned) gets no ticket no server accepts.
    let cfg = v.app.enrolled_in("c", "fleet", Mode::Enforce).await;
    let mut c = v.app.agent_client(cfg).await.unwrap();
    let g = grant(&mut c, "psql", "10.99.0.12", 5432).await;
    assert!(
        !g.granted && g.reason.contains("no address of host `c`"),
        "{g:?}"
    );
    // A revoked server (which may still hold its keys) gets nothing sealed
    // to it.
    v.app.api.revoke_host("b", "admin:t").unwrap();
    let g = grant(&mut a, "psql", "10.99.0.12", 5432).await;
    assert!(!g.granted && g.reason.contains("not enrolled"), "{g:?}");
}

/// Each host's stream carries its own keys, and only its own: the host is
/// its certificate (the Hello names none).
#[tokio::test]
async fn a_host_gets_only_its_own_host_keys() {
    let v = appliance(false).await;
    let (_a, mut sa) = host(&v.app, "a", "10.99.0.11").await;
    let (_b, mut sb) = host(&v.app, "b", "10.99.0.12").await;
    let (ka, kb) = (host_keys(&mut sa).await, host_keys(&mut sb).await);
    assert_eq!(ka.host, tickets::host_id("a"));
    assert_eq!(kb.host, tickets::host_id("b"));
    assert_eq!(ka.epoch, kb.epoch);
    for k in [ka.key, ka.prev_key] {
        assert!(![kb.key, kb.prev_key].contains(&k), "a got one of b's keys");
    }
    // The keys are the farm's for that host: the same record again.
    let farm = Farm::open_or_create(v.app.dir.path()).unwrap();
    let want = farm.host_keys(&tickets::host_id("a"), ka.epoch);
    assert_eq!(&ka.encode()[..], &want[..]);
    // A caller without a host certificate gets no stream at all.
    let anon = common::connect(v.app.agent, v.app.anon_config()).await;
    assert!(
        anon.is_err() || {
            let mut c = AgentClient::new(anon.unwrap());
            c.subscribe(Hello::default()).await.is_err()
        }
    );
}

/// T-70: a pair license is charged per client host: the rogue exhausts its
/// own share, its tickets of the pair are revoked (pushed), and `a` still
/// gets its grants.
#[tokio::test]
async fn a_rogue_host_exhausts_only_its_own_share_of_a_pair_license() {
    let v = appliance(true).await;
    let limits = v.limits.clone().unwrap();
    let pair = LicenseKey::Pair {
        client: sha256_hex("psql"),
        server: sha256_hex("postgres"),
    };
    let terms = LicenseTerms {
        max_calls: Some(2),
        ..LicenseTerms::default()
    };
    limits.set(&pair, &terms, false, "admin:t").unwrap();
    let (mut a, _sa) = host(&v.app, "a", "10.99.0.11").await;
    let (mut b, mut sb) = host(&v.app, "b", "10.99.0.12").await;
    let (mut rogue, _sr) = host(&v.app, "rogue", "10.99.0.66").await;
    assert!(listen(&mut b, "postgres", 5432).await.allowed);
    drain(&mut sb).await;
    let mut rogue_ids = Vec::new();
    for _ in 0..2 {
        let g = grant(&mut rogue, "psql", "10.99.0.12", 5432).await;
        assert!(g.granted, "{g:?}");
        rogue_ids.push(g.ticket_id);
    }
    for _ in 0..3 {
        let g = grant(&mut rogue, "psql", "10.99.0.12", 5432).await;
        assert!(!g.granted && g.reason.contains("license"), "{g:?}");
    }
    // The license stands for everyone else: a has its own share.
    for _ in 0..2 {
        let g = grant(&mut a, "psql", "10.99.0.12", 5432).await;
        assert!(g.granted, "{g:?}");
    }
    let v_ = limits
        .list()
        .unwrap()
        .into_iter()
        .find(|l| l.license.subject == pair)
        .unwrap();
    assert!(
        v_.license.exceeded.is_none(),
        "the license itself was revoked"
    );
    // The server's module learns of the rogue's tickets within one push.
    let r = revocations(&mut sb).await;
    let rec = Revocations::decode(&r.record).unwrap();
    assert_eq!(rec.min_generation, r.min_generation);
    for id in &rogue_ids {
        let id: [u8; 16] = id[..].try_into().unwrap();
        assert!(rec.revoked(&[0; 16], &id), "a rogue ticket is not revoked");
    }
    assert_eq!(rec.tickets().count(), rogue_ids.len());
}

/// Issue 15 item 4: two appliances (separate data directories, no state
/// in common) sharing one farm secret by export and import: the client's
/// grant from A opens under the server's host key from B, and both ends
/// derive the same connection keys.
#[tokio::test]
async fn two_appliances_with_one_farm_secret_serve_the_two_ends_of_a_channel() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let exported = da.path().join("export");
    std::fs::write(
        &exported,
        Farm::open_or_create(da.path()).unwrap().export().as_bytes(),
    )
    .unwrap();
    assert!(Farm::import(db.path(), &exported, false).unwrap());
    let (va, vb) = (appliance_in(da, false).await, appliance_in(db, false).await);
    // a and b are hosts of A (the grant); b is also a host of B, which
    // gives it its host key.
    let (mut a, _sa) = host(&va.app, "a", "10.99.0.11").await;
    let (mut b_at_a, _sba) = host(&va.app, "b", "10.99.0.12").await;
    let (_b_at_b, mut sbb) = host(&vb.app, "b", "10.99.0.12").await;
    assert!(listen(&mut b_at_a, "postgres", 5432).await.allowed);
    let g = grant(&mut a, "psql", "10.99.0.12", 5432).await;
    assert!(g.granted, "{g:?}");
    let kb = host_keys(&mut sbb).await;
    let key = HostKey::from_record(&kb, g.epoch).unwrap();
    let nonce = [3u8; 16];
    let (bid, pg) = (tickets::host_id("b"), sha("postgres"));
    let (t, n) = tickets::open(
        &key,
        &message(&g, &nonce),
        &accepting(&bid, &pg, v4([10, 99, 0, 11])),
        NEVER,
    )
    .unwrap();
    let ends = ((v4([10, 99, 0, 11]), 40000), (v4([10, 99, 0, 12]), 5432));
    let secret: [u8; 32] = g.pair_secret[..].try_into().unwrap();
    let id: [u8; 16] = g.ticket_id[..].try_into().unwrap();
    let client = tickets::connection_keys(&secret, &id, &nonce, (11, 22), ends.0, ends.1);
    let server = tickets::connection_keys(&t.pair_secret, &t.id, &n, (11, 22), ends.0, ends.1);
    assert_eq!(client, server);
}

/// Issue 15 item 3: a host revocation and a policy change each reach a
/// connected host as the next revocations push.
#[tokio::test]
async fn revocations_reach_connected_hosts_within_one_push() {
    let v = appliance(false).await;
    let (_b, mut sb) = host(&v.app, "b", "10.99.0.12").await;
    let (_rogue, _sr) = host(&v.app, "rogue", "10.99.0.66").await;
    let first = revocations(&mut sb).await;
    let rec = Revocations::decode(&first.record).unwrap();
    assert!(!rec.revoked(&tickets::host_id("rogue"), &[0; 16]));
    drain(&mut sb).await;
    v.app.api.revoke_host("rogue", "admin:t").unwrap();
    let r = revocations(&mut sb).await;
    let rec = Revocations::decode(&r.record).unwrap();
    assert!(rec.revoked(&tickets::host_id("rogue"), &[0; 16]));
    assert!(!rec.revoked(&tickets::host_id("b"), &[0; 16]));
    // A policy change: tickets of earlier generations are refused.
    drain(&mut sb).await;
    let store = &v.app.api.store;
    let id = store
        .create_policy_draft(&format!("{POLICY}\n// changed\n"), "", "admin:t")
        .unwrap();
    store.activate_policy(id, "admin:t").unwrap();
    let g = store.governing().unwrap().generation;
    let r = revocations(&mut sb).await;
    assert_eq!(r.min_generation, u64::try_from(g).unwrap());
    let rec = Revocations::decode(&r.record).unwrap();
    assert_eq!(rec.min_generation, r.min_generation);
    assert!(rec.revoked(&tickets::host_id("rogue"), &[0; 16]), "kept");
}

/// Issue 15 item 6: a grant and a listen are audited (through the
/// group-commit writer, before the reply), with the ticket's id and never
/// its pair secret.
#[tokio::test]
async fn grants_and_listens_are_audited_without_their_secrets() {
    let v = appliance(false).await;
    let (mut a, _sa) = host(&v.app, "a", "10.99.0.11").await;
    let (mut b, _sb) = host(&v.app, "b", "10.99.0.12").await;
    assert!(listen(&mut b, "postgres", 5432).await.allowed);
    let g = grant(&mut a, "psql", "10.99.0.12", 5432).await;
    assert!(g.granted);
    let refused = grant(&mut a, "nc", "10.99.0.12", 5432).await;
    assert!(!refused.granted);
    let rows = v.app.api.store.audit_rows(0, u32::MAX).unwrap();
    let of = |kind: &str| rows.iter().filter(|r| r.kind == kind).collect::<Vec<_>>();
    let listens = of("channel.listen");
    assert_eq!(listens.len(), 1);
    assert_eq!(listens[0].actor, "b");
    let grants = of("channel.grant");
    assert_eq!(grants.len(), 2, "{grants:?}");
    let made: serde_json::Value = serde_json::from_str(&grants[0].detail).unwrap();
    assert_eq!(grants[0].actor, "a");
    assert_eq!(made["ticket_id"], hex::encode(&g.ticket_id));
    assert_eq!(made["server_host"], "b");
    assert_eq!(made["client_addrs"], serde_json::json!(["10.99.0.11"]));
    assert_eq!(made["epoch"], g.epoch);
    let no: serde_json::Value = serde_json::from_str(&grants[1].detail).unwrap();
    assert!(no["ticket_id"].is_null());
    assert!(
        no["outcome"].to_string().contains("denied by policy"),
        "{no}"
    );
    let secret = hex::encode(&g.pair_secret);
    assert!(
        rows.iter().all(|r| !r.detail.contains(&secret)),
        "a pair secret was audited"
    );
}

// ---- Channel keys v2 between the appliance and the module: `Qualify`
// answers a v2 module's connect with a sealed grant, `Listen` answers the
// module's listen sealed, the host keys and revocations pushes carry
// sealed orders. The test plays the modules (`common::sealing`).

/// The module's `NetRequest` of `kind` by `program_name` (the test's
/// subject) to `dst`:`port`, from nowhere yet (source all zero).
fn net_record(kind: proto::NetKind, program_name: &str, dst: [u8; 4], port: u16) -> Vec<u8> {
    let mut dst_addr = [0u8; 16];
    dst_addr[..4].copy_from_slice(&dst);
    let s = subject();
    let rec = Record::NetRequest(proto::NetRequest {
        kind,
        family: proto::Family::Ipv4,
        src_addr: [0; 16],
        src_port: 0,
        dst_addr,
        dst_port: port,
        sha256: sha(program_name),
        program_source: proto::ProgramSource::Lineage,
        uid: s.uid,
        euid: s.euid,
        gid: s.gid,
        loginuid: s.loginuid,
        sessionid: s.session,
        pid: s.pid,
        ppid: 1,
        ancestry: proto::Ancestry::from_bytes(&[]).unwrap(),
    });
    module::encode(&rec, 70).unwrap()
}

/// A connect (before the SYN) of `program_name` to `dst`:5432 as an agent
/// asks it, with the module's bytes when `sealed`.
fn connect(program_name: &str, dst: [u8; 4], sealed: bool) -> pb::Request {
    pb::Request {
        id: 9,
        action: pb::Action::Connect as i32,
        subject: Some(subject()),
        program: Some(program(program_name)),
        target: Some(pb::request::Target::Net(pb::NetTarget {
            proto: pb::Proto::Tcp as i32,
            src_addr: "0.0.0.0".into(),
            src_port: 0,
            dst_addr: std::net::Ipv4Addr::from(dst).to_string(),
            dst_port: 5432,
            established: false,
        })),
        peer: None,
        module_request: if sealed {
            net_record(proto::NetKind::Connect, program_name, dst, 5432)
        } else {
            Vec::new()
        },
    }
}

/// `r` asked alone in a batch from a module of `module_version` whose
/// session is `m` (none: unsealed).
async fn qualify_one(
    c: &mut Client,
    r: pb::Request,
    m: Option<&Module>,
    module_version: u32,
) -> pb::Result {
    c.qualify(pb::QualifyBatch {
        requests: vec![r],
        module_session: m.map(|m| m.public.to_vec()).unwrap_or_default(),
        module_version,
    })
    .await
    .unwrap()
    .into_inner()
    .results
    .remove(0)
}

/// The record `m` finds sealed in `answer` for the request `r`: an answer
/// (sequence 0) to the module's request id.
fn sealed_answer(m: &Module, answer: &[u8], request: &[u8]) -> Vec<u8> {
    let opened = m.open(answer, &digest(request)).unwrap();
    assert_eq!((opened.request_id, opened.seq), (70, 0));
    opened.inner
}

fn verdict_of(inner: &[u8]) -> proto::Verdict {
    match proto::decode(inner).unwrap().1 {
        Record::Verdict(v) => v,
        other => panic!("not a verdict: {:?}", other.kind()),
    }
}

fn grant_of(inner: &[u8]) -> proto::Grant {
    match proto::decode(inner).unwrap().1 {
        Record::Grant(g) => g,
        other => panic!("not a grant: {:?}", other.kind()),
    }
}

/// What `b`'s kernel finds in the ticket of `g` sent by 10.99.0.11.
fn open_at_b(b_keys: &HostKeys, g: &proto::Grant) -> wire::Ticket {
    let key = HostKey::from_record(b_keys, g.epoch).unwrap();
    let nonce = [3u8; 16];
    let m = wire::assemble(&nonce, g.epoch, &g.gcm_nonce, &g.ciphertext, &g.tag);
    let (bid, pg) = (tickets::host_id("b"), sha("postgres"));
    tickets::open(&key, &m, &accepting(&bid, &pg, v4([10, 99, 0, 11])), NEVER)
        .unwrap()
        .0
}

/// A v2 module's connect that must be a channel, to a registered service,
/// is answered with a sealed grant (its MAC under the session key, the
/// ticket opening under the server's host key, naming the caller); a v1
/// module's, or one to an unregistered service, gets today's verdict; a
/// module without a session gets the grant's fields; audited as a grant.
#[tokio::test]
async fn a_v2_modules_connect_to_a_registered_service_is_answered_with_a_sealed_grant() {
    let v = appliance(false).await;
    let ma = Module::new(&v.app.api.pki.authority().public());
    let (mut a, _sa) = host_with(&v.app, "a", "10.99.0.11", ma.public.to_vec()).await;
    let (mut b, mut sb) = host(&v.app, "b", "10.99.0.12").await;
    let (_c, _sc) = host(&v.app, "c", "10.99.0.13").await;
    assert!(listen(&mut b, "postgres", 5432).await.allowed);
    let b_keys = host_keys(&mut sb).await;

    let req = connect("psql", [10, 99, 0, 12], true);
    let r = qualify_one(&mut a, req.clone(), Some(&ma), MODULE_VERSION_TICKETS).await;
    assert_eq!(r.verdict(), pb::Verdict::AllowWithConditions, "{r:?}");
    assert!(r.grant.is_none(), "sealed: no grant in the clear");
    let g = grant_of(&sealed_answer(&ma, &r.module_answer, &req.module_request));
    assert!(g.valid_s > 0 && g.valid_s <= 600, "{g:?}");
    assert_eq!(g.tls, proto::ChannelTls::Tls13);
    let t = open_at_b(&b_keys, &g);
    assert_eq!(t.client_host, tickets::host_id("a"));
    assert_eq!(t.client_program, sha("psql"));
    assert_eq!((t.id, t.pair_secret), (g.ticket_id, g.pair_secret));
    assert_eq!((t.expires_s, t.generation), (g.expires_s, g.generation));
    // Another module's session does not open it.
    let other = Module::new(&v.app.api.pki.authority().public());
    assert!(other
        .open(&r.module_answer, &digest(&req.module_request))
        .is_err());

    // A v1 module: today's verdict, sealed.
    let r = qualify_one(&mut a, req.clone(), Some(&ma), MODULE_VERSION_TICKETS - 1).await;
    let verdict = verdict_of(&sealed_answer(&ma, &r.module_answer, &req.module_request));
    assert!(verdict.obligations.encrypt && verdict.decision != proto::Decision::Deny);
    // A service nobody registered (c listens on nothing): the same.
    let to_c = connect("psql", [10, 99, 0, 13], true);
    let r = qualify_one(&mut a, to_c.clone(), Some(&ma), MODULE_VERSION_TICKETS).await;
    let verdict = verdict_of(&sealed_answer(&ma, &r.module_answer, &to_c.module_request));
    assert!(verdict.obligations.encrypt && verdict.decision != proto::Decision::Deny);
    assert!(r.grant.is_none());

    // A v2 module without a session: the grant's fields, for a bare record.
    let r = qualify_one(
        &mut a,
        connect("psql", [10, 99, 0, 12], false),
        None,
        MODULE_VERSION_TICKETS,
    )
    .await;
    assert!(r.module_answer.is_empty());
    let reply = r.grant.expect("a grant");
    let g2 = module::grant_of(&reply).unwrap();
    assert_eq!(open_at_b(&b_keys, &g2).client_host, tickets::host_id("a"));
    assert_ne!(g2.ticket_id, g.ticket_id);

    let rows = v.app.api.store.audit_rows(0, u32::MAX).unwrap();
    let grants: Vec<_> = rows.iter().filter(|r| r.kind == "channel.grant").collect();
    assert_eq!(grants.len(), 2, "one per grant: {grants:?}");
    assert!(grants[0].detail.contains(&hex::encode(g.ticket_id)));
    assert!(rows
        .iter()
        .all(|r| !r.detail.contains(&hex::encode(g.pair_secret))));
}

/// A v2 connect whose pair policy refuses (b's postgres accepts no
/// client from the rogue) is answered with a sealed deny naming why.
#[tokio::test]
async fn a_refused_pair_is_answered_with_a_sealed_deny() {
    let v = appliance(false).await;
    let store = &v.app.api.store;
    let policy = concat!(
        connect_5432_policy!(),
        r#"
@id("servers-accept-clients")
@encrypt("required")
permit (principal, action == Trustbind::Action::"accept", resource)
when { context.program in Trustbind::ProgramGroup::"servers" };
@id("not-from-the-rogue")
forbid (principal, action == Trustbind::Action::"accept", resource)
when { context has peer_host && context.peer_host == Trustbind::Host::"rogue" };
"#
    );
    let id = store.create_policy_draft(policy, "", "admin:t").unwrap();
    store.activate_policy(id, "admin:t").unwrap();
    let m = Module::new(&v.app.api.pki.authority().public());
    let (mut rogue, _sr) = host_with(&v.app, "rogue", "10.99.0.66", m.public.to_vec()).await;
    let (mut b, _sb) = host(&v.app, "b", "10.99.0.12").await;
    assert!(listen(&mut b, "postgres", 5432).await.allowed);
    let req = connect("psql", [10, 99, 0, 12], true);
    let r = qualify_one(&mut rogue, req.clone(), Some(&m), MODULE_VERSION_TICKETS).await;
    assert_eq!(r.verdict(), pb::Verdict::Deny, "{r:?}");
    assert!(r.reasons[0].contains("denied by policy"), "{r:?}");
    let verdict = verdict_of(&sealed_answer(&m, &r.module_answer, &req.module_request));
    assert_eq!(verdict.decision, proto::Decision::Deny);
    assert!(!verdict.cacheable);
}

/// `Listen` with the module's record answers a sealed verdict bound to
/// its digest (allow: registered; deny: not); a record that says
/// otherwise than the fields, or no session, is refused.
#[tokio::test]
async fn a_listen_with_the_modules_record_is_answered_sealed() {
    let v = appliance(false).await;
    let m = Module::new(&v.app.api.pki.authority().public());
    let (mut b, _sb) = host_with(&v.app, "b", "10.99.0.12", m.public.to_vec()).await;
    let ask = |name: &str, port: u32, record: Vec<u8>, session: Vec<u8>| pb::ListenRequest {
        subject: Some(subject()),
        program: Some(program(name)),
        port,
        module_request: record,
        module_session: session,
    };
    let pg = net_record(proto::NetKind::Listen, "postgres", [0; 4], 5432);
    let l = b
        .listen(ask("postgres", 5432, pg.clone(), m.public.to_vec()))
        .await
        .unwrap()
        .into_inner();
    assert!(l.allowed && l.channel, "{l:?}");
    // A channel service (its accept permit has @encrypt): the module is
    // told so, and looks for tickets on its accepts.
    let verdict = verdict_of(&sealed_answer(&m, &l.module_answer, &pg));
    assert_eq!(verdict.decision, proto::Decision::AllowWithConditions);
    assert!(verdict.obligations.encrypt);
    let nc = net_record(proto::NetKind::Listen, "nc", [0; 4], 5432);
    let l = b
        .listen(ask("nc", 5432, nc.clone(), m.public.to_vec()))
        .await
        .unwrap()
        .into_inner();
    assert!(!l.allowed);
    assert_eq!(
        verdict_of(&sealed_answer(&m, &l.module_answer, &nc)).decision,
        proto::Decision::Deny
    );
    // The fields say otherwise than the record: refused, nothing registered.
    let contradicting = [
        ask("postgres", 5433, pg.clone(), m.public.to_vec()),
        ask("nc", 5432, pg.clone(), m.public.to_vec()),
        ask(
            "postgres",
            5432,
            net_record(proto::NetKind::Connect, "postgres", [0; 4], 5432),
            m.public.to_vec(),
        ),
        ask("postgres", 5432, pg.clone(), Vec::new()),
    ];
    for r in contradicting {
        let st = b.listen(r).await.unwrap_err();
        assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
    }
    let mut other = subject();
    other.uid = 0;
    let st = b
        .listen(pb::ListenRequest {
            subject: Some(other),
            ..ask("postgres", 5432, pg, m.public.to_vec())
        })
        .await
        .unwrap_err();
    assert!(st.message().contains("subject.uid"), "{st:?}");
}

/// The sealed order in a push (`module_order`), opened by `m`: its
/// sequence and record.
fn order(m: &Module, sealed: &[u8]) -> (u64, Vec<u8>) {
    let opened = m.open(sealed, &[0; 32]).unwrap();
    assert_eq!(opened.request_id, 0);
    (opened.seq, opened.inner)
}

/// The next host keys push: its order's sequence, the keys, the order.
async fn sealed_host_keys(s: &mut Streaming<Push>, m: &Module) -> (u64, HostKeys, Vec<u8>) {
    let k = next(s, |k| match k {
        push::Kind::HostKeys(k) => Some(k),
        _ => None,
    })
    .await;
    let (seq, inner) = order(m, &k.module_order);
    let Record::HostKeys(keys) = proto::decode(&inner).unwrap().1 else {
        panic!("not host keys")
    };
    assert_eq!(&keys.encode()[..], &k.record[..]);
    (seq, keys, k.module_order)
}

async fn sealed_revocations(s: &mut Streaming<Push>, m: &Module) -> (u64, Vec<Vec<u8>>) {
    let r = revocations(s).await;
    let (seq, inner) = order(m, &r.module_order);
    let Record::Revocations(rec) = proto::decode(&inner).unwrap().1 else {
        panic!("not revocations")
    };
    assert_eq!(rec.min_generation, r.min_generation);
    (seq, rec.hosts().map(<[u8]>::to_vec).collect())
}

/// The host keys and revocations pushes carry sealed orders for the
/// subscriber's module, each kind with increasing sequences, the host
/// keys only the subscriber's own; a subscriber without a session gets
/// none.
#[tokio::test]
async fn host_keys_and_revocations_are_sealed_orders_for_the_subscribers_module() {
    let v = appliance(false).await;
    let authority = v.app.api.pki.authority().public();
    let (ma, mb) = (Module::new(&authority), Module::new(&authority));
    let (_a, mut sa) = host_with(&v.app, "a", "10.99.0.11", ma.public.to_vec()).await;
    let (_b, mut sb) = host_with(&v.app, "b", "10.99.0.12", mb.public.to_vec()).await;
    let (_c, mut sc) = host(&v.app, "c", "10.99.0.13").await;
    let (a_seq, a_keys, _) = sealed_host_keys(&mut sa, &ma).await;
    let (b_seq, b_keys, _) = sealed_host_keys(&mut sb, &mb).await;
    assert_eq!(a_keys.host, tickets::host_id("a"));
    assert_eq!(b_keys.host, tickets::host_id("b"));
    assert!(a_seq > 0 && b_seq > 0);
    let (a_rseq, _) = sealed_revocations(&mut sa, &ma).await;
    let (b_rseq, _) = sealed_revocations(&mut sb, &mb).await;
    assert!(a_rseq > a_seq && b_rseq > b_seq);
    // Unsealed for a subscriber without a session.
    let k = next(&mut sc, |k| match k {
        push::Kind::HostKeys(k) => Some(k),
        _ => None,
    })
    .await;
    assert!(k.module_order.is_empty() && !k.record.is_empty());
    assert!(revocations(&mut sc).await.module_order.is_empty());
    drain(&mut sa).await;
    drain(&mut sb).await;
    let grants = v.app.api.grants().unwrap();
    grants.revoke_host("rogue");
    let (a_next, hosts) = sealed_revocations(&mut sa, &ma).await;
    assert!(a_next > a_rseq);
    assert_eq!(hosts, vec![tickets::host_id("rogue").to_vec()]);
    let (b_next, _) = sealed_revocations(&mut sb, &mb).await;
    assert!(b_next > b_rseq);
    // A new epoch: each its own keys again, sealed with a later sequence.
    grants.rotate(0);
    let (a_again, keys, _) = sealed_host_keys(&mut sa, &ma).await;
    assert!(a_again > a_next && keys.host == tickets::host_id("a"));
    let (b_again, keys, b_order) = sealed_host_keys(&mut sb, &mb).await;
    assert!(b_again > b_next && keys.host == tickets::host_id("b"));
    // Sealed for b's module only.
    assert!(ma.open(&b_order, &[0; 32]).is_err());
}
