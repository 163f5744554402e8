//! The real programs and maps, driven with `BPF_PROG_TEST_RUN` on hand-built
//! frames: every transition of `ftp_proxy_common::transition` observed
//! through the kernel, both hooks, IPv4 and IPv6, and the parser's edges.
//! Needs root and the embedded eBPF object: the privileged tier
//! (`cargo xtask test`), ignored by a plain `cargo test`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use ftp_proxy_common::flow::tcp_flags::{ACK, FIN, PSH, RST, SYN};

use super::*;

/// The privileged tier's prerequisites: a missing one fails the test.
fn require() {
    assert!(
        FlowTracker::available(),
        "the eBPF object is not built into this binary (FTPX_EBPF_BUILD=require)"
    );
    assert!(rustix::process::geteuid().is_root(), "needs root (BPF)");
}

/// An Ethernet frame with an IPv4 or IPv6 header and a TCP header.
struct Frame {
    src: SocketAddr,
    dst: SocketAddr,
    flags: u8,
    seq: u32,
    ack: u32,
    payload: usize,
}

impl Frame {
    fn bytes(&self) -> Vec<u8> {
        let mut f = vec![0u8; 12]; // zero MACs, as on lo
        let tcp_len = 20 + self.payload;
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&0x0800u16.to_be_bytes());
                let tot = u16::try_from(20 + tcp_len).unwrap();
                f.extend_from_slice(&[0x45, 0]);
                f.extend_from_slice(&tot.to_be_bytes());
                f.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]); // DF, TTL, TCP
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&0x86ddu16.to_be_bytes());
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&u16::try_from(tcp_len).unwrap().to_be_bytes());
                f.extend_from_slice(&[6, 64]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
            }
            _ => panic!("mixed families"),
        }
        f.extend_from_slice(&self.src.port().to_be_bytes());
        f.extend_from_slice(&self.dst.port().to_be_bytes());
        f.extend_from_slice(&self.seq.to_be_bytes());
        f.extend_from_slice(&self.ack.to_be_bytes());
        f.extend_from_slice(&[5 << 4, self.flags, 0xff, 0xff, 0, 0, 0, 0]);
        f.extend(std::iter::repeat_n(0xabu8, self.payload));
        f
    }
}

#[derive(Clone, Copy)]
enum Hook {
    Ingress,
    Egress,
}

struct Harness {
    tracker: FlowTracker,
}

impl Harness {
    fn new(ports: &[u16]) -> Self {
        let opts = FlowtrackOptions {
            ports: ports.to_vec(),
            ..FlowtrackOptions::default()
        };
        Self {
            tracker: FlowTracker::start(&opts).expect("start the tracker (no interface)"),
        }
    }

    fn run(&self, hook: Hook, frame: &[u8]) {
        let mut ebpf = lock(&self.tracker.ebpf);
        let opts = || TestRunOptions {
            data_in: Some(frame),
            ..TestRunOptions::default()
        };
        match hook {
            Hook::Ingress => {
                let prog = program::<Xdp>(&mut ebpf, names::PROG_INGRESS).unwrap();
                let r = prog.test_run(opts()).unwrap();
                assert_eq!(r.return_value, 2, "XDP_PASS");
            }
            Hook::Egress => {
                let prog = program::<SchedClassifier>(&mut ebpf, names::PROG_EGRESS).unwrap();
                let r = prog.test_run(opts()).unwrap();
                assert_eq!(r.return_value, u32::MAX, "TCX_NEXT (-1)");
            }
        }
    }

    fn flows(&self) -> Vec<FlowRecord> {
        self.tracker.snapshot().unwrap()
    }

    fn only_flow(&self) -> FlowRecord {
        let flows = self.flows();
        assert_eq!(flows.len(), 1, "{flows:#?}");
        flows[0]
    }
}

/// One side of a conversation: sends with its own sequence numbers and
/// acknowledges what the other side sent.
struct Peer {
    addr: SocketAddr,
    snd: u32,
}

fn send(h: &Harness, hook: Hook, from: &mut Peer, to: &Peer, flags: u8, payload: usize) {
    let frame = Frame {
        src: from.addr,
        dst: to.addr,
        flags,
        seq: from.snd,
        ack: to.snd,
        payload,
    };
    h.run(hook, &frame.bytes());
    let consumed = u32::try_from(payload).unwrap() + u32::from(flags & (SYN | FIN) != 0);
    from.snd = from.snd.wrapping_add(consumed);
}

