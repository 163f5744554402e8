//! Several servers in the unprivileged tier (issue 13): the gateway in
//! process in front of several fake servers. Failover when a server is
//! unreachable or refuses the session, 421 when none is left, per-user
//! routing at `USER` (what the gateway answers before it, `user@server`,
//! a later `USER` whose route excludes the session's server), and the
//! PROXY protocol on both sides (the real client reaches the server's
//! header and the per-client limit).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::fake::{Behavior, FakeServer};
use common::inproc::{FtpClient, InProcess, code};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The gateway with this configuration file (besides listen and metrics).
fn start(toml: &str) -> (InProcess, tempfile::TempDir) {
    start_args(toml, &[])
}

/// The same with more command-line arguments.
fn start_args(toml: &str, extra: &[&str]) -> (InProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, toml).unwrap();
    let mut args = vec!["--config", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    let gateway = InProcess::start_with(&args);
    (gateway, dir)
}

fn servers(list: &[(&str, SocketAddr)]) -> String {
    list.iter()
        .map(|(name, addr)| format!("[[servers]]\nname = \"{name}\"\naddress = \"{addr}\"\n"))
        .collect()
}

/// An address nothing listens on.
fn dead() -> SocketAddr {
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    unused.local_addr().unwrap()
}

fn users(server: &FakeServer) -> Vec<String> {
    server
        .received()
        .into_iter()
        .filter(|l| l.starts_with("USER"))
        .collect()
}

/// A server that refuses connections, and one that greets with 421: every
/// session still reaches the third, and the failures are the servers'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_fail_over_to_a_server_that_takes_them() {
    let full = FakeServer::start(Behavior {
        refuse_with: Some("421 Too many users, try later"),
        ..Behavior::default()
    })
    .await;
    let good = FakeServer::start(Behavior::default()).await;
    let (gateway, _dir) = start(&format!(
        "balance = \"round-robin\"\n{}",
        servers(&[("gone", dead()), ("full", full.addr), ("good", good.addr)])
    ));
    for _ in 0..6 {
        let mut client = FtpClient::login(gateway.addr).await;
        assert_eq!(code(&client.cmd("PWD").await), 257);
        assert_eq!(code(&client.cmd("QUIT").await), 221);
    }
    assert_eq!(users(&good).len(), 6);
    assert!(
        gateway
            .metric("ftp_proxy_upstream_connect_failures_total{server=\"gone\"}")
            .await
            >= 1.0
    );
    assert!(
        gateway
            .metric("ftp_proxy_upstream_connect_failures_total{server=\"full\"}")
            .await
            >= 1.0
    );
    assert_eq!(
        gateway
            .metric("ftp_proxy_upstream_errors_total{reason=\"connect\"}")
            .await,
        0.0,
        "no session failed"
    );
    gateway.stop().await;
}

/// Every server failing: 421 with the last one's reason; once the checks
/// have them down, 421 without trying any.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_server_left_gets_421() {
    let full = FakeServer::start(Behavior {
        refuse_with: Some("421 Too many users, try later"),
        ..Behavior::default()
    })
    .await;
    let (gateway, _dir) = start(&format!(
        "balance = \"round-robin\"\n{}[health]\ninterval = 1\ntimeout = 1\nrise = 1\nfall = 1\n",
        servers(&[("gone", dead()), ("full", full.addr)])
    ));
    // Right away both are up (unconfirmed) and both get tried.
    let (_client, banner) = FtpClient::connect(gateway.addr).await;
    assert_eq!(code(&banner), 421, "{banner}");
    for server in ["gone", "full"] {
        gateway
            .wait_metric(
                &format!("ftp_proxy_upstream_up{{server=\"{server}\"}}"),
                0.0,
            )
            .await;
    }
    let (_client, banner) = FtpClient::connect(gateway.addr).await;
    assert_eq!(code(&banner), 421, "{banner}");
    assert!(banner.contains("no FTP server is available"), "{banner}");
    gateway
        .wait_metric("ftp_proxy_upstream_errors_total{reason=\"no_server\"}", 1.0)
        .await;
    gateway.stop().await;
}

