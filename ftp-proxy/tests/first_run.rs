//! The newcomer's first run (issue 11, item 9): `cargo xtask run` as the
//! README says, in a network namespace of its own (its ports are the
//! demo's fixed ones), then a curl through the gateway, then Ctrl-C (SIGINT
//! to the process group, as a terminal sends it): it starts without a
//! warning, serves the demo file, and leaves nothing running.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::NetNs;

#[test]
#[ignore = "privileged tier (root, network namespaces, vsftpd, curl): cargo xtask test runs it"]
fn cargo_xtask_run_serves_the_demo_and_stops_on_ctrl_c() {
    let ns = NetNs::new();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let mut child = ns
        .command(env!("CARGO"))
        .args(["xtask", "run"])
        .current_dir(root)
        // Nothing to download: what the tests were built with is enough.
        .env("CARGO_NET_OFFLINE", "true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Its own process group, so that SIGINT reaches cargo, xtask, the
        // gateway and vsftpd together, as Ctrl-C in a terminal does.
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = child.id();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The release build may take minutes on a cold target directory.
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut lines = Vec::new();
    while !lines
        .iter()
        .any(|l: &String| l.contains("listening") && l.contains("2121"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(e) => panic!("the gateway did not start ({e}):\n{}", lines.join("\n")),
        }
    }
    let out = ns
        .command("curl")
        .args(["--silent", "--show-error", "--max-time", "30"])
        .arg("ftp://127.0.0.1:2121/pub/readme.txt")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Welcome to the ftp-proxy demo"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Ctrl-C. (Not `/usr/bin/kill -INT -PGID`: procps' kill reads that as
    // kill(-1), every process.)
    let group = rustix::process::Pid::from_raw(pgid as i32).unwrap();
    rustix::process::kill_process_group(group, rustix::process::Signal::INT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "cargo xtask run did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(2)) {
        lines.push(line);
    }
    // Nothing of the run is left in the namespace.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = common::run(std::process::Command::new("ip").args(["netns", "pids", &ns.name]));
        if pids.stdout.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left running: {}",
            String::from_utf8_lossy(&pids.stdout)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Started without a warning.
    let warnings: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains(" WARN ") || l.contains("\"level\":\"WARN\""))
        .collect();
    assert!(warnings.is_empty(), "warnings at start: {warnings:#?}");
}
