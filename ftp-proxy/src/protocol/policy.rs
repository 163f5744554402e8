//! Address policy for data connections: which addresses named in `PORT`,
//! `EPRT`, `227` and `229` the gateway may connect to.
//!
//! - Bounce protection (RFC 2577 §3): never connect to a host other than the
//!   one that asked, never to a privileged port.
//! - NAT traversal: a client behind NAT names its private address; the
//!   gateway connects to the address the control connection came from, with
//!   the port from the command, which is what the NAT forwards.
//! - Servers behind NAT may name a private address in `227`; depending on
//!   configuration that is refused or replaced by the control address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// How an address looks from the internet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// Reachable on the internet.
    Global,
    /// Only meaningful inside a site: RFC 1918, RFC 4193, CGNAT (RFC 6598),
    /// link-local, loopback, unspecified. What a client behind NAT sends.
    Private,
    /// Never a data endpoint: multicast, broadcast, reserved.
    Forbidden,
}

/// Classifies an address (IPv4-mapped IPv6 addresses as their IPv4 form).
pub fn classify(ip: IpAddr) -> AddressClass {
    match ip.to_canonical() {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    let [a, b, ..] = ip.octets();
    if ip.is_multicast() || ip.is_broadcast() || a >= 240 {
        AddressClass::Forbidden
    } else if ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || a == 0
        || (a == 100 && (64..128).contains(&b))
    {
        AddressClass::Private
    } else {
        AddressClass::Global
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    let first = ip.segments().first().copied().unwrap_or_default();
    if ip.is_multicast() {
        AddressClass::Forbidden
    } else if ip.is_loopback()
        || ip.is_unspecified()
        || (first & 0xfe00) == 0xfc00 // unique local, RFC 4193
        || (first & 0xffc0) == 0xfe80
    // link-local
    {
        AddressClass::Private
    } else {
        AddressClass::Global
    }
}

/// Why the gateway refused something: what it counts in
/// `ftp_proxy_rejected_total{reason}`. Most come from the policy in this
/// module; the others from the limits the gateway and the session enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// PORT/EPRT naming another host (RFC 2577 bounce).
    Bounce,
    /// PORT/EPRT or 227/229 naming a port below 1024.
    LowPort,
    /// A data connection from an unexpected address.
    PortTheft,
    /// A server's 227/229 naming another host.
    ServerPassiveAddress,
    /// The session limit.
    MaxSessions,
    /// The per-client session limit.
    MaxSessionsPerClient,
    /// No free port in a data port range.
    PortPoolExhausted,
    /// A command line too long or malformed.
    BadInput,
    /// The control connection was idle too long.
    IdleTimeout,
    /// A command that needs a login, before the server accepted one.
    NotLoggedIn,
    /// Something TLS policy requires was missing (`AUTH TLS` before `USER`,
    /// `PROT P` before a transfer).
    TlsRequired,
    /// A `USER` no route allows (`unknown-users = "reject"`, a server the
    /// user may not use), answered `530`.
    UnroutedUser,
}

impl Reject {
    /// Every reason, for series created at zero.
    pub const ALL: [Reject; 12] = [
        Reject::Bounce,
        Reject::LowPort,
        Reject::PortTheft,
        Reject::ServerPassiveAddress,
        Reject::MaxSessions,
        Reject::MaxSessionsPerClient,
        Reject::PortPoolExhausted,
        Reject::BadInput,
        Reject::IdleTimeout,
        Reject::NotLoggedIn,
        Reject::TlsRequired,
        Reject::UnroutedUser,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reject::Bounce => "bounce",
            Reject::LowPort => "low_port",
            Reject::PortTheft => "port_theft",
            Reject::ServerPassiveAddress => "server_passive_address",
            Reject::MaxSessions => "max_sessions",
            Reject::MaxSessionsPerClient => "max_sessions_per_client",
            Reject::PortPoolExhausted => "port_pool_exhausted",
            Reject::BadInput => "bad_input",
            Reject::IdleTimeout => "idle_timeout",
            Reject::NotLoggedIn => "not_logged_in",
            Reject::TlsRequired => "tls_required",
            Reject::UnroutedUser => "unrouted_user",
        }
    }
}

