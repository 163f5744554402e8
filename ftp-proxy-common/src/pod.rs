//! `aya::Pod` impls (feature `user`): lets the daemon read and write these
//! types in maps. The only unsafe code of this crate.

#![allow(
    unsafe_code,
    reason = "aya::Pod is an unsafe trait: the impl asserts the layout"
)]

use crate::{
    ClosedFlowEvent, DirStats, ExpectKey, ExpectValue, FlowEvent, FlowKey, FlowValue, RelayPeer,
};

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
// SAFETY: as above (20 bytes, padding explicit, asserted).
unsafe impl aya::Pod for ExpectKey {}
// SAFETY: as above (48 bytes, padding explicit, asserted).
unsafe impl aya::Pod for ExpectValue {}
// SAFETY: as above (64 bytes: a Pod key, integers, explicit padding).
unsafe impl aya::Pod for FlowEvent {}
// SAFETY: as above (24 bytes, three u64, asserted).
unsafe impl aya::Pod for RelayPeer {}

impl ClosedFlowEvent {
    /// Decodes a record read from the `FTPX_CLOSED` ring buffer; `None` if
    /// `bytes` is shorter than a record (extra bytes, the ring buffer's
    /// rounding, are ignored).
    #[must_use]
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < core::mem::size_of::<Self>() {
            return None;
        }
        // SAFETY: at least size_of::<Self>() readable bytes (checked above);
        // read_unaligned has no alignment requirement; every bit pattern is
        // a valid `ClosedFlowEvent` (see the Pod impl above).
        Some(unsafe { bytes.as_ptr().cast::<Self>().read_unaligned() })
    }
}

impl FlowEvent {
    /// Decodes a record read from the `FTPX_EVENTS` ring buffer; `None` if
    /// `bytes` is shorter than a record.
    #[must_use]
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < core::mem::size_of::<Self>() {
            return None;
        }
        // SAFETY: as in `ClosedFlowEvent::from_bytes`: enough readable
        // bytes, unaligned read, every bit pattern valid.
        Some(unsafe { bytes.as_ptr().cast::<Self>().read_unaligned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_event_from_bytes() {
        let mut ev = ClosedFlowEvent {
            key: FlowKey::from_packet(4, [1; 16], 20, [2; 16], 5001).0,
            value: FlowValue::EMPTY,
        };
        ev.value.ab.bytes = 0x0102_0304_0506_0708;
        // SAFETY: test only: view a Pod value as its bytes.
        let bytes: &[u8] = unsafe {
            core::slice::from_raw_parts(
                (&raw const ev).cast::<u8>(),
                core::mem::size_of::<ClosedFlowEvent>(),
            )
        };
        let mut padded = [0u8; 160];
        padded[1..145].copy_from_slice(bytes); // unaligned on purpose
        assert_eq!(ClosedFlowEvent::from_bytes(&padded[1..]), Some(ev));
        assert_eq!(ClosedFlowEvent::from_bytes(&padded[1..100]), None);
    }
}
