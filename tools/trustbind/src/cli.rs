//! The command line, declared with clap's derive API.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

const EXAMPLES: &str = "\
Examples:
  trustbind policy validate policies/baseline.cedar      # offline, no appliance needed
  trustbind policy upload policies/baseline.cedar -m 'baseline v1'
  trustbind policy diff 7                                 # draft 7 vs the active policy
  trustbind policy activate 7
  trustbind sig add /usr/bin /usr/sbin --group system     # hash executables recursively
  trustbind sig import-nsrl RDS_2024.12.1_modern.db --group nsrl --filter name='*.so*'
  trustbind host enrol-token web1 --host-group web
  trustbind audit tail --follow
  trustbind -o json host list | jq '.hosts[].name'

Configuration (~/.config/trustbind/config.toml; flags and environment win):
  url  = \"https://appliance.example:8443\"
  cert = \"admin.pem\"        # relative to the config file's directory
  key  = \"admin.key\"
  ca   = \"ca.pem\"
Credentials come from `trustbind admin enrol` (with the one-time admin token
the appliance's console shows; it writes them and config.toml there by
default) or from `trustbind-appliance admin-cert --name NAME --out DIR`.

Exit codes:
  0  success
  1  the check failed (invalid policy, broken audit chain, replay found changes)
  2  usage error
  3  configuration or credentials missing, unreadable or rejected
  4  the appliance cannot be reached, or TLS with it fails
  5  the appliance refused the request (not found, invalid, conflict)
  6  the appliance failed or answered something unexpected
  7  a local file could not be read or written";

/// Trustbind administration: policies, signatures, hosts and audit.
#[derive(Debug, Parser)]
#[command(name = "trustbind", version, after_long_help = EXAMPLES, after_help = "Run `trustbind --help` for examples, configuration and exit codes.")]
pub struct Cli {
    /// Options shared by every command.
    #[command(flatten)]
    pub global: Global,
    /// What to do.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// For people.
    Text,
    /// One JSON document (or JSON lines for streams), for scripts.
    Json,
}

