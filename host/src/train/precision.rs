//! The precision policy of a training step: under which autocast the forward pass and loss
//! run, how the loss is scaled for backward, and how gradients are unscaled and checked before
//! the optimizer step. The loop calls these hooks in order and never branches on the level:
//! `prepare` once, then per step `forward` (per chunk), `backward` (per chunk), `unscale`,
//! the optimizer step when `unscale` said the gradients are finite, and `update`.

use anyhow::Result;
use imgclf_plugin_api::NamedTensor;
use tch::Tensor;

pub trait Precision {
    /// A short name for logs ("float32", ...).
    fn name(&self) -> String;
    /// Called once with the model's tensors before training (a reduced-precision level may
    /// cast the model here).
    fn prepare(&mut self, _tensors: &[NamedTensor]) -> Result<()> {
        Ok(())
    }
    /// Runs the forward pass and loss `f` under this policy's autocast.
    fn forward(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        f()
    }
    /// Backward of one loss (scaled by the current loss scale, where there is one).
    fn backward(&mut self, loss: &Tensor) -> Result<()> {
        loss.f_backward()?;
        Ok(())
    }
    /// After every backward of the step, before clipping and the optimizer: unscales the
    /// gradients in place. `false` when they are not finite (the optimizer step is skipped).
    fn unscale(&mut self, _grads: &[Tensor]) -> Result<bool> {
        Ok(true)
    }
    /// After the step, taken or skipped: adjusts the loss scale.
    fn update(&mut self, _stepped: bool) -> Result<()> {
        Ok(())
    }
    /// The loss scale, for metrics (`None` when gradients are not scaled); with `None` a
    /// non-finite loss ends training, with a scale it only skips the step.
    fn loss_scale(&self) -> Option<f64> {
        None
    }
    /// State saved in checkpoints (under `precision.`), restored with `load_state`.
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![])
    }
    fn load_state(&mut self, _state: &[(String, Tensor)]) -> Result<()> {
        Ok(())
    }
}

/// `train.precision O0`: everything in float32, gradients unscaled.
pub struct Float32;

impl Precision for Float32 {
    fn name(&self) -> String {
        "float32".into()
    }
}

/// The policy `train.precision` asks for.
pub fn from_config(_config: &crate::config::Config) -> Result<Box<dyn Precision>> {
    Ok(Box::new(Float32))
}
