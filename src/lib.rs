//! proclog: durable process-event logs on Postgres.
//!
//! A *process* is a durable unit of work with an append-only event log (seq 1, 2, 3, ... with
//! no gaps) that ends in exactly one terminal state held in a durable column. The
//! [`ProcessRegistry`] trait is the state interface; [`PgProcessRegistry`] is the product and
//! [`InMemoryProcessRegistry`] the reference model. See `ARCHITECTURE.md` for the layers and
//! invariants; each item documents its contract.

pub mod backoff;
pub mod cli;
pub mod error;
pub mod http;
pub mod local_pg;
pub mod memory;
pub mod model;
pub mod pg;
pub mod pod;
pub mod pod_services;
pub mod registry;
pub mod stack;
pub mod testing;
pub mod validate;
pub mod watch;

pub use async_trait::async_trait;
pub use deadpool_postgres::Pool;
pub use error::{ProcessError, ProcessResult};
pub use memory::InMemoryProcessRegistry;
pub use model::*;
pub use pg::PgProcessRegistry;
pub use pod::{Pod, ProcessEngine};
pub use registry::{ProcessRegistry, RegistryConfig};
pub use stack::{Proclog, ProclogBuilder};
pub use watch::{
    AwaitError, ProcessChangeHub, ProcessEventSink, ProcessSubscriptions, ProcessWorkDriver,
    WatchedProcessRegistry,
};
