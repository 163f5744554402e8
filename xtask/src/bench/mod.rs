//! `cargo xtask bench`: the gateway against vsftpd alone and against its
//! peers, in one run, with the same clients for every path: first on a
//! wire (client, gateway and server hosts as network namespaces joined by
//! veth), then on loopback.
//!
//! - [`wire`]: the three namespaces, their links and routes, removed on
//!   drop.
//! - [`peers`]: the paths and their daemons (configurations, start, stop).
//! - [`load`]: the tokio FTP client for session rates, idle sessions and
//!   slow downloads, run as `xtask bench-load` child processes.
//! - [`measure`]: CPU and memory from /proc, curl transfers, statistics.
//! - [`report`]: writes `BENCHMARKS.md`.
//!
//! Order of a run: install (scripts/install-bench-deps.sh), build (release),
//! then for each network (wire, loopback): start vsftpd, then each
//! measurement for every path, repetition by repetition, with the order of
//! the paths rotated each time so that drift on a shared machine spreads
//! over all of them. Only ratios to the path without a proxy measured in
//! the same run are compared (routed on the wire, direct on loopback).

pub mod load;
pub mod measure;
pub mod peers;
pub mod report;
pub mod wire;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use measure::{Memory, OtherJobs, Transfer};
use peers::{Daemon, EbpfValues, Env, Kind, Net, Vsftpd};
use wire::Host;

/// Options of `cargo xtask bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// CI mode: 64 MiB file, 1 repetition, 100 idle sessions, 2 s rate runs,
    /// 50 slow downloads of 10 s; the report goes to
    /// target/bench/BENCHMARKS-quick.md.
    #[arg(long)]
    pub quick: bool,
    /// Networks to run on (wire, loopback) [default: both].
    #[arg(long, value_delimiter = ',')]
    pub net: Option<Vec<String>>,
    /// Concurrent slow downloads on the wire [default: 1000; quick: 50].
    #[arg(long)]
    pub slow: Option<usize>,
    /// Seconds each slow download should last at its rate [default: 20;
    /// quick: 10]; the file is rate × seconds.
    #[arg(long)]
    pub slow_secs: Option<u64>,
    /// Rate of each slow download, KB/s (10^3 bytes).
    #[arg(long, default_value_t = 500)]
    pub slow_kbps: u64,
    /// Repetitions of every measurement [default: 5; quick: 1].
    #[arg(long)]
    pub reps: Option<usize>,
    /// Size of the transfer file in MiB [default: 1024; quick: 64].
    #[arg(long)]
    pub file_mib: Option<u64>,
    /// Idle session counts [default: 1000,9000; quick: 100].
    #[arg(long, value_delimiter = ',')]
    pub idle: Option<Vec<usize>>,
    /// Seconds of each session-rate run [default: 5; quick: 2].
    #[arg(long)]
    pub rate_secs: Option<f64>,
    /// Concurrent sessions of the rate client.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Only these paths (direct, ftp-proxy, ftp-proxy-ebpf-off,
    /// ftp-proxy-splice, ftp-proxy-copy (wire), ftp-proxy-sockmap (wire,
    /// the kernel relay), ftp-proxy-pool3 (wire,
    /// session rates), proftpd (loopback), proxy-suite, haproxy-splice,
    /// haproxy (loopback), and the FTPS rows: direct-ftps, ftp-proxy-ftps,
    /// ftp-proxy-ftps-client (wire)); direct (routed, on the wire) is
    /// always included, direct-ftps with any FTPS path.
    /// ftp-proxy-guard-enforce and ftp-proxy-guard-off (the kernel guard's
    /// cost) run only when named here.
    #[arg(long, value_delimiter = ',')]
    pub paths: Option<Vec<String>>,
    /// Only these measurements (transfers, rate, idle (loopback), slow
    /// (wire), ftps (wire: RETR and STOR with TLS)).
    #[arg(long, value_delimiter = ',')]
    pub only: Option<Vec<String>>,
    /// The report [default: BENCHMARKS.md for a full run,
    /// target/bench/BENCHMARKS-quick.md with --quick,
    /// target/bench/BENCHMARKS-partial.md with --paths or --only].
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// First port of the range the run uses (it takes 1,900 on loopback,
    /// 6,000 in the wire's namespaces, which carry the base in their names).
    #[arg(long, default_value_t = 10000)]
    pub base_port: u16,
    /// Don't install packages (they must be there already).
    #[arg(long)]
    pub no_install: bool,
    /// An extra argument for the gateway (repeatable), e.g.
    /// `--gateway-arg=--copy-buffer --gateway-arg=1048576`; for experiments.
    #[arg(long, allow_hyphen_values = true)]
    pub gateway_arg: Vec<String>,
    /// Turn GRO on for every veth end of the wire: a veth then receives
    /// through NAPI, as it does when an XDP program (the tracker) is
    /// attached, and as real NICs do; for experiments.
    #[arg(long)]
    pub veth_gro: bool,
}

/// The settings of a run, after defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    /// --quick.
    pub quick: bool,
    /// Repetitions.
    pub reps: usize,
    /// Bytes of the transfer file.
    pub file_bytes: u64,
    /// Idle session counts.
    pub idle: Vec<usize>,
    /// Seconds per rate run.
    pub rate_secs: f64,
    /// Rate client concurrency.
    pub concurrency: usize,
    /// Which measurements.
    pub transfers: bool,
    /// Session rates.
    pub rate: bool,
    /// Idle sessions.
    pub idle_sessions: bool,
    /// Slow downloads.
    pub slow: bool,
    /// FTPS transfers.
    pub ftps: bool,
    /// Concurrent slow downloads.
    pub slow_count: usize,
    /// Bytes per second of each.
    pub slow_rate: u64,
    /// Bytes of the slow file (rate × seconds).
    pub slow_bytes: u64,
    /// Measure on the wire.
    pub wire: bool,
    /// Measure on loopback.
    pub loopback: bool,
    /// The report file.
    pub output: PathBuf,
    /// The command that produced the report.
    pub command: String,
}

/// Idle sessions per client process (one socket each, far from the
/// open-file limit; several processes spread the logins over both CPUs).
const IDLE_PER_CLIENT: usize = 3000;
/// Logins in progress at once, over all client processes: below vsftpd's
/// listen backlog (32), so that no SYN is dropped and retried a second later
/// while the server forks.
const IDLE_IN_FLIGHT: usize = 24;

/// The transfers of measurements 1 and 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Xfer {
    /// RETR, EPSV.
    RetrPassive,
    /// RETR, EPRT/PORT.
    RetrActive,
    /// STOR, EPSV.
    StorPassive,
}

impl Xfer {
    const ALL: [Xfer; 3] = [Xfer::RetrPassive, Xfer::RetrActive, Xfer::StorPassive];
}

/// One session-rate run.
#[derive(Debug, Clone, Default)]
pub struct RateRun {
    /// Sessions completed per second.
    pub per_sec: f64,
    /// Sessions completed.
    pub ok: u64,
    /// Sessions failed.
    pub failed: u64,
    /// The first failure.
    pub error: Option<String>,
    /// CPU milliseconds per completed session: the client's.
    pub client_ms: f64,
    /// The proxy's process tree.
    pub proxy_ms: f64,
    /// vsftpd's process tree.
    pub server_ms: f64,
    /// The whole machine's busy CPU milliseconds per session (/proc/stat).
    pub machine_ms: f64,
    /// Of which other jobs' processes ([`OtherJobs`]).
    pub other_ms: f64,
}

