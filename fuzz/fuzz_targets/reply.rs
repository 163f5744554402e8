//! Fuzzes the server reply framing (multi-line, bounded): never panic,
//! every reply has a valid code and respects the bounds.
#![no_main]

use bytes::BytesMut;
use ftp_proxy::protocol::ReplyCodec;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut codec = ReplyCodec::new(128, 16);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(reply)) = codec.decode(&mut buf) {
        assert!((100..600).contains(&reply.code));
        assert!(reply.lines.len() <= 16);
        assert!(reply.lines.iter().all(|l| l.len() <= 128));
        let again = reply.to_bytes();
        let mut check = ReplyCodec::new(256, 32);
        let mut b = BytesMut::from(&again[..]);
        assert_eq!(check.decode(&mut b).ok().flatten().map(|r| r.code), Some(reply.code));
    }
});
