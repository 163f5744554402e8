//! Opening a session's control connection to one server: TCP, the PROXY
//! header when configured, TLS as configured (implicit: from the first byte; explicit: `AUTH TLS` after
//! the banner, then `PBSZ 0` and the `PROT` level the session starts
//! with, [`initial_prot`]), and the banner, which the session relays to the
//! client once everything toward the server is in place (so a TLS failure
//! toward the server reaches the client as `421` with the reason).
//!
//! Every failure here happens before the client has seen anything of the
//! server, so the session may try another one (`super::Session::connect`).
//!
//! Not here: choosing the server (`crate::upstream::Pool`), failing over,
//! the commands of the session.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tracing::warn;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::protocol::reply::{DEFAULT_MAX_REPLY_LINE, DEFAULT_MAX_REPLY_LINES};
use crate::protocol::{Reply, ReplyCodec, Side};
use crate::tls::{self, ServerDataTls, ServerTlsMode, TlsError, TlsFailure};

use super::control::{ServerReader, ServerWriter};
use super::{CONTROL_BUFFER, SessionError, Shared, UpstreamFailure, reply_or_error};
use crate::config::Upstream;
use crate::upstream::connect::{self, GreetError, MAX_PRELIMINARY};
use crate::upstream::pool::ServerHandle;
use crate::upstream::routes::Target;

/// The control connection to the server, ready for the client's commands.
pub(super) struct ServerControl {
    pub(super) rx: FramedRead<ServerReader, ReplyCodec>,
    pub(super) tx: ServerWriter,
    pub(super) peer: SocketAddr,
    pub(super) local: SocketAddr,
    /// The server's banner (any 120 replies, then the final one), for the
    /// client.
    pub(super) banner: Vec<Reply>,
    /// The TLS configuration of this session toward the server (its
    /// resumption store), for the data connections; `None` without TLS.
    pub(super) tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
}

pub(super) fn codec() -> ReplyCodec {
    ReplyCodec::new(DEFAULT_MAX_REPLY_LINE, DEFAULT_MAX_REPLY_LINES)
}

async fn read_reply(
    rx: &mut FramedRead<ServerReader, ReplyCodec>,
    command: &'static str,
    timeout: Duration,
) -> Result<Reply, SessionError> {
    match tokio::time::timeout(timeout, rx.next()).await {
        Ok(reply) => reply_or_error(reply),
        Err(_) => Err(SessionError::ServerTimeout { command, timeout }),
    }
}

/// A reply as one line of text for an error message.
fn reply_text(reply: &Reply) -> String {
    String::from_utf8_lossy(&reply.to_bytes())
        .trim_end()
        .replace("\r\n", " / ")
}

/// Sends a command the gateway issues on its own and expects a 2xx (or
/// `want`) final reply.
pub(super) async fn negotiate(
    rx: &mut FramedRead<ServerReader, ReplyCodec>,
    tx: &mut ServerWriter,
    line: &'static str,
    want: u16,
    timeout: Duration,
) -> Result<(), SessionError> {
    tx.write_all(format!("{line}\r\n").as_bytes())
        .await
        .map_err(SessionError::ServerIo)?;
    loop {
        let reply = read_reply(rx, line, timeout).await?;
        if reply.is_preliminary() {
            continue;
        }
        let accepted = if want == 200 {
            reply.is_success()
        } else {
            reply.code == want
        };
        if accepted {
            return Ok(());
        }
        return Err(SessionError::ServerRefusedTls {
            command: line,
            reply: reply_text(&reply),
        });
    }
}

/// Where a session comes from: whom the balancing is for, and what the
/// PROXY header toward the server says.
#[derive(Debug, Clone, Copy)]
pub(super) struct Origin {
    /// The client: a trusted balancer's PROXY header's source, else the
    /// connection's peer.
    pub(super) client: SocketAddr,
    /// What the client connected to: the header's destination, else the
    /// gateway's listening address.
    pub(super) destination: SocketAddr,
}

