//! FTPS toward ProFTPD with mod_tls (privileged tier), the second real
//! server after vsftpd (`tls.rs`): explicit and implicit, `TLSRequired`
//! on, and ProFTPD's default `TLSOptions`, which require every data
//! connection to reuse the control connection's TLS session (the
//! gateway's per-session store, `tls::store`, must keep it working
//! transfer after transfer). Plain, explicit and implicit clients through
//! the gateway, passive and active, RETR, STOR, LIST, REST and ABOR, each
//! transfer checked by SHA-256; `--server-data-tls client|required|clear`
//! against servers that require protected data and servers that allow
//! clear data (mod_tls's log says which data connections were TLS);
//! suppaftp and curl; and the same exchanges direct and through the
//! gateway, reply by reply.
//!
//! ProFTPD comes unpacked from Debian's packages (`FTPX_PEERS`, see
//! `common::proftpd`); without it these tests fail.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

mod common;

use common::certs::TestCa;
use common::*;
use serde_json::{Value, json};

/// mod_tls's line for a protected data connection that resumed the
/// control connection's session (one per connection; ProFTPD refuses the
/// others).
const REUSED: &str = "client reused TLS session for data connection";

/// The gateway's arguments toward a ProFTPD on `upstream` with TLS mode
/// `server_tls`, listening in clear on `listen` and implicit on
/// `implicit`, data ports from `ports`.
fn gateway_args(
    ca: &TestCa,
    listen: u16,
    implicit: u16,
    upstream: u16,
    server_tls: &str,
    ports: u16,
) -> Vec<String> {
    [
        "--listen",
        &format!("127.0.0.1:{listen}"),
        "--listen-implicit",
        &format!("127.0.0.1:{implicit}"),
        "--upstream",
        &format!("127.0.0.1:{upstream}"),
        "--passive-ports",
        &format!("{}-{}", ports, ports + 499),
        "--active-ports",
        &format!("{}-{}", ports + 500, ports + 999),
        "--tls-cert",
        TestCa::path(&ca.chain),
        "--tls-key",
        TestCa::path(&ca.key),
        "--server-tls",
        server_tls,
        "--server-ca",
        TestCa::path(&ca.ca),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn start_gateway(ns: &NetNs, args: &[String], extra: &[&str]) -> Gateway {
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.extend_from_slice(extra);
    Gateway::start(ns, &all)
}

/// ProFTPD explicit (127.0.0.1:2121) and implicit (2122), both with
/// `TLSRequired on` and session reuse required, and a gateway in front of
/// each (2100 and 2101; implicit clients 2190 and 2191).
struct ProLab {
    gateways: Vec<Gateway>,
    servers: Vec<Proftpd>,
    ca: TestCa,
    ns: NetNs,
}

const SERVER_MODES: [&str; 2] = ["explicit", "implicit"];

impl ProLab {
    fn new(extra: &[&str]) -> ProLab {
        let ns = NetNs::new();
        let ca = TestCa::new();
        let servers: Vec<Proftpd> = SERVER_MODES
            .iter()
            .enumerate()
            .map(|(i, mode)| {
                let options = if *mode == "implicit" {
                    "UseImplicitSSL"
                } else {
                    ""
                };
                Proftpd::start(
                    &ns,
                    format!("127.0.0.1:{}", 2121 + i).parse().unwrap(),
                    (30000 + 1000 * i as u16, 30999 + 1000 * i as u16),
                    &Proftpd::tls(&ca, "on", options),
                )
            })
            .collect();
        let gateways = SERVER_MODES
            .iter()
            .enumerate()
            .map(|(i, mode)| {
                let i16 = i as u16;
                let args = gateway_args(
                    &ca,
                    2100 + i16,
                    2190 + i16,
                    2121 + i16,
                    mode,
                    40000 + 1000 * i16,
                );
                start_gateway(&ns, &args, extra)
            })
            .collect();
        ProLab {
            gateways,
            servers,
            ca,
            ns,
        }
    }

    fn logs(&self) -> String {
        let mut all: Vec<String> = self.gateways.iter().map(Gateway::logs).collect();
        for s in &self.servers {
            all.push(s.log());
            all.push(s.tls_log());
        }
        all.join("\n")
    }

    fn python(&self, spec: Value) -> Vec<Value> {
        ftp_driver(&self.ns, &spec, &|| self.logs())
    }
}

/// A driver spec for a client in `client_mode` (plain, explicit,
/// implicit) to `port`, trusting the test authority.
fn spec(ca: &TestCa, client_mode: &str, port: u16, steps: Vec<Value>) -> Value {
    let mut spec = json!({"host": "127.0.0.1", "port": port, "timeout": 60, "steps": steps});
    if client_mode != "plain" {
        spec["tls"] = json!(client_mode);
        spec["cafile"] = json!(TestCa::path(&ca.ca));
    }
    spec
}

/// Plain, explicit and implicit clients through the gateway to ProFTPD
/// with explicit and implicit FTPS: ten data connections a session
/// (RETR and STOR in PASV, EPSV and PORT, LIST, REST, ABOR), each
/// transfer checked by SHA-256 at both ends. Every data connection toward
/// ProFTPD is protected and resumes the control connection's session
/// (ProFTPD refuses it otherwise), and every protected one toward a TLS
/// client resumes the client's.
#[test]
#[ignore = "privileged tier (root, network namespaces, ProFTPD, Python): cargo xtask test runs it"]
fn every_client_tls_mode_to_proftpd_with_tls() {
    let lab = ProLab::new(&[]);
    let size = 1 << 20;
    let content = pattern(size, 11);
    let digest = sha256(&content);
    for server in &lab.servers {
        server.put("f.bin", &content);
    }
    for (s, server_mode) in SERVER_MODES.iter().enumerate() {
        for client_mode in ["plain", "explicit", "implicit"] {
            let before = lab.servers[s].tls_log_count(REUSED);
            let port = if client_mode == "implicit" {
                2190 + s as u16
            } else {
                2100 + s as u16
            };
            let mut steps = vec![json!({"op": "connect"}), json!({"op": "login"})];
            if client_mode != "plain" {
                steps.push(json!({"op": "prot_p"}));
            }
            steps.push(json!({"op": "cmd", "line": "TYPE I"}));
            steps.push(json!({"op": "cmd", "line": "CWD pub"}));
            for mode in ["pasv", "epsv", "port"] {
                steps.push(json!({"op": "retr", "path": "f.bin", "mode": mode}));
                steps.push(json!({"op": "stor", "path": format!("up-{client_mode}-{mode}.bin"), "size": size, "seed": 11, "mode": mode}));
            }
            steps.push(json!({"op": "list", "mode": "epsv"}));
            steps.push(json!({"op": "list", "mode": "port"}));
            steps.push(
                json!({"op": "rest_retr", "path": "f.bin", "offset": size - 1000, "mode": "epsv"}),
            );
            steps.push(json!({"op": "abort", "path": "f.bin", "mode": "epsv", "after": 1}));
            steps.push(json!({"op": "cmd", "line": "NOOP"}));
            steps.push(json!({"op": "retr", "path": "f.bin", "mode": "pasv"}));
            steps.push(json!({"op": "quit"}));
            let results = lab.python(spec(&lab.ca, client_mode, port, steps));
            let context = format!("client {client_mode}, ProFTPD {server_mode}");
            let transfers =
                checked_transfers(&results, 10, client_mode, &digest, &context, || lab.logs());
            let listing = transfers.iter().find(|r| r["op"] == "list").unwrap();
            assert!(
                listing["size"].as_u64().unwrap() > 0,
                "{context}: {listing}"
            );
            let abort = results.iter().find(|r| r["op"] == "abort").unwrap();
            let codes: Vec<&str> = abort["abort_replies"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap_or(""))
                .collect();
            // The transfer's reply (426 if it was cut, 226 if all of it
            // had reached the client's socket), then ABOR's own; or 426
            // twice: ProFTPD cannot see an early ABOR under TLS (no urgent
            // data, and its peek for "ABOR" sees TLS records), so when it
            // reads the ABOR before its next write fails it answers "226
            // Abort successful" and then the transfer's 426, as it does
            // to a client directly; the gateway relays the first as the
            // transfer's reply, 426 since the data was cut (README).
            let code = |i: usize| codes.get(i).map(|c| c.get(..3).unwrap_or(""));
            assert!(
                codes.len() == 2
                    && matches!(
                        (code(0), code(1)),
                        (Some("426" | "226"), Some("226")) | (Some("426"), Some("426"))
                    ),
                "{context}: {abort}\n{}",
                lab.logs()
            );
            assert!(
                results.iter().any(|r| r["op"] == "cmd"
                    && r["reply"].as_str().unwrap_or("").starts_with("200 NOOP")),
                "{context}: the session goes on after ABOR: {results:#?}"
            );
            for mode in ["pasv", "epsv", "port"] {
                let path = lab.servers[s]
                    .public()
                    .join(format!("up-{client_mode}-{mode}.bin"));
                assert_eq!(sha256_file(&path), digest, "{context}: upload {mode}");
            }
            // Toward ProFTPD: every data connection (the ten transfers and
            // the aborted one) was TLS and resumed the control session.
            let tls_log = lab.servers[s].tls_log();
            assert!(
                !tls_log.contains("did not reuse"),
                "{context}: ProFTPD refused a data connection:\n{tls_log}"
            );
            assert_eq!(
                lab.servers[s].tls_log_count(REUSED) - before,
                11,
                "{context}: resumed data connections toward ProFTPD:\n{tls_log}"
            );
        }
    }
}

/// suppaftp (rustls) and curl (OpenSSL) through the gateway to ProFTPD:
/// several transfers on one control connection, each resuming toward
/// both sides.
#[test]
#[ignore = "privileged tier (root, network namespaces, ProFTPD, curl): cargo xtask test runs it"]
fn suppaftp_and_curl_to_proftpd_with_tls() {
    let lab = ProLab::new(&["--client-tls-reuse", "required"]);
    let content = pattern(300_000, 13);
    for server in &lab.servers {
        server.put("s.bin", &content);
    }
    let config = lab.ca.client_config();
    let got = lab.ns.enter(|| {
        let ftp = suppaftp::RustlsFtpStream::connect("127.0.0.1:2100").unwrap();
        let mut ftp = ftp
            .into_secure(suppaftp::RustlsConnector::from(config), "localhost")
            .unwrap();
        ftp.login("anonymous", "test@example.com").unwrap();
        ftp.transfer_type(suppaftp::types::FileType::Binary)
            .unwrap();
        let mut got = Vec::new();
        for i in 0..4 {
            got.push(ftp.retr_as_buffer("pub/s.bin").unwrap().into_inner());
            let mut up = std::io::Cursor::new(content.clone());
            ftp.put_file(format!("pub/supp-{i}.bin"), &mut up).unwrap();
        }
        let names = ftp.nlst(Some("pub")).unwrap();
        ftp.quit().unwrap();
        (got, names)
    });
    for g in &got.0 {
        assert_eq!(sha256(g), sha256(&content));
    }
    assert!(
        got.1.iter().any(|n| n.contains("supp-3.bin")),
        "{:?}",
        got.1
    );
    for i in 0..4 {
        assert_eq!(
            sha256_file(&lab.servers[0].public().join(format!("supp-{i}.bin"))),
            sha256(&content)
        );
    }
    // curl: explicit (--ssl-reqd) to the gateway in front of explicit
    // ProFTPD, implicit (ftps://) to the one in front of implicit
    // ProFTPD; three downloads on one connection, then an upload.
    let ca = TestCa::path(&lab.ca.ca);
    let upload = lab.ca.dir.path().join("upload.bin");
    std::fs::write(&upload, &content).unwrap();
    for (s, url) in [
        (0, "ftp://127.0.0.1:2100/pub/s.bin"),
        (1, "ftps://127.0.0.1:2191/pub/s.bin"),
    ] {
        let mut command = lab.ns.command("curl");
        command.args([
            "--silent",
            "--show-error",
            "--max-time",
            "60",
            "--cacert",
            ca,
        ]);
        if url.starts_with("ftp:") {
            command.arg("--ssl-reqd");
        }
        for _ in 0..3 {
            command.args(["-o", "-", url]);
        }
        let out = command.output().unwrap();
        assert!(
            out.status.success(),
            "{url}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            lab.logs()
        );
        assert_eq!(sha256(&out.stdout), sha256(&content.repeat(3)), "{url}");
        let target = url.replace("s.bin", "curl-up.bin");
        let mut command = lab.ns.command("curl");
        command.args([
            "--silent",
            "--show-error",
            "--max-time",
            "60",
            "--cacert",
            ca,
        ]);
        if url.starts_with("ftp:") {
            command.arg("--ssl-reqd");
        }
        let out = command
            .arg("-T")
            .arg(&upload)
            .arg(&target)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{target}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            sha256_file(&lab.servers[s].public().join("curl-up.bin")),
            sha256(&content)
        );
    }
    for server in &lab.servers {
        assert!(
            !server.tls_log().contains("did not reuse"),
            "{}",
            server.tls_log()
        );
    }
}

/// What a session's transfers should find toward the server.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Transfers succeed, data toward the server protected.
    Protected,
    /// Transfers succeed, data toward the server in clear.
    Clear,
    /// The server refuses clear data: the client gets its reply, and the
    /// session goes on.
    Refused,
}