/// Options valid with every command.
#[derive(Debug, Args)]
pub struct Global {
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// Config file [default: ~/.config/trustbind/config.toml].
    #[arg(long, global = true, env = "TRUSTBIND_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Admin API URL, e.g. https://appliance:8443.
    #[arg(long, global = true, env = "TRUSTBIND_URL", value_name = "URL")]
    pub url: Option<String>,
    /// Admin client certificate (PEM).
    #[arg(long, global = true, env = "TRUSTBIND_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Admin client key (PEM).
    #[arg(long, global = true, env = "TRUSTBIND_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Appliance CA certificate (PEM).
    #[arg(long, global = true, env = "TRUSTBIND_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Cedar policy sets: validate, upload, diff, activate, roll back.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Program signatures (SHA-256 identities) in the appliance.
    #[command(subcommand)]
    Sig(SigCmd),
    /// Reference groups of signatures (Cedar `ProgramGroup`s).
    #[command(subcommand)]
    Group(GroupCmd),
    /// Protected hosts and host groups.
    #[command(subcommand)]
    Host(HostCmd),
    /// Users and their roles (Cedar `principal in Role::"..."`).
    #[command(subcommand)]
    User(UserCmd),
    /// Protected file sets (Cedar `resource in FileSet::"..."`): absolute
    /// paths of directories (everything below) and files. Only operations
    /// on files inside a set are asked; at most 256 paths in all sets.
    #[command(subcommand, name = "fileset", alias = "file-set")]
    FileSet(FileSetCmd),
    /// Bound channels: key ids, hosts, open and close, bytes per end.
    #[command(subcommand)]
    Channel(ChannelCmd),
    /// Learning mode: the programs hosts ran (every exec of a permissive
    /// host, the refusals of an enforcing one), grouped by package and
    /// directory; approves them into a reference group.
    ///
    /// Without --group: lists the pending programs (not approved, and the
    /// policy did not allow them the last time). With --group on a
    /// terminal: asks, group by group, whether to approve. With
    /// --approve-all: approves everything the filters select at once.
    /// --dry-run shows what an approval would do and changes nothing.
    #[command(after_help = LEARN_HELP)]
    Learn(LearnArgs),
    /// The hash-chained audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Why a decision went the way it did: the policies that permitted or
    /// forbade, the program's groups, and for a default deny what was
    /// missing.
    ///
    /// With an audit sequence number: the decision as recorded, then how
    /// the current policy decides the same request. With --host, --user,
    /// --program and --action: how the current policy decides that request
    /// now (no session or ancestry; clock conditions at the present time).
    #[command(after_help = "Examples:
  trustbind explain 4211
  trustbind explain --host web1 --user bob --program /usr/bin/htop --action exec
  trustbind explain --host web1 --user www --program 3f9a... --action connect --resource 10.0.0.5:5432")]
    Explain(ExplainArgs),
    /// Administrator credentials.
    #[command(subcommand)]
    Admin(AdminCmd),
    /// Shows the appliance's version, governing policy and audit head.
    Status,
    /// Prints a shell completion script.
    #[command(
        after_help = "Example: trustbind completions bash > /etc/bash_completion.d/trustbind"
    )]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// `trustbind explain ...`
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// An audit sequence number of a `decision` row.
    #[arg(conflicts_with_all = ["host", "user", "program", "action", "resource", "peer"])]
    pub seq: Option<i64>,
    /// The host asking.
    #[arg(long, required_unless_present = "seq")]
    pub host: Option<String>,
    /// The user on the host (the Cedar principal).
    #[arg(long, required_unless_present = "seq")]
    pub user: Option<String>,
    /// The program: a SHA-256 (64 hex digits), or a file here to hash.
    #[arg(long, value_name = "SHA256|PATH", required_unless_present = "seq")]
    pub program: Option<String>,
    /// The action: exec, open_read, open_write, delete, rename, connect,
    /// accept, ipc_connect.
    #[arg(long, required_unless_present = "seq")]
    pub action: Option<String>,
    /// What the action applies to: a file path (file actions), ADDR:PORT
    /// (connect, accept), a socket path or @name (ipc_connect).
    #[arg(long)]
    pub resource: Option<String>,
    /// ipc_connect: the listening program, a SHA-256 or a file here to hash.
    #[arg(long, value_name = "SHA256|PATH")]
    pub peer: Option<String>,
}

/// `trustbind learn ...`
#[derive(Debug, Args)]
pub struct LearnArgs {
    /// Only this host's programs.
    #[arg(long)]
    pub host: Option<String>,
    /// Only programs at or below this directory (or this exact path).
    #[arg(long, value_name = "PATH")]
    pub path_prefix: Option<String>,
    /// Only programs the host reported as this Debian package's.
    #[arg(long)]
    pub package: Option<String>,
    /// Which programs [default: pending; all with --forget].
    #[arg(long, value_enum)]
    pub state: Option<LearnState>,
    /// Approve into this reference group (it must exist, and a policy must
    /// permit it for the programs to run in enforce mode).
    #[arg(long, short = 'g', value_name = "GROUP")]
    pub group: Option<String>,
    /// Approve every pending program the filters select, without asking.
    #[arg(long, requires = "group")]
    pub approve_all: bool,
    /// Show what the approval would do; change nothing.
    #[arg(long, requires = "group")]
    pub dry_run: bool,
    /// Forget (delete) the rows the filters select: makes room below the
    /// caps.
    #[arg(long, conflicts_with_all = ["group", "approve_all", "dry_run"])]
    pub forget: bool,
}

/// Observed programs by approval state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LearnState {
    /// Not approved, and not allowed by the policy the last time.
    Pending,
    /// Approved into a group.
    Approved,
    /// Every program.
    All,
}

impl LearnState {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::All => "all",
        }
    }
}

