//! The `proclog` command line: run a pod or a local cluster, migrate, and talk to a pod.

mod client;
mod logging;
mod pod;
mod up;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use logging::{LogFormat, init_logging};

/// Durable process-event logs on Postgres.
#[derive(Parser)]
#[command(name = "proclog", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pod: claim and run processes under leases and serve the HTTP API.
    Pod(pod::PodArgs),
    /// Start a local cluster of pods (and a throwaway Postgres when DATABASE_URL is unset).
    Up(up::UpArgs),
    /// Apply pending schema migrations (safe to run from many hosts at once).
    Migrate {
        /// Postgres URL of the database.
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
    /// Register a process.
    Start(client::StartArgs),
    /// Show a process.
    Get(client::IdArgs),
    /// List a process's events.
    Events(client::EventsArgs),
    /// Follow a process's events live until it ends.
    Tail(client::TailArgs),
    /// Wait for a process to end and print its terminal state.
    Await(client::AwaitArgs),
    /// Request cancellation of a process.
    Cancel(client::CancelArgs),
    /// Delete terminal processes that ended before a cutoff.
    Prune(client::PruneArgs),
}

/// Runs the command line; the binary's `main`.
pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Pod(args) => pod::run(args).await,
        Command::Up(args) => up::run(args).await,
        Command::Migrate { database_url } => migrate(&database_url).await,
        Command::Start(args) => client::start(args).await,
        Command::Get(args) => client::get(args).await,
        Command::Events(args) => client::events(args).await,
        Command::Tail(args) => client::tail(args).await,
        Command::Await(args) => client::await_terminal(args).await,
        Command::Cancel(args) => client::cancel(args).await,
        Command::Prune(args) => client::prune(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("proclog: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Errors of the command line, printed as one line.
pub type CliResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

async fn migrate(database_url: &str) -> CliResult {
    let pool = crate::pg::connect_pool(database_url, 1)?;
    let report = crate::pg::migrate(&pool).await?;
    println!(
        "schema at version {} (applied now: {:?})",
        report.version, report.applied
    );
    Ok(())
}
