//! `trustbind`: the Trustbind administrator's command line.
//!
//! Talks to the appliance's admin API (HTTPS + JSON, admin client
//! certificate). `policy validate` works offline. See `trustbind --help`.
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

mod cli;
mod client;
mod cmd;
mod config;
mod enrol;
mod error;
mod explain;
mod hashing;
mod learn;
mod nsrl;
mod out;
mod replay;
mod time;
mod validate;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::Cli;
use crate::out::Out;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let out = Out::new(cli.global.output);
    match cmd::run(cli, &out) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            out.error(&e);
            ExitCode::from(e.exit as u8)
        }
    }
}
