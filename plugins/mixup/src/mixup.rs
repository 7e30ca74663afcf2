//! Mixup on a whole batch: one `lambda ~ Beta(alpha, alpha)` and one random pairing per batch
//! (as the reference's collator), `x = lambda * x + (1 - lambda) * x[perm]` and the same for
//! the soft targets, so soft-target cross-entropy equals the reference's mixup loss.

use imgclf_plugin_api::augment::permutation;
use imgclf_plugin_api::rng::step_rng;
use imgclf_plugin_api::{
    plugin_bail, Augmentation, AugmentationFactory, Batch, ComponentInfo, ConfigView, DataContext,
    KeyDecl, Kind, Result, Stage,
};
use rand_distr::{Beta, Distribution};
use tch::Tensor;

const SECTION: &str = "augmentation.mixup";

pub struct Mixup {
    pub beta: Beta<f64>,
}

impl Mixup {
    /// Mixes with a given `lambda` and pairing.
    pub fn mix(batch: Batch, lambda: f64, perm: &[i64]) -> Result<Batch> {
        let idx = Tensor::from_slice(perm).to_device(batch.images.device());
        let images =
            batch.images.f_index_select(0, &idx)? * (1.0 - lambda) + &batch.images * lambda;
        let targets = batch
            .targets
            .f_index_select(0, &idx.to_device(batch.targets.device()))?
            * (1.0 - lambda)
            + &batch.targets * lambda;
        Ok(Batch {
            images,
            targets,
            views: batch.views,
        })
    }

    /// The batch's `lambda` and pairing for a seed.
    pub fn draw(&self, seed: u64, n: i64) -> (f64, Vec<i64>) {
        let mut rng = step_rng(seed);
        let perm = permutation(&mut rng, n);
        (self.beta.sample(&mut rng), perm)
    }
}

impl Augmentation for Mixup {
    fn apply(&mut self, batch: Batch, seed: u64) -> Result<Batch> {
        if batch.views != 1 {
            plugin_bail!(
                "mixup expects single-view batches, got {} views",
                batch.views
            );
        }
        let (lambda, perm) = self.draw(seed, batch.images.size()[0]);
        Mixup::mix(batch, lambda, &perm)
    }
}

pub struct MixupFactory;

impl AugmentationFactory for MixupFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Augmentation,
            "mixup",
            "Mixup: blend random pairs of images and their labels",
        )
        .papers(&["1710.09412"])
        .switched_by("augmentation.use_mixup", Stage::Mix)
        .keys(vec![KeyDecl::float(
            &format!("{SECTION}.alpha"),
            1.0,
            "the mixing weight is drawn from Beta(alpha, alpha)",
        )])
    }

    fn build(&self, config: &ConfigView, _ctx: &DataContext) -> Result<Box<dyn Augmentation>> {
        let alpha = config.float(&format!("{SECTION}.alpha"))?;
        match Beta::new(alpha, alpha) {
            Ok(beta) if alpha > 0.0 => Ok(Box::new(Mixup { beta })),
            _ => plugin_bail!("{SECTION}.alpha must be > 0, got {alpha}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind as K};

    #[test]
    fn lambda_follows_beta_alpha_alpha() {
        for alpha in [0.2, 1.0, 2.0] {
            let m = Mixup {
                beta: Beta::new(alpha, alpha).unwrap(),
            };
            let n = 20_000;
            let l: Vec<f64> = (0..n).map(|s| m.draw(s, 2).0).collect();
            let mean = l.iter().sum::<f64>() / n as f64;
            let var = l.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
            // Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)).
            let want_var = 1.0 / (4.0 * (2.0 * alpha + 1.0));
            assert!((mean - 0.5).abs() < 0.01, "alpha {alpha}: mean {mean}");
            assert!(
                (var - want_var).abs() / want_var < 0.05,
                "alpha {alpha}: var {var}"
            );
            // For alpha 1 the distribution is uniform: each decile holds about 10%.
            if alpha == 1.0 {
                for d in 0..10 {
                    let f = l
                        .iter()
                        .filter(|&&x| x >= d as f64 / 10.0 && x < (d + 1) as f64 / 10.0)
                        .count() as f64
                        / n as f64;
                    assert!((f - 0.1).abs() < 0.01, "decile {d}: {f}");
                }
            }
        }
    }

    #[test]
    fn images_and_targets_are_mixed_with_the_same_lambda_and_pairing() {
        let n = 16;
        let images = Tensor::arange(n, (K::Float, Device::Cpu))
            .view([n, 1, 1, 1])
            .repeat([1, 2, 3, 3]);
        let labels = Tensor::arange(n, (K::Int64, Device::Cpu));
        let targets = labels.one_hot(n).to_kind(K::Float);
        let mut m = Mixup {
            beta: Beta::new(1.0, 1.0).unwrap(),
        };
        let (lambda, perm) = m.draw(5, n);
        let mut sorted = perm.clone();
        sorted.sort();
        assert_eq!(sorted, (0..n).collect::<Vec<_>>());
        let out = m
            .apply(
                Batch {
                    images: images.copy(),
                    targets: targets.copy(),
                    views: 1,
                },
                5,
            )
            .unwrap();
        for (i, &j) in perm.iter().enumerate() {
            let want = lambda * i as f64 + (1.0 - lambda) * j as f64;
            let got = out
                .images
                .get(i as i64)
                .get(1)
                .get(2)
                .get(2)
                .double_value(&[]);
            assert!((got - want).abs() < 1e-4, "{got} {want}");
            let t = out.targets.get(i as i64);
            if j as usize != i {
                assert!((t.double_value(&[i as i64]) - lambda).abs() < 1e-6);
                assert!((t.double_value(&[j]) - (1.0 - lambda)).abs() < 1e-6);
            }
        }
        let again = m
            .apply(
                Batch {
                    images: images.copy(),
                    targets: targets.copy(),
                    views: 1,
                },
                5,
            )
            .unwrap();
        assert!(again.images.equal(&out.images));
    }
}
