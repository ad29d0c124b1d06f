//! The HTTP server of a pod: every connection bounded in number and in time.
//!
//! `axum::serve` sets no timer and accepts without limit, so idle or half-sent requests could
//! hold sockets until the pod ran out of file descriptors and stopped answering its probes.
//! This accept loop serves HTTP/1.1 with hyper directly and bounds what a client can hold:
//!
//! - **Headers and idle time.** A connection that has not sent a whole request head within
//!   [`ServerLimits::header_read_timeout`] of starting to wait for one (a slowloris, or a
//!   keep-alive connection left idle) is closed. A request body must arrive within
//!   [`ServerLimits::body_read_timeout`] (else 408).
//! - **Connections.** At most [`ServerLimits::max_connections`] are open. When a new one
//!   arrives at the cap, the oldest connection that is not serving a request (idle between
//!   requests, or still sending its head) is closed to make room, so a flood of idle sockets
//!   can never lock out a probe or a real request. When every connection is serving a request,
//!   the newcomer gets `503 too_many_connections` and is closed.
//! - **Accept errors** (out of file descriptors) are logged at most once a second and retried
//!   after a pause, never in a busy loop.
//!
//! Long-lived responses (streams, awaits) are capped separately by the API (`max_streams`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// What one pod's HTTP server lets clients hold.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// Most connections open at once (default 1,000, and never more than the file limit
    /// allows, see [`raise_file_limit`]).
    pub max_connections: usize,
    /// How long a connection may take to send a request head once the server waits for one;
    /// also how long a keep-alive connection may stay idle (default 10 s).
    pub header_read_timeout: Duration,
    /// How long a request body may take to arrive (default 30 s).
    pub body_read_timeout: Duration,
    /// How long a stopping server lets requests in flight finish before closing them
    /// (default 2 s).
    pub close_grace: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 1_000,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            close_grace: Duration::from_secs(2),
        }
    }
}

/// Counters of the accept loop, for `/metrics`.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections open now.
    pub open: AtomicUsize,
    /// Requests being served now (a response body still streaming counts).
    pub in_flight: AtomicUsize,
    /// Idle connections closed to admit a new one at the cap.
    pub evicted: std::sync::atomic::AtomicU64,
    /// Connections refused with 503 because every open one was serving a request.
    pub refused: std::sync::atomic::AtomicU64,
}

/// Sockets the pod keeps for itself beyond its HTTP connections: pools, the listener, files.
const RESERVED_DESCRIPTORS: u64 = 128;

/// Raises the soft limit of open files to the hard limit (as far as the process may) and
/// returns the connection cap that fits under it: `wanted`, or less when the limit is lower,
/// keeping [`RESERVED_DESCRIPTORS`] for the pod's own sockets and files.
pub fn raise_file_limit(wanted: usize) -> usize {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    let limit = unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return wanted;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
        limit.rlim_cur
    };
    let room = limit.saturating_sub(RESERVED_DESCRIPTORS).max(16);
    wanted.min(usize::try_from(room).unwrap_or(usize::MAX))
}

/// One open connection, as the accept loop sees it.
struct Connection {
    /// Requests being served (a response body still streaming counts).
    busy: Arc<AtomicUsize>,
    /// Closes the connection at once (eviction).
    close: CancellationToken,
    accepted: Instant,
}

