//! Configuration: command line (clap) and TOML file (same keys), merged with
//! flags over file, validated into a [`Config`] that cannot hold an invalid
//! state.
//!
//! This is the only module that reads files or the environment. Everything
//! else takes `&Config`. Errors say which key was wrong and why; the binary
//! turns them into exit code 64 before binding anything.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde::Deserialize;

pub use crate::flowtrack::{EbpfMode, GuardMode, IngressHook};
pub use crate::protocol::policy::ServerPassivePolicy;
pub use crate::relay::RelayMode;
pub use crate::tls::{
    ClientDataTls, ClientTlsMode, ServerDataTls, ServerTlsMaxVersion, ServerTlsMode, TlsReuse,
};
use crate::tls::{ClientTls, ServerTls, ServerTrust};
pub use crate::upstream::Balance;
use crate::upstream::health::HealthPolicy;
pub use crate::upstream::proxy_protocol::ServerProxyProtocol;
use crate::upstream::proxy_protocol::{Cidr, TrustedProxies};
pub use crate::upstream::routes::UnknownUsers;
use crate::upstream::routes::{Route, Routes, UserPattern};
use crate::upstream::{PoolSpec, PoolSpecError, ServerName, ServerSpec, Weight};

/// Exit code for bad configuration (sysexits.h `EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;

/// The defaults: the one source for validation, for `--help` (its
/// `[default: …]` notes are checked against these by a test) and for the
/// example file `deploy/ftp-proxy.example.toml` (checked too).
pub mod defaults {
    use std::time::Duration;

    /// `--listen`.
    pub const LISTEN: &str = "0.0.0.0:21";
    /// `--upstream` port when none is given.
    pub const UPSTREAM_PORT: u16 = 21;
    /// `--max-sessions`: this many, or fewer when the open-file limit cannot
    /// hold them (see [`super::Limits::max_sessions`]).
    pub const MAX_SESSIONS: usize = 10_000;
    /// `--max-sessions-per-client`.
    pub const MAX_SESSIONS_PER_CLIENT: usize = 100;
    /// `--max-line`: vsftpd's bound too.
    pub const MAX_LINE: usize = crate::protocol::command::DEFAULT_MAX_LINE;
    /// `--connect-timeout`.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
    /// `--data-timeout`.
    pub const DATA_TIMEOUT: Duration = Duration::from_secs(30);
    /// `--idle-timeout`.
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(900);
    /// `--transfer-idle-timeout`.
    pub const TRANSFER_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
    /// `--reply-timeout`.
    pub const REPLY_TIMEOUT: Duration = Duration::from_secs(120);
    /// `--drain-timeout`.
    pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
    /// `--pipe-size`: 1 MiB.
    pub const PIPE_SIZE: usize = 1 << 20;
    /// `--copy-buffer`: 4 MiB. Issue 6's benchmark (1 GiB RETR on loopback,
    /// five runs each): 1 MiB reads gave 0.66–0.83 × direct, 4 MiB reads
    /// 0.78–0.92 × and a quarter less CPU in all, from fewer wakeups of the
    /// relay. A buffer reaches it only while reads keep filling it.
    pub const COPY_BUFFER: usize = 4 << 20;
    /// `--send-lowat`: 128 KiB (issue 14, docs/bench-notes.md).
    pub const SEND_LOWAT: usize = 128 << 10;
    /// `--nat-traversal`.
    pub const NAT_TRAVERSAL: bool = true;
    /// `--log-level` when neither it nor `FTP_PROXY_LOG` is set.
    pub const LOG_LEVEL: &str = "info";
    /// `[[servers]] weight`.
    pub const SERVER_WEIGHT: u32 = 1;
    /// `[health] interval`: HAProxy checks every 2 s by default; an FTP
    /// check is a whole login banner, so less often.
    pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
    /// `[health] timeout`: connect to banner (and `QUIT`).
    pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
    /// `[health] rise`: HAProxy's default.
    pub const HEALTH_RISE: u32 = 2;
    /// `[health] fall`: HAProxy's default.
    pub const HEALTH_FALL: u32 = 3;
    /// `--proxy-protocol-timeout`: the PROXY specification asks for at
    /// least 3 s, to cover a TCP retransmission; ProFTPD's
    /// mod_proxy_protocol uses 3 s too.
    pub const PROXY_PROTOCOL_TIMEOUT: Duration = Duration::from_secs(3);
    /// `--allow-user-at-server`.
    pub const ALLOW_USER_AT_SERVER: bool = false;
    /// The server's name when `--upstream` is given (a pool of one).
    pub const UPSTREAM_NAME: &str = "upstream";
}

/// Implements clap's `ValueEnum` and serde's `Deserialize` for an enum of
/// another module, from its names: those modules stay free of command-line
/// and file concerns, and each setting has one enum.
macro_rules! setting_enum {
    ($ty:ident { $($variant:ident => $name:literal: $help:literal),+ $(,)? }) => {
        impl ValueEnum for $ty {
            fn value_variants<'a>() -> &'a [Self] {
                &[$($ty::$variant),+]
            }

            fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
                Some(match self {
                    $($ty::$variant => clap::builder::PossibleValue::new($name).help($help)),+
                })
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                match text.as_str() {
                    $($name => Ok($ty::$variant),)+
                    other => Err(serde::de::Error::unknown_variant(other, &[$($name),+])),
                }
            }
        }
    };
}

setting_enum!(RelayMode {
    Auto => "auto": "copy (toward another host in chunks of at most 1 MiB); splice toward a receiver that proves slow",
    Splice => "splice": "zero-copy through a pipe; copy only where the kernel refuses",
    Copy => "copy": "always through user space",
    Sockmap => "sockmap": "experimental: the kernel redirects between the two sockets (eBPF sockmap); no bound on what a slow receiver makes it hold",
});

setting_enum!(IngressHook {
    Tc => "tc": "a TC classifier on a tcx link (only the headers are read)",
    Xdp => "xdp": "XDP, generic mode (drops refused SYNs earliest, but copies every merged packet first: slower between hosts)",
});

setting_enum!(EbpfMode {
    Auto => "auto": "use the tracker when it loads; say once that it does not",
    Required => "required": "exit when the tracker cannot be loaded and attached",
    Off => "off": "never load it",
});

setting_enum!(GuardMode {
    Off => "off": "no kernel admission: data ports behave as without eBPF",
    Observe => "observe": "judge and count every SYN to a data port, drop none",
    Enforce => "enforce": "drop SYNs to the data ports that no announced data connection expects",
});

setting_enum!(ClientTlsMode {
    Off => "off": "no TLS toward clients: AUTH is refused",
    Optional => "optional": "AUTH TLS offered, plain sessions allowed",
    Required => "required": "USER before AUTH TLS gets 530",
});

setting_enum!(ClientDataTls {
    Optional => "optional": "the client chooses with PROT",
    Required => "required": "PROT C is refused; transfers need PROT P",
});

setting_enum!(TlsReuse {
    Off => "off": "any data connection handshake is accepted",
    Required => "required": "a client data connection must resume the control connection's TLS session",
});

setting_enum!(ServerTlsMode {
    Off => "off": "plain FTP toward the server",
    Explicit => "explicit": "AUTH TLS after the server's banner",
    Implicit => "implicit": "TLS from the first byte",
});

setting_enum!(ServerDataTls {
    Client => "client": "protect server data connections as the client's PROT says",
    Required => "required": "always protect server data connections",
    Clear => "clear": "never protect server data connections",
});

setting_enum!(ServerTlsMaxVersion {
    Auto => "auto": "TLS 1.2 when server data connections may be protected (they must resume the control connection's session, and a TLS 1.3 ticket resumes once), else 1.3",
    Tls12 => "1.2": "TLS 1.2 only",
    Tls13 => "1.3": "TLS 1.3 or 1.2, as the server prefers",
});

setting_enum!(Balance {
    LeastConnections => "least-connections": "fewest sessions per weight; round-robin among equals",
    RoundRobin => "round-robin": "smooth weighted round-robin",
    Random => "random": "weighted random",
    StickyClient => "sticky-client": "a client address stays on the server it has sessions on; else rendezvous hashing of the address",
});

