//! `trustbind sig add`: walk paths, hash executables (SHA-256 and SHA-1 in
//! one read), send them in batches.

use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};
use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::client::Client;
use crate::error::{io_err, CliError, Exit, Result};
use crate::out::Out;
use trustbind_api::inventory::Program;

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
    let sent: Vec<(&Hashed, Option<&str>)> = w.files.iter().map(|h| (h, None)).collect();
    let u = upload(c, &sent, group, source)?;
    let files: Vec<Value> = w
        .files
        .iter()
        .map(|h| json!({ "path": h.path.display().to_string(), "sha256": h.sha256, "sha1": h.sha1, "size": h.size }))
        .collect();
    let mut v = u.json(group);
    v.insert("hashed".into(), json!(w.files.len()));
    v.insert("skipped_non_executable".into(), json!(w.skipped_non_exec));
    v.insert("skipped_other".into(), json!(w.skipped_other));
    v.insert("files".into(), json!(files));
    let v = Value::Object(v);
    out.emit(&v, || {
        format!(
            "hashed {} executable(s); skipped {} non-executable file(s) and {} link(s)/special file(s)\n{}",
            w.files.len(),
            w.skipped_non_exec,
            w.skipped_other,
            u.line(group)
        )
    });
    Ok(0)
}

/// What the appliance said of the batches of one `sig add`.
#[derive(Debug, Default)]
struct Uploaded {
    inserted: u64,
    updated: u64,
    unchanged: u64,
    added: u64,
}

impl Uploaded {
    fn json(&self, group: &str) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("group".into(), json!(group));
        m.insert("inserted".into(), json!(self.inserted));
        m.insert("updated".into(), json!(self.updated));
        m.insert("unchanged".into(), json!(self.unchanged));
        m.insert("added_to_group".into(), json!(self.added));
        m
    }

    fn line(&self, group: &str) -> String {
        format!(
            "{} new, {} updated, {} unchanged; {} added to group {group}\n",
            self.inserted, self.updated, self.unchanged, self.added
        )
    }
}

/// Sends `files` to `group` (created when missing) in batches; each with
/// its own source, or `source`.
fn upload(
    c: &Client,
    files: &[(&Hashed, Option<&str>)],
    group: &str,
    source: &str,
) -> Result<Uploaded> {
    // The group is created when missing so that a first `sig add` just works.
    c.post("/v1/groups", &json!({ "name": group, "description": "" }))?;
    let mut u = Uploaded::default();
    for chunk in files.chunks(BATCH) {
        let sigs: Vec<Value> = chunk
            .iter()
            .map(|(h, src)| {
                let mut s = Map::new();
                s.insert("sha256".into(), json!(h.sha256));
                s.insert("sha1".into(), json!(h.sha1));
                s.insert("size".into(), json!(h.size));
                s.insert("name".into(), json!(h.path.display().to_string()));
                if let Some(src) = src {
                    s.insert("source".into(), json!(src));
                }
                Value::Object(s)
            })
            .collect();
        let v = c.post(
            "/v1/signatures",
            &json!({ "signatures": sigs, "group": group, "source": source }),
        )?;
        let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        u.inserted += n("inserted");
        u.updated += n("updated");
        u.unchanged += n("unchanged");
        u.added += n("added_to_group");
    }
    Ok(u)
}

/// Reads a package inventory (`trustbind-agent inventory`; `-` is standard
/// input): its programs in order, or the first bad line named.
pub fn read_inventory(file: &Path) -> Result<Vec<Program>> {
    let text = if file == Path::new("-") {
        let mut t = String::new();
        std::io::stdin()
            .read_to_string(&mut t)
            .map_err(|e| io_err("read", file, &e))?;
        t
    } else {
        std::fs::read_to_string(file).map_err(|e| io_err("read", file, &e))?
    };
    parse_inventory(&text, file)
}

fn parse_inventory(text: &str, file: &Path) -> Result<Vec<Program>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let p: Program = serde_json::from_str(line).map_err(|e| {
            CliError::new(
                Exit::Usage,
                format!(
                    "{}:{}: not an inventory line (trustbind-agent inventory): {e}",
                    file.display(),
                    i + 1
                ),
            )
        })?;
        if !Path::new(&p.path).is_absolute() {
            return Err(CliError::new(
                Exit::Usage,
                format!(
                    "{}:{}: path `{}` is not absolute",
                    file.display(),
                    i + 1,
                    p.path
                ),
            ));
        }
        out.push(p);
    }
    Ok(out)
}

/// `trustbind sig add --inventory FILE --group G`: hashes the programs the
/// inventory names, here, and adds them with `dpkg:PACKAGE=VERSION` as
/// their source. A program that is gone or unreadable is skipped and
/// named (the inventory may be older than the host).
pub fn add_inventory(c: &Client, file: &Path, group: &str, out: &Out) -> Result<u8> {
    let programs = read_inventory(file)?;
    let mut hashed = Vec::new();
    let mut skipped = Vec::new();
    for p in &programs {
        match hash_file(Path::new(&p.path)) {
            Ok(h) => hashed.push((h, p.source())),
            Err(e) => skipped.push((p, e.to_string())),
        }
    }
    let sent: Vec<(&Hashed, Option<&str>)> =
        hashed.iter().map(|(h, s)| (h, Some(s.as_str()))).collect();
    let u = upload(c, &sent, group, "trustbind sig add --inventory")?;
    let packages: std::collections::BTreeSet<&str> =
        programs.iter().map(|p| p.package.as_str()).collect();
    let mut v = u.json(group);
    v.insert("programs".into(), json!(programs.len()));
    v.insert("packages".into(), json!(packages.len()));
    v.insert("hashed".into(), json!(hashed.len()));
    let skipped_json: Vec<Value> = skipped
        .iter()
        .map(|(p, e)| json!({ "path": p.path, "package": p.package, "error": e }))
        .collect();
    v.insert("skipped".into(), json!(skipped_json));
    let v = Value::Object(v);
    out.emit(&v, || {
        let mut s = format!(
            "hashed {} of {} program(s) from {} package(s)\n{}",
            hashed.len(),
            programs.len(),
            packages.len(),
            u.line(group)
        );
        for (p, e) in &skipped {
            s.push_str(&format!("skipped {} ({}): {e}\n", p.path, p.package));
        }
        s
    });
    Ok(0)
}

#[cfg(test)]
mod inventory_tests {
    use super::*;

    #[test]
    fn inventory_lines_are_read_and_bad_ones_named() {
        let f = Path::new("inv.jsonl");
        let ok = "{\"path\":\"/usr/bin/ls\",\"package\":\"coreutils\",\"version\":\"9.1-1\"}\n\n";
        let p = parse_inventory(ok, f).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].source(), "dpkg:coreutils=9.1-1");
        let bad = format!("{ok}{{\"path\":\"/usr/bin/x\"}}\n");
        let e = parse_inventory(&bad, f).unwrap_err();
        assert!(
            e.message.starts_with("inv.jsonl:3: not an inventory line"),
            "{}",
            e.message
        );
        let rel = "{\"path\":\"bin/x\",\"package\":\"p\",\"version\":\"\"}";
        let e = parse_inventory(rel, f).unwrap_err();
        assert!(
            e.message
                .contains("inv.jsonl:1: path `bin/x` is not absolute"),
            "{}",
            e.message
        );
    }
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
