//! How the ranks of a training run cooperate: rank and world size, who writes the output
//! directory, the broadcast of the initial weights, gradient reduction, reduction of metric
//! sums and barriers. A single process is a world of one where every operation does nothing.

use anyhow::{Context, Result};
use imgclf_plugin_api::NamedTensor;
use tch::{Kind, Tensor};

use crate::dist::{ReduceOp, Settings, World};

pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Whether this rank writes the run's files (config, logs, metrics, checkpoints).
    fn is_writer(&self) -> bool {
        self.rank() == 0
    }
    /// Makes every rank start from rank 0's parameters and buffers.
    fn broadcast(&mut self, _tensors: &[NamedTensor]) -> Result<()> {
        Ok(())
    }
    /// Averages the gradients of one step across ranks, after every backward of the step.
    fn reduce_gradients(&mut self, _grads: &[Tensor]) -> Result<()> {
        Ok(())
    }
    /// Sums `values` element-wise across ranks (metric sums of a sharded evaluation).
    fn reduce_sums(&mut self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
    /// Fails unless every rank holds the same values in `tensors` (checked at the end of a
    /// data-parallel run).
    fn verify_identical(&mut self, _tensors: &[NamedTensor]) -> Result<()> {
        Ok(())
    }
}

/// One process: rank 0 of a world of one.
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
}

/// The collective `train.distributed` asks for: a world of one, or the data-parallel ranks
/// joined through c10d (store, process group; SyncBatchNorm with `train.dist.use_sync_bn`).
pub fn from_config(config: &crate::config::Config) -> Result<Box<dyn Collective>> {
    if !config.bool("train.distributed") {
        return Ok(Box::new(SingleProcess));
    }
    let settings = Settings::from_config(config)?;
    Ok(Box::new(DataParallel::join(&settings)?))
}

/// The run directory to continue when torchrun restarted this rank (`--max-restarts`:
/// `TORCHELASTIC_RESTART_COUNT` > 0) and the first attempt left one; None otherwise or when
/// `explicit` (`--resume` given, or a dry run).
pub fn restarted_run(config: &crate::config::Config, explicit: bool) -> Option<std::path::PathBuf> {
    if explicit || !config.bool("train.distributed") {
        return None;
    }
    let restart: u64 = std::env::var("TORCHELASTIC_RESTART_COUNT")
        .ok()?
        .parse()
        .ok()?;
    let dir = std::path::PathBuf::from(config.str("train.output_dir"));
    (restart > 0 && dir.join("config.yaml").exists()).then_some(dir)
}

/// The device of this rank: `cuda` becomes `cuda:LOCAL_RANK` (torchrun's one GPU per rank).
pub fn device_for_rank(config: &crate::config::Config, device: tch::Device) -> Result<tch::Device> {
    if !config.bool("train.distributed") {
        return Ok(device);
    }
    let settings = Settings::from_config(config)?;
    match (device, settings.backend) {
        (tch::Device::Cpu, crate::dist::Backend::Nccl) => anyhow::bail!(
            "train.dist.backend nccl reduces CUDA tensors, but device is cpu: set train.dist.backend gloo"
        ),
        (tch::Device::Cuda(_), _) => {
            let rv = crate::dist::Rendezvous::resolve(
                &settings.init_method,
                settings.world_size,
                settings.node_rank,
                settings.local_rank,
            )?;
            Ok(tch::Device::Cuda(rv.local_rank))
        }
        (d, _) => Ok(d),
    }
}

/// `--dry-run`: checks the distributed keys and the launcher's environment and says where the
/// ranks would meet, without joining them; the run itself is a world of one.
pub fn dry_run(config: &crate::config::Config) -> Result<Box<dyn Collective>> {
    if config.bool("train.distributed") {
        let settings = Settings::from_config(config)?;
        let rv = crate::dist::Rendezvous::resolve(
            &settings.init_method,
            settings.world_size,
            settings.node_rank,
            settings.local_rank,
        )?;
        println!(
            "distributed: rank {} of {} (local rank {}), {:?} backend{}, rendezvous {}:{} ({}), \
             timeout {} s; not joined in a dry run",
            rv.rank,
            rv.world_size,
            rv.local_rank,
            settings.backend,
            if settings.use_sync_bn {
                ", SyncBatchNorm"
            } else {
                ""
            },
            rv.host,
            rv.port,
            if rv.is_server {
                "this rank serves the store"
            } else {
                "client"
            },
            settings.timeout.as_secs_f64()
        );
    }
    Ok(Box::new(SingleProcess))
}

