//! The Debian package (issue 16). `cargo xtask package` builds it once for
//! this binary; its contents and metadata are read with `dpkg-deb`; then it
//! is installed, upgraded, removed and purged in a throwaway copy of this
//! system: an overlay whose lower layer is `/` and whose upper layer is a
//! temporary directory, mounted in a mount namespace of its own, with a
//! private `/run` and `/dev`. The real dpkg database and files are never
//! written, nothing can be started (no systemd is reachable; where the test
//! pretends there is one, `systemctl` and `deb-systemd-invoke` are stubs
//! that log their calls), and the namespace and directory are gone at the
//! end. In it, the installed binary runs `--version` and `--check-config`
//! on the installed configuration, `man` finds and renders the pages
//! without a warning, and bash, zsh and fish load the completions from
//! where the package put them.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The .deb, built once by `cargo xtask package`.
fn package() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        let out = Command::new(env!("CARGO"))
            .args(["xtask", "package"])
            .current_dir(WORKSPACE)
            // Nothing to download: what the tests were built with is enough.
            .env("CARGO_NET_OFFLINE", "true")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "cargo xtask package: {stderr}");
        let stdout = String::from_utf8(out.stdout).unwrap();
        let path = PathBuf::from(stdout.lines().last().unwrap_or_default());
        assert!(path.is_file(), "no package at {}: {stderr}", path.display());
        path
    })
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn field(deb: &Path, name: &str) -> String {
    run(Command::new("dpkg-deb").arg("--field").arg(deb).arg(name))
        .trim()
        .to_owned()
}

#[test]
#[ignore = "privileged tier (root, mount namespaces, dpkg-dev, man-db, zsh, fish): cargo xtask test runs it"]
fn the_package_holds_what_an_operator_needs() {
    let deb = package();
    let changelog =
        std::fs::read_to_string(format!("{WORKSPACE}/deploy/debian/changelog")).unwrap();
    let version = field(deb, "Version");
    assert!(
        changelog.starts_with(&format!("ftp-proxy ({version})")),
        "{version}"
    );
    assert!(version.starts_with(&format!("{}-", env!("CARGO_PKG_VERSION"))));
    assert_eq!(field(deb, "Package"), "ftp-proxy");
    let arch = run(Command::new("dpkg").arg("--print-architecture"));
    assert_eq!(field(deb, "Architecture"), arch.trim());
    let depends = field(deb, "Depends");
    assert!(depends.contains("libc6 (>= "), "Depends: {depends}");
    assert!(field(deb, "Maintainer").contains('@'));
    assert!(field(deb, "Installed-Size").parse::<u64>().unwrap() > 1000);
    assert!(
        deb.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .ends_with(&format!("_{version}_{}.deb", arch.trim()))
    );

    // Every file, its mode and owner.
    let contents = run(Command::new("dpkg-deb").arg("--contents").arg(deb));
    let entries: Vec<(&str, &str, &str)> = contents
        .lines()
        .map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            (cols[0], cols[1], *cols.last().unwrap())
        })
        .collect();
    for (mode, owner, path) in &entries {
        assert_eq!(*owner, "root/root", "{path}");
        let expected = if path.ends_with('/') {
            "drwxr-xr-x"
        } else if *path == "./usr/bin/ftp-proxy" {
            "-rwxr-xr-x"
        } else {
            "-rw-r--r--"
        };
        assert_eq!(*mode, expected, "{path}");
    }
    let files: Vec<&str> = entries
        .iter()
        .map(|(_, _, path)| *path)
        .filter(|p| !p.ends_with('/'))
        .collect();
    let mut expected = vec![
        "./usr/bin/ftp-proxy",
        "./etc/ftp-proxy/ftp-proxy.toml",
        "./lib/systemd/system/ftp-proxy.service",
        "./usr/share/man/man8/ftp-proxy.8.gz",
        "./usr/share/man/man8/ftp-proxy-check-config.8.gz",
        "./usr/share/man/man8/ftp-proxy-flows.8.gz",
        "./usr/share/bash-completion/completions/ftp-proxy",
        "./usr/share/zsh/vendor-completions/_ftp-proxy",
        "./usr/share/fish/vendor_completions.d/ftp-proxy.fish",
        "./usr/share/doc/ftp-proxy/copyright",
        "./usr/share/doc/ftp-proxy/changelog.Debian.gz",
    ];
    let mut files_sorted = files.clone();
    files_sorted.sort_unstable();
    expected.sort_unstable();
    assert_eq!(files_sorted, expected);

    // The control part: conffile, maintainer scripts, checksums.
    let control = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb")
        .arg("--control")
        .arg(deb)
        .arg(control.path().join("DEBIAN")));
    let control_dir = control.path().join("DEBIAN");
    assert_eq!(
        std::fs::read_to_string(control_dir.join("conffiles")).unwrap(),
        "/etc/ftp-proxy/ftp-proxy.toml\n"
    );
    for script in ["postinst", "prerm", "postrm"] {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(control_dir.join(script)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o755, "{script}");
        run(Command::new("sh").arg("-n").arg(control_dir.join(script)));
    }
    let md5sums = std::fs::read_to_string(control_dir.join("md5sums")).unwrap();
    // Every file but the conffile (dpkg keeps its checksum apart).
    assert_eq!(md5sums.lines().count(), files.len() - 1, "{md5sums}");
    assert!(!md5sums.contains("etc/ftp-proxy"), "{md5sums}");

    // The files themselves.
    let root = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb")
        .arg("--extract")
        .arg(deb)
        .arg(root.path()));
    let unit =
        std::fs::read_to_string(root.path().join("lib/systemd/system/ftp-proxy.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/ftp-proxy --config /etc/ftp-proxy/ftp-proxy.toml\n"));
    assert!(!unit.contains("/usr/local/"), "{unit}");
    assert_eq!(
        std::fs::read(root.path().join("etc/ftp-proxy/ftp-proxy.toml")).unwrap(),
        std::fs::read(format!("{WORKSPACE}/deploy/ftp-proxy.example.toml")).unwrap()
    );
    let copyright =
        std::fs::read_to_string(root.path().join("usr/share/doc/ftp-proxy/copyright")).unwrap();
    assert!(copyright.contains("License: Apache-2.0"), "{copyright}");
    for linked in ["  tokio ", "  rustls ", "  aya ", "  aya-ebpf "] {
        assert!(
            copyright.contains(linked),
            "copyright lacks{linked}:\n{copyright}"
        );
    }
    assert!(
        !copyright.contains("  tempfile "),
        "a test crate:\n{copyright}"
    );
    // The binary's debug sections are stripped; its eBPF programs stay.
    let sections = run(Command::new("objdump")
        .arg("--section-headers")
        .arg(root.path().join("usr/bin/ftp-proxy")));
    assert!(!sections.contains(".debug_line"), "{sections}");
    let version = run(Command::new(root.path().join("usr/bin/ftp-proxy")).arg("--version"));
    assert!(version.contains("eBPF programs embedded"), "{version}");
}

