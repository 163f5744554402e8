//! `cargo xtask`: the project's tasks.
//!
//! - `setup`: installs what the tests and the demo need, idempotently
//!   (Debian packages through `scripts/install-deps.sh`; the eBPF toolchain,
//!   nightly + rust-src + bpf-linker, through
//!   `scripts/install-ebpf-toolchain.sh`).
//! - `run`: builds the gateway and runs it in front of a demo vsftpd that it
//!   sets up in `target/demo`; with `--upstream HOST:PORT` it relays to that
//!   server instead.
//! - `test`: everything CI runs: setup (and the peers of the benchmark,
//!   ProFTPD among them, unpacked into `target/bench/peers` and passed to
//!   the tests in `FTPX_PEERS`), formatting, clippy (a separate pass for
//!   the eBPF crate), the whole test suite (with the eBPF flow tracker
//!   required to be built), and a short run of every fuzz target.
//! - `fuzz`: every fuzz target for longer (300 s each by default).
//! - `soak`: the load and fault tests with more sessions, bigger files and
//!   a longer hold than in CI.
//! - `bench`: the gateway against vsftpd alone and against its peers
//!   (ProFTPD mod_proxy, the SuSE proxy-suite, HAProxy), on a wire of three
//!   network namespaces (routed as the baseline) and on loopback; writes
//!   `BENCHMARKS.md` (`--quick`: a small run for CI, reported in
//!   `target/bench/BENCHMARKS-quick.md`). See [`bench`].
//! - `package`: the Debian package in `target/debian/`. See [`package`].

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod bench;
mod package;

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install test and demo dependencies (idempotent; needs root for apt).
    Setup,
    /// Run the gateway on 127.0.0.1:2121 in front of a demo FTP server (or --upstream).
    Run {
        /// Arguments passed to ftp-proxy (e.g. --upstream ftp.example.net:21).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fuzz every target (or one) for a while; crashes fail the task.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
        /// Only this target (command, reply, address, session_state).
        target: Option<String>,
    },
    /// The load and fault tests, longer and bigger than in CI.
    Soak {
        /// Concurrent sessions doing LIST and RETR.
        #[arg(long, default_value_t = 2500)]
        sessions: usize,
        /// Size of the file each session retrieves, in KiB.
        #[arg(long, default_value_t = 4096)]
        file_kib: usize,
        /// Seconds the 9,000 idle sessions are held.
        #[arg(long, default_value_t = 600)]
        hold: u64,
    },
    /// Run what CI runs: setup, fmt, clippy, tests.
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmark the gateway against vsftpd alone and its peers; writes BENCHMARKS.md.
    Bench(bench::BenchArgs),
    /// Build the Debian package (target/debian/ftp-proxy_VERSION_ARCH.deb).
    Package,
    /// The benchmark's load client (started by `bench`).
    #[command(hide = true)]
    BenchLoad(bench::load::LoadArgs),
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // Run from a test (tests/first_run.rs, tests/package.rs), xtask
    // inherits the test's OUT_DIR; build scripts that watch it (ring's)
    // would then rebuild, and the release build would not be shared
    // between the tests, the benchmark and a shell.
    c.current_dir(root()).env_remove("OUT_DIR");
    c
}

fn status(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

fn setup() -> Result<()> {
    let script = root().join("scripts/install-deps.sh");
    if is_root() {
        status(Command::new("bash").arg(&script))?;
    } else {
        status(Command::new("sudo").arg("bash").arg(&script))
            .context("installing dependencies needs root")?;
    }
    // The eBPF flow tracker's toolchain (pinned nightly + rust-src,
    // bpf-linker); per user, no root needed.
    status(Command::new("bash").arg(root().join("scripts/install-ebpf-toolchain.sh")))
        .context("installing the eBPF toolchain")
}

/// Where `scripts/install-bench-deps.sh` unpacks the peers (ProFTPD with
/// mod_tls and mod_proxy, the SuSE proxy-suite, HAProxy): the benchmark's
/// paths, and ProFTPD as the tests' second server.
fn peers_dir() -> PathBuf {
    root().join("target/bench/peers")
}

/// Installs the benchmark's dependencies and unpacks the peers into
/// [`peers_dir`] (idempotent; root, or sudo).
fn install_peers() -> Result<()> {
    let script = root().join("scripts/install-bench-deps.sh");
    if is_root() {
        status(Command::new("bash").arg(&script).arg(peers_dir()))
    } else {
        status(
            Command::new("sudo")
                .arg("bash")
                .arg(&script)
                .arg(peers_dir()),
        )
        .context("installing the benchmark's dependencies needs root")
    }
}

/// The nightly pinned in ftp-proxy-ebpf/rust-toolchain.toml.
fn ebpf_toolchain() -> Result<String> {
    let path = root().join("ftp-proxy-ebpf/rust-toolchain.toml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|value| value.trim().trim_matches('"').to_owned())
        .next()
        .with_context(|| format!("no channel in {}", path.display()))
}

/// `cargo` of the eBPF crate's pinned nightly, run in its directory (its
/// own workspace, target and build-std from its .cargo/config.toml).
fn ebpf_cargo() -> Result<Command> {
    let mut c = Command::new("rustup");
    // Not the outer (stable) cargo's environment: rustup picks the pinned
    // toolchain's cargo.
    c.env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .args(["run", &ebpf_toolchain()?, "cargo"])
        .current_dir(root().join("ftp-proxy-ebpf"));
    Ok(c)
}

const FUZZ_TARGETS: [&str; 4] = ["command", "reply", "address", "session_state"];
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// cargo-fuzz, installed once from crates.io at a pinned version.
fn ensure_cargo_fuzz() -> Result<()> {
    let have = cargo()
        .args(["fuzz", "--version"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION))
        .unwrap_or(false);
    if !have {
        status(cargo().args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ]))?;
    }
    Ok(())
}

