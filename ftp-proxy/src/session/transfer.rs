//! One transfer (`RETR`, `STOR`, `LIST`…) as a pure state machine: events
//! in, actions out. The session task carries the actions out (sockets,
//! the relay, writing replies) and feeds back what happened.
//!
//! The rules it keeps (RFC 959 §4.1.3, §5.4; RFC 2428; RFC 4217):
//! - The server's side is prepared first (`PASV`/`EPSV` and a connection
//!   to the address it names, or a listener and `PORT`/`EPRT`), then the
//!   command goes to the server.
//! - A final reply instead of a `1xx` (say `550`) is relayed; the client's
//!   `PASV`/`PORT` arrangement stays for its next transfer, as it would on
//!   the server.
//! - After the server's `1xx` both data connections are established, then
//!   the `1xx` is relayed; a failure on either leg answers `425` with the
//!   side and the reason, and the server's owed replies are swallowed when
//!   they come (the ledger's job).
//! - The server's final reply reaches the client only once the direction
//!   that carries the data has delivered its last byte and passed its FIN
//!   on. A `2xx` for data that was not all delivered becomes `426`.
//! - `ABOR` goes to the server first (as urgent data), then the data
//!   connections are cut; the transfer's reply and the `ABOR`'s reply are
//!   relayed as the server sends them. A server that sends one reply
//!   where two were due is given a short grace, then the gateway moves on.
//!
//! Not here: who a server reply belongs to (`session::ledger`), sockets,
//! clocks (deadlines are asked for with [`Transfer::wait`] and reported as
//! [`Event::Deadline`]), logs and metrics.

use std::net::{IpAddr, SocketAddr};

use crate::protocol::policy::{self, ServerPassivePolicy};
use crate::protocol::{Command, Reply, Side, Verb, address};
use crate::relay::{Method, RelayError};

use super::data::{DataError, DataFailure};
use super::ledger::Step;

/// Which way the data goes (`transfers_total{direction}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TransferKind {
    /// Server to client: `RETR`, `LIST`, `NLST`, `MLSD`.
    Download,
    /// Client to server: `STOR`, `STOU`, `APPE`.
    Upload,
}

impl TransferKind {
    /// Both.
    pub(crate) const ALL: [TransferKind; 2] = [TransferKind::Upload, TransferKind::Download];

    /// The metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            TransferKind::Download => "download",
            TransferKind::Upload => "upload",
        }
    }

    /// The kind of a transfer command.
    pub(crate) fn of(verb: &Verb) -> TransferKind {
        if verb.is_upload() {
            TransferKind::Upload
        } else {
            TransferKind::Download
        }
    }
}

/// How a transfer ended (`transfers_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TransferResult {
    /// A `2xx` from the server and every byte relayed.
    Ok,
    /// Anything else.
    Failed,
    /// Aborted by the client.
    Aborted,
}

impl TransferResult {
    /// Every result.
    pub(crate) const ALL: [TransferResult; 3] = [
        TransferResult::Ok,
        TransferResult::Failed,
        TransferResult::Aborted,
    ];

    /// The metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            TransferResult::Ok => "ok",
            TransferResult::Failed => "failed",
            TransferResult::Aborted => "aborted",
        }
    }
}

/// What is fixed when a transfer starts.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// The client's command, sent on to the server as it is.
    pub(crate) command: Command,
    /// Whether the gateway opens the server's side with `PASV`/`EPSV`
    /// (else it listens and sends `PORT`/`EPRT`).
    pub(crate) server_passive: bool,
    /// The server's control address: which family to speak, where a `229`
    /// points, and what its `227` may name.
    pub(crate) server_ip: IpAddr,
    /// What to do with a `227`/`229` naming another host.
    pub(crate) server_passive_policy: ServerPassivePolicy,
}

/// The end of the direction that carries the data.
#[derive(Debug, Clone)]
pub(crate) struct Relayed {
    /// Bytes moved in that direction.
    pub(crate) bytes: u64,
    /// How; `None` when it failed.
    pub(crate) method: Option<Method>,
    /// Why it failed, if it did.
    pub(crate) error: Option<RelayError>,
}

/// What happened.
#[derive(Debug)]
pub(crate) enum Event<'a> {
    /// The server's reply to one of the transfer's commands.
    Reply(Step, &'a Reply),
    /// Active mode toward the server: the gateway listens at this address.
    Listening(SocketAddr),
    /// Passive mode toward the server: connected to its data port.
    ServerConnected,
    /// Both data connections are established.
    LegsReady,
    /// Setting up a data connection failed.
    DataFailed(DataError),
    /// The direction that carries the data ended.
    RelayEnded(Relayed),
    /// The client sent `ABOR`.
    Abort,
    /// What [`Transfer::wait`] asked for did not come in time.
    Deadline,
}

