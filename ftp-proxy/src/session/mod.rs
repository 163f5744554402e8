//! One task per client control connection.
//!
//! Owns: the connection to the server for this client, the relay of
//! commands and replies, the commands the gateway answers itself (`PORT`,
//! `EPRT`, `PASV`, `EPSV`, the TLS commands), the setup of both data
//! connections of a transfer, and the order of the replies around it (the
//! server's final reply reaches the client only after the last data byte).
//!
//! Commands are handled one at a time, in order; pipelined commands wait in
//! the framing buffer (bounded by the line bound and TCP flow control).
//! During a transfer the client's control stream is still read, so that
//! `ABOR` works; other commands read meanwhile are queued (bounded).
//!
//! Not here: byte moving ([`crate::relay`]), address decisions
//! ([`crate::protocol::policy`]), accept and limits ([`crate::gateway`]).

pub mod control;
pub mod data;
pub mod legs;
pub mod state;

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use control::ControlStream;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::Config;
use crate::flows::{FlowView, PortWatch};
use crate::metrics::{DataMode, Leg, Metrics, Reject, SessionOutcome, TcpLeg, TransferResult};
use crate::protocol::address;
use crate::protocol::feat::rewrite_feat;
use crate::protocol::policy::{self, ActiveTarget, Refusal};
use crate::protocol::reply::{DEFAULT_MAX_REPLY_LINE, DEFAULT_MAX_REPLY_LINES};
use crate::protocol::{Command, CommandCodec, CommandError, Reply, ReplyCodec, ReplyError, Verb};
use crate::relay::{self, Direction, Flow, RelayHandle, RelayOptions};
use data::{DataError, PortPool};
use legs::{LegRegistry, Registration};
use state::{Arrangement, ControlState, Decision, Policy};

/// Commands read during a transfer and kept for after it.
const MAX_QUEUED_COMMANDS: usize = 32;
/// Initial capacity of each control connection's read buffer. Commands and
/// most replies are a few dozen bytes; longer ones grow the buffer (up to
/// the line and reply bounds). tokio-util's default of 8 KiB per buffer,
/// two per session, was most of an idle session's memory.
const CONTROL_BUFFER: usize = 512;
/// How long to wait for the second reply after an `ABOR`.
const ABORT_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// What a session shares with the rest of the gateway.
#[derive(Debug, Clone)]
pub struct Shared {
    /// The configuration in force when the session started.
    pub config: Arc<Config>,
    /// Ports for passive listeners toward clients.
    pub passive_ports: Arc<PortPool>,
    /// Ports for active-mode listeners toward the server and active source ports.
    pub active_ports: Arc<PortPool>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Cancelled when the gateway starts shutting down.
    pub shutdown: CancellationToken,
    /// Which session and leg each connection belongs to.
    pub legs: LegRegistry,
    /// The kernel's view of the flows (watches data ports).
    pub flows: Arc<FlowView>,
}

/// Which side caused a session to end; it decides the reply, the log level
/// and the metric label.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The server could not be resolved, reached, or did not greet in time.
    #[error("cannot reach the FTP server {upstream}: {reason}")]
    Unreachable {
        /// The configured upstream.
        upstream: String,
        /// Why.
        reason: String,
    },
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
}

impl SessionError {
    fn outcome(&self) -> SessionOutcome {
        match self {
            SessionError::ClientIo(_) => SessionOutcome::ClientError,
            SessionError::ServerTimeout { .. } => SessionOutcome::Timeout,
            _ => SessionOutcome::ServerError,
        }
    }
}

/// What the client has arranged for the next data connection.
#[derive(Debug)]
enum ClientData {
    /// PASV/EPSV: the gateway listens.
    Passive(tokio::net::TcpListener),
    /// PORT/EPRT: the gateway connects here.
    Active(SocketAddr),
}

/// What the gateway arranged with the server for the next transfer.
enum ServerData {
    Connected(TcpStream),
    Listening(tokio::net::TcpListener),
}

enum Next {
    Continue,
    Quit,
}