impl RateRun {
    /// The proxy's CPU milliseconds per session.
    pub fn proxy(&self) -> f64 {
        self.proxy_ms
    }

    /// CPU milliseconds per session, summed over client, proxy and server.
    pub fn total_ms(&self) -> f64 {
        self.client_ms + self.proxy_ms + self.server_ms
    }
}

/// One idle-session measurement.
#[derive(Debug, Clone, Default)]
pub struct IdleRun {
    /// Sessions asked for.
    pub wanted: usize,
    /// Sessions logged in and held.
    pub ok: usize,
    /// Seconds to open them all.
    pub open_secs: f64,
    /// The first failure.
    pub error: Option<String>,
    /// The proxy's tree before (or the server's, for direct).
    pub before: Memory,
    /// The same with the sessions held.
    pub during: Memory,
    /// The server's tree growth, for reference.
    pub server_growth: Memory,
    /// Why it was not run.
    pub skipped: Option<String>,
}

impl IdleRun {
    /// KiB of RSS per session held.
    pub fn rss_per_session(&self) -> Option<f64> {
        (self.ok > 0)
            .then(|| (self.during.rss_kib as f64 - self.before.rss_kib as f64) / self.ok as f64)
    }

    /// KiB of PSS per session held.
    pub fn pss_per_session(&self) -> Option<f64> {
        (self.ok > 0)
            .then(|| (self.during.pss_kib as f64 - self.before.pss_kib as f64) / self.ok as f64)
    }
}

/// Slow downloads through one path (on the wire).
#[derive(Debug, Clone, Default)]
pub struct SlowRun {
    /// Downloads started.
    pub wanted: usize,
    /// Downloads that got every byte, in order (size and [`load::Digest`]).
    pub ok: usize,
    /// Downloads that ended with other bytes or another size.
    pub mismatched: usize,
    /// Downloads that failed or did not end in time.
    pub failed: usize,
    /// The first failure.
    pub error: Option<String>,
    /// Wall-clock seconds from the first login to the last download's end.
    pub secs: f64,
    /// The longest download's data phase, seconds.
    pub longest_secs: f64,
    /// Machine memory in use (MemTotal − MemAvailable) before, KiB.
    pub machine_before_kib: u64,
    /// Its highest sample during the downloads.
    pub machine_peak_kib: u64,
    /// The same less other jobs' resident memory, before.
    pub net_before_kib: u64,
    /// Its highest sample.
    pub net_peak_kib: u64,
    /// Bytes queued in TCP sockets on the client, gateway and server
    /// hosts, KiB, before.
    pub tcp_before_kib: [u64; 3],
    /// Their highest samples.
    pub tcp_peak_kib: [u64; 3],
    /// The proxy's RSS before, KiB (0 on the routed path).
    pub proxy_before_kib: u64,
    /// Its highest sample.
    pub proxy_peak_kib: u64,
    /// Memory samples taken.
    pub samples: usize,
    /// Why it was not run.
    pub skipped: Option<String>,
}

impl SlowRun {
    /// KiB per download of a peak over its value before.
    fn per_download(&self, before: u64, peak: u64) -> Option<f64> {
        (self.wanted > 0 && self.samples > 0)
            .then(|| (peak as f64 - before as f64) / self.wanted as f64)
    }

    /// Machine memory growth per download, KiB.
    pub fn machine_per_download(&self) -> Option<f64> {
        self.per_download(self.machine_before_kib, self.machine_peak_kib)
    }

    /// The same net of other jobs' resident memory, KiB.
    pub fn net_per_download(&self) -> Option<f64> {
        self.per_download(self.net_before_kib, self.net_peak_kib)
    }

    /// Growth of the bytes queued in TCP sockets per download, KiB, on
    /// the client, gateway and server hosts.
    pub fn tcp_per_download(&self) -> [Option<f64>; 3] {
        [0, 1, 2].map(|i| {
            self.per_download(
                self.tcp_before_kib.get(i).copied().unwrap_or(0),
                self.tcp_peak_kib.get(i).copied().unwrap_or(0),
            )
        })
    }

    /// The proxy's RSS growth per download, KiB.
    pub fn proxy_per_download(&self) -> Option<f64> {
        self.per_download(self.proxy_before_kib, self.proxy_peak_kib)
    }
}

/// Everything measured on one network.
#[derive(Debug, Default)]
pub struct Results {
    /// The paths in report order, with why a path could not run.
    pub paths: Vec<(Kind, Result<(), String>)>,
    /// Transfers, per repetition.
    pub transfers: HashMap<(Kind, Xfer), Vec<Transfer>>,
    /// Transfer failures.
    pub transfer_errors: HashMap<(Kind, Xfer), Vec<String>>,
    /// Session rates, without and with LIST.
    pub rates: HashMap<(Kind, bool), Vec<RateRun>>,
    /// Idle sessions by count.
    pub idle: HashMap<(Kind, usize), IdleRun>,
    /// Slow downloads.
    pub slow: HashMap<Kind, SlowRun>,
    /// Whether the gateway has a tracker switch.
    pub tracker_built: bool,
}

/// What one network's measurements left: the results and the environment
/// they ran in (addresses, command lines, configuration files).
#[derive(Debug)]
pub struct Measured {
    /// The numbers.
    pub results: Results,
    /// Where.
    pub env: Env,
}

/// A whole run, for the report.
#[derive(Debug, Default)]
pub struct Outcome {
    /// On the wire, if it ran.
    pub wire: Option<Measured>,
    /// On loopback, if it ran.
    pub loopback: Option<Measured>,
    /// Wall-clock seconds of the run.
    pub elapsed: f64,
    /// /proc/loadavg when the measurements started and when they ended
    /// (other jobs share the machine).
    pub load: (String, String),
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn settings(args: &BenchArgs, root: &Path) -> Settings {
    let q = args.quick;
    let partial = args.paths.is_some() || args.only.is_some() || args.net.is_some();
    let only = |what: &str| {
        args.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|x| x == what))
    };
    let on_net = |what: &str| {
        args.net
            .as_ref()
            .is_none_or(|o| o.iter().any(|x| x == what))
    };
    let output = args.output.clone().unwrap_or_else(|| {
        if q {
            root.join("target/bench/BENCHMARKS-quick.md")
        } else if partial {
            root.join("target/bench/BENCHMARKS-partial.md")
        } else {
            root.join("BENCHMARKS.md")
        }
    });
    let mut command = String::from("cargo xtask bench");
    for a in std::env::args().skip(2) {
        command.push(' ');
        command.push_str(&a);
    }
    Settings {
        quick: q,
        reps: args.reps.unwrap_or(if q { 1 } else { 5 }).max(1),
        file_bytes: args.file_mib.unwrap_or(if q { 64 } else { 1024 }).max(1) << 20,
        idle: args
            .idle
            .clone()
            .unwrap_or_else(|| if q { vec![100] } else { vec![1000, 9000] }),
        rate_secs: args.rate_secs.unwrap_or(if q { 2.0 } else { 5.0 }),
        concurrency: args.concurrency.max(1),
        transfers: only("transfers"),
        rate: only("rate"),
        idle_sessions: only("idle"),
        slow: only("slow"),
        ftps: only("ftps"),
        slow_count: args.slow.unwrap_or(if q { 50 } else { 1000 }).max(1),
        slow_rate: args.slow_kbps.max(1) * 1000,
        slow_bytes: args.slow_kbps.max(1)
            * 1000
            * args.slow_secs.unwrap_or(if q { 10 } else { 20 }).max(1),
        wire: on_net("wire"),
        loopback: on_net("loopback"),
        output,
        command,
    }
}

