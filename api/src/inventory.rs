//! A host's package inventory: the programs its Debian packages installed,
//! one JSON object a line. `trustbind-agent inventory` writes it from
//! dpkg's database on a reference host; `trustbind sig add --inventory`
//! hashes the programs it names (on the same host) and adds them to a
//! group with their package and version, so a golden host seeds a group
//! in one pipeline:
//!
//! ```text
//! trustbind-agent inventory | trustbind sig add --inventory - --group debian-web
//! ```

use serde::{Deserialize, Serialize};

/// One program of the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Program {
    /// Its canonical absolute path (as the kernel names it when it runs).
    pub path: String,
    /// The Debian package that installed it.
    pub package: String,
    /// That package's installed version (empty if dpkg's status does not
    /// say).
    pub version: String,
}

impl Program {
    /// The `source` a signature of this program is stored with:
    /// `dpkg:PACKAGE=VERSION` (`dpkg:PACKAGE` without a version).
    pub fn source(&self) -> String {
        if self.version.is_empty() {
            format!("dpkg:{}", self.package)
        } else {
            format!("dpkg:{}={}", self.package, self.version)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_name_package_and_version() {
        let p = |version: &str| Program {
            path: "/usr/bin/ls".into(),
            package: "coreutils".into(),
            version: version.into(),
        };
        assert_eq!(p("9.1-1").source(), "dpkg:coreutils=9.1-1");
        assert_eq!(p("").source(), "dpkg:coreutils");
    }
}
