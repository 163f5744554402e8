//! ftp-proxy: an FTP gateway.
//!
//! # Tour
//! - [`config`]: command line and file into a validated [`Config`]; the
//!   one place defaults live.
//! - [`protocol`]: pure FTP: command and reply framing, address codecs,
//!   the address policy (bounce protection, NAT traversal, what is
//!   refused and why), the FEAT rewrite, the names of the two sides.
//! - `gateway`: the accept loops, session limits, reloads, the drain.
//! - [`session`]: one task per client control connection. Its pure parts
//!   decide: [`session::state`] what a command means, `session::ledger`
//!   which replies the server owes and to whom, `session::transfer` the
//!   order of a transfer's replies and data connections; the task does the
//!   I/O. `session::data` opens data connections (port pools, port theft
//!   checks, port 20) and types their failures; `session::control` holds
//!   the control connections, plain or TLS, and reads the client past TCP
//!   urgent marks; `session::server_conn` opens the server's control
//!   connection (TLS, the banner).
//! - `relay`: moves the bytes of a data connection (splice or copy, or
//!   through TLS), passing half-close on in order. Knows nothing of FTP.
//! - [`tls`]: FTPS: the gateway's certificate toward clients, the trust
//!   toward servers, per-session resumption, handshakes.
//! - [`flowtrack`]: the eBPF flow tracker (the only user of aya): TCP
//!   flows on watched ports, seen from the kernel, with their handshake,
//!   close order, bytes and timestamps; and the guard, which admits a SYN
//!   to a data port only from the peer a session expects, once.
//! - [`flows`]: the kernel's flows joined with the sessions' connections
//!   (`/flows`, the `tcp_*` and `ebpf_guard_*` metrics, which ports are
//!   watched and guarded, the expectations the sessions announce).
//! - `metrics`: the Prometheus registry and the HTTP endpoint (`/metrics`,
//!   `/healthz`, `/readyz`, `/flows`).
//! - [`upstream`]: the servers behind the gateway: the pool (balancing,
//!   health checks, passive failures), per-user routes, the PROXY protocol
//!   toward load balancers and servers.
//!
//! - [`manual`]: the man pages and shell completions, generated from the
//!   command line's clap definitions (for the Debian package).
//!
//! [`run`] wires them together; the binary adds the command line, logging
//! and signals.
//!
//! Data path: client ⇄ (control) gateway session ⇄ (control) server; for a
//! transfer the session opens one data connection on each side and hands
//! both to the relay.

#![warn(unreachable_pub)]

pub mod config;
pub mod flows;
pub mod flowtrack;
pub(crate) mod gateway;
pub mod manual;
pub(crate) mod metrics;
pub mod protocol;
pub(crate) mod relay;
pub mod session;
pub mod tls;
pub mod upstream;

pub use relay::sockmap::SockmapError;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use config::Config;
use flows::FlowView;
use flowtrack::{EbpfMode, FlowTracker};
use metrics::http::{self, HttpState, Readiness};
use metrics::{Metrics, MetricsError};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: io::Error,
    },
    /// The metrics registry could not be built (a programming error).
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// `--relay-mode sockmap` was asked for and the kernel relay did not
    /// load.
    #[error("--relay-mode sockmap: {0}")]
    Sockmap(#[from] SockmapError),
}

/// The gateway's listening sockets, bound before anything runs: a bad
/// address fails at start, naming itself, and tests can bind port 0 and
/// read the ports chosen.
#[derive(Debug)]
pub struct Listeners {
    control: Vec<std::net::TcpListener>,
    implicit: Vec<std::net::TcpListener>,
    metrics: Option<std::net::TcpListener>,
}

/// Listen backlog of every listener: a burst of connections (a balancer's
/// probes, a reconnect storm) waits in the kernel instead of being refused.
const BACKLOG: i32 = 1024;

fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, StartError> {
    let bind = || -> io::Result<std::net::TcpListener> {
        let domain = socket2::Domain::for_address(addr);
        let socket =
            socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        if addr.is_ipv6() {
            // So that [::]:21 and 0.0.0.0:21 can both be configured.
            socket.set_only_v6(true)?;
        }
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(BACKLOG)?;
        Ok(socket.into())
    };
    bind().map_err(|source| StartError::Bind { addr, source })
}

impl Listeners {
    /// Binds every control listen address and the metrics address.
    ///
    /// # Errors
    /// [`StartError::Bind`] naming the address that failed.
    pub fn bind(config: &Config) -> Result<Listeners, StartError> {
        Ok(Listeners {
            control: config
                .listen
                .iter()
                .map(|&addr| bind(addr))
                .collect::<Result<_, _>>()?,
            implicit: config
                .listen_implicit
                .iter()
                .map(|&addr| bind(addr))
                .collect::<Result<_, _>>()?,
            metrics: config.metrics.map(bind).transpose()?,
        })
    }

