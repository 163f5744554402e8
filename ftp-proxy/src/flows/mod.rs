//! The kernel's view of the gateway's TCP flows, joined with FTP.
//!
//! Owns: which ports the flow tracker watches and guards (fixed ones from
//! the configuration, dynamic ones held by sessions while they use them:
//! [`ports`]), the guard's expectations (sessions announce their data
//! listeners through [`ConnectionObserver::expect`]), the join of the
//! tracker's records and live events with the sessions' legs, the bounded
//! list of recently closed flows, the `/flows` document, and the `tcp_*`
//! and `ebpf_guard_*` metrics.
//!
//! Does not touch aya: it uses [`crate::flowtrack`]'s API. Works without a
//! tracker (everything is then empty and `ebpf` says `off`).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

pub(crate) mod legs;
pub(crate) mod ports;

use crate::flowtrack::{
    EventCounters, Expectation, ExpectationRecord, FlowRecord, FlowState, FlowTracker, GuardLeg,
    GuardOutcome, LiveEvent, Side, monotonic_now,
};
use crate::metrics::Metrics;
use crate::session::{Connection, ConnectionObserver, Guard};
use legs::{LegRegistry, Owner};
use ports::{ExpectGuard, PortWatch, Ports, SharedPorts};
pub use ports::{FailOpen, GuardConfig};

/// Which TCP connection of a session a kernel-observed flow is: the label
/// of the `tcp_*` metrics and of `/flows`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TcpLeg {
    /// Client ⇄ gateway control connection.
    ClientControl,
    /// Gateway ⇄ server control connection.
    ServerControl,
    /// Client ⇄ gateway data connection.
    ClientData,
    /// Gateway ⇄ server data connection.
    ServerData,
    /// A flow on the gateway's ports not (yet) joined with a session.
    Unknown,
}

impl TcpLeg {
    /// Every leg.
    pub const ALL: [TcpLeg; 5] = [
        TcpLeg::ClientControl,
        TcpLeg::ServerControl,
        TcpLeg::ClientData,
        TcpLeg::ServerData,
        TcpLeg::Unknown,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            TcpLeg::ClientControl => "client_control",
            TcpLeg::ServerControl => "server_control",
            TcpLeg::ClientData => "client_data",
            TcpLeg::ServerData => "server_data",
            TcpLeg::Unknown => "unknown",
        }
    }

    fn of(connection: Connection) -> TcpLeg {
        match connection {
            Connection::ClientControl => TcpLeg::ClientControl,
            Connection::ServerControl => TcpLeg::ServerControl,
            Connection::ClientData => TcpLeg::ClientData,
            Connection::ServerData => TcpLeg::ServerData,
        }
    }
}

/// TCP events the tracker counts (`tcp_events_total{event}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpEvent {
    /// The first SYN.
    Syn,
    /// The SYN+ACK.
    SynAck,
    /// The handshake completed.
    Established,
    /// A FIN, per direction.
    Fin,
    /// A reset.
    Rst,
}

impl TcpEvent {
    /// Every event.
    pub const ALL: [TcpEvent; 5] = [
        TcpEvent::Syn,
        TcpEvent::SynAck,
        TcpEvent::Established,
        TcpEvent::Fin,
        TcpEvent::Rst,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            TcpEvent::Syn => "syn",
            TcpEvent::SynAck => "synack",
            TcpEvent::Established => "established",
            TcpEvent::Fin => "fin",
            TcpEvent::Rst => "rst",
        }
    }
}

/// Failures of the tracker's maps (`flowtrack_map_errors_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapErrorReason {
    /// A flow could not be inserted (table full, or another error).
    Insert,
    /// A flow just inserted could not be found again.
    Lookup,
    /// A packet's headers could not be parsed.
    Parse,
    /// A ring buffer was full: a closed flow or a live event was lost.
    RingbufFull,
}

impl MapErrorReason {
    /// Every reason.
    pub const ALL: [MapErrorReason; 4] = [
        MapErrorReason::Insert,
        MapErrorReason::Lookup,
        MapErrorReason::Parse,
        MapErrorReason::RingbufFull,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            MapErrorReason::Insert => "insert",
            MapErrorReason::Lookup => "lookup",
            MapErrorReason::Parse => "parse",
            MapErrorReason::RingbufFull => "ringbuf_full",
        }
    }
}

