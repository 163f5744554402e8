//! One task per client control connection.
//!
//! Owns: the connection to the server for this client, the relay of
//! commands and replies, and the I/O of everything the pure parts decide:
//! - [`state`]: what each client command means (relay it, answer it,
//!   arrange a data connection, start a transfer);
//! - [`ledger`]: which replies the server still owes and who waits for
//!   each, so that a late reply is never taken for the answer to a later
//!   command;
//! - [`transfer`]: the order of a transfer's replies and data connections,
//!   ABOR included.
//!
//! This module keeps the `select!` loop: client commands, server replies,
//! data connection setup, the relay's end and the timers are events fed to
//! those parts; their actions are carried out here. Outside a transfer the
//! client's commands are taken one at a time (pipelined ones wait in the
//! framing buffer, bounded by the line bound and TCP flow control). During
//! a transfer the client is still read: `ABOR` is acted on at once,
//! commands that go to the server as they are (`STAT`, `NOOP`, `QUIT`…)
//! are passed on at once and their replies relayed in the server's order,
//! and commands the gateway handles itself wait for the transfer's end
//! (bounded).
//!
//! Not here: byte moving ([`crate::relay`]), data sockets and their errors
//! ([`data`]), address decisions ([`crate::protocol::policy`]), accept and
//! limits ([`crate::gateway`]), the kernel's view of the connections (a
//! [`ConnectionObserver`] is told about them).

pub(crate) mod control;
pub(crate) mod data;
pub(crate) mod ledger;
mod server_conn;
pub mod state;
pub(crate) mod transfer;

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::protocol::feat::rewrite_feat;
use crate::protocol::policy::{ActiveTarget, Reject};
use crate::protocol::{
    Command, CommandCodec, CommandError, Reply, ReplyCodec, ReplyError, Side, Verb,
};
use crate::relay::{self, Direction, Flow, Leg, RelayHandle, RelayOptions};
use crate::tls::{
    self, ClientSessionTls, ClientTlsMode, Protection, ServerDataTls, ServerTlsMode, TlsError,
    TlsFailure, TlsReuse,
};
use crate::upstream::Pool;
use crate::upstream::connect::GreetError;
use crate::upstream::pool::ServerHandle;
use crate::upstream::proxy_protocol::{Proxied, Rejection, TrustedProxies};
use crate::upstream::routes::Target;
use control::{ClientReader, ClientWriter, ControlStream, ServerReader, ServerWriter};
use data::{DataError, DataFailure, DataMode, PortPool};
use ledger::{EntryId, Ledger, Step, Waiter};
use server_conn::{Origin, ServerControl};
use state::{Arrangement, ControlState, Decision, Policy, TlsPolicy};
use transfer::{Action, Event, Failure, Outcome, Plan, Relayed, Transfer, TransferResult, Wait};

/// Commands read during a transfer and kept for after it.
const MAX_DEFERRED: usize = 32;
/// Initial capacity of each control connection's read buffer. Commands and
/// most replies are a few dozen bytes; longer ones grow the buffer (up to
/// the line and reply bounds). tokio-util's default of 8 KiB per buffer,
/// two per session, was most of an idle session's memory.
pub(super) const CONTROL_BUFFER: usize = 512;
/// How long to wait for `ABOR`'s own reply once the transfer's reply came:
/// a compliant server sends both at once; one that sends a single reply is
/// not waited for longer (a later `225`/`226` is still swallowed).
const ABORT_GRACE: Duration = Duration::from_secs(3);
/// How long the gateway tries to tell a client why its session ends.
const FAREWELL: Duration = Duration::from_secs(5);

/// Which of a session's TCP connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Connection {
    /// Client ⇄ gateway control connection.
    ClientControl,
    /// Gateway ⇄ server control connection.
    ServerControl,
    /// Client ⇄ gateway data connection.
    ClientData,
    /// Gateway ⇄ server data connection.
    ServerData,
}

/// Something that stays registered while it lives.
pub(crate) type Guard = Box<dyn std::any::Any + Send + Sync>;

/// What a session tells the rest of the gateway about its connections, so
/// that the kernel's view of the flows can be joined with sessions and the
/// kernel can admit the data connections the session expects.
/// Implemented by [`crate::flows::FlowView`]; the session never depends on
/// it.
pub(crate) trait ConnectionObserver: Send + Sync {
    /// Watches a data port chosen at run time while the guard lives.
    fn watch_port(&self, port: u16) -> Guard;

    /// The session is about to announce its listener at `local` (the
    /// `connection` leg's data port) and expects one connection to it,
    /// from `peer` (the unspecified address `::`: from anywhere), before
    /// `deadline`; while the guard lives. Called before
    /// the announcement (227/229, PORT/EPRT), so the kernel knows first.
    /// Watches the port too. Without a kernel guard: just the watch.
    fn expect(
        &self,
        session: u64,
        connection: Connection,
        local: SocketAddr,
        peer: IpAddr,
        deadline: std::time::Instant,
    ) -> Guard {
        let _ = (session, connection, peer, deadline);
        self.watch_port(local.port())
    }

    /// Registers one of a session's connections while the guard lives;
    /// `client`: the session's client when a load balancer's PROXY header
    /// named it (the connections' peers are then the balancer's).
    fn register(
        &self,
        session: u64,
        connection: Connection,
        local: SocketAddr,
        peer: SocketAddr,
        client: Option<SocketAddr>,
    ) -> Guard;
}

/// What a session shares with the rest of the gateway.
#[derive(Clone)]
pub(crate) struct Shared {
    /// The configuration in force when the session started.
    pub(crate) config: Arc<Config>,
    /// Ports for passive listeners toward clients.
    pub(crate) passive_ports: Arc<PortPool>,
    /// Ports for active-mode listeners toward the server and active source ports.
    pub(crate) active_ports: Arc<PortPool>,
    /// Metrics.
    pub(crate) metrics: Arc<Metrics>,
    /// Cancelled when the gateway starts shutting down.
    pub(crate) shutdown: CancellationToken,
    /// Told about every connection and data port.
    pub(crate) observer: Arc<dyn ConnectionObserver>,
    /// The servers (the same pool across configuration generations).
    pub(crate) pool: Pool,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// How a session ended (`sessions_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionOutcome {
    /// QUIT or the client closed.
    Ok,
    /// The server could not be reached or failed.
    ServerError,
    /// The client misbehaved or its connection failed.
    ClientError,
    /// Timed out.
    Timeout,
    /// The gateway was shutting down.
    Shutdown,
}

impl SessionOutcome {
    /// Every outcome.
    pub(crate) const ALL: [SessionOutcome; 5] = [
        SessionOutcome::Ok,
        SessionOutcome::ServerError,
        SessionOutcome::ClientError,
        SessionOutcome::Timeout,
        SessionOutcome::Shutdown,
    ];

    /// The metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            SessionOutcome::Ok => "ok",
            SessionOutcome::ServerError => "server_error",
            SessionOutcome::ClientError => "client_error",
            SessionOutcome::Timeout => "timeout",
            SessionOutcome::Shutdown => "shutdown",
        }
    }
}

/// Failures talking to the server (`upstream_errors_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpstreamFailure {
    /// Every server the session tried failed: unreachable, silent, or
    /// refusing the session or TLS (the last failure reached the client).
    Connect,
    /// No server was up among those the session could use.
    NoServer,
    /// A data connection toward the server could not be set up.
    DataSetup,
}

