// SPDX-License-Identifier: GPL-2.0
//! The two ends of a TCP connection as both halves of a channel name them.
//!
//! An IPv6 socket talking IPv4 (a dual-stack server such as nginx or
//! iperf3 listening on `[::]`, or a connect to `::ffff:a.b.c.d`) sees its
//! ends as IPv4-mapped IPv6 addresses, while the program at the other end
//! may hold a plain IPv4 socket. [`unmap_v4`] reports such a connection as
//! IPv4, so the connect half and the accept half of one connection carry
//! the same 5-tuple whichever family each program's socket is, and the
//! backstop's protected services match the IPv4 packets on the wire.
//!
//! Addresses are 16 bytes: IPv4 in the first 4, the rest zero.
//!
//! [`unix_name_display`]: a UNIX socket's name as policy and logs show it.

/// `::ffff:0:0/96`.
fn v4_mapped(a: &[u8; 16]) -> bool {
    matches!(a, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, ..])
}

/// The IPv4 address in the last 4 bytes, moved to the front.
fn to_front(a: &[u8; 16]) -> [u8; 16] {
    let [.., w, x, y, z] = *a;
    [w, x, y, z, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// `::`.
fn unspecified(a: &[u8; 16]) -> bool {
    a.iter().all(|b| *b == 0)
}

/// Rewrites `(family, src, dst)` of an IPv6 socket talking IPv4 (the
/// destination IPv4-mapped, the source IPv4-mapped or not yet bound, `::`)
/// to family 4 with the IPv4 addresses in front. Anything else is left as
/// it is; applying it twice changes nothing more.
pub fn unmap_v4(family: &mut u32, src: &mut [u8; 16], dst: &mut [u8; 16]) {
    if *family != 6 || !v4_mapped(dst) || !(v4_mapped(src) || unspecified(src)) {
        return;
    }
    *family = 4;
    *src = to_front(src);
    *dst = to_front(dst);
}

/// Rewrites a UNIX socket's name, as the kernel keeps it, into the form
/// policies and logs use, in place: a file-system name (an absolute path)
/// stays; an abstract name (a leading NUL byte, then any bytes) becomes
/// `@` followed by the name with each NUL byte shown as `@`.
pub fn unix_name_display(name: &mut [u8]) {
    if name.first() == Some(&0) {
        for b in name.iter_mut().filter(|b| **b == 0) {
            *b = b'@';
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mapped(v4: [u8; 4]) -> [u8; 16] {
        let mut a = [0u8; 16];
        a[10] = 0xff;
        a[11] = 0xff;
        a[12..].copy_from_slice(&v4);
        a
    }

    fn v4(v4: [u8; 4]) -> [u8; 16] {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&v4);
        a
    }

    #[test]
    fn dual_stack_connection_becomes_ipv4() {
        let (mut f, mut s, mut d) = (6, mapped([10, 0, 0, 1]), mapped([10, 0, 0, 2]));
        unmap_v4(&mut f, &mut s, &mut d);
        assert_eq!((f, s, d), (4, v4([10, 0, 0, 1]), v4([10, 0, 0, 2])));
        // A connect before the socket is bound: source `::`.
        let (mut f, mut s, mut d) = (6, [0u8; 16], mapped([192, 168, 1, 9]));
        unmap_v4(&mut f, &mut s, &mut d);
        assert_eq!((f, s, d), (4, [0u8; 16], v4([192, 168, 1, 9])));
    }

    #[test]
    fn native_ipv6_stays() {
        let mut lo = [0u8; 16];
        lo[15] = 1;
        let (mut f, mut s, mut d) = (6, lo, lo);
        unmap_v4(&mut f, &mut s, &mut d);
        assert_eq!((f, s, d), (6, lo, lo));
        // A mapped destination from a native IPv6 source is not IPv4.
        let (mut f, mut s, mut d) = (6, lo, mapped([10, 0, 0, 2]));
        unmap_v4(&mut f, &mut s, &mut d);
        assert_eq!((f, s, d), (6, lo, mapped([10, 0, 0, 2])));
    }

    #[test]
    fn unix_names() {
        let mut path = *b"/run/x.sock";
        unix_name_display(&mut path);
        assert_eq!(&path, b"/run/x.sock");
        let mut abs = *b"\0dbus\0x";
        unix_name_display(&mut abs);
        assert_eq!(&abs, b"@dbus@x");
        let mut empty: [u8; 0] = [];
        unix_name_display(&mut empty);
    }

    proptest! {
        /// Names are only ever rewritten byte for byte: same length, an
        /// abstract name without NUL bytes afterwards, a path unchanged.
        #[test]
        fn unix_name_model(name in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut shown = name.clone();
            unix_name_display(&mut shown);
            prop_assert_eq!(shown.len(), name.len());
            if name.first() == Some(&0) {
                prop_assert!(!shown.contains(&0));
                for (a, b) in name.iter().zip(&shown) {
                    prop_assert_eq!(*b, if *a == 0 { b'@' } else { *a });
                }
            } else {
                prop_assert_eq!(shown, name);
            }
        }

        /// Only IPv6 with a mapped destination and a mapped or unbound
        /// source changes; the result is IPv4 holding the mapped bytes;
        /// a second application changes nothing.
        #[test]
        fn model(family in prop_oneof![Just(4u32), Just(6u32), any::<u32>()],
                 src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(),
                 src_kind in 0u8..3, dst_mapped in any::<bool>()) {
            let mut src = src;
            let mut dst = dst;
            match src_kind {
                0 => src = mapped([src[0], src[1], src[2], src[3]]),
                1 => src = [0u8; 16],
                _ => {}
            }
            if dst_mapped {
                dst = mapped([dst[0], dst[1], dst[2], dst[3]]);
            }
            let (f0, s0, d0) = (family, src, dst);
            let (mut f, mut s, mut d) = (family, src, dst);
            unmap_v4(&mut f, &mut s, &mut d);
            let changes = f0 == 6 && v4_mapped(&d0) && (v4_mapped(&s0) || unspecified(&s0));
            if changes {
                prop_assert_eq!(f, 4);
                prop_assert_eq!(&s[..4], &s0[12..]);
                prop_assert_eq!(&d[..4], &d0[12..]);
                prop_assert!(s[4..].iter().chain(&d[4..]).all(|b| *b == 0));
            } else {
                prop_assert_eq!((f, s, d), (f0, s0, d0));
            }
            let (f1, s1, d1) = (f, s, d);
            unmap_v4(&mut f, &mut s, &mut d);
            prop_assert_eq!((f, s, d), (f1, s1, d1));
        }
    }
}
