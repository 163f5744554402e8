#!/usr/bin/env bash
# Install the OS packages needed by the test suite (vsftpd fixture, FTP
# clients, networking tools).  Idempotent: apt is only touched when a package
# is missing.  Also makes sure the distro vsftpd service (which listens on
# 0.0.0.0:21 / [::]:21 with /etc/vsftpd.conf) is not left running or enabled:
# the tests start their own throwaway vsftpd instances in the foreground.
#
# Usage: sudo scripts/install-deps.sh   (must run as root)
set -euo pipefail

# bpftool: the flow tracker tests cross-check that nothing of ours stays loaded.
# The Debian package (cargo xtask package, tests/package.rs): dpkg-dev
# (dpkg-shlibdeps, dpkg-parsechangelog), binutils (strip), man-db (man -l,
# lexgrog), and the shells whose completions are checked: bash-completion,
# zsh, fish.
PACKAGES=(vsftpd curl lftp iproute2 python3 procps prometheus bpftool
          dpkg-dev binutils man-db bash-completion zsh fish)

log() { printf '[install-deps] %s\n' "$*" >&2; }

if [[ ${EUID:-$(id -u)} -ne 0 ]]; then
    log "must be run as root (try: sudo $0)"
    exit 1
fi

is_installed() {
    local status
    status=$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)
    [[ $status == "install ok installed" ]]
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! is_installed "$pkg"; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]} > 0)); then
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive

    # Keep maintainer scripts from starting services (vsftpd's postinst would
    # otherwise start the system daemon on port 21).  Only add a temporary
    # policy-rc.d if none exists (Docker images usually ship one already).
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        created_policy=1
        trap '[[ $created_policy -eq 1 ]] && rm -f "$policy"' EXIT
    fi

    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"

    if ((created_policy)); then
        rm -f "$policy"
        created_policy=0
    fi
else
    log "all packages already installed: ${PACKAGES[*]}"
fi

# --- make sure the distro vsftpd service is neither running nor enabled -----
if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
    # systemd is PID 1: stop and disable.
    systemctl disable --now vsftpd.service >/dev/null 2>&1 || true
else
    # No systemd (container): stop via the SysV script, then disable both
    # the SysV links and the systemd wants-symlink (offline `systemctl
    # disable` works without a running systemd).
    if command -v service >/dev/null 2>&1 && [[ -x /etc/init.d/vsftpd ]]; then
        service vsftpd stop >/dev/null 2>&1 || true
    fi
    if command -v systemctl >/dev/null 2>&1; then
        systemctl disable vsftpd.service >/dev/null 2>&1 || true
    elif command -v update-rc.d >/dev/null 2>&1 && [[ -x /etc/init.d/vsftpd ]]; then
        update-rc.d vsftpd disable >/dev/null 2>&1 || true
    fi
fi

# Anything still running with the *system* config (e.g. started by hand or by
# a postinst without policy-rc.d) is killed by PID.  Test instances always get
# an explicit config path elsewhere and are not matched.
sys_pids=()
for d in /proc/[0-9]*; do
    [[ -r $d/cmdline ]] || continue
    cmd=$(tr '\0' ' ' <"$d/cmdline" 2>/dev/null || true)
    cmd=${cmd% }
    case $cmd in
        /usr/sbin/vsftpd | /usr/sbin/vsftpd\ /etc/vsftpd.conf | vsftpd\ /etc/vsftpd.conf)
            sys_pids+=("${d#/proc/}") ;;
    esac
done
if ((${#sys_pids[@]} > 0)); then
    log "stopping system vsftpd (pids ${sys_pids[*]})"
    kill "${sys_pids[@]}" 2>/dev/null || true
fi

# vsftpd needs this (empty, root-owned, not writable) for secure_chroot_dir;
# the package normally creates it, tests may also point at their own dir.
mkdir -p /var/run/vsftpd/empty

# Tests run vsftpd as root; anonymous sessions drop to the 'ftp' user that the
# vsftpd package creates.  Fail loudly if it is missing.
if ! getent passwd ftp >/dev/null; then
    log "warning: user 'ftp' does not exist (vsftpd postinst normally creates it)"
    exit 1
fi

for bin in curl lftp ss python3 pgrep dpkg-shlibdeps strip man lexgrog zsh fish unshare; do
    command -v "$bin" >/dev/null 2>&1 || { log "missing binary after install: $bin"; exit 1; }
done
[[ -x /usr/sbin/vsftpd ]] || { log "/usr/sbin/vsftpd missing"; exit 1; }

log "ok"
