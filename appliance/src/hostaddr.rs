//! Which addresses a host owns, for channel halves (issue 15 item 1;
//! threat-model rows T-68 to T-71).
//!
//! A channel half names a 5-tuple; the host that reports it speaks for one
//! end of it, its *local end*: `src` for a connect (the connecting side is
//! always `src`), `dst` for an accept. The appliance pairs halves and hands
//! both ends the channel's key, so a half is only taken into pairing when
//! its local end is an address the reporting host owns. A host owns:
//!
//! - **loopback addresses** (127.0.0.0/8, `::1`): every host has them, so
//!   a tuple with a loopback address is *scoped to its host*: it only ever
//!   pairs with a half from the same host (see `channels::Correlator`);
//! - the addresses an **administrator assigned** to it (`trustbind host
//!   addresses`, stored in `host_addresses`: an address belongs to one host
//!   at most); an address assigned to another host is never owned;
//! - the **address its agent connects from** (the peer address of its
//!   mutual-TLS connection, seen on each call: [`Observed`]), unless another
//!   host connected from the same address within [`OBSERVED_FOR`] (hosts
//!   behind one NAT): such a shared address is owned by nobody unless
//!   assigned.
//!
//! Unspecified, multicast and broadcast addresses are never owned. IPv4-mapped
//! IPv6 addresses (`::ffff:a.b.c.d`) are the IPv4 address they map.
//!
//! Everything here is pure state (the caller passes `now`) except the
//! [`Observed`] lock; the assigned addresses come from the store.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::request::FiveTuple;

/// How long an observed peer address counts for its host (and makes the
/// address shared when another host connects from it too).
pub const OBSERVED_FOR: Duration = Duration::from_secs(15 * 60);
/// Most peer addresses remembered per host (the oldest is forgotten).
pub const MAX_OBSERVED_PER_HOST: usize = 8;
/// Most addresses an administrator may assign to one host.
pub const MAX_ASSIGNED: usize = 64;

/// `s` as an IP address, IPv4-mapped IPv6 as IPv4; `None` if it is none.
pub fn parse(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>().ok().map(|a| a.to_canonical())
}

/// An address an administrator may assign: a unicast address that is
/// neither unspecified nor loopback (every host owns loopback anyway).
pub fn assignable(a: IpAddr) -> Result<IpAddr, String> {
    let a = a.to_canonical();
    if a.is_loopback() {
        return Err(format!(
            "{a} is a loopback address: every host owns it, for its own channels only"
        ));
    }
    if never_owned(a) {
        return Err(format!("{a} is not a unicast address"));
    }
    Ok(a)
}

fn never_owned(a: IpAddr) -> bool {
    a.is_unspecified() || a.is_multicast() || matches!(a, IpAddr::V4(v4) if v4.is_broadcast())
}

/// Whether the tuple `t` has a loopback address at either end: its halves
/// pair only within one host.
pub fn is_loopback_tuple(t: &FiveTuple) -> bool {
    [&t.src_addr, &t.dst_addr]
        .into_iter()
        .any(|a| parse(a).is_some_and(|a| a.is_loopback()))
}

/// How the reporting host stands to one address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Standing {
    /// Assigned to this host by an administrator.
    pub assigned_here: bool,
    /// Assigned to another host.
    pub assigned_elsewhere: bool,
    /// This host's agent connected from it within [`OBSERVED_FOR`].
    pub observed_here: bool,
    /// Another host's agent connected from it within [`OBSERVED_FOR`].
    pub observed_elsewhere: bool,
}

/// Why a host does not own an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotOwned {
    /// Not an IP address at all.
    NotAnAddress(String),
    /// Unspecified, multicast or broadcast.
    NotUnicast(IpAddr),
    /// Assigned by an administrator to another host.
    AssignedElsewhere(IpAddr),
    /// Several hosts connect from it (a NAT): nobody owns it unassigned.
    Shared(IpAddr),
    /// Neither assigned to the host nor an address it connects from.
    Unknown(IpAddr),
}

impl fmt::Display for NotOwned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAnAddress(s) => write!(f, "`{s}` is not an IP address"),
            Self::NotUnicast(a) => write!(f, "{a} is not a unicast address"),
            Self::AssignedElsewhere(a) => write!(f, "{a} is assigned to another host"),
            Self::Shared(a) => write!(
                f,
                "{a} is shared: several hosts connect from it and it is assigned to none"
            ),
            Self::Unknown(a) => write!(
                f,
                "{a} is neither assigned to this host nor the address its agent connects from"
            ),
        }
    }
}

