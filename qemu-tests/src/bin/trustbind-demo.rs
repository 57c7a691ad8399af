//! `trustbind-demo`: boots a protected host VM and shows the PEM working.
//! Run by `cargo xtask demo [--shell]`, which sets the artifact variables.
//!
//! Today it shows the module loading (hash drivers, known-answer
//! self-test), `/dev/trustbind` and the agent handshake, then exec control
//! answered by a stand-in agent (`tb-fakeagent`, an allowlist of hashes;
//! the real agent and appliance replace it in later parts): an approved
//! program runs, an unapproved one is refused. `--shell` then gives a
//! prompt whose lines run in the guest.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use trustbind_qemu_tests::{Artifacts, Network, Vm};

/// A guest binary built beside this one (`cargo xtask demo` builds them).
fn sibling(name: &str) -> Result<std::path::PathBuf, Box<dyn std::error::Error>> {
    let me = std::env::current_exe()?;
    let p = me.with_file_name(name);
    if !p.is_file() {
        return Err(format!("{} is missing: run `cargo xtask demo`", p.display()).into());
    }
    Ok(p)
}

fn step(title: &str) {
    println!("\n\x1b[1m== {title}\x1b[0m");
}

/// Runs `cmd` in the guest and prints it with its output.
fn show(vm: &mut Vm, cmd: &str) -> Result<i32, Box<dyn std::error::Error>> {
    println!("\x1b[2mguest# {cmd}\x1b[0m");
    let out = vm.run(cmd)?;
    print!("{}", out.stdout);
    eprint!("{}", out.stderr);
    if out.status != 0 {
        println!("\x1b[2m(exit status {})\x1b[0m", out.status);
    }
    Ok(out.status)
}

/// Polls `check` in the guest until it succeeds (at most a minute).
fn wait_for(vm: &mut Vm, check: &str, what: &str) -> Result<(), Box<dyn std::error::Error>> {
    for _ in 0..120 {
        if vm.run(check)?.status == 0 {
            return Ok(());
        }
        vm.run("sleep 0.5")?;
    }
    Err(format!("timed out waiting for {what}").into())
}

fn kernel_log(vm: &mut Vm, since: &mut usize) -> Result<(), Box<dyn std::error::Error>> {
    let dmesg = vm.run("dmesg")?.stdout;
    let lines: Vec<&str> = dmesg.lines().collect();
    for l in lines
        .iter()
        .skip(*since)
        .filter(|l| l.contains("trustbind"))
    {
        println!("  kernel: {l}");
    }
    *since = lines.len();
    Ok(())
}

fn demo(shell: bool) -> Result<(), Box<dyn std::error::Error>> {
    let art = Artifacts::from_env()?;
    let net = Network::new()?;
    step("Booting a protected host VM (Debian 12 userland, our kernel)");
    let mut vm = net
        .vm("host-a")
        .file("tb-devcheck", sibling("tb-devcheck")?, 0o755)
        .file("tb-fakeagent", sibling("tb-fakeagent")?, 0o755)
        .boot(&art)?;
    show(&mut vm, "uname -r; head -1 /etc/os-release")?;
    let mut seen = vm.run("dmesg")?.stdout.lines().count();

    step("Loading the PEM");
    show(&mut vm, "insmod /tb/trustbind.ko")?;
    kernel_log(&mut vm, &mut seen)?;
    show(&mut vm, "ls -l /dev/trustbind")?;

    step("The agent channel, exercised from user space (tb-devcheck)");
    show(&mut vm, "/tb/tb-devcheck")?;
    kernel_log(&mut vm, &mut seen)?;

    step("Exec control, enforce mode, answered by a stand-in agent");
    show(
        &mut vm,
        "mkdir -p /tmp/x && cp /usr/bin/true /tmp/x/unknown && printf x >>/tmp/x/unknown \
         && chmod 755 /tmp/x/unknown",
    )?;
    vm.spawn_bg(
        "exec /tb/tb-fakeagent --mode enforce --timeout-ms 10000 --allow-dir /usr/bin \
         --allow-dir /usr/sbin --allow-dir /tb --allow /lib64/ld-linux-x86-64.so.2 --log /run/agent.log",
    )?;
    wait_for(
        &mut vm,
        "grep -q '^ready' /run/agent.log",
        "the stand-in agent to start",
    )?;
    show(&mut vm, "curl --version | head -1")?;
    show(&mut vm, "/tmp/x/unknown")?;
    show(&mut vm, "sha256sum /usr/bin/curl /tmp/x/unknown")?;
    println!("  what the agent was asked:");
    let log = vm.run("grep -E 'exec (/usr/bin/curl|/tmp/x/unknown) ' /run/agent.log")?;
    for l in log.stdout.lines() {
        println!("  agent: {l}");
    }
    kernel_log(&mut vm, &mut seen)?;

    if shell {
        step("Guest shell (each line runs with sh -c; `exit` or EOF leaves)");
        let stdin = std::io::stdin();
        loop {
            print!("guest# ");
            std::io::stdout().flush()?;
            let mut line = String::new();
            if stdin.lock().read_line(&mut line)? == 0 || line.trim() == "exit" {
                break;
            }
            if !line.trim().is_empty() {
                show(&mut vm, line.trim())?;
            }
        }
    }

    step("Unloading");
    vm.run_ok("pkill -TERM -x tb-fakeagent")?;
    wait_for(
        &mut vm,
        "grep -q '^stopped' /run/agent.log",
        "the stand-in agent to stop",
    )?;
    show(&mut vm, "rmmod trustbind")?;
    kernel_log(&mut vm, &mut seen)?;
    vm.shutdown()?;
    println!("\nThe VM shut down cleanly: no kernel warning, no unexpected taint.");
    Ok(())
}

fn main() -> ExitCode {
    let shell = std::env::args().any(|a| a == "--shell");
    match demo(shell) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}