const LEARN_HELP: &str = "\
Examples:
  trustbind host group set staging --mode permissive      # hosts run everything, the appliance records it
  trustbind learn                                           # pending programs by package and directory
  trustbind learn --path-prefix /opt/app --state all
  trustbind learn --group app --approve-all --path-prefix /opt/app --dry-run
  trustbind learn --group app --approve-all --path-prefix /opt/app
  trustbind learn --group debian                            # asks per package / directory (terminal)
  trustbind host group set staging --mode enforce
  trustbind learn --forget --host web1 --state approved

Verdicts: would-deny (a permissive host ran it; enforce mode would refuse it),
denied (an enforcing host refused it), allowed (a policy allows it already).
Approving adds the programs to the group as `sig add` would (audited
`learn.approve`); they run in enforce mode once a policy permits the group.";

/// `trustbind admin ...`
#[derive(Debug, Subcommand)]
pub enum AdminCmd {
    /// Gets an admin certificate with a one-time admin token.
    ///
    /// Makes a P-256 key here (it never leaves this machine), checks the
    /// appliance's CA against --ca-fingerprint during the TLS handshake
    /// (nothing is sent to any other appliance), trades the token and a CSR
    /// for an admin certificate on the enrol port, and writes ca.pem,
    /// admin.pem, admin.key (0600) and, if absent, config.toml into --out.
    #[command(
        alias = "enroll",
        after_help = "The token and the fingerprint are shown on the appliance's console
(`trustbind-appliance admin-token`, `trustbind-appliance ca-fingerprint`).

Example: trustbind admin enrol --appliance 192.0.2.10 --ca-fingerprint 3f9a... --token K7QD-M2XA-...
         trustbind status"
    )]
    Enrol {
        /// The appliance's enrol port, HOST[:PORT] (port 7444 by default).
        #[arg(long, value_name = "HOST[:PORT]")]
        appliance: String,
        /// SHA-256 of the appliance CA certificate (64 hex digits, `:` allowed).
        #[arg(long, value_name = "SHA256")]
        ca_fingerprint: String,
        /// The one-time admin token (case and dashes do not matter).
        #[arg(long, env = "TRUSTBIND_ADMIN_TOKEN", hide_env_values = true)]
        token: String,
        /// Admin name for the certificate [default: the name the token was made for].
        #[arg(long)]
        name: Option<String>,
        /// Where to write the credentials [default: ~/.config/trustbind].
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Name the appliance's server certificate must carry [default: HOST].
        #[arg(long, value_name = "NAME")]
        server_name: Option<String>,
        /// The appliance's admin port, for the config.toml written.
        #[arg(long, default_value_t = 7445, value_name = "PORT")]
        admin_port: u16,
    },
    /// Lists the admin certificates with their roles and revocations.
    #[command(alias = "list")]
    Ls,
    /// Revokes an admin certificate by serial (refused at the next request
    /// and handshake; the last valid `admin` one cannot be revoked).
    Revoke {
        /// Certificate serial (hex, from `trustbind admin ls`).
        serial: String,
    },
    /// Renews this admin's certificate over the admin connection: a new key
    /// here, a new certificate for the same name and role; the old one is
    /// revoked. Overwrites the configured cert and key files.
    Renew,
    /// Makes a one-time admin enrolment token (for `trustbind admin enrol`).
    #[command(after_help = "Example: trustbind admin token auditor --role read-only --ttl 2h")]
    Token {
        /// The new administrator's name.
        name: String,
        /// What the certificate may do.
        #[arg(long, default_value = "admin", value_parser = ["admin", "read-only"])]
        role: String,
        /// Lifetime: seconds, or with s, m, h or d [default: 24h].
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<i64>,
    },
}

/// A token lifetime in seconds: `90`, `90s`, `30m`, `2h`, `7d`.
pub fn parse_ttl(s: &str) -> Result<i64, String> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86_400),
        _ => (s, 1),
    };
    num.parse::<i64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("`{s}` is no lifetime: use seconds or a number with s, m, h or d"))
}