/// The `leg` label of a guarded data port's listeners.
pub(crate) fn guard_leg_label(leg: GuardLeg) -> &'static str {
    match leg {
        GuardLeg::Client => TcpLeg::ClientData.label(),
        GuardLeg::Server => TcpLeg::ServerData.label(),
    }
}

/// Closed flows kept for `/flows`.
const MAX_CLOSED: usize = 1024;
/// How long a dynamic port stays watched after its last user is gone, so
/// that the last segments of its flows are still seen.
const UNWATCH_DELAY: Duration = Duration::from_secs(10);
/// How long a live event of a connection no session has registered yet
/// waits for it (a data connection is registered once accepted, after its
/// handshake) before it is counted as `unknown`.
const JOIN_GRACE: Duration = Duration::from_secs(2);
/// Live events waiting for their connection's registration, at most.
const MAX_PENDING_EVENTS: usize = 65_536;
/// How often the metrics are refreshed from the tracker.
const REFRESH: Duration = Duration::from_secs(1);

/// A flow with its session and leg.
#[derive(Debug, Clone, Serialize)]
pub struct JoinedFlow {
    /// The session, when the flow is one of a session's connections.
    pub session_id: Option<u64>,
    /// Which connection of the session (`unknown` when not joined).
    pub leg: &'static str,
    /// Who sent the first FIN: `gateway`, `client` or `server` (the FTP
    /// peer on that leg), or none yet.
    pub closed_first_by: Option<&'static str>,
    /// The session's client when a load balancer's PROXY header named it
    /// (the flow's client-side peer is then the balancer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxied_client: Option<SocketAddr>,
    /// SYN to established, in milliseconds.
    pub handshake_ms: Option<f64>,
    /// The kernel's record.
    #[serde(flatten)]
    pub record: FlowRecord,
}

#[derive(Serialize)]
struct Document<'a> {
    ebpf: &'static str,
    guard: GuardDocument,
    flows: Vec<JoinedFlow>,
    closed: Vec<&'a JoinedFlow>,
    counters: Option<EventCounters>,
}

/// The guard in `/flows`: its mode and the expectations in the kernel.
#[derive(Serialize)]
struct GuardDocument {
    mode: &'static str,
    expectations: Vec<PendingExpectation>,
}

/// An expectation as `/flows` shows it.
#[derive(Serialize)]
struct PendingExpectation {
    /// The gateway's listener.
    local: SocketAddr,
    /// Who may connect.
    peer: IpAddr,
    /// `client_data` or `server_data`.
    leg: &'static str,
    session_id: u64,
    /// `pending` or `claimed`.
    state: &'static str,
    /// The peer's source port of the connection that claimed it.
    claimed_by: Option<u16>,
    /// Milliseconds until it expires (negative: expired, not yet swept).
    expires_in_ms: i64,
}

impl PendingExpectation {
    fn of(r: &ExpectationRecord, now: Duration) -> PendingExpectation {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        PendingExpectation {
            local: r.local,
            peer: r.peer,
            leg: guard_leg_label(r.leg),
            session_id: r.session_id,
            state: if r.claimed_by.is_some() {
                "claimed"
            } else {
                "pending"
            },
            claimed_by: r.claimed_by,
            expires_in_ms: if r.deadline >= now {
                ms(r.deadline - now)
            } else {
                -ms(now - r.deadline)
            },
        }
    }
}

/// The joined view; shared by the sessions, the HTTP endpoint and the
/// refresh task.
pub struct FlowView {
    tracker: Option<FlowTracker>,
    legs: LegRegistry,
    metrics: Arc<Metrics>,
    closed: Mutex<VecDeque<JoinedFlow>>,
    ports: SharedPorts,
    last_counters: Mutex<EventCounters>,
    /// Live events whose connection no session registered yet.
    pending_events: Mutex<VecDeque<LiveEvent>>,
}

impl std::fmt::Debug for FlowView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowView")
            .field("attached", &self.tracker.is_some())
            .finish_non_exhaustive()
    }
}

fn leg_of(owner: Option<Owner>) -> TcpLeg {
    owner.map_or(TcpLeg::Unknown, |o| TcpLeg::of(o.connection))
}