/// Runs one session to its end. Never panics, always closes both
/// connections; errors are logged and counted here.
pub async fn run(client: TcpStream, id: u64, shared: Shared) {
    let client_addr = client.peer_addr().ok();
    let span = info_span!("session", session_id = id, client = ?client_addr, server = tracing::field::Empty);
    async move {
        shared.metrics.session_started();
        let outcome = match Session::start(client, id, &shared).await {
            Ok(mut session) => {
                let outcome = session.serve().await;
                session.finish(&outcome).await;
                outcome
            }
            Err((mut client, error)) => {
                warn!(side = "server", error = %error, "upstream unreachable");
                shared.metrics.upstream_error("connect");
                let reply = Reply::new(421, &format!("Service not available: {error}"));
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    client.write_all(&reply.to_bytes()),
                )
                .await;
                Err(error)
            }
        };
        match &outcome {
            Ok(outcome) => {
                info!(outcome = ?outcome, "session closed");
                shared.metrics.session_ended(*outcome);
            }
            Err(error) => {
                info!(error = %error, "session closed");
                shared.metrics.session_ended(error.outcome());
            }
        }
    }
    .instrument(span)
    .await;
}

struct Session<'a> {
    id: u64,
    shared: &'a Shared,
    config: &'a Config,
    metrics: &'a Metrics,
    client_ip: IpAddr,
    client_local: SocketAddr,
    server_ip: IpAddr,
    server_local: SocketAddr,
    client_rx: FramedRead<ControlStream, CommandCodec>,
    client_tx: ControlStream,
    server_rx: FramedRead<OwnedReadHalf, ReplyCodec>,
    server_tx: OwnedWriteHalf,
    /// The protocol state (pure).
    state: ControlState,
    /// The listener of a passive arrangement.
    passive_listener: Option<tokio::net::TcpListener>,
    /// Ports the flow tracker watches for the passive listener and the
    /// transfer being set up.
    data_watches: Vec<PortWatch>,
    /// Commands read during a transfer.
    queued: VecDeque<Result<Command, CommandError>>,
    /// A finished transfer whose second direction may still be closing.
    lingering: Option<(RelayHandle, [Registration; 2], Vec<PortWatch>)>,
    /// The control connections, as registered for the flow tracker.
    _control_legs: [Registration; 2],
}

enum Event {
    Item(Result<Command, CommandError>),
    Nothing,
    End(SessionOutcome),
}

async fn connect_upstream(config: &Config) -> Result<TcpStream, String> {
    let authority = config.upstream.authority();
    let addrs = tokio::net::lookup_host(&authority)
        .await
        .map_err(|e| format!("cannot resolve {authority}: {e}"))?;
    let mut last = format!("{authority} resolved to no address");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = format!("connect to {addr}: {e}"),
        }
    }
    Err(last)
}

fn reply_or_error(reply: Option<Result<Reply, ReplyError>>) -> Result<Reply, SessionError> {
    match reply {
        Some(Ok(reply)) => Ok(reply),
        Some(Err(ReplyError::Io(e))) => Err(SessionError::ServerIo(e)),
        Some(Err(e)) => Err(SessionError::ServerProtocol(e)),
        None => Err(SessionError::ServerClosed),
    }
}

