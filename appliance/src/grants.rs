//! Channel keys v2 on the appliance (`docs/CHANNEL-KEYS-V2.md`): server
//! registrations, grants, host keys and revocations, served by the agent
//! API's `Listen` and `Grant` calls and its push stream. The v1 correlator
//! (`crate::gate`, `crate::channels`) still serves today's halves.
//!
//! - **Listen**: a host registers a listening server program on one of its
//!   ports. The engine decides it as today's accept half decided alone
//!   (no peer); allowed, `(server host, port)` lists the program (at most
//!   [`MAX_SERVER_PROGRAMS`] per service, the oldest forgotten).
//! - **Grant**: the calling host (its certificate, never a field) asks for
//!   its client program to reach `(server address, port)`. The server host
//!   is the one that owns the address (`crate::hostaddr`: assigned, or
//!   observed for one host only; loopback is the caller itself); the
//!   programs registered there are each decided with the client as a pair
//!   ([`Engine::decide_pair`], as today's halves), the pair licences are
//!   charged to the client host's own share ([`Limits::check_share_at`],
//!   T-70), and the ticket names the client's addresses as the appliance
//!   knows them, never as the client claims them.
//! - **Host keys**: each host gets its own keys (current and previous
//!   epoch) on its push stream, named by its certificate.
//! - **Revocations**: a record of the lowest valid generation, revoked
//!   client hosts and revoked tickets, pushed to every connected host when
//!   the policy generation moves, a host is revoked or a host's share of a
//!   pair licence runs out. Entries are kept for one grant lifetime: after
//!   that every ticket they could name has expired. A record that cannot
//!   list them all revokes more, never less ([`Grants::revocations`]).
//!
//! Nothing here writes to the store: the agent API audits listens and
//! grants through the group-commit writer with the decisions.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use trustbind_proto::ticket::{self, Addr, Ticket, HOST_ID_LEN, TICKET_ID_LEN};

use crate::agent_api::pb::{self, push};
use crate::agent_api::Hub;
use crate::channels::ChannelTerms;
use crate::hostaddr;
use crate::limits::{LicenseKey, LicenseTime, Limits};
use crate::policy::engine::{Decision, Engine};
use crate::policy::{Outcome, Verdict};
use crate::request::{FiveTuple, QualifyRequest, Target};
use crate::store::{hex, AuditEvent, HostState, Store};
use crate::tickets::{self, Farm};

pub use trustbind_proto::ticket::MAX_SERVER_PROGRAMS;

/// How long a grant is good for (the ticket's expiry).
pub const DEFAULT_GRANT_TTL: Duration = Duration::from_secs(600);
/// Most services one host may register (ports with a program).
pub const MAX_SERVICES_PER_HOST: usize = 4096;
/// Most unexpired tickets remembered per client host (to revoke them when
/// its share of a pair licence runs out); the oldest is forgotten.
pub const MAX_ISSUED_PER_HOST: usize = 1024;

/// A registered server program: its listen request (host, user, program),
/// from which the accept side of a pair decision is made.
#[derive(Debug, Clone)]
struct Registered {
    listen: QualifyRequest,
}

#[derive(Debug, Default)]
struct State {
    /// (server host, port) -> its programs, oldest first.
    services: HashMap<(String, u16), Vec<Registered>>,
    /// Services per host.
    per_host: HashMap<String, usize>,
    /// Per client host: (pair licence subject, ticket id, expiry) of its
    /// tickets, oldest first.
    issued: HashMap<String, VecDeque<(String, [u8; TICKET_ID_LEN], u64)>>,
    /// The lowest generation still valid.
    min_generation: u64,
    /// Revoked client hosts, until (wall-clock seconds).
    revoked_hosts: Vec<([u8; HOST_ID_LEN], u64)>,
    /// Revoked tickets with their client host, until their expiry.
    revoked_tickets: Vec<([u8; TICKET_ID_LEN], [u8; HOST_ID_LEN], u64)>,
}

/// What a grant answers.
#[derive(Debug)]
pub enum Granted {
    /// The ticket and its pair secret.
    Yes(Box<GrantMade>),
    /// Refused, and why.
    No(String),
}

