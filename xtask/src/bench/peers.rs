//! The paths under test and their daemons: vsftpd (the server of every
//! path), the gateway, ProFTPD with mod_proxy, the SuSE proxy-suite and
//! HAProxy. Each daemon runs in the foreground as a child of the harness,
//! with its own configuration file under the run directory, on loopback
//! or inside the wire's namespaces ([`super::wire`]) only; it is stopped
//! (with everything it forked) when its [`Daemon`] is dropped.
//!
//! Ports, from `base` (10000 by default), on loopback:
//!
//! | daemon | control | data ports |
//! |---|---|---|
//! | vsftpd | 127.0.0.1:base+21 | passive base+100..399 |
//! | ProFTPD mod_proxy | 127.0.0.1:base+31 | passive base+400..699 |
//! | proxy-suite | 127.0.0.1:base+41 | passive base+700..999, active base+1000..1299 |
//! | HAProxy (splice / no splice) | 127.0.0.2 / 127.0.0.3:base+51 | base+100..399 forwarded to vsftpd's |
//! | ftp-proxy | 127.0.0.1:base+61 | passive base+1300..1599, active base+1600..1899 |
//!
//! On the wire, the same control ports: vsftpd on the server host
//! (10.201.2.2), the proxies on the gateway host's client side
//! (10.201.1.1), and HAProxy in front of a vsftpd of its own
//! (10.201.2.2:base+23, passive base+400..699, `pasv_address` = HAProxy's
//! address, so that PASV clients too open their data connections through
//! HAProxy's range, forwarded port for port). Each host has its own port
//! space there, so the ranges that must hold a thousand concurrent slow
//! downloads are wider: vsftpd's passive base+2000..5999, the gateway's
//! passive base+2000..3999 and active base+4000..5999. ProFTPD mod_proxy
//! and HAProxy without splice run on loopback only.
//!
//! FTPS (on the wire): a vsftpd with TLS on the server host
//! (10.201.2.2:base+25, passive base+700..999, `require_ssl_reuse=YES`),
//! and the gateway on its usual address with TLS toward the client only
//! (in front of the plain vsftpd) or on both legs (in front of the TLS
//! one). The certificates come from an authority the harness makes
//! ([`write_certificates`]); clients and the gateway trust it.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::measure;
use super::wire::{self, Host, Names};

/// Where the harness keeps things.
#[derive(Debug, Clone)]
pub struct Env {
    /// Configurations and logs.
    pub run_dir: PathBuf,
    /// The FTP root (on tmpfs when possible): `ftproot/pub/big.bin`.
    pub data_dir: PathBuf,
    /// Unpacked peers (scripts/install-bench-deps.sh).
    pub peers_dir: PathBuf,
    /// The gateway binary.
    pub gateway_bin: PathBuf,
    /// The first port of the range the harness uses.
    pub base: u16,
    /// How the gateway names its tracker switch, when it has one.
    pub ebpf_flag: Option<EbpfValues>,
    /// Extra arguments for the gateway.
    pub gateway_args: Vec<String>,
    /// The wire's namespaces; `None` on loopback.
    pub wire: Option<Names>,
}

/// The files of the FTPS paths ([`write_certificates`]).
#[derive(Debug, Clone)]
pub struct Certificates {
    /// The authority's certificate: what curl and the gateway trust.
    pub ca: PathBuf,
    /// The servers' chain (vsftpd's and the gateway's): the certificate,
    /// then the authority's.
    pub chain: PathBuf,
    /// Its key (ECDSA P-256).
    pub key: PathBuf,
}

/// Writes an authority and a certificate it signed for every address the
/// FTPS paths are reached at (the gateway's and the servers', on the wire
/// and on loopback) into `dir`.
pub fn write_certificates(dir: &Path) -> Result<Certificates> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate().context("an authority key")?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "ftp-proxy bench authority");
    let ca_pem = ca_params.self_signed(&ca_key)?.pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let names: Vec<String> = [
        "localhost".to_owned(),
        Ipv4Addr::LOCALHOST.to_string(),
        wire::GATEWAY.to_string(),
        wire::SERVER.to_string(),
    ]
    .into();
    let key = KeyPair::generate().context("a server key")?;
    let leaf = CertificateParams::new(names)?.signed_by(&key, &issuer)?;
    let certificates = Certificates {
        ca: dir.join("ca.pem"),
        chain: dir.join("chain.pem"),
        key: dir.join("key.pem"),
    };
    write(&certificates.ca, &ca_pem)?;
    write(&certificates.chain, &format!("{}{ca_pem}", leaf.pem()))?;
    write(&certificates.key, &key.serialize_pem())?;
    Ok(certificates)
}

/// The values `--ebpf` takes.
#[derive(Debug, Clone)]
pub struct EbpfValues {
    /// Tracker on.
    pub on: String,
    /// Tracker off.
    pub off: String,
}

impl Env {
    /// vsftpd's control address.
    pub fn server_addr(&self) -> SocketAddr {
        let ip = if self.wire.is_some() {
            wire::SERVER
        } else {
            Ipv4Addr::LOCALHOST
        };
        SocketAddr::from((ip, self.base + 21))
    }

    /// The control address of the vsftpd behind HAProxy on the wire (on
    /// loopback HAProxy relays to the common one).
    pub fn haproxy_server_addr(&self) -> SocketAddr {
        if self.wire.is_some() {
            SocketAddr::from((wire::SERVER, self.base + 23))
        } else {
            self.server_addr()
        }
    }

    /// The control address of the vsftpd with TLS (the FTPS paths).
    pub fn ftps_server_addr(&self) -> SocketAddr {
        SocketAddr::from((self.server_addr().ip(), self.base + 25))
    }

