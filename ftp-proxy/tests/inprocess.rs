//! The unprivileged tier: the gateway's real wiring in this process, on
//! 127.0.0.1:0, in front of the fake FTP server of `common::fake`. Runs
//! under plain `cargo test` as any user on a machine without system
//! packages, and covers sessions, transfers, ABOR, the control channel's
//! faithfulness and the reply accounting of issue 11 (a server reply that
//! comes after the gateway gave up on it).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

mod common;

use std::time::{Duration, Instant};

use common::fake::{Behavior, FakeServer};
use common::inproc::{FtpClient, InProcess, code, read_all};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn content(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_with_transfers_both_ways_and_modes() {
    let server = FakeServer::start(Behavior::default()).await;
    let data = content(300_000);
    server.put("f.bin", &data);
    let gateway = InProcess::start(server.addr, &[]);
    let mut client = FtpClient::login(gateway.addr).await;
    assert_eq!(code(&client.cmd("PWD").await), 257);
    // RETR, passive.
    let at = client.epsv(gateway.addr).await;
    let stream = TcpStream::connect(at).await.unwrap();
    assert_eq!(code(&client.cmd("RETR f.bin").await), 150);
    assert_eq!(read_all(stream).await, data);
    assert_eq!(code(&client.reply().await), 226);
    // RETR, active.
    let listener = client.port().await;
    client.send("RETR f.bin").await;
    let (stream, _) = listener.accept().await.unwrap();
    assert_eq!(code(&client.reply().await), 150);
    assert_eq!(read_all(stream).await, data);
    assert_eq!(code(&client.reply().await), 226);
    // STOR, passive.
    let at = client.epsv(gateway.addr).await;
    let mut stream = TcpStream::connect(at).await.unwrap();
    assert_eq!(code(&client.cmd("STOR up.bin").await), 150);
    stream.write_all(&data).await.unwrap();
    drop(stream);
    assert_eq!(code(&client.reply().await), 226);
    assert_eq!(server.get("up.bin").unwrap(), data);
    // LIST.
    let at = client.epsv(gateway.addr).await;
    let stream = TcpStream::connect(at).await.unwrap();
    assert_eq!(code(&client.cmd("LIST").await), 150);
    let listing = String::from_utf8(read_all(stream).await).unwrap();
    assert!(listing.contains("f.bin") && listing.contains("up.bin"));
    assert_eq!(code(&client.reply().await), 226);
    assert_eq!(code(&client.cmd("QUIT").await), 221);
    assert_eq!(client.reply().await, "<closed>");
    gateway
        .wait_metric(
            "ftp_proxy_transfers_total{direction=\"download\",result=\"ok\"}",
            3.0,
        )
        .await;
    gateway
        .wait_metric(
            "ftp_proxy_transfers_total{direction=\"upload\",result=\"ok\"}",
            1.0,
        )
        .await;
    gateway
        .wait_metric("ftp_proxy_sessions_total{outcome=\"ok\"}", 1.0)
        .await;
    gateway.stop().await;
}

/// Issue 11, item 2: a server that answers 150, never opens the data
/// connection and sends its final reply 12 s later. The client gets 425
/// from the gateway (data timeout 1 s); a command it sends right away is
/// answered at once, one forwarded meanwhile gets its own reply once the
/// server is free, and so does one sent after the late reply. Nothing is
/// off by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_final_reply_never_answers_a_later_command() {
    let server = FakeServer::start(Behavior {
        stall_after_150: Some((Duration::from_secs(12), 425)),
        ..Behavior::default()
    })
    .await;
    server.put("f", b"x");
    let gateway = InProcess::start(
        server.addr,
        &["--data-timeout", "1", "--upstream-mode", "active"],
    );
    let mut client = FtpClient::login(gateway.addr).await;
    // The client's own leg is fine: only the server's fails.
    let at = client.epsv(gateway.addr).await;
    let _data = TcpStream::connect(at).await.unwrap();
    let started = Instant::now();
    client.send("RETR f").await;
    let reply = client.reply().await;
    assert_eq!(code(&reply), 425, "{reply}");
    assert!(reply.contains("server data connection"), "{reply}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // Right away: the gateway's own answer, within a second.
    let asked = Instant::now();
    let reply = client.cmd("EPSV").await;
    assert_eq!(code(&reply), 229, "{reply}");
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "stalled for the owed reply"
    );
    // A command for the server: the server answers it after its late
    // reply, which the gateway swallows.
    let reply = client.cmd("NOOP").await;
    assert_eq!(code(&reply), 200, "{reply}");
    assert!(started.elapsed() >= Duration::from_secs(11));
    // After the late reply: each command its own reply.
    assert_eq!(code(&client.cmd("PWD").await), 257);
    assert_eq!(code(&client.cmd("SYST").await), 215);
    gateway.stop().await;
}

