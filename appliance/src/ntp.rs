//! A small SNTP client (RFC 4330) that keeps the appliance image's clock:
//! `trustbind-appliance ntp --server HOST...`, started at boot by the
//! image's `rcS` when servers are configured (`trustbind.ntp=` on the
//! kernel command line or in `/data/trustbind/network.conf`; none by
//! default, so nothing is sent anywhere unless asked). Debian's
//! `busybox-static`, the image's userland, is built without `ntpd`.
//!
//! Each round asks the servers in turn and takes the first good answer: a
//! server reply (mode 4) with a stratum of 1 to 15, no alarm leap
//! indicator, our transmit time echoed as its originate time, and sane
//! timestamps. The low 32 bits of that transmit time are random (as the
//! IETF's NTP data-minimisation draft recommends), so an off-path forger
//! must guess them and the source port; this is why the client is not
//! `rsntp` (4.1 sends the real time, which an attacker who knows the
//! clock roughly can guess to a few million values). The clock is stepped
//! (`clock_settime`) when it is off by more than [`STEP_THRESHOLD_MS`];
//! smaller errors are left alone (licences, certificates and audit times
//! need no better). License checks tolerate the steps
//! (`limits::LicenseTime`).

use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Offsets larger than this (ms) are corrected by stepping the clock.
pub const STEP_THRESHOLD_MS: i64 = 500;
/// Seconds between the NTP era (1900) and the Unix epoch.
const NTP_UNIX_OFFSET_S: u64 = 2_208_988_800;
/// Wait for a reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a server's answer was not used.
#[derive(Debug, thiserror::Error)]
pub enum NtpError {
    /// Resolving, sending or receiving failed.
    #[error("{server}: {source}")]
    Io {
        /// The server as configured.
        server: String,
        /// The error.
        source: std::io::Error,
    },
    /// The reply is unusable.
    #[error("{server}: {why}")]
    BadReply {
        /// The server as configured.
        server: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// Unix milliseconds → 64-bit NTP timestamp.
fn to_ntp(unix_ms: i64) -> u64 {
    let ms = u64::try_from(unix_ms).unwrap_or(0);
    let secs = ms / 1000 + NTP_UNIX_OFFSET_S;
    let frac = ((ms % 1000) << 32) / 1000;
    (secs << 32) | frac
}

/// 64-bit NTP timestamp → Unix milliseconds.
fn from_ntp(ts: u64) -> i64 {
    let secs = i64::try_from(ts >> 32).unwrap_or(0) - NTP_UNIX_OFFSET_S as i64;
    let ms = i64::try_from(((ts & 0xffff_ffff) * 1000 + (1 << 31)) >> 32).unwrap_or(0);
    secs * 1000 + ms
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A client request whose transmit timestamp is `tx` (random low bits make
/// it unguessable).
pub fn request(tx: u64) -> [u8; 48] {
    let mut p = [0_u8; 48];
    p[0] = 0x23; // LI 0, version 4, mode 3 (client)
    p[40..48].copy_from_slice(&tx.to_be_bytes());
    p
}

fn ts(buf: &[u8], at: usize) -> u64 {
    buf.get(at..at + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_be_bytes)
}

/// The clock offset (ms, server minus local) from `reply` to a request
/// sent with transmit timestamp `tx` at local time `t1` and received at
/// `t4` (Unix ms), or why the reply is unusable.
pub fn offset_ms(reply: &[u8], tx: u64, t1: i64, t4: i64) -> Result<i64, &'static str> {
    let (Some(&b0), Some(&stratum), true) = (reply.first(), reply.get(1), reply.len() >= 48) else {
        return Err("reply shorter than 48 bytes");
    };
    let (li, mode) = (b0 >> 6, b0 & 7);
    if mode != 4 {
        return Err("not a server reply (mode 4)");
    }
    if li == 3 || stratum == 0 || stratum > 15 {
        return Err("server unsynchronised (alarm or stratum 0/16, maybe a kiss-o'-death)");
    }
    if ts(reply, 24) != tx {
        return Err("originate timestamp is not our request's (forged or stale)");
    }
    let (t2, t3) = (ts(reply, 32), ts(reply, 40));
    if t2 == 0 || t3 == 0 || t3 < t2 {
        return Err("bad receive or transmit timestamps");
    }
    let (t2, t3) = (from_ntp(t2), from_ntp(t3));
    Ok(((t2 - t1) + (t3 - t4)) / 2)
}

/// Asks `server` (`host` or `host:port`, default port 123) once; the
/// offset in ms.
pub fn query(server: &str) -> Result<i64, NtpError> {
    let io = |source| NtpError::Io {
        server: server.to_owned(),
        source,
    };
    let addr = resolve(server).map_err(io)?;
    let bind: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0_u16; 8], 0).into()
    };
    let sock = UdpSocket::bind(bind).map_err(io)?;
    sock.connect(addr).map_err(io)?;
    sock.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
    let mut rnd = [0_u8; 4];
    getrandom::getrandom(&mut rnd).map_err(|e| io(std::io::Error::other(e.to_string())))?;
    let t1 = now_unix_ms();
    let tx = (to_ntp(t1) & !0xffff_ffff) | u64::from(u32::from_be_bytes(rnd));
    sock.send(&request(tx)).map_err(io)?;
    let mut buf = [0_u8; 128];
    let n = sock.recv(&mut buf).map_err(io)?;
    let t4 = now_unix_ms();
    offset_ms(buf.get(..n).unwrap_or_default(), tx, t1, t4).map_err(|why| NtpError::BadReply {
        server: server.to_owned(),
        why,
    })
}