/// A grant made, with what its audit row records.
#[derive(Debug)]
pub struct GrantMade {
    /// The sealed ticket and pair secret.
    pub grant: tickets::Grant,
    /// Policy generation of the pair decision.
    pub generation: i64,
    /// The server host.
    pub server_host: String,
    /// Allowed server programs (hex).
    pub server_programs: Vec<String>,
    /// The client's addresses the ticket lists.
    pub client_addrs: Vec<String>,
    /// The channel's terms (from the first allowing pair decision).
    pub terms: ChannelTerms,
}

/// The server end of a connect as a v2 service: the host that owns its
/// address and the programs registered there on its port.
#[derive(Debug)]
struct Service {
    host: String,
    ip: IpAddr,
    programs: Vec<Registered>,
}

/// What a listen answers.
#[derive(Debug)]
pub struct Listened {
    /// Registered (policy lets the program serve there).
    pub allowed: bool,
    /// Registered, and the decision requires a channel (`@encrypt`).
    pub channel: bool,
    /// The decision's reasons (why not, or the determining policies).
    pub reasons: Vec<String>,
    /// Its generation.
    pub generation: i64,
}

/// The appliance's v2 channel state.
pub struct Grants {
    farm: Farm,
    engine: Arc<Engine>,
    store: Arc<Store>,
    hub: Arc<Hub>,
    limits: Option<Arc<Limits>>,
    ttl: Duration,
    state: Mutex<State>,
}

impl std::fmt::Debug for Grants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grants").finish_non_exhaustive()
    }
}

/// Wall-clock seconds now.
pub fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn allows(d: &Decision) -> bool {
    !matches!(d.outcome.verdict, Verdict::Deny)
}

fn ticket_addr(a: IpAddr) -> Addr {
    match a.to_canonical() {
        IpAddr::V4(v4) => Addr::v4(v4.octets()),
        IpAddr::V6(v6) => Addr {
            family: 6,
            bytes: v6.octets(),
        },
    }
}

fn sha_bytes(hex_sha: &str) -> [u8; 32] {
    let mut b = [0u8; 32];
    // Validated as 32 bytes on the way in (`convert`).
    let _ = ::hex::decode_to_slice(hex_sha, &mut b);
    b
}

impl Grants {
    /// Grants sealed with `farm`'s keys, decided by `engine`, licensed by
    /// `limits` (when given), pushed through `hub`.
    pub fn new(
        farm: Farm,
        engine: Arc<Engine>,
        store: Arc<Store>,
        hub: Arc<Hub>,
        limits: Option<Arc<Limits>>,
    ) -> Self {
        let min_generation = u64::try_from(engine.generation()).unwrap_or(0);
        Self {
            farm,
            engine,
            store,
            hub,
            limits,
            ttl: DEFAULT_GRANT_TTL,
            state: Mutex::new(State {
                min_generation,
                ..State::default()
            }),
        }
    }

