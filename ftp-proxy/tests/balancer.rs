//! Several gateways behind a real L4 balancer, several real servers behind
//! each gateway (issue 13). One namespace, loopback addresses standing for
//! hosts:
//!
//! - the client, 127.0.0.10;
//! - HAProxy, 127.0.0.1: port 2100 balanced over the gateways' port 21
//!   with `send-proxy-v2` and `/readyz` health checks, and each gateway's
//!   passive range forwarded to it, also with a PROXY header (the
//!   load-balancing guide's option 3, for EPSV); PASV names each
//!   gateway's own address, reached directly (option 1);
//! - gateways g1 and g2, 127.0.2.1 and 127.0.2.2, trusting HAProxy's
//!   headers, each with the pool below, checked every second;
//! - vsftpd a and b, 127.0.1.1 and 127.0.1.2, each serving a `who.txt`
//!   that names it.
//!
//! Checked: sessions spread over both gateways and both servers; the
//! gateways see the real client (logs, the port-theft check of data
//! connections that come through HAProxy, PORT's bounce check); routing
//! by user; a server killed: sessions go on on the other; a gateway
//! stopped: sessions go on through the other. And, with a PROXY-aware
//! server, the server sees the real client too.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::inproc::metric_value;
use common::{Control, Gateway, Haproxy, NetNs, ProxiedFakeFtpd, Vsftpd, http_get};

const CLIENT: &str = "127.0.0.10";
const BALANCER: &str = "127.0.0.1:2100";

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// One gateway's settings: its address, and its passive and active ranges.
struct GatewaySpec {
    ip: &'static str,
    passive: (u16, u16),
    active: (u16, u16),
}

const G1: GatewaySpec = GatewaySpec {
    ip: "127.0.2.1",
    passive: (40000, 40049),
    active: (41000, 41049),
};
const G2: GatewaySpec = GatewaySpec {
    ip: "127.0.2.2",
    passive: (42000, 42049),
    active: (43000, 43049),
};

/// A gateway; `pool` holds the servers and anything else (`ebpf` too:
/// one flow tracker per namespace).
fn start_gateway(ns: &NetNs, dir: &std::path::Path, spec: &GatewaySpec, pool: &str) -> Gateway {
    let path = dir.join(format!("{}.toml", spec.ip));
    std::fs::write(
        &path,
        format!(
            "listen = [\"{ip}:21\"]\nmetrics = \"{ip}:9090\"\n\
             passive-address = \"{ip}\"\npassive-ports = \"{p0}-{p1}\"\n\
             active-ports = \"{a0}-{a1}\"\nproxy-protocol-from = [\"127.0.0.1/32\"]\n\
             drain-timeout = 5\n{pool}",
            ip = spec.ip,
            p0 = spec.passive.0,
            p1 = spec.passive.1,
            a0 = spec.active.0,
            a1 = spec.active.1,
        ),
    )
    .unwrap();
    Gateway::start(ns, &["--config", path.to_str().unwrap()])
}

/// HAProxy in front of the gateways: control balanced, passive ranges
/// forwarded to their gateway, PROXY v2 headers on everything.
fn haproxy_config(gateways: &[&GatewaySpec]) -> String {
    let mut text = String::from(
        "global\n    maxconn 2000\n\
         defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 60s\n\
         \x20   timeout server 60s\n    retries 3\n    option redispatch\n\
         frontend control\n    bind 127.0.0.1:2100\n    default_backend gateways\n\
         backend gateways\n    balance roundrobin\n    option httpchk GET /readyz\n",
    );
    for (i, g) in gateways.iter().enumerate() {
        text += &format!(
            "    server g{n} {ip}:21 send-proxy-v2 check port 9090 inter 200 fall 1 rise 1\n",
            n = i + 1,
            ip = g.ip
        );
    }
    for (i, g) in gateways.iter().enumerate() {
        text += &format!(
            "frontend data{n}\n    bind 127.0.0.1:{p0}-{p1}\n    default_backend data{n}\n\
             backend data{n}\n    server g{n} {ip} send-proxy-v2\n",
            n = i + 1,
            p0 = g.passive.0,
            p1 = g.passive.1,
            ip = g.ip
        );
    }
    text
}

