//! Server replies: framing of the server's control stream into whole replies
//! (RFC 959 §4.2), single- and multi-line, with bounds on line length and
//! on the number of lines, and encoding of the replies the gateway makes.
//!
//! A server that breaks the bounds or sends a line that is not a reply is a
//! fatal error for the session: there is no way to resynchronise with it.

use bytes::{Buf, BytesMut};
use tokio_util::codec::Decoder;

/// Default bound on a reply line.
pub const DEFAULT_MAX_REPLY_LINE: usize = 8192;
/// Default bound on the lines of one reply (a `STAT` of a directory is the
/// longest legitimate one).
pub const DEFAULT_MAX_REPLY_LINES: usize = 100_000;

/// Why the server's control stream could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    /// A reply line exceeded the bound.
    #[error("reply line longer than {max} bytes")]
    LineTooLong {
        /// The bound in force.
        max: usize,
    },
    /// A multi-line reply exceeded the bound on its lines.
    #[error("reply longer than {max} lines")]
    TooManyLines {
        /// The bound in force.
        max: usize,
    },
    /// A reply did not start with a three-digit code from 100 to 599.
    #[error("invalid reply line {line:?}")]
    InvalidCode {
        /// The start of the offending line.
        line: String,
    },
    /// Reading the control connection failed.
    #[error("reading the control connection: {0}")]
    Io(#[from] std::io::Error),
}

/// One whole reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code (100 to 599).
    pub code: u16,
    /// The raw lines without their line ends; the first (and for a
    /// multi-line reply the last) begins with the code.
    pub lines: Vec<Vec<u8>>,
}

impl Reply {
    /// A single-line reply.
    pub fn new(code: u16, text: &str) -> Reply {
        Reply {
            code,
            lines: vec![format!("{code} {text}").into_bytes()],
        }
    }

    /// A multi-line reply from its text lines: the first and last carry the
    /// code; inner lines are indented by one space so none can look like an
    /// end.
    pub fn multiline(code: u16, texts: &[&str]) -> Reply {
        match texts {
            [] => Reply::new(code, ""),
            [only] => Reply::new(code, only),
            [first, inner @ .., last] => {
                let mut lines = vec![format!("{code}-{first}").into_bytes()];
                lines.extend(inner.iter().map(|t| format!(" {t}").into_bytes()));
                lines.push(format!("{code} {last}").into_bytes());
                Reply { code, lines }
            }
        }
    }

    /// 1xx: a preliminary reply; another one follows.
    pub fn is_preliminary(&self) -> bool {
        (100..200).contains(&self.code)
    }

    /// 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// The class digit (1 to 5).
    pub fn class(&self) -> u16 {
        self.code / 100
    }

    /// The text of the first line, after the code and its separator.
    pub fn text(&self) -> &[u8] {
        self.lines
            .first()
            .and_then(|l| l.get(4..))
            .unwrap_or_default()
    }

    /// The reply on the wire, every line ended by CRLF.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.lines.iter().map(|l| l.len() + 2).sum());
        for line in &self.lines {
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
        out
    }
}

/// Parses the code at the start of a line: three digits, 100 to 599.
fn code_of(line: &[u8]) -> Option<u16> {
    let digits = line.get(..3)?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let code = digits
        .iter()
        .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
    (100..600).contains(&code).then_some(code)
}

/// Decoder of the server's control stream into [`Reply`] values.
#[derive(Debug)]
pub struct ReplyCodec {
    max_line: usize,
    max_lines: usize,
    pending: Option<Reply>,
}

impl ReplyCodec {
    /// A decoder with the given bounds.
    pub fn new(max_line: usize, max_lines: usize) -> ReplyCodec {
        ReplyCodec {
            max_line,
            max_lines,
            pending: None,
        }
    }

    fn take_line(&mut self, line: Vec<u8>) -> Result<Option<Reply>, ReplyError> {
        match self.pending.as_mut() {
            None => {
                let code = code_of(&line).ok_or_else(|| ReplyError::InvalidCode {
                    line: String::from_utf8_lossy(
                        line.get(..line.len().min(40)).unwrap_or_default(),
                    )
                    .into_owned(),
                })?;
                let separator = line.get(3).copied();
                let reply = Reply {
                    code,
                    lines: vec![line],
                };
                match separator {
                    Some(b'-') => {
                        self.pending = Some(reply);
                        Ok(None)
                    }
                    // "123 text", or a bare "123". Anything else after the
                    // code is tolerated as text, as clients do.
                    _ => Ok(Some(reply)),
                }
            }
            Some(reply) => {
                let ends =
                    code_of(&line) == Some(reply.code) && matches!(line.get(3), None | Some(b' '));
                if reply.lines.len() >= self.max_lines {
                    return Err(ReplyError::TooManyLines {
                        max: self.max_lines,
                    });
                }
                reply.lines.push(line);
                Ok(if ends { self.pending.take() } else { None })
            }
        }
    }
}

