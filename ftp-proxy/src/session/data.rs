//! Data connection endpoints: port pools for the gateway's listeners,
//! accepting only from the expected peer (port theft protection), and
//! active connections from port 20 or the configured range.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::config::PortRange;

/// Why a data connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
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
pub struct PortPool {
    range: Option<PortRange>,
    next: AtomicUsize,
}

impl PortPool {
    /// A pool over `range` (None: ephemeral ports).
    pub fn new(range: Option<PortRange>) -> PortPool {
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

    fn exhausted(&self) -> DataError {
        let (low, high) = self.range.map_or((0, 0), |r| (r.low(), r.high()));
        DataError::PoolExhausted { low, high }
    }

    /// Binds a listener on `ip` with a port from the pool.
    ///
    /// # Errors
    /// [`DataError::PoolExhausted`] when every port is taken, or the socket error.
    pub fn listen(&self, ip: IpAddr) -> Result<TcpListener, DataError> {
        for port in self.ports() {
            let addr = SocketAddr::new(ip, port);
            let io = |operation, source| DataError::Io {
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
    pub async fn connect(
        &self,
        ip: IpAddr,
        target: SocketAddr,
        timeout: Duration,
    ) -> Result<TcpStream, DataError> {
        for port in self.ports() {
            let addr = SocketAddr::new(ip, port);
            let socket = socket_for(ip).map_err(|source| DataError::Io {
                operation: "socket",
                addr,
                source,
            })?;
            match socket.bind(addr) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(source) => {
                    return Err(DataError::Io {
                        operation: "bind",
                        addr,
                        source,
                    });
                }
            }
            match connect_socket(socket, target, timeout).await {
                // Same four-tuple still in use: try the next source port.
                Err(DataError::Io { source, .. })
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
) -> Result<TcpStream, DataError> {
    match tokio::time::timeout(timeout, socket.connect(target)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(DataError::Io {
            operation: "connect to",
            addr: target,
            source,
        }),
        Err(_) => Err(DataError::ConnectTimeout { target, timeout }),
    }
}

/// Connects from `(ip, 0)` to `target`.
///
/// # Errors
/// [`DataError`] when the connect fails or times out.
pub async fn connect_from(
    ip: IpAddr,
    target: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, DataError> {
    let addr = SocketAddr::new(ip, 0);
    let socket = socket_for(ip).map_err(|source| DataError::Io {
        operation: "socket",
        addr,
        source,
    })?;
    socket.bind(addr).map_err(|source| DataError::Io {
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
pub async fn connect_active(
    pool: &PortPool,
    ip: IpAddr,
    target: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, DataError> {
    let addr = SocketAddr::new(ip, 20);
    if let Ok(socket) = socket_for(ip)
        && socket.bind(addr).is_ok()
    {
        match connect_socket(socket, target, timeout).await {
            Err(DataError::Io { source, .. })
                if source.kind() == io::ErrorKind::AddrNotAvailable => {}
            other => return other,
        }
    }
    pool.connect(ip, target, timeout).await
}

/// Accepts the first connection that comes from `expected`; connections
/// from anywhere else are closed and reported through `on_intruder`.
///
/// # Errors
/// [`DataError::AcceptTimeout`] when the expected peer does not come in time.
pub async fn accept_from(
    listener: &TcpListener,
    expected: IpAddr,
    timeout: Duration,
    on_intruder: &mut (dyn FnMut(SocketAddr) + Send),
) -> Result<TcpStream, DataError> {
    let expected = expected.to_canonical();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, listener.accept()).await {
            Err(_) => return Err(DataError::AcceptTimeout { expected, timeout }),
            Ok(Ok((stream, peer))) if peer.ip().to_canonical() == expected => return Ok(stream),
            Ok(Ok((stream, peer))) => {
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                drop(stream);
                on_intruder(peer);
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
                return Err(DataError::Io {
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
            Err(DataError::PoolExhausted { .. })
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
            &mut |_| {},
        )
        .await;
        assert!(matches!(err, Err(DataError::AcceptTimeout { .. })));
    }
}
