//! Decoding of the kernel's flow layouts (`ftp-proxy-common`) into plain
//! Rust values: std socket addresses, an enum state, `client`/`server`
//! instead of endpoints a/b. Pure: no maps, no clock.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ftp_proxy_common::flow::{DIR_A_TO_B, DIR_B_TO_A, FAMILY_IPV4, FAMILY_IPV6, state};
use ftp_proxy_common::{DirStats, FlowKey, FlowValue};

/// The two sides of a TCP connection: the `client` sent the first SYN, the
/// `server` answered it. (For an active-mode FTP data connection the FTP
/// server is the TCP client.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// Sent the first SYN.
    Client,
    /// Received the first SYN.
    Server,
}

/// Where a flow is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowState {
    /// The client's SYN was seen.
    SynSent,
    /// The server's SYN+ACK was seen.
    SynReceived,
    /// The handshake completed.
    Established,
    /// One side sent its FIN.
    FinWait,
    /// Both sides sent their FIN, not both acknowledged.
    Closing,
    /// Both FINs acknowledged.
    Closed,
    /// Ended by a RST.
    Reset,
}

impl FlowState {
    /// Every state, in lifecycle order.
    pub const ALL: [FlowState; 7] = [
        FlowState::SynSent,
        FlowState::SynReceived,
        FlowState::Established,
        FlowState::FinWait,
        FlowState::Closing,
        FlowState::Closed,
        FlowState::Reset,
    ];

    /// A bounded label value (also the serialized form): `syn_sent`,
    /// `syn_received`, `established`, `fin_wait`, `closing`, `closed`,
    /// `reset`.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            FlowState::SynSent => "syn_sent",
            FlowState::SynReceived => "syn_received",
            FlowState::Established => "established",
            FlowState::FinWait => "fin_wait",
            FlowState::Closing => "closing",
            FlowState::Closed => "closed",
            FlowState::Reset => "reset",
        }
    }
}

impl Side {
    /// `client` or `server`.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
        }
    }
}

/// What one side sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
pub struct DirectionStats {
    /// TCP segments seen at the hooks (a GSO/TSO super-segment counts once).
    pub packets: u64,
    /// TCP payload bytes.
    pub bytes: u64,
    /// OR of the TCP flag bytes sent (`ftp_proxy_common::flow::tcp_flags`).
    pub tcp_flags: u8,
    /// A FIN was sent.
    pub fin: bool,
    /// The other side acknowledged that FIN.
    pub fin_acked: bool,
}

/// When things happened, on the kernel's CLOCK_MONOTONIC
/// (`bpf_ktime_get_ns`): time since boot, suspend excluded. Compare with
/// [`monotonic_now`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
pub struct FlowTimes {
    /// The client's first SYN.
    pub first_syn: Option<Duration>,
    /// The server's SYN+ACK.
    pub syn_ack: Option<Duration>,
    /// Handshake completed.
    pub established: Option<Duration>,
    /// First FIN, either side.
    pub first_fin: Option<Duration>,
    /// Closed (both FINs acknowledged) or reset.
    pub closed: Option<Duration>,
    /// Last segment seen.
    pub last_seen: Duration,
}

/// One TCP connection as the tracker saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FlowRecord {
    /// The side that sent the first SYN.
    pub client: SocketAddr,
    /// The side that answered it.
    pub server: SocketAddr,
    /// Current (or final) state.
    pub state: FlowState,
    /// Sent by the client.
    pub from_client: DirectionStats,
    /// Sent by the server.
    pub from_server: DirectionStats,
    /// Who sent the first FIN, if any.
    pub first_fin: Option<Side>,
    /// Who sent the RST that ended the flow, if any.
    pub reset_by: Option<Side>,
    /// Timestamps.
    pub times: FlowTimes,
}

