//! The session's protocol state, kept pure: client commands in, decisions
//! out. No sockets, clocks or logs: the session task carries the decisions
//! out. This is what the fuzz target and the property tests drive.
//!
//! State: whether the server has accepted a login, whether `EPSV ALL` is in
//! force, what the client has arranged for its next data connection
//! (nothing, a passive listener, an active target), its TLS (RFC 4217:
//! whether the control connection is protected, `PBSZ`, `PROT`), and,
//! when the server depends on the user (`[[routes]]`, `user@server`),
//! whether a server is chosen yet. Decisions: relay the command, answer
//! it, open a passive listener, remember an active target, start a
//! transfer, or route a `USER`.
//!
//! Before the server is chosen the gateway is the client's only peer: it
//! answers what a server answers before a login (`FEAT` with the
//! gateway's own features, `NOOP`, `QUIT`, TLS), refuses the rest with
//! `530`, and keeps a `PROT` the server must hear (see
//! [`ControlState::take_early_prot`]).
//!
//! Not here: the transfer itself (`session::transfer`), which replies the
//! server owes (`session::ledger`).

use std::net::{IpAddr, SocketAddr, SocketAddrV4};

use crate::config::UpstreamMode;
use crate::protocol::address::{self, AddressError, EpsvArg};
use crate::protocol::policy::{self, ActiveTarget, Reject};
use crate::protocol::{Command, CommandError, Reply, Verb};
use crate::tls::{ClientDataTls, ClientTlsMode};

/// How a login attempt ended (`logins_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginResult {
    /// The server accepted it.
    Ok,
    /// The server refused it.
    Failed,
}

impl LoginResult {
    /// Both results.
    pub const ALL: [LoginResult; 2] = [LoginResult::Ok, LoginResult::Failed];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            LoginResult::Ok => "ok",
            LoginResult::Failed => "failed",
        }
    }
}

/// The reply vsftpd gives too: a data command before the server accepted a
/// login opens nothing and reaches no server.
const NOT_LOGGED_IN: &str = "Please login with USER and PASS.";

/// What the client has arranged for its next data connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrangement {
    /// Nothing yet (or used up by the last transfer).
    None,
    /// PASV/EPSV: the gateway listens.
    Passive,
    /// PORT/EPRT: the gateway connects to this address.
    Active(SocketAddr),
}

/// How the gateway answers a passive command once its listener is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassiveAnswer {
    /// `227` with this address and the listener's port.
    Pasv(std::net::Ipv4Addr),
    /// `229` with the listener's port.
    Epsv,
}

impl PassiveAnswer {
    /// The reply for a listener on `port`.
    pub fn reply(self, port: u16) -> Reply {
        match self {
            PassiveAnswer::Pasv(ip) => Reply::new(
                227,
                &address::format_pasv_reply(SocketAddrV4::new(ip, port)),
            ),
            PassiveAnswer::Epsv => Reply::new(229, &address::format_epsv_reply(port)),
        }
    }
}

/// What the session must do with a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Relay the command to the server and its replies to the client.
    Forward,
    /// Answer the client directly; the server never sees the command.
    Answer {
        /// The reply.
        reply: Reply,
        /// What to count, if this is a refusal.
        reject: Option<Reject>,
    },
    /// Open a passive listener on the control connection's local address
    /// and answer as given (a failure answers 425).
    OpenPassive(PassiveAnswer),
    /// The client's PORT/EPRT was accepted: the target is remembered.
    Active(ActiveTarget),
    /// Run a transfer: the client's side as arranged, the server's side
    /// passive or active. The arrangement stays until the transfer uses it
    /// ([`ControlState::consume_arrangement`]): a command the server
    /// refuses leaves it for the next one, as on the server.
    Transfer {
        /// The client's arrangement (never `None`).
        client: Arrangement,
        /// Whether the gateway opens the server's side with PASV/EPSV.
        server_passive: bool,
    },
    /// Relay QUIT; the session ends when the server says 221 (or closes).
    Quit,
    /// `AUTH TLS`: answer 234 and accept a TLS handshake on the control
    /// connection; then [`ControlState::tls_started`].
    StartTls {
        /// `AUTH SSL` (or `TLS-P`): data protection is implied.
        private_data: bool,
    },
    /// `PROT` accepted by the gateway and passed to the server, whose
    /// answer is relayed (and settles the level: [`ControlState::on_reply`]).
    ForwardProt,
    /// `USER` when the server depends on the user: route the argument,
    /// connect to a server the route allows if none is chosen yet (or
    /// check that the chosen one is allowed), then relay `USER` with the
    /// name the route gives; a refused route answers `530`. Then
    /// [`ControlState::server_chosen`].
    Route,
    /// Answer and end the session (`QUIT` before a server is chosen).
    Close(Reply),
}

