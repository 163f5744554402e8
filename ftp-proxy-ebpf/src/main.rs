//! The flow tracker's eBPF programs: `ftpx_ingress` (XDP) and `ftpx_egress`
//! (TC classifier, attached through a tcx link).
//!
//! Both parse Ethernet → IPv4/IPv6 → TCP with bounded reads, keep only
//! segments whose source or destination port is in `FTPX_PORTS`, and apply
//! the pure [`transition`] to the flow's entry in `FTPX_FLOWS`. Closed flows
//! go to the `FTPX_CLOSED` ring buffer; every event and every error is
//! counted in `FTPX_COUNTERS`.
//!
//! A flow's entry is deleted when the flow closes, right after its record
//! went to the ring buffer: the table holds live flows only, so a busy
//! gateway's closed flows neither make the daemon's reads of the table
//! longer nor push live, quiet flows (idle control connections) out of the
//! LRU table. Segments after the end find no entry and are counted as
//! untracked. Flows that never close are the daemon's sweeper's.
//!
//! What they do not do: drop, modify or redirect a packet (they always pass
//! it: fail open), walk IPv6 extension headers, parse VLAN tags, or look at
//! anything but TCP.
//!
//! The layouts and the transition live in `ftp-proxy-common`; this crate
//! only reads packets and maps around them.

#![no_std]
#![no_main]

mod parse;

use aya_ebpf::{
    bindings::{BPF_NOEXIST, xdp_action},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map, xdp},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::{debug, warn};
use ftp_proxy_common::{
    ClosedFlowEvent, FlowKey, FlowValue, Segment,
    flow::tcp_flags,
    maps::{CLOSED_BYTE_SIZE, FLOWS_MAX_ENTRIES, PORTS_MAX_ENTRIES, counter, insert_error_counter},
    transition,
    transition::event,
};

use crate::parse::{Packet, Parsed};

// Map names are the statics' names; they must match ftp_proxy_common::maps.

/// Flow table: canonical key → flow value. LRU: when full, the least
/// recently used flow is evicted instead of failing the insert.
#[map]
static FTPX_FLOWS: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(FLOWS_MAX_ENTRIES, 0);

/// Watched ports (host order) → `PORT_WATCHED`. Written by the daemon.
#[map]
static FTPX_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(PORTS_MAX_ENTRIES, 0);

/// Per-CPU event and error counters, indexed by `counter::*`.
#[map]
static FTPX_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Closed flows, for the daemon to drain.
#[map]
static FTPX_CLOSED: RingBuf = RingBuf::with_byte_size(CLOSED_BYTE_SIZE, 0);

/// tcx (and cls_bpf direct-action) "no verdict, run the next program":
/// an observer must not end the chain for programs attached after it.
const TCX_NEXT: i32 = -1;

/// XDP entry point (ingress). Always passes the packet.
#[xdp]
pub fn ftpx_ingress(ctx: XdpContext) -> u32 {
    try_ingress(&ctx);
    xdp_action::XDP_PASS
}

/// TC entry point (egress, tcx link). Always lets the packet continue.
#[classifier]
pub fn ftpx_egress(ctx: TcContext) -> i32 {
    try_egress(&ctx);
    TCX_NEXT
}

#[inline(always)]
fn try_ingress(ctx: &XdpContext) {
    track(ctx);
}

#[inline(always)]
fn try_egress(ctx: &TcContext) {
    track(ctx);
}

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = FTPX_COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU array slot of this CPU; BPF programs do not
        // migrate while running, so nothing else writes it concurrently.
        unsafe { *slot = (*slot).wrapping_add(1) };
    }
}

#[inline(always)]
fn watched(port: u16) -> bool {
    FTPX_PORTS.get_ptr(port).is_some()
}

