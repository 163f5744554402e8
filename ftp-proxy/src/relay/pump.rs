//! One direction of a relay: read from one socket, write to the other, pass
//! the end of stream on with `shutdown(SHUT_WR)`.
//!
//! How much a direction holds at a time (the copy buffer, or what one
//! splice moves into the pipe) follows the receiver ([`next_chunk`]): it
//! doubles while reads fill it and the receiver takes it at once, and
//! halves when the receiver makes the relay wait, so a slow client does not
//! pin megabytes in the gateway while a fast one gets large chunks.
//!
//! The kernel's side is bounded too: the receive buffer of the socket a
//! direction reads from is held at [`HELD_RCVBUF`] (receive autotuning
//! would otherwise grow it to megabytes in the first milliseconds, while a
//! slow client's socket still absorbs what it can) until the receiver has
//! taken [`RELEASE_AFTER`] bytes without making the relay wait
//! ([`ReceiveHold`]); then it is set large. The send side is bounded by
//! `TCP_NOTSENT_LOWAT` (set by the caller).

use std::io;
use std::net::Shutdown;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size, pipe_with, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::{Direction, Method, RelayError, RelayOptions};

/// The first length of a copy buffer, and the smallest chunk. Starting at
/// the maximum would zero a megabyte per direction for every listing
/// (issue 6's benchmark: 0.74 ms of CPU per session with a LIST instead of
/// 0.41).
pub(super) const CHUNK_MIN: usize = 16 * 1024;
/// The first chunk a splice moves (no buffer to zero: it can start larger).
const SPLICE_START: usize = 64 * 1024;
/// A chunk whose delivery kept the relay waiting this long met a receiver
/// slower than its sender: the next one is halved. So a direction holds
/// about this long's worth of what its receiver takes (500 KB/s: the
/// smallest chunk; 1 GB/s: the largest).
pub(super) const SLOW_WAIT: Duration = Duration::from_millis(20);

/// The next chunk after one of `len` bytes, of which a read brought `n`,
/// delivered in `waited`: halved (not under [`CHUNK_MIN`]) when the
/// receiver was slow, doubled (up to `max`) when the read filled it and the
/// receiver took it at once, else unchanged. Bulk transfers toward fast
/// receivers reach `max` within a few reads; small ones never grow.
pub(super) fn next_chunk(len: usize, n: usize, waited: Duration, max: usize) -> usize {
    if waited >= SLOW_WAIT {
        (len / 2).max(CHUNK_MIN.min(max))
    } else if n >= len && len < max {
        len.saturating_mul(2).min(max)
    } else {
        len
    }
}

/// The receive buffer a direction's source socket starts with (the kernel
/// doubles it for its bookkeeping: 256 KiB, about what a 1 GB/s stream
/// needs for 100 µs of round trip).
pub(super) const HELD_RCVBUF: usize = 128 * 1024;
/// Bytes the receiver must take without a slow wait before the source's
/// receive buffer is released.
pub(super) const RELEASE_AFTER: u64 = 4 << 20;
/// The receive buffer asked for at the release (the kernel caps it at
/// `net.core.rmem_max`): long fast paths need large windows.
const RELEASED_RCVBUF: usize = 16 << 20;
/// The smallest `net.core.rmem_max` under which receive buffers are not
/// held (see [`holding_receive_buffers`]).
const RELEASE_FLOOR: usize = 4 << 20;

/// Whether a direction's receiver has shown it is fast: [`RELEASE_AFTER`]
/// bytes delivered in a row without a slow wait ([`SLOW_WAIT`]). Once
/// released, a direction stays released (lowering a receive buffer under
/// its queue makes the kernel drop segments, and the sender's
/// retransmission timer would stall the transfer).
#[derive(Debug)]
pub(super) struct ReceiveHold {
    quick_run: u64,
    released: bool,
}