/// The same with a client that just waits: the late reply is swallowed
/// when it comes, and the next command gets its own reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_reply_that_comes_while_the_client_is_idle_is_swallowed() {
    let server = FakeServer::start(Behavior {
        stall_after_150: Some((Duration::from_secs(2), 425)),
        ..Behavior::default()
    })
    .await;
    server.put("f", b"x");
    let gateway = InProcess::start(
        server.addr,
        &["--data-timeout", "1", "--upstream-mode", "active"],
    );
    let mut client = FtpClient::login(gateway.addr).await;
    let at = client.epsv(gateway.addr).await;
    let _data = TcpStream::connect(at).await.unwrap();
    assert_eq!(code(&client.cmd("RETR f").await), 425);
    // Nothing reaches the client when the late reply comes.
    assert_eq!(client.reply_within(Duration::from_secs(3)).await, None);
    assert_eq!(code(&client.cmd("PWD").await), 257);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abor_during_a_transfer_gets_the_servers_two_replies() {
    let server = FakeServer::start(Behavior {
        chunk_delay: Some(Duration::from_millis(50)),
        ..Behavior::default()
    })
    .await;
    server.put("big", &content(64 * 1024 * 200));
    let gateway = InProcess::start(server.addr, &[]);
    let mut client = FtpClient::login(gateway.addr).await;
    let at = client.epsv(gateway.addr).await;
    let _stream = TcpStream::connect(at).await.unwrap();
    assert_eq!(code(&client.cmd("RETR big").await), 150);
    // The BSD way: IAC IP IAC as urgent data, then DM and ABOR.
    client.socket().send_out_of_band(b"\xff\xf4\xff").unwrap();
    client.send_raw(b"\xf2ABOR\r\n").await;
    assert_eq!(code(&client.reply().await), 426);
    assert_eq!(code(&client.reply().await), 226);
    // The server saw ABOR (not a broken connection), and the session goes on.
    assert!(server.received().iter().any(|l| l.ends_with("ABOR")));
    assert_eq!(code(&client.cmd("NOOP").await), 200);
    gateway
        .wait_metric(
            "ftp_proxy_transfers_total{direction=\"download\",result=\"aborted\"}",
            1.0,
        )
        .await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abor_answered_with_one_reply_does_not_desynchronise() {
    let server = FakeServer::start(Behavior {
        chunk_delay: Some(Duration::from_millis(50)),
        abor_one_reply: true,
        ..Behavior::default()
    })
    .await;
    server.put("big", &content(64 * 1024 * 200));
    let gateway = InProcess::start(server.addr, &[]);
    let mut client = FtpClient::login(gateway.addr).await;
    let at = client.epsv(gateway.addr).await;
    let _stream = TcpStream::connect(at).await.unwrap();
    assert_eq!(code(&client.cmd("RETR big").await), 150);
    // A stray interrupt-process byte without its IAC before ABOR.
    client.socket().send_out_of_band(b"\xf4").unwrap();
    client.send_raw(b"ABOR\r\n").await;
    // One reply from the server, for the cut transfer: 426 to the client.
    assert_eq!(code(&client.reply().await), 426);
    // Then every command gets its own reply.
    assert_eq!(code(&client.cmd("NOOP").await), 200);
    assert_eq!(code(&client.cmd("PWD").await), 257);
    gateway.stop().await;
}

/// Issue 11, item 3: commands during a transfer reach the server at once;
/// STAT is answered while the transfer runs (RFC 959 §4.1.3), the other
/// replies in the server's order, after the transfer's final reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_during_a_transfer_are_passed_on_at_once() {
    let server = FakeServer::start(Behavior {
        chunk_delay: Some(Duration::from_millis(100)),
        stat_during_transfer: true,
        ..Behavior::default()
    })
    .await;
    let data = content(64 * 1024 * 20);
    server.put("f", &data);
    let gateway = InProcess::start(server.addr, &[]);
    let mut client = FtpClient::login(gateway.addr).await;
    let at = client.epsv(gateway.addr).await;
    let stream = TcpStream::connect(at).await.unwrap();
    assert_eq!(code(&client.cmd("RETR f").await), 150);
    let reader = tokio::spawn(read_all(stream));
    let reply = client.cmd("STAT").await;
    assert_eq!(
        code(&reply),
        213,
        "STAT reports the transfer in progress: {reply}"
    );
    assert!(
        !reader.is_finished(),
        "STAT was answered during the transfer"
    );
    client.send("NOOP").await;
    assert_eq!(code(&client.reply().await), 226);
    assert_eq!(code(&client.reply().await), 200);
    assert_eq!(reader.await.unwrap(), data);
    gateway.stop().await;
}

