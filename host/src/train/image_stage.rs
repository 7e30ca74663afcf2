//! The per-image stage of the training input (augmentations of `Stage::Image`, ABI 0.1.2:
//! RandAugment, TrivialAugment): plugin transforms run by the data loader's worker threads on
//! each decoded uint8 training image, before batching and before every batch augmentation.
//!
//! [`StagedSamples`] wraps the training split: it fills a sample as the split does, then
//! runs the enabled stages on it in order, each with a seed drawn from the sample's own
//! generator (seeded by train.seed, epoch and sample index), so the images are the same for
//! any `num_workers` and a resumed epoch sees the same ones. Without a per-image stage the
//! split is used as it is, and the trainer's paths (device-resident or loader) are unchanged.

use crate::datasets::loader::Samples;
use crate::datasets::DatasetError;
use crate::registry::Registry;
use crate::setup::Setup;
use anyhow::Result;
use imgclf_plugin_api::ffi::HostImageStage;
use imgclf_plugin_api::rng::{mix_seed, RngCore, StepRng};
use imgclf_plugin_api::{DataContext, ImageMut, Stage};
use std::sync::Arc;
use tch::Device;

/// Builds every enabled augmentation of [`Stage::Image`], in the configured order.
pub fn build_image_stages(registry: &Registry, s: &Setup) -> Result<Vec<HostImageStage>> {
    let c = &s.config;
    let entries: Vec<_> = s
        .augmentations
        .iter()
        .filter(|e| e.info.stage == Some(Stage::Image))
        .collect();
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let (mean, std) = s.dataset.stats(c)?;
    let ctx = DataContext {
        n_channels: c.int("dataset.n_channels"),
        image_size: c.int("dataset.image_size"),
        n_classes: c.int("dataset.n_classes"),
        mean,
        std,
        // Per-image stages run on the CPU, in the loader's threads.
        device: Device::Cpu,
    };
    entries
        .into_iter()
        .map(|e| {
            Ok(registry
                .plugin(e)
                .create_image_stage(&e.info.name, &c.section_json(""), &ctx)?)
        })
        .collect()
}

/// A split whose samples go through per-image stages after being filled.
pub struct StagedSamples {
    pub inner: Arc<dyn Samples>,
    pub stages: Vec<HostImageStage>,
}

impl StagedSamples {
    /// `inner` itself when there is no stage (the existing paths stay bit-identical).
    pub fn wrap(inner: Arc<dyn Samples>, stages: Vec<HostImageStage>) -> Arc<dyn Samples> {
        if stages.is_empty() {
            inner
        } else {
            Arc::new(StagedSamples { inner, stages })
        }
    }
}

impl Samples for StagedSamples {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn shape(&self) -> [usize; 3] {
        self.inner.shape()
    }
    fn fill(
        &self,
        index: usize,
        rng: &mut StepRng,
        out: &mut [u8],
    ) -> Result<Option<i64>, DatasetError> {
        let Some(label) = self.inner.fill(index, rng, out)? else {
            return Ok(None);
        };
        // Drawn after the split's own draws (an image folder's crop and flip), from the same
        // per-sample generator.
        let seed = rng.next_u64();
        let [channels, height, width] = self.inner.shape();
        for (k, stage) in self.stages.iter().enumerate() {
            let image = ImageMut {
                data: &mut *out,
                channels,
                height,
                width,
            };
            stage
                .apply(image, mix_seed(&[seed, k as u64]))
                .map_err(|e| DatasetError::ImageStage {
                    index,
                    msg: e.to_string(),
                })?;
        }
        Ok(Some(label))
    }
}