    /// These grants with tickets good for `ttl`.
    pub fn with_ttl(self, ttl: Duration) -> Self {
        Self { ttl, ..self }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every change leaves the state consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `listen` (an accept request of the calling host with
    /// `dst_port` its port) if policy lets its program serve there.
    pub fn listen(&self, listen: &QualifyRequest) -> Result<Listened, String> {
        let Target::Net(t) = &listen.target else {
            return Err("not a network request".into());
        };
        let d = self.engine.decide(listen).map_err(|e| e.to_string())?;
        let allowed = allows(&d);
        if allowed {
            let mut s = self.state();
            let key = (listen.host.clone(), t.dst_port);
            let known = s.services.contains_key(&key);
            if !known && s.per_host.get(&listen.host).copied().unwrap_or(0) >= MAX_SERVICES_PER_HOST
            {
                return Ok(Listened {
                    allowed: false,
                    channel: false,
                    reasons: vec![format!(
                        "host `{}` registers {MAX_SERVICES_PER_HOST} services, its most",
                        listen.host
                    )],
                    generation: d.generation,
                });
            }
            if !known {
                *s.per_host.entry(listen.host.clone()).or_default() += 1;
            }
            let list = s.services.entry(key).or_default();
            list.retain(|r| r.listen.program.sha256 != listen.program.sha256);
            if list.len() >= MAX_SERVER_PROGRAMS {
                list.remove(0);
            }
            list.push(Registered {
                listen: listen.clone(),
            });
        }
        Ok(Listened {
            allowed,
            channel: allowed && crate::gate::requires_channel(&d.outcome.verdict),
            reasons: d.outcome.reasons,
            generation: d.generation,
        })
    }

    /// The host that owns `addr` as a server end: the caller for a
    /// loopback address, else the host it is assigned to, else the one
    /// host whose agent connects from it.
    fn server_host(&self, client: &str, addr: IpAddr) -> Result<Option<String>, String> {
        let a = addr.to_canonical();
        if a.is_loopback() {
            return Ok(Some(client.to_owned()));
        }
        if let Some(h) = self.store.address_owner(a).map_err(|e| e.to_string())? {
            return Ok(Some(h));
        }
        let mut seen = self.hub.addrs().hosts_at(a, Instant::now());
        Ok(if seen.len() == 1 { seen.pop() } else { None })
    }

    /// The addresses `host` owns as the appliance knows them (assigned,
    /// or observed and no other host's), loopback too when `loopback`; at
    /// most [`ticket::MAX_CLIENT_ADDRS`].
    fn client_addrs(&self, host: &str, loopback: bool) -> Result<Vec<IpAddr>, String> {
        let now = Instant::now();
        let mut out: Vec<IpAddr> = Vec::new();
        if loopback {
            out.push(IpAddr::from([127, 0, 0, 1]));
            out.push(IpAddr::from(std::net::Ipv6Addr::LOCALHOST));
        }
        let assigned = self.store.host_addresses(host).map_err(|e| e.to_string())?;
        let candidates = assigned
            .iter()
            .filter_map(|a| hostaddr::parse(a))
            .chain(self.hub.addrs().of(host, now));
        for a in candidates {
            let owned = hostaddr::standing(&self.store, self.hub.addrs(), host, a, now)
                .map_err(|e| e.to_string())
                .map(|s| hostaddr::owns(&a.to_string(), |_| s).is_ok())?;
            if owned && !out.contains(&a) {
                out.push(a);
            }
        }
        out.truncate(ticket::MAX_CLIENT_ADDRS);
        Ok(out)
    }

    /// The v2 service at the server end of `t` (`dst_addr`, `dst_port`)
    /// for a connect of `client`, or why there is none: the address is no
    /// enrolled host's, or nothing is registered on its port there.
    fn service(&self, client: &str, t: &FiveTuple) -> Result<Result<Service, String>, String> {
        let Some(server_ip) = hostaddr::parse(&t.dst_addr) else {
            return Ok(Err(format!("`{}` is not an IP address", t.dst_addr)));
        };
        let Some(server_host) = self.server_host(client, server_ip)? else {
            return Ok(Err(format!(
                "no enrolled host owns {server_ip} (`trustbind host addresses` assigns addresses to a host)"
            )));
        };
        // A revoked server may still hold its host keys: nothing is sealed
        // to it any more.
        let server_state = self.store.host(&server_host).map_err(|e| e.to_string())?;
        if !matches!(server_state, Some((HostState::Enrolled, _))) {
            return Ok(Err(format!(
                "host `{server_host}`, which owns {server_ip}, is not enrolled"
            )));
        }
        let programs = self
            .state()
            .services
            .get(&(server_host.clone(), t.dst_port))
            .cloned()
            .unwrap_or_default();
        if programs.is_empty() {
            return Ok(Err(format!(
                "no server program is registered on host `{server_host}` port {}",
                t.dst_port
            )));
        }
        Ok(Ok(Service {
            host: server_host,
            ip: server_ip,
            programs,
        }))
    }

    /// A grant for `connect` (a connect request of the calling host:
    /// `dst_addr`, `dst_port` the server end; its `src_addr` is replaced
    /// by what the appliance knows of the host): `Agent.Grant`. One call
    /// of the host's licence.
    pub fn grant(&self, connect: &QualifyRequest) -> Result<Granted, String> {
        let Target::Net(t) = &connect.target else {
            return Err("not a network request".into());
        };
        // A grant is one call of the host's license, as a request is.
        if let Some(l) = &self.limits {
            let host = LicenseKey::Host {
                host: connect.host.clone(),
            };
            if let Err(e) = l.check_at(&host, LicenseTime::now()) {
                return Ok(Granted::No(format!("license: {e}")));
            }
        }
        match self.service(&connect.host, t)? {
            Ok(service) => self.issue(connect, t, service),
            Err(why) => Ok(Granted::No(why)),
        }
    }

    /// A grant for `connect` as `Qualify` answers a channel keys v2
    /// module's connect (already decided, and charged as a request, by
    /// the caller): `None` when its server end is no registered service
    /// (a v1 server: the connect is answered as before), else what
    /// [`Grants::grant`] would answer.
    pub fn grant_registered(&self, connect: &QualifyRequest) -> Result<Option<Granted>, String> {
        let Target::Net(t) = &connect.target else {
            return Ok(None);
        };
        match self.service(&connect.host, t)? {
            Ok(service) => self.issue(connect, t, service).map(Some),
            Err(_) => Ok(None),
        }
    }

    /// The grant for `connect` to `service`: each registered program
    /// decided with the client as a pair, the pair licences charged to
    /// the client host's share, the ticket sealed to the server's host key.
    fn issue(
        &self,
        connect: &QualifyRequest,
        t: &FiveTuple,
        service: Service,
    ) -> Result<Granted, String> {
        let Service {
            host: server_host,
            ip: server_ip,
            programs: registered,
        } = service;
        let addrs = self.client_addrs(&connect.host, server_ip.is_loopback())?;
        if addrs.is_empty() {
            // The ticket would list no peer the server could accept.
            return Ok(Granted::No(format!(
                "no address of host `{}` is known (`trustbind host addresses` assigns addresses to a host)",
                connect.host
            )));
        }
        let mut connect = connect.clone();
        if let Target::Net(t) = &mut connect.target {
            t.src_addr = addrs
                .first()
                .map_or_else(|| "0.0.0.0".to_owned(), ToString::to_string);
            t.src_port = 0;
        }
        let mut allowed: Vec<(String, Decision)> = Vec::new();
        let mut refusals = Vec::new();
        for r in &registered {
            let mut accept = r.listen.clone();
            if let (Target::Net(a), Target::Net(c)) = (&mut accept.target, &connect.target) {
                a.src_addr.clone_from(&c.src_addr);
                a.dst_addr.clone_from(&c.dst_addr);
            }
            let d = self
                .engine
                .decide_pair(&connect, &accept)
                .map_err(|e| e.to_string())?;
            let server_sha = &accept.program.sha256;
            if !allows(&d) {
                refusals.push(format!(
                    "pair with {server_sha} denied by policy ({})",
                    d.outcome.reasons.join(", ")
                ));
                continue;
            }
            if let Err(e) = self.charge(&connect, server_sha) {
                refusals.push(e);
                continue;
            }
            allowed.push((server_sha.clone(), d));
        }
        let Some((_, first)) = allowed.first() else {
            return Ok(Granted::No(refusals.join("; ")));
        };
        let generation = first.generation;
        let terms = match &first.outcome.verdict {
            Verdict::AllowWithConditions { obligations } => ChannelTerms::of(obligations),
            _ => ChannelTerms::default(),
        };
        let expires_s = now_s().saturating_add(self.ttl.as_secs());
        let mut tk = Ticket {
            client_host: tickets::host_id(&connect.host),
            client_program: sha_bytes(&connect.program.sha256),
            client_uid: connect.subject.uid,
            client_loginuid: connect.subject.loginuid,
            server_host: tickets::host_id(&server_host),
            port: t.dst_port,
            generation: u64::try_from(generation).unwrap_or(0),
            expires_s,
            terms: if terms.tls12 { ticket::TERM_TLS12 } else { 0 },
            idle_s: terms.idle_timeout_s,
            ..Ticket::default()
        };
        for (slot, a) in tk.client_addrs.iter_mut().zip(&addrs) {
            *slot = ticket_addr(*a);
        }
        // CAST: at most MAX_CLIENT_ADDRS and MAX_SERVER_PROGRAMS (both < 256).
        tk.n_client_addrs = addrs.len() as u8;
        for (slot, (sha, _)) in tk.server_programs.iter_mut().zip(&allowed) {
            *slot = sha_bytes(sha);
        }
        tk.n_server_programs = allowed.len().min(MAX_SERVER_PROGRAMS) as u8;
        let grant = self
            .farm
            .grant(tk, tickets::epoch_of(now_s()))
            .map_err(|e| e.to_string())?;
        {
            let mut s = self.state();
            let list = s.issued.entry(connect.host.clone()).or_default();
            let now = now_s();
            list.retain(|(_, _, until)| *until >= now);
            for (sha, _) in &allowed {
                if list.len() >= MAX_ISSUED_PER_HOST {
                    list.pop_front();
                }
                list.push_back((pair_subject(&connect, sha), grant.ticket_id, expires_s));
            }
        }
        Ok(Granted::Yes(Box::new(GrantMade {
            grant,
            generation,
            server_host,
            server_programs: allowed.into_iter().map(|(s, _)| s).collect(),
            client_addrs: addrs.iter().map(ToString::to_string).collect(),
            terms,
        })))
    }

    /// Charges the client host's share of the pair license of
    /// `connect`'s program and `server_sha`. When the share runs out, that
    /// host's tickets for the pair are revoked (and pushed).
    fn charge(&self, connect: &QualifyRequest, server_sha: &str) -> Result<(), String> {
        let Some(limits) = &self.limits else {
            return Ok(());
        };
        let pair = LicenseKey::Pair {
            client: connect.program.sha256.clone(),
            server: server_sha.to_owned(),
        };
        match limits.check_share_at(&pair, &connect.host, LicenseTime::now()) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.revoke_pair_of(&connect.host, &pair.subject_id());
                Err(format!("license: {e}"))
            }
        }
    }

