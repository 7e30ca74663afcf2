//! Batches for training and validation. A background thread gathers the images of each batch
//! (in a seeded per-epoch order) into one contiguous buffer while the model computes, so data
//! loading overlaps compute. The thread never calls into libtorch: an ATen op there would start
//! a second OpenMP thread team competing with the training thread's for the same cores.

use crate::datasets::loader::{BatchStream, EpochPlan, Loader};
use crate::datasets::ImageSet;
use anyhow::Result;
use imgclf_plugin_api::rng::{mix_seed, step_rng};
use rand::seq::SliceRandom;
use tch::{Device, Kind, Tensor};

/// The images (uint8, N x C x H x W, row-major) and labels of one batch, as plain buffers.
pub use crate::datasets::loader::RawBatch;

impl RawBatch {
    /// uint8 images and int64 labels as CPU tensors (call on the training thread).
    pub fn tensors(&self) -> (Tensor, Tensor) {
        (
            Tensor::from_slice(&self.images).view(self.shape),
            Tensor::from_slice(&self.labels).to_kind(Kind::Int64),
        )
    }
}

fn gather_raw(set: &ImageSet, indices: &[usize], index: usize) -> RawBatch {
    let per = set.channels * set.height * set.width;
    let mut images = Vec::with_capacity(indices.len() * per);
    let mut labels = Vec::with_capacity(indices.len());
    for &i in indices {
        images.extend_from_slice(set.image(i));
        labels.push(set.labels[i]);
    }
    let shape = [
        indices.len() as i64,
        set.channels as i64,
        set.height as i64,
        set.width as i64,
    ];
    RawBatch {
        index,
        images,
        labels,
        shape,
    }
}

/// Gathers the given samples into one batch of tensors.
pub fn gather(set: &ImageSet, indices: &[usize]) -> (Tensor, Tensor) {
    gather_raw(set, indices, 0).tensors()
}

/// The training order of one epoch: a permutation seeded by (train.seed, epoch).
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut step_rng(mix_seed(&[seed, epoch, 0x5348_5546])));
    order
}

/// Number of batches of an epoch.
pub fn batches_per_epoch(n: usize, batch_size: usize, drop_last: bool) -> usize {
    if drop_last {
        n / batch_size
    } else {
        n.div_ceil(batch_size)
    }
}

/// Steps of an epoch for `world` ranks of `batch_size` images each: global batches of
/// `world * batch_size`; without drop_last a partial last global batch counts only when every
/// rank gets at least one image of it.
pub fn global_steps_per_epoch(n: usize, batch_size: usize, world: usize, drop_last: bool) -> usize {
    let global = batch_size * world.max(1);
    let full = n / global;
    if !drop_last && n % global >= world.max(1) {
        full + 1
    } else {
        full
    }
}

/// This rank's part of an epoch order: of each global batch of `world * batch_size` images
/// (consecutive in `order`), the `rank`-th slice of `batch_size`; of a partial last one, the
/// `rank`-th of `world` near-equal contiguous parts. A world of one keeps the order.
pub fn rank_order(order: &[usize], batch_size: usize, world: usize, rank: usize) -> Vec<usize> {
    if world <= 1 {
        return order.to_vec();
    }
    let global = batch_size * world;
    let mut out = Vec::with_capacity(order.len() / world + batch_size);
    for chunk in order.chunks(global) {
        let m = chunk.len();
        if m == global {
            out.extend_from_slice(&chunk[rank * batch_size..(rank + 1) * batch_size]);
        } else {
            out.extend_from_slice(&chunk[rank * m / world..(rank + 1) * m / world]);
        }
    }
    out
}

/// The seed of rank `rank`'s random streams (augmentations, the model's randomness): derived
/// from `train.seed` and the rank; a world of one uses `train.seed` itself.
pub fn rank_seed(seed: u64, rank: usize, world: usize) -> u64 {
    if world <= 1 {
        seed
    } else {
        mix_seed(&[seed, 0x5241_4e4b, rank as u64])
    }
}

/// Streams the batches `start..n_batches` of one epoch, made by the loader's
/// `num_workers` threads (each sample's random draws from (seed, epoch, sample)).
pub fn spawn_epoch(
    loader: &Loader,
    order: Vec<usize>,
    batch_size: usize,
    n_batches: usize,
    start: usize,
    seed: u64,
    epoch: u64,
) -> BatchStream {
    loader.epoch(EpochPlan {
        order,
        batch_size,
        start,
        end: n_batches,
        seed,
        epoch,
    })
}

