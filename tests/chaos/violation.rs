//! A broken invariant, as every part of the round reports it (tagged with the seed).

use crate::settings::seed_tag;

/// One broken invariant.
#[derive(Clone, Debug)]
pub(crate) struct Violation {
    invariant: &'static str,
    process: String,
    detail: String,
}

impl Violation {
    pub(crate) fn new(
        invariant: &'static str,
        process: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            invariant,
            process: process.into(),
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{}] {}: {}: {}",
            seed_tag(),
            self.invariant,
            self.process,
            self.detail
        )
    }
}