fn refuse(code: u16, text: &str, reject: Option<Reject>) -> Decision {
    Decision::Answer {
        reply: Reply::new(code, text),
        reject,
    }
}

/// TLS toward the client, as the state needs it.
#[derive(Debug, Clone, Copy)]
pub struct TlsPolicy {
    /// Whether `AUTH TLS` is offered, or required before `USER`.
    pub mode: ClientTlsMode,
    /// Whether data connections must be protected.
    pub data: ClientDataTls,
    /// Whether the client's `PROT` also goes to the server (TLS toward the
    /// server with `--server-data-tls client`): the server's answer is the
    /// client's.
    pub forward_prot: bool,
}

impl TlsPolicy {
    /// No TLS toward the client.
    pub const OFF: TlsPolicy = TlsPolicy {
        mode: ClientTlsMode::Off,
        data: ClientDataTls::Optional,
        forward_prot: false,
    };
}

/// Settings the state needs from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// NAT traversal for PORT/EPRT.
    pub nat_traversal: bool,
    /// Address advertised in 227 (None: the control connection's local address).
    pub passive_address: Option<IpAddr>,
    /// How the server's data connections are opened.
    pub upstream_mode: UpstreamMode,
    /// TLS toward the client.
    pub tls: TlsPolicy,
    /// The server depends on the user: the session starts without one and
    /// chooses it at `USER` ([`Decision::Route`]).
    pub route_users: bool,
}

/// The protocol state of one session.
#[derive(Debug, Clone)]
pub struct ControlState {
    client_ip: IpAddr,
    local_ip: IpAddr,
    policy: Policy,
    logged_in: bool,
    epsv_all: bool,
    arrangement: Arrangement,
    /// The control connection is protected.
    protected: bool,
    /// `PBSZ` was given (or implied).
    pbsz: bool,
    /// `PROT P` is in force.
    private_data: bool,
    /// A forwarded `PROT`'s level, until the server answers.
    pending_prot: Option<bool>,
    /// A server is chosen (always, unless the policy routes users).
    server_chosen: bool,
    /// A `PROT` level accepted before the server was chosen that the
    /// server must be told (with `forward_prot`).
    early_prot: Option<bool>,
}

impl ControlState {
    /// A fresh session whose control connection comes from `client_ip` to
    /// `local_ip`.
    pub fn new(client_ip: IpAddr, local_ip: IpAddr, policy: Policy) -> ControlState {
        ControlState {
            client_ip: client_ip.to_canonical(),
            local_ip: local_ip.to_canonical(),
            policy,
            logged_in: false,
            epsv_all: false,
            arrangement: Arrangement::None,
            protected: false,
            pbsz: false,
            private_data: false,
            pending_prot: None,
            server_chosen: !policy.route_users,
            early_prot: None,
        }
    }

    /// Whether the session has a server (see [`Policy::route_users`]).
    pub fn has_server(&self) -> bool {
        self.server_chosen
    }

    /// The session connected to the server a `USER` was routed to.
    pub fn server_chosen(&mut self) {
        self.server_chosen = true;
    }

    /// The `PROT` level accepted before the server was chosen, for the
    /// session to send once it is (taken once).
    pub fn take_early_prot(&mut self) -> Option<bool> {
        self.early_prot.take()
    }

    /// The TLS handshake on the control connection succeeded (after
    /// `AUTH`, or at once on an implicit listener). `private_data`: data
    /// protection is implied (`AUTH SSL`, implicit FTPS), as if `PBSZ 0`
    /// and `PROT P` had been given.
    pub fn tls_started(&mut self, private_data: bool) {
        self.protected = true;
        if private_data {
            self.pbsz = true;
            self.private_data = true;
        }
    }

