//! FTPS toward clients in the unprivileged tier: the real wiring in this
//! process, TLS between the client and the gateway, the fake server behind
//! it in clear (TLS termination). A real client library (suppaftp with
//! rustls) for sessions and transfers; hand-driven control connections for
//! the RFC 4217 replies, implicit FTPS, resumption and the bad cases.
//! TLS toward servers and the other clients are in `tls.rs` (privileged).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

mod common;

use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use common::certs::TestCa;
use common::fake::{Behavior, FakeServer};
use common::inproc::{FtpClient, InProcess, code};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn tls_args(ca: &TestCa) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        TestCa::path(&ca.chain).into(),
        "--tls-key".into(),
        TestCa::path(&ca.key).into(),
    ]
}

fn start(server: &FakeServer, ca: &TestCa, extra: &[&str]) -> InProcess {
    let mut args = tls_args(ca);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    InProcess::start(server.addr, &args)
}

fn content(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i * 13 + i / 97) as u8).collect()
}

/// suppaftp, a real client with rustls: AUTH TLS, PBSZ, PROT P, then
/// several transfers each way, all on protected data connections that
/// resume the control connection's session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_client_over_explicit_tls() {
    let server = FakeServer::start(Behavior::default()).await;
    let data = content(700_000);
    server.put("f.bin", &data);
    let ca = TestCa::new();
    let gateway = start(&server, &ca, &["--client-tls-reuse", "required"]);
    let addr = gateway.addr;
    let config = ca.client_config();
    let expected = data.clone();
    tokio::task::spawn_blocking(move || {
        let ftp = suppaftp::RustlsFtpStream::connect(addr).unwrap();
        let mut ftp = ftp
            .into_secure(suppaftp::RustlsConnector::from(config), "localhost")
            .unwrap();
        ftp.login("user", "secret").unwrap();
        ftp.transfer_type(suppaftp::types::FileType::Binary)
            .unwrap();
        for i in 0..3 {
            let got = ftp.retr_as_buffer("f.bin").unwrap().into_inner();
            assert_eq!(got, expected, "download {i}");
            let mut up = Cursor::new(expected.clone());
            ftp.put_file(format!("up-{i}.bin"), &mut up).unwrap();
        }
        let listing = ftp.nlst(None).unwrap();
        assert!(
            listing.iter().any(|l| l.contains("up-2.bin")),
            "{listing:?}"
        );
        ftp.quit().unwrap();
    })
    .await
    .unwrap();
    for i in 0..3 {
        assert_eq!(server.get(&format!("up-{i}.bin")).unwrap(), data);
    }
    gateway
        .wait_metric("ftp_proxy_relay_total{mode=\"tls\"}", 7.0)
        .await;
    // Downloads, uploads and the listing, labelled by protection.
    gateway
        .wait_metric(
            "ftp_proxy_transfers_total{client=\"tls\",result=\"ok\",server=\"plain\"}",
            7.0,
        )
        .await;
    gateway
        .wait_metric(
            "ftp_proxy_sessions_total{client=\"tls\",outcome=\"ok\",server=\"plain\"}",
            1.0,
        )
        .await;
    assert_eq!(
        gateway
            .metric("ftp_proxy_tls_resumptions_refused_total{side=\"client\"}")
            .await,
        0.0
    );
    gateway.stop().await;
}

/// The RFC 4217 and RFC 2228 replies, before and after AUTH.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_commands_get_the_rfc_replies() {
    let server = FakeServer::start(Behavior::default()).await;
    let ca = TestCa::new();
    let gateway = start(&server, &ca, &[]);
    let (mut client, _) = FtpClient::connect(gateway.addr).await;
    for (line, want) in [
        ("PBSZ 0", 503),
        ("PROT P", 503),
        ("CCC", 533),
        ("ADAT x", 502),
        ("AUTH KERBEROS", 504),
    ] {
        assert_eq!(code(&client.cmd(line).await), want, "{line}");
    }
    let feat = client.cmd("FEAT").await;
    for feature in [" AUTH TLS", " PBSZ", " PROT"] {
        assert!(feat.contains(feature), "{feat}");
    }
    client.starttls(ca.client_config()).await;
    for (line, want) in [
        ("PROT P", 503),
        ("PBSZ x", 501),
        // A non-zero size is answered with the size TLS uses (RFC 4217 §8).
        ("PBSZ 1024", 200),
        ("PBSZ 0", 200),
        ("PROT S", 536),
        ("PROT E", 536),
        ("PROT Q", 504),
        ("PROT C", 200),
        ("PROT P", 200),
        ("CCC", 534),
        ("AUTH TLS", 503),
        ("USER user", 331),
        ("PASS secret", 230),
        ("REIN", 502),
        ("NOOP", 200),
    ] {
        assert_eq!(code(&client.cmd(line).await), want, "{line}");
    }
    gateway.stop().await;
}

