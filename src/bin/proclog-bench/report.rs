//! Rows, latency summaries and the Markdown table.

use std::time::Duration;

use serde::Serialize;

/// One line of the table.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Row {
    pub workload: String,
    pub concurrency: usize,
    /// Events (or operations) per second of the raw-SQL baseline.
    pub baseline_per_sec: Option<f64>,
    /// Events (or operations) per second of proclog.
    pub proclog_per_sec: Option<f64>,
    /// proclog / baseline.
    pub ratio: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// Anything else worth saying (units, counts).
    pub note: String,
}

impl Row {
    pub fn new(workload: impl Into<String>, concurrency: usize) -> Self {
        Self {
            workload: workload.into(),
            concurrency,
            ..Self::default()
        }
    }

    pub fn rates(mut self, baseline: Option<f64>, proclog: f64) -> Self {
        self.baseline_per_sec = baseline;
        self.proclog_per_sec = Some(proclog);
        self.ratio = baseline.map(|b| proclog / b);
        self
    }

    pub fn latency(mut self, latency: &Latency) -> Self {
        self.p50_ms = Some(latency.p50);
        self.p99_ms = Some(latency.p99);
        self.max_ms = Some(latency.max);
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }
}

/// p50 / p99 / max of a sample, in milliseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Latency {
    pub fn of(samples: &mut [Duration]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort();
        let at = |q: f64| {
            let index = ((samples.len() as f64 - 1.0) * q).round() as usize;
            samples[index].as_secs_f64() * 1000.0
        };
        Self {
            p50: at(0.5),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

fn cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "".into(), |v| format!("{v:.decimals$}"))
}

/// The Markdown table of `rows`.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| workload | concurrency | baseline /s | proclog /s | ratio | p50 ms | p99 ms | max ms | note |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n",
    );
    for row in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            row.workload,
            row.concurrency,
            cell(row.baseline_per_sec, 0),
            cell(row.proclog_per_sec, 0),
            cell(row.ratio, 2),
            cell(row.p50_ms, 2),
            cell(row.p99_ms, 2),
            cell(row.max_ms, 2),
            row.note
        ));
    }
    out
}