    /// Revokes `host`'s unexpired tickets of the pair licence `subject`.
    fn revoke_pair_of(&self, host: &str, subject: &str) {
        let changed = {
            let mut s = self.state();
            let now = now_s();
            let ids: Vec<([u8; TICKET_ID_LEN], u64)> = s
                .issued
                .get(host)
                .map(|l| {
                    l.iter()
                        .filter(|(p, _, until)| p == subject && *until >= now)
                        .map(|(_, id, until)| (*id, *until))
                        .collect()
                })
                .unwrap_or_default();
            let mut changed = false;
            let client = tickets::host_id(host);
            for (id, until) in ids {
                if !s.revoked_tickets.iter().any(|(r, _, _)| *r == id) {
                    s.revoked_tickets.push((id, client, until));
                    changed = true;
                }
            }
            changed
        };
        if changed {
            self.broadcast_revocations();
        }
    }

    /// `host` was revoked: its tickets are refused from now on (pushed).
    pub fn revoke_host(&self, host: &str) {
        let id = tickets::host_id(host);
        {
            let mut s = self.state();
            let until = now_s().saturating_add(self.ttl.as_secs());
            s.revoked_hosts.retain(|(h, _)| *h != id);
            s.revoked_hosts.push((id, until));
            s.issued.remove(host);
            s.per_host.remove(host);
            s.services.retain(|(h, _), _| h != host);
        }
        self.broadcast_revocations();
    }

