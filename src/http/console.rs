//! The web console, served by every pod at `/`: server-rendered HTML with a little plain
//! JavaScript (`console/console.js`, embedded in the binary like the stylesheet).
//!
//! - `/`: pods (running, draining, stopped, gone) with heartbeat age and leases held; process
//!   counts by status; the newest processes, filtered by status, kind and pod, keyset-paged.
//! - `/ui/processes/{id}`: the record (disposition, attempts, lease owner and generation,
//!   terminal column) and the event timeline, streamed live from `/v1/processes/{id}/stream`,
//!   with each event's writer and lease generation: a takeover shows as a change of both.
//! - Actions: start a demo process, cancel a process (HTML forms, POST then redirect).
//!
//! The pages refresh their data by fetching themselves with `?fragment=1`; when the pod stops
//! answering or the database is down they say so and keep trying, with the last data shown.
//! When the pod has an API token, the console asks for it once and keeps it in an HttpOnly,
//! SameSite=Strict cookie, which `/v1` accepts too (the page's event stream uses it).

use std::fmt::Write;

use axum::Form;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiState;
use crate::model::{ProcessEvent, ProcessId, ProcessRecord, ProcessRegistration};
use crate::store::{PodView, ProcessQuery, ProcessSummary};

/// The cookie that carries the API token for the console.
pub(super) const TOKEN_COOKIE: &str = "proclog_token";
/// Events shown on a process page (the latest ones) before the live stream takes over.
const TIMELINE_FIRST_PAGE: u32 = 500;
/// Bound on the console's reads, under the pool's own statement timeout.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(4);
/// How long the overview waits for the counts by status before showing the page without.
const COUNTS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// `call`, or `Unavailable` when it takes longer than [`READ_TIMEOUT`] (a stalled network).
pub(super) async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, crate::ProcessError>>,
) -> Result<T, crate::ProcessError> {
    tokio::time::timeout(READ_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(crate::ProcessError::Unavailable(format!(
                "no answer from the database within {READ_TIMEOUT:?}"
            )))
        })
}
/// Rows of the process list per page.
const PAGE: i64 = 50;

const CONSOLE_JS: &str = include_str!("console/console.js");
const CONSOLE_CSS: &str = include_str!("console/console.css");

/// Text escaped for HTML content and attribute values.
pub(super) fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A query-string component, percent-encoded.
pub(super) fn url_part(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

pub(super) fn time(at: &DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S%.3f").to_string()
}

/// How long a console session lasts after sign-in.
pub(super) const SESSION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(12 * 3600);

fn session_tag(token: &str, expires: i64) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, token.as_bytes());
    let tag = ring::hmac::sign(
        &key,
        format!("proclog console session v2|{expires}").as_bytes(),
    );
    tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A console session value for `token` ending at `expires` (Unix seconds):
/// `<expires>.<HMAC of the expiry keyed by the token>`, so the cookie never carries the
/// token itself, cannot be extended by its holder, and every pod with the same token accepts
/// it (cookies are shared across a host's ports: the page can move to another pod).
pub(super) fn session_value(token: &str, expires: i64) -> String {
    format!("{expires}.{}", session_tag(token, expires))
}

/// Whether `value` is a session of `token` that has not expired.
pub(super) fn session_valid(token: &str, value: &str) -> bool {
    let Some((expires, tag)) = value.split_once('.') else {
        return false;
    };
    let Ok(expires) = expires.parse::<i64>() else {
        return false;
    };
    expires > Utc::now().timestamp()
        && super::same_secret(tag.as_bytes(), session_tag(token, expires).as_bytes())
}

/// A `403` page for a refused request (another host name, a write from another origin).
pub(super) fn refused_page(message: &str, status: StatusCode) -> Response {
    let body = format!(r#"<p class="error">{}</p>"#, esc(message));
    (status, page("Refused", "", &body)).into_response()
}

/// The session value in the console's cookie, if any.
pub(super) fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == TOKEN_COOKIE)
        .map(|(_, value)| value.to_owned())
}

