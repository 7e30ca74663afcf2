//! RICAP on a whole batch, as the reference's collator: a boundary point `(w0, h0)` with each
//! coordinate `round(size * Beta(beta, beta))` splits the output into four quadrants; quadrant
//! `k` is a crop of its size at a uniform position from image `perm_k[n]` (four independent
//! pairings), and the label weights are the quadrants' area fractions (they sum to one). The
//! reference trains RICAP with `augmentation.use_random_crop False`.

use imgclf_plugin_api::augment::permutation;
use imgclf_plugin_api::rng::{step_rng, Rng};
use imgclf_plugin_api::{
    plugin_bail, Augmentation, AugmentationFactory, Batch, ComponentInfo, ConfigView, DataContext,
    KeyDecl, Kind, Result, Stage,
};
use rand_distr::{Beta, Distribution};
use tch::Tensor;

const SECTION: &str = "augmentation.ricap";

pub struct Ricap {
    pub beta: Beta<f64>,
}

/// One quadrant: its size, where it is cropped from, whose image it shows and its label weight.
#[derive(Clone, Debug)]
pub struct Patch {
    pub h: i64,
    pub w: i64,
    pub y0: i64,
    pub x0: i64,
    pub perm: Vec<i64>,
    pub weight: f64,
}

impl Ricap {
    /// The four patches (top-left, top-right, bottom-left, bottom-right) for a batch.
    pub fn draw(&self, seed: u64, n: i64, h: i64, w: i64) -> Vec<Patch> {
        let mut rng = step_rng(seed);
        let (rx, ry) = (self.beta.sample(&mut rng), self.beta.sample(&mut rng));
        let w0 = (w as f64 * rx).round_ties_even() as i64;
        let h0 = (h as f64 * ry).round_ties_even() as i64;
        let (w1, h1) = (w - w0, h - h0);
        [(h0, w0), (h0, w1), (h1, w0), (h1, w1)]
            .into_iter()
            .map(|(ph, pw)| {
                let perm = permutation(&mut rng, n);
                let x0 = rng.gen_range(0..=w - pw);
                let y0 = rng.gen_range(0..=h - ph);
                Patch {
                    h: ph,
                    w: pw,
                    y0,
                    x0,
                    perm,
                    weight: (ph * pw) as f64 / (h * w) as f64,
                }
            })
            .collect()
    }
}

impl Augmentation for Ricap {
    fn apply(&mut self, batch: Batch, seed: u64) -> Result<Batch> {
        if batch.views != 1 {
            plugin_bail!(
                "ricap expects single-view batches, got {} views",
                batch.views
            );
        }
        let (n, _, h, w) = batch.images.size4()?;
        let patches = self.draw(seed, n, h, w);
        let device = batch.images.device();
        let mut crops = Vec::with_capacity(4);
        let mut targets: Option<Tensor> = None;
        for p in &patches {
            let idx = Tensor::from_slice(&p.perm).to_device(device);
            crops.push(
                batch
                    .images
                    .f_index_select(0, &idx)?
                    .f_narrow(2, p.y0, p.h)?
                    .f_narrow(3, p.x0, p.w)?,
            );
            let t = batch
                .targets
                .f_index_select(0, &idx.to_device(batch.targets.device()))?
                * p.weight;
            targets = Some(match targets {
                Some(acc) => acc + t,
                None => t,
            });
        }
        let top = Tensor::f_cat(&crops[..2], 3)?;
        let bottom = Tensor::f_cat(&crops[2..], 3)?;
        Ok(Batch {
            images: Tensor::f_cat(&[top, bottom], 2)?,
            targets: targets.expect("four patches"),
            views: 1,
        })
    }
}

pub struct RicapFactory;

