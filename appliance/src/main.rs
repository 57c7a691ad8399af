//! `trustbind-appliance`: the appliance daemon.
//!
//! Only the store is built so far, so this binary offers the offline
//! maintenance commands on the data directory:
//!
//! ```text
//! trustbind-appliance [--data-dir DIR] init          create or migrate the database
//! trustbind-appliance [--data-dir DIR] audit verify  check the audit hash chain
//! trustbind-appliance [--data-dir DIR] audit export  write the audit log as JSON lines
//! ```
//!
//! Exit codes: 0 success, 1 failure, 2 the audit chain is broken, 64 usage.

use std::path::PathBuf;
use std::process::ExitCode;

use trustbind_appliance::store::Store;

/// Default data directory.
const DEFAULT_DATA_DIR: &str = "/var/lib/trustbind";
/// Database file name inside the data directory.
const DB_FILE: &str = "appliance.db";

const EXIT_FAILED: u8 = 1;
const EXIT_CHAIN_BROKEN: u8 = 2;
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut data_dir = PathBuf::from(
        std::env::var("TRUSTBIND_DATA_DIR").unwrap_or_else(|_| DEFAULT_DATA_DIR.into()),
    );
    if args.first().map(String::as_str) == Some("--data-dir") {
        if args.len() < 2 {
            eprintln!("trustbind-appliance: --data-dir needs a value");
            return ExitCode::from(EXIT_USAGE);
        }
        let mut rest = args.split_off(2);
        data_dir = PathBuf::from(args.pop().unwrap_or_default());
        args = std::mem::take(&mut rest);
    }
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["init"] | ["audit", "verify"] | ["audit", "export"] => {}
        ["--help"] | ["-h"] | [] => {
            println!(
                "usage: trustbind-appliance [--data-dir DIR] init | audit verify | audit export"
            );
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!(
                "trustbind-appliance: unknown command `{}` (try --help)",
                words.join(" ")
            );
            return ExitCode::from(EXIT_USAGE);
        }
    }
    if let Err(e) = std::fs::create_dir_all(&data_dir) {
        eprintln!("trustbind-appliance: {}: {e}", data_dir.display());
        return ExitCode::from(EXIT_FAILED);
    }
    let store = match Store::open(&data_dir.join(DB_FILE)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("trustbind-appliance: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let result = match words.as_slice() {
        ["audit", "verify"] => match store.verify_audit() {
            Ok(Ok(n)) => {
                println!("audit chain ok: {n} rows");
                Ok(())
            }
            Ok(Err(broken)) => {
                eprintln!("trustbind-appliance: {broken}");
                return ExitCode::from(EXIT_CHAIN_BROKEN);
            }
            Err(e) => Err(e),
        },
        ["audit", "export"] => store
            .export_audit(0, &mut std::io::stdout().lock())
            .map(drop),
        _ => store
            .schema_version()
            .map(|v| println!("database ready, schema version {v}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trustbind-appliance: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}
