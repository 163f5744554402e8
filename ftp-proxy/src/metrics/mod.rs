//! Metrics: owns the gateway's Prometheus registry and every metric in it.
//!
//! Other modules call typed methods (`metrics.rejected(Reject::Bounce)`);
//! names and labels are built only here. Every label comes from a bounded
//! set: never an address, a user name or a path.

pub mod http;

use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Why the gateway refused something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// PORT/EPRT naming another host (RFC 2577 bounce).
    Bounce,
    /// PORT/EPRT or 227/229 naming a port below 1024.
    LowPort,
    /// A data connection from an unexpected address.
    PortTheft,
    /// A server's 227/229 naming another host.
    ServerPassiveAddress,
    /// The session limit.
    MaxSessions,
    /// The per-client session limit.
    MaxSessionsPerClient,
    /// No free port in a data port range.
    PortPoolExhausted,
    /// A command line too long or malformed.
    BadInput,
    /// The control connection was idle too long.
    IdleTimeout,
}

impl Reject {
    fn label(self) -> &'static str {
        match self {
            Reject::Bounce => "bounce",
            Reject::LowPort => "low_port",
            Reject::PortTheft => "port_theft",
            Reject::ServerPassiveAddress => "server_passive_address",
            Reject::MaxSessions => "max_sessions",
            Reject::MaxSessionsPerClient => "max_sessions_per_client",
            Reject::PortPoolExhausted => "port_pool_exhausted",
            Reject::BadInput => "bad_input",
            Reject::IdleTimeout => "idle_timeout",
        }
    }
}

/// Which data leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// Gateway ⇄ client.
    Client,
    /// Gateway ⇄ server.
    Server,
}

/// Who opened a data connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataMode {
    /// The gateway listened (PASV/EPSV toward the client, PORT/EPRT toward the server).
    Listen,
    /// The gateway connected.
    Connect,
}

/// How a transfer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferResult {
    /// 2xx from the server and every byte relayed.
    Ok,
    /// Anything else.
    Failed,
    /// Aborted by the client.
    Aborted,
}

/// Which TCP connection of a session a kernel-observed flow is.
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
}

/// TCP states as the flow tracker reports them.
pub const TCP_STATES: [&str; 7] = [
    "syn_sent",
    "syn_received",
    "established",
    "fin_wait",
    "closing",
    "closed",
    "reset",
];
/// TCP events the flow tracker counts.
pub const TCP_EVENTS: [&str; 5] = ["syn", "synack", "established", "fin", "rst"];

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionOutcome {
    /// QUIT or the client closed.
    Ok,
    /// The server could not be reached or failed.
    ServerError,
    /// The client misbehaved or its connection failed.
    ClientError,
    /// Timed out.
    Timeout,
    /// The gateway was shutting down.
    Shutdown,
}

/// The gateway's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sessions_active: IntGauge,
    sessions_total: IntCounterVec,
    commands_total: IntCounterVec,
    replies_total: IntCounterVec,
    data_connections_total: IntCounterVec,
    transfers_total: IntCounterVec,
    transfer_bytes_total: IntCounterVec,
    transfer_duration: Histogram,
    data_setup: Histogram,
    upstream_connect: Histogram,
    upstream_errors_total: IntCounterVec,
    rejected_total: IntCounterVec,
    relay_total: IntCounterVec,
    nat_rewrites_total: IntCounter,
    logins_total: IntCounterVec,
    ebpf_status: IntGauge,
    tcp_flows: IntGaugeVec,
    tcp_events_total: IntCounterVec,
    tcp_handshake: HistogramVec,
    flowtrack_map_errors_total: IntCounterVec,
}