/// What to do, in order.
#[derive(Debug)]
pub(crate) enum Action {
    /// Send this command to the server; its replies come back as
    /// [`Event::Reply`] with this step.
    Send(Command, Step),
    /// Send `ABOR` to the server as urgent data (Telnet IP and Synch,
    /// RFC 959 §4.1.3), so that a server busy with the transfer sees it;
    /// replies come back with [`Step::Abort`].
    SendAbort,
    /// Open a listener toward the server: [`Event::Listening`] or
    /// [`Event::DataFailed`].
    Listen,
    /// Connect to the server's data port: [`Event::ServerConnected`] or
    /// [`Event::DataFailed`].
    Connect(SocketAddr),
    /// The client's arrangement (its passive listener or active target) is
    /// used by this transfer: it is gone afterwards.
    ConsumeArrangement,
    /// Establish both data connections (those not established yet):
    /// [`Event::LegsReady`] or [`Event::DataFailed`].
    OpenLegs,
    /// Start relaying between the two data connections: the end of the
    /// data direction comes back as [`Event::RelayEnded`].
    Relay,
    /// Stop setting up and relaying: the data connections are reset.
    Cut,
    /// Send this reply to the client.
    Reply(Reply),
    /// The transfer is over; owed replies of its commands are swallowed
    /// from now on.
    Finish(Outcome),
}

/// What [`Transfer::wait`] asks the session to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// A reply from the server (the reply timeout).
    Reply,
    /// The second reply to `ABOR`, which some servers never send (a short
    /// grace).
    AbortGrace,
}

/// Why a transfer did not succeed, when the gateway knows.
#[derive(Debug)]
pub(crate) enum Failure {
    /// A data connection could not be set up.
    Data(DataError),
    /// The relay failed after it started.
    Relay(RelayError),
    /// The server did not answer in time.
    ServerTimeout,
}

/// How the transfer ended, for the log line and the metrics.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// Ok, failed, aborted.
    pub(crate) result: TransferResult,
    /// Bytes relayed in the data direction.
    pub(crate) bytes: u64,
    /// How they were moved.
    pub(crate) method: Option<Method>,
    /// The server's final reply code, if it came.
    pub(crate) server_code: Option<u16>,
    /// Whether the data connections were established (the transfer was
    /// really under way).
    pub(crate) started: bool,
    /// The gateway's reason, if any.
    pub(crate) failure: Option<Failure>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Active toward the server: waiting for the listener.
    Listening,
    /// `PASV`/`EPSV`/`PORT`/`EPRT` sent, waiting for its reply.
    Setup,
    /// Connecting to the server's data port.
    ServerConnecting,
    /// The command sent, waiting for the first reply.
    Commanded,
    /// The server said `1xx`: establishing the data connections.
    Connecting,
    /// Data moving.
    Relaying,
    /// `ABOR` sent.
    Aborting,
    /// Over.
    Done,
}

/// One transfer.
#[derive(Debug)]
pub(crate) struct Transfer {
    plan: Plan,
    phase: Phase,
    /// `1xx` replies received while the data connections are being set up.
    preliminary: Vec<Reply>,
    /// Whether the client has seen the transfer start (a `1xx`).
    client_saw_start: bool,
    /// The server's final reply to the command, held until the data is delivered.
    held: Option<Reply>,
    /// The end of the data direction, once it came.
    relayed: Option<Relayed>,
    /// After ABOR: the command's final reply came.
    command_done: bool,
    /// The server's final reply code to the command.
    server_code: Option<u16>,
}

fn describe(reply: &Reply) -> String {
    String::from_utf8_lossy(&reply.to_bytes())
        .trim_end()
        .to_owned()
}

impl Transfer {
    /// Starts a transfer: the first actions prepare the server's side.
    pub(crate) fn start(plan: Plan) -> (Transfer, Vec<Action>) {
        let v4 = plan.server_ip.is_ipv4();
        let (phase, first) = if plan.server_passive {
            let verb = if v4 { Verb::Pasv } else { Verb::Epsv };
            (
                Phase::Setup,
                Action::Send(Command::new(verb, Vec::new()), Step::Setup),
            )
        } else {
            (Phase::Listening, Action::Listen)
        };
        let transfer = Transfer {
            plan,
            phase,
            preliminary: Vec::new(),
            client_saw_start: false,
            held: None,
            relayed: None,
            command_done: false,
            server_code: None,
        };
        (transfer, vec![first])
    }

    /// The command being run.
    pub(crate) fn command(&self) -> &Command {
        &self.plan.command
    }

    /// Upload or download.
    pub(crate) fn kind(&self) -> TransferKind {
        TransferKind::of(&self.plan.command.verb)
    }

    #[cfg(test)]
    /// Whether the transfer is over.
    pub(crate) fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Whether the client must not get later replies yet: the server's
    /// final reply is held until the data is delivered, and replies to
    /// commands sent after it must follow it.
    pub(crate) fn holds_replies(&self) -> bool {
        self.held.is_some() && self.phase != Phase::Done
    }

    /// Whether commands the client sends now may go to the server at once.
    /// Not while `ABOR`'s replies are sorted out: with a server that sends
    /// one reply where two were due, the next command's reply would look
    /// like the missing one.
    pub(crate) fn passes_commands(&self) -> bool {
        self.phase != Phase::Aborting
    }

    /// Whether the relay runs.
    pub(crate) fn is_relaying(&self) -> bool {
        self.phase == Phase::Relaying && self.relayed.is_none()
    }

