//! Data-parallel training's process world on libtorch's c10d: who this process is (rank, world
//! size, local rank from torchrun's environment or `train.dist.*`), the rendezvous store
//! (torchrun's agent store, or rank 0's own `TCPStore` for `init_method tcp://` and the built-in
//! launcher), the process group (Gloo on CPU, NCCL on CUDA), and a liveness record in the store
//! so that a rank whose collective fails can name the rank that died or hangs.

pub mod c10d;
pub mod launcher;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::config::Config;
pub use c10d::{ProcessGroup, ReduceOp, Store, Work};

/// The collective backend (`train.dist.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Gloo,
    Nccl,
}

/// Where and who: resolved from `train.dist.*` and the launcher's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub host: String,
    pub port: u16,
    /// Whether this process serves the TCPStore (false under torchrun, whose agent does).
    pub is_server: bool,
    /// torchrun's restart count: keys of earlier attempts are never read again.
    pub restart: u64,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn env_number<T: std::str::FromStr>(name: &str) -> Result<Option<T>> {
    env(name)
        .map(|v| {
            v.parse::<T>()
                .ok()
                .with_context(|| format!("environment variable {name}={v:?} is not a number"))
        })
        .transpose()
}

impl Rendezvous {
    /// From the config and an environment lookup (`std::env::var` in production).
    pub fn resolve(
        init_method: &str,
        world_size: i64,
        node_rank: i64,
        local_rank: i64,
    ) -> Result<Rendezvous> {
        let rank = if node_rank >= 0 {
            node_rank as usize
        } else {
            env_number::<usize>("RANK")?.context(
                "train.distributed True needs this process's rank: run under torchrun or \
                 `imgclf train --nproc-per-node N` (they set RANK), or set train.dist.node_rank",
            )?
        };
        let world_size = if world_size > 0 {
            world_size as usize
        } else {
            env_number::<usize>("WORLD_SIZE")?.context(
                "train.distributed True needs the world size: WORLD_SIZE (torchrun sets it) or \
                 train.dist.world_size",
            )?
        };
        if rank >= world_size {
            bail!("rank {rank} is not below the world size {world_size}");
        }
        let local_rank = match env_number::<usize>("LOCAL_RANK")? {
            Some(l) => l,
            None => usize::try_from(local_rank)
                .ok()
                .context("train.dist.local_rank must be 0 or more")?,
        };
        let (host, port) = if init_method == "env://" {
            let host = env("MASTER_ADDR").context(
                "train.dist.init_method env:// needs MASTER_ADDR (torchrun and imgclf's \
                 launcher set it)",
            )?;
            let port = env_number::<u16>("MASTER_PORT")?
                .context("train.dist.init_method env:// needs MASTER_PORT")?;
            (host, port)
        } else if let Some(addr) = init_method.strip_prefix("tcp://") {
            let (h, p) = addr.rsplit_once(':').with_context(|| {
                format!("train.dist.init_method {init_method:?} must be tcp://HOST:PORT")
            })?;
            let port = p.parse::<u16>().ok().with_context(|| {
                format!("train.dist.init_method {init_method:?}: {p:?} is not a port")
            })?;
            (h.trim_matches(['[', ']']).to_owned(), port)
        } else {
            bail!("train.dist.init_method must be env:// or tcp://HOST:PORT, not {init_method:?}");
        };
        let agent_store = env("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True");
        let restart = env_number::<u64>("TORCHELASTIC_RESTART_COUNT")?.unwrap_or(0);
        Ok(Rendezvous {
            rank,
            world_size,
            local_rank,
            host,
            port,
            is_server: rank == 0 && !agent_store,
            restart,
        })
    }
}

/// This process's place among the ranks, with the store and group it reaches them through.
pub struct World {
    pub rendezvous: Rendezvous,
    pub backend: Backend,
    pub timeout: Duration,
    pub group: ProcessGroup,
    store: Arc<Store>,
    stop: Arc<AtomicBool>,
    heartbeat: Option<std::thread::JoinHandle<()>>,
}

/// The distributed keys' values.
#[derive(Debug, Clone)]
pub struct Settings {
    pub backend: Backend,
    pub init_method: String,
    pub world_size: i64,
    pub node_rank: i64,
    pub local_rank: i64,
    pub use_sync_bn: bool,
    pub timeout: Duration,
}

impl Settings {
    pub fn from_config(config: &Config) -> Result<Settings> {
        let backend = match config.str("train.dist.backend") {
            "gloo" => Backend::Gloo,
            "nccl" => Backend::Nccl,
            other => bail!("train.dist.backend must be nccl or gloo, not {other:?}"),
        };
        let secs = config.float("train.dist.timeout");
        if !(secs.is_finite() && secs > 0.0) {
            bail!("train.dist.timeout must be a positive number of seconds, not {secs}");
        }
        Ok(Settings {
            backend,
            init_method: config.str("train.dist.init_method").to_owned(),
            world_size: config.int("train.dist.world_size"),
            node_rank: config.int("train.dist.node_rank"),
            local_rank: config.int("train.dist.local_rank"),
            use_sync_bn: config.bool("train.dist.use_sync_bn"),
            timeout: Duration::from_secs_f64(secs),
        })
    }
}

const HEARTBEAT: Duration = Duration::from_millis(500);

