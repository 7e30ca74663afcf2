//! CutMix on a whole batch, as the reference's collator: one `lambda ~ Beta(alpha, alpha)`, one
//! pairing and one box per batch; the box of side `sqrt(1 - lambda)` times the image's, centred
//! uniformly and clipped to the image, is copied from each image's partner. The labels are mixed
//! by the area actually pasted: `lambda` is corrected to `1 - box area / image area` after
//! clipping and rounding (as CutMix's original code does), so the soft targets match the pixels.
//! `correct_lambda False` keeps the drawn `lambda`, as the reference's collator does.

use imgclf_plugin_api::augment::{permutation, rect_mask, Rect};
use imgclf_plugin_api::rng::{step_rng, Rng};
use imgclf_plugin_api::{
    plugin_bail, Augmentation, AugmentationFactory, Batch, ComponentInfo, ConfigView, DataContext,
    KeyDecl, Kind, Result, Stage,
};
use rand_distr::{Beta, Distribution};
use tch::Tensor;

const SECTION: &str = "augmentation.cutmix";

pub struct CutMix {
    pub beta: Beta<f64>,
    /// Weigh the labels by the pasted area (else by the drawn `lambda`).
    pub correct_lambda: bool,
}

/// One batch's draw.
#[derive(Clone, Debug)]
pub struct Draw {
    /// `lambda` as drawn from Beta(alpha, alpha).
    pub lambda: f64,
    /// The pasted box.
    pub rect: Rect,
    /// The weight of each image's own label: `1 - rect.area() / (H * W)`.
    pub corrected_lambda: f64,
    pub perm: Vec<i64>,
}

impl CutMix {
    pub fn draw(&self, seed: u64, n: i64, h: i64, w: i64) -> Draw {
        let mut rng = step_rng(seed);
        let perm = permutation(&mut rng, n);
        let lambda = self.beta.sample(&mut rng);
        let (hf, wf) = (h as f64, w as f64);
        let cx = rng.gen::<f64>() * wf;
        let cy = rng.gen::<f64>() * hf;
        let bw = wf * (1.0 - lambda).sqrt();
        let bh = hf * (1.0 - lambda).sqrt();
        // numpy's round: half to even.
        let rect = Rect {
            x0: (cx - bw / 2.0).max(0.0).round_ties_even() as i64,
            x1: (cx + bw / 2.0).min(wf).round_ties_even() as i64,
            y0: (cy - bh / 2.0).max(0.0).round_ties_even() as i64,
            y1: (cy + bh / 2.0).min(hf).round_ties_even() as i64,
        };
        let corrected_lambda = 1.0 - rect.area() as f64 / (h * w) as f64;
        Draw {
            lambda,
            rect,
            corrected_lambda,
            perm,
        }
    }
}

impl Augmentation for CutMix {
    fn apply(&mut self, batch: Batch, seed: u64) -> Result<Batch> {
        if batch.views != 1 {
            plugin_bail!(
                "cutmix expects single-view batches, got {} views",
                batch.views
            );
        }
        let (n, _, h, w) = batch.images.size4()?;
        let d = self.draw(seed, n, h, w);
        let device = batch.images.device();
        let idx = Tensor::from_slice(&d.perm).to_device(device);
        let mask = rect_mask(&[d.rect], h, w, device)?;
        let images = batch
            .images
            .f_index_select(0, &idx)?
            .f_where_self(&mask, &batch.images)?;
        let lam = if self.correct_lambda {
            d.corrected_lambda
        } else {
            d.lambda
        };
        let targets = &batch.targets * lam
            + batch
                .targets
                .f_index_select(0, &idx.to_device(batch.targets.device()))?
                * (1.0 - lam);
        Ok(Batch {
            images,
            targets,
            views: 1,
        })
    }
}

pub struct CutMixFactory;