impl UpstreamFailure {
    /// Every reason.
    pub(crate) const ALL: [UpstreamFailure; 3] = [
        UpstreamFailure::Connect,
        UpstreamFailure::NoServer,
        UpstreamFailure::DataSetup,
    ];

    /// The metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            UpstreamFailure::Connect => "connect",
            UpstreamFailure::NoServer => "no_server",
            UpstreamFailure::DataSetup => "data_setup",
        }
    }
}

/// Why a session ended early; it knows its side, which decides the reply,
/// the log level and the metric label.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    /// The server could not be reached, or did not greet in time.
    #[error("cannot reach the FTP server {upstream}: {source}")]
    Unreachable {
        /// The server's configured address.
        upstream: String,
        /// Why.
        source: GreetError,
    },
    /// The server greeted with something else than `220` (`421`: it
    /// takes no more sessions).
    #[error("the FTP server {upstream} refused the session: {reply}")]
    ServerRefusedSession {
        /// The server's configured address.
        upstream: String,
        /// Its banner.
        reply: String,
    },
    /// No server could be tried: none is up among those the session may
    /// use (or every one failed; then the last failure is reported).
    #[error("no FTP server is available")]
    NoServer,
    /// Writing to or reading from the server failed.
    #[error("server connection failed: {0}")]
    ServerIo(#[source] io::Error),
    /// The server broke the protocol (bad reply, over-long reply).
    #[error("server sent an invalid reply: {0}")]
    ServerProtocol(#[source] ReplyError),
    /// The server closed the control connection.
    #[error("server closed the control connection")]
    ServerClosed,
    /// The server did not answer in time.
    #[error("server did not reply to {command} within {timeout:?}")]
    ServerTimeout {
        /// The command waited on.
        command: &'static str,
        /// The time waited.
        timeout: Duration,
    },
    /// The client's control connection failed.
    #[error("client connection failed: {0}")]
    ClientIo(#[source] io::Error),
    /// A TLS handshake on a control connection failed (the error knows
    /// its side).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The server refused what TLS toward it needs (`AUTH TLS`, `PBSZ`,
    /// `PROT P`).
    #[error("the server refused {command}: {reply}")]
    ServerRefusedTls {
        /// The command.
        command: &'static str,
        /// Its reply.
        reply: String,
    },
}

impl SessionError {
    /// Whose failure it is.
    pub(crate) fn side(&self) -> Side {
        match self {
            SessionError::ClientIo(_) => Side::Client,
            SessionError::Tls(error) => error.side,
            _ => Side::Server,
        }
    }

    fn outcome(&self) -> SessionOutcome {
        match self {
            SessionError::ClientIo(_) => SessionOutcome::ClientError,
            SessionError::Tls(error) if error.side == Side::Client => SessionOutcome::ClientError,
            SessionError::ServerTimeout { .. } => SessionOutcome::Timeout,
            _ => SessionOutcome::ServerError,
        }
    }
}

/// Runs one session to its end. Never panics, always closes both
/// connections; errors are logged and counted here. `proxied`: the
/// addresses a trusted balancer's PROXY header gave for this connection.
pub(crate) async fn run(
    client: TcpStream,
    id: u64,
    shared: Shared,
    implicit_tls: bool,
    proxied: Option<Proxied>,
) {
    let client_addr = proxied
        .map(|p| p.source)
        .or_else(|| client.peer_addr().ok());
    let span = info_span!(
        "session",
        session_id = id,
        client = ?client_addr,
        balancer = tracing::field::Empty,
        server = tracing::field::Empty,
        server_addr = tracing::field::Empty,
    );
    if proxied.is_some()
        && let Ok(peer) = client.peer_addr()
    {
        span.record("balancer", tracing::field::display(peer));
    }
    async move {
        shared.metrics.session_started();
        let mut protection = (
            Protection::of(implicit_tls),
            Protection::of(shared.config.tls.server.mode != ServerTlsMode::Off),
        );
        let outcome = match Session::start(client, id, &shared, implicit_tls, proxied).await {
            Ok(mut session) => {
                let outcome = session.serve().await;
                session.finish(&outcome).await;
                protection.0 = Protection::of(session.state.control_protected());
                outcome
            }
            Err((client, error)) => {
                match error.side() {
                    // Gone before its session began (a port scan resets at
                    // once), or not speaking TLS on the implicit port: the
                    // client's doing, not the server's.
                    Side::Client => info!(side = "client", error = %error, "client gone before the session started"),
                    Side::Server => {
                        warn!(side = "server", error = %error, "no server for the session");
                        if let Some(mut client) = client {
                            let reply = Reply::new(421, &format!("Service not available: {error}"));
                            let _ = tokio::time::timeout(FAREWELL, client.write_all(&reply.to_bytes()))
                                .await;
                            let _ = tokio::time::timeout(FAREWELL, client.shutdown()).await;
                        }
                    }
                }
                Err(error)
            }
        };
        match &outcome {
            Ok(outcome) => {
                info!(outcome = outcome.label(), "session closed");
                shared.metrics.session_ended(*outcome, protection.0, protection.1);
            }
            Err(error) => {
                info!(error = %error, "session closed");
                shared.metrics.session_ended(error.outcome(), protection.0, protection.1);
            }
        }
    }
    .instrument(span)
    .await;
}

/// The client's arrangement, taken by a transfer.
enum ClientLeg {
    /// PASV/EPSV: accept from this listener.
    Passive(TcpListener),
    /// PORT/EPRT: connect here.
    Active(SocketAddr),
}

/// The server's data connection being prepared.
enum ServerLeg {
    /// Passive toward the server: connected.
    Connected(TcpStream),
    /// Active toward the server: listening for it.
    Listening(TcpListener),
}

/// What a data-setup future came to.
enum IoDone {
    /// The connection to the server's data port.
    ServerConnected(Result<TcpStream, DataError>),
    /// Both legs: (client, server).
    Legs(Result<(TcpStream, TcpStream), DataError>),
}

type Pending = Pin<Box<dyn Future<Output = IoDone> + Send>>;

/// A transfer in progress with what it holds.
struct Active {
    machine: Transfer,
    /// Whether the data connections are TLS toward the client and the server.
    protection: (Protection, Protection),
    started: Instant,
    server_leg: Option<ServerLeg>,
    client_leg: Option<ClientLeg>,
    pending: Option<Pending>,
    /// Both data connections, (client, server), until the relay takes them.
    legs: Option<(TcpStream, TcpStream)>,
    /// TLS to set up on them before the relay starts.
    leg_tls: Option<LegTls>,
    relay: Option<RelayHandle>,
    abort_entry: Option<EntryId>,
    deadline: Option<Instant>,
    guards: Vec<Guard>,
}

/// A finished transfer whose second direction may still be closing, kept
/// until the next transfer or the end of the session.
struct Lingering {
    _relay: RelayHandle,
    _guards: Vec<Guard>,
}

/// What a step of the loop came to.
enum Next {
    Continue,
    End(SessionOutcome),
}

struct Session<'a> {
    id: u64,
    shared: &'a Shared,
    config: &'a Config,
    metrics: &'a Metrics,
    client_ip: IpAddr,
    client_local: SocketAddr,
    /// The client as the balancing and the PROXY header toward the server
    /// see it.
    origin: Origin,
    /// Whether `origin` came from a balancer's PROXY header.
    proxied: bool,
    /// The server this session uses (none yet while a routed session waits
    /// for `USER`).
    server: Option<ServerHandle>,
    server_ip: IpAddr,
    server_local: SocketAddr,
    client_rx: FramedRead<ClientReader, CommandCodec>,
    client_tx: ClientWriter,
    server_rx: FramedRead<ServerReader, ReplyCodec>,
    server_tx: ServerWriter,
    /// The server's banner, relayed once the session is set up.
    banner: Vec<Reply>,
    /// TLS toward the client: this session's resumption scope.
    client_tls: Option<ClientSessionTls>,
    /// TLS toward the server: this session's configuration and the name.
    server_tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    /// What the client's commands mean (pure).
    state: ControlState,
    /// What the server owes (pure).
    ledger: Ledger,
    /// The listener of a passive arrangement, with its port watch.
    passive: Option<(TcpListener, Guard)>,
    /// The transfer in progress.
    active: Option<Active>,
    /// Commands read during a transfer that wait for its end.
    deferred: VecDeque<Result<Command, CommandError>>,
    /// Replies to the client that must follow a held transfer reply.
    held: VecDeque<Reply>,
    lingering: Option<Lingering>,
    /// When the client, waiting for a reply, gives up on the server.
    reply_deadline: Option<Instant>,
    /// When the session was last busy (for the idle timeout).
    last_activity: Instant,
    /// QUIT went to the server: its 221 or its close ends the session.
    quitting: bool,
    /// A command was read (a `PROXY` line first is a header from a peer
    /// that is not trusted).
    commands_seen: bool,
    /// The control connections, as registered.
    _control: Vec<Guard>,
}

pub(super) fn reply_or_error(
    reply: Option<Result<Reply, ReplyError>>,
) -> Result<Reply, SessionError> {
    match reply {
        Some(Ok(reply)) => Ok(reply),
        Some(Err(ReplyError::Io(e))) => Err(SessionError::ServerIo(e)),
        Some(Err(e)) => Err(SessionError::ServerProtocol(e)),
        None => Err(SessionError::ServerClosed),
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// What the transfer's I/O came to.
enum TransferIo {
    /// A data-setup future finished.
    Setup(IoDone),
    /// The direction that carries the data ended.
    Relay(Flow),
}

/// Waits for the transfer's data-setup future, or the end of the data
/// direction while the relay runs (never both at once: the relay starts
/// once the data connections are set up).
async fn transfer_io(active: &mut Option<Active>) -> TransferIo {
    let Some(a) = active.as_mut() else {
        return std::future::pending().await;
    };
    if let Some(pending) = a.pending.as_mut() {
        return TransferIo::Setup(pending.await);
    }
    let direction = match a.machine.kind() {
        transfer::TransferKind::Upload => Direction::ClientToServer,
        transfer::TransferKind::Download => Direction::ServerToClient,
    };
    match a.relay.as_mut() {
        Some(relay) if a.machine.is_relaying() => TransferIo::Relay(relay.wait(direction).await),
        _ => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Everything a data-setup future needs, owned.
struct LegContext {
    client_ip: IpAddr,
    /// Balancers whose connections to a passive port start with a PROXY
    /// header (`proxy-protocol-from`), when there are any.
    balancers: Option<TrustedProxies>,
    client_local_ip: IpAddr,
    server_ip: IpAddr,
    timeout: Duration,
    active_ports: Arc<PortPool>,
    metrics: Arc<Metrics>,
}

/// TLS on a transfer's data connections, set up once both TCP connections
/// are established and the server's `1xx` is relayed: clients (curl in
/// active mode) wait for the `150` before their handshake, as servers send
/// it before theirs.
struct LegTls {
    /// TLS on the client's leg (the gateway is the TLS server), and
    /// whether it must resume the control connection's session.
    client: Option<(tls::DataAcceptor, TlsReuse)>,
    /// TLS on the server's leg (the gateway is the TLS client).
    server: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl LegTls {
    /// Both handshakes at once; a failure is counted here (metrics) and
    /// reported to the relay, which fails the transfer.
    async fn secure(self, client: TcpStream, server: TcpStream) -> Result<(Leg, Leg), DataError> {
        let server = async {
            let Some((config, name)) = &self.server else {
                return Ok(Leg::Plain(server));
            };
            match tls::connect(
                Arc::clone(config),
                name.clone(),
                Leg::tls_io(server),
                self.timeout,
            )
            .await
            {
                Ok((stream, handshake)) => {
                    self.metrics.tls_handshake(Side::Server, &handshake);
                    Ok(Leg::tls(stream))
                }
                Err(error) => Err(error),
            }
        };
        let client = async {
            let Some((acceptor, reuse)) = &self.client else {
                return Ok(Leg::Plain(client));
            };
            // RFC 4217: the FTP client is the TLS client, passive and active.
            match tls::accept(acceptor.config(), Leg::tls_io(client), self.timeout).await {
                Ok((stream, handshake)) => {
                    acceptor.finish(handshake.resumed);
                    if handshake.resumed || *reuse == TlsReuse::Off {
                        self.metrics.tls_handshake(Side::Client, &handshake);
                        return Ok(Leg::tls(stream));
                    }
                    Err(TlsError {
                        side: Side::Client,
                        failure: TlsFailure::NotResumed,
                        detail: "the data connection did not resume the control connection's TLS session"
                            .to_owned(),
                    })
                }
                Err(error) => {
                    acceptor.finish(false);
                    Err(error)
                }
            }
        };
        tokio::try_join!(client, server).map_err(|error| {
            self.metrics.tls_error(&error);
            let side = error.side;
            let error = DataFailure::Tls(error).on(side);
            self.metrics.data_error(&error);
            warn!(side = side.label(), kind = "tls", error = %error, "data connection failed");
            error
        })
    }
}

impl LegContext {
    async fn accept(
        &self,
        listener: &TcpListener,
        side: Side,
        expected: IpAddr,
    ) -> Result<TcpStream, DataError> {
        let metrics = &self.metrics;
        // Only the client's connections may come through a balancer.
        let balancers = match side {
            Side::Client => self.balancers.as_ref(),
            Side::Server => None,
        };
        let stream = data::accept_from(listener, expected, self.timeout, balancers, &mut |peer| {
            warn!(side = side.label(), peer = %peer, "data connection from an unexpected address closed");
            metrics.rejected(Reject::PortTheft);
        })
        .await
        .map_err(|e| e.on(side))?;
        metrics.data_connection(side, DataMode::Listen);
        Ok(stream)
    }

    /// Establishes what is not established yet, both legs at once.
    async fn open(
        self,
        server: ServerLeg,
        client: ClientLeg,
    ) -> Result<(TcpStream, TcpStream), DataError> {
        let server = async {
            match server {
                ServerLeg::Connected(stream) => Ok(stream),
                ServerLeg::Listening(listener) => {
                    self.accept(&listener, Side::Server, self.server_ip).await
                }
            }
        };
        let client = async {
            match client {
                ClientLeg::Passive(listener) => {
                    self.accept(&listener, Side::Client, self.client_ip).await
                }
                ClientLeg::Active(target) => {
                    let stream = data::connect_active(
                        &self.active_ports,
                        self.client_local_ip,
                        target,
                        self.timeout,
                    )
                    .await
                    .map_err(|e| e.on(Side::Client))?;
                    self.metrics
                        .data_connection(Side::Client, DataMode::Connect);
                    Ok(stream)
                }
            }
        };
        tokio::try_join!(client, server)
    }
}

impl<'a> Session<'a> {
    /// Sets the session up: TLS with the client on an implicit listener,
    /// then the server's control connection (TLS toward it as configured,
    /// the banner), unless the server depends on the user: then the
    /// gateway greets the client itself and connects at `USER`. On failure
    /// the client's writing half is handed back (when the client is still
    /// there) so that the caller can answer 421.
    async fn start(
        client: TcpStream,
        id: u64,
        shared: &'a Shared,
        implicit_tls: bool,
        proxied: Option<Proxied>,
    ) -> Result<Session<'a>, (Option<ClientWriter>, SessionError)> {
        let config = &*shared.config;
        // The client first: one that is already gone (a scanner's reset)
        // costs no connection to the server.
        let (client_peer, client_local) = match (client.peer_addr(), client.local_addr()) {
            (Ok(peer), Ok(local)) => (peer, local),
            (Err(e), _) | (_, Err(e)) => return Err((None, SessionError::ClientIo(e))),
        };
        let origin = Origin {
            client: proxied.map_or(client_peer, |p| p.source),
            destination: proxied.map_or(client_local, |p| p.destination),
        };
        // Control replies are small and latency-bound: no Nagle.
        let _ = client.set_nodelay(true);
        // Clients send the Telnet Synch before ABOR as urgent data (RFC 959
        // §4.1.3); keep it in the stream so the decoder sees IAC DM whole.
        let _ = socket2::SockRef::from(&client).set_out_of_band_inline(true);
        let client_tls = config.tls.client.identity.as_ref().map(|id| id.session());
        let (client_read, client_tx) = ControlStream::split(client);
        let (client_reader, client_writer) = match (&client_tls, implicit_tls) {
            (Some(tls), true) => {
                drop(client_tx);
                let result = tls::accept(tls.control(), client_read, config.timeouts.connect).await;
                match result {
                    Ok((stream, handshake)) => {
                        shared.metrics.tls_handshake(Side::Client, &handshake);
                        let (read, write) = tokio::io::split(stream);
                        (ClientReader::Tls(read), ClientWriter::Tls(write))
                    }
                    Err(error) => {
                        shared.metrics.tls_error(&error);
                        return Err((None, SessionError::Tls(error)));
                    }
                }
            }
            _ => (
                ClientReader::Plain(client_read),
                ClientWriter::Plain(client_tx),
            ),
        };
        let route_users = config.routes.depends_on_user();
        let server = if route_users {
            None
        } else {
            // An implicit client's data connections are protected from
            // the start (`--server-data-tls client` tells the server so).
            match server_conn::connect_any(shared, origin, &Target::Pool, implicit_tls).await {
                Ok(server) => Some(server),
                Err(error) => return Err((Some(client_writer), error)),
            }
        };
        let forward_prot = config.tls.server.mode != ServerTlsMode::Off
            && config.tls.server.data == ServerDataTls::Client;
        let mut state = ControlState::new(
            origin.client.ip(),
            client_local.ip(),
            Policy {
                nat_traversal: config.nat_traversal,
                passive_address: config.passive_address,
                upstream_mode: config.upstream_mode,
                tls: TlsPolicy {
                    mode: config.tls.client.mode,
                    data: config.tls.client.data,
                    forward_prot,
                },
                route_users,
            },
        );
        if implicit_tls {
            // Implicit FTPS: data protection is the default (as vsftpd
            // and ProFTPD have it).
            state.tls_started(true);
        }
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        let mut session = Session {
            id,
            shared,
            config,
            metrics: &shared.metrics,
            client_ip: origin.client.ip().to_canonical(),
            client_local: canonical(client_local),
            origin,
            proxied: proxied.is_some(),
            server: None,
            server_ip: unspecified.ip(),
            server_local: unspecified,
            client_rx: FramedRead::with_capacity(
                client_reader,
                CommandCodec::new(config.limits.max_line),
                CONTROL_BUFFER,
            ),
            client_tx: client_writer,
            server_rx: FramedRead::with_capacity(ServerReader::Closed, server_conn::codec(), 0),
            server_tx: ServerWriter::Closed,
            // Until a USER chooses the server, the gateway is the client's
            // server.
            banner: vec![Reply::new(220, "Service ready for new user.")],
            client_tls,
            server_tls: None,
            state,
            ledger: Ledger::new(),
            passive: None,
            active: None,
            deferred: VecDeque::new(),
            held: VecDeque::new(),
            lingering: None,
            reply_deadline: None,
            last_activity: Instant::now(),
            quitting: false,
            commands_seen: false,
            _control: vec![shared.observer.register(
                id,
                Connection::ClientControl,
                client_local,
                client_peer,
                proxied.map(|p| p.source),
            )],
        };
        if let Some((control, server)) = server {
            session.banner = session.attach(control, server);
        }
        Ok(session)
    }

    /// The client a balancer's PROXY header named, if any.
    fn proxied_client(&self) -> Option<SocketAddr> {
        self.proxied.then_some(self.origin.client)
    }

    /// Takes the server's control connection for the rest of the session;
    /// returns its banner.
    fn attach(&mut self, control: ServerControl, server: ServerHandle) -> Vec<Reply> {
        let span = tracing::Span::current();
        span.record("server", tracing::field::display(server.name()));
        span.record("server_addr", tracing::field::display(control.peer));
        self.server_ip = control.peer.ip().to_canonical();
        self.server_local = canonical(control.local);
        self.server_rx = control.rx;
        self.server_tx = control.tx;
        self.server_tls = control.tls;
        self._control.push(self.shared.observer.register(
            self.id,
            Connection::ServerControl,
            control.local,
            control.peer,
            self.proxied_client(),
        ));
        self.server = Some(server);
        self.state.server_chosen();
        control.banner
    }

    /// `USER` when the server depends on the user: routes it, connects to
    /// a server the route allows when the session has none yet (its banner
    /// is not relayed: the client had the gateway's), and relays `USER`
    /// with the route's name. A refused route, or a later `USER` whose
    /// route does not allow the session's server, answers `530` (the same
    /// as a bad password: user names cannot be probed).
    async fn route_user(&mut self, command: &Command) -> Result<(), SessionError> {
        let raw = command.trimmed_arg();
        let text = String::from_utf8_lossy(raw);
        let routed = match self.config.routes.route(&text, &self.config.pool) {
            Ok(routed) => routed,
            Err(refused) => {
                info!(side = "client", user = %text, reason = %refused, "user refused by the routes");
                self.metrics.rejected(Reject::UnroutedUser);
                return self.reply(530, "Login incorrect.").await;
            }
        };
        // `user@server` names a server; the server hears the user alone.
        let user = match std::str::from_utf8(raw) {
            Ok(_) => routed.user.as_bytes().to_vec(),
            Err(_) => raw.to_vec(),
        };
        let target = routed.target;
        match &self.server {
            Some(server) if !target.allows(server.name()) => {
                info!(side = "client", user = %text, server = %server.name(), "the user's route does not allow this session's server");
                self.metrics.rejected(Reject::UnroutedUser);
                return self.reply(530, "Login incorrect.").await;
            }
            Some(_) => {}
            None => {
                // The level the client chose before the server was (its
                // PROT, or an implicit listener's) is the one the server
                // starts with (`server_conn::initial_prot`).
                let _ = self.state.take_early_prot();
                let (control, server) = server_conn::connect_any(
                    self.shared,
                    self.origin,
                    &target,
                    self.state.data_protected(),
                )
                .await?;
                let banner = self.attach(control, server);
                debug!(banner = ?banner.last().map(|r| String::from_utf8_lossy(r.text()).into_owned()), "server chosen at USER");
            }
        }
        self.forward(&Command::new(Verb::User, user), Waiter::Client)
            .await
    }

    /// Relays the banner: 120 (ready in n minutes) may precede 220.
    async fn banner(&mut self) -> Result<bool, SessionError> {
        let banner = std::mem::take(&mut self.banner);
        let ready = banner.last().is_some_and(|r| r.code == 220);
        for reply in &banner {
            self.send(reply).await?;
        }
        Ok(ready)
    }

    async fn serve(&mut self) -> Result<SessionOutcome, SessionError> {
        if !self.banner().await? {
            return Ok(SessionOutcome::ServerError);
        }
        loop {
            // Commands read during a transfer run once nothing is ahead of them.
            if self.active.is_none()
                && !self.ledger.owes_client()
                && let Some(item) = self.deferred.pop_front()
            {
                if let Next::End(outcome) = self.on_item(item).await? {
                    return Ok(outcome);
                }
                continue;
            }
            if let Next::End(outcome) = self.step().await? {
                return Ok(outcome);
            }
        }
    }

    /// Whether nothing is going on: no transfer, no reply awaited, nothing
    /// deferred.
    fn is_idle(&self) -> bool {
        self.active.is_none() && !self.ledger.owes_client() && self.deferred.is_empty()
    }

    /// The next timer: the reply the client waits for, the transfer's wait,
    /// or the idle timeout.
    fn next_deadline(&self) -> (Option<Instant>, bool) {
        if self.is_idle() {
            return (Some(self.last_activity + self.config.timeouts.idle), true);
        }
        let transfer = self.active.as_ref().and_then(|a| a.deadline);
        let deadline = match (self.reply_deadline, transfer) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        (deadline, false)
    }

    /// Waits for the next event and handles it.
    async fn step(&mut self) -> Result<Next, SessionError> {
        let read_client = match &self.active {
            Some(_) => self.deferred.len() < MAX_DEFERRED,
            None => !self.ledger.owes_client(),
        };
        let idle = self.is_idle();
        let (deadline, idle_timer) = self.next_deadline();
        tokio::select! {
            biased;
            () = self.shared.shutdown.cancelled(), if idle => {
                self.reply(421, "Gateway shutting down, closing control connection").await?;
                Ok(Next::End(SessionOutcome::Shutdown))
            }
            reply = self.server_rx.next(), if self.server.is_some() => match reply {
                None if self.quitting => Ok(Next::End(SessionOutcome::Ok)),
                reply => self.on_server_reply(reply_or_error(reply)?).await,
            },
            item = self.client_rx.next(), if read_client => match item {
                Some(Ok(item)) => {
                    self.last_activity = Instant::now();
                    self.on_client_item(item).await
                }
                Some(Err(e)) => Err(SessionError::ClientIo(e)),
                None if self.active.is_some() => Err(SessionError::ClientIo(io::ErrorKind::UnexpectedEof.into())),
                None => Ok(Next::End(SessionOutcome::Ok)),
            },
            io = transfer_io(&mut self.active) => {
                match io {
                    TransferIo::Setup(done) => {
                        if let Some(active) = self.active.as_mut() {
                            active.pending = None;
                        }
                        self.on_io(done).await?;
                    }
                    TransferIo::Relay(flow) => {
                        let relayed = match flow {
                            Flow::Finished { bytes, method } => Relayed { bytes, method: Some(method), error: None },
                            Flow::Failed { bytes, error } => Relayed { bytes, method: None, error: Some(error) },
                            Flow::Running => Relayed { bytes: 0, method: None, error: Some(relay::RelayError::Cut) },
                        };
                        self.feed(Event::RelayEnded(relayed)).await?;
                    }
                }
                Ok(Next::Continue)
            }
            () = sleep_until(deadline) => self.on_deadline(idle_timer).await,
        }
    }

    async fn on_deadline(&mut self, idle_timer: bool) -> Result<Next, SessionError> {
        let now = Instant::now();
        if idle_timer {
            let idle = self.config.timeouts.idle;
            self.metrics.rejected(Reject::IdleTimeout);
            self.reply(
                421,
                &format!(
                    "Idle timeout ({}s), closing control connection",
                    idle.as_secs()
                ),
            )
            .await?;
            return Ok(Next::End(SessionOutcome::Timeout));
        }
        if self.reply_deadline.is_some_and(|at| at <= now) {
            return Err(SessionError::ServerTimeout {
                command: "a command",
                timeout: self.config.timeouts.reply,
            });
        }
        if self
            .active
            .as_ref()
            .and_then(|a| a.deadline)
            .is_some_and(|at| at <= now)
        {
            self.feed(Event::Deadline).await?;
        }
        Ok(Next::Continue)
    }

    /// A client command or bad line, read while anything may be going on.
    async fn on_client_item(
        &mut self,
        item: Result<Command, CommandError>,
    ) -> Result<Next, SessionError> {
        if self.active.is_none() {
            return self.on_item(item).await;
        }
        match item {
            Ok(command) if command.verb == Verb::Abor => {
                self.metrics.command(&command.verb);
                debug!(command = ?command, "client command during a transfer");
                let aborted_on_server = self.feed(Event::Abort).await?;
                if !aborted_on_server {
                    // The server never got the transfer command: ABOR is
                    // the server's to answer, as any command.
                    self.forward(&command, Waiter::Client).await?;
                }
                Ok(Next::Continue)
            }
            Ok(command)
                if self.deferred.is_empty()
                    && self.state.is_plain_forward(&command)
                    && self
                        .active
                        .as_ref()
                        .is_some_and(|a| a.machine.passes_commands()) =>
            {
                debug!(command = ?command, "client command during a transfer: passed on");
                self.on_item(Ok(command)).await
            }
            item => {
                self.deferred.push_back(item);
                Ok(Next::Continue)
            }
        }
    }

    /// One client command (or bad line) taken in order.
    async fn on_item(&mut self, item: Result<Command, CommandError>) -> Result<Next, SessionError> {
        let first = !std::mem::replace(&mut self.commands_seen, true);
        if first && item == Err(CommandError::ProxyHeader) {
            // A PROXY v1 header that came after the banner was sent (the
            // accept saw nothing yet): refused as any untrusted header.
            warn!(
                side = "client",
                "PROXY header from a peer not in proxy-protocol-from: closed"
            );
            self.metrics.proxy_protocol_rejected(Rejection::Untrusted);
            return Ok(Next::End(SessionOutcome::ClientError));
        }
        let command = match item {
            Ok(command) => command,
            Err(error) => {
                debug!(side = "client", error = %error, "bad command line");
                if let Decision::Answer { reply, reject } = self.state.on_bad_line(&error) {
                    if let Some(reject) = reject {
                        self.metrics.rejected(reject);
                    }
                    self.deliver(reply).await?;
                }
                return Ok(Next::Continue);
            }
        };
        self.metrics.command(&command.verb);
        debug!(command = ?command, "client command");
        match self.state.on_command(&command) {
            Decision::Forward => self.forward(&command, Waiter::Client).await?,
            Decision::Quit => {
                self.quitting = true;
                self.forward(&command, Waiter::Client).await?;
            }
            Decision::Answer { reply, reject } => {
                if let Some(reject) = reject {
                    self.metrics.rejected(reject);
                    if matches!(reject, Reject::Bounce | Reject::LowPort) {
                        warn!(side = "client", command = ?command, reply = %String::from_utf8_lossy(reply.text()), "refused {}", command.verb.as_str());
                    }
                }
                self.deliver(reply).await?;
            }
            Decision::OpenPassive(answer) => {
                // A new PASV replaces the previous listener, as on servers.
                self.passive = None;
                match self.shared.passive_ports.listen(self.client_local.ip()) {
                    Ok(listener) => {
                        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
                        // The client may connect until it has been idle too
                        // long and then let a transfer wait its data timeout.
                        let timeouts = &self.config.timeouts;
                        let watch = self.shared.observer.expect(
                            self.id,
                            Connection::ClientData,
                            SocketAddr::new(self.client_local.ip(), port),
                            // Through a PROXY-protocol balancer the data
                            // connection comes from the client or from the
                            // balancer (the header inside says whom for, too
                            // late for the kernel): one connection, from
                            // anywhere; the port-theft check reads the header.
                            if self.proxied {
                                IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
                            } else {
                                self.client_ip
                            },
                            (Instant::now() + timeouts.idle + timeouts.data_connect).into_std(),
                        );
                        self.passive = Some((listener, watch));
                        self.send(&answer.reply(port)).await?;
                    }
                    Err(e) => {
                        self.state.passive_failed();
                        if matches!(e, DataFailure::PoolExhausted { .. }) {
                            self.metrics.rejected(Reject::PortPoolExhausted);
                        }
                        warn!(side = "client", error = %e, "cannot open a passive listener");
                        self.reply(425, &format!("Can't open passive connection: {e}"))
                            .await?;
                    }
                }
            }
            Decision::Active(target) => {
                if let ActiveTarget::NatRewritten { requested, target } = target {
                    info!(requested = %requested, target = %target, "client behind NAT: connecting to its observed address");
                    self.metrics.nat_rewrite();
                }
                self.reply(
                    200,
                    &format!("{} command successful", command.verb.as_str()),
                )
                .await?;
            }
            Decision::Transfer { server_passive, .. } => {
                self.start_transfer(command, server_passive).await?;
            }
            Decision::ForwardProt => self.forward(&command, Waiter::Client).await?,
            Decision::StartTls { private_data } => self.start_client_tls(private_data).await?,
            Decision::Route => self.route_user(&command).await?,
            Decision::Close(reply) => {
                self.deliver(reply).await?;
                return Ok(Next::End(SessionOutcome::Ok));
            }
        }
        // The listener lives exactly as long as the passive arrangement.
        if self.state.arrangement() != Arrangement::Passive {
            self.passive = None;
        }
        Ok(Next::Continue)
    }

    /// `AUTH TLS` accepted: 234, then the handshake on the control
    /// connection (RFC 4217 §4). A failed handshake ends the session: the
    /// connection can carry nothing any more.
    async fn start_client_tls(&mut self, private_data: bool) -> Result<(), SessionError> {
        let Some(session_tls) = self.client_tls.as_ref() else {
            return self.reply(502, "TLS is not offered by this gateway").await;
        };
        let config = session_tls.control();
        // Clear text after AUTH and before the handshake would be taken as
        // protected (a STARTTLS command injection): it is dropped.
        if !self.client_rx.read_buffer().is_empty() {
            warn!(
                side = "client",
                bytes = self.client_rx.read_buffer().len(),
                "clear text after AUTH TLS dropped"
            );
            self.metrics.rejected(Reject::BadInput);
            self.client_rx.read_buffer_mut().clear();
        }
        self.reply(234, "AUTH TLS successful").await?;
        let reader = std::mem::replace(self.client_rx.get_mut(), ClientReader::Closed);
        self.client_tx = ClientWriter::Closed;
        let ClientReader::Plain(stream) = reader else {
            return Err(SessionError::ClientIo(io::Error::other(
                "control connection already upgraded",
            )));
        };
        match tls::accept(config, stream, self.config.timeouts.connect).await {
            Ok((stream, handshake)) => {
                self.metrics.tls_handshake(Side::Client, &handshake);
                let (read, write) = tokio::io::split(stream);
                *self.client_rx.get_mut() = ClientReader::Tls(read);
                self.client_tx = ClientWriter::Tls(write);
                self.state.tls_started(private_data);
                debug!(version = ?handshake.version, "control connection protected");
                if private_data
                    && self.server.is_some()
                    && self.config.tls.server.mode != ServerTlsMode::Off
                    && self.config.tls.server.data == ServerDataTls::Client
                {
                    // `AUTH SSL` and `TLS-P` imply PROT P and no PROT
                    // follows: the server is told, and its reply
                    // swallowed (a refusal shows when a data connection
                    // toward it fails).
                    let prot = Command::new(Verb::Prot, b"P".to_vec());
                    self.forward(&prot, Waiter::Nobody).await?;
                }
                Ok(())
            }
            Err(error) => {
                self.metrics.tls_error(&error);
                Err(SessionError::Tls(error))
            }
        }
    }

    async fn start_transfer(
        &mut self,
        command: Command,
        server_passive: bool,
    ) -> Result<(), SessionError> {
        self.lingering = None;
        let (machine, actions) = Transfer::start(Plan {
            command,
            server_passive,
            server_ip: self.server_ip,
            server_passive_policy: self.config.server_passive,
        });
        let protection = (
            Protection::of(self.client_tls.is_some() && self.state.data_protected()),
            Protection::of(self.server_data_protected()),
        );
        self.active = Some(Active {
            machine,
            protection,
            started: Instant::now(),
            server_leg: None,
            client_leg: None,
            pending: None,
            legs: None,
            leg_tls: None,
            relay: None,
            abort_entry: None,
            deadline: None,
            guards: Vec::new(),
        });
        self.run_actions(actions).await?;
        self.rearm_transfer_deadline();
        Ok(())
    }

    /// Sends a command to the server and records who waits for its replies.
    async fn forward(&mut self, command: &Command, waiter: Waiter) -> Result<(), SessionError> {
        self.server_tx
            .write_all(&command.to_line())
            .await
            .map_err(SessionError::ServerIo)?;
        self.ledger.sent(&command.verb, waiter);
        if waiter == Waiter::Client && self.reply_deadline.is_none() {
            self.reply_deadline = Some(Instant::now() + self.config.timeouts.reply);
        }
        Ok(())
    }

    /// Sends ABOR the way RFC 959 §4.1.3 asks (and BSD clients do): Telnet
    /// IP and IAC as urgent data, then DM and the command, so that a server
    /// busy with the transfer notices it.
    async fn send_abort(&mut self) -> Result<EntryId, SessionError> {
        let rest: &[u8] = match &self.server_tx {
            ServerWriter::Plain(write) => {
                let sock = socket2::SockRef::from(write.as_ref());
                match sock.send_out_of_band(b"\xff\xf4\xff") {
                    Ok(3) => b"\xf2ABOR\r\n",
                    // Could not send it urgent: a plain ABOR still works with
                    // a server that reads commands during a transfer.
                    _ => b"ABOR\r\n",
                }
            }
            // Urgent data would break the TLS record stream.
            _ => b"ABOR\r\n",
        };
        self.server_tx
            .write_all(rest)
            .await
            .map_err(SessionError::ServerIo)?;
        Ok(self.ledger.sent(&Verb::Abor, Waiter::Transfer(Step::Abort)))
    }

    async fn on_server_reply(&mut self, reply: Reply) -> Result<Next, SessionError> {
        let Some(attribution) = self.ledger.on_reply(&reply) else {
            // Unsolicited: typically 421 before the server closes.
            warn!(
                side = "server",
                code = reply.code,
                "unsolicited reply from the server"
            );
            self.deliver(reply.clone()).await?;
            return Ok(if reply.code == 421 {
                Next::End(SessionOutcome::ServerError)
            } else {
                Next::Continue
            });
        };
        debug!(side = "server", code = reply.code, command = attribution.verb.as_str(), waiter = ?attribution.waiter, "server reply");
        match attribution.waiter {
            Waiter::Client => {
                self.reply_deadline = self
                    .ledger
                    .owes_client()
                    .then(|| Instant::now() + self.config.timeouts.reply);
                self.last_activity = Instant::now();
                if attribution.last
                    && let Some(result) = self.state.on_reply(&attribution.verb, reply.code)
                {
                    self.metrics.login(result);
                }
                let reply = if attribution.verb == Verb::Feat {
                    rewrite_feat(reply, self.config.tls.client.mode != ClientTlsMode::Off)
                } else {
                    reply
                };
                let quit = attribution.last && attribution.verb == Verb::Quit && reply.code == 221;
                self.deliver(reply).await?;
                if quit {
                    return Ok(Next::End(SessionOutcome::Ok));
                }
            }
            Waiter::Nobody => {
                debug!(
                    side = "server",
                    code = reply.code,
                    command = attribution.verb.as_str(),
                    "late reply swallowed"
                );
            }
            Waiter::Transfer(step) => {
                self.feed(Event::Reply(step, &reply)).await?;
            }
        }
        Ok(Next::Continue)
    }

    async fn on_io(&mut self, done: IoDone) -> Result<(), SessionError> {
        match done {
            IoDone::ServerConnected(Ok(stream)) => {
                self.metrics
                    .data_connection(Side::Server, DataMode::Connect);
                if let Some(active) = self.active.as_mut() {
                    active.server_leg = Some(ServerLeg::Connected(stream));
                }
                self.feed(Event::ServerConnected).await?;
            }
            IoDone::Legs(Ok((client, server))) => {
                let Some(guards) = self.register_legs(&client, &server) else {
                    // A connection that closed at once has no addresses.
                    let error = DataFailure::Io {
                        operation: "open the data connection to",
                        addr: SocketAddr::new(self.client_ip, 0),
                        source: io::ErrorKind::NotConnected.into(),
                    }
                    .on(Side::Client);
                    self.feed(Event::DataFailed(error)).await?;
                    return Ok(());
                };
                if let Some(active) = self.active.as_mut() {
                    active.guards.extend(guards);
                    active.legs = Some((client, server));
                    self.metrics.data_setup(active.started.elapsed());
                }
                self.feed(Event::LegsReady).await?;
            }
            IoDone::ServerConnected(Err(error)) | IoDone::Legs(Err(error)) => {
                self.feed(Event::DataFailed(error)).await?;
            }
        }
        Ok(())
    }

    fn register_legs(&self, client: &TcpStream, server: &TcpStream) -> Option<[Guard; 2]> {
        let register =
            |connection, stream: &TcpStream| match (stream.local_addr(), stream.peer_addr()) {
                (Ok(local), Ok(peer)) => Some(self.shared.observer.register(
                    self.id,
                    connection,
                    local,
                    peer,
                    self.proxied_client(),
                )),
                _ => None,
            };
        Some([
            register(Connection::ClientData, client)?,
            register(Connection::ServerData, server)?,
        ])
    }

    /// Whether the server's data connections are TLS now.
    fn server_data_protected(&self) -> bool {
        match self.config.tls.server.data {
            _ if self.server_tls.is_none() => false,
            ServerDataTls::Required => true,
            ServerDataTls::Clear => false,
            ServerDataTls::Client => self.state.data_protected(),
        }
    }

    fn relay_options(&self) -> RelayOptions {
        RelayOptions {
            mode: self.config.relay_mode,
            pipe_size: self.config.pipe_size,
            copy_buffer: self.config.copy_buffer,
            send_lowat: self.config.send_lowat,
            idle_timeout: self.config.timeouts.transfer_idle,
        }
    }

    /// Feeds an event to the transfer machine and carries its actions out.
    /// Returns whether the server was sent an ABOR (for [`Event::Abort`]).
    async fn feed(&mut self, event: Event<'_>) -> Result<bool, SessionError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(false);
        };
        let actions = active.machine.on(event);
        let aborted = actions.iter().any(|a| matches!(a, Action::SendAbort));
        self.run_actions(actions).await?;
        self.rearm_transfer_deadline();
        Ok(aborted)
    }

    fn rearm_transfer_deadline(&mut self) {
        if let Some(active) = self.active.as_mut() {
            active.deadline = active.machine.wait().map(|wait| {
                Instant::now()
                    + match wait {
                        Wait::Reply => self.config.timeouts.reply,
                        Wait::AbortGrace => ABORT_GRACE,
                    }
            });
        }
    }

    /// Carries actions out in order; an action may produce an event at
    /// once (a listener opened or not), whose actions come next.
    async fn run_actions(&mut self, actions: Vec<Action>) -> Result<(), SessionError> {
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            let Some(event) = self.execute(action).await? else {
                continue;
            };
            let Some(active) = self.active.as_mut() else {
                break;
            };
            for action in active.machine.on(event).into_iter().rev() {
                queue.push_front(action);
            }
        }
        Ok(())
    }

    async fn execute(&mut self, action: Action) -> Result<Option<Event<'static>>, SessionError> {
        match action {
            Action::Send(command, step) => {
                self.forward(&command, Waiter::Transfer(step)).await?;
            }
            Action::SendAbort => {
                let entry = self.send_abort().await?;
                if let Some(active) = self.active.as_mut() {
                    active.abort_entry = Some(entry);
                }
            }
            Action::Listen => {
                return Ok(Some(
                    match self.shared.active_ports.listen(self.server_local.ip()) {
                        Ok(listener) => match listener.local_addr() {
                            Ok(addr) => {
                                // The server connects after answering PORT
                                // and the transfer command.
                                let timeouts = &self.config.timeouts;
                                let watch = self.shared.observer.expect(
                                    self.id,
                                    Connection::ServerData,
                                    SocketAddr::new(self.server_local.ip(), addr.port()),
                                    self.server_ip,
                                    (Instant::now() + 2 * timeouts.reply + timeouts.data_connect)
                                        .into_std(),
                                );
                                if let Some(active) = self.active.as_mut() {
                                    active.guards.push(watch);
                                    active.server_leg = Some(ServerLeg::Listening(listener));
                                }
                                Event::Listening(SocketAddr::new(
                                    self.server_local.ip(),
                                    addr.port(),
                                ))
                            }
                            Err(source) => Event::DataFailed(
                                DataFailure::Io {
                                    operation: "listen on",
                                    addr: SocketAddr::new(self.server_local.ip(), 0),
                                    source,
                                }
                                .on(Side::Server),
                            ),
                        },
                        Err(e) => Event::DataFailed(e.on(Side::Server)),
                    },
                ));
            }
            Action::Connect(target) => {
                let watch = self.shared.observer.watch_port(target.port());
                let (ip, timeout) = (self.server_local.ip(), self.config.timeouts.data_connect);
                if let Some(active) = self.active.as_mut() {
                    active.guards.push(watch);
                    active.pending = Some(Box::pin(async move {
                        IoDone::ServerConnected(
                            data::connect_from(ip, target, timeout)
                                .await
                                .map_err(|e| e.on(Side::Server)),
                        )
                    }));
                }
            }
            Action::ConsumeArrangement => {
                let leg = match self.state.arrangement() {
                    Arrangement::Active(target) => Some(ClientLeg::Active(target)),
                    Arrangement::Passive => self.passive.take().map(|(listener, watch)| {
                        if let Some(active) = self.active.as_mut() {
                            active.guards.push(watch);
                        }
                        ClientLeg::Passive(listener)
                    }),
                    Arrangement::None => None,
                };
                self.state.consume_arrangement();
                if let Some(active) = self.active.as_mut() {
                    active.client_leg = leg;
                }
            }
            Action::OpenLegs => {
                let upload = self
                    .active
                    .as_ref()
                    .is_some_and(|a| a.machine.kind() == transfer::TransferKind::Upload);
                let context = LegContext {
                    client_ip: self.client_ip,
                    balancers: (!self.config.proxy_from.networks().is_empty())
                        .then(|| self.config.proxy_from.clone()),
                    client_local_ip: self.client_local.ip(),
                    server_ip: self.server_ip,
                    timeout: self.config.timeouts.data_connect,
                    active_ports: Arc::clone(&self.shared.active_ports),
                    metrics: Arc::clone(&self.shared.metrics),
                };
                let leg_tls = LegTls {
                    client: self
                        .client_tls
                        .as_ref()
                        .filter(|_| self.state.data_protected())
                        .map(|tls| (tls.data(upload), self.config.tls.client.reuse)),
                    server: self
                        .server_tls
                        .clone()
                        .filter(|_| self.server_data_protected()),
                    timeout: self.config.timeouts.data_connect,
                    metrics: Arc::clone(&self.shared.metrics),
                };
                let Some(active) = self.active.as_mut() else {
                    return Ok(None);
                };
                active.leg_tls =
                    (leg_tls.client.is_some() || leg_tls.server.is_some()).then_some(leg_tls);
                if let Some(ClientLeg::Active(target)) = &active.client_leg {
                    active
                        .guards
                        .push(self.shared.observer.watch_port(target.port()));
                }
                match (active.server_leg.take(), active.client_leg.take()) {
                    (Some(server), Some(client)) => {
                        active.pending = Some(Box::pin(async move {
                            IoDone::Legs(context.open(server, client).await)
                        }));
                    }
                    (server, _) => {
                        let side = if server.is_none() {
                            Side::Server
                        } else {
                            Side::Client
                        };
                        return Ok(Some(Event::DataFailed(
                            DataFailure::Io {
                                operation: "open the data connection",
                                addr: SocketAddr::new(self.client_ip, 0),
                                source: io::ErrorKind::NotConnected.into(),
                            }
                            .on(side),
                        )));
                    }
                }
            }
            Action::Relay => {
                let options = self.relay_options();
                if let Some(active) = self.active.as_mut()
                    && let Some((client, server)) = active.legs.take()
                {
                    active.relay = Some(match active.leg_tls.take() {
                        None => relay::spawn(Leg::Plain(client), Leg::Plain(server), options),
                        Some(tls) => relay::spawn_after(tls.secure(client, server), options),
                    });
                }
            }
            Action::Cut => {
                if let Some(active) = self.active.as_mut() {
                    active.pending = None;
                    if let Some(relay) = active.relay.take() {
                        relay.cut();
                    }
                    // Reset, not closed: see `RelayHandle::cut`.
                    let reset = |stream: &TcpStream| {
                        let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
                    };
                    if let Some((client, server)) = active.legs.take() {
                        reset(&client);
                        reset(&server);
                    }
                    if let Some(ServerLeg::Connected(server)) = active.server_leg.take() {
                        reset(&server);
                    }
                    active.client_leg = None;
                }
            }
            Action::Reply(reply) => self.send(&reply).await?,
            Action::Finish(outcome) => self.finish_transfer(outcome).await?,
        }
        Ok(None)
    }

    async fn finish_transfer(&mut self, outcome: Outcome) -> Result<(), SessionError> {
        let Some(active) = self.active.take() else {
            return Ok(());
        };
        // Replies the server still owes for this transfer are swallowed when
        // they come; a missing second ABOR reply is no longer waited for.
        self.ledger.forsake_transfer();
        if let Some(entry) = active.abort_entry {
            self.ledger.make_optional(entry);
        }
        let command = active.machine.command();
        let kind = active.machine.kind();
        let took = active.started.elapsed();
        match &outcome.failure {
            Some(Failure::Data(error)) => {
                self.metrics.data_error(error);
                match &error.cause {
                    DataFailure::Policy { refusal, .. } => {
                        self.metrics.rejected(refusal.server_reject());
                    }
                    DataFailure::PoolExhausted { .. } => {
                        self.metrics.rejected(Reject::PortPoolExhausted);
                    }
                    _ => {}
                }
                match error.side {
                    Side::Server => {
                        warn!(side = "server", kind = error.kind.label(), error = %error, command = command.verb.as_str(), "data connection failed")
                    }
                    Side::Client => {
                        info!(side = "client", kind = error.kind.label(), error = %error, command = command.verb.as_str(), "data connection failed")
                    }
                }
            }
            Some(Failure::Relay(error)) => {
                warn!(error = %error, command = command.verb.as_str(), "data relay failed");
            }
            Some(Failure::ServerTimeout) => {
                warn!(
                    side = "server",
                    command = command.verb.as_str(),
                    "the server did not answer in time"
                );
            }
            None => {}
        }
        if outcome.started || outcome.result == TransferResult::Aborted {
            if let Some(method) = outcome.method {
                self.metrics.relay_used(method);
            }
            self.metrics.transfer_finished(
                kind,
                outcome.result,
                active.protection,
                outcome.bytes,
                took,
            );
            info!(
                command = command.verb.as_str(),
                direction = kind.label(),
                result = outcome.result.label(),
                bytes = outcome.bytes,
                code = outcome.server_code,
                relay = outcome.method.map_or("none", |m| m.label()),
                took_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
                "transfer finished"
            );
        }
        if let Some(relay) = active.relay {
            self.lingering = Some(Lingering {
                _relay: relay,
                _guards: active.guards,
            });
        }
        self.last_activity = Instant::now();
        // Replies that waited behind the transfer's final reply.
        while let Some(reply) = self.held.pop_front() {
            self.send(&reply).await?;
        }
        Ok(())
    }

    /// A reply for the client, in order: behind the transfer's held final
    /// reply when there is one.
    async fn deliver(&mut self, reply: Reply) -> Result<(), SessionError> {
        let holding = self
            .active
            .as_ref()
            .is_some_and(|a| a.machine.holds_replies());
        if holding || !self.held.is_empty() {
            self.held.push_back(reply);
            Ok(())
        } else {
            self.send(&reply).await
        }
    }

    /// After `serve`: tells the client why the session ends when it is the
    /// server's fault, and closes both control connections.
    async fn finish(&mut self, outcome: &Result<SessionOutcome, SessionError>) {
        if let Err(error) = outcome {
            match error.side() {
                Side::Client => {}
                Side::Server => {
                    warn!(side = "server", error = %error, "session failed");
                    let reply = Reply::new(421, &format!("Service not available: {error}"));
                    let _ =
                        tokio::time::timeout(FAREWELL, self.client_tx.write_all(&reply.to_bytes()))
                            .await;
                }
            }
        }
        self.active = None;
        self.lingering = None;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.server_tx.shutdown()).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.client_tx.shutdown()).await;
    }

    async fn send(&mut self, reply: &Reply) -> Result<(), SessionError> {
        debug!(code = reply.code, text = %String::from_utf8_lossy(reply.text()), "reply to client");
        self.metrics.reply(reply.code);
        self.client_tx
            .write_all(&reply.to_bytes())
            .await
            .map_err(SessionError::ClientIo)
    }

    async fn reply(&mut self, code: u16, text: &str) -> Result<(), SessionError> {
        self.send(&Reply::new(code, text)).await
    }
}
