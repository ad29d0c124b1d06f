//! Latency histograms of a pod, kept with `prometheus-client` and rendered by `/metrics`
//! with the pod's counters in the OpenMetrics text format.
//!
//! Each histogram lives next to what it measures (the append path, the listener, the worker,
//! the await driver, the HTTP layer) as a [`LatencyHistogram`], a cheap clone of one shared
//! histogram; `/metrics` registers them in a fresh registry on every scrape, so the pod has no
//! global registry and several pods can share a process (as tests do).

use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

/// Bucket bounds in seconds: 100 µs to about 105 s, doubling, plus the implicit `+Inf`.
fn latency_buckets() -> impl Iterator<Item = f64> {
    (0..21).map(|i| 0.0001 * f64::from(1u32 << i))
}

fn new_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

/// A latency distribution in seconds. Clones observe into the same histogram.
#[derive(Clone, Debug)]
pub struct LatencyHistogram(Histogram);

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self(new_histogram())
    }
}

impl LatencyHistogram {
    /// Records one duration.
    pub fn observe(&self, duration: Duration) {
        self.0.observe(duration.as_secs_f64());
    }

    /// Records the time from `since` (a database or remote wall-clock instant) to now on this
    /// pod's clock; a negative difference (clock skew) counts as zero.
    pub fn observe_since(&self, since: DateTime<Utc>) {
        let elapsed = (Utc::now() - since).to_std().unwrap_or(Duration::ZERO);
        self.observe(elapsed);
    }

    /// The underlying histogram, for registration.
    pub fn histogram(&self) -> Histogram {
        self.0.clone()
    }
}

/// Labels of the HTTP request histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// The matched route template (`/v1/processes/{id}`).
    pub route: String,
    /// The method.
    pub method: String,
    /// The response status code.
    pub status: String,
}

/// The label of a request method: the methods of RFC 9110 by name, anything else `OTHER`
/// (a method is any token a client invents; a label value per invented method would let
/// anyone grow `/metrics` without bound).
pub fn method_label(method: &str) -> &'static str {
    const KNOWN: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
    ];
    KNOWN
        .iter()
        .find(|known| **known == method)
        .copied()
        .unwrap_or("OTHER")
}

/// HTTP request durations by route, method and status.
#[derive(Clone, Debug)]
pub struct HttpHistograms(Family<HttpLabels, Histogram>);

impl Default for HttpHistograms {
    fn default() -> Self {
        Self(Family::new_with_constructor(new_histogram))
    }
}

impl HttpHistograms {
    /// Records one request. `route` must be a route template (a fixed set); the method is
    /// one of the standard ones or `OTHER`, so no request can add label values at will.
    pub fn observe(&self, route: &str, method: &str, status: u16, duration: Duration) {
        self.0
            .get_or_create(&HttpLabels {
                route: route.to_owned(),
                method: method_label(method).to_owned(),
                status: status.to_string(),
            })
            .observe(duration.as_secs_f64());
    }

    /// The underlying family, for registration.
    pub fn family(&self) -> Family<HttpLabels, Histogram> {
        self.0.clone()
    }
}