fn routed(a: &FakeServer, b: &FakeServer, extra: &str) -> String {
    format!(
        "{extra}\n{}[[routes]]\nusers = [\"alice\", \"team-*\"]\nservers = [\"a\"]\n\
         [[routes]]\nusers = [\"bob\"]\nservers = [\"b\"]\n",
        servers(&[("a", a.addr), ("b", b.addr)])
    )
}

/// Before `USER` the gateway is the client's server: its own banner and
/// FEAT, 503 for PASS, 530 for the rest, and no server is contacted.
/// `USER` then goes to the route's server with the rest of the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_are_routed_at_user() {
    let a = FakeServer::start(Behavior::default()).await;
    let b = FakeServer::start(Behavior::default()).await;
    let (gateway, _dir) = start(&routed(&a, &b, ""));
    let (mut client, banner) = FtpClient::connect(gateway.addr).await;
    assert_eq!(code(&banner), 220, "{banner}");
    let feat = client.cmd("FEAT").await;
    assert_eq!(code(&feat), 211, "{feat}");
    assert!(feat.contains("EPSV"), "{feat}");
    assert_eq!(code(&client.cmd("NOOP").await), 200);
    assert_eq!(code(&client.cmd("PASS x").await), 503);
    assert_eq!(code(&client.cmd("SYST").await), 530);
    assert_eq!(code(&client.cmd("EPSV").await), 530);
    // No route for carol: 530 as for a bad password, and no server hears of it.
    assert_eq!(code(&client.cmd("USER carol").await), 530);
    // (The health checks' QUIT may be there: no USER is.)
    assert!(users(&a).is_empty() && users(&b).is_empty());
    assert_eq!(
        gateway
            .metric("ftp_proxy_rejected_total{reason=\"unrouted_user\"}")
            .await,
        1.0
    );
    assert_eq!(code(&client.cmd("USER bob").await), 331);
    assert_eq!(code(&client.cmd("PASS secret").await), 230);
    assert_eq!(code(&client.cmd("PWD").await), 257);
    assert_eq!(users(&b), ["USER bob"]);
    assert!(users(&a).is_empty());
    // Another user on the same session: only if its route allows b.
    assert_eq!(code(&client.cmd("USER alice").await), 530);
    assert_eq!(users(&b), ["USER bob"]);
    assert_eq!(code(&client.cmd("QUIT").await), 221);

    let mut client = FtpClient::connect(gateway.addr).await.0;
    assert_eq!(code(&client.cmd("USER team-x").await), 331);
    assert_eq!(code(&client.cmd("PASS secret").await), 230);
    assert_eq!(users(&a), ["USER team-x"]);
    // QUIT before USER is the gateway's to answer.
    let mut client = FtpClient::connect(gateway.addr).await.0;
    assert_eq!(code(&client.cmd("QUIT").await), 221);
    assert!(client.closed_within(Duration::from_secs(5)).await);
    gateway.stop().await;
}

/// `user@server` with `allow-user-at-server`: the server hears the user
/// alone; a server the user's route excludes is refused; unknown users go
/// to the pool with `unknown-users = "pool"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_at_server_names_the_server() {
    let a = FakeServer::start(Behavior::default()).await;
    let b = FakeServer::start(Behavior::default()).await;
    let (gateway, _dir) = start(&routed(
        &a,
        &b,
        "allow-user-at-server = true\nunknown-users = \"pool\"",
    ));
    let mut client = FtpClient::connect(gateway.addr).await.0;
    assert_eq!(code(&client.cmd("USER alice@b").await), 530);
    assert_eq!(code(&client.cmd("USER carol@b").await), 331);
    assert_eq!(code(&client.cmd("PASS secret").await), 230);
    assert_eq!(users(&b), ["USER carol"]);
    let mut client = FtpClient::connect(gateway.addr).await.0;
    // Not a server's name: the whole argument is the user.
    assert_eq!(code(&client.cmd("USER dave@example.com").await), 331);
    let all: Vec<String> = users(&a).into_iter().chain(users(&b)).collect();
    assert!(all.contains(&"USER dave@example.com".to_owned()), "{all:?}");
    gateway.stop().await;
}