setting_enum!(UnknownUsers {
    Reject => "reject": "answer 530 and contact no server",
    Pool => "pool": "send them to any server of the pool",
});

setting_enum!(ServerProxyProtocol {
    Off => "off": "no header",
    V1 => "v1": "PROXY protocol v1 (text)",
    V2 => "v2": "PROXY protocol v2 (binary)",
});

setting_enum!(ServerPassivePolicy {
    Strict => "strict": "refuse a 227/229 naming another host",
    ControlAddress => "control-address": "connect to the server's control address instead (servers behind NAT)",
});

/// How the gateway opens data connections to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamMode {
    /// Mirror the client: passive toward the server when the client used
    /// PASV/EPSV, active when it used PORT/EPRT.
    #[default]
    Client,
    /// Always passive (PASV/EPSV) toward the server: the usual choice when
    /// the server is behind a firewall.
    Passive,
    /// Always active (PORT/EPRT) toward the server.
    Active,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// What `--version` prints after the name: the version, the git revision
/// the binary was built from (`unknown` for a build outside a git
/// checkout, see `build.rs`) and whether the eBPF programs are embedded.
#[must_use]
pub fn version() -> &'static str {
    static TEXT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let revision = match env!("FTPX_GIT_REVISION") {
            "unknown" => "git revision unknown".to_owned(),
            revision => format!("git {revision}"),
        };
        let ebpf = if crate::flowtrack::FlowTracker::available() {
            "eBPF programs embedded"
        } else {
            "eBPF programs not embedded"
        };
        format!("{} ({revision}; {ebpf})", env!("CARGO_PKG_VERSION"))
    });
    &TEXT
}

/// Command line. Every option can also be set in the `--config` file under
/// the same name; a flag given on the command line wins.
#[derive(Debug, Parser)]
#[command(
    name = "ftp-proxy",
    version = version(),
    about = "FTP gateway: relays control sessions to an upstream server, rewrites PORT/EPRT/PASV/EPSV, and splices data connections",
    long_about = "FTP gateway: relays control sessions to an upstream server, rewrites PORT/EPRT/PASV/EPSV, and splices data connections.\n\n\
        It answers the commands that carry addresses itself, opens both legs of every data connection, refuses FTP bounce and port theft, and terminates or originates FTPS. \
        Every option can also be set in the --config file under its long name; a flag wins over the file."
)]
pub struct Cli {
    /// Action to run instead of the gateway.
    #[command(subcommand)]
    pub command: Option<Action>,

    /// TOML configuration file; its keys are the long option names below.
    #[arg(long, value_name = "PATH", global = true)]
    pub config: Option<PathBuf>,

    /// Validate the configuration, print it, and exit (0 if valid, 64 if not).
    #[arg(long)]
    pub check_config: bool,

    /// The gateway's settings.
    #[command(flatten)]
    pub settings: Settings,
}

/// Actions other than running the gateway.
#[derive(Debug, Subcommand)]
pub enum Action {
    /// Validate the configuration and exit (same as --check-config).
    CheckConfig,
    /// Print the TCP flows a running gateway's tracker sees, as a table
    /// (fetched from its /flows endpoint).
    Flows {
        /// The running gateway's --metrics address [default: the configuration's metrics address].
        #[arg(long, value_name = "ADDR:PORT")]
        from: Option<SocketAddr>,
        /// Print the JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Settings shared by the command line and the file.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Settings {
    /// Address to accept FTP clients on, IPv4 or IPv6 (repeatable) [default: 0.0.0.0:21].
    #[arg(long, value_name = "ADDR:PORT")]
    #[serde(default)]
    pub listen: Vec<String>,

    /// The FTP server to relay to, for a single server (a pool of several is [[servers]] in the file); the name is resolved when each session starts [default port: 21].
    #[arg(long, value_name = "HOST:PORT")]
    pub upstream: Option<String>,

    /// How new sessions are spread over the [[servers]] of the file [default: least-connections].
    #[arg(long, value_enum, value_name = "POLICY")]
    pub balance: Option<Balance>,

    /// Users that no [[routes]] entry of the file matches: reject (530, no server contacted) or pool (any server) [default: reject].
    #[arg(long, value_enum, value_name = "POLICY")]
    pub unknown_users: Option<UnknownUsers>,

    /// Let a client choose a configured server with USER name@server (split at the last @; an unknown server name leaves the whole string as the user name) [default: false].
    #[arg(long, value_name = "BOOL")]
    pub allow_user_at_server: Option<bool>,

    /// Network (CIDR, or one address) of load balancers whose control connections must start with a PROXY protocol v1 or v2 header (repeatable); other peers are plain clients [default: none].
    #[arg(long = "proxy-protocol-from", value_name = "CIDR")]
    #[serde(default)]
    pub proxy_protocol_from: Vec<String>,

    /// Seconds a peer of --proxy-protocol-from has to send its PROXY header [default: 3].
    #[arg(long, value_name = "SECS")]
    pub proxy_protocol_timeout: Option<u64>,

    /// Start each control connection to a server with a PROXY protocol header carrying the client's address: off, v1, v2 [default: off].
    #[arg(long, value_enum, value_name = "VERSION")]
    pub server_proxy_protocol: Option<ServerProxyProtocol>,

    /// `[[servers]]`: the pool (file only).
    #[arg(skip)]
    #[serde(default)]
    pub servers: Vec<ServerSettings>,

    /// `[health]`: active checks of the servers (file only).
    #[arg(skip)]
    pub health: Option<HealthSettings>,

    /// `[[routes]]`: per-user routing (file only).
    #[arg(skip)]
    #[serde(default)]
    pub routes: Vec<RouteSettings>,

    /// Ports for the gateway's passive listeners (clients' PASV/EPSV) [default: any ephemeral port].
    #[arg(long, value_name = "LOW-HIGH")]
    pub passive_ports: Option<String>,

    /// Address advertised in 227 replies (e.g. the public address in front of a NAT) [default: the local address of the client's control connection].
    #[arg(long, value_name = "IP")]
    pub passive_address: Option<String>,

    /// Ports for the gateway's active-mode listeners toward the server, and the source ports of active connections to clients when port 20 cannot be bound [default: any ephemeral port].
    #[arg(long, value_name = "LOW-HIGH")]
    pub active_ports: Option<String>,

    /// How data connections to the server are opened [default: client].
    #[arg(long, value_enum, value_name = "MODE")]
    pub upstream_mode: Option<UpstreamMode>,

    /// Connect to the client's observed address when its PORT/EPRT names a private address it does not connect from (client behind NAT) [default: true].
    #[arg(long, value_name = "BOOL")]
    pub nat_traversal: Option<bool>,

    /// What to do when the server's 227/229 names another host: refuse (strict) or use the server's control address (control-address, for servers behind NAT) [default: strict].
    #[arg(long, value_enum, value_name = "POLICY")]
    pub server_passive_address: Option<ServerPassivePolicy>,

    /// Maximum concurrent sessions; more are answered 421 [default: 10000, or what the open-file limit holds at two descriptors a session].
    #[arg(long, value_name = "N")]
    pub max_sessions: Option<usize>,

    /// Maximum concurrent sessions from one client address [default: 100].
    #[arg(long, value_name = "N")]
    pub max_sessions_per_client: Option<usize>,

    /// Maximum command line length in bytes; longer lines are answered 500 [default: 4096].
    #[arg(long, value_name = "BYTES")]
    pub max_line: Option<usize>,

    /// Seconds to wait for the server's TCP connect and banner [default: 10].
    #[arg(long, value_name = "SECS")]
    pub connect_timeout: Option<u64>,

    /// Seconds to wait for a data connection to be established [default: 30].
    #[arg(long, value_name = "SECS")]
    pub data_timeout: Option<u64>,

    /// Seconds a control connection may stay silent before the session is closed with 421 [default: 900].
    #[arg(long, value_name = "SECS")]
    pub idle_timeout: Option<u64>,

    /// Seconds a transfer may move no byte before it is aborted [default: 300].
    #[arg(long, value_name = "SECS")]
    pub transfer_idle_timeout: Option<u64>,

    /// Seconds to wait for the server's reply to a command [default: 120].
    #[arg(long, value_name = "SECS")]
    pub reply_timeout: Option<u64>,

    /// Data relay: auto (copy, toward another host in chunks of at most 1 MiB; splice toward a receiver that proves slow), splice (zero-copy, falls back to copy only where the kernel refuses), copy, or sockmap (experimental: the kernel redirects) [default: auto].
    #[arg(long, value_enum, value_name = "MODE")]
    pub relay_mode: Option<RelayMode>,

    /// Size of each splice pipe in bytes [default: 1048576].
    #[arg(long, value_name = "BYTES")]
    pub pipe_size: Option<usize>,

    /// Largest copy buffer per relay direction in bytes; a buffer starts at 16 KiB, doubles while reads fill it and the receiver keeps up, and halves while the receiver is slow [default: 4194304].
    #[arg(long, value_name = "BYTES")]
    pub copy_buffer: Option<usize>,

    /// Unsent bytes the kernel may queue on a data socket toward another host before the relay waits (TCP_NOTSENT_LOWAT), so a slow receiver holds back the sender instead of the gateway's memory; 0 leaves the kernel's default [default: 131072].
    #[arg(long, value_name = "BYTES")]
    pub send_lowat: Option<usize>,

    /// Threads that run sessions and relays [default: the CPUs this process may use]. Read at start only.
    #[arg(long, value_name = "N")]
    pub worker_threads: Option<usize>,

    /// Address of the HTTP endpoint for /metrics, /healthz, /readyz and /flows [default: none].
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<String>,

    /// Seconds that running transfers get to finish after SIGTERM [default: 300].
    #[arg(long, value_name = "SECS")]
    pub drain_timeout: Option<u64>,

    /// eBPF flow tracker: auto (use it when it loads), required (exit if it cannot), off [default: auto].
    #[arg(long, value_enum, value_name = "MODE")]
    pub ebpf: Option<EbpfMode>,

    /// Hook of the flow tracker's ingress program on interfaces other than loopback: tc (a tcx classifier) or xdp (generic XDP: copies every merged packet, measured slower between hosts) [default: tc].
    #[arg(long, value_enum, value_name = "HOOK")]
    pub ebpf_ingress: Option<IngressHook>,

    /// Kernel admission of data connections by the flow tracker's ingress program: a SYN to a data port passes only from the peer an announced data connection expects, once; observe counts what enforce would drop; needs the tracker [default: observe].
    #[arg(long, value_enum, value_name = "MODE")]
    pub ebpf_guard: Option<GuardMode>,

    /// Interface the flow tracker attaches to (repeatable) [default: the interfaces of the listen addresses, loopback included].
    #[arg(long = "interface", value_name = "NAME")]
    #[serde(default)]
    pub interface: Vec<String>,

    /// PEM file with the gateway's certificate chain toward clients (end entity first) [default: none]. Re-read on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// PEM file with the private key of --tls-cert [default: none]. Re-read on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// TLS toward clients on the control connection [default: optional with a certificate, else off].
    #[arg(long, value_enum, value_name = "MODE")]
    pub client_tls: Option<ClientTlsMode>,

    /// Protection of client data connections [default: optional].
    #[arg(long, value_enum, value_name = "MODE")]
    pub client_data_tls: Option<ClientDataTls>,

    /// Address for implicit FTPS clients: the TLS handshake comes before the 220 (repeatable) [default: none].
    #[arg(long, value_name = "ADDR:PORT")]
    #[serde(default)]
    pub listen_implicit: Vec<String>,

    /// Whether client data connections must resume the control connection's TLS session [default: off].
    #[arg(long, value_enum, value_name = "MODE")]
    pub client_tls_reuse: Option<TlsReuse>,

    /// TLS toward the server [default: off].
    #[arg(long, value_enum, value_name = "MODE")]
    pub server_tls: Option<ServerTlsMode>,

    /// PEM file of the authorities that sign the server's certificate [default: the system's trust store].
    #[arg(long, value_name = "FILE")]
    pub server_ca: Option<PathBuf>,

    /// The name every server's certificate must carry [default: each server's host].
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,

    /// Do not verify the server's certificate (insecure: anyone between the gateway and the server can read and change the session) [default: false].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub server_tls_insecure: Option<bool>,

    /// Protection of server data connections [default: required].
    #[arg(long, value_enum, value_name = "MODE")]
    pub server_data_tls: Option<ServerDataTls>,

    /// The highest TLS version offered to servers [default: auto].
    #[arg(long, value_enum, value_name = "VERSION")]
    pub server_tls_max_version: Option<ServerTlsMaxVersion>,

    /// Log format [default: text].
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Log filter in tracing's EnvFilter syntax; the environment variable FTP_PROXY_LOG is used when unset [default: info].
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
}

/// One `[[servers]]` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServerSettings {
    /// `[a-z0-9_-]{1,32}`, unique: the metric label and the `user@name` name.
    pub name: String,
    /// `HOST:PORT`, as `--upstream`.
    pub address: String,
    /// 1 to 1000.
    pub weight: Option<u32>,
}

