//! Client commands: talk to a pod's HTTP API and print JSON.

use std::io::Write;

use futures::StreamExt;
use serde_json::{Value, json};

use super::CliResult;

#[derive(clap::Args, Clone, Debug)]
pub struct Connection {
    /// Base URL of a pod.
    #[arg(long, env = "PROCLOG_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Bearer token, when the pod requires one.
    #[arg(long, env = "PROCLOG_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl Connection {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let url = format!("{}/v1{path}", self.url.trim_end_matches('/'));
        let request = reqwest::Client::new().request(method, url);
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }
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
    /// Give up after this many milliseconds.
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
pub struct PruneArgs {
    #[command(flatten)]
    connection: Connection,
    /// Prune processes that ended more than this many seconds ago.
    #[arg(long)]
    older_than_secs: u64,
}

/// Sends, prints the JSON answer, fails with the API error on a non-2xx status.
async fn send(request: reqwest::RequestBuilder) -> CliResult {
    let response = request.send().await?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status.is_success() {
        print_line(&serde_json::to_string_pretty(&body)?);
        Ok(())
    } else {
        Err(format!("{status}: {body}").into())
    }
}

pub async fn start(args: StartArgs) -> CliResult {
    let input: Value =
        serde_json::from_str(&args.input).map_err(|err| format!("--input is not JSON: {err}"))?;
    let mut body = json!({"kind": args.kind, "input": input, "disposition": args.disposition});
    if let Some(id) = args.id {
        body["id"] = json!(id);
    }
    send(
        args.connection
            .request(reqwest::Method::POST, "/processes")
            .json(&body),
    )
    .await
}

pub async fn get(args: IdArgs) -> CliResult {
    send(
        args.connection
            .request(reqwest::Method::GET, &format!("/processes/{}", args.id)),
    )
    .await
}

pub async fn events(args: EventsArgs) -> CliResult {
    let path = format!(
        "/processes/{}/events?after={}&limit={}",
        args.id, args.after, args.limit
    );
    send(args.connection.request(reqwest::Method::GET, &path)).await
}

pub async fn await_terminal(args: AwaitArgs) -> CliResult {
    let path = format!(
        "/processes/{}/await?timeout_ms={}",
        args.id, args.timeout_ms
    );
    send(args.connection.request(reqwest::Method::GET, &path)).await
}

pub async fn cancel(args: CancelArgs) -> CliResult {
    let body = json!({"reason": args.reason});
    let path = format!("/processes/{}/cancel", args.id);
    send(
        args.connection
            .request(reqwest::Method::POST, &path)
            .json(&body),
    )
    .await
}

pub async fn prune(args: PruneArgs) -> CliResult {
    let body = json!({"older_than_secs": args.older_than_secs});
    send(
        args.connection
            .request(reqwest::Method::POST, "/prune")
            .json(&body),
    )
    .await
}

/// Follows the SSE stream, printing one JSON event per line, until the process ends.
pub async fn tail(args: TailArgs) -> CliResult {
    let path = format!("/processes/{}/stream?after={}", args.id, args.after);
    let response = args
        .connection
        .request(reqwest::Method::GET, &path)
        .send()
        .await?;
    if !response.status().is_success() {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        return Err(format!("{status}: {body}").into());
    }
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    while let Some(chunk) = body.next().await {
        buffer.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buffer.find('\n') {
            let line: String = buffer.drain(..=end).collect();
            if let Some(data) = line.trim_end().strip_prefix("data:") {
                print_line(data.trim_start());
            }
        }
    }
    Ok(())
}

/// Prints a line; a closed pipe (`proclog tail ... | head`) is not an error.
fn print_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}
