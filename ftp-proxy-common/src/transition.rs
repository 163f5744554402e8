//! What one TCP segment does to a flow: the pure transition function the
//! eBPF programs call between a map lookup and the counters, and that the
//! host tests drive through whole connections.
//!
//! # Model
//! - Only a SYN without ACK opens a flow ([`state::NONE`] → `SYN_SENT`); a
//!   segment of an unknown flow that is not such a SYN changes nothing (the
//!   datapath does not even create an entry for it).
//! - `SYN_SENT` → `SYN_RECEIVED` on a SYN+ACK from the other side;
//!   → `ESTABLISHED` on an ACK from the SYN's sender.
//! - A FIN from either side: `FIN_WAIT` for the first, `CLOSING` for the
//!   second. The FIN's sequence number is `seq + payload length`; an ACK from
//!   the other side with `ack >= fin_seq + 1` (RFC 1982 serial arithmetic)
//!   acknowledges it. Both FINs acknowledged: `CLOSED`. This handles the
//!   usual close (one side first), the simultaneous close (FINs cross) and
//!   FINs that carry data.
//! - A RST in any live state: `RESET` (closed). Before the handshake this is
//!   a refused connection, after it an abort.
//! - A SYN without ACK on a `CLOSED` or `RESET` flow is a new connection
//!   reusing the 5-tuple: the flow restarts from scratch.
//! - Segments after the end (retransmitted FINs, late ACKs) are counted in
//!   packets and bytes but change no state.
//!
//! Concurrency: the eBPF side applies this to the map value in place, from
//! any CPU, without a lock. The function writes only the fields a segment
//! changes, and a direction's counters only for segments of that direction,
//! so the common concurrent case (data one way, ACKs the other, on two CPUs)
//! loses nothing.

use crate::flow::{DIR_A_TO_B, DIR_B_TO_A, DIR_NONE, FlowValue, state, tcp_flags};

/// What the transition reported, as bits of the returned `u32`.
pub mod event {
    /// A flow opened (first SYN).
    pub const SYN: u32 = 1 << 0;
    /// The first SYN was retransmitted.
    pub const SYN_RETRANSMIT: u32 = 1 << 1;
    /// SYN+ACK answering the first SYN.
    pub const SYNACK: u32 = 1 << 2;
    /// Handshake completed.
    pub const ESTABLISHED: u32 = 1 << 3;
    /// A direction sent its first FIN.
    pub const FIN: u32 = 1 << 4;
    /// A FIN was acknowledged.
    pub const FIN_ACKED: u32 = 1 << 5;
    /// A RST ended the flow.
    pub const RST: u32 = 1 << 6;
    /// The flow reached `CLOSED` or `RESET` with this segment.
    pub const CLOSED: u32 = 1 << 7;
    /// A closed flow restarted (port reuse); comes with [`SYN`].
    pub const RESTART: u32 = 1 << 8;
    /// The segment belongs to no flow and does not open one: nothing changed.
    pub const IGNORED: u32 = 1 << 9;
}

/// One TCP segment, as parsed from the headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// [`DIR_A_TO_B`] or [`DIR_B_TO_A`] (from [`FlowKey::from_packet`](crate::FlowKey::from_packet)).
    pub dir: u8,
    /// TCP flag byte ([`tcp_flags`]).
    pub flags: u8,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number (meaningful with ACK).
    pub ack: u32,
    /// TCP payload length in bytes.
    pub payload_len: u32,
}

/// `a >= b` in sequence-number space (RFC 1982 serial arithmetic).
#[inline(always)]
const fn seq_ge(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) >= 0
}

#[inline(always)]
fn open(value: &mut FlowValue, dir: u8, now_ns: u64) {
    *value = FlowValue::EMPTY;
    value.state = state::SYN_SENT;
    value.syn_dir = dir;
    value.first_syn_ns = now_ns;
}

