#!/usr/bin/env bash
# Install what `cargo xtask bench` needs, idempotently.
#
# Required (the script fails without them): everything scripts/install-deps.sh
# installs (vsftpd as the server, curl as the transfer client, procps).
#
# Peers (optional: a peer that cannot be installed is reported "unavailable"
# and the benchmark goes on without it):
#   proftpd   proftpd-core + proftpd-mod-crypto + proftpd-mod-proxy (mod_proxy)
#   suse      ftp-proxy (the SuSE proxy-suite; its binary is named like ours)
#   haproxy   haproxy
#
# The peers are unpacked privately into PEERS_DIR (`apt-get download` +
# `dpkg-deb -x`), never installed as packages: proftpd-core and vsftpd both
# provide ftp-server and conflict, the proxy-suite's /usr/sbin/ftp-proxy would
# shadow our binary's name on PATH, and no maintainer script gets to enable or
# start a distribution service. Only their shared libraries are installed
# normally (under a policy-rc.d that forbids starting services).
#
# Usage: sudo scripts/install-bench-deps.sh PEERS_DIR
# Writes PEERS_DIR/status: one line per peer, "NAME ok VERSION" or
# "NAME unavailable REASON".
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
log() { printf '[install-bench-deps] %s\n' "$*" >&2; }

if [[ ${EUID:-$(id -u)} -ne 0 ]]; then
    log "must be run as root (try: sudo $0 PEERS_DIR)"
    exit 1
fi
if [[ $# -ne 1 ]]; then
    log "usage: $0 PEERS_DIR"
    exit 64
fi
peers_dir=$1
mkdir -p "$peers_dir"
peers_dir=$(cd "$peers_dir" && pwd)

# --- required: the server and the client ------------------------------------
bash "$here/install-deps.sh"

export DEBIAN_FRONTEND=noninteractive

# Keep maintainer scripts of the library packages from starting anything.
policy=/usr/sbin/policy-rc.d
created_policy=0
cleanup() {
    if ((created_policy)); then rm -f "$policy"; fi
    rm -rf "${work:-}"
}
trap cleanup EXIT
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    created_policy=1
fi

work=$(mktemp -d)
updated=0
apt_update_once() {
    if ((updated == 0)); then
        apt-get update -qq || log "apt-get update failed; using the cached package lists"
        updated=1
    fi
}

candidate() {
    apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2; exit }'
}

is_installed() {
    local status
    status=$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)
    [[ $status == "install ok installed" ]]
}

# Library dependencies of a .deb: the first alternative of every Depends
# entry whose name starts with "lib", without version constraints.
lib_depends() {
    dpkg-deb -f "$1" Depends | tr ',' '\n' | sed -e 's/|.*//' -e 's/(.*)//' -e 's/:any//' \
        | awk '{ print $1 }' | grep -E '^lib' || true
}

# install_peer NAME PACKAGE... : unpacks the packages into PEERS_DIR/NAME and
# installs their libraries. Prints the status line.
install_peer() {
    local name=$1
    shift
    local dest=$peers_dir/$name
    local versions="" pkg version
    for pkg in "$@"; do
        version=$(candidate "$pkg")
        if [[ -z $version || $version == "(none)" ]]; then
            apt_update_once
            version=$(candidate "$pkg")
        fi
        if [[ -z $version || $version == "(none)" ]]; then
            echo "$name unavailable no-candidate-for-$pkg"
            return
        fi
        versions+="$pkg=$version "
    done
    versions=${versions% }
    if [[ -f $dest/.versions && $(cat "$dest/.versions") == "$versions" ]]; then
        log "$name: already unpacked ($versions)"
    else
        log "$name: downloading $*"
        local dl=$work/$name
        mkdir -p "$dl"
        local spec=()
        for pkg in "$@"; do spec+=("$pkg=$(candidate "$pkg")"); done
        if ! (cd "$dl" && apt-get download -qq "${spec[@]}" >/dev/null 2>&1); then
            apt_update_once
            if ! (cd "$dl" && apt-get download -qq "${spec[@]}" >/dev/null 2>&1); then
                echo "$name unavailable download-failed"
                return
            fi
        fi
        rm -rf "$dest"
        mkdir -p "$dest"
        local deb libs=()
        for deb in "$dl"/*.deb; do
            if ! dpkg-deb -x "$deb" "$dest"; then
                rm -rf "$dest"
                echo "$name unavailable unpack-failed"
                return
            fi
            mapfile -t -O "${#libs[@]}" libs < <(lib_depends "$deb")
        done
        printf '%s\n' "${libs[@]}" | sort -u >"$dest/.libs"
        printf '%s' "$versions" >"$dest/.versions"
    fi
    local missing=() lib
    while read -r lib; do
        [[ -n $lib ]] || continue
        is_installed "$lib" || missing+=("$lib")
    done <"$dest/.libs"
    if ((${#missing[@]} > 0)); then
        log "$name: installing libraries: ${missing[*]}"
        apt_update_once
        if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
            echo "$name unavailable library-install-failed"
            return
        fi
    fi
    echo "$name ok $versions"
}

status_file=$peers_dir/status
{
    install_peer proftpd proftpd-core proftpd-mod-crypto proftpd-mod-proxy
    install_peer suse ftp-proxy
    install_peer haproxy haproxy
} >"$status_file.tmp"
mv "$status_file.tmp" "$status_file"

# Check that each unpacked binary can at least load its libraries.
check() {
    local name=$1 bin=$2
    shift 2
    if grep -q "^$name ok" "$status_file" && ! "$peers_dir/$name/$bin" "$@" >/dev/null 2>&1; then
        log "$name: $bin does not run; marking it unavailable"
        sed -i "s|^$name ok.*|$name unavailable binary-does-not-run|" "$status_file"
    fi
}
check proftpd usr/sbin/proftpd -v
check haproxy usr/sbin/haproxy -v
# The proxy-suite has no version flag; a missing library makes ldd say so.
if grep -q '^suse ok' "$status_file" && ldd "$peers_dir/suse/usr/sbin/ftp-proxy" | grep -q 'not found'; then
    sed -i "s|^suse ok.*|suse unavailable missing-libraries|" "$status_file"
fi

command -v getconf >/dev/null || { log "getconf missing"; exit 1; }
log "peers: $(tr '\n' ';' <"$status_file")"
log "ok"