/// A routed session whose server cannot be reached: 421 at `USER`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routed_user_whose_servers_fail_gets_421() {
    let gone = dead();
    let b = FakeServer::start(Behavior::default()).await;
    let (gateway, _dir) = start(&format!(
        "{}[[routes]]\nusers = [\"alice\"]\nservers = [\"a\"]\n",
        servers(&[("a", gone), ("b", b.addr)])
    ));
    let mut client = FtpClient::connect(gateway.addr).await.0;
    let reply = client.cmd("USER alice").await;
    assert_eq!(code(&reply), 421, "{reply}");
    assert!(client.closed_within(Duration::from_secs(5)).await);
    assert!(users(&b).is_empty());
    gateway.stop().await;
}

/// Sends a PROXY v1 header for `source`, then reads the banner.
async fn connect_as(gateway: SocketAddr, source: &str) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(gateway).await.unwrap();
    stream
        .write_all(format!("PROXY TCP4 {source} 192.0.2.1 40000 21\r\n").as_bytes())
        .await
        .unwrap();
    let mut banner = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut banner))
        .await
        .unwrap()
        .unwrap();
    (stream, String::from_utf8_lossy(&banner[..n]).into_owned())
}

/// Sends `bytes` as a trusted peer's first: the gateway closes without a
/// reply and counts the header refused for `reason`.
async fn refused_without_a_word(gateway: &InProcess, bytes: &[u8], reason: &str) {
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "{}", String::from_utf8_lossy(&rest));
    gateway
        .wait_metric(
            &format!("ftp_proxy_proxy_protocol_rejected_total{{reason=\"{reason}\"}}"),
            1.0,
        )
        .await;
}

/// A trusted balancer's header gives the real client: the server's PROXY
/// header carries it, and the per-client limit counts it. A trusted peer
/// without a header is closed without a word, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_protocol_carries_the_real_client() {
    let server = FakeServer::start(Behavior {
        proxy_v1: true,
        ..Behavior::default()
    })
    .await;
    let (gateway, _dir) = start(&format!(
        "upstream = \"{}\"\nproxy-protocol-from = [\"127.0.0.1/32\"]\n\
         server-proxy-protocol = \"v1\"\nmax-sessions-per-client = 1\n",
        server.addr
    ));
    let (_first, banner) = connect_as(gateway.addr, "203.0.113.7").await;
    assert_eq!(code(&banner), 220, "{banner}");
    let header = server.received()[0].clone();
    assert!(
        header.starts_with("PROXY TCP4 203.0.113.7 192.0.2.1 40000 21"),
        "{header}"
    );
    // The same client again: over its limit, although the balancer's
    // address is the same for everyone.
    let (_second, banner) = connect_as(gateway.addr, "203.0.113.7").await;
    assert_eq!(code(&banner), 421, "{banner}");
    let (_other, banner) = connect_as(gateway.addr, "203.0.113.8").await;
    assert_eq!(code(&banner), 220, "{banner}");
    // No header from a trusted peer.
    refused_without_a_word(&gateway, b"USER x\r\n", "missing").await;
    gateway.stop().await;
}

/// A server that takes connections and never greets, and a server address
/// that is the gateway's own listener (a loop): both fail over within the
/// connect timeout; with only the loop, 421 names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_and_a_loop_fail_over() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let good = FakeServer::start(Behavior::default()).await;
    // The gateway's second listener, on a port known in advance.
    let own = dead().to_string();
    let (gateway, _dir) = start_args(
        &format!(
            "connect-timeout = 1\nbalance = \"round-robin\"\n{}",
            servers(&[
                ("silent", silent_addr),
                ("self", own.parse().unwrap()),
                ("good", good.addr)
            ])
        ),
        &["--listen", &own],
    );
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let mut client = FtpClient::login(gateway.addr).await;
        assert_eq!(code(&client.cmd("QUIT").await), 221);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    assert_eq!(users(&good).len(), 3);
    // Both are down (their checks fail the same way).
    for server in ["silent", "self"] {
        gateway
            .wait_metric(
                &format!("ftp_proxy_upstream_up{{server=\"{server}\"}}"),
                0.0,
            )
            .await;
    }
    gateway.stop().await;
    holder.abort();

    // A single upstream, unchecked: the session finds the loop.
    let own = dead().to_string();
    let (gateway, _dir) = start_args(&format!("upstream = \"{own}\"\n"), &["--listen", &own]);
    let (_client, banner) = FtpClient::connect(gateway.addr).await;
    assert_eq!(code(&banner), 421, "{banner}");
    assert!(banner.contains("loop"), "{banner}");
    gateway.stop().await;
}

