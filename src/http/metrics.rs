//! `/metrics` in the OpenMetrics text format (which Prometheus scrapes): the pod's counters
//! and gauges, and its latency histograms, through `prometheus-client`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::ApiState;

/// The OpenMetrics content type.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One counter or gauge, read at scrape time.
#[derive(Debug)]
struct Sample {
    name: &'static str,
    kind: Kind,
    help: &'static str,
    value: u64,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

/// The pod's counters and gauges as they were when the scrape began.
#[derive(Debug)]
struct Samples(Vec<Sample>);

impl Collector for Samples {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for sample in &self.0 {
            match sample.kind {
                Kind::Counter => {
                    let counter = ConstCounter::new(sample.value);
                    let metric = encoder.encode_descriptor(
                        sample.name,
                        sample.help,
                        None,
                        counter.metric_type(),
                    )?;
                    counter.encode(metric)?;
                }
                Kind::Gauge => {
                    let gauge = ConstGauge::new(i64::try_from(sample.value).unwrap_or(i64::MAX));
                    let metric = encoder.encode_descriptor(
                        sample.name,
                        sample.help,
                        None,
                        gauge.metric_type(),
                    )?;
                    gauge.encode(metric)?;
                }
            }
        }
        Ok(())
    }
}

fn load(value: &AtomicU64) -> u64 {
    value.load(Ordering::Relaxed)
}

