//! The eBPF flow tracker: the tracker's side of aya (the other user is
//! `relay::sockmap`, which loads its own program from the same object). It
//! loads the programs built from `ftp-proxy-ebpf` (embedded at build time),
//! attaches them to interfaces, keeps the set of watched ports, reads the flow table
//! and the counters, drains closed flows, expires old entries, and detaches
//! everything when dropped.
//!
//! What the kernel side does: every TCP segment whose source or destination
//! port is watched updates one entry of an LRU flow table (both directions
//! share it), through the pure transition in `ftp-proxy-common`. Each TCP
//! event goes to a ring buffer as it happens ([`FlowTracker::take_events`]);
//! closed flows (both FINs acknowledged, or RST) are pushed to another and
//! leave the table, which therefore holds live flows only.
//!
//! The guard ([`guard`]): the XDP program judges every SYN to a port the
//! caller flagged as guarded ([`FlowTracker::set_port`]) against the
//! expectations the caller inserted ([`FlowTracker::expect`]), and under
//! [`GuardMode::Enforce`] drops the refused ones. It is the only packet the
//! programs ever drop.
//!
//! Hooks: TC classifiers on tcx links for ingress and egress; or, with
//! [`IngressHook::Xdp`] (`--ebpf-ingress xdp`), XDP in generic mode for
//! ingress (the same program logic: the guard drops there, before the
//! stack, but generic XDP first copies every merged packet into one flat
//! buffer, which on the wire cost the relay a third of its throughput).
//! On `lo` only the egress program is attached: on loopback
//! every packet crosses egress and then ingress of the same interface, and
//! egress alone sees both directions of every local connection, once each.
//!
//! What it does not do: anything else to packets (the programs pass them
//! all but refused SYNs), pinning (nothing survives the process), or FTP:
//! the caller decides which ports are watched and guarded and what is
//! expected.
//!
//! If the binary was built without the eBPF toolchain (see `build.rs`), the
//! embedded object is empty and [`FlowTracker::start`] returns
//! [`FlowtrackError::Unavailable`]; [`FlowTracker::available`] tells in
//! advance.

mod guard;
mod record;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use aya::maps::{Array, HashMap as AyaHashMap, MapData, MapError, PerCpuArray, RingBuf};
use aya::programs::{
    LinkOrder, ProgramError, SchedClassifier, TcAttachType, Xdp, tc::SchedClassifierLinkId,
    tc::TcAttachOptions, xdp::XdpLinkId, xdp::XdpMode,
};
use aya::sys::SyscallError;
use aya::{Ebpf, EbpfLoader};
use ftp_proxy_common::flow::state;
use ftp_proxy_common::maps::{self as names, ADDR_LOCAL, PORT_WATCHED, counter};
use ftp_proxy_common::{ClosedFlowEvent, ExpectKey, ExpectValue, FlowEvent, FlowKey, FlowValue};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How often the background task drains the closed-flow ring buffer and
/// the eBPF log buffer. The ring holds about 1,700 events: more than
/// ~17,000 closes per second between two drains would overflow it (counted
/// in [`EventCounters::ringbuf_full`]).
const DRAIN_INTERVAL: Duration = Duration::from_millis(100);

pub use guard::{
    Expectation, ExpectationRecord, GuardCounters, GuardLeg, GuardMode, GuardOutcome, LiveEvent,
};
pub use record::{DirectionStats, FlowRecord, FlowState, FlowTimes, Side, monotonic_now};

/// How many live events [`FlowTracker::take_events`] keeps between two
/// takes (oldest dropped first): ten seconds of a busy gateway.
const LIVE_CAPACITY: usize = 65_536;

/// The eBPF object built by `build.rs`; empty when built without the
/// eBPF toolchain.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ftp-proxy-ebpf"));

/// `lo` has this index in every network namespace (`LOOPBACK_IFINDEX`).
const LOOPBACK_IFINDEX: u32 = 1;

/// Target of the logs the eBPF programs write through aya-log.
const EBPF_LOG_TARGET: &str = "ftp_proxy::flowtrack::ebpf";

/// How the tracker is set up. Every bound is here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowtrackOptions {
    /// Interfaces to attach to (by name). Loopback gets the egress program
    /// only (see the module documentation).
    pub interfaces: Vec<String>,
    /// Ports watched from the start (more with [`FlowTracker::watch_port`]).
    pub ports: Vec<u16>,
    /// Capacity of the flow table; the least recently used flow is evicted
    /// when it is full. Default 65,536 (about 10 MiB of kernel memory).
    pub max_flows: u32,
    /// How many closed flows [`FlowTracker::closed`] keeps (oldest dropped
    /// first). Default 4,096.
    pub closed_capacity: usize,
    /// A flow still in its handshake is removed after this long without a
    /// segment. Default 60 s.
    pub syn_timeout: Duration,
    /// A closed or reset flow still in the table (the programs delete
    /// flows as they close, so only after a failed delete) is removed this
    /// long after its last segment. Default 10 s.
    pub closed_timeout: Duration,
    /// An established (or closing) flow is removed after this long without
    /// a segment. Default 1 h.
    pub established_timeout: Duration,
    /// How often the sweeper runs. Default 5 s. It also removes the
    /// guard's expectations past their deadline.
    pub sweep_interval: Duration,
    /// Capacity of the guard's expectation map (entries cost memory only
    /// while they exist). Default 65,536.
    pub max_expectations: u32,
    /// The hook of the ingress program on interfaces other than loopback.
    pub ingress: IngressHook,
}

/// Where the ingress program runs (`--ebpf-ingress`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IngressHook {
    /// A TC classifier on a tcx link: sees the packet as the stack will
    /// (merged segments stay as they are; only the headers are read).
    #[default]
    Tc,
    /// XDP in generic mode: before the packet is an skb of the stack, but
    /// the kernel first copies each merged packet into one flat buffer,
    /// which between hosts cost a third of the relay's throughput (issue
    /// 14's profile, docs/bench-notes.md).
    Xdp,
}

