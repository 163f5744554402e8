//! `cargo xtask bench`: the gateway against vsftpd alone and against its
//! peers, on loopback, in one run, with the same clients for every path.
//!
//! - [`peers`]: the paths and their daemons (configurations, start, stop).
//! - [`load`]: the tokio FTP client for session rates and idle sessions,
//!   run as `xtask bench-load` child processes.
//! - [`measure`]: CPU and memory from /proc, curl transfers, statistics.
//! - [`report`]: writes `BENCHMARKS.md`.
//!
//! Order of a run: install (scripts/install-bench-deps.sh), build (release),
//! start vsftpd, then each measurement for every path, repetition by
//! repetition, with the order of the paths rotated each time so that drift
//! on a shared machine spreads over all of them. Only ratios to the direct
//! path measured in the same run are compared.

pub mod load;
pub mod measure;
pub mod peers;
pub mod report;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use measure::{Memory, Transfer};
use peers::{Daemon, EbpfValues, Env, Kind};

/// Options of `cargo xtask bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// CI mode: 64 MiB file, 1 repetition, 100 idle sessions, 2 s rate runs;
    /// the report goes to target/bench/BENCHMARKS-quick.md.
    #[arg(long)]
    pub quick: bool,
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
    /// ftp-proxy-splice, proftpd, proxy-suite, haproxy-splice, haproxy);
    /// direct is always included.
    #[arg(long, value_delimiter = ',')]
    pub paths: Option<Vec<String>>,
    /// Only these measurements (transfers, rate, idle).
    #[arg(long, value_delimiter = ',')]
    pub only: Option<Vec<String>>,
    /// The report [default: BENCHMARKS.md for a full run,
    /// target/bench/BENCHMARKS-quick.md with --quick,
    /// target/bench/BENCHMARKS-partial.md with --paths or --only].
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// First port of the loopback range the run uses (it takes 1,900).
    #[arg(long, default_value_t = 10000)]
    pub base_port: u16,
    /// Don't install packages (they must be there already).
    #[arg(long)]
    pub no_install: bool,
    /// An extra argument for the gateway (repeatable), e.g.
    /// `--gateway-arg=--copy-buffer --gateway-arg=1048576`; for experiments.
    #[arg(long, allow_hyphen_values = true)]
    pub gateway_arg: Vec<String>,
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

/// Everything measured.
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
    /// Whether the gateway has a tracker switch.
    pub tracker_built: bool,
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
    let partial = args.paths.is_some() || args.only.is_some();
    let only = |what: &str| {
        args.only
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
fn prepare_root(dir: &Path, file_bytes: u64) -> Result<PathBuf> {
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
    Ok(file)
}

/// The run: everything but installing and building.
struct Bench {
    env: Env,
    s: Settings,
    ticks: f64,
    load_bin: PathBuf,
    file: PathBuf,
    vsftpd: Daemon,
    results: Results,
}

/// Runs `cargo xtask bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    let started = Instant::now();
    let root = crate::root();
    let s = settings(&args, &root);
    let bench_dir = root.join("target/bench");
    let peers_dir = bench_dir.join("peers");
    let run_dir = bench_dir.join("run");
    std::fs::create_dir_all(&run_dir)?;
    if !args.no_install {
        let script = root.join("scripts/install-bench-deps.sh");
        if crate::is_root() {
            crate::status(Command::new("bash").arg(&script).arg(&peers_dir))?;
        } else {
            crate::status(
                Command::new("sudo")
                    .arg("bash")
                    .arg(&script)
                    .arg(&peers_dir),
            )
            .context("installing the benchmark's dependencies needs root")?;
        }
    }
    if !crate::is_root() {
        bail!("the benchmark runs vsftpd and reads other processes' /proc files: run it as root");
    }
    crate::status(crate::cargo().args(["build", "--release", "-p", "ftp-proxy", "-p", "xtask"]))?;
    let gateway_bin = root.join("target/release/ftp-proxy");
    let load_bin = root.join("target/release/xtask");
    let ebpf_flag = ebpf_values(&gateway_bin)?;
    let tracker_built = ebpf_flag.is_some();
    let data = data_dir(&root, s.file_bytes, args.base_port);
    let env = Env {
        run_dir: run_dir.clone(),
        data_dir: data.clone(),
        peers_dir: peers_dir.clone(),
        gateway_bin,
        base: args.base_port,
        ebpf_flag,
        gateway_args: args.gateway_arg.clone(),
    };
    let status = std::fs::read_to_string(peers_dir.join("status")).unwrap_or_default();
    let mut kinds = vec![Kind::Direct];
    if tracker_built {
        kinds.extend([Kind::Gateway(Some(true)), Kind::Gateway(Some(false))]);
    } else {
        kinds.push(Kind::Gateway(None));
    }
    kinds.push(Kind::GatewaySplice);
    kinds.extend([
        Kind::Suse,
        Kind::Haproxy { splice: true },
        Kind::Haproxy { splice: false },
        Kind::ModProxy,
    ]);
    if let Some(wanted) = &args.paths {
        for w in wanted {
            if !kinds.iter().any(|k| k.id() == w) {
                bail!("unknown path {w:?}");
            }
        }
        kinds.retain(|k| *k == Kind::Direct || wanted.iter().any(|w| w == k.id()));
    }
    let paths: Vec<(Kind, Result<(), String>)> = kinds
        .into_iter()
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
        .collect();

    let file = prepare_root(&data, s.file_bytes)?;
    let template = std::fs::read_to_string(root.join("deploy/demo/vsftpd.conf.in"))?;
    let vsftpd = peers::start_vsftpd(&env, &template)?;
    let mut bench = Bench {
        ticks: measure::clock_ticks()?,
        env,
        s,
        load_bin,
        file,
        vsftpd,
        results: Results {
            paths,
            tracker_built,
            ..Results::default()
        },
    };
    bench.results.load.0 = loadavg();
    let outcome = bench.measure_all();
    bench.results.load.1 = loadavg();
    bench.results.elapsed = started.elapsed().as_secs_f64();
    bench.vsftpd.stop(Duration::from_secs(5));
    // The data is large and on tmpfs: don't leave it behind.
    if data.starts_with("/dev/shm") {
        let _ = std::fs::remove_dir_all(&data);
    }
    outcome?;
    let text = report::render(&bench.results, &bench.s, &bench.env)?;
    if let Some(dir) = bench.s.output.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&bench.s.output, text)
        .with_context(|| format!("writing {}", bench.s.output.display()))?;
    eprintln!(
        "xtask: bench finished in {:.0} s; report in {}",
        bench.results.elapsed,
        bench.s.output.display()
    );
    Ok(())
}

