//! `grow-data`: the data partition fills a larger disk (issue 16 item 4).
//!
//! The appliance image (`image/README.md`, "Disk layout") has its ext4 data
//! partition last, GPT entry 3, 64 MiB. Written to a larger disk, the space
//! after the image's end is unused until this grows it, in two steps the
//! image's `rcS` runs at every boot (both change nothing when there is
//! nothing to do):
//!
//! 1. [`grow_partition`], before the file system is checked and mounted:
//!    the GPT's backup header and entries move to the disk's last sectors,
//!    the entry ends at the last usable sector (rounded down to 1 MiB), both
//!    headers are rewritten with their CRC32s, the protective MBR's size is
//!    set to the disk's, and on a block device the kernel learns the new
//!    size (`BLKPG_RESIZE_PARTITION`, no re-read of the table needed).
//!    [`grow_gpt`] is the table part alone, on any [`File`].
//! 2. [`grow_ext4`], once it is mounted: the ext4 grows online to fill its
//!    partition (`EXT4_IOC_RESIZE_FS`, the kernel's journaled resize; no
//!    `resize2fs` in the image).
//!
//! Anything unexpected refuses with nothing written: no valid, consistent
//! GPT (both headers and entry arrays with good CRCs, the backup where the
//! primary says, the same fields and entries), another partition after the
//! data partition, a different name, a disk smaller than its GPT says.
//!
//! Order of the writes, with an `fsync` after each step, and what a power
//! loss leaves:
//!
//! 1. the new backup entries and header at the disk's end. Lost before or
//!    during it: the primary still names the old backup, both intact, so
//!    the disk is as before and the next boot starts over;
//! 2. the primary header and entries (LBA 1 to 33), in one write. Lost
//!    after it: done. Lost during it (a torn write): the primary's CRC
//!    fails and readers that fall back to the backup (GRUB, `gdisk`, Linux
//!    with `gpt` on its command line) find the new layout complete at the
//!    disk's end; Linux without `gpt` sees no partitions until the primary
//!    is rebuilt from the backup (`gdisk`: recovery, "use backup GPT");
//! 3. the old backup header (now inside the grown partition, before its
//!    file system grows into it) is zeroed, so no stale GPT header remains;
//!    lost: a stale sector nobody reads;
//! 4. the protective MBR's size field (bytes 458 to 461 of sector 0, GRUB's
//!    boot code around it is written back unchanged). Lost: the size is
//!    fixed at the next boot.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

/// The data partition ends on a 1 MiB boundary, as the image's partitions.
pub const ALIGN_BYTES: u64 = 1 << 20;
/// The GPT name `rcS` grows.
pub const DATA_PARTITION_NAME: &str = "trustbind-data";
/// The largest entry array read (the usual one is 128 x 128 bytes).
const MAX_ENTRIES_BYTES: u64 = 1 << 20;
/// Size of a partition entry's name field (36 UTF-16 units).
const NAME_BYTES: usize = 72;
/// `EXT4_SUPER_MAGIC`, the `f_type` of `statfs` (ext2/3/4 alike).
const EXT4_MAGIC: u64 = 0xEF53;

