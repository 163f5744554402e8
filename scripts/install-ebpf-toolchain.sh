#!/usr/bin/env bash
# Install what building the eBPF flow tracker (ftp-proxy-ebpf) needs:
#   - the `rust-src` component of the nightly toolchain (`-Z build-std=core`
#     for bpfel-unknown-none),
#   - bpf-linker 0.13.0, linked against the *same* libLLVM as that nightly
#     rustc (the bitcode rustc emits must be readable by the linker's LLVM).
#
# bpf-linker normally finds LLVM through `llvm-config`; rustup's nightly ships
# only the shared library, so we build it with `LLVM_PREFIX` pointing at a
# small prefix: an empty `bin/llvm-config` (bpf-linker only checks it exists)
# and `lib/` symlinks named `libLLVM.so` and after the library's soname, both
# pointing at the nightly's `lib/libLLVM.so.*-rust-*`. bpf-linker records that
# `lib/` as its rpath, so the prefix stays in place after the build.
#
# Idempotent: does nothing when rust-src is installed and a working
# bpf-linker 0.13.0 that loads this nightly's LLVM is already on PATH.
#
# Usage: scripts/install-ebpf-toolchain.sh   (no root needed)
# The toolchain is the one pinned in ftp-proxy-ebpf/rust-toolchain.toml
# (FTPX_EBPF_TOOLCHAIN overrides it); it is installed if missing.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
pinned=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$ROOT/ftp-proxy-ebpf/rust-toolchain.toml")
TOOLCHAIN=${FTPX_EBPF_TOOLCHAIN:-$pinned}
[[ -n $TOOLCHAIN ]] || { echo "no channel in ftp-proxy-ebpf/rust-toolchain.toml" >&2; exit 1; }
BPF_LINKER_VERSION=0.13.0
CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
PREFIX=$CARGO_HOME/bpf-linker-llvm

log() { printf '[install-ebpf-toolchain] %s\n' "$*" >&2; }

command -v rustup >/dev/null 2>&1 || { log "rustup not found"; exit 1; }

# --- the pinned nightly and rust-src ----------------------------------------
# `rustup toolchain list` rather than `rustup run`, which may auto-install.
if rustup toolchain list | grep -q "^$TOOLCHAIN-"; then
    log "toolchain $TOOLCHAIN already installed"
else
    log "installing toolchain $TOOLCHAIN"
    if ! rustup toolchain install "$TOOLCHAIN" --profile minimal --component rust-src,clippy,rustfmt; then
        # No download possible: fall back to the machine's own nightly when it
        # is the same LLVM major, linked under the pinned name.
        if rustup run nightly rustc -vV 2>/dev/null | grep -q '^LLVM version: 22\.'; then
            log "cannot download $TOOLCHAIN: linking the installed nightly under that name"
            rustup component add rust-src --toolchain nightly
            rustup toolchain link "$TOOLCHAIN" "$(rustup run nightly rustc --print sysroot)"
        else
            log "cannot install $TOOLCHAIN and no usable nightly is installed"
            exit 1
        fi
    fi
fi
if rustup component list --toolchain "$TOOLCHAIN" --installed 2>/dev/null | grep -q '^rust-src'; then
    log "rust-src already installed for $TOOLCHAIN"
else
    log "installing rust-src for $TOOLCHAIN"
    rustup component add rust-src --toolchain "$TOOLCHAIN"
fi

# --- the nightly's libLLVM ---------------------------------------------------
sysroot=$(rustup run "$TOOLCHAIN" rustc --print sysroot)
llvm_version=$(rustup run "$TOOLCHAIN" rustc -vV | sed -n 's/^LLVM version: //p')
llvm_major=${llvm_version%%.*}
shopt -s nullglob
libs=("$sysroot"/lib/libLLVM.so.*-rust-*)
shopt -u nullglob
if ((${#libs[@]} != 1)); then
    log "expected exactly one libLLVM.so.*-rust-* in $sysroot/lib, found ${#libs[@]}"
    exit 1
fi
libllvm=${libs[0]}
soname=$(basename "$libllvm")

# --- bpf-linker ---------------------------------------------------------------
# The prefix bpf-linker is linked through: its lib/ is the binary's rpath.
link_prefix() {
    mkdir -p "$PREFIX/bin" "$PREFIX/lib"
    # bpf-linker only checks that llvm-config exists under LLVM_PREFIX.
    if [[ ! -x $PREFIX/bin/llvm-config ]]; then
        : >"$PREFIX/bin/llvm-config"
        chmod 755 "$PREFIX/bin/llvm-config"
    fi
    # Drop links left from an older nightly, then link this one.
    find "$PREFIX/lib" -maxdepth 1 -name 'libLLVM*' -type l -delete
    ln -s "$libllvm" "$PREFIX/lib/libLLVM.so"
    ln -s "$libllvm" "$PREFIX/lib/$soname"
}

# "Working" means: the right version, it loads this nightly's libLLVM soname
# (a nightly with another LLVM changes the soname: rebuild), and it starts.
linker_ok() {
    local out
    command -v bpf-linker >/dev/null 2>&1 || return 1
    ldd "$(command -v bpf-linker)" 2>/dev/null | grep "$soname => " | grep -qv 'not found' || return 1
    out=$(bpf-linker --version 2>/dev/null) || return 1
    [[ $out == *"$BPF_LINKER_VERSION"* ]]
}

if linker_ok && [[ $(readlink -f "$PREFIX/lib/$soname") == "$(readlink -f "$libllvm")" ]]; then
    log "bpf-linker $BPF_LINKER_VERSION already installed ($soname)"
elif linker_ok; then
    # Same soname, library of another toolchain copy: re-point the links.
    link_prefix
    log "bpf-linker $BPF_LINKER_VERSION already installed; linked to $libllvm"
else
    log "building bpf-linker $BPF_LINKER_VERSION against $soname (LLVM $llvm_version)"
    link_prefix
    LLVM_PREFIX=$PREFIX cargo install --locked --force bpf-linker \
        --version "$BPF_LINKER_VERSION" --no-default-features --features "llvm-$llvm_major"
    linker_ok || { log "bpf-linker was built but does not run with $soname"; exit 1; }
fi

log "ok: $(rustup run "$TOOLCHAIN" rustc --version), $(bpf-linker --version)"
