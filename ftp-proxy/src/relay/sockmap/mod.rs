//! `--relay-mode sockmap`: the kernel moves a transfer's bytes (issue 14,
//! item 3, a measured experiment; off unless asked for).
//!
//! Owns: loading the stream-verdict program `ftpx_relay` (built into the
//! same eBPF object as the flow tracker, loaded apart from it: the relay
//! works with the tracker off) and its three maps, linking a transfer's
//! two plain data sockets into them and unlinking them, and the parts of
//! the relay contract the kernel does not keep: end of stream (the kernel
//! never passes a FIN on: each direction's end is seen here and passed on
//! with `shutdown(SHUT_WR)` once every redirected byte is in the receiver's
//! send queue), resets and errors (both connections reset), the idle
//! watchdog, and the byte counts (read from the peer map).
//!
//! How a pair is linked, so that no byte is lost, repeated or reordered:
//! first what is already queued on each socket is moved in user space until
//! the queue is empty (the kernel would replay a segment the gateway had
//! begun reading, such as one carrying a PROXY protocol header, from its
//! first byte: measured on 6.18); then both sockets go into
//! `FTPX_RTARGETS` (no program) before either goes into `FTPX_RSOCKS` (the
//! verdict), so no payload is judged before its target can take it; then
//! `SO_RCVLOWAT` is set on both, which makes the kernel judge, in order,
//! what arrived between the drain and the insertion. A socket whose peer
//! already closed (a short listing: the kernel will not insert it) or whose
//! queue would not empty makes the rest of the transfer go through the
//! user-space relay, with the counts carried over.
//!
//! What it does not do: TLS legs (never offered here), bound what a slow
//! receiver makes the kernel hold (redirected payload waits in the
//! receiver's queue with no backpressure to the sender: docs/bench-notes.md),
//! or anything of FTP.

mod sys;

use std::io;
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use aya::maps::{HashMap as AyaHashMap, MapData, MapError, SockHash};
use aya::programs::{ProgramError, SkSkb};
use aya::{Ebpf, EbpfLoader};
use ftp_proxy_common::RelayPeer;
use ftp_proxy_common::maps as tracker_maps;
use ftp_proxy_common::relay as names;
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{Activity, Direction, Flow, Method, Progress, RelayError, RelayOptions};

/// Why the kernel relay could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SockmapError {
    /// Built without the eBPF toolchain.
    #[error("this binary was built without its eBPF object (see README: eBPF toolchain)")]
    Unavailable,
    /// The object did not load.
    #[error("loading the eBPF object: {0}")]
    Load(#[source] aya::EbpfError),
    /// A map is missing or of the wrong kind.
    #[error("eBPF map {name}: {source}")]
    Map {
        /// Its name.
        name: &'static str,
        /// Why.
        source: MapError,
    },
    /// The verdict program is missing, or did not load or attach.
    #[error("eBPF program ftpx_relay: {0}")]
    Program(#[source] ProgramError),
}

/// The loaded verdict program and its maps.
pub(crate) struct Sockmap {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Sockmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sockmap").finish_non_exhaustive()
    }
}

struct Inner {
    /// Owns the program and its attachment to `socks`.
    _ebpf: Ebpf,
    socks: SockHash<MapData, u64>,
    targets: SockHash<MapData, u64>,
    peers: AyaHashMap<MapData, u64, RelayPeer>,
}

/// The eBPF object built by `build.rs` (the tracker's; empty without the
/// toolchain).
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ftp-proxy-ebpf"));

/// The process's kernel relay, once [`install`]ed.
static INSTALLED: OnceLock<Arc<Sockmap>> = OnceLock::new();

/// Loads the kernel relay for the whole process (idempotent). The daemon
/// calls it at start when `--relay-mode sockmap` is asked for, so that a
/// failure stops it there with the reason.
///
/// # Errors
/// [`SockmapError`] when the object, a map or the program does not load.
pub(crate) fn install() -> Result<(), SockmapError> {
    if INSTALLED.get().is_some() {
        return Ok(());
    }
    let loaded = Arc::new(Sockmap::load()?);
    let _ = INSTALLED.set(loaded);
    Ok(())
}

/// The installed kernel relay, if any.
pub(crate) fn installed() -> Option<Arc<Sockmap>> {
    INSTALLED.get().cloned()
}