/// Why `grow-data` did nothing (or stopped).
#[derive(Debug, thiserror::Error)]
pub enum GrowError {
    /// A read, write, `fsync` or ioctl failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// The disk is not what `grow-data` grows; nothing was written.
    #[error("refused, nothing changed: {0}")]
    Refused(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> GrowError {
    let what = what.into();
    move |source| GrowError::Io { what, source }
}

fn refuse<T>(why: impl Into<String>) -> Result<T, GrowError> {
    Err(GrowError::Refused(why.into()))
}

fn le_u32(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn le_u64(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

fn put(b: &mut [u8], off: usize, v: &[u8]) {
    if let Some(d) = b.get_mut(off..off + v.len()) {
        d.copy_from_slice(v);
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

/// A GPT header: its whole sector as read (the header, zeros after it).
#[derive(Clone)]
struct Header(Vec<u8>);

impl Header {
    const MY_LBA: usize = 24;
    const ALT_LBA: usize = 32;
    const FIRST_USABLE: usize = 40;
    const LAST_USABLE: usize = 48;
    const ENTRIES_LBA: usize = 72;
    const ENTRIES_CRC: usize = 88;

    fn size(&self) -> usize {
        le_u32(&self.0, 12) as usize
    }
    fn crc(&self) -> u32 {
        le_u32(&self.0, 16)
    }
    fn lba(&self, off: usize) -> u64 {
        le_u64(&self.0, off)
    }
    fn set_lba(&mut self, off: usize, v: u64) {
        put(&mut self.0, off, &v.to_le_bytes());
    }
    fn entry_count(&self) -> u32 {
        le_u32(&self.0, 80)
    }
    fn entry_size(&self) -> u32 {
        le_u32(&self.0, 84)
    }
    fn entries_bytes(&self) -> u64 {
        u64::from(self.entry_count()) * u64::from(self.entry_size())
    }
    /// The header's CRC32, computed with its own CRC field zeroed.
    fn computed_crc(&self) -> u32 {
        let mut h = crc32fast::Hasher::new();
        h.update(self.0.get(..16).unwrap_or_default());
        h.update(&[0; 4]);
        h.update(self.0.get(20..self.size()).unwrap_or_default());
        h.finalize()
    }
    /// Sets the entries' CRC, then the header's.
    fn seal(&mut self, entries: &[u8]) {
        put(
            &mut self.0,
            Self::ENTRIES_CRC,
            &crc32fast::hash(entries).to_le_bytes(),
        );
        let crc = self.computed_crc();
        put(&mut self.0, 16, &crc.to_le_bytes());
    }
    /// The fields primary and backup share (all but their own locations
    /// and CRC): disk GUID, usable range, entry array shape and CRC.
    fn shared(&self) -> (Option<&[u8]>, u64, u64, u32, u32, u32) {
        (
            self.0.get(56..72),
            self.lba(Self::FIRST_USABLE),
            self.lba(Self::LAST_USABLE),
            self.entry_count(),
            self.entry_size(),
            le_u32(&self.0, Self::ENTRIES_CRC),
        )
    }
}

/// One GPT copy (primary or backup): its header and entry array.
struct Table {
    header: Header,
    entries: Vec<u8>,
}

/// The disk as `grow_gpt` sees it.
struct Disk<'a> {
    file: &'a File,
    sector: u64,
    /// Number of sectors.
    sectors: u64,
}

impl Disk<'_> {
    fn read(&self, lba: u64, len: u64, what: &str) -> Result<Vec<u8>, GrowError> {
        let mut buf = vec![0; usize::try_from(len).unwrap_or(usize::MAX)];
        self.file
            .read_exact_at(&mut buf, lba * self.sector)
            .map_err(io_err(format!("read {what} at LBA {lba}")))?;
        Ok(buf)
    }

    fn write(&self, lba: u64, buf: &[u8], what: &str) -> Result<(), GrowError> {
        self.file
            .write_all_at(buf, lba * self.sector)
            .map_err(io_err(format!("write {what} at LBA {lba}")))
    }

    fn sync(&self, after: &str) -> Result<(), GrowError> {
        self.file
            .sync_all()
            .map_err(io_err(format!("fsync after writing {after}")))
    }

    fn sectors_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.sector)
    }

    /// Reads and checks the GPT copy whose header is at `lba`.
    fn table(&self, lba: u64, which: &str) -> Result<Table, GrowError> {
        if lba >= self.sectors {
            return refuse(format!(
                "the {which} GPT header would be at LBA {lba}, beyond the disk's end \
                 (LBA {}): the disk is smaller than its GPT says",
                self.sectors - 1
            ));
        }
        let header = Header(self.read(lba, self.sector, &format!("the {which} GPT header"))?);
        let bad = |why: &str| refuse(format!("the {which} GPT header at LBA {lba} {why}"));
        if header.0.get(..8) != Some(b"EFI PART".as_slice()) {
            return bad("has no GPT signature");
        }
        if le_u32(&header.0, 8) >> 16 != 1 {
            return bad("has an unknown revision");
        }
        if !(92..=self.sector as usize).contains(&header.size()) {
            return bad("has a bad header size");
        }
        if header.crc() != header.computed_crc() {
            return bad("fails its CRC32");
        }
        if header.lba(Header::MY_LBA) != lba {
            return bad("names another LBA as its own");
        }
        let esize = header.entry_size();
        if esize < 128 || !esize.is_power_of_two() || header.entry_count() == 0 {
            return bad("has a bad entry array shape");
        }
        if header.entries_bytes() > MAX_ENTRIES_BYTES {
            return bad("has an entry array larger than 1 MiB");
        }
        let elba = header.lba(Header::ENTRIES_LBA);
        let esectors = self.sectors_for(header.entries_bytes());
        let (first, last) = (
            header.lba(Header::FIRST_USABLE),
            header.lba(Header::LAST_USABLE),
        );
        if elba < 2 || elba.saturating_add(esectors) > self.sectors || first > last {
            return bad("has its entries or usable range outside the disk");
        }
        let entries = self.read(elba, header.entries_bytes(), "GPT entries")?;
        if crc32fast::hash(&entries) != le_u32(&header.0, Header::ENTRIES_CRC) {
            return bad("has entries failing their CRC32");
        }
        Ok(Table { header, entries })
    }
}

/// A partition entry's fields `grow_gpt` reads.
struct Entry<'a>(&'a [u8]);

impl Entry<'_> {
    fn used(&self) -> bool {
        self.0.get(..16).is_some_and(|t| t.iter().any(|b| *b != 0))
    }
    fn first(&self) -> u64 {
        le_u64(self.0, 32)
    }
    fn last(&self) -> u64 {
        le_u64(self.0, 40)
    }
    fn name(&self) -> String {
        let units: Vec<u16> = self
            .0
            .get(56..56 + NAME_BYTES)
            .unwrap_or_default()
            .chunks_exact(2)
            .map(|c| {
                u16::from_le_bytes([
                    c.first().copied().unwrap_or(0),
                    c.get(1).copied().unwrap_or(0),
                ])
            })
            .take_while(|u| *u != 0)
            .collect();
        String::from_utf16_lossy(&units)
    }
}

