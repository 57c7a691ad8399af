// SPDX-License-Identifier: GPL-2.0
//! Sealed records: what the agent carries between the appliance and the
//! module, and can neither forge nor change (THREAT-MODEL.md, A2).
//!
//! Root on a protected host controls the agent. If the module believed
//! whatever arrives on `/dev/trustbind`, root would stop the agent and
//! write `Config{Disabled}`, or answer "allow" to every question. So a
//! module loaded with the appliance's **authority key** (module parameter
//! `authority=`, the appliance's P-256 public key) believes only what the
//! appliance sealed for it:
//!
//! 1. **Session.** At load the module makes an ephemeral P-256 key pair
//!    and computes the ECDH shared secret `z` (the x coordinate, 32 bytes
//!    big-endian) with the authority key, then drops its private key. Its
//!    public key travels to the agent in [`crate::HelloAck::session`]
//!    (`x || y`), and from there to the appliance, which computes the same
//!    `z` with its private key. Both derive the session key
//!    `K = HMAC-SHA256(key = z, message = `[`session_info`]`(public))`.
//!    `K` lives in kernel memory and in the appliance; the agent (and root,
//!    short of reading kernel memory) never sees it.
//! 2. **Seal.** The appliance sends a record `R` for the module as
//!    [`crate::Sealed`]`{seq, mac, R}` with
//!    `mac = HMAC-SHA256(K, `[`prefix`]`(digest, seq) || R)`.
//!    For an **answer** (a verdict or a channel key), `digest` is the
//!    SHA-256 of the request record exactly as the module wrote it (the
//!    agent forwards those bytes; the appliance decides on them) and `seq`
//!    is 0: a verdict is good for that one request and no other. For an
//!    **order** (a mode change, the protected peers) `digest` is zero and
//!    `seq` must be larger than the last order of that kind the module
//!    took in this session, so an old order cannot be replayed.
//! 3. **Unsealed records** ([`bare_rule`]): an unsealed allow counts as a
//!    deny (the mode decides what that means: refused in enforce, run and
//!    reported in permissive), an unsealed channel key as a refusal, an
//!    unsealed `Config` is taken only if it weakens nothing
//!    ([`config_weakens`]), unsealed peers are refused. What needs no seal:
//!    `Hello`, a deny, a policy generation (it only empties the cache).
//!
//! Without an authority key the module believes its agent, as before.

use super::{Kind, Mode};

/// Length of the module's session public key (P-256 `x || y`).
pub const SESSION_PUB_LEN: usize = 64;
/// Length of a seal (HMAC-SHA256).
pub const MAC_LEN: usize = 32;
/// Length of a request digest (SHA-256).
pub const DIGEST_LEN: usize = 32;
/// Length of the ECDH shared secret and of the session key.
pub const KEY_LEN: usize = 32;

/// Domain label of the session key derivation.
pub const SESSION_LABEL: &[u8; 21] = b"trustbind session v1\0";
/// Domain label of a seal.
pub const SEAL_LABEL: &[u8; 18] = b"trustbind seal v1\0";

/// Length of [`session_info`].
pub const SESSION_INFO_LEN: usize = SESSION_LABEL.len() + SESSION_PUB_LEN;
/// Length of [`prefix`].
pub const PREFIX_LEN: usize = SEAL_LABEL.len() + DIGEST_LEN + 8;

/// The message the session key is the HMAC of (keyed with the ECDH
/// shared secret): the label, then the module's public key.
pub fn session_info(session_pub: &[u8; SESSION_PUB_LEN]) -> [u8; SESSION_INFO_LEN] {
    let mut out = [0u8; SESSION_INFO_LEN];
    let (label, public) = out.split_at_mut(SESSION_LABEL.len());
    label.copy_from_slice(SESSION_LABEL);
    public.copy_from_slice(session_pub);
    out
}

/// What a seal's MAC covers before the sealed record: the label, the
/// request digest (zero for orders), the sequence (little-endian).
pub fn prefix(digest: &[u8; DIGEST_LEN], seq: u64) -> [u8; PREFIX_LEN] {
    let mut out = [0u8; PREFIX_LEN];
    let (label, rest) = out.split_at_mut(SEAL_LABEL.len());
    label.copy_from_slice(SEAL_LABEL);
    let (d, s) = rest.split_at_mut(DIGEST_LEN);
    d.copy_from_slice(digest);
    s.copy_from_slice(&seq.to_le_bytes());
    out
}