impl FlowView {
    /// A view over `tracker` (None: no tracker), watching `fixed_ports` for
    /// good, with the guard as `guard` says.
    pub fn new(
        tracker: Option<FlowTracker>,
        fixed_ports: Vec<u16>,
        guard: GuardConfig,
        metrics: Arc<Metrics>,
    ) -> FlowView {
        metrics.set_ebpf_status(tracker.is_some());
        let ports = Ports::new(
            tracker.as_ref().map(FlowTracker::handle),
            fixed_ports,
            guard,
            Arc::clone(&metrics),
        );
        FlowView {
            tracker,
            legs: LegRegistry::default(),
            metrics,
            closed: Mutex::new(VecDeque::new()),
            ports: Arc::new(Mutex::new(ports)),
            last_counters: Mutex::new(EventCounters::default()),
            pending_events: Mutex::new(VecDeque::new()),
        }
    }

    /// Applies a reloaded configuration's guard: its mode (expectations
    /// announced while it was off are inserted before anything is
    /// guarded) and its port ranges.
    pub fn reconfigure_guard(&self, guard: GuardConfig) {
        ports::lock(&self.ports).reconfigure(guard);
    }

    /// Whether a tracker is attached.
    pub fn attached(&self) -> bool {
        self.tracker.is_some()
    }

    /// Watches `port` (a data port chosen at run time) while the returned
    /// value lives; None without a tracker.
    pub(crate) fn watch(&self, port: u16) -> Option<PortWatch> {
        self.tracker.as_ref()?;
        // The kernel's set is changed under the lock, so that a concurrent
        // unwatch of the same port (in `refresh`) cannot undo this watch.
        ports::lock(&self.ports).watch(port).then(|| PortWatch {
            ports: Arc::clone(&self.ports),
            port,
        })
    }

    /// Expects a data connection to the gateway's listener at `local`
    /// from `peer` until `deadline`, while the returned value lives (and
    /// watches its port meanwhile); None without a tracker.
    pub(crate) fn expect_connection(
        &self,
        session: u64,
        leg: GuardLeg,
        local: SocketAddr,
        peer: IpAddr,
        deadline: std::time::Instant,
    ) -> Option<ExpectGuard> {
        self.tracker.as_ref()?;
        let local = SocketAddr::new(local.ip().to_canonical(), local.port());
        let expectation = Expectation {
            local,
            peer: peer.to_canonical(),
            deadline: monotonic_now()
                + deadline.saturating_duration_since(std::time::Instant::now()),
            session_id: session,
            leg,
        };
        let id = ports::lock(&self.ports).expect(expectation);
        Some(ExpectGuard {
            ports: Arc::clone(&self.ports),
            local,
            id,
        })
    }

    fn join(&self, record: FlowRecord) -> JoinedFlow {
        let owner = self.legs.owner(record.client, record.server);
        let leg = leg_of(owner);
        let closed_first_by = record.first_fin.map(|side| {
            let addr = match side {
                Side::Client => record.client,
                Side::Server => record.server,
            };
            match owner {
                Some(o) if SocketAddr::new(addr.ip().to_canonical(), addr.port()) == o.local => {
                    "gateway"
                }
                Some(o)
                    if matches!(
                        o.connection,
                        Connection::ServerControl | Connection::ServerData
                    ) =>
                {
                    "server"
                }
                Some(_) => "client",
                None => side.label(),
            }
        });
        let handshake_ms = match (record.times.first_syn, record.times.established) {
            (Some(syn), Some(est)) => Some(est.saturating_sub(syn).as_secs_f64() * 1000.0),
            _ => None,
        };
        JoinedFlow {
            session_id: owner.map(|o| o.session_id),
            proxied_client: owner.and_then(|o| o.client),
            leg: leg.label(),
            closed_first_by,
            handshake_ms,
            record,
        }
    }

