//! Dual-Cutout: every training image becomes two views with independent Cutout squares
//! (stacked view-major: `2N` images), and the loss is the mean cross-entropy of both views plus
//! `dual_cutout_alpha` times the squared distance between the two views' softmax outputs
//! (`dual_cutout_consistency softmax`, the paper's form), or, with `logits`, the reference's
//! `F.mse_loss` of the two views' raw logits (mean over images and classes).

use crate::boxes::{CutoutBoxes, SECTION};
use imgclf_plugin_api::rng::step_rng;
use imgclf_plugin_api::{
    plugin_bail, Augmentation, AugmentationFactory, Batch, ComponentInfo, ConfigView, DataContext,
    KeyDecl, Kind, Result, Stage,
};
use tch::{Kind as K, Tensor};

/// Switches the reference cannot combine with Dual-Cutout: each replaces the training loss,
/// and the reference's losses do not accept two views (its loss selection keeps only one).
const CONFLICTS: &[&str] = &[
    "augmentation.use_mixup",
    "augmentation.use_ricap",
    "augmentation.use_cutmix",
    "augmentation.use_label_smoothing",
];

/// What the consistency term compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// Squared distance of the softmax outputs, summed over classes, mean over images.
    Softmax,
    /// Mean squared difference of the logits over images and classes (the reference's code).
    Logits,
}

pub struct DualCutout {
    pub boxes: CutoutBoxes,
    pub alpha: f64,
    pub consistency: Consistency,
}

impl DualCutout {
    /// The loss on `logits` (`2N` x classes, view-major) against soft `targets` (N x classes).
    pub fn loss_of(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let views = logits.f_chunk(2, 0)?;
        let ce = |l: &Tensor| -> Result<Tensor> {
            Ok(-(l.f_log_softmax(1, K::Float)? * targets)
                .sum_dim_intlist(1, false, K::Float)
                .mean(K::Float))
        };
        let consistency = match self.consistency {
            Consistency::Softmax => (views[0].softmax(1, K::Float) - views[1].softmax(1, K::Float))
                .square()
                .sum_dim_intlist(1, false, K::Float)
                .mean(K::Float),
            Consistency::Logits => (&views[0] - &views[1]).square().mean(K::Float),
        };
        Ok((ce(&views[0])? + ce(&views[1])?) * 0.5 + consistency * self.alpha)
    }
}

impl Augmentation for DualCutout {
    fn apply(&mut self, batch: Batch, seed: u64) -> Result<Batch> {
        if batch.views != 1 {
            plugin_bail!(
                "dual_cutout expects single-view batches, got {} views",
                batch.views
            );
        }
        let mut rng = step_rng(seed);
        let (first, _) = self.boxes.apply(&batch.images, &mut rng)?;
        let (second, _) = self.boxes.apply(&batch.images, &mut rng)?;
        Ok(Batch {
            images: Tensor::f_cat(&[first, second], 0)?,
            targets: batch.targets,
            views: 2,
        })
    }

    fn loss(&self, logits: &Tensor, targets: &Tensor, views: u32) -> Result<Option<Tensor>> {
        if views != 2 {
            plugin_bail!("dual_cutout's loss expects 2 views, got {views}");
        }
        self.loss_of(logits, targets).map(Some)
    }
}

pub struct DualCutoutFactory;

