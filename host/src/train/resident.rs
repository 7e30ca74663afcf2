//! Device-resident training data (`train.dataloader.on_device`): a dataset that fits in the
//! training device's memory (CIFAR, the MNIST family) is uploaded once as one uint8 tensor, and
//! every batch is one `index_select` on the device, so no host loader thread, no host gather
//! and no host-to-device copy sit in the training loop. The batches are the host loader's (the
//! same seeded epoch order, the same uint8 pixels); augmentation then runs on the device in the
//! pipeline as before.

use crate::config::Config;
use crate::datasets::loader::Loader;
use crate::datasets::ImageSet;
use crate::setup::Setup;
use crate::train::image_stage::StagedSamples;
use anyhow::{bail, Context, Result};
use imgclf_plugin_api::ffi::HostImageStage;
use tch::{Device, Kind, Tensor};

/// The largest training set `auto` keeps on a CUDA device (CIFAR-10 is 150 MiB as uint8).
pub const AUTO_LIMIT_BYTES: usize = 4 << 30;

/// Whether `train.dataloader.on_device` asks for the device-resident path for a training set
/// of `bytes` uint8 pixels on `device`: `auto` on CUDA for sets up to [`AUTO_LIMIT_BYTES`].
pub fn wanted(config: &Config, device: Device, bytes: usize) -> Result<bool> {
    Ok(match config.str("train.dataloader.on_device") {
        "auto" => device.is_cuda() && bytes <= AUTO_LIMIT_BYTES,
        "on" => true,
        "off" => false,
        other => bail!("train.dataloader.on_device must be auto, on or off, got '{other}'"),
    })
}

/// Where the training set's images come from during training. An in-memory set that fits
/// lives on the device as uint8 (`train.dataloader.on_device`, returned as `Some`), unless a
/// per-image stage needs every image to go through the loader's workers (the stages are then
/// wrapped around `train_set`'s samples) or the set is an image folder (streamed).
pub fn place(
    s: &Setup,
    train_set: &mut Loader,
    image_stages: Vec<HostImageStage>,
    device: Device,
) -> Result<Option<ResidentSet>> {
    let c = &s.config;
    let on = c.str("train.dataloader.on_device") == "on";
    if !image_stages.is_empty() {
        let names: Vec<&str> = image_stages.iter().map(|st| st.name()).collect();
        if on {
            bail!(
                "train.dataloader.on_device on keeps the training set on the device, but the per-image stage{} {} run{} on each image in the data loader; set train.dataloader.on_device auto or off",
                if names.len() > 1 { "s" } else { "" },
                names.join(", "),
                if names.len() > 1 { "" } else { "s" }
            );
        }
        tracing::info!(
            "per-image stage {} in {} data-loading thread(s) (train.dataloader.num_workers)",
            names.join(", "),
            train_set.num_workers
        );
        train_set.samples = StagedSamples::wrap(train_set.samples.clone(), image_stages);
        return Ok(None);
    }
    if s.dataset.image_folder {
        if on {
            bail!("train.dataloader.on_device on needs an in-memory dataset; image folders are streamed (use auto or off)");
        }
        return Ok(None);
    }
    let [ch, height, width] = train_set.samples.shape();
    let bytes = train_set.len() * ch * height * width;
    if !wanted(c, device, bytes)? {
        return Ok(None);
    }
    let samples = train_set.samples.clone();
    let mut rng = imgclf_plugin_api::rng::step_rng(0);
    let set = ResidentSet::gather(train_set.len(), [ch, height, width], device, |i, out| {
        samples
            .fill(i, &mut rng, out)?
            .with_context(|| format!("training sample {i} could not be read"))
    })?;
    tracing::info!(
        "training set on {device:?} as uint8 ({} MiB, train.dataloader.on_device)",
        bytes >> 20
    );
    Ok(Some(set))
}

/// A training set on the device: N x C x H x W uint8 images and N int64 labels.
pub struct ResidentSet {
    images: Tensor,
    labels: Tensor,
    len: usize,
}

impl ResidentSet {
    /// Copies `set` to `device` once.
    pub fn upload(set: &ImageSet, device: Device) -> Result<Self> {
        let shape = [set.channels, set.height, set.width];
        Self::from_host(&set.images, &set.labels, shape, device)
    }

    /// Collects `len` samples of `shape` (C, H, W) from `fill` (which writes sample `i`'s
    /// uint8 pixels and returns its label), then copies them to `device` once.
    pub fn gather(
        len: usize,
        shape: [usize; 3],
        device: Device,
        mut fill: impl FnMut(usize, &mut [u8]) -> Result<i64>,
    ) -> Result<Self> {
        let per = shape.iter().product::<usize>();
        let mut images = vec![0u8; len * per];
        let mut labels = Vec::with_capacity(len);
        for (i, out) in images.chunks_exact_mut(per.max(1)).enumerate().take(len) {
            labels.push(fill(i, out)?);
        }
        Self::from_host(&images, &labels, shape, device)
    }

