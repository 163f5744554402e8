//! The PROXY protocol (HAProxy's `proxy-protocol.txt`, v1 and v2) on both
//! sides of the gateway: reading the header a trusted load balancer puts at
//! the start of a client connection, and writing one at the start of the
//! connection to the server.
//!
//! Reading follows the specification's rules: the header is required from
//! a trusted peer (`proxy-protocol-from`) and never expected from anyone
//! else (no guessing); the connection is not served before a complete,
//! valid header arrived; a short deadline covers it (3 s by default, a TCP
//! retransmission). The reader consumes exactly the header's bytes, never
//! one more, so a client's first command sent in the same segment stays in
//! the socket for the session's framing. The codec is the `proxy-header`
//! crate; the reading (how many bytes to take, bounds, deadline) is ours.
//!
//! Mixed address families: a v1 `TCP4`/`TCP6` line and a v2 `AF_INET`/
//! `AF_INET6` block carry one family for both addresses. When the client
//! and the address it dialled differ (an IPv6 client of an IPv4 listener,
//! possible through a load balancer or a v4-mapped socket), the header
//! written for the server is IPv6 with the IPv4 address mapped
//! (`::ffff:a.b.c.d`): the client's real address is never lost, and a
//! server that canonicalises mapped addresses sees the IPv4 one.
//!
//! Not here: when a header is read (at accept, before admission, by the
//! session task) and what the session does with the addresses.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use proxy_header::{ParseConfig, Protocol, ProxiedAddress, ProxyHeader};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;

/// An IPv4 or IPv6 network, `ADDR/LEN` (a bare address is a single host).
/// IPv4-mapped IPv6 addresses are taken as the IPv4 ones, in the network
/// and in [`Cidr::contains`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// Why a CIDR does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// The address part is not an IP address.
    #[error("not an IP address")]
    Address,
    /// The prefix length is not a number within the family's bits.
    #[error("prefix length must be 0 to {0}")]
    Prefix(u8),
    /// Bits are set past the prefix (`10.0.0.1/8`): probably a typo.
    #[error("address bits set past the prefix: did you mean {0}?")]
    HostBits(String),
}

impl Cidr {
    /// The network address.
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in the network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask32(u32::from(ip), self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask128(u128::from(ip), self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

fn mask32(bits: u32, prefix: u8) -> u32 {
    bits.checked_shr(32 - u32::from(prefix.min(32)))
        .and_then(|b| b.checked_shl(32 - u32::from(prefix.min(32))))
        .unwrap_or(0)
}

fn mask128(bits: u128, prefix: u8) -> u128 {
    bits.checked_shr(128 - u32::from(prefix.min(128)))
        .and_then(|b| b.checked_shl(128 - u32::from(prefix.min(128))))
        .unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Cidr, CidrError> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| CidrError::Address)?;
        let mapped = matches!(addr, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some());
        let addr = addr.to_canonical();
        let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => {
                let p: u8 = p.trim().parse().map_err(|_| CidrError::Prefix(max))?;
                // A mapped network (::ffff:10.0.0.0/104) counts its prefix
                // over 128 bits.
                let p = if mapped {
                    p.checked_sub(96).ok_or(CidrError::Prefix(128))?
                } else {
                    p
                };
                if p > max {
                    return Err(CidrError::Prefix(if mapped { 128 } else { max }));
                }
                p
            }
        };
        let network = match addr {
            IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(mask32(u32::from(v4), prefix))),
            IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(mask128(u128::from(v6), prefix))),
        };
        if network != addr {
            return Err(CidrError::HostBits(format!("{network}/{prefix}")));
        }
        Ok(Cidr { network, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The peers whose connections start with a PROXY header
/// (`proxy-protocol-from`), with the deadline for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedProxies {
    networks: Vec<Cidr>,
    timeout: Duration,
}

impl TrustedProxies {
    /// Headers are required from peers in `networks` within `timeout`.
    pub fn new(networks: Vec<Cidr>, timeout: Duration) -> TrustedProxies {
        TrustedProxies { networks, timeout }
    }

    /// The networks (empty: the PROXY protocol is off).
    pub fn networks(&self) -> &[Cidr] {
        &self.networks
    }

    /// The deadline for a header.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether connections from `peer` must start with a header.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.networks.iter().any(|n| n.contains(peer))
    }

    /// Reads the header a connection from `peer` must start with, or, for
    /// a peer that is not trusted, makes sure it did not send one (as far
    /// as the bytes that already arrived show: an untrusted peer is never
    /// waited for, since an FTP client speaks only after the banner). A
    /// session whose client's first command is `PROXY` should count it as
    /// [`Rejection::Untrusted`] too.
    ///
    /// Returns the addresses to use for the client: the header's, or
    /// `None` for a plain client, a v2 `LOCAL` or a v1 `UNKNOWN` header
    /// (use the socket's endpoints).
    ///
    /// # Errors
    /// [`ProxyError`] with its [`Rejection`] reason, for the caller to count
    /// (`proxy_protocol_rejected_total{reason}`) before closing the
    /// connection without a reply. Cancel-safe only in that a dropped
    /// future leaves the connection unusable: close it.
    pub async fn accept(
        &self,
        stream: &mut TcpStream,
        peer: SocketAddr,
    ) -> Result<Option<Proxied>, ProxyError> {
        if !self.trusts(peer.ip()) {
            return match peek_now(stream) {
                Some(bytes) if is_surely_a_header(&bytes) => Err(ProxyError::Untrusted(peer)),
                _ => Ok(None),
            };
        }
        read_header(stream, self.timeout).await
    }
}