/// The client's connections all leave from CLIENT.
fn connect(ns: &NetNs, to: SocketAddr) -> TcpStream {
    ns.connect_from(SocketAddr::new(CLIENT.parse().unwrap(), 0), to)
        .unwrap()
}

/// How the client asks for its data connection.
#[derive(Clone, Copy, Debug)]
enum Passive {
    /// EPSV: a port only; the client connects to the balancer, which
    /// forwards the gateway's range to it with a PROXY header.
    Epsv,
    /// PASV: the gateway names its own address; the client connects to it
    /// directly.
    Pasv,
}

/// Logs in as `user` through the balancer.
fn login(ns: &NetNs, user: &str) -> Control {
    let mut control = Control::from_stream(connect(ns, addr(BALANCER)));
    let reply = control.cmd(&format!("USER {user}"));
    assert!(reply.starts_with("331"), "{reply}");
    assert!(control.cmd("PASS test@example.com").starts_with("230"));
    control
}

/// `pub/who.txt` over a passive data connection.
fn retrieve(ns: &NetNs, control: &mut Control, how: Passive) -> String {
    let to = match how {
        Passive::Epsv => {
            let reply = control.cmd("EPSV");
            assert!(reply.starts_with("229"), "{reply}");
            let port: u16 = reply.split('|').nth(3).unwrap().parse().unwrap();
            SocketAddr::new("127.0.0.1".parse().unwrap(), port)
        }
        Passive::Pasv => {
            let reply = control.cmd("PASV");
            assert!(reply.starts_with("227"), "{reply}");
            let inside = reply.split(['(', ')']).nth(1).unwrap();
            let n: Vec<u16> = inside.split(',').map(|x| x.parse().unwrap()).collect();
            let ip = format!("{}.{}.{}.{}", n[0], n[1], n[2], n[3]);
            assert!(
                ip.starts_with("127.0.2."),
                "PASV names the gateway itself: {reply}"
            );
            SocketAddr::new(ip.parse().unwrap(), n[4] * 256 + n[5])
        }
    };
    let mut data = connect(ns, to);
    let first = control.cmd("RETR pub/who.txt");
    assert!(first.starts_with("150"), "{how:?}: {first}");
    let mut content = String::new();
    data.read_to_string(&mut content).unwrap();
    assert!(control.reply().starts_with("226"));
    content
}

/// A whole session through the balancer: login as `user`, `who.txt`,
/// QUIT. Returns the file.
fn fetch_who(ns: &NetNs, user: &str, how: Passive) -> String {
    let mut control = login(ns, user);
    let content = retrieve(ns, &mut control, how);
    assert!(control.cmd("QUIT").starts_with("221"));
    content
}

/// Active mode through the balancer: PORT names the client's own address,
/// which only a gateway that knows the real client accepts.
fn fetch_who_active(ns: &NetNs) -> String {
    let mut control = Control::from_stream(connect(ns, addr(BALANCER)));
    control.login();
    let listener: TcpListener = ns.listen(SocketAddr::new(CLIENT.parse().unwrap(), 0));
    let port = listener.local_addr().unwrap().port();
    let reply = control.cmd(&format!("PORT 127,0,0,10,{},{}", port / 256, port % 256));
    assert!(reply.starts_with("200"), "{reply}");
    control.send(b"RETR pub/who.txt\r\n");
    let (mut data, _) = listener.accept().unwrap();
    assert!(control.reply().starts_with("150"));
    let mut content = String::new();
    data.read_to_string(&mut content).unwrap();
    assert!(control.reply().starts_with("226"));
    content
}

