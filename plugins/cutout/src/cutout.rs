//! The Cutout augmentation: after normalisation, each image independently gets (with
//! probability `prob`) one `mask_size` square of `mask_color`, on the training device.

use crate::boxes::CutoutBoxes;
use imgclf_plugin_api::rng::step_rng;
use imgclf_plugin_api::{
    Augmentation, AugmentationFactory, Batch, ComponentInfo, ConfigView, DataContext, Kind, Result,
    Stage,
};

pub struct Cutout {
    pub boxes: CutoutBoxes,
}

impl Augmentation for Cutout {
    fn apply(&mut self, batch: Batch, seed: u64) -> Result<Batch> {
        let (images, _) = self.boxes.apply(&batch.images, &mut step_rng(seed))?;
        Ok(Batch { images, ..batch })
    }
}

pub struct CutoutFactory;

impl AugmentationFactory for CutoutFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Augmentation,
            "cutout",
            "Cutout: mask one square per image with a constant",
        )
        .papers(&["1708.04552"])
        .switched_by("augmentation.use_cutout", Stage::Erase)
        .keys(CutoutBoxes::keys())
    }

    fn build(&self, config: &ConfigView, ctx: &DataContext) -> Result<Box<dyn Augmentation>> {
        Ok(Box::new(Cutout {
            boxes: CutoutBoxes::from_config(config, ctx.image_size)?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgclf_plugin_api::augment::Rect;
    use tch::{Device, Kind as K, Tensor};

    fn boxes(mask_size: i64, cut_inside: bool, prob: f64) -> CutoutBoxes {
        CutoutBoxes {
            prob,
            mask_size,
            cut_inside,
            mask_color: -7.0,
        }
    }

    fn batch(n: i64, size: i64) -> Batch {
        Batch {
            images: Tensor::ones([n, 3, size, size], (K::Float, Device::Cpu)),
            targets: Tensor::zeros([n, 10], (K::Float, Device::Cpu)),
            views: 1,
        }
    }

    #[test]
    fn masked_pixels_are_the_sampled_squares_in_every_channel() {
        let b = boxes(16, false, 1.0);
        let images = Tensor::ones([64, 3, 32, 32], (K::Float, Device::Cpu));
        let (out, rects) = b.apply(&images, &mut step_rng(5)).unwrap();
        for (i, r) in rects.iter().enumerate() {
            let masked = out.get(i as i64).eq(-7.0).sum(K::Int64).int64_value(&[]);
            assert_eq!(masked, 3 * r.area(), "image {i}: {r:?}");
            if r.area() > 0 {
                let inside = out
                    .get(i as i64)
                    .get(2)
                    .get(r.y0)
                    .get(r.x0)
                    .double_value(&[]);
                assert_eq!(inside, -7.0);
            }
        }
        // Everything else is untouched.
        let untouched = out.eq(1.0).logical_or(&out.eq(-7.0)).all().int64_value(&[]);
        assert_eq!(untouched, 1);
    }

    #[test]
    fn square_area_and_centre_follow_the_reference_distribution() {
        // Not cut inside, even mask 16 on 32x32: centre uniform over 0..=32 on each axis, so the
        // clipped side is 16 - max(0, 8 - c) - max(0, c + 8 - 32); E[side] = 14.06 (exact sum).
        let b = boxes(16, false, 1.0);
        let mut rng = step_rng(11);
        let n = 20_000;
        let rects: Vec<Rect> = (0..n).map(|_| b.sample(&mut rng, 32, 32)).collect();
        let side = |c: i64| (16 - (8 - c).max(0) - (c + 8 - 32).max(0)) as f64;
        let expected_side: f64 = (0..=32).map(side).sum::<f64>() / 33.0;
        let expected_area = expected_side * expected_side;
        let mean_area = rects.iter().map(|r| r.area() as f64).sum::<f64>() / n as f64;
        assert!(
            (mean_area - expected_area).abs() / expected_area < 0.02,
            "{mean_area} vs {expected_area}"
        );
        // Centres (x0 + 8 where unclipped) cover 0..=32 uniformly: each about 1/33.
        let mut counts = [0usize; 33];
        for r in &rects {
            let cx = if r.x0 > 0 { r.x0 + 8 } else { r.x1 - 8 };
            counts[cx as usize] += 1;
        }
        for (c, &k) in counts.iter().enumerate() {
            let f = k as f64 / n as f64;
            assert!((f - 1.0 / 33.0).abs() < 0.008, "centre {c}: {f}");
        }
        // cut_inside keeps full squares whose top-left corner spans 0..=16.
        let inside = boxes(16, true, 1.0);
        let mut corners = std::collections::BTreeSet::new();
        for _ in 0..5000 {
            let r = inside.sample(&mut rng, 32, 32);
            assert_eq!(r.area(), 256, "{r:?}");
            corners.insert(r.x0);
        }
        assert_eq!(
            corners.into_iter().collect::<Vec<_>>(),
            (0..=16).collect::<Vec<_>>()
        );
    }

    #[test]
    fn prob_sets_the_fraction_of_masked_images_and_seeds_repeat() {
        let mut c = Cutout {
            boxes: boxes(8, true, 0.3),
        };
        let a = c.apply(batch(4000, 16), 9).unwrap().images;
        let masked = a
            .eq(-7.0)
            .any_dim(1, false)
            .flatten(1, -1)
            .any_dim(1, false)
            .to_kind(K::Float)
            .mean(K::Float)
            .double_value(&[]);
        assert!((masked - 0.3).abs() < 0.03, "{masked}");
        assert!(a.equal(&c.apply(batch(4000, 16), 9).unwrap().images));
        assert!(!a.equal(&c.apply(batch(4000, 16), 10).unwrap().images));
    }

    #[test]
    fn a_square_larger_than_the_image_is_refused_with_cut_inside() {
        let cfg = ConfigView::from_json(
            r#"{"augmentation":{"cutout":{"prob":1.0,"mask_size":40,"cut_inside":true,"mask_color":0.0}}}"#,
        )
        .unwrap();
        let e = CutoutBoxes::from_config(&cfg, 32).unwrap_err().to_string();
        assert!(e.contains("augmentation.cutout.mask_size 40"), "{e}");
    }
}