/// A final reply that overtakes the data is held until the data is
/// delivered; a command sent meanwhile is answered after it. The server
/// sends 226 at once and the data over 1.5 s: without the hold the client
/// would see 226 long before the end of the data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_final_reply_waits_for_the_data() {
    let server = FakeServer::start(Behavior {
        early_226: true,
        chunk_delay: Some(Duration::from_millis(50)),
        ..Behavior::default()
    })
    .await;
    let data = content(64 * 1024 * 30);
    server.put("f", &data);
    let gateway = InProcess::start(server.addr, &[]);
    let mut client = FtpClient::login(gateway.addr).await;
    let at = client.epsv(gateway.addr).await;
    let stream = TcpStream::connect(at).await.unwrap();
    assert_eq!(code(&client.cmd("RETR f").await), 150);
    client.send("NOOP").await;
    let reader = tokio::spawn(async move {
        let data = read_all(stream).await;
        (data, Instant::now())
    });
    let reply = client.reply().await;
    let replied = Instant::now();
    assert_eq!(code(&reply), 226, "{reply}");
    let (got, done) = tokio::time::timeout(Duration::from_millis(500), reader)
        .await
        .expect("226 came long before the end of the data")
        .unwrap();
    assert_eq!(got, data);
    assert!(done <= replied + Duration::from_millis(500));
    assert_eq!(code(&client.reply().await), 200);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quit_closes_only_on_the_servers_221() {
    let server = FakeServer::start(Behavior::default()).await;
    let gateway = InProcess::start(server.addr, &[]);
    let mut client = FtpClient::login(gateway.addr).await;
    assert_eq!(code(&client.cmd("QUIT now").await), 501);
    assert_eq!(code(&client.cmd("NOOP").await), 200);
    assert_eq!(code(&client.cmd("QUIT").await), 221);
    assert_eq!(client.reply().await, "<closed>");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_commands_before_login_get_530_and_open_nothing() {
    let server = FakeServer::start(Behavior::default()).await;
    let gateway = InProcess::start(server.addr, &[]);
    let (mut client, _) = FtpClient::connect(gateway.addr).await;
    for line in [
        "PASV",
        "EPSV",
        "PORT 127,0,0,1,200,1",
        "EPRT |1|127.0.0.1|51201|",
        "LIST",
    ] {
        let reply = client.cmd(line).await;
        assert_eq!(code(&reply), 530, "{line}: {reply}");
    }
    assert_eq!(
        gateway
            .metric("ftp_proxy_rejected_total{reason=\"not_logged_in\"}")
            .await,
        5.0
    );
    // None of them reached the server.
    assert!(server.received().is_empty(), "{:?}", server.received());
    assert_eq!(code(&client.cmd("USER u").await), 331);
    assert_eq!(code(&client.cmd("PASS p").await), 230);
    assert_eq!(code(&client.cmd("EPSV").await), 229);
    gateway.stop().await;
}

/// A transfer the server refuses does not use up the arrangement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_transfer_keeps_the_pasv() {
    let server = FakeServer::start(Behavior::default()).await;
    server.put("f", b"hello");
    let gateway = InProcess::start(server.addr, &[]);
    let mut client = FtpClient::login(gateway.addr).await;
    let at = client.epsv(gateway.addr).await;
    assert_eq!(code(&client.cmd("RETR missing").await), 550);
    let stream = TcpStream::connect(at).await.unwrap();
    assert_eq!(code(&client.cmd("RETR f").await), 150);
    assert_eq!(read_all(stream).await, b"hello");
    assert_eq!(code(&client.reply().await), 226);
    // Used now.
    assert_eq!(code(&client.cmd("RETR f").await), 425);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_address_commands_get_501() {
    let server = FakeServer::start(Behavior::default()).await;
    let gateway = InProcess::start(server.addr, &[]);
    let mut client = FtpClient::login(gateway.addr).await;
    for line in ["PASV 1", "EPRT ||||", "EPRT |x|1.2.3.4|5000|", "PORT 1,2,3"] {
        let reply = client.cmd(line).await;
        assert_eq!(code(&reply), 501, "{line}: {reply}");
    }
    assert_eq!(code(&client.cmd("EPRT |3|x|5000|").await), 522);
    gateway.stop().await;
}

/// A client that connects and resets at once is the client's doing: it is
/// not counted as the server failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_resets_at_once_is_not_an_upstream_error() {
    let server = FakeServer::start(Behavior::default()).await;
    let gateway = InProcess::start(server.addr, &[]);
    for _ in 0..3 {
        let stream = std::net::TcpStream::connect(gateway.addr).unwrap();
        socket2::SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(stream);
    }
    // A real session afterwards, so that the resets have been handled.
    let mut client = FtpClient::login(gateway.addr).await;
    assert_eq!(code(&client.cmd("QUIT").await), 221);
    gateway
        .wait_metric("ftp_proxy_sessions_total{outcome=\"ok\"}", 1.0)
        .await;
    assert_eq!(
        gateway
            .metric("ftp_proxy_upstream_errors_total{reason=\"connect\"}")
            .await,
        0.0
    );
    gateway.stop().await;
}

