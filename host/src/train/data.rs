//! Batches for training and validation. A background thread gathers the images of each batch
//! (in a seeded per-epoch order) into one contiguous buffer while the model computes, so data
//! loading overlaps compute. The thread never calls into libtorch: an ATen op there would start
//! a second OpenMP thread team competing with the training thread's for the same cores.

use crate::datasets::ImageSet;
use imgclf_plugin_api::rng::{mix_seed, step_rng};
use rand::seq::SliceRandom;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use tch::{Kind, Tensor};

/// The images (uint8, N x C x H x W, row-major) and labels of one batch, as plain buffers.
pub struct RawBatch {
    pub index: usize,
    pub images: Vec<u8>,
    pub labels: Vec<i64>,
    pub shape: [i64; 4],
}

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

/// Streams the batches `start..` of one epoch from a background thread.
pub fn spawn_epoch(
    set: Arc<ImageSet>,
    order: Vec<usize>,
    batch_size: usize,
    n_batches: usize,
    start: usize,
) -> Receiver<RawBatch> {
    let (tx, rx) = sync_channel(3);
    std::thread::Builder::new()
        .name("imgclf-loader".into())
        .spawn(move || {
            for b in start..n_batches {
                let end = ((b + 1) * batch_size).min(order.len());
                if tx
                    .send(gather_raw(&set, &order[b * batch_size..end], b))
                    .is_err()
                {
                    return; // the trainer stopped early (Ctrl-C, error)
                }
            }
        })
        .expect("cannot spawn the data-loading thread");
    rx
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
    fn batches_cover_the_epoch_and_respect_drop_last() {
        assert_eq!(batches_per_epoch(10, 4, true), 2);
        assert_eq!(batches_per_epoch(10, 4, false), 3);
        let s = Arc::new(set(10));
        let order = epoch_order(10, 0, 0);
        let got: Vec<RawBatch> = spawn_epoch(s.clone(), order.clone(), 4, 3, 1)
            .into_iter()
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
