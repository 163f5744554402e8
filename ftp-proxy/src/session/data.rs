//! Data connection endpoints: port pools for the gateway's listeners,
//! accepting only from the expected peer (port theft protection), active
//! connections from port 20 or the configured range, and the typed errors
//! of all of it ([`DataError`]: which side, what kind).
//!
//! Not here: when a data connection is opened and what its failure means
//! for the transfer (`session::transfer`).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::config::PortRange;
use crate::protocol::Side;
use crate::protocol::address::AddressError;
use crate::protocol::policy::Refusal;
use crate::upstream::proxy_protocol::TrustedProxies;

/// Who opened a data connection (`data_connections_total{mode}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DataMode {
    /// The gateway listened (PASV/EPSV toward the client, PORT/EPRT
    /// toward the server).
    Listen,
    /// The gateway connected.
    Connect,
}

impl DataMode {
    /// Both modes.
    pub(crate) const ALL: [DataMode; 2] = [DataMode::Listen, DataMode::Connect];

    /// The metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            DataMode::Listen => "listen",
            DataMode::Connect => "connect",
        }
    }
}

/// Why a data connection could not be set up, on one side.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DataFailure {
    /// Every port of the range is in use.
    #[error("no free port in {low}-{high}")]
    PoolExhausted {
        /// First port of the range.
        low: u16,
        /// Last port.
        high: u16,
    },
    /// The expected peer did not connect in time.
    #[error("no data connection from {expected} within {timeout:?}")]
    AcceptTimeout {
        /// The address the connection had to come from.
        expected: IpAddr,
        /// The time waited.
        timeout: Duration,
    },
    /// Connecting to the peer did not succeed in time.
    #[error("connecting to {target} timed out after {timeout:?}")]
    ConnectTimeout {
        /// Where.
        target: SocketAddr,
        /// The time waited.
        timeout: Duration,
    },
    /// The peer refused or reset the connection.
    #[error("{target} refused the connection: {source}")]
    Refused {
        /// Where.
        target: SocketAddr,
        /// The kernel's error.
        source: io::Error,
    },
    /// The address the peer named is refused by the gateway's policy.
    #[error("address {offered} refused: {refusal}")]
    Policy {
        /// What the peer named.
        offered: SocketAddr,
        /// Why it is refused.
        refusal: Refusal,
    },
    /// The server answered the gateway's PASV/EPSV/PORT/EPRT with an error.
    #[error("the server refused {command}: {reply}")]
    ServerRefused {
        /// The command.
        command: &'static str,
        /// The server's reply, as text.
        reply: String,
    },
    /// The server's 227/229 could not be parsed.
    #[error("the server sent an invalid {code} reply: {error}")]
    InvalidReply {
        /// The reply code.
        code: u16,
        /// What is wrong with it.
        error: AddressError,
    },
    /// The TLS handshake on the data connection failed, or it did not
    /// resume the control connection's session when that is required.
    #[error("{0}")]
    Tls(crate::tls::TlsError),
    /// A socket call failed.
    #[error("{operation} {addr}: {source}")]
    Io {
        /// What was being done.
        operation: &'static str,
        /// On which address.
        addr: SocketAddr,
        /// The error.
        source: io::Error,
    },
}

/// The kind of a [`DataFailure`] (`data_errors_total{kind}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DataErrorKind {
    /// No free port in a range.
    PoolExhausted,
    /// The peer did not connect, or did not accept, in time.
    Timeout,
    /// The peer refused or reset the connection.
    Refused,
    /// The gateway's address policy refused the peer's address.
    Policy,
    /// The server refused the gateway's data command, or answered it with
    /// a malformed reply.
    ServerReply,
    /// TLS on the data connection failed (or did not resume).
    Tls,
    /// Another socket error.
    Io,
}

impl DataErrorKind {
    /// Every kind.
    pub(crate) const ALL: [DataErrorKind; 7] = [
        DataErrorKind::PoolExhausted,
        DataErrorKind::Timeout,
        DataErrorKind::Refused,
        DataErrorKind::Policy,
        DataErrorKind::ServerReply,
        DataErrorKind::Tls,
        DataErrorKind::Io,
    ];

