//! `trustbind sig add`: walk paths, hash executables (SHA-256 and SHA-1 in
//! one read), send them in batches.

use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::client::Client;
use crate::error::{io_err, Result};
use crate::out::Out;

/// Signatures per request.
const BATCH: usize = 1000;

/// One hashed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hashed {
    /// Path as found.
    pub path: PathBuf,
    /// Lower-case hex SHA-256.
    pub sha256: String,
    /// Lower-case hex SHA-1.
    pub sha1: String,
    /// Bytes.
    pub size: u64,
}

/// What a walk found.
#[derive(Debug, Default)]
pub struct Walk {
    /// Executables, hashed.
    pub files: Vec<Hashed>,
    /// Regular files without an execute bit.
    pub skipped_non_exec: u64,
    /// Symbolic links, devices, sockets, FIFOs.
    pub skipped_other: u64,
}

/// Hashes a file with SHA-256 and SHA-1 in one pass.
pub fn hash_file(path: &Path) -> Result<Hashed> {
    let mut f = std::fs::File::open(path).map_err(|e| io_err("open", path, &e))?;
    let mut s256 = Sha256::new();
    let mut s1 = Sha1::new();
    let mut buf = vec![0_u8; 256 * 1024];
    let mut size = 0_u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| io_err("read", path, &e))?;
        if n == 0 {
            break;
        }
        let chunk = buf.get(..n).unwrap_or(&[]);
        s256.update(chunk);
        s1.update(chunk);
        size += n as u64;
    }
    Ok(Hashed {
        path: path.to_path_buf(),
        sha256: hex::encode(s256.finalize()),
        sha1: hex::encode(s1.finalize()),
        size,
    })
}

/// Walks `paths` recursively without following symbolic links. A file
/// named in `paths` is taken whatever its mode (the administrator named
/// it); files found in directories are taken only if executable.
pub fn walk(paths: &[PathBuf]) -> Result<Walk> {
    let mut w = Walk::default();
    let mut stack: Vec<(PathBuf, bool)> = paths.iter().rev().map(|p| (p.clone(), true)).collect();
    while let Some((p, named)) = stack.pop() {
        let md = std::fs::symlink_metadata(&p).map_err(|e| io_err("inspect", &p, &e))?;
        let ft = md.file_type();
        if ft.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(&p)
                .map_err(|e| io_err("list", &p, &e))?
                .map(|e| e.map(|e| e.path()))
                .collect::<std::io::Result<_>>()
                .map_err(|e| io_err("list", &p, &e))?;
            entries.sort();
            stack.extend(entries.into_iter().rev().map(|e| (e, false)));
        } else if ft.is_file() {
            if named || md.permissions().mode() & 0o111 != 0 {
                w.files.push(hash_file(&p)?);
            } else {
                w.skipped_non_exec += 1;
            }
        } else {
            w.skipped_other += 1;
        }
    }
    Ok(w)
}

#[cfg(test)]
mod walk_tests {
    use super::*;

    #[test]
    fn named_files_are_taken_whatever_their_mode() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let plain = d.path().join("plain");
        let exe = d.path().join("exe");
        std::fs::write(&plain, b"a").unwrap();
        std::fs::write(&exe, b"b").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        // In a directory: only the executable.
        let w = walk(&[d.path().to_path_buf()]).unwrap();
        assert_eq!(w.files.len(), 1);
        assert_eq!(w.skipped_non_exec, 1);
        // Named: taken.
        let w = walk(std::slice::from_ref(&plain)).unwrap();
        assert_eq!(w.files.len(), 1);
        assert_eq!(w.files[0].path, plain);
    }
}

/// `trustbind sig add PATH... --group G`.
pub fn add(c: &Client, paths: &[PathBuf], group: &str, source: &str, out: &Out) -> Result<u8> {
    let w = walk(paths)?;
    // The group is created when missing so that a first `sig add` just works.
    c.post("/v1/groups", &json!({ "name": group, "description": "" }))?;
    let (mut inserted, mut updated, mut unchanged, mut added) = (0, 0, 0, 0);
    for chunk in w.files.chunks(BATCH) {
        let sigs: Vec<Value> = chunk
            .iter()
            .map(|h| {
                json!({
                    "sha256": h.sha256,
                    "sha1": h.sha1,
                    "size": h.size,
                    "name": h.path.display().to_string(),
                })
            })
            .collect();
        let v = c.post(
            "/v1/signatures",
            &json!({ "signatures": sigs, "group": group, "source": source }),
        )?;
        let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        inserted += n("inserted");
        updated += n("updated");
        unchanged += n("unchanged");
        added += n("added_to_group");
    }
    let files: Vec<Value> = w
        .files
        .iter()
        .map(|h| json!({ "path": h.path.display().to_string(), "sha256": h.sha256, "sha1": h.sha1, "size": h.size }))
        .collect();
    let v = json!({
        "group": group,
        "hashed": w.files.len(),
        "skipped_non_executable": w.skipped_non_exec,
        "skipped_other": w.skipped_other,
        "inserted": inserted,
        "updated": updated,
        "unchanged": unchanged,
        "added_to_group": added,
        "files": files,
    });
    out.emit(&v, || {
        format!(
            "hashed {} executable(s); skipped {} non-executable file(s) and {} link(s)/special file(s)\n\
             {inserted} new, {updated} updated, {unchanged} unchanged; {added} added to group {group}\n",
            w.files.len(),
            w.skipped_non_exec,
            w.skipped_other
        )
    });
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        let h = hash_file(&p).unwrap();
        assert_eq!(
            h.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(h.sha1, "a9993e364706816aba3e25717850c26c9cd0d89d");
        assert_eq!(h.size, 3);
    }
}
