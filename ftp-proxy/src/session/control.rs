//! The control connections as byte streams, plain or TLS.
//!
//! [`ClientReader`]/[`ClientWriter`] and [`ServerReader`]/[`ServerWriter`]
//! are the two halves of each control connection, which becomes TLS in the
//! middle of a session (`AUTH TLS`): the session swaps the halves, the
//! codecs above them stay.
//!
//! Clients send the Telnet Synch before `ABOR` as TCP urgent data (RFC 959
//! §4.1.3). A read stops short at the urgent mark, and tokio's own
//! `TcpStream` reader takes a short read to mean "drained" and waits for the
//! next readiness edge, so the `ABOR` behind the mark would sit unread until
//! the client sent something else. This stream reads with `try_read`, which
//! only waits again after the kernel says `EAGAIN`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// The client's control connection under TLS.
pub(crate) type ClientTlsStream = tokio_rustls::server::TlsStream<ControlStream>;
/// The server's control connection under TLS.
pub(crate) type ServerTlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Reading half of the client's control connection.
pub(crate) enum ClientReader {
    /// Plain TCP.
    Plain(ControlStream),
    /// TLS (after `AUTH TLS`, or on an implicit listener).
    Tls(ReadHalf<ClientTlsStream>),
    /// Taken away for an upgrade: reads end of stream.
    Closed,
}

/// Writing half of the client's control connection.
pub(crate) enum ClientWriter {
    /// Plain TCP.
    Plain(ControlStream),
    /// TLS.
    Tls(WriteHalf<ClientTlsStream>),
    /// Taken away for an upgrade: writes fail.
    Closed,
}

/// Reading half of the server's control connection.
pub(crate) enum ServerReader {
    /// Plain TCP.
    Plain(OwnedReadHalf),
    /// TLS.
    Tls(ReadHalf<ServerTlsStream>),
    /// Taken away for an upgrade: reads end of stream.
    Closed,
}

/// Writing half of the server's control connection.
pub(crate) enum ServerWriter {
    /// Plain TCP; the socket can send urgent data.
    Plain(OwnedWriteHalf),
    /// TLS (no urgent data: it would break the record stream).
    Tls(WriteHalf<ServerTlsStream>),
    /// Taken away for an upgrade: writes fail.
    Closed,
}

fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "control connection being upgraded",
    )
}

macro_rules! delegate_read {
    ($ty:ident) => {
        impl AsyncRead for $ty {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_read(cx, buf),
                    $ty::Tls(s) => Pin::new(s).poll_read(cx, buf),
                    $ty::Closed => Poll::Ready(Ok(())),
                }
            }
        }
    };
}

macro_rules! delegate_write {
    ($ty:ident) => {
        impl AsyncWrite for $ty {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_write(cx, buf),
                    $ty::Tls(s) => Pin::new(s).poll_write(cx, buf),
                    $ty::Closed => Poll::Ready(Err(closed())),
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_flush(cx),
                    $ty::Tls(s) => Pin::new(s).poll_flush(cx),
                    $ty::Closed => Poll::Ready(Ok(())),
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_shutdown(cx),
                    $ty::Tls(s) => Pin::new(s).poll_shutdown(cx),
                    $ty::Closed => Poll::Ready(Ok(())),
                }
            }
        }
    };
}

delegate_read!(ClientReader);
delegate_write!(ClientWriter);
delegate_read!(ServerReader);
delegate_write!(ServerWriter);

/// One half of a control connection; both halves share the socket.
#[derive(Debug, Clone)]
pub(crate) struct ControlStream(Arc<TcpStream>);

impl ControlStream {
    /// Splits a connection into a reading and a writing half.
    pub(crate) fn split(stream: TcpStream) -> (ControlStream, ControlStream) {
        let shared = Arc::new(stream);
        (ControlStream(Arc::clone(&shared)), ControlStream(shared))
    }
}

impl AsyncRead for ControlStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            match self.0.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for ControlStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write) {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The Synch sent as urgent data, then ABOR: the whole line must be read
    /// without the client sending anything more.
    #[tokio::test]
    async fn reads_past_the_urgent_mark() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().await.unwrap();
        socket2::SockRef::from(&server)
            .set_out_of_band_inline(true)
            .unwrap();
        let (mut reader, _writer) = ControlStream::split(server);
        let sender = socket2::SockRef::from(&client);
        sender.send_out_of_band(b"\xff\xf4\xff").unwrap();
        sender.send(b"\xf2ABOR\r\n").unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while !got.ends_with(b"\r\n") {
            let n = tokio::time::timeout(std::time::Duration::from_secs(2), reader.read(&mut buf))
                .await
                .expect("ABOR stuck behind the urgent mark")
                .unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"\xff\xf4\xff\xf2ABOR\r\n");
        let (_r, mut w) = ControlStream::split(
            tokio::net::TcpStream::from_std({
                client.set_nonblocking(true).unwrap();
                client
            })
            .unwrap(),
        );
        w.write_all(b"x").await.unwrap();
    }
}