    /// The metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            DataErrorKind::PoolExhausted => "pool_exhausted",
            DataErrorKind::Timeout => "timeout",
            DataErrorKind::Refused => "refused",
            DataErrorKind::Policy => "policy",
            DataErrorKind::ServerReply => "server_reply",
            DataErrorKind::Tls => "tls",
            DataErrorKind::Io => "io",
        }
    }
}

impl DataFailure {
    /// Its kind.
    pub(crate) fn kind(&self) -> DataErrorKind {
        match self {
            DataFailure::PoolExhausted { .. } => DataErrorKind::PoolExhausted,
            DataFailure::AcceptTimeout { .. } | DataFailure::ConnectTimeout { .. } => {
                DataErrorKind::Timeout
            }
            DataFailure::Refused { .. } => DataErrorKind::Refused,
            DataFailure::Policy { .. } => DataErrorKind::Policy,
            DataFailure::ServerRefused { .. } | DataFailure::InvalidReply { .. } => {
                DataErrorKind::ServerReply
            }
            DataFailure::Tls(_) => DataErrorKind::Tls,
            DataFailure::Io { .. } => DataErrorKind::Io,
        }
    }

    /// The failure on `side`.
    pub(crate) fn on(self, side: Side) -> DataError {
        DataError {
            side,
            kind: self.kind(),
            cause: self,
        }
    }
}

/// A data connection that could not be set up: the side decides the log
/// level and the metric label, the kind the metric's other label.
#[derive(Debug, thiserror::Error)]
#[error("{} data connection: {cause}", side.label())]
pub(crate) struct DataError {
    /// Whose leg failed.
    pub(crate) side: Side,
    /// Its kind.
    pub(crate) kind: DataErrorKind,
    /// What happened.
    #[source]
    pub(crate) cause: DataFailure,
}

fn socket_for(ip: IpAddr) -> io::Result<TcpSocket> {
    let socket = if ip.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    Ok(socket)
}

/// A range of ports the gateway binds its data sockets in, or any
/// ephemeral port when no range is configured. Ports are tried round-robin
/// so that a freed port is not reused at once.
#[derive(Debug)]
pub(crate) struct PortPool {
    range: Option<PortRange>,
    next: AtomicUsize,
}

impl PortPool {
    /// A pool over `range` (None: ephemeral ports).
    pub(crate) fn new(range: Option<PortRange>) -> PortPool {
        PortPool {
            range,
            next: AtomicUsize::new(0),
        }
    }

    fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        let (low, len) = self.range.map_or((0, 1), |r| (r.low(), r.len()));
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..len).map(move |i| {
            let offset = u16::try_from((start + i) % len).unwrap_or_default();
            low.saturating_add(offset)
        })
    }

    fn exhausted(&self) -> DataFailure {
        let (low, high) = self.range.map_or((0, 0), |r| (r.low(), r.high()));
        DataFailure::PoolExhausted { low, high }
    }

    /// Binds a listener on `ip` with a port from the pool.
    ///
    /// # Errors
    /// [`DataFailure::PoolExhausted`] when every port is taken, or the socket error.
    pub(crate) fn listen(&self, ip: IpAddr) -> Result<TcpListener, DataFailure> {
        for port in self.ports() {
            let addr = SocketAddr::new(ip, port);
            let io = |operation, source| DataFailure::Io {
                operation,
                addr,
                source,
            };
            let socket = socket_for(ip).map_err(|e| io("socket", e))?;
            match socket.bind(addr) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(io("bind", e)),
            }
            match socket.listen(8) {
                Ok(listener) => return Ok(listener),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(io("listen", e)),
            }
        }
        Err(self.exhausted())
    }

    /// Connects from `ip` with a source port from the pool to `target`.
    ///
    /// # Errors
    /// [`DataError`] when no port is free, the connect fails or times out.
    pub(crate) async fn connect(
        &self,
        ip: IpAddr,
        target: SocketAddr,
        timeout: Duration,
    ) -> Result<TcpStream, DataFailure> {
        for port in self.ports() {
            let addr = SocketAddr::new(ip, port);
            let socket = socket_for(ip).map_err(|source| DataFailure::Io {
                operation: "socket",
                addr,
                source,
            })?;
            match socket.bind(addr) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(source) => {
                    return Err(DataFailure::Io {
                        operation: "bind",
                        addr,
                        source,
                    });
                }
            }
            match connect_socket(socket, target, timeout).await {
                // Same four-tuple still in use: try the next source port.
                Err(DataFailure::Io { source, .. })
                    if source.kind() == io::ErrorKind::AddrNotAvailable =>
                {
                    continue;
                }
                other => return other,
            }
        }
        Err(self.exhausted())
    }
}

