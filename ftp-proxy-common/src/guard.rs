//! Kernel-side admission of data connections ("the guard"): the layouts of
//! the expectation map and the pure decision the XDP program takes for a
//! SYN to a guarded data port.
//!
//! # Model
//! Before the gateway announces a data port (its `227`/`229` to a client,
//! its `PORT`/`EPRT` to a server), the daemon inserts an **expectation**:
//! the gateway's address and port ([`ExpectKey`]) → the peer address that
//! may connect, a deadline, the session and the leg ([`ExpectValue`]). A
//! pure SYN (SYN without ACK) arriving on a port flagged as guarded in the
//! port map is judged by [`judge`]:
//!
//! - no expectation for its destination → [`verdict::NO_EXPECTATION`]
//!   (only when the destination address is one of the gateway's own:
//!   forwarded traffic is never judged);
//! - from another address than the expected one → [`verdict::WRONG_PEER`];
//! - already claimed by a SYN with another source port → [`verdict::CONSUMED`]
//!   (one-shot); by this very source port → [`verdict::RETRANSMIT`] (the
//!   same connection's retransmitted SYN: passed);
//! - past its deadline → [`verdict::EXPIRED`];
//! - otherwise → [`verdict::CLAIM`]: the program tries to claim the
//!   expectation with one compare-and-swap of [`ExpectValue::claim`] from
//!   0 to [`claimed_by`]`(source port)`. Exactly one SYN wins, whatever
//!   the number of CPUs racing; a loser judges again with the value it
//!   found (a duplicate of the winner's SYN is a retransmission, anything
//!   else is consumed).
//!
//! After the winning SYN the connection's other segments are not SYNs and
//! pass; only pure SYNs are ever judged. With [`mode::OBSERVE`] every
//! verdict is counted and every packet passes; with [`mode::ENFORCE`] the
//! refused ones are dropped (no SYN+ACK, no accept, no entry in the flow
//! table).
//!
//! Fail open: a program that cannot read its configuration passes the
//! packet and counts it; a daemon that cannot insert an expectation (map
//! full) takes the port's guard flag off while that listener lives, so the
//! userspace port-theft check stays the only line for it.
//!
//! Layouts follow the crate's rules: `#[repr(C)]`, explicit padding, sizes
//! asserted, integers only.

use core::mem::size_of;

/// Values of the guard mode, the one `u32` of the `FTPX_GUARD` array.
pub mod mode {
    /// No SYN is judged.
    pub const OFF: u32 = 0;
    /// Every SYN to a guarded port is judged and counted; all pass.
    pub const OBSERVE: u32 = 1;
    /// As observe, and refused SYNs are dropped.
    pub const ENFORCE: u32 = 2;
}

/// Which leg a guarded data port serves ([`ExpectValue::leg`], and the
/// counter index).
pub mod leg {
    /// The gateway's passive listeners toward clients (PASV/EPSV).
    pub const CLIENT: u8 = 0;
    /// The gateway's active-mode listeners toward servers (PORT/EPRT).
    pub const SERVER: u8 = 1;
    /// Number of legs.
    pub const COUNT: u32 = 2;
}

/// What [`judge`] decided about a SYN (also the outcome part of the
/// counter index, see [`crate::maps::counter::guard`]).
pub mod verdict {
    /// Admitted: this SYN claimed a pending expectation.
    pub const ADMITTED: u32 = 0;
    /// Passed: a retransmission of the SYN that claimed the expectation.
    pub const RETRANSMIT: u32 = 1;
    /// Refused: no expectation for this address and port.
    pub const NO_EXPECTATION: u32 = 2;
    /// Refused: the expectation names another peer address.
    pub const WRONG_PEER: u32 = 3;
    /// Refused: the expectation's deadline has passed.
    pub const EXPIRED: u32 = 4;
    /// Refused: another connection already claimed the expectation.
    pub const CONSUMED: u32 = 5;
    /// Passed without a decision: the program could not read its
    /// configuration (fail open).
    pub const FAIL_OPEN: u32 = 6;
    /// Number of outcomes that are counted.
    pub const COUNT: u32 = 7;
    /// Not an outcome: [`super::judge`] found the expectation pending and
    /// valid; the caller must now claim it (compare-and-swap) to admit.
    pub const CLAIM: u32 = 0xff;

