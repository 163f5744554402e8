//! Map names, sizes and the layouts of the maps other than the flow table.
//!
//! | map | type | key | value |
//! |---|---|---|---|
//! | [`FLOWS`] | `LRU_HASH` | [`FlowKey`] | [`FlowValue`] |
//! | [`PORTS`] | `HASH` | `u16` port, host order | `u8`, [`PORT_WATCHED`] |
//! | [`COUNTERS`] | `PERCPU_ARRAY` | `u32` index, [`counter`] | `u64` |
//! | [`CLOSED`] | `RINGBUF` | - | [`ClosedFlowEvent`] records |
//!
//! The names are the kernel's map names (at most 15 bytes) and the ELF
//! symbols of the eBPF object; the daemon finds the maps by these names.

use core::mem::size_of;

use crate::flow::{FlowKey, FlowValue};

/// Flow table (LRU hash keyed by the canonical flow key).
pub const FLOWS: &str = "FTPX_FLOWS";
/// Ports to track: a flow is tracked if either of its ports is here.
pub const PORTS: &str = "FTPX_PORTS";
/// Per-CPU event counters, indexed by [`counter`].
pub const COUNTERS: &str = "FTPX_COUNTERS";
/// Ring buffer of [`ClosedFlowEvent`]s.
pub const CLOSED: &str = "FTPX_CLOSED";

/// Name of the XDP program (ingress).
pub const PROG_INGRESS: &str = "ftpx_ingress";
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

/// [`PORTS`] value: the port is watched.
pub const PORT_WATCHED: u8 = 1;

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
    /// Number of counters (the map's size).
    pub const COUNT: u32 = 17;
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
        for name in [FLOWS, PORTS, COUNTERS, CLOSED, PROG_INGRESS, PROG_EGRESS] {
            assert!(name.len() <= 15, "{name}");
        }
    }

    #[test]
    fn errno_buckets() {
        assert_eq!(insert_error_counter(-12), counter::INSERT_ENOMEM);
        assert_eq!(insert_error_counter(-7), counter::INSERT_E2BIG);
        assert_eq!(insert_error_counter(-17), counter::INSERT_EEXIST);
        assert_eq!(insert_error_counter(-1), counter::INSERT_OTHER);
    }
}