/// Opens the session's server: picks one that is up among those `target`
/// allows; when it fails (unreachable, silent, refusing the session or
/// TLS), tells the pool and tries the next, each at most once. The client
/// has seen nothing of a server that failed.
///
/// # Errors
/// The last server's failure, or [`SessionError::NoServer`] when none
/// could be tried; counted in `upstream_errors_total`.
pub(super) async fn connect_any(
    shared: &Shared,
    origin: Origin,
    target: &Target,
    client_private: bool,
) -> Result<(ServerControl, ServerHandle), SessionError> {
    let config = &*shared.config;
    let header = config
        .server_proxy_protocol
        .header(origin.client, origin.destination);
    let own = shared.pool.own_addresses();
    let mut tried = Vec::new();
    let mut last = None;
    while let Some(server) = shared.pool.pick_for(origin.client.ip(), target, &tried) {
        let opened = open(
            config,
            &shared.metrics,
            server.address(),
            header.as_deref(),
            &own,
            client_private,
        );
        match opened.await {
            Ok(control) => {
                shared.pool.passive_success(&server);
                return Ok((control, server));
            }
            Err(error) => {
                warn!(side = "server", server = %server.name(), error = %error, "the server cannot take the session");
                shared.pool.passive_failure(&server, &error);
                tried.push(server.name().clone());
                last = Some(error);
            }
        }
    }
    shared.metrics.upstream_error(if tried.is_empty() {
        UpstreamFailure::NoServer
    } else {
        UpstreamFailure::Connect
    });
    Err(last.unwrap_or(SessionError::NoServer))
}

/// The TLS handshake on the control connection, counted; its halves.
async fn secure(
    stream: TcpStream,
    config: &Arc<ClientConfig>,
    name: &ServerName<'static>,
    timeout: Duration,
    metrics: &Metrics,
) -> Result<(FramedRead<ServerReader, ReplyCodec>, ServerWriter), SessionError> {
    let (tls, handshake) = tls::connect(Arc::clone(config), name.clone(), stream, timeout)
        .await
        .inspect_err(|error| metrics.tls_error(error))?;
    metrics.tls_handshake(Side::Server, &handshake);
    let (read, write) = tokio::io::split(tls);
    Ok((
        FramedRead::with_capacity(ServerReader::Tls(read), codec(), CONTROL_BUFFER),
        ServerWriter::Tls(write),
    ))
}

/// The `PROT` command that gives the server the data protection the
/// session starts with: `required` protects every server data
/// connection; `clear` protects none; `client` protects them as the
/// client's data connections are (`client_private`: an implicit client's
/// are from the start). Protection is always said. Clear is said to an
/// implicit server only: without `PROT` an explicit server's data
/// connections are clear (RFC 4217 §9), and a server that requires
/// protected data answers `PROT C` with `534` (ProFTPD), which would end
/// a session whose client may still ask for `PROT P`; an implicit
/// server's are protected unless it is told otherwise (vsftpd, ProFTPD),
/// so it would start TLS on data connections the gateway opens in clear.
pub(super) fn initial_prot(
    mode: ServerTlsMode,
    data: ServerDataTls,
    client_private: bool,
) -> Option<&'static str> {
    let private = match data {
        ServerDataTls::Required => true,
        ServerDataTls::Clear => false,
        ServerDataTls::Client => client_private,
    };
    match (mode, private) {
        (ServerTlsMode::Off, _) => None,
        (_, true) => Some("PROT P"),
        (ServerTlsMode::Implicit, false) => Some("PROT C"),
        (ServerTlsMode::Explicit, false) => None,
    }
}

