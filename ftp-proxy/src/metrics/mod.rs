//! Metrics: owns the gateway's Prometheus registry and every metric in it.
//!
//! Other modules call typed methods (`metrics.rejected(Reject::Bounce)`);
//! names and labels are built only here. Every label comes from a bounded
//! set: never an address, a user name or a path.

pub(crate) mod http;

use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::flows::{FailOpen, MapErrorReason, TcpEvent, TcpLeg, guard_leg_label};
use crate::flowtrack::{FlowState, GuardLeg, GuardMode, GuardOutcome};
use crate::protocol::policy::Reject;
use crate::protocol::{Side, Verb};
use crate::relay::Method;
use crate::session::data::{DataError, DataErrorKind, DataMode};
use crate::session::state::LoginResult;
use crate::session::transfer::{TransferKind, TransferResult};
use crate::session::{SessionOutcome, UpstreamFailure};
use crate::tls::{Handshake, Protection, TlsError, TlsFailure, TlsVersion};

/// How a TLS handshake ended (`tls_handshakes_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HandshakeOutcome {
    Full,
    Resumed,
    Failed,
}

impl HandshakeOutcome {
    const ALL: [HandshakeOutcome; 3] = [
        HandshakeOutcome::Full,
        HandshakeOutcome::Resumed,
        HandshakeOutcome::Failed,
    ];

    fn label(self) -> &'static str {
        match self {
            HandshakeOutcome::Full => "full",
            HandshakeOutcome::Resumed => "resumed",
            HandshakeOutcome::Failed => "failed",
        }
    }
}
use crate::upstream::ServerName;
use crate::upstream::proxy_protocol::Rejection;

/// The class of a reply sent to a client (`replies_total{class}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplyClass {
    Preliminary,
    Completion,
    Intermediate,
    Transient,
    Permanent,
}

impl ReplyClass {
    const ALL: [ReplyClass; 5] = [
        ReplyClass::Preliminary,
        ReplyClass::Completion,
        ReplyClass::Intermediate,
        ReplyClass::Transient,
        ReplyClass::Permanent,
    ];

    fn of(code: u16) -> ReplyClass {
        match code / 100 {
            1 => ReplyClass::Preliminary,
            2 => ReplyClass::Completion,
            3 => ReplyClass::Intermediate,
            4 => ReplyClass::Transient,
            _ => ReplyClass::Permanent,
        }
    }

    fn label(self) -> &'static str {
        match self {
            ReplyClass::Preliminary => "1xx",
            ReplyClass::Completion => "2xx",
            ReplyClass::Intermediate => "3xx",
            ReplyClass::Transient => "4xx",
            ReplyClass::Permanent => "5xx",
        }
    }
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
    data_errors_total: IntCounterVec,
    tls_handshakes_total: IntCounterVec,
    tls_versions_total: IntCounterVec,
    tls_errors_total: IntCounterVec,
    tls_resumptions_refused_total: IntCounterVec,
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
    ebpf_guard_admissions_total: IntCounterVec,
    ebpf_guard_drops_total: IntCounterVec,
    ebpf_guard_fail_open_total: IntCounterVec,
    ebpf_guard_expectations: IntGauge,
    ebpf_guard_mode: IntGaugeVec,
    tcp_handshake: HistogramVec,
    flowtrack_map_errors_total: IntCounterVec,
    upstream_up: IntGaugeVec,
    upstream_sessions: IntGaugeVec,
    upstream_connect_failures_total: IntCounterVec,
    upstream_check: HistogramVec,
    proxy_protocol_rejected_total: IntCounterVec,
    http_connections_shed_total: IntCounter,
}

/// One server's series (label `server`, a configured name), held by the
/// pool's state for that server. Once the server leaves the configuration
/// its series are removed from the registry; a handle still held by a
/// running session then updates nothing that is exported.
#[derive(Debug, Clone)]
pub(crate) struct ServerMetrics {
    up: IntGauge,
    sessions: IntGauge,
    connect_failures: IntCounter,
    check: Histogram,
}

