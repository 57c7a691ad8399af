//! Protected file sets (`crate::files`): listing and changes.
//!
//! Every change that alters a set's paths (or creates or deletes a set) is
//! one transaction with its audit row and moves the data version and the
//! verdict generation exactly once (a file's set membership is part of
//! every file verdict); a change that alters nothing writes nothing.

use std::collections::BTreeSet;

use rusqlite::{params, Connection, OptionalExtension};

use super::{bump_data, now_ms, AuditEvent, Store, StoreError};
use crate::files::{check_path, FileSet, MAX_FILE_SETS, MAX_FILE_SET_PATHS};
use trustbind_proto::MAX_FILE_SET_PATH_BYTES;

/// How [`Store::edit_file_set`] changes a set's paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileSetEdit {
    /// Adds the paths (creates the set when missing).
    Add,
    /// Removes the paths (the set stays, possibly empty).
    Remove,
    /// Replaces the set's paths (creates the set when missing).
    Replace,
}

impl FileSetEdit {
    fn audit_kind(self) -> &'static str {
        match self {
            Self::Add => "fileset.add",
            Self::Remove => "fileset.remove",
            Self::Replace => "fileset.set",
        }
    }
}

/// What an edit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSetChange {
    /// The set afterwards.
    pub set: FileSet,
    /// Paths added.
    pub added: Vec<String>,
    /// Paths removed.
    pub removed: Vec<String>,
    /// Whether the set was created by this edit.
    pub created: bool,
}

/// Every file set with its paths, by name (paths sorted).
pub(super) fn read_file_sets(conn: &Connection) -> Result<Vec<FileSet>, StoreError> {
    let mut sets: Vec<FileSet> = Vec::new();
    let mut stmt = conn.prepare_cached("SELECT name FROM file_sets ORDER BY name")?;
    for name in stmt.query_map([], |r| r.get::<_, String>(0))? {
        sets.push(FileSet {
            name: name?,
            paths: Vec::new(),
        });
    }
    let mut stmt =
        conn.prepare_cached("SELECT set_name, path FROM file_set_paths ORDER BY set_name, path")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    for row in rows {
        let (name, path) = row?;
        let i = sets.binary_search_by(|s| s.name.as_str().cmp(&name));
        if let Some(s) = i.ok().and_then(|i| sets.get_mut(i)) {
            s.paths.push(path);
        }
    }
    Ok(sets)
}

fn set_paths(conn: &Connection, name: &str) -> Result<Option<BTreeSet<String>>, StoreError> {
    let exists = conn
        .query_row(
            "SELECT 1 FROM file_sets WHERE name = ?1",
            [name],
            |_| Ok(()),
        )
        .optional()?
        .is_some();
    if !exists {
        return Ok(None);
    }
    let mut stmt = conn.prepare_cached("SELECT path FROM file_set_paths WHERE set_name = ?1")?;
    let rows = stmt.query_map([name], |r| r.get::<_, String>(0))?;
    Ok(Some(rows.collect::<Result<_, _>>()?))
}

fn invalid(what: &'static str, why: String) -> StoreError {
    StoreError::Invalid { what, why }
}

impl Store {
    /// Every file set with its paths, by name.
    pub fn file_sets(&self) -> Result<Vec<FileSet>, StoreError> {
        let conn = self.read()?;
        read_file_sets(&conn)
    }

    /// One file set, if it exists.
    pub fn file_set(&self, name: &str) -> Result<Option<FileSet>, StoreError> {
        let conn = self.read()?;
        Ok(set_paths(&conn, name)?.map(|paths| FileSet {
            name: name.to_owned(),
            paths: paths.into_iter().collect(),
        }))
    }