/// A copy of this system that only the test sees (see the header).
struct Throwaway {
    dir: tempfile::TempDir,
}

/// Mounts the overlay and a private /run, /dev and /proc, then runs the
/// script chrooted in it. $1 upper, $2 work, $3 mount point, $4 script.
const ENTER: &str = r#"
set -e
mount -t overlay ftpx-throwaway -o "lowerdir=/,upperdir=$1,workdir=$2" "$3"
mount -t tmpfs -o mode=0755 ftpx-run "$3/run"
mount -t tmpfs -o mode=0755 ftpx-dev "$3/dev"
mknod -m 0666 "$3/dev/null" c 1 3
mknod -m 0666 "$3/dev/zero" c 1 5
mknod -m 0666 "$3/dev/urandom" c 1 9
mount -t proc ftpx-proc "$3/proc"
exec chroot "$3" /bin/sh -c "$4"
"#;

impl Throwaway {
    /// A fresh copy with the package at /ftpx-package/ftp-proxy.deb.
    fn new() -> Throwaway {
        let dir = tempfile::Builder::new()
            .prefix("ftpx-throwaway")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        for sub in ["upper/ftpx-package", "work", "root"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        std::fs::copy(
            package(),
            dir.path().join("upper/ftpx-package/ftp-proxy.deb"),
        )
        .unwrap();
        Throwaway { dir }
    }

    /// Runs `script` with `sh -e` as root of the copy.
    fn sh(&self, script: &str) -> Output {
        let path = |sub: &str| self.dir.path().join(sub);
        Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                ENTER,
                "sh",
            ])
            .arg(path("upper"))
            .arg(path("work"))
            .arg(path("root"))
            .arg(format!("set -e\n{script}"))
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", "/root")
            .env("LANG", "C.UTF-8")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .unwrap()
    }

    /// `sh`, which must succeed; its standard output.
    fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "{script}\nexit {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A file in the copy as the test left it (from the upper layer: only
    /// what the copy changed).
    fn changed(&self, path: &str) -> PathBuf {
        self.dir
            .path()
            .join("upper")
            .join(path.trim_start_matches('/'))
    }

    fn install(&self) -> String {
        self.ok("dpkg --install /ftpx-package/ftp-proxy.deb 2>&1")
    }
}