/// `cargo fuzz` under the nightly toolchain (sanitizers need it), run in
/// `fuzz/`.
fn cargo_fuzz() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.current_dir(root().join("fuzz"))
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .args(["run", "nightly", "cargo", "fuzz"]);
    cmd
}

/// Build every fuzz target, so a target that no longer compiles against the
/// library fails the lint stage rather than the end of a long test run.
fn fuzz_build() -> Result<()> {
    ensure_cargo_fuzz()?;
    let mut cmd = cargo_fuzz();
    cmd.arg("build");
    eprintln!("xtask: {cmd:?}");
    let ok = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !ok.success() {
        bail!("the fuzz targets do not build (see the compiler's errors above)");
    }
    Ok(())
}

fn fuzz(seconds: u64, only: Option<&str>) -> Result<()> {
    fuzz_build()?;
    let mut summary = Vec::new();
    for target in FUZZ_TARGETS
        .iter()
        .filter(|t| only.is_none_or(|o| o == **t))
    {
        let mut cmd = cargo_fuzz();
        cmd.args(["run", target, "--", &format!("-max_total_time={seconds}")]);
        eprintln!("xtask: {cmd:?}");
        let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let runs = stderr
            .lines()
            .rev()
            .find(|l| l.starts_with("Done "))
            .unwrap_or("no summary")
            .to_owned();
        if !out.status.success() {
            eprintln!("{stderr}");
            bail!("fuzz target {target} failed (a crash is in fuzz/artifacts/{target}/)");
        }
        summary.push(format!("{target}: {runs}"));
    }
    for line in &summary {
        eprintln!("fuzz: {line}");
    }
    Ok(())
}