    /// The policy generation moved to `generation`: tickets of earlier
    /// ones are refused from now on (pushed).
    pub fn generation_moved(&self, generation: i64) {
        let g = u64::try_from(generation).unwrap_or(0);
        {
            let mut s = self.state();
            if g <= s.min_generation {
                return;
            }
            s.min_generation = g;
        }
        self.broadcast_revocations();
    }

    /// The revocations in force, as a push. Entries are dropped only once
    /// expired; past a record's room it revokes more, never less: revoked
    /// tickets that do not fit are revoked by their client host instead,
    /// and revoked hosts that do not fit make the record refuse every
    /// ticket (lowest valid generation `u64::MAX`) until they expire.
    pub fn revocations(&self) -> push::Kind {
        let mut s = self.state();
        let now = now_s();
        s.revoked_hosts.retain(|(_, until)| *until >= now);
        s.revoked_tickets.retain(|(_, _, until)| *until >= now);
        let mut hosts: Vec<[u8; HOST_ID_LEN]> = s.revoked_hosts.iter().map(|(h, _)| *h).collect();
        let mut ids: Vec<[u8; TICKET_ID_LEN]> =
            s.revoked_tickets.iter().map(|(t, _, _)| *t).collect();
        if ids.len() > ticket::MAX_REVOKED {
            ids.clear();
            for (_, h, _) in &s.revoked_tickets {
                if !hosts.contains(h) {
                    hosts.push(*h);
                }
            }
        }
        let mut min_generation = s.min_generation;
        if hosts.len() > ticket::MAX_REVOKED {
            tracing::error!(
                "{} hosts revoked within a grant's lifetime, more than a revocation record lists: every ticket is refused until they expire",
                hosts.len()
            );
            hosts.clear();
            ids.clear();
            min_generation = u64::MAX;
        }
        let mut record = vec![0u8; ticket::MAX_REVOCATIONS_LEN];
        let n = ticket::Revocations::encode(min_generation, &hosts, &ids, &mut record).unwrap_or(0);
        record.truncate(n);
        push::Kind::Revocations(pb::TicketRevocations {
            record,
            min_generation,
            module_order: Vec::new(),
        })
    }