/// `[health]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HealthSettings {
    /// Seconds between checks.
    pub interval: Option<u64>,
    /// Seconds a check may take.
    pub timeout: Option<u64>,
    /// Passed checks that bring a down server back.
    pub rise: Option<u32>,
    /// Failed checks that take an up server down.
    pub fall: Option<u32>,
}

/// One `[[routes]]` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RouteSettings {
    /// User names, or prefixes ending in `*`.
    pub users: Vec<String>,
    /// Names of `[[servers]]`.
    pub servers: Vec<String>,
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or holds an unknown key.
    #[error("configuration file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        source: Box<toml::de::Error>,
    },
    /// A key has a value that cannot be used.
    #[error("invalid {key} {value:?}: {reason}")]
    Invalid {
        /// The option name.
        key: &'static str,
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A required key is missing.
    #[error("missing {0}: give it on the command line or in the configuration file")]
    Missing(&'static str),
}

fn invalid(key: &'static str, value: impl ToString, reason: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    low: u16,
    high: u16,
}

impl PortRange {
    /// A range; `None` unless `0 < low <= high`.
    pub fn new(low: u16, high: u16) -> Option<PortRange> {
        (low > 0 && low <= high).then_some(PortRange { low, high })
    }

    /// First port.
    pub fn low(&self) -> u16 {
        self.low
    }

    /// Last port.
    pub fn high(&self) -> u16 {
        self.high
    }

    /// Number of ports.
    pub fn len(&self) -> usize {
        usize::from(self.high - self.low) + 1
    }

    /// Never true: a range holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn parse(key: &'static str, text: &str) -> Result<PortRange, ConfigError> {
        let (low, high) = text
            .split_once('-')
            .ok_or_else(|| invalid(key, text, "expected LOW-HIGH, e.g. 50000-50999"))?;
        let low: u16 = low
            .trim()
            .parse()
            .map_err(|e| invalid(key, text, format!("low port: {e}")))?;
        let high: u16 = high
            .trim()
            .parse()
            .map_err(|e| invalid(key, text, format!("high port: {e}")))?;
        PortRange::new(low, high).ok_or_else(|| invalid(key, text, "need 0 < LOW <= HIGH"))
    }
}

/// The upstream server, as configured (resolved at each session start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Host name or address literal (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl Upstream {
    fn parse(text: &str) -> Result<Upstream, ConfigError> {
        Upstream::parse_as("upstream", text)
    }

    fn parse_as(key: &'static str, text: &str) -> Result<Upstream, ConfigError> {
        let bad = |reason: &str| invalid(key, text, reason);
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (host, rest) = rest
                .split_once(']')
                .ok_or_else(|| bad("missing ] after IPv6 address"))?;
            host.parse::<std::net::Ipv6Addr>()
                .map_err(|_| bad("not an IPv6 address inside [ ]"))?;
            match rest {
                "" => (host, None),
                _ => (
                    host,
                    Some(
                        rest.strip_prefix(':')
                            .ok_or_else(|| bad("expected :PORT after ]"))?,
                    ),
                ),
            }
        } else if text.parse::<std::net::Ipv6Addr>().is_ok() {
            (text, None)
        } else {
            match text.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (text, None),
            }
        };
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("empty or malformed host"));
        }
        let port = match port {
            None => defaults::UPSTREAM_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(0) | Err(_) => return Err(bad("port must be 1 to 65535")),
                Ok(port) => port,
            },
        };
        Ok(Upstream {
            host: host.to_owned(),
            port,
        })
    }

    /// `host:port` for resolution.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Bounds on resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Concurrent sessions. By default [`defaults::MAX_SESSIONS`], or what
    /// the hard open-file limit holds when that is less.
    pub max_sessions: usize,
    /// Concurrent sessions from one client address.
    pub max_sessions_per_client: usize,
    /// Command line bound.
    pub max_line: usize,
}

/// Timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Server connect and banner.
    pub connect: Duration,
    /// Data connection establishment.
    pub data_connect: Duration,
    /// Silent control connection.
    pub idle: Duration,
    /// Transfer moving no byte.
    pub transfer_idle: Duration,
    /// Server's reply to a command.
    pub reply: Duration,
    /// Grace period for transfers after SIGTERM.
    pub drain: Duration,
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// EnvFilter directives.
    pub filter: String,
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Client-facing listen addresses (at least one).
    pub listen: Vec<SocketAddr>,
    /// The servers (at least one), the balancing and the health checks.
    pub pool: PoolSpec,
    /// Per-user routing (`[[routes]]`, `unknown-users`,
    /// `allow-user-at-server`).
    pub routes: Routes,
    /// Load balancers whose connections start with a PROXY header (empty:
    /// none), and the deadline for it.
    pub proxy_from: TrustedProxies,
    /// The PROXY header the gateway sends to servers.
    pub server_proxy_protocol: ServerProxyProtocol,
    /// Passive listener ports (None: ephemeral).
    pub passive_ports: Option<PortRange>,
    /// Address advertised in 227/229 (None: the control connection's local address).
    pub passive_address: Option<IpAddr>,
    /// Active-mode ports toward the server (None: ephemeral).
    pub active_ports: Option<PortRange>,
    /// Data connections toward the server.
    pub upstream_mode: UpstreamMode,
    /// NAT traversal for clients' PORT/EPRT.
    pub nat_traversal: bool,
    /// Server 227/229 naming another host.
    pub server_passive: ServerPassivePolicy,
    /// Resource bounds.
    pub limits: Limits,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Relay mode.
    pub relay_mode: RelayMode,
    /// Pipe size for splice.
    pub pipe_size: usize,
    /// Largest copy buffer per relay direction.
    pub copy_buffer: usize,
    /// TCP_NOTSENT_LOWAT on data sockets; 0: the kernel's default.
    pub send_lowat: u32,
    /// Runtime worker threads (used at start; a reload does not change it).
    pub worker_threads: usize,
    /// HTTP endpoint address.
    pub metrics: Option<SocketAddr>,
    /// Whether the flow tracker runs.
    pub ebpf: EbpfMode,
    /// What the tracker's ingress program does with SYNs to the data ports.
    pub ebpf_guard: GuardMode,
    /// The hook of the tracker's ingress program.
    pub ebpf_ingress: IngressHook,
    /// Interfaces the flow tracker attaches to (resolved: never empty).
    pub interfaces: Vec<String>,
    /// Implicit FTPS listen addresses (TLS before the banner).
    pub listen_implicit: Vec<SocketAddr>,
    /// FTPS toward clients and servers.
    pub tls: TlsSettings,
    /// Logging.
    pub log: LogConfig,
}

/// FTPS toward clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsSettings {
    /// `AUTH TLS` off, optional or required.
    pub mode: ClientTlsMode,
    /// Data connection protection.
    pub data: ClientDataTls,
    /// Whether data connections must resume the control connection's session.
    pub reuse: TlsReuse,
    /// The certificate and key (present when `mode` is not off, or implicit
    /// listeners are configured).
    pub identity: Option<ClientTls>,
}

/// FTPS toward the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsSettings {
    /// Off, explicit or implicit.
    pub mode: ServerTlsMode,
    /// Data connection protection.
    pub data: ServerDataTls,
    /// The client configuration (present when `mode` is not off).
    pub client: Option<ServerTls>,
    /// The name every server's certificate must carry (`--server-name`);
    /// `None`: each server's host ([`ServerTlsSettings::name_for`]).
    pub name: Option<String>,
    /// Whether certificates are not verified (`--server-tls-insecure`).
    pub insecure: bool,
}

impl ServerTlsSettings {
    /// The name the certificate of the server at `address` must carry.
    pub fn name_for<'a>(&'a self, address: &'a Upstream) -> &'a str {
        self.name.as_deref().unwrap_or(&address.host)
    }
}

/// FTPS settings, validated: files read, the certificate and key checked
/// to belong together, the trust store loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Toward clients.
    pub client: ClientTlsSettings,
    /// Toward the server.
    pub server: ServerTlsSettings,
}

/// The interfaces that carry `listen` addresses, loopback included: every
/// interface for a wildcard address.
pub fn interfaces_of(listen: &[SocketAddr]) -> Vec<String> {
    let all = if_addrs::get_if_addrs().unwrap_or_default();
    let mut names = vec!["lo".to_owned()];
    for addr in listen {
        for interface in &all {
            let wanted = addr.ip().is_unspecified() && interface.ip().is_ipv4() == addr.is_ipv4()
                || interface.ip() == addr.ip().to_canonical();
            if wanted && !names.contains(&interface.name) {
                names.push(interface.name.clone());
            }
        }
    }
    names
}

fn secs(key: &'static str, value: Option<u64>, default: Duration) -> Result<Duration, ConfigError> {
    match value.unwrap_or(default.as_secs()) {
        0 => Err(invalid(key, 0, "must be at least 1 second")),
        n if n > 7 * 24 * 3600 => Err(invalid(key, n, "must be at most a week")),
        n => Ok(Duration::from_secs(n)),
    }
}

/// Reads a PEM certificate chain and its key, and checks they belong
/// together.
fn load_identity(cert: &Path, key: &Path) -> Result<ClientTls, ConfigError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let shown = |p: &Path| p.display().to_string();
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| invalid("tls-cert", shown(cert), e))?;
    let private =
        PrivateKeyDer::from_pem_file(key).map_err(|e| invalid("tls-key", shown(key), e))?;
    ClientTls::new(chain, private).map_err(|e| {
        invalid(
            "tls-key",
            shown(key),
            format!("does not go with {}: {e}", shown(cert)),
        )
    })
}

/// The authorities to verify servers with: `--server-ca`, else the
/// system's trust store.
fn load_trust(ca: Option<&Path>) -> Result<ServerTrust, ConfigError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let shown = path.display().to_string();
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| invalid("server-ca", &shown, e))?;
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| invalid("server-ca", &shown, e))?;
            }
            if roots.is_empty() {
                return Err(invalid("server-ca", &shown, "holds no certificate"));
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                return Err(invalid(
                    "server-ca",
                    "(the system's trust store)",
                    "no usable authority found; give --server-ca FILE",
                ));
            }
        }
    }
    Ok(ServerTrust::Roots(std::sync::Arc::new(roots)))
}

/// File descriptors a session holds at least: its two control sockets.
pub const FDS_PER_SESSION: u64 = 2;
/// File descriptors the process needs besides its sessions.
pub const FDS_RESERVED: u64 = 64;

/// How many sessions fit an open-file limit of `open_files`.
pub fn sessions_within(open_files: u64) -> u64 {
    open_files.saturating_sub(FDS_RESERVED) / FDS_PER_SESSION
}

/// The default of `--max-sessions`: [`defaults::MAX_SESSIONS`], or what the
/// hard open-file limit holds when that is less (the gateway raises its
/// soft limit to the hard one at start). An explicit value above what fits
/// is kept, and the gateway warns at start.
fn default_max_sessions() -> usize {
    use rustix::process::{Resource, getrlimit};
    let hard = getrlimit(Resource::Nofile).maximum.unwrap_or(u64::MAX);
    let fits = usize::try_from(sessions_within(hard)).unwrap_or(usize::MAX);
    defaults::MAX_SESSIONS.min(fits).max(1)
}

fn positive(key: &'static str, value: Option<usize>, default: usize) -> Result<usize, ConfigError> {
    match value.unwrap_or(default) {
        0 => Err(invalid(key, 0, "must be at least 1")),
        n => Ok(n),
    }
}

