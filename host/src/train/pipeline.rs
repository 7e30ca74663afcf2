//! The training input pipeline: the host's normalisation and the enabled augmentation
//! plugins in stage order, seeded per (seed, epoch, step) so a resumed run sees the same
//! batches.

use crate::registry::Registry;
use crate::setup::Setup;
use anyhow::Result;
use imgclf_plugin_api::ffi::HostAugmentation;
use imgclf_plugin_api::rng::mix_seed;
use imgclf_plugin_api::{Batch, DataContext, Stage};
use tch::{Device, Kind, Tensor};

/// `(x / 255 - mean) / std` per channel, as one multiply-add.
pub struct Normalizer {
    scale: Tensor,
    shift: Tensor,
}

impl Normalizer {
    pub fn new(mean: &[f64], std: &[f64], device: Device) -> Self {
        let c = mean.len() as i64;
        let scale: Vec<f32> = std.iter().map(|s| (1.0 / (255.0 * s)) as f32).collect();
        let shift: Vec<f32> = mean.iter().zip(std).map(|(m, s)| (-m / s) as f32).collect();
        Normalizer {
            scale: Tensor::from_slice(&scale)
                .view([1, c, 1, 1])
                .to_device(device),
            shift: Tensor::from_slice(&shift)
                .view([1, c, 1, 1])
                .to_device(device),
        }
    }
    /// uint8 or float pixels in [0, 255] -> normalised float.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        x.to_kind(Kind::Float) * &self.scale + &self.shift
    }
}

/// The training input pipeline: the enabled augmentations in stage order around the host's
/// normalisation (validation never goes through it).
pub struct Pipeline {
    pub(crate) augmentations: Vec<(Stage, HostAugmentation)>,
    pub norm: Normalizer,
    /// Whether any augmentation changes the targets (then the loss uses soft targets).
    pub(crate) soft_targets: bool,
    n_classes: i64,
}

/// Builds every enabled augmentation (this is where their config checks run).
pub fn build_pipeline(registry: &Registry, s: &Setup, device: Device) -> Result<Pipeline> {
    let c = &s.config;
    // dataset.mean / dataset.std when set, else the dataset's own statistics.
    let (mean, std) = s.dataset.stats(c)?;
    let data_ctx = DataContext {
        n_channels: c.int("dataset.n_channels"),
        image_size: c.int("dataset.image_size"),
        n_classes: c.int("dataset.n_classes"),
        mean: mean.clone(),
        std: std.clone(),
        device,
    };
    let mut augmentations = Vec::new();
    // Per-image stages run in the data loader instead (train::image_stage).
    for e in s
        .augmentations
        .iter()
        .filter(|e| e.info.stage != Some(Stage::Image))
    {
        let aug =
            registry
                .plugin(e)
                .create_augmentation(&e.info.name, &c.section_json(""), &data_ctx)?;
        // Plugins whose augmentations lack a known stage are refused at load (ffi::load_plugin).
        let stage = e.info.stage.ok_or_else(|| {
            anyhow::anyhow!(
                "augmentation `{}` of plugin `{}` has no pipeline stage",
                e.info.name,
                registry.plugin(e).name
            )
        })?;
        augmentations.push((stage, aug));
    }
    let soft_targets = augmentations
        .iter()
        .any(|(st, _)| matches!(st, Stage::Mix | Stage::Target));
    Ok(Pipeline {
        augmentations,
        norm: Normalizer::new(&mean, &std, device),
        soft_targets,
        n_classes: data_ctx.n_classes,
    })
}

/// One training batch after the pipeline.
pub struct Prepared {
    /// `views * N` normalised images, view-major.
    pub images: Tensor,
    pub labels: Tensor,
    /// Targets after mixing, for accuracy (`None` when no augmentation changes targets).
    pub mix_targets: Option<Tensor>,
    /// Targets after target transforms (one-hot when nothing changed them), for the loss.
    pub loss_targets: Tensor,
    pub views: u32,
}

impl Pipeline {
    /// Runs the pipeline on uint8 `images` and int64 `labels` on the training device, with the
    /// randomness of (`seed`, `epoch`, `step`).
    pub fn prepare(
        &mut self,
        images: Tensor,
        labels: Tensor,
        seed: u64,
        epoch: u64,
        step: u64,
    ) -> Result<Prepared> {
        let targets = labels.one_hot(self.n_classes).to_kind(Kind::Float);
        let mut batch = Batch {
            images: images.to_kind(Kind::Float),
            targets,
            views: 1,
        };
        let mut mix_targets = None;
        let mut normalised = false;
        for (i, (stage, aug)) in self.augmentations.iter_mut().enumerate() {
            if *stage != Stage::Geometric && !normalised {
                batch.images = self.norm.apply(&batch.images);
                normalised = true;
            }
            if *stage == Stage::Target && mix_targets.is_none() {
                mix_targets = Some(batch.targets.shallow_clone());
            }
            batch = aug.apply(batch, mix_seed(&[seed, epoch, step, i as u64 + 1]))?;
        }
        if !normalised {
            batch.images = self.norm.apply(&batch.images);
        }
        let mix_targets = mix_targets.unwrap_or_else(|| batch.targets.shallow_clone());
        Ok(Prepared {
            images: batch.images,
            labels,
            mix_targets: self.soft_targets.then_some(mix_targets),
            loss_targets: batch.targets,
            views: batch.views,
        })
    }
}