    /// Whether a counted outcome lets the packet through under enforce.
    #[must_use]
    #[inline(always)]
    pub const fn passes(verdict: u32) -> bool {
        verdict == ADMITTED || verdict == RETRANSMIT || verdict == FAIL_OPEN
    }
}

/// The gateway's end of an announced data port. IPv4 addresses are stored
/// IPv4-mapped, as in [`crate::FlowKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExpectKey {
    /// The gateway's address (the SYN's destination), network order.
    pub addr: [u8; 16],
    /// The gateway's port, host order.
    pub port: u16,
    /// [`crate::flow::FAMILY_IPV4`] or [`crate::flow::FAMILY_IPV6`].
    pub family: u8,
    /// Explicit padding; always zero (the kernel hashes every key byte).
    pub _pad: u8,
}

const _: () = assert!(size_of::<ExpectKey>() == 20);

/// Who may connect, until when, and whether someone did.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpectValue {
    /// The address the SYN must come from (IPv4-mapped for IPv4); all
    /// zero ([`ANY_PEER`]): from anywhere, once.
    pub peer: [u8; 16],
    /// After this (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) the expectation is
    /// expired.
    pub deadline_ns: u64,
    /// The session that announced the port (for `/flows`).
    pub session_id: u64,
    /// 0 while pending; [`claimed_by`]`(port)` once the SYN from that
    /// source port claimed it. Written only by the program's
    /// compare-and-swap (the daemon inserts 0). A `u64`: the BPF target
    /// has 64-bit atomics only.
    pub claim: u64,
    /// [`leg::CLIENT`] or [`leg::SERVER`].
    pub leg: u8,
    /// Explicit padding; zero.
    pub _pad: [u8; 7],
}

const _: () = assert!(size_of::<ExpectValue>() == 48);

/// [`ExpectValue::peer`] for a connection that may come from anywhere (the
/// client of a session that came through a PROXY-protocol balancer, whose
/// data connections may come from the balancer or the client): still one
/// connection only, before the deadline.
pub const ANY_PEER: [u8; 16] = [0; 16];

/// Set in every non-zero [`ExpectValue::claim`], so that source port 0
/// still claims.
pub const CLAIMED: u64 = 1 << 16;

/// The [`ExpectValue::claim`] value of a SYN from `port`.
#[must_use]
#[inline(always)]
pub const fn claimed_by(port: u16) -> u64 {
    CLAIMED | port as u64
}

/// The source port that claimed the expectation, if one did.
#[must_use]
#[inline(always)]
pub const fn claimant(claim: u64) -> Option<u16> {
    if claim & CLAIMED != 0 {
        Some(claim as u16)
    } else {
        None
    }
}

