//! Client commands: talk to a pod's HTTP API and print JSON.
//!
//! Every request has a deadline (`--request-timeout-ms`, `PROCLOG_CLIENT_TIMEOUT_MS`), process
//! ids are checked and percent-encoded before they go into a URL, and failures are
//! [`CliError`]s carrying the exit codes of [`super::exit_code`].

use std::fmt::Write as _;
use std::io::Write;
use std::time::Duration;

use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use super::exit_code::{AWAIT_TIMEOUT, FAILURE, UNREACHABLE};
use super::{CliError, CliResult};
use crate::model::{ProcessId, TerminalState};

/// Default of `--request-timeout-ms`.
const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 30_000;

/// How to reach a pod; flattened into every client command.
#[derive(clap::Args, Clone, Debug)]
pub struct Connection {
    /// Base URL of a pod.
    #[arg(
        long,
        global = true,
        env = "PROCLOG_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    url: String,
    /// Bearer token, when the pod requires one.
    #[arg(long, global = true, env = "PROCLOG_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Give up when the pod has not answered within this many milliseconds (exit code 3).
    /// `await` allows this on top of its own --timeout-ms; `tail` applies it to connecting and
    /// to the pod's first answer only, never to the stream itself.
    #[arg(
        long,
        global = true,
        env = "PROCLOG_CLIENT_TIMEOUT_MS",
        default_value_t = DEFAULT_REQUEST_TIMEOUT_MS,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    request_timeout_ms: u64,
}

/// What a request's deadline covers.
#[derive(Clone, Copy)]
enum Deadline {
    /// The whole exchange, the answer's body included.
    Whole(Duration),
    /// Connecting and the answer's status and headers; the body (a stream) is unbounded.
    Head(Duration),
}

impl Connection {
    fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1{path}", self.url.trim_end_matches('/'))
    }

    /// Sends a request to `/v1{path}` and returns its URL and the pod's answer (any status).
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        deadline: Deadline,
    ) -> Result<(String, reqwest::Response), CliError> {
        let url = self.url(path);
        let client = reqwest::Client::builder()
            .connect_timeout(self.request_timeout())
            .build()
            .map_err(|err| CliError::new(FAILURE, format!("no HTTP client: {err}")))?;
        let mut request = client.request(method, &url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let limit = match deadline {
            Deadline::Whole(limit) => {
                request = request.timeout(limit);
                limit
            }
            Deadline::Head(limit) => limit,
        };
        match tokio::time::timeout(limit, request.send()).await {
            Err(_) => Err(timed_out(&url, limit)),
            Ok(Err(err)) => Err(transport_error(&url, &err, limit)),
            Ok(Ok(response)) => Ok((url, response)),
        }
    }

    /// Sends a request, prints the JSON answer; a non-2xx answer is the pod's error.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        limit: Duration,
    ) -> CliResult {
        let (url, response) = self
            .send(method, path, body, Deadline::Whole(limit))
            .await?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|err| transport_error(&url, &err, limit))?;
        if !status.is_success() {
            return Err(api_error(status, &bytes).into());
        }
        let answer: Value = serde_json::from_slice(&bytes).map_err(|err| {
            CliError::new(FAILURE, format!("the answer from {url} is not JSON: {err}"))
        })?;
        print_line(&serde_json::to_string_pretty(&answer)?);
        Ok(())
    }
}

/// A request that got no answer in time (exit code 3).
fn timed_out(url: &str, limit: Duration) -> CliError {
    CliError::new(
        UNREACHABLE,
        format!(
            "timed out after {} ms waiting for {url} (--request-timeout-ms, PROCLOG_CLIENT_TIMEOUT_MS)",
            limit.as_millis()
        ),
    )
}

/// A request that failed below HTTP: a bad URL (exit code 2), a timeout, a refused or broken
/// connection (exit code 3).
fn transport_error(url: &str, err: &reqwest::Error, limit: Duration) -> CliError {
    if err.is_timeout() {
        timed_out(url, limit)
    } else if err.is_builder() {
        CliError::usage(format!("bad pod URL {url}: {}", causes(err)))
    } else {
        CliError::new(
            UNREACHABLE,
            format!("could not reach the pod at {url}: {}", causes(err)),
        )
    }
}

/// The causes of a reqwest error on one line, without the URL it repeats.
fn causes(err: &reqwest::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !parts.contains(&text) {
            parts.push(text);
        }
        source = cause.source();
    }
    if parts.is_empty() {
        parts.push(err.to_string());
    }
    one_line(&parts.join(": "))
}

