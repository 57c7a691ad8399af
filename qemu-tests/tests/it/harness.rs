//! The harness itself: the command channel keeps stdout, stderr and status
//! apart and survives awkward output and timeouts; background processes
//! run; the health check catches a kernel warning and a taint.

use std::time::Duration;

use anyhow::{ensure, Result};
use trustbind_qemu_tests::{Artifacts, Error, Network, Vm};

#[test]
fn harness_selftest() -> Result<()> {
    let art = Artifacts::from_env()?;
    let net = Network::new()?;
    let vms = net.boot_all(vec![net.vm("h"), net.vm("t")], &art)?;
    let [mut vm, mut vm2]: [Vm; 2] = vms
        .try_into()
        .map_err(|_| anyhow::anyhow!("boot_all returned the wrong number of VMs"))?;

    let out = vm.run("printf 'a b\\n\\tc'; printf 'err\\n' >&2; exit 7")?;
    ensure!(out.status == 7, "status {}", out.status);
    ensure!(out.stdout == "a b\n\tc", "stdout {:?}", out.stdout);
    ensure!(out.stderr == "err\n", "stderr {:?}", out.stderr);

    // Quotes, a here-document and 256 KiB of output survive the framing.
    let out = vm.run_ok("cat <<'E'\n\"'$HOME`x`\nE\nhead -c 262144 /dev/zero | tr '\\0' x")?;
    ensure!(
        out.stdout.starts_with("\"'$HOME`x`\n"),
        "stdout starts {:?}",
        &out.stdout[..20.min(out.stdout.len())]
    );
    ensure!(
        out.stdout.len() == 11 + 262144,
        "stdout is {} bytes",
        out.stdout.len()
    );

    let err = vm.run_ok("false").expect_err("`false` must fail run_ok");
    ensure!(
        matches!(err, Error::CommandFailed { .. }),
        "run_ok(false) gave {err}"
    );

    // A timed-out command does not confuse the next one.
    let err = vm
        .run_timeout("sleep 3", Duration::from_secs(1))
        .expect_err("`sleep 3` must time out after 1 s");
    ensure!(
        matches!(err, Error::CommandTimeout { .. }),
        "timeout gave {err}"
    );
    let out = vm.run_ok("echo after")?;
    ensure!(
        out.stdout == "after\n",
        "after a timeout, got {:?}",
        out.stdout
    );

    let bg = vm.spawn_bg("echo started; exec sleep 1000")?;
    let out = vm.run_ok(&format!("sleep 0.5; cat {}; kill -0 {}", bg.log, bg.pid))?;
    ensure!(out.stdout == "started\n", "background log {:?}", out.stdout);

    let hostname = vm.run_ok("hostname")?.stdout;
    ensure!(hostname.trim() == "h", "hostname {hostname:?}");
    let addr = vm.run_ok("ip -4 -o addr show dev eth0")?.stdout;
    ensure!(addr.contains(&format!("{}/24", vm.ip())), "eth0: {addr}");
    // The test network is one isolated /24: no default route, so nothing
    // outside it is reachable (checked without sending a packet).
    let routes = vm.run_ok("ip -4 route")?.stdout;
    ensure!(
        routes.lines().count() == 1 && routes.starts_with("10.99.0.0/24 dev eth0"),
        "unexpected routes:\n{routes}"
    );
    let out = vm.run("ip route get 192.0.2.1")?;
    ensure!(
        out.status != 0 && out.stderr.contains("unreachable"),
        "an outside address looks routable: {out:?}"
    );
    vm.check_health()?;

    // The health check sees what the kernel logs and the taint mask.
    eprintln!("harness_selftest: the two health-check failure banners below are expected");
    vm.run_ok("echo 'WARNING: injected by harness_selftest' >/dev/kmsg")?;
    let err = vm
        .check_health()
        .expect_err("an injected WARNING must fail the health check");
    ensure!(
        err.to_string().contains("injected by harness_selftest"),
        "{err}"
    );
    vm2.run_ok("echo 512 >/proc/sys/kernel/tainted")?;
    let err = vm2
        .check_health()
        .expect_err("taint 512 must fail the health check");
    ensure!(err.to_string().contains("kernel tainted: 512"), "{err}");
    // Both VMs are now "unhealthy" on purpose: drop kills them.
    Ok(())
}
