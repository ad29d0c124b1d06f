//! The `proclog` binary: see `proclog --help`.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    proclog::cli::run(proclog::cli::Cli::parse()).await
}
