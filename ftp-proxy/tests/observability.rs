//! Metrics and operations: the HTTP endpoint, a real Prometheus server
//! scraping the gateway, the Grafana dashboard's queries, the alert rules,
//! and the signals (SIGTERM drain, SIGHUP reload).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const METRICS: &str = "127.0.0.1:9121";

fn http_get(lab_ns: &NetNs, path: &str) -> (u16, String) {
    let mut s = lab_ns.connect(METRICS.parse().unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn http_endpoint_statuses_and_slow_clients() {
    let lab = Lab::new(&["--metrics", METRICS]);
    assert_eq!(http_get(&lab.ns, "/healthz").0, 200);
    assert_eq!(http_get(&lab.ns, "/readyz").0, 200);
    assert_eq!(http_get(&lab.ns, "/nope").0, 404);
    let (status, body) = http_get(&lab.ns, "/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("ftp_proxy_sessions_active"), "{body}");
    // Wrong method.
    let mut s = lab.ns.connect(METRICS.parse().unwrap()).unwrap();
    s.write_all(
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(
        out.starts_with("HTTP/1.1 405") && out.to_ascii_lowercase().contains("allow: get, head"),
        "{out}"
    );
    // A malformed request gets 400.
    let mut bad = lab.ns.connect(METRICS.parse().unwrap()).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    bad.write_all(b"HELLO THERE\x00\x01\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = bad.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    // Headers beyond the bound are refused, not buffered.
    let mut huge = lab.ns.connect(METRICS.parse().unwrap()).unwrap();
    huge.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = huge.write_all(
        format!(
            "GET /metrics HTTP/1.1\r\nX-Big: {}\r\n\r\n",
            "a".repeat(64 * 1024)
        )
        .as_bytes(),
    );
    let mut out = String::new();
    let _ = huge.read_to_string(&mut out);
    assert!(
        out.is_empty() || out.starts_with("HTTP/1.1 431") || out.starts_with("HTTP/1.1 400"),
        "{out}"
    );
    // A client sending one byte a second is cut off, not served forever.
    let mut slow = lab.ns.connect(METRICS.parse().unwrap()).unwrap();
    slow.set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let started = Instant::now();
    let mut cut = false;
    for byte in
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n"
    {
        if slow.write_all(&[*byte]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
        let mut probe = [0u8; 1];
        slow.set_nonblocking(true).unwrap();
        let closed = matches!(slow.read(&mut probe), Ok(0) | Ok(_));
        slow.set_nonblocking(false).unwrap();
        if closed {
            cut = true;
            break;
        }
    }
    assert!(cut, "slow client never cut off");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "cut off after {:?}",
        started.elapsed()
    );
    // Meanwhile and after, the endpoint still answers.
    assert_eq!(http_get(&lab.ns, "/healthz").0, 200);
}

fn promtool(args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask setup)");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn promtool_accepts_metrics_and_rules() {
    let lab = Lab::new(&["--metrics", METRICS]);
    lab.server.put("x.bin", &pattern(1000, 1));
    lab.python(json!({"host": "127.0.0.1", "port": 2100, "steps": [
        {"op": "connect"}, {"op": "login"}, {"op": "retr", "path": "pub/x.bin"}, {"op": "cmd", "line": "PORT 8,8,8,8,1,1"}, {"op": "quit"}]}));
    let (_, body) = http_get(&lab.ns, "/metrics");
    let out = promtool(&["check", "metrics"], Some(&body));
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = repo("deploy/prometheus/alerts.yml");
    let out = promtool(&["check", "rules", rules.to_str().unwrap()], None);
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Prometheus server in the namespace, scraping the gateway every second.
struct Prometheus {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(ns: &NetNs) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, format!("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: ftp-proxy\n    static_configs:\n      - targets: ['{METRICS}']\n")).unwrap();
        let child = ns
            .command("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .args(["--web.listen-address=127.0.0.1:9090", "--log.level=warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (cargo xtask setup)");
        let p = Prometheus { child, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while ns.connect("127.0.0.1:9090".parse().unwrap()).is_err() {
            assert!(Instant::now() < deadline, "prometheus did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        p
    }

    fn query(ns: &NetNs, expr: &str) -> serde_json::Value {
        let out = ns
            .command("curl")
            .args([
                "-s",
                "--max-time",
                "10",
                "http://127.0.0.1:9090/api/v1/query",
                "--data-urlencode",
            ])
            .arg(format!("query={expr}"))
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{expr}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
    }

    /// Waits until the query returns a single value equal to `want`.
    fn wait_value(ns: &NetNs, expr: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = Prometheus::query(ns, expr);
            let got = v["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|s| s.parse::<f64>().ok());
            if got == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{expr}: want {want}, last answer {v}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn prometheus_scrapes_what_the_test_caused_and_the_dashboard_has_data() {
    let lab = Lab::new(&["--metrics", METRICS]);
    let prometheus = Prometheus::start(&lab.ns);
    let sizes = [1000usize, 65_537, 300_000];
    for (i, size) in sizes.iter().enumerate() {
        lab.server.put(&format!("f{i}.bin"), &pattern(*size, 2));
    }
    Prometheus::wait_value(&lab.ns, "up{job=\"ftp-proxy\"}", 1.0);
    let results = lab.python(json!({"host": "127.0.0.1", "port": 2100, "steps": [
        {"op": "connect"}, {"op": "login"}, {"op": "cmd", "line": "CWD pub"},
        {"op": "retr", "path": "f0.bin", "mode": "pasv"},
        {"op": "retr", "path": "f1.bin", "mode": "port"},
        {"op": "retr", "path": "f2.bin", "mode": "epsv"},
        {"op": "stor", "path": "up.bin", "size": 5000, "mode": "eprt"},
        {"op": "cmd", "line": "PORT 8,8,8,8,19,137"},
        {"op": "quit"}]}));
    assert!(results[3]["final"].as_str().unwrap().starts_with("226"));
    Prometheus::wait_value(
        &lab.ns,
        "sum(ftp_proxy_transfers_total{direction=\"download\",result=\"ok\"})",
        3.0,
    );
    Prometheus::wait_value(
        &lab.ns,
        "ftp_proxy_transfer_bytes_total{direction=\"download\"}",
        sizes.iter().sum::<usize>() as f64,
    );
    Prometheus::wait_value(
        &lab.ns,
        "sum(ftp_proxy_transfers_total{direction=\"upload\",result=\"ok\"})",
        1.0,
    );
    Prometheus::wait_value(&lab.ns, "ftp_proxy_rejected_total{reason=\"bounce\"}", 1.0);
    Prometheus::wait_value(&lab.ns, "ftp_proxy_logins_total{result=\"ok\"}", 1.0);
    Prometheus::wait_value(
        &lab.ns,
        "sum(ftp_proxy_commands_total{command=\"RETR\"})",
        3.0,
    );
    // Let rate() windows fill with at least two samples after the traffic.
    std::thread::sleep(Duration::from_secs(3));
    // Every PromQL expression of the Grafana dashboard returns data.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo("deploy/grafana/ftp-proxy-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(
        exprs.len() >= 10,
        "dashboard has too few queries: {exprs:?}"
    );
    for expr in exprs {
        let expr = expr
            .replace("$__rate_interval", "1m")
            .replace("$__interval", "1m")
            .replace("$__range", "5m")
            .replace("${__rate_interval}", "1m");
        let v = Prometheus::query(&lab.ns, &expr);
        assert_eq!(v["status"], "success", "{expr}: {v}");
        assert!(
            !v["data"]["result"].as_array().unwrap().is_empty(),
            "dashboard query returns no data: {expr}"
        );
    }
    drop(prometheus);
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                if k == "expr" {
                    if let Some(s) = v.as_str() {
                        out.push(s.to_owned());
                    }
                } else {
                    collect_exprs(v, out);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| collect_exprs(i, out)),
        _ => {}
    }
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn sigterm_lets_a_256_mib_transfer_finish_then_exits_0() {
    let mut lab = Lab::new(&["--drain-timeout", "120"]);
    let size = 256 << 20;
    write_pattern_file(&lab.server.public().join("big.bin"), size, 7);
    let want = sha256_file(&lab.server.public().join("big.bin"));
    let mut control = Control::connect(&lab.ns, GATEWAY4);
    control.login();
    let mut data = control.epsv_download(&lab.ns, "127.0.0.1", "RETR pub/big.bin");
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0usize;
    let mut signalled = false;
    loop {
        let n = data.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        sha2::Digest::update(&mut hasher, &buf[..n]);
        total += n;
        if !signalled && total > 8 << 20 {
            lab.gateway.signal("TERM");
            signalled = true;
            // Slow down a little so the transfer is surely in flight.
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert_eq!(total, size);
    let got: String = sha2::Digest::finalize(hasher)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(got, want);
    let done = control.reply();
    assert!(done.starts_with("226"), "{done}");
    // At its next safe point the session is closed.
    let bye = control.reply();
    assert!(bye.starts_with("421") || bye == "<closed>", "{bye}");
    let status = lab
        .gateway
        .wait(Duration::from_secs(30))
        .expect("gateway did not exit");
    assert_eq!(status.code(), Some(0), "{}", lab.gateway.logs());
}

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn sighup_reloads_for_new_sessions_and_refuses_invalid_files() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gw.toml");
    let write = |range: &str| {
        std::fs::write(
            &config,
            format!("upstream = \"{SERVER4}\"\npassive-ports = \"{range}\"\n"),
        )
        .unwrap()
    };
    write("40000-40009");
    let ns = NetNs::new();
    let server = Vsftpd::start(&ns, SERVER4.parse().unwrap(), (30000, 30049));
    let gateway = Gateway::start(
        &ns,
        &["--listen", GATEWAY4, "--config", config.to_str().unwrap()],
    );
    let pasv_port = |c: &mut Control| -> u16 {
        let reply = c.cmd("EPSV");
        reply.split('|').nth(3).unwrap().parse().unwrap()
    };
    let mut old = Control::connect(&ns, GATEWAY4);
    old.login();
    assert!((40000..=40009).contains(&pasv_port(&mut old)));
    write("45000-45009");
    gateway.signal("HUP");
    gateway.expect_logs("configuration reloaded", 1);
    let mut new = Control::connect(&ns, GATEWAY4);
    new.login();
    assert!(
        (45000..=45009).contains(&pasv_port(&mut new)),
        "new sessions use the new file"
    );
    assert!(
        (40000..=40009).contains(&pasv_port(&mut old)),
        "running sessions keep theirs"
    );
    // An invalid file is refused and the running configuration kept.
    std::fs::write(&config, "upstream = \"h\"\npassive-ports = \"9-1\"\n").unwrap();
    gateway.signal("HUP");
    gateway.expect_logs("invalid configuration refused", 1);
    let mut third = Control::connect(&ns, GATEWAY4);
    third.login();
    assert!((45000..=45009).contains(&pasv_port(&mut third)));
    drop(server);
}
