//! The pod: leased execution of processes by engines, crash recovery, cancellation.

pub mod cancel;
pub mod demo;
pub mod engine;
pub mod worker;

pub use cancel::cancel_process;
pub use demo::demo_engines;
pub use engine::{EngineResult, Engines, ProcessEngine, RunContext, RunEvents};
pub use worker::{Worker, WorkerConfig, WorkerStats};