    fn broadcast_revocations(&self) {
        self.hub.broadcast(self.revocations());
    }

    /// `host`'s own keys of this epoch and the last, as a push.
    pub fn host_keys(&self, host: &str) -> push::Kind {
        self.host_keys_at(host, tickets::epoch_of(now_s()))
    }

    fn host_keys_at(&self, host: &str, epoch: u32) -> push::Kind {
        let record = self.farm.host_keys(&tickets::host_id(host), epoch);
        push::Kind::HostKeys(pb::HostKeys {
            record: record.to_vec(),
            epoch,
            module_order: Vec::new(),
        })
    }

    /// Pushes each connected host its keys when the epoch moved past
    /// `last`; the epoch now.
    pub fn rotate(&self, last: u32) -> u32 {
        self.rotate_to(last, tickets::epoch_of(now_s()))
    }

    /// [`Grants::rotate`] with `epoch` the epoch now.
    fn rotate_to(&self, last: u32, epoch: u32) -> u32 {
        if epoch != last {
            for host in self.hub.connected_hosts() {
                self.hub.push(&host, self.host_keys_at(&host, epoch));
            }
        }
        epoch
    }
}

fn pair_subject(connect: &QualifyRequest, server_sha: &str) -> String {
    LicenseKey::Pair {
        client: connect.program.sha256.clone(),
        server: server_sha.to_owned(),
    }
    .subject_id()
}

/// The reply to a grant (`Agent.Grant`; `Qualify`'s grants are made of it
/// too). It holds the pair secret: wiped by the codec once encoded, or by
/// whoever takes it apart.
pub fn reply(g: Granted) -> pb::GrantReply {
    match g {
        Granted::No(reason) => pb::GrantReply {
            granted: false,
            reason,
            ..pb::GrantReply::default()
        },
        Granted::Yes(m) => pb::GrantReply {
            granted: true,
            reason: String::new(),
            ticket: m.grant.sealed.clone(),
            epoch: m.grant.epoch,
            pair_secret: m.grant.pair_secret.to_vec(),
            expires_s: m.grant.expires_s,
            generation: m.generation,
            ticket_id: m.grant.ticket_id.to_vec(),
            tls12: m.terms.tls12,
            idle_timeout_s: m.terms.idle_timeout_s,
            valid_s: u32::try_from(m.grant.expires_s.saturating_sub(now_s())).unwrap_or(u32::MAX),
        },
    }
}

/// The audit event of a listen: kind `channel.listen`.
pub fn listen_event(listen: &QualifyRequest, l: &Listened) -> AuditEvent {
    #[derive(Serialize)]
    struct Detail<'a> {
        request: &'a QualifyRequest,
        allowed: bool,
        reasons: &'a [String],
        generation: i64,
    }
    AuditEvent::serialized(
        "channel.listen",
        &listen.host,
        &Detail {
            request: listen,
            allowed: l.allowed,
            reasons: &l.reasons,
            generation: l.generation,
        },
    )
}