/// The values of the gateway's `--ebpf` option, if `--help` lists it.
fn ebpf_values(gateway: &Path) -> Result<Option<EbpfValues>> {
    let out = Command::new(gateway)
        .arg("--help")
        .output()
        .with_context(|| format!("running {} --help", gateway.display()))?;
    Ok(parse_ebpf_help(&String::from_utf8_lossy(&out.stdout)))
}

/// `--ebpf` in a `--help` text. "On" is the value that makes the tracker
/// mandatory where there is one (`required`: with `auto` a tracker that
/// failed to load would be measured as "on"), else `on` or `true`.
fn parse_ebpf_help(help: &str) -> Option<EbpfValues> {
    let at = help.find("--ebpf")?;
    let text: String = help.get(at..)?.chars().take(1000).collect();
    let text = text.split("\n      --").next().unwrap_or("");
    let word = |w: &str| {
        text.split(|c: char| !c.is_ascii_alphanumeric() && c != '-')
            .any(|t| t == w)
    };
    let boolean = word("BOOL") || (word("true") && word("false"));
    let (on, off) = if word("required") {
        ("required", "off")
    } else if boolean {
        ("true", "false")
    } else {
        ("on", "off")
    };
    Some(EbpfValues {
        on: on.into(),
        off: off.into(),
    })
}

/// Writes `bytes` of pseudo-random data (xorshift; incompressible enough
/// and fast) to `path`.
fn make_file(path: &Path, bytes: u64) -> Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == bytes) {
        return Ok(());
    }
    let mut f = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        for word in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

/// The directory served by vsftpd: on tmpfs when it has room, so that
/// disks are not measured.
fn data_dir(root: &Path, file_bytes: u64, base: u16) -> PathBuf {
    let shm = Path::new("/dev/shm");
    let room = rustix::fs::statvfs(shm)
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        .unwrap_or(0);
    if room > file_bytes.saturating_mul(3) {
        shm.join(format!("ftp-proxy-bench-{base}"))
    } else {
        root.join("target/bench/data")
    }
}

/// Lays out the FTP root as vsftpd wants it (docs/vsftpd-fixture.md).
fn prepare_root(dir: &Path, file_bytes: u64, slow_bytes: Option<u64>) -> Result<Files> {
    let pub_dir = dir.join("ftproot/pub");
    std::fs::create_dir_all(&pub_dir)?;
    std::fs::create_dir_all(dir.join("empty"))?;
    crate::status(
        Command::new("chmod")
            .arg("755")
            .arg(dir)
            .arg(dir.join("ftproot")),
    )?;
    crate::status(
        Command::new("chown")
            .args(["root:root"])
            .arg(dir.join("ftproot")),
    )?;
    crate::status(Command::new("chown").args(["ftp:ftp"]).arg(&pub_dir))?;
    // Leftovers of an interrupted run.
    for entry in std::fs::read_dir(&pub_dir)?.flatten() {
        if entry.file_name().to_string_lossy().starts_with("up-") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let file = pub_dir.join("big.bin");
    make_file(&file, file_bytes)?;
    crate::status(Command::new("chmod").arg("644").arg(&file))?;
    let slow = match slow_bytes {
        Some(bytes) => {
            let path = pub_dir.join("slow.bin");
            make_file(&path, bytes)?;
            crate::status(Command::new("chmod").arg("644").arg(&path))?;
            Some(SlowFile {
                ftp_path: "/pub/slow.bin".into(),
                bytes,
                digest: digest_of(&path)?,
            })
        }
        None => None,
    };
    Ok(Files { big: file, slow })
}

/// The [`load::Digest`] of a file.
fn digest_of(path: &Path) -> Result<u64> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut d = load::Digest::default();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(d.finish());
        }
        d.update(buf.get(..n).unwrap_or_default());
    }
}

/// The files vsftpd serves.
#[derive(Debug, Clone)]
struct Files {
    /// The transfer file (RETR; STOR sends it).
    big: PathBuf,
    /// The slow downloads' file, when they run.
    slow: Option<SlowFile>,
}

/// The slow downloads' file and what each download must receive.
#[derive(Debug, Clone)]
struct SlowFile {
    ftp_path: String,
    bytes: u64,
    digest: u64,
}

/// The gateway row every network reports first (tracker on where there
/// is one: the default relay mode `auto`).
pub fn default_gateway(tracker_built: bool) -> Kind {
    if tracker_built {
        Kind::Gateway(Some(true))
    } else {
        Kind::Gateway(None)
    }
}

/// The guard's comparison (opt-in): off first, so that the rotation of
/// the paths starts them in either order.
const GUARD_KINDS: [Kind; 2] = [
    Kind::GatewayGuard { enforce: false },
    Kind::GatewayGuard { enforce: true },
];

/// The paths on the wire, in report order (the FTPS rows last).
fn wire_kinds(tracker_built: bool) -> Vec<Kind> {
    let mut kinds = vec![Kind::Direct, default_gateway(tracker_built)];
    if tracker_built {
        kinds.push(Kind::Gateway(Some(false)));
    }
    kinds.extend([Kind::GatewaySplice, Kind::GatewayCopy]);
    if tracker_built {
        kinds.push(Kind::GatewaySockmap);
    }
    kinds.extend([
        Kind::GatewayPool,
        Kind::Suse,
        Kind::Haproxy { splice: true },
        Kind::DirectFtps,
        Kind::GatewayFtps { server_tls: true },
        Kind::GatewayFtps { server_tls: false },
    ]);
    if tracker_built {
        kinds.extend(GUARD_KINDS);
    }
    kinds
}

/// The paths on loopback, in report order.
fn loopback_kinds(tracker_built: bool) -> Vec<Kind> {
    let mut kinds = vec![Kind::Direct, default_gateway(tracker_built)];
    if tracker_built {
        kinds.push(Kind::Gateway(Some(false)));
    }
    kinds.extend([
        Kind::GatewaySplice,
        Kind::Suse,
        Kind::Haproxy { splice: true },
        Kind::Haproxy { splice: false },
        Kind::ModProxy,
    ]);
    if tracker_built {
        kinds.extend(GUARD_KINDS);
    }
    kinds
}