/// The pod's error answer `{"error": {"code", "message"}}` as `<status> <code>: <message>`
/// (exit code 1; 4 for the 408 of an `await` that timed out).
fn api_error(status: StatusCode, body: &[u8]) -> CliError {
    let parsed = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|value| {
            let error = value.get("error")?;
            let code = error.get("code")?.as_str()?.to_owned();
            let message = error.get("message")?.as_str()?.to_owned();
            Some((code, message))
        });
    let text = match parsed {
        Some((code, message)) => format!("{} {code}: {message}", status.as_u16()),
        None => {
            let body = String::from_utf8_lossy(body);
            let body: String = body.trim().chars().take(500).collect();
            format!("{status}: {body}")
        }
    };
    // The API answers 408 only to an `await` whose process did not end in time.
    let code = if status == StatusCode::REQUEST_TIMEOUT {
        AWAIT_TIMEOUT
    } else {
        FAILURE
    };
    CliError::new(code, one_line(&text))
}

fn one_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}

/// `/processes/<id><rest>`, with `id` checked locally (exit code 2) and percent-encoded.
fn process_path(id: &str, rest: &str) -> Result<String, CliError> {
    ProcessId::new(id).map_err(|err| CliError::usage(err.to_string()))?;
    if id == "." || id == ".." {
        // URL parsers (WHATWG, which reqwest follows) remove dot segments even when they are
        // percent-encoded, so no request can name this process in its path.
        return Err(CliError::usage(format!(
            "process id {id:?} cannot be sent in a URL path: HTTP clients remove \".\" and \"..\" segments, even encoded"
        )));
    }
    Ok(format!("/processes/{}{rest}", path_segment(id)))
}

/// `segment` percent-encoded for a URL path: every byte outside the unreserved set
/// `[A-Za-z0-9._~-]` as `%XX`, and the dot segments `.` and `..` entirely.
fn path_segment(segment: &str) -> String {
    if segment == "." || segment == ".." {
        return "%2E".repeat(segment.len());
    }
    let mut encoded = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'~' | b'-') {
            encoded.push(char::from(byte));
        } else {
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    encoded
}

#[derive(clap::Args, Debug)]
pub struct StartArgs {
    #[command(flatten)]
    connection: Connection,
    /// The kind of process (which engine runs it), e.g. `steps`.
    kind: String,
    /// Its JSON input.
    #[arg(long, default_value = "{}")]
    input: String,
    /// Its id (generated when absent).
    #[arg(long)]
    id: Option<String>,
    /// rerun, abandon or external.
    #[arg(long, default_value = "rerun")]
    disposition: String,
    /// Do not start it before this many milliseconds from now (database clock).
    #[arg(long)]
    start_in_ms: Option<u64>,
    /// End it `failed` ("deadline exceeded") if it has not ended this many milliseconds
    /// from now.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Retry failures its engine marks retryable, up to this many runs in all (1 s
    /// doubling to a minute between them).
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Start it as a child of this process (which must exist and not have ended).
    #[arg(long)]
    parent: Option<String>,
    /// A start policy for `--start-key`: `deduplicate` (one start per key within
    /// `--window-ms`), `singleton` (one process of the key that has not ended: a start while
    /// one has not ended answers it), `singleton-refuse` (... or is refused), `debounce`
    /// (start after `--window-ms` of quiet; the last start's input wins).
    #[arg(long, requires = "start_key", value_parser = ["deduplicate", "singleton", "singleton-refuse", "debounce"])]
    start_policy: Option<String>,
    /// The key of `--start-policy` (among processes of this kind).
    #[arg(long, requires = "start_policy")]
    start_key: Option<String>,
    /// The window of a `deduplicate` or `debounce` policy, in milliseconds.
    #[arg(long)]
    window_ms: Option<u64>,
    /// The queue it is claimed from (default: its kind's).
    #[arg(long)]
    queue: Option<String>,
    /// Its concurrency key within the queue (a tenant, an account).
    #[arg(long)]
    concurrency_key: Option<String>,
    /// Its priority among its key's work: -100 to 100, higher first.
    #[arg(long, allow_hyphen_values = true)]
    priority: Option<i16>,
}

#[derive(clap::Args, Debug)]
pub struct ChildrenArgs {
    #[command(flatten)]
    connection: Connection,
    /// The parent's id.
    id: String,
    /// Most children listed (1 to 1000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    limit: u32,
}