/// What [`grow_gpt`] found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GptGrowth {
    /// Logical sector size in bytes.
    pub sector: u64,
    /// Partition number (1-based).
    pub partition: u32,
    /// The partition's first LBA.
    pub first: u64,
    /// Its last LBA before and after.
    pub old_last: u64,
    /// Its last LBA now.
    pub new_last: u64,
    /// The backup header's LBA before.
    pub old_backup: u64,
    /// The backup header's LBA now (the disk's last sector).
    pub new_backup: u64,
    /// Whether the protective MBR's size was set to the disk's.
    pub mbr_updated: bool,
}

impl GptGrowth {
    /// Whether anything was written.
    pub fn changed(&self) -> bool {
        self.old_last != self.new_last || self.old_backup != self.new_backup || self.mbr_updated
    }
    /// The partition's size in bytes before.
    pub fn old_bytes(&self) -> u64 {
        (self.old_last + 1 - self.first) * self.sector
    }
    /// The partition's size in bytes now.
    pub fn new_bytes(&self) -> u64 {
        (self.new_last + 1 - self.first) * self.sector
    }
}

impl std::fmt::Display for GptGrowth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.old_last == self.new_last && self.old_backup == self.new_backup {
            write!(
                f,
                "partition {} ({}) already fills the disk",
                self.partition,
                mib(self.new_bytes())
            )?;
            return if self.mbr_updated {
                write!(f, "; protective MBR size set to the disk's")
            } else {
                write!(f, ": nothing changed")
            };
        }
        write!(
            f,
            "partition {} grown from {} to {} (last LBA {} -> {}), GPT backup header LBA {} -> {}",
            self.partition,
            mib(self.old_bytes()),
            mib(self.new_bytes()),
            self.old_last,
            self.new_last,
            self.old_backup,
            self.new_backup
        )?;
        if self.mbr_updated {
            write!(f, ", protective MBR size set to the disk's")?;
        }
        Ok(())
    }
}

