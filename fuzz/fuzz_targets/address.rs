//! Fuzzes the PORT/PASV/EPRT/EPSV parsers: never panic, and whatever parses
//! formats back to the same value.
#![no_main]

use ftp_proxy::protocol::address;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(addr) = address::parse_port(data) {
        assert_eq!(address::parse_port(address::format_port(addr).as_bytes()), Ok(addr));
    }
    if let Ok(addr) = address::parse_pasv_reply(data) {
        assert_eq!(address::parse_pasv_reply(address::format_pasv_reply(addr).as_bytes()), Ok(addr));
    }
    if let Ok(addr) = address::parse_eprt(data) {
        assert_eq!(address::parse_eprt(address::format_eprt(addr).as_bytes()), Ok(addr));
    }
    if let Ok(port) = address::parse_epsv_reply(data) {
        assert_eq!(address::parse_epsv_reply(address::format_epsv_reply(port).as_bytes()), Ok(port));
    }
    let _ = address::parse_epsv_arg(data);
});