    /// What the session must time now, if anything.
    pub(crate) fn wait(&self) -> Option<Wait> {
        match self.phase {
            Phase::Setup | Phase::Commanded => Some(Wait::Reply),
            // Data delivered, the server's final reply must come.
            Phase::Relaying if self.relayed.is_some() && self.held.is_none() => Some(Wait::Reply),
            Phase::Aborting if self.command_done => Some(Wait::AbortGrace),
            Phase::Aborting => Some(Wait::Reply),
            _ => None,
        }
    }

    /// Feeds an event; returns what to do.
    pub(crate) fn on(&mut self, event: Event<'_>) -> Vec<Action> {
        match (self.phase, event) {
            (Phase::Done, _) => Vec::new(),
            (_, Event::Abort) => self.abort(),
            (Phase::Listening, Event::Listening(addr)) => {
                self.phase = Phase::Setup;
                let command = match addr {
                    SocketAddr::V4(v4) => Command::new(Verb::Port, address::format_port(v4)),
                    SocketAddr::V6(_) => Command::new(Verb::Eprt, address::format_eprt(addr)),
                };
                vec![Action::Send(command, Step::Setup)]
            }
            (Phase::Setup, Event::Reply(Step::Setup, reply)) => self.on_setup_reply(reply),
            (Phase::ServerConnecting, Event::ServerConnected) => self.send_command(),
            (Phase::Commanded, Event::Reply(Step::Command, reply)) => {
                if reply.is_preliminary() {
                    self.phase = Phase::Connecting;
                    self.preliminary.push(reply.clone());
                    vec![Action::ConsumeArrangement, Action::OpenLegs]
                } else {
                    // Refused (550…): nothing to relay, the arrangement stays.
                    self.server_code = Some(reply.code);
                    self.phase = Phase::Done;
                    vec![
                        Action::Reply(reply.clone()),
                        Action::Finish(self.outcome(TransferResult::Failed, None)),
                    ]
                }
            }
            (Phase::Connecting, Event::Reply(Step::Command, reply)) => {
                if reply.is_preliminary() {
                    self.preliminary.push(reply.clone());
                    Vec::new()
                } else if reply.is_success() {
                    // A small file: the server wrote it into its socket and
                    // is done before the gateway has both legs. The bytes
                    // wait in the kernel; the reply waits for them.
                    self.server_code = Some(reply.code);
                    self.held = Some(reply.clone());
                    Vec::new()
                } else {
                    // The server gave up (it could not connect, say): no
                    // need to wait for the data connections.
                    self.server_code = Some(reply.code);
                    self.phase = Phase::Done;
                    vec![
                        Action::Cut,
                        Action::Reply(reply.clone()),
                        Action::Finish(self.outcome(TransferResult::Failed, None)),
                    ]
                }
            }
            (Phase::Connecting, Event::LegsReady) => {
                self.phase = Phase::Relaying;
                self.client_saw_start = true;
                let mut actions: Vec<Action> =
                    self.preliminary.drain(..).map(Action::Reply).collect();
                actions.push(Action::Relay);
                actions
            }
            (
                Phase::Listening | Phase::ServerConnecting | Phase::Connecting,
                Event::DataFailed(error),
            ) => self.setup_failed(error),
            (Phase::Relaying, Event::Reply(Step::Command, reply)) => {
                if reply.is_preliminary() {
                    return vec![Action::Reply(reply.clone())];
                }
                self.server_code = Some(reply.code);
                match self.relayed.take() {
                    Some(relayed) => self.finish(reply.clone(), relayed),
                    None => {
                        self.held = Some(reply.clone());
                        Vec::new()
                    }
                }
            }
            (Phase::Relaying, Event::RelayEnded(relayed)) => match self.held.take() {
                Some(reply) => self.finish(reply, relayed),
                None => {
                    self.relayed = Some(relayed);
                    Vec::new()
                }
            },
            (Phase::Setup | Phase::Commanded, Event::Deadline) => self.server_timeout(),
            (Phase::Relaying, Event::Deadline) if self.relayed.is_some() => self.server_timeout(),
            (Phase::Aborting, event) => self.on_aborting(event),
            // Anything else cannot happen in this phase (a late event of
            // a cut setup, a reply for another step): nothing to do.
            _ => Vec::new(),
        }
    }

    fn on_setup_reply(&mut self, reply: &Reply) -> Vec<Action> {
        if reply.is_preliminary() {
            return Vec::new();
        }
        if !self.plan.server_passive {
            return if reply.is_success() {
                self.send_command()
            } else {
                self.setup_failed(
                    DataFailure::ServerRefused {
                        command: if self.plan.server_ip.is_ipv4() {
                            "PORT"
                        } else {
                            "EPRT"
                        },
                        reply: describe(reply),
                    }
                    .on(Side::Server),
                )
            };
        }
        let offered = match reply.code {
            227 => address::parse_pasv_reply(reply.text()).map(SocketAddr::V4),
            229 => address::parse_epsv_reply(reply.text())
                .map(|port| SocketAddr::new(self.plan.server_ip, port)),
            _ => {
                let command = if self.plan.server_ip.is_ipv4() {
                    "PASV"
                } else {
                    "EPSV"
                };
                return self.setup_failed(
                    DataFailure::ServerRefused {
                        command,
                        reply: describe(reply),
                    }
                    .on(Side::Server),
                );
            }
        };
        let offered = match offered {
            Ok(addr) => addr,
            Err(error) => {
                return self.setup_failed(
                    DataFailure::InvalidReply {
                        code: reply.code,
                        error,
                    }
                    .on(Side::Server),
                );
            }
        };
        match policy::server_passive_target(
            offered,
            self.plan.server_ip,
            self.plan.server_passive_policy,
        ) {
            Ok(target) => {
                self.phase = Phase::ServerConnecting;
                vec![Action::Connect(target)]
            }
            Err(refusal) => {
                self.setup_failed(DataFailure::Policy { offered, refusal }.on(Side::Server))
            }
        }
    }