fn metric(ns: &NetNs, gateway: &GatewaySpec, selector: &str) -> f64 {
    let (_, body) = http_get(ns, addr(&format!("{}:9090", gateway.ip)), "/metrics");
    metric_value(&body, selector)
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "privileged: namespaces, vsftpd, HAProxy; run by `cargo xtask test`"]
fn gateways_behind_haproxy_in_front_of_a_pool() {
    let ns = NetNs::new();
    let start_a = || {
        let a = Vsftpd::start(&ns, addr("127.0.1.1:21"), (30000, 30049));
        a.put("who.txt", b"server a\n");
        a
    };
    let mut a = start_a();
    let b = Vsftpd::start(&ns, addr("127.0.1.2:21"), (31000, 31049));
    b.put("who.txt", b"server b\n");
    let dir = tempfile::tempdir().unwrap();
    // "ftp" and "anonymous" are vsftpd's two anonymous logins: ftp is
    // routed to b; anonymous goes anywhere, or where `@server` says.
    let pool = "ebpf = \"off\"\nbalance = \"round-robin\"\nunknown-users = \"pool\"\n\
                allow-user-at-server = true\n\
                [[servers]]\nname = \"a\"\naddress = \"127.0.1.1:21\"\n\
                [[servers]]\nname = \"b\"\naddress = \"127.0.1.2:21\"\n\
                [health]\ninterval = 1\ntimeout = 1\nrise = 1\nfall = 1\n\
                [[routes]]\nusers = [\"ftp\"]\nservers = [\"b\"]\n";
    let mut g1 = start_gateway(&ns, dir.path(), &G1, pool);
    let g2 = start_gateway(&ns, dir.path(), &G2, pool);
    let _haproxy = Haproxy::start(&ns, &haproxy_config(&[&G1, &G2]), addr(BALANCER));
    // HAProxy marks both up after their first /readyz.
    std::thread::sleep(Duration::from_millis(600));

    // Spread: anonymous sessions reach both servers through both gateways,
    // over EPSV (through HAProxy) and PASV (to the gateway directly).
    let seen: Vec<String> = (0..8)
        .map(|i| {
            let how = if i % 4 < 2 {
                Passive::Epsv
            } else {
                Passive::Pasv
            };
            fetch_who(&ns, "anonymous", how)
        })
        .collect();
    for server in ["server a\n", "server b\n"] {
        assert!(
            seen.iter().any(|s| s == server),
            "{server:?} never seen: {seen:?}"
        );
    }
    for g in [&G1, &G2] {
        assert!(
            metric(&ns, g, "ftp_proxy_sessions_total") >= 1.0,
            "no session through {}",
            g.ip
        );
    }
    // Counted on each server too: its log has the downloads.
    for (name, server) in [("a", &a), ("b", &b)] {
        let downloads = server.log().matches("OK DOWNLOAD").count();
        assert!(downloads >= 1, "server {name}: {}", server.log());
    }
    // The gateways saw the real client, not HAProxy.
    assert!(g1.count_logs(&format!("{CLIENT}:")) > 0, "{}", g1.logs());
    assert_eq!(
        metric(&ns, &G1, "ftp_proxy_rejected_total{reason=\"port_theft\"}")
            + metric(&ns, &G2, "ftp_proxy_rejected_total{reason=\"port_theft\"}"),
        0.0
    );
    // PORT to the client's own address is no bounce.
    for _ in 0..2 {
        assert!(fetch_who_active(&ns).starts_with("server "));
    }
    // Routing by user, checked by content.
    for how in [Passive::Epsv, Passive::Pasv] {
        assert_eq!(fetch_who(&ns, "ftp", how), "server b\n");
        assert_eq!(fetch_who(&ns, "anonymous@a", how), "server a\n");
    }

    // Server a dies under a session: that session ends (421 or closed),
    // every new session succeeds on b.
    let mut on_a = login(&ns, "anonymous@a");
    assert_eq!(retrieve(&ns, &mut on_a, Passive::Epsv), "server a\n");
    a.kill();
    let reply = on_a.cmd("PWD");
    assert!(
        reply.starts_with("421") || reply == "<closed>",
        "a session on a dead server: {reply}"
    );
    for i in 0..4 {
        let how = if i % 2 == 0 {
            Passive::Epsv
        } else {
            Passive::Pasv
        };
        assert_eq!(fetch_who(&ns, "anonymous", how), "server b\n");
    }
    for g in [&G1, &G2] {
        wait_for("server a down", || {
            metric(&ns, g, "ftp_proxy_upstream_up{server=\"a\"}") == 0.0
        });
    }
    // Restarted, it comes back after `rise` checks.
    let _a = start_a();
    for g in [&G1, &G2] {
        wait_for("server a up again", || {
            metric(&ns, g, "ftp_proxy_upstream_up{server=\"a\"}") == 1.0
        });
    }
    assert_eq!(fetch_who(&ns, "anonymous@a", Passive::Pasv), "server a\n");

    // Gateway g1 stops: HAProxy's check sees /readyz fail, sessions go on
    // through g2.
    g1.signal("TERM");
    assert!(
        g1.wait(Duration::from_secs(10)).is_some(),
        "g1 did not exit"
    );
    let before = metric(&ns, &G2, "ftp_proxy_sessions_total");
    for i in 0..4 {
        let how = if i % 2 == 0 {
            Passive::Epsv
        } else {
            Passive::Pasv
        };
        assert!(fetch_who(&ns, "anonymous", how).starts_with("server "));
    }
    assert_eq!(metric(&ns, &G2, "ftp_proxy_sessions_total"), before + 4.0);
    drop(g2);
}