/// Serves `router` on `listener` within `limits` until `stop` resolves; then lets requests in
/// flight finish for [`ServerLimits::close_grace`] and closes every connection. Returns when
/// every connection task has ended.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    stats: Arc<ServerStats>,
    stop: impl Future<Output = ()>,
) {
    let router = router.layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
        limits.body_read_timeout,
    ));
    let stopping = CancellationToken::new();
    let mut tasks: JoinSet<u64> = JoinSet::new();
    let mut refusals: JoinSet<()> = JoinSet::new();
    let mut open: HashMap<u64, Connection> = HashMap::new();
    let mut next_id: u64 = 0;
    let mut last_accept_error: Option<Instant> = None;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            Some(done) = tasks.join_next() => {
                if let Ok(id) = done {
                    open.remove(&id);
                }
                stats.open.store(open.len(), Ordering::Relaxed);
            }
            Some(_) = refusals.join_next() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        // EMFILE and friends: say so once a second, pause, carry on.
                        if last_accept_error.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                            tracing::warn!(error = %err, open = open.len(), "cannot accept a connection");
                            last_accept_error = Some(Instant::now());
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if open.len() >= limits.max_connections {
                    if evict_idle(&mut open) {
                        stats.evicted.fetch_add(1, Ordering::Relaxed);
                    } else {
                        stats.refused.fetch_add(1, Ordering::Relaxed);
                        // A bounded number of refusals in flight; past that the socket just
                        // closes.
                        if refusals.len() < 64 {
                            refusals.spawn(refuse(stream));
                        }
                        continue;
                    }
                }
                let id = next_id;
                next_id += 1;
                let connection = Connection {
                    busy: Arc::new(AtomicUsize::new(0)),
                    close: CancellationToken::new(),
                    accepted: Instant::now(),
                };
                tasks.spawn(serve_connection(stream, ConnectionTask {
                    id,
                    router: router.clone(),
                    header_read_timeout: limits.header_read_timeout,
                    stats: Arc::clone(&stats),
                    busy: Arc::clone(&connection.busy),
                    close: connection.close.clone(),
                    stopping: stopping.clone(),
                }));
                open.insert(id, connection);
                stats.open.store(open.len(), Ordering::Relaxed);
            }
        }
    }
    drop(listener);
    stopping.cancel();
    let drained = tokio::time::timeout(limits.close_grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    refusals.abort_all();
    stats.open.store(0, Ordering::Relaxed);
}

/// Closes the oldest connection that serves no request; false when every one is busy.
fn evict_idle(open: &mut HashMap<u64, Connection>) -> bool {
    let oldest_idle = open
        .iter()
        .filter(|(_, c)| c.busy.load(Ordering::Acquire) == 0)
        .min_by_key(|(_, c)| c.accepted)
        .map(|(id, _)| *id);
    match oldest_idle.and_then(|id| open.remove(&id)) {
        Some(connection) => {
            connection.close.cancel();
            true
        }
        None => false,
    }
}

/// Answers a connection that cannot be served with a 503 in the API's error format.
async fn refuse(mut stream: TcpStream) {
    const BODY: &str = r#"{"error":{"code":"too_many_connections","message":"every connection of this pod is serving a request; retry shortly"}}"#;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    // Read the request head first (a client takes an answer before its request for a
    // protocol error), answer, end our side, and read what else the client sends until it
    // closes: closing with unread input would reset the connection, and the client would see
    // an error instead of the 503. All of it within two seconds.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let mut head = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
            let read = stream.read(&mut chunk).await?;
            if read == 0 {
                break;
            }
            head.extend_from_slice(&chunk[..read]);
        }
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        while stream.read(&mut chunk).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// What a connection's task needs.
struct ConnectionTask {
    id: u64,
    router: Router,
    header_read_timeout: Duration,
    stats: Arc<ServerStats>,
    busy: Arc<AtomicUsize>,
    close: CancellationToken,
    stopping: CancellationToken,
}

async fn serve_connection(stream: TcpStream, task: ConnectionTask) -> u64 {
    let ConnectionTask {
        id,
        router,
        header_read_timeout,
        stats,
        busy,
        close,
        stopping,
    } = task;
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let guard = BusyGuard::new(Arc::clone(&busy), Arc::clone(&stats));
        let router = router.clone();
        async move {
            let response = router
                .oneshot(request.map(Body::new))
                .await
                .unwrap_or_else(|never: Infallible| match never {});
            Ok::<_, Infallible>(response.map(|body| Body::new(GuardedBody { body, guard })))
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(err) = result {
                tracing::debug!(error = %err, "connection ended with an error");
            }
            return id;
        }
        () = close.cancelled() => return id,
        () = stopping.cancelled() => {}
    }
    // Stopping: finish what is in flight, accept no further request on this connection.
    connection.as_mut().graceful_shutdown();
    tokio::select! {
        _ = connection.as_mut() => {}
        () = close.cancelled() => {}
    }
    id
}

/// Counts a request as in service (on its connection and in the server's stats) until its
/// response body is dropped.
struct BusyGuard {
    connection: Arc<AtomicUsize>,
    stats: Arc<ServerStats>,
}

