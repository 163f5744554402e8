//! Map names, sizes and the layouts of the maps other than the flow table.
//!
//! | map | type | key | value |
//! |---|---|---|---|
//! | [`FLOWS`] | `LRU_HASH` | [`FlowKey`] | [`FlowValue`] |
//! | [`PORTS`] | `HASH` | `u16` port, host order | `u8`, [`port`] flags |
//! | [`COUNTERS`] | `PERCPU_ARRAY` | `u32` index, [`counter`] | `u64` |
//! | [`CLOSED`] | `RINGBUF` | - | [`ClosedFlowEvent`] records |
//! | [`EVENTS`] | `RINGBUF` | - | [`FlowEvent`] records |
//! | [`EXPECT`] | `HASH` | [`ExpectKey`] | [`ExpectValue`] |
//! | [`ADDRS`] | `HASH` | `[u8; 16]` address (IPv4-mapped) | `u8`, [`ADDR_LOCAL`] |
//! | [`GUARD`] | `ARRAY` | `u32` 0 | `u32`, a [`crate::guard::mode`] |
//!
//! The names are the kernel's map names (at most 15 bytes) and the ELF
//! symbols of the eBPF object; the daemon finds the maps by these names.

use core::mem::size_of;

use crate::flow::{FlowKey, FlowValue};
#[cfg(doc)]
use crate::guard::{ExpectKey, ExpectValue};

/// Flow table (LRU hash keyed by the canonical flow key).
pub const FLOWS: &str = "FTPX_FLOWS";
/// Ports to track: a flow is tracked if either of its ports is here.
pub const PORTS: &str = "FTPX_PORTS";
/// Per-CPU event counters, indexed by [`counter`].
pub const COUNTERS: &str = "FTPX_COUNTERS";
/// Ring buffer of [`ClosedFlowEvent`]s.
pub const CLOSED: &str = "FTPX_CLOSED";
/// Ring buffer of [`FlowEvent`]s: each TCP event as it happens.
pub const EVENTS: &str = "FTPX_EVENTS";
/// Expectations of the guard ([`crate::guard`]).
pub const EXPECT: &str = "FTPX_EXPECT";
/// The gateway's own addresses: only SYNs to these are refused for want of
/// an expectation (a gateway that also routes never judges forwarded
/// traffic).
pub const ADDRS: &str = "FTPX_ADDRS";
/// The guard's mode: one `u32` at index 0.
pub const GUARD: &str = "FTPX_GUARD";

/// Name of the XDP program (ingress, `--ebpf-ingress xdp`).
pub const PROG_INGRESS: &str = "ftpx_ingress";
/// Name of the TC classifier for ingress (through a tcx link; the
/// default hook).
pub const PROG_INGRESS_TC: &str = "ftpx_ingress_tc";
/// Name of the TC classifier (egress, attached through a tcx link).
pub const PROG_EGRESS: &str = "ftpx_egress";

/// Default capacity of [`FLOWS`]; the daemon may override it at load time.
pub const FLOWS_MAX_ENTRIES: u32 = 65_536;
/// Capacity of [`PORTS`]: every port fits, so an insert never fails for
/// lack of room.
pub const PORTS_MAX_ENTRIES: u32 = 65_536;
/// Size of [`CLOSED`] in bytes (a power of two, a multiple of the page
/// size): about 1,700 events of backlog.
pub const CLOSED_BYTE_SIZE: u32 = 256 * 1024;
/// Size of [`EVENTS`] in bytes: 14,500 events (72 bytes each with the
/// ring's header) of backlog, drained every 100 ms.
pub const EVENTS_BYTE_SIZE: u32 = 1024 * 1024;
/// Default capacity of [`EXPECT`]; the daemon sizes it from its session
/// limit at load time (two listeners a session at most).
pub const EXPECT_MAX_ENTRIES: u32 = 65_536;
/// Capacity of [`ADDRS`].
pub const ADDRS_MAX_ENTRIES: u32 = 1024;