async fn connect_socket(
    socket: TcpSocket,
    target: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, DataFailure> {
    match tokio::time::timeout(timeout, socket.connect(target)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source))
            if matches!(
                source.kind(),
                io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::HostUnreachable
                    | io::ErrorKind::NetworkUnreachable
            ) =>
        {
            Err(DataFailure::Refused { target, source })
        }
        Ok(Err(source)) => Err(DataFailure::Io {
            operation: "connect to",
            addr: target,
            source,
        }),
        Err(_) => Err(DataFailure::ConnectTimeout { target, timeout }),
    }
}

/// Connects from `(ip, 0)` to `target`.
///
/// # Errors
/// [`DataError`] when the connect fails or times out.
pub(crate) async fn connect_from(
    ip: IpAddr,
    target: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, DataFailure> {
    let addr = SocketAddr::new(ip, 0);
    let socket = socket_for(ip).map_err(|source| DataFailure::Io {
        operation: "socket",
        addr,
        source,
    })?;
    socket.bind(addr).map_err(|source| DataFailure::Io {
        operation: "bind",
        addr,
        source,
    })?;
    connect_socket(socket, target, timeout).await
}

/// Connects to a client for active mode: from port 20 of `ip` (RFC 959
/// §3.2, as in the reference session) when the gateway may bind it, else
/// from the pool.
///
/// # Errors
/// [`DataError`] when the connect fails or times out.
pub(crate) async fn connect_active(
    pool: &PortPool,
    ip: IpAddr,
    target: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, DataFailure> {
    let addr = SocketAddr::new(ip, 20);
    if let Ok(socket) = socket_for(ip)
        && socket.bind(addr).is_ok()
    {
        match connect_socket(socket, target, timeout).await {
            Err(DataFailure::Io { source, .. })
                if source.kind() == io::ErrorKind::AddrNotAvailable => {}
            other => return other,
        }
    }
    pool.connect(ip, target, timeout).await
}

/// Accepts the first connection that comes from `expected`; connections
/// from anywhere else are closed and reported through `on_intruder`.
///
/// A connection from one of `balancers` (a load balancer that forwards the
/// passive ports too, and cannot keep the client's address) must start
/// with a PROXY header, whose source is then the one compared; a
/// connection from a balancer without one is refused like an intruder.
///
/// # Errors
/// [`DataFailure::AcceptTimeout`] when the expected peer does not come in time.
pub(crate) async fn accept_from(
    listener: &TcpListener,
    expected: IpAddr,
    timeout: Duration,
    balancers: Option<&TrustedProxies>,
    on_intruder: &mut (dyn FnMut(SocketAddr) + Send),
) -> Result<TcpStream, DataFailure> {
    let expected = expected.to_canonical();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, listener.accept()).await {
            Err(_) => return Err(DataFailure::AcceptTimeout { expected, timeout }),
            Ok(Ok((mut stream, peer))) => {
                let source = match balancers.filter(|b| b.trusts(peer.ip())) {
                    None => Some(peer),
                    Some(balancer) => {
                        match tokio::time::timeout_at(deadline, balancer.accept(&mut stream, peer))
                            .await
                        {
                            Ok(Ok(Some(proxied))) => Some(proxied.source),
                            _ => None,
                        }
                    }
                };
                if let Some(source) = source
                    && source.ip().to_canonical() == expected
                {
                    return Ok(stream);
                }
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                drop(stream);
                on_intruder(source.unwrap_or(peer));
            }
            Ok(Err(source)) => {
                let addr = listener
                    .local_addr()
                    .unwrap_or_else(|_| SocketAddr::new(expected, 0));
                // Transient accept failures (e.g. the connection was reset
                // before we took it) must not end the wait.
                if matches!(
                    source.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                ) {
                    continue;
                }
                return Err(DataFailure::Io {
                    operation: "accept on",
                    addr,
                    source,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pool_hands_out_each_port_then_reports_exhaustion() {
        // Find three consecutive free ports.
        let base = loop {
            let probe = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if probe < 65000
                && (1..3).all(|i| std::net::TcpListener::bind(("127.0.0.1", probe + i)).is_ok())
            {
                break probe;
            }
        };
        let pool = PortPool::new(PortRange::new(base, base + 2));
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let held: Vec<_> = (0..3).map(|_| pool.listen(ip).unwrap()).collect();
        let mut ports: Vec<u16> = held
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        ports.sort();
        assert_eq!(ports, vec![base, base + 1, base + 2]);
        assert!(matches!(
            pool.listen(ip),
            Err(DataFailure::PoolExhausted { .. })
        ));
        drop(held);
        assert!(
            pool.listen(ip).is_ok(),
            "the pool recovers once ports are released"
        );
    }

    #[tokio::test]
    async fn accept_from_closes_intruders() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // The "intruder" connects from 127.0.0.2, the expected peer from 127.0.0.1.
        let intruder = connect_from("127.0.0.2".parse().unwrap(), addr, Duration::from_secs(1))
            .await
            .unwrap();
        let mut seen = Vec::new();
        let mut record = |p| seen.push(p);
        let record: &mut (dyn FnMut(SocketAddr) + Send) = &mut record;
        let accept = accept_from(
            &listener,
            "127.0.0.1".parse().unwrap(),
            Duration::from_secs(2),
            None,
            record,
        );
        let good = connect_from("127.0.0.1".parse().unwrap(), addr, Duration::from_secs(1));
        let (accepted, good) = tokio::join!(accept, good);
        let accepted = accepted.unwrap();
        assert_eq!(
            accepted.peer_addr().unwrap(),
            good.unwrap().local_addr().unwrap()
        );
        assert_eq!(seen, vec![intruder.local_addr().unwrap()]);
    }

    #[tokio::test]
    async fn accept_from_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let err = accept_from(
            &listener,
            "127.0.0.1".parse().unwrap(),
            Duration::from_millis(50),
            None,
            &mut |_| {},
        )
        .await;
        assert!(matches!(err, Err(DataFailure::AcceptTimeout { .. })));
    }

    /// Through a balancer (127.0.0.2): the PROXY header's source is what
    /// counts; a balancer's connection for someone else, or without a
    /// header, is an intruder's.
    #[tokio::test]
    async fn accept_from_takes_the_client_from_a_balancers_header() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let balancers = TrustedProxies::new(
            vec!["127.0.0.2/32".parse().unwrap()],
            Duration::from_secs(1),
        );
        let balancer = "127.0.0.2".parse().unwrap();
        let mut headerless = connect_from(balancer, addr, Duration::from_secs(1))
            .await
            .unwrap();
        headerless.write_all(b"data").await.unwrap();
        let mut thief = connect_from(balancer, addr, Duration::from_secs(1))
            .await
            .unwrap();
        thief
            .write_all(b"PROXY TCP4 198.51.100.9 127.0.0.1 5000 6000\r\n")
            .await
            .unwrap();
        let mut client = connect_from(balancer, addr, Duration::from_secs(1))
            .await
            .unwrap();
        client
            .write_all(b"PROXY TCP4 203.0.113.7 127.0.0.1 5000 6000\r\nbytes")
            .await
            .unwrap();
        let mut seen = Vec::new();
        let mut record = |p: SocketAddr| seen.push(p.ip());
        let mut accepted = accept_from(
            &listener,
            "203.0.113.7".parse().unwrap(),
            Duration::from_secs(5),
            Some(&balancers),
            &mut record,
        )
        .await
        .unwrap();
        let mut first = [0u8; 5];
        accepted.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"bytes", "the header is consumed, nothing more");
        let balancer_ip: IpAddr = balancer;
        let thief_ip: IpAddr = "198.51.100.9".parse().unwrap();
        assert_eq!(seen, vec![balancer_ip, thief_ip]);
    }
}
