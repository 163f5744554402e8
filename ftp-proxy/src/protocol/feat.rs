//! The `FEAT` reply (RFC 2389) as the gateway passes it on: the server's
//! security features are removed (TLS toward the client is the gateway's,
//! whatever the server offers), and what the gateway implements itself is
//! announced: the extended data commands (RFC 2428) always, `AUTH TLS`,
//! `PBSZ` and `PROT` (RFC 4217) when it offers TLS to clients.

use super::reply::Reply;

/// The server's features the gateway does not pass on: security (the
/// gateway's own, announced below when offered), and the long-address
/// commands it refuses.
const UNSUPPORTED: &[&[u8]] = &[
    b"AUTH", b"PBSZ", b"PROT", b"CCC", b"LPRT", b"LPSV", b"ADAT", b"MIC", b"CONF", b"ENC",
];

/// Features the gateway implements whatever the server does.
const ALWAYS: &[&[u8]] = &[b"EPRT", b"EPSV"];

/// Features announced when the gateway offers TLS to clients.
const TLS: &[&[u8]] = &[b"AUTH TLS", b"AUTH SSL", b"PBSZ", b"PROT"];

fn feature_name(line: &[u8]) -> &[u8] {
    let line = line.trim_ascii_start();
    let end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    line.get(..end).unwrap_or_default()
}

/// Rewrites a successful multi-line `211` answer to `FEAT`; other replies
/// are returned unchanged. `tls`: the gateway offers `AUTH TLS`.
pub fn rewrite_feat(reply: Reply, tls: bool) -> Reply {
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
    if tls {
        out.extend(
            TLS.iter()
                .map(|feature| [b" ".as_slice(), feature].concat()),
        );
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
        let out = rewrite_feat(reply.clone(), false);
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
        // With TLS offered, the gateway's own security features.
        let out = rewrite_feat(reply, true);
        let text: Vec<String> = out
            .lines
            .iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        assert_eq!(
            &text[3..],
            [
                " EPRT",
                " EPSV",
                " AUTH TLS",
                " AUTH SSL",
                " PBSZ",
                " PROT",
                "211 End"
            ]
        );
    }

    #[test]
    fn leaves_other_replies_alone() {
        let reply = Reply::new(211, "no features");
        assert_eq!(rewrite_feat(reply.clone(), true), reply);
        let reply = Reply::new(500, "unknown");
        assert_eq!(rewrite_feat(reply.clone(), true), reply);
    }
}