    /// Whether the control connection is protected.
    pub fn control_protected(&self) -> bool {
        self.protected
    }

    /// Whether `PROT P` is in force: client data connections are TLS.
    pub fn data_protected(&self) -> bool {
        self.private_data
    }

    /// Whether the server has accepted a login.
    pub fn logged_in(&self) -> bool {
        self.logged_in
    }

    /// The server's final reply to a forwarded command: a login accepted,
    /// refused, or started anew. Returns what a login attempt came to.
    pub fn on_reply(&mut self, verb: &Verb, code: u16) -> Option<LoginResult> {
        match (verb, code) {
            // RFC 959 §5.4: 230 logged in, 202 (PASS) not needed.
            (Verb::User | Verb::Pass | Verb::Acct, 230) | (Verb::Pass, 202) => {
                self.logged_in = true;
                Some(LoginResult::Ok)
            }
            // A new USER accepted for a password: a new login in progress.
            (Verb::User, 331 | 332) => {
                self.logged_in = false;
                None
            }
            (Verb::Pass | Verb::Acct, 400..) => Some(LoginResult::Failed),
            (Verb::Rein, 220) => {
                self.logged_in = false;
                None
            }
            (Verb::Prot, _) => {
                if let Some(private) = self.pending_prot.take()
                    && (200..300).contains(&code)
                {
                    self.private_data = private;
                }
                None
            }
            _ => None,
        }
    }

    /// The transfer took the arrangement (its data connection is being
    /// established): the next transfer needs a new one.
    pub fn consume_arrangement(&mut self) {
        self.arrangement = Arrangement::None;
    }

    /// Whether the command is relayed to the server without the gateway
    /// doing anything else: during a transfer such commands go to the
    /// server at once, the others wait for the transfer's end. Does not
    /// change the state.
    pub fn is_plain_forward(&self, command: &Command) -> bool {
        let refused_by_tls = match command.verb {
            Verb::User => self.policy.tls.mode == ClientTlsMode::Required && !self.protected,
            Verb::Rein => self.protected,
            _ => false,
        };
        !refused_by_tls
            && !matches!(
                command.verb,
                Verb::Port
                    | Verb::Eprt
                    | Verb::Pasv
                    | Verb::Epsv
                    | Verb::Lprt
                    | Verb::Lpsv
                    | Verb::Abor
                    | Verb::Auth
                    | Verb::Pbsz
                    | Verb::Prot
                    | Verb::Ccc
                    | Verb::Adat
                    | Verb::Mic
                    | Verb::Conf
                    | Verb::Enc
            )
            && !command.verb.is_transfer()
    }

    /// What the client has arranged.
    pub fn arrangement(&self) -> Arrangement {
        self.arrangement
    }

    /// Whether `EPSV ALL` is in force.
    pub fn epsv_all(&self) -> bool {
        self.epsv_all
    }

    /// The passive listener could not be opened: nothing is arranged.
    pub fn passive_failed(&mut self) {
        self.arrangement = Arrangement::None;
    }

    /// A line that could not be parsed.
    pub fn on_bad_line(&self, error: &CommandError) -> Decision {
        refuse(
            error.reply_code(),
            &format!("Syntax error: {error}"),
            Some(Reject::BadInput),
        )
    }

