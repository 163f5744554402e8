//! ProFTPD as a second real server, started in a test's namespace like
//! [`super::Vsftpd`]. Debian's `proftpd-core` conflicts with `vsftpd`
//! (both provide `ftp-server`), so it is never installed: `cargo xtask
//! test` runs `scripts/install-bench-deps.sh`, which unpacks
//! proftpd-core and proftpd-mod-crypto (mod_tls) under
//! `PEERS_DIR/proftpd`, and passes PEERS_DIR in `FTPX_PEERS`. Without
//! it the test fails, naming what is missing (the privileged tier never
//! skips). The daemon runs in the foreground (`-n`) with a configuration
//! of the test's own, anonymous users chrooted to a temporary folder
//! whose `pub/` is writable, and mod_tls loaded (off unless the test's
//! directives turn it on) with its log in the same folder.

use std::fs::{self, OpenOptions};
use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::NetNs;
use super::certs::TestCa;

/// A ProFTPD instance in a namespace; it and its session processes are
/// killed on drop.
pub struct Proftpd {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    child: Child,
    implicit: bool,
}

/// The unpacked ProFTPD tree: `$FTPX_PEERS/proftpd`, checked.
pub fn proftpd_root() -> PathBuf {
    let Some(peers) = std::env::var_os("FTPX_PEERS") else {
        panic!(
            "FTPX_PEERS is not set: the ProFTPD tests need the tree that \
             `scripts/install-bench-deps.sh DIR` unpacks into DIR/proftpd \
             (`cargo xtask test` runs it and sets FTPX_PEERS)"
        );
    };
    let peers = PathBuf::from(peers);
    let status = fs::read_to_string(peers.join("status")).unwrap_or_default();
    assert!(
        status.lines().any(|l| l.starts_with("proftpd ok")),
        "ProFTPD is not available in {} (status: {status:?}); run scripts/install-bench-deps.sh",
        peers.display()
    );
    let root = peers.join("proftpd");
    for needed in ["usr/sbin/proftpd", "usr/lib/proftpd/mod_tls.so"] {
        assert!(
            root.join(needed).exists(),
            "{} is missing; run scripts/install-bench-deps.sh",
            root.join(needed).display()
        );
    }
    root
}

/// The name of the group with id `gid` (ProFTPD's `Group` takes names).
fn group_name(gid: u32) -> String {
    fs::read_to_string("/etc/group")
        .unwrap()
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == gid.to_string())
        .map(|f| f[0].to_owned())
        .unwrap_or_else(|| "nogroup".into())
}

impl Proftpd {
    /// mod_tls directives for a server with the test authority's
    /// certificate: `required` is `TLSRequired`'s value (`on`, `ctrl`,
    /// `off`), `options` `TLSOptions`' (empty: the defaults, which
    /// require data connections to reuse the control connection's TLS
    /// session); `UseImplicitSSL` among them makes it implicit FTPS.
    pub fn tls(ca: &TestCa, required: &str, options: &str) -> String {
        let mut text = format!(
            "TLSEngine on\nTLSRequired {required}\nTLSECCertificateFile {}\n\
             TLSECCertificateKeyFile {}\nTLSVerifyClient off\nTLSRenegotiate none\n",
            TestCa::path(&ca.chain),
            TestCa::path(&ca.key),
        );
        if !options.is_empty() {
            text.push_str(&format!("TLSOptions {options}\n"));
        }
        text
    }