/// `--server-data-tls`: `required` protects every server data
/// connection, also for a plain client; `client` follows the client's
/// `PROT`; `clear` never protects them. Against ProFTPD with `TLSRequired
/// on` (data must be protected) and with `TLSRequired ctrl` (data may be
/// clear), explicit and implicit (where protection is the server's
/// default, so that the gateway must say `PROT C` when it means clear).
/// mod_tls's log counts the protected data connections (each resumed).
#[test]
#[ignore = "privileged tier (root, network namespaces, ProFTPD, Python): cargo xtask test runs it"]
fn server_data_tls_policies_with_proftpd() {
    let ns = NetNs::new();
    let ca = TestCa::new();
    // (TLSRequired, TLSOptions, --server-tls)
    let kinds = [
        ("on", "", "explicit"),
        ("ctrl", "", "explicit"),
        ("ctrl", "UseImplicitSSL", "implicit"),
    ];
    let servers: Vec<Proftpd> = kinds
        .iter()
        .enumerate()
        .map(|(i, (required, options, _))| {
            Proftpd::start(
                &ns,
                format!("127.0.0.1:{}", 2121 + i).parse().unwrap(),
                (30000 + 1000 * i as u16, 30999 + 1000 * i as u16),
                &Proftpd::tls(&ca, required, options),
            )
        })
        .collect();
    let content = pattern(400_000, 17);
    let digest = sha256(&content);
    for s in &servers {
        s.put("d.bin", &content);
    }
    use Expect::*;
    // policy -> per server kind -> (plain client, TLS client with PROT P)
    let table: [(&str, [(Expect, Expect); 3]); 3] = [
        (
            "required",
            [
                (Protected, Protected),
                (Protected, Protected),
                (Protected, Protected),
            ],
        ),
        (
            "client",
            [(Refused, Protected), (Clear, Protected), (Clear, Protected)],
        ),
        (
            "clear",
            [(Refused, Refused), (Clear, Clear), (Clear, Clear)],
        ),
    ];
    for (policy, expectations) in table {
        for (s, (_, _, server_tls)) in kinds.iter().enumerate() {
            let i = s as u16;
            let args = gateway_args(
                &ca,
                2100 + i,
                2190 + i,
                2121 + i,
                server_tls,
                40000 + 1000 * i,
            );
            let gateway = start_gateway(&ns, &args, &["--server-data-tls", policy]);
            let logs = || {
                format!(
                    "{}\n{}\n{}",
                    gateway.logs(),
                    servers[s].log(),
                    servers[s].tls_log()
                )
            };
            for (client_mode, expect) in [
                ("plain", expectations[s].0),
                ("explicit", expectations[s].1),
            ] {
                let context = format!(
                    "--server-data-tls {policy}, ProFTPD TLSRequired {} {server_tls}, client {client_mode}",
                    kinds[s].0
                );
                let mut steps = vec![json!({"op": "connect"}), json!({"op": "login"})];
                if client_mode != "plain" {
                    steps.push(json!({"op": "prot_p"}));
                }
                steps.push(json!({"op": "cmd", "line": "TYPE I"}));
                for mode in ["epsv", "port", "pasv"] {
                    steps.push(json!({"op": "retr", "path": "pub/d.bin", "mode": mode}));
                }
                steps.push(json!({"op": "stor", "path": format!("pub/{policy}-{client_mode}.bin"), "size": content.len(), "seed": 17, "mode": "epsv"}));
                steps.push(json!({"op": "cmd", "line": "NOOP"}));
                steps.push(json!({"op": "quit"}));
                let before = servers[s].tls_log_count(REUSED);
                let results = ftp_driver(&ns, &spec(&ca, client_mode, 2100 + i, steps), &logs);
                let transfers: Vec<&Value> = results
                    .iter()
                    .filter(|r| matches!(r["op"].as_str(), Some("retr" | "stor")))
                    .collect();
                assert_eq!(transfers.len(), 4, "{context}: {results:#?}");
                let protected = servers[s].tls_log_count(REUSED) - before;
                match expect {
                    Protected | Clear => {
                        for r in &transfers {
                            assert!(
                                r["final"].as_str().unwrap_or("").starts_with("226"),
                                "{context}: {r}\n{}",
                                logs()
                            );
                            assert_eq!(r["sha256"], json!(digest), "{context}: {r}");
                        }
                        let want = if expect == Protected { 4 } else { 0 };
                        assert_eq!(
                            protected,
                            want,
                            "{context}: protected data connections toward ProFTPD\n{}",
                            logs()
                        );
                        assert_eq!(
                            sha256_file(
                                &servers[s]
                                    .public()
                                    .join(format!("{policy}-{client_mode}.bin"))
                            ),
                            digest,
                            "{context}"
                        );
                    }
                    Refused => {
                        // ProFTPD refuses the transfer in clear (522); the
                        // gateway relays it, and the session goes on.
                        for r in &transfers {
                            let error = r["error"].as_str().unwrap_or("");
                            assert!(error.contains("522"), "{context}: {r}\n{}", logs());
                        }
                        assert_eq!(protected, 0, "{context}");
                    }
                }
                assert!(
                    results.iter().any(|r| r["op"] == "cmd"
                        && r["reply"].as_str().unwrap_or("").starts_with("200 NOOP")),
                    "{context}: the session goes on: {results:#?}"
                );
            }
        }
    }
}

