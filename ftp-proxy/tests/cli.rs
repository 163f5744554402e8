//! The binary's command line: help, configuration checks, exit codes.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

use std::process::Command;

fn gateway(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ftp-proxy"))
        .args(args)
        .output()
        .unwrap()
}

/// Every option clap knows is in `--help` and in the README's table; the
/// list comes from clap, so a new option cannot be forgotten.
#[test]
fn help_and_readme_document_every_option() {
    use clap::CommandFactory;
    let out = gateway(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let command = ftp_proxy::config::Cli::command();
    let options: Vec<&str> = command
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|long| !matches!(*long, "help" | "version"))
        .collect();
    assert!(options.len() > 20, "{options:?}");
    for long in options {
        let option = format!("--{long}");
        assert!(help.contains(&option), "--help lacks {option}:\n{help}");
        assert!(
            readme.contains(&format!("`{option}")),
            "the README does not document {option}"
        );
    }
}

#[test]
fn bad_configuration_exits_64_before_binding() {
    // The listen port is taken by nothing: if the gateway bound it, it would
    // keep running; it must exit at once with 64 and say what is wrong.
    for (args, needle) in [
        (&["--listen", "127.0.0.1:0"][..], "missing upstream"),
        (
            &["--upstream", "h", "--passive-ports", "9-1"],
            "passive-ports",
        ),
        (&["--upstream", "h", "--listen", "nowhere"], "listen"),
        (
            &["--upstream", "h", "--upstream-mode", "sideways"],
            "sideways",
        ),
        (
            &["--upstream", "h", "--config", "/nonexistent.toml"],
            "/nonexistent.toml",
        ),
        (&["--bogus"], "--bogus"),
    ] {
        let out = gateway(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

/// Issue 13: a route naming a server that is not in the pool, and two
/// servers with one name, exit 64 naming the key, before anything is bound.
#[test]
fn pool_mistakes_exit_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool.toml");
    let servers = "[[servers]]\nname = \"a\"\naddress = \"h:21\"\n";
    for (text, needle) in [
        (
            format!("{servers}[[routes]]\nusers = [\"alice\"]\nservers = [\"b\"]\n"),
            "routes.servers",
        ),
        (format!("{servers}{servers}"), "servers.name"),
        (
            format!("proxy-protocol-from = [\"10.0.0.0/33\"]\n{servers}"),
            "proxy-protocol-from",
        ),
    ] {
        std::fs::write(&path, &text).unwrap();
        let out = gateway(&["--config", path.to_str().unwrap(), "--check-config"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{text}: {stderr}");
        assert!(stderr.contains(needle), "{text}: {stderr}");
    }
}

#[test]
fn check_config_validates_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    std::fs::write(&path, "listen = [\"127.0.0.1:2121\"]\nupstream = \"ftp.example.net:21\"\npassive-ports = \"50000-50099\"\n").unwrap();
    let out = gateway(&["--config", path.to_str().unwrap(), "--check-config"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration OK"));
    std::fs::write(
        &path,
        "upstream = \"ftp.example.net:21\"\nmax-sesions = 3\n",
    )
    .unwrap();
    let out = gateway(&["--config", path.to_str().unwrap(), "--check-config"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max-sesions"));
}

/// tokio panics at runtime start on a malformed TOKIO_WORKER_THREADS; the
/// gateway sets its worker count itself, so the variable cannot stop it.
#[test]
fn a_malformed_tokio_worker_threads_is_ignored() {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_ftp-proxy"))
        .args(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1"])
        .args(["--ebpf", "off", "--worker-threads", "1"])
        .env("TOKIO_WORKER_THREADS", "many")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // The pipe ends when the process does: no line says "listening" then.
    std::thread::spawn(move || {
        let listening = BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .any(|line| line.contains("listening"));
        let _ = tx.send(listening);
    });
    let listening = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .unwrap_or(false);
    let _ = child.kill();
    let status = child.wait().unwrap();
    assert!(listening, "the gateway did not start: {status}");
}

/// Issue 16: `--version` names the version, the git revision the binary
/// was built from and whether the eBPF programs are embedded.
#[test]
fn version_names_the_revision_and_the_ebpf_programs() {
    let out = gateway(&["--version"]);
    assert!(out.status.success());
    let version = String::from_utf8(out.stdout).unwrap();
    let revision = Command::new("git")
        .args([
            "-C",
            concat!(env!("CARGO_MANIFEST_DIR"), "/.."),
            "rev-parse",
            "--short=12",
            "HEAD",
        ])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| format!("git {}", String::from_utf8_lossy(&out.stdout).trim()))
        .unwrap_or_else(|| "git revision unknown".to_owned());
    let ebpf = if ftp_proxy::flowtrack::FlowTracker::available() {
        "eBPF programs embedded"
    } else {
        "eBPF programs not embedded"
    };
    let expected = format!(
        "ftp-proxy {} ({revision}; {ebpf})\n",
        env!("CARGO_PKG_VERSION")
    );
    // A commit made after the build would change the revision: a stale
    // binary is the only way this differs.
    assert_eq!(version, expected);
    // -V says the same.
    assert_eq!(
        String::from_utf8(gateway(&["-V"]).stdout).unwrap(),
        expected
    );
}

/// The hidden `manual` command writes the man pages and completions, and
/// neither `--help` nor the completions name it.
#[test]
fn the_hidden_manual_command_writes_pages_and_completions() {
    let dir = tempfile::tempdir().unwrap();
    let out = gateway(&["manual", "--out-dir", dir.path().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "_ftp-proxy",
            "ftp-proxy-check-config.8",
            "ftp-proxy-flows.8",
            "ftp-proxy.8",
            "ftp-proxy.bash",
            "ftp-proxy.fish"
        ]
    );
    let help = String::from_utf8(gateway(&["--help"]).stdout).unwrap();
    assert!(!help.contains("manual"), "{help}");
    let out = gateway(&["manual"]);
    assert_eq!(out.status.code(), Some(64), "--out-dir is required");
}