impl Default for FlowtrackOptions {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            ports: Vec::new(),
            max_flows: names::FLOWS_MAX_ENTRIES,
            closed_capacity: 4096,
            syn_timeout: Duration::from_secs(60),
            closed_timeout: Duration::from_secs(10),
            established_timeout: Duration::from_secs(3600),
            sweep_interval: Duration::from_secs(5),
            max_expectations: names::EXPECT_MAX_ENTRIES,
            ingress: IngressHook::default(),
        }
    }
}

/// Whether the daemon runs the tracker (the value of an `--ebpf
/// off|auto|required` option).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EbpfMode {
    /// Never start it.
    Off,
    /// Start it if this binary has the programs and the kernel accepts
    /// them; otherwise log a warning and run without it.
    #[default]
    Auto,
    /// Start it or fail (readiness should then depend on it).
    Required,
}

/// Errors of the flow tracker.
#[derive(Debug, thiserror::Error)]
pub enum FlowtrackError {
    /// The binary was built without the eBPF toolchain: no programs inside.
    #[error(
        "the eBPF flow tracker is not built into this binary (see scripts/install-ebpf-toolchain.sh)"
    )]
    Unavailable,
    /// [`FlowTracker::start`] was called outside a Tokio runtime.
    #[error("the flow tracker needs a Tokio runtime")]
    NoRuntime,
    /// The kernel refused the object (maps or BTF), or it is malformed.
    #[error("loading the eBPF object")]
    Load(#[source] aya::EbpfError),
    /// A map the object must contain is missing or of the wrong type.
    #[error("eBPF map {name}")]
    Map {
        /// Map name.
        name: &'static str,
        /// What went wrong.
        #[source]
        source: MapError,
    },
    /// A program is missing, of the wrong type, or the verifier rejected it.
    #[error("eBPF program {name}")]
    Program {
        /// Program name.
        name: &'static str,
        /// What went wrong.
        #[source]
        source: ProgramError,
    },
    /// The interface does not exist (in this network namespace).
    #[error("interface {interface}")]
    Interface {
        /// Interface name as given.
        interface: String,
        /// The lookup error.
        #[source]
        source: std::io::Error,
    },
    /// Attaching a program to an interface failed (e.g. another XDP
    /// program is already attached).
    #[error("attaching {program} to {interface}")]
    Attach {
        /// Program name.
        program: &'static str,
        /// Interface name.
        interface: String,
        /// The attach error.
        #[source]
        source: ProgramError,
    },
    /// Updating the watched ports failed.
    #[error("watching port {port}")]
    Port {
        /// The port.
        port: u16,
        /// The map error.
        #[source]
        source: MapError,
    },
    /// Inserting or removing an expectation failed; see
    /// [`FlowtrackError::is_map_full`].
    #[error("expectation for {local}")]
    Expect {
        /// The gateway's listener it was for.
        local: SocketAddr,
        /// The map error.
        #[source]
        source: MapError,
    },
    /// Writing the guard's mode or one of the gateway's addresses failed.
    #[error("eBPF map {name}")]
    Guard {
        /// Map name.
        name: &'static str,
        /// The map error.
        #[source]
        source: MapError,
    },
    /// Reading the flow table or the counters failed.
    #[error("reading eBPF map {name}")]
    Read {
        /// Map name.
        name: &'static str,
        /// The map error.
        #[source]
        source: MapError,
    },
}

/// Event and error counters: the kernel's per-CPU counters summed, plus
/// the daemon side's own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EventCounters {
    /// Flows opened by a first SYN (restarts included).
    pub syn: u64,
    /// SYN+ACKs answering a first SYN.
    pub synack: u64,
    /// Handshakes completed.
    pub established: u64,
    /// First FINs (one per direction that closed).
    pub fin: u64,
    /// Flows ended by a RST.
    pub rst: u64,
    /// Flows closed (both FINs acknowledged, or RST).
    pub closed: u64,
    /// Closed flows restarted by a new SYN on the same 5-tuple.
    pub restarts: u64,
    /// Retransmitted first SYNs.
    pub syn_retransmits: u64,
    /// Segments applied to tracked flows.
    pub packets: u64,
    /// Segments on watched ports of no tracked flow (only a SYN opens one).
    pub untracked: u64,
    /// Malformed headers (packet passed untracked).
    pub parse_errors: u64,
    /// Flow inserts that failed with ENOMEM.
    pub insert_enomem: u64,
    /// Flow inserts that failed with E2BIG.
    pub insert_e2big: u64,
    /// Flow inserts that lost a race with another CPU (EEXIST; harmless).
    pub insert_eexist: u64,
    /// Flow inserts that failed with another errno.
    pub insert_other: u64,
    /// Entries gone right after their insert.
    pub lookup_after_insert: u64,
    /// Closed-flow events lost because the ring buffer was full.
    pub ringbuf_full: u64,
    /// Live events lost because their ring buffer was full.
    pub events_full: u64,
    /// Live events dropped from the bounded list of
    /// [`FlowTracker::take_events`] (not taken in time).
    pub events_overflow: u64,
    /// Entries removed by the sweeper.
    pub swept: u64,
    /// Closed flows dropped from the bounded list of [`FlowTracker::closed`].
    pub closed_overflow: u64,
    /// Expectations removed by the sweeper (past their deadline).
    pub expectations_swept: u64,
    /// The guard's verdicts by outcome and leg.
    pub guard: GuardCounters,
}

/// The expiry limits the sweeper applies.
#[derive(Clone, Copy, Debug)]
struct Timeouts {
    syn: Duration,
    closed: Duration,
    established: Duration,
}

impl Timeouts {
    /// Whether a flow idle since `value.last_seen_ns` is expired at `now`.
    fn expired(&self, value: &FlowValue, now: Duration) -> bool {
        let idle = now.saturating_sub(Duration::from_nanos(value.last_seen_ns));
        let limit = match value.state {
            state::NONE | state::SYN_SENT | state::SYN_RECEIVED => self.syn,
            state::CLOSED | state::RESET => self.closed,
            _ => self.established,
        };
        idle > limit
    }
}

