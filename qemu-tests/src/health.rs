//! Kernel health checks: bug markers in the console log, the taint mask and
//! kmemleak's suspects.
//!
//! On the debug kernel (`kernel/debug.config`) lockdep, the sleeping-in-
//! atomic check and KFENCE report on the console with a `WARNING:` or
//! `BUG:` line, which [`check_console`] catches; kmemleak reports only when
//! asked, so [`KMEMLEAK_SCAN`] asks at every health check.

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

/// Guest shell command: scan for leaks and print the suspects (nothing on
/// a kernel without kmemleak). Suspects already printed are then cleared,
/// so a later check reports only new ones.
pub const KMEMLEAK_SCAN: &str = "k=/sys/kernel/debug/kmemleak; \
    [ -e $k ] || exit 0; echo scan >$k && cat $k && echo clear >$k";

/// One finding per kmemleak suspect in `report` (the text of
/// `/sys/kernel/debug/kmemleak`), with the first lines of its backtrace.
pub fn check_kmemleak(report: &str) -> Vec<String> {
    report
        .split("unreferenced object")
        .skip(1)
        .map(|obj| {
            let lines: Vec<&str> = obj.lines().map(str::trim).take(12).collect();
            format!("kmemleak: unreferenced object{}", lines.join(" | "))
        })
        .collect()
}

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
    fn kmemleak_suspects() {
        assert!(check_kmemleak("").is_empty());
        let report = "unreferenced object 0xffff888003a1c000 (size 64):\n  comm \"insmod\", pid 91, jiffies 4294893428\n  backtrace (crc 0):\n    kmalloc_trace+0x21/0x30\n    tb_net_start+0x1c/0x90 [trustbind]\nunreferenced object 0xffff888003a1c040 (size 64):\n  comm \"sh\"\n";
        let found = check_kmemleak(report);
        assert_eq!(found.len(), 2);
        assert!(found[0].contains("tb_net_start"), "{found:?}");
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