    /// Where the FTPS paths' certificates are ([`write_certificates`]).
    pub fn certificates(&self) -> Certificates {
        let dir = self.run_dir.join("tls");
        Certificates {
            ca: dir.join("ca.pem"),
            chain: dir.join("chain.pem"),
            key: dir.join("key.pem"),
        }
    }

    /// The namespace of `host` on the wire; `None` on loopback.
    pub fn ns(&self, host: Host) -> Option<&str> {
        self.wire.as_ref().map(|w| w.of(host))
    }

    /// `program` run on `host` (in its namespace on the wire).
    pub fn command(&self, host: Host, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match &self.wire {
            Some(w) => w.command(host, program),
            None => Command::new(program),
        }
    }

    /// Which network the paths cross, for the report.
    pub fn net(&self) -> Net {
        if self.wire.is_some() {
            Net::Wire
        } else {
            Net::Loopback
        }
    }
}

/// The network a run crosses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Net {
    /// Client, gateway and server namespaces joined by veth ([`super::wire`]).
    Wire,
    /// Everything on 127.0.0.0/8.
    Loopback,
}

impl Net {
    /// Its name (as `--net` spells it).
    pub fn name(self) -> &'static str {
        match self {
            Net::Wire => "wire",
            Net::Loopback => "loopback",
        }
    }
}

/// A path the client can take to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// vsftpd alone.
    Direct,
    /// The gateway; `Some(true)` tracker on, `Some(false)` `--ebpf off`,
    /// `None` a gateway without a tracker switch.
    Gateway(Option<bool>),
    /// The gateway with `--relay-mode splice` (tracker as in the first row).
    GatewaySplice,
    /// The gateway with `--relay-mode copy` (tracker as in the first row).
    GatewayCopy,
    /// The gateway with `--relay-mode sockmap` (the kernel relays; tracker
    /// as in the first row). On the wire, with the eBPF object only.
    GatewaySockmap,
    /// The gateway, tracker on, with `--ebpf-guard enforce` (`true`) or
    /// `--ebpf-guard off`: the guard's cost. Opt-in (`--paths`).
    GatewayGuard {
        /// enforce, or off.
        enforce: bool,
    },
    /// The gateway (tracker as in the first row) with a pool of three
    /// servers, all the same vsftpd: what balancing costs a session.
    GatewayPool,
    /// ProFTPD with mod_proxy as a reverse proxy.
    ModProxy,
    /// The SuSE proxy-suite.
    Suse,
    /// HAProxy in TCP mode, with or without splice.
    Haproxy {
        /// `option splice-request` + `option splice-response`.
        splice: bool,
    },
    /// FTPS: the vsftpd with TLS alone (the FTPS rows' baseline).
    DirectFtps,
    /// FTPS through the gateway (tracker as in the first row), TLS toward
    /// the client; `server_tls`: and toward the server (the vsftpd with
    /// TLS), else the plain vsftpd.
    GatewayFtps {
        /// TLS on the server's leg too.
        server_tls: bool,
    },
}

