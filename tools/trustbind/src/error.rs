//! The CLI's error type and its exit codes.

use serde_json::{json, Value};

/// Exit codes of `trustbind` (also listed in `trustbind --help` and the README).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 1: the command ran but its check failed (invalid policy, broken audit
    /// chain, changed decisions in a replay).
    CheckFailed = 1,
    /// 2: the command line is wrong (clap's own code).
    Usage = 2,
    /// 3: configuration or credentials are missing, unreadable or wrong.
    Config = 3,
    /// 4: the appliance cannot be reached, or TLS with it fails.
    Connect = 4,
    /// 5: the appliance refused the request (4xx: not found, invalid, conflict).
    Refused = 5,
    /// 6: the appliance failed (5xx) or answered something unexpected.
    Server = 6,
    /// 7: a local file could not be read or written.
    Io = 7,
}

/// An error shown to the user as one sentence, with an exit code (boxed so
/// `Result`s stay small; fields are reached through `Deref`).
#[derive(Debug)]
pub struct CliError(Box<ErrorInner>);

/// The content of a [`CliError`].
#[derive(Debug)]
pub struct ErrorInner {
    /// Exit code.
    pub exit: Exit,
    /// Stable machine-readable code (the appliance's when it sent one).
    pub code: String,
    /// One sentence naming the offending thing.
    pub message: String,
    /// Structured details for `--output json`.
    pub details: Option<Value>,
}

impl CliError {
    /// An error with `exit` and `message`; the code is derived from `exit`.
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        let code = match exit {
            Exit::CheckFailed => "check_failed",
            Exit::Usage => "usage",
            Exit::Config => "config",
            Exit::Connect => "connect",
            Exit::Refused => "refused",
            Exit::Server => "server",
            Exit::Io => "io",
        };
        Self(Box::new(ErrorInner {
            exit,
            code: code.to_owned(),
            message: message.into(),
            details: None,
        }))
    }

    /// A configuration or credential problem.
    pub fn config(message: impl Into<String>) -> Self {
        Self::new(Exit::Config, message)
    }

    /// A local I/O problem.
    pub fn io(message: impl Into<String>) -> Self {
        Self::new(Exit::Io, message)
    }

    /// The error as the JSON object printed under `--output json`.
    pub fn to_json(&self) -> Value {
        let mut e = json!({ "code": self.code, "message": self.message, "exit": self.exit as i32 });
        if let (Some(o), Some(d)) = (e.as_object_mut(), &self.details) {
            o.insert("details".into(), d.clone());
        }
        json!({ "error": e })
    }
}

impl std::ops::Deref for CliError {
    type Target = ErrorInner;
    fn deref(&self) -> &ErrorInner {
        &self.0
    }
}

impl std::ops::DerefMut for CliError {
    fn deref_mut(&mut self) -> &mut ErrorInner {
        &mut self.0
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

/// Result of a CLI operation.
pub type Result<T, E = CliError> = std::result::Result<T, E>;

/// `path` with an I/O error, as one sentence: "cannot read X: why".
pub fn io_err(verb: &str, path: &std::path::Path, e: &std::io::Error) -> CliError {
    CliError::io(format!("cannot {verb} {}: {}", path.display(), plain_io(e)))
}

/// An I/O error's text without Rust's "(os error N)" suffix.
pub fn plain_io(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s.get(..i).unwrap_or(&s).to_owned(),
        None => s,
    }
}