/// Why an address named for a data connection was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A privileged port (RFC 2577 §3), port 0 included.
    #[error("port {0} is below 1024")]
    LowPort(u16),
    /// An address other than the peer's own: an FTP bounce attempt.
    #[error("address {0} is not the peer's own")]
    ThirdParty(IpAddr),
    /// A multicast, broadcast or reserved address.
    #[error("address {0} cannot be a data endpoint")]
    Forbidden(IpAddr),
}

impl Refusal {
    /// What a refusal of a client's PORT/EPRT counts as.
    pub fn reject(&self) -> Reject {
        match self {
            Refusal::LowPort(_) => Reject::LowPort,
            Refusal::ThirdParty(_) | Refusal::Forbidden(_) => Reject::Bounce,
        }
    }

    /// What a refusal of a server's 227/229 counts as.
    pub fn server_reject(&self) -> Reject {
        match self {
            Refusal::LowPort(_) => Reject::LowPort,
            Refusal::ThirdParty(_) | Refusal::Forbidden(_) => Reject::ServerPassiveAddress,
        }
    }
}

/// Where the gateway will connect for a client's `PORT`/`EPRT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActiveTarget {
    /// The client named its own address.
    Direct(SocketAddr),
    /// The client named a private address that is not the one it connects
    /// from: it is behind NAT, so connect to the observed address instead.
    NatRewritten {
        /// What the client named.
        requested: SocketAddr,
        /// What the gateway connects to.
        target: SocketAddr,
    },
}

impl ActiveTarget {
    /// The address to connect to.
    pub fn target(&self) -> SocketAddr {
        match self {
            ActiveTarget::Direct(addr) | ActiveTarget::NatRewritten { target: addr, .. } => *addr,
        }
    }
}

/// Decides where to connect for a client's `PORT`/`EPRT` naming `requested`,
/// when the control connection comes from `client`.
///
/// # Errors
/// [`Refusal`] when the port is privileged, or the address is another host's
/// and NAT traversal cannot explain it.
pub fn active_target(
    requested: SocketAddr,
    client: IpAddr,
    nat_traversal: bool,
) -> Result<ActiveTarget, Refusal> {
    let port = requested.port();
    if port < 1024 {
        return Err(Refusal::LowPort(port));
    }
    let ip = requested.ip().to_canonical();
    let client = client.to_canonical();
    if ip == client {
        return Ok(ActiveTarget::Direct(SocketAddr::new(ip, port)));
    }
    match classify(ip) {
        AddressClass::Forbidden => Err(Refusal::Forbidden(ip)),
        AddressClass::Private if nat_traversal => Ok(ActiveTarget::NatRewritten {
            requested: SocketAddr::new(ip, port),
            target: SocketAddr::new(client, port),
        }),
        _ => Err(Refusal::ThirdParty(ip)),
    }
}

/// What to do with a server's `227` naming an address other than its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServerPassivePolicy {
    /// Refuse it: the server may be trying to make the gateway connect
    /// elsewhere.
    #[default]
    Strict,
    /// Connect to the server's control address with the port offered: for
    /// servers behind NAT that advertise a private address.
    ControlAddress,
}

