//! The flow tracker attached for real, in network namespaces made for each
//! test (removed on drop, also on failure): on `lo` and on a veth pair
//! between two namespaces, with real TCP connections (std sockets). Checks
//! the recorded sequence, bytes, who closed first, that 1,000 short
//! connections are all seen, and that nothing of ours stays in the kernel
//! once the tracker is gone (programs, links, maps: by id through the bpf
//! syscall).
//!
//! Needs root and the eBPF object (skipped with a message otherwise).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{NetNs, run};
use ftp_proxy::flowtrack::{
    FlowRecord, FlowState, FlowTracker, FlowtrackOptions, IngressHook, Side,
};

/// One test at a time: the "nothing left in the kernel" checks look at
/// every object named like ours.
static SERIAL: Mutex<()> = Mutex::new(());

/// The privileged tier's prerequisites: a missing one fails the test.
fn require() {
    assert!(
        FlowTracker::available(),
        "the eBPF object is not built into this binary (FTPX_EBPF_BUILD=require)"
    );
    assert!(rustix::process::geteuid().is_root(), "needs root");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Starts the tracker from inside `ns` (interfaces are resolved and links
/// created in the caller's network namespace).
fn start_in(ns: &NetNs, rt: &tokio::runtime::Runtime, opts: FlowtrackOptions) -> FlowTracker {
    let handle = rt.handle().clone();
    ns.enter(move || {
        let _guard = handle.enter();
        FlowTracker::start(&opts).expect("start the flow tracker")
    })
}

/// Kernel objects of the tracker: program ids (named ftpx_*), the maps they
/// use, and links to them.
#[derive(Debug, Default)]
struct Objects {
    programs: BTreeSet<u32>,
    maps: BTreeSet<u32>,
    links: BTreeSet<u32>,
}

fn ours() -> Objects {
    let mut o = Objects::default();
    for prog in aya::programs::loaded_programs().filter_map(Result::ok) {
        if prog.name_as_str().is_some_and(|n| n.starts_with("ftpx_")) {
            o.programs.insert(prog.id());
            o.maps
                .extend(prog.map_ids().ok().flatten().unwrap_or_default());
        }
    }
    for map in aya::maps::loaded_maps().filter_map(Result::ok) {
        if map.name_as_str().is_some_and(|n| n.starts_with("FTPX_")) {
            o.maps.insert(map.id());
        }
    }
    for link in aya::programs::loaded_links().filter_map(Result::ok) {
        if o.programs.contains(&link.program_id()) {
            o.links.insert(link.id());
        }
    }
    o
}

/// Ids of all programs, maps and links in the kernel now.
fn all_ids() -> Objects {
    Objects {
        programs: aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .map(|p| p.id())
            .collect(),
        maps: aya::maps::loaded_maps()
            .filter_map(Result::ok)
            .map(|m| m.id())
            .collect(),
        links: aya::programs::loaded_links()
            .filter_map(Result::ok)
            .map(|l| l.id())
            .collect(),
    }
}

/// Asserts that none of `before`'s objects exists any more. The kernel
/// frees programs and maps after an RCU grace period / from a workqueue
/// once the last fd is closed, so this waits (up to 10 s) for that.
fn assert_gone(before: &Objects) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = all_ids();
        let left = (
            before.programs.intersection(&now.programs).count(),
            before.links.intersection(&now.links).count(),
            before.maps.intersection(&now.maps).count(),
        );
        if left == (0, 0, 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left in the kernel (programs, links, maps): {left:?} of {before:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let now = ours();
    assert!(now.programs.is_empty() && now.links.is_empty(), "{now:?}");
    // bpftool (scripts/install-deps.sh installs it) must agree.
    for (what, needle) in [("prog", "ftpx_"), ("map", "FTPX_")] {
        if let Ok(out) = Command::new("bpftool").args([what, "show"]).output() {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(!text.contains(needle), "bpftool {what} show:\n{text}");
        }
    }
    if let Ok(out) = Command::new("bpftool").args(["link", "show"]).output() {
        let text = String::from_utf8_lossy(&out.stdout);
        for id in &before.programs {
            assert!(
                !text.contains(&format!("prog {id} ")),
                "bpftool link show:\n{text}"
            );
        }
    }
}

/// Polls `f` until it returns Some, up to 10 s (the closed-flow list is
/// filled from the ring buffer; no fixed sleeps).
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Handshake, data both ways, the server closes first, then the client.
/// Returns (client address, server address) as the sockets saw them.
fn conversation(
    ns: &NetNs,
    listener: &TcpListener,
    to_server: &[u8],
    to_client: &[u8],
) -> (SocketAddr, SocketAddr) {
    let server_addr = listener.local_addr().unwrap();
    let mut client = ns.connect(server_addr).unwrap();
    let (mut server, seen_client) = listener.accept().unwrap();
    let client_addr = client.local_addr().unwrap();
    assert_eq!(seen_client, client_addr);

    client.write_all(to_server).unwrap();
    let mut buf = vec![0; to_server.len()];
    server.read_exact(&mut buf).unwrap();
    server.write_all(to_client).unwrap();
    let mut buf = vec![0; to_client.len()];
    client.read_exact(&mut buf).unwrap();

    // Server's FIN first; the client sees EOF, then sends its own FIN.
    server.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    client.shutdown(Shutdown::Write).unwrap();
    server.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    drop(client);
    drop(server);
    (client_addr, server_addr)
}

fn closed_flow(tracker: &FlowTracker, client: SocketAddr) -> FlowRecord {
    wait_for("the closed flow", || {
        tracker.closed().into_iter().find(|r| r.client == client)
    })
}

fn assert_orderly(r: &FlowRecord, client: SocketAddr, server: SocketAddr, up: usize, down: usize) {
    assert_eq!((r.client, r.server), (client, server));
    assert_eq!(r.state, FlowState::Closed, "{r:#?}");
    assert_eq!(r.from_client.bytes, up as u64, "{r:#?}");
    assert_eq!(r.from_server.bytes, down as u64, "{r:#?}");
    assert_eq!(r.first_fin, Some(Side::Server), "{r:#?}");
    assert_eq!(r.reset_by, None);
    assert!(r.from_client.fin && r.from_client.fin_acked);
    assert!(r.from_server.fin && r.from_server.fin_acked);
    let t = &r.times;
    let steps = [t.first_syn, t.syn_ack, t.established, t.first_fin, t.closed];
    assert!(steps.iter().all(Option::is_some), "{t:#?}");
    assert!(steps.windows(2).all(|w| w[0] <= w[1]), "{t:#?}");
    // Handshake: at least SYN, ACK from the client and SYN+ACK from the server.
    assert!(
        r.from_client.packets >= 3 && r.from_server.packets >= 3,
        "{r:#?}"
    );
}

#[test]
#[ignore = "privileged tier (root, the eBPF object): cargo xtask test runs it"]
fn loopback_in_a_namespace() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require();
    let rt = runtime();
    let ns = NetNs::new();
    let listener = ns.listen("127.0.0.1:0".parse().unwrap());
    let listener6 = ns.listen("[::1]:0".parse().unwrap());
    let port = listener.local_addr().unwrap().port();
    let port6 = listener6.local_addr().unwrap().port();
    let tracker = start_in(
        &ns,
        &rt,
        FlowtrackOptions {
            interfaces: vec!["lo".into()],
            ports: vec![port, port6],
            ..FlowtrackOptions::default()
        },
    );
    let objects = ours();
    // Three programs loaded (both ingress hooks' and egress), only egress
    // attached on lo.
    assert_eq!(objects.programs.len(), 3, "{objects:?}");
    assert_eq!(objects.links.len(), 1, "lo: egress only: {objects:?}");
    // bpftool sees them too (so its "nothing left" check below means something).
    if let Ok(out) = Command::new("bpftool").args(["prog", "show"]).output() {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("ftpx_egress") && text.contains("ftpx_ingress"),
            "{text}"
        );
    }

    let up = vec![b'u'; 1000];
    let down = vec![b'd'; 70_000]; // more than one segment, GSO on lo
    let (client, server) = conversation(&ns, &listener, &up, &down);
    let r = closed_flow(&tracker, client);
    assert_orderly(&r, client, server, up.len(), down.len());

    let (client6, server6) = conversation(&ns, &listener6, b"hello", b"world!");
    let r6 = closed_flow(&tracker, client6);
    assert_orderly(&r6, client6, server6, 5, 6);

    // Counted once: exactly one SYN per connection though lo's packets
    // cross egress and ingress.
    let c = tracker.counters().unwrap();
    assert_eq!(
        (c.syn, c.synack, c.established, c.closed),
        (2, 2, 2, 2),
        "{c:#?}"
    );
    assert_eq!(c.fin, 4);
    assert_eq!((c.parse_errors, c.ringbuf_full, c.insert_other), (0, 0, 0));

    // Closed flows leave the live table as they close.
    let live = tracker.snapshot().unwrap();
    assert!(live.is_empty(), "{live:#?}");

    drop(tracker);
    assert_gone(&objects);
}

/// Two namespaces joined by veth; the tracker on the server side's end:
/// the client's segments arrive through the ingress hook (tcx, or XDP),
/// the server's leave through tcx.
struct VethPair {
    client: NetNs,
    server: NetNs,
}

impl VethPair {
    fn new() -> Self {
        let client = NetNs::new();
        let server = NetNs::new();
        run(Command::new("ip").args([
            "link",
            "add",
            "vc",
            "netns",
            &client.name,
            "type",
            "veth",
            "peer",
            "name",
            "vs",
            "netns",
            &server.name,
        ]));
        for (ns, dev, v4, v6) in [
            (&client, "vc", "10.200.0.1/24", "fd00:200::1/64"),
            (&server, "vs", "10.200.0.2/24", "fd00:200::2/64"),
        ] {
            run(Command::new("ip").args(["-n", &ns.name, "addr", "add", v4, "dev", dev]));
            run(Command::new("ip").args(["-n", &ns.name, "addr", "add", v6, "dev", dev, "nodad"]));
            run(Command::new("ip").args(["-n", &ns.name, "link", "set", dev, "up"]));
        }
        // The veth goes with the namespaces (NetNs::drop).
        Self { client, server }
    }
}

#[test]
#[ignore = "privileged tier (root, the eBPF object): cargo xtask test runs it"]
fn veth_between_two_namespaces() {
    veth_with(IngressHook::Tc);
}

#[test]
#[ignore = "privileged tier (root, the eBPF object): cargo xtask test runs it"]
fn veth_between_two_namespaces_through_xdp() {
    veth_with(IngressHook::Xdp);
}

fn veth_with(ingress: IngressHook) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require();
    let rt = runtime();
    let pair = VethPair::new();
    let listener = pair.server.listen("10.200.0.2:0".parse().unwrap());
    let listener6 = pair.server.listen("[fd00:200::2]:0".parse().unwrap());
    let ports = vec![
        listener.local_addr().unwrap().port(),
        listener6.local_addr().unwrap().port(),
    ];
    let tracker = start_in(
        &pair.server,
        &rt,
        FlowtrackOptions {
            interfaces: vec!["vs".into()],
            ports,
            ingress,
            ..FlowtrackOptions::default()
        },
    );
    let objects = ours();
    assert_eq!(
        objects.links.len(),
        2,
        "{ingress:?} ingress + tcx egress: {objects:?}"
    );

    let up = vec![7u8; 3000];
    let down = vec![9u8; 200_000];
    let (client, server) = conversation(&pair.client, &listener, &up, &down);
    assert_orderly(
        &closed_flow(&tracker, client),
        client,
        server,
        up.len(),
        down.len(),
    );
    let (client6, server6) = conversation(&pair.client, &listener6, &down, &up);
    assert_orderly(
        &closed_flow(&tracker, client6),
        client6,
        server6,
        down.len(),
        up.len(),
    );

    let c = tracker.counters().unwrap();
    assert_eq!(
        (c.syn, c.established, c.closed, c.parse_errors),
        (2, 2, 2, 0),
        "{c:#?}"
    );

    rt.block_on(tracker.shutdown());
    assert_gone(&objects);
}