/// Parses, filters and applies one packet. Every outcome is a counter; the
/// caller passes the packet whatever happens.
#[inline(always)]
fn track<P: Packet>(ctx: &P) {
    let Parsed { key, seg, ports } = match parse::parse(ctx) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => return, // not TCP over IPv4/IPv6 over Ethernet
        Err(()) => {
            count(counter::PARSE_ERROR);
            return;
        }
    };
    if !watched(ports.0) && !watched(ports.1) {
        return;
    }
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(value) = lookup_or_open(ctx, &key, &seg) else {
        return;
    };
    // SAFETY: `value` points into the LRU map's value for `key`, valid for
    // the whole program run (RCU). Other CPUs may update the same entry
    // concurrently: `transition` writes only the fields this segment
    // changes (see its documentation); the race is accepted and documented.
    let ev = transition(unsafe { &mut *value }, &seg, now);
    if ev & event::IGNORED != 0 {
        count(counter::UNTRACKED);
        return;
    }
    count(counter::PACKETS);
    count_events(ev);
    if ev & event::CLOSED != 0 {
        // SAFETY: as above; read-only copy into the ring buffer.
        push_closed(ctx, &key, unsafe { &*value });
        // The record is in the ring buffer (or counted as lost there): the
        // entry has nothing left to say. A new SYN on the same 5-tuple
        // opens a fresh one. Failure means another CPU removed it first.
        #[expect(
            clippy::needless_borrows_for_generic_args,
            reason = "by value the 40-byte key is one more copy on the 512-byte stack: over the limit"
        )]
        let _ = FTPX_FLOWS.remove(&key);
    }
}

/// The flow's entry; a pure SYN of an unknown flow creates it.
#[inline(always)]
fn lookup_or_open<P: Packet>(ctx: &P, key: &FlowKey, seg: &Segment) -> Option<*mut FlowValue> {
    if let Some(value) = FTPX_FLOWS.get_ptr_mut(key) {
        return Some(value);
    }
    let opening = seg.flags & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::RST) == tcp_flags::SYN;
    if !opening {
        count(counter::UNTRACKED);
        return None;
    }
    // `&FlowValue::EMPTY` is a promoted constant in .rodata; passed by
    // value it would be a 104-byte copy on the 512-byte stack.
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "keeps the value off the BPF stack"
    )]
    let inserted = FTPX_FLOWS.insert(key, &FlowValue::EMPTY, u64::from(BPF_NOEXIST));
    if let Err(err) = inserted {
        let bucket = insert_error_counter(i64::from(err));
        count(bucket);
        // EEXIST: another CPU opened it between our lookup and insert; use
        // that entry. Anything else: give up on this packet.
        if bucket != counter::INSERT_EEXIST {
            warn!(ctx, "flow insert failed: {}", err);
            return None;
        }
    } else {
        debug!(ctx, "flow opened: port {} -> {}", key.port_a, key.port_b);
    }
    let value = FTPX_FLOWS.get_ptr_mut(key);
    if value.is_none() {
        count(counter::LOOKUP_AFTER_INSERT);
    }
    value
}

#[inline(always)]
fn count_events(ev: u32) {
    if ev & event::SYN != 0 {
        count(counter::SYN);
    }
    if ev & event::SYN_RETRANSMIT != 0 {
        count(counter::SYN_RETRANSMIT);
    }
    if ev & event::SYNACK != 0 {
        count(counter::SYNACK);
    }
    if ev & event::ESTABLISHED != 0 {
        count(counter::ESTABLISHED);
    }
    if ev & event::FIN != 0 {
        count(counter::FIN);
    }
    if ev & event::RST != 0 {
        count(counter::RST);
    }
    if ev & event::CLOSED != 0 {
        count(counter::CLOSED);
    }
    if ev & event::RESTART != 0 {
        count(counter::RESTART);
    }
}

#[inline(always)]
fn push_closed<P: Packet>(ctx: &P, key: &FlowKey, value: &FlowValue) {
    let Some(mut entry) = FTPX_CLOSED.reserve::<ClosedFlowEvent>(0) else {
        count(counter::RINGBUF_FULL);
        return;
    };
    let slot = entry.as_mut_ptr();
    // SAFETY: `slot` is the reserved, properly sized and aligned record;
    // the fields are written in place (no 144-byte temporary on the
    // 512-byte stack) before the record is submitted.
    unsafe {
        core::ptr::addr_of_mut!((*slot).key).write(*key);
        core::ptr::addr_of_mut!((*slot).value).write(*value);
    }
    entry.submit(0);
    debug!(
        ctx,
        "flow closed: port {} -> {} state {}", key.port_a, key.port_b, value.state
    );
}

/// The kernel checks this string for GPL-only helpers; none is used.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Never runs: nothing here panics (clippy denies unwrap, expect and
    // indexing), and a reachable call would have to pass the verifier.
    loop {}
}
