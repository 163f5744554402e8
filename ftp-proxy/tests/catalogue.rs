//! The bad-input catalogue of SECURITY.md, as a table: each case, the reply
//! the gateway gives, and whether the session goes on. A witness session
//! stays open through every case and must keep working. Runs in a network
//! namespace with nothing but loopback, so third-party addresses are never
//! reachable even through a bug.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::*;

/// What happens to the session after the case.
#[derive(Debug, Clone, Copy, PartialEq)]
enum After {
    Continues,
    Closed,
}

struct Case {
    name: &'static str,
    send: Vec<u8>,
    reply: &'static str,
    after: After,
}

fn case(name: &'static str, send: &[u8], reply: &'static str, after: After) -> Case {
    Case {
        name,
        send: send.to_vec(),
        reply,
        after,
    }
}

fn client_cases() -> Vec<Case> {
    use After::*;
    let mut overlong = b"RETR ".to_vec();
    overlong.extend(std::iter::repeat_n(b'x', 100_000));
    overlong.extend_from_slice(b"\r\n");
    vec![
        case("overlong line (100,000 bytes)", &overlong, "500", Continues),
        case("NUL byte in a command", b"CWD a\0b\r\n", "501", Continues),
        case(
            "bare CR inside a command",
            b"CWD a\rDELE b\r\n",
            "501",
            Continues,
        ),
        case(
            "CR NUL inside a command",
            b"CWD a\r\0b\r\n",
            "501",
            Continues,
        ),
        case("empty line", b"\r\n", "500", Continues),
        case(
            "verb longer than 4 letters",
            b"RETRIEVE x\r\n",
            "500",
            Continues,
        ),
        case("verb with digits", b"R3TR x\r\n", "500", Continues),
        case(
            "non-UTF-8 argument (passed on)",
            b"CWD \xff\xfe\xe9\r\n",
            "550",
            Continues,
        ),
        case(
            "Telnet IAC negotiation before a command",
            b"\xff\xfd\x18\xff\xfb\x01NOOP\r\n",
            "200",
            Continues,
        ),
        case(
            "Telnet IP + DM before a command",
            b"\xff\xf4\xff\xf2NOOP\r\n",
            "200",
            Continues,
        ),
        case(
            "escaped 0xFF (IAC IAC) in an argument (passed on)",
            b"CWD a\xff\xffb\r\n",
            "550",
            Continues,
        ),
        case("lower-case verb", b"noop\r\n", "200", Continues),
        case("LF without CR", b"NOOP\n", "200", Continues),
        case(
            "PORT to a third-party IPv4 host",
            b"PORT 198,51,100,7,19,137\r\n",
            "504",
            Continues,
        ),
        case(
            "PORT to a public IPv4 host",
            b"PORT 8,8,8,8,19,137\r\n",
            "504",
            Continues,
        ),
        case(
            "EPRT to a third-party IPv6 host",
            b"EPRT |2|2001:db8::7|5001|\r\n",
            "504",
            Continues,
        ),
        case(
            "EPRT to an IPv4-mapped third party",
            b"EPRT |2|::ffff:198.51.100.7|5001|\r\n",
            "504",
            Continues,
        ),
        case(
            "PORT to the broadcast address",
            b"PORT 255,255,255,255,19,137\r\n",
            "504",
            Continues,
        ),
        case(
            "PORT to a multicast address",
            b"PORT 224,0,0,251,19,137\r\n",
            "504",
            Continues,
        ),
        case(
            "PORT to port 0",
            b"PORT 127,0,0,1,0,0\r\n",
            "504",
            Continues,
        ),
        case(
            "PORT to port 19 (chargen)",
            b"PORT 127,0,0,1,0,19\r\n",
            "504",
            Continues,
        ),
        case(
            "PORT to port 1023",
            b"PORT 127,0,0,1,3,255\r\n",
            "504",
            Continues,
        ),
        case(
            "EPRT to port 65536",
            b"EPRT |1|127.0.0.1|65536|\r\n",
            "501",
            Continues,
        ),
        case(
            "PORT with a number above 255",
            b"PORT 127,0,0,1,256,0\r\n",
            "501",
            Continues,
        ),
        case(
            "PORT with five numbers",
            b"PORT 127,0,0,1,19\r\n",
            "501",
            Continues,
        ),
        case(
            "EPRT with an unknown protocol",
            b"EPRT |9|x|5001|\r\n",
            "522",
            Continues,
        ),
        case(
            "EPRT with a bad delimiter layout",
            b"EPRT |1|127.0.0.1|5001\r\n",
            "501",
            Continues,
        ),
        case(
            "transfer without PORT or PASV",
            b"RETR x\r\n",
            "425",
            Continues,
        ),
        case("LPRT", b"LPRT 4,4,127,0,0,1,2,19,137\r\n", "502", Continues),
        case("AUTH TLS", b"AUTH TLS\r\n", "502", Continues),
        case("QUIT", b"QUIT\r\n", "221", Closed),
    ]
}

