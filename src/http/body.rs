//! Request bodies admitted by the memory they take, not only by their size.
//!
//! A JSON body becomes far larger once parsed: `[1,1,1,...]` takes 2 bytes a value as text and
//! 32 as a `serde_json::Value`, so four 8 MiB bodies under the body limit once took a pod past
//! half a gigabyte before their payloads were refused. Every JSON body of a write is admitted
//! against one budget per pod ([`HttpOptions::request_memory_bytes`]): its declared length
//! before it is read, then what parsing it will take, estimated from its text in one pass
//! (its length plus [`BYTES_PER_VALUE`] for every value it holds). A body that alone needs
//! more than the whole budget is refused (`413 payload_too_large`) without being parsed; one
//! that must wait longer than [`ADMISSION_WAIT`] for room is answered `503 busy`. The budget
//! is held until the handler has answered.
//!
//! [`HttpOptions::request_memory_bytes`]: super::HttpOptions::request_memory_bytes

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{ApiError, ApiState};

/// What one JSON value costs parsed, at most, beyond its text: a `serde_json::Value` and its
/// slot in a vector or map, and the copy serde buffers while it tries the shapes of an
/// untagged body (one event or a batch).
pub const BYTES_PER_VALUE: usize = 96;
/// How long a body waits for room in the budget before `503 busy`.
pub const ADMISSION_WAIT: Duration = Duration::from_secs(5);
/// The budget's unit: permits count KiB.
const UNIT: usize = 1024;

/// The memory budget of request bodies of one pod.
#[derive(Clone, Debug)]
pub struct BodyBudget {
    permits: Arc<Semaphore>,
    total: usize,
}

impl BodyBudget {
    /// A budget of `bytes` (at least one unit).
    pub fn new(bytes: usize) -> Self {
        let units = bytes.div_ceil(UNIT).max(1);
        Self {
            permits: Arc::new(Semaphore::new(units)),
            total: units * UNIT,
        }
    }

    /// Takes room for `bytes` more, adding it to `held`.
    async fn reserve(
        &self,
        bytes: usize,
        held: &mut Option<OwnedSemaphorePermit>,
    ) -> Result<(), ApiError> {
        let have = held.as_ref().map_or(0, |p| p.num_permits());
        let need = bytes.div_ceil(UNIT).saturating_sub(have);
        if need == 0 {
            return Ok(());
        }
        if (have + need) * UNIT > self.total {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!(
                    "this body would take about {bytes} bytes of memory to read and parse; a pod admits {} at once",
                    self.total
                ),
            ));
        }
        let units = u32::try_from(need).unwrap_or(u32::MAX);
        let permit = tokio::time::timeout(
            ADMISSION_WAIT,
            Arc::clone(&self.permits).acquire_many_owned(units),
        )
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "the pod is reading as many request bodies as it may; retry shortly",
            )
        })?
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", "stopping"))?;
        match held {
            Some(existing) => existing.merge(permit),
            None => *held = Some(permit),
        }
        Ok(())
    }
}

/// The memory parsing `text` as JSON takes, at most: its length plus [`BYTES_PER_VALUE`] per
/// value (every `,` `:` `[` `{` outside strings starts one, plus the first).
pub fn parse_cost(text: &[u8]) -> usize {
    let (mut values, mut in_string, mut escaped) = (1usize, false, false);
    for &byte in text {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
        } else {
            match byte {
                b'"' => in_string = true,
                b',' | b':' | b'[' | b'{' => values += 1,
                _ => {}
            }
        }
    }
    text.len()
        .saturating_add(values.saturating_mul(BYTES_PER_VALUE))
}

/// A write's JSON body, admitted against the pod's [`BodyBudget`]; the room it takes is held
/// for as long as this value lives (the handler's whole call).
pub struct AdmittedBody {
    /// The body's bytes.
    pub bytes: Bytes,
    _room: Option<OwnedSemaphorePermit>,
}

impl FromRequest<ApiState> for AdmittedBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &ApiState) -> Result<Self, Self::Rejection> {
        super::error::require_json(request.headers())?;
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<usize>().ok())
            .unwrap_or(state.max_body_bytes)
            .min(state.max_body_bytes);
        let mut room = None;
        state.bodies.reserve(declared, &mut room).await?;
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "payload_too_large",
                        "request body exceeds the limit",
                    )
                } else {
                    ApiError::new(rejection.status(), "bad_request", rejection.body_text())
                }
            })?;
        state.bodies.reserve(parse_cost(&bytes), &mut room).await?;
        Ok(Self { bytes, _room: room })
    }
}

impl AdmittedBody {
    /// Parses the body as `T`: malformed JSON is `invalid_json`, JSON of the wrong shape
    /// `invalid_input`.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        require_object(&self.bytes)?;
        serde_json::from_slice(&self.bytes).map_err(|err| {
            let code = if err.is_data() {
                "invalid_input"
            } else {
                "invalid_json"
            };
            ApiError::new(StatusCode::BAD_REQUEST, code, err.to_string())
        })
    }

    /// [`AdmittedBody::parse`], a wrong shape answered with `expected <shape>: <why>`.
    pub fn parse_expecting<T: DeserializeOwned>(&self, shape: &str) -> Result<T, ApiError> {
        self.parse().map_err(|mut err| {
            if err.code == "invalid_input" && !err.message.starts_with("the body must be") {
                err.message = format!("expected {shape}: {}", err.message);
            }
            err
        })
    }
}

/// Every body of the API is a JSON object: serde would read a struct from an array of its
/// fields (`[null, null]`), which no client means. Anything else is `invalid_input` (or
/// `invalid_json` when it is not JSON at all).
pub(crate) fn require_object(bytes: &[u8]) -> Result<(), ApiError> {
    let first = bytes.iter().find(|byte| !byte.is_ascii_whitespace());
    if first == Some(&b'{') {
        return Ok(());
    }
    let code = match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
        Ok(_) => "invalid_input",
        Err(_) => "invalid_json",
    };
    Err(ApiError::new(
        StatusCode::BAD_REQUEST,
        code,
        "the body must be a JSON object",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cost_of_a_body_counts_its_values_not_its_strings() {
        assert_eq!(parse_cost(b"1"), 1 + BYTES_PER_VALUE);
        let dense = b"[1,1,1,1]";
        assert_eq!(parse_cost(dense), dense.len() + 5 * BYTES_PER_VALUE);
        let text = br#"{"a": "x,y:[{z\"],"}"#;
        assert_eq!(parse_cost(text), text.len() + 3 * BYTES_PER_VALUE);
    }

    #[test]
    fn only_objects_are_bodies() {
        assert!(require_object(b" {}").is_ok());
        for (body, code) in [
            (&b"[null, null]"[..], "invalid_input"),
            (b"1", "invalid_input"),
            (b"null", "invalid_input"),
            (b"[nope", "invalid_json"),
            (b"", "invalid_json"),
        ] {
            let err = require_object(body).unwrap_err();
            assert_eq!(err.code, code, "{body:?}");
        }
    }
}
