//! The HTTP endpoint's probes under load (issue 13, item 7), in the
//! unprivileged tier: the gateway's real wiring in this process (as
//! `tests/inprocess.rs`), 1,000 connections held on its metrics port by a
//! runtime of their own, and `/healthz` and `/readyz` timed. A test binary
//! of its own, so that no other test shares the CPU with it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::fake::{Behavior, FakeServer};
use common::inproc::InProcess;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Connections held: every fifth one slow, the others idle.
const HELD: usize = 1000;

/// One GET on a fresh connection: the status line, within `within`.
async fn probe(addr: SocketAddr, path: &str, within: Duration) -> String {
    tokio::time::timeout(within, async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        String::from_utf8_lossy(&response)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    })
    .await
    .unwrap_or_else(|_| panic!("{path} did not answer within {within:?}"))
}

/// Holds one connection to `addr` until `stop`, reopening it whenever the
/// gateway closes it: idle, or sending a request one byte a second.
async fn hold(
    addr: SocketAddr,
    slow: bool,
    opened: tokio::sync::mpsc::UnboundedSender<()>,
    stop: CancellationToken,
) {
    let mut first = true;
    while !stop.is_cancelled() {
        let Ok(mut stream) = TcpStream::connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if std::mem::take(&mut first) {
            let _ = opened.send(());
        }
        if slow {
            for byte in b"GET /metrics HTTP/1.1\r\nHost: t\r\nX-Slow: aaaaaaaa\r\n\r\n" {
                if stream.write_all(&[*byte]).await.is_err() {
                    break;
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        } else {
            let mut buf = [0u8; 64];
            tokio::select! {
                () = stop.cancelled() => return,
                _ = stream.read(&mut buf) => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `/healthz` and `/readyz` answer within a second while 1,000 connections
/// are held on the metrics port, 800 idle and 200 sending a request one
/// byte a second; the holders reopen whatever the gateway closes, so the
/// pressure lasts. (With the accept loop that waited for one of 64 slots,
/// the first probe waited for the holders' 5 s header timeouts in turn.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_within_a_second_while_a_thousand_connections_are_held() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    let _ = setrlimit(Resource::Nofile, limit);
    let server = FakeServer::start(Behavior::default()).await;
    let gateway = InProcess::start(server.addr, &[]);
    let addr = gateway.metrics_addr;
    // Ready once the gateway accepts sessions.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !probe(addr, "/readyz", Duration::from_secs(5))
        .await
        .contains("200")
    {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The holders run on a runtime of their own, so that the gateway's
    // workers serve the gateway only.
    let stop = CancellationToken::new();
    let (opened_tx, mut opened) = tokio::sync::mpsc::unbounded_channel();
    let holders = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let mut set = tokio::task::JoinSet::new();
                for i in 0..HELD {
                    set.spawn(hold(addr, i % 5 == 0, opened_tx.clone(), stop.clone()));
                }
                drop(opened_tx);
                while set.join_next().await.is_some() {}
            });
        })
    };
    for _ in 0..HELD {
        opened.recv().await.unwrap();
    }
    // Several rounds over a few seconds: the held connections time out,
    // are shed and come back in between.
    let mut worst = Duration::ZERO;
    for _ in 0..10 {
        for path in ["/healthz", "/readyz"] {
            let started = Instant::now();
            let status = probe(addr, path, Duration::from_secs(1)).await;
            assert!(status.contains("200"), "{path}: {status}");
            worst = worst.max(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    eprintln!("worst probe: {worst:?}");
    // The rest of the endpoint still works under the same pressure.
    assert!(
        probe(addr, "/metrics", Duration::from_secs(5))
            .await
            .contains("200")
    );
    stop.cancel();
    tokio::task::spawn_blocking(move || holders.join().unwrap())
        .await
        .unwrap();
    assert!(
        gateway
            .metric("ftp_proxy_http_connections_shed_total")
            .await
            > 0.0
    );
    gateway.stop().await;
}
