#![deny(missing_docs)]

//! proclog: durable process-event logs on Postgres.
//!
//! A *process* is a durable unit of work: a `kind` (which engine runs it), a JSON `input`, and
//! an append-only event log with dense per-process seqs (1, 2, 3, ..., no gap, no duplicate,
//! whatever the number of writers), ending in exactly one terminal state (`completed`,
//! `failed`, `cancelled` or `abandoned`) held in a durable column.
//!
//! # Layers
//!
//! - **The registry is the truth.** [`ProcessRegistry`] is the state interface: point reads
//!   and writes, no waiting, no notification. [`PgProcessRegistry`] is the product,
//!   [`InMemoryProcessRegistry`] the reference model. Replay keys make appends idempotent,
//!   fences (leases) make them safe against a paused former owner, and every refused operation
//!   writes nothing ([`ProcessError`] says why).
//! - **The freshness layer is hints.** After each committed append,
//!   [`WatchedProcessRegistry`] ticks the pod's [`ProcessChangeHub`] and calls a
//!   [`ProcessEventSink`]; proclog's own sink forwards small notices to other pods over
//!   LISTEN/NOTIFY. [`ProcessSubscriptions`] (live, gap-free streams) and
//!   [`ProcessWorkDriver::await_terminal`] are woken by these hints but only believe what they
//!   read from the registry, so a lost, duplicated or late hint can delay them, never mislead
//!   them.
//! - **Pods are leased execution.** A [`Pod`] claims runnable processes under fenced leases
//!   (database clock, generations that never go back), runs the host's [`ProcessEngine`] for
//!   each kind, and recovers the work of a pod that dies: a `rerun` process runs again
//!   (attempt + 1), an `abandon` process is completed `abandoned`, and an `external` process
//!   is never run by a pod (its client drives it through the registry or the HTTP API).
//!
//! [`Proclog::builder`] connects, migrates and starts one pod's stack (registry, hub, NOTIFY
//! forwarding, listener, subscriptions, `await_terminal`); [`Pod::builder`] runs engines on it.
//!
//! # Example
//!
//! A host with an engine of its own: start the stack and a pod, register a process, wait for
//! its terminal state, read its log, shut down. `examples/embedded_host.rs` is the same as a
//! program that runs by itself.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use proclog::pod::{EngineResult, Pod, ProcessEngine, RunContext};
//! use proclog::{ProcessRegistration, Proclog, TerminalState, async_trait};
//! use serde_json::json;
//!
//! struct SendInvoice;
//!
//! #[async_trait]
//! impl ProcessEngine for SendInvoice {
//!     async fn run(&self, run: RunContext) -> EngineResult {
//!         let order = run.process.input["order"].clone();
//!         // Right before an effect outside the database: are we still the owner?
//!         if !run.is_owner() {
//!             return Err(json!({"error": "lease lost"}));
//!         }
//!         // ... send the invoice, with the process id as the provider's idempotency key ...
//!         // Record the step with a key of our own: a rerun gets the stored event back.
//!         run.events
//!             .append_with_key("invoice.sent", json!({"order": order}), "send")
//!             .await
//!             .map_err(|err| json!({"error": err.to_string()}))?;
//!         Ok(json!({"sent": true})) // completes the process; Err(output) would fail it
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let stack = Proclog::builder(std::env::var("DATABASE_URL")?)
//!         .pod_id("billing-1")
//!         .start()
//!         .await?;
//!     let pod = Pod::builder(&stack)
//!         .engine("send-invoice", SendInvoice)
//!         .start()
//!         .await?;
//!
//!     let process = stack
//!         .registry()
//!         .register_process(ProcessRegistration::new("send-invoice", json!({"order": 42})))
//!         .await?;
//!     let terminal = stack
//!         .driver()
//!         .await_terminal(&process.id, Duration::from_secs(30))
//!         .await?;
//!     assert_eq!(terminal.state, TerminalState::Completed);
//!     for event in stack.registry().events_after(&process.id, 0, 100).await? {
//!         println!("{} {} {}", event.seq, event.event_type, event.payload);
//!     }
//!
//!     pod.shutdown().await; // the pod first: it drains its runs
//!     stack.shutdown().await;
//!     Ok(())
//! }
//! ```
//!
//! # The freshness contract
//!
//! In the words of [`ProcessEventSink`]: *"Told about each event after its append has
//! committed. Best effort, never truth. `emit` returns `()`: it cannot fail or roll back the
//! write. It is awaited inline on the append path, so it must return fast: real I/O goes to a
//! channel or background task that drops (and counts) when full. No buffering across crashes,
//! no retry, no delivery promise: consumers that need completeness reconcile from
//! `events_after`."* The terminal event never goes through a sink (completion bypasses it).
//!
//! A consumer that must see every event keeps the last seq it handled and, whenever a hint
//! wakes it (and on a timer, for the hints that never come), reads
//! [`ProcessRegistry::events_after`] from there; [`ProcessSubscriptions::subscribe`] does
//! exactly that. `examples/channel_sink.rs` and `examples/reconciling_subscriber.rs` show both
//! sides.
//!
//! # Modules
//!
//! - [`registry`]: the [`ProcessRegistry`] trait and [`RegistryConfig`]; [`model`]: ids,
//!   records, events, requests, leases; [`error`]: [`ProcessError`]; [`validate`]: the rules
//!   on caller input.
//! - [`pg`]: the Postgres registry, migrations ([`pg::migrate()`]), pools, NOTIFY forwarding
//!   and the listener; [`memory`]: the in-memory registry.
//! - [`watch`]: the freshness layer (hub, sink, subscriptions, `await_terminal`).
//! - [`pod`]: engines ([`pod::ProcessEngine`], [`pod::RunContext`]), the worker, leases, runs,
//!   cancellation, demo engines; [`stack`]: [`Proclog`]; [`pod_services`]: the wiring
//!   underneath; [`http`]: the HTTP API a pod can serve.
//! - [`cli`]: the `proclog` binary's commands; [`local_pg`]: a throwaway Postgres cluster;
//!   [`local_citus`]: a throwaway Citus cluster (a coordinator and workers);
//!   [`backoff`]: retry delays.
//!
//! `ARCHITECTURE.md` describes the layers and the invariants and how each is enforced.
//!
//! # Testing a host
//!
//! [`testing`] gives a host's tests what proclog's own use:
//! [`testing::migrated_database_url`] returns a new, migrated database on a throwaway Postgres
//! shared by the test binary (or on `PROCLOG_TEST_DATABASE_URL`), and
//! [`testing::LocalPostgres`] a cluster of the test's own, which it can stop and crash.

pub mod backoff;
pub mod budget;
#[cfg(feature = "cli")]
pub mod cli;
pub mod error;
#[cfg(feature = "http")]
pub mod http;
pub mod local_citus;
pub mod local_pg;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod pg;
pub mod pod;
pub mod pod_services;
pub mod queue;
pub mod registry;
pub mod reserved;
pub mod schedule;
pub mod stack;
pub mod store;
pub mod tasks;
#[cfg(feature = "otlp")]
pub mod telemetry;
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
