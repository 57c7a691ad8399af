//! Framing of the command channel on ttyS1 (the guest side is `guest/loop`).
//!
//! host → guest: `TB-CMD <id> <base64 command>\n`;
//! guest → host: `TB-READY <hostname>\n` once, then
//! `TB-RESULT <id> <status> <base64 stdout> <base64 stderr>\n` per command.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

/// The guest's readiness marker.
pub(crate) const READY: &str = "TB-READY";

/// Encodes one command request.
pub(crate) fn request(id: u64, cmd: &str) -> String {
    format!("TB-CMD {id} {}\n", B64.encode(cmd))
}

/// One parsed result line.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Reply {
    pub id: u64,
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Parses a `TB-RESULT` line; `None` for other lines, `Some(Err)` for a
/// malformed result.
pub(crate) fn parse_result(line: &str) -> Option<Result<Reply, String>> {
    let line = line.trim_end_matches(['\r', '\n']);
    let rest = line.strip_prefix("TB-RESULT ")?;
    let f: Vec<&str> = rest.split(' ').collect();
    if f.len() != 4 {
        return Some(Err(format!(
            "result line with {} fields: {line:?}",
            f.len() + 1
        )));
    }
    let dec = |s: &str, what: &str| {
        B64.decode(s)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .map_err(|e| format!("bad base64 in {what}: {e}"))
    };
    Some((|| {
        Ok(Reply {
            id: f[0].parse().map_err(|_| format!("bad id in {line:?}"))?,
            status: f[1]
                .parse()
                .map_err(|_| format!("bad status in {line:?}"))?,
            stdout: dec(f[2], "stdout")?,
            stderr: dec(f[3], "stderr")?,
        })
    })())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        assert_eq!(request(7, "echo 'a b'\n"), "TB-CMD 7 ZWNobyAnYSBiJwo=\n");
        let r = parse_result("TB-RESULT 7 3 aGkK \r\n").unwrap().unwrap();
        assert_eq!(
            r,
            Reply {
                id: 7,
                status: 3,
                stdout: "hi\n".into(),
                stderr: String::new()
            }
        );
        assert!(parse_result("random console noise").is_none());
        assert!(parse_result("TB-RESULT 7 0 x").unwrap().is_err());
        assert!(parse_result("TB-RESULT 7 0 !!! ").unwrap().is_err());
    }
}