    /// Starts ProFTPD on `addr` with passive ports `pasv` and extra
    /// configuration directives (e.g. [`Proftpd::tls`]).
    pub fn start(ns: &NetNs, addr: SocketAddr, pasv: (u16, u16), directives: &str) -> Proftpd {
        let tree = proftpd_root();
        let dir = tempfile::Builder::new()
            .prefix("ftpx-proftpd")
            .tempdir_in(super::server_files())
            .unwrap();
        let root = dir.path();
        fs::set_permissions(root, fs::Permissions::from_mode(0o755)).unwrap();
        let ftproot = root.join("ftproot");
        fs::create_dir(&ftproot).unwrap();
        fs::set_permissions(&ftproot, fs::Permissions::from_mode(0o755)).unwrap();
        let public = ftproot.join("pub");
        fs::create_dir(&public).unwrap();
        let (uid, gid) = super::ftp_ids();
        std::os::unix::fs::chown(&public, Some(uid), Some(gid)).unwrap();
        let d = root.display();
        let config = format!(
            "ServerName \"ftp-proxy test ProFTPD\"\n\
             ServerType standalone\n\
             DefaultServer on\n\
             Port {port}\n\
             DefaultAddress {ip}\n\
             SocketBindTight on\n\
             UseIPv6 {ipv6}\n\
             User nobody\n\
             Group nogroup\n\
             PidFile {d}/proftpd.pid\n\
             ScoreboardFile {d}/proftpd.scoreboard\n\
             SystemLog {d}/system.log\n\
             WtmpLog off\n\
             UseReverseDNS off\n\
             AuthPAM off\n\
             PassivePorts {p0} {p1}\n\
             AllowOverwrite on\n\
             ModulePath {modules}\n\
             <IfModule mod_delay.c>\n  DelayEngine off\n</IfModule>\n\
             <IfModule mod_ctrls.c>\n  ControlsEngine off\n  ControlsSocket {d}/proftpd.sock\n</IfModule>\n\
             LoadModule mod_tls.c\n\
             TLSLog {d}/tls.log\n\
             TLSProtocol TLSv1.2 TLSv1.3\n\
             {directives}\n\
             <Anonymous {d}/ftproot>\n\
             \x20 User ftp\n\
             \x20 Group {group}\n\
             \x20 UserAlias anonymous ftp\n\
             \x20 RequireValidShell off\n\
             </Anonymous>\n",
            port = addr.port(),
            ip = addr.ip(),
            ipv6 = if addr.is_ipv6() { "on" } else { "off" },
            p0 = pasv.0,
            p1 = pasv.1,
            modules = tree.join("usr/lib/proftpd").display(),
            group = group_name(gid),
        );
        let conf = root.join("proftpd.conf");
        fs::write(&conf, config).unwrap();
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.join("proftpd.out"))
            .unwrap();
        let child = ns
            .command(tree.join("usr/sbin/proftpd"))
            .args(["-n", "-c"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("starting ProFTPD");
        let mut server = Proftpd {
            addr,
            dir,
            child,
            implicit: directives.contains("UseImplicitSSL"),
        };
        server.wait_ready(ns);
        server
    }

    fn wait_ready(&mut self, ns: &NetNs) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("ProFTPD exited with {status}: {}", self.log());
            }
            if let Ok(mut s) = ns.connect(self.addr) {
                // Implicit FTPS says nothing before a TLS handshake.
                if self.implicit {
                    return;
                }
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 3];
                if s.read_exact(&mut buf).is_ok() && &buf == b"220" {
                    let _ = std::io::Write::write_all(&mut s, b"QUIT\r\n");
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "ProFTPD did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn public(&self) -> PathBuf {
        self.dir.path().join("ftproot/pub")
    }

    /// Writes a file under `pub/`, owned by the FTP user.
    pub fn put(&self, name: &str, content: &[u8]) -> PathBuf {
        let path = self.public().join(name);
        fs::write(&path, content).unwrap();
        let (uid, gid) = super::ftp_ids();
        std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
        path
    }

    /// Its standard output and error, and the system log.
    pub fn log(&self) -> String {
        let read = |name: &str| fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!("{}{}", read("proftpd.out"), read("system.log"))
    }

    /// mod_tls's log: handshakes, and whether each data connection
    /// reused the control connection's session.
    pub fn tls_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("tls.log")).unwrap_or_default()
    }

    /// Lines of the TLS log containing `needle`.
    pub fn tls_log_count(&self, needle: &str) -> usize {
        self.tls_log()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Kills the daemon and its session processes (children of the
    /// listener, found by their parent).
    pub fn kill(&mut self) {
        let mut pids = vec![self.child.id()];
        let mut i = 0;
        while i < pids.len() {
            let parent = pids[i];
            if let Ok(entries) = fs::read_dir("/proc") {
                for entry in entries.flatten() {
                    let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                        continue;
                    };
                    let stat = fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
                    // The parent is the second field after the command's ')'.
                    let ppid = stat
                        .rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                        .and_then(|p| p.parse::<u32>().ok());
                    if ppid == Some(parent) && !pids.contains(&pid) {
                        pids.push(pid);
                    }
                }
            }
            i += 1;
        }
        for pid in pids.iter().skip(1).rev() {
            if let Some(pid) = rustix::process::Pid::from_raw(*pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proftpd {
    fn drop(&mut self) {
        self.kill();
    }
}