impl ServerMetrics {
    /// Whether health checks say the server is up.
    pub(crate) fn set_up(&self, up: bool) {
        self.up.set(i64::from(up));
    }

    /// A session was given this server (counted from the connect on).
    pub(crate) fn session_started(&self) {
        self.sessions.inc();
    }

    /// A session let go of this server.
    pub(crate) fn session_ended(&self) {
        self.sessions.dec();
    }

    /// A session could not connect to it, or got no banner.
    pub(crate) fn connect_failed(&self) {
        self.connect_failures.inc();
    }

    /// An active check ended (passed or not) after `took`.
    pub(crate) fn checked(&self, took: Duration) {
        self.check.observe(took.as_secs_f64());
    }
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
        let gauge_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, MetricsError> {
                let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(g.clone()))?;
                Ok(g)
            };
        let upstream_up = gauge_vec(
            "upstream_up",
            "1 while health checks say the server is up, by configured server name",
            &["server"],
        )?;
        let upstream_sessions = gauge_vec(
            "upstream_sessions",
            "Sessions on the server now (being connected included), by server name",
            &["server"],
        )?;
        let upstream_check = HistogramVec::new(
            HistogramOpts::new(
                "upstream_check_seconds",
                "Duration of active health checks (connect to banner and QUIT), by server name",
            )
            .buckets(latency.clone()),
            &["server"],
        )?;
        registry.register(Box::new(upstream_check.clone()))?;
        let http_connections_shed_total = IntCounter::new(
            "http_connections_shed_total",
            "Connections to the HTTP endpoint closed to make room for new ones (the oldest idle first)",
        )?;
        registry.register(Box::new(http_connections_shed_total.clone()))?;
        let ebpf_status = IntGauge::new(
            "ebpf_status",
            "1 when the eBPF flow tracker is attached, 0 when not",
        )?;
        registry.register(Box::new(ebpf_status.clone()))?;
        let ebpf_guard_expectations = IntGauge::new(
            "ebpf_guard_expectations",
            "Data connections the gateway announced and expects now (listeners open), as told to the kernel's guard",
        )?;
        registry.register(Box::new(ebpf_guard_expectations.clone()))?;
        let ebpf_guard_mode = gauge_vec(
            "ebpf_guard_mode",
            "1 for the guard's mode (off, observe, enforce), 0 for the others",
            &["mode"],
        )?;
        let metrics = Metrics {
            sessions_active,
            sessions_total: counter_vec(
                "sessions_total",
                "Client sessions ended, by outcome and control connection protection toward the client and the server (plain or tls)",
                &["outcome", "client", "server"],
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
            data_errors_total: counter_vec(
                "data_errors_total",
                "Data connections that could not be established, by side and kind",
                &["side", "kind"],
            )?,
            tls_handshakes_total: counter_vec(
                "tls_handshakes_total",
                "TLS handshakes, by side (toward the client or the server) and outcome (full, resumed, failed)",
                &["side", "outcome"],
            )?,
            tls_versions_total: counter_vec(
                "tls_versions_total",
                "TLS handshakes completed, by side and negotiated version",
                &["side", "version"],
            )?,
            tls_errors_total: counter_vec(
                "tls_errors_total",
                "TLS handshakes that failed, by side and reason",
                &["side", "reason"],
            )?,
            tls_resumptions_refused_total: counter_vec(
                "tls_resumptions_refused_total",
                "Data connections refused for not resuming the control connection's TLS session",
                &["side"],
            )?,
            transfers_total: counter_vec(
                "transfers_total",
                "Transfers, by direction, result, and data connection protection toward the client and the server (plain or tls)",
                &["direction", "result", "client", "server"],
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
            relay_total: counter_vec(
                "relay_total",
                "Data relay directions, by the method that moved their last bytes (auto turns to splice toward slow receivers)",
                &["mode"],
            )?,
            nat_rewrites_total,
            logins_total: counter_vec("logins_total", "Login attempts, by result", &["result"])?,
            ebpf_status,
            tcp_events_total: counter_vec(
                "tcp_events_total",
                "TCP events seen by the kernel tracker as they happen, by leg",
                &["leg", "event"],
            )?,
            ebpf_guard_admissions_total: counter_vec(
                "ebpf_guard_admissions_total",
                "SYNs to a data port the kernel's guard admitted (each claimed an expectation), by leg",
                &["leg"],
            )?,
            ebpf_guard_drops_total: counter_vec(
                "ebpf_guard_drops_total",
                "SYNs to a data port the kernel's guard refused, by leg and reason; dropped under enforce, only counted under observe",
                &["leg", "reason"],
            )?,
            ebpf_guard_fail_open_total: counter_vec(
                "ebpf_guard_fail_open_total",
                "Data connections the kernel's guard could not check and let through, by leg and reason",
                &["leg", "reason"],
            )?,
            ebpf_guard_expectations,
            ebpf_guard_mode,
            flowtrack_map_errors_total: counter_vec(
                "flowtrack_map_errors_total",
                "Flow tracker map failures, by reason",
                &["reason"],
            )?,
            upstream_connect_failures_total: counter_vec(
                "upstream_connect_failures_total",
                "Sessions that could not connect to the server or got no banner, by server name",
                &["server"],
            )?,
            proxy_protocol_rejected_total: counter_vec(
                "proxy_protocol_rejected_total",
                "Client connections closed for their PROXY protocol header, by reason",
                &["reason"],
            )?,
            http_connections_shed_total,
            upstream_up,
            upstream_sessions,
            upstream_check,
            tcp_flows,
            tcp_handshake,
            registry,
        };
        metrics.touch_series();
        Ok(metrics)
    }

    /// Creates every bounded series at zero, so that dashboards and alerts
    /// see them before the first event. Each loop runs over the label
    /// enum's `ALL`, so a new label value cannot be forgotten here.
    fn touch_series(&self) {
        for leg in TcpLeg::ALL {
            for state in FlowState::ALL {
                self.tcp_flows
                    .with_label_values(&[leg.label(), state.label()])
                    .set(0);
            }
            for event in TcpEvent::ALL {
                self.tcp_events_total
                    .with_label_values(&[leg.label(), event.label()]);
            }
            self.tcp_handshake.with_label_values(&[leg.label()]);
        }
        for leg in GuardLeg::ALL {
            let leg = guard_leg_label(leg);
            self.ebpf_guard_admissions_total.with_label_values(&[leg]);
            for reason in GuardOutcome::REFUSALS {
                self.ebpf_guard_drops_total
                    .with_label_values(&[leg, reason.label()]);
            }
            for reason in FailOpen::ALL {
                self.ebpf_guard_fail_open_total
                    .with_label_values(&[leg, reason.label()]);
            }
        }
        for mode in GuardMode::ALL {
            self.ebpf_guard_mode
                .with_label_values(&[mode.label()])
                .set(0);
        }
        for kind in TransferKind::ALL {
            for result in TransferResult::ALL {
                for client in Protection::ALL {
                    for server in Protection::ALL {
                        self.transfers_total.with_label_values(&[
                            kind.label(),
                            result.label(),
                            client.label(),
                            server.label(),
                        ]);
                    }
                }
            }
            self.transfer_bytes_total.with_label_values(&[kind.label()]);
        }
        for reason in Reject::ALL {
            self.rejected_total.with_label_values(&[reason.label()]);
        }
        for reason in UpstreamFailure::ALL {
            self.upstream_errors_total
                .with_label_values(&[reason.label()]);
        }
        for result in LoginResult::ALL {
            self.logins_total.with_label_values(&[result.label()]);
        }
        for method in Method::ALL {
            self.relay_total.with_label_values(&[method.label()]);
        }
        for reason in MapErrorReason::ALL {
            self.flowtrack_map_errors_total
                .with_label_values(&[reason.label()]);
        }
        for outcome in SessionOutcome::ALL {
            for client in Protection::ALL {
                for server in Protection::ALL {
                    self.sessions_total.with_label_values(&[
                        outcome.label(),
                        client.label(),
                        server.label(),
                    ]);
                }
            }
        }
        for reason in Rejection::ALL {
            self.proxy_protocol_rejected_total
                .with_label_values(&[reason.label()]);
        }
        for class in ReplyClass::ALL {
            self.replies_total.with_label_values(&[class.label()]);
        }
        for side in Side::ALL {
            for outcome in HandshakeOutcome::ALL {
                self.tls_handshakes_total
                    .with_label_values(&[side.label(), outcome.label()]);
            }
            for version in TlsVersion::ALL {
                self.tls_versions_total
                    .with_label_values(&[side.label(), version.label()]);
            }
            for failure in TlsFailure::ALL {
                self.tls_errors_total
                    .with_label_values(&[side.label(), failure.label()]);
            }
            self.tls_resumptions_refused_total
                .with_label_values(&[side.label()]);
            for mode in DataMode::ALL {
                self.data_connections_total
                    .with_label_values(&[side.label(), mode.label()]);
            }
            for kind in DataErrorKind::ALL {
                self.data_errors_total
                    .with_label_values(&[side.label(), kind.label()]);
            }
        }
    }

    /// The series of a configured server, created at zero (up at 1: servers
    /// start up). The pool calls it for every server it is given, so the
    /// label set is the configuration's names.
    pub(crate) fn server(&self, name: &ServerName) -> ServerMetrics {
        let label = [name.as_str()];
        let metrics = ServerMetrics {
            up: self.upstream_up.with_label_values(&label),
            sessions: self.upstream_sessions.with_label_values(&label),
            connect_failures: self
                .upstream_connect_failures_total
                .with_label_values(&label),
            check: self.upstream_check.with_label_values(&label),
        };
        metrics.set_up(true);
        metrics
    }

    /// Removes the series of a server that left the configuration.
    pub(crate) fn forget_server(&self, name: &ServerName) {
        let label = [name.as_str()];
        let _ = self.upstream_up.remove_label_values(&label);
        let _ = self.upstream_sessions.remove_label_values(&label);
        let _ = self
            .upstream_connect_failures_total
            .remove_label_values(&label);
        let _ = self.upstream_check.remove_label_values(&label);
    }

    /// The HTTP endpoint closed a connection to keep its bound.
    pub(crate) fn http_connection_shed(&self) {
        self.http_connections_shed_total.inc();
    }

    /// A client connection was closed for its PROXY header.
    pub(crate) fn proxy_protocol_rejected(&self, reason: Rejection) {
        self.proxy_protocol_rejected_total
            .with_label_values(&[reason.label()])
            .inc();
    }

    /// The number of flows per leg and state, replacing the previous figures.
    pub(crate) fn set_tcp_flows(&self, counts: &[(TcpLeg, FlowState, i64)]) {
        for leg in TcpLeg::ALL {
            for state in FlowState::ALL {
                let n = counts
                    .iter()
                    .filter(|(l, s, _)| *l == leg && *s == state)
                    .map(|(_, _, n)| n)
                    .sum();
                self.tcp_flows
                    .with_label_values(&[leg.label(), state.label()])
                    .set(n);
            }
        }
    }

    /// TCP events of one kind seen on a leg.
    pub(crate) fn tcp_events(&self, leg: TcpLeg, event: TcpEvent, n: u64) {
        self.tcp_events_total
            .with_label_values(&[leg.label(), event.label()])
            .inc_by(n);
    }

    /// A handshake the kernel saw complete.
    pub fn tcp_handshake(&self, leg: TcpLeg, took: Duration) {
        self.tcp_handshake
            .with_label_values(&[leg.label()])
            .observe(took.as_secs_f64());
    }

    /// The kernel guard's verdicts on SYNs to a leg's data ports: `n` of
    /// `outcome` (a retransmission of an admitted SYN is not counted).
    pub(crate) fn guard_verdicts(&self, leg: GuardLeg, outcome: GuardOutcome, n: u64) {
        let leg = guard_leg_label(leg);
        match outcome {
            GuardOutcome::Admitted => self
                .ebpf_guard_admissions_total
                .with_label_values(&[leg])
                .inc_by(n),
            GuardOutcome::Retransmit => {}
            GuardOutcome::FailOpen => self
                .ebpf_guard_fail_open_total
                .with_label_values(&[leg, FailOpen::Program.label()])
                .inc_by(n),
            GuardOutcome::NoExpectation
            | GuardOutcome::WrongPeer
            | GuardOutcome::Expired
            | GuardOutcome::Consumed => self
                .ebpf_guard_drops_total
                .with_label_values(&[leg, outcome.label()])
                .inc_by(n),
        }
    }

    /// An expectation could not be given to the kernel: its port is not
    /// guarded while its listener lives.
    pub(crate) fn guard_fail_open(&self, leg: GuardLeg, reason: FailOpen) {
        self.ebpf_guard_fail_open_total
            .with_label_values(&[guard_leg_label(leg), reason.label()])
            .inc();
    }

    /// How many data connections are expected now.
    pub(crate) fn set_guard_expectations(&self, n: usize) {
        self.ebpf_guard_expectations
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The guard's mode.
    pub(crate) fn set_guard_mode(&self, mode: GuardMode) {
        for m in GuardMode::ALL {
            self.ebpf_guard_mode
                .with_label_values(&[m.label()])
                .set(i64::from(m == mode));
        }
    }

    /// Flow tracker map failures.
    pub(crate) fn flowtrack_map_errors(&self, reason: MapErrorReason, n: u64) {
        self.flowtrack_map_errors_total
            .with_label_values(&[reason.label()])
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
    pub(crate) fn session_ended(
        &self,
        outcome: SessionOutcome,
        client: Protection,
        server: Protection,
    ) {
        self.sessions_active.dec();
        self.sessions_total
            .with_label_values(&[outcome.label(), client.label(), server.label()])
            .inc();
    }

    /// A client command was received.
    pub(crate) fn command(&self, verb: &Verb) {
        self.commands_total.with_label_values(&[verb.label()]).inc();
    }

    /// A reply was sent to the client.
    pub(crate) fn reply(&self, code: u16) {
        self.replies_total
            .with_label_values(&[ReplyClass::of(code).label()])
            .inc();
    }

    /// Something was refused.
    pub(crate) fn rejected(&self, reason: Reject) {
        self.rejected_total
            .with_label_values(&[reason.label()])
            .inc();
    }

    /// A NAT traversal rewrite was done.
    pub(crate) fn nat_rewrite(&self) {
        self.nat_rewrites_total.inc();
    }

    /// A login attempt ended (the reply to PASS, or to USER when no
    /// password is asked).
    pub(crate) fn login(&self, result: LoginResult) {
        self.logins_total.with_label_values(&[result.label()]).inc();
    }

    /// Whether the flow tracker is attached.
    pub(crate) fn set_ebpf_status(&self, attached: bool) {
        self.ebpf_status.set(i64::from(attached));
    }

    /// A data connection was established.
    pub(crate) fn data_connection(&self, side: Side, mode: DataMode) {
        self.data_connections_total
            .with_label_values(&[side.label(), mode.label()])
            .inc();
    }

    /// A data connection could not be established (on either side); a
    /// server-side failure also counts as an upstream error.
    pub(crate) fn data_error(&self, error: &DataError) {
        self.data_errors_total
            .with_label_values(&[error.side.label(), error.kind.label()])
            .inc();
        if error.side == Side::Server {
            self.upstream_error(UpstreamFailure::DataSetup);
        }
    }

    /// A TLS handshake completed.
    pub(crate) fn tls_handshake(&self, side: Side, handshake: &Handshake) {
        let outcome = if handshake.resumed {
            HandshakeOutcome::Resumed
        } else {
            HandshakeOutcome::Full
        };
        self.tls_handshakes_total
            .with_label_values(&[side.label(), outcome.label()])
            .inc();
        if let Some(version) = handshake.version {
            self.tls_versions_total
                .with_label_values(&[side.label(), version.label()])
                .inc();
        }
    }

    /// A TLS handshake failed (a data connection refused for not resuming
    /// counts here too, with its own reason).
    pub(crate) fn tls_error(&self, error: &TlsError) {
        self.tls_handshakes_total
            .with_label_values(&[error.side.label(), HandshakeOutcome::Failed.label()])
            .inc();
        self.tls_errors_total
            .with_label_values(&[error.side.label(), error.failure.label()])
            .inc();
        if error.failure == TlsFailure::NotResumed {
            self.tls_resumptions_refused_total
                .with_label_values(&[error.side.label()])
                .inc();
        }
    }

    /// Both data connections of a transfer were established.
    pub(crate) fn data_setup(&self, took: Duration) {
        self.data_setup.observe(took.as_secs_f64());
    }

    /// The server was reached.
    pub(crate) fn upstream_connected(&self, took: Duration) {
        self.upstream_connect.observe(took.as_secs_f64());
    }

    /// Talking to the server failed.
    pub(crate) fn upstream_error(&self, reason: UpstreamFailure) {
        self.upstream_errors_total
            .with_label_values(&[reason.label()])
            .inc();
    }

    /// A relay direction finished, with the method used.
    pub(crate) fn relay_used(&self, method: Method) {
        self.relay_total.with_label_values(&[method.label()]).inc();
    }

    /// A transfer ended.
    pub(crate) fn transfer_finished(
        &self,
        kind: TransferKind,
        result: TransferResult,
        protection: (Protection, Protection),
        bytes: u64,
        took: Duration,
    ) {
        let (client, server) = protection;
        self.transfers_total
            .with_label_values(&[kind.label(), result.label(), client.label(), server.label()])
            .inc();
        self.transfer_bytes_total
            .with_label_values(&[kind.label()])
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
        m.transfer_finished(
            TransferKind::Download,
            TransferResult::Ok,
            (Protection::Plain, Protection::Tls),
            42,
            Duration::from_millis(3),
        );
        let text = m.encode();
        assert!(
            text.contains("ftp_proxy_rejected_total{reason=\"bounce\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ftp_proxy_transfer_bytes_total{direction=\"download\"} 42"),
            "{text}"
        );
        for reason in Rejection::ALL {
            let series = format!(
                "ftp_proxy_proxy_protocol_rejected_total{{reason=\"{}\"}} 0",
                reason.label()
            );
            assert!(text.contains(&series), "{series} missing");
        }
    }

    #[test]
    fn server_series_exist_from_the_start_and_leave_with_the_server() {
        let m = Metrics::new().unwrap();
        let a = ServerName::new("a").unwrap();
        let server = m.server(&a);
        let text = m.encode();
        for series in [
            "ftp_proxy_upstream_up{server=\"a\"} 1",
            "ftp_proxy_upstream_sessions{server=\"a\"} 0",
            "ftp_proxy_upstream_connect_failures_total{server=\"a\"} 0",
            "ftp_proxy_upstream_check_seconds_count{server=\"a\"} 0",
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
        server.session_started();
        server.connect_failed();
        server.set_up(false);
        server.checked(Duration::from_millis(3));
        let text = m.encode();
        assert!(text.contains("ftp_proxy_upstream_sessions{server=\"a\"} 1"));
        assert!(text.contains("ftp_proxy_upstream_up{server=\"a\"} 0"));
        m.forget_server(&a);
        server.session_ended();
        assert!(
            !m.encode().contains("server=\"a\""),
            "series removed and not revived"
        );
        m.proxy_protocol_rejected(Rejection::Timeout);
        assert!(
            m.encode()
                .contains("ftp_proxy_proxy_protocol_rejected_total{reason=\"timeout\"} 1")
        );
    }
}
