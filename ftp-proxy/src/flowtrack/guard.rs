//! The guard's daemon half, pure: its mode, its legs and outcomes, and the
//! encoding of expectations and live TCP events to and from the kernel's
//! layouts (`ftp_proxy_common::guard`, `ftp_proxy_common::maps`). No maps,
//! no clock: [`super::FlowTracker`] does the I/O.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ftp_proxy_common::flow::{DIR_A_TO_B, FAMILY_IPV4, FAMILY_IPV6};
use ftp_proxy_common::guard::{claimant, leg, mode, verdict};
use ftp_proxy_common::maps::{FlowEvent, counter};
use ftp_proxy_common::transition::event;
use ftp_proxy_common::{ExpectKey, ExpectValue, FlowKey};

use super::record::addr;

/// What the kernel does with SYNs to the data ports (`--ebpf-guard`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum GuardMode {
    /// Nothing: no SYN is judged, no expectation is written.
    Off,
    /// Every SYN to a data port is judged and counted; none is dropped
    /// (the userspace port-theft check refuses thieves, as without eBPF).
    #[default]
    Observe,
    /// As observe, and refused SYNs are dropped: a thief gets no SYN+ACK.
    Enforce,
}

impl GuardMode {
    /// Every mode.
    pub const ALL: [GuardMode; 3] = [GuardMode::Off, GuardMode::Observe, GuardMode::Enforce];

    /// `off`, `observe` or `enforce`.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            GuardMode::Off => "off",
            GuardMode::Observe => "observe",
            GuardMode::Enforce => "enforce",
        }
    }

    /// The kernel's value (`ftp_proxy_common::guard::mode`).
    #[must_use]
    pub(crate) const fn raw(self) -> u32 {
        match self {
            GuardMode::Off => mode::OFF,
            GuardMode::Observe => mode::OBSERVE,
            GuardMode::Enforce => mode::ENFORCE,
        }
    }
}

/// Which listeners a guarded data port is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GuardLeg {
    /// The gateway's passive listeners, announced to clients (227/229).
    Client,
    /// The gateway's active-mode listeners, announced to servers
    /// (PORT/EPRT).
    Server,
}

impl GuardLeg {
    /// Both legs.
    pub const ALL: [GuardLeg; 2] = [GuardLeg::Client, GuardLeg::Server];

    /// The kernel's value (`ftp_proxy_common::guard::leg`).
    #[must_use]
    pub(crate) const fn raw(self) -> u8 {
        match self {
            GuardLeg::Client => leg::CLIENT,
            GuardLeg::Server => leg::SERVER,
        }
    }

    fn from_raw(raw: u8) -> GuardLeg {
        if raw == leg::SERVER {
            GuardLeg::Server
        } else {
            GuardLeg::Client
        }
    }

    /// The guard bit of the port map for this leg.
    #[must_use]
    pub const fn port_flag(self) -> u8 {
        match self {
            GuardLeg::Client => ftp_proxy_common::maps::port::GUARD_CLIENT,
            GuardLeg::Server => ftp_proxy_common::maps::port::GUARD_SERVER,
        }
    }
}

/// What the program decided about a SYN to a guarded port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GuardOutcome {
    /// It claimed a pending expectation: admitted.
    Admitted,
    /// The admitted connection's retransmitted SYN: passed.
    Retransmit,
    /// No expectation for that address and port.
    NoExpectation,
    /// From another address than the expected one.
    WrongPeer,
    /// The expectation's deadline had passed.
    Expired,
    /// Another connection had already claimed the expectation.
    Consumed,
    /// The program could not read its configuration: passed (fail open).
    FailOpen,
}

impl GuardOutcome {
    /// Every outcome, in the kernel's order.
    pub const ALL: [GuardOutcome; 7] = [
        GuardOutcome::Admitted,
        GuardOutcome::Retransmit,
        GuardOutcome::NoExpectation,
        GuardOutcome::WrongPeer,
        GuardOutcome::Expired,
        GuardOutcome::Consumed,
        GuardOutcome::FailOpen,
    ];

    /// The refusals (what `enforce` drops), each a drop reason.
    pub const REFUSALS: [GuardOutcome; 4] = [
        GuardOutcome::NoExpectation,
        GuardOutcome::WrongPeer,
        GuardOutcome::Expired,
        GuardOutcome::Consumed,
    ];

    /// A bounded label value.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            GuardOutcome::Admitted => "admitted",
            GuardOutcome::Retransmit => "retransmit",
            GuardOutcome::NoExpectation => "no_expectation",
            GuardOutcome::WrongPeer => "wrong_peer",
            GuardOutcome::Expired => "expired",
            GuardOutcome::Consumed => "consumed",
            GuardOutcome::FailOpen => "fail_open",
        }
    }

    const fn raw(self) -> u32 {
        match self {
            GuardOutcome::Admitted => verdict::ADMITTED,
            GuardOutcome::Retransmit => verdict::RETRANSMIT,
            GuardOutcome::NoExpectation => verdict::NO_EXPECTATION,
            GuardOutcome::WrongPeer => verdict::WRONG_PEER,
            GuardOutcome::Expired => verdict::EXPIRED,
            GuardOutcome::Consumed => verdict::CONSUMED,
            GuardOutcome::FailOpen => verdict::FAIL_OPEN,
        }
    }

    /// The index of its per-CPU counter on `leg`.
    pub(crate) const fn counter(self, leg: GuardLeg) -> u32 {
        counter::guard(self.raw(), leg.raw())
    }
}