/// The seed's RETR data connection (active mode: the FTP server at port 20
/// is the TCP client), every segment through the real programs, alternating
/// hooks, and each transition read back from the flow table.
fn seed_retr(server: SocketAddr, client: SocketAddr) {
    require();
    let h = Harness::new(&[20]);
    let mut srv = Peer {
        addr: server,
        snd: 1000,
    };
    let mut cli = Peer {
        addr: client,
        snd: 0xffff_fff0,
    };
    use Hook::{Egress as E, Ingress as I};

    send(&h, E, &mut srv, &cli, SYN, 0);
    let f = h.only_flow();
    assert_eq!(f.state, FlowState::SynSent);
    assert_eq!((f.client, f.server), (server, client)); // TCP client = FTP server
    assert!(f.times.first_syn.is_some());

    send(&h, I, &mut cli, &srv, SYN | ACK, 0);
    assert_eq!(h.only_flow().state, FlowState::SynReceived);
    send(&h, E, &mut srv, &cli, ACK, 0);
    let f = h.only_flow();
    assert_eq!(f.state, FlowState::Established);
    assert!(f.times.established >= f.times.syn_ack);

    send(&h, E, &mut srv, &cli, ACK | PSH, 1448);
    send(&h, E, &mut srv, &cli, ACK | PSH, 1448);
    send(&h, I, &mut cli, &srv, ACK, 0);
    send(&h, E, &mut srv, &cli, ACK | PSH | FIN, 500);
    let f = h.only_flow();
    assert_eq!(f.state, FlowState::FinWait);
    assert_eq!(f.first_fin, Some(Side::Client));
    assert!(f.from_client.fin && !f.from_client.fin_acked);

    send(&h, I, &mut cli, &srv, ACK, 0);
    assert!(h.only_flow().from_client.fin_acked);
    send(&h, I, &mut cli, &srv, ACK | FIN, 0);
    assert_eq!(h.only_flow().state, FlowState::Closing);
    assert!(h.tracker.closed().is_empty());
    send(&h, E, &mut srv, &cli, ACK, 0);

    // Closed: the entry left the table, its record is in the ring buffer.
    assert!(h.flows().is_empty(), "{:#?}", h.flows());
    let closed = h.tracker.closed();
    assert_eq!(closed.len(), 1, "{closed:#?}");
    let f = closed[0];
    assert_eq!(f.state, FlowState::Closed);
    assert_eq!(f.from_client.bytes, 1448 * 2 + 500);
    assert_eq!(f.from_client.packets, 6);
    assert_eq!(f.from_server.bytes, 0);
    assert_eq!(f.from_server.packets, 4);
    assert_eq!(f.from_client.tcp_flags, SYN | ACK | PSH | FIN);
    assert!(f.times.closed >= f.times.first_fin);

    let c = h.tracker.counters().unwrap();
    assert_eq!(
        (c.syn, c.synack, c.established, c.fin, c.rst, c.closed),
        (1, 1, 1, 2, 0, 1)
    );
    assert_eq!(c.packets, 10);
    assert_eq!(c.parse_errors, 0);
    assert_eq!(c.untracked, 0);
    assert_eq!(c.ringbuf_full, 0);
}

#[tokio::test]
#[ignore = "privileged tier (root, the eBPF object): cargo xtask test runs it"]
async fn seed_retr_ipv4() {
    seed_retr(
        "10.0.0.1:20".parse().unwrap(),
        "10.0.0.2:5002".parse().unwrap(),
    );
}

#[tokio::test]
#[ignore = "privileged tier (root, the eBPF object): cargo xtask test runs it"]
async fn seed_retr_ipv6() {
    // Here the FTP server is the higher address: endpoint b.
    seed_retr(
        "[2001:db8::9]:20".parse().unwrap(),
        "[2001:db8::2]:5002".parse().unwrap(),
    );
}

