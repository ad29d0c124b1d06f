//! A throwaway local Citus cluster: a coordinator and N workers, each a [`LocalPostgres`] on
//! a loopback port with `citus` preloaded, the extension created in their `postgres`
//! database, and the workers added to the coordinator.
//!
//! Citus is not packaged for every machine: [`LocalCitus::available`] says whether the
//! extension is installed next to the PostgreSQL server binaries (`.ci/run` builds and
//! installs it from the vendored source when it is missing). Like every throwaway cluster,
//! the nodes stop and their directories go when the value is dropped, or when this process
//! dies.
//!
//! `CREATE EXTENSION citus` turns TLS on in each node with a self-signed certificate (X.509
//! version 1); the coordinator's URL is reached with the default `sslmode=prefer`, and the
//! nodes talk to each other with Citus's default `citus.node_conninfo` (`sslmode=require`).

use std::io;
use std::path::PathBuf;
use std::process::Command;

use crate::local_pg::{LocalPostgres, LocalPostgresOptions, find_bin_dir};

/// The database every node serves proclog from (Citus wants the same name on every node).
pub const DATABASE: &str = "postgres";

/// A running coordinator and its workers.
pub struct LocalCitus {
    coordinator: LocalPostgres,
    workers: Vec<LocalPostgres>,
    options: LocalPostgresOptions,
}

impl LocalCitus {
    /// Whether the `citus` extension is installed for the PostgreSQL server binaries that
    /// [`LocalPostgres`] uses (`citus.so` in `pg_config --pkglibdir`).
    pub fn available() -> bool {
        library_dir().is_ok_and(|dir| dir.join("citus.so").is_file())
    }

    /// Starts a coordinator and `workers` workers and returns once the coordinator lists
    /// every worker as an active node. `options.settings` go to every node.
    pub async fn start(workers: usize, options: &LocalPostgresOptions) -> io::Result<Self> {
        // Citus must come first among the preloaded libraries; the caller's follow it.
        let mut options = options.clone();
        let mut preload = vec!["citus".to_owned()];
        options.settings.retain(|(name, value)| {
            if name == "shared_preload_libraries" {
                preload.extend(
                    value
                        .split(',')
                        .map(str::trim)
                        .filter(|library| !library.is_empty() && *library != "citus")
                        .map(str::to_owned),
                );
                false
            } else {
                true
            }
        });
        options
            .settings
            .push(("shared_preload_libraries".into(), preload.join(",")));
        let coordinator = start_node(&options).await?;
        let mut cluster = LocalCitus {
            coordinator,
            workers: Vec::new(),
            options,
        };
        let port = i32::from(cluster.coordinator.port());
        cluster
            .coordinator_sql(
                "SELECT citus_set_coordinator_host('127.0.0.1', $1)",
                &[&port],
            )
            .await?;
        for _ in 0..workers {
            cluster.add_worker().await?;
        }
        Ok(cluster)
    }

    /// Starts one more worker and adds it to the cluster (`citus_add_node`); it holds no
    /// shard until a rebalance moves some there. Returns its index in [`LocalCitus::workers`].
    pub async fn add_worker(&mut self) -> io::Result<usize> {
        let worker = start_node(&self.options).await?;
        let port = i32::from(worker.port());
        // On failure the worker is dropped (stopped and removed), never listed.
        self.coordinator_sql("SELECT citus_add_node('127.0.0.1', $1)", &[&port])
            .await?;
        self.workers.push(worker);
        Ok(self.workers.len() - 1)
    }