/// Records drained from a ring buffer, oldest first, bounded.
struct Bounded<T> {
    records: VecDeque<T>,
    capacity: usize,
    dropped: u64,
}

impl<T> Bounded<T> {
    fn new(capacity: usize) -> Self {
        Self {
            records: VecDeque::new(),
            capacity,
            dropped: 0,
        }
    }

    fn extend(&mut self, batch: Vec<T>) {
        for record in batch {
            if self.records.len() >= self.capacity && self.records.pop_front().is_some() {
                self.dropped += 1;
            }
            if self.capacity > 0 {
                self.records.push_back(record);
            } else {
                self.dropped += 1;
            }
        }
    }
}

/// What the background tasks and the caller share.
struct Shared {
    flows: Mutex<AyaHashMap<MapData, FlowKey, FlowValue>>,
    ports: Mutex<AyaHashMap<MapData, u16, u8>>,
    counters: PerCpuArray<MapData, u64>,
    closed: Mutex<Bounded<FlowRecord>>,
    /// The kernel's closed-flow ring buffer (None if unusable).
    closed_events: Mutex<Option<RingBuf<MapData>>>,
    /// Live events drained from the kernel, until taken.
    live: Mutex<Bounded<LiveEvent>>,
    /// The kernel's live-event ring buffer (None if unusable).
    live_events: Mutex<Option<RingBuf<MapData>>>,
    expect: Mutex<AyaHashMap<MapData, ExpectKey, ExpectValue>>,
    addrs: Mutex<AyaHashMap<MapData, [u8; 16], u8>>,
    guard: Mutex<Array<MapData, u32>>,
    /// aya-log's buffer (None if the object logs nothing).
    logs: Mutex<Option<aya_log::EbpfLogger<TracingLog>>>,
    swept: AtomicU64,
    expectations_swept: AtomicU64,
}

/// A poisoned lock only means a panic elsewhere; the maps are still fine.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Every entry of a kernel hash map, each key once: iterating a map that
/// changes underneath may restart from the first key, and an entry deleted
/// meanwhile is skipped.
fn entries<K: aya::Pod + Ord, V: aya::Pod>(
    map: &AyaHashMap<MapData, K, V>,
    name: &'static str,
) -> Result<BTreeMap<K, V>, FlowtrackError> {
    let mut seen = BTreeMap::new();
    for item in map.iter() {
        match item {
            Ok((key, value)) => {
                seen.insert(key, value);
            }
            Err(err) if is_not_found(&err) => {}
            Err(source) => return Err(FlowtrackError::Read { name, source }),
        }
    }
    Ok(seen)
}

fn is_not_found(err: &MapError) -> bool {
    matches!(err, MapError::KeyNotFound | MapError::ElementNotFound)
        || matches!(err, MapError::SyscallError(SyscallError { io_error, .. })
            if io_error.kind() == std::io::ErrorKind::NotFound)
}

/// Whether a map error says the map is full (E2BIG) or the kernel is out
/// of memory for a new element (ENOMEM).
fn is_full(err: &MapError) -> bool {
    matches!(err, MapError::SyscallError(SyscallError { io_error, .. })
        if matches!(io_error.raw_os_error(), Some(code) if code == rustix::io::Errno::TOOBIG.raw_os_error() || code == rustix::io::Errno::NOMEM.raw_os_error()))
}

impl FlowtrackError {
    /// Whether an insert failed for want of room (the map is full, or the
    /// kernel could not allocate the element): the caller fails open.
    #[must_use]
    pub fn is_map_full(&self) -> bool {
        match self {
            FlowtrackError::Expect { source, .. }
            | FlowtrackError::Guard { source, .. }
            | FlowtrackError::Port { source, .. } => is_full(source),
            _ => false,
        }
    }
}

impl Shared {
    /// Moves the closed-flow events from the kernel ring buffer into the
    /// bounded list.
    fn drain_closed(&self) {
        let mut batch = Vec::new();
        if let Some(events) = lock(&self.closed_events).as_mut() {
            while let Some(item) = events.next() {
                match ClosedFlowEvent::from_bytes(&item) {
                    Some(event) => batch.extend(FlowRecord::decode(&event.key, &event.value)),
                    None => warn!(len = item.len(), "short closed-flow record"),
                }
            }
        }
        if !batch.is_empty() {
            lock(&self.closed).extend(batch);
        }
    }

    /// Moves the live events from the kernel ring buffer into the bounded
    /// list.
    fn drain_live(&self) {
        let mut batch = Vec::new();
        if let Some(events) = lock(&self.live_events).as_mut() {
            while let Some(item) = events.next() {
                match FlowEvent::from_bytes(&item) {
                    Some(event) => batch.extend(LiveEvent::decode(&event)),
                    None => warn!(len = item.len(), "short live-event record"),
                }
            }
        }
        if !batch.is_empty() {
            lock(&self.live).extend(batch);
        }
    }

    fn set_port(&self, port: u16, flags: u8) -> Result<(), FlowtrackError> {
        let mut ports = lock(&self.ports);
        let result = if flags == 0 {
            match ports.remove(&port) {
                Err(err) if is_not_found(&err) => Ok(()),
                other => other,
            }
        } else {
            ports.insert(port, flags, 0)
        };
        result.map_err(|source| FlowtrackError::Port { port, source })
    }

    fn expect(&self, expectation: &Expectation) -> Result<(), FlowtrackError> {
        let (key, value) = expectation.encode();
        lock(&self.expect)
            .insert(key, value, 0)
            .map_err(|source| FlowtrackError::Expect {
                local: expectation.local,
                source,
            })
    }

