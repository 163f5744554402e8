//! The flow table's key and value: layouts shared with the kernel.
//!
//! # Canonical key
//! One map entry serves both directions of a TCP connection. The two
//! endpoints are ordered: endpoint **a** is the lower of the two
//! `(address bytes, port)` pairs, compared lexicographically (address bytes
//! first, in network order, then the port as a number); endpoint **b** is the
//! higher. A packet travels [`DIR_A_TO_B`] when its source is endpoint a,
//! else [`DIR_B_TO_A`]. Which endpoint opened the connection is recorded in
//! the value ([`FlowValue::syn_dir`]), not in the key.
//!
//! IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`, RFC 4291
//! §2.5.5.2), so IPv4 and IPv6 share one 16-byte form; [`FlowKey::family`]
//! keeps the wire family explicit.
//!
//! Ports are host byte order in the key; addresses are network order bytes.

use core::mem::size_of;

/// A packet from endpoint a to endpoint b.
pub const DIR_A_TO_B: u8 = 0;
/// A packet from endpoint b to endpoint a.
pub const DIR_B_TO_A: u8 = 1;
/// No direction recorded yet (e.g. no FIN seen).
pub const DIR_NONE: u8 = 0xff;

/// [`FlowKey::family`] of an IPv4 flow (addresses IPv4-mapped).
pub const FAMILY_IPV4: u8 = 4;
/// [`FlowKey::family`] of an IPv6 flow.
pub const FAMILY_IPV6: u8 = 6;

/// IP protocol number of TCP, the only protocol tracked.
pub const IPPROTO_TCP: u8 = 6;

/// TCP header flag bits (RFC 9293 §3.1), as in byte 13 of the header.
pub mod tcp_flags {
    /// No more data from sender.
    pub const FIN: u8 = 0x01;
    /// Synchronize sequence numbers.
    pub const SYN: u8 = 0x02;
    /// Reset the connection.
    pub const RST: u8 = 0x04;
    /// Push function.
    pub const PSH: u8 = 0x08;
    /// Acknowledgment field is significant.
    pub const ACK: u8 = 0x10;
    /// Urgent pointer field is significant.
    pub const URG: u8 = 0x20;
    /// ECN echo (RFC 3168).
    pub const ECE: u8 = 0x40;
    /// Congestion window reduced (RFC 3168).
    pub const CWR: u8 = 0x80;
}

/// Flow states ([`FlowValue::state`]). Integers, not an enum: the value is
/// written by the kernel side.
pub mod state {
    /// Entry created, no segment applied yet. Never seen outside a
    /// [`transition`](fn@crate::transition) call in a well-behaved datapath.
    pub const NONE: u8 = 0;
    /// First SYN seen.
    pub const SYN_SENT: u8 = 1;
    /// SYN+ACK from the other side seen.
    pub const SYN_RECEIVED: u8 = 2;
    /// Third segment of the handshake (an ACK from the SYN's sender) seen.
    pub const ESTABLISHED: u8 = 3;
    /// One side sent its FIN.
    pub const FIN_WAIT: u8 = 4;
    /// Both sides sent their FIN; not both are acknowledged yet.
    pub const CLOSING: u8 = 5;
    /// Both FINs acknowledged: the connection is over.
    pub const CLOSED: u8 = 6;
    /// A RST ended the connection.
    pub const RESET: u8 = 7;

    /// True for the two terminal states.
    #[must_use]
    pub const fn is_terminal(state: u8) -> bool {
        state == CLOSED || state == RESET
    }
}

/// The canonical 5-tuple of a TCP connection; see the module documentation
/// for which endpoint is "a".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// Address of endpoint a (IPv4-mapped for IPv4), network order.
    pub addr_a: [u8; 16],
    /// Address of endpoint b, network order.
    pub addr_b: [u8; 16],
    /// Port of endpoint a, host order.
    pub port_a: u16,
    /// Port of endpoint b, host order.
    pub port_b: u16,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// Always [`IPPROTO_TCP`].
    pub proto: u8,
    /// Explicit padding; always zero (the kernel hashes every key byte).
    pub _pad: [u8; 2],
}

const _: () = assert!(size_of::<FlowKey>() == 40);

impl FlowKey {
    /// Builds the canonical key of a packet from `src` to `dst` and returns
    /// it with the packet's direction ([`DIR_A_TO_B`] or [`DIR_B_TO_A`]).
    #[must_use]
    #[inline(always)]
    pub fn from_packet(
        family: u8,
        src: [u8; 16],
        src_port: u16,
        dst: [u8; 16],
        dst_port: u16,
    ) -> (Self, u8) {
        // (src, sport) <= (dst, dport) lexicographically => src is endpoint a.
        // Network-order bytes compare as big-endian numbers: two 64-bit
        // compares, no loop. (A byte loop made LLVM keep each of the 32
        // bytes in its own 8-byte stack slot: half of the programs'
        // 512-byte stack.)
        let (s, d) = (u128::from_be_bytes(src), u128::from_be_bytes(dst));
        let src_first = if s == d { src_port <= dst_port } else { s < d };
        if src_first {
            (
                Self {
                    addr_a: src,
                    addr_b: dst,
                    port_a: src_port,
                    port_b: dst_port,
                    family,
                    proto: IPPROTO_TCP,
                    _pad: [0; 2],
                },
                DIR_A_TO_B,
            )
        } else {
            (
                Self {
                    addr_a: dst,
                    addr_b: src,
                    port_a: dst_port,
                    port_b: src_port,
                    family,
                    proto: IPPROTO_TCP,
                    _pad: [0; 2],
                },
                DIR_B_TO_A,
            )
        }
    }

