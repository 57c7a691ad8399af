// SPDX-License-Identifier: GPL-2.0
//! Is this file an ELF program *loader* (a dynamic linker such as
//! `ld-linux-x86-64.so.2`)? Decided from the file's content, never from
//! where it lives or what it is called.
//!
//! `ld.so ./prog` maps and runs `./prog` without the kernel ever seeing
//! `./prog` as an exec, so a loader run as the program must be asked as
//! such (`EXEC_LOADER_DIRECT`), wherever a copy of it lives: `cp
//! /lib64/ld-linux-x86-64.so.2 ~/l; ~/l ./evil` must not look like an
//! ordinary approved program. A copy has the same bytes, so the same
//! structure:
//!
//! - an ELF file (either class, either byte order, any machine),
//! - of type `ET_DYN` (position independent),
//! - with no `PT_INTERP` (it is what other programs name there),
//! - and a `PT_DYNAMIC` segment whose entries carry a `DT_SONAME` (it is a
//!   shared object with a name: glibc's `ld-linux*.so.*`, musl's
//!   `ld-musl-*.so.1`, which is its `libc.so`).
//!
//! A static-PIE program has no `PT_INTERP` and a `PT_DYNAMIC`, but no
//! `DT_SONAME`: it is a program, not a loader. A shared library run
//! directly (`/lib/x86_64-linux-gnu/libc.so.6` prints its version) is
//! classified as a loader too, which only means the policy decides on it
//! with `context.loader_direct` and it is never answered from the cache.
//! Changing a copy so that it no longer matches changes its hash: it is
//! then an unknown program.
//!
//! The classifier needs the first bytes of the file, the program headers
//! and the dynamic segment; it reads them through a caller-supplied
//! function (kernel: `kernel_read` on the exec'd file), at most
//! [`MAX_PHDRS_LEN`] and [`MAX_DYNAMIC_LEN`] bytes, into a caller-supplied
//! buffer. It never panics on any input.

/// Bytes of program headers read at most (the kernel's ELF loader refuses
/// more than 64 KiB of them too).
pub const MAX_PHDRS_LEN: usize = 65536;
/// Bytes of the dynamic segment scanned at most for `DT_SONAME`.
pub const MAX_DYNAMIC_LEN: usize = 65536;
/// Size of the scratch buffer [`classify`] needs.
pub const SCRATCH_LEN: usize = 65536;

const ET_DYN: u16 = 3;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_SONAME: u64 = 14;

/// What a file is, as far as loaders are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Not an ELF file (a script, a binfmt_misc format, too short).
    NotElf,
    /// An ELF program (or an ELF file that cannot load others).
    Program,
    /// A dynamic linker (or another named shared object) run as the program.
    Loader,
}

/// Why a file could not be classified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The read function failed (the errno-like value it gave).
    Read(i32),
    /// A header points outside the file or is malformed.
    Malformed,
}

#[derive(Clone, Copy)]
struct Layout {
    is64: bool,
    le: bool,
}

impl Layout {
    fn u16(&self, b: &[u8], at: usize) -> Option<u16> {
        let s: [u8; 2] = b.get(at..at + 2)?.try_into().ok()?;
        Some(if self.le {
            u16::from_le_bytes(s)
        } else {
            u16::from_be_bytes(s)
        })
    }
    fn u32(&self, b: &[u8], at: usize) -> Option<u32> {
        let s: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
        Some(if self.le {
            u32::from_le_bytes(s)
        } else {
            u32::from_be_bytes(s)
        })
    }
    fn u64(&self, b: &[u8], at: usize) -> Option<u64> {
        let s: [u8; 8] = b.get(at..at + 8)?.try_into().ok()?;
        Some(if self.le {
            u64::from_le_bytes(s)
        } else {
            u64::from_be_bytes(s)
        })
    }
    /// A word: 8 bytes in ELF64, 4 in ELF32.
    fn word(&self, b: &[u8], at: usize) -> Option<u64> {
        if self.is64 {
            self.u64(b, at)
        } else {
            self.u32(b, at).map(u64::from)
        }
    }
    fn phdr_size(&self) -> usize {
        if self.is64 {
            56
        } else {
            32
        }
    }
    fn dyn_size(&self) -> usize {
        if self.is64 {
            16
        } else {
            8
        }
    }
}