    fn unexpect(&self, local: SocketAddr) -> Result<(), FlowtrackError> {
        match lock(&self.expect).remove(&guard::expect_key(local)) {
            Err(err) if !is_not_found(&err) => Err(FlowtrackError::Expect { local, source: err }),
            _ => Ok(()),
        }
    }

    fn add_local_address(&self, ip: IpAddr) -> Result<(), FlowtrackError> {
        lock(&self.addrs)
            .insert(guard::address_bytes(ip), ADDR_LOCAL, 0)
            .map_err(|source| FlowtrackError::Guard {
                name: names::ADDRS,
                source,
            })
    }

    fn set_guard_mode(&self, mode: GuardMode) -> Result<(), FlowtrackError> {
        lock(&self.guard)
            .set(0, mode.raw(), 0)
            .map_err(|source| FlowtrackError::Guard {
                name: names::GUARD,
                source,
            })
    }

    /// Removes the expectations whose deadline is before `now`; returns
    /// how many.
    fn sweep_expectations(&self, now: Duration) -> Result<usize, MapError> {
        let mut map = lock(&self.expect);
        let mut expired = Vec::new();
        for item in map.iter() {
            match item {
                Ok((key, value)) if Duration::from_nanos(value.deadline_ns) < now => {
                    expired.push(key);
                }
                Ok(_) => {}
                Err(err) if is_not_found(&err) => {}
                Err(err) => return Err(err),
            }
        }
        let mut removed = 0;
        for key in &expired {
            match map.remove(key) {
                Ok(()) => removed += 1,
                Err(err) if is_not_found(&err) => {}
                Err(err) => return Err(err),
            }
        }
        self.expectations_swept
            .fetch_add(removed as u64, Ordering::Relaxed);
        Ok(removed)
    }

    /// Removes expired entries; returns how many.
    fn sweep(&self, timeouts: &Timeouts, now: Duration) -> Result<usize, MapError> {
        let mut flows = lock(&self.flows);
        let mut expired = Vec::new();
        for item in flows.iter() {
            match item {
                Ok((key, value)) if timeouts.expired(&value, now) => expired.push(key),
                Ok(_) => {}
                // The datapath evicted or the sweeper raced: skip the entry.
                Err(err) if is_not_found(&err) => {}
                Err(err) => return Err(err),
            }
        }
        let mut removed = 0;
        for key in &expired {
            match flows.remove(key) {
                Ok(()) => removed += 1,
                Err(err) if is_not_found(&err) => {}
                Err(err) => return Err(err),
            }
        }
        self.swept.fetch_add(removed as u64, Ordering::Relaxed);
        Ok(removed)
    }
}

/// Changes the port map and the expectations of a running tracker from
/// wherever (a guard's `Drop`); each call does nothing once the tracker is
/// gone. Cheap to clone.
#[derive(Clone, Debug)]
pub struct TrackerHandle(Weak<Shared>);

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl TrackerHandle {
    /// [`FlowTracker::set_port`].
    ///
    /// # Errors
    /// As there.
    pub fn set_port(&self, port: u16, flags: u8) -> Result<(), FlowtrackError> {
        self.0.upgrade().map_or(Ok(()), |s| s.set_port(port, flags))
    }

    /// [`FlowTracker::expect`].
    ///
    /// # Errors
    /// As there.
    pub fn expect(&self, expectation: &Expectation) -> Result<(), FlowtrackError> {
        self.0.upgrade().map_or(Ok(()), |s| s.expect(expectation))
    }

    /// [`FlowTracker::unexpect`].
    ///
    /// # Errors
    /// As there.
    pub fn unexpect(&self, local: SocketAddr) -> Result<(), FlowtrackError> {
        self.0.upgrade().map_or(Ok(()), |s| s.unexpect(local))
    }

    /// [`FlowTracker::add_local_address`].
    ///
    /// # Errors
    /// As there.
    pub fn add_local_address(&self, ip: IpAddr) -> Result<(), FlowtrackError> {
        self.0.upgrade().map_or(Ok(()), |s| s.add_local_address(ip))
    }

    /// [`FlowTracker::set_guard_mode`].
    ///
    /// # Errors
    /// As there.
    pub fn set_guard_mode(&self, mode: GuardMode) -> Result<(), FlowtrackError> {
        self.0.upgrade().map_or(Ok(()), |s| s.set_guard_mode(mode))
    }
}

/// An attached program, detached on drop of the tracker.
enum Attachment {
    Ingress(XdpLinkId),
    IngressTc(SchedClassifierLinkId),
    Egress(SchedClassifierLinkId),
}

/// The running flow tracker. Dropping it detaches the programs and stops
/// the background tasks; [`FlowTracker::shutdown`] does the same and waits
/// for the tasks, so that every kernel object is gone when it returns.
pub struct FlowTracker {
    /// Programs and their links (a Mutex only to make the tracker `Sync`;
    /// nothing uses it after start but Drop and tests).
    ebpf: Mutex<Ebpf>,
    attachments: Vec<(String, Attachment)>,
    /// The ingress hook [`FlowTracker::attach`] uses.
    ingress: IngressHook,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, FlowtrackError> {
    ebpf.take_map(name).ok_or(FlowtrackError::Map {
        name,
        source: MapError::InvalidName { name: name.into() },
    })
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, FlowtrackError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(FlowtrackError::Program {
        name,
        source: ProgramError::InvalidName { name: name.into() },
    })?;
    prog.try_into()
        .map_err(|source| FlowtrackError::Program { name, source })
}

fn if_index(name: &str) -> std::io::Result<u32> {
    let sock = rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::DGRAM,
        None,
    )?;
    Ok(rustix::net::netdevice::name_to_index(&sock, name)?)
}

/// aya-log's level for the programs, from the tracing filter at start.
fn ebpf_log_level() -> u8 {
    use tracing::level_filters::LevelFilter;
    let level = match LevelFilter::current() {
        LevelFilter::OFF => return 0,
        LevelFilter::ERROR => aya_log::Level::Error,
        LevelFilter::WARN => aya_log::Level::Warn,
        LevelFilter::INFO => aya_log::Level::Info,
        LevelFilter::DEBUG => aya_log::Level::Debug,
        LevelFilter::TRACE => aya_log::Level::Trace,
    };
    level as u8
}

