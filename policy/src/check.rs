//! Offline validation of a policy text, as the admin API's upload and
//! `trustbind policy validate` do it: parsed and validated against
//! `policies/trustbind.cedarschema` in strict mode, obligation values
//! checked; problems come back as diagnostics with line and column.

use std::str::FromStr;
use std::sync::OnceLock;

use cedar_policy::{PolicySet, Schema, ValidationMode, Validator};
use miette::Diagnostic;
use serde::{Deserialize, Serialize};

use crate::PolicyError;

/// The schema every policy set is validated against.
pub const SCHEMA: &str = include_str!("../../policies/trustbind.cedarschema");

fn schema() -> Result<&'static Schema, PolicyError> {
    static PARSED: OnceLock<Result<Schema, String>> = OnceLock::new();
    PARSED
        .get_or_init(|| {
            Schema::from_cedarschema_str(SCHEMA)
                .map(|(s, _warnings)| s)
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| PolicyError::Schema(format!("the built-in schema does not parse: {e}")))
}

/// One problem found in a policy text, as the admin API sends it in an
/// `invalid_policy` error's details and the CLI reads it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDiagnostic {
    /// 1-based line of the offending span (absent when Cedar gives no span).
    pub line: Option<u32>,
    /// 1-based column, in characters.
    pub column: Option<u32>,
    /// Byte offset of the span in the text.
    pub offset: Option<usize>,
    /// Byte length of the span (for a caret underline).
    pub length: Option<usize>,
    /// What is wrong.
    pub message: String,
    /// How to fix it, when Cedar knows.
    pub help: Option<String>,
    /// `parse` or `validation`.
    pub stage: String,
}

impl PolicyDiagnostic {
    /// `message` at byte `span` (offset, length) of `text`, if known.
    fn at(
        text: &str,
        span: Option<(usize, usize)>,
        message: String,
        help: Option<String>,
        stage: &str,
    ) -> Self {
        let (line, column) = span.map(|(off, _)| line_col(text, off)).unzip();
        PolicyDiagnostic {
            line,
            column,
            offset: span.map(|s| s.0),
            length: span.map(|s| s.1),
            message,
            help,
            stage: stage.to_owned(),
        }
    }
}

fn diagnostic(text: &str, d: &dyn Diagnostic, stage: &str) -> PolicyDiagnostic {
    let span = d
        .labels()
        .and_then(|mut l| l.next())
        .map(|l| (l.offset(), l.len()));
    let help = d.help().map(|h| h.to_string());
    PolicyDiagnostic::at(text, span, d.to_string(), help, stage)
}

/// 1-based line and character column of byte offset `off` in `text`.
fn line_col(text: &str, off: usize) -> (u32, u32) {
    let before = text.get(..off).unwrap_or(text);
    let line = before.matches('\n').count().saturating_add(1);
    let col = before
        .rsplit('\n')
        .next()
        .map_or(0, |l| l.chars().count())
        .saturating_add(1);
    (
        u32::try_from(line).unwrap_or(u32::MAX),
        u32::try_from(col).unwrap_or(u32::MAX),
    )
}

/// Parses `text` and validates it against the built-in schema in strict
/// mode. `Ok(n)`: the number of policies; `Err`: every problem found.
pub fn check_policy(text: &str) -> Result<Result<usize, Vec<PolicyDiagnostic>>, PolicyError> {
    let schema = schema()?;
    let set = match PolicySet::from_str(text) {
        Ok(s) => s,
        Err(errs) => {
            return Ok(Err(errs
                .iter()
                .map(|e| diagnostic(text, e, "parse"))
                .collect()));
        }
    };
    let result = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
    if !result.validation_passed() {
        return Ok(Err(result
            .validation_errors()
            .map(|e| diagnostic(text, e, "validation"))
            .collect()));
    }
    // Obligation values the engine would refuse to load.
    let bad = crate::obligation_problems(&set, text);
    if bad.is_empty() {
        return Ok(Ok(set.policies().count()));
    }
    Ok(Err(bad
        .into_iter()
        .map(|b| {
            let help = "@encrypt takes \"required\" (TLS 1.3) or \"offload\" (TLS 1.2, NIC offload); @channel_idle_s a number of seconds";
            PolicyDiagnostic::at(text, b.span, b.message, Some(help.into()), "validation")
        })
        .collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_characters() {
        let t = "ab\ncdé\nfg";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 3), (2, 1));
        assert_eq!(line_col(t, t.find('f').unwrap()), (3, 1));
        assert_eq!(line_col(t, 9), (3, 2));
    }

    #[test]
    fn example_policy_passes_and_errors_have_positions() {
        let ok = include_str!("../../policies/example.cedar");
        assert!(check_policy(ok).unwrap().unwrap() > 0);
        let bad = "permit(principal, action, resource);\npermit(principal, action == Trustbind::Action::\"exec\", resource)\nwhen { context.nope == 1 };";
        let d = check_policy(bad).unwrap().unwrap_err();
        assert_eq!(d[0].stage, "validation");
        assert_eq!(d[0].line, Some(3), "{d:?}");
        let syntax = "permit(principal, action, resource)\nwhen { ;";
        let d = check_policy(syntax).unwrap().unwrap_err();
        assert_eq!(d[0].stage, "parse");
        assert_eq!(d[0].line, Some(2), "{d:?}");
    }
}
