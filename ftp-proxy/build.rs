//! Builds the flow tracker's eBPF object (`ftp-proxy-ebpf`, for
//! bpfel-unknown-none, with aya-build and the nightly pinned in
//! `ftp-proxy-ebpf/rust-toolchain.toml`) into `$OUT_DIR/ftp-proxy-ebpf`,
//! which `flowtrack` embeds.
//!
//! The daemon must build without the eBPF toolchain. `FTPX_EBPF_BUILD`:
//! - `auto` (default): build the object if the toolchain is there (rustup,
//!   the pinned nightly with rust-src, bpf-linker); otherwise warn and embed
//!   an empty object: the binary then reports the tracker as unavailable.
//!   While the toolchain is missing this script reruns on every build (it
//!   watches the absent bpf-linker), so installing it is picked up.
//! - `require`: a missing toolchain is a build error (CI, releases).
//! - `skip`: always embed the empty object.
//!
//! When the toolchain is present, an eBPF compile error fails the build:
//! only a missing toolchain degrades to "unavailable".
//!
//! It also records the git revision for `--version` (`FTPX_GIT_REVISION`
//! for the compiler): `git rev-parse HEAD` of this workspace, or the
//! variable of that name when the builder sets it (a distribution building
//! from a tarball that knows its revision), else `unknown`: a build
//! without `.git` or without git works.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

const MODE_VAR: &str = "FTPX_EBPF_BUILD";
const OBJECT: &str = "ftp-proxy-ebpf";

#[derive(PartialEq)]
enum Mode {
    Auto,
    Require,
    Skip,
}

fn main() -> Result<()> {
    println!("cargo::rerun-if-env-changed={MODE_VAR}");
    println!("cargo::rerun-if-changed=build.rs");
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?);
    record_revision(&manifest_dir);
    let mode = match env::var(MODE_VAR).as_deref() {
        Err(_) | Ok("" | "auto") => Mode::Auto,
        Ok("require") => Mode::Require,
        Ok("skip") => Mode::Skip,
        Ok(other) => bail!("{MODE_VAR}={other}: expected auto, require or skip"),
    };
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out_dir.join(OBJECT);
    let ebpf_dir = manifest_dir
        .join("../ftp-proxy-ebpf")
        .canonicalize()
        .context("locating ftp-proxy-ebpf")?;
    let common_dir = manifest_dir
        .join("../ftp-proxy-common")
        .canonicalize()
        .context("locating ftp-proxy-common")?;

    if mode == Mode::Skip {
        return embed_empty(&object, &format!("{MODE_VAR}=skip"));
    }
    let toolchain = pinned_toolchain(&ebpf_dir)?;
    if let Err(missing) = check_toolchain(&toolchain) {
        if mode == Mode::Require {
            bail!(
                "{missing}; {MODE_VAR}=require: install it with scripts/install-ebpf-toolchain.sh"
            );
        }
        return embed_empty(
            &object,
            &format!("{missing} (run scripts/install-ebpf-toolchain.sh)"),
        );
    }

    // The eBPF sources: aya-build watches the crate's directory; the shared
    // types are a path dependency it does not know about.
    println!(
        "cargo::rerun-if-changed={}",
        common_dir.join("src").display()
    );
    println!(
        "cargo::rerun-if-changed={}",
        common_dir.join("Cargo.toml").display()
    );

    // The eBPF crate's inputs, watched file by file (aya-build watches its
    // whole directory, which a cache hit below does not call it for).
    for input in ["src", "Cargo.toml", "Cargo.lock", ".cargo"] {
        println!("cargo::rerun-if-changed={}", ebpf_dir.join(input).display());
    }
    // aya-build compiles the object (core included) into this run's OUT_DIR,
    // so every profile and every build-script hash would pay about a
    // minute for the same object. A cache keyed by the sources and the
    // toolchain keeps one copy per profile directory.
    let key = inputs_hash(&[&ebpf_dir, &common_dir], &toolchain)?;
    let cache = out_dir
        .ancestors()
        .nth(3)
        .map(|profile| profile.join("ebpf-object-cache").join(&key));
    if let Some(cached) = cache.as_ref().filter(|c| c.is_file())
        && std::fs::copy(cached, &object).is_ok()
    {
        return Ok(());
    }

    // aya-build runs `cargo build --package ftp-proxy-ebpf` in the current
    // directory: the eBPF crate's own workspace (its lock file, profile and
    // .cargo/config.toml), not the daemon's.
    env::set_current_dir(&ebpf_dir).context("entering ftp-proxy-ebpf")?;
    let root = ebpf_dir
        .to_str()
        .context("non-UTF-8 path to ftp-proxy-ebpf")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "ftp-proxy-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
    .context("building the eBPF programs (ftp-proxy-ebpf)")?;
    if !object.exists() {
        // AYA_BUILD_SKIP=1 makes aya-build return without an object.
        return embed_empty(&object, "aya-build skipped the build (AYA_BUILD_SKIP)");
    }
    if let Some(cache) = cache
        && let Some(dir) = cache.parent()
        && std::fs::create_dir_all(dir).is_ok()
    {
        // Best effort: a failed copy only costs the next build its time.
        let partial = cache.with_extension("partial");
        if std::fs::copy(&object, &partial).is_ok() {
            let _ = std::fs::rename(&partial, &cache);
        }
    }
    Ok(())
}