impl Kind {
    /// A stable identifier (for `--paths`).
    pub fn id(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Gateway(None) => "ftp-proxy",
            Kind::Gateway(Some(true)) => "ftp-proxy",
            Kind::Gateway(Some(false)) => "ftp-proxy-ebpf-off",
            Kind::GatewaySplice => "ftp-proxy-splice",
            Kind::GatewayCopy => "ftp-proxy-copy",
            Kind::GatewaySockmap => "ftp-proxy-sockmap",
            Kind::GatewayPool => "ftp-proxy-pool3",
            Kind::GatewayGuard { enforce: true } => "ftp-proxy-guard-enforce",
            Kind::GatewayGuard { enforce: false } => "ftp-proxy-guard-off",
            Kind::ModProxy => "proftpd",
            Kind::Suse => "proxy-suite",
            Kind::Haproxy { splice: true } => "haproxy-splice",
            Kind::Haproxy { splice: false } => "haproxy",
            Kind::DirectFtps => "direct-ftps",
            Kind::GatewayFtps { server_tls: true } => "ftp-proxy-ftps",
            Kind::GatewayFtps { server_tls: false } => "ftp-proxy-ftps-client",
        }
    }

    /// The name in the report.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Direct => "direct (vsftpd alone)",
            Kind::Gateway(None) => "ftp-proxy",
            Kind::Gateway(Some(true)) => "ftp-proxy (tracker on)",
            Kind::Gateway(Some(false)) => "ftp-proxy --ebpf off",
            Kind::GatewaySplice => "ftp-proxy --relay-mode splice",
            Kind::GatewayCopy => "ftp-proxy --relay-mode copy",
            Kind::GatewaySockmap => "ftp-proxy --relay-mode sockmap",
            Kind::GatewayPool => "ftp-proxy, pool of 3 servers",
            Kind::GatewayGuard { enforce: true } => "ftp-proxy --ebpf-guard enforce",
            Kind::GatewayGuard { enforce: false } => "ftp-proxy --ebpf-guard off",
            Kind::ModProxy => "ProFTPD mod_proxy",
            Kind::Suse => "proxy-suite ftp-proxy",
            Kind::Haproxy { splice: true } => "HAProxy TCP, splice",
            Kind::Haproxy { splice: false } => "HAProxy TCP, no splice",
            Kind::DirectFtps => "direct FTPS (vsftpd with TLS alone)",
            Kind::GatewayFtps { server_tls: true } => "ftp-proxy, TLS on both legs",
            Kind::GatewayFtps { server_tls: false } => "ftp-proxy, TLS toward the client only",
        }
    }

    /// Whether the path runs only when `--paths` names it (not in a full
    /// run, whose report is BENCHMARKS.md).
    pub fn opt_in(self) -> bool {
        matches!(self, Kind::GatewayGuard { .. })
    }

    /// Whether the path is measured for session rates only (its transfers
    /// are another path's).
    pub fn sessions_only(self) -> bool {
        self == Kind::GatewayPool
    }

    /// Whether the path is one of the FTPS rows (measured as `ftps`,
    /// against [`Kind::DirectFtps`]).
    pub fn is_ftps(self) -> bool {
        matches!(self, Kind::DirectFtps | Kind::GatewayFtps { .. })
    }

    /// Whether the path is a peer (not the gateway, not direct).
    pub fn is_peer(self) -> bool {
        matches!(self, Kind::ModProxy | Kind::Suse | Kind::Haproxy { .. })
    }

    /// The peer's name in PEERS_DIR/status.
    pub fn package(self) -> Option<&'static str> {
        match self {
            Kind::ModProxy => Some("proftpd"),
            Kind::Suse => Some("suse"),
            Kind::Haproxy { .. } => Some("haproxy"),
            _ => None,
        }
    }

    /// The name in the report, on `net` (direct is "routed" on the wire).
    pub fn label_on(self, net: Net) -> &'static str {
        match (self, net) {
            (Kind::Direct, Net::Wire) => "routed (vsftpd, gateway host forwards)",
            (Kind::DirectFtps, Net::Wire) => "routed FTPS (vsftpd with TLS, gateway host forwards)",
            _ => self.label(),
        }
    }

    /// The address clients connect to.
    pub fn addr(self, env: &Env) -> SocketAddr {
        let b = env.base;
        if env.wire.is_some() {
            let port = match self {
                Kind::Direct => return env.server_addr(),
                Kind::DirectFtps => return env.ftps_server_addr(),
                Kind::ModProxy => b + 31,
                Kind::Suse => b + 41,
                Kind::Haproxy { .. } => b + 51,
                Kind::Gateway(_)
                | Kind::GatewaySplice
                | Kind::GatewayCopy
                | Kind::GatewaySockmap
                | Kind::GatewayPool
                | Kind::GatewayGuard { .. }
                | Kind::GatewayFtps { .. } => b + 61,
            };
            return SocketAddr::from((wire::GATEWAY, port));
        }
        let (ip, port) = match self {
            Kind::Direct => (Ipv4Addr::LOCALHOST, b + 21),
            Kind::ModProxy => (Ipv4Addr::LOCALHOST, b + 31),
            Kind::Suse => (Ipv4Addr::LOCALHOST, b + 41),
            Kind::Haproxy { splice: true } => (Ipv4Addr::new(127, 0, 0, 2), b + 51),
            Kind::Haproxy { splice: false } => (Ipv4Addr::new(127, 0, 0, 3), b + 51),
            Kind::DirectFtps => (Ipv4Addr::LOCALHOST, b + 25),
            Kind::Gateway(_)
            | Kind::GatewaySplice
            | Kind::GatewayCopy
            | Kind::GatewaySockmap
            | Kind::GatewayPool
            | Kind::GatewayGuard { .. }
            | Kind::GatewayFtps { .. } => (Ipv4Addr::LOCALHOST, b + 61),
        };
        SocketAddr::from((ip, port))
    }

    /// Why active mode is not measured on this path, if it is not.
    pub fn no_active(self) -> Option<&'static str> {
        match self {
            // The server connects to the client itself: the data bypasses
            // a TCP relay, so there is nothing of HAProxy to measure.
            Kind::Haproxy { .. } => Some("n/a: active data bypasses a TCP relay"),
            // Debian 12's curl 7.88.1 fails active FTPS once it has
            // accepted the data connection, against vsftpd alone too.
            Kind::DirectFtps | Kind::GatewayFtps { .. } => Some("n/a: curl 7.88 fails active FTPS"),
            _ => None,
        }
    }

    /// Processes the path adds per session (for the pid budget of the
    /// idle-session test), besides the server's.
    pub fn processes_per_session(self) -> usize {
        match self {
            Kind::ModProxy | Kind::Suse => 1,
            _ => 0,
        }
    }
}

/// A daemon started by the harness; dropping it stops it and everything it
/// forked.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Child,
    /// The process whose tree is measured.
    pub pid: u32,
    /// The file its output goes to.
    pub log: PathBuf,
    /// Processes in its tree when idle.
    pub baseline_processes: usize,
    /// The namespace it runs in (on the wire): where it is probed from.
    ns: Option<String>,
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

