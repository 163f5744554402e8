//! Moves bytes between the client's and the server's data connections.
//!
//! Owns: the two pumps of a data relay (client → server, server → client),
//! each with `splice(2)` through a pipe or with a user-space copy (plain
//! legs), or a TLS-aware loop when a leg is TLS (`stream`), the
//! propagation of half-close (a peer's FIN is passed on after its last byte,
//! in the order the peers used it), resets on failure, the idle watchdog and
//! the byte counts, and how much a slow receiver may make the gateway hold
//! (`TCP_NOTSENT_LOWAT` on both sockets, chunks that follow the receiver).
//!
//! With `--relay-mode sockmap` the kernel moves the bytes of plain legs
//! (`sockmap`), under the same contract.
//!
//! Knows nothing of FTP: the session decides what the bytes mean and when a
//! transfer is over. Both modes share one contract (same half-close, same
//! counts, same cancellation), checked by one test suite run against both.

mod pump;
pub(crate) mod sockmap;
mod stream;

pub(crate) use stream::Leg;

use std::future::Future;
use std::net::{IpAddr, Shutdown};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How data bytes are moved (`--relay-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RelayMode {
    /// Copy, with chunks of at most [`WIRE_COPY_MAX`] toward another
    /// host: what measured best both ways. A receiver on this host copies
    /// the bytes out of its socket anyway, and cache-warm buffers written
    /// by the relay cost it less than references to pages no CPU has read
    /// (issue 6's benchmark); between hosts splice left the relay's thread
    /// doing the TCP work of three stages where copying spread it (issue
    /// 14's profile: 0.82-0.92 x routed against 0.44-0.51 with the tracker's
    /// ingress off the XDP path; docs/bench-notes.md). Toward a receiver
    /// that proves slow before it proves fast, splice: no buffer of the
    /// gateway's own for as long as a slow client takes (the pump's
    /// docs).
    #[default]
    Auto,
    /// Always splice(2) through a pipe, falling back to copying only where
    /// the kernel refuses.
    Splice,
    /// Always copy through user space.
    Copy,
    /// The kernel moves the bytes: both plain sockets in a sockmap, a
    /// stream verdict redirecting each one's payload to the other
    /// (`sockmap`); splice where a pair cannot be linked. An experiment
    /// (issue 14, item 3): see docs/bench-notes.md for how it measures.
    Sockmap,
}

/// How to relay.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RelayOptions {
    /// auto, splice or copy.
    pub mode: RelayMode,
    /// Pipe capacity requested for splice.
    pub pipe_size: usize,
    /// Largest copy buffer.
    pub copy_buffer: usize,
    /// `TCP_NOTSENT_LOWAT` on both data sockets; 0 leaves the kernel's
    /// default.
    pub send_lowat: u32,
    /// The relay fails when no byte moves in either direction for this long.
    pub idle_timeout: Duration,
}

/// The direction of a byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// From the client's data connection to the server's.
    ClientToServer,
    /// From the server's data connection to the client's.
    ServerToClient,
}

impl Direction {
    /// A label for logs and metrics.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Direction::ClientToServer => "client_to_server",
            Direction::ServerToClient => "server_to_client",
        }
    }
}

/// How bytes were moved in one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    /// Zero-copy through a pipe.
    Splice,
    /// Through a user-space buffer.
    Copy,
    /// Through TLS on at least one leg (read, decrypt or encrypt, write).
    Tls,
    /// Redirected by the kernel (`--relay-mode sockmap`).
    Sockmap,
}

impl Method {
    /// Every method.
    pub(crate) const ALL: [Method; 4] =
        [Method::Splice, Method::Copy, Method::Tls, Method::Sockmap];

    /// A label for logs and metrics.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Method::Splice => "splice",
            Method::Copy => "copy",
            Method::Tls => "tls",
            Method::Sockmap => "sockmap",
        }
    }
}

/// The method a direction starts with. Auto copies everywhere (see
/// [`RelayMode::Auto`]); what differs by receiver is the largest chunk
/// ([`copy_max_for`]).
pub(crate) fn method_for(mode: RelayMode) -> Method {
    match mode {
        // Sockmap: what a pair the kernel would not link falls back to.
        RelayMode::Splice | RelayMode::Sockmap => Method::Splice,
        RelayMode::Copy | RelayMode::Auto => Method::Copy,
    }
}

/// The largest copy chunk toward another host. Reads there return 2-4 MB
/// at a time; a 4 MiB buffer no longer fits a core's L2 cache and measured
/// 0.65 x routed against 0.82 at 1 MiB (512 KiB: 0.65, 2 MiB: 0.80), while
/// on loopback the larger buffer wins (issue 6). docs/bench-notes.md.
pub(crate) const WIRE_COPY_MAX: usize = 1 << 20;

/// The largest copy chunk toward `peer` reached from `local`: the
/// configured one toward a process on this host, at most
/// [`WIRE_COPY_MAX`] toward another host.
pub(crate) fn copy_max_for(copy_buffer: usize, peer: IpAddr, local: IpAddr) -> usize {
    if on_this_host(peer, local) {
        copy_buffer
    } else {
        copy_buffer.min(WIRE_COPY_MAX)
    }
}

/// Whether a peer at `peer`, reached from `local`, is a process on this
/// host: a loopback address, or the gateway's own.
fn on_this_host(peer: IpAddr, local: IpAddr) -> bool {
    let peer = peer.to_canonical();
    peer.is_loopback() || peer == local.to_canonical()
}

/// The `TCP_NOTSENT_LOWAT` for a socket toward `peer` from `local`: the
/// configured bound toward another host, none (`0` configured, or a
/// process on this host) otherwise.
pub(crate) fn send_lowat_for(lowat: u32, peer: IpAddr, local: IpAddr) -> Option<u32> {
    (lowat > 0 && !on_this_host(peer, local)).then_some(lowat)
}

/// [`copy_max_for`] on a connected socket; the configured size when its
/// addresses are unknown (the socket is failing, the pump will say so).
fn copy_max_toward(copy_buffer: usize, to: &TcpStream) -> usize {
    match (to.peer_addr(), to.local_addr()) {
        (Ok(peer), Ok(local)) => copy_max_for(copy_buffer, peer.ip(), local.ip()),
        _ => copy_buffer,
    }
}

/// Why a direction of the relay failed.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum RelayError {
    /// Reading, writing or splicing failed.
    #[error("{direction} relay failed: {source}")]
    Io {
        /// Which direction.
        direction: &'static str,
        /// The kernel's error.
        source: Arc<std::io::Error>,
    },
    /// No byte moved for the idle timeout.
    #[error("no data moved for {0:?}")]
    Idle(Duration),
    /// The other direction failed, so this one was cut.
    #[error("cut because the other direction failed")]
    Cut,
    /// The legs could not be made ready (a TLS handshake failed); the
    /// error is the caller's, typed (the relay does not know it).
    #[error("{0}")]
    Setup(Arc<dyn std::error::Error + Send + Sync>),
}

/// The state of one direction.
#[derive(Debug, Clone)]
pub(crate) enum Flow {
    /// Still moving bytes.
    Running,
    /// End of stream seen and passed on.
    Finished {
        /// Bytes moved.
        bytes: u64,
        /// How.
        method: Method,
    },
    /// Failed; both connections were reset.
    Failed {
        /// Bytes moved before the failure.
        bytes: u64,
        /// Why.
        error: RelayError,
    },
}

impl Flow {
    /// Whether the direction is over, one way or the other.
    pub(crate) fn is_over(&self) -> bool {
        !matches!(self, Flow::Running)
    }
}

/// Both directions.
#[derive(Debug, Clone)]
pub(crate) struct Progress {
    /// Client to server.
    pub client_to_server: Flow,
    /// Server to client.
    pub server_to_client: Flow,
}

impl Progress {
    /// The state of one direction.
    pub(crate) fn get(&self, direction: Direction) -> &Flow {
        match direction {
            Direction::ClientToServer => &self.client_to_server,
            Direction::ServerToClient => &self.server_to_client,
        }
    }

    fn set(&mut self, direction: Direction, flow: Flow) {
        match direction {
            Direction::ClientToServer => self.client_to_server = flow,
            Direction::ServerToClient => self.server_to_client = flow,
        }
    }
}

/// A running relay. Dropping it stops the relay and closes both
/// connections as the kernel closes a socket (what is queued is still
/// sent, then FIN; a reset where unread bytes remain); [`RelayHandle::cut`]
/// resets them.
#[derive(Debug)]
pub(crate) struct RelayHandle {
    task: JoinHandle<()>,
    progress: watch::Receiver<Progress>,
    cut: Arc<AtomicBool>,
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RelayHandle {
    /// Stops the relay and resets both connections (`SO_LINGER` 0), as a
    /// failure does: each peer learns at once that the transfer was cut.
    /// A close would send FIN when the relay had read everything, and a
    /// peer still writing would learn of it only from the reset its next
    /// segment draws, in `CLOSE_WAIT`, where Linux reports `EPIPE`:
    /// ProFTPD's mod_tls takes that on a data connection for a fatal
    /// error and ends the whole session (it ignores `ECONNRESET`). Legs
    /// still in their TLS handshakes (`spawn_after`) are closed, not reset.
    pub(crate) fn cut(self) {
        self.cut.store(true, Ordering::Release);
        // Drop aborts the task; its legs see the flag as they drop.
    }

    /// Waits until `direction` is over and returns its final state.
    /// Cancel-safe.
    pub(crate) async fn wait(&mut self, direction: Direction) -> Flow {
        let over = self
            .progress
            .wait_for(|p| p.get(direction).is_over())
            .await
            .map(|p| p.get(direction).clone());
        match over {
            Ok(flow) => flow,
            Err(_) => self.progress.borrow().get(direction).clone(),
        }
    }

    #[cfg(test)]
    /// Waits until both directions are over. Cancel-safe.
    pub(crate) async fn wait_all(&mut self) -> Progress {
        let _ = self
            .progress
            .wait_for(|p| p.client_to_server.is_over() && p.server_to_client.is_over())
            .await;
        self.progress.borrow().clone()
    }

    #[cfg(test)]
    /// The current state.
    pub(crate) fn progress(&self) -> Progress {
        self.progress.borrow().clone()
    }
}

/// Starts relaying between the two connections on a task of its own.
pub(crate) fn spawn(client: Leg, server: Leg, options: RelayOptions) -> RelayHandle {
    let (tx, rx) = watch::channel(Progress {
        client_to_server: Flow::Running,
        server_to_client: Flow::Running,
    });
    let cut = Arc::new(AtomicBool::new(false));
    let legs = Legs::new(client, server, Arc::clone(&cut));
    let task = tokio::spawn(start(legs, options, tx));
    RelayHandle {
        task,
        progress: rx,
        cut,
    }
}

/// Both legs of a running relay, owned by its task: when the task is
/// aborted after [`RelayHandle::cut`], they are reset as they drop.
struct Legs {
    client: Leg,
    server: Leg,
    cut: Arc<AtomicBool>,
    /// The relay ran to its end and closed or reset them itself: a clean
    /// end's queued bytes must not be thrown away by a late cut.
    ended: bool,
}

impl Legs {
    fn new(client: Leg, server: Leg, cut: Arc<AtomicBool>) -> Legs {
        Legs {
            client,
            server,
            cut,
            ended: false,
        }
    }
}

impl Drop for Legs {
    fn drop(&mut self) {
        if !self.ended && self.cut.load(Ordering::Acquire) {
            for leg in [&self.client, &self.server] {
                let _ = socket2::SockRef::from(leg.tcp()).set_linger(Some(Duration::ZERO));
            }
        }
    }
}

/// Bounds the unsent bytes the kernel queues on each leg toward another
/// host, then relays with the method the legs allow. Toward a process on
/// this host the loopback path delivers as it sends, and the bound only
/// cost throughput (10–20 % of a RETR on loopback, docs/bench-notes.md).
async fn start(mut legs: Legs, options: RelayOptions, tx: watch::Sender<Progress>) {
    for leg in [&legs.client, &legs.server] {
        let tcp = leg.tcp();
        let Ok((peer, local)) = tcp.peer_addr().and_then(|p| Ok((p, tcp.local_addr()?))) else {
            continue;
        };
        if let Some(lowat) = send_lowat_for(options.send_lowat, peer.ip(), local.ip()) {
            // Best effort: without it the kernel's autotuned send buffer
            // holds more for a slow receiver, nothing breaks.
            if let Err(e) = socket2::SockRef::from(tcp).set_tcp_notsent_lowat(lowat) {
                tracing::debug!(error = %e, "TCP_NOTSENT_LOWAT not set on a data socket");
            }
        }
    }
    match (&mut legs.client, &mut legs.server) {
        (Leg::Plain(client), Leg::Plain(server)) => match sockmap::installed() {
            Some(kernel) if options.mode == RelayMode::Sockmap => {
                sockmap::run(kernel, client, server, options, tx).await;
            }
            _ => run(client, server, options, tx).await,
        },
        (client, server) => stream::run(client, server, options, tx).await,
    }
    legs.ended = true;
}

/// Starts relaying once `setup` has made the legs ready (TLS handshakes);
/// a failed setup fails both directions with its reason.
pub(crate) fn spawn_after<E: std::error::Error + Send + Sync + 'static>(
    setup: impl Future<Output = Result<(Leg, Leg), E>> + Send + 'static,
    options: RelayOptions,
) -> RelayHandle {
    let (tx, rx) = watch::channel(Progress {
        client_to_server: Flow::Running,
        server_to_client: Flow::Running,
    });
    let cut = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&cut);
    let task = tokio::spawn(async move {
        let setup = tokio::time::timeout(options.idle_timeout, setup).await;
        match setup {
            Ok(Ok((client, server))) => start(Legs::new(client, server, flag), options, tx).await,
            Ok(Err(error)) => fail_unfinished(&tx, &RelayError::Setup(Arc::new(error))),
            Err(_) => fail_unfinished(&tx, &RelayError::Idle(options.idle_timeout)),
        }
    });
    RelayHandle {
        task,
        progress: rx,
        cut,
    }
}

/// Every direction still running fails with `error`.
fn fail_unfinished(tx: &watch::Sender<Progress>, error: &RelayError) {
    tx.send_modify(|p| {
        for direction in [Direction::ClientToServer, Direction::ServerToClient] {
            if !p.get(direction).is_over() {
                p.set(
                    direction,
                    Flow::Failed {
                        bytes: 0,
                        error: error.clone(),
                    },
                );
            }
        }
    });
}

/// Milliseconds since the relay started, at the last byte moved.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    async fn idle(&self, timeout: Duration) {
        loop {
            let deadline =
                self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + timeout;
            tokio::time::sleep_until(deadline).await;
            if self.start.elapsed()
                >= Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + timeout
            {
                return;
            }
        }
    }
}

async fn one_way(
    direction: Direction,
    from: &TcpStream,
    to: &TcpStream,
    options: RelayOptions,
    tx: &watch::Sender<Progress>,
    activity: &Activity,
    already: u64,
) -> Result<(), ()> {
    let method = method_for(options.mode);
    let options = RelayOptions {
        copy_buffer: copy_max_toward(options.copy_buffer, to),
        ..options
    };
    let result = pump::pump(from, to, direction, method, options, &|| activity.touch()).await;
    let flow = match &result {
        Ok((bytes, method)) => Flow::Finished {
            bytes: bytes.saturating_add(already),
            method: *method,
        },
        Err((bytes, error)) => Flow::Failed {
            bytes: bytes.saturating_add(already),
            error: error.clone(),
        },
    };
    tx.send_modify(|p| p.set(direction, flow));
    result.map(|_| ()).map_err(|_| ())
}

async fn run(
    client: &TcpStream,
    server: &TcpStream,
    options: RelayOptions,
    tx: watch::Sender<Progress>,
) {
    run_after(client, server, options, tx, [0, 0]).await;
}

/// [`run`] for a relay that already moved `already` bytes (client to
/// server, server to client): they are added to the counts.
async fn run_after(
    client: &TcpStream,
    server: &TcpStream,
    options: RelayOptions,
    tx: watch::Sender<Progress>,
    already: [u64; 2],
) {
    let activity = Activity::new();
    let both = async {
        tokio::try_join!(
            one_way(
                Direction::ClientToServer,
                client,
                server,
                options,
                &tx,
                &activity,
                already[0]
            ),
            one_way(
                Direction::ServerToClient,
                server,
                client,
                options,
                &tx,
                &activity,
                already[1]
            )
        )
    };
    let failure = tokio::select! {
        result = both => result.err().map(|_| RelayError::Cut),
        () = activity.idle(options.idle_timeout) => Some(RelayError::Idle(options.idle_timeout)),
    };
    if let Some(error) = failure {
        fail_unfinished(&tx, &error);
        // Reset both connections so that each peer learns the transfer failed
        // instead of seeing a clean end of file.
        for stream in [client, server] {
            let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
        }
    } else {
        // Both ends of file were passed on: close quietly.
        for stream in [client, server] {
            let _ = socket2::SockRef::from(stream).shutdown(Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests;
