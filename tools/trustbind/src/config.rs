//! Where the appliance is and which credentials to present.
//!
//! Precedence, highest first: command-line flags, environment
//! (`TRUSTBIND_URL`, `TRUSTBIND_CERT`, `TRUSTBIND_KEY`, `TRUSTBIND_CA`),
//! the config file (`--config`, `TRUSTBIND_CONFIG`, else
//! `$XDG_CONFIG_HOME/trustbind/config.toml` or
//! `~/.config/trustbind/config.toml`). Relative paths in the file are
//! relative to the file's directory.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{plain_io, CliError, Result};

/// The config file's content.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Admin API base URL, e.g. `https://appliance.example:8443`.
    pub url: Option<String>,
    /// Admin client certificate (PEM).
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
    /// The appliance CA certificate (PEM) the server certificate must chain to.
    pub ca: Option<PathBuf>,
}

/// What flags and environment gave (clap merges the two).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--config` / `TRUSTBIND_CONFIG`.
    pub config: Option<PathBuf>,
    /// `--url` / `TRUSTBIND_URL`.
    pub url: Option<String>,
    /// `--cert` / `TRUSTBIND_CERT`.
    pub cert: Option<PathBuf>,
    /// `--key` / `TRUSTBIND_KEY`.
    pub key: Option<PathBuf>,
    /// `--ca` / `TRUSTBIND_CA`.
    pub ca: Option<PathBuf>,
}

/// Fully resolved connection settings.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Base URL without a trailing slash.
    pub url: String,
    /// Admin certificate file.
    pub cert: PathBuf,
    /// Admin key file.
    pub key: PathBuf,
    /// CA file.
    pub ca: PathBuf,
}

/// The default config file location.
pub fn default_path() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(x).join("trustbind/config.toml"));
    }
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(|h| PathBuf::from(h).join(".config/trustbind/config.toml"))
}

/// Reads and parses a config file.
pub fn read_file(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        CliError::config(format!(
            "cannot read the config file {}: {}",
            path.display(),
            plain_io(&e)
        ))
    })?;
    toml::from_str(&text).map_err(|e| {
        let at = e
            .span()
            .map(|s| {
                let before = text.get(..s.start).unwrap_or("");
                format!(" line {}", before.matches('\n').count().saturating_add(1))
            })
            .unwrap_or_default();
        CliError::config(format!(
            "the config file {}{at} is not valid: {}",
            path.display(),
            e.message()
        ))
    })
}

/// Combines flags, environment and the config file.
pub fn resolve(o: &Overrides) -> Result<Resolved> {
    // An explicitly named config file must exist; the default one may not.
    let (file, fc) = match &o.config {
        Some(p) => (Some(p.clone()), read_file(p)?),
        None => match default_path() {
            Some(p) if p.exists() => {
                let fc = read_file(&p)?;
                (Some(p), fc)
            }
            _ => (None, FileConfig::default()),
        },
    };
    let base = file
        .as_deref()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let rel = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
    let where_ = |flag: &str, env: &str, key: &str| {
        let f = file.as_ref().map_or_else(
            || {
                default_path()
                    .map_or_else(|| "the config file".to_owned(), |p| p.display().to_string())
            },
            |p| p.display().to_string(),
        );
        format!("set --{flag}, {env}, or `{key}` in {f}")
    };
    let url = o.url.clone().or(fc.url).ok_or_else(|| {
        CliError::config(format!(
            "no appliance URL is configured; {}",
            where_("url", "TRUSTBIND_URL", "url")
        ))
    })?;
    let url = url.trim_end_matches('/').to_owned();
    if !url.starts_with("https://") {
        return Err(CliError::config(format!(
            "the appliance URL `{url}` must start with https:// (the admin API only speaks TLS)"
        )));
    }
    let cert = o.cert.clone().or(fc.cert.map(rel)).ok_or_else(|| {
        CliError::config(format!(
            "no admin certificate is configured; {}",
            where_("cert", "TRUSTBIND_CERT", "cert")
        ))
    })?;
    let key = o.key.clone().or(fc.key.map(rel)).ok_or_else(|| {
        CliError::config(format!(
            "no admin key is configured; {}",
            where_("key", "TRUSTBIND_KEY", "key")
        ))
    })?;
    let ca = o.ca.clone().or(fc.ca.map(rel)).ok_or_else(|| {
        CliError::config(format!(
            "no appliance CA certificate is configured; {}",
            where_("ca", "TRUSTBIND_CA", "ca")
        ))
    })?;
    Ok(Resolved { url, cert, key, ca })
}