/// How an owned address is owned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owned {
    /// A loopback address (the tuple is scoped to the host).
    Loopback,
    /// Assigned by an administrator.
    Assigned,
    /// The address the host's agent connects from, used by no other host.
    Observed,
}

/// Whether a host owns `addr` given its [`Standing`] (the rule of the
/// module documentation). `addr` is textual, as in a 5-tuple.
pub fn owns(addr: &str, standing: impl FnOnce(IpAddr) -> Standing) -> Result<Owned, NotOwned> {
    let Some(a) = parse(addr) else {
        return Err(NotOwned::NotAnAddress(addr.to_owned()));
    };
    if a.is_loopback() {
        return Ok(Owned::Loopback);
    }
    if never_owned(a) {
        return Err(NotOwned::NotUnicast(a));
    }
    let s = standing(a);
    if s.assigned_here {
        Ok(Owned::Assigned)
    } else if s.assigned_elsewhere {
        Err(NotOwned::AssignedElsewhere(a))
    } else if s.observed_here && !s.observed_elsewhere {
        Ok(Owned::Observed)
    } else if s.observed_here {
        Err(NotOwned::Shared(a))
    } else {
        Err(NotOwned::Unknown(a))
    }
}

/// How `host` stands to `a` at `now`: assigned addresses from `store`,
/// observed ones from `observed`.
pub fn standing(
    store: &crate::store::Store,
    observed: &Observed,
    host: &str,
    a: IpAddr,
    now: Instant,
) -> Result<Standing, crate::store::StoreError> {
    let owner = store.address_owner(a)?;
    let (observed_here, observed_elsewhere) = observed.seen(host, a, now);
    Ok(Standing {
        assigned_here: owner.as_deref() == Some(host),
        assigned_elsewhere: owner.is_some_and(|o| o != host),
        observed_here,
        observed_elsewhere,
    })
}

#[derive(Debug, Default)]
struct Seen {
    /// Per host: its addresses, most recent last.
    by_host: HashMap<String, VecDeque<(IpAddr, Instant)>>,
    /// Per address: the hosts seen from it, when last.
    by_addr: HashMap<IpAddr, HashMap<String, Instant>>,
}

impl Seen {
    fn unindex(&mut self, host: &str, addr: IpAddr) {
        if let Some(m) = self.by_addr.get_mut(&addr) {
            m.remove(host);
            if m.is_empty() {
                self.by_addr.remove(&addr);
            }
        }
    }
}

/// The addresses hosts' agents connect from, as seen by the agent port
/// (authenticated: the peer address of a mutual-TLS connection whose
/// certificate names the host). Bounded: [`MAX_OBSERVED_PER_HOST`] per
/// host, so one host connecting from many addresses only forgets its own.
#[derive(Debug, Default)]
pub struct Observed {
    seen: Mutex<Seen>,
}

impl Observed {
    /// Nothing observed yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// `host`'s agent called from `addr` at `now`. Loopback and unspecified
    /// peers are not recorded (they say nothing about the host's address).
    pub fn observe(&self, host: &str, addr: IpAddr, now: Instant) {
        let addr = addr.to_canonical();
        if addr.is_loopback() || never_owned(addr) {
            return;
        }
        let Ok(mut s) = self.seen.lock() else { return };
        let list = s.by_host.entry(host.to_owned()).or_default();
        list.retain(|(a, _)| *a != addr);
        list.push_back((addr, now));
        let dropped = if list.len() > MAX_OBSERVED_PER_HOST {
            list.pop_front().map(|(a, _)| a)
        } else {
            None
        };
        if let Some(old) = dropped {
            s.unindex(host, old);
        }
        s.by_addr
            .entry(addr)
            .or_default()
            .insert(host.to_owned(), now);
    }

    /// Forgets `host` (revoked).
    pub fn forget(&self, host: &str) {
        let Ok(mut s) = self.seen.lock() else { return };
        if let Some(list) = s.by_host.remove(host) {
            for (a, _) in list {
                s.unindex(host, a);
            }
        }
    }