/// Grows GPT partition `partition` (1-based), named `name` and the last
/// partition on the disk, to the disk's end, on a disk image or block
/// device of `sector`-byte logical sectors (see the module's text for the
/// checks and the order of the writes). Nothing to do: nothing written.
pub fn grow_gpt(
    file: &File,
    sector: u64,
    partition: u32,
    name: &str,
) -> Result<GptGrowth, GrowError> {
    if !(512..=65_536).contains(&sector) || !sector.is_power_of_two() {
        return refuse(format!("sector size {sector}"));
    }
    let size = (&*file)
        .seek(SeekFrom::End(0))
        .map_err(io_err("the disk's size"))?;
    let disk = Disk {
        file,
        sector,
        sectors: size / sector,
    };
    if disk.sectors < 68 {
        return refuse(format!(
            "the disk has {} sectors, too few for a GPT",
            disk.sectors
        ));
    }
    let last_lba = disk.sectors - 1;

    // Both copies, checked, and alike.
    let primary = disk.table(1, "primary")?;
    let old_backup = primary.header.lba(Header::ALT_LBA);
    let backup = disk.table(old_backup, "backup")?;
    if backup.header.lba(Header::ALT_LBA) != 1
        || primary.header.shared() != backup.header.shared()
        || primary.entries != backup.entries
    {
        return refuse("the primary and backup GPT differ (repair the GPT first, e.g. with gdisk)");
    }
    let hdr = &primary.header;
    let esectors = disk.sectors_for(hdr.entries_bytes());
    let (first_usable, last_usable) = (hdr.lba(Header::FIRST_USABLE), hdr.lba(Header::LAST_USABLE));
    if hdr.lba(Header::ENTRIES_LBA) + esectors > first_usable
        || backup.header.lba(Header::ENTRIES_LBA) <= last_usable
        || backup.header.lba(Header::ENTRIES_LBA) + esectors > old_backup
    {
        return refuse("the GPT's entry arrays overlap its usable range");
    }

    // The partition: named `name`, the last one.
    let esize = hdr.entry_size() as usize;
    let index = partition.checked_sub(1).map(|i| i as usize);
    let entry_at = |i: usize| primary.entries.get(i * esize..(i + 1) * esize).map(Entry);
    let Some((index, entry)) = index.and_then(|i| entry_at(i).map(|e| (i, e))) else {
        return refuse(format!(
            "the GPT has no entry {partition} (it has {})",
            hdr.entry_count()
        ));
    };
    if !entry.used() {
        return refuse(format!("GPT entry {partition} is empty"));
    }
    if entry.name() != name {
        return refuse(format!(
            "GPT entry {partition} is named {:?}, not {name:?}",
            entry.name()
        ));
    }
    let (first, old_last) = (entry.first(), entry.last());
    if first > old_last || first < first_usable || old_last > last_usable {
        return refuse(format!(
            "GPT entry {partition} lies outside the usable range"
        ));
    }
    for i in (0..hdr.entry_count() as usize).filter(|i| *i != index) {
        if let Some(other) = entry_at(i).filter(Entry::used) {
            if other.last() >= first {
                return refuse(format!(
                    "partition {partition} is not the last one: entry {} ({:?}) ends at LBA {}",
                    i + 1,
                    other.name(),
                    other.last()
                ));
            }
        }
    }

    // The new layout: backup entries and header in the last sectors, the
    // partition to the last usable sector, rounded down to 1 MiB (never
    // shrunk).
    let new_entries_lba = last_lba - esectors;
    let new_last_usable = new_entries_lba - 1;
    // A disk grown by less than the backup's own size (under 17 KiB)
    // would have the new backup overwrite the old one: left as it is.
    let room = new_entries_lba > old_backup;
    let align = (ALIGN_BYTES / sector).max(1);
    let aligned = ((new_last_usable + 1) / align * align).saturating_sub(1);
    let new_last = if room {
        old_last.max(aligned)
    } else {
        old_last
    };
    let mut growth = GptGrowth {
        sector,
        partition,
        first,
        old_last,
        new_last,
        old_backup,
        new_backup: if room { last_lba } else { old_backup },
        mbr_updated: false,
    };

    if room {
        let mut entries = primary.entries.clone();
        put(&mut entries, index * esize + 40, &new_last.to_le_bytes());

        // 1. The backup at the disk's end.
        let mut b = backup.header.clone();
        b.set_lba(Header::MY_LBA, last_lba);
        b.set_lba(Header::LAST_USABLE, new_last_usable);
        b.set_lba(Header::ENTRIES_LBA, new_entries_lba);
        b.seal(&entries);
        let mut buf = entries.clone();
        buf.resize((esectors * sector) as usize, 0);
        buf.extend_from_slice(&b.0);
        disk.write(new_entries_lba, &buf, "the backup GPT")?;
        disk.sync("the backup GPT")?;

        // 2. The primary, in one write when its entries follow it.
        let mut p = primary.header.clone();
        p.set_lba(Header::ALT_LBA, last_lba);
        p.set_lba(Header::LAST_USABLE, new_last_usable);
        p.seal(&entries);
        let elba = p.lba(Header::ENTRIES_LBA);
        if elba == 2 {
            let mut buf = p.0.clone();
            buf.extend_from_slice(&entries);
            disk.write(1, &buf, "the primary GPT")?;
        } else {
            disk.write(elba, &entries, "the primary GPT entries")?;
            disk.write(1, &p.0, "the primary GPT header")?;
        }
        disk.sync("the primary GPT")?;

        // 3. The old backup header, now inside the partition (not yet in
        // its file system).
        if old_backup > last_usable {
            disk.write(
                old_backup,
                &vec![0; sector as usize],
                "over the old backup GPT header",
            )?;
            disk.sync("over the old backup GPT header")?;
        }
    }

    // 4. The protective MBR's size: the disk's, less the MBR (at most
    // 2^32 - 1).
    let mut mbr = disk.read(0, 512, "the protective MBR")?;
    if mbr.get(510..512) == Some([0x55, 0xAA].as_slice()) {
        let want = u32::try_from(last_lba).unwrap_or(u32::MAX);
        let slot = (0..4)
            .map(|k| 446 + 16 * k)
            .find(|o| mbr.get(o + 4) == Some(&0xEE) && le_u32(&mbr, o + 8) == 1);
        if let Some(o) = slot.filter(|o| le_u32(&mbr, o + 12) != want) {
            put(&mut mbr, o + 12, &want.to_le_bytes());
            disk.write(0, &mbr, "the protective MBR")?;
            disk.sync("the protective MBR")?;
            growth.mbr_updated = true;
        }
    }
    Ok(growth)
}

