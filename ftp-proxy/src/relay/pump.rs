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
//! ([`ReceiveHold`]); then it is set large. Until then chunks are capped
//! too ([`ReceiveHold::chunk_max`]). The send side is bounded by
//! `TCP_NOTSENT_LOWAT` (set by the caller).
//!
//! The method can change midway (`--relay-mode auto`): a copying direction
//! whose receiver makes it wait before proving fast turns to splicing, so
//! that a slow client costs no buffer in the gateway's memory and the
//! pages the server's socket received go to the client's as they are;
//! should the receiver prove fast after all (a stall, not a slow client),
//! it turns back to copying, which measured faster between hosts. The
//! hold and the byte count carry over ([`Moved`]).

use std::io;
use std::net::Shutdown;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size, pipe_with, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::{Direction, Method, RelayError, RelayMode, RelayOptions};

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
/// receiver was slow, doubled when the read filled it and the receiver
/// took it at once, else unchanged; never over `max`. Bulk transfers toward fast
/// receivers reach `max` within a few reads; small ones never grow.
pub(super) fn next_chunk(len: usize, n: usize, waited: Duration, max: usize) -> usize {
    let next = if waited >= SLOW_WAIT {
        (len / 2).max(CHUNK_MIN)
    } else if n >= len {
        len.saturating_mul(2)
    } else {
        len
    };
    // The largest may have come down (a hold's cap, [`ReceiveHold::chunk_max`]).
    next.min(max)
}

/// The receive buffer a direction's source socket starts with (the kernel
/// doubles it for its bookkeeping: 128 KiB, a window of about 100 KB,
/// which a relay reading every 100 µs turns into 1 GB/s). All that a
/// slow receiver's source ever queues on the gateway.
pub(super) const HELD_RCVBUF: usize = 64 * 1024;
/// Bytes the receiver must take without a slow wait before the source's
/// receive buffer is released.
pub(super) const RELEASE_AFTER: u64 = 4 << 20;
/// The largest chunk while a direction's receive buffer is held: about
/// what the held buffer lets the kernel queue (so a read never has more),
/// and all a slow receiver's direction ever holds in user space.
pub(super) const HELD_CHUNK_MAX: usize = 2 * HELD_RCVBUF;
/// The largest chunk toward a receiver that made the relay wait before it
/// proved fast: 500 KB/s takes it in 64 ms.
pub(super) const SLOW_CHUNK_MAX: usize = 2 * CHUNK_MIN;
/// The receive buffer asked for at the release (the kernel caps it at
/// `net.core.rmem_max`): long fast paths need large windows.
const RELEASED_RCVBUF: usize = 16 << 20;
/// The smallest `net.core.rmem_max` under which receive buffers are not
/// held (see [`holding_receive_buffers`]).
const RELEASE_FLOOR: usize = 4 << 20;

/// What a hold asks of its direction after a chunk ([`ReceiveHold::after_chunk`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HoldStep {
    /// Nothing to change.
    Keep,
    /// The receiver made the relay wait before it ever proved fast (once):
    /// chunks are capped at [`SLOW_CHUNK_MAX`] from now, and a copying
    /// direction of `--relay-mode auto` turns to splicing.
    Slowed,
    /// The receiver has proved fast: release the source's receive buffer
    /// (once).
    Released,
}

/// Whether a direction's receiver has shown it is fast: [`RELEASE_AFTER`]
/// bytes delivered in a row without a slow wait ([`SLOW_WAIT`]). Once
/// released, a direction stays released (lowering a receive buffer under
/// its queue makes the kernel drop segments, and the sender's
/// retransmission timer would stall the transfer). While held, a chunk
/// is at most [`HELD_CHUNK_MAX`] ([`ReceiveHold::chunk_max`]).
#[derive(Debug)]
pub(super) struct ReceiveHold {
    quick_run: u64,
    released: bool,
    slowed: bool,
}

impl ReceiveHold {
    /// A hold, or (`false`) one already released: nothing to do.
    pub(super) fn held(held: bool) -> ReceiveHold {
        ReceiveHold {
            quick_run: 0,
            released: !held,
            slowed: false,
        }
    }

