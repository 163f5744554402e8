//! The gateway: binds the client-facing listeners, accepts sessions within
//! the configured limits, and shuts down in order.
//!
//! Owns: listeners, the accept loops (with back-off on errors), the session
//! limit (global and per client address), the open-file limit check, the
//! tracking of every session task, and graceful shutdown.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::metrics::{Metrics, MetricsError, Reject};
use crate::session::{self, Shared, data::PortPool};

/// File descriptors a session holds at least: two control sockets.
const FDS_PER_SESSION: u64 = 2;
/// File descriptors the process needs besides sessions.
const FDS_RESERVED: u64 = 64;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: io::Error,
    },
    /// The metrics registry could not be built.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

/// A gateway with its listeners bound, ready to run.
#[derive(Debug)]
pub struct Gateway {
    config: Arc<Config>,
    listeners: Vec<TcpListener>,
    metrics: Arc<Metrics>,
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // So that [::]:21 and 0.0.0.0:21 can both be configured.
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Raises the soft open-file limit to the hard limit and warns when the
/// configured session limit cannot fit.
fn raise_open_file_limit(max_sessions: usize) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            warn!(error = %e, "cannot raise the open-file limit");
        }
    }
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    let needed = (max_sessions as u64)
        .saturating_mul(FDS_PER_SESSION)
        .saturating_add(FDS_RESERVED);
    if needed > soft {
        warn!(
            open_file_limit = soft,
            max_sessions,
            fits = soft.saturating_sub(FDS_RESERVED) / FDS_PER_SESSION,
            "the open-file limit cannot hold max-sessions: sessions past what fits will fail to open sockets"
        );
    } else {
        info!(open_file_limit = soft, max_sessions, "open-file limit");
    }
}

impl Gateway {
    /// Binds every listen address. Nothing is accepted until [`Gateway::run`].
    ///
    /// # Errors
    /// [`GatewayError::Bind`] naming the address that failed.
    pub fn bind(config: Config) -> Result<Gateway, GatewayError> {
        raise_open_file_limit(config.limits.max_sessions);
        let listeners = config
            .listen
            .iter()
            .map(|&addr| bind(addr).map_err(|source| GatewayError::Bind { addr, source }))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Gateway {
            config: Arc::new(config),
            listeners,
            metrics: Arc::new(Metrics::new()?),
        })
    }

    /// The bound addresses (with the ports chosen for port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The gateway's metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Accepts sessions until `shutdown` is cancelled, then lets every
    /// session end at its next safe point (after a running transfer), and
    /// returns when all have ended or `drain` has passed.
    pub async fn run(self, shutdown: CancellationToken, drain: Duration) {
        let shared = Shared {
            passive_ports: Arc::new(PortPool::new(self.config.passive_ports)),
            active_ports: Arc::new(PortPool::new(self.config.active_ports)),
            config: Arc::clone(&self.config),
            metrics: Arc::clone(&self.metrics),
            shutdown: shutdown.clone(),
        };
        let admission = Admission {
            sessions: Arc::new(Semaphore::new(self.config.limits.max_sessions)),
            per_client: Arc::new(Mutex::new(HashMap::new())),
            max_per_client: self.config.limits.max_sessions_per_client,
        };
        let tracker = TaskTracker::new();
        let ids = Arc::new(std::sync::atomic::AtomicU64::new(1));
        for listener in self.listeners {
            if let Ok(addr) = listener.local_addr() {
                info!(addr = %addr, upstream = %self.config.upstream.authority(), "listening");
            }
            tracker.spawn(accept_loop(
                listener,
                shared.clone(),
                admission.clone(),
                tracker.clone(),
                Arc::clone(&ids),
            ));
        }
        shutdown.cancelled().await;
        info!(
            sessions = tracker.len().saturating_sub(0),
            "shutting down: no new sessions, waiting for transfers"
        );
        tracker.close();
        if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
            warn!(
                remaining = tracker.len(),
                "drain timeout: closing the remaining sessions"
            );
        }
    }
}

/// Binds and runs a gateway until `shutdown` is cancelled.
///
/// # Errors
/// [`GatewayError`] when a listener cannot be bound.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), GatewayError> {
    let drain = config.timeouts.transfer_idle;
    Gateway::bind(config)?.run(shutdown, drain).await;
    Ok(())
}

/// The limits on who may open a session.
#[derive(Debug, Clone)]
struct Admission {
    sessions: Arc<Semaphore>,
    per_client: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_client: usize,
}

/// A session's place within the limits, released on drop.
struct Admitted {
    _permit: OwnedSemaphorePermit,
    ip: IpAddr,
    per_client: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Ok(mut map) = self.per_client.lock()
            && let Some(count) = map.get_mut(&self.ip)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

impl Admission {
    fn admit(&self, ip: IpAddr) -> Result<Admitted, Reject> {
        let permit = Arc::clone(&self.sessions)
            .try_acquire_owned()
            .map_err(|_| Reject::MaxSessions)?;
        let ip = ip.to_canonical();
        let mut map = self.per_client.lock().map_err(|_| Reject::MaxSessions)?;
        let count = map.entry(ip).or_insert(0);
        if *count >= self.max_per_client {
            return Err(Reject::MaxSessionsPerClient);
        }
        *count += 1;
        Ok(Admitted {
            _permit: permit,
            ip,
            per_client: Arc::clone(&self.per_client),
        })
    }
}

fn refuse(stream: &TcpStream, reason: Reject) {
    let text: &[u8] = match reason {
        Reject::MaxSessionsPerClient => {
            b"421 Too many sessions from your address, try again later\r\n"
        }
        _ => b"421 Too many sessions, try again later\r\n",
    };
    // Best effort without waiting: the reply fits any empty send buffer.
    let _ = stream.try_write(text);
}

async fn accept_loop(
    listener: TcpListener,
    shared: Shared,
    admission: Admission,
    tracker: TaskTracker,
    ids: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                match admission.admit(peer.ip()) {
                    Ok(admitted) => {
                        let id = ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let shared = shared.clone();
                        tracker.spawn(async move {
                            let _admitted = admitted;
                            session::run(stream, id, shared).await;
                        });
                    }
                    Err(reason) => {
                        warn!(client = %peer, reason = ?reason, "session refused");
                        shared.metrics.rejected(reason);
                        refuse(&stream, reason);
                    }
                }
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                error!(error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}
