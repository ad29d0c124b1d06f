//! The `proclog` command line.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "proclog",
    version,
    about = "Durable process-event logs on Postgres"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply pending schema migrations to the database (safe to run from many hosts at once).
    Migrate {
        /// Postgres URL of the database.
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Migrate { database_url } => {
            let result = async {
                let pool = proclog::pg::connect_pool(&database_url, 1)?;
                Ok::<_, Box<dyn std::error::Error>>(proclog::pg::migrate(&pool).await?)
            }
            .await;
            match result {
                Ok(report) => {
                    println!(
                        "schema at version {} (applied: {:?})",
                        report.version, report.applied
                    );
                    std::process::ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("proclog migrate: {err}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}