/// `kinds` with only the paths `wanted` (direct always, direct FTPS with
/// any FTPS path: the baselines), each with whether its peer is installed
/// (PEERS_DIR/status).
fn select(
    kinds: Vec<Kind>,
    wanted: Option<&[String]>,
    status: &str,
) -> Vec<(Kind, Result<(), String>)> {
    // Opt-in paths run only when named.
    let named = |k: &Kind| match wanted {
        Some(w) => w.iter().any(|w| w == k.id()),
        None => !k.opt_in(),
    };
    let any_ftps = kinds.iter().any(|k| k.is_ftps() && named(k));
    kinds
        .into_iter()
        .filter(|k| *k == Kind::Direct || (*k == Kind::DirectFtps && any_ftps) || named(k))
        .map(|k| {
            let available = match k.package() {
                None => Ok(()),
                Some(name) => status
                    .lines()
                    .find(|l| l.split(' ').next() == Some(name))
                    .map_or_else(
                        || Err("unavailable (not installed)".to_owned()),
                        |l| {
                            if l.split(' ').nth(1) == Some("ok") {
                                Ok(())
                            } else {
                                Err(format!(
                                    "unavailable ({})",
                                    l.split(' ').skip(2).collect::<Vec<_>>().join(" ")
                                ))
                            }
                        },
                    ),
            };
            (k, available)
        })
        .collect()
}

/// The run on one network: everything but installing and building.
struct Bench {
    env: Env,
    s: Settings,
    ticks: f64,
    load_bin: PathBuf,
    files: Files,
    /// The server of every path...
    vsftpd: Daemon,
    /// ...but HAProxy's on the wire ([`Vsftpd::haproxy`]),
    haproxy_vsftpd: Option<Daemon>,
    /// ...and the FTPS paths' ([`Vsftpd::ftps`]).
    ftps_vsftpd: Option<Daemon>,
    /// The wire's namespaces (empty on loopback), to tell other jobs'
    /// processes from the run's.
    ns_inodes: Vec<u64>,
    results: Results,
}

/// Slow downloads per client process (two sockets each; a few processes
/// spread the clients' reads over both CPUs).
const SLOW_PER_CLIENT: usize = 250;

/// Runs `cargo xtask bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    let started = Instant::now();
    let root = crate::root();
    let s = settings(&args, &root);
    let bench_dir = root.join("target/bench");
    let peers_dir = crate::peers_dir();
    let run_dir = bench_dir.join("run");
    std::fs::create_dir_all(&run_dir)?;
    if let Some(nets) = &args.net {
        for n in nets {
            if n != "wire" && n != "loopback" {
                bail!("unknown network {n:?} (wire, loopback)");
            }
        }
    }
    if !args.no_install {
        crate::install_peers()?;
    }
    if !crate::is_root() {
        bail!(
            "the benchmark runs vsftpd, makes network namespaces and reads other processes' \
             /proc files: run it as root"
        );
    }
    crate::status(crate::cargo().args(["build", "--release", "-p", "ftp-proxy", "-p", "xtask"]))?;
    let gateway_bin = root.join("target/release/ftp-proxy");
    let load_bin = root.join("target/release/xtask");
    let ebpf_flag = ebpf_values(&gateway_bin)?;
    let tracker_built = ebpf_flag.is_some();
    let status = std::fs::read_to_string(peers_dir.join("status")).unwrap_or_default();
    if let Some(wanted) = &args.paths {
        let all: Vec<Kind> = wire_kinds(tracker_built)
            .into_iter()
            .chain(loopback_kinds(tracker_built))
            .collect();
        for w in wanted {
            if !all.iter().any(|k| k.id() == w) {
                bail!("unknown path {w:?}");
            }
        }
    }
    let wanted = args.paths.as_deref();
    let data = data_dir(&root, s.file_bytes, args.base_port);
    let slow_wanted = s.wire && s.slow;
    let files = prepare_root(&data, s.file_bytes, slow_wanted.then_some(s.slow_bytes))?;
    let template = std::fs::read_to_string(root.join("deploy/demo/vsftpd.conf.in"))?;
    let env = Env {
        run_dir: run_dir.clone(),
        data_dir: data.clone(),
        peers_dir: peers_dir.clone(),
        gateway_bin,
        base: args.base_port,
        ebpf_flag,
        gateway_args: args.gateway_arg.clone(),
        wire: None,
    };
    let ticks = measure::clock_ticks()?;
    let mut outcome = Outcome {
        load: (loadavg(), String::new()),
        ..Outcome::default()
    };
    let results = |kinds| Results {
        paths: select(kinds, wanted, &status),
        tracker_built,
        ..Results::default()
    };
    let mut failure = None;
    if s.wire {
        // Dropped last: the daemons inside go first (Bench), then the
        // namespaces, also when a measurement failed.
        let topology = wire::Topology::create(args.base_port, args.veth_gro)?;
        let wire_dir = run_dir.join("wire");
        std::fs::create_dir_all(&wire_dir)?;
        let env = Env {
            run_dir: wire_dir,
            wire: Some(topology.names().clone()),
            ..env.clone()
        };
        let r = results(wire_kinds(tracker_built));
        match Bench::start(env, &s, ticks, &load_bin, &files, &template, r) {
            Ok(mut bench) => {
                if let Err(e) = bench.measure_wire() {
                    failure = Some(e.context("on the wire"));
                }
                outcome.wire = Some(bench.finish());
            }
            Err(e) => failure = Some(e.context("starting the wire's servers")),
        }
        drop(topology);
    }
    if s.loopback && failure.is_none() {
        let r = results(loopback_kinds(tracker_built));
        match Bench::start(env, &s, ticks, &load_bin, &files, &template, r) {
            Ok(mut bench) => {
                if let Err(e) = bench.measure_loopback() {
                    failure = Some(e.context("on loopback"));
                }
                outcome.loopback = Some(bench.finish());
            }
            Err(e) => failure = Some(e.context("starting vsftpd on loopback")),
        }
    }
    outcome.load.1 = loadavg();
    outcome.elapsed = started.elapsed().as_secs_f64();
    // The data is large and on tmpfs: don't leave it behind.
    if data.starts_with("/dev/shm") {
        let _ = std::fs::remove_dir_all(&data);
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let text = report::render(&outcome, &s)?;
    if let Some(dir) = s.output.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&s.output, text).with_context(|| format!("writing {}", s.output.display()))?;
    eprintln!(
        "xtask: bench finished in {:.0} s; report in {}",
        outcome.elapsed,
        s.output.display()
    );
    Ok(())
}

impl Bench {
    /// Starts the network's vsftpd (and HAProxy's own on the wire, when
    /// HAProxy runs).
    fn start(
        env: Env,
        s: &Settings,
        ticks: f64,
        load_bin: &Path,
        files: &Files,
        template: &str,
        results: Results,
    ) -> Result<Bench> {
        let vsftpd = peers::start_vsftpd(&env, template, &Vsftpd::main(&env))?;
        let haproxy_runs = results
            .paths
            .iter()
            .any(|(k, a)| matches!(k, Kind::Haproxy { .. }) && a.is_ok());
        let haproxy_vsftpd = if env.wire.is_some() && haproxy_runs {
            Some(peers::start_vsftpd(&env, template, &Vsftpd::haproxy(&env))?)
        } else {
            None
        };
        let ftps_runs = s.ftps && results.paths.iter().any(|(k, a)| k.is_ftps() && a.is_ok());
        let ftps_vsftpd = if ftps_runs {
            peers::write_certificates(
                env.certificates()
                    .ca
                    .parent()
                    .context("the certificates' directory")?,
            )?;
            Some(peers::start_vsftpd(&env, template, &Vsftpd::ftps(&env))?)
        } else {
            None
        };
        let ns_inodes = env.wire.as_ref().map(|w| w.inodes()).unwrap_or_default();
        Ok(Bench {
            env,
            s: s.clone(),
            ticks,
            load_bin: load_bin.to_owned(),
            files: files.clone(),
            vsftpd,
            haproxy_vsftpd,
            ftps_vsftpd,
            ns_inodes,
            results,
        })
    }