/// Console routes need a live session cookie when the pod has a token: pages redirect to the
/// login form, actions answer 401. (Actions from other origins were refused before this, by
/// [`super::guard`].)
pub(super) async fn require_console_token(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(expected) = &state.token {
        let authorized =
            cookie_token(request.headers()).is_some_and(|given| session_valid(expected, &given));
        if !authorized {
            if request.method() == axum::http::Method::GET {
                return Redirect::to("/ui/login").into_response();
            }
            return (StatusCode::UNAUTHORIZED, page("Sign in", "", LOGIN_FORM)).into_response();
        }
    }
    next.run(request).await
}

const DEMO_FORM: &str = r#"
<section class="panel"><h2>Start a demo process</h2>
<form method="post" action="/ui/demo" class="row" id="demo-form">
<label>Steps <input type="number" name="steps" min="1" max="1000" value="20"></label>
<label>Delay per step, ms <input type="number" name="delay_ms" min="0" max="60000" value="500"></label>
<label>If its pod dies <select name="disposition"><option value="rerun">rerun</option><option value="abandon">abandon</option></select></label>
<button type="submit">Start</button></form></section>"#;

const LOGOUT_FORM: &str = r#"
<form method="post" action="/ui/logout" class="row"><button type="submit">Sign out</button></form>"#;

const LOGIN_FORM: &str = r#"<section class="panel"><h2>This pod has an API token</h2>
<form method="post" action="/ui/login" class="row">
<label>Token <input type="password" name="token" autocomplete="current-password" required></label>
<button type="submit">Open the console</button></form></section>"#;

pub(super) fn page(title: &str, head_extra: &str, body: &str) -> axum::response::Html<String> {
    axum::response::Html(format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · proclog</title>
<link rel="stylesheet" href="/ui/assets/console.css">{head_extra}
<script src="/ui/assets/console.js" defer></script>
</head><body>
<header><a href="/" class="brand">proclog</a><a href="/ui/schedules" class="nav">schedules</a><a href="/ui/queues" class="nav">queues</a><span id="connection" class="connection ok" role="status">live</span></header>
<main><div id="banner"></div>{body}</main>
</body></html>"#,
        title = esc(title),
    ))
}

/// `GET /ui/login`.
pub(super) async fn login_form() -> Response {
    page("Sign in", "", LOGIN_FORM).into_response()
}

#[derive(Deserialize)]
pub(super) struct LoginForm {
    token: String,
}

/// `POST /ui/login`: a right token sets the session cookie (for [`SESSION_LIFETIME`]) and
/// goes to the console.
pub(super) async fn login(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let Some(expected) = &state.token else {
        return Redirect::to("/").into_response();
    };
    if !super::same_secret(form.token.as_bytes(), expected.as_bytes()) {
        let body = format!(r#"<p class="error">That token is not this pod's.</p>{LOGIN_FORM}"#);
        return (StatusCode::UNAUTHORIZED, page("Sign in", "", &body)).into_response();
    }
    let lifetime = SESSION_LIFETIME.as_secs();
    let expires = Utc::now().timestamp() + lifetime as i64;
    let cookie = session_cookie(
        &session_value(expected, expires),
        lifetime,
        state.access.cookies_secure(&headers),
    );
    with_cookie(Redirect::to("/").into_response(), &cookie)
}

/// `POST /ui/logout`: ends the session (the cookie is cleared) and shows the sign-in form.
pub(super) async fn logout(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let cookie = session_cookie("", 0, state.access.cookies_secure(&headers));
    with_cookie(Redirect::to("/ui/login").into_response(), &cookie)
}

fn session_cookie(value: &str, max_age: u64, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{TOKEN_COOKIE}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}")
}