/// Decides where to connect for a server's passive reply offering
/// `offered`, when the control connection goes to `server`.
///
/// # Errors
/// [`Refusal`] for a privileged port, or another host under the strict policy.
pub fn server_passive_target(
    offered: SocketAddr,
    server: IpAddr,
    policy: ServerPassivePolicy,
) -> Result<SocketAddr, Refusal> {
    let port = offered.port();
    if port < 1024 {
        return Err(Refusal::LowPort(port));
    }
    let ip = offered.ip().to_canonical();
    let server = server.to_canonical();
    // 0.0.0.0 is what some servers say for "my own address".
    if ip == server || ip.is_unspecified() || policy == ServerPassivePolicy::ControlAddress {
        Ok(SocketAddr::new(server, port))
    } else {
        Err(Refusal::ThirdParty(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classes() {
        for p in [
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "127.0.0.2",
            "169.254.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fc00::1",
            "fe80::1",
            "::",
            "::ffff:192.168.0.1",
        ] {
            assert_eq!(classify(ip(p)), AddressClass::Private, "{p}");
        }
        for g in [
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2001:4860::8888",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(classify(ip(g)), AddressClass::Global, "{g}");
        }
        for f in [
            "255.255.255.255",
            "224.0.0.1",
            "240.0.0.1",
            "ff02::1",
            "::ffff:224.0.0.1",
        ] {
            assert_eq!(classify(ip(f)), AddressClass::Forbidden, "{f}");
        }
    }

    #[test]
    fn active_targets() {
        let client = ip("203.0.113.9");
        assert_eq!(
            active_target(sa("203.0.113.9:5001"), client, true),
            Ok(ActiveTarget::Direct(sa("203.0.113.9:5001")))
        );
        assert_eq!(
            active_target(sa("192.168.1.5:5001"), client, true),
            Ok(ActiveTarget::NatRewritten {
                requested: sa("192.168.1.5:5001"),
                target: sa("203.0.113.9:5001")
            })
        );
        assert_eq!(
            active_target(sa("192.168.1.5:5001"), client, false),
            Err(Refusal::ThirdParty(ip("192.168.1.5")))
        );
        assert_eq!(
            active_target(sa("198.51.100.1:5001"), client, true),
            Err(Refusal::ThirdParty(ip("198.51.100.1")))
        );
        assert_eq!(
            active_target(sa("[::ffff:198.51.100.1]:5001"), client, true),
            Err(Refusal::ThirdParty(ip("198.51.100.1")))
        );
        assert_eq!(
            active_target(sa("[::ffff:203.0.113.9]:5001"), client, true),
            Ok(ActiveTarget::Direct(sa("203.0.113.9:5001")))
        );
        assert_eq!(
            active_target(sa("255.255.255.255:5001"), client, true),
            Err(Refusal::Forbidden(ip("255.255.255.255")))
        );
        for port in [0, 19, 1023] {
            assert_eq!(
                active_target(SocketAddr::new(client, port), client, true),
                Err(Refusal::LowPort(port))
            );
        }
        // An IPv4-mapped client talking to a dual-stack listener.
        assert!(matches!(
            active_target(sa("127.0.0.1:2000"), ip("::ffff:127.0.0.1"), false),
            Ok(ActiveTarget::Direct(_))
        ));
    }

    #[test]
    fn server_passive_targets() {
        let server = ip("198.51.100.7");
        let strict = ServerPassivePolicy::Strict;
        assert_eq!(
            server_passive_target(sa("198.51.100.7:40000"), server, strict),
            Ok(sa("198.51.100.7:40000"))
        );
        assert_eq!(
            server_passive_target(sa("0.0.0.0:40000"), server, strict),
            Ok(sa("198.51.100.7:40000"))
        );
        assert_eq!(
            server_passive_target(sa("10.0.0.7:40000"), server, strict),
            Err(Refusal::ThirdParty(ip("10.0.0.7")))
        );
        assert_eq!(
            server_passive_target(
                sa("10.0.0.7:40000"),
                server,
                ServerPassivePolicy::ControlAddress
            ),
            Ok(sa("198.51.100.7:40000"))
        );
        assert_eq!(
            server_passive_target(
                sa("198.51.100.7:21"),
                server,
                ServerPassivePolicy::ControlAddress
            ),
            Err(Refusal::LowPort(21))
        );
    }

    proptest::proptest! {
        #[test]
        fn never_targets_a_third_party(requested: SocketAddr, client: IpAddr, nat: bool) {
            if let Ok(target) = active_target(requested, client, nat) {
                proptest::prop_assert_eq!(target.target().ip(), client.to_canonical());
                proptest::prop_assert!(target.target().port() >= 1024);
            }
        }
    }
}