/// The reply codes of a driver run, one per step, named by the step's
/// command (`first/final` for a transfer).
fn codes(steps: &[Value], results: &[Value]) -> Vec<String> {
    steps
        .iter()
        .zip(results)
        .map(|(step, r)| {
            // A failed step is "error_perm: 550 ..." (the exception's
            // type, then ftplib's text, which starts with the reply).
            let error = r["error"]
                .as_str()
                .map(|e| e.split_once(": ").map_or(e, |(_, text)| text));
            let text = r["final"]
                .as_str()
                .or(r["reply"].as_str())
                .or(error)
                .unwrap_or("---");
            let mut code = text.get(..3).unwrap_or("---").to_owned();
            if let Some(first) = r["first"].as_str() {
                // A transfer: its two replies and what it moved.
                code = format!("{}/{code}/{}B", first.get(..3).unwrap_or("---"), r["size"]);
            }
            let name = match (step["line"].as_str(), step["path"].as_str()) {
                (Some(line), _) => line.to_owned(),
                (None, Some(path)) => format!("{} {path}", r["op"].as_str().unwrap_or("?")),
                (None, None) => r["op"].as_str().unwrap_or("?").to_owned(),
            };
            format!("{name} {code}")
        })
        .collect()
}

/// The same exchanges direct to ProFTPD with explicit FTPS and through
/// the gateway (which enforces TLS toward the client as ProFTPD does:
/// `--client-tls required --client-data-tls required`), reply by reply.
/// Differences by design are listed here and in the README.
#[test]
#[ignore = "privileged tier (root, network namespaces, ProFTPD, Python): cargo xtask test runs it"]
fn proftpd_direct_and_through_the_gateway_answer_alike() {
    let lab = ProLab::new(&["--client-tls", "required", "--client-data-tls", "required"]);
    lab.servers[0].put("f.txt", b"hello over TLS\n");
    let line = |l: &str| json!({"op": "cmd", "line": l});
    let before_login = vec![
        json!({"op": "connect"}),
        line("PWD"),
        line("PASV"),
        line("RETR pub/f.txt"),
        line("PBSZ 0"),
        line("PROT P"),
        line("SYST"),
        line("NOOP"),
        line("USER anonymous"),
        line("PASS test@example.com"),
        line("PWD"),
    ];
    let after_login = vec![
        json!({"op": "connect"}),
        json!({"op": "login"}),
        line("PBSZ 0"),
        line("PROT C"),
        line("PROT S"),
        // PBSZ 0 and PROT P; the data connections are TLS from here on.
        json!({"op": "prot_p"}),
        line("CCC"),
        line("AUTH TLS"),
        line("FEAT"),
        line("TYPE I"),
        line("CWD pub"),
        line("SIZE f.txt"),
        line("SIZE missing"),
        line("MDTM f.txt"),
        line("STRU F"),
        line("MODE S"),
        json!({"op": "retr", "path": "f.txt", "mode": "epsv"}),
        json!({"op": "retr", "path": "f.txt", "mode": "pasv"}),
        json!({"op": "retr", "path": "f.txt", "mode": "port"}),
        json!({"op": "stor", "path": "up.bin", "size": 1000, "mode": "epsv"}),
        json!({"op": "list", "mode": "epsv"}),
        json!({"op": "retr", "path": "missing", "mode": "epsv"}),
        line("REST 5"),
        json!({"op": "retr", "path": "f.txt", "mode": "epsv"}),
        line("PASV 1"),
        line("EPRT ||||"),
        line("EPRT |9|x|1|"),
        line("LPSV"),
        line("PORT 127,0,0,1,0,80"),
        line("STAT"),
        line("HELP"),
        line("REIN"),
        line("NOOP"),
        json!({"op": "quit"}),
    ];
    // (command, ProFTPD's code, the gateway's code)
    let by_design: &[(&str, &str, &str)] = &[
        // The gateway answers the malformed EPRT itself (RFC 2428).
        ("EPRT ||||", "522", "501"),
        // LPSV: 502 (not implemented) from the gateway, 500 (unknown)
        // from ProFTPD.
        ("LPSV", "500", "502"),
        // A PORT naming a port below 1024: ProFTPD's 500 ("Illegal PORT
        // command"), the gateway's 504 (bounce protection).
        ("PORT 127,0,0,1,0,80", "500", "504"),
        // A transfer before login: the gateway's 530, as for every
        // transfer and data command before login (vsftpd's answer);
        // ProFTPD with `TLSRequired on` checks `PROT` first (522).
        ("RETR pub/f.txt", "522", "530"),
    ];
    for steps in [before_login, after_login] {
        let direct = lab.python(spec(&lab.ca, "explicit", 2121, steps.clone()));
        let gateway = lab.python(spec(&lab.ca, "explicit", 2100, steps.clone()));
        let (d, g) = (codes(&steps, &direct), codes(&steps, &gateway));
        eprintln!("direct:  {d:?}\ngateway: {g:?}");
        assert_eq!(d.len(), g.len());
        // The banner is the server's, relayed.
        assert_eq!(direct[0]["reply"], gateway[0]["reply"]);
        for (dd, gg) in d.iter().zip(&g) {
            if dd == gg {
                continue;
            }
            let (command, dcode) = dd.rsplit_once(' ').unwrap();
            let gcode = gg.rsplit_once(' ').unwrap().1;
            assert!(
                by_design
                    .iter()
                    .any(|(c, x, y)| *c == command && *x == dcode && *y == gcode),
                "{command:?}: ProFTPD says {dcode}, the gateway {gcode} (not a difference by \
                 design)\ndirect:  {direct:#?}\ngateway: {gateway:#?}\n{}",
                lab.logs()
            );
        }
    }
}