/// `trustbind policy ...`
#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Checks policy files offline: Cedar syntax and strict schema validation.
    #[command(after_help = "Example: trustbind policy validate policies/*.cedar")]
    Validate {
        /// Policy files (`-` for standard input).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Uploads a policy file as a new draft version.
    Upload {
        /// The policy file.
        file: PathBuf,
        /// A comment stored with the version.
        #[arg(long, short = 'm', default_value = "")]
        comment: String,
        /// Activate the new version right away.
        #[arg(long)]
        activate: bool,
    },
    /// Lists policy versions.
    #[command(alias = "ls")]
    List,
    /// Shows a policy version (default: the active one).
    Show {
        /// Version id, or `active`.
        #[arg(default_value = "active")]
        version: String,
        /// Print only the policy text.
        #[arg(long)]
        text: bool,
    },
    /// Diffs a version (or a local file) against the active policy.
    #[command(
        after_help = "Examples:\n  trustbind policy diff 7\n  trustbind policy diff 7 --against 5\n  trustbind policy diff policies/baseline.cedar"
    )]
    Diff {
        /// Version id, or a local policy file.
        draft: String,
        /// Version to compare with [default: the active one].
        #[arg(long)]
        against: Option<i64>,
    },
    /// Makes a version the governing policy.
    Activate {
        /// Version id.
        version: i64,
    },
    /// Switches back to the previously active version.
    Rollback,
    /// What-if: replays recorded decisions against a draft.
    #[command(
        after_help = "Example: trustbind policy test policies/new.cedar --replay-audit --since 24h"
    )]
    Test {
        /// Version id, or a local policy file.
        draft: String,
        /// Replay the `decision` audit rows of the window.
        #[arg(long, required = true)]
        replay_audit: bool,
        /// Start of the window: 24h, 7d, 2026-11-22, 2026-11-22T08:00Z.
        #[arg(long, default_value = "24h")]
        since: String,
    },
}

/// `trustbind sig ...`
#[derive(Debug, Subcommand)]
pub enum SigCmd {
    /// Hashes executables (recursively) and adds them to a group.
    #[command(
        after_help = "Regular files with an execute bit are hashed (SHA-256 and SHA-1 in one pass);\nother files are skipped and counted. Symbolic links are not followed.\n\nExample: trustbind sig add /usr/bin /usr/local/bin --group system\n\nA golden host seeds a group from its Debian packages in one pipeline:\n  trustbind-agent inventory | trustbind sig add --inventory - --group debian-web"
    )]
    Add {
        /// Files or directories.
        #[arg(required_unless_present = "inventory", conflicts_with = "inventory")]
        paths: Vec<PathBuf>,
        /// Instead of paths: a package inventory (`trustbind-agent
        /// inventory`, `-` for standard input) of this host; each program
        /// is hashed here and stored with source `dpkg:PACKAGE=VERSION`.
        #[arg(long, value_name = "FILE")]
        inventory: Option<PathBuf>,
        /// Reference group to add them to (created when missing).
        #[arg(long, short = 'g')]
        group: String,
        /// Source label stored with each signature.
        #[arg(long, default_value = "trustbind sig add")]
        source: String,
    },
    /// Lists signatures.
    #[command(alias = "list")]
    Ls {
        /// Only members of this group.
        #[arg(long, short = 'g')]
        group: Option<String>,
        /// At most this many (0: all).
        #[arg(long, short = 'n', default_value_t = 100)]
        limit: u64,
    },
    /// Shows one signature and its groups.
    Show {
        /// SHA-256.
        sha256: String,
    },
    /// Removes signatures (from every group).
    #[command(alias = "remove")]
    Rm {
        /// SHA-256 values.
        #[arg(required = true)]
        sha256: Vec<String>,
    },
    /// Imports a NIST NSRL RDSv3 SQLite database (minimal or full set) into a group.
    #[command(
        name = "import-nsrl",
        after_help = NSRL_HELP
    )]
    ImportNsrl {
        /// The RDSv3 database file.
        db: PathBuf,
        /// Reference group to add the signatures to.
        #[arg(long, short = 'g')]
        group: String,
        /// Only files of packages whose PKG.name matches (case-insensitive glob; repeat for either).
        #[arg(long = "product", value_name = "GLOB")]
        products: Vec<String>,
        /// Only files of packages for an OS whose name or "name version" matches (glob; repeatable).
        #[arg(long = "os", value_name = "GLOB")]
        oses: Vec<String>,
        /// Only files of packages whose manufacturer (MFG.name) matches (glob; repeatable).
        #[arg(long = "manufacturer", value_name = "GLOB")]
        manufacturers: Vec<String>,
        /// Only files of packages whose PKG.application_type matches (glob; repeatable).
        #[arg(long = "app-type", value_name = "GLOB")]
        app_types: Vec<String>,
        /// File filter (see below).
        #[arg(long = "filter", value_name = "KEY=VALUE")]
        filters: Vec<String>,
        /// Signatures (distinct files) per request (at most 10000).
        #[arg(long, default_value_t = 10_000)]
        batch: usize,
        /// Ignore the saved progress and start from the first row.
        #[arg(long)]
        restart: bool,
        /// Stop after this many source rows (at the end of a file's rows; progress is saved).
        #[arg(long)]
        max_rows: Option<u64>,
        /// State file [default: DB.trustbind-import.json].
        #[arg(long)]
        state: Option<PathBuf>,
    },
}

