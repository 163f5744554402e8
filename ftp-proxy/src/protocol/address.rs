//! Codecs for the commands and replies that carry addresses: `PORT` and
//! `227` (RFC 959), `EPRT`, `EPSV` and `229` (RFC 2428).
//!
//! Parsing only checks syntax; whether an address may be used is
//! [`super::policy`]'s business.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

/// Why an address argument or reply could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// `PORT` or `227` without six comma-separated numbers from 0 to 255.
    #[error("expected six numbers from 0 to 255 separated by commas")]
    BadHostPort,
    /// `EPRT` or `229` not of the form `<d>proto<d>addr<d>port<d>`.
    #[error("expected <d><protocol><d><address><d><port><d> with one delimiter character")]
    BadExtended,
    /// `EPRT` names a network protocol other than 1 (IPv4) or 2 (IPv6).
    #[error("network protocol {0:?} is not supported, use (1,2)")]
    UnsupportedProtocol(String),
    /// The address does not parse for the protocol named.
    #[error("invalid address {0:?} for the protocol given")]
    BadAddress(String),
    /// The port is not a number from 1 to 65535.
    #[error("invalid port {0:?}")]
    BadPort(String),
    /// An `EPSV` argument other than nothing, 1, 2 or `ALL`.
    #[error("EPSV takes no argument, 1, 2 or ALL")]
    BadEpsvArgument,
}

fn parse_u8_list(text: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = text.split(',');
    for slot in &mut out {
        let part = parts.next()?.trim();
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *slot = part.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn host_port(n: [u8; 6]) -> SocketAddrV4 {
    let [a, b, c, d, hi, lo] = n;
    SocketAddrV4::new(Ipv4Addr::new(a, b, c, d), u16::from_be_bytes([hi, lo]))
}

/// Parses the argument of `PORT`: `h1,h2,h3,h4,p1,p2`.
///
/// # Errors
/// [`AddressError::BadHostPort`] when it is not six numbers from 0 to 255.
pub fn parse_port(arg: &[u8]) -> Result<SocketAddrV4, AddressError> {
    let text = std::str::from_utf8(arg).map_err(|_| AddressError::BadHostPort)?;
    parse_u8_list(text.trim())
        .map(host_port)
        .ok_or(AddressError::BadHostPort)
}

/// Formats the argument of `PORT`.
pub fn format_port(addr: SocketAddrV4) -> String {
    let [a, b, c, d] = addr.ip().octets();
    let [hi, lo] = addr.port().to_be_bytes();
    format!("{a},{b},{c},{d},{hi},{lo}")
}

/// Finds the address in the text of a `227` reply. RFC 1123 §4.1.2.6: the
/// client must scan for the six numbers, as their surroundings vary.
///
/// # Errors
/// [`AddressError::BadHostPort`] when no run of six numbers is found.
pub fn parse_pasv_reply(text: &[u8]) -> Result<SocketAddrV4, AddressError> {
    let text = String::from_utf8_lossy(text);
    let bytes = text.as_bytes();
    let mut start = 0;
    while let Some(offset) = bytes
        .get(start..)
        .and_then(|rest| rest.iter().position(u8::is_ascii_digit))
    {
        let from = start + offset;
        let to = bytes
            .get(from..)
            .and_then(|rest| {
                rest.iter()
                    .position(|b| !(b.is_ascii_digit() || *b == b',' || *b == b' '))
            })
            .map_or(bytes.len(), |n| from + n);
        if let Some(numbers) = text
            .get(from..to)
            .and_then(|run| parse_u8_list(run.trim_end_matches([',', ' '])))
        {
            return Ok(host_port(numbers));
        }
        start = to.max(from + 1);
    }
    Err(AddressError::BadHostPort)
}

/// The text of the `227` reply the gateway sends.
pub fn format_pasv_reply(addr: SocketAddrV4) -> String {
    format!("Entering Passive Mode ({}).", format_port(addr))
}

fn split_extended(text: &str) -> Result<[&str; 3], AddressError> {
    let delimiter = text.chars().next().ok_or(AddressError::BadExtended)?;
    if !(33..=126).contains(&(delimiter as u32)) {
        return Err(AddressError::BadExtended);
    }
    let mut parts = text.split(delimiter);
    let (Some(""), Some(a), Some(b), Some(c), Some(""), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(AddressError::BadExtended);
    };
    Ok([a, b, c])
}

fn parse_port_number(text: &str) -> Result<u16, AddressError> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AddressError::BadPort(text.to_owned()));
    }
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err(AddressError::BadPort(text.to_owned())),
        Ok(port) => Ok(port),
    }
}