    /// The IPv4-mapped form of an IPv4 address (network order bytes).
    #[must_use]
    #[inline(always)]
    pub const fn ipv4_mapped(addr: [u8; 4]) -> [u8; 16] {
        [
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3],
        ]
    }
}

/// What one direction of a flow sent. "Direction" is the sender: in
/// [`FlowValue::ab`] endpoint a is the sender.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DirStats {
    /// TCP segments seen (a GSO/TSO super-segment counts once).
    pub packets: u64,
    /// TCP payload bytes (excluding IP and TCP headers).
    pub bytes: u64,
    /// Sequence number the FIN occupies (`seq + payload length` of the
    /// segment carrying it); valid when `fin_seen` is 1.
    pub fin_seq: u32,
    /// OR of every TCP flag byte this direction sent.
    pub flags: u8,
    /// 1 once this direction sent a FIN.
    pub fin_seen: u8,
    /// 1 once the other direction acknowledged that FIN.
    pub fin_acked: u8,
    /// Explicit padding; zero.
    pub _pad: u8,
}

const _: () = assert!(size_of::<DirStats>() == 24);

impl DirStats {
    /// All zero.
    pub const ZERO: Self = Self {
        packets: 0,
        bytes: 0,
        fin_seq: 0,
        flags: 0,
        fin_seen: 0,
        fin_acked: 0,
        _pad: 0,
    };
}

/// The state of one TCP connection. Timestamps are `bpf_ktime_get_ns()`
/// (CLOCK_MONOTONIC, nanoseconds); 0 means "not yet".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowValue {
    /// First SYN.
    pub first_syn_ns: u64,
    /// First SYN+ACK answering it.
    pub synack_ns: u64,
    /// Handshake completed.
    pub established_ns: u64,
    /// First FIN (either side).
    pub first_fin_ns: u64,
    /// Both FINs acknowledged, or RST.
    pub closed_ns: u64,
    /// Last segment of any kind (expiry).
    pub last_seen_ns: u64,
    /// Sent by endpoint a.
    pub ab: DirStats,
    /// Sent by endpoint b.
    pub ba: DirStats,
    /// One of the [`state`] constants.
    pub state: u8,
    /// Direction of the first SYN (so the SYN's sender, the client, is a
    /// when [`DIR_A_TO_B`]); [`DIR_NONE`] before.
    pub syn_dir: u8,
    /// Direction of the first FIN; [`DIR_NONE`] if none yet.
    pub fin_dir: u8,
    /// Direction of the RST that ended the flow; [`DIR_NONE`] if none.
    pub rst_dir: u8,
    /// 1 if a RST was seen.
    pub rst_seen: u8,
    /// Explicit padding; zero.
    pub _pad: [u8; 3],
}

const _: () = assert!(size_of::<FlowValue>() == 104);

impl FlowValue {
    /// A fresh entry: state [`state::NONE`], no direction recorded. The
    /// datapath inserts this, then applies the opening SYN with
    /// [`transition`](fn@crate::transition).
    pub const EMPTY: Self = Self {
        first_syn_ns: 0,
        synack_ns: 0,
        established_ns: 0,
        first_fin_ns: 0,
        closed_ns: 0,
        last_seen_ns: 0,
        ab: DirStats::ZERO,
        ba: DirStats::ZERO,
        state: state::NONE,
        syn_dir: DIR_NONE,
        fin_dir: DIR_NONE,
        rst_dir: DIR_NONE,
        rst_seen: 0,
        _pad: [0; 3],
    };

    /// The statistics of the direction `dir` sends (anything but
    /// [`DIR_A_TO_B`] selects `ba`).
    #[inline(always)]
    pub fn dir_mut(&mut self, dir: u8) -> &mut DirStats {
        if dir == DIR_A_TO_B {
            &mut self.ab
        } else {
            &mut self.ba
        }
    }

    /// Read-only [`Self::dir_mut`].
    #[must_use]
    #[inline(always)]
    pub fn dir(&self, dir: u8) -> &DirStats {
        if dir == DIR_A_TO_B {
            &self.ab
        } else {
            &self.ba
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4]) -> [u8; 16] {
        FlowKey::ipv4_mapped(a)
    }

    #[test]
    fn both_directions_give_the_same_key() {
        let c = v4([10, 0, 0, 2]);
        let s = v4([10, 0, 0, 1]);
        let (k1, d1) = FlowKey::from_packet(FAMILY_IPV4, c, 40000, s, 21);
        let (k2, d2) = FlowKey::from_packet(FAMILY_IPV4, s, 21, c, 40000);
        assert_eq!(k1, k2);
        assert_ne!(d1, d2);
        // 10.0.0.1 < 10.0.0.2: the server is endpoint a.
        assert_eq!(k1.addr_a, s);
        assert_eq!(k1.port_a, 21);
        assert_eq!(d1, DIR_B_TO_A);
    }

    #[test]
    fn same_address_orders_by_port() {
        let lo = v4([127, 0, 0, 1]);
        let (k, d) = FlowKey::from_packet(FAMILY_IPV4, lo, 5001, lo, 20);
        assert_eq!((k.port_a, k.port_b), (20, 5001));
        assert_eq!(d, DIR_B_TO_A);
        let (k2, d2) = FlowKey::from_packet(FAMILY_IPV4, lo, 20, lo, 5001);
        assert_eq!(k, k2);
        assert_eq!(d2, DIR_A_TO_B);
    }

    #[test]
    fn ipv4_mapped_form() {
        assert_eq!(
            v4([192, 0, 2, 1]),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 1]
        );
    }
}