    /// Creates database `name` on every node, with the extension and the workers added to
    /// its coordinator, and returns the coordinator's URL for it: a Citus cluster of its own
    /// (Citus keeps its metadata per database), cheaper than a new set of servers. Nodes
    /// added later by [`LocalCitus::add_worker`] join only [`DATABASE`]'s cluster.
    pub async fn create_database(&self, name: &str) -> io::Result<String> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("database name {name:?}: lowercase letters, digits and _ only"),
            ));
        }
        for node in std::iter::once(&self.coordinator).chain(&self.workers) {
            let admin = connect(node).await?;
            admin
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .map_err(|err| io::Error::other(format!("CREATE DATABASE: {}", describe(&err))))?;
            let client = connect_to(node, name).await?;
            client
                .batch_execute("CREATE EXTENSION citus")
                .await
                .map_err(|err| {
                    io::Error::other(format!("CREATE EXTENSION citus: {}", describe(&err)))
                })?;
        }
        let coordinator = connect_to(&self.coordinator, name).await?;
        let mut statements = vec![(
            "SELECT citus_set_coordinator_host('127.0.0.1', $1)",
            i32::from(self.coordinator.port()),
        )];
        statements.extend(self.workers.iter().map(|worker| {
            (
                "SELECT citus_add_node('127.0.0.1', $1)",
                i32::from(worker.port()),
            )
        }));
        for (statement, port) in statements {
            // A node's first connection to a database just created on another node can fail
            // while that node's maintenance daemon starts there; a few tries, then the error.
            let mut attempt = 1;
            loop {
                match coordinator.execute(statement, &[&port]).await {
                    Ok(_) => break,
                    Err(err) if attempt < 5 && err.as_db_error().is_some() => {
                        tracing::debug!(statement, error = %describe(&err), "retrying");
                        attempt += 1;
                        tokio::time::sleep(std::time::Duration::from_millis(200 * attempt)).await;
                    }
                    Err(err) => {
                        return Err(io::Error::other(format!("{statement}: {}", describe(&err))));
                    }
                }
            }
        }
        Ok(self.coordinator.url(name))
    }

    /// The coordinator: the node proclog connects to.
    pub fn coordinator(&self) -> &LocalPostgres {
        &self.coordinator
    }

    /// The coordinator, to stop, start or crash it.
    pub fn coordinator_mut(&mut self) -> &mut LocalPostgres {
        &mut self.coordinator
    }

    /// The workers, in the order they were added.
    pub fn workers(&self) -> &[LocalPostgres] {
        &self.workers
    }

    /// The workers, to stop, start or crash one.
    pub fn workers_mut(&mut self) -> &mut [LocalPostgres] {
        &mut self.workers
    }

    /// The coordinator's URL for [`DATABASE`], as the superuser (default `sslmode`).
    pub fn url(&self) -> String {
        self.coordinator.url(DATABASE)
    }

    /// Stops every node (fast shutdown) and deletes their directories.
    pub fn stop(self) -> io::Result<()> {
        let LocalCitus {
            coordinator,
            workers,
            ..
        } = self;
        let mut result = coordinator.stop();
        for worker in workers {
            result = result.and(worker.stop());
        }
        result
    }

    async fn coordinator_sql(
        &self,
        statement: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> io::Result<()> {
        let client = connect(&self.coordinator).await?;
        client
            .execute(statement, params)
            .await
            .map_err(|err| io::Error::other(format!("{statement}: {}", describe(&err))))?;
        Ok(())
    }
}

/// `pg_config --pkglibdir` of the server binaries [`LocalPostgres`] uses, else the `lib`
/// directory beside them (Debian's layout).
fn library_dir() -> io::Result<PathBuf> {
    let bin = find_bin_dir()?;
    let Ok(output) = Command::new(bin.join("pg_config"))
        .arg("--pkglibdir")
        .output()
    else {
        return Ok(bin.join("../lib"));
    };
    if !output.status.success() {
        return Err(io::Error::other("pg_config --pkglibdir failed"));
    }
    Ok(PathBuf::from(
        String::from_utf8_lossy(&output.stdout).trim().to_owned(),
    ))
}

/// A node: a throwaway cluster with `citus` preloaded and the extension created.
async fn start_node(options: &LocalPostgresOptions) -> io::Result<LocalPostgres> {
    let options = options.clone();
    let node = tokio::task::spawn_blocking(move || LocalPostgres::start(&options))
        .await
        .map_err(io::Error::other)??;
    let client = connect(&node).await?;
    client
        .batch_execute("CREATE EXTENSION citus")
        .await
        .map_err(|err| io::Error::other(format!("CREATE EXTENSION citus: {}", describe(&err))))?;
    Ok(node)
}

/// A plain connection to a node's [`DATABASE`] as the superuser (loopback, no TLS needed).
async fn connect(node: &LocalPostgres) -> io::Result<tokio_postgres::Client> {
    connect_to(node, DATABASE).await
}

/// A plain connection to a node's `database` as the superuser.
async fn connect_to(node: &LocalPostgres, database: &str) -> io::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(
        &format!("{}?sslmode=disable", node.url(database)),
        tokio_postgres::NoTls,
    )
    .await
    .map_err(|err| io::Error::other(format!("connect to a Citus node: {err}")))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The server's message of a database error (tokio-postgres's `Display` says "db error").
fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => err.to_string(),
    }
}
