//! The relay for data connections that are not both plain TCP: a TLS leg
//! (FTPS) on either side or both. Same contract as the splice and copy
//! pumps: each direction passes its end on after its last byte, in the
//! order the peers used it; counts; the idle watchdog; a failure resets
//! both connections.
//!
//! One task drives both directions with a poll loop: a TLS connection's
//! two directions share one rustls state, which cannot be split without a
//! lock. The end of a TLS stream is mirrored: a `close_notify` (then FIN)
//! becomes a clean end on the other side (`close_notify` + FIN toward a
//! TLS peer, FIN toward a plain one); a FIN without `close_notify` (a
//! truncation, or a careless peer) becomes a bare FIN, never a
//! `close_notify`, so the gateway never launders a truncated stream into a
//! clean one. Each leg is read to its end, so a TLS peer's late records
//! (session tickets, its own `close_notify`) are consumed, not left unread
//! (a close with unread data would reset the connection).
//!
//! The byte loop reads into a buffer and writes from it; rustls reads at
//! most 4 KiB of records per call, so TLS legs read through a large
//! buffered reader (see [`Leg::tls`]). Kernel TLS (kTLS) would turn a TLS
//! leg back into a socket splice can use; this kernel has no TLS module,
//! so it is not built, but a `Leg` variant for it would slot in here.

use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{Activity, Direction, Flow, Method, Progress, RelayError, RelayOptions};

/// The read buffer under a TLS leg.
const TLS_READ_BUFFER: usize = 128 * 1024;
/// The relay's buffer per direction.
const CHUNK: usize = 64 * 1024;

/// The socket under a TLS leg, read through a buffer.
pub(crate) type TlsIo = BufReader<TcpStream>;

/// One data connection as the relay sees it.
pub(crate) enum Leg {
    /// Plain TCP (splice or copy when both legs are plain).
    Plain(TcpStream),
    /// TLS, as the gateway's client or server side.
    Tls(Box<tokio_rustls::TlsStream<TlsIo>>),
}

impl Leg {
    /// The socket under a TLS leg, buffered for reading.
    pub(crate) fn tls_io(stream: TcpStream) -> TlsIo {
        BufReader::with_capacity(TLS_READ_BUFFER, stream)
    }

    /// A TLS leg.
    pub(crate) fn tls(stream: impl Into<tokio_rustls::TlsStream<TlsIo>>) -> Leg {
        Leg::Tls(Box::new(stream.into()))
    }