/// Applies `seg` to `value` at time `now_ns` and returns the [`event`] bits.
///
/// Never fails and never panics: a segment that makes no sense in the
/// current state is counted and otherwise ignored.
#[inline(always)]
pub fn transition(value: &mut FlowValue, seg: &Segment, now_ns: u64) -> u32 {
    use tcp_flags::{ACK, FIN, RST, SYN};

    let dir = if seg.dir == DIR_A_TO_B {
        DIR_A_TO_B
    } else {
        DIR_B_TO_A
    };
    let other = dir ^ 1;
    let flags = seg.flags;
    let pure_syn = flags & (SYN | ACK) == SYN;
    let mut ev = 0;

    if value.state == state::NONE {
        if !pure_syn || flags & RST != 0 {
            return event::IGNORED;
        }
        open(value, dir, now_ns);
        ev |= event::SYN;
    } else if pure_syn && flags & RST == 0 && state::is_terminal(value.state) {
        open(value, dir, now_ns);
        ev |= event::SYN | event::RESTART;
    } else if pure_syn
        && dir == value.syn_dir
        && (value.state == state::SYN_SENT || value.state == state::SYN_RECEIVED)
    {
        ev |= event::SYN_RETRANSMIT;
    }

    {
        let d = value.dir_mut(dir);
        d.packets = d.packets.wrapping_add(1);
        d.bytes = d.bytes.wrapping_add(u64::from(seg.payload_len));
        d.flags |= flags;
    }
    value.last_seen_ns = now_ns;

    if state::is_terminal(value.state) {
        return ev;
    }

    if flags & RST != 0 {
        value.state = state::RESET;
        value.rst_seen = 1;
        value.rst_dir = dir;
        value.closed_ns = now_ns;
        return ev | event::RST | event::CLOSED;
    }

    if flags & SYN != 0 {
        if flags & ACK != 0 && value.state == state::SYN_SENT && dir != value.syn_dir {
            value.state = state::SYN_RECEIVED;
            value.synack_ns = now_ns;
            ev |= event::SYNACK;
        }
        // A SYN never carries a FIN we track, nor acknowledges one.
        return ev;
    }

    if flags & ACK != 0 {
        if value.state == state::SYN_RECEIVED && dir == value.syn_dir {
            value.state = state::ESTABLISHED;
            value.established_ns = now_ns;
            ev |= event::ESTABLISHED;
        }
        let o = value.dir_mut(other);
        if o.fin_seen != 0 && o.fin_acked == 0 && seq_ge(seg.ack, o.fin_seq.wrapping_add(1)) {
            o.fin_acked = 1;
            ev |= event::FIN_ACKED;
        }
    }

    if flags & FIN != 0
        && (value.state == state::ESTABLISHED
            || value.state == state::FIN_WAIT
            || value.state == state::CLOSING)
    {
        let d = value.dir_mut(dir);
        if d.fin_seen == 0 {
            d.fin_seen = 1;
            d.fin_seq = seg.seq.wrapping_add(seg.payload_len);
            if value.fin_dir == DIR_NONE {
                value.fin_dir = dir;
                value.first_fin_ns = now_ns;
                value.state = state::FIN_WAIT;
            } else {
                value.state = state::CLOSING;
            }
            ev |= event::FIN;
        }
    }

    if value.ab.fin_acked != 0 && value.ba.fin_acked != 0 {
        value.state = state::CLOSED;
        value.closed_ns = now_ns;
        ev |= event::CLOSED;
    }
    ev
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::tcp_flags::{ACK, FIN, PSH, RST, SYN};

    const A: u8 = DIR_A_TO_B;
    const B: u8 = DIR_B_TO_A;

    /// A two-sided TCP conversation with real sequence numbers: each side's
    /// `snd` is its next sequence number, `ack` what it acknowledges.
    struct Conv {
        v: FlowValue,
        now: u64,
        snd: [u32; 2],
    }

    impl Conv {
        fn new() -> Self {
            Self {
                v: FlowValue::EMPTY,
                now: 1_000,
                // Near the wrap point on purpose: serial arithmetic.
                snd: [0xffff_fff0, 0x7000_0000],
            }
        }

        /// Sends from `dir` with `flags` and `len` payload bytes; ACK
        /// acknowledges everything the other side sent so far.
        fn send(&mut self, dir: u8, flags: u8, len: u32) -> u32 {
            let i = usize::from(dir);
            let seq = self.snd[i];
            let ack = self.snd[i ^ 1];
            self.now += 10;
            let ev = transition(
                &mut self.v,
                &Segment {
                    dir,
                    flags,
                    seq,
                    ack,
                    payload_len: len,
                },
                self.now,
            );
            let consumed = len + u32::from(flags & (SYN | FIN) != 0);
            self.snd[i] = seq.wrapping_add(consumed);
            ev
        }

        /// Like `send` but with an explicit (stale) ack number.
        fn send_ack(&mut self, dir: u8, flags: u8, len: u32, ack: u32) -> u32 {
            let i = usize::from(dir);
            let seq = self.snd[i];
            self.now += 10;
            let ev = transition(
                &mut self.v,
                &Segment {
                    dir,
                    flags,
                    seq,
                    ack,
                    payload_len: len,
                },
                self.now,
            );
            self.snd[i] = seq.wrapping_add(len + u32::from(flags & (SYN | FIN) != 0));
            ev
        }

        fn handshake(&mut self, client: u8) {
            let server = client ^ 1;
            assert_eq!(self.send(client, SYN, 0), event::SYN);
            assert_eq!(self.v.state, state::SYN_SENT);
            assert_eq!(self.send(server, SYN | ACK, 0), event::SYNACK);
            assert_eq!(self.v.state, state::SYN_RECEIVED);
            assert_eq!(self.send(client, ACK, 0), event::ESTABLISHED);
            assert_eq!(self.v.state, state::ESTABLISHED);
        }
    }

    /// The seed's RETR data connection: the server (port 20, endpoint a
    /// here) opens to the client's port 5002, sends data, then DATA+FIN; the
    /// client ACKs, sends its FIN+ACK, the server sends the last ACK.
    #[test]
    fn seed_active_mode_retr() {
        let mut c = Conv::new();
        let server = A;
        let client = B;
        c.handshake(server); // in active mode the FTP server sends the SYN
        assert_eq!(c.v.syn_dir, server);
        assert_eq!(c.v.first_syn_ns, 1_010);
        assert_eq!(c.v.synack_ns, 1_020);
        assert_eq!(c.v.established_ns, 1_030);

        assert_eq!(c.send(server, ACK | PSH, 1448), 0);
        assert_eq!(c.send(server, ACK | PSH, 1448), 0);
        assert_eq!(c.send(client, ACK, 0), 0);
        assert_eq!(c.send(server, ACK | PSH, 1448), 0);
        assert_eq!(c.send(server, ACK | PSH, 1000), 0);
        assert_eq!(c.send(client, ACK, 0), 0);
        // Last data segment carries the FIN.
        assert_eq!(c.send(server, ACK | PSH | FIN, 500), event::FIN);
        assert_eq!(c.v.state, state::FIN_WAIT);
        assert_eq!(c.v.fin_dir, server);
        assert_eq!(c.v.first_fin_ns, c.now);
        // Client ACKs the FIN (ack = fin_seq + 1).
        assert_eq!(c.send(client, ACK, 0), event::FIN_ACKED);
        assert_eq!(c.v.state, state::FIN_WAIT);
        assert_eq!(c.send(client, ACK | FIN, 0), event::FIN);
        assert_eq!(c.v.state, state::CLOSING);
        let closed_at = c.now + 10;
        assert_eq!(c.send(server, ACK, 0), event::FIN_ACKED | event::CLOSED);
        assert_eq!(c.v.state, state::CLOSED);
        assert_eq!(c.v.closed_ns, closed_at);

        let s = c.v.dir(server);
        assert_eq!(s.packets, 1 + 1 + 5 + 1);
        assert_eq!(s.bytes, 1448 * 3 + 1000 + 500);
        assert_eq!(s.flags, SYN | ACK | PSH | FIN);
        let cl = c.v.dir(client);
        assert_eq!(cl.packets, 1 + 2 + 2);
        assert_eq!(cl.bytes, 0);
        assert_eq!(cl.flags, SYN | ACK | FIN);
        assert_eq!(c.v.rst_seen, 0);
        assert_eq!(c.v.rst_dir, DIR_NONE);
    }

    /// The seed's LIST connection: FIN+ACK from the server without data,
    /// the client's ACK and FIN+ACK, the server's last ACK. Here the client
    /// side is endpoint a, so both orientations are covered.
    #[test]
    fn seed_active_mode_list() {
        let mut c = Conv::new();
        let server = B;
        let client = A;
        c.handshake(server);
        assert_eq!(c.send(server, ACK, 0), 0);
        assert_eq!(c.send(server, ACK | PSH, 300), 0);
        assert_eq!(c.send(server, ACK | FIN, 0), event::FIN);
        assert_eq!(c.send(client, ACK, 0), event::FIN_ACKED);
        assert_eq!(c.send(client, ACK | FIN, 0), event::FIN);
        assert_eq!(c.send(server, ACK, 0), event::FIN_ACKED | event::CLOSED);
        assert_eq!(c.v.fin_dir, server);
        assert_eq!(c.v.dir(server).bytes, 300);
    }

    /// The client's FIN+ACK acknowledges the server's FIN and sends its own
    /// in one segment (no separate ACK).
    #[test]
    fn fin_ack_piggybacked() {
        let mut c = Conv::new();
        c.handshake(A);
        c.send(B, ACK | FIN, 0);
        assert_eq!(c.send(A, ACK | FIN, 0), event::FIN_ACKED | event::FIN);
        assert_eq!(c.v.state, state::CLOSING);
        assert_eq!(c.send(B, ACK, 0), event::FIN_ACKED | event::CLOSED);
    }

    /// Both sides send FIN before seeing the other's: the FINs cross, then
    /// each side ACKs the other's FIN.
    #[test]
    fn simultaneous_close() {
        let mut c = Conv::new();
        c.handshake(A);
        let a_ack = c.snd[1];
        let b_ack = c.snd[0];
        assert_eq!(c.send_ack(A, ACK | FIN, 0, a_ack), event::FIN);
        // B's FIN does not acknowledge A's FIN (it was sent before B saw it).
        assert_eq!(c.send_ack(B, ACK | FIN, 0, b_ack), event::FIN);
        assert_eq!(c.v.state, state::CLOSING);
        assert_eq!(c.v.fin_dir, A);
        assert_eq!(c.send(A, ACK, 0), event::FIN_ACKED);
        assert_eq!(c.v.state, state::CLOSING);
        assert_eq!(c.send(B, ACK, 0), event::FIN_ACKED | event::CLOSED);
        assert_eq!(c.v.state, state::CLOSED);
    }

    /// An ACK that does not cover the FIN (data still in flight) does not
    /// acknowledge it.
    #[test]
    fn partial_ack_does_not_ack_fin() {
        let mut c = Conv::new();
        c.handshake(A);
        let before = c.snd[0];
        c.send(A, ACK | PSH, 100);
        c.send(A, ACK | FIN, 0);
        assert_eq!(c.send_ack(B, ACK, 0, before.wrapping_add(100)), 0);
        assert_eq!(c.v.ab.fin_acked, 0);
        assert_eq!(c.send(B, ACK, 0), event::FIN_ACKED);
        assert_eq!(c.v.ab.fin_acked, 1);
    }

    #[test]
    fn rst_before_handshake() {
        let mut c = Conv::new();
        assert_eq!(c.send(A, SYN, 0), event::SYN);
        // Connection refused: RST+ACK from the server.
        assert_eq!(c.send(B, RST | ACK, 0), event::RST | event::CLOSED);
        assert_eq!(c.v.state, state::RESET);
        assert_eq!(c.v.rst_seen, 1);
        assert_eq!(c.v.rst_dir, B);
        assert_eq!(c.v.closed_ns, c.now);
        assert_eq!(c.v.established_ns, 0);
    }

    #[test]
    fn rst_after_handshake() {
        let mut c = Conv::new();
        c.handshake(A);
        c.send(A, ACK | PSH, 10);
        assert_eq!(c.send(A, RST | ACK, 0), event::RST | event::CLOSED);
        assert_eq!(c.v.state, state::RESET);
        assert_eq!(c.v.rst_dir, A);
        // Later segments are counted, change nothing, report nothing.
        assert_eq!(c.send(B, ACK | PSH, 5), 0);
        assert_eq!(c.send(B, RST, 0), 0);
        assert_eq!(c.v.state, state::RESET);
        assert_eq!(c.v.ba.packets, 1 + 2);
    }

    #[test]
    fn rst_during_close() {
        let mut c = Conv::new();
        c.handshake(A);
        c.send(B, ACK | FIN, 0);
        assert_eq!(c.send(A, RST, 0), event::RST | event::CLOSED);
        assert_eq!(c.v.state, state::RESET);
        assert_eq!(c.v.fin_dir, B);
    }

    #[test]
    fn syn_retransmission() {
        let mut c = Conv::new();
        assert_eq!(c.send(A, SYN, 0), event::SYN);
        let first = c.v.first_syn_ns;
        c.snd[0] = c.snd[0].wrapping_sub(1); // same ISN again
        assert_eq!(c.send(A, SYN, 0), event::SYN_RETRANSMIT);
        assert_eq!(c.v.state, state::SYN_SENT);
        assert_eq!(c.v.first_syn_ns, first);
        assert_eq!(c.v.ab.packets, 2);
        assert_eq!(c.send(B, SYN | ACK, 0), event::SYNACK);
        // The SYN+ACK was lost: the client retransmits its SYN again.
        c.snd[0] = c.snd[0].wrapping_sub(1);
        assert_eq!(c.send(A, SYN, 0), event::SYN_RETRANSMIT);
        assert_eq!(c.v.state, state::SYN_RECEIVED);
        // Retransmitted SYN+ACK: no second SYNACK event.
        c.snd[1] = c.snd[1].wrapping_sub(1);
        assert_eq!(c.send(B, SYN | ACK, 0), 0);
        assert_eq!(c.send(A, ACK, 0), event::ESTABLISHED);
    }

    #[test]
    fn port_reuse_restarts_a_closed_flow() {
        let mut c = Conv::new();
        c.handshake(A);
        c.send(A, ACK | PSH, 42);
        c.send(A, ACK | FIN, 0);
        c.send(B, ACK | FIN, 0);
        assert_eq!(c.send(A, ACK, 0), event::FIN_ACKED | event::CLOSED);
        // Same 5-tuple, new connection, opened by the other side this time.
        let ev = c.send(B, SYN, 0);
        assert_eq!(ev, event::SYN | event::RESTART);
        assert_eq!(c.v.state, state::SYN_SENT);
        assert_eq!(c.v.syn_dir, B);
        assert_eq!(c.v.first_syn_ns, c.now);
        assert_eq!(c.v.closed_ns, 0);
        assert_eq!(c.v.fin_dir, DIR_NONE);
        assert_eq!(c.v.ab, crate::DirStats::ZERO);
        assert_eq!(c.v.ba.packets, 1);
        assert_eq!(c.v.ba.bytes, 0);
        assert_eq!(c.send(A, SYN | ACK, 0), event::SYNACK);
        assert_eq!(c.send(B, ACK, 0), event::ESTABLISHED);
    }

    #[test]
    fn port_reuse_after_reset() {
        let mut c = Conv::new();
        c.send(A, SYN, 0);
        c.send(B, RST | ACK, 0);
        assert_eq!(c.send(A, SYN, 0), event::SYN | event::RESTART);
        assert_eq!(c.v.rst_seen, 0);
        assert_eq!(c.v.state, state::SYN_SENT);
    }

    #[test]
    fn only_a_syn_opens_a_flow() {
        for flags in [
            ACK,
            ACK | PSH,
            FIN | ACK,
            RST,
            RST | ACK,
            SYN | ACK,
            SYN | RST,
        ] {
            let mut v = FlowValue::EMPTY;
            let seg = Segment {
                dir: A,
                flags,
                seq: 1,
                ack: 1,
                payload_len: 10,
            };
            assert_eq!(transition(&mut v, &seg, 5), event::IGNORED, "{flags:#x}");
            assert_eq!(v, FlowValue::EMPTY);
        }
    }

    #[test]
    fn stray_syn_on_a_live_flow_changes_nothing() {
        let mut c = Conv::new();
        c.handshake(A);
        assert_eq!(c.send(B, SYN, 0), 0);
        assert_eq!(c.v.state, state::ESTABLISHED);
        assert_eq!(c.v.syn_dir, A);
    }

    #[test]
    fn fin_retransmission_is_not_a_second_fin() {
        let mut c = Conv::new();
        c.handshake(A);
        assert_eq!(c.send(A, ACK | FIN, 0), event::FIN);
        c.snd[0] = c.snd[0].wrapping_sub(1);
        assert_eq!(c.send(A, ACK | FIN, 0), 0);
        assert_eq!(c.v.state, state::FIN_WAIT);
        assert_eq!(c.v.ab.packets, 2 + 2);
    }

    #[test]
    fn fin_before_established_is_ignored() {
        let mut c = Conv::new();
        c.send(A, SYN, 0);
        assert_eq!(c.send(A, FIN, 0), 0);
        assert_eq!(c.v.state, state::SYN_SENT);
        assert_eq!(c.v.ab.fin_seen, 0);
    }

    #[test]
    fn third_handshake_segment_may_carry_data_and_fin() {
        let mut c = Conv::new();
        c.send(A, SYN, 0);
        c.send(B, SYN | ACK, 0);
        assert_eq!(
            c.send(A, ACK | PSH | FIN, 7),
            event::ESTABLISHED | event::FIN
        );
        assert_eq!(c.v.state, state::FIN_WAIT);
        assert_eq!(c.v.ab.bytes, 7);
    }

    #[test]
    fn serial_arithmetic() {
        assert!(seq_ge(5, 5));
        assert!(seq_ge(6, 5));
        assert!(!seq_ge(4, 5));
        assert!(seq_ge(3, 0xffff_fffe));
        assert!(!seq_ge(0xffff_fffe, 3));
    }

    mod prop {
        extern crate std;
        use std::vec::Vec;

        use proptest::prelude::*;

        use super::*;

        fn segment() -> impl Strategy<Value = Segment> {
            (
                0u8..2,
                any::<u8>(),
                any::<u32>(),
                any::<u32>(),
                0u32..70_000,
            )
                .prop_map(|(dir, flags, seq, ack, payload_len)| Segment {
                    dir,
                    flags,
                    seq,
                    ack,
                    payload_len,
                })
        }

        proptest! {
            /// Whatever arrives, in any order: the state stays a known
            /// value, counts add up, terminal states only leave through a
            /// restart, and the lifecycle timestamps stay ordered.
            #[test]
            fn invariants_hold_for_any_segments(rest in proptest::collection::vec(segment(), 1..64)) {
                // Open with a SYN so most cases exercise a live flow.
                let open = Segment { dir: DIR_A_TO_B, flags: tcp_flags::SYN, seq: 0, ack: 0, payload_len: 0 };
                let segs: Vec<Segment> = core::iter::once(open).chain(rest).collect();
                let mut v = FlowValue::EMPTY;
                let mut counted = 0u64;
                let mut bytes = 0u64;
                for (i, seg) in segs.iter().enumerate() {
                    let before = v;
                    let now = 1_000 + i as u64;
                    let ev = transition(&mut v, seg, now);
                    prop_assert!(v.state <= state::RESET);
                    if ev & event::IGNORED != 0 {
                        prop_assert_eq!(v, before);
                        continue;
                    }
                    if ev & event::RESTART != 0 {
                        prop_assert!(state::is_terminal(before.state));
                        counted = 0;
                        bytes = 0;
                    }
                    counted += 1;
                    bytes += u64::from(seg.payload_len);
                    prop_assert_eq!(v.ab.packets + v.ba.packets, counted);
                    prop_assert_eq!(v.ab.bytes + v.ba.bytes, bytes);
                    prop_assert_eq!(v.last_seen_ns, now);
                    if state::is_terminal(before.state) && ev & event::RESTART == 0 {
                        prop_assert_eq!(v.state, before.state);
                        prop_assert_eq!(v.closed_ns, before.closed_ns);
                    }
                    // A restart is a pure SYN (never a RST): CLOSED exactly
                    // when this segment made the flow terminal.
                    prop_assert_eq!(
                        ev & event::CLOSED != 0,
                        state::is_terminal(v.state) && !state::is_terminal(before.state)
                    );
                    let times: Vec<u64> = [v.first_syn_ns, v.synack_ns, v.established_ns, v.first_fin_ns, v.closed_ns]
                        .into_iter()
                        .filter(|&t| t != 0)
                        .collect();
                    prop_assert!(times.windows(2).all(|w| w[0] <= w[1]), "{:?}", v);
                    prop_assert!(v.syn_dir == DIR_A_TO_B || v.syn_dir == DIR_B_TO_A);
                }
            }
        }
    }
}
