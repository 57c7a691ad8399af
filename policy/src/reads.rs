//! Which context attributes a policy reads.
//!
//! Used to tell whether a decision depends on the clock (then the kernel
//! must not cache it) and, for the decision cache, which request fields
//! belong in the cache key. Found by walking the policy's JSON form (EST):
//! every `context.<attr>` and `context has <attr>` is recorded; any other use
//! of `context` (as a whole) counts as reading everything.

use cedar_policy::Policy;
use serde_json::Value;

/// A set of context attributes, as a bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Reads(u16);

impl Reads {
    /// Nothing read.
    pub const NONE: Reads = Reads(0);
    /// `context.time` (seconds; changes every second).
    pub const TIME: Reads = Reads(1);
    /// `context.hour`.
    pub const HOUR: Reads = Reads(1 << 1);
    /// `context.weekday`.
    pub const WEEKDAY: Reads = Reads(1 << 2);
    /// `context.session`.
    pub const SESSION: Reads = Reads(1 << 3);
    /// `context.ancestry`.
    pub const ANCESTRY: Reads = Reads(1 << 4);
    /// `context.src_addr`.
    pub const SRC_ADDR: Reads = Reads(1 << 5);
    /// `context.src_port`.
    pub const SRC_PORT: Reads = Reads(1 << 6);
    /// `context.dst_addr`.
    pub const DST_ADDR: Reads = Reads(1 << 7);
    /// `context.dst_port`.
    pub const DST_PORT: Reads = Reads(1 << 8);
    /// `context.to`, `context.create`, `context.truncate`,
    /// `context.link`: part of the decision cache key (the target), but
    /// not of the kernel's (program, file, user, access), so a verdict
    /// that reads them is asked every time.
    pub const FILE_OP: Reads = Reads(1 << 9);
    /// Everything (context used as a whole, or an attribute not listed
    /// above that is not part of every cache key).
    pub const ALL: Reads = Reads(u16::MAX);

    /// Union.
    #[must_use]
    pub fn with(self, other: Reads) -> Reads {
        Reads(self.0 | other.0)
    }

    /// Whether any attribute of `other` is in `self`.
    pub fn any(self, other: Reads) -> bool {
        self.0 & other.0 != 0
    }

    /// Whether the decision depends on the clock (time, hour or weekday).
    pub fn clock(self) -> bool {
        self.any(Reads::TIME.with(Reads::HOUR).with(Reads::WEEKDAY))
    }

    /// Whether the PEM may cache the verdict: its cache key is the file,
    /// the uids and the policy generation, so a decision that reads the
    /// clock, the login session, the ancestry or a file operation's
    /// details must be asked every time.
    pub fn kernel_cacheable(self) -> bool {
        !self.clock() && !self.any(Reads::SESSION.with(Reads::ANCESTRY).with(Reads::FILE_OP))
    }

    pub(crate) fn attr(name: &str) -> Reads {
        match name {
            "time" => Reads::TIME,
            "hour" => Reads::HOUR,
            "weekday" => Reads::WEEKDAY,
            "session" => Reads::SESSION,
            "ancestry" => Reads::ANCESTRY,
            "src_addr" => Reads::SRC_ADDR,
            "src_port" => Reads::SRC_PORT,
            "dst_addr" => Reads::DST_ADDR,
            "dst_port" => Reads::DST_PORT,
            // Always part of the cache key (host, program, peers) or
            // derived from it (mode).
            "host" | "program" | "peer_host" | "peer_program" | "mode" => Reads::NONE,
            // Part of the request's target (and of the decision cache key):
            // the kernel never caches a direct loader exec and the agent
            // never bundles one, so reading it costs no cacheability.
            "loader_direct" => Reads::NONE,
            "to" | "create" | "truncate" | "link" => Reads::FILE_OP,
            _ => Reads::ALL,
        }
    }
}

/// The context attributes `policy` reads (conservative: when in doubt, all).
pub fn of_policy(policy: &Policy) -> Reads {
    match policy.to_json() {
        Ok(v) => of_json(&v),
        Err(_) => Reads::ALL,
    }
}

/// The context attributes a policy in JSON (EST) form reads.
pub fn of_json(est: &Value) -> Reads {
    walk(est)
}

fn is_context(v: &Value) -> bool {
    v.get("Var").and_then(Value::as_str) == Some("context")
}

fn walk(v: &Value) -> Reads {
    match v {
        Value::Object(map) => {
            if is_context(v) {
                return Reads::ALL;
            }
            let mut r = Reads::NONE;
            for (k, inner) in map {
                if k == "." || k == "has" {
                    if let (Some(left), Some(attr)) =
                        (inner.get("left"), inner.get("attr").and_then(Value::as_str))
                    {
                        if is_context(left) {
                            r = r.with(Reads::attr(attr));
                            continue;
                        }
                    }
                }
                r = r.with(walk(inner));
            }
            r
        }
        Value::Array(items) => items.iter().fold(Reads::NONE, |r, i| r.with(walk(i))),
        _ => Reads::NONE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_cacheable_excludes_clock_session_and_ancestry() {
        assert!(Reads::NONE.kernel_cacheable());
        assert!(Reads::SRC_ADDR.with(Reads::DST_PORT).kernel_cacheable());
        for r in [
            Reads::TIME,
            Reads::HOUR,
            Reads::WEEKDAY,
            Reads::SESSION,
            Reads::ANCESTRY,
            Reads::FILE_OP,
            Reads::ALL,
        ] {
            assert!(!r.kernel_cacheable(), "{r:?}");
        }
    }

    #[test]
    fn a_policy_reading_the_session_is_seen() {
        let p: Policy = r#"permit (principal, action, resource) when { context.session == 3 };"#
            .parse()
            .unwrap();
        assert!(of_policy(&p).any(Reads::SESSION));
        assert!(!of_policy(&p).kernel_cacheable());
    }

    #[test]
    fn a_policy_reading_a_file_operation_is_not_kernel_cacheable() {
        let p: Policy = r#"forbid (principal, action, resource)
            when { context has to && context.to in Trustbind::FileSet::"logs" };"#
            .parse()
            .unwrap();
        assert_eq!(of_policy(&p), Reads::FILE_OP);
        assert!(!of_policy(&p).kernel_cacheable());
        let p: Policy = r#"forbid (principal, action, resource) when { context.truncate };"#
            .parse()
            .unwrap();
        assert_eq!(of_policy(&p), Reads::FILE_OP);
    }
}