/// `server` as an address: `IP`, `IP:port`, `[IPv6]:port`, `host` or
/// `host:port`; port 123 unless given.
fn resolve(server: &str) -> std::io::Result<SocketAddr> {
    if let Ok(a) = server.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = server.parse::<std::net::IpAddr>() {
        return Ok((ip, 123).into());
    }
    let mut it = if server.contains(':') {
        server.to_socket_addrs()?
    } else {
        (server, 123).to_socket_addrs()?
    };
    it.next()
        .ok_or_else(|| std::io::Error::other("no address for this name"))
}

/// Steps the system clock by `offset_ms`.
fn step(offset_ms: i64) -> std::io::Result<()> {
    let target = now_unix_ms().saturating_add(offset_ms);
    let ts = rustix::time::Timespec {
        tv_sec: target.div_euclid(1000),
        tv_nsec: target.rem_euclid(1000) * 1_000_000,
    };
    rustix::time::clock_settime(rustix::time::ClockId::Realtime, ts).map_err(std::io::Error::from)
}

/// One round: the first good answer of `servers`, stepping the clock if it
/// is off by more than [`STEP_THRESHOLD_MS`]. The offset found, or every
/// server's failure.
pub fn sync_once(servers: &[String]) -> Result<i64, Vec<NtpError>> {
    let mut errors = Vec::new();
    for s in servers {
        match query(s) {
            Ok(off) => {
                if off.abs() > STEP_THRESHOLD_MS {
                    if let Err(e) = step(off) {
                        errors.push(NtpError::Io {
                            server: s.clone(),
                            source: e,
                        });
                        return Err(errors);
                    }
                    tracing::info!("ntp: clock stepped by {off} ms ({s})");
                } else {
                    tracing::debug!("ntp: offset {off} ms ({s})");
                }
                return Ok(off);
            }
            Err(e) => errors.push(e),
        }
    }
    Err(errors)
}

/// Keeps the clock: a round at once, then every `interval` (after a failed
/// round, every minute until one succeeds). Never returns.
pub fn run(servers: &[String], interval: Duration) -> ! {
    loop {
        let wait = match sync_once(servers) {
            Ok(_) => interval,
            Err(errors) => {
                for e in errors {
                    tracing::warn!("ntp: {e}");
                }
                Duration::from_secs(60).min(interval)
            }
        };
        std::thread::sleep(wait);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(tx: u64, t2: u64, t3: u64, li_mode: u8, stratum: u8) -> [u8; 48] {
        let mut p = [0_u8; 48];
        p[0] = li_mode;
        p[1] = stratum;
        p[24..32].copy_from_slice(&tx.to_be_bytes());
        p[32..40].copy_from_slice(&t2.to_be_bytes());
        p[40..48].copy_from_slice(&t3.to_be_bytes());
        p
    }

    #[test]
    fn timestamps_round_trip() {
        for ms in [0_i64, 1, 999, 1_800_000_000_123] {
            assert_eq!(from_ntp(to_ntp(ms)), ms);
        }
    }

    #[test]
    fn offset_of_a_server_an_hour_ahead() {
        let t1 = 1_800_000_000_000;
        let tx = to_ntp(t1) | 0x1234;
        let (t2, t3) = (to_ntp(t1 + 3_600_010), to_ntp(t1 + 3_600_011));
        let off = offset_ms(&reply(tx, t2, t3, 0x24, 2), tx, t1, t1 + 20).unwrap();
        assert_eq!(off, 3_600_000);
    }

    #[test]
    fn unusable_replies_are_refused() {
        let t1 = 1_800_000_000_000;
        let tx = to_ntp(t1) | 7;
        let (t2, t3) = (to_ntp(t1), to_ntp(t1));
        assert!(offset_ms(&reply(tx, t2, t3, 0x24, 2)[..40], tx, t1, t1).is_err());
        // Not our request (forged, or an old reply).
        assert!(offset_ms(&reply(tx + 1, t2, t3, 0x24, 2), tx, t1, t1).is_err());
        // A client packet, an unsynchronised server, a kiss-o'-death.
        assert!(offset_ms(&reply(tx, t2, t3, 0x23, 2), tx, t1, t1).is_err());
        assert!(offset_ms(&reply(tx, t2, t3, 0xe4, 2), tx, t1, t1).is_err());
        assert!(offset_ms(&reply(tx, t2, t3, 0x24, 0), tx, t1, t1).is_err());
        assert!(offset_ms(
            &reply(tx, t3, t2.wrapping_sub(1 << 32), 0x24, 2),
            tx,
            t1,
            t1
        )
        .is_err());
    }

    #[test]
    fn a_query_over_loopback_reads_the_server_offset() {
        // A fake server on 127.0.0.1 two minutes ahead (nothing leaves the host).
        let srv = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = srv.local_addr().unwrap();
        let h = std::thread::spawn(move || {
            let mut buf = [0_u8; 48];
            let (n, from) = srv.recv_from(&mut buf).unwrap();
            assert_eq!((n, buf[0] & 7), (48, 3));
            let tx = ts(&buf, 40);
            let now = to_ntp(now_unix_ms() + 120_000);
            srv.send_to(&reply(tx, now, now, 0x24, 1), from).unwrap();
        });
        let off = query(&addr.to_string()).unwrap();
        h.join().unwrap();
        assert!((119_000..=121_000).contains(&off), "{off}");
    }
}
