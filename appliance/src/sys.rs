//! Process limits the daemon sets at start, and the two ioctls of
//! `grow-data` (`grow.rs`): the only `unsafe` of the crate, each call with
//! the kernel's argument layout spelled out beside it.

use std::fs::File;

/// Raises the soft open-file limit (`RLIMIT_NOFILE`) to the hard one, so
/// the appliance is not capped near 1,000 agents by the usual soft limit of
/// 1,024 (every agent holds a connection). Returns the soft limit before
/// and after.
pub fn raise_open_file_limit() -> std::io::Result<(u64, u64)> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    let before = l.current.unwrap_or(u64::MAX);
    if l.current != l.maximum {
        l.current = l.maximum;
        setrlimit(Resource::Nofile, l).map_err(std::io::Error::from)?;
    }
    let after = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    Ok((before, after))
}

/// `BLKPG` (`_IO(0x12, 105)`, `linux/fs.h`).
const BLKPG: rustix::ioctl::Opcode = rustix::ioctl::opcode::none(0x12, 105);
/// `BLKPG_RESIZE_PARTITION` (`linux/blkpg.h`).
const BLKPG_RESIZE_PARTITION: i32 = 3;
/// `EXT4_IOC_RESIZE_FS` (`_IOW('f', 16, __u64)`, `fs/ext4/ext4.h`).
const EXT4_IOC_RESIZE_FS: rustix::ioctl::Opcode = rustix::ioctl::opcode::write::<u64>(b'f', 16);

/// `struct blkpg_partition` (`linux/blkpg.h`).
#[repr(C)]
struct BlkpgPartition {
    /// Start, in bytes.
    start: i64,
    /// Length, in bytes.
    length: i64,
    /// Partition number.
    pno: i32,
    /// Unused by the kernel.
    devname: [u8; 64],
    /// Unused by the kernel.
    volname: [u8; 64],
}

/// `struct blkpg_ioctl_arg` (`linux/blkpg.h`).
#[repr(C)]
struct BlkpgIoctlArg {
    op: i32,
    flags: i32,
    datalen: i32,
    data: *mut core::ffi::c_void,
}

fn invalid<E>(_: E) -> std::io::Error {
    std::io::Error::from(std::io::ErrorKind::InvalidInput)
}

/// Tells the kernel partition `pno` of the whole disk `disk` now spans
/// `length` bytes from `start` (`BLKPG_RESIZE_PARTITION`; the start must
/// be the one it knows). No table is read or written.
#[allow(unsafe_code)]
pub fn resize_partition(disk: &File, pno: u32, start: u64, length: u64) -> std::io::Result<()> {
    let mut part = BlkpgPartition {
        start: i64::try_from(start).map_err(invalid)?,
        length: i64::try_from(length).map_err(invalid)?,
        pno: i32::try_from(pno).map_err(invalid)?,
        devname: [0; 64],
        volname: [0; 64],
    };
    let mut arg = BlkpgIoctlArg {
        op: BLKPG_RESIZE_PARTITION,
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as i32,
        data: std::ptr::from_mut(&mut part).cast(),
    };
    // SAFETY: BLKPG takes a pointer to a `struct blkpg_ioctl_arg`, whose
    // layout `BlkpgIoctlArg` reproduces (repr(C)); its `data` points to
    // `part`, a `struct blkpg_partition` of `datalen` bytes that outlives
    // the call. The kernel only reads both (`copy_from_user`).
    let ctl = unsafe { rustix::ioctl::Updater::<BLKPG, BlkpgIoctlArg>::new(&mut arg) };
    // SAFETY: `ctl` is a valid BLKPG request on a file descriptor we own;
    // the kernel checks the rest (a block device, the partition, its start).
    unsafe { rustix::ioctl::ioctl(disk, ctl) }.map_err(std::io::Error::from)
}

/// Grows the ext4 file system holding the open directory `dir` to `blocks`
/// file system blocks, online (`EXT4_IOC_RESIZE_FS`; the kernel refuses to
/// shrink and does nothing at the current size).
#[allow(unsafe_code)]
pub fn resize_ext4(dir: &File, blocks: u64) -> std::io::Result<()> {
    // SAFETY: EXT4_IOC_RESIZE_FS is `_IOW('f', 16, __u64)`: the kernel
    // reads one u64 (the new block count) through the pointer, which
    // `Setter` passes to its own copy of `blocks`.
    let ctl = unsafe { rustix::ioctl::Setter::<EXT4_IOC_RESIZE_FS, u64>::new(blocks) };
    // SAFETY: a valid request as above, on a descriptor we own; on any
    // other file system the kernel answers ENOTTY.
    unsafe { rustix::ioctl::ioctl(dir, ctl) }.map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_soft_open_file_limit_becomes_the_hard_one() {
        use rustix::process::{getrlimit, setrlimit, Resource};
        // Lower the soft limit first, as a shell's default would.
        let mut l = getrlimit(Resource::Nofile);
        let hard = l.maximum;
        if hard.is_some_and(|h| h > 1024) {
            l.current = Some(1024);
            setrlimit(Resource::Nofile, l).unwrap();
        }
        let (before, after) = super::raise_open_file_limit().unwrap();
        assert!(before <= after);
        assert_eq!(getrlimit(Resource::Nofile).current, hard);
        assert_eq!(Some(after), hard.or(Some(u64::MAX)));
    }
}