/// The guard's counters, summed over CPUs: outcome by leg.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardCounters {
    counts: [[u64; GuardOutcome::ALL.len()]; 2],
}

impl GuardCounters {
    /// How many SYNs on `leg` came to `outcome`.
    #[must_use]
    pub fn get(&self, outcome: GuardOutcome, leg: GuardLeg) -> u64 {
        let o = GuardOutcome::ALL
            .iter()
            .position(|x| *x == outcome)
            .unwrap_or(0);
        self.counts
            .get(usize::from(leg.raw()))
            .and_then(|row| row.get(o))
            .copied()
            .unwrap_or(0)
    }

    pub(crate) fn set(&mut self, outcome: GuardOutcome, leg: GuardLeg, n: u64) {
        let o = GuardOutcome::ALL
            .iter()
            .position(|x| *x == outcome)
            .unwrap_or(0);
        if let Some(slot) = self
            .counts
            .get_mut(usize::from(leg.raw()))
            .and_then(|row| row.get_mut(o))
        {
            *slot = n;
        }
    }
}

/// `{"client": {"admitted": 1, …}, "server": {…}}` in `/flows`.
impl serde::Serialize for GuardCounters {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        struct Leg<'a>(&'a GuardCounters, GuardLeg);
        impl serde::Serialize for Leg<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut map = s.serialize_map(Some(GuardOutcome::ALL.len()))?;
                for outcome in GuardOutcome::ALL {
                    map.serialize_entry(outcome.label(), &self.0.get(outcome, self.1))?;
                }
                map.end()
            }
        }
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry("client", &Leg(self, GuardLeg::Client))?;
        map.serialize_entry("server", &Leg(self, GuardLeg::Server))?;
        map.end()
    }
}

/// An expectation as the daemon inserts it: the gateway's listener
/// (`local`) may be connected to from `peer` only, once, until `deadline`
/// (CLOCK_MONOTONIC, see [`super::monotonic_now`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expectation {
    /// The gateway's listening address and port (as announced, before any
    /// NAT in front of it: the SYN's destination at this host).
    pub local: SocketAddr,
    /// The only address the SYN may come from.
    pub peer: IpAddr,
    /// When it expires.
    pub deadline: Duration,
    /// The session, for `/flows`.
    pub session_id: u64,
    /// Which listeners.
    pub leg: GuardLeg,
}

fn mapped(ip: IpAddr) -> (u8, [u8; 16]) {
    match ip.to_canonical() {
        IpAddr::V4(v4) => (FAMILY_IPV4, v4.to_ipv6_mapped().octets()),
        IpAddr::V6(v6) => (FAMILY_IPV6, v6.octets()),
    }
}

/// The kernel's form of an address: IPv4-mapped for IPv4.
#[must_use]
pub(crate) fn address_bytes(ip: IpAddr) -> [u8; 16] {
    mapped(ip).1
}

/// The map key of the listener at `local`.
#[must_use]
pub(crate) fn expect_key(local: SocketAddr) -> ExpectKey {
    let (family, addr) = mapped(local.ip());
    ExpectKey {
        addr,
        port: local.port(),
        family,
        _pad: 0,
    }
}

impl Expectation {
    /// The map entry.
    #[must_use]
    pub(crate) fn encode(&self) -> (ExpectKey, ExpectValue) {
        (
            expect_key(self.local),
            ExpectValue {
                peer: address_bytes(self.peer),
                deadline_ns: u64::try_from(self.deadline.as_nanos()).unwrap_or(u64::MAX),
                session_id: self.session_id,
                claim: 0,
                leg: self.leg.raw(),
                _pad: [0; 7],
            },
        )
    }
}

/// An expectation as read back from the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ExpectationRecord {
    /// The gateway's listener.
    pub local: SocketAddr,
    /// Who may connect.
    pub peer: IpAddr,
    /// Which listeners.
    pub leg: GuardLeg,
    /// The session.
    pub session_id: u64,
    /// When it expires (CLOCK_MONOTONIC).
    pub deadline: Duration,
    /// The peer's source port of the SYN that claimed it; `None` while
    /// pending.
    pub claimed_by: Option<u16>,
}

impl ExpectationRecord {
    /// Decodes a map entry; `None` for a family no daemon writes.
    #[must_use]
    pub(crate) fn decode(key: &ExpectKey, value: &ExpectValue) -> Option<Self> {
        let local = addr(key.family, key.addr, key.port)?;
        let peer = if value.peer == ftp_proxy_common::guard::ANY_PEER {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        } else {
            addr(key.family, value.peer, 0)?.ip()
        };
        Some(Self {
            local,
            peer,
            leg: GuardLeg::from_raw(value.leg),
            session_id: value.session_id,
            deadline: Duration::from_nanos(value.deadline_ns),
            claimed_by: claimant(value.claim),
        })
    }
}

