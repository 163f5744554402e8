//! Bounded header parsing: Ethernet → IPv4 (IHL) or IPv6 (fixed header,
//! TCP as next header only) → TCP. Every read is checked against the packet
//! end; nothing is walked in a loop.
//!
//! `lo` has Ethernet framing too (zero MAC addresses), so one L2 format
//! covers every interface the tracker attaches to. VLAN-tagged frames, IPv6
//! extension headers and IP fragments are not TCP-at-a-fixed-offset and are
//! passed untracked.

use aya_ebpf::programs::{TcContext, XdpContext};
use ftp_proxy_common::{
    FlowKey, Segment,
    flow::{FAMILY_IPV4, FAMILY_IPV6, IPPROTO_TCP},
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_MIN_HLEN: usize = 20;

/// Ethernet header (all byte arrays: alignment 1, no unaligned reads).
#[repr(C)]
#[derive(Clone, Copy)]
struct EthHdr {
    _dst: [u8; 6],
    _src: [u8; 6],
    proto: [u8; 2],
}

/// IPv4 header without options.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Hdr {
    ver_ihl: u8,
    _tos: u8,
    tot_len: [u8; 2],
    _id: [u8; 2],
    frag_off: [u8; 2],
    _ttl: u8,
    proto: u8,
    _check: [u8; 2],
    saddr: [u8; 4],
    daddr: [u8; 4],
}

/// IPv6 fixed header.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Hdr {
    _vtc_flow: [u8; 4],
    payload_len: [u8; 2],
    next_hdr: u8,
    _hop_limit: u8,
    saddr: [u8; 16],
    daddr: [u8; 16],
}

/// TCP header without options.
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpHdr {
    sport: [u8; 2],
    dport: [u8; 2],
    seq: [u8; 4],
    ack: [u8; 4],
    doff_res: u8,
    flags: u8,
    _window: [u8; 2],
    _check: [u8; 2],
    _urg: [u8; 2],
}

/// Reads headers out of a packet, whatever the program type.
pub(crate) trait Packet: aya_ebpf::EbpfContext {
    /// The `T` at byte `offset` from the start of the frame (the Ethernet
    /// header), or `None` past the end.
    fn read<T: Copy>(&self, offset: usize) -> Option<T>;
    /// Length of the whole frame, Ethernet header included.
    fn frame_len(&self) -> usize;
}

impl Packet for XdpContext {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        let start = self.data();
        let end = self.data_end();
        // The verifier needs this exact shape: pointer + constant-bounded
        // offset + size compared with data_end before the access.
        if start + offset + core::mem::size_of::<T>() > end {
            return None;
        }
        let ptr = (start + offset) as *const T;
        // SAFETY: [ptr, ptr + size_of::<T>()) was checked to lie within the
        // packet; T is a byte-array struct (alignment 1) and read unaligned.
        Some(unsafe { ptr.read_unaligned() })
    }

    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.data_end() - self.data()
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        // bpf_skb_load_bytes: also reads headers outside the linear part of
        // the skb, which direct access could not.
        self.load::<T>(offset).ok()
    }

    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.len() as usize
    }
}

/// A TCP segment of interest: its canonical key, the segment as the
/// transition sees it, and its (source, destination) ports.
pub(crate) struct Parsed {
    pub key: FlowKey,
    pub seg: Segment,
    pub ports: (u16, u16),
}

/// `Ok(None)`: not TCP over IPv4/IPv6 over Ethernet (or an IP fragment):
/// not our business. `Err(())`: headers that contradict themselves.
#[inline(always)]
pub(crate) fn parse<P: Packet>(pkt: &P) -> Result<Option<Parsed>, ()> {
    let Some(eth) = pkt.read::<EthHdr>(0) else {
        return Ok(None); // runt frame: nothing to track
    };
    match u16::from_be_bytes(eth.proto) {
        ETH_P_IP => parse_ipv4(pkt),
        ETH_P_IPV6 => parse_ipv6(pkt),
        _ => Ok(None),
    }
}

#[inline(always)]
fn parse_ipv4<P: Packet>(pkt: &P) -> Result<Option<Parsed>, ()> {
    let ip = pkt.read::<Ipv4Hdr>(ETH_HLEN).ok_or(())?;
    if ip.ver_ihl >> 4 != 4 {
        return Err(());
    }
    // Masked: the verifier sees ihl in [0, 60].
    let ihl = usize::from(ip.ver_ihl & 0x0f) * 4;
    if ihl < IPV4_MIN_HLEN {
        return Err(());
    }
    // MF set or a fragment offset: not a whole TCP segment.
    if u16::from_be_bytes(ip.frag_off) & 0x3fff != 0 || ip.proto != IPPROTO_TCP {
        return Ok(None);
    }
    // tot_len 0: a GSO/BIG TCP packet larger than 64 KiB; use the frame.
    let tot_len = match usize::from(u16::from_be_bytes(ip.tot_len)) {
        0 => pkt.frame_len().saturating_sub(ETH_HLEN),
        n => n,
    };
    let l3_payload = tot_len.checked_sub(ihl).ok_or(())?;
    tcp(
        pkt,
        ETH_HLEN + ihl,
        l3_payload,
        FAMILY_IPV4,
        FlowKey::ipv4_mapped(ip.saddr),
        FlowKey::ipv4_mapped(ip.daddr),
    )
}

#[inline(always)]
fn parse_ipv6<P: Packet>(pkt: &P) -> Result<Option<Parsed>, ()> {
    let ip = pkt.read::<Ipv6Hdr>(ETH_HLEN).ok_or(())?;
    if ip.next_hdr != IPPROTO_TCP {
        // Extension headers are not walked: such packets go untracked.
        return Ok(None);
    }
    let l3_payload = match usize::from(u16::from_be_bytes(ip.payload_len)) {
        0 => pkt.frame_len().saturating_sub(ETH_HLEN + IPV6_HLEN),
        n => n,
    };
    tcp(
        pkt,
        ETH_HLEN + IPV6_HLEN,
        l3_payload,
        FAMILY_IPV6,
        ip.saddr,
        ip.daddr,
    )
}

#[inline(always)]
fn tcp<P: Packet>(
    pkt: &P,
    offset: usize,
    l3_payload: usize,
    family: u8,
    src: [u8; 16],
    dst: [u8; 16],
) -> Result<Option<Parsed>, ()> {
    let th = pkt.read::<TcpHdr>(offset).ok_or(())?;
    let doff = usize::from(th.doff_res >> 4) * 4;
    if doff < TCP_MIN_HLEN {
        return Err(());
    }
    let payload_len = l3_payload.checked_sub(doff).ok_or(())?;
    let sport = u16::from_be_bytes(th.sport);
    let dport = u16::from_be_bytes(th.dport);
    let (key, dir) = FlowKey::from_packet(family, src, sport, dst, dport);
    Ok(Some(Parsed {
        key,
        seg: Segment {
            dir,
            flags: th.flags,
            seq: u32::from_be_bytes(th.seq),
            ack: u32::from_be_bytes(th.ack),
            // At most 64 KiB from the IP length fields, or the frame length.
            payload_len: payload_len as u32,
        },
        ports: (sport, dport),
    }))
}