#[tokio::test]
#[ignore = "privileged tier (root, the eBPF object): cargo xtask test runs it"]
async fn rst_before_and_after_the_handshake_and_port_reuse() {
    require();
    let h = Harness::new(&[2121]);
    let mut cli = Peer {
        addr: "127.0.0.1:40000".parse().unwrap(),
        snd: 7,
    };
    let mut srv = Peer {
        addr: "127.0.0.1:2121".parse().unwrap(),
        snd: 900,
    };
    // Refused: SYN, RST+ACK.
    send(&h, Hook::Egress, &mut cli, &srv, SYN, 0);
    send(&h, Hook::Egress, &mut srv, &cli, RST | ACK, 0);
    assert!(h.flows().is_empty());
    let f = h.tracker.closed()[0];
    assert_eq!(f.state, FlowState::Reset);
    assert_eq!(f.reset_by, Some(Side::Server));
    assert_eq!(f.times.established, None);
    // Whatever follows the end finds no entry.
    send(&h, Hook::Egress, &mut srv, &cli, RST | ACK, 0);
    assert!(h.flows().is_empty());
    assert_eq!(h.tracker.counters().unwrap().untracked, 1);

    // Same 5-tuple again: a fresh flow, then aborted by the client.
    send(&h, Hook::Egress, &mut cli, &srv, SYN, 0);
    let f = h.only_flow();
    assert_eq!(f.state, FlowState::SynSent);
    assert_eq!(
        f.from_client.packets, 1,
        "nothing of the first connection: {f:#?}"
    );
    send(&h, Hook::Ingress, &mut srv, &cli, SYN | ACK, 0);
    send(&h, Hook::Egress, &mut cli, &srv, ACK, 0);
    send(&h, Hook::Egress, &mut cli, &srv, ACK | PSH, 10);
    send(&h, Hook::Egress, &mut cli, &srv, RST, 0);
    assert!(h.flows().is_empty());
    let f = *h.tracker.closed().last().unwrap();
    assert_eq!(f.state, FlowState::Reset);
    assert_eq!(f.reset_by, Some(Side::Client));
    assert_eq!(f.from_client.bytes, 10);
    assert!(f.times.established.is_some());

    let closed = h.tracker.closed();
    assert_eq!(closed.len(), 2);
    assert_eq!(closed[0].reset_by, Some(Side::Server));
    assert_eq!(closed[1], f);
    let c = h.tracker.counters().unwrap();
    // A restart (a SYN on a closed entry) needs a closed entry: none is
    // left since the datapath deletes them.
    assert_eq!((c.syn, c.restarts, c.rst, c.closed), (2, 0, 2, 2));
}

#[tokio::test]
#[ignore = "privileged tier (root, the eBPF object): cargo xtask test runs it"]
async fn syn_retransmission_and_simultaneous_close() {
    require();
    let h = Harness::new(&[21]);
    let mut a = Peer {
        addr: "192.0.2.1:21".parse().unwrap(),
        snd: 50,
    };
    let mut b = Peer {
        addr: "192.0.2.7:33333".parse().unwrap(),
        snd: 70,
    };
    send(&h, Hook::Ingress, &mut b, &a, SYN, 0);
    b.snd -= 1;
    send(&h, Hook::Ingress, &mut b, &a, SYN, 0);
    assert_eq!(h.tracker.counters().unwrap().syn_retransmits, 1);
    send(&h, Hook::Egress, &mut a, &b, SYN | ACK, 0);
    send(&h, Hook::Ingress, &mut b, &a, ACK, 0);
    // FINs cross: neither acknowledges the other's.
    let (a_ack, b_ack) = (b.snd, a.snd);
    let fin_a = Frame {
        src: a.addr,
        dst: b.addr,
        flags: ACK | FIN,
        seq: a.snd,
        ack: a_ack,
        payload: 0,
    };
    let fin_b = Frame {
        src: b.addr,
        dst: a.addr,
        flags: ACK | FIN,
        seq: b.snd,
        ack: b_ack,
        payload: 0,
    };
    h.run(Hook::Egress, &fin_a.bytes());
    h.run(Hook::Ingress, &fin_b.bytes());
    a.snd += 1;
    b.snd += 1;
    assert_eq!(h.only_flow().state, FlowState::Closing);
    assert_eq!(h.only_flow().first_fin, Some(Side::Server));
    send(&h, Hook::Egress, &mut a, &b, ACK, 0);
    send(&h, Hook::Ingress, &mut b, &a, ACK, 0);
    assert!(h.flows().is_empty());
    let closed = h.tracker.closed();
    assert_eq!(closed.len(), 1);
    assert_eq!(closed[0].state, FlowState::Closed);
}

