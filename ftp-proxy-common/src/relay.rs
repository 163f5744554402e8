//! The kernel data plane of `--relay-mode sockmap` (issue 14, item 3): the
//! maps' names and the value of the peer map.
//!
//! A transfer's two data sockets are in two socket hashes, keyed by their
//! socket cookies: [`TARGETS`] (no program: what the verdict redirects to)
//! and [`SOCKS`] (with the stream-verdict program [`PROG_RELAY`], which runs
//! for every payload a socket receives). [`PEERS`] maps each socket's cookie
//! to its counterpart's and counts what was redirected. The daemon inserts a
//! pair into [`TARGETS`] first, then into [`SOCKS`], so that no payload is
//! ever judged before its target can take it.
//!
//! | map | type | key | value |
//! |---|---|---|---|
//! | [`SOCKS`] | `SOCKHASH` | `u64` socket cookie | socket |
//! | [`TARGETS`] | `SOCKHASH` | `u64` socket cookie | socket |
//! | [`PEERS`] | `HASH` | `u64` socket cookie | [`RelayPeer`] |

use core::mem::size_of;

/// Sockets whose payload the verdict program judges.
pub const SOCKS: &str = "FTPX_RSOCKS";
/// Sockets payload is redirected to (no program attached).
pub const TARGETS: &str = "FTPX_RTARGETS";
/// A socket's counterpart and counts.
pub const PEERS: &str = "FTPX_RPEERS";
/// Name of the stream-verdict program.
pub const PROG_RELAY: &str = "ftpx_relay";
/// Default capacity of each map (sockets, two per transfer); the daemon
/// may override it at load time.
pub const RELAY_MAX_ENTRIES: u32 = 65_536;

/// One socket of a relayed pair, keyed by its own cookie in [`PEERS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayPeer {
    /// The cookie of the socket this one's payload goes to.
    pub peer: u64,
    /// Bytes redirected to it. Written by the verdict program only, which
    /// runs under the receiving socket's lock: never two at once for one
    /// socket.
    pub bytes: u64,
    /// Bytes the kernel refused to redirect (dropped: the transfer is
    /// broken and must fail).
    pub dropped: u64,
}

const _: () = assert!(size_of::<RelayPeer>() == 24);
