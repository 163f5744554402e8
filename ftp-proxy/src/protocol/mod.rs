//! Pure FTP protocol code (RFC 959, RFC 2428, RFC 3659, RFC 2577).
//!
//! Owns: framing and parsing of client commands (Telnet IAC, line ends, length
//! bound), framing and parsing of server replies (multi-line, bounded), the
//! codecs for the address-carrying commands and replies (`PORT`, `EPRT`,
//! `227`, `229`), the address policy (bounce protection and NAT traversal) and
//! the `FEAT` rewrite.
//!
//! Deliberately not here: sockets, clocks, logging and metrics. Everything in
//! this module is bytes in, typed values out (and back), so it is tested
//! without I/O, by unit tests, property tests and fuzzing.

pub mod address;
pub mod command;
pub mod feat;
pub mod policy;
pub mod reply;

pub use command::{Command, CommandCodec, CommandError, Verb};
pub use reply::{Reply, ReplyCodec, ReplyError};

/// The two parties of an FTP session, as the gateway names them
/// everywhere (logs, metric labels, errors): the client in front of it
/// and the server behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The FTP client.
    Client,
    /// The FTP server.
    Server,
}

impl Side {
    /// Both sides.
    pub const ALL: [Side; 2] = [Side::Client, Side::Server];

    /// The label in logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
        }
    }
}