#[derive(clap::Args, Debug)]
pub struct IdArgs {
    #[command(flatten)]
    connection: Connection,
    /// The process id.
    id: String,
}

#[derive(clap::Args, Debug)]
pub struct EventsArgs {
    #[command(flatten)]
    connection: Connection,
    /// The process id.
    id: String,
    /// Only events after this seq.
    #[arg(long, default_value_t = 0)]
    after: i64,
    /// At most this many.
    #[arg(long, default_value_t = 100)]
    limit: u32,
}

#[derive(clap::Args, Debug)]
pub struct TailArgs {
    #[command(flatten)]
    connection: Connection,
    /// The process id.
    id: String,
    /// Start after this seq.
    #[arg(long, default_value_t = 0)]
    after: i64,
}

#[derive(clap::Args, Debug)]
pub struct AwaitArgs {
    #[command(flatten)]
    connection: Connection,
    /// The process id.
    id: String,
    /// Give up after this many milliseconds (exit code 4).
    #[arg(long, default_value_t = 30_000)]
    timeout_ms: u64,
}

#[derive(clap::Args, Debug)]
pub struct CancelArgs {
    #[command(flatten)]
    connection: Connection,
    /// The process id.
    id: String,
    /// Why (recorded in the request event).
    #[arg(long)]
    reason: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct SendArgs {
    #[command(flatten)]
    connection: Connection,
    /// The process id.
    id: String,
    /// The message topic (what its run receives with `recv(topic)`).
    topic: String,
    /// The JSON payload.
    #[arg(long, default_value = "null")]
    payload: String,
    /// A replay key: sending again with it stores nothing new.
    #[arg(long)]
    key: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct PruneArgs {
    #[command(flatten)]
    connection: Connection,
    /// Prune processes that ended more than this many seconds ago.
    #[arg(long)]
    older_than_secs: u64,
}

pub async fn start(args: StartArgs) -> CliResult {
    let input: Value = serde_json::from_str(&args.input)
        .map_err(|err| CliError::usage(format!("--input is not JSON: {err}")))?;
    let mut body = json!({"kind": args.kind, "input": input, "disposition": args.disposition});
    if let Some(ms) = args.start_in_ms {
        body["start_in_ms"] = json!(ms);
    }
    if let Some(ms) = args.timeout_ms {
        body["timeout_ms"] = json!(ms);
    }
    if let Some(max_attempts) = args.max_attempts {
        body["retry"] = json!({ "max_attempts": max_attempts });
    }
    if let Some(id) = args.id {
        ProcessId::new(id.as_str()).map_err(|err| CliError::usage(err.to_string()))?;
        body["id"] = json!(id);
    }
    if let Some(parent) = args.parent {
        ProcessId::new(parent.as_str()).map_err(|err| CliError::usage(err.to_string()))?;
        body["parent"] = json!(parent);
    }
    if let Some(queue) = args.queue {
        body["queue"] = json!(queue);
    }
    if let Some(key) = args.concurrency_key {
        body["concurrency_key"] = json!(key);
    }
    if let Some(priority) = args.priority {
        body["priority"] = json!(priority);
    }
    if let (Some(policy), Some(key)) = (args.start_policy, args.start_key) {
        let window = || {
            args.window_ms.ok_or_else(|| {
                CliError::usage(format!("--start-policy {policy} needs --window-ms"))
            })
        };
        body["start_policy"] = match policy.as_str() {
            "singleton" => json!({"policy": "singleton", "key": key}),
            "singleton-refuse" => json!({"policy": "singleton", "key": key, "refuse": true}),
            name => json!({"policy": name, "key": key, "window_ms": window()?}),
        };
    }
    let connection = &args.connection;
    connection
        .call(
            Method::POST,
            "/processes",
            Some(&body),
            connection.request_timeout(),
        )
        .await
}

pub async fn children(args: ChildrenArgs) -> CliResult {
    let rest = format!("/children?limit={}", args.limit);
    let path = process_path(&args.id, &rest)?;
    let connection = &args.connection;
    connection
        .call(Method::GET, &path, None, connection.request_timeout())
        .await
}

pub async fn get(args: IdArgs) -> CliResult {
    let path = process_path(&args.id, "")?;
    let connection = &args.connection;
    connection
        .call(Method::GET, &path, None, connection.request_timeout())
        .await
}

pub async fn events(args: EventsArgs) -> CliResult {
    let rest = format!("/events?after={}&limit={}", args.after, args.limit);
    let path = process_path(&args.id, &rest)?;
    let connection = &args.connection;
    connection
        .call(Method::GET, &path, None, connection.request_timeout())
        .await
}

pub async fn await_terminal(args: AwaitArgs) -> CliResult {
    let path = process_path(&args.id, &format!("/await?timeout_ms={}", args.timeout_ms))?;
    let connection = &args.connection;
    // The pod answers by the await's own deadline; the request gets the usual allowance on top.
    let limit = Duration::from_millis(args.timeout_ms).saturating_add(connection.request_timeout());
    connection.call(Method::GET, &path, None, limit).await
}

pub async fn cancel(args: CancelArgs) -> CliResult {
    let path = process_path(&args.id, "/cancel")?;
    let body = json!({"reason": args.reason});
    let connection = &args.connection;
    connection
        .call(
            Method::POST,
            &path,
            Some(&body),
            connection.request_timeout(),
        )
        .await
}

pub async fn send(args: SendArgs) -> CliResult {
    let path = process_path(&args.id, "/messages")?;
    let payload: Value = serde_json::from_str(&args.payload)
        .map_err(|err| CliError::usage(format!("--payload is not JSON: {err}")))?;
    let mut body = json!({"topic": args.topic, "payload": payload});
    if let Some(key) = args.key {
        body["replay_key"] = json!(key);
    }
    let connection = &args.connection;
    connection
        .call(
            Method::POST,
            &path,
            Some(&body),
            connection.request_timeout(),
        )
        .await
}

pub async fn prune(args: PruneArgs) -> CliResult {
    let body = json!({"older_than_secs": args.older_than_secs});
    let connection = &args.connection;
    connection
        .call(
            Method::POST,
            "/prune",
            Some(&body),
            connection.request_timeout(),
        )
        .await
}

/// Follows the SSE stream, printing one JSON event per line, until the process ends. A stream
/// that stops before the terminal event is an error (exit code 3).
pub async fn tail(args: TailArgs) -> CliResult {
    let path = process_path(&args.id, &format!("/stream?after={}", args.after))?;
    let connection = &args.connection;
    let deadline = Deadline::Head(connection.request_timeout());
    let (url, response) = connection.send(Method::GET, &path, None, deadline).await?;
    let status = response.status();
    if status == StatusCode::NO_CONTENT {
        // The process ended at or before `--after`: nothing follows.
        return Ok(());
    }
    if !status.is_success() {
        let body = response.bytes().await.unwrap_or_default();
        return Err(api_error(status, &body).into());
    }
    let mut body = response.bytes_stream();
    let mut parser = sse::SseParser::default();
    loop {
        let chunk = match body.next().await {
            Some(Ok(chunk)) => chunk,
            Some(Err(err)) => return Err(stream_ended(&url, &causes(&err)).into()),
            None => return Err(stream_ended(&url, "the pod closed it").into()),
        };
        for event in parser.feed(&chunk) {
            let value: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
            let Some(event_type) = value.get("event_type").and_then(Value::as_str) else {
                // Not a process event: the pod's `error` event (`{"code", "message"}`).
                return Err(stream_error(&url, &event).into());
            };
            let terminal = TerminalState::ALL
                .iter()
                .any(|state| state.event_type() == event_type);
            if !print_line(&event.data) || terminal {
                // The process ended, or nobody reads our output any more.
                return Ok(());
            }
        }
    }
}

fn stream_ended(url: &str, cause: &str) -> CliError {
    CliError::new(
        UNREACHABLE,
        format!("the stream from {url} ended before the process did: {cause}"),
    )
}

fn stream_error(url: &str, event: &sse::SseEvent) -> CliError {
    let value: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
    let text = match (
        value.get("code").and_then(Value::as_str),
        value.get("message").and_then(Value::as_str),
    ) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        _ => format!("unexpected {:?} event: {}", event.event, event.data),
    };
    CliError::new(
        FAILURE,
        one_line(&format!("the stream from {url} failed: {text}")),
    )
}

/// Prints a line; false when stdout is closed (`proclog tail ... | head`), which is not an
/// error.
fn print_line(line: &str) -> bool {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
}

/// An incremental parser of the server-sent events format (`text/event-stream`, WHATWG HTML
/// §9.2): bytes are buffered until a line is complete, so text is decoded as UTF-8 only per
/// whole line, whatever the boundaries of the chunks read from the network.
mod sse {
    /// One dispatched event.
    #[derive(Debug, PartialEq, Eq)]
    pub struct SseEvent {
        /// The `event:` field; `message` when absent.
        pub event: String,
        /// The `data:` lines joined with `\n`.
        pub data: String,
        /// The last `id:` of the stream so far, if any.
        pub last_event_id: Option<String>,
    }