/// `trustbind group ...`
#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    /// Lists reference groups.
    #[command(alias = "list")]
    Ls,
    /// Creates a group (no-op when it exists).
    Create {
        /// Group name.
        name: String,
        /// Description.
        #[arg(long, short = 'd', default_value = "")]
        description: String,
    },
    /// Shows a group.
    Show {
        /// Group name.
        name: String,
    },
    /// Deletes a group (signatures stay).
    #[command(alias = "delete")]
    Rm {
        /// Group name.
        name: String,
    },
    /// Adds known signatures to a group.
    Add {
        /// Group name.
        name: String,
        /// SHA-256 values.
        #[arg(required = true)]
        sha256: Vec<String>,
    },
    /// Removes signatures from a group.
    Remove {
        /// Group name.
        name: String,
        /// SHA-256 values.
        #[arg(required = true)]
        sha256: Vec<String>,
    },
}

/// `trustbind fileset ...`
#[derive(Debug, Subcommand)]
pub enum FileSetCmd {
    /// Lists the file sets with their paths.
    #[command(alias = "list")]
    Ls,
    /// Shows one file set.
    Show {
        /// File set name.
        name: String,
    },
    /// Adds paths to a file set (created when missing).
    #[command(after_help = "Example: trustbind fileset add pgdata /var/lib/postgresql")]
    Add {
        /// File set name.
        name: String,
        /// Absolute, normalised paths (no `.`, `..`, `//` or trailing `/`).
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Removes paths from a file set (the set stays).
    Remove {
        /// File set name.
        name: String,
        /// Paths to remove.
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Replaces a file set's paths (created when missing).
    Set {
        /// File set name.
        name: String,
        /// The set's paths from now on.
        paths: Vec<String>,
    },
    /// Deletes a file set.
    #[command(alias = "delete")]
    Rm {
        /// File set name.
        name: String,
    },
}

/// Host group modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Deny what the policy does not allow.
    Enforce,
    /// Allow everything, audit what would have been denied.
    Permissive,
    /// No qualification.
    Disabled,
}

/// `trustbind channel ...`
#[derive(Debug, Subcommand)]
pub enum ChannelCmd {
    /// Lists channels, oldest first (bytes: sent by the connect end /
    /// by the accept end, TLS records included).
    #[command(alias = "list", after_help = "Example: trustbind channel ls --open")]
    Ls {
        /// Only channels neither end reported closed.
        #[arg(long)]
        open: bool,
    },
}

/// `trustbind host ...`
#[derive(Debug, Subcommand)]
pub enum HostCmd {
    /// Registers a host and prints its one-time enrolment token.
    #[command(
        name = "enrol-token",
        alias = "enroll-token",
        after_help = "The token is shown once; give it to the host's agent (trustbind-agent enrol).\n\nExample: trustbind host enrol-token web1 --host-group web"
    )]
    EnrolToken {
        /// Host name.
        name: String,
        /// Host group (must exist: `trustbind host group set NAME --mode enforce`).
        #[arg(long, short = 'g')]
        host_group: String,
        /// Token lifetime: seconds, or with s, m, h or d [default: 24h].
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<i64>,
    },
    /// A new one-time enrolment token for a pending host (its token expired
    /// or was lost) or a revoked one (to enrol it again).
    Token {
        /// Host name.
        name: String,
        /// Token lifetime: seconds, or with s, m, h or d [default: 24h].
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<i64>,
    },
    /// Lists hosts.
    #[command(alias = "ls")]
    List,
    /// Shows a host.
    Show {
        /// Host name.
        name: String,
    },
    /// Revokes a host: its certificate is refused from now on.
    Revoke {
        /// Host name.
        name: String,
    },
    /// Shows or changes the addresses assigned to a host: the addresses its
    /// channel halves may name as its own end, besides the address its
    /// agent connects from.
    #[command(
        after_help = "Needed when a host reaches the appliance through NAT, a proxy or another interface than its channels use: a refused half's audit row names the address it claimed and the one its agent connects from. An address belongs to one host at most.\n\nExamples:\n  trustbind host addresses db1\n  trustbind host addresses db1 --set 10.0.0.5 2001:db8::5\n  trustbind host addresses db1 --add 10.0.1.5\n  trustbind host addresses db1 --remove 10.0.0.5\n  trustbind host addresses db1 --set"
    )]
    Addresses {
        /// Host name.
        name: String,
        /// Replaces the assigned addresses with these (none: removes all).
        #[arg(long, num_args = 0.., value_name = "ADDR", conflicts_with_all = ["add", "remove"])]
        set: Option<Vec<String>>,
        /// Adds these addresses.
        #[arg(long, num_args = 1.., value_name = "ADDR")]
        add: Vec<String>,
        /// Removes these addresses.
        #[arg(long, num_args = 1.., value_name = "ADDR")]
        remove: Vec<String>,
    },
    /// Host groups and their modes.
    #[command(subcommand)]
    Group(HostGroupCmd),
}

