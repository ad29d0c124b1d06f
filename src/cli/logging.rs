//! Log output: human-readable text or JSON lines, filtered by `RUST_LOG` (default `info`),
//! coloured only on a terminal without `NO_COLOR`.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with the current span fields (process id, pod).
    Json,
}

/// Installs the global subscriber (once; later calls are ignored).
pub fn init_logging(format: LogFormat) {
    init_logging_with(format, None);
}

/// [`init_logging`], also exporting proclog's spans through `telemetry` when given.
pub fn init_logging_with(format: LogFormat, telemetry: Option<&crate::telemetry::Telemetry>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal, and never with NO_COLOR set (https://no-color.org): logs
    // collected by `docker logs` or a log shipper stay plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty());
    let text = tracing_subscriber::fmt::layer()
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let lines: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => Box::new(text.with_filter(filter)),
        LogFormat::Json => Box::new(text.json().with_current_span(true).with_filter(filter)),
    };
    let _ = tracing_subscriber::registry()
        .with(lines)
        .with(telemetry.map(crate::telemetry::Telemetry::layer))
        .try_init();
}