    /// Parser state between chunks.
    #[derive(Debug, Default)]
    pub struct SseParser {
        /// The bytes of the line being read.
        line: Vec<u8>,
        /// The last line ended with `\r`: a `\n` right after it belongs to that line end.
        after_cr: bool,
        /// A line was completed already (a byte order mark is stripped from the first only).
        started: bool,
        event: String,
        /// Each `data:` value followed by `\n`.
        data: String,
        last_event_id: Option<String>,
    }

    impl SseParser {
        /// Consumes the next chunk of the stream and returns the events it completes. Lines
        /// end with `\n`, `\r\n` or `\r`; a blank line dispatches the event.
        pub fn feed(&mut self, mut bytes: &[u8]) -> Vec<SseEvent> {
            let mut events = Vec::new();
            while let Some(&first) = bytes.first() {
                if std::mem::take(&mut self.after_cr) && first == b'\n' {
                    bytes = &bytes[1..];
                    continue;
                }
                let Some(end) = bytes.iter().position(|b| matches!(b, b'\n' | b'\r')) else {
                    self.line.extend_from_slice(bytes);
                    break;
                };
                self.line.extend_from_slice(&bytes[..end]);
                self.after_cr = bytes[end] == b'\r';
                bytes = &bytes[end + 1..];
                let line = std::mem::take(&mut self.line);
                events.extend(self.on_line(&line));
            }
            events
        }