/// The addresses a PROXY header carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proxied {
    /// The client (its real address).
    pub source: SocketAddr,
    /// The address the client connected to (the load balancer's).
    pub destination: SocketAddr,
}

/// Why a connection's PROXY header was refused
/// (`proxy_protocol_rejected_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// A header from a peer outside `proxy-protocol-from`.
    Untrusted,
    /// A header that does not parse (or is not TCP).
    Malformed,
    /// A trusted peer that sent something else, or closed first.
    Missing,
    /// No complete header within the deadline.
    Timeout,
    /// A header longer than the bounds (v1 107 bytes, v2 1040).
    TooLarge,
}

impl Rejection {
    /// Every reason.
    pub const ALL: [Rejection; 5] = [
        Rejection::Untrusted,
        Rejection::Malformed,
        Rejection::Missing,
        Rejection::Timeout,
        Rejection::TooLarge,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::Untrusted => "untrusted",
            Rejection::Malformed => "malformed",
            Rejection::Missing => "missing",
            Rejection::Timeout => "timeout",
            Rejection::TooLarge => "too_large",
        }
    }
}

/// A refused PROXY header.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A header from a peer outside `proxy-protocol-from`.
    #[error("PROXY header from {0}, which is not in proxy-protocol-from")]
    Untrusted(SocketAddr),
    /// A header that does not parse, or not for TCP.
    #[error("malformed PROXY header")]
    Malformed,
    /// The connection starts with something else than a header.
    #[error("no PROXY header")]
    Missing,
    /// The peer closed before sending a byte.
    #[error("closed before a PROXY header")]
    Closed,
    /// The peer closed inside the header.
    #[error("closed inside the PROXY header")]
    Truncated,
    /// No complete header in time.
    #[error("no PROXY header within {0:?}")]
    Timeout(Duration),
    /// A header past the bounds.
    #[error("PROXY header longer than {0} bytes")]
    TooLarge(usize),
    /// Reading failed.
    #[error("reading the PROXY header: {0}")]
    Io(#[source] io::Error),
}