/// The current CLOCK_MONOTONIC time, the clock of [`FlowTimes`].
#[must_use]
pub fn monotonic_now() -> Duration {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

fn ts(ns: u64) -> Option<Duration> {
    (ns != 0).then(|| Duration::from_nanos(ns))
}

pub(super) fn addr(family: u8, bytes: [u8; 16], port: u16) -> Option<SocketAddr> {
    let ip = match family {
        FAMILY_IPV4 => IpAddr::V4(Ipv6Addr::from(bytes).to_ipv4_mapped()?),
        FAMILY_IPV6 => IpAddr::V6(Ipv6Addr::from(bytes)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn stats(d: &DirStats) -> DirectionStats {
    DirectionStats {
        packets: d.packets,
        bytes: d.bytes,
        tcp_flags: d.flags,
        fin: d.fin_seen != 0,
        fin_acked: d.fin_acked != 0,
    }
}

fn decode_state(s: u8) -> Option<FlowState> {
    Some(match s {
        state::SYN_SENT => FlowState::SynSent,
        state::SYN_RECEIVED => FlowState::SynReceived,
        state::ESTABLISHED => FlowState::Established,
        state::FIN_WAIT => FlowState::FinWait,
        state::CLOSING => FlowState::Closing,
        state::CLOSED => FlowState::Closed,
        state::RESET => FlowState::Reset,
        _ => return None,
    })
}

impl FlowRecord {
    /// Decodes a map entry. `None` for entries that hold no connection yet
    /// (state `NONE`) and for values no datapath writes (unknown state or
    /// family): the kernel side is trusted for layout, not for content.
    #[must_use]
    pub fn decode(key: &FlowKey, value: &FlowValue) -> Option<Self> {
        let state = decode_state(value.state)?;
        let a = addr(key.family, key.addr_a, key.port_a)?;
        let b = addr(key.family, key.addr_b, key.port_b)?;
        // syn_dir is always set once the state is past NONE.
        let client_is_a = match value.syn_dir {
            DIR_A_TO_B => true,
            DIR_B_TO_A => false,
            _ => return None,
        };
        let (client, server) = if client_is_a { (a, b) } else { (b, a) };
        let (from_client, from_server) = if client_is_a {
            (stats(&value.ab), stats(&value.ba))
        } else {
            (stats(&value.ba), stats(&value.ab))
        };
        let side = |dir: u8| match dir {
            DIR_A_TO_B | DIR_B_TO_A if (dir == DIR_A_TO_B) == client_is_a => Some(Side::Client),
            DIR_A_TO_B | DIR_B_TO_A => Some(Side::Server),
            _ => None,
        };
        Some(Self {
            client,
            server,
            state,
            from_client,
            from_server,
            first_fin: side(value.fin_dir),
            reset_by: if value.rst_seen != 0 {
                side(value.rst_dir)
            } else {
                None
            },
            times: FlowTimes {
                first_syn: ts(value.first_syn_ns),
                syn_ack: ts(value.synack_ns),
                established: ts(value.established_ns),
                first_fin: ts(value.first_fin_ns),
                closed: ts(value.closed_ns),
                last_seen: Duration::from_nanos(value.last_seen_ns),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use ftp_proxy_common::flow::tcp_flags::{ACK, FIN, SYN};
    use ftp_proxy_common::{Segment, transition};

    use super::*;

    fn v4(a: [u8; 4]) -> [u8; 16] {
        FlowKey::ipv4_mapped(a)
    }

    #[test]
    fn client_and_server_follow_the_first_syn() {
        let client = v4([127, 0, 0, 1]);
        let server = v4([127, 0, 0, 1]);
        // Client port 40000 > 21: the client is endpoint b.
        let (key, dir) = FlowKey::from_packet(FAMILY_IPV4, client, 40000, server, 21);
        assert_eq!(dir, DIR_B_TO_A);
        let mut v = FlowValue::EMPTY;
        let mut seg = |dir, flags, seq, ack, len| {
            transition(
                &mut v,
                &Segment {
                    dir,
                    flags,
                    seq,
                    ack,
                    payload_len: len,
                },
                7,
            )
        };
        seg(DIR_B_TO_A, SYN, 100, 0, 0);
        seg(DIR_A_TO_B, SYN | ACK, 500, 101, 0);
        seg(DIR_B_TO_A, ACK, 101, 501, 0);
        seg(DIR_B_TO_A, ACK, 101, 501, 10);
        seg(DIR_A_TO_B, ACK | FIN, 501, 111, 0);
        let r = FlowRecord::decode(&key, &v).unwrap();
        assert_eq!(r.client, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(r.server, "127.0.0.1:21".parse().unwrap());
        assert_eq!(r.state, FlowState::FinWait);
        assert_eq!(r.from_client.bytes, 10);
        assert_eq!(r.from_client.packets, 3);
        assert_eq!(r.from_server.packets, 2);
        assert!(r.from_server.fin);
        assert_eq!(r.first_fin, Some(Side::Server));
        assert_eq!(r.reset_by, None);
        assert_eq!(r.times.first_syn, Some(Duration::from_nanos(7)));
        assert_eq!(r.times.closed, None);
    }

    #[test]
    fn labels_match_serde() {
        for state in FlowState::ALL {
            assert_eq!(
                serde_json::to_string(&state).unwrap(),
                format!("\"{}\"", state.label())
            );
        }
        assert_eq!(serde_json::to_string(&Side::Server).unwrap(), "\"server\"");
    }

    #[test]
    fn ipv6_addresses() {
        let a: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let b: Ipv6Addr = "2001:db8::2".parse().unwrap();
        let (key, _) = FlowKey::from_packet(FAMILY_IPV6, a.octets(), 21, b.octets(), 5000);
        let mut v = FlowValue::EMPTY;
        v.state = state::SYN_SENT;
        v.syn_dir = DIR_B_TO_A;
        let r = FlowRecord::decode(&key, &v).unwrap();
        assert_eq!(r.client, "[2001:db8::2]:5000".parse().unwrap());
        assert_eq!(r.server, "[2001:db8::1]:21".parse().unwrap());
    }

    #[test]
    fn entries_without_a_connection_are_skipped() {
        let (key, _) = FlowKey::from_packet(FAMILY_IPV4, v4([1, 1, 1, 1]), 1, v4([2, 2, 2, 2]), 2);
        assert_eq!(FlowRecord::decode(&key, &FlowValue::EMPTY), None);
        let mut bad = FlowValue::EMPTY;
        bad.state = 99;
        bad.syn_dir = DIR_A_TO_B;
        assert_eq!(FlowRecord::decode(&key, &bad), None);
    }
}