/// Connects to `address`, sends `proxy_header` first when given,
/// negotiates TLS as configured (with the data protection of
/// [`initial_prot`]), and reads the banner: any `120` replies, then a
/// `220`.
///
/// # Errors
/// [`SessionError`], all the server's: unreachable, silent, refusing the
/// session (a `421` banner), refusing TLS or the data protection, or a
/// failed handshake (certificate problems included).
pub(super) async fn open(
    config: &Config,
    metrics: &Metrics,
    address: &Upstream,
    proxy_header: Option<&[u8]>,
    own: &[SocketAddr],
    client_private: bool,
) -> Result<ServerControl, SessionError> {
    let started = Instant::now();
    let timeout = config.timeouts.connect;
    let unreachable = |source| SessionError::Unreachable {
        upstream: address.authority(),
        source,
    };
    let mut stream = match tokio::time::timeout(timeout, connect::connect(address)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Err(unreachable(error)),
        Err(_) => return Err(unreachable(GreetError::Timeout(timeout))),
    };
    metrics.upstream_connected(started.elapsed());
    let (peer, local) = match (stream.peer_addr(), stream.local_addr()) {
        (Ok(peer), Ok(local)) => (peer, local),
        (Err(e), _) | (_, Err(e)) => return Err(SessionError::ServerIo(e)),
    };
    if connect::is_own_listener(own, peer, local) {
        return Err(unreachable(GreetError::Loop(peer)));
    }
    if let Some(header) = proxy_header {
        stream
            .write_all(header)
            .await
            .map_err(|e| unreachable(GreetError::Send(e)))?;
    }
    let server = &config.tls.server;
    let tls = match (server.mode, &server.client) {
        (ServerTlsMode::Off, _) | (_, None) => None,
        (_, Some(client)) => {
            let name = tls::server_name(server.name_for(address)).map_err(|detail| {
                SessionError::Tls(TlsError {
                    side: Side::Server,
                    failure: TlsFailure::CertificateName,
                    detail,
                })
            })?;
            Some((client.session(), name))
        }
    };
    let (mut rx, mut tx) = match (&tls, server.mode) {
        (Some((session, name)), ServerTlsMode::Implicit) => {
            secure(stream, session, name, timeout, metrics).await?
        }
        _ => {
            let (read, write) = stream.into_split();
            (
                FramedRead::with_capacity(ServerReader::Plain(read), codec(), CONTROL_BUFFER),
                ServerWriter::Plain(write),
            )
        }
    };
    let mut banner = Vec::new();
    loop {
        let reply = read_reply(&mut rx, "banner", timeout).await?;
        match reply.code {
            120 if banner.len() < MAX_PRELIMINARY => banner.push(reply),
            120 => return Err(unreachable(GreetError::Stalling)),
            220 => {
                banner.push(reply);
                break;
            }
            _ => {
                return Err(SessionError::ServerRefusedSession {
                    upstream: address.authority(),
                    reply: reply_text(&reply),
                });
            }
        }
    }
    if let Some((session, name)) = &tls {
        let reply_timeout = config.timeouts.reply;
        if server.mode == ServerTlsMode::Explicit {
            negotiate(&mut rx, &mut tx, "AUTH TLS", 234, reply_timeout).await?;
            // Nothing may follow 234 in clear text (a server that pipelines
            // plain replies after it is broken or hostile).
            if !rx.read_buffer().is_empty() {
                return Err(SessionError::ServerRefusedTls {
                    command: "AUTH TLS",
                    reply: "clear text after 234".to_owned(),
                });
            }
            let read = std::mem::replace(rx.get_mut(), ServerReader::Closed);
            let write = std::mem::replace(&mut tx, ServerWriter::Closed);
            let stream = match (read, write) {
                (ServerReader::Plain(read), ServerWriter::Plain(write)) => read
                    .reunite(write)
                    .map_err(|e| SessionError::ServerIo(std::io::Error::other(e.to_string())))?,
                _ => {
                    return Err(SessionError::ServerIo(std::io::Error::other(
                        "control connection already upgraded",
                    )));
                }
            };
            (rx, tx) = secure(stream, session, name, timeout, metrics).await?;
        }
        // RFC 4217 §8-9: PBSZ 0 before PROT; then the level the session
        // starts with (a client's later PROT is passed on with
        // `--server-data-tls client`, see `state`).
        negotiate(&mut rx, &mut tx, "PBSZ 0", 200, reply_timeout).await?;
        if let Some(prot) = initial_prot(server.mode, server.data, client_private) {
            negotiate(&mut rx, &mut tx, prot, 200, reply_timeout).await?;
        }
    }
    Ok(ServerControl {
        rx,
        tx,
        peer,
        local,
        banner,
        tls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_starts_with_the_protection_the_session_means() {
        use ServerDataTls::{Clear, Client, Required};
        use ServerTlsMode::{Explicit, Implicit, Off};
        // (mode, policy, client's data protected) -> PROT sent
        let table = [
            (Off, Required, false, None),
            (Explicit, Required, false, Some("PROT P")),
            (Implicit, Required, false, Some("PROT P")),
            // Clear is an explicit server's default (and saying it would
            // end the session with a server that requires protection);
            // an implicit server's is protection.
            (Explicit, Clear, true, None),
            (Implicit, Clear, true, Some("PROT C")),
            (Explicit, Client, false, None),
            (Explicit, Client, true, Some("PROT P")),
            (Implicit, Client, false, Some("PROT C")),
            (Implicit, Client, true, Some("PROT P")),
        ];
        for (mode, data, client_private, want) in table {
            assert_eq!(
                initial_prot(mode, data, client_private),
                want,
                "{mode:?} {data:?} {client_private}"
            );
        }
    }
}