/// `--server-tls-max-version`: with `auto` (the default) ProFTPD is
/// offered TLS 1.2 while server data connections may be protected, so
/// that every data connection can resume the control connection's
/// session; and 1.3 when none is (`--server-data-tls clear`). With `1.3`,
/// why `auto` is so: the gateway resumes each TLS 1.3 ticket once, and
/// ProFTPD sends a new one on a download's data connection but not on an
/// upload's, so its two first tickets are gone after two uploads in a
/// row and it refuses the third upload's data connection.
#[test]
#[ignore = "privileged tier (root, network namespaces, ProFTPD, Python): cargo xtask test runs it"]
fn server_tls_versions_with_proftpd() {
    let ns = NetNs::new();
    let ca = TestCa::new();
    let server = Proftpd::start(
        &ns,
        "127.0.0.1:2121".parse().unwrap(),
        (30000, 30999),
        &Proftpd::tls(&ca, "ctrl", ""),
    );
    let args = gateway_args(&ca, 2100, 2190, 2121, "explicit", 40000);
    let uploads = |gateway: &Gateway| {
        let mut steps = vec![
            json!({"op": "connect"}),
            json!({"op": "login"}),
            json!({"op": "cmd", "line": "TYPE I"}),
        ];
        for i in 0..4 {
            steps.push(json!({"op": "stor", "path": format!("pub/v{i}.bin"), "size": 100_000, "mode": "epsv"}));
        }
        steps.push(json!({"op": "quit"}));
        let logs = || format!("{}\n{}", gateway.logs(), server.tls_log());
        ftp_driver(&ns, &spec(&ca, "plain", 2100, steps), &logs)
            .into_iter()
            .filter(|r| r["op"] == "stor")
            .map(|r| {
                r["final"]
                    .as_str()
                    .or(r["error"].as_str())
                    .unwrap_or("")
                    .to_owned()
            })
            .collect::<Vec<String>>()
    };
    let versions = || {
        (
            server.tls_log_count("TLSv1.2 connection accepted"),
            server.tls_log_count("TLSv1.3 connection accepted"),
        )
    };
    // auto, data protected: TLS 1.2, any number of uploads.
    let gateway = start_gateway(&ns, &args, &[]);
    let replies = uploads(&gateway);
    assert!(
        replies.iter().all(|r| r.starts_with("226")),
        "{replies:?}\n{}",
        server.tls_log()
    );
    assert_eq!(versions(), (1, 0), "{}", server.tls_log());
    assert_eq!(server.tls_log_count(REUSED), 4, "{}", server.tls_log());
    drop(gateway);
    // auto, data in clear: TLS 1.3 on the control connection only.
    let gateway = start_gateway(&ns, &args, &["--server-data-tls", "clear"]);
    let replies = uploads(&gateway);
    assert!(replies.iter().all(|r| r.starts_with("226")), "{replies:?}");
    assert_eq!(versions(), (1, 1), "{}", server.tls_log());
    assert_eq!(
        server.tls_log_count(REUSED),
        4,
        "no data connection was TLS"
    );
    drop(gateway);
    // 1.3 with protected data: two uploads resume, the third finds no
    // ticket left and ProFTPD refuses its data connection: the client gets
    // 425, or, when the gateway cut the data connection while the client
    // was still sending, sees that first (ENOTCONN) and the 425 after.
    let gateway = start_gateway(&ns, &args, &["--server-tls-max-version", "1.3"]);
    let replies = uploads(&gateway);
    assert!(
        replies[0].starts_with("226")
            && replies[1].starts_with("226")
            && (replies[2].contains("425")
                || replies[2].contains("Transport endpoint is not connected")),
        "{replies:?}\n{}",
        server.tls_log()
    );
    assert!(server.tls_log().contains("did not reuse"));
}