impl FlowTracker {
    /// Whether this binary contains the eBPF programs.
    #[must_use]
    pub fn available() -> bool {
        !EBPF_OBJECT.is_empty()
    }

    /// Loads the programs and maps, watches `opts.ports`, attaches to
    /// `opts.interfaces` (XDP generic mode for ingress, tcx for egress; only
    /// egress on loopback), and starts the background tasks (closed-flow
    /// drain, sweeper, eBPF log forwarding) on the current Tokio runtime.
    ///
    /// Needs CAP_BPF and CAP_NET_ADMIN (root). On error nothing stays
    /// attached or loaded.
    ///
    /// # Errors
    /// [`FlowtrackError::Unavailable`] without embedded programs,
    /// [`FlowtrackError::NoRuntime`] outside a runtime, else the load,
    /// verifier, interface or attach failure.
    pub fn start(opts: &FlowtrackOptions) -> Result<Self, FlowtrackError> {
        if !Self::available() {
            return Err(FlowtrackError::Unavailable);
        }
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| FlowtrackError::NoRuntime)?;
        let mut tracker = Self::load(opts)?;
        for interface in &opts.interfaces {
            tracker.attach(interface)?;
        }
        tracker.add_interface_addresses(&opts.interfaces);
        tracker.spawn_tasks(&runtime, opts);
        info!(
            interfaces = ?opts.interfaces,
            ports = opts.ports.len(),
            "flow tracker started"
        );
        Ok(tracker)
    }

    /// [`FlowTracker::start`] according to `mode`: `Ok(None)` when off, or
    /// when `Auto` and the tracker cannot run (not built in, no
    /// privileges, kernel refused, interface missing: logged as a warning
    /// with the reason); `Required` returns the error instead.
    ///
    /// # Errors
    /// Only with [`EbpfMode::Required`]: whatever [`FlowTracker::start`]
    /// returns.
    pub fn start_with_mode(
        mode: EbpfMode,
        opts: &FlowtrackOptions,
    ) -> Result<Option<Self>, FlowtrackError> {
        match mode {
            EbpfMode::Off => Ok(None),
            EbpfMode::Required => Self::start(opts).map(Some),
            EbpfMode::Auto => match Self::start(opts) {
                Ok(tracker) => Ok(Some(tracker)),
                Err(err) => {
                    warn!(
                        error = %ErrorChain(&err),
                        "eBPF flow tracker unavailable; running without it"
                    );
                    Ok(None)
                }
            },
        }
    }

    /// Loads everything, attaches nothing, starts no task.
    fn load(opts: &FlowtrackOptions) -> Result<Self, FlowtrackError> {
        let level = ebpf_log_level();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(names::FLOWS, opts.max_flows)
            .map_max_entries(names::EXPECT, opts.max_expectations.max(1))
            .override_global(aya_log::LEVEL, &level, false)
            .load(EBPF_OBJECT)
            .map_err(FlowtrackError::Load)?;
        let map_err = |name| move |source| FlowtrackError::Map { name, source };
        let flows = AyaHashMap::try_from(take_map(&mut ebpf, names::FLOWS)?)
            .map_err(map_err(names::FLOWS))?;
        let ports = AyaHashMap::try_from(take_map(&mut ebpf, names::PORTS)?)
            .map_err(map_err(names::PORTS))?;
        let counters = PerCpuArray::try_from(take_map(&mut ebpf, names::COUNTERS)?)
            .map_err(map_err(names::COUNTERS))?;
        let expect = AyaHashMap::try_from(take_map(&mut ebpf, names::EXPECT)?)
            .map_err(map_err(names::EXPECT))?;
        let addrs = AyaHashMap::try_from(take_map(&mut ebpf, names::ADDRS)?)
            .map_err(map_err(names::ADDRS))?;
        let guard =
            Array::try_from(take_map(&mut ebpf, names::GUARD)?).map_err(map_err(names::GUARD))?;
        let shared = Arc::new(Shared {
            flows: Mutex::new(flows),
            ports: Mutex::new(ports),
            counters,
            closed: Mutex::new(Bounded::new(opts.closed_capacity)),
            closed_events: Mutex::new(None),
            live: Mutex::new(Bounded::new(LIVE_CAPACITY)),
            live_events: Mutex::new(None),
            expect: Mutex::new(expect),
            addrs: Mutex::new(addrs),
            guard: Mutex::new(guard),
            logs: Mutex::new(None),
            swept: AtomicU64::new(0),
            expectations_swept: AtomicU64::new(0),
        });
        program::<Xdp>(&mut ebpf, names::PROG_INGRESS)?
            .load()
            .map_err(|source| FlowtrackError::Program {
                name: names::PROG_INGRESS,
                source,
            })?;
        program::<SchedClassifier>(&mut ebpf, names::PROG_INGRESS_TC)?
            .load()
            .map_err(|source| FlowtrackError::Program {
                name: names::PROG_INGRESS_TC,
                source,
            })?;
        program::<SchedClassifier>(&mut ebpf, names::PROG_EGRESS)?
            .load()
            .map_err(|source| FlowtrackError::Program {
                name: names::PROG_EGRESS,
                source,
            })?;
        let tracker = Self {
            ebpf: Mutex::new(ebpf),
            attachments: Vec::new(),
            ingress: opts.ingress,
            shared,
            cancel: CancellationToken::new(),
            tasks: Vec::new(),
        };
        for &port in &opts.ports {
            tracker.watch_port(port)?;
        }
        Ok(tracker)
    }

    fn attach(&mut self, interface: &str) -> Result<(), FlowtrackError> {
        let ifindex = if_index(interface).map_err(|source| FlowtrackError::Interface {
            interface: interface.to_owned(),
            source,
        })?;
        let attach_err = |program| {
            move |source| FlowtrackError::Attach {
                program,
                interface: interface.to_owned(),
                source,
            }
        };
        let mut ebpf = lock(&self.ebpf);
        // Loopback: egress only (each packet would be seen twice otherwise).
        if ifindex != LOOPBACK_IFINDEX {
            let attachment = match self.ingress {
                IngressHook::Xdp => Attachment::Ingress(
                    program::<Xdp>(&mut ebpf, names::PROG_INGRESS)?
                        .attach_to_if_index(ifindex, XdpMode::Skb)
                        .map_err(attach_err(names::PROG_INGRESS))?,
                ),
                // First in the chain, as egress: a later program may
                // redirect what it sees.
                IngressHook::Tc => Attachment::IngressTc(
                    program::<SchedClassifier>(&mut ebpf, names::PROG_INGRESS_TC)?
                        .attach_with_options(
                            interface,
                            TcAttachType::Ingress,
                            TcAttachOptions::TcxOrder(LinkOrder::first()),
                        )
                        .map_err(attach_err(names::PROG_INGRESS_TC))?,
                ),
            };
            self.attachments.push((interface.to_owned(), attachment));
        }
        // First in the tcx chain: we only observe and return TCX_NEXT, so
        // being first lets us see packets a later program may redirect.
        let id = program::<SchedClassifier>(&mut ebpf, names::PROG_EGRESS)?
            .attach_with_options(
                interface,
                TcAttachType::Egress,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .map_err(attach_err(names::PROG_EGRESS))?;
        self.attachments
            .push((interface.to_owned(), Attachment::Egress(id)));
        debug!(
            interface,
            ifindex,
            loopback = ifindex == LOOPBACK_IFINDEX,
            "flow tracker attached"
        );
        Ok(())
    }

    fn spawn_tasks(&mut self, runtime: &tokio::runtime::Handle, opts: &FlowtrackOptions) {
        let mut ebpf = lock(&self.ebpf);
        match aya_log::EbpfLogger::init_with_logger(&mut ebpf, TracingLog) {
            Ok(logger) => *lock(&self.shared.logs) = Some(logger),
            Err(err) => warn!(error = %err, "eBPF logs unavailable"),
        }
        match ebpf.take_map(names::CLOSED).map(RingBuf::try_from) {
            Some(Ok(ring)) => *lock(&self.shared.closed_events) = Some(ring),
            Some(Err(err)) => warn!(error = %err, "closed-flow ring buffer unusable"),
            None => warn!("closed-flow ring buffer missing"),
        }
        match ebpf.take_map(names::EVENTS).map(RingBuf::try_from) {
            Some(Ok(ring)) => *lock(&self.shared.live_events) = Some(ring),
            Some(Err(err)) => warn!(error = %err, "live-event ring buffer unusable"),
            None => warn!("live-event ring buffer missing"),
        }
        drop(ebpf);
        let timeouts = Timeouts {
            syn: opts.syn_timeout,
            closed: opts.closed_timeout,
            established: opts.established_timeout,
        };
        // The tasks hold weak references: dropping the tracker frees the
        // maps at once, whether or not the runtime has run the aborts yet.
        let shared = Arc::downgrade(&self.shared);
        self.tasks
            .push(runtime.spawn(drain(shared.clone(), self.cancel.clone())));
        self.tasks.push(runtime.spawn(sweep(
            shared,
            timeouts,
            opts.sweep_interval,
            self.cancel.clone(),
        )));
    }

    /// Starts tracking flows with `port` as source or destination port
    /// (without guarding it: [`FlowTracker::set_port`] does both).
    ///
    /// # Errors
    /// [`FlowtrackError::Port`] if the map update fails.
    pub fn watch_port(&self, port: u16) -> Result<(), FlowtrackError> {
        self.shared.set_port(port, PORT_WATCHED)
    }

    /// Sets the port map's flags of `port` (`ftp_proxy_common::maps::port`:
    /// watched, guarded for a leg); 0 removes it (not an error when it
    /// was not there).
    ///
    /// # Errors
    /// [`FlowtrackError::Port`] if the map update fails.
    pub fn set_port(&self, port: u16, flags: u8) -> Result<(), FlowtrackError> {
        self.shared.set_port(port, flags)
    }

    /// The port map's flags of `port` (0 when absent).
    ///
    /// # Errors
    /// [`FlowtrackError::Port`] if the map cannot be read.
    pub fn port_flags(&self, port: u16) -> Result<u8, FlowtrackError> {
        match lock(&self.shared.ports).get(&port, 0) {
            Ok(flags) => Ok(flags),
            Err(err) if is_not_found(&err) => Ok(0),
            Err(source) => Err(FlowtrackError::Port { port, source }),
        }
    }

    /// Sets what the XDP program does with SYNs to guarded ports.
    ///
    /// # Errors
    /// [`FlowtrackError::Guard`] if the map update fails.
    pub fn set_guard_mode(&self, mode: GuardMode) -> Result<(), FlowtrackError> {
        self.shared.set_guard_mode(mode)
    }

    /// Inserts (or replaces) the expectation of `expectation.local`.
    ///
    /// # Errors
    /// [`FlowtrackError::Expect`]; [`FlowtrackError::is_map_full`] tells a
    /// full map from other failures.
    pub fn expect(&self, expectation: &Expectation) -> Result<(), FlowtrackError> {
        self.shared.expect(expectation)
    }

    /// Removes the expectation of the listener at `local` (not an error
    /// when there is none).
    ///
    /// # Errors
    /// [`FlowtrackError::Expect`] if the map update fails.
    pub fn unexpect(&self, local: SocketAddr) -> Result<(), FlowtrackError> {
        self.shared.unexpect(local)
    }

    /// Adds `ip` to the gateway's own addresses: a SYN to a guarded port of
    /// another address is forwarded traffic and never refused for want of
    /// an expectation. [`FlowTracker::start`] adds the addresses of the
    /// interfaces it attaches to.
    ///
    /// # Errors
    /// [`FlowtrackError::Guard`] if the map update fails.
    pub fn add_local_address(&self, ip: IpAddr) -> Result<(), FlowtrackError> {
        self.shared.add_local_address(ip)
    }

    fn add_interface_addresses(&self, interfaces: &[String]) {
        let addrs = match if_addrs::get_if_addrs() {
            Ok(addrs) => addrs,
            Err(err) => {
                warn!(error = %err, "cannot list the interfaces' addresses");
                return;
            }
        };
        for a in addrs.iter().filter(|a| interfaces.contains(&a.name)) {
            if let Err(err) = self.add_local_address(a.ip()) {
                warn!(address = %a.ip(), error = %ErrorChain(&err), "flow tracker: cannot record a local address");
            }
        }
    }

    /// A handle for changing the watched ports and the expectations from
    /// elsewhere (a guard's `Drop`); it does nothing once the tracker is
    /// gone.
    #[must_use]
    pub fn handle(&self) -> TrackerHandle {
        TrackerHandle(Arc::downgrade(&self.shared))
    }

    /// The expectations in the kernel now, pending and claimed.
    ///
    /// # Errors
    /// [`FlowtrackError::Read`] if the map cannot be read.
    pub fn expectations(&self) -> Result<Vec<ExpectationRecord>, FlowtrackError> {
        let seen = entries(&lock(&self.shared.expect), names::EXPECT)?;
        Ok(seen
            .iter()
            .filter_map(|(key, value)| ExpectationRecord::decode(key, value))
            .collect())
    }

    /// The live events since the last call (drained from the kernel now,
    /// and every 100 ms by a background task), oldest first; at most
    /// 65,536 are kept between two calls (the rest are counted in
    /// [`EventCounters::events_overflow`]).
    #[must_use]
    pub fn take_events(&self) -> Vec<LiveEvent> {
        self.shared.drain_live();
        lock(&self.shared.live).records.drain(..).collect()
    }

    /// Stops opening flows on `port`. Flows already tracked on it stop
    /// being updated (unless their other port is watched) and expire.
    /// Unwatching a port that is not watched is not an error.
    ///
    /// # Errors
    /// [`FlowtrackError::Port`] if the map update fails.
    pub fn unwatch_port(&self, port: u16) -> Result<(), FlowtrackError> {
        match lock(&self.shared.ports).remove(&port) {
            Err(err) if !is_not_found(&err) => Err(FlowtrackError::Port { port, source: err }),
            _ => Ok(()),
        }
    }

    /// Whether flows on `port` are tracked now.
    ///
    /// # Errors
    /// [`FlowtrackError::Port`] if the map cannot be read.
    pub fn is_watched(&self, port: u16) -> Result<bool, FlowtrackError> {
        match lock(&self.shared.ports).get(&port, 0) {
            Ok(_) => Ok(true),
            Err(err) if is_not_found(&err) => Ok(false),
            Err(source) => Err(FlowtrackError::Port { port, source }),
        }
    }

    /// The live flows, read from the flow table (a flow leaves it when it
    /// closes: closed flows are in [`FlowTracker::closed`]). Synchronous:
    /// two system calls per entry (about a millisecond per thousand
    /// flows).
    ///
    /// # Errors
    /// [`FlowtrackError::Read`] if the table cannot be read.
    pub fn snapshot(&self) -> Result<Vec<FlowRecord>, FlowtrackError> {
        let seen = entries(&lock(&self.shared.flows), names::FLOWS)?;
        Ok(seen
            .iter()
            .filter_map(|(key, value)| FlowRecord::decode(key, value))
            .collect())
    }

    /// The most recently closed flows (oldest first), drained from the
    /// kernel's ring buffer (now, and every 100 ms by a background task);
    /// at most
    /// [`FlowtrackOptions::closed_capacity`]. Not drained: see
    /// [`FlowTracker::take_closed`].
    #[must_use]
    pub fn closed(&self) -> Vec<FlowRecord> {
        self.shared.drain_closed();
        lock(&self.shared.closed).records.iter().copied().collect()
    }

    /// Like [`FlowTracker::closed`], and empties the list.
    #[must_use]
    pub fn take_closed(&self) -> Vec<FlowRecord> {
        self.shared.drain_closed();
        lock(&self.shared.closed).records.drain(..).collect()
    }

    /// The event and error counters, summed over CPUs.
    ///
    /// # Errors
    /// [`FlowtrackError::Read`] if the counters cannot be read.
    pub fn counters(&self) -> Result<EventCounters, FlowtrackError> {
        let sum = |index: u32| {
            self.shared
                .counters
                .get(&index, 0)
                .map(|per_cpu| per_cpu.iter().fold(0u64, |acc, v| acc.wrapping_add(*v)))
                .map_err(|source| FlowtrackError::Read {
                    name: names::COUNTERS,
                    source,
                })
        };
        Ok(EventCounters {
            syn: sum(counter::SYN)?,
            synack: sum(counter::SYNACK)?,
            established: sum(counter::ESTABLISHED)?,
            fin: sum(counter::FIN)?,
            rst: sum(counter::RST)?,
            closed: sum(counter::CLOSED)?,
            restarts: sum(counter::RESTART)?,
            syn_retransmits: sum(counter::SYN_RETRANSMIT)?,
            packets: sum(counter::PACKETS)?,
            untracked: sum(counter::UNTRACKED)?,
            parse_errors: sum(counter::PARSE_ERROR)?,
            insert_enomem: sum(counter::INSERT_ENOMEM)?,
            insert_e2big: sum(counter::INSERT_E2BIG)?,
            insert_eexist: sum(counter::INSERT_EEXIST)?,
            insert_other: sum(counter::INSERT_OTHER)?,
            lookup_after_insert: sum(counter::LOOKUP_AFTER_INSERT)?,
            ringbuf_full: sum(counter::RINGBUF_FULL)?,
            events_full: sum(counter::EVENTS_FULL)?,
            events_overflow: lock(&self.shared.live).dropped,
            swept: self.shared.swept.load(Ordering::Relaxed),
            closed_overflow: lock(&self.shared.closed).dropped,
            expectations_swept: self.shared.expectations_swept.load(Ordering::Relaxed),
            guard: {
                let mut guard = GuardCounters::default();
                for outcome in GuardOutcome::ALL {
                    for leg in GuardLeg::ALL {
                        guard.set(outcome, leg, sum(outcome.counter(leg))?);
                    }
                }
                guard
            },
        })
    }

    /// Removes the expectations past their deadline now (the sweeper does
    /// it every [`FlowtrackOptions::sweep_interval`]); returns how many.
    ///
    /// # Errors
    /// [`FlowtrackError::Read`] if the map cannot be read or updated.
    pub fn sweep_expectations_now(&self) -> Result<usize, FlowtrackError> {
        self.shared
            .sweep_expectations(monotonic_now())
            .map_err(|source| FlowtrackError::Read {
                name: names::EXPECT,
                source,
            })
    }

    /// Runs the sweeper once now (it also runs every
    /// [`FlowtrackOptions::sweep_interval`]); returns how many entries it
    /// removed.
    ///
    /// # Errors
    /// [`FlowtrackError::Read`] if the table cannot be read or updated.
    pub fn sweep_now(&self, opts: &FlowtrackOptions) -> Result<usize, FlowtrackError> {
        let timeouts = Timeouts {
            syn: opts.syn_timeout,
            closed: opts.closed_timeout,
            established: opts.established_timeout,
        };
        self.shared
            .sweep(&timeouts, monotonic_now())
            .map_err(|source| FlowtrackError::Read {
                name: names::FLOWS,
                source,
            })
    }

    /// Detaches everything and waits for the background tasks to finish:
    /// when this returns, no program, link or map of the tracker is left in
    /// the kernel. Dropping the tracker does the same without waiting (the
    /// tasks only hold weak references, so the maps go with the tracker
    /// unless a task is in the middle of a tick).
    pub async fn shutdown(mut self) {
        self.detach_all();
        self.cancel.cancel();
        for task in std::mem::take(&mut self.tasks) {
            if let Err(err) = task.await {
                warn!(error = %err, "flow tracker task failed");
            }
        }
        drop(self);
    }

    fn detach_all(&mut self) {
        let mut ebpf = lock(&self.ebpf);
        for (interface, attachment) in self.attachments.drain(..) {
            let result = match attachment {
                Attachment::Ingress(id) => {
                    program::<Xdp>(&mut ebpf, names::PROG_INGRESS).and_then(|p| {
                        p.detach(id).map_err(|source| FlowtrackError::Program {
                            name: names::PROG_INGRESS,
                            source,
                        })
                    })
                }
                Attachment::IngressTc(id) => {
                    program::<SchedClassifier>(&mut ebpf, names::PROG_INGRESS_TC).and_then(|p| {
                        p.detach(id).map_err(|source| FlowtrackError::Program {
                            name: names::PROG_INGRESS_TC,
                            source,
                        })
                    })
                }
                Attachment::Egress(id) => program::<SchedClassifier>(&mut ebpf, names::PROG_EGRESS)
                    .and_then(|p| {
                        p.detach(id).map_err(|source| FlowtrackError::Program {
                            name: names::PROG_EGRESS,
                            source,
                        })
                    }),
            };
            if let Err(err) = result {
                warn!(interface, error = %err, "flow tracker detach failed");
            }
        }
    }
}