impl ReceiveHold {
    /// A hold, or (`false`) one already released: nothing to do.
    pub(super) fn held(held: bool) -> ReceiveHold {
        ReceiveHold {
            quick_run: 0,
            released: !held,
        }
    }

    /// After a chunk of `moved` bytes delivered in `waited`: whether to
    /// release the buffer now (true once).
    pub(super) fn after_chunk(&mut self, moved: usize, waited: Duration) -> bool {
        if self.released {
            return false;
        }
        if waited >= SLOW_WAIT {
            self.quick_run = 0;
            return false;
        }
        self.quick_run = self.quick_run.saturating_add(moved as u64);
        self.released = self.quick_run >= RELEASE_AFTER;
        self.released
    }
}

/// Whether source receive buffers are held: only when the release can
/// give back at least what autotuning would reach on a LAN
/// (`net.core.rmem_max` of 4 MiB or more; Debian's default is 208 KiB, and
/// a buffer set once never autotunes again). Read once.
fn holding_receive_buffers() -> bool {
    static HOLD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HOLD.get_or_init(|| {
        let max = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(0);
        let hold = max >= RELEASE_FLOOR;
        if !hold {
            tracing::info!(
                rmem_max = max,
                "net.core.rmem_max is under 4 MiB: receive buffers of data sockets \
                 are left to autotuning, so a slow client may hold megabytes of the \
                 gateway's memory (raise net.core.rmem_max to bound it)"
            );
        }
        hold
    })
}

/// Sets the receive buffer of `from` (best effort: without it the kernel's
/// autotuning decides, nothing breaks).
fn set_receive_buffer(from: &TcpStream, bytes: usize) {
    if let Err(e) = socket2::SockRef::from(from).set_recv_buffer_size(bytes) {
        tracing::debug!(error = %e, bytes, "SO_RCVBUF not set on a data socket");
    }
}

type PumpResult = Result<(u64, Method), (u64, RelayError)>;

fn io_error(direction: Direction, error: io::Error) -> RelayError {
    RelayError::Io {
        direction: direction.label(),
        source: Arc::new(error),
    }
}

/// Moves bytes from `from` to `to` with `method` (splice falls back to
/// copying where the kernel refuses it) until end of stream, then shuts
/// down the writing side of `to`. Calls `touch` after every chunk.
pub(super) async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    direction: Direction,
    method: Method,
    options: RelayOptions,
    touch: &(dyn Fn() + Sync),
) -> PumpResult {
    let outcome = match method {
        Method::Splice => match splice_pump(from, to, options.pipe_size, touch).await {
            SpliceOutcome::Done(bytes) => Ok((bytes, Method::Splice)),
            SpliceOutcome::Failed(bytes, error) => Err((bytes, io_error(direction, error))),
            SpliceOutcome::Unsupported => copy_pump(from, to, options.copy_buffer, touch)
                .await
                .map(|bytes| (bytes, Method::Copy))
                .map_err(|(bytes, e)| (bytes, io_error(direction, e))),
        },
        // Plain sockets are never "TLS": copy is the method that works for any.
        Method::Copy | Method::Tls | Method::Sockmap => {
            copy_pump(from, to, options.copy_buffer, touch)
                .await
                .map(|bytes| (bytes, Method::Copy))
                .map_err(|(bytes, e)| (bytes, io_error(direction, e)))
        }
    };
    match outcome {
        Ok((bytes, method)) => match socket2::SockRef::from(to).shutdown(Shutdown::Write) {
            // The peer may already be gone: its FIN was passed on, nothing is lost.
            Ok(()) => Ok((bytes, method)),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok((bytes, method)),
            Err(e) => Err((bytes, io_error(direction, e))),
        },
        Err(failure) => Err(failure),
    }
}

enum SpliceOutcome {
    Done(u64),
    Failed(u64, io::Error),
    /// The kernel refused splice before any byte moved: copy instead.
    Unsupported,
}

fn is_unsupported(error: &io::Error) -> bool {
    matches!(
        rustix::io::Errno::from_io_error(error),
        Some(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS | rustix::io::Errno::OPNOTSUPP)
    )
}

