//! User names for uids, as the policy's principals are user names
//! (`Trustbind::User::"alice"`).
//!
//! Looked up through the C library's NSS (`getpwuid_r`, by the `uzers`
//! crate), so whatever `/etc/nsswitch.conf` names answers: local files,
//! LDAP, SSSD, systemd's dynamic users. Answers (a name or none) are kept
//! for [`TTL`], so the request path rarely waits for a directory service
//! and a renamed or new user shows within that time. A uid without a name
//! becomes `uid:<n>`, so a policy can still name it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long an answer is kept.
pub const TTL: Duration = Duration::from_secs(60);

/// uid → name, from NSS, cached.
#[derive(Debug)]
pub struct Users {
    ttl: Duration,
    names: HashMap<u32, (Option<String>, Instant)>,
}

impl Default for Users {
    fn default() -> Self {
        Self::new()
    }
}

impl Users {
    /// An empty cache keeping answers for [`TTL`].
    pub fn new() -> Self {
        Self::with_ttl(TTL)
    }

    /// An empty cache keeping answers for `ttl`.
    pub fn with_ttl(ttl: Duration) -> Self {
        Self {
            ttl,
            names: HashMap::new(),
        }
    }

    /// Forgets answers older than the TTL.
    pub fn refresh(&mut self) {
        let ttl = self.ttl;
        self.names.retain(|_, (_, at)| at.elapsed() < ttl);
    }

    /// The name of `uid`, or `uid:<n>`.
    pub fn name(&mut self, uid: u32) -> String {
        let fresh = self
            .names
            .get(&uid)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(n, _)| n.clone());
        let name = fresh.unwrap_or_else(|| {
            let n = uzers::get_user_by_uid(uid).map(|u| u.name().to_string_lossy().into_owned());
            self.names.insert(uid, (n.clone(), Instant::now()));
            n
        });
        name.unwrap_or_else(|| format!("uid:{uid}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The name `getent passwd` gives for `uid`: the same NSS answer.
    fn getent(uid: u32) -> Option<String> {
        let out = std::process::Command::new("getent")
            .args(["passwd", &uid.to_string()])
            .output()
            .ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        text.split(':')
            .next()
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
    }

    #[test]
    fn names_come_from_nss_with_a_fallback() {
        let mut u = Users::new();
        assert_eq!(u.name(0), "root");
        let me = rustix::process::getuid().as_raw();
        if let Some(name) = getent(me) {
            assert_eq!(u.name(me), name);
        }
        // No such user (uids near 2^32 are never allocated).
        assert_eq!(u.name(4_000_000_123), "uid:4000000123");
    }

    #[test]
    fn answers_are_kept_for_the_ttl_then_asked_again() {
        let mut u = Users::with_ttl(Duration::from_millis(50));
        assert_eq!(u.name(0), "root");
        assert_eq!(u.name(4_000_000_123), "uid:4000000123");
        assert_eq!(u.names.len(), 2);
        // A cached answer is used as it is (here: a planted one).
        u.names.insert(0, (Some("planted".into()), Instant::now()));
        assert_eq!(u.name(0), "planted");
        std::thread::sleep(Duration::from_millis(60));
        u.refresh();
        assert!(u.names.is_empty());
        assert_eq!(u.name(0), "root");
    }
}
