//! Channel throughput and connect latency, measured in one run of the
//! appliance and two protected host VMs (a benchmark, not a test: it
//! asserts nothing about speed). Run by `cargo xtask bench` (`--ignored`);
//! prints a table.
//!
//! Throughput: `iperf3` from `a` to `b` over plaintext TCP (port 5201, a
//! policy permit without `encrypt`), over a Trustbind channel (port 7201,
//! `@encrypt("required")`: kTLS TLS 1.3 AES-256-GCM installed by both
//! kernels), over a WireGuard tunnel between the same two VMs
//! (plaintext TCP inside it), and over a channel with TLS 1.2 records
//! (port 7204, `@encrypt("offload")`; software here: no offload NIC). Connect latency: a perl client making
//! sequential connects to a perl server (accept, close) with the hosts'
//! group in disabled mode (nothing asked: the PEM's baseline), in enforce
//! mode to a plaintext port (each end asked of the appliance), and to a
//! channel port (asked, paired, keyed, kTLS installed on both ends).
//! Under TCG, AES-GCM and ChaCha20 run emulated and every number is an
//! emulation figure; the ratios within the run are what counts.

use anyhow::{Context, Result};
use trustbind_qemu_tests::Vm;

use crate::channel_e2e::{setup, Setup};
use crate::common::{wait_for, STATE};

/// Seconds per iperf3 run (a smoke run's: 1).
fn seconds() -> u32 {
    trustbind_qemu_tests::bench_size(8, 1)
}
/// Sequential connects per latency run (a smoke run's: 3).
fn connects() -> u32 {
    trustbind_qemu_tests::bench_size(20, 3)
}

/// Plaintext on 5201 and 7203, channels on 7201 and 7202, a TLS 1.2
/// (`@encrypt("offload")`) channel on 7204 (iperf3 and the perl pair are
/// in both channel groups).
const POLICY: &str = r#"
@id("bench-plain")
permit (
    principal,
    action in [Trustbind::Action::"connect", Trustbind::Action::"accept"],
    resource
)
when {
    (resource.port == 5201 || resource.port == 7203) &&
    context.program in Trustbind::ProgramGroup::"channel-clients"
};

@id("bench-channel-connect")
@encrypt("required")
permit (
    principal,
    action == Trustbind::Action::"connect",
    resource
)
when {
    (resource.port == 7201 || resource.port == 7202) &&
    context.program in Trustbind::ProgramGroup::"channel-clients"
};

@id("bench-channel-accept")
@encrypt("required")
permit (
    principal,
    action == Trustbind::Action::"accept",
    resource
)
when {
    (resource.port == 7201 || resource.port == 7202) &&
    context.program in Trustbind::ProgramGroup::"channel-servers" &&
    context has peer_program &&
    context.peer_program in Trustbind::ProgramGroup::"channel-clients"
};

@id("bench-offload-connect")
@encrypt("offload")
permit (
    principal,
    action == Trustbind::Action::"connect",
    resource
)
when {
    resource.port == 7204 &&
    context.program in Trustbind::ProgramGroup::"channel-clients"
};

@id("bench-offload-accept")
@encrypt("offload")
permit (
    principal,
    action == Trustbind::Action::"accept",
    resource
)
when {
    resource.port == 7204 &&
    context.program in Trustbind::ProgramGroup::"channel-servers" &&
    context has peer_program &&
    context.peer_program in Trustbind::ProgramGroup::"channel-clients"
};
"#;

/// iperf3 from `a` to `server`:`port` (a server already listens); the
/// receiver's Mbit/s.
fn iperf(a: &mut Vm, server: &str, port: u16) -> Result<f64> {
    let out = a.run_ok(&format!(
        "iperf3 -c {server} -p {port} -t {} -f m",
        seconds()
    ))?;
    let line = out
        .stdout
        .lines()
        .find(|l| l.trim_end().ends_with("receiver"))
        .with_context(|| format!("no receiver line in iperf3 output:\n{}", out.stdout))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| *w == "Mbits/sec")
        .context("no Mbits/sec")?;
    words[at - 1].parse().context("iperf3 rate")
}

/// Starts a one-shot iperf3 server on `b` at `port`.
fn iperf_server(b: &mut Vm, port: u16) -> Result<()> {
    b.run_ok(&format!("iperf3 -s -1 -D -p {port}"))?;
    wait_for(
        b,
        "iperf3 to listen",
        &format!("grep -q ':{port:04X} 00000000:0000 0A \\|:{port:04X} 00000000000000000000000000000000:0000 0A ' /proc/net/tcp /proc/net/tcp6"),
        120,
    )
}