/// A quiet live flow (an idle control connection) must survive any churn
/// of short flows: closed flows leave the LRU table as they close, so they
/// never push it out. Twice the table's size of refused connections (SYN,
/// RST+ACK) goes through the programs.
#[tokio::test]
#[ignore = "privileged tier (root, the eBPF object): cargo xtask test runs it"]
async fn closed_flows_never_evict_a_quiet_live_flow() {
    require();
    let h = Harness::new(&[21]);
    let mut idle = Peer {
        addr: "10.3.0.1:40000".parse().unwrap(),
        snd: 1,
    };
    let mut srv = Peer {
        addr: "10.3.0.2:21".parse().unwrap(),
        snd: 1,
    };
    send(&h, Hook::Egress, &mut idle, &srv, SYN, 0);
    send(&h, Hook::Ingress, &mut srv, &idle, SYN | ACK, 0);
    send(&h, Hook::Egress, &mut idle, &srv, ACK, 0);
    let churn = 2 * names::FLOWS_MAX_ENTRIES;
    for i in 0..churn {
        let [hi, lo] = u16::try_from(i / 50_000).unwrap().to_be_bytes();
        let port = 1024 + u16::try_from(i % 50_000).unwrap();
        let mut cli = Peer {
            addr: SocketAddr::new(IpAddr::from([10, 4, hi, lo]), port),
            snd: 7,
        };
        send(&h, Hook::Ingress, &mut cli, &srv, SYN, 0);
        send(&h, Hook::Egress, &mut srv, &cli, RST | ACK, 0);
        if i % 1000 == 999 {
            // Keep the ring buffer from filling (the drain task runs only
            // every 100 ms).
            let _ = h.tracker.take_closed();
        }
    }
    let flows = h.flows();
    let quiet = flows.iter().find(|f| f.client == idle.addr);
    assert_eq!(
        quiet.map(|f| f.state),
        Some(FlowState::Established),
        "the quiet flow was evicted"
    );
    assert_eq!(flows.len(), 1, "closed flows left in the table");
    let c = h.tracker.counters().unwrap();
    assert_eq!((c.closed, c.rst), (u64::from(churn), u64::from(churn)));
    assert_eq!((c.insert_enomem, c.insert_other, c.ringbuf_full), (0, 0, 0));
}

#[tokio::test]
#[ignore = "privileged tier (root, the eBPF object): cargo xtask test runs it"]
async fn unwatched_untracked_malformed_and_other_traffic() {
    require();
    let h = Harness::new(&[21]);
    let seg = |src: &str, dst: &str, flags| Frame {
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        flags,
        seq: 1,
        ack: 1,
        payload: 0,
    };
    // Neither port watched: invisible.
    h.run(
        Hook::Egress,
        &seg("10.0.0.1:80", "10.0.0.2:4000", SYN).bytes(),
    );
    // Watched, but not a SYN: no flow, counted as untracked.
    h.run(
        Hook::Egress,
        &seg("10.0.0.1:21", "10.0.0.2:4000", ACK).bytes(),
    );
    assert!(h.flows().is_empty());
    let c = h.tracker.counters().unwrap();
    assert_eq!((c.syn, c.untracked, c.packets), (0, 1, 0));

    // IHL 4: malformed, counted, passed.
    let mut bad = seg("10.0.0.1:21", "10.0.0.2:4000", SYN).bytes();
    bad[14] = 0x44;
    h.run(Hook::Ingress, &bad);
    h.run(Hook::Egress, &bad);
    // TCP data offset 4.
    let mut bad = seg("10.0.0.1:21", "10.0.0.2:4000", SYN).bytes();
    bad[14 + 20 + 12] = 4 << 4;
    h.run(Hook::Ingress, &bad);
    // Truncated TCP header.
    let good = seg("10.0.0.1:21", "10.0.0.2:4000", SYN).bytes();
    h.run(Hook::Ingress, &good[..40]);
    assert_eq!(h.tracker.counters().unwrap().parse_errors, 4);

    // UDP, ARP (also cut after the Ethernet header): not ours, not errors.
    // (test_run refuses TC input of only an Ethernet header.)
    let mut udp = good.clone();
    udp[14 + 9] = 17;
    h.run(Hook::Ingress, &udp);
    let mut arp = good.clone();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    h.run(Hook::Ingress, &arp);
    h.run(Hook::Ingress, &arp[..14]);
    // A fragment (MF set).
    let mut frag = good.clone();
    frag[14 + 6] = 0x20;
    h.run(Hook::Ingress, &frag);
    assert!(h.flows().is_empty());
    assert_eq!(h.tracker.counters().unwrap().parse_errors, 4);

    // Watching at run time.
    h.run(
        Hook::Egress,
        &seg("10.0.0.1:4000", "10.0.0.2:8080", SYN).bytes(),
    );
    assert!(h.flows().is_empty());
    h.tracker.watch_port(8080).unwrap();
    h.run(
        Hook::Egress,
        &seg("10.0.0.1:4001", "10.0.0.2:8080", SYN).bytes(),
    );
    assert_eq!(h.only_flow().server.port(), 8080);
    h.tracker.unwatch_port(8080).unwrap();
    h.tracker.unwatch_port(8080).unwrap(); // not an error
    h.run(
        Hook::Egress,
        &seg("10.0.0.1:4002", "10.0.0.2:8080", SYN).bytes(),
    );
    assert_eq!(h.flows().len(), 1);
}

