//! One suite, run against both relay modes: the contract is the same.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

/// Two connected pairs: (client application, gateway's client side) and
/// (gateway's server side, server application).
async fn pairs() -> ((TcpStream, TcpStream), (TcpStream, TcpStream)) {
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = TcpStream::connect(listener.local_addr().unwrap());
        let (a, b) = tokio::join!(connect, listener.accept());
        (a.unwrap(), b.unwrap().0)
    }
    (pair().await, pair().await)
}

fn options(mode: RelayMode) -> RelayOptions {
    RelayOptions {
        mode,
        pipe_size: 1 << 16,
        copy_buffer: 1 << 16,
        idle_timeout: Duration::from_secs(5),
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 256) as u8).collect()
}

async fn both_directions_with_counts(mode: RelayMode) {
    both_directions(options(mode)).await;
}

/// A megabyte per system call (the default pipe size): chunks larger than
/// the socket buffers, partial writes.
async fn both_directions_with_large_chunks(mode: RelayMode) {
    both_directions(RelayOptions {
        pipe_size: 1 << 20,
        copy_buffer: 1 << 20,
        ..options(mode)
    })
    .await;
}

async fn both_directions(options: RelayOptions) {
    let mode = options.mode;
    let ((mut client, gw_client), (gw_server, mut server)) = pairs().await;
    let mut relay = spawn(gw_client, gw_server, options);
    let up = pattern(3 << 20);
    let down = pattern(5 << 20 | 17);
    let (up2, down2) = (up.clone(), down.clone());
    let client_task = tokio::spawn(async move {
        let (mut r, mut w) = client.split();
        let write = async {
            w.write_all(&up2).await.unwrap();
            w.shutdown().await.unwrap()
        };
        let mut got = Vec::new();
        let read = r.read_to_end(&mut got);
        let (_, n) = tokio::join!(write, read);
        n.unwrap();
        got
    });
    let server_task = tokio::spawn(async move {
        let (mut r, mut w) = server.split();
        let write = async {
            w.write_all(&down2).await.unwrap();
            w.shutdown().await.unwrap()
        };
        let mut got = Vec::new();
        let read = r.read_to_end(&mut got);
        let (_, n) = tokio::join!(write, read);
        n.unwrap();
        got
    });
    assert_eq!(client_task.await.unwrap(), down);
    assert_eq!(server_task.await.unwrap(), up);
    let progress = relay.wait_all().await;
    // Every pair is on loopback, where auto copies.
    let want_method = if mode == RelayMode::Splice {
        Method::Splice
    } else {
        Method::Copy
    };
    assert!(
        matches!(progress.client_to_server, Flow::Finished { bytes, method } if bytes == up.len() as u64 && method == want_method),
        "{progress:?}"
    );
    assert!(
        matches!(progress.server_to_client, Flow::Finished { bytes, method } if bytes == down.len() as u64 && method == want_method),
        "{progress:?}"
    );
}

/// The seed's order: the server's last data carries its FIN, the gateway
/// passes it on after the last byte; the client keeps its side open, and its
/// FIN follows later.
async fn half_close_in_order(mode: RelayMode) {
    let ((mut client, gw_client), (gw_server, mut server)) = pairs().await;
    let mut relay = spawn(gw_client, gw_server, options(mode));
    server.write_all(b"readme contents").await.unwrap();
    server.shutdown().await.unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"readme contents");
    assert!(matches!(
        relay.wait(Direction::ServerToClient).await,
        Flow::Finished { bytes: 15, .. }
    ));
    // The client's direction is still open: data still flows after the
    // server's FIN, then the client's FIN reaches the server.
    assert!(!relay.progress().client_to_server.is_over());
    client.write_all(b"late").await.unwrap();
    client.shutdown().await.unwrap();
    let mut late = Vec::new();
    server.read_to_end(&mut late).await.unwrap();
    assert_eq!(late, b"late");
    assert!(matches!(
        relay.wait(Direction::ClientToServer).await,
        Flow::Finished { bytes: 4, .. }
    ));
}

async fn reset_is_propagated(mode: RelayMode) {
    let ((client, gw_client), (gw_server, mut server)) = pairs().await;
    let mut relay = spawn(gw_client, gw_server, options(mode));
    // The client dies with data unread: its kernel resets the connection.
    socket2::SockRef::from(&client)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(client);
    // The server keeps sending; it must learn of the failure quickly.
    let chunk = vec![0u8; 1 << 16];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let failed = loop {
        match tokio::time::timeout_at(deadline, server.write_all(&chunk)).await {
            Ok(Ok(())) => continue,
            Ok(Err(_)) => break true,
            Err(_) => break false,
        }
    };
    assert!(failed, "server never saw the reset");
    let progress = relay.wait_all().await;
    assert!(
        matches!(progress.server_to_client, Flow::Failed { .. })
            || matches!(progress.client_to_server, Flow::Failed { .. }),
        "{progress:?}"
    );
}