fn test(no_lint: bool, args: &[String]) -> Result<()> {
    setup()?;
    // ProFTPD (with mod_tls, the second real server of the FTPS tests) and
    // HAProxy (in front of gateways): Debian's proftpd conflicts with
    // vsftpd, so the peers are unpacked privately, as for the benchmark,
    // and their place passed on.
    install_peers()?;
    if !no_lint {
        status(cargo().args(["fmt", "--all", "--", "--check"]))?;
        status(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
        // The eBPF crate is not a workspace member: its own pass.
        status(ebpf_cargo()?.args(["fmt", "--", "--check"]))?;
        status(ebpf_cargo()?.args(["clippy", "--release", "--", "-D", "warnings"]))?;
        fuzz_build()?;
    }
    // setup() installed the eBPF toolchain: a daemon without the flow
    // tracker would be a silent CI gap, so its absence is an error here.
    // Both tiers: plain `cargo test` ignores the privileged tests (root,
    // namespaces, real servers and clients, eBPF); here they run, and a
    // missing prerequisite fails them.
    let (cargo_args, harness_args) = match args.iter().position(|a| a == "--") {
        Some(at) => {
            let (before, after) = args.split_at(at);
            (before, after.get(1..).unwrap_or_default())
        }
        None => (args, &[][..]),
    };
    status(
        cargo()
            .env("FTPX_EBPF_BUILD", "require")
            .env("FTPX_PEERS", peers_dir())
            .args(["test", "--workspace", "--no-fail-fast"])
            .args(cargo_args)
            .args(["--", "--include-ignored"])
            .args(harness_args),
    )?;
    if args.is_empty() {
        // A bounded smoke run of every fuzz target; `cargo xtask fuzz` runs longer.
        fuzz(20, None)?;
    }
    Ok(())
}

/// A demo vsftpd, killed on drop.
struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const DEMO_SERVER: &str = "127.0.0.1:2221";
const DEMO_README: &str = "Welcome to the ftp-proxy demo.\r\nThis is readme.txt, served by vsftpd through the gateway.\r\n";

fn start_demo_server() -> Result<Demo> {
    let dir = root().join("target/demo");
    let _ = std::fs::remove_dir_all(&dir);
    for sub in ["empty", "ftproot/pub"] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("creating {}", dir.join(sub).display()))?;
    }
    std::fs::write(dir.join("ftproot/pub/readme.txt"), DEMO_README)?;
    status(
        Command::new("chown")
            .args(["-R", "ftp:ftp"])
            .arg(dir.join("ftproot/pub")),
    )?;
    status(
        Command::new("chmod")
            .args(["755"])
            .arg(&dir)
            .arg(dir.join("ftproot")),
    )?;
    let template = std::fs::read_to_string(root().join("deploy/demo/vsftpd.conf.in"))?;
    let config = template
        .replace(
            "@LISTEN@",
            "listen=YES\nlisten_ipv6=NO\nlisten_address=127.0.0.1",
        )
        .replace("@PORT@", "2221")
        .replace("@ROOT@", &dir.display().to_string())
        .replace("@PASV_MIN@", "30000")
        .replace("@PASV_MAX@", "30099");
    std::fs::write(dir.join("vsftpd.conf"), config)?;
    let stdin = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join("vsftpd.err"))?;
    let child = Command::new("vsftpd")
        .arg(dir.join("vsftpd.conf"))
        .stdin(stdin)
        .spawn()
        .context("starting vsftpd")?;
    let demo = Demo(child);
    for _ in 0..500 {
        if std::net::TcpStream::connect(DEMO_SERVER).is_ok() {
            return Ok(demo);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    bail!(
        "vsftpd did not start: {}",
        std::fs::read_to_string(dir.join("vsftpd.err")).unwrap_or_default()
    )
}

fn run(args: &[String]) -> Result<()> {
    let own_upstream = args
        .iter()
        .any(|a| a == "--upstream" || a.starts_with("--upstream="));
    if !own_upstream {
        setup()?;
    }
    status(cargo().args(["build", "--release", "-p", "ftp-proxy"]))?;
    let _demo = if own_upstream {
        None
    } else {
        Some(start_demo_server()?)
    };
    let mut gateway = Command::new(root().join("target/release/ftp-proxy"));
    gateway.args([
        "--listen",
        "127.0.0.1:2121",
        "--passive-ports",
        "40000-40099",
    ]);
    if !own_upstream {
        gateway.args(["--upstream", DEMO_SERVER]);
        eprintln!(
            "\nxtask: demo FTP server on {DEMO_SERVER}; gateway on 127.0.0.1:2121. Try:\n  \
             curl ftp://127.0.0.1:2121/pub/readme.txt\n  curl -P - ftp://127.0.0.1:2121/pub/\n  \
             lftp -p 2121 127.0.0.1\nCtrl-C stops both.\n"
        );
    }
    gateway.args(args);
    let status = run_until_interrupted(gateway)?;
    if let Some(status) = status
        && !status.success()
    {
        bail!("gateway exited with {status}");
    }
    Ok(())
}

/// Runs the gateway until it exits (its status) or this process gets
/// SIGINT or SIGTERM (`None`): then the gateway gets SIGINT, and the demo
/// server is stopped when the caller's guard drops. Handling the signal
/// here, rather than dying of it, means the demo never outlives a Ctrl-C,
/// also when SIGINT was ignored by whatever started us (a background job
/// inherits that, and an ignored SIGINT would leave vsftpd running).
fn run_until_interrupted(gateway: Command) -> Result<Option<std::process::ExitStatus>> {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")?;
    runtime.block_on(async {
        let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut child = tokio::process::Command::from(gateway)
            .kill_on_drop(true)
            .spawn()
            .context("running the gateway")?;
        tokio::select! {
            status = child.wait() => return Ok(Some(status.context("waiting for the gateway")?)),
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        if let Some(pid) = child
            .id()
            .and_then(|id| rustix::process::Pid::from_raw(id as i32))
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
        }
        if tokio::time::timeout(std::time::Duration::from_secs(10), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
        eprintln!("xtask: stopped");
        Ok(None)
    })
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Run { args } => run(&args),
        Task::Test { no_lint, args } => test(no_lint, &args),
        Task::Fuzz { seconds, target } => fuzz(seconds, target.as_deref()),
        Task::Soak {
            sessions,
            file_kib,
            hold,
        } => {
            setup()?;
            status(
                cargo()
                    .env("FTPX_LOAD_SESSIONS", sessions.to_string())
                    .env("FTPX_LOAD_FILE_KIB", file_kib.to_string())
                    .env("FTPX_IDLE_HOLD_SECS", hold.to_string())
                    .args([
                        "test",
                        "--release",
                        "-p",
                        "ftp-proxy",
                        "--test",
                        "load",
                        "--",
                        "--test-threads",
                        "1",
                        "--nocapture",
                    ]),
            )
        }
        // The path on standard output, for scripts and tests.
        Task::Package => package::run().map(|deb| println!("{}", deb.display())),
        Task::Bench(args) => bench::run(args),
        Task::BenchLoad(args) => bench::load::main(args),
    }
}