impl AugmentationFactory for RicapFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Augmentation,
            "ricap",
            "RICAP: patch crops of four images together and mix the labels by area",
        )
        .papers(&["1811.09030"])
        .switched_by("augmentation.use_ricap", Stage::Mix)
        .keys(vec![KeyDecl::float(
            &format!("{SECTION}.beta"),
            0.3,
            "the boundary point's coordinates are drawn from Beta(beta, beta)",
        )])
    }

    fn build(&self, config: &ConfigView, _ctx: &DataContext) -> Result<Box<dyn Augmentation>> {
        let beta = config.float(&format!("{SECTION}.beta"))?;
        match Beta::new(beta, beta) {
            Ok(b) if beta > 0.0 => Ok(Box::new(Ricap { beta: b })),
            _ => plugin_bail!("{SECTION}.beta must be > 0, got {beta}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind as K};

    fn ricap() -> Ricap {
        Ricap {
            beta: Beta::new(0.3, 0.3).unwrap(),
        }
    }

    #[test]
    fn weights_sum_to_one_and_equal_the_patch_areas() {
        let r = ricap();
        let mut w0s = Vec::new();
        for seed in 0..5000 {
            let p = r.draw(seed, 4, 32, 32);
            let total: f64 = p.iter().map(|q| q.weight).sum();
            assert!((total - 1.0).abs() < 1e-12, "{total}");
            assert_eq!(p[0].h, p[1].h);
            assert_eq!(p[0].w, p[2].w);
            assert_eq!(p[0].h + p[2].h, 32);
            assert_eq!(p[0].w + p[1].w, 32);
            for q in &p {
                assert_eq!(q.weight, (q.h * q.w) as f64 / 1024.0);
                assert!(q.x0 + q.w <= 32 && q.y0 + q.h <= 32);
            }
            w0s.push(p[0].w as f64 / 32.0);
        }
        // w0 / W ~ Beta(0.3, 0.3) (rounded): mean 1/2, variance 1 / (4 * 1.6) = 0.156.
        let n = w0s.len() as f64;
        let mean = w0s.iter().sum::<f64>() / n;
        let var = w0s.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
        assert!((var - 0.15625).abs() < 0.01, "{var}");
    }

    #[test]
    fn quadrants_show_crops_of_their_images_and_targets_weigh_them() {
        let n = 6;
        // Pixel value = 1000 * image + 32 * y + x, so each output pixel names its source.
        let images = (Tensor::arange(n, (K::Float, Device::Cpu)).view([n, 1, 1, 1]) * 1000.0
            + Tensor::arange(1024, (K::Float, Device::Cpu)).view([1, 1, 32, 32]))
        .repeat([1, 2, 1, 1]);
        let targets = Tensor::arange(n, (K::Int64, Device::Cpu))
            .one_hot(n)
            .to_kind(K::Float);
        let mut r = ricap();
        for seed in 0..10 {
            let p = r.draw(seed, n, 32, 32);
            let out = r
                .apply(
                    Batch {
                        images: images.copy(),
                        targets: targets.copy(),
                        views: 1,
                    },
                    seed,
                )
                .unwrap();
            assert_eq!(out.images.size(), vec![n, 2, 32, 32]);
            let origin = [(0, 0), (0, p[0].w), (p[0].h, 0), (p[0].h, p[0].w)];
            for i in 0..n {
                let mut want = vec![0.0; n as usize];
                for (q, &(oy, ox)) in p.iter().zip(&origin) {
                    want[q.perm[i as usize] as usize] += q.weight;
                    if q.h > 0 && q.w > 0 {
                        let v = out.images.get(i).get(1).get(oy).get(ox).double_value(&[]);
                        let src = q.perm[i as usize] as f64 * 1000.0 + (32 * q.y0 + q.x0) as f64;
                        assert_eq!(v, src);
                    }
                }
                let got = Vec::<f64>::try_from(out.targets.get(i).to_kind(K::Double)).unwrap();
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() < 1e-6, "{got:?} {want:?}");
                }
            }
        }
    }
}
