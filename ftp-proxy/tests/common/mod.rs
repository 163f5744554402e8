//! Test fixtures: a network namespace per test (so no packet can leave the
//! machine and ports never collide), vsftpd started in it, the gateway binary
//! started in it, and the clients (Python's ftplib driver, curl, lftp) run in
//! it; ProFTPD as a second server ([`proftpd`]). Everything is removed on
//! drop, also when the test fails.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub mod certs;
pub mod fake;
pub mod inproc;
pub mod proftpd;

// Unused in the test binaries without ProFTPD.
#[allow(unused_imports)]
pub use proftpd::Proftpd;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A network namespace with only a loopback interface, removed on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new() -> NetNs {
        let name = format!(
            "ftpx-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs { name };
        run(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        // Ephemeral ports above the data port ranges the tests configure.
        run(ns
            .command("sysctl")
            .args(["-q", "-w", "net.ipv4.ip_local_port_range=50000 60999"]));
        ns
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it
    /// creates belong to the namespace and can be used from anywhere.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let fd = File::open(&path).unwrap();
                rustix::thread::move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&fd),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .unwrap();
                f()
            })
            .join()
            .unwrap()
        })
    }

    pub fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        self.enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
    }

    pub fn connect_from(&self, source: SocketAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
        self.enter(|| {
            let domain = socket2::Domain::for_address(addr);
            let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
            s.bind(&source.into())?;
            s.connect_timeout(&addr.into(), Duration::from_secs(5))?;
            Ok(s.into())
        })
    }

    pub fn listen(&self, addr: SocketAddr) -> TcpListener {
        self.enter(|| TcpListener::bind(addr).unwrap())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Kill whatever still runs inside, then remove the namespace.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ftp_ids() -> (u32, u32) {
    let passwd = fs::read_to_string("/etc/passwd").unwrap();
    let line = passwd
        .lines()
        .find(|l| l.starts_with("ftp:"))
        .expect("user ftp (installed with vsftpd)");
    let fields: Vec<&str> = line.split(':').collect();
    (fields[2].parse().unwrap(), fields[3].parse().unwrap())
}

/// Where the servers' files go: memory (`/dev/shm`) where the machine has
/// it, so that the 256 MiB transfers (a few GiB at once when tests run side
/// by side) do not depend on the free disk of the machine running the
/// suite. A full disk makes vsftpd answer `451 Failure writing to local
/// file` in the middle of an upload, a failure that is the machine's.
pub fn server_files() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let usable = fs::metadata(shm).is_ok_and(|m| m.is_dir())
        && tempfile::Builder::new()
            .prefix("ftpx-probe")
            .tempdir_in(shm)
            .is_ok();
    if usable {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// A vsftpd instance in a namespace, anonymous users rooted at a temporary
/// folder whose `pub/` is writable.
pub struct Vsftpd {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    child: Child,
    config: PathBuf,
}

impl Vsftpd {
    pub fn start(ns: &NetNs, addr: SocketAddr, pasv: (u16, u16)) -> Vsftpd {
        Vsftpd::start_with(ns, addr, pasv, "")
    }

    /// vsftpd with extra configuration lines (FTPS, say).
    pub fn start_with(ns: &NetNs, addr: SocketAddr, pasv: (u16, u16), extra: &str) -> Vsftpd {
        let dir = tempfile::Builder::new()
            .prefix("ftpx-vsftpd")
            .tempdir_in(server_files())
            .unwrap();
        let root = dir.path();
        fs::create_dir(root.join("empty")).unwrap();
        fs::create_dir(root.join("ftproot")).unwrap();
        fs::set_permissions(root.join("ftproot"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(root, fs::Permissions::from_mode(0o755)).unwrap();
        let public = root.join("ftproot/pub");
        fs::create_dir(&public).unwrap();
        let (uid, gid) = ftp_ids();
        std::os::unix::fs::chown(&public, Some(uid), Some(gid)).unwrap();
        let listen = match addr {
            SocketAddr::V4(v4) => {
                format!("listen=YES\nlisten_ipv6=NO\nlisten_address={}\n", v4.ip())
            }
            SocketAddr::V6(v6) => {
                format!("listen=NO\nlisten_ipv6=YES\nlisten_address6={}\n", v6.ip())
            }
        };
        let config = root.join("vsftpd.conf");
        let template = fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/demo/vsftpd.conf.in"),
        )
        .unwrap();
        let text = template
            .replace("@LISTEN@", listen.trim_end())
            .replace("@PORT@", &addr.port().to_string())
            .replace("@ROOT@", &root.display().to_string())
            .replace("@PASV_MIN@", &pasv.0.to_string())
            .replace("@PASV_MAX@", &pasv.1.to_string());
        fs::write(&config, format!("{text}\n{extra}\n")).unwrap();
        // vsftpd writes its start-up errors to fd 0.
        let stdin = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(root.join("stdin"))
            .unwrap();
        let child = ns
            .command("vsftpd")
            .arg(&config)
            .stdin(Stdio::from(stdin))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("vsftpd (run `cargo xtask setup`)");
        let mut server = Vsftpd {
            addr,
            dir,
            child,
            config,
        };
        server.wait_ready(ns);
        server
    }

    fn wait_ready(&mut self, ns: &NetNs) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "vsftpd exited with {status}: {}",
                    fs::read_to_string(self.dir.path().join("stdin")).unwrap_or_default()
                );
            }
            if let Ok(mut s) = ns.connect(self.addr) {
                // Implicit FTPS says nothing before a TLS handshake.
                let implicit = fs::read_to_string(&self.config)
                    .unwrap_or_default()
                    .contains("implicit_ssl=YES");
                if implicit {
                    return;
                }
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 3];
                if s.read_exact(&mut buf).is_ok() && &buf == b"220" {
                    let _ = s.write_all(b"QUIT\r\n");
                    return;
                }
            }
            assert!(Instant::now() < deadline, "vsftpd did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn public(&self) -> PathBuf {
        self.dir.path().join("ftproot/pub")
    }

    /// Writes a file under `pub/`, owned by the FTP user.
    pub fn put(&self, name: &str, content: &[u8]) -> PathBuf {
        let path = self.public().join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(&path, content).unwrap();
        let (uid, gid) = ftp_ids();
        std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
        path
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("vsftpd.log")).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Session processes (setsid'd by vsftpd) are found by their config path.
        let needle = self.config.to_string_lossy().into_owned();
        if let Ok(entries) = fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&needle) {
                    let _ = Command::new("kill")
                        .args(["-9", &entry.file_name().to_string_lossy()])
                        .status();
                }
            }
        }
    }
}