/// Classifies a file from its first bytes `head` (at least the ELF header,
/// 64 bytes, when the file is that long: the kernel's `bprm->buf`) and
/// `read(offset, buf)`, which fills `buf` from `offset` and returns how
/// many bytes it read (fewer only at the end of the file). `scratch` must
/// hold [`SCRATCH_LEN`] bytes.
pub fn classify(
    head: &[u8],
    scratch: &mut [u8],
    mut read: impl FnMut(u64, &mut [u8]) -> Result<usize, i32>,
) -> Result<Kind, Error> {
    if head.get(..4) != Some(&b"\x7fELF"[..]) {
        return Ok(Kind::NotElf);
    }
    let l = match (head.get(4), head.get(5)) {
        (Some(1), Some(1)) => Layout {
            is64: false,
            le: true,
        },
        (Some(1), Some(2)) => Layout {
            is64: false,
            le: false,
        },
        (Some(2), Some(1)) => Layout {
            is64: true,
            le: true,
        },
        (Some(2), Some(2)) => Layout {
            is64: true,
            le: false,
        },
        _ => return Ok(Kind::NotElf),
    };
    let m = Error::Malformed;
    let e_type = l.u16(head, 16).ok_or(m)?;
    if e_type != ET_DYN {
        return Ok(Kind::Program);
    }
    let (phoff, phentsize, phnum) = if l.is64 {
        (l.u64(head, 32), l.u16(head, 54), l.u16(head, 56))
    } else {
        (
            l.u32(head, 28).map(u64::from),
            l.u16(head, 42),
            l.u16(head, 44),
        )
    };
    let (phoff, phentsize, phnum) = (
        phoff.ok_or(m)?,
        usize::from(phentsize.ok_or(m)?),
        usize::from(phnum.ok_or(m)?),
    );
    if phentsize < l.phdr_size() {
        return Err(m);
    }
    let len = phentsize.checked_mul(phnum).ok_or(m)?;
    if len > MAX_PHDRS_LEN || len > scratch.len() {
        return Err(m);
    }
    let buf = scratch.get_mut(..len).ok_or(m)?;
    if read(phoff, buf).map_err(Error::Read)? != len {
        return Err(m);
    }
    let mut dynamic = None;
    for i in 0..phnum {
        let at = i * phentsize;
        match l.u32(buf, at).ok_or(m)? {
            PT_INTERP => return Ok(Kind::Program),
            PT_DYNAMIC => {
                let (off, filesz) = if l.is64 {
                    (l.u64(buf, at + 8), l.u64(buf, at + 32))
                } else {
                    (
                        l.u32(buf, at + 4).map(u64::from),
                        l.u32(buf, at + 16).map(u64::from),
                    )
                };
                dynamic = Some((off.ok_or(m)?, filesz.ok_or(m)?));
            }
            _ => {}
        }
    }
    let Some((off, filesz)) = dynamic else {
        return Ok(Kind::Program);
    };
    let want = usize::try_from(filesz)
        .unwrap_or(usize::MAX)
        .min(MAX_DYNAMIC_LEN)
        .min(scratch.len());
    let buf = scratch.get_mut(..want).ok_or(m)?;
    let got = read(off, buf).map_err(Error::Read)?;
    let buf = buf.get(..got).ok_or(m)?;
    let step = l.dyn_size();
    let mut at = 0;
    while at + step <= buf.len() {
        match l.word(buf, at).ok_or(m)? {
            DT_NULL => break,
            DT_SONAME => return Ok(Kind::Loader),
            _ => {}
        }
        at += step;
    }
    Ok(Kind::Program)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A minimal ELF image: header, `phdrs` (type, offset, filesz), and
    /// the dynamic entries (tag, value) at offset 0x400.
    fn image(
        is64: bool,
        le: bool,
        e_type: u16,
        phdrs: &[(u32, u64, u64)],
        dynamic: &[(u64, u64)],
    ) -> Vec<u8> {
        let l = Layout { is64, le };
        let mut f = vec![0u8; 0x800];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = if is64 { 2 } else { 1 };
        f[5] = if le { 1 } else { 2 };
        let put16 = |f: &mut Vec<u8>, at: usize, v: u16| {
            let b = if le { v.to_le_bytes() } else { v.to_be_bytes() };
            f[at..at + 2].copy_from_slice(&b);
        };
        let put32 = |f: &mut Vec<u8>, at: usize, v: u32| {
            let b = if le { v.to_le_bytes() } else { v.to_be_bytes() };
            f[at..at + 4].copy_from_slice(&b);
        };
        let put64 = |f: &mut Vec<u8>, at: usize, v: u64| {
            let b = if le { v.to_le_bytes() } else { v.to_be_bytes() };
            f[at..at + 8].copy_from_slice(&b);
        };
        put16(&mut f, 16, e_type);
        let phoff = 0x100usize;
        if is64 {
            put64(&mut f, 32, phoff as u64);
            put16(&mut f, 54, 56);
            put16(&mut f, 56, phdrs.len() as u16);
        } else {
            put32(&mut f, 28, phoff as u32);
            put16(&mut f, 42, 32);
            put16(&mut f, 44, phdrs.len() as u16);
        }
        for (i, &(ty, off, sz)) in phdrs.iter().enumerate() {
            let at = phoff + i * l.phdr_size();
            put32(&mut f, at, ty);
            if is64 {
                put64(&mut f, at + 8, off);
                put64(&mut f, at + 32, sz);
            } else {
                put32(&mut f, at + 4, off as u32);
                put32(&mut f, at + 16, sz as u32);
            }
        }
        for (i, &(tag, val)) in dynamic.iter().enumerate() {
            let at = 0x400 + i * l.dyn_size();
            if is64 {
                put64(&mut f, at, tag);
                put64(&mut f, at + 8, val);
            } else {
                put32(&mut f, at, tag as u32);
                put32(&mut f, at + 4, val as u32);
            }
        }
        f
    }

    fn run(file: &[u8]) -> Result<Kind, Error> {
        let mut scratch = vec![0u8; SCRATCH_LEN];
        let head = &file[..file.len().min(256)];
        classify(head, &mut scratch, |off, buf| {
            let off = usize::try_from(off).map_err(|_| -22)?;
            let src = file.get(off..).unwrap_or(&[]);
            let n = src.len().min(buf.len());
            buf[..n].copy_from_slice(&src[..n]);
            Ok(n)
        })
    }

    const DYN: (u32, u64, u64) = (PT_DYNAMIC, 0x400, 0x100);
    const INTERP: (u32, u64, u64) = (PT_INTERP, 0x300, 0x1c);

    #[test]
    fn loaders_of_every_class_and_byte_order() {
        for is64 in [true, false] {
            for le in [true, false] {
                let ld = image(
                    is64,
                    le,
                    ET_DYN,
                    &[(1, 0, 0x800), DYN],
                    &[(1, 5), (DT_SONAME, 1), (DT_NULL, 0)],
                );
                assert_eq!(run(&ld), Ok(Kind::Loader), "is64 {is64} le {le}");
            }
        }
    }

    #[test]
    fn programs_are_not_loaders() {
        // A PIE program names its loader.
        let pie = image(
            true,
            true,
            ET_DYN,
            &[INTERP, DYN],
            &[(DT_SONAME, 1), (DT_NULL, 0)],
        );
        assert_eq!(run(&pie), Ok(Kind::Program));
        // A static-PIE program: no PT_INTERP, a dynamic segment, no SONAME.
        let spie = image(
            true,
            true,
            ET_DYN,
            &[DYN],
            &[(1, 5), (DT_NULL, 0), (DT_SONAME, 1)],
        );
        assert_eq!(run(&spie), Ok(Kind::Program));
        // A fixed-address executable.
        let exec = image(true, true, 2, &[DYN], &[(DT_SONAME, 1)]);
        assert_eq!(run(&exec), Ok(Kind::Program));
        // No dynamic segment at all.
        let bare = image(false, true, ET_DYN, &[(1, 0, 0x800)], &[]);
        assert_eq!(run(&bare), Ok(Kind::Program));
        assert_eq!(run(b"#!/bin/sh\necho hi\n"), Ok(Kind::NotElf));
        assert_eq!(run(b"\x7fELF"), Ok(Kind::NotElf));
    }

    #[test]
    fn this_machines_loader_is_one() {
        // The real thing, where this test runs on a glibc system.
        for p in ["/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1"] {
            if let Ok(f) = std::fs::read(p) {
                assert_eq!(run(&f), Ok(Kind::Loader), "{p}");
            }
        }
        if let Ok(f) = std::fs::read("/bin/true") {
            assert_eq!(run(&f), Ok(Kind::Program));
        }
    }

    #[test]
    fn headers_outside_the_file_are_malformed() {
        let mut ld = image(true, true, ET_DYN, &[DYN], &[(DT_SONAME, 1)]);
        ld[32..40].copy_from_slice(&0xffff_ffffu64.to_le_bytes());
        assert_eq!(run(&ld), Err(Error::Malformed));
        let mut big = image(true, true, ET_DYN, &[DYN], &[(DT_SONAME, 1)]);
        big[56..58].copy_from_slice(&0xffffu16.to_le_bytes());
        assert_eq!(run(&big), Err(Error::Malformed));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]
        /// Any bytes: no panic, and a file without the magic is never ELF.
        #[test]
        fn never_panics(file in proptest::collection::vec(any::<u8>(), 0..2048), magic in any::<bool>()) {
            let mut file = file;
            if magic && file.len() >= 4 {
                file[..4].copy_from_slice(b"\x7fELF");
            }
            let r = run(&file);
            if file.get(..4) != Some(&b"\x7fELF"[..]) {
                prop_assert_eq!(r, Ok(Kind::NotElf));
            }
        }

        /// Flipping one byte of a loader's headers never panics.
        #[test]
        fn mutated_loader(at in 0usize..0x800, v in any::<u8>()) {
            let mut ld = image(true, true, ET_DYN, &[(1, 0, 0x800), DYN], &[(DT_SONAME, 1), (DT_NULL, 0)]);
            ld[at] = v;
            let _ = run(&ld);
        }
    }
}