    fn send_command(&mut self) -> Vec<Action> {
        self.phase = Phase::Commanded;
        vec![Action::Send(self.plan.command.clone(), Step::Command)]
    }

    /// A data connection could not be set up: the client gets 425, the
    /// server's owed replies are swallowed.
    fn setup_failed(&mut self, error: DataError) -> Vec<Action> {
        self.phase = Phase::Done;
        let reply = Reply::new(425, &format!("Can't open data connection: {error}"));
        vec![
            Action::Cut,
            Action::Reply(reply),
            Action::Finish(self.outcome(TransferResult::Failed, Some(Failure::Data(error)))),
        ]
    }

    /// The server's final reply for data that was not all delivered: a
    /// success would be a lie, so it becomes 426 (RFC 959: connection
    /// closed, transfer aborted).
    fn undelivered(&self, reply: &Reply) -> Reply {
        if reply.is_success() {
            let text = String::from_utf8_lossy(reply.text()).into_owned();
            Reply::new(
                426,
                &format!("Connection closed; transfer aborted ({text})"),
            )
        } else {
            reply.clone()
        }
    }

    fn finish(&mut self, reply: Reply, relayed: Relayed) -> Vec<Action> {
        self.phase = Phase::Done;
        let delivered = relayed.error.is_none();
        let result = if delivered && reply.is_success() {
            TransferResult::Ok
        } else {
            TransferResult::Failed
        };
        let reply = match &relayed.error {
            None => reply,
            // The data connections never became usable (a TLS handshake
            // failed after the 1xx): the gateway's reason, not the
            // server's view of a connection that broke.
            Some(RelayError::Setup(reason)) => {
                Reply::new(425, &format!("Can't open data connection: {reason}"))
            }
            Some(_) => self.undelivered(&reply),
        };
        let failure = relayed.error.clone().map(Failure::Relay);
        let mut outcome = self.outcome(result, failure);
        outcome.bytes = relayed.bytes;
        outcome.method = relayed.method;
        vec![Action::Reply(reply), Action::Finish(outcome)]
    }

    fn server_timeout(&mut self) -> Vec<Action> {
        self.phase = Phase::Done;
        let reply = match self.relayed.take() {
            Some(relayed) if relayed.error.is_none() => Reply::new(
                451,
                "Transfer ended but the server did not confirm it in time",
            ),
            _ => Reply::new(
                425,
                &format!(
                    "Can't open data connection: the server did not answer {} in time",
                    self.plan.command.verb.as_str()
                ),
            ),
        };
        vec![
            Action::Cut,
            Action::Reply(reply),
            Action::Finish(self.outcome(TransferResult::Failed, Some(Failure::ServerTimeout))),
        ]
    }

    fn abort(&mut self) -> Vec<Action> {
        match self.phase {
            Phase::Listening | Phase::Setup | Phase::ServerConnecting => {
                // The server has not seen the transfer command: nothing to
                // abort there. ABOR is relayed as any other command.
                self.phase = Phase::Done;
                vec![
                    Action::Cut,
                    Action::Finish(self.outcome(TransferResult::Aborted, None)),
                ]
            }
            Phase::Commanded | Phase::Connecting | Phase::Relaying => {
                self.phase = Phase::Aborting;
                let mut actions = vec![Action::SendAbort, Action::Cut];
                if let Some(reply) = self.held.take() {
                    // The server had finished; the client never got all
                    // the data.
                    self.command_done = true;
                    actions.push(Action::Reply(self.undelivered(&reply)));
                }
                actions
            }
            Phase::Aborting | Phase::Done => Vec::new(),
        }
    }