impl ProxyError {
    /// The metric reason.
    pub fn reason(&self) -> Rejection {
        match self {
            ProxyError::Untrusted(_) => Rejection::Untrusted,
            ProxyError::Malformed | ProxyError::Truncated | ProxyError::Io(_) => {
                Rejection::Malformed
            }
            ProxyError::Missing | ProxyError::Closed => Rejection::Missing,
            ProxyError::Timeout(_) => Rejection::Timeout,
            ProxyError::TooLarge(_) => Rejection::TooLarge,
        }
    }
}

/// The v2 signature (12 bytes).
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The v1 prefix.
const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// The longest v1 header, `\r\n` included (the specification's bound).
pub const V1_MAX: usize = 107;
/// The longest v2 payload taken (after the 16-byte fixed part). HAProxy
/// sends 12 or 36 bytes of addresses and a few TLVs; the specification
/// asks receivers to take at least 216 (a UNIX address block).
pub const V2_MAX_PAYLOAD: usize = 1024;
/// The longest v2 header taken.
pub const V2_MAX: usize = 16 + V2_MAX_PAYLOAD;
/// Bytes both versions have at least (`PROXY UNKNOWN\r\n` is 15, a v2
/// header 16): reading this many never goes past a header.
const MIN_HEADER: usize = 15;

/// Whether `bytes` (the first ones of a connection, maybe fewer than a
/// header) begin like a PROXY header of either version.
pub fn starts_like_a_header(bytes: &[u8]) -> bool {
    let n = bytes.len().min(V2_SIGNATURE.len());
    !bytes.is_empty()
        && (bytes.get(..n.min(V1_PREFIX.len())) == V1_PREFIX.get(..n.min(V1_PREFIX.len()))
            || bytes.get(..n) == V2_SIGNATURE.get(..n))
}

/// Whether the first bytes of a connection can only be a PROXY header:
/// `PROXY ` whole, or at least the first 5 bytes of the v2 signature (a
/// NUL after two empty lines). A client that spoke before the banner with
/// `PWD` is not taken for one.
pub fn is_surely_a_header(bytes: &[u8]) -> bool {
    bytes.starts_with(V1_PREFIX)
        || (bytes.len() >= 5
            && bytes.get(..bytes.len().min(V2_SIGNATURE.len()))
                == V2_SIGNATURE.get(..bytes.len().min(V2_SIGNATURE.len())))
}

/// The bytes already waiting on `stream` (up to 16), without waiting or
/// consuming them.
fn peek_now(stream: &TcpStream) -> Option<Vec<u8>> {
    use rustix::net::{RecvFlags, recv};
    let mut buf = [0u8; 16];
    let (n, _) = recv(stream, &mut buf, RecvFlags::PEEK | RecvFlags::DONTWAIT).ok()?;
    buf.get(..n).map(<[u8]>::to_vec)
}