/// The pool: `upstream` (a pool of one named "upstream") or `[[servers]]`,
/// exactly one of them.
fn pool(
    upstream: Option<&str>,
    servers: &[ServerSettings],
    balance: Option<Balance>,
    health: Option<HealthSettings>,
) -> Result<PoolSpec, ConfigError> {
    let servers = match (upstream, servers) {
        (Some(u), [_, ..]) => {
            return Err(invalid(
                "upstream",
                u,
                "give either upstream (one server) or [[servers]] (a pool), not both",
            ));
        }
        (None, []) => return Err(ConfigError::Missing("upstream (or [[servers]])")),
        (Some(u), []) => vec![ServerSpec {
            name: ServerName::new(defaults::UPSTREAM_NAME)
                .map_err(|e| invalid("upstream", u, e))?,
            address: Upstream::parse(u)?,
            weight: Weight::default(),
        }],
        (None, servers) => servers
            .iter()
            .map(|s| {
                Ok(ServerSpec {
                    name: ServerName::new(&s.name)
                        .map_err(|e| invalid("servers.name", &s.name, e))?,
                    address: Upstream::parse_as("servers.address", &s.address)?,
                    weight: match s.weight {
                        None => Weight::default(),
                        Some(w) => Weight::new(w).ok_or_else(|| {
                            invalid("servers.weight", w, "must be from 1 to 1000")
                        })?,
                    },
                })
            })
            .collect::<Result<_, ConfigError>>()?,
    };
    // Checks by default for a pool; for a single upstream only when asked
    // for: with one server they steer no session anywhere, and would only
    // take /readyz (and a login banner every interval) from the server.
    let checked = health.is_some() || upstream.is_none();
    let h = health.unwrap_or_default();
    let policy = HealthPolicy::new(
        Duration::from_secs(h.interval.unwrap_or(defaults::HEALTH_INTERVAL.as_secs())),
        Duration::from_secs(h.timeout.unwrap_or(defaults::HEALTH_TIMEOUT.as_secs())),
        h.rise.unwrap_or(defaults::HEALTH_RISE),
        h.fall.unwrap_or(defaults::HEALTH_FALL),
    )
    .map_err(|e| {
        let value = match e.key() {
            "health.interval" => h.interval.map(|v| v.to_string()),
            "health.timeout" => h.timeout.map(|v| v.to_string()),
            "health.rise" => h.rise.map(|v| v.to_string()),
            _ => h.fall.map(|v| v.to_string()),
        };
        invalid(e.key(), value.unwrap_or_else(|| "(default)".to_owned()), e)
    })?;
    let policy = checked.then_some(policy);
    PoolSpec::new(servers, balance.unwrap_or_default(), policy).map_err(|e| match e {
        PoolSpecError::Empty => ConfigError::Missing("upstream (or [[servers]])"),
        PoolSpecError::Duplicate(name) => {
            invalid("servers.name", name, "two servers have this name")
        }
    })
}