impl BusyGuard {
    fn new(connection: Arc<AtomicUsize>, stats: Arc<ServerStats>) -> Self {
        connection.fetch_add(1, Ordering::AcqRel);
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        Self { connection, stats }
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.connection.fetch_sub(1, Ordering::AcqRel);
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request counted as busy while it streams.
struct GuardedBody {
    body: Body,
    #[allow(dead_code)]
    guard: BusyGuard,
}

impl hyper::body::Body for GuardedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A pod's HTTP face: the API, the console, probes and metrics over a stack (and the pod that
/// runs on it, for its counters), served until [`HttpServer::shutdown`]. Dropped, the server
/// stops at once (its connections are closed).
///
/// ```no_run
/// # async fn demo() -> Result<(), proclog::ProcessError> {
/// use proclog::http::{HttpOptions, HttpServer};
/// use proclog::{Pod, Proclog};
///
/// let stack = Proclog::builder("postgres://app@db/app").start().await?;
/// let pod = Pod::builder(&stack).start().await?;
/// let http = HttpServer::start(
///     &stack,
///     Some(&pod),
///     "127.0.0.1:8080".parse().unwrap(),
///     HttpOptions { token: Some("a long secret".into()), ..HttpOptions::default() },
/// )
/// .await?;
/// // ... until the host stops: the pod drains first, while the API still answers.
/// pod.shutdown().await;
/// http.shutdown().await;
/// stack.shutdown().await;
/// # Ok(()) }
/// ```
pub struct HttpServer {
    address: std::net::SocketAddr,
    stats: Arc<ServerStats>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: crate::tasks::TaskHandle,
}

impl HttpServer {
    /// Binds `address` (port 0: any free port, see [`HttpServer::address`]) and serves the API
    /// of `stack` with `options`; with a `pod`, `/metrics` carries its worker's counters and
    /// the pod advertises this address in its presence.
    pub async fn start(
        stack: &crate::Proclog,
        pod: Option<&crate::pod::Pod>,
        address: std::net::SocketAddr,
        options: super::HttpOptions,
    ) -> Result<Self, crate::ProcessError> {
        let mut options = options;
        options.limits.max_connections = raise_file_limit(options.limits.max_connections);
        let worker = pod.and_then(|pod| pod.stats().cloned());
        let state = super::ApiState::new(Arc::clone(stack.services()), worker, &options);
        let listener = TcpListener::bind(address).await.map_err(|err| {
            crate::ProcessError::InvalidInput(format!("cannot listen on {address}: {err}"))
        })?;
        let address = listener.local_addr().map_err(|err| {
            crate::ProcessError::InvalidInput(format!("cannot listen on {address}: {err}"))
        })?;
        let stats = Arc::clone(&state.server);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = crate::tasks::TaskHandle::spawn(
            "http server",
            serve(
                listener,
                super::router(state, options.max_body_bytes),
                options.limits.clone(),
                Arc::clone(&stats),
                async {
                    let _ = stopped.await;
                },
            ),
        );
        if let Some(pod) = pod {
            pod.advertise(Some(advertised(address)));
        }
        tracing::info!(pod = %stack.pod_id(), %address, "serving the API");
        Ok(Self {
            address,
            stats,
            stop,
            task,
        })
    }

    /// The address served.
    pub fn address(&self) -> std::net::SocketAddr {
        self.address
    }

    /// The server's connection counters.
    pub fn stats(&self) -> &Arc<ServerStats> {
        &self.stats
    }

    /// Stops accepting, lets requests in flight finish for the close grace
    /// ([`ServerLimits::close_grace`]), closes every connection, and returns when all have
    /// ended.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        self.task.join().await;
    }
}

/// The address a pod reports in its presence: its listen address, with the host name in
/// place of an unspecified IP (`0.0.0.0:8080` in a container reads `<hostname>:8080`).
fn advertised(address: std::net::SocketAddr) -> String {
    if !address.ip().is_unspecified() {
        return address.to_string();
    }
    match std::fs::read_to_string("/proc/sys/kernel/hostname") {
        Ok(host) if !host.trim().is_empty() => format!("{}:{}", host.trim(), address.port()),
        _ => address.to_string(),
    }
}
