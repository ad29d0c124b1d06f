//! What a browser may do with a pod: requests for other host names refused (DNS rebinding),
//! writes from other origins refused (cross-site request forgery), and headers that keep the
//! pages out of frames and content types unsniffed.
//!
//! A page on another site can make a browser send requests to a pod it can reach (a pod on
//! `127.0.0.1` included), with no token when the pod has none. Three rules stop it:
//!
//! 1. **Host.** The `Host` header must name this pod as the operator knows it: an IP address,
//!    `localhost`, the machine's host name, or a name in [`AccessPolicy::allowed_hosts`]
//!    (`PROCLOG_ALLOWED_HOSTS`). A rebinding page's requests carry its own host name and are
//!    refused with `403 host_not_allowed`. `/healthz` and `/readyz` answer any host (probes
//!    address pods by IP anyway, and they say nothing).
//! 2. **Origin of writes.** A request that is not `GET`/`HEAD`/`OPTIONS` is refused with
//!    `403 cross_origin` when the browser says it comes from another site (`Sec-Fetch-Site`)
//!    or another origin (`Origin` not this pod's), unless that origin is listed in
//!    [`AccessPolicy::allowed_origins`] (`PROCLOG_ALLOWED_ORIGINS`, which also answers CORS
//!    preflights for it). Clients that are not browsers send neither header and pass.
//! 3. **Content type.** `/v1` writes take only `application/json` (an empty cancel body
//!    included), which an HTML form cannot send (enforced by the handlers' extractors).
//!
//! Every response carries `X-Content-Type-Options: nosniff`, `X-Frame-Options: DENY`, a
//! `Content-Security-Policy` (no framing, scripts and styles from the pod only) and
//! `Referrer-Policy: same-origin`.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;

/// Who may address this pod, and from where writes may come.
#[derive(Clone, Debug, Default)]
pub struct AccessPolicy {
    /// Host names (without port) accepted in `Host` besides IP addresses, `localhost` and the
    /// machine's host name; `*` accepts any, `.example.com` any name under it.
    pub allowed_hosts: Vec<String>,
    /// Origins (`https://app.example.com`) whose pages may write to this pod from a browser.
    pub allowed_origins: Vec<String>,
    /// Console cookies get the `Secure` attribute (also set for requests that arrived as
    /// `https`, per `X-Forwarded-Proto`).
    pub secure_cookies: bool,
}

impl AccessPolicy {
    /// A policy from comma-separated lists (the form of `PROCLOG_ALLOWED_HOSTS` and
    /// `PROCLOG_ALLOWED_ORIGINS`); entries are trimmed, empty ones ignored.
    pub fn from_lists(hosts: &str, origins: &str) -> Self {
        let split = |list: &str| -> Vec<String> {
            list.split(',')
                .map(|entry| entry.trim().trim_end_matches('/').to_ascii_lowercase())
                .filter(|entry| !entry.is_empty())
                .collect()
        };
        Self {
            allowed_hosts: split(hosts),
            allowed_origins: split(origins),
            secure_cookies: false,
        }
    }

    /// Whether the `Host` header value names this pod.
    pub fn host_allowed(&self, host: &str) -> bool {
        let name = host_name(host).to_ascii_lowercase();
        if name.is_empty() {
            return false;
        }
        let bare = name.trim_start_matches('[').trim_end_matches(']');
        if bare.parse::<IpAddr>().is_ok() || name == "localhost" || name.ends_with(".localhost") {
            return true;
        }
        if machine_host_name().is_some_and(|own| own.eq_ignore_ascii_case(&name)) {
            return true;
        }
        self.allowed_hosts.iter().any(|rule| {
            rule == "*" || *rule == name || (rule.starts_with('.') && name.ends_with(rule.as_str()))
        })
    }

    /// Whether a write with these headers may proceed: not from another site or origin, or
    /// from a listed origin.
    pub fn write_allowed(&self, headers: &HeaderMap) -> bool {
        let origin = headers
            .get(header::ORIGIN)
            .and_then(|value| value.to_str().ok())
            .map(|origin| origin.trim_end_matches('/').to_ascii_lowercase());
        if origin
            .as_deref()
            .is_some_and(|origin| self.allowed_origins.iter().any(|o| o == origin))
        {
            return true;
        }
        if let Some(site) = headers.get("sec-fetch-site") {
            return matches!(site.as_bytes(), b"same-origin" | b"none");
        }
        let Some(origin) = origin else {
            return true;
        };
        let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
            return false;
        };
        let host = host.to_ascii_lowercase();
        origin == format!("http://{host}") || origin == format!("https://{host}")
    }

    /// Whether cookies set in answer to a request with these headers are `Secure`.
    pub fn cookies_secure(&self, headers: &HeaderMap) -> bool {
        self.secure_cookies
            || headers
                .get("x-forwarded-proto")
                .is_some_and(|proto| proto.as_bytes().eq_ignore_ascii_case(b"https"))
    }
}

