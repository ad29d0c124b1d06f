//! Traces over OTLP (feature `otlp`): a span per run, with a child span per executed step
//! and per wait, continuing the W3C `traceparent` of whatever registered the process (an
//! HTTP request's header, or [`crate::ProcessRegistration::trace_parent`]).
//!
//! The spans are `tracing` spans (`run`, `step`, `wait`, target `proclog::...`), always
//! created; [`Telemetry`] is the layer that exports them. Without it nothing is exported and
//! the spans cost what any disabled `tracing` span costs.
//!
//! ```no_run
//! # fn demo() -> Result<(), proclog::ProcessError> {
//! use tracing_subscriber::layer::SubscriberExt;
//! use tracing_subscriber::util::SubscriberInitExt;
//!
//! let telemetry = proclog::telemetry::Telemetry::otlp(
//!     "http://127.0.0.1:4318",
//!     std::time::Duration::from_secs(5),
//! )?;
//! tracing_subscriber::registry().with(telemetry.layer()).init();
//! // ... run pods ...
//! telemetry.shutdown(); // exports what is left
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::registry::LookupSpan;

use crate::error::ProcessError;

/// An OTLP exporter of proclog's spans (HTTP, JSON), batching on a thread of its own.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Exports to the OTLP/HTTP collector at `endpoint` (its base URL, e.g.
    /// `http://collector:4318`; `/v1/traces` is added), a batch at least every `export_every`.
    pub fn otlp(endpoint: &str, export_every: Duration) -> Result<Self, ProcessError> {
        let endpoint = endpoint.trim_end_matches('/');
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(ProcessError::InvalidInput(format!(
                "the OTLP endpoint must be an http:// or https:// URL, got {endpoint:?}"
            )));
        }
        let url = if endpoint.ends_with("/v1/traces") {
            endpoint.to_owned()
        } else {
            format!("{endpoint}/v1/traces")
        };
        // The exporter's HTTP client is a blocking one (the batch runs on its own thread): it
        // is built, and later dropped, away from any async runtime.
        let exporter = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    opentelemetry_otlp::SpanExporter::builder()
                        .with_http()
                        .with_protocol(Protocol::HttpJson)
                        .with_endpoint(url)
                        .with_timeout(Duration::from_secs(10))
                        .build()
                })
                .join()
        })
        .map_err(|_| ProcessError::InvalidInput("building the OTLP exporter panicked".into()))?
        .map_err(|err| ProcessError::InvalidInput(format!("the OTLP exporter: {err}")))?;
        let batch = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_max_queue_size(8_192)
                    .with_scheduled_delay(export_every)
                    .build(),
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(batch)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name("proclog")
                    .build(),
            )
            .build();
        Ok(Self { provider })
    }

    /// The `tracing` layer that exports proclog's spans (and only proclog's).
    pub fn layer<S>(&self) -> impl Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer("proclog"))
            .with_filter(filter_fn(|meta| meta.target().starts_with("proclog")))
    }

    /// Exports every span ended so far.
    pub fn flush(&self) {
        let provider = self.provider.clone();
        let _ = std::thread::spawn(move || provider.force_flush()).join();
    }

    /// Exports what is left and stops the exporter's thread.
    pub fn shutdown(self) {
        let provider = self.provider;
        let _ = std::thread::spawn(move || provider.shutdown()).join();
    }
}

/// Makes `span` continue the trace of `traceparent` (a W3C `traceparent` value), when there
/// is one and it is well formed.
pub(crate) fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent else {
        return;
    };
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(context);
}
