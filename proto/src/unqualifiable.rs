// SPDX-License-Identifier: GPL-2.0
//! What the PEM cannot qualify, and so refuses in enforce mode (and counts
//! as "would deny" in permissive mode) whatever the policy says.
//!
//! - **An exec from a FUSE file system** (threat model T-09). The module
//!   hashes the file through the page cache; a FUSE daemon can drop those
//!   pages (`FUSE_NOTIFY_INVAL_INODE`, or a direct-I/O file) and answer the
//!   page faults of the running program with other bytes, so the hash
//!   would not describe what runs. Any user may mount FUSE where
//!   `fusermount3` is installed or in a user namespace, so this is an
//!   unprivileged bypass. virtiofs is FUSE too. Network file systems
//!   (NFS, SMB, 9p) are not refused: changing their bytes after the hash
//!   needs the file server or the network (threat model T-100).
//! - **An SMC socket** (`AF_SMC`, or `IPPROTO_SMC` with `AF_INET`/
//!   `AF_INET6`; threat model T-19). SMC opens its TCP connection (the
//!   CLC handshake and the fallback path) on a kernel socket, which the
//!   connect and accept wrappers cannot attribute to a program, and moves
//!   data over RDMA or shared memory, which no TLS record layer covers.
//!   Refused only while connections are qualified (the agent set
//!   `Config::qualify_net`).

/// `FUSE_SUPER_MAGIC` (`include/uapi/linux/magic.h`).
pub const FUSE_SUPER_MAGIC: u32 = 0x6573_5546;
/// `AF_INET`.
pub const AF_INET: i32 = 2;
/// `AF_INET6`.
pub const AF_INET6: i32 = 10;
/// `AF_SMC`.
pub const AF_SMC: i32 = 43;
/// `IPPROTO_SMC` (Linux 6.11 and later).
pub const IPPROTO_SMC: i32 = 256;

/// Why an exec from a file system of super block magic `magic` cannot be
/// qualified, or `None` when it can.
pub const fn exec_fs(magic: u32) -> Option<&'static str> {
    match magic {
        FUSE_SUPER_MAGIC => Some("FUSE can change the bytes after they were hashed"),
        _ => None,
    }
}

/// Why a user socket of `family` and `protocol` cannot be qualified, or
/// `None` when it can.
pub const fn socket(family: i32, protocol: i32) -> Option<&'static str> {
    match (family, protocol) {
        (AF_SMC, _) | (AF_INET | AF_INET6, IPPROTO_SMC) => {
            Some("SMC connects on a kernel socket and bypasses TLS")
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fuse_and_smc_are_refused() {
        assert!(exec_fs(FUSE_SUPER_MAGIC).is_some());
        assert!(socket(AF_SMC, 0).is_some());
        assert!(socket(AF_SMC, 1).is_some());
        assert!(socket(AF_INET, IPPROTO_SMC).is_some());
        assert!(socket(AF_INET6, IPPROTO_SMC).is_some());
    }

    #[test]
    fn ordinary_file_systems_and_sockets_pass() {
        // ext4, tmpfs, xfs, btrfs, NFS, overlayfs, 9p.
        for m in [
            0xEF53u32,
            0x0102_1994,
            0x5846_5342,
            0x9123_683E,
            0x6969,
            0x794c_7630,
            0x0102_1997,
        ] {
            assert_eq!(exec_fs(m), None, "{m:#x}");
        }
        // TCP, UDP, MPTCP (qualified by the wrappers), UNIX, netlink.
        for (f, p) in [
            (2, 6),
            (10, 6),
            (2, 17),
            (2, 262),
            (10, 262),
            (1, 0),
            (16, 0),
        ] {
            assert_eq!(socket(f, p), None, "{f} {p}");
        }
    }

    proptest! {
        /// Only SMC is refused, whatever the numbers.
        #[test]
        fn only_smc(family in any::<i32>(), protocol in any::<i32>()) {
            let smc = family == AF_SMC
                || ((family == AF_INET || family == AF_INET6) && protocol == IPPROTO_SMC);
            prop_assert_eq!(socket(family, protocol).is_some(), smc);
        }
    }
}