    /// Stops the servers; the results and where they were measured.
    fn finish(mut self) -> Measured {
        self.vsftpd.stop(Duration::from_secs(5));
        for d in [&mut self.haproxy_vsftpd, &mut self.ftps_vsftpd]
            .into_iter()
            .flatten()
        {
            d.stop(Duration::from_secs(5));
        }
        Measured {
            results: std::mem::take(&mut self.results),
            env: self.env.clone(),
        }
    }

    fn available(&self) -> Vec<Kind> {
        self.results
            .paths
            .iter()
            .filter(|(_, a)| a.is_ok())
            .map(|(k, _)| *k)
            .collect()
    }

    /// The server behind `kind`.
    fn server(&self, kind: Kind) -> &Daemon {
        match (&self.haproxy_vsftpd, &self.ftps_vsftpd, kind) {
            (Some(d), _, Kind::Haproxy { .. }) => d,
            (_, Some(d), Kind::DirectFtps | Kind::GatewayFtps { server_tls: true }) => d,
            _ => &self.vsftpd,
        }
    }

    fn net(&self) -> Net {
        self.env.net()
    }

    fn label(&self, kind: Kind) -> &'static str {
        kind.label_on(self.net())
    }

    /// Transfers on every path; FTPS transfers; slow downloads through
    /// routed and the gateway; session rates routed, through the gateway
    /// and HAProxy.
    fn measure_wire(&mut self) -> Result<()> {
        let (ftps, kinds): (Vec<Kind>, Vec<Kind>) =
            self.available().into_iter().partition(|k| k.is_ftps());
        if self.s.transfers {
            // The pool changes nothing once a session has its server.
            let moving: Vec<Kind> = kinds
                .iter()
                .copied()
                .filter(|k| !k.sessions_only())
                .collect();
            self.all_transfers(&moving)?;
        }
        if self.s.ftps && !ftps.is_empty() {
            self.all_transfers(&ftps)?;
        }
        let gateway = default_gateway(self.results.tracker_built);
        if self.s.slow {
            for kind in [
                Kind::Direct,
                gateway,
                Kind::GatewayCopy,
                Kind::GatewaySockmap,
            ] {
                if kinds.contains(&kind) {
                    eprintln!(
                        "xtask: bench: {}: {} slow downloads, {}",
                        self.net().name(),
                        self.s.slow_count,
                        self.label(kind)
                    );
                    let run = self.slow(kind)?;
                    self.results.slow.insert(kind, run);
                }
            }
        }
        if self.s.rate {
            let rated: Vec<Kind> = [
                Kind::Direct,
                gateway,
                Kind::GatewayPool,
                Kind::Haproxy { splice: true },
            ]
            .into_iter()
            .chain(GUARD_KINDS)
            .filter(|k| kinds.contains(k))
            .collect();
            self.all_rates(&rated)?;
        }
        Ok(())
    }

    fn measure_loopback(&mut self) -> Result<()> {
        let kinds = self.available();
        if self.s.transfers {
            self.all_transfers(&kinds)?;
        }
        if self.s.rate {
            self.all_rates(&kinds)?;
        }
        if self.s.idle_sessions {
            for n in self.s.idle.clone() {
                for &kind in &kinds {
                    eprintln!("xtask: bench: {n} idle sessions, {}", kind.label());
                    let run = self.idle(kind, n)?;
                    self.results.idle.insert((kind, n), run);
                }
            }
        }
        Ok(())
    }

    fn all_transfers(&mut self, kinds: &[Kind]) -> Result<()> {
        for rep in 0..self.s.reps {
            for kind in rotated(kinds, rep) {
                eprintln!(
                    "xtask: bench: {}: transfers, repetition {}, {}",
                    self.net().name(),
                    rep + 1,
                    self.label(kind)
                );
                self.transfers(kind, rep)?;
            }
        }
        Ok(())
    }

    fn all_rates(&mut self, kinds: &[Kind]) -> Result<()> {
        for rep in 0..self.s.reps {
            for kind in rotated(kinds, rep) {
                eprintln!(
                    "xtask: bench: {}: session rate, repetition {}, {}",
                    self.net().name(),
                    rep + 1,
                    self.label(kind)
                );
                self.rate(kind)?;
            }
        }
        Ok(())
    }

    fn record_error(&mut self, kind: Kind, xfer: Xfer, error: String) {
        eprintln!("xtask: bench: {} {xfer:?}: {error}", self.label(kind));
        self.results
            .transfer_errors
            .entry((kind, xfer))
            .or_default()
            .push(error);
    }

    fn transfers(&mut self, kind: Kind, rep: usize) -> Result<()> {
        let daemon = match peers::start(kind, &self.env) {
            Ok(d) => d,
            Err(e) => {
                for x in Xfer::ALL {
                    self.record_error(kind, x, format!("start: {e:#}"));
                }
                return Ok(());
            }
        };
        for xfer in Xfer::ALL {
            if xfer == Xfer::RetrActive && kind.no_active().is_some() {
                continue;
            }
            match self.transfer(kind, xfer, daemon.as_ref(), rep) {
                Ok(t) => {
                    eprintln!(
                        "xtask: bench:   {xfer:?} {:.0} MB/s; CPU s: client {:.2}, proxy {:.2}, server {:.2}, machine {:.2} (other jobs {:.2})",
                        t.mb_per_s(),
                        t.client_cpu,
                        t.proxy_cpu,
                        t.server_cpu,
                        t.machine_cpu,
                        t.other_cpu
                    );
                    self.results
                        .transfers
                        .entry((kind, xfer))
                        .or_default()
                        .push(t);
                }
                Err(e) => self.record_error(kind, xfer, format!("{e:#}")),
            }
        }
        Ok(())
    }

    /// KiB queued in the TCP sockets of the client, gateway and server
    /// hosts (on loopback, all three are this host).
    fn tcp_queued(&self) -> [u64; 3] {
        [Host::Client, Host::Gateway, Host::Server].map(|h| {
            self.env
                .command(h, "ss")
                .arg("-tmnH")
                .output()
                .map(|o| measure::parse_ss_queued(&String::from_utf8_lossy(&o.stdout)) / 1024)
                .unwrap_or(0)
        })
    }

    /// The address curl's active mode names: the client host's.
    fn client_ip(&self) -> String {
        if self.env.wire.is_some() {
            wire::CLIENT.to_string()
        } else {
            "127.0.0.1".into()
        }
    }

    /// One curl transfer with the CPU of client, proxy, server and the
    /// machine.
    fn transfer(
        &self,
        kind: Kind,
        xfer: Xfer,
        proxy: Option<&Daemon>,
        rep: usize,
    ) -> Result<Transfer> {
        let addr = kind.addr(&self.env);
        let server = self.server(kind);
        let settle =
            |d: &Daemon| measure::settle(d.pid, d.baseline_processes, Duration::from_secs(10));
        settle(server);
        if let Some(p) = proxy {
            settle(p);
        }
        let upload = format!("up-{}-{rep}.bin", kind.id());
        let url = |name: &str| format!("ftp://anonymous:bench%40example.org@{addr}/pub/{name}");
        let mut curl = self.env.command(Host::Client, "curl");
        if kind.is_ftps() {
            // Explicit FTPS (AUTH, then PBSZ 0 and PROT P), verified.
            curl.arg("--ssl-reqd")
                .arg("--cacert")
                .arg(self.env.certificates().ca);
        }
        curl.args(["-sS", "--fail", "--connect-timeout", "10"])
            .args(["--max-time", &self.max_time().to_string()])
            .args([
                "-w",
                "%{size_download} %{size_upload} %{time_total} %{time_pretransfer}",
            ]);
        let client_ip = self.client_ip();
        match xfer {
            Xfer::RetrPassive => curl.args(["--ftp-pasv", "-o", "/dev/null", &url("big.bin")]),
            Xfer::RetrActive => curl.args(["-P", &client_ip, "-o", "/dev/null", &url("big.bin")]),
            Xfer::StorPassive => curl
                .args(["--ftp-pasv", "-T"])
                .arg(&self.files.big)
                .arg(url(&upload)),
        };
        let o0 = OtherJobs::snapshot(&self.ns_inodes);
        let m0 = measure::machine_busy_ticks();
        let c0 = measure::children_ticks();
        let p0 = proxy.map(|p| measure::tree_ticks(p.pid));
        let s0 = measure::tree_ticks(server.pid);
        let out = curl.output().context("running curl")?;
        let m1 = measure::machine_busy_ticks();
        let o1 = OtherJobs::snapshot(&self.ns_inodes);
        let settled = settle(server) & proxy.is_none_or(settle);
        let c1 = measure::children_ticks();
        let p1 = proxy.map(|p| measure::tree_ticks(p.pid));
        let s1 = measure::tree_ticks(server.pid);
        let _ = std::fs::remove_file(self.files.big.with_file_name(&upload));
        if !out.status.success() {
            bail!(
                "curl {xfer:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if !settled {
            bail!("the sessions did not end within 10 s after the transfer");
        }
        let w = String::from_utf8_lossy(&out.stdout);
        let (bytes, secs) =
            measure::parse_curl_w(&w).with_context(|| format!("curl -w said {w:?}"))?;
        if bytes != self.s.file_bytes {
            bail!("moved {bytes} bytes instead of {}", self.s.file_bytes);
        }
        let t = |a: u64, b: u64| b.saturating_sub(a) as f64 / self.ticks;
        Ok(Transfer {
            bytes,
            secs,
            client_cpu: t(c0, c1),
            proxy_cpu: match (p0, p1) {
                (Some(a), Some(b)) => t(a, b),
                _ => 0.0,
            },
            server_cpu: t(s0, s1),
            machine_cpu: t(m0, m1),
            other_cpu: o1.since(&o0) as f64 / self.ticks,
        })
    }

    /// A transfer must not take longer than this (even at 10 MB/s).
    fn max_time(&self) -> u64 {
        60 + self.s.file_bytes / 10_000_000
    }

    /// The load client, on the client host.
    fn load(&self) -> Command {
        let mut c = self.env.command(Host::Client, &self.load_bin);
        c.arg("bench-load");
        c
    }

    fn rate(&mut self, kind: Kind) -> Result<()> {
        let daemon = match peers::start(kind, &self.env) {
            Ok(d) => d,
            Err(e) => {
                for list in [false, true] {
                    self.results
                        .rates
                        .entry((kind, list))
                        .or_default()
                        .push(RateRun {
                            error: Some(format!("start: {e:#}")),
                            ..RateRun::default()
                        });
                }
                return Ok(());
            }
        };
        let addr = kind.addr(&self.env).to_string();
        let settle = |d: &Daemon| {
            measure::settle(d.pid, d.baseline_processes, Duration::from_secs(10));
        };
        // Warm up (first forks, caches), not counted.
        let _ = self.rate_run(&addr, 0.5, true);
        let server = self.server(kind);
        let server_pid = server.pid;
        for list in [false, true] {
            settle(self.server(kind));
            if let Some(d) = &daemon {
                settle(d);
            }
            let o0 = OtherJobs::snapshot(&self.ns_inodes);
            let m0 = measure::machine_busy_ticks();
            let c0 = measure::children_ticks();
            let p0 = daemon.as_ref().map(|d| measure::tree_ticks(d.pid));
            let s0 = measure::tree_ticks(server_pid);
            let mut run = match self.rate_run(&addr, self.s.rate_secs, list) {
                Ok(r) => r,
                Err(e) => RateRun {
                    error: Some(format!("{e:#}")),
                    ..RateRun::default()
                },
            };
            let m1 = measure::machine_busy_ticks();
            let o1 = OtherJobs::snapshot(&self.ns_inodes);
            // Let the sessions of forking daemons end and be reaped, so
            // that their CPU time is in their parent's.
            settle(self.server(kind));
            if let Some(d) = &daemon {
                settle(d);
            }
            if run.ok > 0 {
                let ms = |a: u64, b: u64| {
                    b.saturating_sub(a) as f64 / self.ticks * 1000.0 / run.ok as f64
                };
                run.client_ms = ms(c0, measure::children_ticks());
                run.proxy_ms = match (p0, daemon.as_ref()) {
                    (Some(p0), Some(d)) => ms(p0, measure::tree_ticks(d.pid)),
                    _ => 0.0,
                };
                run.server_ms = ms(s0, measure::tree_ticks(server_pid));
                run.machine_ms = ms(m0, m1);
                run.other_ms = ms(0, o1.since(&o0));
            }
            eprintln!(
                "xtask: bench:   {} sessions/s{} ({} failed); CPU ms/session: client {:.3}, proxy {:.3}, server {:.3}, machine {:.3} (other jobs {:.3})",
                run.per_sec.round(),
                if list { " with LIST" } else { "" },
                run.failed,
                run.client_ms,
                run.proxy_ms,
                run.server_ms,
                run.machine_ms,
                run.other_ms
            );
            self.results
                .rates
                .entry((kind, list))
                .or_default()
                .push(run);
        }
        drop(daemon);
        Ok(())
    }

    fn rate_run(&self, addr: &str, secs: f64, list: bool) -> Result<RateRun> {
        let mut cmd = self.load();
        cmd.args(["rate", "--addr", addr, "--secs", &secs.to_string()])
            .args(["--concurrency", &self.s.concurrency.to_string()]);
        if list {
            cmd.arg("--list");
        }
        let out = run_bounded(cmd, Duration::from_secs_f64(secs + 60.0))?;
        let f = fields(&out);
        let ok: u64 = f
            .get("ok")
            .and_then(|v| v.parse().ok())
            .context("rate: no ok=")?;
        let failed: u64 = f.get("failed").and_then(|v| v.parse().ok()).unwrap_or(0);
        let secs: f64 = f
            .get("secs")
            .and_then(|v| v.parse().ok())
            .context("rate: no secs=")?;
        Ok(RateRun {
            per_sec: ok as f64 / secs,
            ok,
            failed,
            error: f
                .get("first_error")
                .filter(|e| *e != "-")
                .map(|e| e.replace('_', " ")),
            ..RateRun::default()
        })
    }

    /// `slow_count` concurrent downloads of the slow file at `slow_rate`
    /// each, through `kind`, from the client host: how many got every
    /// byte, and the memory the machine, the kernel's TCP buffers and the
    /// proxy held at their peak.
    fn slow(&mut self, kind: Kind) -> Result<SlowRun> {
        let n = self.s.slow_count;
        let mut run = SlowRun {
            wanted: n,
            ..SlowRun::default()
        };
        let Some(file) = self.files.slow.clone() else {
            run.skipped = Some("skipped: no slow file".into());
            return Ok(run);
        };
        // What a download could hold at worst: socket buffers on three
        // hosts, and a copying relay's buffer (4 MiB by default). At most
        // 40 % of what is available, since other jobs share the machine.
        let per_download_kib: u64 = if matches!(kind, Kind::GatewayCopy | Kind::GatewaySockmap) {
            // The kernel relay holds whatever the server sends (no
            // backpressure): up to the whole file per download.
            8 << 10
        } else {
            3 << 10
        };
        let need = per_download_kib * n as u64;
        let available = measure::meminfo_kib("MemAvailable").unwrap_or(0);
        if need as f64 > 0.4 * available as f64 {
            run.skipped = Some(format!(
                "skipped: could need {:.1} GiB, {:.1} GiB available",
                need as f64 / 1048576.0,
                available as f64 / 1048576.0
            ));
            return Ok(run);
        }
        let daemon = match peers::start(kind, &self.env) {
            Ok(d) => d,
            Err(e) => {
                run.error = Some(format!("start: {e:#}"));
                return Ok(run);
            }
        };
        let server = self.server(kind);
        measure::settle(
            server.pid,
            server.baseline_processes,
            Duration::from_secs(60),
        );
        let proxy_rss = |d: &Option<Daemon>| {
            d.as_ref()
                .map_or(0, |d| measure::tree_memory(d.pid).rss_kib)
        };
        let net_used = |used: u64| used.saturating_sub(measure::other_rss_kib(&self.ns_inodes));
        run.machine_before_kib = measure::machine_used_kib();
        run.net_before_kib = net_used(run.machine_before_kib);
        run.tcp_before_kib = self.tcp_queued();
        run.proxy_before_kib = proxy_rss(&daemon);
        let ideal = file.bytes / self.s.slow_rate.max(1);
        let limit = ideal * 3 + 60;
        let addr = kind.addr(&self.env).to_string();
        let processes = n.div_ceil(SLOW_PER_CLIENT).max(1);
        let in_flight = (IDLE_IN_FLIGHT / processes).max(1);
        let mut clients = Vec::new();
        let mut left = n;
        let started = Instant::now();
        while left > 0 {
            let count = left.min(SLOW_PER_CLIENT);
            left -= count;
            let mut cmd = self.load();
            cmd.args(["slow", "--addr", &addr, "--count", &count.to_string()])
                .args(["--in-flight", &in_flight.to_string()])
                .args(["--path", &file.ftp_path])
                .args(["--size", &file.bytes.to_string()])
                .args(["--digest", &format!("{:016x}", file.digest)])
                .args(["--rate", &self.s.slow_rate.to_string()])
                .args(["--secs", &limit.to_string()])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            let mut child = cmd.spawn().context("starting a slow client")?;
            let stdout = child.stdout.take().context("slow client stdout")?;
            let reader = std::thread::spawn(move || {
                let mut s = String::new();
                let _ = std::io::Read::read_to_string(&mut BufReader::new(stdout), &mut s);
                s
            });
            clients.push((child, reader));
        }
        // Sample until every client process has exited (each gives up by
        // itself after `limit`; the harness kills it 30 s later).
        let deadline = Duration::from_secs(limit + 30);
        loop {
            let used = measure::machine_used_kib();
            let tcp = self.tcp_queued();
            let rss = proxy_rss(&daemon);
            run.machine_peak_kib = run.machine_peak_kib.max(used);
            run.net_peak_kib = run.net_peak_kib.max(net_used(used));
            for (peak, now) in run.tcp_peak_kib.iter_mut().zip(tcp) {
                *peak = (*peak).max(now);
            }
            run.proxy_peak_kib = run.proxy_peak_kib.max(rss);
            run.samples += 1;
            let running = clients
                .iter_mut()
                .filter_map(|(c, _)| (!matches!(c.try_wait(), Ok(Some(_)))).then_some(()))
                .count();
            if running == 0 || started.elapsed() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let mut errors = Vec::new();
        for (mut child, reader) in clients {
            wait_bounded(&mut child, Duration::from_secs(1));
            let out = reader.join().unwrap_or_default();
            let f = fields(&out);
            let count = |k: &str| f.get(k).and_then(|v| v.parse::<usize>().ok());
            match count("ok") {
                Some(ok) => {
                    run.ok += ok;
                    run.mismatched += count("mismatched").unwrap_or(0);
                }
                None => errors.push("a slow client did not report".to_owned()),
            }
            if let Some(e) = f.get("first_error").filter(|e| *e != "-") {
                errors.push(e.replace('_', " "));
            }
            let longest: f64 = f
                .get("longest_secs")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            run.longest_secs = run.longest_secs.max(longest);
        }
        run.secs = started.elapsed().as_secs_f64();
        run.failed = n.saturating_sub(run.ok + run.mismatched);
        run.error = errors.into_iter().next();
        eprintln!(
            "xtask: bench:   {}/{n} byte-exact in {:.1} s (longest {:.1} s); memory per download: machine {:.0} KiB (net of other jobs {:.0}), TCP queued on the gateway host {:.0} KiB, proxy RSS {:.0} KiB",
            run.ok,
            run.secs,
            run.longest_secs,
            run.machine_per_download().unwrap_or(0.0),
            run.net_per_download().unwrap_or(0.0),
            run.tcp_per_download()[1].unwrap_or(0.0),
            run.proxy_per_download().unwrap_or(0.0)
        );
        drop(daemon);
        let server = self.server(kind);
        if !measure::settle(
            server.pid,
            server.baseline_processes,
            Duration::from_secs(60),
        ) {
            eprintln!("xtask: bench: vsftpd sessions still open 60 s after the slow downloads");
        }
        Ok(run)
    }

    fn idle(&mut self, kind: Kind, n: usize) -> Result<IdleRun> {
        let mut run = IdleRun {
            wanted: n,
            ..IdleRun::default()
        };
        // Each session takes a process of vsftpd, and one of a forking proxy.
        let pid_max: usize = measure::sysctl("kernel/pid_max")
            .and_then(|v| v.parse().ok())
            .unwrap_or(32768);
        let needed = n * (1 + kind.processes_per_session()) + 2000;
        let free = pid_max.saturating_sub(measure::tasks_on_machine());
        if needed > free {
            run.skipped = Some(format!(
                "skipped: needs {needed} process ids, {free} free of {pid_max}"
            ));
            return Ok(run);
        }
        // Memory: estimated from a smaller count of the same path; at most
        // 40 % of what is available, since other jobs share the machine.
        let estimate = self
            .results
            .idle
            .iter()
            .filter(|((k, _), r)| *k == kind && r.ok > 0)
            .map(|(_, r)| {
                r.pss_per_session().unwrap_or(0.0).max(0.0)
                    + r.server_growth.pss_kib as f64 / r.ok as f64
            })
            .fold(0.0, f64::max);
        let available = measure::meminfo_kib("MemAvailable").unwrap_or(0) as f64;
        if estimate * n as f64 > 0.4 * available {
            run.skipped = Some(format!(
                "skipped: would need about {:.1} GiB, {:.1} GiB available",
                estimate * n as f64 / 1048576.0,
                available / 1048576.0
            ));
            return Ok(run);
        }
        let daemon = match peers::start(kind, &self.env) {
            Ok(d) => d,
            Err(e) => {
                run.error = Some(format!("start: {e:#}"));
                return Ok(run);
            }
        };
        let measured = daemon.as_ref().map_or(self.vsftpd.pid, |d| d.pid);
        measure::settle(
            self.vsftpd.pid,
            self.vsftpd.baseline_processes,
            Duration::from_secs(60),
        );
        run.before = measure::tree_memory(measured);
        let server_before = measure::tree_memory(self.vsftpd.pid);
        let addr = kind.addr(&self.env).to_string();
        let open_secs = 60 + n as u64 / 20;
        let processes = n.div_ceil(IDLE_PER_CLIENT).max(1);
        let in_flight = (IDLE_IN_FLIGHT / processes).max(1);
        let mut clients = Vec::new();
        let mut left = n;
        while left > 0 {
            let count = left.min(IDLE_PER_CLIENT);
            left -= count;
            let mut cmd = self.load();
            cmd.args(["idle", "--addr", &addr, "--count", &count.to_string()])
                .args(["--in-flight", &in_flight.to_string()])
                .args(["--open-secs", &open_secs.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            let mut child = cmd.spawn().context("starting the idle client")?;
            let stdout = child.stdout.take().context("idle client stdout")?;
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(stdout).read_line(&mut line);
                let _ = tx.send(line);
            });
            clients.push((child, rx));
        }
        let started = Instant::now();
        let mut errors = Vec::new();
        for (_, rx) in &clients {
            let wait = Duration::from_secs(open_secs + 30).saturating_sub(started.elapsed());
            match rx.recv_timeout(wait) {
                Ok(line) => {
                    let f = fields(&line);
                    run.ok += f
                        .get("ok")
                        .and_then(|v| v.parse::<usize>().ok())
                        .unwrap_or(0);
                    if let Some(e) = f.get("first_error").filter(|e| *e != "-") {
                        errors.push(e.replace('_', " "));
                    }
                }
                Err(_) => errors.push("an idle client did not report".into()),
            }
        }
        run.open_secs = started.elapsed().as_secs_f64();
        // Let the last logins finish their bookkeeping.
        std::thread::sleep(Duration::from_secs(1));
        run.during = measure::tree_memory(measured);
        let server_during = measure::tree_memory(self.vsftpd.pid);
        run.server_growth = Memory {
            rss_kib: server_during.rss_kib.saturating_sub(server_before.rss_kib),
            pss_kib: server_during.pss_kib.saturating_sub(server_before.pss_kib),
            processes: server_during
                .processes
                .saturating_sub(server_before.processes),
        };
        run.error = errors.into_iter().next();
        eprintln!(
            "xtask: bench:   {}/{n} sessions in {:.1} s; PSS {:+} KiB",
            run.ok,
            run.open_secs,
            run.during.pss_kib as i64 - run.before.pss_kib as i64
        );
        // Release the sessions and wait for the clients.
        for (mut child, _) in clients {
            drop(child.stdin.take());
            wait_bounded(&mut child, Duration::from_secs(30));
        }
        drop(daemon);
        if !measure::settle(
            self.vsftpd.pid,
            self.vsftpd.baseline_processes,
            Duration::from_secs(120),
        ) {
            eprintln!("xtask: bench: vsftpd sessions still open after 120 s");
        }
        Ok(run)
    }
}

/// `kinds` starting at position `rep` (direct stays first only once in a while).
fn rotated(kinds: &[Kind], rep: usize) -> Vec<Kind> {
    let mut v = kinds.to_vec();
    if !v.is_empty() {
        let k = rep % v.len();
        v.rotate_left(k);
    }
    v
}

/// `key=value` words of a line.
fn fields(line: &str) -> HashMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn wait_bounded(child: &mut std::process::Child, limit: Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs `cmd`, killing it after `limit`; returns its standard output.
fn run_bounded(mut cmd: Command, limit: Duration) -> Result<String> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    wait_bounded(&mut child, limit);
    let out = reader.join().unwrap_or_default();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_covers_every_path() {
        let k = [Kind::Direct, Kind::Suse, Kind::ModProxy];
        assert_eq!(rotated(&k, 0), k.to_vec());
        assert_eq!(
            rotated(&k, 1),
            vec![Kind::Suse, Kind::ModProxy, Kind::Direct]
        );
        assert_eq!(rotated(&k, 3), k.to_vec());
    }

    #[test]
    fn ebpf_switch_from_help() {
        assert!(parse_ebpf_help("      --relay-mode <MODE>\n").is_none());
        let v = parse_ebpf_help("      --ebpf <MODE>\n          on or off\n").unwrap();
        assert_eq!((v.on.as_str(), v.off.as_str()), ("on", "off"));
        let v = parse_ebpf_help(
            "      --ebpf <BOOL>\n          flow tracker\n      --pipe-size <BYTES>\n",
        )
        .unwrap();
        assert_eq!((v.on.as_str(), v.off.as_str()), ("true", "false"));
        let help = "      --ebpf <MODE>\n          eBPF flow tracker: auto (use it when it \
                    loads), required (exit if it cannot), off [default: auto]\n\n          \
                    Possible values:\n          - auto:     Use it\n          - required: \
                    Exit\n          - off:      Never load it\n\n      --interface <NAME>\n";
        let v = parse_ebpf_help(help).unwrap();
        assert_eq!((v.on.as_str(), v.off.as_str()), ("required", "off"));
    }

    #[test]
    fn key_values() {
        let f = fields("rate ok=12 failed=0 secs=1.5 first_error=-\n");
        assert_eq!(f.get("ok").map(String::as_str), Some("12"));
        assert_eq!(f.get("secs").map(String::as_str), Some("1.5"));
    }

    #[test]
    fn pseudo_random_file() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("f");
        make_file(&f, 3 << 20 | 5).unwrap();
        let data = std::fs::read(&f).unwrap();
        assert_eq!(data.len(), 3 << 20 | 5);
        assert_ne!(data[..4096], data[1 << 20..(1 << 20) + 4096]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
