//! Random horizontal flip of each image of a batch with probability `prob`.

use imgclf_plugin_api::rng::{step_rng, Rng};
use imgclf_plugin_api::{
    plugin_bail, Augmentation, AugmentationFactory, Batch, ComponentInfo, ConfigView, DataContext,
    KeyDecl, Kind, Result, Stage,
};
use tch::Tensor;

const SECTION: &str = "augmentation.random_horizontal_flip";

pub struct Flip {
    pub prob: f64,
}

impl Augmentation for Flip {
    fn apply(&mut self, batch: Batch, seed: u64) -> Result<Batch> {
        let n = batch.images.size()[0];
        let mut rng = step_rng(seed);
        let flips: Vec<bool> = (0..n).map(|_| rng.gen::<f64>() < self.prob).collect();
        if !flips.iter().any(|&f| f) {
            return Ok(batch);
        }
        let mask = Tensor::from_slice(&flips)
            .to_device(batch.images.device())
            .view([n, 1, 1, 1]);
        let flipped = batch.images.f_flip([3])?;
        Ok(Batch {
            images: flipped.f_where_self(&mask, &batch.images)?,
            ..batch
        })
    }
}

pub struct FlipFactory;

impl AugmentationFactory for FlipFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Augmentation,
            "random_horizontal_flip",
            "Mirror each image left-right with a probability",
        )
        .switched_by("augmentation.use_random_horizontal_flip", Stage::Geometric)
        .keys(vec![KeyDecl::float(
            &format!("{SECTION}.prob"),
            0.5,
            "probability of flipping an image",
        )])
    }

    fn build(&self, config: &ConfigView, _ctx: &DataContext) -> Result<Box<dyn Augmentation>> {
        let prob = config.float(&format!("{SECTION}.prob"))?;
        if !(0.0..=1.0).contains(&prob) {
            plugin_bail!("{SECTION}.prob must be in [0, 1], got {prob}");
        }
        Ok(Box::new(Flip { prob }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind as K};

    #[test]
    fn flips_about_half_and_mirrors_exactly() {
        let n = 2000;
        let img = Tensor::arange(4, (K::Float, Device::Cpu))
            .view([1, 1, 1, 4])
            .repeat([n, 1, 1, 1]);
        let mut f = Flip { prob: 0.5 };
        let out = f
            .apply(
                Batch {
                    images: img.shallow_clone(),
                    targets: Tensor::zeros([n, 2], (K::Float, Device::Cpu)),
                    views: 1,
                },
                3,
            )
            .unwrap();
        let first = out.images.select(3, 0).flatten(0, -1);
        let flipped = first
            .eq(3.0)
            .to_kind(K::Float)
            .mean(K::Float)
            .double_value(&[]);
        assert!((flipped - 0.5).abs() < 0.05, "{flipped}");
        // Every image is either the original or its exact mirror.
        let mirror = img.flip([3]);
        let ok = out
            .images
            .eq_tensor(&img)
            .all_dim(3, false)
            .logical_or(&out.images.eq_tensor(&mirror).all_dim(3, false));
        assert!(ok.all().int64_value(&[]) == 1);
        let never = Flip { prob: 0.0 }
            .apply(
                Batch {
                    images: img.shallow_clone(),
                    targets: Tensor::zeros([n, 2], (K::Float, Device::Cpu)),
                    views: 1,
                },
                3,
            )
            .unwrap();
        assert!(never.images.equal(&img));
    }
}
