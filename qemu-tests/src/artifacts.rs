//! The build artifacts a VM needs, found through environment variables set
//! by `cargo xtask test`.

use std::path::{Path, PathBuf};

use crate::err::{Error, Result};

/// The kernel, the module and the root filesystem image.
#[derive(Debug, Clone)]
pub struct Artifacts {
    kernel: PathBuf,
    kmod: PathBuf,
    rootfs: PathBuf,
}

impl Artifacts {
    /// Reads `TRUSTBIND_KERNEL` (bzImage), `TRUSTBIND_KMOD` (trustbind.ko)
    /// and `TRUSTBIND_ROOTFS` (ext4 image); each must name an existing file.
    pub fn from_env() -> Result<Artifacts> {
        Ok(Artifacts {
            kernel: var("TRUSTBIND_KERNEL", "guest kernel (bzImage)")?,
            kmod: var("TRUSTBIND_KMOD", "kernel module (trustbind.ko)")?,
            rootfs: var("TRUSTBIND_ROOTFS", "guest root filesystem (rootfs.ext4)")?,
        })
    }

    /// The same artifacts with another guest kernel (e.g. the one of the
    /// Debian kernel package, whose modules the test installs).
    pub fn with_kernel(&self, kernel: impl Into<PathBuf>) -> Artifacts {
        Artifacts {
            kernel: kernel.into(),
            ..self.clone()
        }
    }

    /// The guest kernel image.
    pub fn kernel(&self) -> &Path {
        &self.kernel
    }

    /// The kernel module; every VM gets it at `/tb/trustbind.ko`.
    pub fn kmod(&self) -> &Path {
        &self.kmod
    }

    /// The root filesystem image (opened read-only; writes are discarded).
    pub fn rootfs(&self) -> &Path {
        &self.rootfs
    }
}

pub(crate) fn var(var: &'static str, what: &'static str) -> Result<PathBuf> {
    let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) else {
        return Err(Error::MissingArtifact {
            var,
            what,
            problem: "is not set".into(),
        });
    };
    let p = PathBuf::from(v);
    if !p.is_file() {
        return Err(Error::MissingArtifact {
            var,
            what,
            problem: format!("names a missing file `{}`", p.display()),
        });
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_variable_names_itself_and_the_fix() {
        let e = var("TRUSTBIND_SURELY_UNSET_FOR_TEST", "thing")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`TRUSTBIND_SURELY_UNSET_FOR_TEST` is not set"),
            "{e}"
        );
        assert!(e.contains("run `cargo xtask test`"), "{e}");
    }
}