/// `[[routes]]`: every pattern valid, every server named in the pool.
fn routes(
    routes: &[RouteSettings],
    pool: &PoolSpec,
    unknown_users: UnknownUsers,
    allow_user_at_server: bool,
) -> Result<Routes, ConfigError> {
    let routes = routes
        .iter()
        .map(|r| {
            let users = r
                .users
                .iter()
                .map(|u| UserPattern::new(u).map_err(|e| invalid("routes.users", u, e)))
                .collect::<Result<Vec<_>, _>>()?;
            let servers = r
                .servers
                .iter()
                .map(|name| {
                    pool.get(name).map(|s| s.name.clone()).ok_or_else(|| {
                        invalid(
                            "routes.servers",
                            name,
                            "no server of that name in [[servers]]",
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Route::new(users, servers).map_err(|e| match e {
                crate::upstream::routes::RouteError::NoUsers => invalid("routes.users", "[]", e),
                crate::upstream::routes::RouteError::NoServers => {
                    invalid("routes.servers", "[]", e)
                }
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Routes::new(routes, unknown_users, allow_user_at_server))
}

impl Settings {
    /// Reads a TOML file of settings.
    ///
    /// # Errors
    /// [`ConfigError::Read`] or [`ConfigError::Parse`].
    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Fills every unset field from `lower`.
    pub fn over(self, lower: Settings) -> Settings {
        macro_rules! pick {
            ($($field:ident),*) => { Settings {
                listen: if self.listen.is_empty() { lower.listen } else { self.listen },
                listen_implicit: if self.listen_implicit.is_empty() { lower.listen_implicit } else { self.listen_implicit },
                interface: if self.interface.is_empty() { lower.interface } else { self.interface },
                proxy_protocol_from: if self.proxy_protocol_from.is_empty() { lower.proxy_protocol_from } else { self.proxy_protocol_from },
                servers: if self.servers.is_empty() { lower.servers } else { self.servers },
                routes: if self.routes.is_empty() { lower.routes } else { self.routes },
                $($field: self.$field.or(lower.$field)),*
            } };
        }
        pick!(
            upstream,
            passive_ports,
            passive_address,
            active_ports,
            upstream_mode,
            nat_traversal,
            server_passive_address,
            max_sessions,
            max_sessions_per_client,
            max_line,
            connect_timeout,
            data_timeout,
            idle_timeout,
            transfer_idle_timeout,
            reply_timeout,
            relay_mode,
            pipe_size,
            copy_buffer,
            send_lowat,
            worker_threads,
            metrics,
            drain_timeout,
            ebpf,
            ebpf_guard,
            ebpf_ingress,
            tls_cert,
            tls_key,
            client_tls,
            client_data_tls,
            client_tls_reuse,
            server_tls,
            server_ca,
            server_name,
            server_tls_insecure,
            server_data_tls,
            server_tls_max_version,
            log_format,
            log_level,
            balance,
            unknown_users,
            allow_user_at_server,
            proxy_protocol_timeout,
            server_proxy_protocol,
            health
        )
    }

    /// Validates the settings.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first key that is missing or invalid.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let listen = if self.listen.is_empty() {
            vec![defaults::LISTEN.to_owned()]
        } else {
            self.listen
        };
        let listen = listen
            .iter()
            .map(|l| {
                l.parse::<SocketAddr>().map_err(|e| {
                    invalid(
                        "listen",
                        l,
                        format!("{e} (expected ADDR:PORT, [IPv6]:PORT)"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let pool = pool(
            self.upstream.as_deref(),
            &self.servers,
            self.balance,
            self.health,
        )?;
        let routes = routes(
            &self.routes,
            &pool,
            self.unknown_users.unwrap_or_default(),
            self.allow_user_at_server
                .unwrap_or(defaults::ALLOW_USER_AT_SERVER),
        )?;
        let proxy_from = TrustedProxies::new(
            self.proxy_protocol_from
                .iter()
                .map(|c| {
                    c.parse::<Cidr>()
                        .map_err(|e| invalid("proxy-protocol-from", c, e))
                })
                .collect::<Result<_, _>>()?,
            secs(
                "proxy-protocol-timeout",
                self.proxy_protocol_timeout,
                defaults::PROXY_PROTOCOL_TIMEOUT,
            )?,
        );
        let passive_ports = self
            .passive_ports
            .as_deref()
            .map(|t| PortRange::parse("passive-ports", t))
            .transpose()?;
        let active_ports = self
            .active_ports
            .as_deref()
            .map(|t| PortRange::parse("active-ports", t))
            .transpose()?;
        let passive_address = self
            .passive_address
            .as_deref()
            .map(|t| {
                let ip: IpAddr = t.parse().map_err(|e| invalid("passive-address", t, e))?;
                if ip.is_unspecified() || ip.is_multicast() {
                    return Err(invalid(
                        "passive-address",
                        t,
                        "must be a unicast address clients can reach",
                    ));
                }
                Ok(ip.to_canonical())
            })
            .transpose()?;
        let pipe_size = self.pipe_size.unwrap_or(defaults::PIPE_SIZE);
        if !(4096..=(64 << 20)).contains(&pipe_size) {
            return Err(invalid(
                "pipe-size",
                pipe_size,
                "must be from 4096 to 67108864",
            ));
        }
        let copy_buffer = self.copy_buffer.unwrap_or(defaults::COPY_BUFFER);
        if !(4096..=(64 << 20)).contains(&copy_buffer) {
            return Err(invalid(
                "copy-buffer",
                copy_buffer,
                "must be from 4096 to 67108864",
            ));
        }
        let send_lowat = self.send_lowat.unwrap_or(defaults::SEND_LOWAT);
        let send_lowat = match u32::try_from(send_lowat) {
            Ok(v) if v == 0 || (16384..=(64 << 20)).contains(&v) => v,
            _ => {
                return Err(invalid(
                    "send-lowat",
                    send_lowat,
                    "must be 0 (the kernel's default) or from 16384 to 67108864",
                ));
            }
        };
        // Explicit, so that tokio never reads (and panics on a malformed)
        // TOKIO_WORKER_THREADS: this module is the one reader of the
        // environment. The default follows CPU affinity and cgroup quotas.
        let worker_threads = self.worker_threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
        if !(1..=1024).contains(&worker_threads) {
            return Err(invalid(
                "worker-threads",
                worker_threads,
                "must be from 1 to 1024",
            ));
        }
        let max_line = self.max_line.unwrap_or(defaults::MAX_LINE);
        if !(64..=1 << 20).contains(&max_line) {
            return Err(invalid("max-line", max_line, "must be from 64 to 1048576"));
        }
        let log_filter = self
            .log_level
            .or_else(|| std::env::var("FTP_PROXY_LOG").ok())
            .unwrap_or_else(|| defaults::LOG_LEVEL.to_owned());
        tracing_subscriber::EnvFilter::try_new(&log_filter)
            .map_err(|e| invalid("log-level", &log_filter, e))?;
        let listen_implicit = self
            .listen_implicit
            .iter()
            .map(|l| {
                l.parse::<SocketAddr>().map_err(|e| {
                    invalid(
                        "listen-implicit",
                        l,
                        format!("{e} (expected ADDR:PORT, [IPv6]:PORT)"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let identity = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(load_identity(cert, key)?),
            (None, None) => None,
            (Some(cert), None) => {
                return Err(invalid(
                    "tls-key",
                    "",
                    format!("--tls-cert {} needs its key", cert.display()),
                ));
            }
            (None, Some(key)) => {
                return Err(invalid(
                    "tls-cert",
                    "",
                    format!("--tls-key {} needs its certificate", key.display()),
                ));
            }
        };
        let client_tls = self.client_tls.unwrap_or(if identity.is_some() {
            ClientTlsMode::Optional
        } else {
            ClientTlsMode::Off
        });
        if identity.is_none() && client_tls != ClientTlsMode::Off {
            return Err(invalid(
                "client-tls",
                ClientTlsMode::to_possible_value(&client_tls)
                    .map(|v| v.get_name().to_owned())
                    .unwrap_or_default(),
                "needs --tls-cert and --tls-key",
            ));
        }
        if identity.is_none() && !listen_implicit.is_empty() {
            return Err(invalid(
                "listen-implicit",
                self.listen_implicit.join(","),
                "implicit FTPS needs --tls-cert and --tls-key",
            ));
        }
        let server_mode = self.server_tls.unwrap_or_default();
        let insecure = self.server_tls_insecure.unwrap_or(false);
        let server_client = match server_mode {
            ServerTlsMode::Off => None,
            _ => {
                let trust = if insecure {
                    ServerTrust::Insecure
                } else {
                    load_trust(self.server_ca.as_deref())?
                };
                let tls12_only = self
                    .server_tls_max_version
                    .unwrap_or_default()
                    .tls12_only(self.server_data_tls.unwrap_or_default());
                Some(ServerTls::new(trust, tls12_only).map_err(|e| invalid("server-tls", "", e))?)
            }
        };
        if let Some(name) = &self.server_name {
            crate::tls::server_name(name).map_err(|e| invalid("server-name", name, e))?;
        } else if server_mode != ServerTlsMode::Off {
            for server in pool.servers() {
                let host = &server.address.host;
                crate::tls::server_name(host).map_err(|e| invalid("servers.address", host, e))?;
            }
        }
        let server_name = self.server_name.clone();
        let tls = TlsSettings {
            client: ClientTlsSettings {
                mode: client_tls,
                data: self.client_data_tls.unwrap_or_default(),
                reuse: self.client_tls_reuse.unwrap_or_default(),
                identity,
            },
            server: ServerTlsSettings {
                mode: server_mode,
                data: self.server_data_tls.unwrap_or_default(),
                client: server_client,
                name: server_name,
                insecure,
            },
        };
        let interfaces = if self.interface.is_empty() {
            interfaces_of(&listen)
        } else {
            self.interface
        };
        Ok(Config {
            listen,
            pool,
            routes,
            proxy_from,
            server_proxy_protocol: self.server_proxy_protocol.unwrap_or_default(),
            passive_ports,
            passive_address,
            active_ports,
            upstream_mode: self.upstream_mode.unwrap_or_default(),
            nat_traversal: self.nat_traversal.unwrap_or(defaults::NAT_TRAVERSAL),
            server_passive: self.server_passive_address.unwrap_or_default(),
            limits: Limits {
                max_sessions: positive("max-sessions", self.max_sessions, default_max_sessions())?,
                max_sessions_per_client: positive(
                    "max-sessions-per-client",
                    self.max_sessions_per_client,
                    defaults::MAX_SESSIONS_PER_CLIENT,
                )?,
                max_line,
            },
            timeouts: Timeouts {
                connect: secs(
                    "connect-timeout",
                    self.connect_timeout,
                    defaults::CONNECT_TIMEOUT,
                )?,
                data_connect: secs("data-timeout", self.data_timeout, defaults::DATA_TIMEOUT)?,
                idle: secs("idle-timeout", self.idle_timeout, defaults::IDLE_TIMEOUT)?,
                transfer_idle: secs(
                    "transfer-idle-timeout",
                    self.transfer_idle_timeout,
                    defaults::TRANSFER_IDLE_TIMEOUT,
                )?,
                reply: secs("reply-timeout", self.reply_timeout, defaults::REPLY_TIMEOUT)?,
                drain: secs("drain-timeout", self.drain_timeout, defaults::DRAIN_TIMEOUT)?,
            },
            metrics: self
                .metrics
                .as_deref()
                .map(|m| {
                    m.parse::<SocketAddr>()
                        .map_err(|e| invalid("metrics", m, format!("{e} (expected ADDR:PORT)")))
                })
                .transpose()?,
            ebpf: self.ebpf.unwrap_or_default(),
            ebpf_guard: self.ebpf_guard.unwrap_or_default(),
            ebpf_ingress: self.ebpf_ingress.unwrap_or_default(),
            interfaces,
            relay_mode: self.relay_mode.unwrap_or_default(),
            pipe_size,
            copy_buffer,
            send_lowat,
            worker_threads,
            listen_implicit,
            tls,
            log: LogConfig {
                format: self.log_format.unwrap_or_default(),
                filter: log_filter,
            },
        })
    }
}

impl Cli {
    /// Merges the command line over the file named by `--config` and
    /// validates the result.
    ///
    /// # Errors
    /// [`ConfigError`] for an unreadable file or an invalid setting.
    pub fn load(&self, settings: Settings) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => Settings::from_file(path)?,
            None => Settings::default(),
        };
        settings.over(file).validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut cli =
            Cli::try_parse_from(std::iter::once("ftp-proxy").chain(args.iter().copied())).unwrap();
        let settings = std::mem::take(&mut cli.settings);
        cli.load(settings)
    }

    #[test]
    fn defaults() {
        let c = parse(&["--upstream", "ftp.example.net"]).unwrap();
        assert_eq!(c.listen, vec!["0.0.0.0:21".parse().unwrap()]);
        assert_eq!(
            c.pool.servers()[0].address,
            Upstream {
                host: "ftp.example.net".into(),
                port: 21
            }
        );
        assert_eq!(c.limits.max_sessions, default_max_sessions());
        assert!(c.limits.max_sessions <= defaults::MAX_SESSIONS);
        assert!(c.nat_traversal);
        assert_eq!(c.upstream_mode, UpstreamMode::Client);
        assert_eq!(c.relay_mode, RelayMode::Auto);
        assert_eq!((c.pipe_size, c.copy_buffer), (1 << 20, 4 << 20));
    }

    /// The default session limit fits the open-file limit, so a default
    /// start never warns that it cannot (issue 11, item 9).
    #[test]
    fn default_max_sessions_fits_the_open_file_limit() {
        assert_eq!(sessions_within(20_000), 9_968);
        assert_eq!(sessions_within(10), 0);
        let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .maximum
            .unwrap_or(u64::MAX);
        let max = default_max_sessions() as u64;
        assert!(max * FDS_PER_SESSION + FDS_RESERVED <= hard.max(FDS_RESERVED + 2));
        assert!(max >= 1);
    }

    /// A setting's default as `--help` prints it and as the example file
    /// shows it, derived from [`defaults`] and the enums' defaults.
    fn documented_defaults() -> Vec<(&'static str, String, String)> {
        fn name<T: ValueEnum + Default>() -> String {
            T::default()
                .to_possible_value()
                .map(|v| v.get_name().to_owned())
                .unwrap_or_default()
        }
        let plain = |key: &'static str, value: String| (key, value.clone(), value);
        let quoted =
            |key: &'static str, value: String| (key, value.clone(), format!("\"{value}\""));
        let secs = |key: &'static str, d: Duration| plain(key, d.as_secs().to_string());
        vec![
            (
                "listen",
                defaults::LISTEN.to_owned(),
                format!("[\"{}\"]", defaults::LISTEN),
            ),
            quoted("upstream-mode", name::<UpstreamMode>()),
            plain("nat-traversal", defaults::NAT_TRAVERSAL.to_string()),
            quoted("server-passive-address", name::<ServerPassivePolicy>()),
            plain("max-sessions", defaults::MAX_SESSIONS.to_string()),
            plain(
                "max-sessions-per-client",
                defaults::MAX_SESSIONS_PER_CLIENT.to_string(),
            ),
            plain("max-line", defaults::MAX_LINE.to_string()),
            secs("connect-timeout", defaults::CONNECT_TIMEOUT),
            secs("data-timeout", defaults::DATA_TIMEOUT),
            secs("idle-timeout", defaults::IDLE_TIMEOUT),
            secs("transfer-idle-timeout", defaults::TRANSFER_IDLE_TIMEOUT),
            secs("reply-timeout", defaults::REPLY_TIMEOUT),
            secs("drain-timeout", defaults::DRAIN_TIMEOUT),
            quoted("relay-mode", name::<RelayMode>()),
            plain("pipe-size", defaults::PIPE_SIZE.to_string()),
            plain("copy-buffer", defaults::COPY_BUFFER.to_string()),
            plain("send-lowat", defaults::SEND_LOWAT.to_string()),
            quoted("ebpf", name::<EbpfMode>()),
            quoted("ebpf-guard", name::<GuardMode>()),
            quoted("ebpf-ingress", name::<IngressHook>()),
            quoted("client-data-tls", name::<ClientDataTls>()),
            quoted("client-tls-reuse", name::<TlsReuse>()),
            quoted("server-tls", name::<ServerTlsMode>()),
            plain("server-tls-insecure", "false".to_owned()),
            quoted("server-data-tls", name::<ServerDataTls>()),
            quoted("server-tls-max-version", name::<ServerTlsMaxVersion>()),
            quoted("log-format", name::<LogFormat>()),
            quoted("log-level", defaults::LOG_LEVEL.to_owned()),
            quoted("balance", name::<Balance>()),
            quoted("unknown-users", name::<UnknownUsers>()),
            plain(
                "allow-user-at-server",
                defaults::ALLOW_USER_AT_SERVER.to_string(),
            ),
            secs("proxy-protocol-timeout", defaults::PROXY_PROTOCOL_TIMEOUT),
            quoted("server-proxy-protocol", name::<ServerProxyProtocol>()),
        ]
    }

    /// Settings whose default depends on the machine or the session, or
    /// that have none: documented in words.
    const NO_FIXED_DEFAULT: &[&str] = &[
        "upstream",
        "passive-ports",
        "passive-address",
        "active-ports",
        "worker-threads",
        "metrics",
        "interface",
        "tls-cert",
        "tls-key",
        "client-tls",
        "listen-implicit",
        "server-ca",
        "server-name",
        "proxy-protocol-from",
    ];

    fn example() -> String {
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ftp-proxy.example.toml"),
        )
        .unwrap()
    }

    /// One source for each default (issue 11, item 8): `--help`, the
    /// example file and validation say the same, and every setting is
    /// either in the table or named as having no fixed default.
    #[test]
    fn defaults_agree_with_help_and_the_example_file() {
        use clap::CommandFactory;
        let table = documented_defaults();
        let example = example();
        let command = Cli::command();
        for arg in command.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "config" | "check-config" | "help" | "version") {
                continue;
            }
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            match table.iter().find(|(key, ..)| *key == long) {
                Some((_, in_help, in_file)) => {
                    assert!(
                        help.contains(&format!("[default: {in_help}")),
                        "--{long} help says {help:?}, the default is {in_help}"
                    );
                    assert!(
                        example.contains(&format!("\n#{long} = {in_file}\n")),
                        "the example file lacks the default line #{long} = {in_file}"
                    );
                }
                None => {
                    assert!(
                        NO_FIXED_DEFAULT.contains(&long),
                        "--{long}: add its default to documented_defaults() or NO_FIXED_DEFAULT"
                    );
                    assert!(help.contains("[default"), "--{long} help names no default");
                    assert!(
                        example.contains(&format!("{long} = ")),
                        "the example file does not document {long}"
                    );
                }
            }
        }
    }

    /// The example file validates, and apart from the upstream it names
    /// it is the defaults.
    #[test]
    fn the_example_file_is_the_defaults() {
        let from_file: Settings = toml::from_str(&example()).unwrap();
        let upstream = from_file.upstream.clone().unwrap();
        let from_file = from_file.validate().unwrap();
        let bare = Settings {
            upstream: Some(upstream),
            ..Settings::default()
        }
        .validate()
        .unwrap();
        assert_eq!(from_file, bare);
    }

    #[test]
    fn upstream_forms() {
        for (text, host, port) in [
            ("h:2121", "h", 2121),
            ("[::1]:2121", "::1", 2121),
            ("::1", "::1", 21),
            ("[::1]", "::1", 21),
            ("10.0.0.1", "10.0.0.1", 21),
        ] {
            assert_eq!(
                Upstream::parse(text).unwrap(),
                Upstream {
                    host: host.into(),
                    port
                },
                "{text}"
            );
        }
        for bad in ["", ":21", "h:0", "h:99999", "[::1", "[nope]:21", "a b:21"] {
            assert!(Upstream::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Upstream::parse("[::1]:21").unwrap().authority(), "[::1]:21");
    }

    #[test]
    fn invalid_values_name_their_key() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["--upstream", "h", "--passive-ports", "2000"],
                "passive-ports",
            ),
            (
                &["--upstream", "h", "--passive-ports", "3000-2000"],
                "passive-ports",
            ),
            (
                &["--upstream", "h", "--active-ports", "0-10"],
                "active-ports",
            ),
            (&["--upstream", "h", "--listen", "nope"], "listen"),
            (
                &["--upstream", "h", "--passive-address", "0.0.0.0"],
                "passive-address",
            ),
            (&["--upstream", "h", "--max-sessions", "0"], "max-sessions"),
            (&["--upstream", "h", "--idle-timeout", "0"], "idle-timeout"),
            (&["--upstream", "h", "--pipe-size", "10"], "pipe-size"),
            (&["--upstream", "h", "--copy-buffer", "100"], "copy-buffer"),
            (
                &["--upstream", "h", "--worker-threads", "0"],
                "worker-threads",
            ),
            (
                &["--upstream", "h", "--worker-threads", "5000"],
                "worker-threads",
            ),
            (
                &["--upstream", "h", "--copy-buffer", "1000000000"],
                "copy-buffer",
            ),
            (&["--upstream", "h", "--send-lowat", "100"], "send-lowat"),
            (&[], "upstream"),
        ];
        for (args, key) in cases {
            let err = parse(args).unwrap_err().to_string();
            assert!(err.contains(key), "{args:?}: {err}");
        }
    }

    fn from_file(text: &str) -> Result<Config, ConfigError> {
        toml::from_str::<Settings>(text).unwrap().validate()
    }

    const POOL: &str = r#"
balance = "sticky-client"
unknown-users = "pool"
allow-user-at-server = true
proxy-protocol-from = ["10.77.1.1/32", "2001:db8::/32"]
server-proxy-protocol = "v2"

[[servers]]
name = "a"
address = "10.0.0.11:21"

[[servers]]
name = "b"
address = "[2001:db8::12]:2121"
weight = 3

[health]
interval = 10
rise = 1

[[routes]]
users = ["alice", "bob*"]
servers = ["a"]

[[routes]]
users = ["*"]
servers = ["b", "a"]
"#;

    #[test]
    fn a_pool_with_routes_and_proxy_protocol() {
        use crate::upstream::routes::Target;
        let c = from_file(POOL).unwrap();
        let servers = c.pool.servers();
        assert_eq!(servers.len(), 2);
        assert_eq!(
            (servers[0].name.as_str(), servers[0].weight.get()),
            ("a", 1)
        );
        assert_eq!(
            (
                &*servers[1].address.host,
                servers[1].address.port,
                servers[1].weight.get()
            ),
            ("2001:db8::12", 2121, 3)
        );
        assert_eq!(c.pool.balance(), Balance::StickyClient);
        let h = c.pool.health().unwrap();
        assert_eq!(
            (h.interval(), h.timeout(), h.rise(), h.fall()),
            (
                Duration::from_secs(10),
                defaults::HEALTH_TIMEOUT,
                1,
                defaults::HEALTH_FALL
            )
        );
        assert_eq!(c.server_proxy_protocol, ServerProxyProtocol::V2);
        assert!(c.proxy_from.trusts("10.77.1.1".parse().unwrap()));
        assert!(c.proxy_from.trusts("::ffff:10.77.1.1".parse().unwrap()));
        assert!(!c.proxy_from.trusts("10.77.1.2".parse().unwrap()));
        assert_eq!(c.proxy_from.timeout(), defaults::PROXY_PROTOCOL_TIMEOUT);
        let bob = c.routes.route("bobby@b", &c.pool);
        assert_eq!(bob, Err(crate::upstream::routes::Refused::ServerNotAllowed));
        let carol = c.routes.route("carol", &c.pool).unwrap();
        assert_eq!(
            carol.target,
            Target::Servers(vec![servers[1].name.clone(), servers[0].name.clone()])
        );
        // Flags win over the file.
        let merged = Settings {
            balance: Some(Balance::Random),
            server_proxy_protocol: Some(ServerProxyProtocol::Off),
            ..Settings::default()
        }
        .over(toml::from_str(POOL).unwrap())
        .validate()
        .unwrap();
        assert_eq!(merged.pool.balance(), Balance::Random);
        assert_eq!(merged.server_proxy_protocol, ServerProxyProtocol::Off);
        assert_eq!(merged.routes, c.routes);
    }

    #[test]
    fn upstream_is_a_pool_of_one() {
        let c = parse(&["--upstream", "h:2121"]).unwrap();
        let servers = c.pool.servers();
        assert_eq!(servers.len(), 1);
        assert_eq!(servers[0].name.as_str(), "upstream");
        assert_eq!(servers[0].address.authority(), "h:2121");
        assert_eq!(c.pool.balance(), Balance::LeastConnections);
        assert_eq!(
            c.pool.health(),
            None,
            "one server: not checked unless asked"
        );
        let checked = from_file("upstream = \"h\"\n[health]\nfall = 5\n").unwrap();
        assert_eq!(checked.pool.health().map(|h| h.fall()), Some(5));
        assert_eq!(c.routes, Routes::default());
        assert!(c.proxy_from.networks().is_empty());
        assert_eq!(c.server_proxy_protocol, ServerProxyProtocol::Off);
        let c = parse(&[
            "--upstream",
            "h",
            "--proxy-protocol-from",
            "10.0.0.0/8",
            "--proxy-protocol-from",
            "192.0.2.7",
            "--proxy-protocol-timeout",
            "5",
            "--balance",
            "round-robin",
        ])
        .unwrap();
        assert_eq!(c.proxy_from.networks().len(), 2);
        assert_eq!(c.proxy_from.timeout(), Duration::from_secs(5));
        assert_eq!(c.pool.balance(), Balance::RoundRobin);
    }

    /// Every mistake in a pool names its key (issue 13: exit 64 with the
    /// key).
    #[test]
    fn pool_mistakes_name_their_key() {
        let server = |name: &str| format!("[[servers]]\nname = \"{name}\"\naddress = \"h:21\"\n");
        let two = format!("{}{}", server("a"), server("b"));
        let cases: Vec<(String, &str)> = vec![
            (format!("upstream = \"h\"\n{}", server("a")), "upstream"),
            (String::new(), "missing upstream"),
            (format!("{}{}", server("a"), server("a")), "servers.name"),
            (server("A"), "servers.name"),
            (server(&"x".repeat(33)), "servers.name"),
            (server(""), "servers.name"),
            (
                "[[servers]]\nname = \"a\"\naddress = \"h:0\"\n".into(),
                "servers.address",
            ),
            (format!("{}weight = 0\n", server("a")), "servers.weight"),
            (format!("{}weight = 1001\n", server("a")), "servers.weight"),
            (
                format!("{two}[[routes]]\nusers = [\"x\"]\nservers = [\"c\"]\n"),
                "routes.servers",
            ),
            (
                format!("{two}[[routes]]\nusers = [\"x\"]\nservers = []\n"),
                "routes.servers",
            ),
            (
                format!("{two}[[routes]]\nusers = []\nservers = [\"a\"]\n"),
                "routes.users",
            ),
            (
                format!("{two}[[routes]]\nusers = [\"a*b\"]\nservers = [\"a\"]\n"),
                "routes.users",
            ),
            (format!("{two}[health]\ninterval = 0\n"), "health.interval"),
            (format!("{two}[health]\ntimeout = 9\n"), "health.timeout"),
            (format!("{two}[health]\nrise = 0\n"), "health.rise"),
            (format!("{two}[health]\nfall = 1000\n"), "health.fall"),
            (
                format!("proxy-protocol-from = [\"10.0.0.1/8\"]\n{two}"),
                "proxy-protocol-from",
            ),
            (
                format!("proxy-protocol-from = [\"nope\"]\n{two}"),
                "proxy-protocol-from",
            ),
            (
                format!("proxy-protocol-timeout = 0\n{two}"),
                "proxy-protocol-timeout",
            ),
        ];
        for (text, key) in cases {
            let err = from_file(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{text}\n=> {err}");
        }
        // Unknown keys inside the tables are refused too.
        for text in [
            format!("{}color = \"red\"\n", server("a")),
            format!("{two}[health]\nintervall = 3\n"),
            format!("{two}[[routes]]\nuser = [\"x\"]\nservers = [\"a\"]\n"),
        ] {
            assert!(toml::from_str::<Settings>(&text).is_err(), "{text}");
        }
        assert!(Cli::try_parse_from(["ftp-proxy", "--server-proxy-protocol", "v3"]).is_err());
        assert!(toml::from_str::<Settings>("balance = \"fastest\"").is_err());
    }

    #[test]
    fn file_and_flags_merge() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "upstream = \"a:21\"\nlisten = [\"127.0.0.1:2121\", \"[::1]:2121\"]\nmax-sessions = 5\nupstream-mode = \"passive\"\nrelay-mode = \"splice\"\ncopy-buffer = 65536\n").unwrap();
        let c = parse(&["--config", path.to_str().unwrap(), "--max-sessions", "7"]).unwrap();
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.limits.max_sessions, 7);
        assert_eq!(c.upstream_mode, UpstreamMode::Passive);
        assert_eq!((c.relay_mode, c.copy_buffer), (RelayMode::Splice, 65536));
        std::fs::write(&path, "upstrem = \"a:21\"\n").unwrap();
        let err = parse(&["--config", path.to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("upstrem"), "{err}");
    }
}