/// Reads one PROXY header (v1 or v2) from the start of `stream`, within
/// `timeout`, consuming exactly its bytes.
///
/// First it peeks: a header that arrived whole (the normal case, one
/// segment) is taken with a single read of its length. Otherwise it reads
/// piece by piece, each read no longer than what the header still needs
/// for certain (a v1 line one byte at a time past its first 15).
///
/// # Errors
/// [`ProxyError`]; the connection is then to be closed.
pub async fn read_header(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<Option<Proxied>, ProxyError> {
    tokio::time::timeout(timeout, async {
        let mut peeked = [0u8; V2_MAX];
        let n = stream.peek(&mut peeked).await.map_err(ProxyError::Io)?;
        if n == 0 {
            return Err(ProxyError::Closed);
        }
        if let Some(len) = complete_length(peeked.get(..n).unwrap_or_default())? {
            let mut header = vec![0u8; len];
            stream
                .read_exact(&mut header)
                .await
                .map_err(ProxyError::Io)?;
            return decode(&header);
        }
        read_header_exact(stream).await
    })
    .await
    .map_err(|_| ProxyError::Timeout(timeout))?
}

/// How long the header at the start of `bytes` is, if it is all there;
/// `None` when more bytes are needed.
///
/// # Errors
/// [`ProxyError`] when the bytes cannot start a header, or pass the bounds.
pub fn complete_length(bytes: &[u8]) -> Result<Option<usize>, ProxyError> {
    if !starts_like_a_header(bytes) {
        return Err(ProxyError::Missing);
    }
    if bytes.starts_with(V1_PREFIX) {
        return match bytes.windows(2).position(|w| w == b"\r\n") {
            Some(end) if end + 2 <= V1_MAX => Ok(Some(end + 2)),
            Some(_) => Err(ProxyError::TooLarge(V1_MAX)),
            None if bytes.len() >= V1_MAX => Err(ProxyError::TooLarge(V1_MAX)),
            None => Ok(None),
        };
    }
    match bytes.get(14..16) {
        Some(&[hi, lo]) => {
            let payload = usize::from(u16::from_be_bytes([hi, lo]));
            if payload > V2_MAX_PAYLOAD {
                return Err(ProxyError::TooLarge(V2_MAX));
            }
            Ok((bytes.len() >= 16 + payload).then_some(16 + payload))
        }
        _ => Ok(None),
    }
}

/// Reads one header from `stream` without ever reading past it: the first
/// 15 bytes (no header is shorter), then what the version says is left (a
/// v1 line byte by byte). No deadline: the caller puts one around it.
///
/// # Errors
/// [`ProxyError`].
pub async fn read_header_exact<R: AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<Option<Proxied>, ProxyError> {
    let mut buf = [0u8; V2_MAX];
    // The first byte alone tells a silent or closing peer from a truncated
    // header.
    read_into(stream, &mut buf, 0, 1, ProxyError::Closed).await?;
    if !starts_like_a_header(buf.get(..1).unwrap_or_default()) {
        return Err(ProxyError::Missing);
    }
    read_into(stream, &mut buf, 1, MIN_HEADER, ProxyError::Truncated).await?;
    let mut have = MIN_HEADER;
    loop {
        let bytes = buf.get(..have).unwrap_or_default();
        if let Some(len) = complete_length(bytes)? {
            return decode(bytes.get(..len).unwrap_or_default());
        }
        // v1: one byte (the line may end at any one); v2: the fixed part,
        // then the payload.
        let want = match bytes.get(14..16) {
            _ if bytes.starts_with(V1_PREFIX) => have + 1,
            Some(&[hi, lo]) => 16 + usize::from(u16::from_be_bytes([hi, lo])),
            _ => 16,
        };
        read_into(stream, &mut buf, have, want, ProxyError::Truncated).await?;
        have = want;
    }
}

async fn read_into<R: AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut [u8],
    from: usize,
    to: usize,
    on_eof: ProxyError,
) -> Result<(), ProxyError> {
    let Some(slice) = buf.get_mut(from..to) else {
        return Err(ProxyError::TooLarge(V2_MAX));
    };
    match stream.read_exact(slice).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(on_eof),
        Err(e) => Err(ProxyError::Io(e)),
    }
}

/// Decodes one whole header.
fn decode(header: &[u8]) -> Result<Option<Proxied>, ProxyError> {
    let config = ParseConfig {
        include_tlvs: false,
        allow_v1: true,
        allow_v2: true,
    };
    let (parsed, used) = ProxyHeader::parse(header, config).map_err(|_| ProxyError::Malformed)?;
    if used != header.len() {
        return Err(ProxyError::Malformed);
    }
    match parsed.proxied_address() {
        None => Ok(None),
        Some(ProxiedAddress {
            protocol: Protocol::Stream,
            source,
            destination,
        }) => Ok(Some(Proxied {
            source: *source,
            destination: *destination,
        })),
        Some(_) => Err(ProxyError::Malformed),
    }
}

/// Whether the gateway starts its connections to servers with a PROXY
/// header (`server-proxy-protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ServerProxyProtocol {
    /// No header.
    #[default]
    Off,
    /// A v1 (text) header.
    V1,
    /// A v2 (binary) header.
    V2,
}