/// TLS off: AUTH is refused and FEAT offers none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_certificate_tls_is_refused() {
    let server = FakeServer::start(Behavior::default()).await;
    let gateway = InProcess::start(server.addr, &[]);
    let (mut client, _) = FtpClient::connect(gateway.addr).await;
    assert_eq!(code(&client.cmd("AUTH TLS").await), 502);
    assert!(!client.cmd("FEAT").await.contains("AUTH"));
    gateway.stop().await;
}

/// --client-tls required and --client-data-tls required: the session
/// stays up and says what is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_tls_is_enforced_with_a_reason() {
    let server = FakeServer::start(Behavior::default()).await;
    server.put("f", b"x");
    let ca = TestCa::new();
    let gateway = start(
        &server,
        &ca,
        &["--client-tls", "required", "--client-data-tls", "required"],
    );
    let (mut client, _) = FtpClient::connect(gateway.addr).await;
    let reply = client.cmd("USER user").await;
    assert_eq!(code(&reply), 530, "{reply}");
    assert!(reply.contains("AUTH TLS"), "{reply}");
    client.starttls(ca.client_config()).await;
    assert_eq!(code(&client.cmd("USER user").await), 331);
    assert_eq!(code(&client.cmd("PASS secret").await), 230);
    assert_eq!(code(&client.cmd("PBSZ 0").await), 200);
    let reply = client.cmd("PROT C").await;
    assert_eq!(code(&reply), 534, "{reply}");
    let _ = client.epsv(gateway.addr).await;
    let reply = client.cmd("RETR f").await;
    assert_eq!(code(&reply), 521, "{reply}");
    assert_eq!(code(&client.cmd("PROT P").await), 200);
    assert_eq!(
        gateway
            .metric("ftp_proxy_rejected_total{reason=\"tls_required\"}")
            .await,
        3.0
    );
    gateway.stop().await;
}

/// Implicit FTPS: the handshake first, then the banner; data protected
/// by default. A plain client on that port is closed and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implicit_ftps_and_a_plain_client_on_its_port() {
    let server = FakeServer::start(Behavior::default()).await;
    server.put("f", b"implicit data");
    let ca = TestCa::new();
    let gateway = start(&server, &ca, &["--listen-implicit", "127.0.0.1:0"]);
    let implicit = gateway.implicit_addr.unwrap();
    let config = ca.client_config();
    let mut client = FtpClient::connect_implicit(implicit, Arc::clone(&config)).await;
    assert_eq!(code(&client.cmd("USER user").await), 331);
    assert_eq!(code(&client.cmd("PASS secret").await), 230);
    let at = client.epsv(gateway.addr).await;
    client.send("RETR f").await;
    let data = common::inproc::tls_data(at, Arc::clone(&config)).await;
    assert_eq!(code(&client.reply().await), 150);
    assert_eq!(common::inproc::read_all_tls(data).await, b"implicit data");
    assert_eq!(code(&client.reply().await), 226);
    // A plain client on the implicit port.
    let mut plain = TcpStream::connect(implicit).await.unwrap();
    plain.write_all(b"USER anonymous\r\n").await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "the gateway did not close the plain connection"
    );
    gateway
        .wait_metric(
            "ftp_proxy_tls_errors_total{reason=\"not_tls\",side=\"client\"}",
            1.0,
        )
        .await;
    gateway.stop().await;
}

/// --client-tls-reuse required: a data connection that does not resume the
/// control connection's session is refused with 425 and counted; one that
/// resumes works; the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_connection_that_does_not_resume_is_refused() {
    let server = FakeServer::start(Behavior::default()).await;
    server.put("f", b"secret data");
    let ca = TestCa::new();
    let gateway = start(&server, &ca, &["--client-tls-reuse", "required"]);
    let config = ca.client_config();
    let mut client = FtpClient::connect_tls(gateway.addr, Arc::clone(&config)).await;
    for line in ["USER user", "PASS secret", "PBSZ 0", "PROT P"] {
        client.cmd(line).await;
    }
    // A thief's handshake: another configuration, nothing to resume.
    let at = client.epsv(gateway.addr).await;
    client.send("RETR f").await;
    let thief = common::inproc::tls_data(at, ca.client_config()).await;
    assert_eq!(code(&client.reply().await), 150);
    let reply = client.reply().await;
    assert_eq!(code(&reply), 425, "{reply}");
    assert!(reply.contains("resume"), "{reply}");
    drop(thief);
    // The client's own data connection resumes.
    let at = client.epsv(gateway.addr).await;
    client.send("RETR f").await;
    let data = common::inproc::tls_data(at, Arc::clone(&config)).await;
    assert_eq!(code(&client.reply().await), 150);
    assert_eq!(common::inproc::read_all_tls(data).await, b"secret data");
    assert_eq!(code(&client.reply().await), 226);
    assert_eq!(
        gateway
            .metric("ftp_proxy_tls_resumptions_refused_total{side=\"client\"}")
            .await,
        1.0
    );
    gateway.stop().await;
}