/// Registering a metric failed: a programming error (duplicate name).
#[derive(Debug, thiserror::Error)]
#[error("registering metric: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    /// A fresh registry with every metric registered.
    ///
    /// # Errors
    /// [`MetricsError`] if a metric cannot be registered.
    pub fn new() -> Result<Metrics, MetricsError> {
        let registry = Registry::new_custom(Some("ftp_proxy".to_owned()), None)?;
        let counter_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, MetricsError> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let histogram =
            |name: &str, help: &str, buckets: Vec<f64>| -> Result<Histogram, MetricsError> {
                let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };
        let latency = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let sessions_active = IntGauge::new("sessions_active", "Client sessions open now")?;
        registry.register(Box::new(sessions_active.clone()))?;
        let nat_rewrites_total = IntCounter::new(
            "nat_rewrites_total",
            "PORT/EPRT naming a private address answered by connecting to the client's observed address",
        )?;
        registry.register(Box::new(nat_rewrites_total.clone()))?;
        let tcp_flows = IntGaugeVec::new(
            Opts::new(
                "tcp_flows",
                "TCP flows the kernel tracker sees now, by leg and state",
            ),
            &["leg", "state"],
        )?;
        registry.register(Box::new(tcp_flows.clone()))?;
        let tcp_handshake = HistogramVec::new(
            HistogramOpts::new(
                "tcp_handshake_seconds",
                "SYN to established, as the kernel saw it, by leg",
            )
            .buckets(vec![
                0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 3.0,
            ]),
            &["leg"],
        )?;
        registry.register(Box::new(tcp_handshake.clone()))?;
        let ebpf_status = IntGauge::new(
            "ebpf_status",
            "1 when the eBPF flow tracker is attached, 0 when not",
        )?;
        registry.register(Box::new(ebpf_status.clone()))?;
        let metrics = Metrics {
            sessions_active,
            sessions_total: counter_vec(
                "sessions_total",
                "Client sessions ended, by outcome",
                &["outcome"],
            )?,
            commands_total: counter_vec(
                "commands_total",
                "Client commands, by verb (unknown verbs as OTHER)",
                &["command"],
            )?,
            replies_total: counter_vec(
                "replies_total",
                "Replies sent to clients, by class",
                &["class"],
            )?,
            data_connections_total: counter_vec(
                "data_connections_total",
                "Data connections established, by leg and mode",
                &["leg", "mode"],
            )?,
            transfers_total: counter_vec(
                "transfers_total",
                "Transfers, by direction and result",
                &["direction", "result"],
            )?,
            transfer_bytes_total: counter_vec(
                "transfer_bytes_total",
                "Bytes relayed on data connections, by direction",
                &["direction"],
            )?,
            transfer_duration: histogram(
                "transfer_duration_seconds",
                "Time from the server's 1xx to the final reply",
                vec![
                    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
                ],
            )?,
            data_setup: histogram(
                "data_setup_seconds",
                "Time to establish both data connections of a transfer",
                latency.clone(),
            )?,
            upstream_connect: histogram(
                "upstream_connect_seconds",
                "Time to connect to the server and read its banner",
                latency,
            )?,
            upstream_errors_total: counter_vec(
                "upstream_errors_total",
                "Failures talking to the server, by reason",
                &["reason"],
            )?,
            rejected_total: counter_vec(
                "rejected_total",
                "Things refused by the gateway, by reason",
                &["reason"],
            )?,
            relay_total: counter_vec("relay_total", "Data relay directions, by mode", &["mode"])?,
            nat_rewrites_total,
            logins_total: counter_vec("logins_total", "Login attempts, by result", &["result"])?,
            ebpf_status,
            tcp_events_total: counter_vec(
                "tcp_events_total",
                "TCP events seen by the kernel tracker, by leg",
                &["leg", "event"],
            )?,
            flowtrack_map_errors_total: counter_vec(
                "flowtrack_map_errors_total",
                "Flow tracker map failures, by reason",
                &["reason"],
            )?,
            tcp_flows,
            tcp_handshake,
            registry,
        };
        metrics.touch_series();
        Ok(metrics)
    }

    /// Creates every bounded series at zero, so that dashboards and alerts
    /// see them before the first event.
    fn touch_series(&self) {
        for leg in TcpLeg::ALL {
            for state in TCP_STATES {
                self.tcp_flows
                    .with_label_values(&[leg.label(), state])
                    .set(0);
            }
            for event in TCP_EVENTS {
                self.tcp_events_total
                    .with_label_values(&[leg.label(), event]);
            }
            self.tcp_handshake.with_label_values(&[leg.label()]);
        }
        for (direction, result) in [
            ("upload", "ok"),
            ("upload", "failed"),
            ("upload", "aborted"),
            ("download", "ok"),
            ("download", "failed"),
            ("download", "aborted"),
        ] {
            self.transfers_total.with_label_values(&[direction, result]);
            self.transfer_bytes_total.with_label_values(&[direction]);
        }
        for reason in [
            Reject::Bounce,
            Reject::LowPort,
            Reject::PortTheft,
            Reject::ServerPassiveAddress,
            Reject::MaxSessions,
            Reject::MaxSessionsPerClient,
            Reject::PortPoolExhausted,
            Reject::BadInput,
            Reject::IdleTimeout,
        ] {
            self.rejected_total.with_label_values(&[reason.label()]);
        }
        for reason in ["connect", "data_setup"] {
            self.upstream_errors_total.with_label_values(&[reason]);
        }
        for result in ["ok", "failed"] {
            self.logins_total.with_label_values(&[result]);
        }
        for mode in ["splice", "copy"] {
            self.relay_total.with_label_values(&[mode]);
        }
        for reason in ["insert", "lookup", "parse"] {
            self.flowtrack_map_errors_total.with_label_values(&[reason]);
        }
    }

    /// The number of flows per leg and state, replacing the previous figures.
    pub fn set_tcp_flows(&self, counts: &[(TcpLeg, &'static str, i64)]) {
        for leg in TcpLeg::ALL {
            for state in TCP_STATES {
                let n = counts
                    .iter()
                    .filter(|(l, s, _)| *l == leg && *s == state)
                    .map(|(_, _, n)| n)
                    .sum();
                self.tcp_flows
                    .with_label_values(&[leg.label(), state])
                    .set(n);
            }
        }
    }

    /// TCP events of one kind seen on a leg.
    pub fn tcp_events(&self, leg: TcpLeg, event: &'static str, n: u64) {
        self.tcp_events_total
            .with_label_values(&[leg.label(), event])
            .inc_by(n);
    }

    /// A handshake the kernel saw complete.
    pub fn tcp_handshake(&self, leg: TcpLeg, took: Duration) {
        self.tcp_handshake
            .with_label_values(&[leg.label()])
            .observe(took.as_secs_f64());
    }

    /// Flow tracker map failures.
    pub fn flowtrack_map_errors(&self, reason: &'static str, n: u64) {
        self.flowtrack_map_errors_total
            .with_label_values(&[reason])
            .inc_by(n);
    }

    /// The registry, for exposition.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }

    /// A session started.
    pub fn session_started(&self) {
        self.sessions_active.inc();
    }

    /// A session ended.
    pub fn session_ended(&self, outcome: SessionOutcome) {
        self.sessions_active.dec();
        let label = match outcome {
            SessionOutcome::Ok => "ok",
            SessionOutcome::ServerError => "server_error",
            SessionOutcome::ClientError => "client_error",
            SessionOutcome::Timeout => "timeout",
            SessionOutcome::Shutdown => "shutdown",
        };
        self.sessions_total.with_label_values(&[label]).inc();
    }

    /// A client command was received.
    pub fn command(&self, verb: &crate::protocol::Verb) {
        self.commands_total.with_label_values(&[verb.label()]).inc();
    }

    /// A reply was sent to the client.
    pub fn reply(&self, code: u16) {
        let class = match code / 100 {
            1 => "1xx",
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            _ => "5xx",
        };
        self.replies_total.with_label_values(&[class]).inc();
    }

    /// Something was refused.
    pub fn rejected(&self, reason: Reject) {
        self.rejected_total
            .with_label_values(&[reason.label()])
            .inc();
    }

    /// A NAT traversal rewrite was done.
    pub fn nat_rewrite(&self) {
        self.nat_rewrites_total.inc();
    }

    /// A login attempt ended (the reply to PASS, or to USER when no password is asked).
    pub fn login(&self, ok: bool) {
        self.logins_total
            .with_label_values(&[if ok { "ok" } else { "failed" }])
            .inc();
    }

    /// Whether the flow tracker is attached.
    pub fn set_ebpf_status(&self, attached: bool) {
        self.ebpf_status.set(i64::from(attached));
    }

    /// A data connection was established.
    pub fn data_connection(&self, leg: Leg, mode: DataMode) {
        let leg = match leg {
            Leg::Client => "client",
            Leg::Server => "server",
        };
        let mode = match mode {
            DataMode::Listen => "listen",
            DataMode::Connect => "connect",
        };
        self.data_connections_total
            .with_label_values(&[leg, mode])
            .inc();
    }

    /// Both data connections of a transfer were established.
    pub fn data_setup(&self, took: Duration) {
        self.data_setup.observe(took.as_secs_f64());
    }

    /// The server was reached.
    pub fn upstream_connected(&self, took: Duration) {
        self.upstream_connect.observe(took.as_secs_f64());
    }

    /// Talking to the server failed.
    pub fn upstream_error(&self, reason: &'static str) {
        self.upstream_errors_total
            .with_label_values(&[reason])
            .inc();
    }

    /// A relay direction finished, with the method used.
    pub fn relay_used(&self, method: crate::relay::Method) {
        self.relay_total.with_label_values(&[method.label()]).inc();
    }

    /// A transfer ended.
    pub fn transfer_finished(
        &self,
        upload: bool,
        result: TransferResult,
        bytes: u64,
        took: Duration,
    ) {
        let direction = if upload { "upload" } else { "download" };
        let result = match result {
            TransferResult::Ok => "ok",
            TransferResult::Failed => "failed",
            TransferResult::Aborted => "aborted",
        };
        self.transfers_total
            .with_label_values(&[direction, result])
            .inc();
        self.transfer_bytes_total
            .with_label_values(&[direction])
            .inc_by(bytes);
        self.transfer_duration.observe(took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_prefixed_names_and_bounded_labels() {
        let m = Metrics::new().unwrap();
        m.rejected(Reject::Bounce);
        m.transfer_finished(false, TransferResult::Ok, 42, Duration::from_millis(3));
        let text = m.encode();
        assert!(
            text.contains("ftp_proxy_rejected_total{reason=\"bounce\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ftp_proxy_transfer_bytes_total{direction=\"download\"} 42"),
            "{text}"
        );
    }
}