    /// The `/flows` document: the guard and its expectations, live flows,
    /// recently closed flows, counters.
    pub fn document(&self) -> String {
        let Some(tracker) = &self.tracker else {
            return "{\"ebpf\":\"off\",\"guard\":{\"mode\":\"off\",\"expectations\":[]},\"flows\":[],\"closed\":[],\"counters\":null}".to_owned();
        };
        let now = monotonic_now();
        let guard = GuardDocument {
            mode: ports::lock(&self.ports).mode().label(),
            expectations: tracker
                .expectations()
                .unwrap_or_default()
                .iter()
                .map(|r| PendingExpectation::of(r, now))
                .collect(),
        };
        self.collect_closed();
        let flows = tracker
            .snapshot()
            .unwrap_or_default()
            .into_iter()
            .map(|r| self.join(r))
            .collect();
        let closed = self
            .closed
            .lock()
            .map(|c| c.iter().cloned().collect::<Vec<_>>())
            .unwrap_or_default();
        let doc = Document {
            ebpf: "on",
            guard,
            flows,
            closed: closed.iter().collect(),
            counters: tracker.counters().ok(),
        };
        serde_json::to_string(&doc).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// Takes the flows closed since the last look: joins them, keeps them
    /// for `/flows`. (Their events were counted as they happened:
    /// [`FlowView::count_events`].)
    fn collect_closed(&self) {
        let Some(tracker) = &self.tracker else { return };
        let fresh = tracker.take_closed();
        if fresh.is_empty() {
            return;
        }
        let Ok(mut closed) = self.closed.lock() else {
            return;
        };
        for record in fresh {
            closed.push_back(self.join(record));
            while closed.len() > MAX_CLOSED {
                closed.pop_front();
            }
        }
    }

    /// Sets the `tcp_flows` gauges from the live flow table. Called when
    /// `/metrics` is scraped rather than on a timer: reading the table
    /// costs two system calls per live flow (9,000 idle sessions are
    /// 18,000 flows), which a scrape every 15 s or so can afford and a
    /// once-a-second refresh would pay for nothing.
    pub fn refresh_flow_gauges(&self) {
        let Some(tracker) = &self.tracker else { return };
        if let Ok(snapshot) = tracker.snapshot() {
            let mut counts: HashMap<(TcpLeg, FlowState), i64> = HashMap::new();
            for record in &snapshot {
                let leg = leg_of(self.legs.owner(record.client, record.server));
                *counts.entry((leg, record.state)).or_default() += 1;
            }
            let counts: Vec<_> = counts
                .into_iter()
                .map(|((leg, state), n)| (leg, state, n))
                .collect();
            self.metrics.set_tcp_flows(&counts);
        }
    }

    /// Counts the live events since the last look by leg, as they
    /// happened (so a long transfer's handshake is counted when it is
    /// done, not when the transfer ends). An event of a connection not yet
    /// registered by its session waits up to [`JOIN_GRACE`] for it.
    fn count_events(&self) {
        let Some(tracker) = &self.tracker else { return };
        let fresh = tracker.take_events();
        let Ok(mut pending) = self.pending_events.lock() else {
            return;
        };
        pending.extend(fresh);
        let now = monotonic_now();
        let mut waiting = VecDeque::new();
        let overflow = pending.len().saturating_sub(MAX_PENDING_EVENTS);
        for (i, event) in pending.drain(..).enumerate() {
            let owner = self.legs.owner(event.from, event.to);
            if owner.is_none() && i >= overflow && now.saturating_sub(event.at) < JOIN_GRACE {
                waiting.push_back(event);
                continue;
            }
            let leg = leg_of(owner);
            for (seen, kind) in [
                (event.syn, TcpEvent::Syn),
                (event.syn_ack, TcpEvent::SynAck),
                (event.established, TcpEvent::Established),
                (event.fin, TcpEvent::Fin),
                (event.rst, TcpEvent::Rst),
            ] {
                if seen {
                    self.metrics.tcp_events(leg, kind, 1);
                }
            }
            if let Some(took) = event.handshake {
                self.metrics.tcp_handshake(leg, took);
            }
        }
        *pending = waiting;
    }

    /// The cheap part, every second: live events and closed flows (from
    /// the ring buffers), the error and guard counters, and ports to stop
    /// watching.
    fn refresh(&self) {
        let Some(tracker) = &self.tracker else { return };
        self.count_events();
        self.collect_closed();
        if let (Ok(now), Ok(mut last)) = (tracker.counters(), self.last_counters.lock()) {
            let inserts: fn(&EventCounters) -> u64 =
                |c| c.insert_enomem + c.insert_e2big + c.insert_other;
            type Count = fn(&EventCounters) -> u64;
            let counts: [(MapErrorReason, Count); 4] = [
                (MapErrorReason::Insert, inserts),
                (MapErrorReason::Lookup, |c: &EventCounters| {
                    c.lookup_after_insert
                }),
                (MapErrorReason::Parse, |c: &EventCounters| c.parse_errors),
                (MapErrorReason::RingbufFull, |c: &EventCounters| {
                    c.ringbuf_full + c.events_full + c.events_overflow
                }),
            ];
            for (reason, count) in counts {
                self.metrics
                    .flowtrack_map_errors(reason, count(&now).saturating_sub(count(&last)));
            }
            for leg in GuardLeg::ALL {
                for outcome in GuardOutcome::ALL {
                    let n = now
                        .guard
                        .get(outcome, leg)
                        .saturating_sub(last.guard.get(outcome, leg));
                    if n > 0 {
                        self.metrics.guard_verdicts(leg, outcome, n);
                    }
                }
            }
            *last = now;
        }
        self.unwatch_idle_ports(UNWATCH_DELAY);
    }

    /// Dynamic ports nobody used for `delay` stop being watched.
    fn unwatch_idle_ports(&self, delay: Duration) {
        if self.tracker.is_none() {
            return;
        }
        ports::lock(&self.ports).unwatch_idle(delay);
    }

    /// Refreshes the closed-flow metrics every second until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        if self.tracker.is_none() {
            return;
        }
        let mut tick = tokio::time::interval(REFRESH);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => self.refresh(),
            }
        }
        self.refresh();
    }

    /// States of the live flows, for tests and the CLI.
    pub fn live_states(&self) -> Vec<FlowState> {
        self.tracker
            .as_ref()
            .and_then(|t| t.snapshot().ok())
            .unwrap_or_default()
            .iter()
            .map(|r| r.state)
            .collect()
    }
}

