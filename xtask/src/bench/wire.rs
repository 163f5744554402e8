//! The wire: three network namespaces joined by two veth pairs, so that the
//! benchmark's bytes cross a routed hop between hosts instead of loopback.
//!
//! ```text
//!  client ns              gateway ns                         server ns
//!  c0 10.201.1.2/24 ──── g0 10.201.1.1/24 │ g1 10.201.2.1/24 ──── s0 10.201.2.2/24
//!  default via .1.1        net.ipv4.ip_forward=1                  default via .2.1
//! ```
//!
//! MTU 1500 on every veth end; `net.ipv4.tcp_tw_reuse=1` in the three
//! namespaces (the loopback default reuses TIME_WAIT ports already). The veth ends keep their default offloads
//! (TSO/GSO): the kernel moves up to 64 KB of segments at once between
//! namespaces, as TSO and GRO do between hosts with real NICs.
//!
//! Owns: creating the namespaces, links, addresses, routes and forwarding;
//! running commands (`ip netns exec`) and threads (`setns`) inside them;
//! removing everything on drop, also when the run fails, after killing
//! whatever still runs inside, and on SIGINT or SIGTERM (a thread waits
//! for them while a topology exists, removes it and exits 130); removing
//! what an interrupted run of the same `--base-port` left behind (SIGKILL),
//! before anything is created. Names carry the
//! base port, so two runs with different bases never touch each other's
//! namespaces (and nothing else on the machine is touched).
//!
//! Does not: start daemons ([`super::peers`]) or measure
//! ([`super::measure`]). Traffic to these addresses only ever starts inside
//! a namespace: from the root namespace they would be routed off the
//! machine, so nothing here or in its callers connects to them from there.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

/// The client host's address (on `c0`).
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 2);
/// The gateway host's address toward the client (on `g0`): where the
/// proxies listen.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 1);
/// The gateway host's address toward the server (on `g1`).
pub const GATEWAY_SERVER_SIDE: Ipv4Addr = Ipv4Addr::new(10, 201, 2, 1);
/// The server host's address (on `s0`).
pub const SERVER: Ipv4Addr = Ipv4Addr::new(10, 201, 2, 2);
/// The gateway's interfaces, toward the client and toward the server.
pub const GATEWAY_INTERFACES: [&str; 2] = ["g0", "g1"];
/// MTU of every veth end.
pub const MTU: u16 = 1500;

/// One of the three hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// Where curl and the load client run.
    Client,
    /// Where the proxies run (and which forwards for the routed path).
    Gateway,
    /// Where vsftpd runs.
    Server,
}

/// The namespaces' names (cheap to clone into the paths' environment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    client: String,
    gateway: String,
    server: String,
}

impl Names {
    /// The names for the run on `base`.
    pub fn for_base(base: u16) -> Names {
        let name = |h: &str| format!("{}{h}", prefix(base));
        Names {
            client: name("c"),
            gateway: name("g"),
            server: name("s"),
        }
    }

    /// The namespace of `host`.
    pub fn of(&self, host: Host) -> &str {
        match host {
            Host::Client => &self.client,
            Host::Gateway => &self.gateway,
            Host::Server => &self.server,
        }
    }

    fn all(&self) -> [&str; 3] {
        [&self.client, &self.gateway, &self.server]
    }

    /// `program` run inside `host`'s namespace (`ip netns exec` execs it:
    /// the child's pid is the program's).
    pub fn command(&self, host: Host, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.of(host)]).arg(program);
        c
    }

    /// The inode numbers of the three namespaces (as /proc/PID/ns/net
    /// names them), to tell the run's processes from other jobs'.
    pub fn inodes(&self) -> Vec<u64> {
        self.all()
            .iter()
            .filter_map(|n| {
                rustix::fs::stat(format!("/run/netns/{n}").as_str())
                    .ok()
                    .map(|s| s.st_ino)
            })
            .collect()
    }
}

fn prefix(base: u16) -> String {
    format!("ftpxb{base}-")
}

/// The three namespaces and their links; removed on drop.
#[derive(Debug)]
pub struct Topology {
    names: Names,
}

/// Namespaces that exist now, for the signal thread.
static LIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// Whether the signal thread runs.
static WATCHING: Mutex<bool> = Mutex::new(false);

/// Starts, once, a thread that removes the live namespaces on SIGINT or
/// SIGTERM and exits with 130: otherwise an interrupted run would leave
/// them (and the daemons inside) until the next run on the same base.
fn watch_signals() {
    let mut watching = WATCHING.lock().unwrap_or_else(|e| e.into_inner());
    if *watching {
        return;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("xtask: bench: no signal handler ({e}); Ctrl-C leaves the namespaces");
            return;
        }
    };
    // Registered here, before the thread starts, so that no signal can
    // arrive between the namespaces' creation and the handler.
    let handlers = runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        Ok::<_, std::io::Error>((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        ))
    });
    let (mut interrupt, mut terminate) = match handlers {
        Ok(h) => h,
        Err(e) => {
            eprintln!("xtask: bench: no signal handler ({e}); Ctrl-C leaves the namespaces");
            return;
        }
    };
    *watching = true;
    std::thread::spawn(move || {
        runtime.block_on(async {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        });
        let live = std::mem::take(&mut *LIVE.lock().unwrap_or_else(|e| e.into_inner()));
        for name in &live {
            eprintln!("xtask: bench: interrupted: removing namespace {name}");
            remove(name);
        }
        std::process::exit(130);
    });
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Kills every process in namespace `name`, then deletes it. Errors are
/// ignored: this runs on drop and on leftovers that may be half made.
fn remove(name: &str) {
    for _ in 0..50 {
        let pids = Command::new("ip")
            .args(["netns", "pids", name])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let pids: Vec<i32> = pids
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // Only these processes, one by one: never a group or -1.
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Deleting the namespace deletes its veth ends, and with them their
    // peers in the other namespaces.
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stderr(std::process::Stdio::null())
        .status();
}

/// Namespaces an interrupted run on `base` left behind.
fn leftovers(base: u16) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let p = prefix(base);
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&p))
        .map(str::to_owned)
        .collect()
}