/// The host part of a `Host` header value (`name:port`, `[v6]:port`).
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split_once(']')
            .map_or("", |(v6, _)| &host[..=v6.len()]);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

/// This machine's host name (a container's is what pods advertise to each other).
fn machine_host_name() -> Option<&'static str> {
    static NAME: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
    })
    .as_deref()
}

/// Paths that answer any host: the probes.
fn is_probe(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz")
}

const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; connect-src 'self' http: https:; \
     img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

/// Rules 1 and 2 above, and the security headers on every answer.
pub(super) async fn guard(
    State(policy): State<Arc<AccessPolicy>>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    let refusal = if !is_probe(path)
        && !request
            .headers()
            .get(header::HOST)
            .and_then(|host| host.to_str().ok())
            .is_some_and(|host| policy.host_allowed(host))
    {
        Some((
            "host_not_allowed",
            "this pod does not answer to that host name: add it to PROCLOG_ALLOWED_HOSTS",
        ))
    } else if !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    ) && !policy.write_allowed(request.headers())
    {
        Some((
            "cross_origin",
            "a write from another site or origin is refused: add the origin to PROCLOG_ALLOWED_ORIGINS",
        ))
    } else {
        None
    };
    let mut response = match refusal {
        Some((_, message)) if path == "/" || path.starts_with("/ui/") => {
            super::console::refused_page(message, StatusCode::FORBIDDEN)
        }
        Some((code, message)) => {
            ApiError::new(StatusCode::FORBIDDEN, code, message).into_response()
        }
        None => next.run(request).await,
    };
    let headers = response.headers_mut();
    for (name, value) in [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::REFERRER_POLICY, "same-origin"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// CORS for the listed origins: their pages may read and write `/v1` with a bearer token
/// (preflights answered); no other origin gets CORS headers.
pub(super) fn cors(policy: &AccessPolicy) -> tower_http::cors::CorsLayer {
    let origins: Vec<HeaderValue> = policy
        .allowed_origins
        .iter()
        .filter_map(|origin| HeaderValue::from_str(origin).ok())
        .collect();
    tower_http::cors::CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::HeaderName::from_static("last-event-id"),
        ])
        .expose_headers([header::HeaderName::from_static("proclog-start")])
        .max_age(std::time::Duration::from_secs(600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_ip_addresses_localhost_this_machine_or_listed() {
        let policy = AccessPolicy::from_lists("proclog.internal, .svc.cluster.local", "");
        for ok in [
            "127.0.0.1:8080",
            "10.1.2.3",
            "[::1]:8080",
            "localhost:8080",
            "LOCALHOST",
            "proclog.internal:80",
            "proclog.ns.svc.cluster.local",
        ] {
            assert!(policy.host_allowed(ok), "{ok}");
        }
        for refused in [
            "evil.example",
            "evil.example:8080",
            "",
            "proclog.internal.evil",
            "[::1",
        ] {
            assert!(!policy.host_allowed(refused), "{refused}");
        }
        assert!(AccessPolicy::from_lists("*", "").host_allowed("anything.example"));
    }

    #[test]
    fn writes_from_other_origins_are_refused_unless_listed() {
        let policy = AccessPolicy::from_lists("", "https://app.example/");
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.insert(*name, HeaderValue::from_str(value).unwrap());
            }
            map
        };
        assert!(policy.write_allowed(&headers(&[])), "curl sends neither");
        assert!(policy.write_allowed(&headers(&[("sec-fetch-site", "same-origin")])));
        assert!(!policy.write_allowed(&headers(&[("sec-fetch-site", "cross-site")])));
        assert!(!policy.write_allowed(&headers(&[("sec-fetch-site", "same-site")])));
        assert!(policy.write_allowed(&headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080")
        ])));
        assert!(!policy.write_allowed(&headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://evil.example")
        ])));
        assert!(!policy.write_allowed(&headers(&[("origin", "null")])));
        assert!(policy.write_allowed(&headers(&[
            ("sec-fetch-site", "cross-site"),
            ("origin", "https://app.example")
        ])));
    }
}