/// Parses the argument of `EPRT`: `<d>1<d>192.0.2.1<d>6275<d>` or
/// `<d>2<d>2001:db8::1<d>6275<d>`.
///
/// # Errors
/// [`AddressError`] naming the malformed part; an unknown protocol number is
/// [`AddressError::UnsupportedProtocol`] (RFC 2428 reply 522).
pub fn parse_eprt(arg: &[u8]) -> Result<SocketAddr, AddressError> {
    let text = std::str::from_utf8(arg)
        .map_err(|_| AddressError::BadExtended)?
        .trim();
    let [proto, addr, port] = split_extended(text)?;
    let ip: IpAddr = match proto {
        "1" => addr.parse::<Ipv4Addr>().map(IpAddr::V4),
        "2" => addr.parse::<std::net::Ipv6Addr>().map(IpAddr::V6),
        // A protocol that is not a number is a syntax error (501), not an
        // unsupported protocol (522): `EPRT ||||` names none at all.
        other if other.is_empty() || !other.bytes().all(|b| b.is_ascii_digit()) => {
            return Err(AddressError::BadExtended);
        }
        other => return Err(AddressError::UnsupportedProtocol(other.to_owned())),
    }
    .map_err(|_| AddressError::BadAddress(addr.to_owned()))?;
    Ok(SocketAddr::new(ip, parse_port_number(port)?))
}

/// Formats the argument of `EPRT`, with `|` as delimiter.
pub fn format_eprt(addr: SocketAddr) -> String {
    match addr.ip() {
        IpAddr::V4(ip) => format!("|1|{ip}|{}|", addr.port()),
        IpAddr::V6(ip) => format!("|2|{ip}|{}|", addr.port()),
    }
}

/// Finds the port in the text of a `229` reply: `(<d><d><d>port<d>)`.
///
/// # Errors
/// [`AddressError::BadExtended`] when the parenthesised part is malformed.
pub fn parse_epsv_reply(text: &[u8]) -> Result<u16, AddressError> {
    let text = String::from_utf8_lossy(text);
    let open = text.find('(').ok_or(AddressError::BadExtended)?;
    let inner = text.get(open + 1..).ok_or(AddressError::BadExtended)?;
    let close = inner.find(')').ok_or(AddressError::BadExtended)?;
    let [proto, addr, port] = split_extended(inner.get(..close).ok_or(AddressError::BadExtended)?)?;
    if !proto.is_empty() || !addr.is_empty() {
        return Err(AddressError::BadExtended);
    }
    parse_port_number(port)
}

/// The text of the `229` reply the gateway sends.
pub fn format_epsv_reply(port: u16) -> String {
    format!("Entering Extended Passive Mode (|||{port}|)")
}

/// The argument of `EPSV` (RFC 2428 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpsvArg {
    /// No argument: the protocol of the control connection.
    Default,
    /// `EPSV 1` or `EPSV 2`.
    Protocol(u8),
    /// `EPSV ALL`: from now on, only `EPSV`.
    All,
}

