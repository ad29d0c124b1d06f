//! The Postgres implementation: connection targets (TLS), pools, the schema migrator and
//! `PgProcessRegistry`.

mod append;
pub mod citus;
mod convert;
mod db;
pub mod group;
pub mod listener;
pub mod migrate;
pub mod notify;
pub mod pool;
mod registry;
pub mod roles;
pub mod store;
pub mod tls;

pub use group::{GroupCommitOptions, GroupCommitStats};
pub use listener::{ListenerOptions, ListenerStatus, PgListener};
pub use migrate::{MigrationError, MigrationReport, migrate};
pub use notify::PgNotifier;
pub use pool::{PoolOptions, client_config, connect_pool, connect_pool_with};
pub use registry::{ClaimStrategy, PgProcessRegistry};
pub use roles::{grant_reader, grant_writer};
pub use store::PgClusterStore;
pub use tls::{DatabaseTarget, TlsMode, redacted, with_root_cert};
