//! Bad input, bounce and port-theft attempts, NAT traversal, and failures of
//! either peer. Each test runs in a namespace of its own with nothing but a
//! loopback interface, so even a bug cannot send a packet off the machine.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use common::*;

fn port_arg(addr: &str, port: u16) -> String {
    format!(
        "PORT {},{},{}",
        addr.replace('.', ","),
        port >> 8,
        port & 0xff
    )
}

fn client_listener(lab: &Lab, ip: &str) -> (TcpListener, u16) {
    let l = lab.ns.listen(format!("{ip}:0").parse().unwrap());
    l.set_nonblocking(false).unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

/// Retrieves `name` over an active connection the client has arranged, and
/// returns the bytes.
fn retr_active(control: &mut Control, listener: &TcpListener, name: &str) -> Vec<u8> {
    control.send(format!("RETR {name}\r\n").as_bytes());
    let first = control.reply();
    assert!(first.starts_with("150"), "{first}");
    let (mut data, _) = listener.accept().unwrap();
    let mut got = Vec::new();
    data.read_to_end(&mut got).unwrap();
    drop(data);
    let last = control.reply();
    assert!(last.starts_with("226"), "{last}");
    got
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn nat_traversal_connects_to_the_observed_address() {
    let lab = Lab::new(&[]);
    lab.server.put("n.txt", b"behind nat");
    let baseline = lab.gateway.fd_count();
    // The client connects from 127.0.0.2 but names other private addresses,
    // as a client behind NAT does.
    let stream = lab
        .ns
        .connect_from("127.0.0.2:0".parse().unwrap(), GATEWAY4.parse().unwrap())
        .unwrap();
    let mut control = Control::from_stream(stream);
    control.login();
    assert!(control.cmd("CWD pub").starts_with("250"));
    for named in ["127.0.0.3", "192.168.1.5", "10.0.0.9", "100.64.1.1"] {
        let (listener, port) = client_listener(&lab, "127.0.0.2");
        let reply = control.cmd(&port_arg(named, port));
        assert!(reply.starts_with("200"), "{named}: {reply}");
        assert_eq!(
            retr_active(&mut control, &listener, "n.txt"),
            b"behind nat",
            "{named}"
        );
    }
    // EPRT naming a unique-local IPv6 address from an IPv4 client: also NAT.
    let (listener, port) = client_listener(&lab, "127.0.0.2");
    assert!(
        control
            .cmd(&format!("EPRT |2|fd00::5|{port}|"))
            .starts_with("200")
    );
    assert_eq!(retr_active(&mut control, &listener, "n.txt"), b"behind nat");
    lab.gateway.expect_logs("client behind NAT", 5);
    assert!(control.cmd("QUIT").starts_with("221"));
    drop(control);
    lab.gateway.assert_fds_back_to(baseline);
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn nat_traversal_can_be_turned_off() {
    let lab = Lab::new(&["--nat-traversal", "false"]);
    let stream = lab
        .ns
        .connect_from("127.0.0.2:0".parse().unwrap(), GATEWAY4.parse().unwrap())
        .unwrap();
    let mut control = Control::from_stream(stream);
    control.login();
    let reply = control.cmd(&port_arg("192.168.1.5", 5001));
    assert!(reply.starts_with("504"), "{reply}");
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn bounce_attempts_are_refused() {
    let lab = Lab::new(&[]);
    let baseline = lab.gateway.fd_count();
    let mut control = Control::connect(&lab.ns, GATEWAY4);
    control.login();
    let cases = [
        // Third-party hosts (RFC 2577 bounce), IPv4 and IPv6, mapped too.
        ("PORT 8,8,8,8,19,137", "504"),
        ("EPRT |1|198.51.100.7|5001|", "504"),
        ("EPRT |2|2001:db8::7|5001|", "504"),
        ("EPRT |2|::ffff:198.51.100.7|5001|", "504"),
        ("PORT 255,255,255,255,19,137", "504"),
        ("PORT 224,0,0,1,19,137", "504"),
        // Privileged ports, even on the client's own address.
        ("PORT 127,0,0,1,0,0", "504"),
        ("PORT 127,0,0,1,0,19", "504"),
        ("PORT 127,0,0,1,3,255", "504"),
        ("EPRT |1|127.0.0.1|21|", "504"),
        // Malformed.
        ("PORT 127,0,0,1,256,1", "501"),
        ("PORT 127,0,0,1,1", "501"),
        ("PORT", "501"),
        ("EPRT |1|127.0.0.1|65536|", "501"),
        ("EPRT |1|::1|5000|", "501"),
        ("EPRT 127.0.0.1:5000", "501"),
        ("EPRT |3|x|5000|", "522"),
        ("EPSV 7", "522"),
        ("EPSV nonsense", "501"),
        ("LPRT 4,4,127,0,0,1,2,19,137", "502"),
        ("AUTH TLS", "502"),
    ];
    for (line, code) in cases {
        let reply = control.cmd(line);
        assert!(reply.starts_with(code), "{line}: {reply}");
        // A refused PORT leaves no data connection arranged.
        let next = control.cmd("LIST");
        assert!(next.starts_with("425"), "after {line}: {next}");
    }
    lab.gateway.expect_logs("\"message\":\"refused ", 10);
    // The session still works.
    let (listener, port) = client_listener(&lab, "127.0.0.1");
    assert!(control.cmd(&port_arg("127.0.0.1", port)).starts_with("200"));
    control.send(b"LIST\r\n");
    assert!(control.reply().starts_with("150"));
    let (mut data, _) = listener.accept().unwrap();
    let mut listing = String::new();
    data.read_to_string(&mut listing).unwrap();
    assert!(control.reply().starts_with("226"));
    assert!(control.cmd("QUIT").starts_with("221"));
    drop(control);
    lab.gateway.assert_fds_back_to(baseline);
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn bad_lines_get_replies_and_the_session_goes_on() {
    let lab = Lab::new(&["--max-line", "512"]);
    let mut control = Control::connect(&lab.ns, GATEWAY4);
    control.login();
    // Overlong line: 500 at once, the rest of the line is skipped.
    let mut long = b"USER ".to_vec();
    long.extend(std::iter::repeat_n(b'a', 5000));
    long.extend_from_slice(b"\r\n");
    control.send(&long);
    let reply = control.reply();
    assert!(
        reply.starts_with("500") && reply.contains("longer than 512"),
        "{reply}"
    );
    for (bytes, code) in [
        (&b"\r\n"[..], "500"),
        (b"RETR a\0b\r\n", "501"),
        (b"RETR a\rDELE b\r\n", "501"),
        (b"TOOLONGVERB x\r\n", "500"),
        (b"R3TR x\r\n", "500"),
        (b"\xff\xfb\x01NOOP\r\n", "200"),
        (b"noop\n", "200"),
        (b"   NOOP\r\n", "200"),
        // Non-UTF-8 arguments are passed on as they are.
        (b"CWD \xe9t\xe9\r\n", "550"),
    ] {
        control.send(bytes);
        let reply = control.reply();
        assert!(reply.starts_with(code), "{bytes:?}: {reply}");
    }
    // 10,000 pipelined commands, answered in order.
    let burst: Vec<u8> = (0..10_000)
        .flat_map(|_| b"NOOP\r\n".iter().copied())
        .collect();
    let mut writer = control.stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || writer.write_all(&burst).unwrap());
    for i in 0..10_000 {
        let reply = control.reply();
        assert!(reply.starts_with("200"), "reply {i}: {reply}");
    }
    sender.join().unwrap();
    assert!(control.cmd("PWD").starts_with("257"));
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn ipv6_specific_refusals() {
    let lab = Lab::with_upstream(SERVER6, &[]);
    let mut control = Control::connect(&lab.ns, GATEWAY6);
    control.login();
    let reply = control.cmd("PASV");
    assert!(reply.starts_with("522"), "PASV cannot carry IPv6: {reply}");
    assert!(control.cmd("EPSV 1").starts_with("522"));
    assert!(control.cmd("EPSV 2").starts_with("229"));
    assert!(control.cmd("EPSV ALL").starts_with("200"));
    for line in ["PORT 127,0,0,1,19,137", "EPRT |2|::1|5001|", "PASV"] {
        let reply = control.cmd(line);
        assert!(reply.starts_with("501"), "after EPSV ALL, {line}: {reply}");
    }
    assert!(control.cmd("EPSV").starts_with("229"));
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn data_connection_from_another_address_is_closed() {
    let lab = Lab::new(&[]);
    lab.server.put("t.txt", b"theft-proof");
    let mut control = Control::connect(&lab.ns, GATEWAY4);
    control.login();
    assert!(control.cmd("CWD pub").starts_with("250"));
    let reply = control.cmd("PASV");
    assert!(reply.starts_with("227"), "{reply}");
    let numbers: Vec<u16> = reply[reply.find('(').unwrap() + 1..reply.find(')').unwrap()]
        .split(',')
        .map(|n| n.parse().unwrap())
        .collect();
    let data_addr: SocketAddr = format!("127.0.0.1:{}", numbers[4] * 256 + numbers[5])
        .parse()
        .unwrap();
    // The thief comes first, from another address.
    let mut thief = lab
        .ns
        .connect_from("127.0.0.66:0".parse().unwrap(), data_addr)
        .unwrap();
    let mut data = lab.ns.connect(data_addr).unwrap();
    control.send(b"RETR t.txt\r\n");
    assert!(control.reply().starts_with("150"));
    let mut got = Vec::new();
    data.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"theft-proof");
    assert!(control.reply().starts_with("226"));
    thief
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut stolen = Vec::new();
    let _ = thief.read_to_end(&mut stolen);
    assert!(stolen.is_empty(), "the thief got data");
    lab.gateway
        .expect_logs("data connection from an unexpected address", 1);
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn server_down_gets_421_and_the_gateway_keeps_serving() {
    let ns = NetNs::new();
    // Nothing listens on the upstream port.
    let gateway = Gateway::start(
        &ns,
        &[
            "--listen",
            GATEWAY4,
            "--upstream",
            "127.0.0.1:2999",
            "--connect-timeout",
            "2",
        ],
    );
    for _ in 0..3 {
        let mut stream = ns.connect(GATEWAY4.parse().unwrap()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        assert!(
            reply.starts_with("421") && reply.contains("127.0.0.1:2999"),
            "{reply}"
        );
    }
    // A server that accepts but never greets.
    let silent = ns.listen("127.0.0.1:2998".parse().unwrap());
    let gateway2 = Gateway::start(
        &ns,
        &[
            "--listen",
            "127.0.0.1:2101",
            "--upstream",
            "127.0.0.1:2998",
            "--connect-timeout",
            "1",
        ],
    );
    let mut stream = ns.connect("127.0.0.1:2101".parse().unwrap()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("421"), "{reply}");
    drop((silent, gateway, gateway2));
}

/// A hostile server: its 227 names another host, or a privileged port.
#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn hostile_server_passive_replies() {
    let ns = NetNs::new();
    let fake = ns.listen("127.0.0.1:2997".parse().unwrap());
    let replies = [
        "227 Entering Passive Mode (198,51,100,7,19,137).",
        "227 Entering Passive Mode (127,0,0,1,0,21).",
        "229 Entering Extended Passive Mode (|||21|)",
        "227 garbage",
    ];
    let server = std::thread::spawn(move || {
        let (stream, _) = fake.accept().unwrap();
        let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        writer.write_all(b"220 fake\r\n").unwrap();
        let mut pasv = 0;
        let mut line = String::new();
        while std::io::BufRead::read_line(&mut reader, &mut line).unwrap_or(0) > 0 {
            let reply = if line.starts_with("PASV") || line.starts_with("EPSV") {
                pasv += 1;
                replies[(pasv - 1) % replies.len()].to_owned()
            } else if line.starts_with("QUIT") {
                "221 bye".to_owned()
            } else if line.starts_with("USER") {
                "331 password".to_owned()
            } else if line.starts_with("PASS") {
                "230 in".to_owned()
            } else {
                "200 ok".to_owned()
            };
            writer.write_all(format!("{reply}\r\n").as_bytes()).unwrap();
            line.clear();
        }
    });
    let gateway = Gateway::start(
        &ns,
        &[
            "--listen",
            GATEWAY4,
            "--upstream",
            "127.0.0.1:2997",
            "--upstream-mode",
            "passive",
        ],
    );
    let mut control = Control::connect(&ns, GATEWAY4);
    control.login();
    for _ in 0..4 {
        assert!(control.cmd("PASV").starts_with("227"));
        let reply = control.cmd("LIST");
        assert!(reply.starts_with("425"), "{reply}");
    }
    assert!(control.cmd("NOOP").starts_with("200"));
    assert!(control.cmd("QUIT").starts_with("221"));
    gateway.expect_logs("\"kind\":\"policy\"", 3);
    server.join().unwrap();
}

fn session_pids(server: &Vsftpd) -> Vec<String> {
    let needle = server
        .dir
        .path()
        .join("vsftpd.conf")
        .to_string_lossy()
        .into_owned();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            pids.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    pids
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn server_dies_mid_transfer() {
    let lab = Lab::new(&[]);
    write_pattern_file(&lab.server.public().join("big.bin"), 512 << 20, 1);
    let baseline = lab.gateway.fd_count();
    let listener_pids = session_pids(&lab.server);
    let mut control = Control::connect(&lab.ns, GATEWAY4);
    control.login();
    assert!(control.cmd("CWD pub").starts_with("250"));
    let mut data = control.epsv_download(&lab.ns, "127.0.0.1", "RETR big.bin");
    let mut buf = vec![0u8; 1 << 20];
    data.read_exact(&mut buf).unwrap();
    // SIGKILL the session processes, not the listener.
    for pid in session_pids(&lab.server)
        .into_iter()
        .filter(|p| !listener_pids.contains(p))
    {
        run(std::process::Command::new("kill").args(["-9", &pid]));
    }
    // The client sees the transfer fail: 426 or 421, never a 226.
    data.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = data.read_to_end(&mut rest);
    let reply = control.reply();
    assert!(
        reply.starts_with("426") || reply.starts_with("421"),
        "{reply}"
    );
    drop((data, control));
    // New sessions are served.
    let mut again = Control::connect(&lab.ns, GATEWAY4);
    again.login();
    assert!(again.cmd("QUIT").starts_with("221"));
    drop(again);
    lab.gateway.assert_fds_back_to(baseline);
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn client_dies_mid_transfer() {
    let lab = Lab::new(&[]);
    write_pattern_file(&lab.server.public().join("big.bin"), 512 << 20, 1);
    let baseline = lab.gateway.fd_count();
    let mut control = Control::connect(&lab.ns, GATEWAY4);
    control.login();
    assert!(control.cmd("CWD pub").starts_with("250"));
    let mut data = control.epsv_download(&lab.ns, "127.0.0.1", "RETR big.bin");
    let mut buf = vec![0u8; 1 << 20];
    data.read_exact(&mut buf).unwrap();
    // The client vanishes: both connections reset.
    for s in [&data, &control.stream] {
        socket2::SockRef::from(s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    }
    drop((data, control));
    // The server's side is closed within a second: vsftpd logs the failed transfer.
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while !lab.server.log().contains("FAIL DOWNLOAD") {
        assert!(
            std::time::Instant::now() < deadline,
            "server-side data connection not closed within a second:\n{}",
            lab.server.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    lab.gateway.assert_fds_back_to(baseline);
    let mut again = Control::connect(&lab.ns, GATEWAY4);
    again.login();
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn session_limits_answer_421() {
    let lab = Lab::new(&["--max-sessions", "3", "--max-sessions-per-client", "2"]);
    let a = Control::connect(&lab.ns, GATEWAY4);
    let b = Control::connect(&lab.ns, GATEWAY4);
    let mut refused = lab.ns.connect(GATEWAY4.parse().unwrap()).unwrap();
    let mut reply = String::new();
    refused.read_to_string(&mut reply).unwrap();
    assert!(
        reply.starts_with("421") && reply.contains("your address"),
        "{reply}"
    );
    let c = Control::from_stream(
        lab.ns
            .connect_from("127.0.0.2:0".parse().unwrap(), GATEWAY4.parse().unwrap())
            .unwrap(),
    );
    let mut refused = lab
        .ns
        .connect_from("127.0.0.3:0".parse().unwrap(), GATEWAY4.parse().unwrap())
        .unwrap();
    let mut reply = String::new();
    refused.read_to_string(&mut reply).unwrap();
    assert!(
        reply.starts_with("421") && reply.contains("Too many sessions"),
        "{reply}"
    );
    drop((a, b, c));
    // Slots come back.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = lab.ns.connect(GATEWAY4.parse().unwrap()).unwrap();
        let mut first = [0u8; 3];
        s.read_exact(&mut first).unwrap();
        if &first == b"220" {
            break;
        }
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn idle_control_connection_gets_421() {
    let lab = Lab::new(&["--idle-timeout", "1"]);
    let mut control = Control::connect(&lab.ns, GATEWAY4);
    let reply = control.reply();
    assert!(
        reply.starts_with("421") && reply.contains("Idle timeout"),
        "{reply}"
    );
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn data_setup_timeout_gives_425_and_the_session_goes_on() {
    let lab = Lab::new(&["--data-timeout", "1"]);
    lab.server.put("d.txt", b"data");
    let baseline = lab.gateway.fd_count();
    let mut control = Control::connect(&lab.ns, GATEWAY4);
    control.login();
    // PASV, then never connect.
    assert!(control.cmd("EPSV").starts_with("229"));
    let started = std::time::Instant::now();
    let reply = control.cmd("RETR pub/d.txt");
    assert!(
        reply.starts_with("425") && reply.contains("no data connection"),
        "{reply}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // PORT to a port nobody listens on.
    let (listener, port) = client_listener(&lab, "127.0.0.1");
    drop(listener);
    assert!(control.cmd(&port_arg("127.0.0.1", port)).starts_with("200"));
    let reply = control.cmd("RETR pub/d.txt");
    assert!(reply.starts_with("425"), "{reply}");
    // The server's own reply to the cut transfer was consumed: the next
    // command gets its own reply.
    assert!(control.cmd("NOOP").starts_with("200"));
    assert!(control.cmd("QUIT").starts_with("221"));
    drop(control);
    lab.gateway.assert_fds_back_to(baseline);
}
