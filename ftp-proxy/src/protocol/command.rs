//! Client commands: framing of the client's control stream and parsing of
//! command lines.
//!
//! Framing follows RFC 959 §4.1.3 (Telnet NVT): a command ends at LF (a CR
//! before it is dropped), Telnet IAC sequences are removed (`IAC IAC` is a
//! literal 0xFF byte), lines longer than the bound are reported once and
//! skipped. A line that still holds a CR or NUL after that is refused: it
//! cannot be forwarded without letting the client inject a second command.
//!
//! Parsing is lenient where that is safe (verbs in any case, leading spaces)
//! and strict where ambiguity could reach the server.

use std::fmt;

use bytes::{Buf, BytesMut};
use tokio_util::codec::Decoder;

/// Default bound on a command line, CRLF included (vsftpd uses the same).
pub const DEFAULT_MAX_LINE: usize = 4096;

/// Why a client line could not be turned into a [`Command`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The line exceeded the configured bound; the rest of it is skipped.
    #[error("command line longer than {max} bytes")]
    TooLong {
        /// The bound in force.
        max: usize,
    },
    /// The line was empty (or only spaces).
    #[error("empty command line")]
    Empty,
    /// The verb is not 1 to 4 ASCII letters.
    #[error("command verb is not 1 to 4 letters")]
    BadVerb,
    /// The line holds a CR or NUL byte other than the line end.
    #[error("command line holds a CR or NUL byte")]
    ControlByte,
    /// The line is a PROXY protocol v1 header (`PROXY TCP4 …`), which only
    /// a trusted load balancer may send, before anything else.
    #[error("a PROXY protocol header")]
    ProxyHeader,
}

impl CommandError {
    /// The FTP reply code this error earns (RFC 959 §4.2).
    pub fn reply_code(&self) -> u16 {
        match self {
            CommandError::TooLong { .. }
            | CommandError::Empty
            | CommandError::BadVerb
            | CommandError::ProxyHeader => 500,
            CommandError::ControlByte => 501,
        }
    }
}

macro_rules! verbs {
    ($($variant:ident => $text:literal),* $(,)?) => {
        /// A command verb. Known verbs are variants; anything else that is a
        /// well-formed verb is [`Verb::Other`] and is forwarded untouched.
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum Verb {
            $(
                #[doc = concat!("`", $text, "`")]
                $variant,
            )*
            /// Any other verb of 1 to 4 letters, upper-cased.
            Other(String),
        }

        impl Verb {
            /// Parses an upper-cased verb.
            fn from_upper(verb: &str) -> Verb {
                match verb {
                    $($text => Verb::$variant,)*
                    other => Verb::Other(other.to_owned()),
                }
            }

            /// The verb as sent on the wire (upper case).
            pub fn as_str(&self) -> &str {
                match self {
                    $(Verb::$variant => $text,)*
                    Verb::Other(text) => text,
                }
            }

            /// A label from a bounded set: the verb for known verbs, `other`
            /// for the rest. Safe to use as a metric label.
            pub fn label(&self) -> &'static str {
                match self {
                    $(Verb::$variant => $text,)*
                    Verb::Other(_) => "OTHER",
                }
            }
        }
    };
}

verbs! {
    User => "USER", Pass => "PASS", Acct => "ACCT", Cwd => "CWD", Cdup => "CDUP",
    Smnt => "SMNT", Rein => "REIN", Quit => "QUIT", Port => "PORT", Pasv => "PASV",
    Eprt => "EPRT", Epsv => "EPSV", Lprt => "LPRT", Lpsv => "LPSV", Type => "TYPE",
    Stru => "STRU", Mode => "MODE", Retr => "RETR", Stor => "STOR", Stou => "STOU",
    Appe => "APPE", Allo => "ALLO", Rest => "REST", Rnfr => "RNFR", Rnto => "RNTO",
    Abor => "ABOR", Dele => "DELE", Rmd => "RMD", Mkd => "MKD", Pwd => "PWD",
    List => "LIST", Nlst => "NLST", Mlsd => "MLSD", Mlst => "MLST", Site => "SITE",
    Syst => "SYST", Stat => "STAT", Help => "HELP", Noop => "NOOP", Feat => "FEAT",
    Opts => "OPTS", Size => "SIZE", Mdtm => "MDTM", Auth => "AUTH", Pbsz => "PBSZ",
    Prot => "PROT", Ccc => "CCC", Adat => "ADAT", Mic => "MIC", Conf => "CONF",
    Enc => "ENC",
}

