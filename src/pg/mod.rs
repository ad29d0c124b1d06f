//! The Postgres implementation: pools, the schema migrator and `PgProcessRegistry`.

mod convert;
pub mod migrate;
pub mod pool;
mod registry;

pub use migrate::{MigrationError, MigrationReport, migrate};
pub use pool::{client_config, connect_pool};
pub use registry::PgProcessRegistry;