    fn on_aborting(&mut self, event: Event<'_>) -> Vec<Action> {
        match event {
            Event::Reply(Step::Command, reply) => {
                if reply.is_preliminary() || self.command_done {
                    return Vec::new();
                }
                self.command_done = true;
                self.server_code = Some(reply.code);
                // Only a client that saw the transfer start expects its
                // final reply; the data was cut, so it was not delivered
                // unless the relay had already finished.
                if !self.client_saw_start {
                    return Vec::new();
                }
                let delivered = self.relayed.as_ref().is_some_and(|r| r.error.is_none());
                let reply = if delivered {
                    reply.clone()
                } else {
                    self.undelivered(reply)
                };
                vec![Action::Reply(reply)]
            }
            Event::Reply(Step::Abort, reply) => {
                if reply.is_preliminary() {
                    return Vec::new();
                }
                self.phase = Phase::Done;
                vec![
                    Action::Reply(reply.clone()),
                    Action::Finish(self.outcome(TransferResult::Aborted, None)),
                ]
            }
            Event::Deadline if self.command_done => {
                // One reply where two were due: the gateway moves on. The
                // client got the one reply if it saw the transfer start;
                // else it gets the gateway's own.
                self.phase = Phase::Done;
                let mut actions = Vec::new();
                if !self.client_saw_start {
                    actions.push(Action::Reply(Reply::new(226, "ABOR command successful")));
                }
                actions.push(Action::Finish(self.outcome(TransferResult::Aborted, None)));
                actions
            }
            Event::Deadline => {
                self.phase = Phase::Done;
                let mut outcome = self.outcome(TransferResult::Aborted, None);
                outcome.failure = Some(Failure::ServerTimeout);
                vec![
                    Action::Reply(Reply::new(
                        426,
                        "Transfer aborted; the server did not answer ABOR in time",
                    )),
                    Action::Finish(outcome),
                ]
            }
            _ => Vec::new(),
        }
    }

    fn outcome(&self, result: TransferResult, failure: Option<Failure>) -> Outcome {
        Outcome {
            result,
            bytes: self.relayed.as_ref().map_or(0, |r| r.bytes),
            method: self.relayed.as_ref().and_then(|r| r.method),
            server_code: self.server_code,
            started: self.client_saw_start,
            failure,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::RelayError;
    use std::net::SocketAddrV4;
    use std::sync::Arc;
    use std::time::Duration;

    const SERVER: &str = "198.51.100.7";

    fn pasv_reply(addr: SocketAddrV4) -> Reply {
        Reply::new(227, &address::format_pasv_reply(addr))
    }

    fn plan(line: &str, server_passive: bool) -> Plan {
        Plan {
            command: Command::parse(line.as_bytes()).unwrap(),
            server_passive,
            server_ip: SERVER.parse().unwrap(),
            server_passive_policy: ServerPassivePolicy::Strict,
        }
    }

    fn r(code: u16) -> Reply {
        Reply::new(code, "text")
    }

    fn ok(bytes: u64) -> Relayed {
        Relayed {
            bytes,
            method: Some(Method::Splice),
            error: None,
        }
    }

    fn broken(bytes: u64) -> Relayed {
        Relayed {
            bytes,
            method: None,
            error: Some(RelayError::Idle(Duration::from_secs(1))),
        }
    }

    /// A compact view of actions for assertions.
    fn show(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                Action::Send(c, step) => format!("send {} {step:?}", c.verb.as_str()),
                Action::SendAbort => "send ABOR".to_owned(),
                Action::Listen => "listen".to_owned(),
                Action::Connect(addr) => format!("connect {addr}"),
                Action::ConsumeArrangement => "consume".to_owned(),
                Action::OpenLegs => "open legs".to_owned(),
                Action::Relay => "relay".to_owned(),
                Action::Cut => "cut".to_owned(),
                Action::Reply(reply) => format!("reply {}", reply.code),
                Action::Finish(o) => format!("finish {}", o.result.label()),
            })
            .collect()
    }

    /// A passive transfer up to the relay running.
    fn relaying(line: &str) -> Transfer {
        let (mut t, actions) = Transfer::start(plan(line, true));
        assert_eq!(show(&actions), ["send PASV Setup"]);
        let actions = t.on(Event::Reply(
            Step::Setup,
            &pasv_reply(SocketAddrV4::new(SERVER.parse().unwrap(), 40001)),
        ));
        assert_eq!(show(&actions), [format!("connect {SERVER}:40001")]);
        assert_eq!(show(&t.on(Event::ServerConnected)), ["send RETR Command"]);
        assert_eq!(t.wait(), Some(Wait::Reply));
        assert_eq!(
            show(&t.on(Event::Reply(Step::Command, &r(150)))),
            ["consume", "open legs"]
        );
        assert_eq!(t.wait(), None);
        assert_eq!(show(&t.on(Event::LegsReady)), ["reply 150", "relay"]);
        t
    }

    fn finish_of(actions: Vec<Action>) -> Outcome {
        actions
            .into_iter()
            .find_map(|a| match a {
                Action::Finish(o) => Some(o),
                _ => None,
            })
            .expect("a finish")
    }

    #[test]
    fn final_reply_after_the_last_byte() {
        let mut t = relaying("RETR f");
        assert!(show(&t.on(Event::RelayEnded(ok(42)))).is_empty());
        assert_eq!(
            t.wait(),
            Some(Wait::Reply),
            "the final reply must come in time"
        );
        let actions = t.on(Event::Reply(Step::Command, &r(226)));
        assert_eq!(show(&actions), ["reply 226", "finish ok"]);
        assert_eq!(finish_of(actions).bytes, 42);
        assert!(t.is_done());
    }