        fn on_line(&mut self, mut raw: &[u8]) -> Option<SseEvent> {
            if !std::mem::replace(&mut self.started, true) {
                raw = raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw);
            }
            let line = String::from_utf8_lossy(raw);
            if line.is_empty() {
                return self.dispatch();
            }
            if line.starts_with(':') {
                return None; // a comment (the pod's keep-alives)
            }
            let (field, value) = match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (&*line, ""),
            };
            match field {
                "event" => self.event = value.to_owned(),
                "data" => {
                    self.data.push_str(value);
                    self.data.push('\n');
                }
                "id" if !value.contains('\0') => self.last_event_id = Some(value.to_owned()),
                // `retry` only matters to clients that reconnect; unknown fields are ignored.
                _ => {}
            }
            None
        }

        fn dispatch(&mut self) -> Option<SseEvent> {
            let event = std::mem::take(&mut self.event);
            let mut data = std::mem::take(&mut self.data);
            if data.is_empty() {
                return None;
            }
            data.pop();
            Some(SseEvent {
                event: if event.is_empty() {
                    "message".to_owned()
                } else {
                    event
                },
                data,
                last_event_id: self.last_event_id.clone(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::sse::{SseEvent, SseParser};
    use super::*;

    fn event(name: &str, data: &str, id: Option<&str>) -> SseEvent {
        SseEvent {
            event: name.to_owned(),
            data: data.to_owned(),
            last_event_id: id.map(str::to_owned),
        }
    }

    fn parse_chunks(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut parser = SseParser::default();
        chunks.iter().flat_map(|chunk| parser.feed(chunk)).collect()
    }

    /// Two events of Japanese text, with `line_end` between lines.
    fn japanese_stream(line_end: &str) -> (Vec<u8>, Vec<SseEvent>) {
        let first = r#"{"text":"日本語のテキスト、途中で切れても壊れない"}"#;
        let second = "二行目\n三行目";
        let text = [
            ": keep-alive".to_owned(),
            "id: 1".to_owned(),
            "event: note".to_owned(),
            format!("data: {first}"),
            String::new(),
            "id: 2".to_owned(),
            "data:二行目".to_owned(),
            "data: 三行目".to_owned(),
            String::new(),
        ]
        .map(|line| line + line_end)
        .concat();
        let expected = vec![
            event("note", first, Some("1")),
            event("message", second, Some("2")),
        ];
        (text.into_bytes(), expected)
    }

    #[test]
    fn sse_events_survive_any_chunk_boundary() {
        for line_end in ["\n", "\r\n", "\r"] {
            let (stream, expected) = japanese_stream(line_end);
            assert_eq!(parse_chunks(&[&stream]), expected, "{line_end:?}");
            // Every split point, inside multi-byte characters and inside "\r\n" included.
            for split in 0..=stream.len() {
                let (a, b) = stream.split_at(split);
                assert_eq!(
                    parse_chunks(&[a, b]),
                    expected,
                    "{line_end:?} split at {split}"
                );
            }
            let bytes: Vec<&[u8]> = stream.chunks(1).collect();
            assert_eq!(parse_chunks(&bytes), expected, "{line_end:?} byte by byte");
        }
    }

    #[test]
    fn sse_crlf_split_across_chunks_is_one_line_end() {
        // Were the "\n" taken for a blank line, "a" would be dispatched alone.
        let events = parse_chunks(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]);
        assert_eq!(events, vec![event("message", "a\nb", None)]);
    }

    #[test]
    fn sse_fields_follow_the_format() {
        let stream = concat!(
            "\u{feff}data\n",           // BOM stripped; no colon: an empty value
            "data:  two spaces\n",      // only one leading space is removed
            "retry: 10\n",              // ignored
            "unknown: field\n",         // ignored
            ":comment: data: no\n",     // comment
            "\n",                       // dispatch
            "event: ignored\n",         // an event without data is not dispatched...
            "\n",                       // ...and its name does not carry over
            "id: 7\ndata: x\n\n",       // id remembered
            "data: y\n\n",              // ...for the next events too
            "id: a\0b\ndata: z\n\n",    // an id with NUL is ignored
            "data: never dispatched\n", // the stream ends without a blank line
        );
        assert_eq!(
            parse_chunks(&[stream.as_bytes()]),
            vec![
                event("message", "\n two spaces", None),
                event("message", "x", Some("7")),
                event("message", "y", Some("7")),
                event("message", "z", Some("7")),
            ]
        );
    }

    #[test]
    fn sse_invalid_utf8_is_replaced_in_its_line_only() {
        let events = parse_chunks(&[b"data: \xff\xfe ok\ndata: \xe6\x97", b"\xa5\n\n"]);
        assert_eq!(
            events,
            vec![event("message", "\u{fffd}\u{fffd} ok\n日", None)]
        );
    }

    #[test]
    fn ids_are_percent_encoded_in_paths() {
        assert_eq!(path_segment("order:42.v1_x-y~"), "order%3A42.v1_x-y~");
        assert_eq!(path_segment("."), "%2E");
        assert_eq!(path_segment(".."), "%2E%2E");
        assert_eq!(path_segment("a/b é?#%"), "a%2Fb%20%C3%A9%3F%23%25");
        assert_eq!(
            process_path("a:b", "/events").unwrap(),
            "/processes/a%3Ab/events"
        );
        for bad in ["", "a/b", "x?y", "has space", "ü"] {
            let err = process_path(bad, "").unwrap_err();
            assert_eq!(err.code, super::super::exit_code::USAGE, "{bad:?}");
        }
    }

    #[test]
    fn dot_ids_are_refused_because_url_parsers_drop_them() {
        // Why: even encoded, a dot segment is removed by the URL parser reqwest uses.
        let url = reqwest::Url::parse("http://h/v1/processes/%2E%2E").unwrap();
        assert_eq!(url.path(), "/v1/");
        for id in [".", ".."] {
            let err = process_path(id, "").unwrap_err();
            assert_eq!(err.code, super::super::exit_code::USAGE);
            assert!(
                err.message.contains("cannot be sent in a URL path"),
                "{err}"
            );
        }
        assert!(process_path("...", "").is_ok());
    }

    #[test]
    fn api_errors_read_the_json_error_body() {
        let err = api_error(
            StatusCode::NOT_FOUND,
            br#"{"error": {"code": "not_found", "message": "process x not found"}}"#,
        );
        assert_eq!(err.message, "404 not_found: process x not found");
        assert_eq!(err.code, FAILURE);
        let err = api_error(
            StatusCode::REQUEST_TIMEOUT,
            br#"{"error": {"code": "timeout", "message": "not ended\nin time"}}"#,
        );
        assert_eq!(err.message, "408 timeout: not ended in time");
        assert_eq!(err.code, AWAIT_TIMEOUT);
        let err = api_error(StatusCode::BAD_GATEWAY, b"<html>\nproxy\n</html>");
        assert_eq!(err.message, "502 Bad Gateway: <html> proxy </html>");
    }
}

/// `proclog queue ...`: queue limits through a pod's API.
#[derive(clap::Args, Debug)]
pub struct QueueArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: QueueCommand,
}

/// One scope's limits on the command line.
#[derive(clap::Args, Debug, Default)]
pub struct LimitArgs {
    /// At most this many running at once across every pod (0 holds the work).
    #[arg(long)]
    concurrency: Option<u32>,
    /// At most this many running at once on one pod.
    #[arg(long)]
    per_pod: Option<u32>,
    /// At most this many starts per period: STARTS/PERIOD_MS, e.g. 10/1000.
    #[arg(long, value_parser = parse_rate)]
    rate: Option<crate::queue::RateLimit>,
}

/// Each key's limits on the command line (the same as [`LimitArgs`], for every key).
#[derive(clap::Args, Debug, Default)]
pub struct KeyLimitArgs {
    /// Each key: at most this many running at once across every pod.
    #[arg(long)]
    key_concurrency: Option<u32>,
    /// Each key: at most this many running at once on one pod.
    #[arg(long)]
    key_per_pod: Option<u32>,
    /// Each key: at most STARTS per PERIOD_MS.
    #[arg(long, value_parser = parse_rate)]
    key_rate: Option<crate::queue::RateLimit>,
}

fn parse_rate(raw: &str) -> Result<crate::queue::RateLimit, String> {
    let (starts, period) = raw
        .split_once('/')
        .ok_or_else(|| format!("a rate is STARTS/PERIOD_MS, e.g. 10/1000, got {raw:?}"))?;
    Ok(crate::queue::RateLimit {
        starts: starts
            .trim()
            .parse()
            .map_err(|err| format!("starts: {err}"))?,
        period_ms: period
            .trim()
            .parse()
            .map_err(|err| format!("period: {err}"))?,
    })
}

#[derive(clap::Subcommand, Debug)]
pub enum QueueCommand {
    /// List the queues that have limits (100 at a time).
    List {
        /// Start after this queue (the `next_after` of the previous page).
        #[arg(long)]
        after: Option<String>,
    },
    /// Show a queue's limits and the running and ready work of its busiest keys.
    Get {
        /// The queue.
        queue: String,
    },
    /// Set a queue's limits (replacing its earlier ones); claims from now on follow them.
    Set {
        /// The queue (a kind's name unless processes name another queue).
        queue: String,
        #[command(flatten)]
        queue_limits: LimitArgs,
        #[command(flatten)]
        key_limits: KeyLimitArgs,
        /// Limits of named keys, as JSON: {"tenant-7": {"concurrency": 5}}.
        #[arg(long)]
        keys: Option<String>,
    },
    /// Remove a queue's limits: its work is claimed as any other's again.
    Delete {
        /// The queue.
        queue: String,
    },
}

pub async fn queue(args: QueueArgs) -> CliResult {
    let connection = &args.connection;
    let limit = connection.request_timeout();
    let path = |queue: &str| -> Result<String, CliError> {
        crate::queue::queue_name(queue).map_err(|err| CliError::usage(err.to_string()))?;
        Ok(format!("/queues/{queue}"))
    };
    match args.command {
        QueueCommand::List { after } => {
            let path = match after {
                Some(after) => format!(
                    "/queues?after={}",
                    path(&after)?.trim_start_matches("/queues/")
                ),
                None => "/queues".to_owned(),
            };
            connection.call(Method::GET, &path, None, limit).await
        }
        QueueCommand::Get { queue } => {
            connection
                .call(Method::GET, &path(&queue)?, None, limit)
                .await
        }
        QueueCommand::Set {
            queue,
            queue_limits,
            key_limits,
            keys,
        } => {
            let keys = match keys {
                Some(raw) => serde_json::from_str(&raw)
                    .map_err(|err| CliError::usage(format!("--keys is not JSON: {err}")))?,
                None => Default::default(),
            };
            let limits = crate::queue::QueueLimits {
                queue: crate::queue::Limits {
                    concurrency: queue_limits.concurrency,
                    per_pod: queue_limits.per_pod,
                    rate: queue_limits.rate,
                },
                each_key: crate::queue::Limits {
                    concurrency: key_limits.key_concurrency,
                    per_pod: key_limits.key_per_pod,
                    rate: key_limits.key_rate,
                },
                keys,
            };
            limits
                .validate()
                .map_err(|err| CliError::usage(err.to_string()))?;
            let body = serde_json::to_value(&limits)
                .map_err(|err| CliError::usage(format!("limits: {err}")))?;
            connection
                .call(Method::PUT, &path(&queue)?, Some(&body), limit)
                .await
        }
        QueueCommand::Delete { queue } => {
            connection
                .call(Method::DELETE, &path(&queue)?, None, limit)
                .await
        }
    }
}

/// `proclog schedule ...`: schedules through a pod's API.
#[derive(clap::Args, Debug)]
pub struct ScheduleArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: ScheduleCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum ScheduleCommand {
    /// Create a schedule (the same definition again answers it as it is).
    Create {
        /// Its id (1 to 64 characters from [A-Za-z0-9._:-]).
        id: String,
        /// The cron expression: 5 fields, or 6 to 7 with seconds first, e.g. "*/15 * * * *".
        #[arg(long)]
        cron: String,
        /// The kind of process it starts.
        #[arg(long)]
        kind: String,
        /// The processes' JSON input.
        #[arg(long, default_value = "null")]
        input: String,
        /// The IANA time zone the expression is read in.
        #[arg(long, default_value = "UTC")]
        time_zone: String,
        /// While the previous process has not ended: skip, queue_one or allow.
        #[arg(long, default_value = "skip")]
        overlap: String,
        /// Due times missed while no pod ran: skip_missed, run_once or run_all.
        #[arg(long, default_value = "skip_missed")]
        catch_up: String,
        /// Most missed due times run_all runs.
        #[arg(long, default_value_t = 100)]
        catch_up_limit: u32,
        /// The queue its processes are claimed from (default: the kind's).
        #[arg(long)]
        queue: Option<String>,
    },
    /// List schedules with their next and last due times.
    List {
        /// Most schedules listed (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Show a schedule.
    Get {
        /// Its id.
        id: String,
    },
    /// Pause a schedule: its due times make nothing until it is resumed.
    Pause {
        /// Its id.
        id: String,
    },
    /// Resume a schedule from its first due time after now.
    Resume {
        /// Its id.
        id: String,
    },
    /// Start a process of the schedule now.
    Trigger {
        /// Its id.
        id: String,
    },
    /// Delete a schedule (its processes stay).
    Delete {
        /// Its id.
        id: String,
    },
}

pub async fn schedule(args: ScheduleArgs) -> CliResult {
    let connection = &args.connection;
    let limit = connection.request_timeout();
    let path = |id: &str, rest: &str| -> Result<String, CliError> {
        crate::validate::schedule_id(id).map_err(|err| CliError::usage(err.to_string()))?;
        Ok(format!("/schedules/{id}{rest}"))
    };
    let empty = json!({});
    match args.command {
        ScheduleCommand::Create {
            id,
            cron,
            kind,
            input,
            time_zone,
            overlap,
            catch_up,
            catch_up_limit,
            queue,
        } => {
            let input: Value = serde_json::from_str(&input)
                .map_err(|err| CliError::usage(format!("--input is not JSON: {err}")))?;
            let mut body = json!({
                "id": id, "cron": cron, "kind": kind, "input": input, "time_zone": time_zone,
                "overlap": overlap, "catch_up": catch_up, "catch_up_limit": catch_up_limit,
            });
            if let Some(queue) = queue {
                body["queue"] = json!(queue);
            }
            connection
                .call(Method::POST, "/schedules", Some(&body), limit)
                .await
        }
        ScheduleCommand::List { limit: page } => {
            let path = format!("/schedules?limit={page}");
            connection.call(Method::GET, &path, None, limit).await
        }
        ScheduleCommand::Get { id } => {
            connection
                .call(Method::GET, &path(&id, "")?, None, limit)
                .await
        }
        ScheduleCommand::Pause { id } => {
            connection
                .call(Method::POST, &path(&id, "/pause")?, Some(&empty), limit)
                .await
        }
        ScheduleCommand::Resume { id } => {
            connection
                .call(Method::POST, &path(&id, "/resume")?, Some(&empty), limit)
                .await
        }
        ScheduleCommand::Trigger { id } => {
            connection
                .call(Method::POST, &path(&id, "/trigger")?, Some(&empty), limit)
                .await
        }
        ScheduleCommand::Delete { id } => {
            connection
                .call(Method::DELETE, &path(&id, "")?, None, limit)
                .await
        }
    }
}
