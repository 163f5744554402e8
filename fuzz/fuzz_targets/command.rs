//! Fuzzes the client command framing and parsing: any bytes, split at any
//! point, never panic and never yield a command longer than the bound.
#![no_main]

use bytes::BytesMut;
use ftp_proxy::protocol::CommandCodec;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else { return };
    let max = 64;
    let mut codec = CommandCodec::new(max);
    let at = usize::from(split).min(data.len());
    let mut buf = BytesMut::new();
    for part in [&data[..at], &data[at..]] {
        buf.extend_from_slice(part);
        while let Ok(Some(item)) = codec.decode(&mut buf) {
            if let Ok(command) = item {
                let line = command.to_line();
                assert!(line.len() <= max, "command longer than the bound");
                assert!(!line[..line.len() - 2].iter().any(|&b| b == b'\r' || b == b'\n' || b == 0), "control byte forwarded");
            }
        }
    }
    let _ = codec.decode_eof(&mut buf);
});