/// `trustbind host group ...`
#[derive(Debug, Subcommand)]
pub enum HostGroupCmd {
    /// Lists host groups.
    #[command(alias = "list")]
    Ls,
    /// Creates a host group or changes its mode.
    Set {
        /// Host group name.
        name: String,
        /// Mode.
        #[arg(long, value_enum)]
        mode: ModeArg,
    },
    /// Deletes an empty host group.
    Rm {
        /// Host group name.
        name: String,
    },
}

/// `trustbind user ...`
#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Lists users with roles.
    #[command(alias = "list")]
    Ls,
    /// Shows a user.
    Show {
        /// User name as the agent reports it (`uid:<n>` when unknown on the host).
        name: String,
    },
    /// Sets a user's roles (replaces them; no --role clears them).
    #[command(after_help = "Example: trustbind user set alice --role admin --role dba")]
    Set {
        /// User name.
        name: String,
        /// A role (repeatable).
        #[arg(long = "role", short = 'r')]
        roles: Vec<String>,
    },
    /// Forgets a user and its roles.
    Rm {
        /// User name.
        name: String,
    },
}

/// `trustbind audit ...`
#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Shows the newest audit rows.
    Tail {
        /// How many rows.
        #[arg(long, short = 'n', default_value_t = 20)]
        lines: u32,
        /// Keep printing new rows as they arrive (Ctrl-C to stop).
        #[arg(long, short = 'f')]
        follow: bool,
        /// Poll interval with --follow, in milliseconds.
        #[arg(long, default_value_t = 1000, hide = true)]
        interval_ms: u64,
    },
    /// Exports audit rows as JSON lines.
    Export {
        /// Start: 24h, 7d, 2026-11-22, 2026-11-22T08:00Z, @SECONDS [default: everything].
        #[arg(long)]
        since: Option<String>,
        /// Only rows of this kind (and its sub-kinds), e.g. `decision`.
        #[arg(long)]
        kind: Option<String>,
        /// Write to this file instead of standard output.
        #[arg(long = "out", short = 'O')]
        out: Option<PathBuf>,
    },
    /// Verifies the hash chain from the newest retention checkpoint to the
    /// head, and the checkpoint's signature against the CA (`--ca`); says
    /// what was pruned. With `--seal-key`, also the forward-secure seals
    /// of the rows the appliance keeps (T-83).
    Verify {
        /// The seal verification key (`trustbind-appliance audit
        /// seal-setup`, kept offline): the rows are read and every seal
        /// checked; says up to which row the log is authentic and which
        /// rows after it are not sealed. Fails on a bad seal, and when the
        /// last seal is older than two sealing intervals (the log was cut
        /// or sealing stopped).
        #[arg(long, value_name = "FILE")]
        seal_key: Option<PathBuf>,
        /// With `--seal-key`: the export files copied off the appliance,
        /// oldest first, checked too (chain, checkpoints, seals), and the
        /// rows kept must continue them: no row missing in between, and
        /// the first seal kept at most one epoch after their last (so
        /// sealed rows cannot have been deleted from the appliance as if
        /// pruned).
        #[arg(long, value_name = "FILE", num_args = 1.., requires = "seal_key")]
        exported: Vec<PathBuf>,
    },
    /// Sets up forward-secure sealing of the audit log (T-83) and writes
    /// the verification key to `--out`: the appliance does not keep it and
    /// cannot show it again. Store it offline.
    SealSetup {
        /// Where the verification key is written (created, mode 0600).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Seconds between seals.
        #[arg(long, value_name = "SECS", default_value_t = 900,
              value_parser = clap::value_parser!(u32).range(1..=86_400))]
        interval_secs: u32,
    },
    /// Seals the audit log now (the appliance also seals every interval,
    /// at start and at shutdown).
    Seal,
    /// Verifies retention export files (the appliance's
    /// `/data/trustbind/export/audit-*.jsonl`, oldest first), offline: the
    /// rows chain, and every checkpoint in them is signed by the appliance
    /// (a certificate of the CA given by `--ca` or the configuration) and
    /// names its rows.
    VerifyExport {
        /// The seal verification key: also checks the seals in the files.
        #[arg(long, value_name = "FILE")]
        seal_key: Option<PathBuf>,
        /// The export files, oldest first.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
}