#[test]
#[ignore = "privileged tier (root, the eBPF object): cargo xtask test runs it"]
fn a_thousand_short_connections() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require();
    const N: usize = 1000;
    let rt = runtime();
    let ns = NetNs::new();
    let listener = ns.listen("127.0.0.1:0".parse().unwrap());
    let server_addr = listener.local_addr().unwrap();
    let tracker = start_in(
        &ns,
        &rt,
        FlowtrackOptions {
            interfaces: vec!["lo".into()],
            ports: vec![server_addr.port()],
            closed_capacity: 2 * N,
            ..FlowtrackOptions::default()
        },
    );
    let objects = ours();

    // Server: reads the request, answers, closes first.
    let server = std::thread::spawn(move || {
        for _ in 0..N {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = [0u8; 10];
            s.read_exact(&mut req).unwrap();
            s.write_all(&[req[0]; 20]).unwrap();
        }
    });
    let mut seen: HashMap<SocketAddr, (usize, usize)> = HashMap::new();
    for i in 0..N {
        let mut c = ns.connect(server_addr).unwrap();
        let local = c.local_addr().unwrap();
        c.write_all(&[i as u8; 10]).unwrap();
        let mut answer = Vec::new();
        c.read_to_end(&mut answer).unwrap(); // the server's FIN ends it
        seen.insert(local, (10, answer.len()));
    }
    server.join().unwrap();

    let closed = wait_for("1000 closed flows", || {
        let closed = tracker.closed();
        (closed.len() >= N).then_some(closed)
    });
    assert_eq!(closed.len(), N);
    let recorded: HashMap<SocketAddr, (usize, usize)> = closed
        .iter()
        .map(|r| {
            assert_eq!(r.server, server_addr);
            assert_eq!(r.state, FlowState::Closed, "{r:#?}");
            assert_eq!(r.first_fin, Some(Side::Server));
            (
                r.client,
                (r.from_client.bytes as usize, r.from_server.bytes as usize),
            )
        })
        .collect();
    assert_eq!(recorded, seen);
    let c = tracker.counters().unwrap();
    assert_eq!(
        (c.syn, c.synack, c.established, c.closed),
        (N as u64, N as u64, N as u64, N as u64),
        "{c:#?}"
    );
    assert_eq!(
        (c.rst, c.ringbuf_full, c.parse_errors, c.lookup_after_insert),
        (0, 0, 0, 0),
        "{c:#?}"
    );
    assert_eq!(
        c.insert_enomem + c.insert_e2big + c.insert_other,
        0,
        "{c:#?}"
    );

    drop(tracker);
    assert_gone(&objects);
}