    #[test]
    fn final_reply_before_the_last_byte_is_held() {
        let mut t = relaying("RETR f");
        assert!(show(&t.on(Event::Reply(Step::Command, &r(226)))).is_empty());
        assert!(t.holds_replies());
        assert_eq!(t.wait(), None, "the relay's own watchdog bounds the data");
        assert_eq!(
            show(&t.on(Event::RelayEnded(ok(7)))),
            ["reply 226", "finish ok"]
        );
        assert!(!t.holds_replies());
    }

    #[test]
    fn extra_preliminary_replies_are_relayed_in_order() {
        let (mut t, _) = Transfer::start(plan("RETR f", false));
        assert_eq!(
            show(&t.on(Event::Listening("192.0.2.1:45000".parse().unwrap()))),
            ["send PORT Setup"]
        );
        assert_eq!(
            show(&t.on(Event::Reply(Step::Setup, &r(200)))),
            ["send RETR Command"]
        );
        t.on(Event::Reply(Step::Command, &r(125)));
        assert!(show(&t.on(Event::Reply(Step::Command, &r(150)))).is_empty());
        assert_eq!(
            show(&t.on(Event::LegsReady)),
            ["reply 125", "reply 150", "relay"]
        );
        assert_eq!(
            show(&t.on(Event::Reply(Step::Command, &r(110)))),
            ["reply 110"]
        );
    }

    #[test]
    fn a_refused_command_keeps_the_arrangement() {
        let (mut t, _) = Transfer::start(plan("RETR nope", false));
        t.on(Event::Listening("192.0.2.1:45000".parse().unwrap()));
        t.on(Event::Reply(Step::Setup, &r(200)));
        let actions = t.on(Event::Reply(Step::Command, &r(550)));
        assert_eq!(show(&actions), ["reply 550", "finish failed"]);
        assert!(
            !finish_of(actions).started,
            "no consume: the arrangement stays"
        );
    }

    #[test]
    fn preliminary_then_data_setup_failure_answers_425() {
        let (mut t, _) = Transfer::start(plan("RETR f", false));
        t.on(Event::Listening("192.0.2.1:45000".parse().unwrap()));
        t.on(Event::Reply(Step::Setup, &r(200)));
        t.on(Event::Reply(Step::Command, &r(150)));
        let error = DataFailure::AcceptTimeout {
            expected: SERVER.parse().unwrap(),
            timeout: Duration::from_secs(1),
        }
        .on(Side::Server);
        let actions = t.on(Event::DataFailed(error));
        assert_eq!(show(&actions), ["cut", "reply 425", "finish failed"]);
        match &actions[1] {
            Action::Reply(reply) => {
                let text = String::from_utf8_lossy(reply.text()).into_owned();
                assert!(text.contains("server data connection"), "{text}");
            }
            _ => unreachable!(),
        }
        // A late final reply is no longer the transfer's business (the
        // ledger swallows it): nothing to do, nothing to wait for.
        assert!(t.is_done());
        assert!(t.on(Event::Reply(Step::Command, &r(425))).is_empty());
        assert_eq!(t.wait(), None);
    }

    #[test]
    fn server_final_reply_during_setup() {
        // The server gave up: relayed at once.
        let (mut t, _) = Transfer::start(plan("RETR f", false));
        t.on(Event::Listening("192.0.2.1:45000".parse().unwrap()));
        t.on(Event::Reply(Step::Setup, &r(200)));
        t.on(Event::Reply(Step::Command, &r(150)));
        assert_eq!(
            show(&t.on(Event::Reply(Step::Command, &r(425)))),
            ["cut", "reply 425", "finish failed"]
        );
        // The server is done (a small file sits in the socket): the 226
        // waits for the legs and the data.
        let (mut t, _) = Transfer::start(plan("RETR f", false));
        t.on(Event::Listening("192.0.2.1:45000".parse().unwrap()));
        t.on(Event::Reply(Step::Setup, &r(200)));
        t.on(Event::Reply(Step::Command, &r(150)));
        assert!(t.on(Event::Reply(Step::Command, &r(226))).is_empty());
        assert_eq!(show(&t.on(Event::LegsReady)), ["reply 150", "relay"]);
        assert_eq!(
            show(&t.on(Event::RelayEnded(ok(1)))),
            ["reply 226", "finish ok"]
        );
        // If the legs fail after all, the held 226 is not passed on.
        let (mut t, _) = Transfer::start(plan("RETR f", false));
        t.on(Event::Listening("192.0.2.1:45000".parse().unwrap()));
        t.on(Event::Reply(Step::Setup, &r(200)));
        t.on(Event::Reply(Step::Command, &r(150)));
        t.on(Event::Reply(Step::Command, &r(226)));
        let error = DataFailure::AcceptTimeout {
            expected: "192.0.2.9".parse().unwrap(),
            timeout: Duration::from_secs(1),
        }
        .on(Side::Client);
        assert_eq!(
            show(&t.on(Event::DataFailed(error))),
            ["cut", "reply 425", "finish failed"]
        );
    }

