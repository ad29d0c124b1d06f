//! Freshness on top of the registry: change ticks, the sink decorator, live subscriptions and
//! `await_terminal`. Nothing here is truth; everything here leads back to a registry read.

pub mod driver;
pub mod hub;
pub mod notice;
pub mod sink;
pub mod subscribe;
pub mod watched;

pub use driver::{AwaitError, ProcessWorkDriver};
pub use hub::{ChangeWatcher, ProcessChangeHub};
pub use sink::{CompletionHint, NoopSink, ProcessEventSink};
pub use subscribe::ProcessSubscriptions;
pub use watched::WatchedProcessRegistry;
