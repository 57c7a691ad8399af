//! Offline policy validation (Cedar parse + strict validation against the
//! built-in schema, exactly as the appliance checks an upload) and the
//! rendering of diagnostics as `file:line:col` with a caret excerpt.

use std::fmt::Write as _;

use serde_json::{json, Value};
use trustbind_policy::check::{check_policy, PolicyDiagnostic};

use crate::error::{CliError, Exit, Result};

/// The result of validating one file.
#[derive(Debug)]
pub struct FileReport {
    /// The file as named on the command line.
    pub file: String,
    /// The policy text.
    pub text: String,
    /// `Ok(number of policies)` or the problems found.
    pub result: std::result::Result<usize, Vec<PolicyDiagnostic>>,
}

/// Validates one policy text.
pub fn check_text(file: &str, text: String) -> Result<FileReport> {
    let result = check_policy(&text).map_err(|e| CliError::new(Exit::Server, e.to_string()))?;
    Ok(FileReport {
        file: file.to_owned(),
        text,
        result,
    })
}

/// Renders one diagnostic: `error: FILE:L:C: message`, the source line with
/// a caret underline, and the help line when Cedar gives one.
pub fn render(file: &str, text: &str, d: &PolicyDiagnostic) -> String {
    let mut out = String::new();
    let pos = match (d.line, d.column) {
        (Some(l), Some(c)) => format!("{file}:{l}:{c}"),
        _ => file.to_owned(),
    };
    let _ = writeln!(
        out,
        "error: {pos}: {} ({})",
        first_line(&d.message),
        d.stage
    );
    if let (Some(l), Some(c)) = (d.line, d.column) {
        let idx = usize::try_from(l.saturating_sub(1)).unwrap_or(usize::MAX);
        if let Some(src) = text.lines().nth(idx) {
            let num = l.to_string();
            let pad = " ".repeat(num.len());
            let col = usize::try_from(c.saturating_sub(1)).unwrap_or(0);
            // The underline covers the span, clipped to this line.
            let span_chars = d
                .offset
                .zip(d.length)
                .and_then(|(o, n)| text.get(o..o.saturating_add(n)))
                .map_or(1, |s| s.lines().next().map_or(1, |f| f.chars().count()));
            let room = src.chars().count().saturating_sub(col).max(1);
            let width = span_chars.clamp(1, room);
            // Keep tabs so the caret lines up under them.
            let lead: String = src
                .chars()
                .take(col)
                .map(|ch| if ch == '\t' { '\t' } else { ' ' })
                .collect();
            let _ = writeln!(out, "{pad} |");
            let _ = writeln!(out, "{num} | {src}");
            let _ = writeln!(out, "{pad} | {lead}{}", "^".repeat(width));
        }
    }
    if let Some(h) = &d.help {
        let _ = writeln!(out, "  = help: {h}");
    }
    out
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// The JSON form of a report.
pub fn report_json(r: &FileReport) -> Value {
    match &r.result {
        Ok(n) => json!({ "file": r.file, "ok": true, "policies": n }),
        Err(d) => json!({ "file": r.file, "ok": false, "problems": d }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caret_points_at_the_span() {
        let text = "permit(principal, action, resource)\nwhen { context.nope == 1 };\n";
        let r = check_text("p.cedar", text.to_owned()).unwrap();
        let d = r.result.unwrap_err();
        let s = render("p.cedar", text, &d[0]);
        assert!(s.starts_with("error: p.cedar:2:"), "{s}");
        assert!(s.contains("2 | when { context.nope == 1 };"), "{s}");
        let caret = s.lines().find(|l| l.contains('^')).unwrap();
        let src = s.lines().find(|l| l.starts_with("2 |")).unwrap();
        // The first caret sits under a character of the offending span.
        let at = caret.find('^').unwrap();
        assert!(
            src[at..].starts_with("context") || src[at..].starts_with("nope"),
            "{s}"
        );
    }
}