/// Stubs for the service manager, and /run/systemd/system so that the
/// maintainer scripts believe systemd runs. Each call is logged.
const PRETEND_SYSTEMD: &str = r#"
mkdir -p /run/systemd/system
for tool in /usr/bin/systemctl /usr/bin/deb-systemd-invoke; do
    printf '#!/bin/sh\necho "${0##*/} $*" >>/var/log/ftpx-service-calls\n' >"$tool"
    chmod 0755 "$tool"
done
"#;

fn service_calls(root: &Throwaway) -> String {
    std::fs::read_to_string(root.changed("/var/log/ftpx-service-calls")).unwrap_or_default()
}

#[test]
#[ignore = "privileged tier (root, mount namespaces, dpkg-dev, man-db, zsh, fish): cargo xtask test runs it"]
fn install_starts_nothing_upgrade_restarts_purge_cleans_up() {
    let root = Throwaway::new();
    // /run is private to each run: systemd is pretended in each script.
    let log = root.ok(&format!(
        "{PRETEND_SYSTEMD}\ndpkg --install /ftpx-package/ftp-proxy.deb 2>&1"
    ));
    assert!(log.contains("Setting up ftp-proxy"), "{log}");
    let calls = service_calls(&root);
    assert!(
        calls.contains("systemctl --system daemon-reload"),
        "{calls}"
    );
    assert!(
        !calls.contains("deb-systemd-invoke"),
        "a first install started something: {calls}"
    );
    assert!(
        !root
            .changed("/etc/systemd/system/multi-user.target.wants/ftp-proxy.service")
            .exists(),
        "a first install enabled the unit"
    );
    assert!(
        root.ok("dpkg-query -W -f '${Status}' ftp-proxy")
            .contains("install ok installed")
    );

    // The installed binary, on the installed configuration.
    let version = root.ok("ftp-proxy --version");
    assert!(
        version.starts_with(&format!("ftp-proxy {} (git ", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    assert!(version.contains("eBPF programs embedded"), "{version}");
    let check = root.ok("ftp-proxy --config /etc/ftp-proxy/ftp-proxy.toml --check-config");
    assert!(check.contains("configuration OK"), "{check}");
    assert!(check.contains("ftp.internal.example"), "{check}");

    // The operator sets upstream and enables the unit (what `systemctl
    // enable` does, by hand: systemctl is a stub); the upgrade keeps both
    // and restarts the gateway only if it runs (try-restart).
    root.ok(
        "sed -i 's/^upstream = .*/upstream = \"ftp.operator.example:2121\"/' /etc/ftp-proxy/ftp-proxy.toml
         mkdir -p /etc/systemd/system/multi-user.target.wants
         ln -s /lib/systemd/system/ftp-proxy.service /etc/systemd/system/multi-user.target.wants/ftp-proxy.service",
    );
    std::fs::remove_file(root.changed("/var/log/ftpx-service-calls")).unwrap();
    let log = root.ok(&format!(
        "{PRETEND_SYSTEMD}\ndpkg --install /ftpx-package/ftp-proxy.deb 2>&1"
    ));
    assert!(log.contains("Preparing to unpack"), "{log}");
    let calls = service_calls(&root);
    assert!(
        calls.contains("deb-systemd-invoke try-restart ftp-proxy.service"),
        "{calls}"
    );
    assert!(
        !calls.contains(" start") && !calls.contains(" stop"),
        "{calls}"
    );
    let check = root.ok("ftp-proxy --config /etc/ftp-proxy/ftp-proxy.toml --check-config");
    assert!(
        check.contains("ftp.operator.example"),
        "the upgrade replaced the conffile: {check}"
    );
    assert!(
        root.changed("/etc/systemd/system/multi-user.target.wants/ftp-proxy.service")
            .is_symlink()
    );

    // Remove: stopped, the configuration stays.
    std::fs::remove_file(root.changed("/var/log/ftpx-service-calls")).unwrap();
    root.ok(&format!("{PRETEND_SYSTEMD}\ndpkg --remove ftp-proxy 2>&1"));
    let calls = service_calls(&root);
    assert!(
        calls.contains("deb-systemd-invoke stop ftp-proxy.service"),
        "{calls}"
    );
    root.ok("test ! -e /usr/bin/ftp-proxy && grep -q ftp.operator.example /etc/ftp-proxy/ftp-proxy.toml");

    // Purge: the configuration and the operator's enable symlink go.
    root.ok("dpkg --purge ftp-proxy 2>&1");
    root.ok("test ! -e /etc/ftp-proxy
         test ! -L /etc/systemd/system/multi-user.target.wants/ftp-proxy.service
         test ! -L /etc/systemd/system/ftp-proxy.service
         ! dpkg-query -W ftp-proxy 2>/dev/null");
}

#[test]
#[ignore = "privileged tier (root, mount namespaces, dpkg-dev, man-db, zsh, fish): cargo xtask test runs it"]
fn man_renders_the_installed_pages_without_warnings() {
    let root = Throwaway::new();
    root.install();
    // man finds the page by name (the package put it on man's path), and
    // every page renders without a warning from groff or man.
    let found = root.ok("man -w ftp-proxy");
    assert_eq!(found.trim(), "/usr/share/man/man8/ftp-proxy.8.gz");
    for page in ["ftp-proxy", "ftp-proxy-flows", "ftp-proxy-check-config"] {
        let out = root.sh(&format!(
            "MANWIDTH=80 man --warnings -E UTF-8 -l /usr/share/man/man8/{page}.8.gz"
        ));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.is_empty(),
            "{page}: {stderr}"
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("--config"), "{page}:\n{text}");
        // The NAME line whatis and apropos read.
        let name = root.ok(&format!("lexgrog /usr/share/man/man8/{page}.8.gz"));
        assert!(name.contains(&format!("\"{page} - ")), "{name}");
    }
    let text = root.ok("MANWIDTH=80 man -E UTF-8 -l /usr/share/man/man8/ftp-proxy.8.gz");
    for needle in [
        "--upstream",
        "SIGNALS",
        "EXIT STATUS",
        "/etc/ftp-proxy/ftp-proxy.toml",
    ] {
        assert!(
            text.contains(needle),
            "ftp-proxy(8) lacks {needle}:\n{text}"
        );
    }
}

#[test]
#[ignore = "privileged tier (root, mount namespaces, dpkg-dev, man-db, zsh, fish): cargo xtask test runs it"]
fn each_shell_loads_its_installed_completion() {
    let root = Throwaway::new();
    root.install();
    // bash: bash-completion's loader finds it by the command's name, and
    // it completes an option.
    let bash = root.ok(r#"bash -c '
            . /usr/share/bash-completion/bash_completion
            __load_completion ftp-proxy
            fn=$(complete -p ftp-proxy | sed -n "s/.*-F \([^ ]*\) .*/\1/p")
            COMP_WORDS=(ftp-proxy --upstr); COMP_CWORD=1
            COMP_LINE="ftp-proxy --upstr"; COMP_POINT=${#COMP_LINE}
            "$fn" ftp-proxy --upstr ftp-proxy
            printf "%s\n" "${COMPREPLY[@]}"'"#);
    assert!(
        bash.lines().any(|l| l.trim() == "--upstream"),
        "bash: {bash}"
    );
    // zsh: compinit finds it on the default fpath and binds it.
    let zsh = root.ok("zsh -n /usr/share/zsh/vendor-completions/_ftp-proxy
         zsh -f -c 'autoload -Uz compinit && compinit -u -D && print -r -- $_comps[ftp-proxy]'");
    assert_eq!(zsh.trim(), "_ftp-proxy", "zsh");
    // fish: autoloaded from vendor_completions.d, and it completes.
    let fish = root.ok("HOME=/tmp fish -c 'complete -C \"ftp-proxy --upstr\"'");
    assert!(
        fish.lines().any(|l| l.starts_with("--upstream")),
        "fish: {fish}"
    );
}