impl Drop for Vsftpd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The gateway binary running in a namespace, logging JSON to a buffer.
pub struct Gateway {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    pub listen: Vec<SocketAddr>,
}

impl Gateway {
    pub fn start(ns: &NetNs, args: &[&str]) -> Gateway {
        let listen: Vec<SocketAddr> = args
            .windows(2)
            .filter(|w| w[0] == "--listen")
            .map(|w| w[1].parse().unwrap())
            .collect();
        let mut child = ns
            .command(env!("CARGO_BIN_EXE_ftp-proxy"))
            .args(args)
            .args(["--log-format", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("FTPX_SHOW_LOGS").is_some() {
                    eprintln!("gateway: {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        let mut gateway = Gateway {
            child,
            logs,
            listen,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while gateway.count_logs("\"listening\"") < gateway.listen.len().max(1) {
            if let Ok(Some(status)) = gateway.child.try_wait() {
                std::thread::sleep(Duration::from_millis(50));
                panic!("gateway exited with {status}: {}", gateway.logs());
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not start: {}",
                gateway.logs()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        gateway
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    pub fn count_logs(&self, needle: &str) -> usize {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits (logs arrive through a pipe) until `needle` was logged `n`
    /// times, then checks it was not logged more often.
    pub fn expect_logs(&self, needle: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.count_logs(needle) < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            self.count_logs(needle),
            n,
            "{needle:?} logged a different number of times:\n{}",
            self.logs()
        );
    }

    /// Open file descriptors of the gateway process.
    pub fn fd_count(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Waits until the gateway's descriptors fall back to `baseline`
    /// (sessions close asynchronously after the client's last reply).
    pub fn assert_fds_back_to(&self, baseline: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.fd_count();
            if now <= baseline {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "file descriptors leaked: {now} open, baseline {baseline}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, signal: &str) {
        run(Command::new("kill").args([&format!("-{signal}"), &self.pid().to_string()]));
    }

    pub fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const SERVER4: &str = "127.0.0.1:2121";
pub const SERVER6: &str = "[::1]:2121";
pub const GATEWAY4: &str = "127.0.0.1:2100";
pub const GATEWAY6: &str = "[::1]:2100";

/// A namespace with vsftpd (IPv4 and IPv6) and the gateway in front of the
/// IPv4 one, listening on both families.
pub struct Lab {
    pub gateway: Gateway,
    pub server: Vsftpd,
    pub server6: Option<Vsftpd>,
    pub ns: NetNs,
}

impl Lab {
    pub fn new(extra: &[&str]) -> Lab {
        Lab::with_upstream(SERVER4, extra)
    }

    pub fn with_upstream(upstream: &str, extra: &[&str]) -> Lab {
        let ns = NetNs::new();
        let server = Vsftpd::start(&ns, SERVER4.parse().unwrap(), (30000, 34999));
        let server6 = upstream
            .starts_with('[')
            .then(|| Vsftpd::start(&ns, SERVER6.parse().unwrap(), (35000, 39999)));
        let mut args = vec![
            "--listen",
            GATEWAY4,
            "--listen",
            GATEWAY6,
            "--upstream",
            upstream,
        ];
        // Defaults for the data port ranges, unless the test sets its own.
        for (flag, range) in [
            ("--passive-ports", "40000-44999"),
            ("--active-ports", "45000-49999"),
        ] {
            if !extra.contains(&flag) {
                args.extend_from_slice(&[flag, range]);
            }
        }
        args.extend_from_slice(extra);
        let gateway = Gateway::start(&ns, &args);
        Lab {
            gateway,
            server,
            server6,
            ns,
        }
    }

    /// The server the gateway relays to (IPv6 when so configured).
    pub fn upstream(&self) -> &Vsftpd {
        self.server6.as_ref().unwrap_or(&self.server)
    }

    /// Runs the ftplib driver and returns one JSON value per step.
    pub fn python(&self, spec: serde_json::Value) -> Vec<serde_json::Value> {
        ftp_driver(&self.ns, &spec, &|| self.gateway.logs())
    }

    pub fn curl(&self, args: &[&str]) -> Output {
        self.ns
            .command("curl")
            .args(["--silent", "--show-error", "--max-time", "120"])
            .args(args)
            .output()
            .unwrap()
    }

    pub fn lftp(&self, url: &str, script: &str) -> Output {
        let settings = "set ftp:ssl-allow no; set net:max-retries 1; set net:timeout 10; set cmd:fail-exit yes; set xfer:clobber yes; ";
        self.ns
            .command("lftp")
            .args([
                "-u",
                "anonymous,test@example.com",
                "-e",
                &format!("{settings}{script}; bye"),
                url,
            ])
            .output()
            .unwrap()
    }
}

/// Deterministic content holding every byte value (same as the driver's).
pub fn pattern(size: usize, seed: u8) -> Vec<u8> {
    let block: Vec<u8> = (0..65536 * 4usize)
        .map(|i| ((i * 7 + (i >> 8)) as u8).wrapping_add(seed))
        .collect();
    block.iter().copied().cycle().take(size).collect()
}

pub fn sha256(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_file(path: &Path) -> String {
    let mut file = File::open(path).unwrap();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes `size` bytes of the pattern to `path` without holding it all in memory.
pub fn write_pattern_file(path: &Path, size: usize, seed: u8) {
    let block = pattern(1 << 20, seed);
    let mut file = File::create(path).unwrap();
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len());
        file.write_all(&block[..n]).unwrap();
        left -= n;
    }
}

/// A control connection driven by hand, for bad-input tests.
pub struct Control {
    pub stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Control {
    pub fn connect(ns: &NetNs, addr: &str) -> Control {
        let stream = ns.connect(addr.parse().unwrap()).unwrap();
        Control::from_stream(stream)
    }

    pub fn from_stream(stream: TcpStream) -> Control {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        let mut c = Control { stream, reader };
        let banner = c.reply();
        assert!(banner.starts_with("220"), "banner: {banner}");
        c
    }

    pub fn login(&mut self) {
        assert!(self.cmd("USER anonymous").starts_with("331"));
        assert!(self.cmd("PASS test@example.com").starts_with("230"));
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Reads one whole reply (multi-line aware); returns its lines joined by '\n'.
    pub fn reply(&mut self) -> String {
        let mut lines = Vec::new();
        let mut code = String::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).unwrap_or(0);
            if n == 0 {
                lines.push("<closed>".to_owned());
                break;
            }
            let line = line.trim_end().to_owned();
            if code.is_empty() {
                code = line.chars().take(3).collect();
                let multi = line.chars().nth(3) == Some('-');
                lines.push(line);
                if !multi {
                    break;
                }
            } else {
                let end = line.starts_with(&code) && line.chars().nth(3) == Some(' ');
                lines.push(line);
                if end {
                    break;
                }
            }
        }
        lines.join("\n")
    }

    /// Starts a download over EPSV: sends `command` once the data
    /// connection is open, checks the 150, and returns the data connection.
    pub fn epsv_download(&mut self, ns: &NetNs, host: &str, command: &str) -> TcpStream {
        let reply = self.cmd("EPSV");
        assert!(reply.starts_with("229"), "{reply}");
        let port: u16 = reply.split('|').nth(3).unwrap().parse().unwrap();
        let data = ns
            .connect(format!("{host}:{port}").parse().unwrap())
            .unwrap();
        self.send(format!("{command}\r\n").as_bytes());
        let first = self.reply();
        assert!(first.starts_with("150"), "{command}: {first}");
        data
    }

    pub fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }
}

/// The minimal FTP server of `tests/clients/fakeftpd.py` (any login, NOOP,
/// PWD, QUIT) on 127.0.0.1:2121 of `ns`, for tests of many idle sessions.
/// Killed on drop.
pub struct FakeFtpd(Child);

impl FakeFtpd {
    pub fn start(ns: &NetNs) -> FakeFtpd {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/fakeftpd.py");
        let mut child = ns
            .command("python3")
            .arg(script)
            .args(["127.0.0.1", "2121"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert_eq!(ready.trim(), "ready");
        FakeFtpd(child)
    }
}

impl Drop for FakeFtpd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `fakeftpd.py --proxy-protocol` on `addr` of `ns`: prints the client of
/// every connection's PROXY header ("client IP PORT", or "local" for a
/// health check's LOCAL header). Killed on drop.
pub struct ProxiedFakeFtpd {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl ProxiedFakeFtpd {
    pub fn start(ns: &NetNs, addr: SocketAddr) -> ProxiedFakeFtpd {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/fakeftpd.py");
        let mut child = ns
            .command("python3")
            .arg(script)
            .args([addr.ip().to_string(), addr.port().to_string()])
            .arg("--proxy-protocol")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut ready = String::new();
        stdout.read_line(&mut ready).unwrap();
        assert_eq!(ready.trim(), "ready");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        ProxiedFakeFtpd { child, lines }
    }

    /// The clients seen so far ("IP PORT"), health checks left out.
    pub fn clients(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.strip_prefix("client ").map(str::to_owned))
            .collect()
    }
}

impl Drop for ProxiedFakeFtpd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A peer program unpacked by `scripts/install-bench-deps.sh` (HAProxy,
/// ProFTPD): `FTPX_PEERS` (set by `cargo xtask test`), else the
/// benchmark's `target/bench/peers`. A missing peer fails the test.
pub fn peer(name: &str, binary: &str) -> PathBuf {
    let dir = std::env::var_os("FTPX_PEERS").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/peers"),
        PathBuf::from,
    );
    let status = fs::read_to_string(dir.join("status")).unwrap_or_default();
    assert!(
        status.lines().any(|l| l.starts_with(&format!("{name} ok"))),
        "peer {name} missing in {}: run `cargo xtask test` (it runs scripts/install-bench-deps.sh)",
        dir.display()
    );
    dir.join(name).join(binary)
}

/// HAProxy in `ns` with `config` (mode tcp sections), killed on drop.
pub struct Haproxy {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    /// Starts it and waits until `ready` accepts connections.
    pub fn start(ns: &NetNs, config: &str, ready: SocketAddr) -> Haproxy {
        let dir = tempfile::Builder::new()
            .prefix("ftpx-haproxy")
            .tempdir()
            .unwrap();
        let path = dir.path().join("haproxy.cfg");
        fs::write(&path, config).unwrap();
        let child = ns
            .command(peer("haproxy", "usr/sbin/haproxy"))
            .args(["-db", "-f"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut haproxy = Haproxy { child, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while ns.connect(ready).is_err() {
            if let Ok(Some(status)) = haproxy.child.try_wait() {
                panic!("haproxy exited with {status}");
            }
            assert!(Instant::now() < deadline, "haproxy did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        haproxy
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `path` from `addr` inside `ns`: (status code, body).
pub fn http_get(ns: &NetNs, addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = ns.connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The transfers in a python driver's results (`retr`, `stor`, `list`,
/// `rest_retr`), after checking the ones every FTPS matrix test checks:
/// `count` of them, each ended by `226`, each resumed the control
/// connection's TLS session unless the client is plain, every `retr` and
/// `stor` carried the file whose digest is `digest`, and the `REST` one
/// its last 1,000 bytes. `logs` is printed when a reply is wrong.
pub fn checked_transfers<'a>(
    results: &'a [serde_json::Value],
    count: usize,
    client_mode: &str,
    digest: &str,
    context: &str,
    logs: impl Fn() -> String,
) -> Vec<&'a serde_json::Value> {
    use serde_json::json;
    let transfers: Vec<&serde_json::Value> = results
        .iter()
        .filter(|r| {
            matches!(
                r["op"].as_str(),
                Some("retr" | "stor" | "list" | "rest_retr")
            )
        })
        .collect();
    assert_eq!(transfers.len(), count, "{context}: {results:#?}");
    for r in &transfers {
        assert!(
            r["final"].as_str().unwrap_or("").starts_with("226"),
            "{context}: {r}\n{}",
            logs()
        );
        if client_mode != "plain" {
            assert_eq!(
                r["reused"],
                json!(true),
                "{context}: data TLS not resumed: {r}"
            );
        }
    }
    for r in transfers
        .iter()
        .filter(|r| matches!(r["op"].as_str(), Some("retr" | "stor")))
    {
        assert_eq!(r["sha256"], json!(digest), "{context}: {r}");
    }
    let rest = transfers.iter().find(|r| r["op"] == "rest_retr").unwrap();
    assert_eq!(rest["size"], json!(1000), "{context}: {rest}");
    transfers
}

/// Runs the ftplib driver (`tests/clients/ftpdriver.py`) in `ns` and
/// returns one JSON value per step; `logs` is printed when it fails.
pub fn ftp_driver(
    ns: &NetNs,
    spec: &serde_json::Value,
    logs: &dyn Fn() -> String,
) -> Vec<serde_json::Value> {
    let driver = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/ftpdriver.py");
    let out = ns
        .command("python3")
        .arg(driver)
        .arg(spec.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "driver failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs()
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
