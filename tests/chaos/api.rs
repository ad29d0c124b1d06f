//! The HTTP side of the load client: each write sent round-robin over the pods and resent,
//! idempotently, until it is answered; and the client's counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use crate::settings::{GIVE_UP, REQUEST_TIMEOUT};

/// Counters of the client.
#[derive(Default)]
pub(crate) struct ClientStats {
    pub(crate) requests: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) append_retries: AtomicU64,
    pub(crate) gave_up: AtomicU64,
}

/// The answer to a write, after retries.
pub(crate) enum Outcome {
    /// 2xx with its body.
    Acked(Value),
    /// 4xx with its body: a decision, not retried.
    Refused(u16, Value),
    /// Still failing (5xx, connection error, timeout) after [`GIVE_UP`].
    GaveUp(String),
}

/// The HTTP side of the client: round-robin over the pods, moving on when one fails.
#[derive(Clone)]
pub(crate) struct Api {
    http: reqwest::Client,
    pods: Arc<Vec<String>>,
    next: Arc<AtomicUsize>,
    pub(crate) stats: Arc<ClientStats>,
}

impl Api {
    pub(crate) fn new(pods: Vec<String>) -> Self {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .expect("HTTP client");
        Self {
            http,
            pods: Arc::new(pods),
            next: Arc::new(AtomicUsize::new(0)),
            stats: Arc::new(ClientStats::default()),
        }
    }

    /// POSTs `body` to `path`, resending the same request to the next pod on a 5xx, a
    /// connection error or a timeout, until it is answered or [`GIVE_UP`] has passed.
    /// Returns the outcome and the number of attempts.
    pub(crate) async fn post(&self, path: &str, body: &Value) -> (Outcome, u32) {
        self.request(reqwest::Method::POST, path, body).await
    }

    /// [`Self::post`] with another method (a PUT of queue limits).
    pub(crate) async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &Value,
    ) -> (Outcome, u32) {
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + GIVE_UP;
        let mut pause = Duration::from_millis(100);
        let mut attempts = 0u32;
        loop {
            let base = &self.pods[(first + attempts as usize) % self.pods.len()];
            attempts += 1;
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            if attempts > 1 {
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
            }
            let error = match self.send(&method, base, path, body).await {
                Ok(outcome) => return (outcome, attempts),
                Err(error) => error,
            };
            if Instant::now() >= deadline {
                self.stats.gave_up.fetch_add(1, Ordering::Relaxed);
                return (Outcome::GaveUp(error), attempts);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// One attempt: `Ok` for an answer to keep (2xx, 4xx), `Err` for one to retry.
    async fn send(
        &self,
        method: &reqwest::Method,
        base: &str,
        path: &str,
        body: &Value,
    ) -> Result<Outcome, String> {
        let response = self
            .http
            .request(method.clone(), format!("{base}{path}"))
            .json(body)
            .send()
            .await
            .map_err(|err| format!("{base}: {err}"))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|err| format!("{base}: body: {err}"))?;
        let answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            Ok(Outcome::Acked(answer))
        } else if status.is_client_error() {
            Ok(Outcome::Refused(status.as_u16(), answer))
        } else {
            Err(format!("{base}: {status} {answer}"))
        }
    }
}

/// The error code of an API error body.
pub(crate) fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}