impl ServerProxyProtocol {
    /// The header for a session of `client` that dialled `destination`
    /// (the load balancer's address from its header, else the gateway's
    /// own); `None` when off. Families are reconciled as the module says.
    pub fn header(self, client: SocketAddr, destination: SocketAddr) -> Option<Vec<u8>> {
        let (source, destination) = same_family(client, destination);
        encode(
            self,
            &ProxyHeader::with_address(ProxiedAddress::stream(source, destination)),
        )
    }

    /// The header for a connection of the gateway's own (a health check):
    /// v2 `LOCAL`, v1 `PROXY UNKNOWN`; `None` when off.
    pub fn local_header(self) -> Option<Vec<u8>> {
        encode(self, &ProxyHeader::with_local())
    }
}

fn encode(version: ServerProxyProtocol, header: &ProxyHeader<'_>) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(64);
    let encoded = match version {
        ServerProxyProtocol::Off => return None,
        ServerProxyProtocol::V1 => header.encode_v1(&mut out),
        ServerProxyProtocol::V2 => header.encode_v2(&mut out),
    };
    // Families agree (same_family) and there are no TLVs: the encoder has
    // nothing to refuse. Should it ever, a LOCAL header is the safe answer
    // (the server uses the connection's addresses).
    match encoded {
        Ok(()) => Some(out),
        Err(_) => {
            out.clear();
            let local = ProxyHeader::with_local();
            match version {
                ServerProxyProtocol::V1 => local.encode_v1(&mut out).ok()?,
                _ => local.encode_v2(&mut out).ok()?,
            }
            Some(out)
        }
    }
}

