//! The flow tracker inside the running gateway: the seed session across
//! three namespaces joined by veth (client, gateway, server), 1,000 short
//! connections counted, and nothing of ours left in the kernel after the
//! daemon exits on SIGTERM or SIGKILL. Serialized: each test checks the
//! kernel's whole list of BPF objects.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

static SERIAL: Mutex<()> = Mutex::new(());

const TCP_FIN: u64 = 0x01;
const TCP_SYN: u64 = 0x02;
const TCP_ACK: u64 = 0x10;

/// Ids of our programs (named `ftpx_*`) loaded in the kernel now.
fn our_programs() -> BTreeSet<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("ftpx_")))
        .map(|p| p.id())
        .collect()
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn http_get(ns: &NetNs, addr: &str, path: &str) -> String {
    let mut s = ns.connect(addr.parse().unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

fn flows(ns: &NetNs) -> Value {
    serde_json::from_str(&http_get(ns, "127.0.0.1:9121", "/flows")).unwrap()
}

/// Client, gateway and server namespaces, joined by two veth pairs.
struct Topology {
    client: NetNs,
    gateway: NetNs,
    server: NetNs,
}

impl Topology {
    fn new() -> Topology {
        let t = Topology {
            client: NetNs::new(),
            gateway: NetNs::new(),
            server: NetNs::new(),
        };
        for (peer, peer_dev, gw_dev, peer_addr, gw_addr) in [
            (&t.client, "c0", "g0", "10.77.1.2/24", "10.77.1.1/24"),
            (&t.server, "s0", "g1", "10.77.2.2/24", "10.77.2.1/24"),
        ] {
            run(Command::new("ip").args([
                "link",
                "add",
                peer_dev,
                "netns",
                &peer.name,
                "type",
                "veth",
                "peer",
                "name",
                gw_dev,
                "netns",
                &t.gateway.name,
            ]));
            for (ns, dev, addr) in [(peer, peer_dev, peer_addr), (&t.gateway, gw_dev, gw_addr)] {
                run(Command::new("ip").args(["-n", &ns.name, "addr", "add", addr, "dev", dev]));
                run(Command::new("ip").args(["-n", &ns.name, "link", "set", dev, "up"]));
            }
        }
        t
    }
}

fn data_flows<'a>(doc: &'a Value, leg: &str) -> Vec<&'a Value> {
    doc["closed"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["leg"] == leg)
        .collect()
}