/// Clear text after AUTH TLS, a handshake that never comes: the session
/// ends (the control connection can carry nothing), bounded in time,
/// counted; the gateway goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_handshakes_end_the_session_and_nothing_else() {
    let server = FakeServer::start(Behavior::default()).await;
    let ca = TestCa::new();
    let gateway = start(&server, &ca, &["--connect-timeout", "2"]);
    // Not TLS after 234.
    let (mut client, _) = FtpClient::connect(gateway.addr).await;
    assert_eq!(code(&client.cmd("AUTH TLS").await), 234);
    client.send("USER anonymous").await;
    // A TLS alert, then the end.
    assert!(client.closed_within(Duration::from_secs(10)).await);
    // Nothing after 234: bounded by the handshake timeout.
    let (mut client, _) = FtpClient::connect(gateway.addr).await;
    assert_eq!(code(&client.cmd("AUTH TLS").await), 234);
    assert!(client.closed_within(Duration::from_secs(10)).await);
    gateway
        .wait_metric(
            "ftp_proxy_tls_errors_total{reason=\"timeout\",side=\"client\"}",
            1.0,
        )
        .await;
    // Another session is served.
    let mut client = FtpClient::connect_tls(gateway.addr, ca.client_config()).await;
    assert_eq!(code(&client.cmd("USER user").await), 331);
    gateway.stop().await;
}

/// An implicit-FTPS "server" that only does the TLS handshake with the
/// certificate of `ca` (to see what the gateway says of it), then answers
/// 200 to every line, which it records.
async fn tls_listener(ca: &TestCa) -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&ca.chain)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(&ca.key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = Arc::clone(&lines);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let record = Arc::clone(&record);
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(stream).await {
                    let (rx, mut tx) = tokio::io::split(tls);
                    // A banner, then 200 to anything (PBSZ, PROT).
                    let _ = tx.write_all(b"220 hello\r\n").await;
                    let mut rx = tokio::io::BufReader::new(rx);
                    let mut line = String::new();
                    while let Ok(n) =
                        tokio::io::AsyncBufReadExt::read_line(&mut rx, &mut line).await
                    {
                        if n == 0 {
                            break;
                        }
                        record.lock().unwrap().push(line.trim_end().to_owned());
                        line.clear();
                        if tx.write_all(b"200 ok\r\n").await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
    });
    (addr, lines)
}

/// A server certificate that is expired, for another name, or from an
/// authority the gateway does not trust: the client gets 421 with the
/// reason, the failure is counted by reason, nothing else is affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_server_certificates_get_421_with_the_reason() {
    let trusted = TestCa::new();
    let cases = [
        (
            TestCa::with_leaf(&["localhost", "127.0.0.1"], Some(())),
            "certificate_expired",
        ),
        (
            TestCa::with_leaf(&["elsewhere.example"], None),
            "certificate_name",
        ),
        (TestCa::new(), "certificate_issuer"),
    ];
    for (server_ca, reason) in cases {
        // The authority the gateway trusts: the server's own, except in
        // the last case.
        let trust = if reason == "certificate_issuer" {
            &trusted
        } else {
            &server_ca
        };
        let (upstream, _) = tls_listener(&server_ca).await;
        let gateway = InProcess::start(
            upstream,
            &[
                "--server-tls",
                "implicit",
                "--server-ca",
                TestCa::path(&trust.ca),
            ],
        );
        let (_client, banner) = FtpClient::connect(gateway.addr).await;
        assert_eq!(code(&banner), 421, "{reason}: {banner}");
        assert!(banner.contains(reason), "{reason}: {banner}");
        gateway
            .wait_metric(
                &format!("ftp_proxy_tls_errors_total{{reason=\"{reason}\",side=\"server\"}}"),
                1.0,
            )
            .await;
        gateway.stop().await;
    }
    // With verification off, the same untrusted server is accepted.
    let server_ca = TestCa::new();
    let (upstream, _) = tls_listener(&server_ca).await;
    let gateway = InProcess::start(
        upstream,
        &["--server-tls", "implicit", "--server-tls-insecure"],
    );
    let (_client, banner) = FtpClient::connect(gateway.addr).await;
    assert_eq!(code(&banner), 220, "{banner}");
    gateway.stop().await;
}

