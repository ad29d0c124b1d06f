//! Freshness on top of the registry: change ticks, the sink decorator, live subscriptions and
//! `await_terminal`. Nothing here is truth; everything here leads back to a registry read.

pub mod driver;
pub mod hub;
pub mod link;
pub mod notice;
pub mod sink;
pub mod subscribe;
pub mod watched;

pub use driver::{AwaitError, ProcessWorkDriver};
pub use hub::{ChangeWatcher, ProcessChangeHub};
pub use link::{LinkCounters, LinkStatus, LocalLink, PodLink};
pub use sink::{BoundedSink, CompletionHint, NoopSink, ProcessEventSink, WorkHint};
pub use subscribe::ProcessSubscriptions;
pub use watched::WatchedProcessRegistry;