/// PyTorch DDP's bucket size (`bucket_cap_mb` 25) and its smaller first bucket (1 MB), so the
/// reduction of the last layers' gradients, ready first, starts early.
pub const BUCKET_BYTES: usize = 25 * 1024 * 1024;
pub const FIRST_BUCKET_BYTES: usize = 1024 * 1024;

/// Data-parallel training over c10d: rank 0's weights broadcast at start, gradients summed in
/// buckets and divided by the world size, metric sums added up, rank 0 the only writer.
pub struct DataParallel {
    world: World,
    bucket_bytes: usize,
    first_bucket_bytes: usize,
    /// The model's buffers (BatchNorm running statistics), made rank 0's after every step as
    /// PyTorch DDP's `broadcast_buffers`; not needed with SyncBatchNorm (already equal).
    buffers: Vec<Tensor>,
    sync_bn: bool,
}

impl DataParallel {
    pub fn join(settings: &Settings) -> Result<DataParallel> {
        let world = World::join(settings)?;
        if settings.use_sync_bn && world.size() > 1 {
            world.group.sync_batch_norm(true)?;
        }
        crate::dist::remember_for_failures(&world);
        tracing::info!(
            "rank {} of {} joined ({:?}, store {}:{}{})",
            world.rank(),
            world.size(),
            world.backend,
            world.rendezvous.host,
            world.rendezvous.port,
            if settings.use_sync_bn {
                ", SyncBatchNorm"
            } else {
                ""
            }
        );
        Ok(DataParallel {
            world,
            bucket_bytes: BUCKET_BYTES,
            first_bucket_bytes: FIRST_BUCKET_BYTES,
            buffers: Vec::new(),
            sync_bn: settings.use_sync_bn,
        })
    }

    fn fail(&self, what: &str, err: anyhow::Error) -> anyhow::Error {
        self.world.fail(what, err)
    }

    /// Rank 0's buffers to every rank, one flat tensor per dtype.
    fn broadcast_buffers(&self) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            let mut kinds: Vec<Kind> = Vec::new();
            for b in &self.buffers {
                if !kinds.contains(&b.kind()) {
                    kinds.push(b.kind());
                }
            }
            for kind in kinds {
                let members: Vec<&Tensor> =
                    self.buffers.iter().filter(|b| b.kind() == kind).collect();
                let flat = Tensor::cat(
                    &members.iter().map(|b| b.flatten(0, -1)).collect::<Vec<_>>(),
                    0,
                );
                self.world
                    .group
                    .broadcast(&flat, 0)
                    .and_then(|w| w.wait())
                    .map_err(|e| self.fail("broadcasting the buffers", e))?;
                let mut offset = 0;
                for b in members {
                    let k = b.numel() as i64;
                    b.shallow_clone()
                        .f_copy_(&flat.narrow(0, offset, k).view_as(b))?;
                    offset += k;
                }
            }
            Ok(())
        })
    }
}

