//! Three VMs on the private bridge running unmodified Debian programs:
//! nginx serves a canary, curl fetches it from two VMs, the bridge capture
//! shows it on the wire; socat and iperf3 move TCP data between VMs.

use anyhow::{ensure, Context, Result};
use trustbind_qemu_tests::{Artifacts, Network, Vm};

use crate::random_hex;

const NGINX_CONF: &str = "\
worker_processes 1;
pid /run/nginx.pid;
error_log /run/nginx-error.log;
events { worker_connections 64; }
http {
    access_log /run/nginx-access.log;
    default_type text/plain;
    server {
        listen 80;
        root /tb/www;
    }
}
";

/// Polls `cond` (a shell condition) in `vm` every 0.1 s for up to 10 s.
fn wait_for(vm: &mut Vm, what: &str, cond: &str) -> Result<()> {
    let out = vm.run(&format!(
        "for i in $(seq 100); do {cond} && exit 0; sleep 0.1; done; exit 1"
    ))?;
    ensure!(
        out.status == 0,
        "vm `{}`: timed out waiting for {what}",
        vm.name()
    );
    Ok(())
}

#[test]
fn network_curl_nginx() -> Result<()> {
    let art = Artifacts::from_env()?;
    let net = Network::new()?;
    let marker = random_hex(16)?;
    let canary = format!("trustbind canary {marker}\n");
    let vms = net.boot_all(
        vec![
            net.vm("web").bytes("nginx.conf", NGINX_CONF, 0o644).bytes(
                "www/canary.txt",
                canary.clone(),
                0o644,
            ),
            net.vm("a"),
            net.vm("b"),
        ],
        &art,
    )?;
    let [mut web, mut a, mut b]: [Vm; 3] = vms
        .try_into()
        .map_err(|_| anyhow::anyhow!("boot_all returned the wrong number of VMs"))?;

    web.run_ok("nginx -t -c /tb/nginx.conf && nginx -c /tb/nginx.conf")?;
    wait_for(
        &mut web,
        "nginx to listen",
        "curl -sf -o /dev/null http://127.0.0.1/canary.txt",
    )?;

    let cap = net.start_capture("http")?;
    let url = format!("http://{}/canary.txt", web.ip());
    for vm in [&mut a, &mut b] {
        let out = vm.run_ok(&format!("curl -sS --max-time 30 {url}"))?;
        ensure!(
            out.stdout == canary,
            "vm `{}`: curl {url} returned {:?}, want {canary:?}",
            vm.name(),
            out.stdout
        );
    }
    let data = cap.stop()?;
    ensure!(
        data.contains(marker.as_bytes()),
        "the canary {marker} is not in the bridge capture {}",
        data.pcap().display()
    );
    ensure!(
        data.contains(b"GET /canary.txt HTTP/1.1"),
        "the HTTP request is not in the bridge capture {}",
        data.pcap().display()
    );
    let text = data.text()?;
    for vm in [&a, &b] {
        let flow = format!("{}.", vm.ip());
        let to_web = format!("> {}.80:", web.ip());
        ensure!(
            text.lines()
                .any(|l| l.contains(&flow) && l.contains(&to_web)),
            "no packet from vm `{}` ({}) to nginx in the decoded capture",
            vm.name(),
            vm.ip()
        );
    }
    let log = web.run_ok("cat /run/nginx-access.log")?.stdout;
    for vm in [&a, &b] {
        ensure!(
            log.lines().any(|l| l.starts_with(&format!("{} ", vm.ip()))
                && l.contains("\"GET /canary.txt HTTP/1.1\" 200")),
            "nginx access log has no 200 for vm `{}`:\n{log}",
            vm.name()
        );
    }

    // Plain TCP between two VMs with socat.
    let payload = format!("socat {}", random_hex(16)?);
    a.spawn_bg("exec socat -u TCP-LISTEN:5000,reuseaddr OPEN:/tmp/socat.out,creat,trunc")?;
    wait_for(
        &mut a,
        "socat to listen",
        "ss -Hltn 'sport = :5000' | grep -q LISTEN",
    )?;
    b.run_ok(&format!("echo {payload} | socat -u - TCP:{}:5000", a.ip()))?;
    wait_for(
        &mut a,
        "socat's data",
        &format!("grep -qx '{payload}' /tmp/socat.out"),
    )?;

    // A short iperf3 run (TCG: the number means nothing, the transfer does).
    web.run_ok("iperf3 -s -1 -D")?;
    wait_for(
        &mut web,
        "iperf3 to listen",
        "ss -Hltn 'sport = :5201' | grep -q LISTEN",
    )?;
    let out = b.run_ok(&format!("iperf3 -c {} -t 2 -f m", web.ip()))?;
    let receiver = out
        .stdout
        .lines()
        .find(|l| l.trim_end().ends_with("receiver"))
        .with_context(|| format!("no receiver summary in iperf3 output:\n{}", out.stdout))?;
    eprintln!("iperf3 b -> web (TCG): {}", receiver.trim());

    let mut first_err = None;
    for vm in [web, a, b] {
        if let Err(e) = vm.shutdown() {
            first_err.get_or_insert(e);
        }
    }
    match first_err {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}