async fn splice_pump(
    from: &TcpStream,
    to: &TcpStream,
    pipe_size: usize,
    touch: &(dyn Fn() + Sync),
) -> SpliceOutcome {
    // Without a pipe (e.g. out of file descriptors) splice cannot be used.
    let Ok((pipe_read, pipe_write)) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK) else {
        return SpliceOutcome::Unsupported;
    };
    // Larger pipes mean fewer system calls; the kernel may cap the size
    // (fs.pipe-max-size), in which case the default stays.
    let capacity = fcntl_setpipe_size(&pipe_write, pipe_size).unwrap_or(64 * 1024);
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    let mut chunk = SPLICE_START.min(capacity);
    let mut hold = ReceiveHold::held(holding_receive_buffers());
    if !hold.released {
        set_receive_buffer(from, HELD_RCVBUF);
    }
    let mut total: u64 = 0;
    loop {
        // The pipe is always empty here, so EAGAIN means the socket has no data.
        let filled = from
            .async_io(Interest::READABLE, || {
                splice(from, None, &pipe_write, None, chunk, flags).map_err(io::Error::from)
            })
            .await;
        let read = match filled {
            Ok(0) => return SpliceOutcome::Done(total),
            Ok(n) => n,
            Err(e) if total == 0 && is_unsupported(&e) => return SpliceOutcome::Unsupported,
            Err(e) => return SpliceOutcome::Failed(total, e),
        };
        let mut in_pipe = read;
        let started = Instant::now();
        while in_pipe > 0 {
            let drained = to
                .async_io(Interest::WRITABLE, || {
                    splice(&pipe_read, None, to, None, in_pipe, flags).map_err(io::Error::from)
                })
                .await;
            match drained {
                Ok(0) => return SpliceOutcome::Failed(total, io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    in_pipe = in_pipe.saturating_sub(n);
                    total += n as u64;
                }
                Err(e) => return SpliceOutcome::Failed(total, e),
            }
        }
        touch();
        let waited = started.elapsed();
        chunk = next_chunk(chunk, read, waited, capacity);
        if hold.after_chunk(read, waited) {
            set_receive_buffer(from, RELEASED_RCVBUF);
        }
    }
}

async fn copy_pump(
    from: &TcpStream,
    to: &TcpStream,
    max: usize,
    touch: &(dyn Fn() + Sync),
) -> Result<u64, (u64, io::Error)> {
    let mut buffer = vec![0u8; CHUNK_MIN.min(max)];
    let mut hold = ReceiveHold::held(holding_receive_buffers());
    if !hold.released {
        set_receive_buffer(from, HELD_RCVBUF);
    }
    let mut total: u64 = 0;
    loop {
        let n = match from
            .async_io(Interest::READABLE, || {
                rustix::io::read(from, &mut buffer).map_err(io::Error::from)
            })
            .await
        {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) => return Err((total, e)),
        };
        let mut written = 0;
        let started = Instant::now();
        while let Some(rest) = buffer.get(written..n).filter(|r| !r.is_empty()) {
            match to
                .async_io(Interest::WRITABLE, || {
                    rustix::io::write(to, rest).map_err(io::Error::from)
                })
                .await
            {
                Ok(0) => return Err((total, io::ErrorKind::WriteZero.into())),
                Ok(m) => {
                    written += m;
                    total += m as u64;
                }
                Err(e) => return Err((total, e)),
            }
        }
        touch();
        let waited = started.elapsed();
        let next = next_chunk(buffer.len(), n, waited, max);
        if hold.after_chunk(n, waited) {
            set_receive_buffer(from, RELEASED_RCVBUF);
        }
        if next < buffer.len() {
            // Give the memory back: a slow receiver holds it for long.
            buffer.truncate(next);
            buffer.shrink_to_fit();
        } else {
            buffer.resize(next, 0);
        }
    }
}