impl Topology {
    /// Removes what an earlier run on `base` left, then creates the three
    /// namespaces, the veth pairs, addresses, routes and forwarding. On
    /// error, what was made is removed before returning.
    pub fn create(base: u16, gro: bool) -> Result<Topology> {
        for name in leftovers(base) {
            eprintln!("xtask: bench: removing namespace {name} left by an earlier run");
            remove(&name);
        }
        watch_signals();
        // The guard exists before the first namespace does.
        let t = Topology {
            names: Names::for_base(base),
        };
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(t.names.all().iter().map(|n| (*n).to_owned()));
        t.build(gro)
            .context("setting up the wire (network namespaces)")?;
        Ok(t)
    }

    fn build(&self, gro: bool) -> Result<()> {
        let n = &self.names;
        for name in n.all() {
            ip(&["netns", "add", name])?;
            ip(&["-n", name, "link", "set", "lo", "up"])?;
        }
        let mtu = MTU.to_string();
        for (peer, peer_dev, gw_dev, peer_addr, gw_addr, via) in [
            (Host::Client, "c0", "g0", CLIENT, GATEWAY, GATEWAY),
            (
                Host::Server,
                "s0",
                "g1",
                SERVER,
                GATEWAY_SERVER_SIDE,
                GATEWAY_SERVER_SIDE,
            ),
        ] {
            // Created straight into the namespaces: no name in the root
            // namespace is ever used.
            ip(&[
                "link",
                "add",
                peer_dev,
                "netns",
                n.of(peer),
                "type",
                "veth",
                "peer",
                "name",
                gw_dev,
                "netns",
                n.of(Host::Gateway),
            ])?;
            for (host, dev, addr) in [
                (peer, peer_dev, peer_addr),
                (Host::Gateway, gw_dev, gw_addr),
            ] {
                let ns = n.of(host);
                ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
                ip(&["-n", ns, "link", "set", dev, "mtu", &mtu, "up"])?;
                if gro {
                    // A veth end with GRO on receives through NAPI, as one
                    // with an XDP program attached does (`--veth-gro`).
                    let out = n
                        .command(host, "ethtool")
                        .args(["-K", dev, "gro", "on"])
                        .output()
                        .with_context(|| format!("ethtool in {ns}"))?;
                    if !out.status.success() {
                        bail!(
                            "ethtool -K {dev} gro on in {ns}: {}",
                            String::from_utf8_lossy(&out.stderr).trim()
                        );
                    }
                }
            }
            ip(&[
                "-n",
                n.of(peer),
                "route",
                "add",
                "default",
                "via",
                &via.to_string(),
            ])?;
        }
        let sysctl = |host: Host, setting: &str| -> Result<()> {
            let out = n
                .command(host, "sysctl")
                .args(["-q", "-w", setting])
                .output()
                .with_context(|| format!("sysctl in {}", n.of(host)))?;
            if !out.status.success() {
                bail!(
                    "{setting} in {}: {}",
                    n.of(host),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(())
        };
        sysctl(Host::Gateway, "net.ipv4.ip_forward=1")?;
        // The rate runs open thousands of connections a second to one
        // address; without reuse, TIME_WAIT would use up the ephemeral
        // ports (on loopback the kernel's default already reuses them).
        for host in [Host::Client, Host::Gateway, Host::Server] {
            sysctl(host, "net.ipv4.tcp_tw_reuse=1")?;
        }
        Ok(())
    }

    /// The namespaces' names.
    pub fn names(&self) -> &Names {
        &self.names
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        for name in self.names.all() {
            remove(name);
            live.retain(|n| n != name);
        }
    }
}

/// Runs `f` on a thread that entered namespace `ns` (the current one when
/// `None`): sockets it creates belong to that namespace.
pub fn within<T: Send>(ns: Option<&str>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let Some(ns) = ns else {
        return f();
    };
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let fd = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&fd),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .with_context(|| format!("entering {path}"))?;
            f()
        })
        .join()
        .unwrap_or_else(|_| bail!("a thread in namespace {ns} panicked"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_base() {
        let n = Names::for_base(10000);
        assert_eq!(n.of(Host::Client), "ftpxb10000-c");
        assert_eq!(n.of(Host::Gateway), "ftpxb10000-g");
        assert_eq!(n.of(Host::Server), "ftpxb10000-s");
        assert!(n.all().iter().all(|x| x.starts_with(&prefix(10000))));
        // Another base's prefix is not a prefix of these.
        assert!(!n.of(Host::Client).starts_with(&prefix(1000)));
        let c = n.command(Host::Gateway, "true");
        let args: Vec<_> = c.get_args().map(|a| a.to_string_lossy()).collect();
        assert_eq!(args, ["netns", "exec", "ftpxb10000-g", "true"]);
    }

    #[test]
    fn addresses_are_private_and_paired() {
        for a in [CLIENT, GATEWAY, GATEWAY_SERVER_SIDE, SERVER] {
            assert!(a.is_private());
        }
        assert_eq!(CLIENT.octets()[..3], GATEWAY.octets()[..3]);
        assert_eq!(SERVER.octets()[..3], GATEWAY_SERVER_SIDE.octets()[..3]);
        assert_ne!(CLIENT.octets()[..3], SERVER.octets()[..3]);
    }
}