    /// Whether `host`, and whether another host, connected from `addr`
    /// within [`OBSERVED_FOR`] before `now`.
    pub fn seen(&self, host: &str, addr: IpAddr, now: Instant) -> (bool, bool) {
        let addr = addr.to_canonical();
        let Ok(s) = self.seen.lock() else {
            return (false, false);
        };
        let Some(m) = s.by_addr.get(&addr) else {
            return (false, false);
        };
        let fresh = |t: &Instant| now.saturating_duration_since(*t) < OBSERVED_FOR;
        let here = m.get(host).is_some_and(fresh);
        let elsewhere = m.iter().any(|(h, t)| h != host && fresh(t));
        (here, elsewhere)
    }

    /// The hosts that connected from `addr` within [`OBSERVED_FOR`]
    /// before `now`.
    pub fn hosts_at(&self, addr: IpAddr, now: Instant) -> Vec<String> {
        let addr = addr.to_canonical();
        let Ok(s) = self.seen.lock() else {
            return Vec::new();
        };
        s.by_addr
            .get(&addr)
            .map(|m| {
                m.iter()
                    .filter(|(_, t)| now.saturating_duration_since(**t) < OBSERVED_FOR)
                    .map(|(h, _)| h.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The addresses `host` connected from within [`OBSERVED_FOR`] before
    /// `now`, most recent first (for the admin API and refusal messages).
    pub fn of(&self, host: &str, now: Instant) -> Vec<IpAddr> {
        let Ok(s) = self.seen.lock() else {
            return Vec::new();
        };
        s.by_host
            .get(host)
            .map(|l| {
                l.iter()
                    .rev()
                    .filter(|(_, t)| now.saturating_duration_since(*t) < OBSERVED_FOR)
                    .map(|(a, _)| *a)
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn st(assigned_here: bool, assigned_elsewhere: bool, here: bool, elsewhere: bool) -> Standing {
        Standing {
            assigned_here,
            assigned_elsewhere,
            observed_here: here,
            observed_elsewhere: elsewhere,
        }
    }

    #[test]
    fn the_rule() {
        let none = |_| Standing::default();
        assert_eq!(owns("127.0.0.1", none), Ok(Owned::Loopback));
        assert_eq!(owns("127.4.5.6", none), Ok(Owned::Loopback));
        assert_eq!(owns("::1", none), Ok(Owned::Loopback));
        assert_eq!(owns("::ffff:127.0.0.1", none), Ok(Owned::Loopback));
        assert_eq!(
            owns("10.0.0.1", none),
            Err(NotOwned::Unknown("10.0.0.1".parse().unwrap()))
        );
        // Never owned, whatever the standing says.
        let all = |_| st(true, false, true, false);
        for a in ["0.0.0.0", "::", "224.0.0.1", "ff02::1", "255.255.255.255"] {
            assert!(matches!(owns(a, all), Err(NotOwned::NotUnicast(_))), "{a}");
        }
        assert!(matches!(owns("nope", all), Err(NotOwned::NotAnAddress(_))));
        let a = "10.0.0.1";
        assert_eq!(
            owns(a, |_| st(true, false, false, true)),
            Ok(Owned::Assigned)
        );
        assert_eq!(
            owns(a, |_| st(false, false, true, false)),
            Ok(Owned::Observed)
        );
        assert!(matches!(
            owns(a, |_| st(false, false, true, true)),
            Err(NotOwned::Shared(_))
        ));
        assert!(matches!(
            owns(a, |_| st(false, true, true, false)),
            Err(NotOwned::AssignedElsewhere(_))
        ));
        // IPv4-mapped IPv6 is looked up as IPv4.
        let mut asked = None;
        let _ = owns("::ffff:10.0.0.1", |x| {
            asked = Some(x);
            Standing::default()
        });
        assert_eq!(asked, Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))));
    }

    #[test]
    fn observed_addresses_are_per_host_shared_ones_are_marked_and_age_out() {
        let o = Observed::new();
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        o.observe("web1", mapped, t0);
        assert_eq!(o.seen("web1", a, t0), (true, false));
        assert_eq!(o.seen("db1", a, t0), (false, true));
        o.observe("db1", a, t0);
        assert_eq!(o.seen("web1", a, t0), (true, true));
        // Loopback peers are not recorded.
        o.observe("web1", IpAddr::V6(Ipv6Addr::LOCALHOST), t0);
        assert_eq!(o.of("web1", t0), vec![a]);
        // Past the window neither counts.
        let later = t0 + OBSERVED_FOR;
        assert_eq!(o.seen("web1", a, later), (false, false));
        o.forget("db1");
        assert_eq!(o.seen("web1", a, t0), (true, false));
    }

    #[test]
    fn a_host_spraying_addresses_only_forgets_its_own() {
        let o = Observed::new();
        let t0 = Instant::now();
        let shared: IpAddr = "192.0.2.1".parse().unwrap();
        o.observe("box", shared, t0);
        o.observe("rogue", shared, t0);
        for i in 0..1000u32 {
            let a = IpAddr::V6(Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(i)));
            o.observe("rogue", a, t0);
        }
        assert_eq!(o.of("rogue", t0).len(), MAX_OBSERVED_PER_HOST);
        // The box still sees its own address; the rogue forgot it.
        assert_eq!(o.seen("box", shared, t0), (true, false));
        // The rogue calling from it again makes it shared again.
        o.observe("rogue", shared, t0);
        assert_eq!(o.seen("box", shared, t0), (true, true));
        assert_eq!(o.seen("rogue", shared, t0), (true, true));
    }

    fn any_addr() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(|b| IpAddr::V4(Ipv4Addr::from(b))),
            any::<[u16; 8]>().prop_map(|s| IpAddr::V6(Ipv6Addr::from(s))),
            // IPv4-mapped forms of IPv4 addresses.
            any::<[u8; 4]>().prop_map(|b| IpAddr::V6(Ipv4Addr::from(b).to_ipv6_mapped())),
            Just(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            Just(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        ]
    }

    proptest! {
        /// Whatever a host's standing, it owns a non-loopback address only
        /// if an administrator assigned it to that host, or that host (and
        /// no other) connects from it and it is assigned to no other host;
        /// the mapped and plain forms of an address are owned alike.
        #[test]
        fn ownership_needs_an_authenticated_source(
            addr in any_addr(),
            ah in any::<bool>(), ae in any::<bool>(), oh in any::<bool>(), oe in any::<bool>(),
        ) {
            let s = st(ah, ae && !ah, oh, oe);
            let text = addr.to_string();
            let got = owns(&text, |_| s);
            let canon = addr.to_canonical();
            if canon.is_loopback() {
                prop_assert_eq!(got, Ok(Owned::Loopback));
            } else if let Ok(how) = got {
                prop_assert!(!canon.is_unspecified() && !canon.is_multicast());
                match how {
                    Owned::Assigned => prop_assert!(s.assigned_here),
                    Owned::Observed => prop_assert!(
                        s.observed_here && !s.observed_elsewhere && !s.assigned_elsewhere
                    ),
                    Owned::Loopback => prop_assert!(false, "not loopback"),
                }
            } else {
                prop_assert!(!s.assigned_here || never_owned(canon));
            }
            // The IPv4-mapped form of an IPv4 address stands as it does.
            if let IpAddr::V4(v4) = canon {
                let mapped = v4.to_ipv6_mapped().to_string();
                prop_assert_eq!(owns(&mapped, |_| s), owns(&text, |_| s));
            }
        }

        /// Observations never give one host another's address: whatever
        /// sequence of calls, `seen(h, a)` says `here` only if `h` called
        /// from `a`.
        #[test]
        fn observations_are_per_host(
            calls in proptest::collection::vec((0u8..3, 0u8..12), 0..64),
        ) {
            let o = Observed::new();
            let t0 = Instant::now();
            let addr = |i: u8| IpAddr::V4(Ipv4Addr::new(10, 0, 0, i + 1));
            let mut called: std::collections::HashSet<(u8, u8)> = Default::default();
            for (h, a) in &calls {
                o.observe(&format!("h{h}"), addr(*a), t0);
                called.insert((*h, *a));
            }
            for h in 0..3u8 {
                for a in 0..12u8 {
                    let (here, elsewhere) = o.seen(&format!("h{h}"), addr(a), t0);
                    if here {
                        prop_assert!(called.contains(&(h, a)));
                    }
                    if elsewhere {
                        prop_assert!((0..3u8).any(|g| g != h && called.contains(&(g, a))));
                    }
                }
                let name = format!("h{h}");
                prop_assert!(o.of(&name, t0).len() <= MAX_OBSERVED_PER_HOST);
            }
            // Who connects from an address is what `seen` says of each host.
            for a in 0..12u8 {
                let mut at = o.hosts_at(addr(a), t0);
                at.sort();
                let here: Vec<String> = (0..3u8)
                    .map(|h| format!("h{h}"))
                    .filter(|h| o.seen(h, addr(a), t0).0)
                    .collect();
                prop_assert_eq!(at, here);
                prop_assert!(o.hosts_at(addr(a), t0 + OBSERVED_FOR).is_empty());
            }
        }
    }
}
