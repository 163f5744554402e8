//! The real programs and maps, driven with `BPF_PROG_TEST_RUN` on hand-built
//! frames: every transition of `ftp_proxy_common::transition` observed
//! through the kernel, both hooks, IPv4 and IPv6, and the parser's edges;
//! and the guard's verdicts (match, wrong peer, expired, one-shot, also
//! under concurrent SYNs, IPv6, observe and off, forwarded traffic).
//! Needs root and the embedded eBPF object: the privileged tier
//! (`cargo xtask test`), ignored by a plain `cargo test`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use ftp_proxy_common::flow::tcp_flags::{ACK, FIN, PSH, RST, SYN};

use super::*;

/// The privileged tier's prerequisites: a missing one fails the test.
pub(crate) fn require() {
    assert!(
        FlowTracker::available(),
        "the eBPF object is not built into this binary (FTPX_EBPF_BUILD=require)"
    );
    assert!(rustix::process::geteuid().is_root(), "needs root (BPF)");
}

/// An Ethernet frame with an IPv4 or IPv6 header and a TCP header.
pub(crate) struct Frame {
    pub(crate) src: SocketAddr,
    pub(crate) dst: SocketAddr,
    pub(crate) flags: u8,
    pub(crate) seq: u32,
    pub(crate) ack: u32,
    pub(crate) payload: usize,
}

impl Frame {
    /// A bare SYN from `src` to `dst`.
    pub(crate) fn syn(src: &str, dst: &str) -> Frame {
        Frame {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            flags: SYN,
            seq: 1,
            ack: 0,
            payload: 0,
        }
    }