async fn idle_timeout_fails_both(mode: RelayMode) {
    let ((_client, gw_client), (gw_server, mut server)) = pairs().await;
    let mut opts = options(mode);
    opts.idle_timeout = Duration::from_millis(200);
    let mut relay = spawn(gw_client, gw_server, opts);
    let progress = tokio::time::timeout(Duration::from_secs(3), relay.wait_all())
        .await
        .unwrap();
    assert!(
        matches!(
            progress.server_to_client,
            Flow::Failed {
                error: RelayError::Idle(_),
                ..
            }
        ),
        "{progress:?}"
    );
    let mut buf = [0u8; 1];
    assert!(server.read(&mut buf).await.is_err() || buf == [0u8; 1]);
}

async fn drop_cuts_both(mode: RelayMode) {
    let ((mut client, gw_client), (gw_server, mut server)) = pairs().await;
    let relay = spawn(gw_client, gw_server, options(mode));
    drop(relay);
    let mut buf = [0u8; 8];
    let a = tokio::time::timeout(Duration::from_secs(2), client.read(&mut buf))
        .await
        .unwrap();
    let b = tokio::time::timeout(Duration::from_secs(2), server.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(a, Ok(0) | Err(_)) && matches!(b, Ok(0) | Err(_)));
}

macro_rules! suite {
    ($($name:ident),*) => {
        mod splice_mode { $( #[tokio::test] async fn $name() { super::$name(super::RelayMode::Splice).await } )* }
        mod copy_mode { $( #[tokio::test] async fn $name() { super::$name(super::RelayMode::Copy).await } )* }
        mod auto_mode { $( #[tokio::test] async fn $name() { super::$name(super::RelayMode::Auto).await } )* }
    };
}

#[test]
fn auto_copies_toward_this_host_and_splices_toward_others() {
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    let auto = |peer: &str, local: &str| method_for(RelayMode::Auto, ip(peer), ip(local));
    // Loopback, in either family and as a v4-mapped address.
    assert_eq!(auto("127.0.0.1", "127.0.0.1"), Method::Copy);
    assert_eq!(auto("127.0.0.3", "127.0.0.1"), Method::Copy);
    assert_eq!(auto("::1", "::1"), Method::Copy);
    assert_eq!(auto("::ffff:127.0.0.1", "::ffff:127.0.0.1"), Method::Copy);
    // The gateway's own address: a process on this host.
    assert_eq!(auto("192.0.2.10", "192.0.2.10"), Method::Copy);
    assert_eq!(auto("::ffff:192.0.2.10", "192.0.2.10"), Method::Copy);
    assert_eq!(auto("2001:db8::1", "2001:db8::1"), Method::Copy);
    // Another host.
    assert_eq!(auto("192.0.2.20", "192.0.2.10"), Method::Splice);
    assert_eq!(auto("2001:db8::2", "2001:db8::1"), Method::Splice);
    assert_eq!(auto("10.0.0.1", "127.0.0.1"), Method::Splice);
    // The fixed modes ignore the addresses.
    for (peer, local) in [("127.0.0.1", "127.0.0.1"), ("192.0.2.20", "192.0.2.10")] {
        assert_eq!(
            method_for(RelayMode::Splice, ip(peer), ip(local)),
            Method::Splice
        );
        assert_eq!(
            method_for(RelayMode::Copy, ip(peer), ip(local)),
            Method::Copy
        );
    }
}

#[test]
fn copy_buffer_grows_only_when_reads_fill_it() {
    let max = 1 << 20;
    // Small reads keep it small.
    assert_eq!(pump::grown(16 << 10, 61, max), 16 << 10);
    // Full reads double it, up to the maximum, in a few steps.
    let mut len = 16 << 10;
    let mut steps = 0;
    while len < max {
        len = pump::grown(len, len, max);
        steps += 1;
    }
    assert_eq!((len, steps), (max, 6));
    assert_eq!(pump::grown(max, max, max), max);
    // A maximum that is not a power of two is reached exactly.
    assert_eq!(pump::grown(16 << 10, 16 << 10, 20_000), 20_000);
}

suite!(
    both_directions_with_counts,
    both_directions_with_large_chunks,
    half_close_in_order,
    reset_is_propagated,
    idle_timeout_fails_both,
    drop_cuts_both
);