/// The server sees the real client too: HAProxy's header to the gateway,
/// the gateway's own header to a PROXY-aware server (whose health checks
/// send LOCAL headers). `/flows` names the real client beside the flows,
/// whose peer is HAProxy.
#[test]
#[ignore = "privileged: namespaces, HAProxy; run by `cargo xtask test`"]
fn the_server_sees_the_real_client_through_balancer_and_gateway() {
    let ns = NetNs::new();
    let server = ProxiedFakeFtpd::start(&ns, addr("127.0.1.1:21"));
    let dir = tempfile::tempdir().unwrap();
    let _g1 = start_gateway(
        &ns,
        dir.path(),
        &G1,
        "upstream = \"127.0.1.1:21\"\nserver-proxy-protocol = \"v2\"\nebpf = \"required\"\n\
         [health]\ninterval = 1\ntimeout = 1\n",
    );
    let _haproxy = Haproxy::start(&ns, &haproxy_config(&[&G1]), addr(BALANCER));
    std::thread::sleep(Duration::from_millis(600));
    let mut stream = connect(&ns, addr(BALANCER));
    let port = stream.local_addr().unwrap().port();
    let mut banner = [0u8; 3];
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.read_exact(&mut banner).unwrap();
    assert_eq!(&banner, b"220");
    let (_, flows) = http_get(&ns, addr(&format!("{}:9090", G1.ip)), "/flows");
    let flows: serde_json::Value = serde_json::from_str(&flows).unwrap();
    let want_client = format!("{CLIENT}:{port}");
    let legs: Vec<&str> = flows["flows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["proxied_client"] == want_client.as_str())
        .map(|f| f["leg"].as_str().unwrap())
        .collect();
    assert!(
        legs.contains(&"client_control") && legs.contains(&"server_control"),
        "{flows}"
    );
    stream.write_all(b"QUIT\r\n").unwrap();
    // (HAProxy's start-up probe came from 127.0.0.1 and shows as such.)
    let want = format!("{CLIENT} {port}");
    wait_for("the client in the server's log", || {
        server.clients().contains(&want)
    });
    assert!(
        server.clients().iter().all(|c| !c.starts_with("127.0.2.")),
        "the gateway's own address reached the server: {:?}",
        server.clients()
    );
}
