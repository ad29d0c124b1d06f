//! A TCP proxy on the loopback interface, for network faults between a pod and Postgres.
//!
//! The proxy listens on a free port of 127.0.0.1 and forwards every connection to one
//! upstream address. Its [`Mode`] can be changed at run time:
//!
//! - [`Mode::Pass`]: bytes flow both ways.
//! - [`Mode::Drop`]: every open connection is closed at once with a reset, and new ones are
//!   refused (accepted and reset at once: the client usually sees the reset already in its
//!   `connect`), until the mode changes.
//! - [`Mode::Stall`]: a blackhole. Connections stay open and new ones are accepted (but not yet
//!   connected upstream), and no byte is forwarded in either direction. Nothing is lost: the
//!   proxy stops reading, so what the peers send waits in socket buffers (or, for at most one
//!   read per direction, in the proxy), and is delivered when the mode goes back to `Pass`,
//!   as TCP retransmission would after a partition heals. A peer's timeout or keepalive may of
//!   course give up on the connection meanwhile.
//!
//! [`TcpProxy::drop_connections`] is a one-off cut while staying in `Pass`. Dropping the proxy
//! stops its tasks and closes every connection.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward bytes both ways.
    Pass,
    /// Close every connection, current and new.
    Drop,
    /// Keep connections open, forward nothing until the mode is `Pass` again.
    Stall,
}

/// State shared by the proxy handle and its tasks.
struct Shared {
    upstream: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Bumped to close every connection open at that instant.
    cuts: watch::Sender<u64>,
    /// Local ports of the proxy's open upstream connections (what Postgres sees as
    /// `client_port` of the proxied sessions).
    upstream_ports: Mutex<HashSet<u16>>,
    stop: CancellationToken,
}

/// A running proxy; see the module documentation.
pub struct TcpProxy {
    port: u16,
    shared: Arc<Shared>,
}

impl TcpProxy {
    /// Starts a proxy in [`Mode::Pass`] on a free port of 127.0.0.1, forwarding to
    /// `upstream`. Must be called within a Tokio runtime, which runs its tasks.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared {
            upstream,
            mode: watch::Sender::new(Mode::Pass),
            cuts: watch::Sender::new(0),
            upstream_ports: Mutex::new(HashSet::new()),
            stop: CancellationToken::new(),
        });
        tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Self { port, shared }
    }

    /// The port the proxy listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        *self.shared.mode.borrow()
    }

    /// Switches to `mode`. Entering [`Mode::Drop`] closes every open connection at once.
    pub fn set_mode(&self, mode: Mode) {
        self.shared.mode.send_replace(mode);
        if mode == Mode::Drop {
            self.drop_connections();
        }
    }

    /// Closes every connection open now, with a reset; the mode does not change.
    pub fn drop_connections(&self) {
        self.shared.cuts.send_modify(|cut| *cut += 1);
    }

    /// The local ports of the proxy's open connections to the upstream: the `client_port`
    /// Postgres reports for the sessions that go through this proxy.
    pub fn upstream_client_ports(&self) -> Vec<u16> {
        let ports = self.shared.upstream_ports.lock().unwrap();
        ports.iter().copied().collect()
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            _ = shared.stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, _)) => {
                if *shared.mode.borrow() == Mode::Drop {
                    reset(&client);
                    continue;
                }
                tokio::spawn(serve(client, Arc::clone(&shared)));
            }
            // E.g. too many open files: let the peer retry.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Makes the coming close of `stream` a reset (RST) rather than an orderly FIN.
fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

/// One proxied connection: waits for `Pass`, connects upstream, pumps both ways until either
/// side closes, the connection is cut, or the proxy stops.
async fn serve(mut client: TcpStream, shared: Arc<Shared>) {
    let mut cuts = shared.cuts.subscribe();
    let mut mode = shared.mode.subscribe();
    let connected = tokio::select! {
        _ = shared.stop.cancelled() => None,
        _ = cuts.changed() => None,
        pass = wait_pass(&mut mode) => match pass {
            true => TcpStream::connect(shared.upstream).await.ok(),
            false => None,
        },
    };
    let Some(mut upstream) = connected else {
        reset(&client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let port = upstream.local_addr().map(|a| a.port()).ok();
    if let Some(port) = port {
        shared.upstream_ports.lock().unwrap().insert(port);
    }
    let (client_read, client_write) = client.split();
    let (upstream_read, upstream_write) = upstream.split();
    let cut = tokio::select! {
        _ = shared.stop.cancelled() => true,
        _ = cuts.changed() => true,
        closed = pump(client_read, upstream_write, shared.mode.subscribe()) => !closed,
        closed = pump(upstream_read, client_write, shared.mode.subscribe()) => !closed,
    };
    if let Some(port) = port {
        shared.upstream_ports.lock().unwrap().remove(&port);
    }
    if cut {
        reset(&client);
        reset(&upstream);
    }
}

/// Forwards bytes from `from` to `to` while the mode allows it. Returns true when a side
/// closed or failed (an orderly end), false when the mode became `Drop` (a cut).
async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    mut mode: watch::Receiver<Mode>,
) -> bool {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        if !wait_pass(&mut mode).await {
            return false;
        }
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return true,
            Ok(read) => read,
        };
        if !wait_pass(&mut mode).await {
            return false;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return true;
        }
    }
}

/// Waits while the mode is `Stall`; true for `Pass`, false for `Drop`.
async fn wait_pass(mode: &mut watch::Receiver<Mode>) -> bool {
    loop {
        let current = *mode.borrow_and_update();
        match current {
            Mode::Pass => return true,
            Mode::Drop => return false,
            Mode::Stall => {
                if mode.changed().await.is_err() {
                    return false;
                }
            }
        }
    }
}
