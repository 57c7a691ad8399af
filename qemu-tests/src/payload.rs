//! The per-VM payload disk: an ext4 image made with `mke2fs -d`, mounted
//! read-only at `/tb` in the guest.

use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use crate::err::{Error, Result};

/// The guest's init script (runs as `/tb/init`).
const INIT: &str = include_str!("../guest/init");
/// The guest's command loop (runs as `/tb/loop`).
const LOOP: &str = include_str!("../guest/loop");

enum Source {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

/// Files a test puts under `/tb`. The harness adds its own when it builds
/// the disk: `/tb/init`, `/tb/loop` and the module at `/tb/trustbind.ko`
/// (those win over a test's file of the same name).
#[derive(Default)]
pub(crate) struct Payload {
    files: Vec<(PathBuf, Source, u32)>,
}

impl Payload {
    /// An empty payload.
    pub(crate) fn new() -> Payload {
        Payload::default()
    }

    /// Copies the host file `host` to `/tb/<guest>` with `mode`.
    pub(crate) fn add_file(&mut self, guest: impl AsRef<Path>, host: impl AsRef<Path>, mode: u32) {
        self.files.push((
            guest.as_ref().to_owned(),
            Source::Host(host.as_ref().to_owned()),
            mode,
        ));
    }

    /// Writes `data` to `/tb/<guest>` with `mode`.
    pub(crate) fn add_bytes(&mut self, guest: impl AsRef<Path>, data: Vec<u8>, mode: u32) {
        self.files
            .push((guest.as_ref().to_owned(), Source::Bytes(data), mode));
    }

    /// Builds the image at `img` from a staging directory `stage`.
    pub(crate) fn build(&self, stage: &Path, img: &Path, kmod: &Path) -> Result<()> {
        let harness = [
            (
                PathBuf::from("init"),
                Source::Bytes(INIT.as_bytes().to_vec()),
                0o755,
            ),
            (
                PathBuf::from("loop"),
                Source::Bytes(LOOP.as_bytes().to_vec()),
                0o644,
            ),
            (
                PathBuf::from("trustbind.ko"),
                Source::Host(kmod.to_owned()),
                0o644,
            ),
        ];
        let mut total = 0u64;
        for (guest, src, mode) in self.files.iter().chain(harness.iter()) {
            if guest.is_absolute()
                || guest
                    .components()
                    .any(|c| !matches!(c, Component::Normal(_)))
            {
                return Err(Error::Usage(format!(
                    "payload path `{}` must be relative, below /tb, without `..`",
                    guest.display()
                )));
            }
            let dst = stage.join(guest);
            if let Some(dir) = dst.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(Error::io(format!("payload: create {}", dir.display())))?;
            }
            match src {
                Source::Host(h) => {
                    std::fs::copy(h, &dst).map_err(Error::io(format!(
                        "payload: copy {} to {}",
                        h.display(),
                        dst.display()
                    )))?;
                }
                Source::Bytes(b) => std::fs::write(&dst, b)
                    .map_err(Error::io(format!("payload: write {}", dst.display())))?,
            }
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(*mode))
                .map_err(Error::io(format!("payload: chmod {}", dst.display())))?;
            total += std::fs::metadata(&dst).map(|m| m.len()).unwrap_or(0);
        }
        let mib = total / (1 << 20) * 2 + 16;
        crate::host_run(
            "payload: mke2fs",
            Command::new("mke2fs")
                .args(["-q", "-F", "-t", "ext4", "-L", "tb-payload", "-d"])
                .arg(stage)
                .arg(img)
                .arg(format!("{mib}M")),
        )?;
        Ok(())
    }
}