impl Decoder for ReplyCodec {
    type Item = Reply;
    type Error = ReplyError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Reply>, ReplyError> {
        loop {
            let Some(end) = src.iter().position(|&b| b == b'\n') else {
                if src.len() > self.max_line {
                    return Err(ReplyError::LineTooLong { max: self.max_line });
                }
                return Ok(None);
            };
            if end > self.max_line {
                return Err(ReplyError::LineTooLong { max: self.max_line });
            }
            let mut line = src.split_to(end + 1).to_vec();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if let Some(reply) = self.take_line(line)? {
                return Ok(Some(reply));
            }
            if src.is_empty() {
                return Ok(None);
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Reply>, ReplyError> {
        let reply = self.decode(src)?;
        if reply.is_none() {
            src.advance(src.len());
        }
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> Result<Vec<Reply>, ReplyError> {
        let mut codec = ReplyCodec::new(200, 10);
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(r) = codec.decode(&mut buf)? {
            out.push(r);
        }
        Ok(out)
    }

    #[test]
    fn single_and_multi_line() {
        let replies =
            decode_all(b"220 hi\r\n211-Features:\r\n EPSV\r\n211-not the end\r\n 211 nor this\r\n2110 nor this\r\n211 End\r\n200\n")
                .unwrap();
        assert_eq!(replies.len(), 3);
        assert_eq!(replies[0].code, 220);
        assert_eq!(replies[0].text(), b"hi");
        assert_eq!(replies[1].lines.len(), 6);
        assert_eq!(replies[2].code, 200);
    }

    #[test]
    fn reply_split_across_reads() {
        let mut codec = ReplyCodec::new(200, 10);
        let mut buf = BytesMut::from(&b"150-a\r\n150"[..]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(b" b\r\n");
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap().lines.len(), 2);
    }

    #[test]
    fn invalid_codes_are_errors() {
        assert!(matches!(
            decode_all(b"hello\r\n"),
            Err(ReplyError::InvalidCode { .. })
        ));
        assert!(matches!(
            decode_all(b"099 x\r\n"),
            Err(ReplyError::InvalidCode { .. })
        ));
        assert!(matches!(
            decode_all(b"600 x\r\n"),
            Err(ReplyError::InvalidCode { .. })
        ));
        assert!(matches!(
            decode_all(b"2a0 x\r\n"),
            Err(ReplyError::InvalidCode { .. })
        ));
    }

    #[test]
    fn bounds() {
        let long = [b"220 ".as_slice(), &[b'a'; 300]].concat();
        assert!(matches!(
            decode_all(&long),
            Err(ReplyError::LineTooLong { .. })
        ));
        let endless: Vec<u8> = [b"211-start\r\n".as_slice()]
            .into_iter()
            .chain(std::iter::repeat_n(b" x\r\n".as_slice(), 20))
            .flatten()
            .copied()
            .collect();
        assert!(matches!(
            decode_all(&endless),
            Err(ReplyError::TooManyLines { .. })
        ));
    }

    #[test]
    fn multiline_builder_round_trips() {
        let reply = Reply::multiline(211, &["Features:", "EPSV", "End"]);
        let mut codec = ReplyCodec::new(200, 10);
        let mut buf = BytesMut::from(&reply.to_bytes()[..]);
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(reply));
    }

    proptest::proptest! {
        #[test]
        fn decoder_never_panics(data: Vec<u8>) {
            let mut codec = ReplyCodec::new(64, 8);
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(reply)) = codec.decode(&mut buf) {
                proptest::prop_assert!((100..600).contains(&reply.code));
                proptest::prop_assert!(reply.lines.len() <= 8);
            }
        }

        #[test]
        fn single_line_round_trip(code in 100u16..600, text in "[ -~]{0,50}") {
            let reply = Reply::new(code, &text);
            let mut codec = ReplyCodec::new(200, 10);
            let mut buf = BytesMut::from(&reply.to_bytes()[..]);
            proptest::prop_assert_eq!(codec.decode(&mut buf).unwrap(), Some(reply));
        }
    }
}