/// Records every request's duration by matched route, method and status.
pub(super) async fn record_http(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = request.method().clone();
    let started = Instant::now();
    let response = next.run(request).await;
    state.services.http_requests.observe(
        &route,
        method.as_str(),
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

pub(super) async fn render(State(state): State<ApiState>) -> impl IntoResponse {
    let services = &state.services;
    let link = services.link.counters();
    let driver = services.driver.stats();
    let group = services.group_commit.as_deref();
    let mut samples = vec![
        Sample {
            name: "proclog_appended_events",
            kind: Kind::Counter,
            help: "Events appended through this pod.",
            value: load(&services.appended_events),
        },
        Sample {
            name: "proclog_sink_panics",
            kind: Kind::Counter,
            help: "Calls of an event sink or completion hint that panicked (contained; the write stood).",
            value: services.sink_panic_count(),
        },
        Sample {
            name: "proclog_sink_dropped",
            kind: Kind::Counter,
            help: "Events a host's bounded sink was not told of because its queue was full.",
            value: services.sink_dropped_count(),
        },
        Sample {
            name: "proclog_notices_sent",
            kind: Kind::Counter,
            help: "Notices handed to the other pods (Postgres NOTIFY).",
            value: link.sent,
        },
        Sample {
            name: "proclog_notices_dropped",
            kind: Kind::Counter,
            help: "Notices dropped (queue full or send failed).",
            value: link.dropped,
        },
        Sample {
            name: "proclog_notice_batches",
            kind: Kind::Counter,
            help: "NOTIFY round trips.",
            value: link.batches,
        },
        Sample {
            name: "proclog_notice_payloads",
            kind: Kind::Counter,
            help: "NOTIFY payloads sent (each packs the notices of one or more processes).",
            value: link.payloads,
        },
        Sample {
            name: "proclog_notices_received",
            kind: Kind::Counter,
            help: "Notices from other pods (one per process in a payload).",
            value: link.received,
        },
        Sample {
            name: "proclog_listener_reconnects",
            kind: Kind::Counter,
            help: "Listener reconnects after a lost connection.",
            value: link.reconnects,
        },
        Sample {
            name: "proclog_listener_up",
            kind: Kind::Gauge,
            help: "1 while the listener is listening.",
            value: u64::from(services.link.status() == crate::watch::LinkStatus::Listening),
        },
        Sample {
            name: "proclog_await_waiters",
            kind: Kind::Gauge,
            help: "await_terminal callers waiting.",
            value: load(&driver.waiters),
        },
        Sample {
            name: "proclog_await_polls",
            kind: Kind::Counter,
            help: "Terminal-column poll rounds.",
            value: load(&driver.polls),
        },
    ];
    if let Some(group) = group {
        samples.extend([
            Sample {
                name: "proclog_group_commit_appends",
                kind: Kind::Counter,
                help: "Appends queued for group commit.",
                value: load(&group.enqueued),
            },
            Sample {
                name: "proclog_group_commit_batches",
                kind: Kind::Counter,
                help: "Group-commit statements (batches of one included).",
                value: load(&group.batches),
            },
            Sample {
                name: "proclog_group_commit_grouped_appends",
                kind: Kind::Counter,
                help: "Appends that went out in a batch of more than one.",
                value: load(&group.grouped_appends),
            },
            Sample {
                name: "proclog_group_commit_split_batches",
                kind: Kind::Counter,
                help: "Batches refused as a whole, whose appends were then run alone.",
                value: load(&group.split_batches),
            },
        ]);
    }
    let server = &state.server;
    samples.extend([
        Sample {
            name: "proclog_http_connections",
            kind: Kind::Gauge,
            help: "HTTP connections open.",
            value: server.open.load(Ordering::Relaxed) as u64,
        },
        Sample {
            name: "proclog_http_connections_evicted",
            kind: Kind::Counter,
            help: "Idle HTTP connections closed to admit a new one at the connection cap.",
            value: load(&server.evicted),
        },
        Sample {
            name: "proclog_http_connections_refused",
            kind: Kind::Counter,
            help: "HTTP connections answered 503 at the cap because every open one was serving a request.",
            value: load(&server.refused),
        },
        Sample {
            name: "proclog_http_streams",
            kind: Kind::Gauge,
            help: "Event streams and awaits being served.",
            value: state.stream_capacity.saturating_sub(state.streams.available_permits()) as u64,
        },
    ]);
    if let Some(worker) = &state.worker {
        samples.extend([
            Sample {
                name: "proclog_active_leases",
                kind: Kind::Gauge,
                help: "Runs in progress, each holding a lease.",
                value: load(&worker.active),
            },
            Sample {
                name: "proclog_runs_started",
                kind: Kind::Counter,
                help: "Runs started.",
                value: load(&worker.started),
            },
            Sample {
                name: "proclog_recoveries",
                kind: Kind::Counter,
                help: "Processes taken over from a lost owner.",
                value: load(&worker.recoveries),
            },
            Sample {
                name: "proclog_runs_completed",
                kind: Kind::Counter,
                help: "Runs that completed their process.",
                value: load(&worker.completed),
            },
            Sample {
                name: "proclog_leases_lost",
                kind: Kind::Counter,
                help: "Runs stopped because their lease was lost or could not be confirmed in time.",
                value: load(&worker.leases_lost),
            },
            Sample {
                name: "proclog_leases_released",
                kind: Kind::Counter,
                help: "Runs handed back on shutdown.",
                value: load(&worker.released),
            },
            Sample {
                name: "proclog_write_retries",
                kind: Kind::Counter,
                help: "Run writes (start, appends, completion, renewal, release) retried after a transient failure.",
                value: load(&worker.write_retries),
            },
        ]);
    }
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Samples(samples)));
    let histograms = [
        (
            "proclog_append_duration_seconds",
            "Appends through this pod's registry, from call to committed outcome (a batch counts once).",
            Some(services.append_latency.histogram()),
        ),
        (
            "proclog_notice_latency_seconds",
            "From an append's acknowledgement on another pod to its notice arriving here (both pods' wall clocks).",
            Some(link.notice_latency.histogram()),
        ),
        (
            "proclog_await_wake_seconds",
            "From a completion (database clock) to its waiters on this pod being answered.",
            Some(driver.wake.histogram()),
        ),
        (
            "proclog_claim_to_start_seconds",
            "From sending a claim to the run's process.started being written.",
            state.worker.as_ref().map(|w| w.claim_to_start.histogram()),
        ),
        (
            "proclog_takeover_seconds",
            "Takeovers: from the lost owner's last renewal to this pod's claim (bounds kill-to-takeover from above by one renewal period).",
            state.worker.as_ref().map(|w| w.takeover.histogram()),
        ),
    ];
    for (name, help, histogram) in histograms {
        if let Some(histogram) = histogram {
            registry.register(name, help, histogram);
        }
    }
    registry.register(
        "proclog_http_request_duration_seconds",
        "HTTP requests to a route, by route template, method and status, until the response head (streams: until they start); requests matching no route are not recorded.",
        services.http_requests.family(),
    );
    let mut out = String::new();
    if let Err(err) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::error!(error = %err, "cannot render the metrics");
    }
    ([(header::CONTENT_TYPE, OPENMETRICS)], out)
}
