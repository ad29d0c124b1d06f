//! The `proclog` command line: run a pod or a local cluster, migrate, and talk to a pod.

mod client;
mod logging;
mod pod;
mod up;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use logging::{LogFormat, init_logging};

/// Exit codes and error output, shown after `proclog --help` (and in the README).
const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  failure: the pod answered with an error, printed as `proclog: <status> <code>: <message>`
     (e.g. `proclog: 404 not_found: ...`), a stream reported an error, or `pod`, `up` or
     `migrate` failed
  2  usage or invalid input, refused before any request: a bad flag, a malformed process id,
     --input that is not JSON
  3  the pod could not be reached, did not answer within --request-timeout-ms
     (PROCLOG_CLIENT_TIMEOUT_MS, default 30000), or the connection broke, e.g. a `tail` stream
     that ended before the process did
  4  `await`: the process did not end within its --timeout-ms

Errors are one line on stderr starting with `proclog: `; results are JSON on stdout.";

/// Exit codes of `proclog` (see `proclog --help`); 0 is success.
pub mod exit_code {
    /// The command failed: the pod answered with an error, or `pod`, `up` or `migrate` failed.
    pub const FAILURE: u8 = 1;
    /// Usage or invalid input, refused before any request.
    pub const USAGE: u8 = 2;
    /// The pod could not be reached, did not answer in time, or the connection broke.
    pub const UNREACHABLE: u8 = 3;
    /// `await`: the process did not end within its timeout.
    pub const AWAIT_TIMEOUT: u8 = 4;
}

/// Durable process-event logs on Postgres.
#[derive(Parser)]
#[command(name = "proclog", version, about, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pod: claim and run processes under leases and serve the HTTP API.
    Pod(Box<pod::PodArgs>),
    /// Start a local cluster of pods (and a throwaway Postgres when DATABASE_URL is unset).
    Up(up::UpArgs),
    /// Apply pending schema migrations (safe to run from many hosts at once). Run it as the
    /// role that owns the schema; pods may then run as a writer role (grant-writer).
    Migrate {
        #[command(flatten)]
        database: DatabaseArgs,
        /// After migrating, give this existing role the pods' rights (as grant-writer).
        #[arg(long, env = "PROCLOG_WRITER_ROLE")]
        writer_role: Option<String>,
        /// After migrating, give this existing role read-only access (as grant-reader).
        #[arg(long, env = "PROCLOG_READER_ROLE")]
        reader_role: Option<String>,
    },
    /// Give an existing database role read-only access to the proclog schema (SELECT on every
    /// table, also on tables later migrations add; no function). Run it as the role that
    /// migrates.
    GrantReader {
        #[command(flatten)]
        database: DatabaseArgs,
        /// The role (it must exist: CREATE ROLE analyst LOGIN PASSWORD '...').
        role: String,
    },
    /// Give an existing database role what a pod needs and nothing more: read every table,
    /// write processes, events and pods through proclog's statements, never change the
    /// schema. Run it as the role that migrates; then run pods as this role.
    GrantWriter {
        #[command(flatten)]
        database: DatabaseArgs,
        /// The role (it must exist: CREATE ROLE proclog_pod LOGIN PASSWORD '...').
        role: String,
    },
    /// Ask a pod's probe endpoint (by default this host's /readyz): exit 0 on 200, 1
    /// otherwise. The container image's health check.
    Probe {
        /// The URL to ask.
        #[arg(long, default_value = "http://127.0.0.1:8080/readyz")]
        url: String,
        /// Longest wait for the answer, in milliseconds (1 to 60000).
        #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
        timeout_ms: u64,
    },
    /// Register a process.
    Start(client::StartArgs),
    /// Show a process.
    Get(client::IdArgs),
    /// List the processes a process started (its children), oldest first.
    Children(client::ChildrenArgs),
    /// Create, list, pause, resume, trigger or delete cron schedules.
    Schedule(client::ScheduleArgs),
    /// List, show, set or remove queue limits (concurrency, per pod, rate; per queue and key).
    Queue(client::QueueArgs),
    /// List a process's events.
    Events(client::EventsArgs),
    /// Follow a process's events live until it ends.
    Tail(client::TailArgs),
    /// Wait for a process to end and print its terminal state.
    Await(client::AwaitArgs),
    /// Request cancellation of a process.
    Cancel(client::CancelArgs),
    /// Send a message to a process (its run receives it with `recv(topic)`).
    Send(client::SendArgs),
    /// Delete terminal processes that ended before a cutoff.
    Prune(client::PruneArgs),
}