fn witness_ok(witness: &mut Control) {
    let reply = witness.cmd("NOOP");
    assert!(
        reply.starts_with("200"),
        "the witness session broke: {reply}"
    );
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn client_catalogue() {
    let lab = Lab::new(&[]);
    let mut witness = Control::connect(&lab.ns, GATEWAY4);
    witness.login();
    let fd_baseline = lab.gateway.fd_count();
    let mut table = Vec::new();
    for case in client_cases() {
        let mut c = Control::connect(&lab.ns, GATEWAY4);
        c.login();
        c.send(&case.send);
        let reply = c.reply();
        assert!(reply.starts_with(case.reply), "{}: {reply}", case.name);
        match case.after {
            After::Continues => assert!(
                c.cmd("NOOP").starts_with("200"),
                "{}: session did not go on",
                case.name
            ),
            After::Closed => assert_eq!(c.reply(), "<closed>", "{}", case.name),
        }
        witness_ok(&mut witness);
        table.push(format!(
            "| {} | {} | {:?} |",
            case.name, case.reply, case.after
        ));
    }
    lab.gateway.assert_fds_back_to(fd_baseline);
    eprintln!("{}", table.join("\n"));
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn ten_thousand_pipelined_commands() {
    let lab = Lab::new(&[]);
    let mut c = Control::connect(&lab.ns, GATEWAY4);
    c.login();
    let burst: Vec<u8> = (0..10_000)
        .flat_map(|i| {
            if i % 2 == 0 {
                b"NOOP\r\n".to_vec()
            } else {
                b"PWD\r\n".to_vec()
            }
        })
        .collect();
    let mut writer = c.stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || writer.write_all(&burst).unwrap());
    for i in 0..10_000 {
        let reply = c.reply();
        let want = if i % 2 == 0 { "200" } else { "257" };
        assert!(reply.starts_with(want), "reply {i} out of order: {reply}");
    }
    sender.join().unwrap();
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn slowloris_on_the_control_port_is_cut_at_the_idle_timeout() {
    let lab = Lab::new(&["--idle-timeout", "3"]);
    let mut witness = Control::connect(&lab.ns, GATEWAY4);
    witness.login();
    let mut slow = Control::connect(&lab.ns, GATEWAY4);
    let started = Instant::now();
    let mut closed = false;
    for byte in b"USER anonymous-but-very-very-slowly\r\n" {
        if slow.stream.write_all(&[*byte]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
        // The witness is active meanwhile, so it is not idle.
        witness_ok(&mut witness);
        slow.stream.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 256];
        let got = slow.stream.read(&mut buf);
        slow.stream.set_nonblocking(false).unwrap();
        if let Ok(n) = got {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            assert!(n == 0 || text.starts_with("421"), "{text}");
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "a client dribbling one byte a second was never cut off"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    witness_ok(&mut witness);
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn passive_pool_exhaustion_gives_425_and_recovers() {
    let lab = Lab::new(&["--passive-ports", "40000-40019"]);
    // One session opening 1,000 listeners without using them holds one at a
    // time: each PASV replaces the last.
    let mut c = Control::connect(&lab.ns, GATEWAY4);
    c.login();
    for i in 0..1000 {
        let reply = c.cmd("PASV");
        assert!(reply.starts_with("227"), "PASV {i}: {reply}");
    }
    // Twenty-five sessions holding a listener each: the range has twenty.
    let mut holders = Vec::new();
    let mut refused = 0;
    for _ in 0..25 {
        let mut h = Control::connect(&lab.ns, GATEWAY4);
        h.login();
        let reply = h.cmd("EPSV");
        if reply.starts_with("425") {
            refused += 1;
        } else {
            assert!(reply.starts_with("229"), "{reply}");
        }
        holders.push(h);
    }
    assert_eq!(
        refused, 6,
        "20 ports: the first session's listener and 19 more, then 425"
    );
    lab.gateway.expect_logs("cannot open a passive listener", 6);
    // Released listeners come back to the pool.
    drop(holders);
    std::thread::sleep(Duration::from_millis(200));
    let mut again = Control::connect(&lab.ns, GATEWAY4);
    again.login();
    assert!(
        again.cmd("EPSV").starts_with("229"),
        "the pool did not recover"
    );
}

/// A hostile FTP server: connection 0 is served normally (the witness),
/// every later connection gets the next misbehaviour of the list.
fn hostile_server(ns: &NetNs, behaviours: Vec<Vec<u8>>) -> std::thread::JoinHandle<()> {
    let listener: TcpListener = ns.listen("127.0.0.1:2996".parse().unwrap());
    std::thread::spawn(move || {
        for (next, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { break };
            if next == 0 {
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    stream.write_all(b"220 witness\r\n").unwrap();
                    let mut line = String::new();
                    while reader.read_line(&mut line).unwrap_or(0) > 0 {
                        let reply: &[u8] = if line.starts_with("QUIT") {
                            b"221 bye\r\n"
                        } else {
                            b"200 ok\r\n"
                        };
                        if stream.write_all(reply).is_err() {
                            break;
                        }
                        line.clear();
                    }
                });
            } else if let Some(b) = behaviours.get(next - 1).cloned() {
                std::thread::spawn(move || {
                    // Send the hostile bytes, in pieces, for a bounded time.
                    let deadline = Instant::now() + Duration::from_secs(20);
                    let mut sent = 0usize;
                    while Instant::now() < deadline && sent < 64 << 20 {
                        if stream.write_all(&b).is_err() {
                            break;
                        }
                        sent += b.len();
                    }
                });
            } else {
                break;
            }
        }
    })
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn hostile_server_catalogue() {
    let ns = NetNs::new();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "endless multi-line reply",
            [b"220-hello\r\n".as_slice(), &b" more\r\n".repeat(20_000)].concat(),
        ),
        (
            "banner that never ends its line",
            b"220 "
                .iter()
                .copied()
                .chain(std::iter::repeat_n(b'a', 100_000))
                .collect(),
        ),
        ("reply with an invalid code", b"hello there\r\n".to_vec()),
        ("reply code out of range", b"999 what\r\n".to_vec()),
    ];
    let server = hostile_server(&ns, cases.iter().map(|(_, b)| b.clone()).collect());
    let gateway = Gateway::start(
        &ns,
        &[
            "--listen",
            GATEWAY4,
            "--upstream",
            "127.0.0.1:2996",
            "--connect-timeout",
            "5",
        ],
    );
    let mut witness = Control::connect(&ns, GATEWAY4);
    for (name, _) in &cases {
        let mut s = ns.connect(GATEWAY4.parse().unwrap()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let text = String::from_utf8_lossy(&got);
        let last = text.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("421"),
            "{name}: the client should end on 421, got {:?}",
            &text[text.len().saturating_sub(200)..]
        );
        assert!(
            got.len() < 2 << 20,
            "{name}: the gateway relayed {} bytes of garbage",
            got.len()
        );
        assert!(
            witness.cmd("NOOP").starts_with("200"),
            "{name}: witness broke"
        );
    }
    drop(gateway);
    drop(server);
}