/// Judges a pure SYN from `peer`:`peer_port` against an expectation for
/// `expected` until `deadline_ns`, whose claim word currently reads
/// `claim`, at `now_ns`. Returns a [`verdict`]: [`verdict::CLAIM`] when
/// the caller should claim it.
///
/// Pure: the caller reads the fields of the [`ExpectValue`] (the claim
/// atomically: other CPUs may claim it meanwhile) and performs the claim.
#[must_use]
#[inline(always)]
pub fn judge(
    expected: &[u8; 16],
    deadline_ns: u64,
    claim: u64,
    peer: &[u8; 16],
    peer_port: u16,
    now_ns: u64,
) -> u32 {
    // As one number: two 64-bit compares, nothing on the BPF stack. All
    // zero expects anyone (`ANY_PEER`).
    let expected = u128::from_ne_bytes(*expected);
    if expected != 0 && expected != u128::from_ne_bytes(*peer) {
        return verdict::WRONG_PEER;
    }
    if claim != 0 {
        return if claim == claimed_by(peer_port) {
            verdict::RETRANSMIT
        } else {
            verdict::CONSUMED
        };
    }
    if now_ns > deadline_ns {
        return verdict::EXPIRED;
    }
    verdict::CLAIM
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FlowKey;

    /// [`judge`] on a value as the program reads it.
    fn judge_value(v: &ExpectValue, claim: u64, peer: &[u8; 16], port: u16, now: u64) -> u32 {
        judge(&v.peer, v.deadline_ns, claim, peer, port, now)
    }

    fn value(peer: [u8; 16], deadline_ns: u64) -> ExpectValue {
        ExpectValue {
            peer,
            deadline_ns,
            session_id: 7,
            claim: 0,
            leg: leg::CLIENT,
            _pad: [0; 7],
        }
    }

    #[test]
    fn verdicts() {
        let client = FlowKey::ipv4_mapped([10, 0, 0, 2]);
        let thief = FlowKey::ipv4_mapped([10, 0, 0, 66]);
        let v = value(client, 1_000);
        assert_eq!(judge_value(&v, 0, &client, 40_000, 999), verdict::CLAIM);
        assert_eq!(judge_value(&v, 0, &client, 40_000, 1_000), verdict::CLAIM);
        assert_eq!(judge_value(&v, 0, &client, 40_000, 1_001), verdict::EXPIRED);
        assert_eq!(judge_value(&v, 0, &thief, 40_000, 1), verdict::WRONG_PEER);
        // Claimed: the same source port is the same connection's
        // retransmitted SYN, another is a second connection.
        let c = claimed_by(40_000);
        assert_eq!(judge_value(&v, c, &client, 40_000, 1), verdict::RETRANSMIT);
        assert_eq!(judge_value(&v, c, &client, 40_001, 1), verdict::CONSUMED);
        // Even past the deadline: the claimed connection's retransmission
        // still passes (it was admitted in time).
        assert_eq!(
            judge_value(&v, c, &client, 40_000, 5_000),
            verdict::RETRANSMIT
        );
        // The wrong peer is refused as such in every state.
        assert_eq!(judge_value(&v, c, &thief, 40_000, 1), verdict::WRONG_PEER);
        // Anyone, once.
        let any = value(ANY_PEER, 1_000);
        assert_eq!(judge_value(&any, 0, &thief, 40_000, 1), verdict::CLAIM);
        assert_eq!(
            judge_value(&any, 0, &thief, 40_000, 1_001),
            verdict::EXPIRED
        );
        assert_eq!(
            judge_value(&any, c, &client, 40_000, 1),
            verdict::RETRANSMIT
        );
        assert_eq!(judge_value(&any, c, &client, 40_001, 1), verdict::CONSUMED);
    }

    #[test]
    fn port_zero_claims() {
        let peer = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let v = value(peer, u64::MAX);
        assert_eq!(claimant(0), None);
        assert_eq!(claimant(claimed_by(0)), Some(0));
        assert_eq!(claimant(claimed_by(65_535)), Some(65_535));
        assert_eq!(
            judge_value(&v, claimed_by(0), &peer, 0, 0),
            verdict::RETRANSMIT
        );
        assert_eq!(
            judge_value(&v, claimed_by(0), &peer, 1, 0),
            verdict::CONSUMED
        );
    }

    #[test]
    fn only_admissions_retransmissions_and_fail_open_pass() {
        let passing: [u32; 3] = [verdict::ADMITTED, verdict::RETRANSMIT, verdict::FAIL_OPEN];
        for v in 0..verdict::COUNT {
            assert_eq!(verdict::passes(v), passing.contains(&v), "{v}");
        }
    }
}
