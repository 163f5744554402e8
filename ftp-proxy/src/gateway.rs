//! The gateway: accepts sessions on the client-facing listeners within the
//! configured limits, and shuts down in order.
//!
//! Owns: the accept loops (with back-off on errors), the PROXY header of
//! connections from a trusted balancer (read before anything else, so that
//! the per-client limit and the session see the real client), the session
//! limit (global at accept, per client address once the client is known),
//! the open-file limit check, the
//! configuration generations that reloads create, the tracking of every
//! session task, and graceful shutdown.
//!
//! Not here: binding (`crate::Listeners`), FTP (`crate::session`), the HTTP
//! endpoint and the flow view (built by `crate::run`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{Config, FDS_PER_SESSION, FDS_RESERVED};
use crate::metrics::Metrics;
use crate::metrics::http::Readiness;
use crate::protocol::policy::Reject;
use crate::session::{self, ConnectionObserver, Shared, data::PortPool};
use crate::upstream::Pool;

/// A gateway ready to run on its listeners.
pub(crate) struct Gateway {
    config: Arc<Config>,
    /// Each listener, and whether it is for implicit FTPS.
    listeners: Vec<(TcpListener, bool)>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    observer: Arc<dyn ConnectionObserver>,
    pool: Pool,
}

/// Raises the soft open-file limit to the hard limit and warns when the
/// configured session limit cannot fit.
pub(crate) fn raise_open_file_limit(max_sessions: usize) {
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

/// What a new session is started with; replaced as a whole on reload, so
/// running sessions keep what they started with.
#[derive(Debug, Clone)]
struct Generation {
    shared: Shared,
    admission: Admission,
}

impl Generation {
    fn new(
        config: Arc<Config>,
        metrics: &Arc<Metrics>,
        observer: &Arc<dyn ConnectionObserver>,
        pool: &Pool,
        shutdown: &CancellationToken,
        previous: Option<&Generation>,
    ) -> Generation {
        // Pools and limits carry over when unchanged, so that a reload does
        // not reset port rotation or session counts.
        let same = |f: fn(&Config) -> Option<crate::config::PortRange>| {
            previous.filter(|p| f(&p.shared.config) == f(&config))
        };
        let passive_ports = same(|c| c.passive_ports).map_or_else(
            || Arc::new(PortPool::new(config.passive_ports)),
            |p| Arc::clone(&p.shared.passive_ports),
        );
        let active_ports = same(|c| c.active_ports).map_or_else(
            || Arc::new(PortPool::new(config.active_ports)),
            |p| Arc::clone(&p.shared.active_ports),
        );
        let admission = match previous {
            Some(p) if p.shared.config.limits == config.limits => p.admission.clone(),
            _ => Admission {
                sessions: Arc::new(Semaphore::new(config.limits.max_sessions)),
                per_client: previous.map_or_else(
                    || Arc::new(Mutex::new(HashMap::new())),
                    |p| Arc::clone(&p.admission.per_client),
                ),
                max_per_client: config.limits.max_sessions_per_client,
            },
        };
        Generation {
            shared: Shared {
                config,
                passive_ports,
                active_ports,
                metrics: Arc::clone(metrics),
                shutdown: shutdown.clone(),
                observer: Arc::clone(observer),
                pool: pool.clone(),
            },
            admission,
        }
    }
}

impl Gateway {
    /// A gateway on `listeners`.
    pub(crate) fn new(
        config: Arc<Config>,
        listeners: Vec<(TcpListener, bool)>,
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
        observer: Arc<dyn ConnectionObserver>,
        pool: Pool,
    ) -> Gateway {
        Gateway {
            config,
            listeners,
            metrics,
            readiness,
            observer,
            pool,
        }
    }

    /// Accepts sessions until `shutdown` is cancelled, then lets every
    /// session end at its next safe point (after a running transfer), and
    /// returns when all have ended or the drain timeout has passed.
    ///
    /// Each new configuration sent on `reloads` applies to sessions started
    /// after it; running sessions keep theirs. Listen addresses are not
    /// rebound.
    pub(crate) async fn run(
        self,
        shutdown: CancellationToken,
        mut reloads: watch::Receiver<Arc<Config>>,
    ) {
        let first = Generation::new(
            Arc::clone(&self.config),
            &self.metrics,
            &self.observer,
            &self.pool,
            &shutdown,
            None,
        );
        let (generation_tx, generation_rx) = watch::channel(first);
        let tracker = TaskTracker::new();
        let ids = Arc::new(std::sync::atomic::AtomicU64::new(1));
        for (listener, implicit_tls) in self.listeners {
            if let Ok(addr) = listener.local_addr() {
                info!(addr = %addr, servers = self.config.pool.servers().len(), implicit_tls, "listening");
            }
            tracker.spawn(accept_loop(
                listener,
                implicit_tls,
                generation_rx.clone(),
                tracker.clone(),
                Arc::clone(&ids),
            ));
        }
        self.readiness.set_listening(true);
        let mut drain = self.config.timeouts.drain;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                changed = reloads.changed() => {
                    if changed.is_err() {
                        shutdown.cancelled().await;
                        break;
                    }
                    let config = Arc::clone(&reloads.borrow_and_update());
                    if config.listen != self.config.listen {
                        warn!("listen addresses changed: they take effect at the next restart");
                    }
                    if config.worker_threads != self.config.worker_threads {
                        warn!("worker-threads changed: it takes effect at the next restart");
                    }
                    drain = config.timeouts.drain;
                    let next = Generation::new(config, &self.metrics, &self.observer, &self.pool, &shutdown, Some(&generation_rx.borrow()));
                    generation_tx.send_replace(next);
                    info!("configuration reloaded: new sessions use it");
                }
            }
        }
        self.readiness.set_listening(false);
        info!(
            sessions = tracker.len(),
            "shutting down: no new sessions, running transfers may finish"
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
    /// A place within the session limit (taken at accept).
    fn admit(&self) -> Result<OwnedSemaphorePermit, Reject> {
        Arc::clone(&self.sessions)
            .try_acquire_owned()
            .map_err(|_| Reject::MaxSessions)
    }

    /// A place within the per-client limit for `ip`, the client's real
    /// address (a balancer's PROXY header's when there is one).
    fn admit_client(&self, permit: OwnedSemaphorePermit, ip: IpAddr) -> Result<Admitted, Reject> {
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
    implicit_tls: bool,
    generations: watch::Receiver<Generation>,
    tracker: TaskTracker,
    ids: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut backoff = Duration::from_millis(5);
    let shutdown = generations.borrow().shared.shutdown.clone();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                let Generation { shared, admission } = generations.borrow().clone();
                match admission.admit() {
                    Ok(permit) => {
                        let id = ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracker.spawn(admit_and_run(
                            stream,
                            peer,
                            permit,
                            admission,
                            shared,
                            id,
                            implicit_tls,
                        ));
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

/// Reads the PROXY header of a connection from a trusted balancer (a
/// refused header closes the connection without a word, counted in
/// `proxy_protocol_rejected_total`), applies the per-client limit to the
/// real client, and runs the session.
async fn admit_and_run(
    mut stream: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    admission: Admission,
    shared: Shared,
    id: u64,
    implicit_tls: bool,
) {
    let proxied = match shared.config.proxy_from.accept(&mut stream, peer).await {
        Ok(proxied) => proxied,
        Err(error) => {
            warn!(peer = %peer, error = %error, "connection refused: PROXY protocol");
            shared.metrics.proxy_protocol_rejected(error.reason());
            return;
        }
    };
    let client = proxied.map_or(peer, |p| p.source);
    match admission.admit_client(permit, client.ip()) {
        Ok(admitted) => {
            let _admitted = admitted;
            session::run(stream, id, shared, implicit_tls, proxied).await;
        }
        Err(reason) => {
            warn!(client = %client, reason = ?reason, "session refused");
            shared.metrics.rejected(reason);
            refuse(&stream, reason);
        }
    }
}