/// The audit event of a grant or its refusal: kind `channel.grant`, the
/// ticket's id but never its secret.
pub fn grant_event(connect: &QualifyRequest, g: &Granted) -> AuditEvent {
    #[derive(Serialize)]
    struct Detail<'a> {
        request: &'a QualifyRequest,
        outcome: Outcome,
        ticket_id: Option<String>,
        server_host: Option<&'a str>,
        server_programs: &'a [String],
        client_addrs: &'a [String],
        generation: Option<i64>,
        expires_s: Option<u64>,
        epoch: Option<u32>,
    }
    let (outcome, made) = match g {
        Granted::Yes(m) => (Outcome::bare(Verdict::Allow), Some(m)),
        Granted::No(reason) => (
            Outcome {
                reasons: vec![reason.clone()],
                ..Outcome::bare(Verdict::Deny)
            },
            None,
        ),
    };
    AuditEvent::serialized(
        "channel.grant",
        &connect.host,
        &Detail {
            request: connect,
            outcome,
            ticket_id: made.map(|m| hex(&m.grant.ticket_id)),
            server_host: made.map(|m| m.server_host.as_str()),
            server_programs: made.map_or(&[], |m| &m.server_programs),
            client_addrs: made.map_or(&[], |m| &m.client_addrs),
            generation: made.map(|m| m.generation),
            expires_s: made.map(|m| m.grant.expires_s),
            epoch: made.map(|m| m.grant.epoch),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants() -> (tempfile::TempDir, Grants) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("a.db")).unwrap());
        let engine = Arc::new(
            Engine::new(
                Arc::clone(&store),
                include_str!("../../policies/trustbind.cedarschema"),
            )
            .unwrap(),
        );
        let g = Grants::new(
            Farm::new([1; 32]),
            engine,
            store,
            Arc::new(Hub::new()),
            None,
        );
        (dir, g)
    }

    fn record(g: &Grants) -> (u64, Vec<Vec<u8>>, usize) {
        let push::Kind::Revocations(r) = g.revocations() else {
            panic!("not revocations")
        };
        let rec = ticket::Revocations::decode(&r.record).unwrap();
        assert_eq!(rec.min_generation, r.min_generation);
        (
            rec.min_generation,
            rec.hosts().map(<[u8]>::to_vec).collect(),
            rec.tickets().count(),
        )
    }

    /// A record that cannot list every revocation revokes more, never
    /// less: tickets by their client host, then every ticket.
    #[test]
    fn revocations_past_a_records_room_revoke_more_never_less() {
        let (_dir, g) = grants();
        let until = now_s() + 600;
        {
            let mut s = g.state();
            for i in 0..=ticket::MAX_REVOKED {
                let host = [u8::try_from(i % 2).unwrap(); 16];
                let id = u32::try_from(i).unwrap().to_le_bytes().repeat(4);
                s.revoked_tickets
                    .push((id.try_into().unwrap(), host, until));
            }
        }
        let (min, hosts, tickets) = record(&g);
        assert_eq!((min, tickets), (0, 0));
        assert_eq!(hosts, vec![vec![0; 16], vec![1; 16]]);
        // Expired entries go; the rest fit again.
        g.state().revoked_tickets.truncate(3);
        let (_, hosts, tickets) = record(&g);
        assert_eq!((hosts.len(), tickets), (0, 3));
        for i in 0..=ticket::MAX_REVOKED {
            g.revoke_host(&format!("h{i}"));
        }
        let (min, hosts, tickets) = record(&g);
        assert_eq!((min, hosts.len(), tickets), (u64::MAX, 0, 0));
        g.state().revoked_hosts.iter_mut().for_each(|(_, u)| *u = 0);
        let (min, hosts, _) = record(&g);
        assert_eq!((min, hosts.len()), (0, 0));
    }

    /// A new epoch pushes each connected host its own new keys, once.
    #[tokio::test]
    async fn each_connected_host_gets_its_own_keys_when_the_epoch_moves() {
        let (_dir, g) = grants();
        let (_wa, mut a) = g.hub.subscribe("a", Vec::new(), None);
        let (_wb, mut b) = g.hub.subscribe("b", Vec::new(), None);
        assert_eq!(g.rotate_to(6, 6), 6);
        assert_eq!(g.rotate_to(6, 7), 7);
        for (name, rx) in [("a", &mut a), ("b", &mut b)] {
            let got = tokio::time::timeout(Duration::from_secs(1), rx.recv())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            let Some(push::Kind::HostKeys(k)) = got.kind else {
                panic!("not host keys: {got:?}")
            };
            let keys = ticket::HostKeys::decode(&k.record).unwrap();
            assert_eq!(
                (keys.host, keys.epoch, k.epoch),
                (tickets::host_id(name), 7, 7)
            );
            assert_eq!(&k.record[..], &g.farm.host_keys(&keys.host, 7)[..]);
            // Nothing for the epoch that did not move.
            let more = tokio::time::timeout(Duration::from_millis(50), rx.recv()).await;
            assert!(more.is_err(), "{more:?}");
        }
    }

    #[test]
    fn a_generation_only_ever_raises_the_lowest_valid_one() {
        let (_dir, g) = grants();
        g.generation_moved(5);
        g.generation_moved(3);
        assert_eq!(record(&g).0, 5);
    }
}
