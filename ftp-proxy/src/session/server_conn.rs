//! Opening a session's control connection to the server: TCP, TLS as
//! configured (implicit: from the first byte; explicit: `AUTH TLS` after
//! the banner, then `PBSZ 0` and, when server data connections are always
//! protected, `PROT P`), and the banner, which the session relays to the
//! client once everything toward the server is in place (so a TLS failure
//! toward the server reaches the client as `421` with the reason).
//!
//! Not here: choosing the server (the configuration names it), the
//! commands of the session.

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

use crate::config::Config;
use crate::metrics::Metrics;
use crate::protocol::reply::{DEFAULT_MAX_REPLY_LINE, DEFAULT_MAX_REPLY_LINES};
use crate::protocol::{Reply, ReplyCodec, Side};
use crate::tls::{self, ServerDataTls, ServerTlsMode, TlsError, TlsFailure};

use super::control::{ServerReader, ServerWriter};
use super::{CONTROL_BUFFER, ConnectError, SessionError, reply_or_error};

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

async fn connect_tcp(config: &Config) -> Result<TcpStream, ConnectError> {
    let authority = config.upstream.authority();
    let addrs = tokio::net::lookup_host(&authority)
        .await
        .map_err(|source| ConnectError::Resolve {
            authority: authority.clone(),
            source,
        })?;
    let mut last = ConnectError::NoAddress {
        authority: authority.clone(),
    };
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(source) => last = ConnectError::Connect { addr, source },
        }
    }
    Err(last)
}

fn codec() -> ReplyCodec {
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

/// Sends a command the gateway issues on its own and expects a 2xx (or
/// `want`) final reply.
async fn negotiate(
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
            reply: String::from_utf8_lossy(&reply.to_bytes())
                .trim_end()
                .to_owned(),
        });
    }
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

/// Connects, negotiates TLS as configured, and reads the banner.
///
/// # Errors
/// [`SessionError`]: the server unreachable, silent, refusing TLS, or a
/// failed handshake (certificate problems included).
pub(super) async fn open(
    config: &Config,
    metrics: &Metrics,
) -> Result<ServerControl, SessionError> {
    let started = Instant::now();
    let timeout = config.timeouts.connect;
    let unreachable = |source| SessionError::Unreachable {
        upstream: config.upstream.authority(),
        source,
    };
    let stream = match tokio::time::timeout(timeout, connect_tcp(config)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Err(unreachable(error)),
        Err(_) => return Err(unreachable(ConnectError::Timeout(timeout))),
    };
    metrics.upstream_connected(started.elapsed());
    let (peer, local) = match (stream.peer_addr(), stream.local_addr()) {
        (Ok(peer), Ok(local)) => (peer, local),
        (Err(e), _) | (_, Err(e)) => return Err(SessionError::ServerIo(e)),
    };
    // Control replies are small and latency-bound: no Nagle.
    let _ = stream.set_nodelay(true);
    let server = &config.tls.server;
    let tls = match (server.mode, &server.client) {
        (ServerTlsMode::Off, _) | (_, None) => None,
        (_, Some(client)) => {
            let name = tls::server_name(&server.name).map_err(|detail| {
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
        let more = reply.code == 120;
        banner.push(reply);
        if !more {
            break;
        }
    }
    let ready = banner.last().is_some_and(|r| r.code == 220);
    if let Some((session, name)) = &tls
        && ready
    {
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
        // RFC 4217 §8-9: PBSZ 0 before PROT; server data connections are
        // protected from the start when so configured (a client's PROT
        // is passed on otherwise, see `state`).
        negotiate(&mut rx, &mut tx, "PBSZ 0", 200, reply_timeout).await?;
        if server.data == ServerDataTls::Required {
            negotiate(&mut rx, &mut tx, "PROT P", 200, reply_timeout).await?;
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