impl Sockmap {
    fn load() -> Result<Sockmap, SockmapError> {
        if EBPF_OBJECT.is_empty() {
            return Err(SockmapError::Unavailable);
        }
        // The object also holds the tracker's maps; loading creates them
        // all, so the ones this loader does not use are made as small as
        // the kernel allows.
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(tracker_maps::FLOWS, 1)
            .map_max_entries(tracker_maps::PORTS, 1)
            .map_max_entries(tracker_maps::EXPECT, 1)
            .map_max_entries(tracker_maps::ADDRS, 1)
            .map_max_entries(tracker_maps::CLOSED, 4096)
            .map_max_entries(tracker_maps::EVENTS, 4096)
            .load(EBPF_OBJECT)
            .map_err(SockmapError::Load)?;
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(SockmapError::Map {
                name,
                source: MapError::InvalidName {
                    name: name.to_owned(),
                },
            })
        };
        let map_err = |name| move |source| SockmapError::Map { name, source };
        let socks =
            SockHash::try_from(take(&mut ebpf, names::SOCKS)?).map_err(map_err(names::SOCKS))?;
        let targets = SockHash::try_from(take(&mut ebpf, names::TARGETS)?)
            .map_err(map_err(names::TARGETS))?;
        let peers =
            AyaHashMap::try_from(take(&mut ebpf, names::PEERS)?).map_err(map_err(names::PEERS))?;
        let program: &mut SkSkb = ebpf
            .program_mut(names::PROG_RELAY)
            .ok_or(SockmapError::Program(ProgramError::UnexpectedProgramType))?
            .try_into()
            .map_err(SockmapError::Program)?;
        program.load().map_err(SockmapError::Program)?;
        program.attach(socks.fd()).map_err(SockmapError::Program)?;
        Ok(Sockmap {
            inner: Mutex::new(Inner {
                _ebpf: ebpf,
                socks,
                targets,
                peers,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Links two sockets: each one's payload goes to the other. On error
    /// nothing stays linked.
    fn link(&self, a: &TcpStream, b: &TcpStream) -> io::Result<Pair> {
        let (ca, cb) = (
            rustix::net::sockopt::socket_cookie(a)?,
            rustix::net::sockopt::socket_cookie(b)?,
        );
        let pair = Pair { a: ca, b: cb };
        let linked = {
            let mut inner = self.lock();
            let inner = &mut *inner;
            (|| -> Result<(), MapError> {
                inner.peers.insert(ca, peer(cb), 0)?;
                inner.peers.insert(cb, peer(ca), 0)?;
                inner.targets.insert(ca, a.as_fd(), 0)?;
                inner.targets.insert(cb, b.as_fd(), 0)?;
                inner.socks.insert(ca, a.as_fd(), 0)?;
                inner.socks.insert(cb, b.as_fd(), 0)?;
                Ok(())
            })()
        };
        if let Err(e) = linked {
            self.unlink(&pair);
            return Err(io::Error::other(e));
        }
        // Payload that arrived before the insertion waits in the receive
        // queues: have the kernel judge it now, in order.
        for s in [a, b] {
            if let Err(e) = sys::wake_receiver(s.as_fd()) {
                self.unlink(&pair);
                return Err(e);
            }
        }
        Ok(pair)
    }

    /// Removes a pair from every map (what is not there is ignored).
    fn unlink(&self, pair: &Pair) {
        let mut inner = self.lock();
        for cookie in [pair.a, pair.b] {
            let _ = inner.socks.remove(&cookie);
        }
        for cookie in [pair.a, pair.b] {
            let _ = inner.targets.remove(&cookie);
            let _ = inner.peers.remove(&cookie);
        }
    }

    /// What the kernel redirected from the socket with this cookie.
    fn counts(&self, cookie: u64) -> Result<RelayPeer, MapError> {
        self.lock().peers.get(&cookie, 0)
    }
}

fn peer(cookie: u64) -> RelayPeer {
    RelayPeer {
        peer: cookie,
        bytes: 0,
        dropped: 0,
    }
}

/// The cookies of a linked pair.
#[derive(Debug, Clone, Copy)]
struct Pair {
    a: u64,
    b: u64,
}

/// Unlinks the pair when the relay ends, however it ends (also when the
/// relay's task is aborted).
struct Linked<'a> {
    kernel: &'a Sockmap,
    pair: Pair,
}

impl Drop for Linked<'_> {
    fn drop(&mut self) {
        self.kernel.unlink(&self.pair);
    }
}

/// The first wait between two looks at a direction; it doubles up to
/// [`TICK_MAX`]. A listing is seen to its end within a few milliseconds, a
/// long transfer costs 60 looks a second.
const TICK_MIN: Duration = Duration::from_millis(1);
/// The longest wait between two looks: what the end of a long transfer
/// may be late by.
const TICK_MAX: Duration = Duration::from_millis(16);

/// One direction, as the kernel relays it.
struct Way<'a> {
    direction: Direction,
    from: &'a TcpStream,
    to: &'a TcpStream,
    /// The cookie of `from` (its entry counts what went to `to`).
    cookie: u64,
    /// `to`'s send total when linked.
    baseline: u64,
    /// End of stream seen on `from`.
    eof: bool,
    /// Moved in user space before the link.
    before: u64,
    /// Moved so far (before the link, and redirected since).
    bytes: u64,
    done: bool,
}

fn failed(direction: Direction, error: io::Error) -> RelayError {
    RelayError::Io {
        direction: direction.label(),
        source: Arc::new(error),
    }
}

impl Way<'_> {
    /// One look: counts, errors, end of stream, and (at the end, once the
    /// receiver's send queue holds every redirected byte) the FIN.
    fn look(&mut self, kernel: &Sockmap) -> Result<(), RelayError> {
        let counts = kernel
            .counts(self.cookie)
            .map_err(|e| failed(self.direction, io::Error::other(e)))?;
        self.bytes = self.before.saturating_add(counts.bytes);
        if counts.dropped > 0 {
            return Err(failed(
                self.direction,
                io::Error::other(format!(
                    "the kernel could not redirect {} bytes",
                    counts.dropped
                )),
            ));
        }
        for s in [self.from, self.to] {
            if let Ok(Err(errno)) = rustix::net::sockopt::socket_error(s) {
                return Err(failed(self.direction, errno.into()));
            }
        }
        if !self.eof {
            let mut probe = [0u8; 1];
            match rustix::net::recv(self.from, &mut probe, rustix::net::RecvFlags::DONTWAIT) {
                Ok((0, _)) => self.eof = true,
                Ok(_) => {
                    return Err(failed(
                        self.direction,
                        io::Error::other("payload reached user space past the kernel relay"),
                    ));
                }
                Err(rustix::io::Errno::AGAIN) => {}
                Err(errno) => return Err(failed(self.direction, errno.into())),
            }
        }
        if self.eof {
            let sent = sys::bytes_queued(self.to.as_fd())
                .map_err(|e| failed(self.direction, e))?
                .saturating_sub(self.baseline);
            if sent >= counts.bytes {
                match socket2::SockRef::from(self.to).shutdown(Shutdown::Write) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                    Err(e) => return Err(failed(self.direction, e)),
                }
                self.done = true;
            }
        }
        Ok(())
    }
}

