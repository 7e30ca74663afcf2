//! Label smoothing as a target transform: `t' = (1 - epsilon) * t + epsilon / n_classes`, so
//! soft-target cross-entropy equals the reference's `LabelSmoothingLoss`. After a batch mixer
//! the mixed targets are smoothed (the reference would silently drop the smoothing there).

use imgclf_plugin_api::{
    plugin_bail, Augmentation, AugmentationFactory, Batch, ComponentInfo, ConfigView, DataContext,
    KeyDecl, Kind, Result, Stage,
};

const SECTION: &str = "augmentation.label_smoothing";

pub struct LabelSmoothing {
    pub epsilon: f64,
    pub n_classes: i64,
}

impl Augmentation for LabelSmoothing {
    fn apply(&mut self, batch: Batch, _seed: u64) -> Result<Batch> {
        let targets = &batch.targets * (1.0 - self.epsilon) + self.epsilon / self.n_classes as f64;
        Ok(Batch { targets, ..batch })
    }
}

pub struct LabelSmoothingFactory;

impl AugmentationFactory for LabelSmoothingFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Augmentation,
            "label_smoothing",
            "Label smoothing: move epsilon of each target's mass to the uniform distribution",
        )
        .papers(&["1512.00567"])
        .switched_by("augmentation.use_label_smoothing", Stage::Target)
        .keys(vec![KeyDecl::float(
            &format!("{SECTION}.epsilon"),
            0.1,
            "probability mass spread uniformly over all classes",
        )])
    }

    fn build(&self, config: &ConfigView, ctx: &DataContext) -> Result<Box<dyn Augmentation>> {
        let epsilon = config.float(&format!("{SECTION}.epsilon"))?;
        if !(0.0..=1.0).contains(&epsilon) {
            plugin_bail!("{SECTION}.epsilon must be in [0, 1], got {epsilon}");
        }
        Ok(Box::new(LabelSmoothing {
            epsilon,
            n_classes: ctx.n_classes,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind as K, Tensor};

    #[test]
    fn targets_are_exactly_the_reference_smoothing() {
        let labels = Tensor::from_slice(&[0i64, 3, 9]);
        let mut s = LabelSmoothing {
            epsilon: 0.1,
            n_classes: 10,
        };
        let images = Tensor::rand([3, 1, 4, 4], (K::Float, Device::Cpu));
        let out = s
            .apply(
                Batch {
                    images: images.copy(),
                    targets: labels.one_hot(10).to_kind(K::Float),
                    views: 1,
                },
                0,
            )
            .unwrap();
        assert!(out.images.equal(&images));
        let got = Vec::<f32>::try_from(out.targets.flatten(0, -1)).unwrap();
        for (row, &label) in [0usize, 3, 9].iter().enumerate() {
            for class in 0..10 {
                let want = if class == label { 0.91f32 } else { 0.01 };
                assert!((got[row * 10 + class] - want).abs() < 1e-7, "{row} {class}");
            }
        }
        // The loss on smoothed targets is the reference's: (1 - eps) * CE + eps * mean(-logp).
        let logits = Tensor::from_slice(&[1.0f32, 2.0, 0.5, -1.0, 0.0, 0.0, 0.3, 0.2, 0.1, 0.0])
            .view([1, 10]);
        let logp = logits.log_softmax(1, K::Float);
        let ours = -(&logp * out.targets.get(0).unsqueeze(0))
            .sum(K::Float)
            .double_value(&[]);
        let reference =
            0.9 * -logp.double_value(&[0, 0]) + 0.1 * -logp.mean(K::Float).double_value(&[]);
        assert!((ours - reference).abs() < 1e-5, "{ours} {reference}");
    }
}