/// Consecutive runs of `sizes` (bytes) whose total stays within the cap (the first run within
/// `first`); a tensor larger than the cap is a bucket of its own.
pub fn buckets(sizes: &[usize], first: usize, cap: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, &s) in sizes.iter().enumerate() {
        let limit = if out.is_empty() { first } else { cap };
        if i > start && bytes + s > limit {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += s;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

impl Collective for DataParallel {
    fn rank(&self) -> usize {
        self.world.rank()
    }
    fn world_size(&self) -> usize {
        self.world.size()
    }
    fn broadcast(&mut self, tensors: &[NamedTensor]) -> Result<()> {
        self.buffers = tensors
            .iter()
            .filter(|t| !t.trainable)
            .map(|t| t.tensor.shallow_clone())
            .collect();
        tch::no_grad(|| -> Result<()> {
            for t in tensors {
                let buf = t.tensor.contiguous();
                let r = self.world.group.broadcast(&buf, 0).and_then(|w| w.wait());
                r.map_err(|e| self.fail(&format!("broadcasting {}", t.name), e))?;
                if buf.data_ptr() != t.tensor.data_ptr() {
                    t.tensor.shallow_clone().f_copy_(&buf)?;
                }
            }
            Ok(())
        })
    }
    fn reduce_gradients(&mut self, grads: &[Tensor]) -> Result<()> {
        if !self.sync_bn {
            self.broadcast_buffers()?;
        }
        if grads.is_empty() {
            return Ok(());
        }
        // DDP's order: the last layers' gradients (ready first in backward) go first.
        let order: Vec<usize> = (0..grads.len()).rev().collect();
        let sizes: Vec<usize> = order
            .iter()
            .map(|&i| grads[i].numel() * grads[i].kind().elt_size_in_bytes())
            .collect();
        let n = self.world.size() as f64;
        tch::no_grad(|| -> Result<()> {
            let mut pending = Vec::new();
            for range in buckets(&sizes, self.first_bucket_bytes, self.bucket_bytes) {
                let members: Vec<&Tensor> = order[range].iter().map(|&i| &grads[i]).collect();
                // One flat buffer per bucket and dtype (Gloo reduces one dtype at a time).
                let mut by_kind: Vec<(Kind, Vec<&Tensor>)> = Vec::new();
                for g in members {
                    match by_kind.iter_mut().find(|(k, _)| *k == g.kind()) {
                        Some((_, v)) => v.push(g),
                        None => by_kind.push((g.kind(), vec![g])),
                    }
                }
                for (_, gs) in by_kind {
                    let flat =
                        Tensor::cat(&gs.iter().map(|g| g.flatten(0, -1)).collect::<Vec<_>>(), 0);
                    let work = self
                        .world
                        .group
                        .all_reduce(&flat, ReduceOp::Sum)
                        .map_err(|e| self.fail("a gradient all-reduce", e))?;
                    pending.push((work, flat, gs));
                }
            }
            for (work, flat, gs) in pending {
                work.wait()
                    .map_err(|e| self.fail("a gradient all-reduce", e))?;
                let flat = flat.f_div_scalar(n)?;
                let mut offset = 0;
                for g in gs {
                    let k = g.numel() as i64;
                    g.shallow_clone()
                        .f_copy_(&flat.narrow(0, offset, k).view_as(g))?;
                    offset += k;
                }
            }
            Ok(())
        })
    }
    fn reduce_sums(&mut self, values: &mut [f64]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let t = Tensor::from_slice(values).to_kind(Kind::Double);
        let t = match self.world.backend {
            crate::dist::Backend::Nccl => {
                t.to_device(tch::Device::Cuda(self.world.rendezvous.local_rank))
            }
            crate::dist::Backend::Gloo => t,
        };
        self.world
            .group
            .all_reduce(&t, ReduceOp::Sum)
            .and_then(|w| w.wait())
            .map_err(|e| self.fail("reducing metric sums", e))?;
        let v = Vec::<f64>::try_from(&t.to_device(tch::Device::Cpu))
            .context("reading the reduced sums")?;
        values.copy_from_slice(&v);
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        self.world
            .group
            .barrier()
            .and_then(|w| w.wait())
            .map_err(|e| self.fail("a barrier", e))
    }
    fn verify_identical(&mut self, tensors: &[NamedTensor]) -> Result<()> {
        // Per tensor, two fingerprints (sum, and sum weighted by position) in float64; equal
        // tensors add up across ranks to N times their own, different ones (almost surely) not.
        let mine: Vec<f64> = tch::no_grad(|| {
            tensors
                .iter()
                .flat_map(|t| {
                    let x = t
                        .tensor
                        .to_device(tch::Device::Cpu)
                        .to_kind(Kind::Double)
                        .flatten(0, -1);
                    let w = Tensor::arange(x.size()[0], (Kind::Double, tch::Device::Cpu)).sin();
                    [
                        x.sum(Kind::Double).double_value(&[]),
                        (&x * w).sum(Kind::Double).double_value(&[]),
                    ]
                })
                .collect()
        });
        let mut all = mine.clone();
        self.reduce_sums(&mut all)?;
        let n = self.world.size() as f64;
        for (i, (a, m)) in all.iter().zip(&mine).enumerate() {
            if (a - n * m).abs() > 1e-9 * (n * m.abs()).max(1.0) {
                anyhow::bail!(
                    "rank {}: the weights differ between ranks after training (first in {})",
                    self.rank(),
                    tensors[i / 2].name
                );
            }
        }
        tracing::info!(
            "rank {}: weights identical on all {} ranks",
            self.rank(),
            self.world.size()
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_respect_the_first_and_later_caps() {
        let mb = 1024 * 1024;
        // 0.5 + 0.5 fit the 1 MB first bucket; then 10 + 10 fit 25 MB; 30 is alone; 1 follows.
        let sizes = [mb / 2, mb / 2, 10 * mb, 10 * mb, 30 * mb, mb];
        assert_eq!(buckets(&sizes, mb, 25 * mb), vec![0..2, 2..4, 4..5, 5..6]);
        assert_eq!(
            buckets(&[], mb, 25 * mb),
            Vec::<std::ops::Range<usize>>::new()
        );
        assert_eq!(buckets(&[3 * mb], mb, 25 * mb), vec![0..1]);
    }
}