impl World {
    /// Joins the ranks: store, process group, liveness record.
    pub fn join(settings: &Settings) -> Result<World> {
        let rv = Rendezvous::resolve(
            &settings.init_method,
            settings.world_size,
            settings.node_rank,
            settings.local_rank,
        )?;
        let base = Store::tcp(
            &rv.host,
            rv.port,
            rv.is_server,
            Some(rv.world_size),
            false,
            settings.timeout,
        )?;
        let store = Arc::new(base.prefixed(&format!("imgclf/attempt{}/", rv.restart))?);
        let group_store = store.prefixed("pg/")?;
        let group = match settings.backend {
            Backend::Gloo => ProcessGroup::gloo(
                &group_store,
                rv.rank,
                rv.world_size,
                &gloo_hostname(&rv.host),
                settings.timeout,
            )?,
            Backend::Nccl => ProcessGroup::nccl(
                &group_store,
                rv.rank,
                rv.world_size,
                rv.local_rank,
                settings.timeout,
            )?,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let heartbeat = {
            let (store, stop, key) = (store.clone(), stop.clone(), alive_key(rv.rank));
            std::thread::Builder::new()
                .name("imgclf-heartbeat".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if store.add(&key, 1).is_err() {
                            break;
                        }
                        std::thread::sleep(HEARTBEAT);
                    }
                })
                .context("starting the heartbeat thread")?
        };
        Ok(World {
            rendezvous: rv,
            backend: settings.backend,
            timeout: settings.timeout,
            group,
            store,
            stop,
            heartbeat: Some(heartbeat),
        })
    }

    pub fn rank(&self) -> usize {
        self.rendezvous.rank
    }

    pub fn size(&self) -> usize {
        self.rendezvous.world_size
    }

    /// Explains a failed collective: which ranks reported a failure, which stopped beating.
    pub fn diagnose(&self) -> String {
        let others: Vec<usize> = (0..self.size()).filter(|&r| r != self.rank()).collect();
        let mut failed = Vec::new();
        for &r in &others {
            match self.store.contains(&failed_key(r)) {
                Ok(true) => {
                    let msg = self.store.get(&failed_key(r)).unwrap_or_default();
                    failed.push(format!(
                        "rank {r} failed: {}",
                        String::from_utf8_lossy(&msg)
                    ));
                }
                Ok(false) => {}
                Err(_) => {
                    let host = &self.rendezvous;
                    return format!(
                        "the rendezvous store at {}:{} is unreachable (rank 0, which serves it \
                         unless torchrun does, has probably died)",
                        host.host, host.port
                    );
                }
            }
        }
        if !failed.is_empty() {
            return failed.join("; ");
        }
        let beats = |store: &Store| -> Vec<i64> {
            others
                .iter()
                .map(|&r| store.add(&alive_key(r), 0).unwrap_or(-1))
                .collect()
        };
        let before = beats(&self.store);
        std::thread::sleep(HEARTBEAT * 6);
        let after = beats(&self.store);
        let stopped: Vec<String> = others
            .iter()
            .zip(before.iter().zip(&after))
            .filter(|(_, (b, a))| b == a)
            .map(|(r, _)| format!("rank {r}"))
            .collect();
        if stopped.is_empty() {
            "every other rank is still alive (a rank may be stuck in a long step or have \
             diverged in its sequence of collectives)"
                .to_owned()
        } else {
            format!(
                "{} stopped responding (died or hangs: no heartbeat for {:.0} s)",
                stopped.join(", "),
                (HEARTBEAT * 6).as_secs_f64()
            )
        }
    }

    /// Wraps a collective's error with the diagnosis.
    pub fn fail(&self, what: &str, err: anyhow::Error) -> anyhow::Error {
        let why = self.diagnose();
        err.context(format!(
            "rank {} of {}: {what} failed: {why}",
            self.rank(),
            self.size()
        ))
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.heartbeat.take() {
            let _ = h.join();
        }
    }
}

/// The store and rank of this process's world, kept for [`report_failure`] (which runs after
/// the trainer and its world are gone: the store stays open until the process exits).
static FAILURE_STORE: std::sync::Mutex<Option<(Arc<Store>, usize)>> = std::sync::Mutex::new(None);

/// Lets [`report_failure`] reach the other ranks of `world`.
pub fn remember_for_failures(world: &World) {
    if let Ok(mut g) = FAILURE_STORE.lock() {
        *g = Some((world.store.clone(), world.rank()));
    }
}

/// Records that this rank is failing with `message` (the other ranks name it in their errors).
/// Does nothing outside a distributed run.
pub fn report_failure(message: &str) {
    let entry = FAILURE_STORE.lock().ok().and_then(|g| g.clone());
    if let Some((store, rank)) = entry {
        let _ = store.set(&failed_key(rank), message.as_bytes());
    }
}

fn alive_key(rank: usize) -> String {
    format!("alive/{rank}")
}

fn failed_key(rank: usize) -> String {
    format!("failed/{rank}")
}

/// The address Gloo's transport binds to: `GLOO_SOCKET_IFNAME`'s interface when set (as in
/// PyTorch), loopback when the master is on this machine's loopback, else this host's name.
fn gloo_hostname(master: &str) -> String {
    if let Some(ifname) = env("GLOO_SOCKET_IFNAME") {
        return format!("if:{ifname}");
    }
    if master == "localhost" || master.starts_with("127.") || master == "::1" {
        return "127.0.0.1".to_owned();
    }
    String::new()
}