impl Bench {
    fn available(&self) -> Vec<Kind> {
        self.results
            .paths
            .iter()
            .filter(|(_, a)| a.is_ok())
            .map(|(k, _)| *k)
            .collect()
    }

    fn measure_all(&mut self) -> Result<()> {
        let kinds = self.available();
        if self.s.transfers {
            for rep in 0..self.s.reps {
                for kind in rotated(&kinds, rep) {
                    eprintln!(
                        "xtask: bench: transfers, repetition {}, {}",
                        rep + 1,
                        kind.label()
                    );
                    self.transfers(kind, rep)?;
                }
            }
        }
        if self.s.rate {
            for rep in 0..self.s.reps {
                for kind in rotated(&kinds, rep) {
                    eprintln!(
                        "xtask: bench: session rate, repetition {}, {}",
                        rep + 1,
                        kind.label()
                    );
                    self.rate(kind)?;
                }
            }
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

    fn record_error(&mut self, kind: Kind, xfer: Xfer, error: String) {
        eprintln!("xtask: bench: {} {xfer:?}: {error}", kind.label());
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
                        "xtask: bench:   {xfer:?} {:.0} MB/s; CPU s: client {:.2}, proxy {:.2}, server {:.2}",
                        t.mb_per_s(),
                        t.client_cpu,
                        t.proxy_cpu,
                        t.server_cpu
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

    /// One curl transfer with the CPU of client, proxy and server.
    fn transfer(
        &self,
        kind: Kind,
        xfer: Xfer,
        proxy: Option<&Daemon>,
        rep: usize,
    ) -> Result<Transfer> {
        let addr = kind.addr(&self.env);
        let settle =
            |d: &Daemon| measure::settle(d.pid, d.baseline_processes, Duration::from_secs(10));
        settle(&self.vsftpd);
        if let Some(p) = proxy {
            settle(p);
        }
        let upload = format!("up-{}-{rep}.bin", kind.id());
        let url = |name: &str| format!("ftp://anonymous:bench%40example.org@{addr}/pub/{name}");
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--fail", "--connect-timeout", "10"])
            .args(["--max-time", &self.max_time().to_string()])
            .args([
                "-w",
                "%{size_download} %{size_upload} %{time_total} %{time_pretransfer}",
            ]);
        match xfer {
            Xfer::RetrPassive => curl.args(["--ftp-pasv", "-o", "/dev/null", &url("big.bin")]),
            Xfer::RetrActive => curl.args(["-P", "127.0.0.1", "-o", "/dev/null", &url("big.bin")]),
            Xfer::StorPassive => curl
                .args(["--ftp-pasv", "-T"])
                .arg(&self.file)
                .arg(url(&upload)),
        };
        let c0 = measure::children_ticks();
        let p0 = proxy.map(|p| measure::tree_ticks(p.pid));
        let s0 = measure::tree_ticks(self.vsftpd.pid);
        let out = curl.output().context("running curl")?;
        let settled = settle(&self.vsftpd) & proxy.is_none_or(settle);
        let c1 = measure::children_ticks();
        let p1 = proxy.map(|p| measure::tree_ticks(p.pid));
        let s1 = measure::tree_ticks(self.vsftpd.pid);
        let _ = std::fs::remove_file(self.file.with_file_name(&upload));
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
        })
    }

    /// A transfer must not take longer than this (even at 10 MB/s).
    fn max_time(&self) -> u64 {
        60 + self.s.file_bytes / 10_000_000
    }

    fn load(&self) -> Command {
        let mut c = Command::new(&self.load_bin);
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
        for list in [false, true] {
            settle(&self.vsftpd);
            if let Some(d) = &daemon {
                settle(d);
            }
            let c0 = measure::children_ticks();
            let p0 = daemon.as_ref().map(|d| measure::tree_ticks(d.pid));
            let s0 = measure::tree_ticks(self.vsftpd.pid);
            let mut run = match self.rate_run(&addr, self.s.rate_secs, list) {
                Ok(r) => r,
                Err(e) => RateRun {
                    error: Some(format!("{e:#}")),
                    ..RateRun::default()
                },
            };
            // Let the sessions of forking daemons end and be reaped, so
            // that their CPU time is in their parent's.
            settle(&self.vsftpd);
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
                run.server_ms = ms(s0, measure::tree_ticks(self.vsftpd.pid));
            }
            eprintln!(
                "xtask: bench:   {} sessions/s{} ({} failed); CPU ms/session: client {:.3}, proxy {:.3}, server {:.3}",
                run.per_sec.round(),
                if list { " with LIST" } else { "" },
                run.failed,
                run.client_ms,
                run.proxy_ms,
                run.server_ms
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
