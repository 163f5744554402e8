//! The kernel's view of the gateway's TCP flows, joined with FTP.
//!
//! Owns: which ports the flow tracker watches (fixed ones from the
//! configuration, dynamic ones held by sessions while they use them), the
//! join of the tracker's records with the sessions' legs, the bounded list
//! of recently closed flows, the `/flows` document, and the `tcp_*` metrics.
//!
//! Does not touch aya: it uses [`crate::flowtrack`]'s API. Works without a
//! tracker (everything is then empty and `ebpf` says `off`).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

pub(crate) mod legs;

use crate::flowtrack::{EventCounters, FlowRecord, FlowState, FlowTracker, Side};
use crate::metrics::Metrics;
use crate::session::{Connection, ConnectionObserver, Guard};
use legs::{LegRegistry, Owner};

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
    /// The closed-flow ring buffer was full: a closed flow was lost.
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

/// Closed flows kept for `/flows`.
const MAX_CLOSED: usize = 1024;
/// How long a dynamic port stays watched after its last user is gone, so
/// that the last segments of its flows are still seen.
const UNWATCH_DELAY: Duration = Duration::from_secs(10);
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
    flows: Vec<JoinedFlow>,
    closed: Vec<&'a JoinedFlow>,
    counters: Option<EventCounters>,
}

#[derive(Debug, Default)]
struct Watches {
    users: HashMap<u16, usize>,
    fixed: Vec<u16>,
    idle_since: HashMap<u16, Instant>,
}

/// The joined view; shared by the sessions, the HTTP endpoint and the
/// refresh task.
pub struct FlowView {
    tracker: Option<FlowTracker>,
    legs: LegRegistry,
    metrics: Arc<Metrics>,
    closed: Mutex<VecDeque<JoinedFlow>>,
    watches: Arc<Mutex<Watches>>,
    last_counters: Mutex<EventCounters>,
}

impl std::fmt::Debug for FlowView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowView")
            .field("attached", &self.tracker.is_some())
            .finish_non_exhaustive()
    }
}

/// A port watched while this value lives.
#[derive(Debug)]
pub(crate) struct PortWatch {
    watches: Arc<Mutex<Watches>>,
    port: u16,
}

impl Drop for PortWatch {
    fn drop(&mut self) {
        if let Ok(mut w) = self.watches.lock()
            && let Some(n) = w.users.get_mut(&self.port)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                w.users.remove(&self.port);
                w.idle_since.insert(self.port, Instant::now());
            }
        }
    }
}

fn leg_of(owner: Option<Owner>) -> TcpLeg {
    owner.map_or(TcpLeg::Unknown, |o| TcpLeg::of(o.connection))
}

impl FlowView {
    /// A view over `tracker` (None: no tracker), watching `fixed_ports` for good.
    pub fn new(
        tracker: Option<FlowTracker>,
        fixed_ports: Vec<u16>,
        metrics: Arc<Metrics>,
    ) -> FlowView {
        metrics.set_ebpf_status(tracker.is_some());
        if let Some(t) = &tracker {
            for &port in &fixed_ports {
                if let Err(e) = t.watch_port(port) {
                    warn!(port, error = %e, "flow tracker: cannot watch port");
                }
            }
        }
        FlowView {
            tracker,
            legs: LegRegistry::default(),
            metrics,
            closed: Mutex::new(VecDeque::new()),
            watches: Arc::new(Mutex::new(Watches {
                fixed: fixed_ports,
                ..Watches::default()
            })),
            last_counters: Mutex::new(EventCounters::default()),
        }
    }

    /// Whether a tracker is attached.
    pub fn attached(&self) -> bool {
        self.tracker.is_some()
    }

    /// Watches `port` (a data port chosen at run time) while the returned
    /// value lives; None without a tracker.
    pub(crate) fn watch(&self, port: u16) -> Option<PortWatch> {
        let tracker = self.tracker.as_ref()?;
        let mut w = self.watches.lock().ok()?;
        if w.fixed.contains(&port) {
            return None;
        }
        let users = w.users.entry(port).or_insert(0);
        *users += 1;
        let first_user = *users == 1;
        // A port whose last user left less than UNWATCH_DELAY ago is still
        // in the kernel's set: a busy server hands out the same few passive
        // ports over and over, one system call saved per transfer.
        let still_watched = w.idle_since.remove(&port).is_some();
        // The kernel's set is changed under the lock, so that a concurrent
        // unwatch of the same port (in `refresh`) cannot undo this watch.
        if first_user
            && !still_watched
            && let Err(e) = tracker.watch_port(port)
        {
            debug!(port, error = %e, "flow tracker: cannot watch port");
        }
        drop(w);
        Some(PortWatch {
            watches: Arc::clone(&self.watches),
            port,
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

    /// The `/flows` document: live flows, recently closed flows, counters.
    pub fn document(&self) -> String {
        let Some(tracker) = &self.tracker else {
            return "{\"ebpf\":\"off\",\"flows\":[],\"closed\":[],\"counters\":null}".to_owned();
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
            flows,
            closed: closed.iter().collect(),
            counters: tracker.counters().ok(),
        };
        serde_json::to_string(&doc).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// Takes the flows closed since the last look: joins them, counts
    /// their events, keeps them for `/flows`.
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
            let joined = self.join(record);
            let leg = leg_of(self.legs.owner(record.client, record.server));
            let times = &record.times;
            for (seen, event) in [
                (times.first_syn.is_some(), TcpEvent::Syn),
                (times.syn_ack.is_some(), TcpEvent::SynAck),
                (times.established.is_some(), TcpEvent::Established),
                (record.reset_by.is_some(), TcpEvent::Rst),
            ] {
                if seen {
                    self.metrics.tcp_events(leg, event, 1);
                }
            }
            let fins = u64::from(record.from_client.fin) + u64::from(record.from_server.fin);
            if fins > 0 {
                self.metrics.tcp_events(leg, TcpEvent::Fin, fins);
            }
            if let (Some(syn), Some(est)) = (times.first_syn, times.established) {
                self.metrics.tcp_handshake(leg, est.saturating_sub(syn));
            }
            closed.push_back(joined);
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

    /// The cheap part, every second: closed flows (from the ring buffer),
    /// the error counters, and ports to stop watching.
    fn refresh(&self) {
        let Some(tracker) = &self.tracker else { return };
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
                    c.ringbuf_full
                }),
            ];
            for (reason, count) in counts {
                self.metrics
                    .flowtrack_map_errors(reason, count(&now).saturating_sub(count(&last)));
            }
            *last = now;
        }
        self.unwatch_idle_ports(UNWATCH_DELAY);
    }

    /// Dynamic ports nobody used for `delay` stop being watched.
    fn unwatch_idle_ports(&self, delay: Duration) {
        let Some(tracker) = &self.tracker else { return };
        let Ok(mut w) = self.watches.lock() else {
            return;
        };
        let due: Vec<u16> = w
            .idle_since
            .iter()
            .filter(|(_, at)| at.elapsed() >= delay)
            .map(|(p, _)| *p)
            .collect();
        for port in due {
            w.idle_since.remove(&port);
            if let Err(e) = tracker.unwatch_port(port) {
                debug!(port, error = %e, "flow tracker: cannot unwatch port");
            }
        }
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
                &FlowView::new(None, Vec::new(), Arc::new(Metrics::new().unwrap())).document()
            )
            .unwrap()
            .contains("off")
        );
    }
}
