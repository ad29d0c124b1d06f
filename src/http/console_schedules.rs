//! The console's schedules page: every schedule with its next and last due time, and
//! buttons to pause, resume, trigger or delete it (CONTRACT §10).

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use std::fmt::Write as _;

use super::ApiState;
use super::console::{bounded, error_page, esc, page, time, unavailable_page, url_part};
use crate::pod::scheduler;
use crate::schedule::ScheduleRecord;

/// Most schedules the page lists (the rest through `/v1/schedules`).
const SCHEDULES_SHOWN: u32 = 200;

/// `GET /ui/schedules`.
pub(super) async fn schedules_page(State(state): State<ApiState>) -> Response {
    let listed = bounded(state.services.cluster.list_schedules(None, SCHEDULES_SHOWN)).await;
    let schedules = match listed {
        Ok(schedules) => schedules,
        Err(err) => return unavailable_page(&state, &err),
    };
    let mut rows = String::new();
    for schedule in &schedules {
        rows.push_str(&render_row(schedule));
    }
    let empty = if schedules.is_empty() {
        r#"<p class="hint">No schedules yet: <code>POST /v1/schedules</code> or <code>proclog schedule create</code>.</p>"#
    } else {
        ""
    };
    let body = format!(
        r#"<p><a href="/">← all processes</a></p>
<section class="panel" id="schedules"><h1>Schedules</h1>
<p class="hint">Each due time makes one process, <code>&lt;schedule&gt;.&lt;due time&gt;</code>, whatever the number of pods. Times are UTC; each expression is read in its own time zone.</p>
{empty}<table><thead><tr><th>schedule</th><th>cron</th><th>time zone</th><th>kind</th><th>overlap</th><th>catch-up</th><th>next due</th><th>last due</th><th>skipped</th><th></th></tr></thead><tbody>{rows}</tbody></table></section>"#
    );
    page("Schedules", "", &body).into_response()
}

fn render_row(schedule: &ScheduleRecord) -> String {
    let id = url_part(&schedule.spec.id);
    let action = |name: &str, label: &str, class: &str| {
        format!(
            r#"<form method="post" action="/ui/schedules/{id}/{name}" class="inline"><button type="submit"{class}>{label}</button></form>"#
        )
    };
    let mut actions = String::new();
    if schedule.paused {
        actions.push_str(&action("resume", "Resume", ""));
    } else {
        actions.push_str(&action("pause", "Pause", ""));
    }
    actions.push_str(&action("trigger", "Run now", ""));
    actions.push_str(&action("delete", "Delete", r#" class="danger""#));
    let next = match (&schedule.next_due_at, schedule.paused) {
        (_, true) => "paused".to_owned(),
        (Some(at), false) => time(at),
        (None, false) => "none".to_owned(),
    };
    let last = match (&schedule.last_due_at, &schedule.last_process_id) {
        (Some(at), Some(process)) => format!(
            r#"<a href="/ui/processes/{}">{}</a>"#,
            url_part(process.as_str()),
            time(at)
        ),
        _ => "never".to_owned(),
    };
    let mut row = String::new();
    let _ = write!(
        row,
        r#"<tr data-schedule="{sid}"><td>{sid}</td><td><code>{cron}</code></td><td>{zone}</td><td>{kind}</td><td>{overlap}</td><td>{catch_up}</td><td>{next}</td><td>{last}</td><td>{skipped}</td><td>{actions}</td></tr>"#,
        sid = esc(&schedule.spec.id),
        cron = esc(&schedule.spec.cron),
        zone = esc(&schedule.spec.time_zone),
        kind = esc(&schedule.spec.kind),
        overlap = schedule.spec.overlap.as_str(),
        catch_up = schedule.spec.catch_up.as_str(),
        skipped = schedule.skipped,
    );
    row
}

/// `POST /ui/schedules/{id}/{action}`: pause, resume, trigger (then the new process's page)
/// or delete, then back to the schedules.
pub(super) async fn schedule_action(
    State(state): State<ApiState>,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    if let Err(err) = crate::validate::schedule_id(&id) {
        return error_page(&state, &err);
    }
    let services = &state.services;
    let (store, registry) = (services.cluster.as_ref(), services.registry.as_ref());
    let done = match action.as_str() {
        "pause" | "resume" => scheduler::pause_schedule(store, &id, action == "pause")
            .await
            .map(|_| None),
        "trigger" => scheduler::trigger_schedule(store, registry, &id)
            .await
            .map(|process| Some(process.id)),
        "delete" => match store.delete_schedule(&id).await {
            Ok(true) => Ok(None),
            Ok(false) => Err(crate::ProcessError::ScheduleNotFound(id.clone())),
            Err(err) => Err(err),
        },
        _ => Err(crate::ProcessError::InvalidInput(format!(
            "no schedule action {action:?}"
        ))),
    };
    match done {
        Ok(Some(process)) => {
            Redirect::to(&format!("/ui/processes/{}", url_part(process.as_str()))).into_response()
        }
        Ok(None) => Redirect::to("/ui/schedules").into_response(),
        Err(err) => error_page(&state, &err),
    }
}