/// Sessions report their connections and data ports through this; with
/// no tracker attached nothing is recorded (nobody would read it).
impl ConnectionObserver for FlowView {
    fn watch_port(&self, port: u16) -> Guard {
        match self.watch(port) {
            Some(watch) => Box::new(watch),
            None => Box::new(()),
        }
    }

    fn expect(
        &self,
        session: u64,
        connection: Connection,
        local: SocketAddr,
        peer: IpAddr,
        deadline: std::time::Instant,
    ) -> Guard {
        let leg = match connection {
            Connection::ClientData => GuardLeg::Client,
            Connection::ServerData => GuardLeg::Server,
            Connection::ClientControl | Connection::ServerControl => {
                return self.watch_port(local.port());
            }
        };
        match self.expect_connection(session, leg, local, peer, deadline) {
            Some(guard) => Box::new(guard),
            None => Box::new(()),
        }
    }

    fn register(
        &self,
        session: u64,
        connection: Connection,
        local: SocketAddr,
        peer: SocketAddr,
        client: Option<SocketAddr>,
    ) -> Guard {
        if self.tracker.is_none() {
            return Box::new(());
        }
        Box::new(self.legs.register(session, connection, local, peer, client))
    }
}

/// Renders a `/flows` document as a table for `ftp-proxy flows`.
///
/// # Errors
/// A message when the document is not the JSON `/flows` serves.
pub fn render_table(document: &str) -> Result<String, String> {
    use std::fmt::Write as _;
    let doc: serde_json::Value =
        serde_json::from_str(document).map_err(|e| format!("not a /flows document: {e}"))?;
    let mut out = String::new();
    let ebpf = doc.get("ebpf").and_then(|v| v.as_str()).unwrap_or("?");
    let _ = writeln!(out, "eBPF flow tracker: {ebpf}");
    let guard = doc.get("guard");
    let mode = guard
        .and_then(|g| g.get("mode"))
        .and_then(|v| v.as_str())
        .unwrap_or("?");
    let expectations = guard
        .and_then(|g| g.get("expectations"))
        .and_then(|v| v.as_array())
        .cloned()
        .unwrap_or_default();
    let _ = writeln!(out, "guard: {mode}, {} expectation(s)", expectations.len());
    if !expectations.is_empty() {
        let _ = writeln!(
            out,
            "{:<8} {:<12} {:<47} {:<40} {:<8} {:>10}",
            "SESSION", "LEG", "GATEWAY LISTENER", "EXPECTED PEER", "STATE", "EXPIRES MS"
        );
        for e in &expectations {
            let text = |k: &str| {
                e.get(k)
                    .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                    .unwrap_or_default()
            };
            let _ = writeln!(
                out,
                "{:<8} {:<12} {:<47} {:<40} {:<8} {:>10}",
                text("session_id"),
                text("leg"),
                text("local"),
                text("peer"),
                text("state"),
                text("expires_in_ms")
            );
        }
    }
    let _ = writeln!(
        out,
        "{:<8} {:<15} {:<47} {:<12} {:>12} {:>12} {:>10} {:<8}",
        "SESSION",
        "LEG",
        "CLIENT -> SERVER (TCP)",
        "STATE",
        "BYTES C>S",
        "BYTES S>C",
        "HS MS",
        "FIN 1ST"
    );
    for (title, key) in [("live", "flows"), ("recently closed", "closed")] {
        let rows = doc
            .get(key)
            .and_then(|v| v.as_array())
            .cloned()
            .unwrap_or_default();
        let _ = writeln!(out, "-- {title}: {}", rows.len());
        for row in rows {
            let text = |k: &str| {
                row.get(k)
                    .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                    .unwrap_or_default()
            };
            let bytes = |k: &str| {
                row.get(k)
                    .and_then(|d| d.get("bytes"))
                    .and_then(|b| b.as_u64())
                    .unwrap_or(0)
            };
            let session = row
                .get("session_id")
                .and_then(|v| v.as_u64())
                .map_or_else(|| "-".to_owned(), |v| v.to_string());
            let handshake = row
                .get("handshake_ms")
                .and_then(|v| v.as_f64())
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"));
            let first = row
                .get("closed_first_by")
                .and_then(|v| v.as_str())
                .unwrap_or("-")
                .to_owned();
            let _ = writeln!(
                out,
                "{:<8} {:<15} {:<47} {:<12} {:>12} {:>12} {:>10} {:<8}",
                session,
                text("leg"),
                format!("{} -> {}", text("client"), text("server")),
                text("state"),
                bytes("from_client"),
                bytes("from_server"),
                handshake,
                first
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dynamic watches: the kernel's set gets a port with its first user,
    /// keeps it while users come and go within the delay, and loses it
    /// only after the delay with no user; fixed ports are never touched.
    #[tokio::test]
    #[ignore = "privileged tier (root, the eBPF object): cargo xtask test runs it"]
    async fn dynamic_ports_are_watched_while_used_and_a_while_after() {
        let tracker = FlowTracker::start(&crate::flowtrack::FlowtrackOptions::default())
            .expect("the flow tracker (root and the embedded eBPF object)");
        let view = Arc::new(FlowView::new(
            Some(tracker),
            vec![2121],
            GuardConfig::default(),
            Arc::new(Metrics::new().unwrap()),
        ));
        let kernel = |port| view.tracker.as_ref().unwrap().is_watched(port).unwrap();
        assert!(kernel(2121));
        assert!(view.watch(2121).is_none(), "fixed ports need no watch");
        assert!(!kernel(40001));
        let first = view.watch(40001).unwrap();
        let second = view.watch(40001).unwrap();
        assert!(kernel(40001));
        drop(first);
        drop(second);
        // Idle, within the delay: still watched; a new user takes it back.
        view.unwatch_idle_ports(Duration::from_secs(3600));
        assert!(kernel(40001));
        let again = view.watch(40001).unwrap();
        view.unwatch_idle_ports(Duration::ZERO);
        assert!(kernel(40001), "in use: never unwatched");
        drop(again);
        view.unwatch_idle_ports(Duration::ZERO);
        assert!(!kernel(40001));
        assert!(kernel(2121));
    }

    /// The guard through the view: expectations reach the kernel before
    /// the session announces anything and leave it with their listener;
    /// a full map makes the port fail open (counted) while that listener
    /// lives; a reload from off inserts what was announced before it.
    #[tokio::test]
    #[ignore = "privileged tier (root, the eBPF object): cargo xtask test runs it"]
    async fn expectations_fail_open_and_follow_reloads() {
        use crate::flowtrack::tests::{Frame, require};
        use ftp_proxy_common::maps::port;
        require();
        let tracker = FlowTracker::start(&crate::flowtrack::FlowtrackOptions {
            max_expectations: 1,
            ..crate::flowtrack::FlowtrackOptions::default()
        })
        .unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let view = FlowView::new(
            Some(tracker),
            vec![21],
            GuardConfig {
                mode: crate::flowtrack::GuardMode::Enforce,
                client_ports: Some(50_000..=50_009),
                server_ports: None,
            },
            Arc::clone(&metrics),
        );
        let t = view.tracker.as_ref().unwrap();
        let written = |p| ports::lock(&view.ports).written(p);
        assert_eq!(written(21), port::WATCHED);
        assert_eq!(written(50_009), port::WATCHED | port::GUARD_CLIENT);
        let later = std::time::Instant::now() + Duration::from_secs(60);
        let local: SocketAddr = "10.0.0.1:50001".parse().unwrap();
        let client: IpAddr = "10.0.0.2".parse().unwrap();
        let first = view.expect(1, Connection::ClientData, local, client, later);
        assert_eq!(t.expectations().unwrap().len(), 1);
        assert_eq!(ports::lock(&view.ports).held().len(), 1);
        // The map holds one: the next listener fails open.
        let other: SocketAddr = "10.0.0.1:50002".parse().unwrap();
        let second = view.expect(2, Connection::ClientData, other, client, later);
        assert_eq!(written(50_002), port::WATCHED, "no guard bit: fails open");
        let thief = Frame::syn("10.0.0.66:41000", "10.0.0.1:50002").bytes();
        assert_eq!(t.test_run_ingress(&thief), 2, "XDP_PASS");
        let text = metrics.encode();
        assert!(
            text.contains(
                "ftp_proxy_ebpf_guard_fail_open_total{leg=\"client_data\",reason=\"map_full\"} 1"
            ),
            "{text}"
        );
        // The guarded one still refuses the thief.
        let thief = Frame::syn("10.0.0.66:41000", "10.0.0.1:50001").bytes();
        assert_eq!(t.test_run_ingress(&thief), 1, "XDP_DROP");
        drop(second);
        assert_eq!(written(50_002), port::WATCHED | port::GUARD_CLIENT);
        drop(first);
        assert!(t.expectations().unwrap().is_empty());
        // An ephemeral listener (outside the range) is guarded while its
        // expectation lives.
        let ephemeral: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let server: IpAddr = "10.0.0.3".parse().unwrap();
        let g = view.expect(3, Connection::ServerData, ephemeral, server, later);
        assert_eq!(written(40_000), port::WATCHED | port::GUARD_SERVER);
        let doc: serde_json::Value = serde_json::from_str(&view.document()).unwrap();
        assert_eq!(doc["guard"]["mode"], "enforce");
        assert_eq!(doc["guard"]["expectations"][0]["leg"], "server_data");
        assert_eq!(doc["guard"]["expectations"][0]["state"], "pending");
        assert_eq!(doc["guard"]["expectations"][0]["peer"], "10.0.0.3");
        drop(g);
        assert_eq!(written(40_000), port::WATCHED);
        // Off, an announcement, then a reload to enforce: the expectation
        // is in the kernel before its port is guarded.
        view.reconfigure_guard(GuardConfig::default_off());
        assert_eq!(written(50_009), port::WATCHED);
        let g = view.expect(4, Connection::ClientData, local, client, later);
        assert!(t.expectations().unwrap().is_empty());
        view.reconfigure_guard(GuardConfig {
            mode: crate::flowtrack::GuardMode::Enforce,
            client_ports: Some(50_000..=50_009),
            server_ports: None,
        });
        assert_eq!(t.expectations().unwrap().len(), 1);
        let client_syn = Frame::syn("10.0.0.2:42000", "10.0.0.1:50001").bytes();
        assert_eq!(t.test_run_ingress(&client_syn), 2, "XDP_PASS");
        drop(g);
        let text = metrics.encode();
        assert!(
            text.contains("ftp_proxy_ebpf_guard_mode{mode=\"enforce\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ftp_proxy_ebpf_guard_expectations 0"),
            "{text}"
        );
    }

    #[test]
    fn renders_a_document() {
        let doc = r#"{"ebpf":"on","flows":[{"session_id":3,"leg":"client_data","closed_first_by":"gateway","handshake_ms":0.05,
            "client":"127.0.0.1:20","server":"127.0.0.1:5001","state":"closed","from_client":{"bytes":42},"from_server":{"bytes":0}}],"closed":[]}"#;
        let table = render_table(doc).unwrap();
        assert!(
            table.contains("client_data")
                && table.contains("127.0.0.1:20 -> 127.0.0.1:5001")
                && table.contains("gateway"),
            "{table}"
        );
        assert!(render_table("nope").is_err());
        assert!(
            render_table(
                &FlowView::new(
                    None,
                    Vec::new(),
                    GuardConfig::default(),
                    Arc::new(Metrics::new().unwrap())
                )
                .document()
            )
            .unwrap()
            .contains("off")
        );
    }
}
