//! ftp-proxy: an FTP gateway.
//!
//! # Tour
//! - [`config`]: command line and file into a validated [`Config`].
//! - [`protocol`]: pure FTP: command and reply framing, address codecs,
//!   the address policy (bounce protection, NAT traversal).
//! - [`gateway`]: listeners, the accept loop, session limits, shutdown.
//! - [`session`]: one task per client control connection: relays commands
//!   and replies, answers what carries addresses itself, sets up data
//!   connections on both sides.
//! - [`relay`]: moves the bytes of a data connection (splice or copy),
//!   passing half-close on in order. Knows nothing of FTP.
//! - [`flowtrack`]: the eBPF flow tracker (the only user of aya): TCP
//!   flows on watched ports, seen from the kernel, with their handshake,
//!   close order, bytes and timestamps.
//!
//! Data path: client ⇄ (control) gateway session ⇄ (control) server; for a
//! transfer the session opens one data connection on each side and hands
//! both to [`relay`].

pub mod config;
pub mod flows;
pub mod flowtrack;
pub mod gateway;
pub mod metrics;
pub mod protocol;
pub mod relay;
pub mod session;

pub use config::Config;
pub use gateway::{Gateway, run};
