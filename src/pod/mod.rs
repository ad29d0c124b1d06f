//! The pod: leased execution of processes by engines, crash recovery, cancellation.

pub mod cancel;
mod cancel_watch;
pub mod demo;
pub mod durable;
pub mod engine;
pub mod host;
pub mod lease;
pub mod presence;
mod retry;
pub mod run;
pub mod scheduler;
pub mod worker;

pub use cancel::cancel_process;
pub use demo::{DemoJournal, demo_engines, demo_engines_with};
pub use durable::{StepCounts, StepError};
pub use engine::{EngineResult, Engines, ProcessEngine, RunContext, RunEvents};
pub use host::{Pod, PodBuilder};
pub use lease::LeaseClock;
pub use presence::{Presence, PresenceInfo, PresenceState};
pub use run::RunEnd;
pub use worker::{Worker, WorkerConfig, WorkerStats};