#[tokio::test]
#[ignore = "privileged tier (root, the eBPF object): cargo xtask test runs it"]
async fn sweeper_expires_by_state() {
    require();
    let h = Harness::new(&[21]);
    let mut cli = Peer {
        addr: "10.1.1.1:5555".parse().unwrap(),
        snd: 1,
    };
    let srv = Peer {
        addr: "10.1.1.2:21".parse().unwrap(),
        snd: 1,
    };
    send(&h, Hook::Egress, &mut cli, &srv, SYN, 0);
    let keep = FlowtrackOptions::default();
    assert_eq!(h.tracker.sweep_now(&keep).unwrap(), 0);
    let short = FlowtrackOptions {
        syn_timeout: Duration::ZERO,
        ..FlowtrackOptions::default()
    };
    std::thread::sleep(Duration::from_millis(2));
    assert_eq!(h.tracker.sweep_now(&short).unwrap(), 1);
    assert!(h.flows().is_empty());
    assert_eq!(h.tracker.counters().unwrap().swept, 1);
}

#[test]
fn expiry_limits_by_state() {
    let t = Timeouts {
        syn: Duration::from_secs(60),
        closed: Duration::from_secs(10),
        established: Duration::from_secs(3600),
    };
    let at = |state, last_seen_s: u64| {
        let mut v = FlowValue::EMPTY;
        v.state = state;
        v.last_seen_ns = last_seen_s * 1_000_000_000;
        v
    };
    let now = Duration::from_secs(10_000);
    assert!(!t.expired(&at(state::SYN_SENT, 9_941), now));
    assert!(t.expired(&at(state::SYN_RECEIVED, 9_939), now));
    assert!(!t.expired(&at(state::CLOSED, 9_991), now));
    assert!(t.expired(&at(state::RESET, 9_989), now));
    assert!(!t.expired(&at(state::ESTABLISHED, 6_401), now));
    assert!(t.expired(&at(state::FIN_WAIT, 6_399), now));
}

#[tokio::test]
async fn modes() {
    let none = FlowtrackOptions {
        interfaces: vec!["no-such-if0".into()],
        ..FlowtrackOptions::default()
    };
    assert!(matches!(
        FlowTracker::start_with_mode(EbpfMode::Off, &none),
        Ok(None)
    ));
    // Auto degrades to "no tracker" whatever the reason (here: no such
    // interface, or not root, or not built in).
    assert!(matches!(
        FlowTracker::start_with_mode(EbpfMode::Auto, &none),
        Ok(None)
    ));
    assert!(FlowTracker::start_with_mode(EbpfMode::Required, &none).is_err());
}

#[test]
fn tracker_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<FlowTracker>();
}

/// The programs' aya-log records come out as tracing events (target
/// `ftp_proxy::flowtrack::ebpf`), with the level taken from tracing.
#[test]
#[ignore = "privileged tier (root, the eBPF object): cargo xtask test runs it"]
fn ebpf_logs_reach_tracing() {
    require();
    use std::io::Write;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        // No background task: this thread flushes the logs itself, so the
        // records meet this thread's subscriber.
        let tracker = FlowTracker::load(&FlowtrackOptions {
            ports: vec![21],
            ..FlowtrackOptions::default()
        })
        .unwrap();
        let mut ebpf = lock(&tracker.ebpf);
        let mut logger = aya_log::EbpfLogger::init_with_logger(&mut ebpf, TracingLog).unwrap();
        let syn = Frame {
            src: "10.9.9.9:40000".parse().unwrap(),
            dst: "10.9.9.1:21".parse().unwrap(),
            flags: SYN,
            seq: 1,
            ack: 0,
            payload: 0,
        }
        .bytes();
        program::<Xdp>(&mut ebpf, names::PROG_INGRESS)
            .unwrap()
            .test_run(TestRunOptions {
                data_in: Some(&syn),
                ..TestRunOptions::default()
            })
            .unwrap();
        logger.flush();
    });
    let out = String::from_utf8(lock(&buf.0).clone()).unwrap();
    assert!(
        out.contains("ftp_proxy::flowtrack::ebpf") && out.contains("flow opened: port 21 -> 40000"),
        "{out}"
    );
}
