//! The `FEAT` reply (RFC 2389) as the gateway passes it on: features the
//! gateway cannot carry are removed, the extended data commands it always
//! implements itself (RFC 2428) are announced.

use super::reply::Reply;

/// Features that need the gateway to take part in a TLS handshake or a
/// command it does not relay; they are not offered to the client.
const UNSUPPORTED: &[&[u8]] = &[
    b"AUTH", b"PBSZ", b"PROT", b"CCC", b"LPRT", b"LPSV", b"ADAT", b"MIC", b"CONF", b"ENC",
];

/// Features the gateway implements whatever the server does.
const ALWAYS: &[&[u8]] = &[b"EPRT", b"EPSV"];

fn feature_name(line: &[u8]) -> &[u8] {
    let line = line.trim_ascii_start();
    let end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    line.get(..end).unwrap_or_default()
}

/// Rewrites a successful multi-line `211` answer to `FEAT`; other replies
/// are returned unchanged.
pub fn rewrite_feat(reply: Reply) -> Reply {
    if reply.code != 211 || reply.lines.len() < 2 {
        return reply;
    }
    let Reply { code, mut lines } = reply;
    let Some(last) = lines.pop() else {
        return Reply { code, lines };
    };
    let (first, features) = lines
        .split_first()
        .map_or((Vec::new(), &[][..]), |(f, rest)| (f.clone(), rest));
    let mut out = vec![first];
    out.extend(
        features
            .iter()
            .filter(|line| {
                !UNSUPPORTED
                    .iter()
                    .any(|u| feature_name(line).eq_ignore_ascii_case(u))
            })
            .cloned(),
    );
    for feature in ALWAYS {
        if !features
            .iter()
            .any(|line| feature_name(line).eq_ignore_ascii_case(feature))
        {
            out.push([b" ".as_slice(), feature].concat());
        }
    }
    out.push(last);
    Reply { code, lines: out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_tls_and_adds_extended_commands() {
        let reply = Reply::multiline(
            211,
            &[
                "Features:",
                "AUTH TLS",
                "PBSZ",
                "prot",
                "SIZE",
                "MDTM",
                "End",
            ],
        );
        let out = rewrite_feat(reply);
        let text: Vec<String> = out
            .lines
            .iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        assert_eq!(
            text,
            vec![
                "211-Features:",
                " SIZE",
                " MDTM",
                " EPRT",
                " EPSV",
                "211 End"
            ]
        );
    }

    #[test]
    fn leaves_other_replies_alone() {
        let reply = Reply::new(211, "no features");
        assert_eq!(rewrite_feat(reply.clone()), reply);
        let reply = Reply::new(500, "unknown");
        assert_eq!(rewrite_feat(reply.clone()), reply);
    }
}