/// Every label set is created at zero before the first event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_series_exist_from_the_start() {
    let server = FakeServer::start(Behavior::default()).await;
    let gateway = InProcess::start(server.addr, &[]);
    let (status, body) = gateway.http("/metrics").await;
    assert!(status.contains("200"), "{status}");
    for series in [
        "ftp_proxy_rejected_total{reason=\"not_logged_in\"} 0",
        "ftp_proxy_data_errors_total{kind=\"timeout\",side=\"client\"} 0",
        "ftp_proxy_sessions_total{client=\"plain\",outcome=\"shutdown\",server=\"tls\"} 0",
        "ftp_proxy_replies_total{class=\"5xx\"} 0",
        "ftp_proxy_flowtrack_map_errors_total{reason=\"ringbuf_full\"} 0",
        "ftp_proxy_data_connections_total{leg=\"server\",mode=\"listen\"} 0",
    ] {
        assert!(body.contains(series), "missing {series}");
    }
    gateway.wait_ready().await;
    gateway.stop().await;
}

/// The server unreachable: 421 with the reason, counted as the server's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_gets_421_with_the_reason() {
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = unused.local_addr().unwrap();
    drop(unused);
    let gateway = InProcess::start(addr, &[]);
    let (_client, banner) = FtpClient::connect(gateway.addr).await;
    assert_eq!(code(&banner), 421, "{banner}");
    assert!(banner.contains("refused"), "{banner}");
    gateway
        .wait_metric("ftp_proxy_upstream_errors_total{reason=\"connect\"}", 1.0)
        .await;
    gateway.stop().await;
}

/// SIGTERM's drain in process: an idle session gets 421, the gateway stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_tells_idle_sessions() {
    let server = FakeServer::start(Behavior::default()).await;
    let gateway = InProcess::start(server.addr, &[]);
    let mut client = FtpClient::login(gateway.addr).await;
    let stop = tokio::spawn(gateway.stop());
    let reply = client.reply().await;
    assert_eq!(code(&reply), 421, "{reply}");
    stop.await.unwrap();
}

/// Issue 13: with a pool, /readyz follows the servers' health: ready while
/// one is up, 503 once none is (while /healthz stays 200), and the
/// per-server series say which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_servers_health() {
    let server = FakeServer::start(Behavior::default()).await;
    let dead = {
        let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        unused.local_addr().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool.toml");
    std::fs::write(
        &path,
        format!(
            "[[servers]]\nname = \"a\"\naddress = \"{}\"\n\
             [[servers]]\nname = \"b\"\naddress = \"{dead}\"\n\
             [health]\ninterval = 1\ntimeout = 1\nrise = 1\nfall = 1\n",
            server.addr
        ),
    )
    .unwrap();
    let gateway = InProcess::start_with(&["--config", path.to_str().unwrap()]);
    gateway
        .wait_metric("ftp_proxy_upstream_up{server=\"b\"}", 0.0)
        .await;
    assert_eq!(
        gateway.metric("ftp_proxy_upstream_up{server=\"a\"}").await,
        1.0
    );
    gateway.wait_ready().await;
    // A session still reaches a server (the pool's first, for now).
    let client = FtpClient::login(gateway.addr).await;
    drop(client);
    drop(server);
    gateway
        .wait_metric("ftp_proxy_upstream_up{server=\"a\"}", 0.0)
        .await;
    let (status, body) = gateway.http("/readyz").await;
    assert!(
        status.contains("503") && body.contains("no server is up"),
        "{status} {body}"
    );
    let (status, _) = gateway.http("/healthz").await;
    assert!(status.contains("200"), "{status}");
    gateway.stop().await;
}
