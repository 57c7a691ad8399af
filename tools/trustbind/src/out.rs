//! Printing results as text for people or JSON for scripts.

use std::io::Write as _;

use serde_json::Value;

use crate::cli::OutputFormat;
use crate::error::CliError;

/// Where results go, in the chosen format.
#[derive(Debug, Clone, Copy)]
pub struct Out {
    json: bool,
}

impl Out {
    /// An output in `fmt`.
    pub fn new(fmt: OutputFormat) -> Self {
        Self {
            json: fmt == OutputFormat::Json,
        }
    }

    /// Whether JSON was asked for.
    pub fn is_json(&self) -> bool {
        self.json
    }

    /// Prints `v` as one JSON document, or `text()` for people.
    pub fn emit(&self, v: &Value, text: impl FnOnce() -> String) {
        let s = if self.json {
            let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
            s.push('\n');
            s
        } else {
            text()
        };
        let mut o = std::io::stdout().lock();
        // A closed pipe (`| head`) is not an error worth reporting.
        let _ = o.write_all(s.as_bytes());
        let _ = o.flush();
    }

    /// Prints one line as is (streams: JSON lines or text lines).
    pub fn line(&self, s: &str) {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{s}");
        let _ = o.flush();
    }

    /// Prints a note for people on stderr (never in JSON mode).
    pub fn note(&self, s: &str) {
        if !self.json {
            eprintln!("{s}");
        }
    }

    /// Prints an error on stderr.
    pub fn error(&self, e: &CliError) {
        if self.json {
            eprintln!("{}", e.to_json());
        } else {
            eprintln!("trustbind: error: {}", e.message);
        }
    }
}

/// A simple left-aligned table with a header row.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(x) = w.get_mut(i) {
                *x = (*x).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        let n = cells.len();
        for (i, c) in cells.into_iter().enumerate() {
            s.push_str(c);
            if i + 1 < n {
                let pad = w
                    .get(i)
                    .copied()
                    .unwrap_or(0)
                    .saturating_sub(c.chars().count());
                s.push_str(&" ".repeat(pad + 2));
            }
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// A JSON field as display text (`-` when absent or null).
pub fn field(v: &Value, key: &str) -> String {
    match v.get(key) {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}