    fn from_host(images: &[u8], labels: &[i64], shape: [usize; 3], device: Device) -> Result<Self> {
        let len = labels.len();
        let dims = [
            len as i64,
            shape[0] as i64,
            shape[1] as i64,
            shape[2] as i64,
        ];
        let images = Tensor::f_from_slice(images)?
            .f_view(dims)?
            .f_to_device(device)
            .with_context(|| {
                format!(
                    "copying the training set ({} MiB) to {device:?} (train.dataloader.on_device)",
                    images.len() >> 20
                )
            })?;
        let labels = Tensor::f_from_slice(labels)?.f_to_device(device)?;
        Ok(ResidentSet {
            images,
            labels,
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Batches `start..n_batches` of an epoch in `order` (a permutation of the set): items
    /// `(index, uint8 images, int64 labels)`, both on the device. The order crosses to the
    /// device once per epoch.
    pub fn epoch(
        &self,
        order: &[usize],
        batch_size: usize,
        n_batches: usize,
        start: usize,
    ) -> Result<ResidentEpoch> {
        if order.len() > self.len || order.iter().any(|&i| i >= self.len) {
            bail!(
                "an epoch order of {} indices does not fit the {} resident images",
                order.len(),
                self.len
            );
        }
        let order: Vec<i64> = order.iter().map(|&i| i as i64).collect();
        let n = order.len();
        let order = Tensor::f_from_slice(&order)?.f_to_device(self.images.device())?;
        Ok(ResidentEpoch {
            images: self.images.shallow_clone(),
            labels: self.labels.shallow_clone(),
            order,
            n,
            batch_size,
            next: start,
            end: n_batches,
        })
    }
}

/// The remaining batches of one epoch (see [`ResidentSet::epoch`]).
pub struct ResidentEpoch {
    /// The set's tensors (shared, not copied).
    images: Tensor,
    labels: Tensor,
    order: Tensor,
    n: usize,
    batch_size: usize,
    next: usize,
    end: usize,
}

impl Iterator for ResidentEpoch {
    type Item = Result<(usize, Tensor, Tensor)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.end {
            return None;
        }
        let b = self.next;
        self.next += 1;
        let first = b * self.batch_size;
        let len = self.batch_size.min(self.n.saturating_sub(first));
        if len == 0 {
            return None;
        }
        let batch = || -> Result<(usize, Tensor, Tensor)> {
            let idx = self.order.f_narrow(0, first as i64, len as i64)?;
            Ok((
                b,
                self.images.f_index_select(0, &idx)?,
                self.labels
                    .f_index_select(0, &idx)?
                    .f_to_kind(Kind::Int64)?,
            ))
        };
        Some(batch())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::data;

    fn set(n: usize) -> ImageSet {
        ImageSet {
            images: (0..n * 12).map(|i| (i % 251) as u8).collect(),
            labels: (0..n as i64).map(|i| i % 10).collect(),
            channels: 3,
            height: 2,
            width: 2,
        }
    }

    #[test]
    fn batches_equal_the_host_gather_of_the_same_order() {
        let s = set(10);
        let r = ResidentSet::upload(&s, Device::Cpu).unwrap();
        let order = data::epoch_order(10, 7, 3);
        let got: Vec<(usize, Tensor, Tensor)> = r
            .epoch(&order, 4, 3, 1)
            .unwrap()
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(got.iter().map(|b| b.0).collect::<Vec<_>>(), vec![1, 2]);
        for (b, images, labels) in &got {
            let idx = &order[b * 4..((b + 1) * 4).min(10)];
            let (want_images, want_labels) = data::gather(&s, idx);
            assert_eq!(images.kind(), Kind::Uint8);
            assert!(images.equal(&want_images), "batch {b}");
            assert!(labels.equal(&want_labels), "batch {b}");
        }
        assert_eq!(got[1].1.size(), vec![2, 3, 2, 2], "the partial last batch");
    }

    #[test]
    fn gathering_samples_equals_uploading_the_set() {
        let s = set(5);
        let a = ResidentSet::upload(&s, Device::Cpu).unwrap();
        let b = ResidentSet::gather(5, [3, 2, 2], Device::Cpu, |i, out| {
            out.copy_from_slice(s.image(i));
            Ok(s.labels[i])
        })
        .unwrap();
        assert!(a.images.equal(&b.images) && a.labels.equal(&b.labels));
        assert_eq!(b.len(), 5);
    }

    #[test]
    fn an_order_outside_the_set_is_an_error() {
        let r = ResidentSet::upload(&set(3), Device::Cpu).unwrap();
        assert!(r.epoch(&[0, 5], 1, 2, 0).is_err());
    }
}