impl<'a> Session<'a> {
    /// Connects to the server. On failure the client stream is handed back
    /// so that the caller can answer 421.
    async fn start(
        client: TcpStream,
        id: u64,
        shared: &'a Shared,
    ) -> Result<Session<'a>, (TcpStream, SessionError)> {
        let config = &*shared.config;
        let started = Instant::now();
        let unreachable = |reason: String| SessionError::Unreachable {
            upstream: config.upstream.authority(),
            reason,
        };
        let server =
            match tokio::time::timeout(config.timeouts.connect, connect_upstream(config)).await {
                Ok(Ok(server)) => server,
                Ok(Err(reason)) => return Err((client, unreachable(reason))),
                Err(_) => {
                    return Err((
                        client,
                        unreachable(format!(
                            "no connection within {:?}",
                            config.timeouts.connect
                        )),
                    ));
                }
            };
        shared.metrics.upstream_connected(started.elapsed());
        let addresses = (|| {
            Ok::<_, io::Error>((
                client.peer_addr()?,
                client.local_addr()?,
                server.peer_addr()?,
                server.local_addr()?,
            ))
        })();
        let (client_addr, client_local, server_addr, server_local) = match addresses {
            Ok(a) => a,
            Err(e) => return Err((client, SessionError::ClientIo(e))),
        };
        tracing::Span::current().record("server", tracing::field::display(server_addr));
        // Control replies are small and latency-bound: no Nagle.
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        // Clients send the Telnet Synch before ABOR as urgent data (RFC 959
        // §4.1.3); keep it in the stream so the decoder sees IAC DM whole.
        let _ = socket2::SockRef::from(&client).set_out_of_band_inline(true);
        let (client_read, client_tx) = ControlStream::split(client);
        let (server_read, server_tx) = server.into_split();
        let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        Ok(Session {
            id,
            shared,
            config,
            metrics: &shared.metrics,
            client_ip: client_addr.ip().to_canonical(),
            client_local: canonical(client_local),
            server_ip: server_addr.ip().to_canonical(),
            server_local: canonical(server_local),
            client_rx: FramedRead::with_capacity(
                client_read,
                CommandCodec::new(config.limits.max_line),
                CONTROL_BUFFER,
            ),
            client_tx,
            server_rx: FramedRead::with_capacity(
                server_read,
                ReplyCodec::new(DEFAULT_MAX_REPLY_LINE, DEFAULT_MAX_REPLY_LINES),
                CONTROL_BUFFER,
            ),
            server_tx,
            state: ControlState::new(
                client_addr.ip(),
                client_local.ip(),
                Policy {
                    nat_traversal: config.nat_traversal,
                    passive_address: config.passive_address,
                    upstream_mode: config.upstream_mode,
                },
            ),
            passive_listener: None,
            data_watches: Vec::new(),
            queued: VecDeque::new(),
            lingering: None,
            _control_legs: [
                shared
                    .legs
                    .register(id, TcpLeg::ClientControl, client_local, client_addr),
                shared
                    .legs
                    .register(id, TcpLeg::ServerControl, server_local, server_addr),
            ],
        })
    }

    /// Relays the banner: 120 (ready in n minutes) may precede 220.
    async fn banner(&mut self) -> Result<bool, SessionError> {
        let timeout = self.config.timeouts.connect;
        loop {
            let banner = match tokio::time::timeout(timeout, self.server_rx.next()).await {
                Ok(reply) => reply_or_error(reply)?,
                Err(_) => {
                    return Err(SessionError::ServerTimeout {
                        command: "banner",
                        timeout,
                    });
                }
            };
            self.send(&banner).await?;
            match banner.code {
                120 => continue,
                220 => return Ok(true),
                _ => return Ok(false),
            }
        }
    }

    async fn serve(&mut self) -> Result<SessionOutcome, SessionError> {
        if !self.banner().await? {
            return Ok(SessionOutcome::ServerError);
        }
        loop {
            let item = match self.queued.pop_front() {
                Some(item) => item,
                None => match self.next_event().await? {
                    Event::Item(item) => item,
                    Event::Nothing => continue,
                    Event::End(outcome) => return Ok(outcome),
                },
            };
            let next = match item {
                Ok(command) => {
                    self.metrics.command(&command.verb);
                    debug!(command = ?command, "client command");
                    self.handle(command).await?
                }
                Err(error) => {
                    debug!(side = "client", error = %error, "bad command line");
                    if let Decision::Answer { reply, reject } = self.state.on_bad_line(&error) {
                        if let Some(reject) = reject {
                            self.metrics.rejected(reject);
                        }
                        self.send(&reply).await?;
                    }
                    Next::Continue
                }
            };
            if let Next::Quit = next {
                return Ok(SessionOutcome::Ok);
            }
        }
    }

    /// After `serve`: tells the client why the session ends when it is the
    /// server's fault, and closes both control connections.
    async fn finish(&mut self, outcome: &Result<SessionOutcome, SessionError>) {
        if let Err(error) = outcome {
            match error {
                SessionError::ClientIo(_) => {}
                error => {
                    warn!(side = "server", error = %error, "session failed");
                    let reply = Reply::new(421, &format!("Service not available: {error}"));
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        self.client_tx.write_all(&reply.to_bytes()),
                    )
                    .await;
                }
            }
        }
        self.lingering = None;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.server_tx.shutdown()).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.client_tx.shutdown()).await;
    }

    /// Waits for the next client command, while watching the server, the
    /// idle timeout and shutdown.
    async fn next_event(&mut self) -> Result<Event, SessionError> {
        let idle = self.config.timeouts.idle;
        tokio::select! {
            biased;
            () = self.shared.shutdown.cancelled() => {
                self.reply(421, "Gateway shutting down, closing control connection").await?;
                Ok(Event::End(SessionOutcome::Shutdown))
            }
            item = self.client_rx.next() => match item {
                Some(Ok(item)) => Ok(Event::Item(item)),
                Some(Err(e)) => Err(SessionError::ClientIo(e)),
                None => Ok(Event::End(SessionOutcome::Ok)),
            },
            reply = self.server_rx.next() => {
                // An unsolicited reply: typically 421 on the server's own timeout.
                let reply = reply_or_error(reply)?;
                self.send(&reply).await?;
                if reply.code == 421 { Ok(Event::End(SessionOutcome::ServerError)) } else { Ok(Event::Nothing) }
            }
            () = tokio::time::sleep(idle) => {
                self.metrics.rejected(Reject::IdleTimeout);
                self.reply(421, &format!("Idle timeout ({}s), closing control connection", idle.as_secs())).await?;
                Ok(Event::End(SessionOutcome::Timeout))
            }
        }
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

    async fn send_to_server(&mut self, command: &Command) -> Result<(), SessionError> {
        self.server_tx
            .write_all(&command.to_line())
            .await
            .map_err(SessionError::ServerIo)
    }

    async fn server_reply(&mut self, command: &'static str) -> Result<Reply, SessionError> {
        let timeout = self.config.timeouts.reply;
        match tokio::time::timeout(timeout, self.server_rx.next()).await {
            Ok(reply) => reply_or_error(reply),
            Err(_) => Err(SessionError::ServerTimeout { command, timeout }),
        }
    }

    /// Sends a command to the server and relays its replies up to the final one.
    async fn forward(&mut self, command: &Command) -> Result<Reply, SessionError> {
        self.send_to_server(command).await?;
        loop {
            let reply = self.server_reply(command.verb.label()).await?;
            let reply = if command.verb == Verb::Feat {
                rewrite_feat(reply)
            } else {
                reply
            };
            self.send(&reply).await?;
            if !reply.is_preliminary() {
                return Ok(reply);
            }
        }
    }

    async fn handle(&mut self, command: Command) -> Result<Next, SessionError> {
        let decision = self.state.on_command(&command);
        match decision {
            Decision::Forward => {
                let reply = self.forward(&command).await?;
                match (&command.verb, reply.code) {
                    (Verb::User | Verb::Pass, 230) | (Verb::Pass, 202) => self.metrics.login(true),
                    (Verb::Pass, code) if code >= 400 => self.metrics.login(false),
                    _ => {}
                }
            }
            Decision::Answer { reply, reject } => {
                if let Some(reject) = reject {
                    self.metrics.rejected(reject);
                    if matches!(reject, Reject::Bounce | Reject::LowPort) {
                        warn!(side = "client", command = ?command, reply = %String::from_utf8_lossy(reply.text()), "refused {}", command.verb.as_str());
                    }
                }
                self.send(&reply).await?;
            }
            Decision::OpenPassive(answer) => {
                // A new PASV replaces the previous listener, as on servers.
                self.passive_listener = None;
                match self.shared.passive_ports.listen(self.client_local.ip()) {
                    Ok(listener) => {
                        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
                        self.data_watches.clear();
                        self.data_watches.extend(self.shared.flows.watch(port));
                        self.passive_listener = Some(listener);
                        self.send(&answer.reply(port)).await?;
                    }
                    Err(e) => {
                        self.state.passive_failed();
                        if matches!(e, DataError::PoolExhausted { .. }) {
                            self.metrics.rejected(Reject::PortPoolExhausted);
                        }
                        warn!(error = %e, "cannot open a passive listener");
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
            Decision::Transfer {
                client,
                server_passive,
            } => self.transfer(command, client, server_passive).await?,
            Decision::Quit => {
                self.lingering = None;
                let _ = self.forward(&command).await;
                return Ok(Next::Quit);
            }
        }
        // The listener lives exactly as long as the passive arrangement.
        if self.state.arrangement() != Arrangement::Passive {
            self.passive_listener = None;
        }
        Ok(Next::Continue)
    }

    /// Arranges the server's side of the next data connection.
    async fn prepare_server(
        &mut self,
        passive: bool,
    ) -> Result<Result<ServerData, String>, SessionError> {
        let v4 = self.server_ip.is_ipv4();
        if passive {
            let command = Command::new(if v4 { Verb::Pasv } else { Verb::Epsv }, Vec::new());
            self.send_to_server(&command).await?;
            let reply = self.server_reply(command.verb.label()).await?;
            let offered = match (reply.code, v4) {
                (227, _) => address::parse_pasv_reply(reply.text()).map(SocketAddr::V4),
                (229, _) => address::parse_epsv_reply(reply.text())
                    .map(|port| SocketAddr::new(self.server_ip, port)),
                _ => {
                    return Ok(Err(format!(
                        "server refused {}: {}",
                        command.verb.as_str(),
                        String::from_utf8_lossy(&reply.to_bytes()).trim_end()
                    )));
                }
            };
            let offered = match offered {
                Ok(addr) => addr,
                Err(e) => {
                    return Ok(Err(format!(
                        "server sent an invalid {} reply: {e}",
                        reply.code
                    )));
                }
            };
            let target = match policy::server_passive_target(
                offered,
                self.server_ip,
                self.config.server_passive,
            ) {
                Ok(target) => target,
                Err(refusal) => {
                    warn!(side = "server", offered = %offered, refusal = %refusal, "refused the server's passive address");
                    self.metrics.rejected(match refusal {
                        Refusal::LowPort(_) => Reject::LowPort,
                        _ => Reject::ServerPassiveAddress,
                    });
                    return Ok(Err(format!("server's passive address refused: {refusal}")));
                }
            };
            self.data_watches
                .extend(self.shared.flows.watch(target.port()));
            match data::connect_from(
                self.server_local.ip(),
                target,
                self.config.timeouts.data_connect,
            )
            .await
            {
                Ok(stream) => {
                    self.metrics.data_connection(Leg::Server, DataMode::Connect);
                    Ok(Ok(ServerData::Connected(stream)))
                }
                Err(e) => Ok(Err(format!("server data connection: {e}"))),
            }
        } else {
            let listener = match self.shared.active_ports.listen(self.server_local.ip()) {
                Ok(listener) => listener,
                Err(e) => {
                    if matches!(e, DataError::PoolExhausted { .. }) {
                        self.metrics.rejected(Reject::PortPoolExhausted);
                    }
                    return Ok(Err(format!("active listener toward the server: {e}")));
                }
            };
            let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
            self.data_watches.extend(self.shared.flows.watch(port));
            let ours = SocketAddr::new(self.server_local.ip(), port);
            let command = match ours {
                SocketAddr::V4(v4) => Command::new(Verb::Port, address::format_port(v4)),
                SocketAddr::V6(_) => Command::new(Verb::Eprt, address::format_eprt(ours)),
            };
            self.send_to_server(&command).await?;
            let reply = self.server_reply(command.verb.label()).await?;
            if !reply.is_success() {
                return Ok(Err(format!(
                    "server refused {}: {}",
                    command.verb.as_str(),
                    String::from_utf8_lossy(&reply.to_bytes()).trim_end()
                )));
            }
            Ok(Ok(ServerData::Listening(listener)))
        }
    }

    async fn transfer(
        &mut self,
        command: Command,
        client: Arrangement,
        passive: bool,
    ) -> Result<(), SessionError> {
        self.lingering = None;
        if client != Arrangement::Passive {
            self.data_watches.clear();
        }
        let client_data = match (client, self.passive_listener.take()) {
            (Arrangement::Active(target), _) => ClientData::Active(target),
            (Arrangement::Passive, Some(listener)) => ClientData::Passive(listener),
            _ => return self.reply(425, "Use PORT, EPRT, PASV or EPSV first").await,
        };
        let setup_started = Instant::now();
        let server_data = match self.prepare_server(passive).await? {
            Ok(server_data) => server_data,
            Err(reason) => {
                warn!(side = "server", reason = %reason, "data connection setup failed");
                self.metrics.upstream_error("data_setup");
                return self
                    .reply(425, &format!("Can't open data connection: {reason}"))
                    .await;
            }
        };
        self.send_to_server(&command).await?;
        let first = self.server_reply(command.verb.label()).await?;
        if !first.is_preliminary() {
            // E.g. 550 no such file: nothing to relay.
            return self.send(&first).await;
        }
        let timeout = self.config.timeouts.data_connect;
        let server_stream = match server_data {
            ServerData::Connected(stream) => Ok(stream),
            ServerData::Listening(listener) => {
                let metrics = self.metrics;
                let result = data::accept_from(&listener, self.server_ip, timeout, &mut |peer| {
                    warn!(side = "server", peer = %peer, "data connection from an unexpected address closed");
                    metrics.rejected(Reject::PortTheft);
                })
                .await;
                if result.is_ok() {
                    metrics.data_connection(Leg::Server, DataMode::Listen);
                }
                result
            }
        };
        let client_stream = match (&server_stream, client_data) {
            (Err(_), _) => None,
            (Ok(_), ClientData::Passive(listener)) => {
                let metrics = self.metrics;
                let result = data::accept_from(&listener, self.client_ip, timeout, &mut |peer| {
                    warn!(side = "client", peer = %peer, "data connection from an unexpected address closed");
                    metrics.rejected(Reject::PortTheft);
                })
                .await;
                if result.is_ok() {
                    metrics.data_connection(Leg::Client, DataMode::Listen);
                }
                Some(result)
            }
            (Ok(_), ClientData::Active(target)) => {
                self.data_watches
                    .extend(self.shared.flows.watch(target.port()));
                let result = data::connect_active(
                    &self.shared.active_ports,
                    self.client_local.ip(),
                    target,
                    timeout,
                )
                .await;
                if result.is_ok() {
                    self.metrics.data_connection(Leg::Client, DataMode::Connect);
                }
                Some(result)
            }
        };
        let (server_stream, client_stream) = match (server_stream, client_stream) {
            (Ok(server), Some(Ok(client))) => (server, client),
            (server, client) => {
                let reason = match (server, client) {
                    (Err(e), _) => format!("server data connection: {e}"),
                    (_, Some(Err(e))) => format!("client data connection: {e}"),
                    _ => "data connection failed".to_owned(),
                };
                warn!(reason = %reason, "data connection failed");
                // Only the client sees a failure; the server's own reply to
                // the cut transfer is consumed here.
                self.reply(425, &format!("Can't open data connection: {reason}"))
                    .await?;
                let _ = tokio::time::timeout(ABORT_REPLY_TIMEOUT, self.server_rx.next()).await;
                return Ok(());
            }
        };
        self.metrics.data_setup(setup_started.elapsed());
        self.send(&first).await?;
        self.relay_transfer(&command, client_stream, server_stream)
            .await
    }

    async fn relay_transfer(
        &mut self,
        command: &Command,
        client: TcpStream,
        server: TcpStream,
    ) -> Result<(), SessionError> {
        let register = |leg, stream: &TcpStream| match (stream.local_addr(), stream.peer_addr()) {
            (Ok(local), Ok(peer)) => Some(self.shared.legs.register(self.id, leg, local, peer)),
            _ => None,
        };
        let (Some(client_leg), Some(server_leg)) = (
            register(TcpLeg::ClientData, &client),
            register(TcpLeg::ServerData, &server),
        ) else {
            return self
                .reply(425, "Can't open data connection: it closed at once")
                .await;
        };
        let registrations = [client_leg, server_leg];
        let upload = command.verb.is_upload();
        let direction = if upload {
            Direction::ClientToServer
        } else {
            Direction::ServerToClient
        };
        let options = RelayOptions {
            mode: self.config.relay_mode,
            pipe_size: self.config.pipe_size,
            copy_buffer: self.config.copy_buffer,
            idle_timeout: self.config.timeouts.transfer_idle,
        };
        let started = Instant::now();
        let mut relay = relay::spawn(client, server, options);
        let mut final_reply: Option<Reply> = None;
        let mut data_flow: Option<Flow> = None;
        let reply_timeout = self.config.timeouts.reply;
        let mut waiting_since: Option<Instant> = None;
        while data_flow.is_none() || final_reply.is_none() {
            // Once one of the two has arrived, the other must come in time.
            let deadline = waiting_since
                .map_or(Instant::now() + Duration::from_secs(365 * 24 * 3600), |t| {
                    t + reply_timeout
                });
            tokio::select! {
                flow = relay.wait(direction), if data_flow.is_none() => {
                    data_flow = Some(flow);
                    waiting_since.get_or_insert_with(Instant::now);
                }
                reply = self.server_rx.next(), if final_reply.is_none() => {
                    let reply = reply_or_error(reply)?;
                    if reply.is_preliminary() {
                        self.send(&reply).await?;
                    } else {
                        final_reply = Some(reply);
                        waiting_since.get_or_insert_with(Instant::now);
                    }
                }
                item = self.client_rx.next(), if self.queued.len() < MAX_QUEUED_COMMANDS => match item {
                    Some(Ok(Ok(abort))) if abort.verb == Verb::Abor => {
                        self.metrics.command(&abort.verb);
                        return self.abort(relay, final_reply, upload, started, abort).await;
                    }
                    Some(Ok(other)) => self.queued.push_back(other),
                    Some(Err(e)) => return Err(SessionError::ClientIo(e)),
                    None => return Err(SessionError::ClientIo(io::ErrorKind::UnexpectedEof.into())),
                },
                () = tokio::time::sleep_until(deadline) => {
                    return Err(SessionError::ServerTimeout { command: command.verb.label(), timeout: reply_timeout });
                }
            }
        }
        let (Some(flow), Some(reply)) = (data_flow, final_reply) else {
            return Ok(());
        };
        let (bytes, relayed, relay_method) = match &flow {
            Flow::Finished { bytes, method } => {
                self.metrics.relay_used(*method);
                (*bytes, true, method.label())
            }
            Flow::Failed { bytes, error } => {
                warn!(error = %error, "data relay failed");
                (*bytes, false, "failed")
            }
            Flow::Running => (0, false, "failed"),
        };
        let result = if relayed && reply.is_success() {
            TransferResult::Ok
        } else {
            TransferResult::Failed
        };
        info!(
            command = command.verb.as_str(),
            direction = direction.label(),
            bytes,
            code = reply.code,
            relay = relay_method,
            took_ms = started.elapsed().as_millis() as u64,
            "transfer finished"
        );
        self.metrics
            .transfer_finished(upload, result, bytes, started.elapsed());
        if relayed {
            self.send(&reply).await?;
        } else {
            // The server may believe the transfer succeeded; the client did
            // not get every byte.
            let text = String::from_utf8_lossy(reply.text()).into_owned();
            let reply = if reply.is_success() {
                Reply::new(
                    426,
                    &format!("Connection closed; transfer aborted ({text})"),
                )
            } else {
                reply
            };
            self.send(&reply).await?;
        }
        self.lingering = Some((relay, registrations, std::mem::take(&mut self.data_watches)));
        Ok(())
    }

    /// ABOR during a transfer (RFC 959 §4.1.3): cut the data connections,
    /// pass ABOR on, relay the transfer's reply and the ABOR's reply.
    async fn abort(
        &mut self,
        relay: RelayHandle,
        final_reply: Option<Reply>,
        upload: bool,
        started: Instant,
        abort: Command,
    ) -> Result<(), SessionError> {
        let progress = relay.progress();
        drop(relay);
        let bytes = match (
            &progress.client_to_server,
            &progress.server_to_client,
            upload,
        ) {
            (Flow::Finished { bytes, .. } | Flow::Failed { bytes, .. }, _, true) => *bytes,
            (_, Flow::Finished { bytes, .. } | Flow::Failed { bytes, .. }, false) => *bytes,
            _ => 0,
        };
        self.metrics
            .transfer_finished(upload, TransferResult::Aborted, bytes, started.elapsed());
        info!("transfer aborted by the client");
        self.send_to_server(&abort).await?;
        let mut expected = 1;
        if let Some(reply) = final_reply {
            self.send(&reply).await?;
        } else {
            expected = 2;
        }
        for i in 0..expected {
            let timeout = if i == 0 {
                self.config.timeouts.reply
            } else {
                ABORT_REPLY_TIMEOUT
            };
            match tokio::time::timeout(timeout, self.server_rx.next()).await {
                Ok(reply) => {
                    let reply = reply_or_error(reply)?;
                    self.send(&reply).await?;
                }
                Err(_) if i > 0 => break,
                Err(_) => {
                    return Err(SessionError::ServerTimeout {
                        command: "ABOR",
                        timeout,
                    });
                }
            }
        }
        Ok(())
    }
}