/// [`grow_gpt`] on the disk at `path` (a disk image or a whole-disk block
/// device), then, on a block device, tells the kernel the partition's size
/// (`BLKPG_RESIZE_PARTITION`; also when the table was already grown, so a
/// boot interrupted between the two finishes the job).
pub fn grow_partition(path: &Path, partition: u32, name: &str) -> Result<GptGrowth, GrowError> {
    let file = File::options()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(format!("open {}", path.display())))?;
    let block = file
        .metadata()
        .map_err(io_err(format!("stat {}", path.display())))?
        .file_type()
        .is_block_device();
    let sector = if block {
        u64::from(
            rustix::fs::ioctl_blksszget(&file)
                .map_err(|e| io_err(format!("BLKSSZGET on {}", path.display()))(e.into()))?,
        )
    } else {
        512
    };
    let growth = grow_gpt(&file, sector, partition, name)?;
    if block {
        crate::sys::resize_partition(&file, partition, growth.first * sector, growth.new_bytes())
            .map_err(io_err(format!(
            "BLKPG_RESIZE_PARTITION of partition {partition} on {} (the GPT is grown; \
             the kernel sees the new size at the next boot)",
            path.display()
        )))?;
    }
    Ok(growth)
}

/// What [`grow_ext4`] found and did: the file system's size as `df` shows
/// it, before and after, and its device's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ext4Growth {
    /// Size before, in bytes (`statvfs`: blocks times fragment size).
    pub old_bytes: u64,
    /// Size now.
    pub new_bytes: u64,
    /// Size of the block device holding it.
    pub device_bytes: u64,
}

impl std::fmt::Display for Ext4Growth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.new_bytes == self.old_bytes {
            write!(
                f,
                "file system already fills its partition ({} of {}): nothing changed",
                mib(self.new_bytes),
                mib(self.device_bytes)
            )
        } else {
            write!(
                f,
                "file system grown from {} to {} (partition {})",
                mib(self.old_bytes),
                mib(self.new_bytes),
                mib(self.device_bytes)
            )
        }
    }
}