/// A PROXY header from a client that is not trusted: closed, counted,
/// whether it arrives with the connection or after the banner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_proxy_header_closes_the_connection() {
    let server = FakeServer::start(Behavior::default()).await;
    let gateway = InProcess::start(server.addr, &[]);
    // After the banner: the first command line.
    let (mut client, banner) = FtpClient::connect(gateway.addr).await;
    assert_eq!(code(&banner), 220);
    client
        .send("PROXY TCP4 203.0.113.7 192.0.2.1 40000 21")
        .await;
    assert!(client.closed_within(Duration::from_secs(5)).await);
    // With the connection: no banner, or closed after it.
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    stream
        .write_all(b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 21\r\nUSER x\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap_or(0);
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.is_empty() || rest.starts_with("220 "), "{rest}");
    gateway
        .wait_metric(
            "ftp_proxy_proxy_protocol_rejected_total{reason=\"untrusted\"}",
            2.0,
        )
        .await;
    assert!(
        !server.received().iter().any(|l| l.starts_with("PROXY")),
        "the header reached the server"
    );
    gateway.stop().await;
}

/// A PROXY v2 header: PROXY command, TCP over `family` (0x11 IPv4, 0x21
/// IPv6), the addresses, then `tlv_bytes` of padding TLV.
fn v2_header(family: u8, addresses: &[u8], tlv_bytes: usize) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.push(0x21);
    header.push(family);
    let mut payload = addresses.to_vec();
    if tlv_bytes > 0 {
        // PP2_TYPE_NOOP (0x04), length, zeros.
        payload.push(0x04);
        payload.extend_from_slice(&u16::try_from(tlv_bytes - 3).unwrap().to_be_bytes());
        payload.extend(std::iter::repeat_n(0u8, tlv_bytes - 3));
    }
    header.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
    header.extend_from_slice(&payload);
    header
}

/// A v2 header with an IPv6 client on the IPv4 listener is taken (the
/// header toward the server says TCP6); one whose TLVs pass the bound is
/// refused and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_v2_ipv6_client_and_oversized_tlvs() {
    let server = FakeServer::start(Behavior {
        proxy_v1: true,
        ..Behavior::default()
    })
    .await;
    let (gateway, _dir) = start(&format!(
        "upstream = \"{}\"\nproxy-protocol-from = [\"127.0.0.1/32\"]\nserver-proxy-protocol = \"v1\"\n",
        server.addr
    ));
    let source: std::net::Ipv6Addr = "2001:db8::7".parse().unwrap();
    let destination: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
    let mut addresses = source.octets().to_vec();
    addresses.extend_from_slice(&destination.octets());
    addresses.extend_from_slice(&40000u16.to_be_bytes());
    addresses.extend_from_slice(&21u16.to_be_bytes());
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    stream
        .write_all(&v2_header(0x21, &addresses, 8))
        .await
        .unwrap();
    let mut banner = [0u8; 3];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut banner))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&banner, b"220");
    let header = server.received()[0].clone();
    assert!(
        header.starts_with("PROXY TCP6 2001:db8::7 2001:db8::1 40000 21"),
        "{header}"
    );
    // 2,000 bytes of TLVs: past the bound.
    refused_without_a_word(&gateway, &v2_header(0x21, &addresses, 2000), "too_large").await;
    gateway.stop().await;
}