    /// Whether the receiver proved fast (or nothing was held).
    pub(super) fn released(&self) -> bool {
        self.released
    }

    /// The largest chunk now, of a direction whose largest is `max`: a
    /// held source never has more than its receive buffer to read
    /// ([`HELD_CHUNK_MAX`]), and a slow receiver's chunk is memory the
    /// gateway holds for long ([`SLOW_CHUNK_MAX`]).
    pub(super) fn chunk_max(&self, max: usize) -> usize {
        if self.released {
            max
        } else if self.slowed {
            max.min(SLOW_CHUNK_MAX)
        } else {
            max.min(HELD_CHUNK_MAX)
        }
    }

    /// After a chunk of `moved` bytes delivered in `waited`: what to change.
    pub(super) fn after_chunk(&mut self, moved: usize, waited: Duration) -> HoldStep {
        if self.released {
            return HoldStep::Keep;
        }
        if waited >= SLOW_WAIT {
            self.quick_run = 0;
            if self.slowed {
                return HoldStep::Keep;
            }
            self.slowed = true;
            return HoldStep::Slowed;
        }
        self.quick_run = self.quick_run.saturating_add(moved as u64);
        self.released = self.quick_run >= RELEASE_AFTER;
        if self.released {
            HoldStep::Released
        } else {
            HoldStep::Keep
        }
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

/// Releases the receive buffer of `from` when the hold says so.
fn apply(step: HoldStep, from: &TcpStream) {
    if step == HoldStep::Released {
        tracing::debug!("receiver proved fast: receive buffer released");
        set_receive_buffer(from, RELEASED_RCVBUF);
    }
}

/// Where a direction stands: the bytes it moved and its receive hold,
/// carried over when it changes method midway.
#[derive(Debug)]
struct Moved {
    total: u64,
    hold: ReceiveHold,
}

impl Moved {
    /// A direction about to read from `from`: its receive buffer held
    /// where the release can give it back ([`holding_receive_buffers`]).
    fn start(from: &TcpStream) -> Moved {
        let hold = ReceiveHold::held(holding_receive_buffers());
        if !hold.released() {
            set_receive_buffer(from, HELD_RCVBUF);
        }
        Moved { total: 0, hold }
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
    let start = Moved::start(from);
    // Auto copies toward fast receivers and splices toward slow ones, so
    // that the many slow ones hold no buffer of the gateway's own.
    let mut next = match method {
        Method::Splice => Stage::Splice(start, false),
        // Plain sockets are never "TLS": copy is the method that works for any.
        Method::Copy | Method::Tls | Method::Sockmap => {
            Stage::Copy(start, options.mode == RelayMode::Auto)
        }
    };
    // Each stage ends the loop or moves on. A receiver turns slow at most
    // once and fast at most once (the hold's steps come once each), and a
    // copy that is not to turn never hands over.
    let outcome = loop {
        next = match next {
            Stage::Splice(moved, back) => {
                match splice_pump(from, to, options, touch, moved, back).await {
                    SpliceOutcome::Done(bytes) => break Ok((bytes, Method::Splice)),
                    SpliceOutcome::Failed(bytes, e) => break Err((bytes, io_error(direction, e))),
                    SpliceOutcome::Unsupported(moved) => Stage::Copy(moved, false),
                    // A stall made it look slow: copy again at full chunks.
                    SpliceOutcome::Fast(moved) => {
                        turning(direction, &moved, "receiver proved fast: copying again");
                        Stage::Copy(moved, false)
                    }
                }
            }
            Stage::Copy(moved, turn) => {
                match copy_pump(from, to, options, touch, moved, turn).await {
                    CopyOutcome::Done(bytes) => break Ok((bytes, Method::Copy)),
                    CopyOutcome::Failed(bytes, e) => break Err((bytes, io_error(direction, e))),
                    CopyOutcome::Slow(moved) => {
                        turning(
                            direction,
                            &moved,
                            "receiver slower than its sender: splicing",
                        );
                        Stage::Splice(moved, true)
                    }
                }
            }
        };
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

/// Logs a direction's change of method midway, and why.
fn turning(direction: Direction, moved: &Moved, why: &'static str) {
    tracing::debug!(
        direction = direction.label(),
        bytes = moved.total,
        why,
        "relay method changed"
    );
}

/// What a direction does next.
enum Stage {
    /// Splice; with `true`, turn back to copying once the receiver proves
    /// fast (auto mode, after it turned for a slow one).
    Splice(Moved, bool),
    /// Copy; with `true`, turn to splicing once the receiver proves slow.
    Copy(Moved, bool),
}

enum SpliceOutcome {
    Done(u64),
    Failed(u64, io::Error),
    /// The kernel refused splice before this pump moved a byte: copy
    /// instead, from where the direction stands.
    Unsupported(Moved),
    /// The receiver proved fast and the pump was asked to turn back to
    /// copying then: the pipe is empty.
    Fast(Moved),
}

enum CopyOutcome {
    Done(u64),
    Failed(u64, io::Error),
    /// The receiver proved slow and the pump was asked to turn to
    /// splicing then: every byte read so far was written.
    Slow(Moved),
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
    options: RelayOptions,
    touch: &(dyn Fn() + Sync),
    moved: Moved,
    back: bool,
) -> SpliceOutcome {
    // Without a pipe (e.g. out of file descriptors) splice cannot be used.
    let Ok((pipe_read, pipe_write)) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK) else {
        return SpliceOutcome::Unsupported(moved);
    };
    // Larger pipes mean fewer system calls; the kernel may cap the size
    // (fs.pipe-max-size), in which case the default stays.
    let capacity = fcntl_setpipe_size(&pipe_write, options.pipe_size).unwrap_or(64 * 1024);
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    let Moved {
        mut total,
        mut hold,
    } = moved;
    let first = total;
    let mut chunk = hold.chunk_max(SPLICE_START.min(capacity));
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
            Err(e) if total == first && is_unsupported(&e) => {
                return SpliceOutcome::Unsupported(Moved { total, hold });
            }
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
        let step = hold.after_chunk(read, waited);
        apply(step, from);
        if back && step == HoldStep::Released {
            return SpliceOutcome::Fast(Moved { total, hold });
        }
        chunk = next_chunk(chunk, read, waited, hold.chunk_max(capacity));
    }
}

/// Copies until end of stream, or (with `turn`) until the receiver proves
/// slow.
async fn copy_pump(
    from: &TcpStream,
    to: &TcpStream,
    options: RelayOptions,
    touch: &(dyn Fn() + Sync),
    moved: Moved,
    turn: bool,
) -> CopyOutcome {
    let max = options.copy_buffer;
    // Allocated once the source has something to read: the idle direction
    // of a transfer (a download's client side) never holds a buffer.
    let mut buffer = Vec::new();
    let Moved {
        mut total,
        mut hold,
    } = moved;
    loop {
        if buffer.is_empty() {
            if let Err(e) = from.readable().await {
                return CopyOutcome::Failed(total, e);
            }
            buffer.resize(CHUNK_MIN.min(max), 0);
        }
        let n = match from
            .async_io(Interest::READABLE, || {
                rustix::io::read(from, &mut buffer).map_err(io::Error::from)
            })
            .await
        {
            Ok(0) => return CopyOutcome::Done(total),
            Ok(n) => n,
            Err(e) => return CopyOutcome::Failed(total, e),
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
                Ok(0) => return CopyOutcome::Failed(total, io::ErrorKind::WriteZero.into()),
                Ok(m) => {
                    written += m;
                    total += m as u64;
                }
                Err(e) => return CopyOutcome::Failed(total, e),
            }
        }
        touch();
        let waited = started.elapsed();
        let step = hold.after_chunk(n, waited);
        apply(step, from);
        if turn && step == HoldStep::Slowed {
            return CopyOutcome::Slow(Moved { total, hold });
        }
        let next = next_chunk(buffer.len(), n, waited, hold.chunk_max(max));
        if next < buffer.len() {
            // Give the memory back: a slow receiver holds it for long.
            buffer.truncate(next);
            buffer.shrink_to_fit();
        } else {
            buffer.resize(next, 0);
        }
    }
}