    pub(crate) fn bytes(&self) -> Vec<u8> {
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

/// XDP verdicts.
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// tcx verdicts of the ingress classifier.
const TCX_NEXT: u32 = u32::MAX; // -1
const TCX_DROP: u32 = 2;

impl FlowTracker {
    /// Runs the ingress program of the tracker's hook on `frame`
    /// (`BPF_PROG_TEST_RUN`); its verdict as XDP's (the classifier's
    /// `TCX_NEXT` is `XDP_PASS`, its `TCX_DROP` `XDP_DROP`), so that the
    /// same tests judge either hook.
    pub(crate) fn test_run_ingress(&self, frame: &[u8]) -> u32 {
        let mut ebpf = lock(&self.ebpf);
        let opts = TestRunOptions {
            data_in: Some(frame),
            ..TestRunOptions::default()
        };
        match self.ingress {
            IngressHook::Xdp => {
                program::<Xdp>(&mut ebpf, names::PROG_INGRESS)
                    .unwrap()
                    .test_run(opts)
                    .unwrap()
                    .return_value
            }
            IngressHook::Tc => {
                let verdict = program::<SchedClassifier>(&mut ebpf, names::PROG_INGRESS_TC)
                    .unwrap()
                    .test_run(opts)
                    .unwrap()
                    .return_value;
                match verdict {
                    TCX_NEXT => XDP_PASS,
                    TCX_DROP => XDP_DROP,
                    other => panic!("unexpected tcx verdict {other}"),
                }
            }
        }
    }
}

/// The guard through the real XDP program: one data port of the client
/// leg guarded, an expectation, and SYNs from everyone.
mod guard {
    use super::*;
    use ftp_proxy_common::maps::port;

    const GATEWAY: &str = "10.0.0.1";
    const CLIENT: &str = "10.0.0.2";
    const THIEF: &str = "10.0.0.66";

    fn tracker(mode: GuardMode) -> FlowTracker {
        tracker_on(mode, IngressHook::default())
    }

    fn tracker_on(mode: GuardMode, ingress: IngressHook) -> FlowTracker {
        require();
        let t = FlowTracker::start(&FlowtrackOptions {
            ingress,
            ..FlowtrackOptions::default()
        })
        .unwrap();
        t.set_guard_mode(mode).unwrap();
        t
    }

    fn expect(t: &FlowTracker, local: &str, peer: &str, ttl: Duration, leg: GuardLeg) {
        let local: SocketAddr = local.parse().unwrap();
        t.set_port(local.port(), port::WATCHED | leg.port_flag())
            .unwrap();
        t.add_local_address(local.ip()).unwrap();
        t.expect(&Expectation {
            local,
            peer: peer.parse().unwrap(),
            deadline: monotonic_now() + ttl,
            session_id: 9,
            leg,
        })
        .unwrap();
    }

    fn syn(t: &FlowTracker, src: &str, dst: &str) -> u32 {
        t.test_run_ingress(&Frame::syn(src, dst).bytes())
    }

    fn count(t: &FlowTracker, outcome: GuardOutcome, leg: GuardLeg) -> u64 {
        t.counters().unwrap().guard.get(outcome, leg)
    }

    #[tokio::test]
    #[ignore = "privileged tier (root, the eBPF object): cargo xtask test runs it"]
    async fn the_expected_peer_is_admitted_once() {
        admitted_once(IngressHook::Tc);
    }

    /// The same verdicts from the XDP program (`--ebpf-ingress xdp`).
    #[tokio::test]
    #[ignore = "privileged tier (root, the eBPF object): cargo xtask test runs it"]
    async fn the_expected_peer_is_admitted_once_through_xdp() {
        admitted_once(IngressHook::Xdp);
    }

    fn admitted_once(hook: IngressHook) {
        let t = tracker_on(GuardMode::Enforce, hook);
        let data = format!("{GATEWAY}:50000");
        expect(&t, &data, CLIENT, Duration::from_secs(30), GuardLeg::Client);
        // A thief first: dropped, and it opens no flow.
        assert_eq!(syn(&t, &format!("{THIEF}:41000"), &data), XDP_DROP);
        assert!(t.snapshot().unwrap().is_empty());
        assert_eq!(count(&t, GuardOutcome::WrongPeer, GuardLeg::Client), 1);
        // The client: admitted, claims the expectation, opens its flow.
        assert_eq!(syn(&t, &format!("{CLIENT}:42000"), &data), XDP_PASS);
        assert_eq!(count(&t, GuardOutcome::Admitted, GuardLeg::Client), 1);
        let e = t.expectations().unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].claimed_by, e[0].session_id), (Some(42_000), 9));
        assert_eq!(t.snapshot().unwrap().len(), 1);
        // Its retransmitted SYN passes; a second connection does not.
        assert_eq!(syn(&t, &format!("{CLIENT}:42000"), &data), XDP_PASS);
        assert_eq!(count(&t, GuardOutcome::Retransmit, GuardLeg::Client), 1);
        assert_eq!(syn(&t, &format!("{CLIENT}:42001"), &data), XDP_DROP);
        assert_eq!(count(&t, GuardOutcome::Consumed, GuardLeg::Client), 1);
        // The thief again, after the claim: still the wrong peer.
        assert_eq!(syn(&t, &format!("{THIEF}:41001"), &data), XDP_DROP);
        assert_eq!(count(&t, GuardOutcome::WrongPeer, GuardLeg::Client), 2);
        // Segments that are not a bare SYN are never judged.
        let ack = Frame {
            flags: ACK,
            ..Frame::syn(&format!("{THIEF}:41000"), &data)
        };
        assert_eq!(t.test_run_ingress(&ack.bytes()), XDP_PASS);
        let synack = Frame {
            flags: SYN | ACK,
            ..Frame::syn(&format!("{THIEF}:41000"), &data)
        };
        assert_eq!(t.test_run_ingress(&synack.bytes()), XDP_PASS);
        // Removed: nothing expected any more on the guarded port.
        t.unexpect(data.parse().unwrap()).unwrap();
        t.unexpect(data.parse().unwrap()).unwrap(); // not an error
        assert_eq!(syn(&t, &format!("{CLIENT}:42002"), &data), XDP_DROP);
        assert_eq!(count(&t, GuardOutcome::NoExpectation, GuardLeg::Client), 1);
        assert_eq!(count(&t, GuardOutcome::Admitted, GuardLeg::Server), 0);
    }

    #[tokio::test]
    #[ignore = "privileged tier (root, the eBPF object): cargo xtask test runs it"]
    async fn expired_expectations_are_refused_and_swept() {
        let t = tracker(GuardMode::Enforce);
        let data = format!("{GATEWAY}:50001");
        expect(&t, &data, CLIENT, Duration::ZERO, GuardLeg::Server);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(syn(&t, &format!("{CLIENT}:42000"), &data), XDP_DROP);
        assert_eq!(count(&t, GuardOutcome::Expired, GuardLeg::Server), 1);
        assert_eq!(t.expectations().unwrap()[0].claimed_by, None);
        assert_eq!(t.sweep_expectations_now().unwrap(), 1);
        assert!(t.expectations().unwrap().is_empty());
        assert_eq!(t.counters().unwrap().expectations_swept, 1);
        assert_eq!(syn(&t, &format!("{CLIENT}:42000"), &data), XDP_DROP);
        assert_eq!(count(&t, GuardOutcome::NoExpectation, GuardLeg::Server), 1);
    }

    #[tokio::test]
    #[ignore = "privileged tier (root, the eBPF object): cargo xtask test runs it"]
    async fn ipv6() {
        let t = tracker(GuardMode::Enforce);
        let data = "[2001:db8::1]:50002";
        expect(
            &t,
            data,
            "2001:db8::2",
            Duration::from_secs(30),
            GuardLeg::Client,
        );
        assert_eq!(syn(&t, "[2001:db8::66]:41000", data), XDP_DROP);
        assert_eq!(syn(&t, "[2001:db8::2]:42000", data), XDP_PASS);
        assert_eq!(syn(&t, "[2001:db8::2]:42001", data), XDP_DROP);
        // The same address as IPv4-mapped on an IPv4 listener is another
        // key: an IPv4 SYN to the same port has no expectation.
        t.add_local_address("10.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(syn(&t, "10.0.0.2:42000", "10.0.0.1:50002"), XDP_DROP);
        let g = t.counters().unwrap().guard;
        assert_eq!(g.get(GuardOutcome::WrongPeer, GuardLeg::Client), 1);
        assert_eq!(g.get(GuardOutcome::Admitted, GuardLeg::Client), 1);
        assert_eq!(g.get(GuardOutcome::Consumed, GuardLeg::Client), 1);
        assert_eq!(g.get(GuardOutcome::NoExpectation, GuardLeg::Client), 1);
        let e = t.expectations().unwrap();
        assert_eq!(e[0].local, data.parse().unwrap());
        assert_eq!(e[0].peer, "2001:db8::2".parse::<IpAddr>().unwrap());
    }

    #[tokio::test]
    #[ignore = "privileged tier (root, the eBPF object): cargo xtask test runs it"]
    async fn observe_counts_off_ignores_and_forwarded_traffic_passes() {
        let t = tracker(GuardMode::Observe);
        let data = format!("{GATEWAY}:50003");
        expect(&t, &data, CLIENT, Duration::from_secs(30), GuardLeg::Client);
        // Observe: counted, passed, and the thief's flow is tracked.
        assert_eq!(syn(&t, &format!("{THIEF}:41000"), &data), XDP_PASS);
        assert_eq!(count(&t, GuardOutcome::WrongPeer, GuardLeg::Client), 1);
        assert_eq!(t.snapshot().unwrap().len(), 1);
        assert_eq!(syn(&t, &format!("{CLIENT}:42000"), &data), XDP_PASS);
        assert_eq!(count(&t, GuardOutcome::Admitted, GuardLeg::Client), 1);
        // A guarded port of an address that is not the gateway's:
        // forwarded traffic, never judged.
        assert_eq!(
            syn(&t, &format!("{THIEF}:41000"), "192.0.2.9:50003"),
            XDP_PASS
        );
        t.set_guard_mode(GuardMode::Enforce).unwrap();
        assert_eq!(
            syn(&t, &format!("{THIEF}:41001"), "192.0.2.9:50003"),
            XDP_PASS
        );
        assert_eq!(syn(&t, &format!("{THIEF}:41002"), &data), XDP_DROP);
        // Off: nothing judged, nothing counted.
        t.set_guard_mode(GuardMode::Off).unwrap();
        let before = t.counters().unwrap().guard;
        assert_eq!(syn(&t, &format!("{THIEF}:41003"), &data), XDP_PASS);
        assert_eq!(t.counters().unwrap().guard, before);
        // A port without a guard bit is not judged either.
        t.set_guard_mode(GuardMode::Enforce).unwrap();
        t.set_port(50_003, port::WATCHED).unwrap();
        assert_eq!(syn(&t, &format!("{THIEF}:41004"), &data), XDP_PASS);
        assert_eq!(t.port_flags(50_003).unwrap(), port::WATCHED);
        t.set_port(50_003, 0).unwrap();
        assert_eq!(t.port_flags(50_003).unwrap(), 0);
    }

    /// One-shot under concurrent SYNs: every round, a fresh expectation
    /// and as many threads as CPUs (at least 4) released at once, each
    /// sending a SYN of its own source port through the real program.
    /// Exactly one is admitted per round.
    #[tokio::test]
    #[ignore = "privileged tier (root, the eBPF object): cargo xtask test runs it"]
    async fn one_shot_under_concurrent_syns() {
        let t = tracker(GuardMode::Enforce);
        let data = format!("{GATEWAY}:50004");
        let local: SocketAddr = data.parse().unwrap();
        let threads = std::thread::available_parallelism()
            .map_or(4, usize::from)
            .max(4);
        let rounds = 500;
        let frames: Vec<Vec<u8>> = (0..threads)
            .map(|i| Frame::syn(&format!("{CLIENT}:{}", 43_000 + i), &data).bytes())
            .collect();
        let ebpf = lock(&t.ebpf);
        let prog: &Xdp = ebpf
            .program(names::PROG_INGRESS)
            .unwrap()
            .try_into()
            .unwrap();
        let barrier = std::sync::Barrier::new(threads);
        let mut claimants = Vec::new();
        for _ in 0..rounds {
            expect(&t, &data, CLIENT, Duration::from_secs(30), GuardLeg::Client);
            let passed: usize = std::thread::scope(|s| {
                let handles: Vec<_> = frames
                    .iter()
                    .map(|frame| {
                        let barrier = &barrier;
                        s.spawn(move || {
                            barrier.wait();
                            let r = prog
                                .test_run(TestRunOptions {
                                    data_in: Some(frame),
                                    ..TestRunOptions::default()
                                })
                                .unwrap();
                            usize::from(r.return_value == XDP_PASS)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).sum()
            });
            assert_eq!(passed, 1, "exactly one SYN admitted per expectation");
            let e = t.expectations().unwrap();
            let e = e.iter().find(|e| e.local == local).unwrap();
            claimants.push(e.claimed_by.unwrap());
        }
        drop(ebpf);
        let g = t.counters().unwrap().guard;
        assert_eq!(g.get(GuardOutcome::Admitted, GuardLeg::Client), rounds);
        assert_eq!(
            g.get(GuardOutcome::Consumed, GuardLeg::Client),
            rounds * (threads as u64 - 1)
        );
        // Different threads won: the race was real.
        claimants.sort_unstable();
        claimants.dedup();
        assert!(
            claimants.len() > 1,
            "one thread won every round: {claimants:?}"
        );
    }

    #[tokio::test]
    #[ignore = "privileged tier (root, the eBPF object): cargo xtask test runs it"]
    async fn a_full_map_is_an_error_the_caller_can_tell() {
        require();
        let t = FlowTracker::start(&FlowtrackOptions {
            max_expectations: 1,
            ..FlowtrackOptions::default()
        })
        .unwrap();
        expect(
            &t,
            "10.0.0.1:50005",
            CLIENT,
            Duration::from_secs(30),
            GuardLeg::Client,
        );
        let err = t
            .expect(&Expectation {
                local: "10.0.0.1:50006".parse().unwrap(),
                peer: CLIENT.parse().unwrap(),
                deadline: monotonic_now() + Duration::from_secs(30),
                session_id: 1,
                leg: GuardLeg::Client,
            })
            .unwrap_err();
        assert!(err.is_map_full(), "{err:?}");
        // Replacing the existing key still works.
        expect(
            &t,
            "10.0.0.1:50005",
            THIEF,
            Duration::from_secs(30),
            GuardLeg::Client,
        );
        assert_eq!(
            t.expectations().unwrap()[0].peer,
            THIEF.parse::<IpAddr>().unwrap()
        );
    }
}