    #[test]
    fn a_data_connection_that_never_became_ready_answers_425_with_the_reason() {
        let mut t = relaying("RETR f");
        t.on(Event::RelayEnded(Relayed {
            bytes: 0,
            method: None,
            error: Some(RelayError::Setup(Arc::new(std::io::Error::other(
                "TLS with the client failed",
            )))),
        }));
        let actions = t.on(Event::Reply(Step::Command, &r(426)));
        assert_eq!(show(&actions), ["reply 425", "finish failed"]);
    }

    #[test]
    fn relay_failure_after_226_answers_426() {
        let mut t = relaying("RETR f");
        t.on(Event::Reply(Step::Command, &r(226)));
        let actions = t.on(Event::RelayEnded(broken(3)));
        assert_eq!(show(&actions), ["reply 426", "finish failed"]);
        let outcome = finish_of(actions);
        assert_eq!(outcome.bytes, 3);
        assert!(matches!(outcome.failure, Some(Failure::Relay(_))));
        // And the other order.
        let mut t = relaying("RETR f");
        t.on(Event::RelayEnded(broken(3)));
        assert_eq!(
            show(&t.on(Event::Reply(Step::Command, &r(226)))),
            ["reply 426", "finish failed"]
        );
        // A server error stays what it was.
        let mut t = relaying("RETR f");
        t.on(Event::RelayEnded(broken(3)));
        assert_eq!(
            show(&t.on(Event::Reply(Step::Command, &r(451)))),
            ["reply 451", "finish failed"]
        );
    }

    #[test]
    fn abor_before_the_final_reply_with_two_replies() {
        let mut t = relaying("RETR f");
        assert_eq!(show(&t.on(Event::Abort)), ["send ABOR", "cut"]);
        assert_eq!(t.wait(), Some(Wait::Reply));
        assert_eq!(
            show(&t.on(Event::Reply(Step::Command, &r(426)))),
            ["reply 426"]
        );
        assert_eq!(t.wait(), Some(Wait::AbortGrace));
        assert_eq!(
            show(&t.on(Event::Reply(Step::Abort, &r(226)))),
            ["reply 226", "finish aborted"]
        );
    }

    #[test]
    fn abor_before_the_final_reply_when_the_server_had_finished() {
        // The server completed just before ABOR: 226 for the transfer,
        // 226 for ABOR; the client did not get all the data: 426.
        let mut t = relaying("RETR f");
        t.on(Event::Abort);
        assert_eq!(
            show(&t.on(Event::Reply(Step::Command, &r(226)))),
            ["reply 426"]
        );
        assert_eq!(
            show(&t.on(Event::Reply(Step::Abort, &r(226)))),
            ["reply 226", "finish aborted"]
        );
    }

    #[test]
    fn abor_after_the_final_reply() {
        let mut t = relaying("RETR f");
        t.on(Event::Reply(Step::Command, &r(226)));
        // The held 226 becomes 426 at once; ABOR gets its own reply.
        assert_eq!(show(&t.on(Event::Abort)), ["send ABOR", "cut", "reply 426"]);
        assert_eq!(t.wait(), Some(Wait::AbortGrace));
        assert_eq!(
            show(&t.on(Event::Reply(Step::Abort, &r(225)))),
            ["reply 225", "finish aborted"]
        );
    }

    #[test]
    fn abor_answered_with_one_reply_moves_on_after_the_grace() {
        let mut t = relaying("RETR f");
        t.on(Event::Abort);
        assert_eq!(
            show(&t.on(Event::Reply(Step::Command, &r(226)))),
            ["reply 426"]
        );
        assert_eq!(show(&t.on(Event::Deadline)), ["finish aborted"]);
    }

    #[test]
    fn abor_during_setup_answers_the_client_once() {
        // The client never saw the transfer start: it gets ABOR's reply only.
        let (mut t, _) = Transfer::start(plan("RETR f", false));
        t.on(Event::Listening("192.0.2.1:45000".parse().unwrap()));
        t.on(Event::Reply(Step::Setup, &r(200)));
        t.on(Event::Reply(Step::Command, &r(150)));
        assert_eq!(show(&t.on(Event::Abort)), ["send ABOR", "cut"]);
        assert!(show(&t.on(Event::Reply(Step::Command, &r(426)))).is_empty());
        assert_eq!(
            show(&t.on(Event::Reply(Step::Abort, &r(226)))),
            ["reply 226", "finish aborted"]
        );
        // One reply only: after the grace the gateway answers itself.
        let (mut t, _) = Transfer::start(plan("RETR f", false));
        t.on(Event::Listening("192.0.2.1:45000".parse().unwrap()));
        t.on(Event::Reply(Step::Setup, &r(200)));
        t.on(Event::Reply(Step::Command, &r(150)));
        t.on(Event::Abort);
        t.on(Event::Reply(Step::Command, &r(226)));
        assert_eq!(
            show(&t.on(Event::Deadline)),
            ["reply 226", "finish aborted"]
        );
        // Before the command reached the server, ABOR is the server's to
        // answer as any command.
        let (mut t, _) = Transfer::start(plan("RETR f", true));
        assert_eq!(show(&t.on(Event::Abort)), ["cut", "finish aborted"]);
    }

