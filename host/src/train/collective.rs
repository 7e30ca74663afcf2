//! How the ranks of a training run cooperate: rank and world size, who writes the output
//! directory, the broadcast of the initial weights, gradient reduction, reduction of metric
//! sums and barriers. A single process is a world of one where every operation does nothing.

use anyhow::Result;
use imgclf_plugin_api::NamedTensor;
use tch::Tensor;

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

/// The collective `train.distributed` asks for.
pub fn from_config(_config: &crate::config::Config) -> Result<Box<dyn Collective>> {
    Ok(Box::new(SingleProcess))
}
