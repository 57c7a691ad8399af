//! Kernel health checks: bug markers in the console log and the taint mask.

/// The taint bit an out-of-tree module sets (`TAINT_OOT_MODULE`, "O"); the
/// only bit a healthy test VM may show.
pub const TAINT_OOT_MODULE: u64 = 1 << 12;

/// Console markers that mean the kernel hit a bug.
const MARKERS: &[&str] = &[
    "BUG:",
    "WARNING:",
    "Oops",
    "Call Trace",
    "general protection",
    "Kernel panic",
    "kernel panic",
];

/// Returns one finding per console line that carries a bug marker.
pub fn check_console(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| MARKERS.iter().any(|m| l.contains(m)))
        .map(|l| format!("console: {}", l.trim_end()))
        .collect()
}

/// Returns a finding when `tainted` (the text of
/// `/proc/sys/kernel/tainted`) has any bit other than
/// [`TAINT_OOT_MODULE`] set, or does not parse.
pub fn check_taint(tainted: &str) -> Option<String> {
    match tainted.trim().parse::<u64>() {
        Ok(t) if t & !TAINT_OOT_MODULE == 0 => None,
        Ok(t) => Some(format!(
            "kernel tainted: {t} (bits {:?}; only {TAINT_OOT_MODULE}, out-of-tree module, is allowed)",
            (0..64).filter(|b| t & (1 << b) != 0).collect::<Vec<_>>()
        )),
        Err(_) => Some(format!("cannot parse /proc/sys/kernel/tainted: {tainted:?}")),
    }
}

/// `Ok` without problems, else [`Error::Unhealthy`] naming them.
pub(crate) fn verdict(
    vm: &str,
    console: &std::path::Path,
    problems: Vec<String>,
) -> crate::Result<()> {
    if problems.is_empty() {
        return Ok(());
    }
    Err(crate::Error::Unhealthy {
        vm: vm.to_owned(),
        problems,
        console: console.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_markers() {
        let log = "[    0.1] ok\n[    1.2] WARNING: CPU: 0 PID: 1 at foo\n[ 2] BUG: kernel NULL pointer\n";
        assert_eq!(check_console(log).len(), 2);
        assert!(check_console("[ 0.0] Command line: panic=-1\n").is_empty());
    }

    #[test]
    fn taint_mask() {
        assert_eq!(check_taint("0\n"), None);
        assert_eq!(check_taint("4096\n"), None);
        assert!(check_taint("4097").is_some());
        assert!(check_taint("512").unwrap().contains("[9]"));
        assert!(check_taint("garbage").is_some());
    }
}