/// Sets `FTPX_GIT_REVISION` for the compiler (see the header).
fn record_revision(manifest_dir: &Path) {
    const VAR: &str = "FTPX_GIT_REVISION";
    println!("cargo::rerun-if-env-changed={VAR}");
    let revision = env::var(VAR)
        .ok()
        .filter(|r| !r.trim().is_empty())
        .or_else(|| manifest_dir.parent().and_then(git_revision))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo::rustc-env={VAR}={}", revision.trim());
}

/// The abbreviated commit checked out in `workspace`, if it is the top of
/// a git work tree; asks cargo to rerun this script when HEAD moves.
fn git_revision(workspace: &Path) -> Option<String> {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .arg("-C")
            .arg(workspace)
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())?;
        Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    // A tarball unpacked inside some other repository must not take that
    // repository's revision.
    let toplevel = PathBuf::from(git(&["rev-parse", "--show-toplevel"])?);
    if toplevel.canonicalize().ok()? != workspace.canonicalize().ok()? {
        return None;
    }
    let revision = git(&["rev-parse", "--short=12", "HEAD"])?;
    // A commit, checkout or reset changes one of these: HEAD (detached),
    // the branch's loose ref, packed-refs, and the work tree's reflog.
    // Only files that exist are watched: cargo takes a missing one as
    // changed on every build.
    let mut watched = vec![
        "HEAD".to_owned(),
        "logs/HEAD".to_owned(),
        "packed-refs".to_owned(),
    ];
    watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
            let path = workspace.join(path);
            if path.is_file() {
                println!("cargo::rerun-if-changed={}", path.display());
            }
        }
    }
    Some(revision)
}

/// A hash of every file under `dirs` (except build output) and the
/// toolchain: the key of the object cache.
fn inputs_hash(dirs: &[&Path], toolchain: &str) -> Result<String> {
    use std::hash::{DefaultHasher, Hash, Hasher};
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
            let path = entry?.path();
            if path.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            if path.is_dir() {
                walk(&path, files)?;
            } else {
                files.push(path);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    for dir in dirs {
        walk(dir, &mut files)?;
    }
    files.sort();
    let mut hasher = DefaultHasher::new();
    toolchain.hash(&mut hasher);
    for file in files {
        file.hash(&mut hasher);
        std::fs::read(&file)
            .with_context(|| format!("{}", file.display()))?
            .hash(&mut hasher);
    }
    Ok(format!("{:016x}", hasher.finish()))
}

/// The `channel` of ftp-proxy-ebpf/rust-toolchain.toml.
fn pinned_toolchain(ebpf_dir: &Path) -> Result<String> {
    let path = ebpf_dir.join("rust-toolchain.toml");
    println!("cargo::rerun-if-changed={}", path.display());
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|value| value.trim().trim_matches('"').to_owned())
        .next()
        .with_context(|| format!("no channel in {}", path.display()))
}

/// `Err(what is missing)` unless rustup, the toolchain with rust-src and
/// bpf-linker are all installed.
fn check_toolchain(toolchain: &str) -> Result<(), String> {
    let linker = find_in_path("bpf-linker");
    // Watch bpf-linker: when absent, the missing path makes cargo rerun this
    // script on every build, so a later install is noticed.
    let watched = linker.clone().unwrap_or_else(|| {
        env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
            .unwrap_or_default()
            .join("bin/bpf-linker")
    });
    println!("cargo::rerun-if-changed={}", watched.display());
    println!("cargo::rerun-if-env-changed=PATH");

    let list = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .map_err(|e| format!("rustup not found ({e})"))?;
    let listed = String::from_utf8_lossy(&list.stdout)
        .lines()
        .any(|line| line.starts_with(&format!("{toolchain}-")) || line == toolchain);
    if !listed {
        return Err(format!("toolchain {toolchain} is not installed"));
    }
    let sysroot = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--print", "sysroot"])
        .env("RUSTUP_AUTO_INSTALL", "0")
        .output()
        .map_err(|e| format!("running rustc of {toolchain}: {e}"))?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .exists()
    {
        return Err(format!("rust-src is not installed for {toolchain}"));
    }
    if linker.is_none() {
        return Err("bpf-linker is not on PATH".into());
    }
    Ok(())
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

fn embed_empty(object: &Path, why: &str) -> Result<()> {
    println!(
        "cargo::warning=eBPF flow tracker not built: {why}; the daemon reports it unavailable"
    );
    std::fs::write(object, []).with_context(|| format!("writing {}", object.display()))
}