/// Which kinds the appliance seals.
pub const fn sealable(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Verdict
            | Kind::ChannelKey
            | Kind::Config
            | Kind::Peers
            | Kind::FileSetPaths
            | Kind::HostKeys
            | Kind::Revocations
            | Kind::Grant
    )
}

/// Which kinds are orders (sequence-checked), and their slot in the
/// module's last-sequence table.
pub const fn order_slot(kind: Kind) -> Option<usize> {
    match kind {
        Kind::Config => Some(0),
        Kind::Peers => Some(1),
        Kind::FileSetPaths => Some(2),
        Kind::HostKeys => Some(3),
        Kind::Revocations => Some(4),
        _ => None,
    }
}

/// Number of order slots.
pub const ORDER_SLOTS: usize = 5;

/// What a module with an authority key does with a record that arrived
/// without a seal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BareRule {
    /// Take it as it is.
    Accept,
    /// A verdict: an allow counts as a deny (never cached); a deny stays.
    AllowIsDeny,
    /// A channel key: the request it answers is refused.
    RefuseAnswer,
    /// A `Config`: taken only when [`config_weakens`] says it does not.
    UnlessWeakening,
    /// Refused (the write fails with `EPERM`).
    Refuse,
}

/// The rule for an unsealed record of `kind` on a module that has an
/// authority key.
pub const fn bare_rule(kind: Kind) -> BareRule {
    match kind {
        Kind::Verdict => BareRule::AllowIsDeny,
        Kind::ChannelKey => BareRule::RefuseAnswer,
        Kind::Config => BareRule::UnlessWeakening,
        Kind::Peers => BareRule::Refuse,
        // The sealed paths the module resolves itself, with the mounts
        // below them ([`crate::FileSetPaths`]), are the appliance's word;
        // the agent's identities only add to them: see THREAT-MODEL.md
        // T-102.
        Kind::FileSets => BareRule::Accept,
        Kind::FileSetPaths => BareRule::Refuse,
        // Channel keys v2: host keys open tickets and revocations only
        // narrow, but an unsealed one could replace the appliance's list
        // with an empty one; a grant is a channel key's equivalent.
        Kind::HostKeys | Kind::Revocations => BareRule::Refuse,
        Kind::Grant => BareRule::RefuseAnswer,
        _ => BareRule::Accept,
    }
}

/// How strict a mode is: disabled < permissive < enforce.
const fn strictness(m: Mode) -> u8 {
    match m {
        Mode::Disabled => 0,
        Mode::Permissive => 1,
        Mode::Enforce => 2,
    }
}

/// Whether moving from mode `current` (net qualification `current_net`)
/// to `new_mode` / `new_net` weakens enforcement: a less strict mode, or
/// connects and accepts no longer qualified. The verdict wait is not
/// enforcement (a shorter one refuses more in enforce mode, a longer one
/// only makes this host's own tasks wait).
pub const fn config_weakens(
    current: Mode,
    current_net: bool,
    new_mode: Mode,
    new_net: bool,
) -> bool {
    strictness(new_mode) < strictness(current) || (current_net && !new_net)
}

/// Whether an order of `kind` with sequence `seq` may follow the last one
/// of its kind taken (`last`, 0 before any). Orders are strictly
/// increasing, except that the latest [`Kind::FileSetPaths`] may come
/// again: the agent re-sends it so that the module resolves the paths
/// again (created since, mounts changed). The appliance never seals two
/// orders with one sequence, so an equal sequence is the same order.
pub const fn order_fresh(kind: Kind, last: u64, seq: u64) -> bool {
    match kind {
        Kind::FileSetPaths => seq >= last && seq > 0,
        _ => seq > last,
    }
}

/// Parses the module parameter `authority=`: 128 hex digits (the P-256
/// public key `x || y`, big-endian, as `trustbind-agent enrol` writes it),
/// upper or lower case, nothing else.
pub fn parse_authority(hex: &[u8]) -> Option<[u8; SESSION_PUB_LEN]> {
    if hex.len() != 2 * SESSION_PUB_LEN {
        return None;
    }
    let mut out = [0u8; SESSION_PUB_LEN];
    let mut i = 0;
    while i < SESSION_PUB_LEN {
        let hi = nibble(*hex.get(2 * i)?)?;
        let lo = nibble(*hex.get(2 * i + 1)?)?;
        *out.get_mut(i)? = (hi << 4) | lo;
        i += 1;
    }
    Some(out)
}

const fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prefix_layout() {
        let p = prefix(&[7; DIGEST_LEN], 0x0102_0304_0506_0708);
        assert_eq!(&p[..SEAL_LABEL.len()], SEAL_LABEL);
        assert_eq!(&p[SEAL_LABEL.len()..SEAL_LABEL.len() + 32], &[7; 32]);
        assert_eq!(&p[PREFIX_LEN - 8..], &[8, 7, 6, 5, 4, 3, 2, 1]);
        let i = session_info(&[9; SESSION_PUB_LEN]);
        assert_eq!(&i[..SESSION_LABEL.len()], SESSION_LABEL);
        assert!(i[SESSION_LABEL.len()..].iter().all(|&b| b == 9));
    }

    #[test]
    fn weakening() {
        use Mode::*;
        assert!(config_weakens(Enforce, true, Permissive, true));
        assert!(config_weakens(Enforce, true, Disabled, true));
        assert!(config_weakens(Permissive, false, Disabled, false));
        assert!(config_weakens(Enforce, true, Enforce, false));
        assert!(!config_weakens(Enforce, true, Enforce, true));
        assert!(!config_weakens(Permissive, false, Enforce, true));
        assert!(!config_weakens(Disabled, false, Permissive, false));
        assert!(!config_weakens(Enforce, false, Enforce, false));
    }

    #[test]
    fn rules() {
        assert_eq!(bare_rule(Kind::Verdict), BareRule::AllowIsDeny);
        assert_eq!(bare_rule(Kind::ChannelKey), BareRule::RefuseAnswer);
        assert_eq!(bare_rule(Kind::Peers), BareRule::Refuse);
        assert_eq!(bare_rule(Kind::Generation), BareRule::Accept);
        assert_eq!(bare_rule(Kind::Hello), BareRule::Accept);
        assert_eq!(bare_rule(Kind::FileSetPaths), BareRule::Refuse);
        assert_eq!(bare_rule(Kind::FileSets), BareRule::Accept);
        let mut slots = std::vec::Vec::new();
        for k in [Kind::Config, Kind::Peers, Kind::FileSetPaths] {
            assert!(sealable(k) && order_slot(k).is_some_and(|s| s < ORDER_SLOTS));
            slots.push(order_slot(k));
        }
        slots.dedup();
        assert_eq!(slots.len(), 3, "one slot per order kind");
        for k in [Kind::Verdict, Kind::ChannelKey] {
            assert!(sealable(k) && order_slot(k).is_none());
        }
        for k in [
            Kind::Hello,
            Kind::Sealed,
            Kind::ExecRequest,
            Kind::Generation,
            Kind::FileSets,
        ] {
            assert!(!sealable(k));
        }
    }

    #[test]
    fn only_the_latest_file_paths_order_may_come_again() {
        // Config and Peers: strictly increasing.
        for k in [Kind::Config, Kind::Peers] {
            assert!(order_fresh(k, 0, 1));
            assert!(!order_fresh(k, 5, 5));
            assert!(!order_fresh(k, 5, 4));
        }
        // The sealed paths: the latest again (re-resolve), never older,
        // never sequence 0.
        assert!(order_fresh(Kind::FileSetPaths, 5, 5));
        assert!(order_fresh(Kind::FileSetPaths, 5, 6));
        assert!(!order_fresh(Kind::FileSetPaths, 5, 4));
        assert!(!order_fresh(Kind::FileSetPaths, 0, 0));
    }

    proptest! {
        #[test]
        fn authority_round_trip(key in proptest::array::uniform32(any::<u8>()), upper in any::<bool>()) {
            let mut full = [0u8; SESSION_PUB_LEN];
            full[..32].copy_from_slice(&key);
            full[32..].copy_from_slice(&key);
            let mut hex: std::string::String = full.iter().map(|b| format!("{b:02x}")).collect();
            if upper {
                hex = hex.to_uppercase();
            }
            prop_assert_eq!(parse_authority(hex.as_bytes()), Some(full));
            prop_assert_eq!(parse_authority(&hex.as_bytes()[1..]), None);
            let mut bad = hex.into_bytes();
            bad[5] = b'g';
            prop_assert_eq!(parse_authority(&bad), None);
        }

        /// Weakening is exactly "less strict or net turned off": a move and
        /// its reverse cannot both weaken.
        #[test]
        fn weakening_is_antisymmetric(a in 0u8..3, b in 0u8..3, na in any::<bool>(), nb in any::<bool>()) {
            let (a, b) = (Mode::from_wire(a).unwrap(), Mode::from_wire(b).unwrap());
            if config_weakens(a, na, b, nb) {
                prop_assert!(!config_weakens(b, nb, a, na) || (na != nb && a != b));
            }
            prop_assert!(!config_weakens(a, na, a, na));
        }
    }
}
