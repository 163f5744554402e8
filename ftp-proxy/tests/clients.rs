//! Real clients through the gateway to vsftpd: curl (passive and active),
//! lftp, and Python's ftplib, over the commands people use.

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

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn bytes(out: &std::process::Output) -> Vec<u8> {
    ok(out);
    out.stdout.clone()
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn curl_passive_and_active() {
    let lab = Lab::new(&[]);
    let content = pattern(300_000, 3);
    lab.server.put("file.bin", &content);
    let url = format!("ftp://{GATEWAY4}/pub/");
    // Passive (EPSV first, as curl does), listing and download.
    let listing = ok(&lab.curl(&["--list-only", &url]));
    assert!(listing.contains("file.bin"), "{listing}");
    let out = lab.curl(&[&format!("{url}file.bin")]);
    assert_eq!(sha256(&out.stdout), sha256(&content));
    // Plain PASV.
    let out = lab.curl(&["--disable-epsv", &format!("{url}file.bin")]);
    assert_eq!(sha256(&out.stdout), sha256(&content));
    // Active (-P): EPRT then PORT.
    let out = lab.curl(&["-P", "127.0.0.1", &format!("{url}file.bin")]);
    assert_eq!(sha256(&bytes(&out)), sha256(&content));
    let out = lab.curl(&[
        "-P",
        "127.0.0.1",
        "--disable-eprt",
        &format!("{url}file.bin"),
    ]);
    assert_eq!(sha256(&out.stdout), sha256(&content));
    // Upload, passive and active.
    let upload = lab.ns.listen("127.0.0.1:0".parse().unwrap());
    drop(upload);
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("up.bin");
    std::fs::write(&local, pattern(123_457, 9)).unwrap();
    ok(&lab.curl(&[
        "-T",
        local.to_str().unwrap(),
        &format!("{url}up-passive.bin"),
    ]));
    ok(&lab.curl(&[
        "-P",
        "127.0.0.1",
        "-T",
        local.to_str().unwrap(),
        &format!("{url}up-active.bin"),
    ]));
    for name in ["up-passive.bin", "up-active.bin"] {
        assert_eq!(
            sha256_file(&lab.server.public().join(name)),
            sha256(&pattern(123_457, 9)),
            "{name}"
        );
    }
    // Resume (REST) and quote commands: DELE.
    ok(&lab.curl(&[
        "-Q",
        "DELE pub/up-active.bin",
        &format!("ftp://{GATEWAY4}/"),
    ]));
    assert!(!lab.server.public().join("up-active.bin").exists());
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn curl_over_ipv6() {
    let lab = Lab::with_upstream(SERVER6, &[]);
    let content = pattern(70_000, 1);
    lab.upstream().put("six.bin", &content);
    let url = format!("ftp://{GATEWAY6}/pub/six.bin");
    let out = lab.curl(&["-g", &url]);
    assert_eq!(sha256(&bytes(&out)), sha256(&content));
    let out = lab.curl(&["-g", "-P", "::1", &url]);
    assert_eq!(sha256(&bytes(&out)), sha256(&content));
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn lftp_session() {
    let lab = Lab::new(&[]);
    lab.server.put("a.txt", b"alpha\n");
    lab.server.put("big.bin", &pattern(2_000_000, 5));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    std::fs::write(dir.path().join("local.bin"), pattern(777_777, 2)).unwrap();
    for passive in ["on", "off"] {
        let script = format!(
            "set ftp:passive-mode {passive}; cd pub; ls; get a.txt -o {d}/a-{passive}.txt; get big.bin -o {d}/big-{passive}.bin; \
             put {d}/local.bin -o up-{passive}.bin; mkdir newdir-{passive}; rmdir newdir-{passive}; \
             mv up-{passive}.bin moved-{passive}.bin; quote SIZE moved-{passive}.bin; quote MDTM moved-{passive}.bin; pwd"
        );
        let out = lab.lftp(&format!("ftp://{GATEWAY4}"), &script);
        let stdout = ok(&out);
        assert!(
            stdout.contains("a.txt") && stdout.contains("big.bin"),
            "{stdout}"
        );
        assert!(
            stdout.contains("213 777777"),
            "SIZE through the gateway: {stdout}"
        );
        assert_eq!(
            std::fs::read(dir.path().join(format!("a-{passive}.txt"))).unwrap(),
            b"alpha\n"
        );
        assert_eq!(
            sha256_file(&dir.path().join(format!("big-{passive}.bin"))),
            sha256(&pattern(2_000_000, 5))
        );
        assert_eq!(
            sha256_file(&lab.server.public().join(format!("moved-{passive}.bin"))),
            sha256(&pattern(777_777, 2))
        );
    }
    // Resume a partial download (REST + RETR).
    std::fs::write(
        dir.path().join("partial.bin"),
        &pattern(2_000_000, 5)[..500_000],
    )
    .unwrap();
    let out = lab.lftp(
        &format!("ftp://{GATEWAY4}"),
        &format!("cd pub; get -c big.bin -o {d}/partial.bin"),
    );
    ok(&out);
    assert_eq!(
        sha256_file(&dir.path().join("partial.bin")),
        sha256(&pattern(2_000_000, 5))
    );
    assert!(
        lab.server.log().contains("REST 500000"),
        "lftp resumed with REST"
    );
}

/// Every command of the list through ftplib, checking each reply.
#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn ftplib_command_set() {
    let lab = Lab::new(&[]);
    lab.server.put("f.txt", b"0123456789");
    lab.server.put("big.bin", &pattern(64 << 20, 4));
    let results = lab.python(json!({
        "host": "127.0.0.1", "port": 2100,
        "steps": [
            {"op": "connect"},
            {"op": "login"},
            {"op": "cmd", "line": "PWD"},
            {"op": "cmd", "line": "CWD pub"},
            {"op": "cmd", "line": "TYPE I"},
            {"op": "list", "mode": "pasv"},
            {"op": "nlst", "mode": "port"},
            {"op": "mlsd", "mode": "epsv"},
            {"op": "retr", "path": "f.txt", "mode": "eprt"},
            {"op": "stor", "path": "s.bin", "size": 65537, "mode": "pasv"},
            {"op": "appe", "path": "s.bin", "size": 1, "mode": "port"},
            {"op": "stou", "size": 10, "mode": "epsv"},
            {"op": "cmd", "line": "SIZE s.bin"},
            {"op": "cmd", "line": "MDTM s.bin"},
            {"op": "cmd", "line": "REST 4"},
            {"op": "retr", "path": "f.txt", "mode": "pasv"},
            {"op": "cmd", "line": "MKD d"},
            {"op": "cmd", "line": "RMD d"},
            {"op": "cmd", "line": "RNFR s.bin"},
            {"op": "cmd", "line": "RNTO r.bin"},
            {"op": "cmd", "line": "DELE f.txt"},
            {"op": "abort", "path": "big.bin", "mode": "pasv", "after": 1048576},
            {"op": "cmd", "line": "NOOP"},
            {"op": "retr", "path": "r.bin", "mode": "port"},
            {"op": "cmd", "line": "FEAT"},
            {"op": "quit"}
        ]
    }));
    let r = |i: usize| results[i].clone();
    let reply = |i: usize| r(i)["reply"].as_str().unwrap_or_default().to_owned();
    assert!(reply(1).starts_with("230"), "{:?}", r(1));
    assert!(reply(2).starts_with("257"), "{:?}", r(2));
    assert!(reply(3).starts_with("250"));
    assert!(
        r(5)["final"].as_str().unwrap().starts_with("226"),
        "{:?}",
        r(5)
    );
    assert!(
        r(6)["final"].as_str().unwrap().starts_with("226"),
        "{:?}",
        r(6)
    );
    // vsftpd has no MLSD: the server's 500 comes back instead of a 1xx.
    assert!(
        r(7).get("error")
            .is_some_and(|e| e.as_str().unwrap().contains("500")),
        "{:?}",
        r(7)
    );
    assert_eq!(r(8)["sha256"], sha256(b"0123456789"));
    assert!(
        r(9)["final"].as_str().unwrap().starts_with("226"),
        "{:?}",
        r(9)
    );
    assert!(
        r(10)["final"].as_str().unwrap().starts_with("226"),
        "{:?}",
        r(10)
    );
    assert!(
        r(11)["first"].as_str().unwrap().starts_with("150"),
        "{:?}",
        r(11)
    );
    assert_eq!(reply(12), "213 65538");
    assert!(reply(13).starts_with("213 "));
    assert!(reply(14).starts_with("350"));
    assert_eq!(
        r(15)["sha256"],
        sha256(b"456789"),
        "REST then RETR resumes at the offset"
    );
    assert!(reply(16).starts_with("257"));
    assert!(reply(17).starts_with("250"));
    assert!(reply(18).starts_with("350"));
    assert!(reply(19).starts_with("250"));
    assert!(reply(20).starts_with("250"));
    // ABOR mid-transfer: the transfer's reply then the ABOR's.
    let abort = r(21);
    let replies: Vec<&str> = abort["abort_replies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        replies[0].starts_with("426") || replies[0].starts_with("226"),
        "{abort:?}"
    );
    assert!(
        replies[1].starts_with("225") || replies[1].starts_with("226"),
        "{abort:?}"
    );
    assert!(
        reply(22).starts_with("200"),
        "the session goes on after ABOR: {:?}",
        r(22)
    );
    let stored = [pattern(65537, 0), pattern(1, 0)].concat();
    assert_eq!(r(23)["sha256"], sha256(&stored));
    let feat = reply(24);
    assert!(
        feat.contains("EPSV") && feat.contains("EPRT") && !feat.contains("AUTH"),
        "{feat}"
    );
    assert!(reply(25).starts_with("221"));
    assert_eq!(
        sha256_file(&lab.server.public().join("r.bin")),
        sha256(&stored)
    );
}
