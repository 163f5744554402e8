//! `ftpx_relay`, the stream verdict of `--relay-mode sockmap` (issue 14,
//! item 3; layouts in [`ftp_proxy_common::relay`]).
//!
//! For every payload a socket in `FTPX_RSOCKS` receives: find its
//! counterpart in `FTPX_RPEERS` by the socket's cookie and redirect the
//! payload to that socket's send side (`FTPX_RTARGETS`), counting the bytes;
//! a socket without an entry keeps its payload (passed to its own receive
//! queue, where the daemon reads it); an empty skb (a bare FIN) is dropped;
//! a redirect the kernel refuses drops
//! the payload and is counted, so that the daemon fails the transfer.
//!
//! What it does not do: end of stream, resets, the idle watchdog, or
//! inserting and removing sockets: all the daemon's (`relay::sockmap`).

use aya_ebpf::{
    bindings::sk_action,
    helpers::generated::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, SockHash},
    programs::SkBuffContext,
};
use ftp_proxy_common::relay::{RELAY_MAX_ENTRIES, RelayPeer};

/// Sockets judged by `ftpx_relay` (the program is attached to this map).
#[map]
static FTPX_RSOCKS: SockHash<u64> = SockHash::with_max_entries(RELAY_MAX_ENTRIES, 0);

/// Sockets payload is redirected to.
#[map]
static FTPX_RTARGETS: SockHash<u64> = SockHash::with_max_entries(RELAY_MAX_ENTRIES, 0);

/// A socket's counterpart and counts, by the socket's cookie.
#[map]
static FTPX_RPEERS: HashMap<u64, RelayPeer> = HashMap::with_max_entries(RELAY_MAX_ENTRIES, 0);

/// Stream verdict: redirect the payload to the counterpart's send side.
#[stream_verdict]
pub fn ftpx_relay(ctx: SkBuffContext) -> u32 {
    // SAFETY: the helper reads the cookie of the skb's socket; the context
    // pointer is the one the kernel passed to this program.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let Some(entry) = FTPX_RPEERS.get_ptr_mut(cookie) else {
        return sk_action::SK_PASS;
    };
    let len = u64::from(ctx.len());
    if len == 0 {
        // A bare FIN's skb: TCP has already taken the FIN (the daemon sees
        // the end of stream). Redirected, the empty skb would make the
        // receiver's send fail with EPIPE; dropped, nothing is lost.
        return sk_action::SK_DROP;
    }
    // SAFETY: a valid pointer into the map's value (checked non-null by
    // get_ptr_mut); only this program writes it, under the socket's lock.
    let mut target = unsafe { (*entry).peer };
    let verdict = FTPX_RTARGETS.redirect_skb(&ctx, &mut target, 0);
    // SAFETY: as above.
    unsafe {
        if verdict == i64::from(sk_action::SK_PASS) {
            (*entry).bytes = (*entry).bytes.wrapping_add(len);
        } else {
            (*entry).dropped = (*entry).dropped.wrapping_add(len);
        }
    }
    verdict as u32
}