/// One segment's TCP events, as the kernel reported them when they
/// happened (`FTPX_EVENTS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveEvent {
    /// The segment's sender.
    pub from: SocketAddr,
    /// Its receiver.
    pub to: SocketAddr,
    /// A flow opened (first SYN).
    pub syn: bool,
    /// The SYN+ACK answering it.
    pub syn_ack: bool,
    /// The handshake completed: SYN to now in `handshake`.
    pub established: bool,
    /// This direction's first FIN.
    pub fin: bool,
    /// A RST ended the flow.
    pub rst: bool,
    /// First SYN to established, with `established`.
    pub handshake: Option<Duration>,
    /// When the segment was seen (CLOCK_MONOTONIC).
    pub at: Duration,
}

impl LiveEvent {
    /// Decodes a ring buffer record; `None` for a family no datapath
    /// writes.
    #[must_use]
    pub(crate) fn decode(ev: &FlowEvent) -> Option<Self> {
        let k: &FlowKey = &ev.key;
        let a = addr(k.family, k.addr_a, k.port_a)?;
        let b = addr(k.family, k.addr_b, k.port_b)?;
        let (from, to) = if ev.dir == DIR_A_TO_B { (a, b) } else { (b, a) };
        let established = ev.events & event::ESTABLISHED != 0;
        Some(Self {
            from,
            to,
            syn: ev.events & event::SYN != 0,
            syn_ack: ev.events & event::SYNACK != 0,
            established,
            fin: ev.events & event::FIN != 0,
            rst: ev.events & event::RST != 0,
            handshake: (established && ev.first_syn_ns != 0)
                .then(|| Duration::from_nanos(ev.at_ns.saturating_sub(ev.first_syn_ns))),
            at: Duration::from_nanos(ev.at_ns),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations_round_trip_for_both_families() {
        for (local, peer) in [
            ("10.0.0.1:50001", "10.0.0.2"),
            ("[2001:db8::1]:50001", "2001:db8::2"),
            ("[::ffff:10.0.0.1]:50001", "::ffff:10.0.0.2"),
        ] {
            let e = Expectation {
                local: local.parse().unwrap(),
                peer: peer.parse().unwrap(),
                deadline: Duration::from_secs(5),
                session_id: 42,
                leg: GuardLeg::Server,
            };
            let (key, value) = e.encode();
            let r = ExpectationRecord::decode(&key, &value).unwrap();
            assert_eq!(
                r.local,
                SocketAddr::new(e.local.ip().to_canonical(), e.local.port())
            );
            assert_eq!(r.peer, e.peer.to_canonical());
            assert_eq!((r.leg, r.session_id, r.deadline), (e.leg, 42, e.deadline));
            assert_eq!(r.claimed_by, None);
            assert_eq!(expect_key(e.local), key);
        }
    }

    #[test]
    fn an_ipv4_listener_and_its_mapped_form_are_one_key() {
        let plain = expect_key("10.0.0.1:2000".parse().unwrap());
        let mapped = expect_key("[::ffff:10.0.0.1]:2000".parse().unwrap());
        assert_eq!(plain, mapped);
        assert_eq!(plain.family, FAMILY_IPV4);
    }

    #[test]
    fn counters_by_outcome_and_leg() {
        let mut c = GuardCounters::default();
        c.set(GuardOutcome::WrongPeer, GuardLeg::Server, 3);
        assert_eq!(c.get(GuardOutcome::WrongPeer, GuardLeg::Server), 3);
        assert_eq!(c.get(GuardOutcome::WrongPeer, GuardLeg::Client), 0);
        let json = serde_json::to_value(c).unwrap();
        assert_eq!(json["server"]["wrong_peer"], 3);
        assert_eq!(json["client"]["admitted"], 0);
        let mut indices: Vec<u32> = GuardOutcome::ALL
            .iter()
            .flat_map(|o| GuardLeg::ALL.map(|l| o.counter(l)))
            .collect();
        indices.sort_unstable();
        indices.dedup();
        assert_eq!(indices.len(), 14);
        assert!(indices.iter().all(|i| *i < counter::COUNT));
    }

    #[test]
    fn live_events_name_the_sender() {
        let (key, dir) = FlowKey::from_packet(
            FAMILY_IPV4,
            FlowKey::ipv4_mapped([10, 0, 0, 2]),
            40_000,
            FlowKey::ipv4_mapped([10, 0, 0, 1]),
            21,
        );
        let ev = FlowEvent {
            key,
            first_syn_ns: 1_000,
            at_ns: 3_500,
            events: event::ESTABLISHED,
            dir,
            _pad: [0; 3],
        };
        let e = LiveEvent::decode(&ev).unwrap();
        assert_eq!(e.from, "10.0.0.2:40000".parse().unwrap());
        assert_eq!(e.to, "10.0.0.1:21".parse().unwrap());
        assert!(e.established && !e.syn && !e.fin);
        assert_eq!(e.handshake, Some(Duration::from_nanos(2_500)));
    }
}