impl Drop for FlowTracker {
    fn drop(&mut self) {
        self.detach_all();
        self.cancel.cancel();
        for task in &self.tasks {
            task.abort();
        }
        // The programs (and any link left) go with `ebpf`, the maps with
        // `shared` (the tasks only hold weak references).
    }
}

/// Every [`DRAIN_INTERVAL`]: closed flows into the list, eBPF logs into
/// tracing. A timer rather than epoll: tokio's `AsyncFd` constructors are
/// `unsafe` (I/O safety) and this crate forbids unsafe code; 100 ms of
/// latency does not matter for either.
async fn drain(shared: Weak<Shared>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.drain_closed();
        shared.drain_live();
        if let Some(logs) = lock(&shared.logs).as_mut() {
            logs.flush();
        }
    }
}

/// Removes expired flows every `interval` until cancelled.
async fn sweep(
    shared: Weak<Shared>,
    timeouts: Timeouts,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match shared.sweep(&timeouts, monotonic_now()) {
            Ok(0) => {}
            Ok(removed) => debug!(removed, "flow tracker swept expired flows"),
            Err(err) => warn!(error = %err, "flow tracker sweep failed"),
        }
        match shared.sweep_expectations(monotonic_now()) {
            Ok(0) => {}
            Ok(removed) => debug!(removed, "flow tracker swept expired expectations"),
            Err(err) => warn!(error = %err, "flow tracker expectation sweep failed"),
        }
    }
}

/// Displays an error with its sources: `a: b: c`.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(err) = source {
            write!(f, ": {err}")?;
            source = err.source();
        }
        Ok(())
    }
}

/// aya-log speaks the `log` crate; this passes its records to `tracing`
/// under the target `ftp_proxy::flowtrack::ebpf`.
struct TracingLog;

impl log::Log for TracingLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: EBPF_LOG_TARGET, "{message}"),
            log::Level::Warn => tracing::warn!(target: EBPF_LOG_TARGET, "{message}"),
            log::Level::Info => tracing::info!(target: EBPF_LOG_TARGET, "{message}"),
            log::Level::Debug => tracing::debug!(target: EBPF_LOG_TARGET, "{message}"),
            log::Level::Trace => tracing::trace!(target: EBPF_LOG_TARGET, "{message}"),
        }
    }

    fn flush(&self) {}
}