/// A batch's images and labels on `device`; with the loader's `pin_memory` (CUDA only) the
/// images are copied through page-locked memory, with `non_blocking` asynchronously.
pub fn to_device(raw: &RawBatch, loader: &Loader, device: Device) -> Result<(Tensor, Tensor)> {
    let (images, labels) = raw.tensors();
    if !device.is_cuda() {
        return Ok((images.to_device(device), labels.to_device(device)));
    }
    let pin = |t: Tensor| -> Result<Tensor> {
        Ok(if loader.pin_memory {
            t.f_pin_memory(device)?
        } else {
            t
        })
    };
    let (images, labels) = (pin(images)?, pin(labels)?);
    let nb = loader.non_blocking && loader.pin_memory;
    Ok((
        images.f_to_device_(device, Kind::Uint8, nb, false)?,
        labels.f_to_device_(device, Kind::Int64, nb, false)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(n: usize) -> ImageSet {
        ImageSet {
            images: (0..n * 4).map(|i| (i % 251) as u8).collect(),
            labels: (0..n as i64).collect(),
            channels: 1,
            height: 2,
            width: 2,
        }
    }

    #[test]
    fn order_is_a_seeded_permutation() {
        let a = epoch_order(100, 0, 1);
        assert_eq!(a, epoch_order(100, 0, 1));
        assert_ne!(a, epoch_order(100, 0, 2));
        assert_ne!(a, epoch_order(100, 1, 1));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn ranks_split_each_global_batch_so_any_world_sees_the_same_global_batches() {
        let order = epoch_order(22, 3, 0);
        // World 2, batch 4: global batches of 8; rank r takes rows r*4..r*4+4 of each.
        let r0 = rank_order(&order, 4, 2, 0);
        let r1 = rank_order(&order, 4, 2, 1);
        assert_eq!(&r0[..4], &order[0..4]);
        assert_eq!(&r1[..4], &order[4..8]);
        assert_eq!(&r0[4..8], &order[8..12]);
        assert_eq!(&r1[4..8], &order[12..16]);
        // The partial last global batch (6 images) in halves.
        assert_eq!(&r0[8..], &order[16..19]);
        assert_eq!(&r1[8..], &order[19..22]);
        // Step s of the two ranks together is step s of one process with batch 8.
        for s in 0..2 {
            let mut both: Vec<usize> = r0[s * 4..s * 4 + 4].to_vec();
            both.extend_from_slice(&r1[s * 4..s * 4 + 4]);
            assert_eq!(both, order[s * 8..s * 8 + 8]);
        }
        assert_eq!(rank_order(&order, 4, 1, 0), order);
        assert_eq!(global_steps_per_epoch(22, 4, 2, true), 2);
        assert_eq!(global_steps_per_epoch(22, 4, 2, false), 3);
        assert_eq!(global_steps_per_epoch(17, 4, 2, false), 2);
        assert_eq!(
            global_steps_per_epoch(22, 8, 1, true),
            batches_per_epoch(22, 8, true)
        );
        assert_eq!(rank_seed(5, 0, 1), 5);
        assert_ne!(rank_seed(5, 0, 2), rank_seed(5, 1, 2));
    }

    #[test]
    fn batches_cover_the_epoch_and_respect_drop_last() {
        assert_eq!(batches_per_epoch(10, 4, true), 2);
        assert_eq!(batches_per_epoch(10, 4, false), 3);
        let s = std::sync::Arc::new(set(10));
        let order = epoch_order(10, 0, 0);
        let got: Vec<RawBatch> =
            spawn_epoch(&Loader::new(s.clone(), 2), order.clone(), 4, 3, 1, 0, 0)
                .map(|b| b.unwrap())
                .collect();
        assert_eq!(got.iter().map(|b| b.index).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(got[1].labels.len(), 2);
        assert_eq!(
            got[0].labels,
            order[4..8].iter().map(|&i| i as i64).collect::<Vec<_>>()
        );
        let (images, labels) = got[0].tensors();
        assert_eq!(images.size(), vec![4, 1, 2, 2]);
        assert_eq!(Vec::<i64>::try_from(&labels).unwrap(), got[0].labels);
        let first = Vec::<u8>::try_from(&images.flatten(0, -1)).unwrap();
        assert_eq!(&first[..4], s.image(order[4]));
    }
}
