//! Random Erasing after normalisation: with probability `prob`, up to `max_attempt` tries draw
//! an area (a fraction of the image uniform in `area_ratio_range`) and an aspect ratio (uniform
//! in `[min_aspect_ratio, 1 / min_aspect_ratio]`); the first rectangle that fits is placed
//! uniformly and filled with one value uniform in [0, 1) (all channels), as the reference does.

use imgclf_plugin_api::augment::{rect_mask, Rect};
use imgclf_plugin_api::rng::{step_rng, Rng, StepRng};
use imgclf_plugin_api::{
    plugin_bail, Augmentation, AugmentationFactory, Batch, ComponentInfo, ConfigView, DataContext,
    KeyDecl, Kind, Result, Stage,
};
use tch::Tensor;

const SECTION: &str = "augmentation.random_erasing";

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RandomErasing {
    pub prob: f64,
    pub area_ratio: (f64, f64),
    pub min_aspect_ratio: f64,
    pub max_attempt: i64,
}

impl RandomErasing {
    /// The rectangle and fill value for one `h` x `w` image (empty if skipped or nothing fit).
    pub fn sample(&self, rng: &mut StepRng, h: i64, w: i64) -> (Rect, f64) {
        if rng.gen::<f64>() > self.prob {
            return (Rect::EMPTY, 0.0);
        }
        let (sl, sh) = self.area_ratio;
        let (rl, rh) = (self.min_aspect_ratio, 1.0 / self.min_aspect_ratio);
        for _ in 0..self.max_attempt {
            let area = uniform(rng, sl, sh) * (h * w) as f64;
            let aspect = uniform(rng, rl, rh);
            let mh = (area * aspect).sqrt() as i64;
            let mw = (area / aspect).sqrt() as i64;
            if mw < w && mh < h {
                // numpy's randint(0, w - mw): the last column start is excluded.
                let x0 = rng.gen_range(0..w - mw);
                let y0 = rng.gen_range(0..h - mh);
                let value = rng.gen::<f64>();
                return (
                    Rect {
                        y0,
                        y1: y0 + mh,
                        x0,
                        x1: x0 + mw,
                    },
                    value,
                );
            }
        }
        (Rect::EMPTY, 0.0)
    }
}

fn uniform(rng: &mut StepRng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.gen::<f64>()
}

impl Augmentation for RandomErasing {
    fn apply(&mut self, batch: Batch, seed: u64) -> Result<Batch> {
        let (n, _, h, w) = batch.images.size4()?;
        let mut rng = step_rng(seed);
        let (rects, values): (Vec<Rect>, Vec<f32>) = (0..n)
            .map(|_| {
                let (r, v) = self.sample(&mut rng, h, w);
                (r, v as f32)
            })
            .unzip();
        if rects.iter().all(|r| r.area() == 0) {
            return Ok(batch);
        }
        let device = batch.images.device();
        let mask = rect_mask(&rects, h, w, device)?;
        let fill = Tensor::from_slice(&values)
            .to_device(device)
            .view([n, 1, 1, 1]);
        Ok(Batch {
            images: fill.f_where_self(&mask, &batch.images)?,
            ..batch
        })
    }
}

pub struct RandomErasingFactory;