    /// A parsed command.
    pub fn on_command(&mut self, command: &Command) -> Decision {
        let data_verb = matches!(
            command.verb,
            Verb::Port | Verb::Eprt | Verb::Pasv | Verb::Epsv | Verb::Lprt | Verb::Lpsv
        ) || command.verb.is_transfer();
        if data_verb && !self.logged_in {
            return refuse(530, NOT_LOGGED_IN, Some(Reject::NotLoggedIn));
        }
        if !self.server_chosen {
            return self.before_server(command);
        }
        match &command.verb {
            Verb::Port | Verb::Eprt => self.on_active(command),
            Verb::Pasv | Verb::Epsv => self.on_passive(command),
            Verb::Lprt | Verb::Lpsv => refuse(
                502,
                "LPRT and LPSV are not implemented; use EPRT or EPSV",
                None,
            ),
            Verb::Auth => self.on_auth(command),
            Verb::Pbsz => self.on_pbsz(command),
            Verb::Prot => self.on_prot(command),
            Verb::Ccc | Verb::Adat | Verb::Mic | Verb::Conf | Verb::Enc => {
                self.on_other_security(&command.verb)
            }
            Verb::User if self.policy.tls.mode == ClientTlsMode::Required && !self.protected => {
                refuse(
                    530,
                    "TLS required: send AUTH TLS before USER",
                    Some(Reject::TlsRequired),
                )
            }
            Verb::Rein if self.protected => refuse(
                502,
                "REIN is not supported on a TLS session; reconnect instead",
                None,
            ),
            verb if verb.is_transfer() => {
                let client = self.arrangement;
                if client == Arrangement::None {
                    return refuse(425, "Use PORT, EPRT, PASV or EPSV first", None);
                }
                if self.policy.tls.data == ClientDataTls::Required && !self.private_data {
                    // RFC 4217 §9: 521 for a PROT level the server refuses.
                    return refuse(
                        521,
                        "Data connection cannot be opened with this PROT setting: PROT P is required",
                        Some(Reject::TlsRequired),
                    );
                }
                let server_passive = match self.policy.upstream_mode {
                    UpstreamMode::Client => client == Arrangement::Passive,
                    UpstreamMode::Passive => true,
                    UpstreamMode::Active => false,
                };
                Decision::Transfer {
                    client,
                    server_passive,
                }
            }
            Verb::Quit => Decision::Quit,
            Verb::User if self.policy.route_users => Decision::Route,
            Verb::Rein => {
                self.arrangement = Arrangement::None;
                self.epsv_all = false;
                self.logged_in = false;
                Decision::Forward
            }
            _ => Decision::Forward,
        }
    }

    /// A command before the server is chosen: the gateway answers as a
    /// server does before a login.
    fn before_server(&mut self, command: &Command) -> Decision {
        match &command.verb {
            Verb::User if self.policy.tls.mode == ClientTlsMode::Required && !self.protected => {
                refuse(
                    530,
                    "TLS required: send AUTH TLS before USER",
                    Some(Reject::TlsRequired),
                )
            }
            Verb::User => Decision::Route,
            Verb::Quit => Decision::Close(Reply::new(221, "Goodbye.")),
            Verb::Noop => refuse(200, "NOOP ok.", None),
            Verb::Feat => Decision::Answer {
                reply: crate::protocol::feat::rewrite_feat(
                    Reply::multiline(211, &["Features:", "End"]),
                    self.policy.tls.mode != ClientTlsMode::Off,
                ),
                reject: None,
            },
            Verb::Pass | Verb::Acct => refuse(503, "Login with USER first.", None),
            Verb::Auth => self.on_auth(command),
            Verb::Pbsz => self.on_pbsz(command),
            Verb::Prot => match self.on_prot(command) {
                // The server is told once it is chosen; its refusal then
                // ends the session (it cannot give the client its level).
                Decision::ForwardProt => {
                    let private = self.pending_prot.take().unwrap_or(self.private_data);
                    self.private_data = private;
                    self.early_prot = Some(private);
                    refuse(
                        200,
                        if private {
                            "PROT now Private"
                        } else {
                            "PROT now Clear"
                        },
                        None,
                    )
                }
                decision => decision,
            },
            Verb::Ccc | Verb::Adat | Verb::Mic | Verb::Conf | Verb::Enc => {
                self.on_other_security(&command.verb)
            }
            _ => refuse(530, NOT_LOGGED_IN, Some(Reject::NotLoggedIn)),
        }
    }

    /// `CCC` and the RFC 2228 exchanges besides `AUTH`: refused.
    fn on_other_security(&self, verb: &Verb) -> Decision {
        match verb {
            Verb::Ccc if self.protected => refuse(
                534,
                "CCC refused by policy: the control connection stays protected",
                None,
            ),
            Verb::Ccc => refuse(533, "CCC requires a protected control connection", None),
            _ => refuse(
                502,
                "RFC 2228 security data exchanges are not supported; use AUTH TLS",
                None,
            ),
        }
    }