impl AugmentationFactory for CutMixFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Augmentation,
            "cutmix",
            "CutMix: paste a box from a partner image and mix the labels by its area",
        )
        .papers(&["1905.04899"])
        .switched_by("augmentation.use_cutmix", Stage::Mix)
        .keys(vec![
            KeyDecl::float(
                &format!("{SECTION}.alpha"),
                1.0,
                "the box's area fraction 1 - lambda has lambda ~ Beta(alpha, alpha)",
            ),
            KeyDecl::bool(
                &format!("{SECTION}.correct_lambda"),
                true,
                "mix the labels by the pasted (clipped) box's area, as CutMix's code; False keeps the drawn lambda, as the reference",
            ),
        ])
    }

    fn build(&self, config: &ConfigView, _ctx: &DataContext) -> Result<Box<dyn Augmentation>> {
        let alpha = config.float(&format!("{SECTION}.alpha"))?;
        match Beta::new(alpha, alpha) {
            Ok(beta) if alpha > 0.0 => Ok(Box::new(CutMix {
                beta,
                correct_lambda: config.bool(&format!("{SECTION}.correct_lambda"))?,
            })),
            _ => plugin_bail!("{SECTION}.alpha must be > 0, got {alpha}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind as K};

    fn cutmix(alpha: f64) -> CutMix {
        CutMix {
            beta: Beta::new(alpha, alpha).unwrap(),
            correct_lambda: true,
        }
    }

    #[test]
    fn lambda_is_beta_and_the_box_area_is_the_corrected_lambda() {
        let c = cutmix(1.0);
        let n = 20_000;
        let draws: Vec<Draw> = (0..n).map(|s| c.draw(s, 4, 32, 32)).collect();
        let mean = draws.iter().map(|d| d.lambda).sum::<f64>() / n as f64;
        let var = draws.iter().map(|d| (d.lambda - mean).powi(2)).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        assert!((var - 1.0 / 12.0).abs() < 0.004, "{var}");
        for d in &draws {
            let r = d.rect;
            assert!(0 <= r.x0 && r.x0 <= r.x1 && r.x1 <= 32 && 0 <= r.y0 && r.y1 <= 32);
            assert_eq!(d.corrected_lambda, 1.0 - r.area() as f64 / 1024.0);
            // Clipping only shrinks the box; rounding moves each side by at most one pixel.
            let unclipped = (1.0 - d.lambda) * 1024.0;
            assert!(r.area() as f64 <= unclipped + 2.0 * 32.0 * (1.0 - d.lambda).sqrt() + 1.0);
        }
        // Clipped boxes make the corrected lambda larger on average than the drawn one.
        let corrected = draws.iter().map(|d| d.corrected_lambda).sum::<f64>() / n as f64;
        assert!(corrected > mean + 0.05, "{corrected} vs {mean}");
    }

    #[test]
    fn pasted_pixels_match_the_box_and_targets_weigh_them() {
        let n = 8;
        let images = Tensor::arange(n, (K::Float, Device::Cpu))
            .view([n, 1, 1, 1])
            .repeat([1, 3, 32, 32]);
        let targets = Tensor::arange(n, (K::Int64, Device::Cpu))
            .one_hot(n)
            .to_kind(K::Float);
        let mut c = cutmix(1.0);
        for seed in 0..20 {
            let d = c.draw(seed, n, 32, 32);
            let out = c
                .apply(
                    Batch {
                        images: images.copy(),
                        targets: targets.copy(),
                        views: 1,
                    },
                    seed,
                )
                .unwrap();
            for i in 0..n {
                let j = d.perm[i as usize];
                let from_partner = out
                    .images
                    .get(i)
                    .eq(j as f64)
                    .sum(K::Int64)
                    .int64_value(&[]);
                let own = out
                    .images
                    .get(i)
                    .eq(i as f64)
                    .sum(K::Int64)
                    .int64_value(&[]);
                if i != j {
                    assert_eq!(from_partner, 3 * d.rect.area());
                    assert_eq!(own, 3 * (1024 - d.rect.area()));
                    let t = out.targets.get(i);
                    assert!((t.double_value(&[i]) - d.corrected_lambda).abs() < 1e-6);
                    assert!((t.double_value(&[j]) - (1.0 - d.corrected_lambda)).abs() < 1e-6);
                }
            }
        }
        // The reference's weighting: same pixels, labels by the drawn lambda.
        let mut uncorrected = CutMix {
            correct_lambda: false,
            ..cutmix(1.0)
        };
        let d = uncorrected.draw(3, n, 32, 32);
        let out = uncorrected
            .apply(
                Batch {
                    images: images.copy(),
                    targets: targets.copy(),
                    views: 1,
                },
                3,
            )
            .unwrap();
        let i = (0..n).find(|&i| d.perm[i as usize] != i).unwrap();
        assert!((out.targets.double_value(&[i, i]) - d.lambda).abs() < 1e-6);
    }
}
