//! `trustbind admin enrol`: a one-time admin token and a CSR traded for an
//! admin certificate on the appliance's enrol port, with the CA pinned by
//! fingerprint during the handshake (`trustbind_api::pinned`, the same code
//! `trustbind-agent enrol` uses).

use std::path::{Path, PathBuf};

use serde_json::json;
use trustbind_api::pb::enrolment_client::EnrolmentClient;
use trustbind_api::pb::EnrolAdminRequest;
use trustbind_api::pinned::{self, PinError};
use trustbind_policy::cert;

use crate::cli::AdminCmd;
use crate::config::{self, Overrides};
use crate::error::{CliError, Exit, Result};
use crate::out::Out;

/// Credential files written into the output directory.
pub const CA_FILE: &str = "ca.pem";
/// The admin certificate.
pub const CERT_FILE: &str = "admin.pem";
/// The admin key (mode 0600).
pub const KEY_FILE: &str = "admin.key";
/// The config file written next to them when absent.
pub const CONFIG_FILE: &str = "config.toml";

fn pin_err(e: PinError) -> CliError {
    match e {
        PinError::Config(m) => CliError::config(m),
        e @ PinError::Connect { .. } => CliError::new(Exit::Connect, e.to_string()),
    }
}

/// Runs `trustbind admin ...`.
pub fn run(cmd: AdminCmd, ov: &Overrides, out: &Out) -> Result<u8> {
    let AdminCmd::Enrol {
        appliance,
        ca_fingerprint,
        token,
        name,
        out: dir,
        server_name,
        admin_port,
    } = cmd
    else {
        return Err(CliError::config("not an enrolment command"));
    };
    let pin = pinned::normalise_fingerprint(&ca_fingerprint).map_err(pin_err)?;
    let (enrol_addr, host) = pinned::split_addr(&appliance, pinned::ENROL_PORT);
    let server_name = server_name.unwrap_or_else(|| host.clone());
    // The default place is where `trustbind` looks for its config file.
    let default_dir = ov
        .config
        .as_deref()
        .map(Path::to_path_buf)
        .or_else(config::default_path)
        .and_then(|p| p.parent().map(Path::to_path_buf));
    let dir: PathBuf = dir.or(default_dir).ok_or_else(|| {
        CliError::config("no --out DIR given and no home directory to default to")
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::new(Exit::Io, format!("cannot start the runtime: {e}")))?;
    let (key_pem, csr) =
        pinned::key_and_csr(name.as_deref().unwrap_or("admin")).map_err(pin_err)?;
    let reply = rt.block_on(async {
        // The handshake (and the pin check) happens here, before the token
        // is sent anywhere.
        let ch = pinned::channel(
            &enrol_addr,
            &server_name,
            pinned::pinned_config(&pin).map_err(pin_err)?,
        )
        .await
        .map_err(pin_err)?;
        EnrolmentClient::new(ch)
            .enrol_admin(EnrolAdminRequest {
                name: name.clone().unwrap_or_default(),
                token,
                csr_pem: csr,
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| {
                let exit = match s.code() {
                    tonic::Code::Unavailable | tonic::Code::Internal | tonic::Code::Unknown => {
                        Exit::Server
                    }
                    _ => Exit::Refused,
                };
                CliError::new(exit, format!("the appliance refused: {}", s.message()))
            })
    })?;
    pinned::check_reply_ca(&reply.ca_pem, &pin)
        .map_err(|m| CliError::new(Exit::Server, format!("the appliance answered: {m}")))?;
    let cn = rustls::pki_types::pem::PemObject::from_pem_slice(reply.cert_pem.as_bytes())
        .ok()
        .and_then(|der: rustls::pki_types::CertificateDer<'_>| cert::peer_cert(der.as_ref()))
        .filter(|p| p.kind == cert::CertKind::Admin)
        .ok_or_else(|| {
            CliError::new(
                Exit::Server,
                "the appliance answered with something that is not an admin certificate",
            )
        })?;
    write_files(&dir, &reply.ca_pem, &reply.cert_pem, &key_pem)?;
    let url = format!("https://{}", join_host_port(&host, admin_port));
    let cfg_path = dir.join(CONFIG_FILE);
    let wrote_config = if cfg_path.exists() {
        false
    } else {
        let text = format!(
            "url  = \"{url}\"\ncert = \"{CERT_FILE}\"\nkey  = \"{KEY_FILE}\"\nca   = \"{CA_FILE}\"\n"
        );
        write(&cfg_path, text.as_bytes(), false)?;
        true
    };
    let is_default = config::default_path().is_some_and(|p| p == cfg_path);
    let use_it = if is_default {
        "trustbind status".to_owned()
    } else {
        format!("trustbind --config {} status", cfg_path.display())
    };
    let v = json!({
        "name": cn.name,
        "serial": cn.serial,
        "dir": dir,
        "files": [CA_FILE, CERT_FILE, KEY_FILE],
        "config": cfg_path,
        "config_written": wrote_config,
        "url": url,
    });
    out.emit(&v, || {
        let cfg_line = if wrote_config {
            format!("config {} (url = {url})\n", cfg_path.display())
        } else {
            format!(
                "config {} already exists and was left as is; it must say\n  url = \"{url}\", cert = \"{CERT_FILE}\", key = \"{KEY_FILE}\", ca = \"{CA_FILE}\"\n",
                cfg_path.display()
            )
        };
        format!(
            "admin certificate for `{}` (serial {}) written to {}: {CERT_FILE}, {KEY_FILE} (private), {CA_FILE}\n{cfg_line}try: {use_it}\n",
            cn.name,
            cn.serial,
            dir.display()
        )
    });
    Ok(0)
}

/// `host:port`, bracketing IPv6 addresses.
fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn write(path: &Path, data: &[u8], private: bool) -> Result<()> {
    pinned::write_atomic(path, data, private)
        .map_err(|e| CliError::io(format!("cannot write {}: {e}", path.display())))
}

/// Writes the three credential files, each atomically (temporary file,
/// fsync, rename), the key with mode 0600 from its creation.
fn write_files(dir: &Path, ca: &str, cert: &str, key: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| crate::error::io_err("create", dir, &e))?;
    write(&dir.join(CA_FILE), ca.as_bytes(), false)?;
    write(&dir.join(KEY_FILE), key.as_bytes(), true)?;
    write(&dir.join(CERT_FILE), cert.as_bytes(), false)?;
    Ok(())
}