/// The seed's sequence on one data connection: the sender of the first SYN
/// (`syn_from`), SYN, SYN+ACK, ACK, data from `data_sender`, the data
/// sender's FIN first, then the other's, both acknowledged.
fn assert_seed_sequence(flow: &Value, syn_from: &str, first_fin: &str, payload: u64) {
    assert_eq!(flow["client"], syn_from, "{flow}");
    assert_eq!(flow["state"], "closed", "{flow}");
    assert_eq!(flow["closed_first_by"], first_fin, "{flow}");
    let (c, s) = (&flow["from_client"], &flow["from_server"]);
    let flags = |d: &Value| d["tcp_flags"].as_u64().unwrap();
    assert_eq!(
        flags(c) & (TCP_SYN | TCP_ACK | TCP_FIN),
        TCP_SYN | TCP_ACK | TCP_FIN,
        "{flow}"
    );
    assert_eq!(
        flags(s) & (TCP_SYN | TCP_ACK | TCP_FIN),
        TCP_SYN | TCP_ACK | TCP_FIN,
        "{flow}"
    );
    assert!(
        c["fin"].as_bool().unwrap()
            && s["fin"].as_bool().unwrap()
            && c["fin_acked"].as_bool().unwrap()
            && s["fin_acked"].as_bool().unwrap(),
        "{flow}"
    );
    // The data went from the SYN sender (active mode: the data sender opens).
    assert_eq!(c["bytes"].as_u64().unwrap(), payload, "{flow}");
    assert_eq!(s["bytes"].as_u64().unwrap(), 0, "{flow}");
    let t = &flow["times"];
    let at = |k: &str| t[k]["secs"].as_f64().unwrap() + t[k]["nanos"].as_f64().unwrap() / 1e9;
    assert!(
        at("first_syn") <= at("syn_ack")
            && at("syn_ack") <= at("established")
            && at("established") <= at("first_fin")
            && at("first_fin") <= at("closed"),
        "{flow}"
    );
    assert!(flow["handshake_ms"].as_f64().unwrap() >= 0.0);
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn seed_session_across_veth_is_tracked_on_both_legs() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t = Topology::new();
    let server = Vsftpd::start(&t.server, "10.77.2.2:2121".parse().unwrap(), (30000, 30099));
    let readme = b"This is readme.txt from the reference session.\r\n".repeat(40);
    server.put("readme.txt", &readme);
    let gateway = Gateway::start(
        &t.gateway,
        &[
            "--listen",
            "10.77.1.1:21",
            "--upstream",
            "10.77.2.2:2121",
            "--upstream-mode",
            "active",
            "--active-ports",
            "45000-45099",
            "--ebpf",
            "required",
            "--interface",
            "g0",
            "--interface",
            "g1",
            "--metrics",
            "127.0.0.1:9121",
        ],
    );
    let spec = json!({"host": "10.77.1.1", "port": 21, "steps": [
        {"op": "connect"}, {"op": "login"},
        {"op": "list", "mode": "port"},
        {"op": "cmd", "line": "CWD pub"},
        {"op": "retr", "path": "readme.txt", "mode": "port"},
        {"op": "quit"}]});
    let results = ftp_driver(&t.client, &spec, &|| gateway.logs());
    let listing_size = results[2]["size"].as_u64().unwrap();
    assert!(
        results[2]["final"].as_str().unwrap().starts_with("226"),
        "{results:?}"
    );
    assert_eq!(results[4]["sha256"], sha256(&readme), "{results:?}");
    // Client and server are other hosts here: the default relay copies
    // (in chunks of at most 1 MiB; these small transfers never wait on
    // their receiver, so never turn to splicing).
    gateway.expect_logs("\"relay\":\"copy\"", 2);
    // Wait until the four data flows (two per leg) are reported closed.
    let mut doc = Value::Null;
    let mut seen = Vec::new();
    wait_until("four closed data flows", Duration::from_secs(15), || {
        let now = flows(&t.gateway);
        // /flows hands each closed flow out as long as it is kept: collect.
        doc = now;
        seen = doc["closed"].as_array().unwrap().clone();
        data_flows(&doc, "client_data").len() >= 2 && data_flows(&doc, "server_data").len() >= 2
    });
    assert_eq!(doc["ebpf"], "on");
    let client_legs = data_flows(&doc, "client_data");
    let server_legs = data_flows(&doc, "server_data");
    assert_eq!((client_legs.len(), server_legs.len()), (2, 2), "{doc:#}");
    // Client leg: the gateway connects from port 20 (as the server does in
    // the seed), sends the data, closes first.
    assert_seed_sequence(client_legs[0], "10.77.1.1:20", "gateway", listing_size);
    assert_seed_sequence(
        client_legs[1],
        "10.77.1.1:20",
        "gateway",
        readme.len() as u64,
    );
    // Server leg: vsftpd connects from its port 20 to the gateway, sends,
    // closes first.
    assert_seed_sequence(server_legs[0], "10.77.2.2:20", "server", listing_size);
    assert_seed_sequence(
        server_legs[1],
        "10.77.2.2:20",
        "server",
        readme.len() as u64,
    );
    // All four belong to the same session as the control connections.
    let session = client_legs[0]["session_id"].clone();
    assert!(session.is_u64());
    assert!(
        client_legs
            .iter()
            .chain(&server_legs)
            .all(|f| f["session_id"] == session)
    );
    // The control connections were tracked too.
    wait_until("closed control flows", Duration::from_secs(10), || {
        let d = flows(&t.gateway);
        data_flows(&d, "client_control").len() == 1 && data_flows(&d, "server_control").len() == 1
    });
    // And the operator's table shows them.
    let out = t
        .gateway
        .command(env!("CARGO_BIN_EXE_ftp-proxy"))
        .args(["flows", "--from", "127.0.0.1:9121"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && table.contains("client_data")
            && table.contains("server_data")
            && table.contains("10.77.1.1:20 ->"),
        "{table}"
    );
    drop(gateway);
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn a_thousand_short_sessions_are_all_counted() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::new(&[
        "--ebpf",
        "required",
        "--metrics",
        "127.0.0.1:9121",
        "--max-sessions-per-client",
        "2000",
    ]);
    // One session stays open through the churn.
    let mut held = lab.ns.connect(GATEWAY4.parse().unwrap()).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut banner = [0u8; 4];
    held.read_exact(&mut banner).unwrap();
    for i in 0..1000 {
        let mut s = lab.ns.connect(GATEWAY4.parse().unwrap()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut banner = [0u8; 4];
        s.read_exact(&mut banner).unwrap();
        assert_eq!(&banner, b"220 ", "session {i}");
        s.write_all(b"QUIT\r\n").unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
    }
    let metric = |text: &str, leg: &str, event: &str| -> u64 {
        let needle = format!("ftp_proxy_tcp_events_total{{event=\"{event}\",leg=\"{leg}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&needle))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    // Events are counted as they happen: the held session's handshakes
    // are in, its FINs not yet.
    let mut last = String::new();
    wait_until(
        "1,000 closed sessions and the held one in the metrics",
        Duration::from_secs(30),
        || {
            last = http_get(&lab.ns, "127.0.0.1:9121", "/metrics");
            ["client_control", "server_control"].iter().all(|leg| {
                metric(&last, leg, "established") >= 1001 && metric(&last, leg, "fin") >= 2000
            })
        },
    );
    for leg in ["client_control", "server_control"] {
        assert_eq!(metric(&last, leg, "syn"), 1001, "{leg}");
        assert_eq!(metric(&last, leg, "synack"), 1001, "{leg}");
        assert_eq!(metric(&last, leg, "established"), 1001, "{leg}");
        assert_eq!(metric(&last, leg, "fin"), 2000, "{leg}: both sides' FINs");
        assert_eq!(metric(&last, leg, "rst"), 0, "{leg}");
    }
    assert!(last.contains("ftp_proxy_ebpf_status 1"));
    // The live-flow gauges, read from the kernel's table at the scrape:
    // the held session's two connections; the 2,000 closed ones left it.
    let gauge = |text: &str, leg: &str, state: &str| -> Option<i64> {
        let needle = format!("ftp_proxy_tcp_flows{{leg=\"{leg}\",state=\"{state}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&needle))
            .and_then(|v| v.trim().parse().ok())
    };
    let text = http_get(&lab.ns, "127.0.0.1:9121", "/metrics");
    for leg in ["client_control", "server_control"] {
        assert_eq!(gauge(&text, leg, "established"), Some(1), "{leg}\n{text}");
        for state in ["closed", "reset", "syn_sent"] {
            assert_eq!(gauge(&text, leg, state).unwrap_or(0), 0, "{leg} {state}");
        }
    }
    let live = flows(&lab.ns)["flows"].as_array().unwrap().len();
    assert_eq!(live, 2, "the held session's two connections only");
    held.write_all(b"QUIT\r\n").unwrap();
    let mut rest = Vec::new();
    held.read_to_end(&mut rest).unwrap();
    drop(held);
    wait_until(
        "the held session's flows closed",
        Duration::from_secs(10),
        || {
            let text = http_get(&lab.ns, "127.0.0.1:9121", "/metrics");
            gauge(&text, "client_control", "established").unwrap_or(0) == 0
                && gauge(&text, "server_control", "established").unwrap_or(0) == 0
                && metric(&text, "client_control", "fin") == 2002
                && metric(&text, "server_control", "fin") == 2002
        },
    );
    let counters = flows(&lab.ns)["counters"].clone();
    for k in [
        "insert_enomem",
        "insert_e2big",
        "insert_other",
        "ringbuf_full",
        "parse_errors",
    ] {
        assert_eq!(counters[k], 0, "{k}: {counters}");
    }
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn nothing_is_left_after_sigterm_or_sigkill() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for signal in ["TERM", "KILL"] {
        let before = our_programs();
        let ns = NetNs::new();
        let mut gateway = Gateway::start(
            &ns,
            &[
                "--listen",
                GATEWAY4,
                "--upstream",
                SERVER4,
                "--ebpf",
                "required",
            ],
        );
        let mut ours = BTreeSet::new();
        wait_until("our programs loaded", Duration::from_secs(10), || {
            ours = our_programs().difference(&before).copied().collect();
            !ours.is_empty()
        });
        gateway.signal(signal);
        let status = gateway
            .wait(Duration::from_secs(30))
            .expect("gateway did not exit");
        if signal == "TERM" {
            assert_eq!(status.code(), Some(0), "{}", gateway.logs());
        }
        wait_until("our programs unloaded", Duration::from_secs(10), || {
            our_programs().is_disjoint(&ours)
        });
        let links: Vec<u32> = aya::programs::loaded_links()
            .filter_map(Result::ok)
            .filter(|l| ours.contains(&l.program_id()))
            .map(|l| l.id())
            .collect();
        assert!(links.is_empty(), "SIG{signal}: links left {links:?}");
        let out = Command::new("bpftool")
            .args(["prog", "show"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        for id in &ours {
            assert!(
                !text.contains(&format!("{id}: ")),
                "SIG{signal}: bpftool still lists program {id}:\n{text}"
            );
        }
        // No qdisc of ours either (tcx needs none).
        let qdisc = ns
            .command("tc")
            .args(["qdisc", "show", "dev", "lo"])
            .output()
            .unwrap();
        assert!(
            !String::from_utf8_lossy(&qdisc.stdout).contains("clsact"),
            "SIG{signal}"
        );
    }
}