    #[test]
    fn late_replies_after_the_end_change_nothing() {
        let mut t = relaying("RETR f");
        t.on(Event::RelayEnded(ok(1)));
        t.on(Event::Reply(Step::Command, &r(226)));
        for event in [
            Event::Reply(Step::Command, &r(226)),
            Event::Reply(Step::Abort, &r(226)),
            Event::RelayEnded(ok(1)),
            Event::Deadline,
            Event::Abort,
        ] {
            assert!(t.on(event).is_empty());
        }
    }

    #[test]
    fn a_silent_server_gets_a_deadline_at_every_wait() {
        // No answer to PASV.
        let (mut t, _) = Transfer::start(plan("RETR f", true));
        assert_eq!(t.wait(), Some(Wait::Reply));
        assert_eq!(
            show(&t.on(Event::Deadline)),
            ["cut", "reply 425", "finish failed"]
        );
        // Data delivered, no final reply.
        let mut t = relaying("RETR f");
        t.on(Event::RelayEnded(ok(5)));
        assert_eq!(
            show(&t.on(Event::Deadline)),
            ["cut", "reply 451", "finish failed"]
        );
    }

    #[test]
    fn server_passive_replies_are_checked() {
        for (reply, want) in [
            (
                Reply::new(227, "Entering Passive Mode (8,8,8,8,156,64)"),
                "policy",
            ),
            (
                Reply::new(227, "Entering Passive Mode (198,51,100,7,0,21)"),
                "policy",
            ),
            (Reply::new(227, "garbage"), "server_reply"),
            (Reply::new(500, "no"), "server_reply"),
        ] {
            let (mut t, _) = Transfer::start(plan("LIST", true));
            let actions = t.on(Event::Reply(Step::Setup, &reply));
            let outcome = finish_of(actions);
            match outcome.failure {
                Some(Failure::Data(e)) => {
                    assert_eq!(e.kind.label(), want, "{reply:?}");
                    assert_eq!(e.side, Side::Server);
                }
                other => panic!("{other:?}"),
            }
        }
        // 229 names the server's own address.
        let (mut t, _) = Transfer::start(plan("LIST", true));
        assert_eq!(
            show(&t.on(Event::Reply(
                Step::Setup,
                &Reply::new(229, "Entering Extended Passive Mode (|||40002|)")
            ))),
            [format!("connect {SERVER}:40002")]
        );
    }

    #[test]
    fn client_leg_failure_is_the_clients() {
        let mut t = relaying_setup();
        let error = DataFailure::ConnectTimeout {
            target: "192.0.2.9:5000".parse().unwrap(),
            timeout: Duration::from_secs(1),
        }
        .on(Side::Client);
        let outcome = finish_of(t.on(Event::DataFailed(error)));
        match outcome.failure {
            Some(Failure::Data(e)) => assert_eq!(e.side, Side::Client),
            other => panic!("{other:?}"),
        }
    }

    fn relaying_setup() -> Transfer {
        let (mut t, _) = Transfer::start(plan("STOR f", true));
        t.on(Event::Reply(
            Step::Setup,
            &pasv_reply(SocketAddrV4::new(SERVER.parse().unwrap(), 40001)),
        ));
        t.on(Event::ServerConnected);
        t.on(Event::Reply(Step::Command, &r(150)));
        assert_eq!(t.kind(), TransferKind::Upload);
        t
    }

    proptest::proptest! {
        /// Whatever happens in whatever order, the client never gets a
        /// success reply for data that was not delivered, gets at most one
        /// final reply per transfer (two after ABOR), and the transfer
        /// ends once.
        #[test]
        fn no_success_without_delivery(events in proptest::collection::vec(0u8..12, 0..24)) {
            let mut t = relaying("RETR f");
            let mut finals = 0;
            let mut finished = 0;
            let mut delivered = false;
            let mut aborted = false;
            for e in events {
                let reply_150 = r(150);
                let reply_226 = r(226);
                let reply_426 = r(426);
                let event = match e {
                    0 => Event::Reply(Step::Command, &reply_226),
                    1 => Event::Reply(Step::Command, &reply_426),
                    2 => Event::Reply(Step::Command, &reply_150),
                    3 => { delivered = true; Event::RelayEnded(ok(1)) }
                    4 => Event::RelayEnded(broken(1)),
                    5 => { aborted = true; Event::Abort }
                    6 => Event::Reply(Step::Abort, &reply_226),
                    7 => Event::Deadline,
                    8 => Event::LegsReady,
                    9 => Event::ServerConnected,
                    10 => Event::Reply(Step::Setup, &reply_226),
                    _ => Event::Listening("192.0.2.1:45000".parse().unwrap()),
                };
                let was_done = t.is_done();
                for action in t.on(event) {
                    proptest::prop_assert!(!was_done, "actions after the end");
                    match action {
                        Action::Reply(reply) if !reply.is_preliminary() => {
                            finals += 1;
                            if reply.is_success() && !aborted {
                                proptest::prop_assert!(delivered, "success without delivery");
                            }
                        }
                        Action::Finish(_) => finished += 1,
                        _ => {}
                    }
                }
            }
            proptest::prop_assert!(finished <= 1);
            let allowed = if aborted { 2 } else { 1 };
            proptest::prop_assert!(finals <= allowed);
        }
    }
}