    fn on_auth(&mut self, command: &Command) -> Decision {
        if self.policy.tls.mode == ClientTlsMode::Off {
            return refuse(502, "TLS is not offered by this gateway", None);
        }
        if self.protected {
            return refuse(503, "Already using TLS", None);
        }
        let mechanism = String::from_utf8_lossy(command.trimmed_arg()).to_ascii_uppercase();
        match mechanism.as_str() {
            "TLS" | "TLS-C" => Decision::StartTls {
                private_data: false,
            },
            // The legacy names imply protected data (RFC 4217 §11,
            // as vsftpd and ProFTPD treat them).
            "SSL" | "TLS-P" => Decision::StartTls { private_data: true },
            other => refuse(
                504,
                &format!("AUTH {other} not supported; use AUTH TLS"),
                None,
            ),
        }
    }

    fn on_pbsz(&mut self, command: &Command) -> Decision {
        if !self.protected {
            return refuse(503, "PBSZ requires AUTH first", None);
        }
        let size = String::from_utf8_lossy(command.trimmed_arg()).into_owned();
        if size.parse::<u64>().is_err() {
            return refuse(501, "Invalid PBSZ argument: a number is expected", None);
        }
        // RFC 4217 §8: TLS is a stream; the buffer size is always 0.
        self.pbsz = true;
        refuse(200, "PBSZ=0", None)
    }

    fn on_prot(&mut self, command: &Command) -> Decision {
        if !self.protected {
            return refuse(503, "PROT requires AUTH first", None);
        }
        if !self.pbsz {
            return refuse(503, "PBSZ required before PROT", None);
        }
        let level = String::from_utf8_lossy(command.trimmed_arg()).to_ascii_uppercase();
        let private = match level.as_str() {
            "P" => true,
            "C" if self.policy.tls.data == ClientDataTls::Required => {
                return refuse(
                    534,
                    "PROT C refused by policy: data connections must be protected",
                    Some(Reject::TlsRequired),
                );
            }
            "C" => false,
            "S" | "E" => {
                return refuse(536, &format!("PROT {level} not supported with TLS"), None);
            }
            other => return refuse(504, &format!("PROT {other} not recognized"), None),
        };
        if self.policy.tls.forward_prot {
            self.pending_prot = Some(private);
            return Decision::ForwardProt;
        }
        self.private_data = private;
        refuse(
            200,
            if private {
                "PROT now Private"
            } else {
                "PROT now Clear"
            },
            None,
        )
    }

    fn on_active(&mut self, command: &Command) -> Decision {
        let verb = command.verb.as_str();
        if self.epsv_all {
            return refuse(
                501,
                &format!("{verb} refused: EPSV ALL is in effect (RFC 2428)"),
                None,
            );
        }
        let requested = if command.verb == Verb::Port {
            address::parse_port(command.trimmed_arg()).map(SocketAddr::V4)
        } else {
            address::parse_eprt(command.trimmed_arg())
        };
        let requested = match requested {
            Ok(addr) => addr,
            Err(e @ AddressError::UnsupportedProtocol(_)) => {
                return refuse(522, &e.to_string(), Some(Reject::BadInput));
            }
            Err(e) => {
                return refuse(
                    501,
                    &format!("Invalid {verb} argument: {e}"),
                    Some(Reject::BadInput),
                );
            }
        };
        // A new PORT replaces whatever was arranged, also when refused.
        self.arrangement = Arrangement::None;
        match policy::active_target(requested, self.client_ip, self.policy.nat_traversal) {
            Ok(target) => {
                self.arrangement = Arrangement::Active(target.target());
                Decision::Active(target)
            }
            Err(refusal) => refuse(
                504,
                &format!("{verb} refused: {refusal} (RFC 2577 bounce protection)"),
                Some(refusal.reject()),
            ),
        }
    }