/// Mean milliseconds per connect of [`connects`] sequential connects from
/// `a` to a perl server on `b` at `port` (accepts and closes).
fn connect_ms(a: &mut Vm, b: &mut Vm, port: u16) -> Result<f64> {
    b.spawn_bg(&format!(
        "exec perl -MSocket -e 'socket(S, PF_INET, SOCK_STREAM, 0) or die; \
         setsockopt(S, SOL_SOCKET, SO_REUSEADDR, 1); \
         bind(S, pack_sockaddr_in({port}, INADDR_ANY)) or die; listen(S, 64) or die; \
         while (accept(C, S)) {{ close C }}'"
    ))?;
    wait_for(
        b,
        "the perl server",
        &format!("grep -q ':{port:04X} 00000000:0000 0A ' /proc/net/tcp"),
        120,
    )?;
    let b_ip = b.ip().to_string();
    // perl-base has no Time::HiRes: time the run from the shell, minus a
    // run of the same script with no connect (perl's own start-up).
    let script = |n: u32| {
        format!(
            "perl -MSocket -e '$a = inet_aton(\"{b_ip}\"); \
             for (1..{n}) {{ socket(S, PF_INET, SOCK_STREAM, 0) or die; \
             connect(S, pack_sockaddr_in({port}, $a)) or die \"connect: $!\"; close S }}'"
        )
    };
    let out = a.run_ok(&format!(
        "s=$(date +%s%N); {}; m=$(date +%s%N); {}; e=$(date +%s%N); echo $((m - s)) $((e - m))",
        script(connects()),
        script(0)
    ))?;
    b.run_ok(&format!(
        "pkill -f '[p]ack_sockaddr_in.{port}, INADDR' || true"
    ))?;
    let ns: Vec<f64> = out
        .stdout
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("connect timing: {:?}", out.stdout))?;
    let [with, without] = ns[..] else {
        anyhow::bail!("connect timing: {:?}", out.stdout)
    };
    Ok((with - without) / 1e6 / f64::from(connects()))
}

/// Sets both hosts' group mode and waits until both agents applied it.
fn mode(s: &mut Setup, mode: &str) -> Result<()> {
    s.admin
        .run(&["host", "group", "set", "hosts", "--mode", mode])?;
    for vm in [&mut s.a, &mut s.b] {
        wait_for(
            vm,
            &format!("{mode} mode"),
            &format!("grep -q '\"mode\": \"{mode}\"' {STATE}/status.json"),
            120,
        )?;
    }
    Ok(())
}

#[test]
#[ignore = "benchmark: run by `cargo xtask bench`"]
fn bench_channel() -> Result<()> {
    let mut s = setup(POLICY)?;
    let b_ip = s.b.ip().to_string();

    // WireGuard between a (10.200.0.1) and b (10.200.0.2).
    let keys = |vm: &mut Vm| -> Result<String> {
        vm.run_ok(
            "umask 077; wg genkey >/tmp/x/wg.key && wg pubkey </tmp/x/wg.key >/tmp/x/wg.pub",
        )?;
        Ok(vm.run_ok("cat /tmp/x/wg.pub")?.stdout.trim().to_owned())
    };
    let (pa, pb) = (keys(&mut s.a)?, keys(&mut s.b)?);
    let a_ip = s.a.ip().to_string();
    for (vm, me, peer, peer_ip, peer_key) in [
        (&mut s.a, "10.200.0.1", "10.200.0.2", &b_ip, &pb),
        (&mut s.b, "10.200.0.2", "10.200.0.1", &a_ip, &pa),
    ] {
        vm.run_ok(&format!(
            "ip link add wg0 type wireguard && wg set wg0 private-key /tmp/x/wg.key \
             listen-port 51820 peer {peer_key} allowed-ips {peer}/32 endpoint {peer_ip}:51820 \
             && ip addr add {me}/24 dev wg0 && ip link set wg0 up"
        ))?;
    }

    let mut rows: Vec<(&str, f64)> = Vec::new();
    iperf_server(&mut s.b, 5201)?;
    rows.push(("plaintext TCP", iperf(&mut s.a, &b_ip, 5201)?));
    iperf_server(&mut s.b, 7201)?;
    rows.push(("Trustbind channel (kTLS)", iperf(&mut s.a, &b_ip, 7201)?));
    let aead = s
        .a
        .run_ok("grep -A3 '^name *: gcm(aes)$' /proc/crypto | sed -n 's/^driver *: //p' | head -1")?
        .stdout
        .trim()
        .to_owned();
    iperf_server(&mut s.b, 5201)?;
    rows.push(("WireGuard", iperf(&mut s.a, "10.200.0.2", 5201)?));
    iperf_server(&mut s.b, 7204)?;
    rows.push((
        "Trustbind channel, TLS 1.2 records (offload terms; no offload NIC here)",
        iperf(&mut s.a, &b_ip, 7204)?,
    ));

    let plain = connect_ms(&mut s.a, &mut s.b, 7203)?;
    let channel = connect_ms(&mut s.a, &mut s.b, 7202)?;
    mode(&mut s, "disabled")?;
    let off = connect_ms(&mut s.a, &mut s.b, 7203)?;

    eprintln!(
        "\nchannel benchmark (TCG emulation unless KVM was used; {} s per iperf3 run; \
         kTLS AEAD driver {aead:?})",
        seconds()
    );
    eprintln!("| path | Mbit/s | vs plaintext |");
    eprintln!("|---|---:|---:|");
    let base = rows[0].1;
    for (name, mbit) in &rows {
        eprintln!("| {name} | {mbit:.1} | {:.2} |", mbit / base);
    }
    eprintln!(
        "channel / WireGuard: {:.2}",
        rows[1].1 / rows[2].1.max(f64::MIN_POSITIVE)
    );
    eprintln!(
        "\n| connect ({} sequential, a → b) | ms each | vs PEM off |",
        connects()
    );
    eprintln!("|---|---:|---:|");
    for (name, ms) in [
        ("PEM off (host group disabled)", off),
        ("PEM on, plaintext port", plain),
        ("PEM on, channel port", channel),
    ] {
        eprintln!("| {name} | {ms:.2} | {:.2} |", ms / off);
    }
    let Setup { a, b, c, .. } = s;
    for vm in [a, b, c] {
        vm.shutdown()?;
    }
    Ok(())
}