impl Verb {
    /// Whether the command opens a data connection (RFC 959 §4.1.3, RFC 3659 §7).
    pub fn is_transfer(&self) -> bool {
        matches!(
            self,
            Verb::List
                | Verb::Nlst
                | Verb::Mlsd
                | Verb::Retr
                | Verb::Stor
                | Verb::Stou
                | Verb::Appe
        )
    }

    /// Whether the data flows from the client to the server.
    pub fn is_upload(&self) -> bool {
        matches!(self, Verb::Stor | Verb::Stou | Verb::Appe)
    }
}

/// One parsed client command.
#[derive(Clone, PartialEq, Eq)]
pub struct Command {
    /// The verb, upper-cased.
    pub verb: Verb,
    /// The argument as sent (after the single space that follows the verb);
    /// empty when there is none. Not necessarily UTF-8 (path names).
    pub arg: Vec<u8>,
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Command");
        s.field("verb", &self.verb.as_str());
        if self.verb == Verb::Pass {
            s.field("arg", &"<redacted>");
        } else {
            s.field("arg", &String::from_utf8_lossy(&self.arg));
        }
        s.finish()
    }
}

impl Command {
    /// Builds a command from a verb and an argument.
    pub fn new(verb: Verb, arg: impl Into<Vec<u8>>) -> Command {
        Command {
            verb,
            arg: arg.into(),
        }
    }

    /// Parses one command line (line end already removed).
    ///
    /// # Errors
    /// [`CommandError`] when the line is empty, holds a CR or NUL, or the
    /// verb is not 1 to 4 letters.
    pub fn parse(line: &[u8]) -> Result<Command, CommandError> {
        if line.iter().any(|&b| b == b'\r' || b == 0) {
            return Err(CommandError::ControlByte);
        }
        let start = line
            .iter()
            .position(|&b| b != b' ')
            .ok_or(CommandError::Empty)?;
        let line = line.get(start..).unwrap_or_default();
        let (verb, arg) = match line.iter().position(|&b| b == b' ') {
            Some(space) => (
                line.get(..space).unwrap_or_default(),
                line.get(space + 1..).unwrap_or_default(),
            ),
            None => (line, &[][..]),
        };
        if verb == b"PROXY" && start == 0 {
            return Err(CommandError::ProxyHeader);
        }
        if verb.is_empty() || verb.len() > 4 || !verb.iter().all(u8::is_ascii_alphabetic) {
            return Err(CommandError::BadVerb);
        }
        let verb = String::from_utf8_lossy(verb).to_ascii_uppercase();
        Ok(Command {
            verb: Verb::from_upper(&verb),
            arg: arg.to_vec(),
        })
    }

    /// The argument with surrounding spaces removed (for commands whose
    /// argument is a token, such as `PORT` or `EPSV`).
    pub fn trimmed_arg(&self) -> &[u8] {
        self.arg.trim_ascii()
    }