/// Routing with TLS on both sides: AUTH TLS, PBSZ and PROT before USER are
/// the gateway's to answer; the PROT the server must hear
/// (`--server-data-tls client`) reaches it once USER has chosen it, before
/// USER itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_commands_before_a_routed_user() {
    let ca = TestCa::new();
    let (upstream, lines) = tls_listener(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.toml");
    std::fs::write(
        &path,
        format!(
            "[[servers]]\nname = \"a\"\naddress = \"{upstream}\"\n\
             [[routes]]\nusers = [\"alice\"]\nservers = [\"a\"]\n"
        ),
    )
    .unwrap();
    let mut args = tls_args(&ca);
    args.extend(
        [
            "--config",
            path.to_str().unwrap(),
            "--server-tls",
            "implicit",
            "--server-tls-insecure",
            "--server-data-tls",
            "client",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let gateway = InProcess::start_with(&args);
    let (mut client, banner) = FtpClient::connect(gateway.addr).await;
    assert_eq!(code(&banner), 220, "{banner}");
    let feat = client.cmd("FEAT").await;
    assert!(feat.contains("AUTH TLS"), "{feat}");
    client.starttls(ca.client_config()).await;
    assert_eq!(code(&client.cmd("PBSZ 0").await), 200);
    assert_eq!(code(&client.cmd("PROT P").await), 200);
    assert!(lines.lock().unwrap().is_empty(), "no server before USER");
    assert_eq!(code(&client.cmd("USER alice").await), 200);
    assert_eq!(*lines.lock().unwrap(), ["PBSZ 0", "PROT P", "USER alice"]);
    gateway.stop().await;
}

/// The data protection a session starts with is said to the server after
/// `PBSZ 0`: `PROT C` to an implicit server (which would otherwise protect
/// data connections the gateway opens in clear) with `clear`, or with
/// `client` and a plain client; `PROT P` with `client` and an implicit
/// client; and a later `AUTH SSL` (which implies `PROT P`) is passed on as
/// `PROT P`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_hears_the_protection_the_session_starts_with() {
    let ca = TestCa::new();
    async fn lines_after(lines: &std::sync::Mutex<Vec<String>>, n: usize) -> Vec<String> {
        for _ in 0..200 {
            if lines.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        lines.lock().unwrap().clone()
    }
    let gateway_to = |upstream: std::net::SocketAddr, policy: &str| {
        let mut args = tls_args(&ca);
        args.extend(
            [
                "--upstream",
                &upstream.to_string(),
                "--listen-implicit",
                "127.0.0.1:0",
                "--server-tls",
                "implicit",
                "--server-tls-insecure",
                "--server-data-tls",
                policy,
            ]
            .map(String::from),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        InProcess::start_with(&args)
    };
    // clear: PROT C, whatever the client.
    let (upstream, lines) = tls_listener(&ca).await;
    let gateway = gateway_to(upstream, "clear");
    let client = FtpClient::connect_implicit(gateway.implicit_addr.unwrap(), ca.client_config());
    let _client = client.await;
    assert_eq!(lines_after(&lines, 2).await, ["PBSZ 0", "PROT C"]);
    gateway.stop().await;
    // client: an implicit client's data connections are protected.
    let (upstream, lines) = tls_listener(&ca).await;
    let gateway = gateway_to(upstream, "client");
    let client = FtpClient::connect_implicit(gateway.implicit_addr.unwrap(), ca.client_config());
    let _client = client.await;
    assert_eq!(lines_after(&lines, 2).await, ["PBSZ 0", "PROT P"]);
    // A plain client's are not, until AUTH SSL.
    let (upstream, lines) = tls_listener(&ca).await;
    let gateway = gateway_to(upstream, "client");
    let (mut client, banner) = FtpClient::connect(gateway.addr).await;
    assert_eq!(code(&banner), 220, "{banner}");
    assert_eq!(lines_after(&lines, 2).await, ["PBSZ 0", "PROT C"]);
    client.starttls_with("AUTH SSL", ca.client_config()).await;
    assert_eq!(code(&client.cmd("NOOP").await), 200);
    assert_eq!(
        lines_after(&lines, 4).await,
        ["PBSZ 0", "PROT C", "PROT P", "NOOP"]
    );
    gateway.stop().await;
}
