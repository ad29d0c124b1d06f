//! [`TimeBudget`]: every bound on a call to the store, derived from the lease TTL in this one
//! place, so that no call outlives a lease and a run's retries fit in its write deadline.
//!
//! | bound | derivation | at the default 15 s TTL |
//! |---|---|---|
//! | `call`: a request's round trip, client side (a grouped append's wait in its queue included) | TTL / 2, at most 7.5 s | 7.5 s |
//! | `statement`: the server's `statement_timeout`, and a pool wait | two thirds of `call` | 5 s |
//! | `lease_call`: a renewal or release, wait and round trip alike | TTL / 6, 100 ms to 2 s | 2 s |
//!
//! The server gives up first (`statement`), so that the client usually hears why; the client
//! bound (`call`) ends what the server cannot (a stalled network). A call cut by either may
//! or may not have committed; every write of a run is retried with its replay key until the
//! run's write deadline (0.8 TTL after its last confirmed renewal, `crate::pod::lease`).
//! Renewals every TTL/10 with `lease_call` at most TTL/6 leave room for several tries
//! before a lease could lapse.

use std::time::Duration;

/// The bounds on calls to the store of a pod whose leases last `ttl`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeBudget {
    /// A request's round trip, client side; also the whole wait of a grouped append.
    pub call: Duration,
    /// The server's `statement_timeout` and the wait for a pooled connection.
    pub statement: Duration,
    /// A lease renewal or release: pool wait, statement and round trip.
    pub lease_call: Duration,
}

impl TimeBudget {
    /// The bounds for leases of `ttl` (see the module doc).
    pub fn for_lease_ttl(ttl: Duration) -> Self {
        let call = (ttl / 2).min(Duration::from_millis(7_500));
        Self {
            call,
            statement: call * 2 / 3,
            lease_call: (ttl / 6).clamp(Duration::from_millis(100), Duration::from_secs(2)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bound_fits_in_the_lease() {
        for ms in [100, 1_000, 5_000, 15_000, 60_000, 86_400_000] {
            let ttl = Duration::from_millis(ms);
            let budget = TimeBudget::for_lease_ttl(ttl);
            assert!(budget.statement < budget.call, "{ttl:?}");
            assert!(budget.call <= ttl / 2, "{ttl:?}");
            assert!(budget.lease_call <= Duration::from_secs(2), "{ttl:?}");
        }
        let default = TimeBudget::for_lease_ttl(Duration::from_secs(15));
        assert_eq!(default.call, Duration::from_millis(7_500));
        assert_eq!(default.statement, Duration::from_secs(5));
        assert_eq!(default.lease_call, Duration::from_millis(2_000));
    }
}
