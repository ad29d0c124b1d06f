//! `/metrics` in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::ApiState;

fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let _ = writeln!(out, "{name} {value}");
}

fn load(value: &AtomicU64) -> u64 {
    value.load(Ordering::Relaxed)
}

pub(super) async fn render(State(state): State<ApiState>) -> impl IntoResponse {
    let services = &state.services;
    let notifier = services.notifier.stats();
    let listener = services.listener.stats();
    let driver = services.driver.stats();
    let mut out = String::new();
    metric(
        &mut out,
        "proclog_appended_events_total",
        "counter",
        "Events appended through this pod.",
        load(&services.appended_events),
    );
    metric(
        &mut out,
        "proclog_notices_sent_total",
        "counter",
        "Notices handed to Postgres NOTIFY.",
        load(&notifier.sent),
    );
    metric(
        &mut out,
        "proclog_notices_dropped_total",
        "counter",
        "Notices dropped (channel full or send failed).",
        load(&notifier.dropped),
    );
    metric(
        &mut out,
        "proclog_notice_batches_total",
        "counter",
        "NOTIFY round trips.",
        load(&notifier.batches),
    );
    metric(
        &mut out,
        "proclog_notices_received_total",
        "counter",
        "Notices from other pods turned into local ticks.",
        load(&listener.notices),
    );
    metric(
        &mut out,
        "proclog_listener_reconnects_total",
        "counter",
        "Listener reconnects after a lost connection.",
        load(&listener.reconnects),
    );
    metric(
        &mut out,
        "proclog_listener_up",
        "gauge",
        "1 while the listener is listening.",
        u64::from(services.listener.status() == crate::pg::ListenerStatus::Listening),
    );
    metric(
        &mut out,
        "proclog_await_waiters",
        "gauge",
        "await_terminal callers waiting.",
        load(&driver.waiters),
    );
    metric(
        &mut out,
        "proclog_await_polls_total",
        "counter",
        "Terminal-column poll rounds.",
        load(&driver.polls),
    );
    if let Some(worker) = &state.worker {
        metric(
            &mut out,
            "proclog_active_leases",
            "gauge",
            "Runs in progress, each holding a lease.",
            load(&worker.active),
        );
        metric(
            &mut out,
            "proclog_runs_started_total",
            "counter",
            "Runs started.",
            load(&worker.started),
        );
        metric(
            &mut out,
            "proclog_recoveries_total",
            "counter",
            "Processes taken over from a lost owner.",
            load(&worker.recoveries),
        );
        metric(
            &mut out,
            "proclog_runs_completed_total",
            "counter",
            "Runs that completed their process.",
            load(&worker.completed),
        );
        metric(
            &mut out,
            "proclog_leases_lost_total",
            "counter",
            "Runs stopped because their lease was lost or could not be confirmed in time.",
            load(&worker.leases_lost),
        );
        metric(
            &mut out,
            "proclog_leases_released_total",
            "counter",
            "Runs handed back on shutdown.",
            load(&worker.released),
        );
        metric(
            &mut out,
            "proclog_write_retries_total",
            "counter",
            "Run writes (start, appends, completion, renewal, release) retried after a transient failure.",
            load(&worker.write_retries),
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
