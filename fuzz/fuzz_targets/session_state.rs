//! Fuzzes the session's protocol state with arbitrary client streams: the
//! gateway never arranges a data connection to another host or a
//! privileged port, never answers PORT/PASV after EPSV ALL, never starts
//! a transfer without an arrangement, and arranges nothing before login.
#![no_main]

use std::net::IpAddr;

use bytes::BytesMut;
use ftp_proxy::config::UpstreamMode;
use ftp_proxy::protocol::{CommandCodec, Verb};
use ftp_proxy::session::state::{Arrangement, ControlState, Decision, PassiveAnswer, Policy, TlsPolicy};
use ftp_proxy::tls::{ClientDataTls, ClientTlsMode};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, data)) = data.split_first() else { return };
    let client: IpAddr = if flags & 1 == 0 { "203.0.113.9".parse().unwrap() } else { "2001:db8::9".parse().unwrap() };
    let local: IpAddr = if flags & 1 == 0 { "198.51.100.1".parse().unwrap() } else { "2001:db8::1".parse().unwrap() };
    let mode = match flags >> 1 & 3 {
        0 => UpstreamMode::Client,
        1 => UpstreamMode::Passive,
        _ => UpstreamMode::Active,
    };
    let tls = if flags & 32 == 0 {
        TlsPolicy::OFF
    } else {
        TlsPolicy {
            mode: if flags & 64 == 0 { ClientTlsMode::Optional } else { ClientTlsMode::Required },
            data: if flags & 128 == 0 { ClientDataTls::Optional } else { ClientDataTls::Required },
            forward_prot: flags & 4 != 0,
        }
    };
    // Bit 16 also decides the routing: a routed session starts without a
    // server and must get one (at USER) before anything reaches it.
    let route_users = flags & 16 != 0 && flags & 8 != 0;
    let policy = Policy { nat_traversal: flags & 8 == 0, passive_address: None, upstream_mode: mode, tls, route_users };
    let mut state = ControlState::new(client, local, policy);
    if flags & 16 == 0 {
        state.on_reply(&Verb::Pass, 230);
    }
    let mut codec = CommandCodec::new(256);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(item)) = codec.decode(&mut buf) {
        let before = state.clone();
        let decision = match item {
            Ok(command) => state.on_command(&command),
            Err(error) => state.on_bad_line(&error),
        };
        match decision {
            Decision::Transfer { .. } if tls.data == ClientDataTls::Required => {
                assert!(before.logged_in(), "a data command before login");
                assert!(before.data_protected(), "a transfer without PROT P when it is required");
            }
            Decision::Active(_) | Decision::OpenPassive(_) | Decision::Transfer { .. } => {
                assert!(before.logged_in(), "a data command before login");
            }
            Decision::Forward | Decision::Quit | Decision::ForwardProt if !before.has_server() => {
                panic!("a command for the server before it is chosen");
            }
            Decision::Route => {
                assert!(route_users, "USER routed without routes");
                // The session would now connect and relay USER.
                state.server_chosen();
                let _ = state.take_early_prot();
            }
            Decision::StartTls { .. } => {
                assert!(tls.mode != ClientTlsMode::Off, "AUTH accepted with TLS off");
                assert!(!before.control_protected(), "AUTH accepted twice");
                // The session would now do the handshake.
                state.tls_started(false);
            }
            _ => {}
        }
        match decision {
            Decision::Active(target) => {
                assert_eq!(target.target().ip(), client);
                assert!(target.target().port() >= 1024);
                assert!(!before.epsv_all());
            }
            Decision::OpenPassive(PassiveAnswer::Pasv(_)) => {
                assert!(!before.epsv_all());
                assert!(local.is_ipv4());
            }
            Decision::Transfer { client: arranged, server_passive } => {
                assert_ne!(arranged, Arrangement::None);
                assert_eq!(arranged, before.arrangement());
                // The arrangement stays until the transfer uses it.
                assert_eq!(state.arrangement(), arranged);
                state.consume_arrangement();
                match mode {
                    UpstreamMode::Passive => assert!(server_passive),
                    UpstreamMode::Active => assert!(!server_passive),
                    UpstreamMode::Client => assert_eq!(server_passive, arranged == Arrangement::Passive),
                }
            }
            Decision::Answer { reply, .. } => assert!((200..600).contains(&reply.code)),
            Decision::Close(reply) => assert_eq!(reply.code, 221),
            Decision::Forward
            | Decision::Route
            | Decision::Quit
            | Decision::OpenPassive(PassiveAnswer::Epsv)
            | Decision::StartTls { .. }
            | Decision::ForwardProt => {}
        }
    }
});