/// [`PORTS`] value: the port is watched (and no guard flag).
pub const PORT_WATCHED: u8 = port::WATCHED;

/// [`ADDRS`] value: the address is the gateway's.
pub const ADDR_LOCAL: u8 = 1;

/// Bits of a [`PORTS`] value. Any entry means watched; the guard bits say
/// which leg's listeners the port is for.
pub mod port {
    /// Flows on this port are tracked.
    pub const WATCHED: u8 = 1;
    /// SYNs to this port are judged as the client leg's (passive listeners).
    pub const GUARD_CLIENT: u8 = 2;
    /// SYNs to this port are judged as the server leg's (active listeners).
    pub const GUARD_SERVER: u8 = 4;
    /// Either guard bit.
    pub const GUARD: u8 = GUARD_CLIENT | GUARD_SERVER;

    /// The [`crate::guard::leg`] of a guarded port's flags (client when
    /// both bits are set).
    #[must_use]
    #[inline(always)]
    pub const fn leg(flags: u8) -> u8 {
        if flags & GUARD_CLIENT != 0 {
            crate::guard::leg::CLIENT
        } else {
            crate::guard::leg::SERVER
        }
    }
}

/// One closed flow (both FINs acknowledged, or RST), as pushed to [`CLOSED`]:
/// the key and a copy of the value at the moment it closed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClosedFlowEvent {
    /// The flow.
    pub key: FlowKey,
    /// Its value when it closed.
    pub value: FlowValue,
}

const _: () = assert!(size_of::<ClosedFlowEvent>() == 144);

/// One TCP event of a flow, pushed to [`EVENTS`] when it happens (so
/// that long flows are counted before they close).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    /// The flow.
    pub key: FlowKey,
    /// The flow's first SYN (for the handshake time of `ESTABLISHED`).
    pub first_syn_ns: u64,
    /// When this segment was seen.
    pub at_ns: u64,
    /// The [`crate::transition::event`] bits of the segment, masked with
    /// [`FlowEvent::REPORTED`].
    pub events: u32,
    /// The segment's direction ([`crate::flow::DIR_A_TO_B`] or
    /// [`crate::flow::DIR_B_TO_A`]).
    pub dir: u8,
    /// Explicit padding; zero.
    pub _pad: [u8; 3],
}

const _: () = assert!(size_of::<FlowEvent>() == 64);

impl FlowEvent {
    /// The events worth a record: the handshake's three, FIN, RST.
    pub const REPORTED: u32 = crate::transition::event::SYN
        | crate::transition::event::SYNACK
        | crate::transition::event::ESTABLISHED
        | crate::transition::event::FIN
        | crate::transition::event::RST;
}

/// Indices into [`COUNTERS`]. Each is a per-CPU `u64` the daemon sums.
pub mod counter {
    /// Flows opened (first SYN, including restarts on port reuse).
    pub const SYN: u32 = 0;
    /// SYN+ACKs answering a first SYN.
    pub const SYNACK: u32 = 1;
    /// Handshakes completed.
    pub const ESTABLISHED: u32 = 2;
    /// FINs (first FIN of each direction).
    pub const FIN: u32 = 3;
    /// RSTs that ended a flow.
    pub const RST: u32 = 4;
    /// Flows closed (both FINs acknowledged, or RST).
    pub const CLOSED: u32 = 5;
    /// Closed flows restarted by a new SYN (port reuse).
    pub const RESTART: u32 = 6;
    /// Retransmitted SYNs.
    pub const SYN_RETRANSMIT: u32 = 7;
    /// Segments applied to a tracked flow.
    pub const PACKETS: u32 = 8;
    /// Segments on watched ports that belong to no tracked flow and do not
    /// open one (only a SYN opens a flow).
    pub const UNTRACKED: u32 = 9;
    /// Malformed headers (IPv4 IHL < 5, TCP data offset < 5, lengths that
    /// do not add up). The packet is passed.
    pub const PARSE_ERROR: u32 = 10;
    /// Flow insert failed with ENOMEM.
    pub const INSERT_ENOMEM: u32 = 11;
    /// Flow insert failed with E2BIG (map full; unusual for an LRU map).
    pub const INSERT_E2BIG: u32 = 12;
    /// Flow insert failed with EEXIST (another CPU inserted it first; the
    /// segment is then applied to that entry).
    pub const INSERT_EEXIST: u32 = 13;
    /// Flow insert failed with another errno.
    pub const INSERT_OTHER: u32 = 14;
    /// Lookup failed right after a successful insert (evicted at once).
    pub const LOOKUP_AFTER_INSERT: u32 = 15;
    /// A closed-flow event was lost: the ring buffer was full.
    pub const RINGBUF_FULL: u32 = 16;
    /// A live event was lost: the [`super::EVENTS`] ring buffer was full.
    pub const EVENTS_FULL: u32 = 17;
    /// First of the guard's counters: [`guard`] gives the index of a
    /// (verdict, leg) pair.
    pub const GUARD_BASE: u32 = 18;
    /// Number of counters (the map's size).
    pub const COUNT: u32 = GUARD_BASE + crate::guard::verdict::COUNT * crate::guard::leg::COUNT;