    /// The TCP connection underneath.
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Leg::Plain(stream) => stream,
            Leg::Tls(tls) => tls.get_ref().0.get_ref(),
        }
    }

    fn is_tls(&self) -> bool {
        matches!(self, Leg::Tls(_))
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self {
            Leg::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Leg::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self {
            Leg::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Leg::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Leg::Plain(s) => Pin::new(s).poll_flush(cx),
            Leg::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    /// Passes the end of the other direction on: `clean` with a
    /// `close_notify` toward a TLS peer, else a bare FIN.
    fn poll_end(&mut self, cx: &mut Context<'_>, clean: bool) -> Poll<io::Result<()>> {
        let result = match self {
            Leg::Tls(s) if clean => ready!(Pin::new(&mut **s).poll_shutdown(cx)),
            Leg::Tls(s) => {
                ready!(Pin::new(&mut **s).poll_flush(cx))?;
                socket2::SockRef::from(s.get_ref().0.get_ref()).shutdown(Shutdown::Write)
            }
            Leg::Plain(s) => socket2::SockRef::from(&*s).shutdown(Shutdown::Write),
        };
        Poll::Ready(match result {
            // The peer may already be gone: the end was passed on, nothing lost.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            other => other,
        })
    }
}

/// One direction's progress.
struct Half {
    buffer: Vec<u8>,
    pos: usize,
    end: usize,
    unflushed: bool,
    /// The source ended: cleanly (`true`) or not.
    eof: Option<bool>,
    bytes: u64,
    done: bool,
}

impl Half {
    fn new() -> Half {
        Half {
            buffer: vec![0; CHUNK],
            pos: 0,
            end: 0,
            unflushed: false,
            eof: None,
            bytes: 0,
            done: false,
        }
    }

    /// Moves bytes from `from` to `to` until the source ends and the end is
    /// passed on (`Ready(Ok)`), or something fails.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut Leg,
        to: &mut Leg,
        activity: &Activity,
    ) -> Poll<io::Result<()>> {
        loop {
            while self.pos < self.end {
                let pending = self.buffer.get(self.pos..self.end).unwrap_or_default();
                let n = ready!(to.poll_write(cx, pending))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.bytes += n as u64;
                self.unflushed = true;
                activity.touch();
            }
            if self.unflushed {
                ready!(to.poll_flush(cx))?;
                self.unflushed = false;
            }
            if let Some(clean) = self.eof {
                ready!(to.poll_end(cx, clean))?;
                return Poll::Ready(Ok(()));
            }
            self.pos = 0;
            self.end = 0;
            let mut read = ReadBuf::new(&mut self.buffer);
            match ready!(from.poll_read(cx, &mut read)) {
                Ok(()) if read.filled().is_empty() => self.eof = Some(true),
                Ok(()) => self.end = read.filled().len(),
                // A TLS peer that closed without close_notify.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && from.is_tls() => {
                    self.eof = Some(false);
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

fn io_error(direction: Direction, error: io::Error) -> RelayError {
    RelayError::Io {
        direction: direction.label(),
        source: std::sync::Arc::new(error),
    }
}

/// Relays between the two legs until both directions have ended, one
/// fails, or nothing moves for the idle timeout; reports each direction
/// on `tx` as it ends.
pub(super) async fn run(
    client: &mut Leg,
    server: &mut Leg,
    options: RelayOptions,
    tx: watch::Sender<Progress>,
) {
    let activity = Activity::new();
    let mut up = Half::new();
    let mut down = Half::new();
    let failure = tokio::select! {
        result = drive(client, server, &mut up, &mut down, &activity, &tx) => result.err(),
        () = activity.idle(options.idle_timeout) => Some(RelayError::Idle(options.idle_timeout)),
    };
    finish(client, server, failure, &tx);
}

async fn drive(
    client: &mut Leg,
    server: &mut Leg,
    up: &mut Half,
    down: &mut Half,
    activity: &Activity,
    tx: &watch::Sender<Progress>,
) -> Result<(), RelayError> {
    std::future::poll_fn(|cx| {
        if !up.done {
            match up.poll(cx, client, server, activity) {
                Poll::Ready(Ok(())) => {
                    up.done = true;
                    report(tx, Direction::ClientToServer, up.bytes);
                }
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Err(fail(tx, Direction::ClientToServer, up.bytes, e)));
                }
                Poll::Pending => {}
            }
        }
        if !down.done {
            match down.poll(cx, server, client, activity) {
                Poll::Ready(Ok(())) => {
                    down.done = true;
                    report(tx, Direction::ServerToClient, down.bytes);
                }
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Err(fail(tx, Direction::ServerToClient, down.bytes, e)));
                }
                Poll::Pending => {}
            }
        }
        if up.done && down.done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

fn report(tx: &watch::Sender<Progress>, direction: Direction, bytes: u64) {
    tx.send_modify(|p| {
        p.set(
            direction,
            Flow::Finished {
                bytes,
                method: Method::Tls,
            },
        );
    });
}

fn fail(
    tx: &watch::Sender<Progress>,
    direction: Direction,
    bytes: u64,
    error: io::Error,
) -> RelayError {
    let error = io_error(direction, error);
    let reported = error.clone();
    tx.send_modify(|p| {
        p.set(
            direction,
            Flow::Failed {
                bytes,
                error: reported,
            },
        );
    });
    RelayError::Cut
}

/// Resets both connections after a failure (each peer learns the transfer
/// failed instead of seeing a clean end), or closes them quietly.
fn finish(client: &Leg, server: &Leg, failure: Option<RelayError>, tx: &watch::Sender<Progress>) {
    if let Some(error) = failure {
        super::fail_unfinished(tx, &error);
        for leg in [client, server] {
            let _ = socket2::SockRef::from(leg.tcp()).set_linger(Some(Duration::ZERO));
        }
    } else {
        for leg in [client, server] {
            let _ = socket2::SockRef::from(leg.tcp()).shutdown(Shutdown::Both);
        }
    }
}
