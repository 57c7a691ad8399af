//! The fleet load generator: a real `trustbind-appliance serve` on loopback
//! and N simulated agents, each with its own enrolled certificate, speaking
//! the agent gRPC protocol over mutual TLS. See [`generator`] and
//! `docs/BENCHMARKS.md` ("Fleet load").
//!
//! `cargo xtask fleet [--agents N] [--seconds S] [--rate R] ...`
//! (`--kill-at T [--kills K]`: SIGKILL and restart the appliance under
//! load, then check that nothing acknowledged is missing from its audit
//! log; exits 1 if something is), or
//! `cargo bench -p trustbind-appliance --bench fleet -- [OPTIONS]`
//! (`--help` lists them). Without options (as in `cargo bench
//! --workspace`): 100 agents for 10 s. `TB_FLEET_APPLIANCE=PATH` runs
//! another build of `trustbind-appliance` (a copy of an earlier build, to
//! compare before and after in one session).

mod generator;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args()
        .skip(1)
        // `cargo bench` passes `--bench`.
        .filter(|a| a != "--bench")
        .collect();
    let opts = match generator::Options::parse(&args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            print!("{}", generator::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("fleet: {e}\n\n{}", generator::USAGE);
            return ExitCode::from(64);
        }
    };
    // `TB_FLEET_APPLIANCE=PATH`: another build of the appliance (a
    // before/after comparison in one session); by default the one built
    // with this generator.
    let bin: std::path::PathBuf = std::env::var_os("TB_FLEET_APPLIANCE").map_or_else(
        || env!("CARGO_BIN_EXE_trustbind-appliance").into(),
        Into::into,
    );
    match generator::run(opts, &bin) {
        Ok(report) => {
            println!("{report}");
            match report.failure() {
                None => ExitCode::SUCCESS,
                Some(why) => {
                    eprintln!("fleet: FAILED: {why}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("fleet: {e}");
            ExitCode::FAILURE
        }
    }
}