    /// The counter of a guard [`crate::guard::verdict`] on a
    /// [`crate::guard::leg`]. Out-of-range inputs are folded in range (the
    /// verifier sees a bounded index).
    #[must_use]
    #[inline(always)]
    pub const fn guard(verdict: u32, leg: u8) -> u32 {
        let verdict = if verdict < crate::guard::verdict::COUNT {
            verdict
        } else {
            crate::guard::verdict::FAIL_OPEN
        };
        GUARD_BASE + verdict * crate::guard::leg::COUNT + (leg as u32 & 1)
    }
}

/// Buckets an errno returned by `bpf_map_update_elem` (negative, as the
/// helper returns it) into a [`counter`] index.
#[must_use]
#[inline(always)]
pub const fn insert_error_counter(err: i64) -> u32 {
    const ENOMEM: i64 = 12;
    const E2BIG: i64 = 7;
    const EEXIST: i64 = 17;
    match -err {
        ENOMEM => counter::INSERT_ENOMEM,
        E2BIG => counter::INSERT_E2BIG,
        EEXIST => counter::INSERT_EEXIST,
        _ => counter::INSERT_OTHER,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel() {
        // BPF_OBJ_NAME_LEN is 16 including the NUL.
        for name in [
            FLOWS,
            PORTS,
            COUNTERS,
            CLOSED,
            EVENTS,
            EXPECT,
            ADDRS,
            GUARD,
            PROG_INGRESS,
            PROG_EGRESS,
        ] {
            assert!(name.len() <= 15, "{name}");
        }
    }

    #[test]
    fn guard_counters_are_distinct_and_in_range() {
        let mut seen = [false; counter::COUNT as usize];
        for verdict in 0..crate::guard::verdict::COUNT {
            for leg in 0..2u8 {
                let i = counter::guard(verdict, leg);
                assert!((counter::GUARD_BASE..counter::COUNT).contains(&i));
                assert!(!seen[i as usize], "{verdict} {leg}");
                seen[i as usize] = true;
            }
        }
        assert!(seen[counter::GUARD_BASE as usize..].iter().all(|s| *s));
        assert_eq!(
            counter::guard(99, 1),
            counter::guard(crate::guard::verdict::FAIL_OPEN, 1)
        );
        assert_eq!(port::leg(port::GUARD_SERVER), crate::guard::leg::SERVER);
        assert_eq!(port::leg(port::GUARD), crate::guard::leg::CLIENT);
    }

    #[test]
    fn errno_buckets() {
        assert_eq!(insert_error_counter(-12), counter::INSERT_ENOMEM);
        assert_eq!(insert_error_counter(-7), counter::INSERT_E2BIG);
        assert_eq!(insert_error_counter(-17), counter::INSERT_EEXIST);
        assert_eq!(insert_error_counter(-1), counter::INSERT_OTHER);
    }
}