    fn on_passive(&mut self, command: &Command) -> Decision {
        let v4 = self.local_ip.is_ipv4();
        if command.verb == Verb::Epsv {
            match address::parse_epsv_arg(command.trimmed_arg()) {
                Ok(EpsvArg::All) => {
                    self.epsv_all = true;
                    return refuse(200, "EPSV ALL command successful", None);
                }
                Ok(EpsvArg::Protocol(p)) if (p == 1) != v4 => {
                    return refuse(
                        522,
                        &format!(
                            "Network protocol not supported, use ({})",
                            if v4 { 1 } else { 2 }
                        ),
                        None,
                    );
                }
                Ok(_) => {}
                Err(e @ AddressError::UnsupportedProtocol(_)) => {
                    return refuse(522, &e.to_string(), Some(Reject::BadInput));
                }
                Err(e) => {
                    return refuse(
                        501,
                        &format!("Invalid EPSV argument: {e}"),
                        Some(Reject::BadInput),
                    );
                }
            }
            self.arrangement = Arrangement::Passive;
            return Decision::OpenPassive(PassiveAnswer::Epsv);
        }
        if !command.trimmed_arg().is_empty() {
            return refuse(501, "PASV takes no argument", Some(Reject::BadInput));
        }
        if self.epsv_all {
            return refuse(501, "PASV refused: EPSV ALL is in effect (RFC 2428)", None);
        }
        match self.policy.passive_address.unwrap_or(self.local_ip) {
            IpAddr::V4(advertised) => {
                self.arrangement = Arrangement::Passive;
                Decision::OpenPassive(PassiveAnswer::Pasv(advertised))
            }
            IpAddr::V6(_) => refuse(522, "PASV cannot carry an IPv6 address; use EPSV", None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use tokio_util::codec::Decoder;

    /// The tests' policy: NAT traversal, upstream mode `client`.
    fn policy(tls: TlsPolicy, route_users: bool) -> Policy {
        Policy {
            nat_traversal: true,
            passive_address: None,
            upstream_mode: UpstreamMode::Client,
            tls,
            route_users,
        }
    }

    /// A fresh session from 192.0.2.1 to 198.51.100.1.
    fn fresh(policy: Policy) -> ControlState {
        ControlState::new(
            "192.0.2.1".parse().unwrap(),
            "198.51.100.1".parse().unwrap(),
            policy,
        )
    }

    /// A session whose login the server accepted.
    fn state(client: &str, local: &str) -> ControlState {
        let mut s = ControlState::new(
            client.parse().unwrap(),
            local.parse().unwrap(),
            policy(TlsPolicy::OFF, false),
        );
        assert_eq!(s.on_reply(&Verb::Pass, 230), Some(LoginResult::Ok));
        s
    }

    fn cmd(line: &str) -> Command {
        Command::parse(line.as_bytes()).unwrap()
    }

    fn code(d: &Decision) -> Option<u16> {
        match d {
            Decision::Answer { reply, .. } => Some(reply.code),
            _ => None,
        }
    }

    #[test]
    fn transfer_needs_an_arrangement_and_uses_it_up() {
        let mut s = state("192.0.2.1", "198.51.100.1");
        assert_eq!(code(&s.on_command(&cmd("RETR x"))), Some(425));
        assert_eq!(
            s.on_command(&cmd("PASV")),
            Decision::OpenPassive(PassiveAnswer::Pasv("198.51.100.1".parse().unwrap()))
        );
        assert_eq!(
            s.on_command(&cmd("RETR x")),
            Decision::Transfer {
                client: Arrangement::Passive,
                server_passive: true
            }
        );
        // Refused by the server (550): the arrangement is still there.
        assert_eq!(s.arrangement(), Arrangement::Passive);
        assert!(matches!(
            s.on_command(&cmd("RETR x")),
            Decision::Transfer { .. }
        ));
        s.consume_arrangement();
        assert_eq!(code(&s.on_command(&cmd("RETR x"))), Some(425));
        assert!(matches!(
            s.on_command(&cmd("PORT 192,0,2,1,19,137")),
            Decision::Active(ActiveTarget::Direct(_))
        ));
        assert_eq!(
            s.on_command(&cmd("LIST")),
            Decision::Transfer {
                client: Arrangement::Active("192.0.2.1:5001".parse().unwrap()),
                server_passive: false
            }
        );
    }

    #[test]
    fn upstream_modes() {
        for (mode, client_passive, want) in [
            (UpstreamMode::Passive, false, true),
            (UpstreamMode::Active, true, false),
            (UpstreamMode::Client, true, true),
            (UpstreamMode::Client, false, false),
        ] {
            let mut s = ControlState::new(
                "10.0.0.1".parse().unwrap(),
                "10.0.0.2".parse().unwrap(),
                Policy {
                    nat_traversal: true,
                    passive_address: None,
                    upstream_mode: mode,
                    tls: TlsPolicy::OFF,
                    route_users: false,
                },
            );
            s.on_reply(&Verb::User, 230);
            s.on_command(&cmd(if client_passive {
                "EPSV"
            } else {
                "PORT 10,0,0,1,20,0"
            }));
            assert!(
                matches!(s.on_command(&cmd("STOR f")), Decision::Transfer { server_passive, .. } if server_passive == want)
            );
        }
    }

    #[test]
    fn epsv_all_locks_out_other_data_commands_until_rein() {
        let mut s = state("2001:db8::1", "2001:db8::2");
        assert_eq!(code(&s.on_command(&cmd("PASV"))), Some(522));
        assert_eq!(code(&s.on_command(&cmd("EPSV 1"))), Some(522));
        assert_eq!(code(&s.on_command(&cmd("EPSV ALL"))), Some(200));
        for line in ["PASV", "PORT 1,2,3,4,5,6", "EPRT |2|2001:db8::1|5000|"] {
            assert_eq!(code(&s.on_command(&cmd(line))), Some(501), "{line}");
        }
        assert_eq!(
            s.on_command(&cmd("EPSV")),
            Decision::OpenPassive(PassiveAnswer::Epsv)
        );
        assert_eq!(s.on_command(&cmd("REIN")), Decision::Forward);
        assert!(!s.epsv_all());
    }

    #[test]
    fn data_commands_need_a_login_and_open_nothing_before() {
        let mut s = fresh(policy(TlsPolicy::OFF, false));
        for line in [
            "PASV",
            "EPSV",
            "EPSV ALL",
            "PORT 192,0,2,1,19,137",
            "EPRT |1|192.0.2.1|5001|",
            "RETR x",
            "LIST",
        ] {
            let decision = s.on_command(&cmd(line));
            assert_eq!(code(&decision), Some(530), "{line}");
            assert_eq!(s.arrangement(), Arrangement::None, "{line}");
        }
        assert_eq!(s.on_command(&cmd("USER anonymous")), Decision::Forward);
        assert_eq!(s.on_reply(&Verb::User, 331), None);
        assert_eq!(s.on_reply(&Verb::Pass, 530), Some(LoginResult::Failed));
        assert!(!s.logged_in());
        assert_eq!(s.on_reply(&Verb::Pass, 230), Some(LoginResult::Ok));
        assert!(matches!(
            s.on_command(&cmd("PASV")),
            Decision::OpenPassive(_)
        ));
        // REIN logs out.
        assert_eq!(s.on_command(&cmd("REIN")), Decision::Forward);
        assert_eq!(code(&s.on_command(&cmd("PASV"))), Some(530));
    }

    #[test]
    fn before_a_routed_user_nothing_reaches_a_server() {
        let mut s = fresh(policy(
            TlsPolicy {
                mode: ClientTlsMode::Optional,
                data: ClientDataTls::Optional,
                forward_prot: true,
            },
            true,
        ));
        assert!(!s.has_server());
        for (line, want) in [
            ("NOOP", 200),
            ("PASS x", 503),
            ("SYST", 530),
            ("CWD /", 530),
            ("STAT", 530),
            ("EPSV", 530),
            ("PBSZ 0", 503),
            ("CCC", 533),
        ] {
            assert_eq!(code(&s.on_command(&cmd(line))), Some(want), "{line}");
        }
        let Decision::Answer { reply, .. } = s.on_command(&cmd("FEAT")) else {
            panic!("FEAT is answered");
        };
        let feat = String::from_utf8_lossy(&reply.to_bytes()).into_owned();
        assert!(
            feat.contains(" EPSV\r\n") && feat.contains(" AUTH TLS\r\n"),
            "{feat}"
        );
        assert_eq!(
            s.on_command(&cmd("AUTH TLS")),
            Decision::StartTls {
                private_data: false
            }
        );
        s.tls_started(false);
        assert_eq!(code(&s.on_command(&cmd("PBSZ 0"))), Some(200));
        // The server must hear this PROT: kept for when it is chosen.
        assert_eq!(code(&s.on_command(&cmd("PROT P"))), Some(200));
        assert!(s.data_protected());
        assert_eq!(s.on_command(&cmd("USER alice")), Decision::Route);
        s.server_chosen();
        assert_eq!(s.take_early_prot(), Some(true));
        assert_eq!(s.take_early_prot(), None);
        // Chosen: commands go to the server, a new USER is routed again.
        assert_eq!(s.on_command(&cmd("SYST")), Decision::Forward);
        assert_eq!(s.on_command(&cmd("USER bob")), Decision::Route);
        assert!(matches!(s.on_command(&cmd("QUIT")), Decision::Quit));
        let mut fresh = s.clone();
        fresh.server_chosen = false;
        assert_eq!(
            fresh.on_command(&cmd("QUIT")),
            Decision::Close(Reply::new(221, "Goodbye."))
        );
    }

    #[test]
    fn pasv_takes_no_argument() {
        let mut s = state("192.0.2.1", "198.51.100.1");
        assert_eq!(code(&s.on_command(&cmd("PASV 1"))), Some(501));
        assert_eq!(s.arrangement(), Arrangement::None);
    }

    #[test]
    fn plain_forwards_are_what_on_command_forwards() {
        for line in [
            "NOOP",
            "STAT",
            "USER x",
            "QUIT",
            "REIN",
            "SITE x",
            "FOO",
            "PWD",
            "RETR x",
            "PASV",
            "PORT 1,2,3,4,5,6",
            "ABOR",
            "AUTH TLS",
            "EPSV",
        ] {
            let mut s = state("192.0.2.1", "198.51.100.1");
            let plain = s.is_plain_forward(&cmd(line));
            let decision = s.on_command(&cmd(line));
            assert_eq!(
                plain,
                matches!(decision, Decision::Forward | Decision::Quit)
                    && cmd(line).verb != Verb::Abor,
                "{line}: {decision:?}"
            );
        }
    }

    #[test]
    fn refused_port_clears_the_arrangement() {
        let mut s = state("192.0.2.1", "198.51.100.1");
        s.on_command(&cmd("PASV"));
        assert_eq!(code(&s.on_command(&cmd("PORT 8,8,8,8,19,137"))), Some(504));
        assert_eq!(s.arrangement(), Arrangement::None);
    }

    proptest::proptest! {
        /// Whatever the client sends, the gateway never arranges a
        /// connection to another host or a privileged port, never answers
        /// PORT/PASV after EPSV ALL, and starts a transfer only when arranged.
        #[test]
        fn invariants_hold_for_any_command_stream(lines in proptest::collection::vec(
            proptest::prop_oneof![
                proptest::string::string_regex("(PORT|EPRT|PASV|EPSV|RETR|LIST|STOR|REIN|NOOP|QUIT) ?[ -~]{0,30}").unwrap(),
                proptest::string::string_regex("PORT [0-9]{1,3},[0-9]{1,3},[0-9]{1,3},[0-9]{1,3},[0-9]{1,3},[0-9]{1,3}").unwrap(),
                proptest::string::string_regex("EPRT \\|[12]\\|[0-9a-f:.]{2,20}\\|[0-9]{1,5}\\|").unwrap(),
                proptest::string::string_regex("EPSV (ALL|1|2)").unwrap(),
            ], 0..40)) {
            let mut s = state("203.0.113.9", "198.51.100.1");
            let mut codec = crate::protocol::CommandCodec::new(512);
            let mut transfers = 0u32;
            let mut buf = BytesMut::from(lines.join("\r\n").as_bytes());
            buf.extend_from_slice(b"\r\n");
            while let Some(item) = codec.decode(&mut buf).unwrap() {
                let before = s.clone();
                let decision = match item { Ok(c) => s.on_command(&c), Err(e) => s.on_bad_line(&e) };
                match decision {
                    Decision::Active(target) => {
                        proptest::prop_assert_eq!(target.target().ip(), "203.0.113.9".parse::<IpAddr>().unwrap());
                        proptest::prop_assert!(target.target().port() >= 1024);
                        proptest::prop_assert!(!before.epsv_all());
                    }
                    Decision::OpenPassive(PassiveAnswer::Pasv(_)) => proptest::prop_assert!(!before.epsv_all()),
                    Decision::Transfer { client, .. } => {
                        proptest::prop_assert_ne!(client, Arrangement::None);
                        proptest::prop_assert_eq!(client, before.arrangement());
                        // Every other transfer uses its arrangement.
                        transfers += 1;
                        if transfers.is_multiple_of(2) {
                            s.consume_arrangement();
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}
