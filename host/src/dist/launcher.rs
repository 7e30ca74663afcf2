//! The built-in single-node launcher (`imgclf train --nproc-per-node N ...`): starts N ranks of
//! the same command with torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
//! MASTER_PORT), forwards SIGINT/SIGTERM/SIGHUP to them, and when one rank fails, gives the
//! others a moment to report it and then stops them all.

use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long the other ranks get, after one failed, to notice and exit on their own (they name
/// the failed rank) before they are sent SIGTERM, and then SIGKILL.
const GRACE: Duration = Duration::from_secs(15);
const KILL_AFTER: Duration = Duration::from_secs(10);

static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
}

fn install_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
}

/// A free TCP port on the loopback interface for the rendezvous store.
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "an unknown status".to_owned(),
    }
}

fn signal_all(children: &mut [(usize, Child)], sig: libc::c_int) {
    for (_, c) in children.iter() {
        // SAFETY: plain kill(2) on our own children's pids.
        unsafe {
            libc::kill(c.id() as libc::pid_t, sig);
        }
    }
}

/// libtorch's intra-op threads: `OMP_NUM_THREADS` when set (torchrun and this launcher set it
/// to share the cores between ranks), else every core.
pub fn intra_op_threads() -> usize {
    std::env::var("OMP_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// This process's arguments without `--nproc-per-node N` / `--nproc-per-node=N`: what each
/// rank runs.
pub fn rank_args() -> Vec<OsString> {
    strip_nproc(std::env::args_os().skip(1))
}

fn strip_nproc(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip_next = false;
    for a in args {
        if skip_next {
            skip_next = false;
            continue;
        }
        match a.to_str() {
            Some("--nproc-per-node") => skip_next = true,
            Some(s) if s.starts_with("--nproc-per-node=") => {}
            _ => out.push(a),
        }
    }
    out
}

/// Runs `args` (the `imgclf` arguments, without `--nproc-per-node`) as `nproc` ranks on this
/// machine; returns the exit code for the launcher: 0 when every rank succeeded, else the first
/// failed rank's code (128 + signal for a killed rank).
pub fn launch(nproc: usize, args: &[OsString]) -> Result<i32> {
    if nproc == 0 {
        bail!("--nproc-per-node must be at least 1");
    }
    let exe = std::env::current_exe().context("finding the imgclf executable")?;
    let port = match std::env::var("MASTER_PORT") {
        Ok(p) => p
            .parse::<u16>()
            .with_context(|| format!("MASTER_PORT={p:?} is not a port"))?,
        Err(_) => free_port()?,
    };
    let addr = std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".to_owned());
    // Each rank gets an equal share of the cores, as torchrun does (it sets 1).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads =
        std::env::var("OMP_NUM_THREADS").unwrap_or_else(|_| (cores / nproc).max(1).to_string());
    install_handlers();
    let mut children: Vec<(usize, Child)> = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        let mut cmd = Command::new(&exe);
        cmd.args(args);
        if !args.iter().any(|a| a == "train.distributed") {
            cmd.args(["train.distributed", "True"]);
        }
        cmd.env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", &addr)
            .env("MASTER_PORT", port.to_string())
            .env("OMP_NUM_THREADS", &threads)
            .env_remove("TORCHELASTIC_USE_AGENT_STORE")
            .env_remove("TORCHELASTIC_RESTART_COUNT")
            // Their own process group: a terminal's Ctrl-C reaches the launcher, which forwards
            // it once to every rank.
            .process_group(0);
        match cmd.spawn() {
            Ok(c) => children.push((rank, c)),
            Err(e) => {
                signal_all(&mut children, libc::SIGKILL);
                for (_, c) in &mut children {
                    let _ = c.wait();
                }
                return Err(e).with_context(|| format!("starting rank {rank} ({})", exe.display()));
            }
        }
    }
    supervise(children)
}

fn supervise(mut running: Vec<(usize, Child)>) -> Result<i32> {
    let mut first_failure: Option<(usize, ExitStatus)> = None;
    let mut failed_at: Option<Instant> = None;
    let mut termed = false;
    let mut killed = false;
    while !running.is_empty() {
        let sig = SIGNAL.swap(0, Ordering::SeqCst);
        if sig != 0 {
            tracing::warn!(
                "launcher: forwarding signal {sig} to {} rank(s)",
                running.len()
            );
            signal_all(&mut running, sig);
        }
        let mut i = 0;
        while i < running.len() {
            match running[i].1.try_wait() {
                Ok(Some(status)) => {
                    let (rank, _) = running.remove(i);
                    if !status.success() && first_failure.is_none() {
                        eprintln!(
                            "imgclf launcher: rank {rank} failed ({}); stopping the other ranks",
                            describe(status)
                        );
                        first_failure = Some((rank, status));
                        failed_at = Some(Instant::now());
                    }
                }
                Ok(None) => i += 1,
                Err(e) => return Err(e).context("waiting for a rank"),
            }
        }
        if let Some(t) = failed_at {
            if !termed && t.elapsed() > GRACE {
                signal_all(&mut running, libc::SIGTERM);
                termed = true;
            } else if termed && !killed && t.elapsed() > GRACE + KILL_AFTER {
                signal_all(&mut running, libc::SIGKILL);
                killed = true;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(match first_failure {
        None => 0,
        Some((_, status)) => status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ranks_run_the_command_without_the_launcher_option() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            strip_nproc(args(&["train", "--nproc-per-node", "2", "train.seed", "1"]).into_iter()),
            args(&["train", "train.seed", "1"])
        );
        assert_eq!(
            strip_nproc(args(&["train", "a", "b", "--nproc-per-node=4", "--dry-run"]).into_iter()),
            args(&["train", "a", "b", "--dry-run"])
        );
    }
}