/// Runs the command line; the binary's `main`.
pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Pod(args) => pod::run(*args).await,
        Command::Up(args) => up::run(args).await,
        Command::Migrate {
            database,
            writer_role,
            reader_role,
        } => migrate(&database, writer_role, reader_role).await,
        Command::GrantReader { database, role } => {
            grant(&database, &role, crate::pg::roles::Access::Reader).await
        }
        Command::GrantWriter { database, role } => {
            grant(&database, &role, crate::pg::roles::Access::Writer).await
        }
        Command::Probe { url, timeout_ms } => probe(&url, timeout_ms).await,
        Command::Start(args) => client::start(args).await,
        Command::Get(args) => client::get(args).await,
        Command::Children(args) => client::children(args).await,
        Command::Schedule(args) => client::schedule(args).await,
        Command::Queue(args) => client::queue(args).await,
        Command::Events(args) => client::events(args).await,
        Command::Tail(args) => client::tail(args).await,
        Command::Await(args) => client::await_terminal(args).await,
        Command::Cancel(args) => client::cancel(args).await,
        Command::Send(args) => client::send(args).await,
        Command::Prune(args) => client::prune(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("proclog: {err}");
            let code = err
                .downcast_ref::<CliError>()
                .map_or(exit_code::FAILURE, |err| err.code);
            ExitCode::from(code)
        }
    }
}

/// Errors of the command line, printed as one line after `proclog: `. A [`CliError`] sets
/// the exit code; any other error exits with [`exit_code::FAILURE`].
pub type CliResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// An error with its exit code (one of [`exit_code`]).
#[derive(Debug)]
pub struct CliError {
    /// The exit code.
    pub code: u8,
    /// What went wrong, one line.
    pub message: String,
}

impl CliError {
    /// An error exiting with `code`.
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// A usage or input error ([`exit_code::USAGE`]).
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(exit_code::USAGE, message)
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

/// `url` with `sslrootcert=<ca_file>` added when a CA file is given (and the URL names none).
pub(crate) fn with_ca_file(
    url: &str,
    ca_file: Option<&std::path::Path>,
) -> Result<String, CliError> {
    match ca_file {
        Some(path) => crate::pg::with_root_cert(url, path)
            .map_err(|err| CliError::usage(format!("bad setting: {err}"))),
        None => Ok(url.to_owned()),
    }
}

async fn probe(url: &str, timeout_ms: u64) -> CliResult {
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(timeout_ms))
        .build()?;
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|err| CliError::new(exit_code::FAILURE, format!("{url}: {err}")))?;
    let status = response.status();
    if status == reqwest::StatusCode::OK {
        println!("{url}: {status}");
        Ok(())
    } else {
        Err(CliError::new(exit_code::FAILURE, format!("{url}: {status}")).into())
    }
}

/// Where the database is, for the commands that connect to it directly.
#[derive(clap::Args, Debug)]
struct DatabaseArgs {
    /// Postgres URL of the database.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// A PEM file of the CA(s) of the database's certificate (as `sslrootcert=`).
    #[arg(long, env = "PROCLOG_DATABASE_CA_FILE")]
    database_ca_file: Option<std::path::PathBuf>,
}

impl DatabaseArgs {
    fn pool(&self) -> Result<crate::Pool, Box<dyn std::error::Error + Send + Sync>> {
        let url = with_ca_file(&self.database_url, self.database_ca_file.as_deref())?;
        Ok(crate::pg::connect_pool(&url, 1)?)
    }
}

async fn grant(database: &DatabaseArgs, role: &str, access: crate::pg::roles::Access) -> CliResult {
    crate::pg::roles::check_role_name(role).map_err(|err| CliError::usage(err.to_string()))?;
    let pool = database.pool()?;
    crate::pg::roles::grant(&pool, role, access).await?;
    match access {
        crate::pg::roles::Access::Reader => {
            println!("role {role} can now read the proclog schema (and nothing else of it)")
        }
        crate::pg::roles::Access::Writer => println!(
            "role {role} can now run pods: it writes through proclog's statements and cannot change the schema"
        ),
    }
    Ok(())
}

async fn migrate(
    database: &DatabaseArgs,
    writer_role: Option<String>,
    reader_role: Option<String>,
) -> CliResult {
    let roles = [
        (writer_role, crate::pg::roles::Access::Writer),
        (reader_role, crate::pg::roles::Access::Reader),
    ];
    for (role, _) in &roles {
        if let Some(role) = role.as_deref().filter(|r| !r.is_empty()) {
            crate::pg::roles::check_role_name(role)
                .map_err(|err| CliError::usage(err.to_string()))?;
        }
    }
    let pool = database.pool()?;
    let report = crate::pg::migrate(&pool).await?;
    println!(
        "schema at version {} (applied now: {:?})",
        report.version, report.applied
    );
    if report.citus.coordinator {
        if !report.citus.distributed {
            println!(
                "on Citus: the tables are not distributed (this role may not distribute them)"
            );
        } else if report.citus.distributed_now.is_empty() {
            println!(
                "on Citus: proclog.processes and proclog.events are distributed by process_id"
            );
        } else {
            println!(
                "on Citus: distributed proclog.processes and proclog.events by process_id (co-located), proclog.pods replicated to every node; readers, writers and schema_migrations stay on the coordinator (placed now: {})",
                report.citus.distributed_now.join(", ")
            );
        }
        if !report.citus.delegated_now.is_empty() {
            println!(
                "on Citus: calls on one process now run on its worker: {}",
                report.citus.delegated_now.join(", ")
            );
        }
    }
    for (role, access) in roles {
        if let Some(role) = role.filter(|r| !r.is_empty()) {
            crate::pg::roles::grant(&pool, &role, access).await?;
            println!("granted {access:?} rights to role {role}");
        }
    }
    Ok(())
}