impl Daemon {
    /// Starts `cmd`, after checking that nothing else listens on `addr`
    /// (in namespace `ns`, where the daemon will run): otherwise the
    /// readiness probe would greet someone else's daemon.
    fn spawn(
        name: &str,
        (addr, ns): (SocketAddr, Option<&str>),
        mut cmd: Command,
        log: PathBuf,
        stdin_is_log: bool,
    ) -> Result<Daemon> {
        if let Err(e) = wire::within(ns, || Ok(std::net::TcpListener::bind(addr)?)) {
            bail!(
                "{name}: {addr} is taken ({e}): another process listens there; \
                 stop it or choose another range with --base-port"
            );
        }
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        // vsftpd writes its fatal startup errors to fd 0.
        let stdin = if stdin_is_log {
            Stdio::from(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&log)
                    .context("reopening the log")?,
            )
        } else {
            Stdio::null()
        };
        cmd.stdin(stdin)
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out));
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        let pid = child.id();
        Ok(Daemon {
            name: name.to_owned(),
            child,
            pid,
            log,
            baseline_processes: 1,
            ns: ns.map(str::to_owned),
        })
    }

    /// Waits until `addr` accepts and sends a `220` banner.
    fn wait_ready(&mut self, addr: SocketAddr) -> Result<()> {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < Duration::from_secs(15) {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited with {status} before it was ready: {}",
                    self.name,
                    tail(&self.log)
                );
            }
            match wire::within(self.ns.as_deref(), || banner(addr)) {
                Ok(()) if matches!(self.child.try_wait(), Ok(Some(_))) => {
                    bail!("{} exited: {}", self.name, tail(&self.log));
                }
                Ok(()) => {
                    // The probe session may still be ending in a forking daemon.
                    measure::settle(self.pid, 1, Duration::from_secs(2));
                    self.baseline_processes = measure::tree(self.pid).len();
                    return Ok(());
                }
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "{} not ready on {addr} after 15 s ({last}): {}",
            self.name,
            tail(&self.log)
        )
    }

    /// Stops the daemon: SIGTERM, then SIGKILL for whatever of its tree
    /// is still there after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let before = measure::tree(self.pid);
        signal(self.pid, rustix::process::Signal::TERM);
        let start = Instant::now();
        while start.elapsed() < grace {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Sessions of forking daemons outlive their listener (vsftpd's
        // call setsid): kill what is left, children first. A session whose
        // listener died was reparented to init.
        let mut left = measure::tree(self.pid);
        left.extend(
            before
                .into_iter()
                .filter(|&p| orphaned(p) || still_ours(p, &self.log)),
        );
        for pid in left.iter().rev() {
            if *pid != self.pid {
                signal(*pid, rustix::process::Signal::KILL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `pid` is alive with init as its parent.
fn orphaned(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| measure::parse_stat(&s))
        .is_some_and(|s| s.ppid == 1)
}

/// Whether `pid` is still a process of the run (its command line names a
/// file of the run directory, as every daemon's does).
fn still_ours(pid: u32, log: &Path) -> bool {
    let Some(run_dir) = log.parent().and_then(Path::to_str) else {
        return false;
    };
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(run_dir))
        .unwrap_or(false)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

fn banner(addr: SocketAddr) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = [0u8; 512];
    let mut got = Vec::new();
    for _ in 0..16 {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(buf.get(..n).unwrap_or_default());
        if got.ends_with(b"\n") {
            break;
        }
    }
    if !got.starts_with(b"220") {
        bail!("banner {:?}", String::from_utf8_lossy(&got));
    }
    let _ = s.write_all(b"QUIT\r\n");
    // Read the 221 so that the session ends cleanly before measurements.
    let _ = s.read(&mut buf);
    Ok(())
}

/// The last lines of a log, for error messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// One vsftpd instance of the run.
#[derive(Debug, Clone)]
pub struct Vsftpd {
    /// File names under the run directory: NAME.conf, NAME.err, NAME.log.
    pub name: &'static str,
    /// Control address.
    pub addr: SocketAddr,
    /// Passive port range.
    pub pasv: (u16, u16),
    /// Address announced in 227 replies, when not its own.
    pub pasv_address: Option<Ipv4Addr>,
    /// FTPS with these certificates (explicit, required for anonymous
    /// logins and data, data connections resuming the control session).
    pub tls: Option<Certificates>,
}

impl Vsftpd {
    /// The server of every path (of every path but HAProxy's on the wire).
    pub fn main(env: &Env) -> Vsftpd {
        let b = env.base;
        Vsftpd {
            name: "vsftpd",
            addr: env.server_addr(),
            // On the wire, four times as many ports as concurrent slow downloads:
            // vsftpd picks a passive port at random and gives up (500 OOPS:
            // vsf_sysutil_bind) after a few taken ones, which at 1,000 of
            // 2,000 in use failed about one download in a thousand.
            pasv: if env.wire.is_some() {
                (b + 2000, b + 5999)
            } else {
                (b + 100, b + 399)
            },
            pasv_address: None,
            tls: None,
        }
    }

    /// The wire's server behind HAProxy: it announces HAProxy's address
    /// and a range that HAProxy forwards port for port.
    pub fn haproxy(env: &Env) -> Vsftpd {
        Vsftpd {
            name: "vsftpd-haproxy",
            addr: env.haproxy_server_addr(),
            pasv: (env.base + 400, env.base + 699),
            pasv_address: Some(wire::GATEWAY),
            tls: None,
        }
    }

    /// The server of the FTPS paths: explicit FTPS, on the server host
    /// (measured on the wire only; on loopback its ports would be free
    /// too, above the gateway's).
    pub fn ftps(env: &Env) -> Vsftpd {
        let b = env.base;
        Vsftpd {
            name: "vsftpd-ftps",
            addr: env.ftps_server_addr(),
            pasv: if env.wire.is_some() {
                (b + 700, b + 999)
            } else {
                (b + 1900, b + 1999)
            },
            pasv_address: None,
            tls: Some(env.certificates()),
        }
    }
}

/// vsftpd's configuration: the test fixture's template
/// (deploy/demo/vsftpd.conf.in) with benchmark settings.
pub fn vsftpd_config(template: &str, env: &Env, v: &Vsftpd) -> String {
    let base = template
        .replace(
            "@LISTEN@",
            &format!("listen=YES\nlisten_ipv6=NO\nlisten_address={}", v.addr.ip()),
        )
        .replace("@PORT@", &v.addr.port().to_string())
        .replace("@ROOT@", &env.data_dir.display().to_string())
        .replace("@PASV_MIN@", &v.pasv.0.to_string())
        .replace("@PASV_MAX@", &v.pasv.1.to_string())
        .replace(
            &format!("vsftpd_log_file={}/vsftpd.log", env.data_dir.display()),
            &format!("vsftpd_log_file={}/{}.log", env.run_dir.display(), v.name),
        );
    let pasv_address = v.pasv_address.map(|a| a.to_string());
    let mut overrides = vec![
        // Logging every command and transfer would be measured too.
        ("xferlog_enable", "NO"),
        ("log_ftp_protocol", "NO"),
        // Idle sessions are held for minutes.
        ("idle_session_timeout", "900"),
        ("data_connection_timeout", "300"),
        // One process per session instead of two: 9,000 idle sessions
        // behind a forking proxy would otherwise need 27,000 of the
        // machine's 32,768 process ids. The same for every path.
        ("one_process_model", "YES"),
        ("max_clients", "0"),
        ("max_per_ip", "0"),
    ];
    if let Some(a) = &pasv_address {
        overrides.push(("pasv_address", a));
    }
    let cert = v.tls.as_ref().map(|c| c.chain.display().to_string());
    let key = v.tls.as_ref().map(|c| c.key.display().to_string());
    if let (Some(cert), Some(key)) = (&cert, &key) {
        overrides.extend([
            ("ssl_enable", "YES"),
            ("allow_anon_ssl", "YES"),
            ("force_anon_logins_ssl", "YES"),
            ("force_anon_data_ssl", "YES"),
            // vsftpd's default, said: data connections resume the
            // control connection's session, as through the gateway.
            ("require_ssl_reuse", "YES"),
            ("ssl_ciphers", "HIGH"),
            ("rsa_cert_file", cert),
            ("rsa_private_key_file", key),
        ]);
    }
    let mut out = String::new();
    for line in base.lines() {
        let key = line.split('=').next().unwrap_or("");
        if overrides.iter().any(|(k, _)| *k == key) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.push_str("# benchmark settings\n");
    for (k, v) in overrides {
        out.push_str(&format!("{k}={v}\n"));
    }
    out
}

/// Starts a vsftpd (on the server host on the wire).
pub fn start_vsftpd(env: &Env, template: &str, v: &Vsftpd) -> Result<Daemon> {
    let conf = env.run_dir.join(format!("{}.conf", v.name));
    write(&conf, &vsftpd_config(template, env, v))?;
    let log = env.run_dir.join(format!("{}.err", v.name));
    let _ = std::fs::remove_file(&log);
    std::fs::File::create(&log)?;
    let mut cmd = env.command(Host::Server, "/usr/sbin/vsftpd");
    cmd.arg(&conf);
    let mut d = Daemon::spawn(v.name, (v.addr, env.ns(Host::Server)), cmd, log, true)?;
    d.wait_ready(v.addr)?;
    Ok(d)
}

/// The command line of the gateway for `kind`.
pub fn gateway_command(env: &Env, tracker: Option<bool>) -> Command {
    gateway_command_to(
        env,
        tracker,
        &["--upstream".to_owned(), env.server_addr().to_string()],
    )
}

/// The gateway's pool file for [`Kind::GatewayPool`]: three servers, all
/// the bench's vsftpd, balanced by least connections, checked.
fn pool_file(env: &Env) -> PathBuf {
    env.run_dir.join(Kind::GatewayPool.id()).join("pool.toml")
}

fn pool_gateway_command(env: &Env) -> Command {
    gateway_command_to(
        env,
        env.ebpf_flag.as_ref().map(|_| true),
        &[
            "--config".to_owned(),
            pool_file(env).to_string_lossy().into_owned(),
        ],
    )
}

/// The gateway with `servers` naming its server(s).
fn gateway_command_to(env: &Env, tracker: Option<bool>, servers: &[String]) -> Command {
    let b = env.base;
    let (passive, active) = if env.wire.is_some() {
        ((b + 2000, b + 3999), (b + 4000, b + 5999))
    } else {
        ((b + 1300, b + 1599), (b + 1600, b + 1899))
    };
    let mut cmd = env.command(Host::Gateway, &env.gateway_bin);
    cmd.args(["--listen", &Kind::Gateway(tracker).addr(env).to_string()]);
    cmd.args(servers);
    cmd.args([
        "--passive-ports",
        &format!("{}-{}", passive.0, passive.1),
        "--active-ports",
        &format!("{}-{}", active.0, active.1),
        "--max-sessions",
        "20000",
        "--max-sessions-per-client",
        "20000",
    ]);
    if let (Some(on), Some(values)) = (tracker, &env.ebpf_flag) {
        cmd.args(["--ebpf", if on { &values.on } else { &values.off }]);
        // By default the tracker attaches where the listen address is (g0):
        // the server's leg would go untracked, and cost nothing.
        if on && env.wire.is_some() {
            for dev in wire::GATEWAY_INTERFACES {
                cmd.args(["--interface", dev]);
            }
        }
    }
    cmd.args(&env.gateway_args);
    cmd
}

/// The gateway with a forced relay mode (`splice` or `copy`), the tracker
/// as in the default row.
fn relay_gateway_command(env: &Env, mode: &str) -> Command {
    let mut cmd = gateway_command(env, env.ebpf_flag.as_ref().map(|_| true));
    cmd.args(["--relay-mode", mode]);
    cmd
}

/// The gateway with TLS toward the client (and toward the vsftpd with TLS
/// when `server_tls`), the tracker as in the default row; the relay mode
/// is `auto` (a TLS leg goes through the TLS relay).
fn ftps_gateway_command(env: &Env, server_tls: bool) -> Command {
    let tracker = env.ebpf_flag.as_ref().map(|_| true);
    let upstream = if server_tls {
        env.ftps_server_addr()
    } else {
        env.server_addr()
    };
    let tls = env.certificates();
    let mut cmd = gateway_command_to(
        env,
        tracker,
        &["--upstream".to_owned(), upstream.to_string()],
    );
    cmd.arg("--tls-cert")
        .arg(&tls.chain)
        .arg("--tls-key")
        .arg(&tls.key);
    if server_tls {
        cmd.args(["--server-tls", "explicit", "--server-ca"])
            .arg(&tls.ca);
    }
    cmd
}

/// The gateway with the tracker on and `--ebpf-guard enforce` or `off`.
fn guard_gateway_command(env: &Env, enforce: bool) -> Command {
    let mut cmd = gateway_command(env, Some(true));
    cmd.args(["--ebpf-guard", if enforce { "enforce" } else { "off" }]);
    cmd
}

/// Starts the daemon(s) of a path. `None` for direct (vsftpd is always on).
pub fn start(kind: Kind, env: &Env) -> Result<Option<Daemon>> {
    let dir = env.run_dir.join(kind.id());
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("daemon.log");
    let _ = std::fs::remove_file(&log);
    let b = env.base;
    let server = env.server_addr();
    let cmd = match kind {
        Kind::Direct | Kind::DirectFtps => return Ok(None),
        Kind::GatewayFtps { server_tls } => ftps_gateway_command(env, server_tls),
        Kind::Gateway(tracker) => gateway_command(env, tracker),
        Kind::GatewaySplice => relay_gateway_command(env, "splice"),
        Kind::GatewayCopy => relay_gateway_command(env, "copy"),
        Kind::GatewaySockmap => relay_gateway_command(env, "sockmap"),
        Kind::GatewayGuard { enforce } => guard_gateway_command(env, enforce),
        Kind::GatewayPool => {
            let servers: String = ["a", "b", "c"]
                .iter()
                .map(|name| {
                    format!(
                        "[[servers]]\nname = \"{name}\"\naddress = \"{}\"\n",
                        env.server_addr()
                    )
                })
                .collect();
            write(
                &pool_file(env),
                &format!(
                    "# Three servers, all the same vsftpd: balancing and health checks\n\
                     # are what this path adds to a session.\n\
                     balance = \"least-connections\"\n{servers}"
                ),
            )?;
            pool_gateway_command(env)
        }
        Kind::ModProxy => {
            let root = env.peers_dir.join("proftpd");
            let conf = dir.join("proftpd.conf");
            let tables = env.data_dir.join("proftpd-tables");
            std::fs::create_dir_all(&tables)?;
            write(
                &conf,
                &format!(
                    "# ProFTPD {ver} with mod_proxy as a reverse proxy in front of vsftpd.\n\
                     ServerName \"bench mod_proxy\"\n\
                     ServerType standalone\n\
                     Port {port}\n\
                     DefaultAddress {ip}\n\
                     SocketBindTight on\n\
                     UseIPv6 off\n\
                     User nobody\n\
                     Group nogroup\n\
                     PidFile {dir}/proftpd.pid\n\
                     ScoreboardFile {dir}/proftpd.scoreboard\n\
                     SystemLog {dir}/system.log\n\
                     WtmpLog off\n\
                     TransferLog none\n\
                     UseReverseDNS off\n\
                     MaxInstances 20000\n\
                     TCPBacklog 255\n\
                     TimeoutIdle 900\n\
                     TimeoutNoTransfer 900\n\
                     PassivePorts {p0} {p1}\n\
                     ModulePath {modules}\n\
                     # mod_delay slows logins down on purpose.\n\
                     <IfModule mod_delay.c>\n  DelayEngine off\n</IfModule>\n\
                     # Not the system's /run/proftpd.sock.\n\
                     <IfModule mod_ctrls.c>\n  ControlsEngine off\n  ControlsSocket {dir}/proftpd.sock\n</IfModule>\n\
                     # Debian's mod_proxy.so needs mod_tls (libssl) loaded first.\n\
                     LoadModule mod_tls.c\n\
                     LoadModule mod_proxy.c\n\
                     <IfModule mod_proxy.c>\n\
                     \x20 ProxyEngine on\n\
                     \x20 # The backend is plain FTP: no CA bundle to load per session.\n\
                     \x20 ProxyTLSEngine off\n\
                     \x20 # SQLite tables, synced per session: on tmpfs like the data.\n\
                     \x20 ProxyTables {tables}\n\
                     \x20 ProxyRole reverse\n\
                     \x20 ProxyReverseConnectPolicy RoundRobin\n\
                     \x20 ProxyReverseServers ftp://{server}\n\
                     </IfModule>\n",
                    ver = "1.3.8",
                    ip = kind.addr(env).ip(),
                    port = kind.addr(env).port(),
                    dir = dir.display(),
                    p0 = b + 400,
                    p1 = b + 699,
                    modules = root.join("usr/lib/proftpd").display(),
                    tables = tables.display(),
                ),
            )?;
            let mut cmd = env.command(Host::Gateway, root.join("usr/sbin/proftpd"));
            cmd.args(["-n", "-q", "-c"]).arg(&conf);
            cmd
        }
        Kind::Suse => {
            let root = env.peers_dir.join("suse");
            let conf = dir.join("ftp-proxy.conf");
            // The daemon drops to nobody before it opens its log.
            let logs = dir.join("log");
            std::fs::create_dir_all(&logs)?;
            let _ = Command::new("chown").arg("nobody").arg(&logs).status();
            write(
                &conf,
                &format!(
                    "# SuSE proxy-suite ftp-proxy in front of vsftpd.\n\
                     [-Global-]\n\
                     Listen {ip}\n\
                     Port {port}\n\
                     DestinationAddress {sip}\n\
                     DestinationPort {sport}\n\
                     DestinationTransferMode client\n\
                     PassiveMinDataPort {p0}\n\
                     PassiveMaxDataPort {p1}\n\
                     ActiveMinDataPort {a0}\n\
                     ActiveMaxDataPort {a1}\n\
                     # 512 is the largest value it accepts.\n\
                     MaxClients 512\n\
                     # Default: 40 connections per minute.\n\
                     ForkLimit 1000000\n\
                     TimeOut 900\n\
                     ServerType standalone\n\
                     LogDestination {logs}/proxy-suite.log\n\
                     LogLevel WRN\n\
                     User nobody\n\
                     Group nogroup\n",
                    ip = kind.addr(env).ip(),
                    port = kind.addr(env).port(),
                    sip = server.ip(),
                    sport = server.port(),
                    p0 = b + 700,
                    p1 = b + 999,
                    a0 = b + 1000,
                    a1 = b + 1299,
                    logs = logs.display(),
                ),
            )?;
            // Named like our binary: always called by its full path.
            let mut cmd = env.command(Host::Gateway, root.join("usr/sbin/ftp-proxy"));
            cmd.args(["-d", "-n", "-f"]).arg(&conf);
            cmd
        }
        Kind::Haproxy { splice } => {
            let root = env.peers_dir.join("haproxy");
            // The passive range of the vsftpd behind it, port for port.
            let haproxy_data = if env.wire.is_some() {
                Vsftpd::haproxy(env).pasv
            } else {
                Vsftpd::main(env).pasv
            };
            let conf = dir.join("haproxy.cfg");
            let ip = kind.addr(env).ip();
            write(
                &conf,
                &format!(
                    "# HAProxy as a raw TCP relay: control and vsftpd's passive ports.\n\
                     global\n\
                     \x20   # 2 x 9,300 sockets + 301 listeners + pipes fit the 20,000 open files.\n\
                     \x20   maxconn 9300\n\
                     \x20   maxpipes 64\n\
                     defaults\n\
                     \x20   mode tcp\n\
                     \x20   timeout connect 10s\n\
                     \x20   timeout client 900s\n\
                     \x20   timeout server 900s\n\
                     {splice}\
                     frontend control\n\
                     \x20   bind {ip}:{port}\n\
                     \x20   default_backend control\n\
                     backend control\n\
                     \x20   server vsftpd {hserver}\n\
                     frontend data\n\
                     \x20   bind {ip}:{p0}-{p1}\n\
                     \x20   default_backend data\n\
                     backend data\n\
                     \x20   # No port: the one the client connected to.\n\
                     \x20   server vsftpd {hserver_ip}\n",
                    splice = if splice {
                        "    option splice-request\n    option splice-response\n"
                    } else {
                        ""
                    },
                    port = kind.addr(env).port(),
                    hserver = env.haproxy_server_addr(),
                    hserver_ip = env.haproxy_server_addr().ip(),
                    p0 = haproxy_data.0,
                    p1 = haproxy_data.1,
                ),
            )?;
            let mut cmd = env.command(Host::Gateway, root.join("usr/sbin/haproxy"));
            cmd.args(["-db", "-f"]).arg(&conf);
            cmd
        }
    };
    let mut d = Daemon::spawn(
        kind.id(),
        (kind.addr(env), env.ns(Host::Gateway)),
        cmd,
        log,
        false,
    )?;
    d.wait_ready(kind.addr(env))?;
    Ok(Some(d))
}

/// The configuration files a path uses (for the report's appendix).
pub fn config_files(kind: Kind, env: &Env) -> Vec<PathBuf> {
    let dir = env.run_dir.join(kind.id());
    let name = match kind {
        Kind::Direct => return vec![env.run_dir.join("vsftpd.conf")],
        Kind::DirectFtps => {
            return vec![env.run_dir.join(format!("{}.conf", Vsftpd::ftps(env).name))];
        }
        Kind::Gateway(_)
        | Kind::GatewaySplice
        | Kind::GatewayCopy
        | Kind::GatewaySockmap
        | Kind::GatewayGuard { .. }
        | Kind::GatewayFtps { .. } => {
            return Vec::new();
        }
        Kind::GatewayPool => return vec![pool_file(env)],
        Kind::ModProxy => "proftpd.conf",
        Kind::Suse => "ftp-proxy.conf",
        Kind::Haproxy { .. } if env.wire.is_some() => {
            return vec![
                dir.join("haproxy.cfg"),
                env.run_dir
                    .join(format!("{}.conf", Vsftpd::haproxy(env).name)),
            ];
        }
        Kind::Haproxy { .. } => "haproxy.cfg",
    };
    vec![dir.join(name)]
}

fn shell_words(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// The command line that started a path's daemon, for the report.
pub fn command_line(kind: Kind, env: &Env) -> String {
    let dir = env.run_dir.join(kind.id());
    let peers = &env.peers_dir;
    let cmd = match kind {
        Kind::Direct => {
            let mut c = env.command(Host::Server, "/usr/sbin/vsftpd");
            c.arg(env.run_dir.join("vsftpd.conf"));
            c
        }
        Kind::DirectFtps => {
            let mut c = env.command(Host::Server, "/usr/sbin/vsftpd");
            c.arg(env.run_dir.join(format!("{}.conf", Vsftpd::ftps(env).name)));
            c
        }
        Kind::GatewayFtps { server_tls } => ftps_gateway_command(env, server_tls),
        Kind::Gateway(tracker) => gateway_command(env, tracker),
        Kind::GatewaySplice => relay_gateway_command(env, "splice"),
        Kind::GatewayCopy => relay_gateway_command(env, "copy"),
        Kind::GatewaySockmap => relay_gateway_command(env, "sockmap"),
        Kind::GatewayPool => pool_gateway_command(env),
        Kind::GatewayGuard { enforce } => guard_gateway_command(env, enforce),
        Kind::ModProxy => {
            let mut c = env.command(Host::Gateway, peers.join("proftpd/usr/sbin/proftpd"));
            c.args(["-n", "-q", "-c"]).arg(dir.join("proftpd.conf"));
            c
        }
        Kind::Suse => {
            let mut c = env.command(Host::Gateway, peers.join("suse/usr/sbin/ftp-proxy"));
            c.args(["-d", "-n", "-f"]).arg(dir.join("ftp-proxy.conf"));
            c
        }
        Kind::Haproxy { .. } => {
            let mut c = env.command(Host::Gateway, peers.join("haproxy/usr/sbin/haproxy"));
            c.args(["-db", "-f"]).arg(dir.join("haproxy.cfg"));
            c
        }
    };
    shell_words(&cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Env {
        Env {
            run_dir: "/r".into(),
            data_dir: "/d".into(),
            peers_dir: "/p".into(),
            gateway_bin: "/g".into(),
            base: 10000,
            ebpf_flag: None,
            gateway_args: Vec::new(),
            wire: None,
        }
    }

    fn wire_env() -> Env {
        Env {
            wire: Some(Names::for_base(10000)),
            ..env()
        }
    }

    #[test]
    fn vsftpd_config_overrides_the_fixture() {
        let template = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/demo/vsftpd.conf.in"),
        )
        .unwrap();
        let c = vsftpd_config(&template, &env(), &Vsftpd::main(&env()));
        assert!(c.contains("listen_port=10021\n"));
        assert!(c.contains("pasv_min_port=10100\n") && c.contains("pasv_max_port=10399\n"));
        assert!(c.contains("anon_root=/d/ftproot\n"));
        assert!(c.contains("vsftpd_log_file=/r/vsftpd.log\n"));
        assert_eq!(c.matches("xferlog_enable=").count(), 1);
        assert!(c.contains("xferlog_enable=NO\n"));
        assert!(!c.contains('@'));
    }

    #[test]
    fn paths_use_distinct_addresses() {
        let e = env();
        let kinds = [
            Kind::Direct,
            Kind::Gateway(None),
            Kind::ModProxy,
            Kind::Suse,
            Kind::Haproxy { splice: true },
            Kind::Haproxy { splice: false },
            Kind::DirectFtps,
        ];
        let mut addrs: Vec<_> = kinds.iter().map(|k| k.addr(&e)).collect();
        addrs.sort();
        addrs.dedup();
        assert_eq!(addrs.len(), kinds.len());
        assert!(addrs.iter().all(|a| a.ip().is_loopback()));
        // The gateway's variants run one at a time on the same address.
        assert_eq!(Kind::GatewaySplice.addr(&e), Kind::Gateway(None).addr(&e));
    }

    #[test]
    fn wire_paths_cross_the_gateway_host() {
        let e = wire_env();
        assert_eq!(Kind::Direct.addr(&e), "10.201.2.2:10021".parse().unwrap());
        for k in [
            Kind::Gateway(Some(true)),
            Kind::GatewayCopy,
            Kind::Suse,
            Kind::Haproxy { splice: true },
        ] {
            assert_eq!(k.addr(&e).ip(), wire::GATEWAY, "{k:?}");
        }
        // HAProxy's own vsftpd announces HAProxy's address, and HAProxy
        // forwards exactly that vsftpd's passive range.
        let template = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/demo/vsftpd.conf.in"),
        )
        .unwrap();
        let h = Vsftpd::haproxy(&e);
        let c = vsftpd_config(&template, &e, &h);
        assert!(c.contains("listen_address=10.201.2.2\n"));
        assert!(c.contains("listen_port=10023\n"));
        assert!(c.contains("pasv_address=10.201.1.1\n"));
        assert!(c.contains("pasv_min_port=10400\n") && c.contains("pasv_max_port=10699\n"));
        assert!(c.contains("vsftpd_log_file=/r/vsftpd-haproxy.log\n"));
        assert!(!vsftpd_config(&template, &e, &Vsftpd::main(&e)).contains("pasv_address"));
        // The gateway runs in the gateway's namespace, tracked on both legs.
        let e = Env {
            ebpf_flag: Some(EbpfValues {
                on: "required".into(),
                off: "off".into(),
            }),
            ..e
        };
        let line = command_line(Kind::Gateway(Some(true)), &e);
        assert!(line.starts_with("ip netns exec ftpxb10000-g /g --listen 10.201.1.1:10061"));
        assert!(line.contains("--upstream 10.201.2.2:10021"));
        assert!(line.contains("--interface g0 --interface g1"));
        assert!(!command_line(Kind::Gateway(Some(false)), &e).contains("--interface"));
        assert!(command_line(Kind::GatewayCopy, &e).ends_with("--relay-mode copy"));
        // FTPS: the gateway with its certificate, toward the vsftpd with
        // TLS on the server host, or toward the plain one.
        assert_eq!(
            Kind::DirectFtps.addr(&e),
            "10.201.2.2:10025".parse().unwrap()
        );
        let both = command_line(Kind::GatewayFtps { server_tls: true }, &e);
        assert!(both.contains("--upstream 10.201.2.2:10025"), "{both}");
        assert!(both.contains("--tls-cert /r/tls/chain.pem --tls-key /r/tls/key.pem"));
        assert!(both.ends_with("--server-tls explicit --server-ca /r/tls/ca.pem"));
        let client = command_line(Kind::GatewayFtps { server_tls: false }, &e);
        assert!(client.contains("--upstream 10.201.2.2:10021"), "{client}");
        assert!(client.contains("--tls-cert") && !client.contains("--server-tls"));
        let c = vsftpd_config(&template, &e, &Vsftpd::ftps(&e));
        assert!(c.contains("listen_port=10025\n") && c.contains("pasv_min_port=10700\n"));
        assert!(c.contains("ssl_enable=YES\n") && c.contains("require_ssl_reuse=YES\n"));
        assert!(c.contains("rsa_cert_file=/r/tls/chain.pem\n"));
        assert!(!vsftpd_config(&template, &e, &Vsftpd::main(&e)).contains("ssl_enable"));
    }

    #[test]
    fn certificates_name_every_address() {
        let dir = std::env::temp_dir().join(format!("xtask-certs-{}", std::process::id()));
        let c = write_certificates(&dir).unwrap();
        let chain = std::fs::read_to_string(&c.chain).unwrap();
        assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(
            std::fs::read_to_string(&c.key)
                .unwrap()
                .contains("PRIVATE KEY")
        );
        assert!(chain.ends_with(&std::fs::read_to_string(&c.ca).unwrap()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
