//! `aya::Pod` impls (feature `user`): lets the daemon read and write these
//! types in maps. The only unsafe code of this crate.

#![allow(
    unsafe_code,
    reason = "aya::Pod is an unsafe trait: the impl asserts the layout"
)]

use crate::{ClosedFlowEvent, DirStats, FlowKey, FlowValue};

// SAFETY: `#[repr(C)]`, only integer fields and arrays of integers, padding
// made explicit (the size assertions next to the types prove there is no
// implicit padding): every bit pattern is a valid value, and the type is Copy.
unsafe impl aya::Pod for FlowKey {}
// SAFETY: as above.
unsafe impl aya::Pod for DirStats {}
// SAFETY: as above; the `DirStats` fields are themselves Pod.
unsafe impl aya::Pod for FlowValue {}
// SAFETY: as above; made of two Pod structs with no padding between them
// (40 + 104 = 144, asserted).
unsafe impl aya::Pod for ClosedFlowEvent {}