    /// The command as a wire line, CRLF included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.verb.as_str().len() + self.arg.len() + 3);
        out.extend_from_slice(self.verb.as_str().as_bytes());
        if !self.arg.is_empty() {
            out.push(b' ');
            out.extend_from_slice(&self.arg);
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

// Telnet bytes (RFC 854).
const IAC: u8 = 255;
const SB: u8 = 250;
const SE: u8 = 240;
const WILL: u8 = 251;
const DONT: u8 = 254;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Telnet {
    Data,
    Iac,
    Option,
    Subnegotiation,
    SubnegotiationIac,
}

/// Decoder of the client's control stream into commands.
///
/// Each item is one command line, parsed or refused; an item never ends the
/// stream, so the session can answer and carry on. Memory is bounded by the
/// line bound whatever the client sends.
#[derive(Debug)]
pub struct CommandCodec {
    max_line: usize,
    line: Vec<u8>,
    telnet: Telnet,
    overflowed: bool,
}

impl CommandCodec {
    /// A decoder that refuses lines longer than `max_line` bytes.
    pub fn new(max_line: usize) -> CommandCodec {
        CommandCodec {
            max_line: max_line.max(8),
            line: Vec::new(),
            telnet: Telnet::Data,
            overflowed: false,
        }
    }

    fn push(&mut self, byte: u8) -> Option<Result<Command, CommandError>> {
        if self.overflowed {
            return None;
        }
        // The bound counts the CRLF, as a server would.
        if self.line.len() + 2 >= self.max_line {
            self.overflowed = true;
            self.line.clear();
            return Some(Err(CommandError::TooLong { max: self.max_line }));
        }
        self.line.push(byte);
        None
    }

    fn end_of_line(&mut self) -> Option<Result<Command, CommandError>> {
        if std::mem::take(&mut self.overflowed) {
            self.line.clear();
            return None;
        }
        let mut line = std::mem::take(&mut self.line);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Some(Command::parse(&line))
    }
}

impl Decoder for CommandCodec {
    type Item = Result<Command, CommandError>;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        let mut consumed = 0;
        let mut item = None;
        for &byte in src.iter() {
            consumed += 1;
            match self.telnet {
                Telnet::Data if byte == IAC => self.telnet = Telnet::Iac,
                Telnet::Data if byte == b'\n' => item = self.end_of_line(),
                // A Telnet command byte (SE to DONT) at the start of a line
                // without its IAC: some clients send the "interrupt
                // process" or the "data mark" before ABOR as urgent data
                // that way (RFC 959 §4.1.3 asks for IAC IP and IAC DM). No
                // verb begins with such a byte: drop it.
                Telnet::Data if self.line.is_empty() && (SE..=DONT).contains(&byte) => {}
                Telnet::Data => item = self.push(byte),
                Telnet::Iac => {
                    self.telnet = match byte {
                        IAC => {
                            item = self.push(IAC);
                            Telnet::Data
                        }
                        WILL..=DONT => Telnet::Option,
                        SB => Telnet::Subnegotiation,
                        // IP, DM, AO, AYT, NOP...: two-byte commands, dropped.
                        _ => Telnet::Data,
                    }
                }
                Telnet::Option => self.telnet = Telnet::Data,
                Telnet::Subnegotiation if byte == IAC => self.telnet = Telnet::SubnegotiationIac,
                Telnet::Subnegotiation => {}
                Telnet::SubnegotiationIac => {
                    self.telnet = if byte == SE {
                        Telnet::Data
                    } else {
                        Telnet::Subnegotiation
                    }
                }
            }
            if item.is_some() {
                break;
            }
        }
        src.advance(consumed);
        Ok(item)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        // A last line without its end is dropped: the client is gone and a
        // half-sent command must not be executed.
        let item = self.decode(src)?;
        if item.is_none() {
            src.clear();
            self.line.clear();
        }
        Ok(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], max: usize) -> Vec<Result<Command, CommandError>> {
        let mut codec = CommandCodec::new(max);
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(item) = codec.decode(&mut buf).unwrap() {
            out.push(item);
        }
        out
    }

    fn one(line: &[u8]) -> Command {
        Command::parse(line).unwrap()
    }

    #[test]
    fn verbs_in_any_case() {
        assert_eq!(one(b"retr file").verb, Verb::Retr);
        assert_eq!(one(b"ReTr file").verb, Verb::Retr);
        assert_eq!(one(b"xpwd").verb, Verb::Other("XPWD".into()));
        assert_eq!(one(b"xpwd").verb.label(), "OTHER");
    }

    #[test]
    fn argument_keeps_inner_and_trailing_spaces() {
        let c = one(b"RETR  two  spaces ");
        assert_eq!(c.arg, b" two  spaces ");
        assert_eq!(c.to_line(), b"RETR  two  spaces \r\n");
    }

    #[test]
    fn leading_spaces_are_tolerated() {
        assert_eq!(one(b"  NOOP").verb, Verb::Noop);
    }

    #[test]
    fn bad_lines() {
        assert_eq!(Command::parse(b""), Err(CommandError::Empty));
        assert_eq!(Command::parse(b"   "), Err(CommandError::Empty));
        assert_eq!(Command::parse(b"RETRX a"), Err(CommandError::BadVerb));
        assert_eq!(Command::parse(b"R3TR a"), Err(CommandError::BadVerb));
        assert_eq!(
            Command::parse(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2"),
            Err(CommandError::ProxyHeader)
        );
        assert_eq!(Command::parse(b"proxy x"), Err(CommandError::BadVerb));
        assert_eq!(
            Command::parse(b"RETR a\rDELE b"),
            Err(CommandError::ControlByte)
        );
        assert_eq!(Command::parse(b"RETR a\0b"), Err(CommandError::ControlByte));
    }

    #[test]
    fn crlf_and_lf_both_end_lines() {
        let items = decode_all(b"USER a\r\nPASS b\nNOOP\r\n", 100);
        let verbs: Vec<_> = items.into_iter().map(|i| i.unwrap().verb).collect();
        assert_eq!(verbs, vec![Verb::User, Verb::Pass, Verb::Noop]);
    }

    #[test]
    fn bare_cr_and_cr_nul_are_refused() {
        let items = decode_all(b"RETR a\rb\r\nRETR a\r\0b\r\nNOOP\r\n", 100);
        assert_eq!(items[0], Err(CommandError::ControlByte));
        assert_eq!(items[1], Err(CommandError::ControlByte));
        assert_eq!(items[2].as_ref().unwrap().verb, Verb::Noop);
    }

    #[test]
    fn missing_end_of_line_is_incomplete_then_dropped_at_eof() {
        let mut codec = CommandCodec::new(100);
        let mut buf = BytesMut::from(&b"DELE important"[..]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(codec.decode_eof(&mut buf).unwrap().is_none());
    }

    #[test]
    fn telnet_sequences_are_removed() {
        // IAC IP IAC DM before ABOR (RFC 959 §4.1.3), an option negotiation,
        // a subnegotiation and an escaped 0xFF in a path.
        let input = b"\xff\xf4\xff\xf2ABOR\r\n\xff\xfb\x01NOOP\r\n\xff\xfa\x18\x01\xff\xf0RETR a\xff\xffb\r\n";
        let items = decode_all(input, 100);
        assert_eq!(items[0].as_ref().unwrap().verb, Verb::Abor);
        assert_eq!(items[1].as_ref().unwrap().verb, Verb::Noop);
        assert_eq!(items[2].as_ref().unwrap().arg, b"a\xffb");
    }

    /// Some clients send the interrupt process (or the data mark) before
    /// ABOR as urgent data without its IAC.
    #[test]
    fn a_telnet_command_byte_without_iac_before_a_verb_is_dropped() {
        for input in [
            &b"\xf4ABOR\r\n"[..],
            b"\xf2ABOR\r\n",
            b"\xf4\xff\xf2ABOR\r\n",
        ] {
            let items = decode_all(input, 100);
            assert_eq!(items[0].as_ref().unwrap().verb, Verb::Abor, "{input:?}");
        }
        // Inside an argument such bytes are data (non-UTF-8 paths).
        let items = decode_all(b"RETR \xf4x\r\n", 100);
        assert_eq!(items[0].as_ref().unwrap().arg, b"\xf4x");
    }

    #[test]
    fn telnet_sequence_split_across_reads() {
        let mut codec = CommandCodec::new(100);
        let mut buf = BytesMut::from(&b"\xff"[..]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(b"\xf4AB");
        assert!(codec.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(b"OR\r\n");
        assert_eq!(
            codec.decode(&mut buf).unwrap().unwrap().unwrap().verb,
            Verb::Abor
        );
    }

    #[test]
    fn overlong_line_is_reported_once_and_skipped() {
        let mut input = b"RETR ".to_vec();
        input.extend(std::iter::repeat_n(b'a', 500));
        input.extend_from_slice(b"\r\nNOOP\r\n");
        let items = decode_all(&input, 64);
        assert_eq!(items.len(), 2);
        assert_eq!(items[0], Err(CommandError::TooLong { max: 64 }));
        assert_eq!(items[1].as_ref().unwrap().verb, Verb::Noop);
    }

    #[test]
    fn pipelined_commands_come_out_one_by_one() {
        let input: Vec<u8> = (0..10_000)
            .flat_map(|_| b"NOOP\r\n".iter().copied())
            .collect();
        let items = decode_all(&input, 64);
        assert_eq!(items.len(), 10_000);
    }

    #[test]
    fn pass_is_redacted_in_debug() {
        let c = one(b"PASS hunter2");
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    proptest::proptest! {
        #[test]
        fn decoder_never_panics_and_respects_bound(data: Vec<u8>, max in 8usize..200) {
            let mut codec = CommandCodec::new(max);
            let mut buf = BytesMut::from(&data[..]);
            while let Some(item) = codec.decode(&mut buf).unwrap() {
                if let Ok(cmd) = item {
                    proptest::prop_assert!(cmd.to_line().len() <= max + 1);
                }
            }
            proptest::prop_assert!(codec.line.len() < max);
        }

        #[test]
        fn parse_format_round_trip(verb in "[A-Za-z]{1,4}", arg in "[ -~]{0,40}") {
            let line = if arg.is_empty() { verb.clone() } else { format!("{verb} {arg}") };
            let cmd = Command::parse(line.as_bytes()).unwrap();
            let again = Command::parse(cmd.to_line().strip_suffix(b"\r\n").unwrap()).unwrap();
            proptest::prop_assert_eq!(cmd, again);
        }
    }
}
