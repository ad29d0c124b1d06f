//! The console's queues page: every queue with limits, its limits, and the running and ready
//! work of its busiest keys (CONTRACT §10). Limits are set over `/v1/queues` or the CLI.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use std::fmt::Write as _;

use super::ApiState;
use super::console::{bounded, esc, page, unavailable_page};
use crate::queue::{Limits, QueueView};

/// Most queues the page shows with their keys (the rest through `/v1/queues`).
const QUEUES_SHOWN: u32 = 20;

/// Most keys shown per queue.
const KEYS_SHOWN: usize = 20;

/// `GET /ui/queues`.
pub(super) async fn queues_page(State(state): State<ApiState>) -> Response {
    let cluster = &state.services.cluster;
    let views = bounded(async {
        let mut views = Vec::new();
        for record in cluster.list_queues(None, QUEUES_SHOWN).await? {
            if let Some(view) = cluster.get_queue(&record.queue).await? {
                views.push(view);
            }
        }
        Ok(views)
    })
    .await;
    let views = match views {
        Ok(views) => views,
        Err(err) => return unavailable_page(&state, &err),
    };
    let mut sections = String::new();
    for view in &views {
        sections.push_str(&render_queue(view));
    }
    let empty = if views.is_empty() {
        r#"<p class="hint">No queue has limits: every queue's work is claimed oldest first. Set some with <code>PUT /v1/queues/{queue}</code> or <code>proclog queue set</code>.</p>"#
    } else {
        ""
    };
    let body = format!(
        r#"<p><a href="/">← all processes</a></p>
<section class="panel" id="queues"><h1>Queues</h1>
<p class="hint">A queue with limits is served key by key, round-robin; running counts live leases, ready counts work waiting for a slot.</p>
{empty}{sections}</section>"#
    );
    page("Queues", "", &body).into_response()
}

/// A scope's limits in a few words (`none` when nothing limits it).
fn describe(limits: &Limits) -> String {
    let mut parts = Vec::new();
    if let Some(limit) = limits.concurrency {
        parts.push(format!("{limit} at once"));
    }
    if let Some(limit) = limits.per_pod {
        parts.push(format!("{limit} per pod"));
    }
    if let Some(rate) = limits.rate {
        parts.push(format!("{} per {} ms", rate.starts, rate.period_ms));
    }
    if parts.is_empty() {
        "none".to_owned()
    } else {
        parts.join(", ")
    }
}

fn render_queue(view: &QueueView) -> String {
    let limits = &view.record.limits;
    let mut named = String::new();
    for (key, key_limits) in limits.keys.iter().take(KEYS_SHOWN) {
        let _ = write!(
            named,
            "<li><code>{}</code>: {}</li>",
            esc(key),
            esc(&describe(key_limits))
        );
    }
    let mut rows = String::new();
    for load in view.keys.iter().take(KEYS_SHOWN) {
        let key = if load.key.is_empty() {
            "<em>no key</em>".to_owned()
        } else {
            esc(&load.key)
        };
        let _ = write!(
            rows,
            "<tr><td>{key}</td><td>{}</td><td>{}</td></tr>",
            load.running, load.ready
        );
    }
    let (running, ready) = view.keys.iter().fold((0, 0), |(running, ready), load| {
        (running + load.running, ready + load.ready)
    });
    format!(
        r#"<article class="queue" data-queue="{name}"><h2>{name}</h2>
<p>queue: {queue_limits} · each key: {key_limits} · {running} running, {ready} ready</p>
<ul>{named}</ul>
<table><thead><tr><th>key</th><th>running</th><th>ready</th></tr></thead><tbody>{rows}</tbody></table></article>"#,
        name = esc(&view.record.queue),
        queue_limits = esc(&describe(&limits.queue)),
        key_limits = esc(&describe(&limits.each_key)),
    )
}