/// Both addresses in one family: IPv4 when both are (mapped ones
/// included), else IPv6 with any IPv4 one mapped.
pub fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (a, b) = (canonical(a), canonical(b));
    if a.is_ipv4() == b.is_ipv4() {
        return (a, b);
    }
    let v6 = |s: SocketAddr| match s.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), s.port()),
        IpAddr::V6(_) => s,
    };
    (v6(a), v6(b))
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::{AsyncWriteExt, ReadBuf};

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs() {
        let n = cidr("10.0.0.0/8");
        assert!(n.contains(ip("10.1.2.3")));
        assert!(
            n.contains(ip("::ffff:10.9.9.9")),
            "mapped addresses are IPv4"
        );
        assert!(!n.contains(ip("11.0.0.1")));
        assert!(!n.contains(ip("::1")));
        assert_eq!(cidr("10.77.1.1"), cidr("10.77.1.1/32"));
        assert!(cidr("10.77.1.1").contains(ip("10.77.1.1")));
        assert!(!cidr("10.77.1.1").contains(ip("10.77.1.2")));
        assert!(cidr("0.0.0.0/0").contains(ip("192.0.2.1")));
        assert!(
            !cidr("::/0").contains(ip("192.0.2.1")),
            "IPv4 needs an IPv4 network"
        );
        assert!(cidr("::/0").contains(ip("2001:db8::1")));
        let v6 = cidr("2001:db8::/32");
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert_eq!(cidr("::ffff:10.0.0.0/104"), n);
        assert_eq!(n.to_string(), "10.0.0.0/8");
        assert_eq!(
            "10.0.0.1/8".parse::<Cidr>(),
            Err(CidrError::HostBits("10.0.0.0/8".into()))
        );
        assert_eq!("10.0.0.0/33".parse::<Cidr>(), Err(CidrError::Prefix(32)));
        assert_eq!("::/129".parse::<Cidr>(), Err(CidrError::Prefix(128)));
        assert_eq!("10.0.0.0/x".parse::<Cidr>(), Err(CidrError::Prefix(32)));
        assert_eq!("nope/8".parse::<Cidr>(), Err(CidrError::Address));
        assert_eq!("".parse::<Cidr>(), Err(CidrError::Address));
    }

    #[test]
    fn only_whole_signatures_count_from_untrusted_peers() {
        assert!(is_surely_a_header(b"PROXY TCP4 "));
        assert!(is_surely_a_header(b"\r\n\r\n\0"));
        assert!(is_surely_a_header(V2_SIGNATURE));
        assert!(!is_surely_a_header(b"PWD\r\n"));
        assert!(!is_surely_a_header(b"PROX"));
        assert!(!is_surely_a_header(b"\r\n"));
        assert!(!is_surely_a_header(b""));
    }

    #[test]
    fn lengths() {
        assert!(matches!(
            complete_length(b"USER x\r\n"),
            Err(ProxyError::Missing)
        ));
        assert_eq!(complete_length(b"PRO").unwrap(), None);
        assert_eq!(complete_length(b"PROXY UNKNOWN\r\nUSER").unwrap(), Some(15));
        assert_eq!(complete_length(b"\r\n\r\n").unwrap(), None);
        let long = [b"PROXY ".as_slice(), &[b'x'; 120]].concat();
        assert!(matches!(
            complete_length(&long),
            Err(ProxyError::TooLarge(107))
        ));
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x21, 0x11, 0x08, 0x00]);
        assert!(matches!(complete_length(&v2), Err(ProxyError::TooLarge(_))));
    }

    /// Reads `data` in the chunk sizes given (then what is left), and
    /// counts what was taken.
    struct Chunked {
        data: Vec<u8>,
        taken: usize,
        chunks: Vec<usize>,
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let chunk = if self.chunks.is_empty() {
                usize::MAX
            } else {
                self.chunks.remove(0).max(1)
            };
            let n = chunk.min(buf.remaining()).min(self.data.len() - self.taken);
            let from = self.taken;
            buf.put_slice(&self.data[from..from + n]);
            self.taken += n;
            Poll::Ready(Ok(()))
        }
    }

    fn socket() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port)),
        ]
    }

    fn version() -> impl Strategy<Value = ServerProxyProtocol> {
        prop_oneof![Just(ServerProxyProtocol::V1), Just(ServerProxyProtocol::V2)]
    }

    proptest! {
        /// A network contains exactly the addresses that share its first
        /// `prefix` bits, IPv4 also in its mapped form.
        #[test]
        fn cidr_contains_its_prefix(a in any::<u32>(), b in any::<u32>(), prefix in 0u8..=32) {
            let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
            let net: Cidr = format!("{}/{prefix}", Ipv4Addr::from(a & mask)).parse().unwrap();
            let ip = Ipv4Addr::from(b);
            prop_assert_eq!(net.contains(IpAddr::V4(ip)), a & mask == b & mask);
            prop_assert_eq!(net.contains(IpAddr::V6(ip.to_ipv6_mapped())), a & mask == b & mask);
        }

        #[test]
        fn cidr6_contains_its_prefix(a in any::<u128>(), b in any::<u128>(), prefix in 0u8..=128) {
            let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - prefix) };
            let net: Cidr = format!("{}/{prefix}", Ipv6Addr::from(a & mask)).parse().unwrap();
            let ip = Ipv6Addr::from(b);
            // Mapped addresses count as IPv4; leave them to the test above.
            prop_assume!(ip.to_ipv4_mapped().is_none() && Ipv6Addr::from(a & mask).to_ipv4_mapped().is_none());
            prop_assert_eq!(net.contains(IpAddr::V6(ip)), a & mask == b & mask);
        }

        /// What the gateway writes, it reads back: v1 and v2, IPv4, IPv6
        /// and mixed; in any segmentation; never a byte past the header.
        #[test]
        fn round_trip_and_never_past_the_header(
            version in version(),
            client in socket(),
            destination in socket(),
            rest in prop::collection::vec(any::<u8>(), 0..64),
            chunks in prop::collection::vec(1usize..20, 0..40),
        ) {
            let header = version.header(client, destination).unwrap();
            let (want_source, want_destination) = same_family(client, destination);
            let mut reader = Chunked {
                data: [header.as_slice(), &rest].concat(),
                taken: 0,
                chunks,
            };
            let got = futures_util::FutureExt::now_or_never(read_header_exact(&mut reader))
                .unwrap()
                .unwrap()
                .unwrap();
            prop_assert_eq!(got.source, want_source);
            prop_assert_eq!(got.destination, want_destination);
            prop_assert_eq!(reader.taken, header.len());
            prop_assert_eq!(complete_length(&reader.data).unwrap(), Some(header.len()));
        }

        /// Arbitrary bytes never panic the reader, and it never takes more
        /// than the bound.
        #[test]
        fn arbitrary_bytes_are_bounded(
            data in prop::collection::vec(any::<u8>(), 0..1200),
            chunks in prop::collection::vec(1usize..64, 0..40),
        ) {
            let mut reader = Chunked { data, taken: 0, chunks };
            let _ = futures_util::FutureExt::now_or_never(read_header_exact(&mut reader)).unwrap();
            prop_assert!(reader.taken <= V2_MAX);
        }
    }

    #[test]
    fn local_headers() {
        assert_eq!(
            ServerProxyProtocol::V1.local_header().unwrap(),
            b"PROXY UNKNOWN\r\n"
        );
        assert_eq!(
            ServerProxyProtocol::V2.local_header().unwrap(),
            [V2_SIGNATURE.as_slice(), &[0x20, 0, 0, 0]].concat()
        );
        assert_eq!(ServerProxyProtocol::Off.local_header(), None);
        assert_eq!(
            ServerProxyProtocol::Off.header(
                "192.0.2.1:1000".parse().unwrap(),
                "192.0.2.2:21".parse().unwrap()
            ),
            None
        );
        for local in [
            ServerProxyProtocol::V1.local_header().unwrap(),
            ServerProxyProtocol::V2.local_header().unwrap(),
        ] {
            assert_eq!(decode(&local).unwrap(), None);
        }
    }

    #[test]
    fn mixed_families_become_ipv6() {
        let client: SocketAddr = "[2001:db8::7]:40000".parse().unwrap();
        let dialled: SocketAddr = "198.51.100.1:21".parse().unwrap();
        let v1 = ServerProxyProtocol::V1.header(client, dialled).unwrap();
        assert_eq!(
            String::from_utf8(v1).unwrap(),
            "PROXY TCP6 2001:db8::7 ::ffff:198.51.100.1 40000 21\r\n"
        );
        // A mapped client of an IPv4 address is plain IPv4.
        let mapped: SocketAddr = "[::ffff:192.0.2.9]:5000".parse().unwrap();
        let v1 = ServerProxyProtocol::V1.header(mapped, dialled).unwrap();
        assert_eq!(
            String::from_utf8(v1).unwrap(),
            "PROXY TCP4 192.0.2.9 198.51.100.1 5000 21\r\n"
        );
    }

    #[test]
    fn refusals() {
        let read = |bytes: &[u8]| {
            let mut reader = Chunked {
                data: bytes.to_vec(),
                taken: 0,
                chunks: vec![],
            };
            futures_util::FutureExt::now_or_never(read_header_exact(&mut reader))
                .unwrap()
                .map_err(|e| e.reason())
        };
        assert_eq!(read(b""), Err(Rejection::Missing));
        assert_eq!(read(b"USER x\r\n"), Err(Rejection::Missing));
        assert_eq!(read(b"PROXY TCP4 1.2.3"), Err(Rejection::Malformed));
        assert_eq!(
            read(b"PROXY TCP4 nope nope 1 2\r\n"),
            Err(Rejection::Malformed)
        );
        assert_eq!(
            read(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n"),
            Err(Rejection::Malformed)
        );
        assert_eq!(
            read(&[b'P'; 200]),
            Err(Rejection::Missing),
            "not PROXY then"
        );
        let long = [b"PROXY ".as_slice(), &[b'1'; 200]].concat();
        assert_eq!(read(&long), Err(Rejection::TooLarge));
        // v2 over UDP is not a TCP connection's header.
        let mut udp = V2_SIGNATURE.to_vec();
        udp.extend_from_slice(&[0x21, 0x12, 0, 12, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2]);
        assert_eq!(read(&udp), Err(Rejection::Malformed));
        let mut big = V2_SIGNATURE.to_vec();
        big.extend_from_slice(&[0x21, 0x11, 0x10, 0x00]);
        big.resize(5000, 0);
        assert_eq!(read(&big), Err(Rejection::TooLarge));
        let mut version3 = V2_SIGNATURE.to_vec();
        version3.extend_from_slice(&[0x31, 0x11, 0, 12, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2]);
        assert_eq!(read(&version3), Err(Rejection::Malformed));
    }

    async fn pair() -> (TcpStream, TcpStream, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, peer) = listener.accept().await.unwrap();
        (client, server, peer)
    }

    fn trusted(cidr: &str) -> TrustedProxies {
        TrustedProxies::new(vec![cidr.parse().unwrap()], Duration::from_millis(300))
    }

    /// The header and the client's first command in one segment: the
    /// header is taken, the command stays for the session.
    #[tokio::test]
    async fn a_command_in_the_same_segment_stays_in_the_socket() {
        for version in [ServerProxyProtocol::V1, ServerProxyProtocol::V2] {
            let (mut client, mut server, peer) = pair().await;
            let source: SocketAddr = "203.0.113.5:41000".parse().unwrap();
            let dialled: SocketAddr = "198.51.100.1:21".parse().unwrap();
            let header = version.header(source, dialled).unwrap();
            client
                .write_all(&[header.as_slice(), b"USER x\r\n"].concat())
                .await
                .unwrap();
            let got = trusted("127.0.0.0/8")
                .accept(&mut server, peer)
                .await
                .unwrap();
            assert_eq!(
                got,
                Some(Proxied {
                    source,
                    destination: dialled
                })
            );
            drop(client);
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            assert_eq!(rest, b"USER x\r\n", "{version:?}");
        }
    }

    /// A header split over segments is read piece by piece, exactly.
    #[tokio::test]
    async fn a_split_header_is_read_exactly() {
        let (mut client, mut server, peer) = pair().await;
        client.set_nodelay(true).unwrap();
        let header = b"PROXY TCP4 203.0.113.5 198.51.100.1 41000 21\r\n";
        let writer = tokio::spawn(async move {
            for piece in header.chunks(7) {
                client.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            client.write_all(b"NOOP\r\n").await.unwrap();
            client
        });
        let got = trusted("127.0.0.1/32")
            .accept(&mut server, peer)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.source, "203.0.113.5:41000".parse().unwrap());
        drop(writer.await.unwrap());
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"NOOP\r\n");
    }

    #[tokio::test]
    async fn a_silent_trusted_peer_times_out() {
        let (_client, mut server, peer) = pair().await;
        let err = trusted("127.0.0.1/32")
            .accept(&mut server, peer)
            .await
            .unwrap_err();
        assert_eq!(err.reason(), Rejection::Timeout);
    }

    #[tokio::test]
    async fn untrusted_peers_are_plain_clients_unless_they_send_a_header() {
        let (_client, mut server, peer) = pair().await;
        assert_eq!(
            trusted("10.0.0.0/8")
                .accept(&mut server, peer)
                .await
                .unwrap(),
            None,
            "never waited for"
        );
        let (mut client, mut server, peer) = pair().await;
        client.write_all(b"PROXY UNKNOWN\r\n").await.unwrap();
        // Wait until the bytes are there (loopback delivers at once, but
        // the test does not rely on it).
        let mut buf = [0u8; 1];
        server.peek(&mut buf).await.unwrap();
        let err = trusted("10.0.0.0/8")
            .accept(&mut server, peer)
            .await
            .unwrap_err();
        assert_eq!(err.reason(), Rejection::Untrusted);
    }
}