impl AugmentationFactory for DualCutoutFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Augmentation,
            "dual_cutout",
            "Dual-Cutout: two Cutout views per image and a consistency loss",
        )
        .papers(&["1802.07426"])
        .switched_by("augmentation.use_dual_cutout", Stage::Erase)
        .keys(vec![
            KeyDecl::float(
                &format!("{SECTION}.dual_cutout_alpha"),
                0.1,
                "weight of the consistency term between the two views' outputs",
            ),
            KeyDecl::str(
                &format!("{SECTION}.dual_cutout_consistency"),
                "softmax",
                "softmax: squared distance of the softmax outputs (paper); logits: mean squared difference of the logits (the reference's code)",
            )
            .choices(&["softmax", "logits"]),
        ])
    }

    fn build(&self, config: &ConfigView, ctx: &DataContext) -> Result<Box<dyn Augmentation>> {
        let on: Vec<&str> = CONFLICTS
            .iter()
            .copied()
            .filter(|k| config.bool(k).unwrap_or(false))
            .collect();
        if !on.is_empty() {
            plugin_bail!(
                "augmentation.use_dual_cutout cannot be combined with {} = True: Dual-Cutout replaces the training loss with its own two-view loss, which the reference cannot train together with {}; set augmentation.use_dual_cutout False or {} False",
                on.join(" = True, "),
                on.join(" or "),
                on.join(" and ")
            );
        }
        let alpha = config.float(&format!("{SECTION}.dual_cutout_alpha"))?;
        if alpha.is_nan() || alpha < 0.0 {
            plugin_bail!("{SECTION}.dual_cutout_alpha must be >= 0, got {alpha}");
        }
        let consistency = match config
            .str(&format!("{SECTION}.dual_cutout_consistency"))?
            .as_str()
        {
            "softmax" => Consistency::Softmax,
            "logits" => Consistency::Logits,
            other => plugin_bail!(
                "{SECTION}.dual_cutout_consistency must be 'softmax' or 'logits', got '{other}'"
            ),
        };
        Ok(Box::new(DualCutout {
            boxes: CutoutBoxes::from_config(config, ctx.image_size)?,
            alpha,
            consistency,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn dual() -> DualCutout {
        DualCutout {
            boxes: CutoutBoxes {
                prob: 1.0,
                mask_size: 8,
                cut_inside: true,
                mask_color: -3.0,
            },
            alpha: 0.5,
            consistency: Consistency::Softmax,
        }
    }

    #[test]
    fn two_views_with_independent_squares_and_the_same_targets() {
        let images = Tensor::rand([32, 1, 16, 16], (K::Float, Device::Cpu));
        let targets = Tensor::from_slice(&[1i64; 32]).one_hot(3).to_kind(K::Float);
        let out = dual()
            .apply(
                Batch {
                    images: images.copy(),
                    targets: targets.copy(),
                    views: 1,
                },
                4,
            )
            .unwrap();
        assert_eq!(out.views, 2);
        assert_eq!(out.images.size(), vec![64, 1, 16, 16]);
        assert!(out.targets.equal(&targets));
        let views = out.images.chunk(2, 0);
        let masks: Vec<Tensor> = views.iter().map(|v| v.eq(-3.0)).collect();
        for m in &masks {
            // cut_inside: exactly one full 8x8 square per image.
            let per_image = m.flatten(1, -1).sum_dim_intlist(1, false, K::Int64);
            assert!(per_image.eq(64).all().int64_value(&[]) == 1);
        }
        assert!(!masks[0].equal(&masks[1]), "views are masked independently");
        // Outside the squares both views are the original images.
        for (v, m) in views.iter().zip(&masks) {
            assert!(v
                .masked_select(&m.logical_not())
                .equal(&images.masked_select(&m.logical_not())));
        }
    }

    #[test]
    fn loss_is_mean_cross_entropy_plus_alpha_times_softmax_distance() {
        let l1 = Tensor::from_slice(&[2.0f32, 0.0, 0.0]).view([1, 3]);
        let l2 = Tensor::from_slice(&[0.0f32, 0.0, 0.0]).view([1, 3]);
        let t = Tensor::from_slice(&[1.0f32, 0.0, 0.0]).view([1, 3]);
        let got = dual()
            .loss_of(&Tensor::cat(&[&l1, &l2], 0), &t)
            .unwrap()
            .double_value(&[]);
        let e2 = (2.0f64).exp();
        let p1 = [e2 / (e2 + 2.0), 1.0 / (e2 + 2.0), 1.0 / (e2 + 2.0)];
        let p2 = [1.0f64 / 3.0; 3];
        let ce = (-(p1[0].ln()) - p2[0].ln()) / 2.0;
        let dist: f64 = p1.iter().zip(&p2).map(|(a, b)| (a - b) * (a - b)).sum();
        assert!((got - (ce + 0.5 * dist)).abs() < 1e-5, "{got}");
        // The reference's form: F.mse_loss(logits1, logits2) = mean of (2, 0, 0)^2 = 4/3.
        let reference = DualCutout {
            consistency: Consistency::Logits,
            ..dual()
        }
        .loss_of(&Tensor::cat(&[&l1, &l2], 0), &t)
        .unwrap()
        .double_value(&[]);
        assert!(
            (reference - (ce + 0.5 * 4.0 / 3.0)).abs() < 1e-5,
            "{reference}"
        );
    }

    #[test]
    fn combinations_the_reference_cannot_train_are_refused_naming_the_keys() {
        let cfg = ConfigView::from_json(
            r#"{"augmentation":{"use_mixup":true,"use_ricap":false,"cutout":{"prob":1.0,"mask_size":16,"cut_inside":false,"mask_color":0,"dual_cutout_alpha":0.1}}}"#,
        )
        .unwrap();
        let ctx = DataContext {
            n_channels: 1,
            image_size: 28,
            n_classes: 10,
            mean: vec![0.5],
            std: vec![0.5],
            device: Device::Cpu,
        };
        let e = DualCutoutFactory
            .build(&cfg, &ctx)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("augmentation.use_dual_cutout cannot be combined with augmentation.use_mixup = True")
                && e.contains("set augmentation.use_dual_cutout False or augmentation.use_mixup False"),
            "{e}"
        );
    }
}