    /// The control listeners' addresses (with the ports chosen for port 0).
    pub fn control_addrs(&self) -> Vec<SocketAddr> {
        self.control
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The implicit FTPS listeners' addresses.
    pub fn implicit_addrs(&self) -> Vec<SocketAddr> {
        self.implicit
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The metrics endpoint's address, if it has one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }
}

/// Ports watched for the whole run: control listeners, the servers' ports,
/// port 20, and the configured data port ranges.
fn fixed_ports(config: &Config, listening: &[SocketAddr]) -> Vec<u16> {
    let mut ports: Vec<u16> = listening.iter().map(|a| a.port()).collect();
    ports.extend(config.pool.servers().iter().map(|s| s.address.port));
    ports.push(20);
    for range in [config.passive_ports, config.active_ports]
        .into_iter()
        .flatten()
    {
        ports.extend(range.low()..=range.high());
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Runs the gateway on `listeners` until `shutdown` is cancelled, then
/// drains: no new sessions, idle ones get `421`, running transfers get up
/// to the drain timeout. Builds everything once: the metrics, the flow
/// view over `tracker` (the binary starts it, since it needs privileges
/// and decides what its failure means), the HTTP endpoint (which outlives
/// the drain, so probes see `/readyz` turn 503 and `/healthz` stay 200),
/// and the sessions' configuration generations: each configuration sent on
/// `reloads` applies to sessions started after it.
///
/// # Errors
/// [`StartError`] when a listener cannot be registered with the runtime.
pub async fn run(
    config: Config,
    listeners: Listeners,
    tracker: Option<FlowTracker>,
    shutdown: CancellationToken,
    reloads: watch::Receiver<Arc<Config>>,
) -> Result<(), StartError> {
    gateway::raise_open_file_limit(config.limits.max_sessions);
    if config.relay_mode == relay::RelayMode::Sockmap {
        relay::sockmap::install()?;
        tracing::warn!(
            "--relay-mode sockmap is an experiment: a slow receiver makes the kernel hold \
             whatever the sender sends (docs/bench-notes.md)"
        );
    }
    if config.tls.server.insecure && config.tls.server.mode != tls::ServerTlsMode::Off {
        tracing::warn!(
            "--server-tls-insecure: the server's certificate is not verified; anyone between the gateway and the server can read and change the sessions"
        );
    }
    let mut control_addrs = listeners.control_addrs();
    control_addrs.extend(listeners.implicit_addrs());
    let to_tokio = |listener: std::net::TcpListener| {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        tokio::net::TcpListener::from_std(listener)
            .map_err(|source| StartError::Bind { addr, source })
    };
    let mut control = Vec::new();
    for (listener, implicit) in listeners
        .control
        .into_iter()
        .map(|l| (l, false))
        .chain(listeners.implicit.into_iter().map(|l| (l, true)))
    {
        control.push((to_tokio(listener)?, implicit));
    }
    let metrics_listener = listeners.metrics.map(to_tokio).transpose()?;
    let metrics = Arc::new(Metrics::new()?);
    let readiness = Arc::new(Readiness::default());
    readiness.set_tracker(config.ebpf == EbpfMode::Required, tracker.is_some());
    let pool = upstream::Pool::new(
        &config.pool,
        config.server_proxy_protocol,
        Arc::clone(&metrics),
    );
    pool.set_own_addresses(control_addrs.clone());
    pool.start_checks();
    readiness.set_servers({
        let pool = pool.clone();
        move || pool.any_up()
    });
    let flows = Arc::new(FlowView::new(
        tracker,
        fixed_ports(&config, &control_addrs),
        guard_config(&config),
        Arc::clone(&metrics),
    ));
    let background = CancellationToken::new();
    let http_task = metrics_listener.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            info!(addr = %addr, "metrics endpoint listening");
        }
        let state = HttpState {
            metrics: Arc::clone(&metrics),
            refresh: {
                let flows = Arc::clone(&flows);
                Arc::new(move || flows.refresh_flow_gauges())
            },
            readiness: Arc::clone(&readiness),
            flows: {
                let flows = Arc::clone(&flows);
                Arc::new(move || flows.document())
            },
        };
        tokio::spawn(http::serve(listener, state, background.clone()))
    });
    let refresh = tokio::spawn(Arc::clone(&flows).run(background.clone()));
    let pool_reloads = tokio::spawn(follow_reloads(
        pool.clone(),
        Arc::clone(&flows),
        reloads.clone(),
        background.clone(),
    ));
    let observer: Arc<dyn session::ConnectionObserver> = flows.clone();
    let gateway = gateway::Gateway::new(
        Arc::new(config),
        control,
        Arc::clone(&metrics),
        Arc::clone(&readiness),
        observer,
        pool.clone(),
    );
    gateway.run(shutdown, reloads).await;
    background.cancel();
    if let Some(task) = http_task {
        let _ = task.await;
    }
    let _ = refresh.await;
    let _ = pool_reloads.await;
    pool.stop().await;
    // The last owner of the tracker: dropping it detaches the programs.
    drop(flows);
    Ok(())
}

/// The kernel guard's settings of a configuration.
fn guard_config(config: &Config) -> flows::GuardConfig {
    flows::GuardConfig {
        mode: config.ebpf_guard,
        client_ports: config.passive_ports.map(|r| r.low()..=r.high()),
        server_ports: config.active_ports.map(|r| r.low()..=r.high()),
    }
}

/// Hands each reloaded configuration's servers to the pool, which keeps
/// the state of the servers that did not change, and its guard settings
/// to the flow view.
async fn follow_reloads(
    pool: upstream::Pool,
    flows: Arc<FlowView>,
    mut reloads: watch::Receiver<Arc<Config>>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = reloads.changed() => {
                if changed.is_err() {
                    return;
                }
                let config = Arc::clone(&reloads.borrow_and_update());
                pool.reconfigure(&config.pool, config.server_proxy_protocol);
                flows.reconfigure_guard(guard_config(&config));
            }
        }
    }
}