/// `trustbind sig import-nsrl --help`, after the options.
const NSRL_HELP: &str = "Reads either RDSv3 layout: the minimal sets' FILE table, or the full sets' METADATA
joined to PACKAGE_OBJECT (FILE is a view there). Rows are read in SHA-256 order, so a file
listed in many packages is sent once. Resumable: progress (the last SHA-256 sent) is kept in a
state file next to the database (RDS.db.trustbind-import.json); run the same command again to
continue. Idempotent: re-importing changes nothing. The minimal sets stream through their
primary key; the full sets have no index on METADATA.sha256, so SQLite sorts the rows first
(temporary files in $SQLITE_TMPDIR; `CREATE INDEX md_sha256 ON METADATA (sha256)` on a
writable copy avoids it, also on every resume).

Package filters (repeat a flag for either value; different flags must all hold):
  --product GLOB       PKG.name                       e.g. --product 'openssl*'
  --os GLOB            OS.name or \"OS.name OS.version\" e.g. --os Linux --os 'Windows 1?'
  --manufacturer GLOB  MFG.name                       e.g. --manufacturer Debian
  --app-type GLOB      PKG.application_type           e.g. --app-type 'Operating System'
Globs are SQLite GLOB (* ? [..]), case-insensitive; a value matching nothing is refused.

File filters (--filter KEY=VALUE, repeatable, all must hold):
  name=GLOB        file name matches the glob (SQLite GLOB, case-sensitive)
  package=ID       package_id equals ID (repeat for several)
  min-size=N       file size >= N
  max-size=N       file size <= N

Example: trustbind sig import-nsrl RDS_2024.12.1_modern.db --group debian --os Linux --manufacturer Debian";
