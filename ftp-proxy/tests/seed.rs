//! The reference session from `shared/seeds/ftp-session-sequence.txt`:
//! USER/PASS, PORT + LIST, CWD, PORT + RETR readme.txt, carried through the
//! gateway in active mode with every byte intact.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;

#[test]
#[ignore = "privileged tier (root, network namespaces, real servers and clients): cargo xtask test runs it"]
fn seed_session_port_list_cwd_port_retr() {
    let lab = Lab::new(&[]);
    let readme = b"Welcome to the reference FTP session.\r\nThis is readme.txt.\r\n".repeat(100);
    lab.server.put("readme.txt", &readme);
    lab.server.put("other.bin", &[1, 2, 3]);
    let mut control = Control::connect(&lab.ns, GATEWAY4);
    control.login();

    // PORT + LIST: the client listens, the gateway connects to it.
    let listener = lab.ns.listen("127.0.0.1:0".parse().unwrap());
    let port = listener.local_addr().unwrap().port();
    let reply = control.cmd(&format!("PORT 127,0,0,1,{},{}", port >> 8, port & 0xff));
    assert!(reply.starts_with("200"), "{reply}");
    control.send(b"LIST\r\n");
    let first = control.reply();
    assert!(first.starts_with("150"), "{first}");
    let (mut data, peer) = listener.accept().unwrap();
    // As in the seed, the active data connection comes from port 20.
    assert_eq!(peer.port(), 20, "active data connections come from port 20");
    let mut listing = String::new();
    data.read_to_string(&mut listing).unwrap();
    assert!(listing.contains("pub"), "{listing}");
    drop(data);
    let last = control.reply();
    assert!(last.starts_with("226"), "{last}");

    // CWD
    assert!(control.cmd("CWD pub").starts_with("250"));

    // PORT + RETR readme.txt: the server's last segment carries FIN; the
    // client sees EOF after the last byte, then closes its side.
    let listener = lab.ns.listen("127.0.0.1:0".parse().unwrap());
    let port = listener.local_addr().unwrap().port();
    assert!(
        control
            .cmd(&format!("PORT 127,0,0,1,{},{}", port >> 8, port & 0xff))
            .starts_with("200")
    );
    control.send(b"RETR readme.txt\r\n");
    assert!(control.reply().starts_with("150"));
    let (mut data, _) = listener.accept().unwrap();
    data.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    data.read_to_end(&mut got).unwrap();
    assert_eq!(got, readme);
    // The client's FIN follows the server's.
    data.shutdown(std::net::Shutdown::Write).unwrap();
    drop(data);
    let last = control.reply();
    assert!(last.starts_with("226"), "{last}");
    control.stream.write_all(b"QUIT\r\n").unwrap();
    assert!(control.reply().starts_with("221"));
}
