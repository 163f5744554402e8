//! Reaching a server: resolve its name, connect, send a PROXY header when
//! asked, and read its greeting (any `120` lines, then the `220`), all
//! within one deadline.
//!
//! One attempt at one server. The health checks use it, and so can the
//! session: every [`GreetError`] is the server's failure (a passive failure
//! for [`super::Pool::passive_failure`]), and since nothing has reached the
//! client yet, another server may be tried. What the server sent after its
//! banner stays buffered in [`Greeted::replies`].
//!
//! Not here: which server to try ([`super::Pool`]), relaying the banner.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;

use crate::config::Upstream;
use crate::protocol::{Reply, ReplyCodec, ReplyError};

/// `120` replies taken before the `220`; more is a server stalling.
pub const MAX_PRELIMINARY: usize = 16;

/// Why a server could not be used.
#[derive(Debug, thiserror::Error)]
pub enum GreetError {
    /// The name did not resolve.
    #[error("cannot resolve {authority}: {source}")]
    Resolve {
        /// What was resolved.
        authority: String,
        /// The resolver's error.
        source: io::Error,
    },
    /// The name resolved to nothing.
    #[error("{0} resolved to no address")]
    NoAddress(String),
    /// Connecting failed (the last address tried).
    #[error("connect to {addr}: {source}")]
    Connect {
        /// The address.
        addr: SocketAddr,
        /// The kernel's error.
        source: io::Error,
    },
    /// Writing the PROXY header failed.
    #[error("sending the PROXY header: {0}")]
    Send(#[source] io::Error),
    /// No banner in time (connected or not).
    #[error("no banner within {0:?}")]
    Timeout(Duration),
    /// The server closed before its banner.
    #[error("closed before its banner")]
    Closed,
    /// The server greeted with something else than 220 (421: it refuses
    /// sessions).
    #[error("answered {0} instead of 220")]
    Refused(u16),
    /// More than [`MAX_PRELIMINARY`] `120` replies.
    #[error("more than {MAX_PRELIMINARY} 120 replies before the banner")]
    Stalling,
    /// The banner was not a valid reply.
    #[error("invalid banner: {0}")]
    Protocol(#[source] ReplyError),
    /// The address is one of this gateway's own listeners: a loop.
    #[error("{0} is this gateway's own listener (a loop)")]
    Loop(SocketAddr),
}

/// Whether a connection from `local` to `peer` reached one of `own`, the
/// gateway's listening addresses: the same address, or a wildcard
/// listener's port on an address of this host (a connection to an address
/// of its own host leaves from that same address).
pub fn is_own_listener(own: &[SocketAddr], peer: SocketAddr, local: SocketAddr) -> bool {
    let peer_ip = peer.ip().to_canonical();
    own.iter().any(|listener| {
        listener.port() == peer.port()
            && (listener.ip().to_canonical() == peer_ip
                || (listener.ip().is_unspecified() && peer_ip == local.ip().to_canonical()))
    })
}

/// A server that greeted.
#[derive(Debug)]
pub struct Greeted {
    /// The server's replies from here on (what followed the banner is
    /// buffered here).
    pub replies: FramedRead<OwnedReadHalf, ReplyCodec>,
    /// Toward the server.
    pub writer: OwnedWriteHalf,
    /// The `120` replies that came before the banner, to relay with it.
    pub preliminary: Vec<Reply>,
    /// The `220`.
    pub banner: Reply,
    /// The server's address (as connected to).
    pub peer: SocketAddr,
    /// The gateway's end of the connection.
    pub local: SocketAddr,
}

/// Connects to `address` (each address it resolves to, in turn), writes
/// `header` first when given, and reads until the `220`, with `codec`'s
/// bounds and a read buffer of `capacity` bytes, everything within
/// `timeout`.
///
/// # Errors
/// [`GreetError`]: the server is unusable for this session.
/// Cancel-safe (dropping it drops the connection).
/// `own`: the gateway's listening addresses; reaching one of them is
/// [`GreetError::Loop`].
pub async fn greet(
    address: &Upstream,
    header: Option<&[u8]>,
    timeout: Duration,
    codec: ReplyCodec,
    capacity: usize,
    own: &[SocketAddr],
) -> Result<Greeted, GreetError> {
    let attempt = async {
        let mut stream = connect(address).await?;
        let (peer, local) = match (stream.peer_addr(), stream.local_addr()) {
            (Ok(peer), Ok(local)) => (peer, local),
            (Err(source), _) | (_, Err(source)) => {
                return Err(GreetError::Connect {
                    addr: peer_or_unspecified(&stream),
                    source,
                });
            }
        };
        if is_own_listener(own, peer, local) {
            return Err(GreetError::Loop(peer));
        }
        if let Some(header) = header {
            stream.write_all(header).await.map_err(GreetError::Send)?;
        }
        let (read, writer) = stream.into_split();
        let mut replies = FramedRead::with_capacity(read, codec, capacity);
        let mut preliminary = Vec::new();
        loop {
            match replies.next().await {
                None => return Err(GreetError::Closed),
                Some(Err(e)) => return Err(GreetError::Protocol(e)),
                Some(Ok(reply)) if reply.code == 120 => {
                    if preliminary.len() == MAX_PRELIMINARY {
                        return Err(GreetError::Stalling);
                    }
                    preliminary.push(reply);
                }
                Some(Ok(reply)) if reply.code == 220 => {
                    return Ok(Greeted {
                        replies,
                        writer,
                        preliminary,
                        banner: reply,
                        peer,
                        local,
                    });
                }
                Some(Ok(reply)) => return Err(GreetError::Refused(reply.code)),
            }
        }
    };
    tokio::time::timeout_at(Instant::now() + timeout, attempt)
        .await
        .map_err(|_| GreetError::Timeout(timeout))?
}

fn peer_or_unspecified(stream: &TcpStream) -> SocketAddr {
    stream
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// Resolves `address` and connects to each address it names in turn
/// (no deadline: the caller sets one).
///
/// # Errors
/// [`GreetError::Resolve`], [`GreetError::NoAddress`] or the last
/// [`GreetError::Connect`].
pub(crate) async fn connect(address: &Upstream) -> Result<TcpStream, GreetError> {
    let authority = address.authority();
    let addrs = tokio::net::lookup_host(authority.clone())
        .await
        .map_err(|source| GreetError::Resolve {
            authority: authority.clone(),
            source,
        })?;
    let mut last = GreetError::NoAddress(authority);
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                // Control replies are small and latency-bound: no Nagle.
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(source) => last = GreetError::Connect { addr, source },
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A server that reads `expect` bytes (the header), then sends `say`
    /// (or nothing, and holds the connection); the bytes it read.
    async fn server(
        expect: usize,
        say: &'static [u8],
    ) -> (Upstream, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut got = vec![0u8; expect];
            stream.read_exact(&mut got).await.unwrap();
            if say.is_empty() {
                tokio::time::sleep(Duration::from_secs(30)).await;
            } else {
                stream.write_all(say).await.unwrap();
            }
            got
        });
        (
            Upstream {
                host: "127.0.0.1".into(),
                port,
            },
            task,
        )
    }

    fn codec() -> ReplyCodec {
        ReplyCodec::new(4096, 100)
    }

    #[tokio::test]
    async fn greeted_after_the_header_with_what_followed_kept() {
        let header = b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 21\r\n";
        let (address, task) = server(header.len(), b"120 soon\r\n220 hi\r\n500 next\r\n").await;
        let mut greeted = greet(
            &address,
            Some(header),
            Duration::from_secs(5),
            codec(),
            512,
            &[],
        )
        .await
        .unwrap();
        assert_eq!(task.await.unwrap(), header);
        assert_eq!(greeted.preliminary.len(), 1);
        assert_eq!(greeted.banner.code, 220);
        assert_eq!(greeted.peer.port(), address.port);
        assert_eq!(greeted.replies.next().await.unwrap().unwrap().code, 500);
    }

    #[tokio::test]
    async fn failures_say_why() {
        let (address, _task) = server(0, b"421 go away\r\n").await;
        let err = greet(&address, None, Duration::from_secs(5), codec(), 512, &[])
            .await
            .unwrap_err();
        assert!(matches!(err, GreetError::Refused(421)), "{err}");
        let (address, _task) = server(0, b"").await;
        let err = greet(&address, None, Duration::from_secs(1), codec(), 512, &[])
            .await
            .unwrap_err();
        assert!(matches!(err, GreetError::Timeout(_)), "{err}");
        let (address, _task) = server(0, b"not a reply\r\n").await;
        let err = greet(&address, None, Duration::from_secs(5), codec(), 512, &[])
            .await
            .unwrap_err();
        assert!(matches!(err, GreetError::Protocol(_)), "{err}");
        let stalling: &'static [u8] = "120 wait\r\n".repeat(20).leak().as_bytes();
        let (address, _task) = server(0, stalling).await;
        let err = greet(&address, None, Duration::from_secs(5), codec(), 512, &[])
            .await
            .unwrap_err();
        assert!(matches!(err, GreetError::Stalling), "{err}");
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let address = Upstream {
            host: "127.0.0.1".into(),
            port: closed,
        };
        let err = greet(&address, None, Duration::from_secs(5), codec(), 512, &[])
            .await
            .unwrap_err();
        assert!(matches!(err, GreetError::Connect { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_server_that_closes_before_greeting() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            drop(stream);
        });
        let address = Upstream {
            host: "127.0.0.1".into(),
            port,
        };
        let err = greet(&address, None, Duration::from_secs(5), codec(), 512, &[])
            .await
            .unwrap_err();
        assert!(matches!(err, GreetError::Closed), "{err}");
    }

    #[test]
    fn own_listeners_are_recognised() {
        let a = |t: &str| t.parse::<SocketAddr>().unwrap();
        let own = [a("192.0.2.1:21"), a("0.0.0.0:2121"), a("[::]:990")];
        // The same address.
        assert!(is_own_listener(
            &own,
            a("192.0.2.1:21"),
            a("192.0.2.1:40000")
        ));
        assert!(is_own_listener(
            &own,
            a("[::ffff:192.0.2.1]:21"),
            a("192.0.2.1:40000")
        ));
        // A wildcard's port on an address of this host.
        assert!(is_own_listener(
            &own,
            a("10.0.0.5:2121"),
            a("10.0.0.5:40000")
        ));
        assert!(is_own_listener(
            &own,
            a("[2001:db8::5]:990"),
            a("[2001:db8::5]:40000")
        ));
        // Another host with the same port, another port.
        assert!(!is_own_listener(
            &own,
            a("10.0.0.6:2121"),
            a("10.0.0.5:40000")
        ));
        assert!(!is_own_listener(
            &own,
            a("192.0.2.1:2100"),
            a("192.0.2.1:40000")
        ));
        assert!(!is_own_listener(
            &own,
            a("198.51.100.1:21"),
            a("192.0.2.1:40000")
        ));
    }
}
