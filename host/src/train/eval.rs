//! The validation / test pass over a split (in memory or an image folder), batches made by
//! the split's loader.

use super::data;
use super::metrics::{topk_accuracy_labels, Meter};
use super::pipeline::Normalizer;
use crate::datasets::loader::Loader;
use anyhow::Result;
use imgclf_plugin_api::ffi::HostModel;
use tch::Device;

/// Validation/test pass: mean cross-entropy, top-1 and top-5 accuracy.
pub fn evaluate_set(
    model: &mut HostModel,
    set: &Loader,
    batch_size: usize,
    norm: &Normalizer,
    device: Device,
) -> Result<Meter> {
    evaluate_shard(model, set, batch_size, norm, device, (0, 1))
}

/// The pass over shard `rank` of `world` contiguous shards of the set (sizes differ by at most
/// one image); the shards' sums add up to the whole set's.
pub fn evaluate_shard(
    model: &mut HostModel,
    set: &Loader,
    batch_size: usize,
    norm: &Normalizer,
    device: Device,
    (rank, world): (usize, usize),
) -> Result<Meter> {
    let mut meter = Meter::default();
    let (n, w) = (set.len(), world.max(1));
    let indices: Vec<usize> = (rank * n / w..(rank + 1) * n / w).collect();
    tch::no_grad(|| -> Result<()> {
        for raw in set.in_order(indices, batch_size) {
            let raw = raw?;
            let (images, labels) = data::to_device(&raw, set, device)?;
            let logits = model.forward(&norm.apply(&images), false)?;
            let loss = logits.cross_entropy_for_logits(&labels).double_value(&[]);
            let (a1, a5) = topk_accuracy_labels(&logits, &labels);
            meter.update(raw.labels.len(), loss, a1, a5);
        }
        Ok(())
    })?;
    Ok(meter)
}
