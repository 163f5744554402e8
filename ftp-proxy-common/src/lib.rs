//! Types shared by the flow tracker's eBPF programs (`ftp-proxy-ebpf`) and
//! the daemon (`ftp-proxy::flowtrack`), and the pure TCP flow transition.
//!
//! Everything that crosses the kernel boundary is a plain `#[repr(C)]` struct
//! with explicit padding and a size assertion, or an integer constant: no
//! enums, no `Option`, no `bool` (the kernel side writes bytes the Rust
//! compiler never validated). The daemon decodes these into ordinary Rust
//! types; the eBPF side only reads and writes them around [`transition()`].
//!
//! - [`flow`]: the canonical flow key, the flow value, states, TCP flags.
//! - [`mod@transition`]: what one TCP segment does to a flow (pure, host-tested).
//! - [`maps`]: map names and sizes, the port map, the closed-flow and
//!   live events, per-CPU counter indices.
//! - [`guard`]: the data-port admission: expectations and the pure
//!   verdict on a SYN.
//! - [`relay`]: the kernel data plane's maps (`--relay-mode sockmap`).
//!
//! Feature `user` (daemon only) adds the `aya::Pod` impls.
//!
//! This crate does no I/O and has no clock: the caller passes the time.

#![no_std]

pub mod flow;
pub mod guard;
pub mod maps;
pub mod relay;
pub mod transition;

#[cfg(feature = "user")]
mod pod;

pub use flow::{DirStats, FlowKey, FlowValue};
pub use guard::{ExpectKey, ExpectValue};
pub use maps::{ClosedFlowEvent, FlowEvent};
pub use relay::RelayPeer;
pub use transition::{Segment, transition};