/// Largest read of the drain before the link.
const DRAIN_CHUNK: usize = 64 * 1024;
/// Reads of the drain after which a sender that keeps the queue full is
/// left to the user-space relay (4 MiB).
const DRAIN_READS: usize = 64;

/// What [`drain`] left.
#[derive(Debug, Clone, Copy)]
enum Drained {
    /// The receive queue is empty; this many bytes were moved.
    Empty(u64),
    /// End of stream, or a queue that did not empty: the user-space relay
    /// goes on after this many bytes.
    Busy(u64),
}

impl Drained {
    fn bytes(self) -> u64 {
        match self {
            Drained::Empty(n) | Drained::Busy(n) => n,
        }
    }
}

/// Moves what is queued on `from` to `to` in user space, until the queue
/// is empty (nothing half read is left for the kernel), the end of stream,
/// or [`DRAIN_READS`] reads.
async fn drain(from: &TcpStream, to: &TcpStream, buf: &mut [u8]) -> io::Result<Drained> {
    let mut moved = 0u64;
    for _ in 0..DRAIN_READS {
        let n = match from.try_read(buf) {
            Ok(0) => return Ok(Drained::Busy(moved)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Drained::Empty(moved)),
            Err(e) => return Err(e),
        };
        let mut rest = buf.get(..n).unwrap_or_default();
        while !rest.is_empty() {
            to.writable().await?;
            match to.try_write(rest) {
                Ok(w) => rest = rest.get(w..).unwrap_or_default(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        moved += n as u64;
    }
    Ok(Drained::Busy(moved))
}

/// Fails both directions before anything was linked, and resets both
/// connections.
fn fail_early(
    tx: &watch::Sender<Progress>,
    client: &TcpStream,
    server: &TcpStream,
    error: RelayError,
) {
    super::fail_unfinished(tx, &error);
    for stream in [client, server] {
        let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
    }
}

/// Relays two plain sockets through the kernel; the user-space relay
/// (`super::run_after`) when they cannot be linked.
pub(super) async fn run(
    kernel: Arc<Sockmap>,
    client: &TcpStream,
    server: &TcpStream,
    options: RelayOptions,
    tx: watch::Sender<Progress>,
) {
    // What is queued before the link goes through user space, to the
    // last byte: the kernel would replay a segment the gateway had begun
    // reading (a PROXY protocol header) from its first byte.
    let drained = tokio::time::timeout(options.idle_timeout, async {
        let mut buf = vec![0u8; DRAIN_CHUNK];
        Ok::<_, (Direction, io::Error)>([
            drain(client, server, &mut buf)
                .await
                .map_err(|e| (Direction::ClientToServer, e))?,
            drain(server, client, &mut buf)
                .await
                .map_err(|e| (Direction::ServerToClient, e))?,
        ])
    })
    .await;
    let already = match drained {
        Ok(Ok(moved)) => moved,
        Ok(Err((direction, error))) => {
            return fail_early(&tx, client, server, failed(direction, error));
        }
        Err(_) => {
            return fail_early(&tx, client, server, RelayError::Idle(options.idle_timeout));
        }
    };
    let [Drained::Empty(up), Drained::Empty(down)] = already else {
        // A peer already closed, or a sender that kept the queue full:
        // the user-space relay goes on from here.
        return super::run_after(
            client,
            server,
            options,
            tx,
            [already[0].bytes(), already[1].bytes()],
        )
        .await;
    };
    let baselines = (
        sys::bytes_queued(client.as_fd()),
        sys::bytes_queued(server.as_fd()),
    );
    let (Ok(client_sent), Ok(server_sent)) = baselines else {
        return super::run_after(client, server, options, tx, [up, down]).await;
    };
    let pair = match kernel.link(client, server) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "data sockets not linked in the kernel: relaying in user space");
            return super::run_after(client, server, options, tx, [up, down]).await;
        }
    };
    let linked = Linked {
        kernel: &kernel,
        pair,
    };
    // No send bound: the kernel's sender (a worker that wakes when the
    // socket has room) crawled under it (0.2-0.3 x routed against 0.6-0.8
    // without, docs/bench-notes.md), and it bounds nothing here: the
    // redirected payload waits in the receiver's queue, not in its socket.
    for stream in [client, server] {
        let _ = socket2::SockRef::from(stream).set_tcp_notsent_lowat(0);
    }
    let mut ways = [
        Way {
            direction: Direction::ClientToServer,
            from: client,
            to: server,
            cookie: pair.a,
            baseline: server_sent,
            eof: false,
            before: up,
            bytes: up,
            done: false,
        },
        Way {
            direction: Direction::ServerToClient,
            from: server,
            to: client,
            cookie: pair.b,
            baseline: client_sent,
            eof: false,
            before: down,
            bytes: down,
            done: false,
        },
    ];
    let activity = Activity::new();
    let mut moved = 0u64;
    let mut tick = TICK_MIN;
    let watch = async {
        loop {
            tokio::time::sleep(tick).await;
            tick = (tick * 2).min(TICK_MAX);
            for way in ways.iter_mut().filter(|w| !w.done) {
                way.look(linked.kernel)?;
                if way.done {
                    tx.send_modify(|p| {
                        p.set(
                            way.direction,
                            Flow::Finished {
                                bytes: way.bytes,
                                method: Method::Sockmap,
                            },
                        );
                    });
                }
            }
            let total = ways.iter().map(|w| w.bytes).sum::<u64>();
            if total != moved {
                moved = total;
                activity.touch();
            }
            if ways.iter().all(|w| w.done) {
                return Ok(());
            }
        }
    };
    let failure = tokio::select! {
        result = watch => result.err(),
        () = activity.idle(options.idle_timeout) => Some(RelayError::Idle(options.idle_timeout)),
    };
    // Out of the kernel before the sockets close or reset.
    drop(linked);
    match failure {
        Some(error) => {
            // Each direction still running reports what had moved.
            for way in &ways {
                if !way.done {
                    let (direction, bytes) = (way.direction, way.bytes);
                    tx.send_modify(|p| {
                        p.set(
                            direction,
                            Flow::Failed {
                                bytes,
                                error: error.clone(),
                            },
                        );
                    });
                }
            }
            for stream in [client, server] {
                let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
            }
        }
        None => {
            for stream in [client, server] {
                let _ = socket2::SockRef::from(stream).shutdown(Shutdown::Both);
            }
        }
    }
}