impl AugmentationFactory for RandomErasingFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Augmentation,
            "random_erasing",
            "Random Erasing: fill one random rectangle per image with a random value",
        )
        .papers(&["1708.04896"])
        .switched_by("augmentation.use_random_erasing", Stage::Erase)
        .keys(vec![
            KeyDecl::float(
                &format!("{SECTION}.prob"),
                0.5,
                "probability of erasing an image",
            ),
            KeyDecl::float_list(
                &format!("{SECTION}.area_ratio_range"),
                &[0.02, 0.4],
                "[min, max] erased area as a fraction of the image",
            ),
            KeyDecl::float(
                &format!("{SECTION}.min_aspect_ratio"),
                0.3,
                "aspect ratios (h/w) are drawn uniformly from [min, 1/min]",
            ),
            KeyDecl::int(
                &format!("{SECTION}.max_attempt"),
                20,
                "tries to find a rectangle that fits before leaving the image as is",
            )
            .at_least(0),
        ])
    }

    fn build(&self, config: &ConfigView, _ctx: &DataContext) -> Result<Box<dyn Augmentation>> {
        let prob = config.float(&format!("{SECTION}.prob"))?;
        let range = config.float_list(&format!("{SECTION}.area_ratio_range"))?;
        let min_aspect_ratio = config.float(&format!("{SECTION}.min_aspect_ratio"))?;
        let max_attempt = config.int(&format!("{SECTION}.max_attempt"))?;
        if !(0.0..=1.0).contains(&prob) {
            plugin_bail!("{SECTION}.prob must be in [0, 1], got {prob}");
        }
        let [lo, hi] = range[..] else {
            plugin_bail!(
                "{SECTION}.area_ratio_range must be [min, max], got {} values",
                range.len()
            );
        };
        if !(0.0 < lo && lo <= hi && hi <= 1.0) {
            plugin_bail!(
                "{SECTION}.area_ratio_range must satisfy 0 < min <= max <= 1, got [{lo}, {hi}]"
            );
        }
        if !(min_aspect_ratio > 0.0 && min_aspect_ratio <= 1.0) {
            plugin_bail!("{SECTION}.min_aspect_ratio must be in (0, 1], got {min_aspect_ratio}");
        }
        if max_attempt < 1 {
            plugin_bail!("{SECTION}.max_attempt must be >= 1, got {max_attempt}");
        }
        Ok(Box::new(RandomErasing {
            prob,
            area_ratio: (lo, hi),
            min_aspect_ratio,
            max_attempt,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind as K};

    fn re(prob: f64) -> RandomErasing {
        RandomErasing {
            prob,
            area_ratio: (0.02, 0.4),
            min_aspect_ratio: 0.3,
            max_attempt: 20,
        }
    }

    #[test]
    fn erased_areas_and_aspect_ratios_follow_the_ranges() {
        let e = re(1.0);
        let mut rng = step_rng(21);
        let (h, w) = (32i64, 32i64);
        let n = 20_000;
        let mut areas = Vec::new();
        let mut log_aspects = Vec::new();
        for _ in 0..n {
            let (r, v) = e.sample(&mut rng, h, w);
            assert!((0.0..1.0).contains(&v));
            if r.area() == 0 {
                continue;
            }
            assert!(r.x0 >= 0 && r.x1 < w && r.y0 >= 0 && r.y1 < h, "{r:?}");
            let (mh, mw) = ((r.y1 - r.y0) as f64, (r.x1 - r.x0) as f64);
            let frac = mh * mw / (h * w) as f64;
            // int() truncation only shrinks the rectangle.
            assert!(frac <= 0.4 + 1e-9, "{frac}");
            areas.push(frac);
            log_aspects.push((mh / mw).ln());
        }
        // Every image is erased (the ranges always fit 32x32 within 20 tries).
        assert!(areas.len() as f64 > 0.99 * n as f64, "{}", areas.len());
        // The reference's numpy code, simulated for 200k images of 32x32 (tests ground truth,
        // not this code): mean erased fraction 0.1887, P(h/w > 1) = 0.7465, max h/w 4.5.
        let mean_area = areas.iter().sum::<f64>() / areas.len() as f64;
        assert!((mean_area - 0.1887).abs() < 0.004, "{mean_area}");
        let above = log_aspects.iter().filter(|&&a| a > 0.0).count() as f64 / areas.len() as f64;
        assert!((above - 0.7465).abs() < 0.01, "{above}");
        let max = log_aspects.iter().cloned().fold(f64::MIN, f64::max).exp();
        assert!(max <= 4.5 + 1e-9 && max > 3.0, "{max}");
    }

    #[test]
    fn prob_and_fill_value_apply_per_image_and_seeds_repeat() {
        let mut e = re(0.5);
        let batch = || Batch {
            images: Tensor::full([2000, 3, 16, 16], -5.0, (K::Float, Device::Cpu)),
            targets: Tensor::zeros([2000, 10], (K::Float, Device::Cpu)),
            views: 1,
        };
        let out = e.apply(batch(), 3).unwrap().images;
        let erased = out.ne(-5.0);
        let frac = erased
            .flatten(1, -1)
            .any_dim(1, false)
            .to_kind(K::Float)
            .mean(K::Float)
            .double_value(&[]);
        assert!((frac - 0.5).abs() < 0.04, "{frac}");
        // One value per image, the same in every channel.
        let vmax = out.amax([1, 2, 3].as_slice(), false);
        let vmin = out
            .where_scalarother(&erased, 2.0)
            .amin([1, 2, 3].as_slice(), false);
        let touched = erased.flatten(1, -1).any_dim(1, false);
        assert!(vmax
            .masked_select(&touched)
            .equal(&vmin.masked_select(&touched)));
        assert!(out.equal(&e.apply(batch(), 3).unwrap().images));
    }
}