/// Parses the argument of `EPSV`.
///
/// # Errors
/// [`AddressError::BadEpsvArgument`] for anything but nothing, a number or
/// `ALL`; [`AddressError::UnsupportedProtocol`] for a number other than 1 or 2.
pub fn parse_epsv_arg(arg: &[u8]) -> Result<EpsvArg, AddressError> {
    let text = std::str::from_utf8(arg)
        .map_err(|_| AddressError::BadEpsvArgument)?
        .trim();
    match text {
        "" => Ok(EpsvArg::Default),
        "1" => Ok(EpsvArg::Protocol(1)),
        "2" => Ok(EpsvArg::Protocol(2)),
        t if t.eq_ignore_ascii_case("ALL") => Ok(EpsvArg::All),
        t if !t.is_empty() && t.len() <= 3 && t.bytes().all(|b| b.is_ascii_digit()) => {
            Err(AddressError::UnsupportedProtocol(t.to_owned()))
        }
        _ => Err(AddressError::BadEpsvArgument),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_codec() {
        let addr = parse_port(b"127,0,0,1,19,137").unwrap();
        assert_eq!(addr, "127.0.0.1:5001".parse().unwrap());
        assert_eq!(format_port(addr), "127,0,0,1,19,137");
        assert_eq!(parse_port(b" 10, 0, 0, 1, 0, 20 ").unwrap().port(), 20);
        for bad in [
            &b"1,2,3,4,5"[..],
            b"1,2,3,4,5,6,7",
            b"256,0,0,1,1,1",
            b"a,b,c,d,e,f",
            b"1,2,3,4,5,",
            b"",
            b"1,2,3,4,5,0006",
        ] {
            assert_eq!(parse_port(bad), Err(AddressError::BadHostPort), "{bad:?}");
        }
    }

    #[test]
    fn pasv_reply_variants() {
        let want: SocketAddrV4 = "192.0.2.7:5002".parse().unwrap();
        for text in [
            &b"Entering Passive Mode (192,0,2,7,19,138)."[..],
            b"Entering Passive Mode 192,0,2,7,19,138",
            b"=192,0,2,7,19,138",
            b"Passive (v1) 192,0,2,7,19,138",
        ] {
            assert_eq!(parse_pasv_reply(text), Ok(want), "{text:?}");
        }
        assert!(parse_pasv_reply(b"Entering Passive Mode (1,2,3)").is_err());
        assert_eq!(
            format_pasv_reply(want),
            "Entering Passive Mode (192,0,2,7,19,138)."
        );
    }

    #[test]
    fn eprt_codec() {
        assert_eq!(
            parse_eprt(b"|1|132.235.1.2|6275|").unwrap(),
            "132.235.1.2:6275".parse().unwrap()
        );
        assert_eq!(
            parse_eprt(b"!2!::1!6275!").unwrap(),
            "[::1]:6275".parse().unwrap()
        );
        assert!(matches!(
            parse_eprt(b"|3|x|1|"),
            Err(AddressError::UnsupportedProtocol(_))
        ));
        assert!(matches!(
            parse_eprt(b"|1|::1|1|"),
            Err(AddressError::BadAddress(_))
        ));
        assert!(matches!(
            parse_eprt(b"|1|1.2.3.4|65536|"),
            Err(AddressError::BadPort(_))
        ));
        assert!(matches!(
            parse_eprt(b"|1|1.2.3.4|0|"),
            Err(AddressError::BadPort(_))
        ));
        assert!(matches!(
            parse_eprt(b"|1|1.2.3.4|1"),
            Err(AddressError::BadExtended)
        ));
        // No protocol, or one that is not a number: a syntax error (501).
        for bad in [&b"||||"[..], b"|x|1.2.3.4|1|", b"||1.2.3.4|1|"] {
            assert!(
                matches!(parse_eprt(bad), Err(AddressError::BadExtended)),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse_eprt(b"|1|1.2.3.4|1|x"),
            Err(AddressError::BadExtended)
        ));
        for addr in ["10.0.0.1:1", "[2001:db8::5]:65535"] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(parse_eprt(format_eprt(addr).as_bytes()).unwrap(), addr);
        }
    }

    #[test]
    fn epsv_codec() {
        assert_eq!(
            parse_epsv_reply(b"Entering Extended Passive Mode (|||6446|)").unwrap(),
            6446
        );
        assert_eq!(
            parse_epsv_reply(format_epsv_reply(50000).as_bytes()).unwrap(),
            50000
        );
        assert!(parse_epsv_reply(b"Entering Extended Passive Mode (|1|1.2.3.4|6446|)").is_err());
        assert!(parse_epsv_reply(b"(|||99999|)").is_err());
        assert_eq!(parse_epsv_arg(b"").unwrap(), EpsvArg::Default);
        assert_eq!(parse_epsv_arg(b"all").unwrap(), EpsvArg::All);
        assert_eq!(parse_epsv_arg(b"2").unwrap(), EpsvArg::Protocol(2));
        assert!(matches!(
            parse_epsv_arg(b"3"),
            Err(AddressError::UnsupportedProtocol(_))
        ));
        assert_eq!(parse_epsv_arg(b"x"), Err(AddressError::BadEpsvArgument));
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(data: Vec<u8>) {
            let _ = parse_port(&data);
            let _ = parse_pasv_reply(&data);
            let _ = parse_eprt(&data);
            let _ = parse_epsv_reply(&data);
            let _ = parse_epsv_arg(&data);
        }

        #[test]
        fn port_round_trip(ip: [u8; 4], port: u16) {
            let addr = SocketAddrV4::new(Ipv4Addr::from(ip), port);
            proptest::prop_assert_eq!(parse_port(format_port(addr).as_bytes()), Ok(addr));
            proptest::prop_assert_eq!(parse_pasv_reply(format_pasv_reply(addr).as_bytes()), Ok(addr));
        }

        #[test]
        fn eprt_round_trip(addr: SocketAddr) {
            let addr = SocketAddr::new(addr.ip(), addr.port().max(1));
            let addr = match addr { SocketAddr::V6(v6) => SocketAddr::new(IpAddr::V6(*v6.ip()), v6.port()), v4 => v4 };
            proptest::prop_assert_eq!(parse_eprt(format_eprt(addr).as_bytes()), Ok(addr));
        }
    }
}