fn with_cookie(mut response: Response, cookie: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// `GET /ui/assets/{file}`.
pub(super) async fn asset(Path(file): Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "console.js" => (CONSOLE_JS, "text/javascript; charset=utf-8"),
        "console.css" => (CONSOLE_CSS, "text/css; charset=utf-8"),
        _ => {
            return (
                StatusCode::NOT_FOUND,
                page("Not found", "", r#"<p class="error">No such asset.</p>"#),
            )
                .into_response();
        }
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[derive(Deserialize, Default)]
pub(super) struct OverviewQuery {
    #[serde(default)]
    status: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    pod: String,
    #[serde(default)]
    before: String,
    #[serde(default)]
    fragment: Option<String>,
}

fn non_empty(text: &str) -> Option<String> {
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

fn parse_before(raw: &str) -> Option<(DateTime<Utc>, ProcessId)> {
    let (at, id) = raw.split_once('|')?;
    let at = DateTime::parse_from_rfc3339(at).ok()?.with_timezone(&Utc);
    Some((at, ProcessId::new(id).ok()?))
}

/// `GET /`: pods, counts and processes.
pub(super) async fn overview(
    State(state): State<ApiState>,
    query: Result<Query<OverviewQuery>, QueryRejection>,
) -> Response {
    // A malformed query string shows the unfiltered list.
    let query = query.map(|Query(query)| query).unwrap_or_default();
    let filters = ProcessQuery {
        status: non_empty(&query.status),
        kind: non_empty(&query.kind).filter(|kind| kind.len() <= 200),
        owner: non_empty(&query.pod).filter(|pod| pod.len() <= 200),
        before: non_empty(&query.before).and_then(|raw| parse_before(&raw)),
        limit: PAGE,
    };
    let cluster = &state.services.cluster;
    let loaded = bounded(async {
        let pods = cluster.pods().await?;
        let processes = cluster.process_summaries(&filters).await?;
        Ok::<_, crate::ProcessError>((pods, processes))
    })
    .await;
    // Counting a large table can take a while: the counts are shown when they come quickly.
    let counts = tokio::time::timeout(COUNTS_TIMEOUT, cluster.status_counts())
        .await
        .ok()
        .and_then(Result::ok);
    let (status, live, peers) = match loaded {
        Ok((pods, processes)) => (
            StatusCode::OK,
            render_overview(&state, &query, &pods, counts.as_deref(), &processes),
            peers_meta(&state, &pods),
        ),
        Err(err) => (
            StatusCode::SERVICE_UNAVAILABLE,
            database_down(&state, &err),
            String::new(),
        ),
    };
    if query.fragment.is_some() {
        return (status, axum::response::Html(live)).into_response();
    }
    let demo = if state.demo_form { DEMO_FORM } else { "" };
    let session = if state.token.is_some() {
        LOGOUT_FORM
    } else {
        ""
    };
    let body = format!(r#"<div id="live" data-refresh="2000">{live}</div>{demo}{session}"#);
    (status, page("Console", &peers, &body)).into_response()
}

/// A `<meta>` listing the other running pods' consoles, which `console.js` tries, in order,
/// when the pod serving the page stops answering (reachable ones only: a pod reports the
/// address it listens on, which a browser may not reach).
fn peers_meta(state: &ApiState, pods: &[PodView]) -> String {
    let peers: Vec<String> = pods
        .iter()
        .filter(|pod| pod.status == "running" && pod.pod_id != state.services.pod_id)
        .filter_map(|pod| pod.address.as_deref())
        .filter(|address| {
            !address.is_empty()
                && address
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .map(|address| format!("http://{address}"))
        .collect();
    format!(
        r#"
<meta name="proclog-peers" content="{}">"#,
        esc(&peers.join(" "))
    )
}

async fn peers_of(state: &ApiState) -> String {
    match state.services.cluster.pods().await {
        Ok(pods) => peers_meta(state, &pods),
        Err(_) => String::new(),
    }
}

/// A whole page saying the database does not answer, with status 503.
pub(super) fn unavailable_page(state: &ApiState, err: &crate::ProcessError) -> Response {
    let body = database_down(state, err);
    (
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        page("Unavailable", "", &body),
    )
        .into_response()
}

pub(super) fn database_down(state: &ApiState, err: &crate::ProcessError) -> String {
    format!(
        r#"<p class="error" id="database-error" role="alert">The database is not answering this pod ({pod}): {err}. Showing nothing stale; retrying.</p>"#,
        pod = esc(&state.services.pod_id),
        err = esc(&err.to_string()),
    )
}

fn render_overview(
    state: &ApiState,
    query: &OverviewQuery,
    pods: &[PodView],
    counts: Option<&[(String, i64)]>,
    processes: &[ProcessSummary],
) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<section class="panel"><h2>Pods</h2><p class="hint">This page is served by <b>{}</b>.</p>
<table id="pods"><thead><tr><th>pod</th><th>status</th><th>heartbeat</th><th>running</th><th>concurrency</th><th>started</th><th>version</th><th>address</th></tr></thead><tbody>"#,
        esc(&state.services.pod_id)
    );
    if pods.is_empty() {
        out.push_str(r#"<tr><td colspan="8">No pod has registered yet.</td></tr>"#);
    }
    for pod in pods {
        let _ = write!(
            out,
            r#"<tr data-pod="{id}" data-status="{status}"><td><a href="/?pod={id_url}">{id}</a></td><td><span class="badge {status}">{status}</span></td><td>{age:.1} s ago</td><td>{leases}</td><td>{concurrency}</td><td>{started}</td><td>{version}</td><td>{address}</td></tr>"#,
            id = esc(&pod.pod_id),
            id_url = url_part(&pod.pod_id),
            status = esc(&pod.status),
            age = pod.heartbeat_age_secs.max(0.0),
            leases = pod.leases_held,
            concurrency = pod.concurrency,
            started = time(&pod.started_at),
            version = esc(&pod.version),
            address = esc(pod.address.as_deref().unwrap_or("")),
        );
    }
    out.push_str("</tbody></table></section>");

    out.push_str(r#"<section class="panel"><h2>Processes</h2><p id="counts" class="counts">"#);
    let Some(counts) = counts else {
        out.push_str("counts are not available right now (the table is large or busy)</p>");
        return render_rest(out, query, processes);
    };
    let total: i64 = counts.iter().map(|(_, n)| n).sum();
    let _ = write!(out, r#"<a href="/" class="count">all <b>{total}</b></a>"#);
    for (status, count) in counts {
        let _ = write!(
            out,
            r#"<a href="/?status={s_url}" class="count {s}" data-status="{s}">{s} <b>{count}</b></a>"#,
            s = esc(status),
            s_url = url_part(status),
        );
    }
    out.push_str("</p>");
    render_rest(out, query, processes)
}

/// The filters and the process list of the overview.
fn render_rest(mut out: String, query: &OverviewQuery, processes: &[ProcessSummary]) -> String {
    let _ = write!(
        out,
        r#"<form method="get" action="/" class="row filters"><label>Status <select name="status"><option value="">any</option>{options}</select></label>
<label>Kind <input name="kind" value="{kind}" size="12"></label><label>Pod <input name="pod" value="{pod}" size="14"></label><button type="submit">Filter</button> <a href="/">clear</a></form>"#,
        options = [
            "pending",
            "running",
            "waiting",
            "completed",
            "failed",
            "cancelled",
            "abandoned"
        ]
        .iter()
        .map(|s| format!(
            r#"<option{}>{s}</option>"#,
            if query.status == *s { " selected" } else { "" }
        ))
        .collect::<String>(),
        kind = esc(&query.kind),
        pod = esc(&query.pod),
    );
    out.push_str(r#"<table id="processes"><thead><tr><th>process</th><th>kind</th><th>status</th><th>owner</th><th>generation</th><th>attempts</th><th>events</th><th>if its pod dies</th><th>created</th></tr></thead><tbody>"#);
    if processes.is_empty() {
        out.push_str(r#"<tr><td colspan="9">No process matches.</td></tr>"#);
    }
    for process in processes {
        let _ = write!(
            out,
            r#"<tr data-process="{id}" data-status="{status}"><td><a href="/ui/processes/{id_url}">{id}</a></td><td>{kind}</td><td><span class="badge {status}">{status}</span></td><td>{owner}</td><td>{generation}</td><td>{attempts}</td><td>{seq}</td><td>{disposition}</td><td>{created}</td></tr>"#,
            id = esc(&process.id),
            id_url = url_part(&process.id),
            kind = esc(&process.kind),
            status = esc(&process.status),
            owner = esc(process.owner.as_deref().unwrap_or("")),
            generation = process.lease_generation,
            attempts = process.attempts,
            seq = process.last_seq,
            disposition = esc(&process.disposition),
            created = time(&process.created_at),
        );
    }
    out.push_str("</tbody></table>");
    if processes.len() as i64 == PAGE
        && let Some(last) = processes.last()
    {
        let cursor = format!("{}|{}", last.created_at.to_rfc3339(), last.id);
        let _ = write!(
            out,
            r#"<p><a class="next" href="/?status={}&kind={}&pod={}&before={}">older processes</a></p>"#,
            url_part(&query.status),
            url_part(&query.kind),
            url_part(&query.pod),
            url_part(&cursor),
        );
    }
    out.push_str("</section>");
    out
}

#[derive(Deserialize, Default)]
pub(super) struct ProcessPageQuery {
    #[serde(default)]
    fragment: Option<String>,
}

/// `GET /ui/processes/{id}`: the record and the timeline.
pub(super) async fn process_page(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    query: Result<Query<ProcessPageQuery>, QueryRejection>,
) -> Response {
    let fragment = query.is_ok_and(|Query(query)| query.fragment.is_some());
    let Ok(id) = ProcessId::new(id) else {
        return not_a_process_id();
    };
    let registry = &state.services.registry;
    let record = match bounded(registry.get_process(&id)).await {
        Ok(Some(record)) => record,
        Ok(None) => {
            let body = format!(
                r#"<p class="error">No process {} here.</p><p><a href="/">Back to the console</a></p>"#,
                esc(id.as_str())
            );
            return (StatusCode::NOT_FOUND, page("Not found", "", &body)).into_response();
        }
        Err(err) => {
            let body = database_down(&state, &err);
            if fragment {
                return (StatusCode::SERVICE_UNAVAILABLE, axum::response::Html(body))
                    .into_response();
            }
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                page("Unavailable", "", &body),
            )
                .into_response();
        }
    };
    let record_html = render_record(&record);
    if fragment {
        return axum::response::Html(record_html).into_response();
    }
    // The latest events; all of them are in the API (`/v1/processes/{id}/events`).
    let from = (record.last_seq - i64::from(TIMELINE_FIRST_PAGE)).max(0);
    let events = match bounded(registry.events_after(&id, from, TIMELINE_FIRST_PAGE)).await {
        Ok(events) => events,
        Err(err) => {
            let body = database_down(&state, &err);
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                page("Unavailable", "", &body),
            )
                .into_response();
        }
    };
    let last = events.last().map_or(0, |event| event.seq);
    let peers = peers_of(&state).await;
    let mut timeline = String::new();
    let mut previous: Option<&ProcessEvent> = None;
    for event in &events {
        timeline.push_str(&render_event(event, previous));
        previous = Some(event);
    }
    let cancel = if record.terminal.is_none() {
        format!(
            r#"<form method="post" action="/ui/processes/{id}/messages" class="row" id="message-form"><label>Topic <input name="topic" value="{topic}" size="14" maxlength="128" required></label><label>Payload (JSON) <input name="payload" value="{{}}" size="30" maxlength="4000"></label><button type="submit">Send a message</button></form>
<form method="post" action="/ui/processes/{id}/cancel" class="row" id="cancel-form"><label>Reason <input name="reason" value="cancelled from the console" size="30" maxlength="500"></label><button type="submit" class="danger">Cancel this process</button></form>"#,
            id = url_part(id.as_str()),
            topic = esc(record.waiting_for.as_deref().unwrap_or("")),
        )
    } else {
        String::new()
    };
    let steps = match bounded(registry.journal(&id, 0, STEPS_SHOWN)).await {
        Ok(journal) => render_steps(&journal, &events),
        Err(_) => String::new(),
    };
    let children = if !record.has_children {
        String::new()
    } else {
        match bounded(registry.list_processes(crate::ProcessFilter {
            parent: Some(id.clone()),
            limit: Some(CHILDREN_SHOWN),
            ..Default::default()
        }))
        .await
        {
            Ok(page) => render_children(&id, &page),
            Err(_) => String::new(),
        }
    };
    let body = format!(
        r#"<p><a href="/">← all processes</a></p>
<div id="record" data-refresh="2000">{record_html}</div>
{cancel}
{children}
{steps}
<section class="panel"><h2>Timeline</h2>
<p class="hint">Each event with the pod that wrote it and the lease generation it wrote under: a takeover shows as a new writer and a higher generation.</p>
{older}<table id="timeline" data-process="{id}" data-after="{last}"><thead><tr><th>seq</th><th>event</th><th>writer</th><th>generation</th><th>at</th><th>payload</th></tr></thead><tbody>{timeline}</tbody></table>
<p id="stream-state" class="hint"></p></section>"#,
        id = esc(id.as_str()),
        older = if from > 0 {
            format!(
                r#"<p class="hint">Showing the events after seq {from}; every event: <a href="/v1/processes/{0}/events?after=0&amp;limit=1000">/v1/processes/{0}/events</a>.</p>"#,
                url_part(id.as_str())
            )
        } else {
            String::new()
        },
    );
    page(id.as_str(), &peers, &body).into_response()
}

fn render_record(record: &ProcessRecord) -> String {
    let status = serde_json::to_value(record.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let disposition = serde_json::to_value(record.disposition)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let lease = match &record.lease {
        Some(lease) => format!(
            "{} (generation {}, expires {})",
            esc(&lease.owner),
            lease.generation,
            time(&lease.expires_at)
        ),
        None => "none".into(),
    };
    let terminal = match &record.terminal {
        Some(terminal) => format!(
            "{} at seq {}, {}: <code>{}</code>",
            esc(&serde_json::to_value(terminal.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()),
            terminal.seq,
            time(&terminal.completed_at),
            esc(&truncate(&terminal.output.to_string(), 400))
        ),
        None => "not ended".into(),
    };
    let mut schedule = String::new();
    if record.status == crate::ProcessStatus::Waiting || record.wake_at.is_some() {
        let until = match (&record.wake_at, &record.waiting_for) {
            (Some(at), Some(topic)) => {
                format!("a message of <code>{}</code>, or {}", esc(topic), time(at))
            }
            (None, Some(topic)) => format!("a message of <code>{}</code>", esc(topic)),
            (Some(at), None) => time(at),
            (None, None) => "now".into(),
        };
        let _ = write!(schedule, r#"<dt>waits for</dt><dd id="waits">{until}</dd>"#);
    }
    if let Some(deadline) = &record.deadline {
        let _ = write!(
            schedule,
            r#"<dt>deadline</dt><dd id="deadline">{}</dd>"#,
            time(deadline)
        );
    }
    if let Some(parent) = &record.parent {
        let _ = write!(
            schedule,
            r#"<dt>parent</dt><dd id="parent"><a href="/ui/processes/{}">{}</a></dd>"#,
            url_part(parent.as_str()),
            esc(parent.as_str())
        );
    }
    if record.queue != record.kind || record.concurrency_key.is_some() || record.priority != 0 {
        let key = record
            .concurrency_key
            .as_deref()
            .map_or_else(String::new, |key| {
                format!(", key <code>{}</code>", esc(key))
            });
        let _ = write!(
            schedule,
            r#"<dt>queue</dt><dd id="queue"><a href="/ui/queues">{}</a>{key}, priority {}</dd>"#,
            esc(&record.queue),
            record.priority
        );
    }
    if record.retries > 0 || record.retry_policy.is_some() {
        let _ = write!(
            schedule,
            r#"<dt>failure retries</dt><dd id="retries">{}{}</dd>"#,
            record.retries,
            record
                .retry_policy
                .as_ref()
                .map_or_else(String::new, |policy| format!(
                    " (at most {} runs)",
                    policy.max_attempts
                ))
        );
    }
    format!(
        r#"<section class="panel"><h1>{id} <span class="badge {status}" id="status">{status}</span></h1>
<dl class="record"><dt>kind</dt><dd>{kind}</dd><dt>if its pod dies</dt><dd>{disposition}</dd><dt>attempts</dt><dd id="attempts">{attempts}</dd>
<dt>lease</dt><dd id="lease">{lease}</dd><dt>latest generation</dt><dd id="generation">{generation}</dd>
<dt>events</dt><dd>{last_seq}</dd>{schedule}<dt>terminal column</dt><dd id="terminal">{terminal}</dd>
<dt>input</dt><dd><code>{input}</code></dd><dt>created</dt><dd>{created}</dd></dl></section>"#,
        id = esc(record.id.as_str()),
        kind = esc(&record.kind),
        attempts = record.attempts,
        generation = record.lease_generation,
        last_seq = record.last_seq,
        input = esc(&truncate(&record.input.to_string(), 400)),
        created = time(&record.created_at),
    )
}

/// Most children the process page lists.
const CHILDREN_SHOWN: u32 = 100;

/// The children panel: each child with its status, linked to its own page (where its own
/// children are), and where the rest are when there are more.
fn render_children(id: &ProcessId, page: &crate::ProcessPage) -> String {
    if page.processes.is_empty() {
        return String::new();
    }
    let mut rows = String::new();
    for child in &page.processes {
        let status = serde_json::to_value(child.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let _ = write!(
            rows,
            r#"<tr data-child="{id}"><td><a href="/ui/processes/{id_url}">{id}</a></td><td>{kind}</td><td><span class="badge {status}">{status}</span></td><td>{created}</td></tr>"#,
            id = esc(child.id.as_str()),
            id_url = url_part(child.id.as_str()),
            kind = esc(&child.kind),
            status = esc(&status),
            created = time(&child.created_at),
        );
    }
    let more = if page.next.is_some() {
        format!(
            r#"<p class="hint">The first {CHILDREN_SHOWN}; every child: <a href="/v1/processes/{0}/children">/v1/processes/{0}/children</a>.</p>"#,
            url_part(id.as_str())
        )
    } else {
        String::new()
    };
    format!(
        r#"<section class="panel" id="children"><h2>Children</h2>
<p class="hint">Processes this one started; cancelling it cancels those that have not ended.</p>
<table><thead><tr><th>child</th><th>kind</th><th>status</th><th>created</th></tr></thead><tbody>{rows}</tbody></table>{more}</section>"#
    )
}

/// Most steps, timers and receipts the process page lists.
const STEPS_SHOWN: u32 = 200;

/// The journal panel: each stored step, timer and receipt with the run (lease generation)
/// that stored it, and how many later runs started since among the events shown (each that
/// got that far found it stored and did not execute it again).
fn render_steps(journal: &[ProcessEvent], recent: &[ProcessEvent]) -> String {
    if journal.is_empty() {
        return String::new();
    }
    let runs: Vec<i64> = recent
        .iter()
        .filter(|event| event.event_type == crate::reserved::STARTED)
        .filter_map(|event| event.lease_generation)
        .collect();
    let mut rows = String::new();
    for entry in journal {
        let generation = entry.lease_generation.unwrap_or_default();
        let later = runs.iter().filter(|run| **run > generation).count();
        let (kind, name, detail) = match entry.event_type.as_str() {
            crate::reserved::STEP => (
                "step",
                entry.payload["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                truncate(&entry.payload["output"].to_string(), 200),
            ),
            crate::reserved::TIMER => (
                "timer",
                entry.payload["name"].as_str().map_or_else(
                    || format!("receive {}", entry.payload["topic"]),
                    str::to_owned,
                ),
                truncate(&entry.payload.to_string(), 200),
            ),
            crate::reserved::SPAWNED => (
                "child",
                entry.payload["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                entry.payload["child"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            ),
            _ => (
                "receipt",
                format!(
                    "{} #{}",
                    entry.payload["topic"].as_str().unwrap_or_default(),
                    entry.payload["n"]
                ),
                truncate(&entry.payload.to_string(), 200),
            ),
        };
        let _ = write!(
            rows,
            r#"<tr class="{kind}"><td>{kind}</td><td>{name}</td><td>{seq}</td><td>g{generation}</td><td>{replayed}</td><td>{at}</td><td><code>{detail}</code></td></tr>"#,
            name = esc(&name),
            seq = entry.seq,
            replayed = if later == 0 {
                "stored".to_owned()
            } else {
                format!("stored; {later} later run(s) since")
            },
            at = time(&entry.occurred_at),
            detail = esc(&detail),
        );
    }
    format!(
        r#"<section class="panel"><h2>Steps, timers, receipts and spawns</h2>
<p class="hint">What a later run of this process (a rerun, a resume after a wait, a retry) finds stored and does not do again when it gets there.</p>
<table id="steps"><thead><tr><th>what</th><th>name</th><th>seq</th><th>stored by run</th><th></th><th>at</th><th>stored</th></tr></thead><tbody>{rows}</tbody></table></section>"#
    )
}

#[derive(Deserialize)]
pub(super) struct MessageForm {
    topic: String,
    payload: Option<String>,
}

/// `POST /ui/processes/{id}/messages`.
pub(super) async fn send_message(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Form(form): Form<MessageForm>,
) -> Response {
    let Ok(id) = ProcessId::new(id) else {
        return not_a_process_id();
    };
    let payload = match form.payload.as_deref().map(str::trim) {
        None | Some("") => Value::Null,
        Some(text) => match serde_json::from_str(text) {
            Ok(payload) => payload,
            Err(err) => {
                return error_page(
                    &state,
                    &crate::ProcessError::InvalidInput(format!("the payload is not JSON: {err}")),
                );
            }
        },
    };
    let message = crate::Message::new(form.topic.trim(), payload);
    match state.services.registry.send_message(&id, message).await {
        Ok(_) => Redirect::to(&format!("/ui/processes/{}", url_part(id.as_str()))).into_response(),
        Err(err) => error_page(&state, &err),
    }
}

fn truncate(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_owned();
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// One timeline row; the same markup as `console.js` builds for streamed events.
fn render_event(event: &ProcessEvent, previous: Option<&ProcessEvent>) -> String {
    let generation = event
        .lease_generation
        .map_or_else(|| "–".to_owned(), |g| g.to_string());
    let takeover = previous.is_some_and(|previous| {
        previous.writer != event.writer || previous.lease_generation != event.lease_generation
    });
    format!(
        r#"<tr data-seq="{seq}" data-writer="{writer}" data-generation="{generation}" class="{class}"><td>{seq}</td><td>{kind}</td><td>{writer}</td><td>{generation}</td><td>{at}</td><td><code>{payload}</code></td></tr>"#,
        seq = event.seq,
        writer = esc(&event.writer),
        class = if takeover { "takeover" } else { "" },
        kind = esc(&event.event_type),
        at = time(&event.occurred_at),
        payload = esc(&truncate(&event.payload.to_string(), 300)),
    )
}

#[derive(Deserialize)]
pub(super) struct DemoForm {
    steps: Option<String>,
    delay_ms: Option<String>,
    disposition: Option<String>,
}

/// `POST /ui/demo`: registers a `steps` demo process and shows it.
pub(super) async fn start_demo(
    State(state): State<ApiState>,
    Form(form): Form<DemoForm>,
) -> Response {
    if !state.demo_form {
        let body = r#"<p class="error">This pod does not run the demo engines.</p>"#;
        return (StatusCode::NOT_FOUND, page("Not found", "", body)).into_response();
    }
    let number = |raw: &Option<String>, default: u64, max: u64| {
        raw.as_deref()
            .and_then(|raw| raw.trim().parse::<u64>().ok())
            .unwrap_or(default)
            .min(max)
    };
    let steps = number(&form.steps, 20, 1000).max(1);
    let delay_ms = number(&form.delay_ms, 500, 60_000);
    let disposition = match form.disposition.as_deref() {
        Some("abandon") => crate::Disposition::Abandon,
        _ => crate::Disposition::Rerun,
    };
    let registration =
        ProcessRegistration::new("steps", json!({"steps": steps, "delay_ms": delay_ms}))
            .with_disposition(disposition);
    match state.services.registry.register_process(registration).await {
        Ok(record) => {
            // The registry's work hint has woken the workers.
            Redirect::to(&format!("/ui/processes/{}", url_part(record.id.as_str()))).into_response()
        }
        Err(err) => error_page(&state, &err),
    }
}

#[derive(Deserialize)]
pub(super) struct CancelForm {
    reason: Option<String>,
}

/// `POST /ui/processes/{id}/cancel`.
pub(super) async fn cancel(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Form(form): Form<CancelForm>,
) -> Response {
    let Ok(id) = ProcessId::new(id) else {
        return not_a_process_id();
    };
    let reason = form.reason.map(|reason| truncate(&reason, 500)).map_or(
        Value::Null,
        |reason| json!({"reason": reason, "from": "console"}),
    );
    match crate::pod::cancel_process(
        state.services.registry.as_ref(),
        &id,
        &state.services.pod_id,
        reason,
        None,
    )
    .await
    {
        Ok(_) => Redirect::to(&format!("/ui/processes/{}", url_part(id.as_str()))).into_response(),
        Err(err) => error_page(&state, &err),
    }
}

/// 400 for a path id that breaks the id rules.
fn not_a_process_id() -> Response {
    let body = r#"<p class="error">That is not a process id.</p>"#;
    (StatusCode::BAD_REQUEST, page("Bad id", "", body)).into_response()
}

pub(super) fn error_page(state: &ApiState, err: &crate::ProcessError) -> Response {
    let status = super::ApiError::from(err.clone()).status;
    let body = format!(
        r#"<p class="error" role="alert">{}</p><p><a href="/">Back to the console</a></p>"#,
        esc(&err.to_string())
    );
    let _ = state;
    (status, page("Error", "", &body)).into_response()
}