/// Grows the ext4 mounted at `mount` online to fill its block device
/// (`EXT4_IOC_RESIZE_FS`; the kernel does nothing when it already does).
/// The device is the one `stat` names for `mount`, its size from sysfs.
pub fn grow_ext4(mount: &Path) -> Result<Ext4Growth, GrowError> {
    let dir = File::open(mount).map_err(io_err(format!("open {}", mount.display())))?;
    let fs = rustix::fs::fstatfs(&dir)
        .map_err(|e| io_err(format!("statfs {}", mount.display()))(e.into()))?;
    if fs.f_type as u64 != EXT4_MAGIC {
        return refuse(format!("{} is not an ext4 file system", mount.display()));
    }
    let st = rustix::fs::fstat(&dir)
        .map_err(|e| io_err(format!("stat {}", mount.display()))(e.into()))?;
    let (major, minor) = (rustix::fs::major(st.st_dev), rustix::fs::minor(st.st_dev));
    let size_file = format!("/sys/dev/block/{major}:{minor}/size");
    let sectors: u64 = std::fs::read_to_string(&size_file)
        .map_err(io_err(format!("read {size_file}")))?
        .trim()
        .parse()
        .map_err(|e| io_err(format!("parse {size_file}"))(io::Error::other(e)))?;
    let device_bytes = sectors * 512;
    let statvfs = |what: &str| {
        rustix::fs::fstatvfs(&dir)
            .map_err(|e| io_err(format!("statvfs {} {what}", mount.display()))(e.into()))
    };
    let before = statvfs("before")?;
    let block = before.f_frsize.max(1);
    crate::sys::resize_ext4(&dir, device_bytes / block).map_err(io_err(format!(
        "EXT4_IOC_RESIZE_FS on {} to {} blocks of {block} bytes",
        mount.display(),
        device_bytes / block
    )))?;
    let after = statvfs("after")?;
    Ok(Ext4Growth {
        old_bytes: before.f_blocks * before.f_frsize,
        new_bytes: after.f_blocks * after.f_frsize,
        device_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const S: u64 = 512;
    /// The image's layout, smaller: BIOS boot 1 MiB, system 2 MiB, data
    /// 8 MiB, 1 MiB of room at the end (`xtask/src/image.rs`).
    const DATA_LBA: u64 = 8192;
    const DATA_SECTORS: u64 = 16384;
    const IMAGE_SECTORS: u64 = DATA_LBA + DATA_SECTORS + 2048;

    /// A disk image partitioned by `sfdisk` as the real image is, the data
    /// partition filled with a pattern, plus `extra` more partitions lines.
    fn make_disk(dir: &Path, extra: &str) -> std::path::PathBuf {
        let disk = dir.join("disk.img");
        File::create(&disk)
            .unwrap()
            .set_len(IMAGE_SECTORS * S)
            .unwrap();
        let script = format!(
            "label: gpt\nlabel-id: 7B1D5E2C-4A3F-4E8B-9C6D-2F1A0B3C4D5E\nunit: sectors\nfirst-lba: 2048\n\
             start=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649, name=\"bios-boot\"\n\
             start=4096, size=4096, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"trustbind-system\"\n\
             start={DATA_LBA}, size={DATA_SECTORS}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, \
             uuid=9E4D2B1A-6C5F-4A7E-8B3D-1F0E2D4C6A02, name=\"trustbind-data\"\n{extra}"
        );
        let mut child = Command::new("sfdisk")
            .args(["-q", "--no-reread", "--no-tell-kernel"])
            .arg(&disk)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("sfdisk (package fdisk; `cargo xtask setup` installs it)");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "sfdisk failed");
        let pattern: Vec<u8> = (0..DATA_SECTORS * S)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        File::options()
            .write(true)
            .open(&disk)
            .unwrap()
            .write_all_at(&pattern, DATA_LBA * S)
            .unwrap();
        disk
    }

    fn enlarge(disk: &Path, by_sectors: u64) {
        let f = File::options().write(true).open(disk).unwrap();
        let len = f.metadata().unwrap().len();
        f.set_len(len + by_sectors * S).unwrap();
    }

    /// One GPT copy as read back by the test, independently of the code
    /// under test.
    #[derive(Debug)]
    struct Copy {
        my: u64,
        alt: u64,
        first_usable: u64,
        last_usable: u64,
        entries_lba: u64,
        guid: Vec<u8>,
        entries: Vec<u8>,
    }

    fn copy_at(img: &[u8], lba: u64) -> Copy {
        let h = &img[(lba * S) as usize..][..S as usize];
        assert_eq!(&h[..8], b"EFI PART", "no header at LBA {lba}");
        let u32_ = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap());
        let u64_ = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap());
        let size = u32_(12) as usize;
        let mut z = h[..size].to_vec();
        z[16..20].fill(0);
        assert_eq!(crc32fast::hash(&z), u32_(16), "header CRC at LBA {lba}");
        let n = (u32_(80) * u32_(84)) as usize;
        let entries = img[(u64_(72) * S) as usize..][..n].to_vec();
        assert_eq!(
            crc32fast::hash(&entries),
            u32_(88),
            "entries CRC at LBA {lba}"
        );
        Copy {
            my: u64_(24),
            alt: u64_(32),
            first_usable: u64_(40),
            last_usable: u64_(48),
            entries_lba: u64_(72),
            guid: h[56..72].to_vec(),
            entries,
        }
    }

    fn entry(c: &Copy, i: usize) -> &[u8] {
        &c.entries[i * 128..(i + 1) * 128]
    }

    fn sgdisk_verify(disk: &Path) -> String {
        let out = Command::new("sgdisk")
            .arg("-v")
            .arg(disk)
            .output()
            .expect("sgdisk (package gdisk; `cargo xtask setup` installs it)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn the_data_partition_grows_to_the_disk_end_and_nothing_else_changes() {
        let d = tempfile::tempdir().unwrap();
        let disk = make_disk(d.path(), "");
        let before = std::fs::read(&disk).unwrap();
        let old = copy_at(&before, 1);
        // 40 MiB and 7 sectors more: the end is not on a MiB boundary.
        enlarge(&disk, 40 * 2048 + 7);
        let total = IMAGE_SECTORS + 40 * 2048 + 7;
        let last = total - 1;
        assert!(
            !sgdisk_verify(&disk).contains("No problems found"),
            "sgdisk sees nothing wrong with a backup GPT before the disk's end"
        );

        let g = grow_partition(&disk, 3, DATA_PARTITION_NAME).unwrap();
        let new_last = (last - 33 + 1) / 2048 * 2048 - 1;
        assert_eq!(
            g,
            GptGrowth {
                sector: 512,
                partition: 3,
                first: DATA_LBA,
                old_last: DATA_LBA + DATA_SECTORS - 1,
                new_last,
                old_backup: IMAGE_SECTORS - 1,
                new_backup: last,
                mbr_updated: true,
            }
        );
        assert!(g.changed());
        assert_eq!(g.new_bytes(), (new_last + 1 - DATA_LBA) * 512);
        eprintln!("{g}");

        let after = std::fs::read(&disk).unwrap();
        let (p, b) = (copy_at(&after, 1), copy_at(&after, last));
        assert_eq!((p.my, p.alt, p.entries_lba), (1, last, 2));
        assert_eq!((b.my, b.alt, b.entries_lba), (last, 1, last - 32));
        assert_eq!((p.first_usable, p.last_usable), (2048, last - 33));
        assert_eq!((b.first_usable, b.last_usable), (2048, last - 33));
        assert_eq!(p.guid, old.guid);
        assert_eq!(b.guid, old.guid);
        assert_eq!(p.entries, b.entries);
        // Entries 1 and 2 and the empty ones untouched; entry 3 only its end.
        for i in (0..128).filter(|i| *i != 2) {
            assert_eq!(entry(&p, i), entry(&old, i), "entry {}", i + 1);
        }
        let (e3, o3) = (entry(&p, 2), entry(&old, 2));
        assert_eq!(e3[..40], o3[..40]);
        assert_eq!(e3[48..], o3[48..]);
        assert_eq!(u64::from_le_bytes(e3[40..48].try_into().unwrap()), new_last);
        // The partitions' data untouched, the old backup header gone, the
        // protective MBR the disk's size, GRUB's area around it as it was.
        let range = |lba: u64, n: u64| (lba * S) as usize..((lba + n) * S) as usize;
        assert_eq!(
            after[range(2048, DATA_LBA + DATA_SECTORS - 2048)],
            before[range(2048, DATA_LBA + DATA_SECTORS - 2048)]
        );
        assert!(after[range(IMAGE_SECTORS - 1, 1)].iter().all(|b| *b == 0));
        assert_eq!(after[..458], before[..458]);
        assert_eq!(
            u32::from_le_bytes(after[458..462].try_into().unwrap()),
            u32::try_from(last).unwrap()
        );
        assert_eq!(after[462..512], before[462..512]);
        assert_eq!(after.len() as u64, total * S);

        // Other tools agree.
        let v = sgdisk_verify(&disk);
        assert!(v.contains("No problems found"), "sgdisk -v:\n{v}");
        let dump = Command::new("sfdisk")
            .arg("-d")
            .arg(&disk)
            .output()
            .unwrap();
        let dump = String::from_utf8_lossy(&dump.stdout);
        assert!(dump.contains(&format!("last-lba: {}", last - 33)), "{dump}");
        assert!(
            dump.contains(&format!(
                "start=        {DATA_LBA}, size=       {}",
                new_last + 1 - DATA_LBA
            )),
            "{dump}"
        );

        // Idempotent: a second run writes nothing.
        let g2 = grow_partition(&disk, 3, DATA_PARTITION_NAME).unwrap();
        assert!(!g2.changed(), "{g2:?}");
        assert_eq!(
            (g2.old_last, g2.new_last, g2.new_backup),
            (new_last, new_last, last)
        );
        assert!(g2.to_string().contains("nothing changed"));
        assert_eq!(std::fs::read(&disk).unwrap(), after);
    }

    #[test]
    fn a_disk_the_image_fills_or_barely_larger_is_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let disk = make_disk(d.path(), "");
        let before = std::fs::read(&disk).unwrap();
        let f = File::options().read(true).write(true).open(&disk).unwrap();
        let g = grow_gpt(&f, 512, 3, DATA_PARTITION_NAME).unwrap();
        assert!(!g.changed(), "{g:?}");
        assert_eq!(std::fs::read(&disk).unwrap(), before);

        // 16 sectors more: too little to move the backup (33 sectors) over.
        enlarge(&disk, 16);
        let g = grow_gpt(&f, 512, 3, DATA_PARTITION_NAME).unwrap();
        assert_eq!(
            (g.old_last, g.new_last),
            (g.old_last, DATA_LBA + DATA_SECTORS - 1)
        );
        assert_eq!(g.new_backup, IMAGE_SECTORS - 1);
        let after = std::fs::read(&disk).unwrap();
        assert_eq!(after[512..before.len()], before[512..]);
    }

    #[test]
    fn a_grow_cut_short_by_a_power_loss_is_finished_by_the_next_run() {
        let d = tempfile::tempdir().unwrap();
        let disk = make_disk(d.path(), "");
        enlarge(&disk, 8 * 2048);
        let start = std::fs::read(&disk).unwrap();
        grow_partition(&disk, 3, DATA_PARTITION_NAME).unwrap();
        let done = std::fs::read(&disk).unwrap();
        let end = done.len() - 33 * S as usize;

        // Lost after step 1: the new backup at the end, the rest as before.
        let mut cut = start.clone();
        cut[end..].copy_from_slice(&done[end..]);
        std::fs::write(&disk, &cut).unwrap();
        assert!(grow_partition(&disk, 3, DATA_PARTITION_NAME)
            .unwrap()
            .changed());
        assert!(std::fs::read(&disk).unwrap() == done);

        // Lost during step 2, the primary's entries written, not its
        // header: refused, nothing written (gdisk rebuilds it from the backup).
        let mut torn = cut.clone();
        torn[2 * S as usize..34 * S as usize]
            .copy_from_slice(&done[2 * S as usize..34 * S as usize]);
        std::fs::write(&disk, &torn).unwrap();
        refused(
            &disk,
            3,
            DATA_PARTITION_NAME,
            "primary GPT header at LBA 1 has entries failing",
        );

        // Lost after step 2: the MBR's size is set by the next run.
        let mut late = done.clone();
        late[..512].copy_from_slice(&start[..512]);
        std::fs::write(&disk, &late).unwrap();
        let g = grow_partition(&disk, 3, DATA_PARTITION_NAME).unwrap();
        assert!(
            g.changed() && g.mbr_updated && g.old_last == g.new_last,
            "{g:?}"
        );
        assert!(
            g.to_string()
                .contains("already fills the disk; protective MBR"),
            "{g}"
        );
        assert!(std::fs::read(&disk).unwrap() == done);
    }

    /// Asserts `grow_partition` refuses, writing nothing.
    fn refused(disk: &Path, partition: u32, name: &str, want: &str) {
        let before = std::fs::read(disk).unwrap();
        match grow_partition(disk, partition, name) {
            Err(GrowError::Refused(why)) => assert!(why.contains(want), "{why}"),
            other => panic!("not refused ({want}): {other:?}"),
        }
        assert!(std::fs::read(disk).unwrap() == before, "written ({want})");
    }

    /// Rewrites the header at `lba` after `change`, with a correct CRC.
    fn patch_header(disk: &Path, lba: u64, change: impl FnOnce(&mut [u8])) {
        let f = File::options().read(true).write(true).open(disk).unwrap();
        let mut h = vec![0; 512];
        f.read_exact_at(&mut h, lba * S).unwrap();
        change(&mut h);
        h[16..20].fill(0);
        let crc = crc32fast::hash(&h[..92]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        f.write_all_at(&h, lba * S).unwrap();
    }

    #[test]
    fn anything_but_the_image_layout_is_refused_untouched() {
        let d = tempfile::tempdir().unwrap();
        let grown = |extra: &str| {
            let disk = make_disk(d.path(), extra);
            enlarge(&disk, 8 * 2048);
            disk
        };

        let disk = grown(
            "start=24576, size=1000, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"after\"\n",
        );
        refused(&disk, 3, DATA_PARTITION_NAME, "not the last one");

        let disk = grown("");
        refused(&disk, 3, "other", "named \"trustbind-data\", not \"other\"");
        refused(&disk, 2, DATA_PARTITION_NAME, "named \"trustbind-system\"");
        refused(&disk, 4, DATA_PARTITION_NAME, "entry 4 is empty");
        refused(&disk, 129, DATA_PARTITION_NAME, "no entry 129");

        // A primary header failing its CRC.
        let f = File::options().read(true).write(true).open(&disk).unwrap();
        f.write_all_at(&[0xff], S + 40).unwrap();
        refused(
            &disk,
            3,
            DATA_PARTITION_NAME,
            "primary GPT header at LBA 1 fails its CRC32",
        );

        // Entries failing theirs (the backup's).
        let disk = grown("");
        let f = File::options().read(true).write(true).open(&disk).unwrap();
        f.write_all_at(&[0xff], (IMAGE_SECTORS - 33) * S + 100)
            .unwrap();
        refused(
            &disk,
            3,
            DATA_PARTITION_NAME,
            "backup GPT header at LBA 26623 has entries failing",
        );

        // Two valid copies that differ (disk GUID).
        let disk = grown("");
        patch_header(&disk, IMAGE_SECTORS - 1, |h| h[60] ^= 1);
        refused(
            &disk,
            3,
            DATA_PARTITION_NAME,
            "primary and backup GPT differ",
        );

        // A disk smaller than its GPT.
        let disk = make_disk(d.path(), "");
        File::options()
            .write(true)
            .open(&disk)
            .unwrap()
            .set_len((IMAGE_SECTORS - 100) * S)
            .unwrap();
        refused(&disk, 3, DATA_PARTITION_NAME, "smaller than its GPT says");

        // No GPT at all.
        File::create(&disk).unwrap().set_len(8 << 20).unwrap();
        refused(&disk, 3, DATA_PARTITION_NAME, "no GPT signature");
    }

    #[test]
    fn only_an_ext4_file_system_is_resized() {
        match grow_ext4(Path::new("/proc")) {
            Err(GrowError::Refused(why)) => assert!(why.contains("not an ext4"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
