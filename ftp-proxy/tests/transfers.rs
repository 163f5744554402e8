//! Every transfer checked by SHA-256 at both ends: sizes 0, 1, 65,537 and
//! 256 MiB, content holding every byte value, both directions, PASV, EPSV,
//! PORT and EPRT, over IPv4 and IPv6, with each `--upstream-mode`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

mod common;

use common::*;
use serde_json::json;

const SIZES: [usize; 3] = [0, 1, 65_537];
const BIG: usize = 256 << 20;

fn seed(size: usize) -> u8 {
    (size % 251) as u8
}

/// Runs downloads and uploads of every size in every mode and checks both ends.
fn matrix(lab: &Lab, host: &str, modes: &[&str], sizes: &[usize]) {
    let server = lab.upstream();
    for &size in sizes {
        if size >= BIG {
            write_pattern_file(
                &server.public().join(format!("f-{size}.bin")),
                size,
                seed(size),
            );
        } else {
            server.put(&format!("f-{size}.bin"), &pattern(size, seed(size)));
        }
    }
    let mut steps = vec![
        json!({"op": "connect"}),
        json!({"op": "login"}),
        json!({"op": "cmd", "line": "TYPE I"}),
        json!({"op": "cmd", "line": "CWD pub"}),
    ];
    let mut expect = Vec::new();
    for &mode in modes {
        for &size in sizes {
            steps.push(json!({"op": "retr", "path": format!("f-{size}.bin"), "mode": mode}));
            expect.push(("retr", mode, size));
            steps.push(json!({"op": "stor", "path": format!("up-{mode}-{size}.bin"), "size": size, "seed": seed(size), "mode": mode}));
            expect.push(("stor", mode, size));
        }
    }
    steps.push(json!({"op": "quit"}));
    let results = lab.python(json!({"host": host, "port": 2100, "timeout": 120, "steps": steps}));
    for (i, (op, mode, size)) in expect.into_iter().enumerate() {
        let r = &results[i + 4];
        let want = if size >= BIG {
            sha256_file(&server.public().join(format!("f-{size}.bin")))
        } else {
            sha256(&pattern(size, seed(size)))
        };
        assert!(
            r["final"].as_str().is_some_and(|f| f.starts_with("226")),
            "{op} {mode} {size}: {r}\n{}\nvsftpd's log:\n{}",
            lab.gateway.logs(),
            server.log()
        );
        assert_eq!(r["size"], size, "{op} {mode} {size}: {r}");
        assert_eq!(
            r["sha256"].as_str().unwrap(),
            want,
            "{op} {mode} {size}: client side"
        );
        if op == "stor" {
            let stored = server.public().join(format!("up-{mode}-{size}.bin"));
            assert_eq!(
                sha256_file(&stored),
                want,
                "{op} {mode} {size}: server side"
            );
            std::fs::remove_file(stored).unwrap();
        }
    }
}

const V4_MODES: [&str; 4] = ["pasv", "epsv", "port", "eprt"];
const V6_MODES: [&str; 2] = ["epsv", "eprt"];

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn ipv4_mirror_mode() {
    let lab = Lab::new(&["--upstream-mode", "client"]);
    matrix(&lab, "127.0.0.1", &V4_MODES, &SIZES);
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn ipv4_upstream_passive() {
    let lab = Lab::new(&["--upstream-mode", "passive"]);
    matrix(&lab, "127.0.0.1", &V4_MODES, &SIZES);
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn ipv4_upstream_active() {
    let lab = Lab::new(&["--upstream-mode", "active"]);
    matrix(&lab, "127.0.0.1", &V4_MODES, &SIZES);
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn ipv6_mirror_mode() {
    let lab = Lab::with_upstream(SERVER6, &["--upstream-mode", "client"]);
    matrix(&lab, "::1", &V6_MODES, &SIZES);
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn ipv6_upstream_passive() {
    let lab = Lab::with_upstream(SERVER6, &["--upstream-mode", "passive"]);
    matrix(&lab, "::1", &V6_MODES, &SIZES);
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn ipv6_upstream_active() {
    let lab = Lab::with_upstream(SERVER6, &["--upstream-mode", "active"]);
    matrix(&lab, "::1", &V6_MODES, &SIZES);
}

/// 256 MiB both ways, passive and active on the client side, through the
/// splice relay (forced: on loopback the default copies).
#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn large_transfers_ipv4() {
    let lab = Lab::new(&["--relay-mode", "splice"]);
    matrix(&lab, "127.0.0.1", &["pasv", "port"], &[BIG]);
    lab.gateway.expect_logs("\"bytes\":268435456", 4);
    lab.gateway.expect_logs("\"relay\":\"splice\"", 4);
}

/// The default relay mode copies toward peers on this host; and the forced
/// copy mode with a small buffer, which many reads fill.
#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn large_transfers_ipv6_and_forced_modes() {
    let lab = Lab::with_upstream(SERVER6, &["--upstream-mode", "active"]);
    matrix(&lab, "::1", &["epsv"], &[BIG]);
    lab.gateway.expect_logs("\"relay\":\"copy\"", 2);
    drop(lab);
    let lab = Lab::new(&[
        "--upstream-mode",
        "passive",
        "--relay-mode",
        "copy",
        "--copy-buffer",
        "65536",
    ]);
    matrix(&lab, "127.0.0.1", &["eprt"], &[BIG]);
    lab.gateway.expect_logs("\"relay\":\"copy\"", 2);
}

/// `--relay-mode sockmap` (the kernel relays; an experiment): every size,
/// every client mode, byte-exact; the large ones redirected by the kernel
/// (short ones whose server closed before the link go through splice).
#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn sockmap_relay_mode() {
    let lab = Lab::new(&["--relay-mode", "sockmap"]);
    matrix(&lab, "127.0.0.1", &V4_MODES, &SIZES);
    matrix(&lab, "127.0.0.1", &["pasv", "port"], &[BIG]);
    // The four large transfers at least (a short one may be linked too).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while lab.gateway.count_logs("\"relay\":\"sockmap\"") < 4
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(
        lab.gateway.count_logs("\"relay\":\"sockmap\"") >= 4,
        "{}",
        lab.gateway.logs()
    );
}