/// A second connection from the same client address and port to the same
/// server (the server's side is in TIME_WAIT, which accepts a new SYN):
/// both connections are reported, each as a flow of its own (the first
/// one's entry left the table when it closed).
#[test]
#[ignore = "privileged tier (root, the eBPF object): cargo xtask test runs it"]
fn port_reuse_is_a_new_flow() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require();
    let rt = runtime();
    let ns = NetNs::new();
    let listener = ns.listen("127.0.0.1:0".parse().unwrap());
    let server_addr = listener.local_addr().unwrap();
    let tracker = start_in(
        &ns,
        &rt,
        FlowtrackOptions {
            interfaces: vec!["lo".into()],
            ports: vec![server_addr.port()],
            ..FlowtrackOptions::default()
        },
    );
    let client_addr: SocketAddr = "127.0.0.1:47123".parse().unwrap();
    for round in 0..2u8 {
        let mut client = ns.connect_from(client_addr, server_addr).unwrap();
        let (mut server, seen) = listener.accept().unwrap();
        assert_eq!(seen, client_addr);
        client.write_all(&[round; 100]).unwrap();
        let mut buf = [0u8; 100];
        server.read_exact(&mut buf).unwrap();
        server.shutdown(Shutdown::Write).unwrap(); // server first: its TIME_WAIT
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        drop(client);
        server.read_to_end(&mut rest).unwrap();
        drop(server);
        wait_for("the closed flow", || {
            (tracker.closed().len() == usize::from(round) + 1).then_some(())
        });
    }
    let closed = tracker.closed();
    assert!(closed.iter().all(|r| r.client == client_addr
        && r.state == FlowState::Closed
        && r.from_client.bytes == 100
        && r.first_fin == Some(Side::Server)));
    assert!(closed[0].times.closed <= closed[1].times.first_syn);
    let c = tracker.counters().unwrap();
    assert_eq!((c.syn, c.restarts, c.closed), (2, 0, 2), "{c:#?}");
    assert!(tracker.snapshot().unwrap().is_empty());
}

#[test]
#[ignore = "privileged tier (root, the eBPF object): cargo xtask test runs it"]
fn start_errors_leave_nothing_behind() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require();
    let rt = runtime();
    let ns = NetNs::new();
    let handle = rt.handle().clone();
    let err = ns
        .enter(move || {
            let _guard = handle.enter();
            FlowTracker::start(&FlowtrackOptions {
                interfaces: vec!["lo".into(), "no-such-if0".into()],
                ports: vec![21],
                ..FlowtrackOptions::default()
            })
            .err()
        })
        .expect("an unknown interface is an error");
    assert!(err.to_string().contains("no-such-if0"), "{err}");
    // Whatever was created (maps, programs, the lo link) is freed.
    wait_for("no ftpx objects", || {
        let now = ours();
        (now.programs.is_empty() && now.links.is_empty() && now.maps.is_empty()).then_some(())
    });
    // Outside a runtime.
    assert!(matches!(
        FlowTracker::start(&FlowtrackOptions::default()),
        Err(ftp_proxy::flowtrack::FlowtrackError::NoRuntime)
    ));
}