    /// Adds, removes or replaces paths of the file set `name`, audited as
    /// `actor`. Each path must be absolute and normalised
    /// ([`check_path`]); all sets together hold at most
    /// [`MAX_FILE_SET_PATHS`] paths, and there are at most
    /// [`MAX_FILE_SETS`] sets. Removing from a set that does not exist is
    /// `NotFound`. Moves the generation once when the paths changed.
    pub fn edit_file_set(
        &self,
        name: &str,
        edit: FileSetEdit,
        paths: &[String],
        actor: &str,
    ) -> Result<FileSetChange, StoreError> {
        if name.is_empty() {
            return Err(invalid("file set name", "empty".into()));
        }
        for p in paths {
            check_path(p).map_err(|e| invalid("file set path", e.to_string()))?;
        }
        let given: BTreeSet<String> = paths.iter().cloned().collect();
        self.write(|tx| {
            let old = set_paths(tx, name)?;
            let created = old.is_none() && edit != FileSetEdit::Remove;
            let old = match (old, edit) {
                (Some(o), _) => o,
                (None, FileSetEdit::Remove) => {
                    return Err(StoreError::NotFound {
                        what: "file set",
                        key: name.into(),
                    })
                }
                (None, _) => BTreeSet::new(),
            };
            let new: BTreeSet<String> = match edit {
                FileSetEdit::Add => old.union(&given).cloned().collect(),
                FileSetEdit::Remove => old.difference(&given).cloned().collect(),
                FileSetEdit::Replace => given.clone(),
            };
            let added: Vec<String> = new.difference(&old).cloned().collect();
            let removed: Vec<String> = old.difference(&new).cloned().collect();
            let set = FileSet {
                name: name.to_owned(),
                paths: new.iter().cloned().collect(),
            };
            if !created && added.is_empty() && removed.is_empty() {
                return Ok((
                    FileSetChange {
                        set,
                        added,
                        removed,
                        created,
                    },
                    None,
                ));
            }
            if created {
                let sets: i64 = tx.query_row("SELECT count(*) FROM file_sets", [], |r| r.get(0))?;
                if usize::try_from(sets).unwrap_or(usize::MAX) >= MAX_FILE_SETS {
                    return Err(StoreError::Conflict(format!(
                        "there are already {sets} file sets, at most {MAX_FILE_SETS}"
                    )));
                }
                tx.execute(
                    "INSERT INTO file_sets (name, changed_ms) VALUES (?1, ?2)",
                    params![name, now_ms()],
                )?;
            } else {
                tx.execute(
                    "UPDATE file_sets SET changed_ms = ?2 WHERE name = ?1",
                    params![name, now_ms()],
                )?;
            }
            let total: i64 = tx.query_row("SELECT count(*) FROM file_set_paths", [], |r| r.get(0))?;
            let total = usize::try_from(total).unwrap_or(usize::MAX) + added.len() - removed.len();
            if total > MAX_FILE_SET_PATHS {
                return Err(StoreError::Conflict(format!(
                    "file sets would hold {total} paths in all, at most {MAX_FILE_SET_PATHS} (the kernel module resolves each to a file identity and takes a bounded number)"
                )));
            }
            for p in &removed {
                tx.execute(
                    "DELETE FROM file_set_paths WHERE set_name = ?1 AND path = ?2",
                    params![name, p],
                )?;
            }
            for p in &added {
                tx.execute(
                    "INSERT INTO file_set_paths (set_name, path) VALUES (?1, ?2)",
                    params![name, p],
                )?;
            }
            // The module gets the paths as one sealed record (T-102).
            let bytes: i64 = tx.query_row(
                "SELECT coalesce(sum(length(CAST(path AS BLOB)) + 1), 0) \
                 FROM (SELECT DISTINCT path FROM file_set_paths)",
                [],
                |r| r.get(0),
            )?;
            if usize::try_from(bytes).unwrap_or(usize::MAX) > MAX_FILE_SET_PATH_BYTES {
                return Err(StoreError::Conflict(format!(
                    "file sets would hold {bytes} bytes of paths in all, at most {MAX_FILE_SET_PATH_BYTES} (the module gets them in one sealed record); name fewer, higher directories"
                )));
            }
            bump_data(tx)?;
            let ev = AuditEvent::new(
                edit.audit_kind(),
                actor,
                serde_json::json!({
                    "set": name, "created": created, "added": added, "removed": removed,
                }),
            );
            Ok((
                FileSetChange {
                    set,
                    added,
                    removed,
                    created,
                },
                Some(ev),
            ))
        })
    }

    /// Deletes the file set `name` with its paths, audited as `actor`;
    /// returns the paths it held. Moves the generation.
    pub fn delete_file_set(&self, name: &str, actor: &str) -> Result<Vec<String>, StoreError> {
        self.write(|tx| {
            let Some(paths) = set_paths(tx, name)? else {
                return Err(StoreError::NotFound {
                    what: "file set",
                    key: name.into(),
                });
            };
            tx.execute("DELETE FROM file_sets WHERE name = ?1", [name])?;
            bump_data(tx)?;
            let paths: Vec<String> = paths.into_iter().collect();
            let ev = AuditEvent::new(
                "fileset.delete",
                actor,
                serde_json::json!({ "set": name, "paths": paths }),
            );
            Ok((paths, Some(ev)))
        })
    }
}
