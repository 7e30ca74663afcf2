//! RandAugment as torchvision 0.26 draws it: `num_ops` times, one of the 14 operations
//! uniformly, at bin `magnitude` of its `num_magnitude_bins` magnitudes, negated with
//! probability 1/2 for signed operations; applied to each training image in the data loader.

use imgclf_plugin_api::image::{linspace_f32, posterize_bits, Op, Sampling};
use imgclf_plugin_api::rng::{step_rng, Rng};
use imgclf_plugin_api::{
    plugin_bail, ComponentInfo, ConfigView, DataContext, ImageMut, ImageStage, ImageStageFactory,
    KeyDecl, Kind, Result, Stage,
};

pub const SECTION: &str = "augmentation.randaugment";

/// torchvision's `RandAugment._augmentation_space` at bin `bin` of `bins` for an image of
/// `height x width`: (magnitude, signed).
pub fn magnitude(op: Op, bins: usize, bin: usize, height: usize, width: usize) -> (f64, bool) {
    let lin = |end: f64| linspace_f32(0.0, end, bins)[bin] as f64;
    match op {
        Op::Identity | Op::AutoContrast | Op::Equalize => (0.0, false),
        Op::ShearX | Op::ShearY => (lin(0.3), true),
        Op::TranslateX => (lin(150.0 / 331.0 * width as f64), true),
        Op::TranslateY => (lin(150.0 / 331.0 * height as f64), true),
        Op::Rotate => (lin(30.0), true),
        Op::Brightness | Op::Color | Op::Contrast | Op::Sharpness => (lin(0.9), true),
        Op::Posterize => (posterize_bits(bins, 4.0)[bin] as f64, false),
        Op::Solarize => (linspace_f32(255.0, 0.0, bins)[bin] as f64, false),
    }
}

/// RandAugment's parameters (`augmentation.randaugment.*`).
#[derive(Clone, Debug, PartialEq)]
pub struct RandAugment {
    pub num_ops: usize,
    pub magnitude: usize,
    pub num_magnitude_bins: usize,
    pub sampling: Sampling,
}

impl RandAugment {
    /// The operations and signed magnitudes drawn for one image by `seed`.
    pub fn draw(&self, seed: u64, height: usize, width: usize) -> Vec<(Op, f64)> {
        let mut rng = step_rng(seed);
        (0..self.num_ops)
            .map(|_| {
                let op = Op::ALL[rng.gen_range(0..Op::ALL.len())];
                let (m, signed) =
                    magnitude(op, self.num_magnitude_bins, self.magnitude, height, width);
                let negate = signed && rng.gen::<bool>();
                (op, if negate { -m } else { m })
            })
            .collect()
    }
}

impl ImageStage for RandAugment {
    fn apply(&self, mut image: ImageMut<'_>, seed: u64) -> Result<()> {
        for (op, m) in self.draw(seed, image.height, image.width) {
            self.sampling.apply(&mut image, op, m)?;
        }
        Ok(())
    }
}

pub struct RandAugmentFactory;

impl ImageStageFactory for RandAugmentFactory {
    fn info(&self) -> ComponentInfo {
        let mut keys = vec![
            KeyDecl::int(
                &format!("{SECTION}.num_ops"),
                2,
                "operations applied in sequence to each image (the paper's N)",
            )
            .at_least(0),
            KeyDecl::int(
                &format!("{SECTION}.magnitude"),
                9,
                "magnitude bin of every operation (the paper's M), below num_magnitude_bins",
            )
            .at_least(0),
            KeyDecl::int(
                &format!("{SECTION}.num_magnitude_bins"),
                31,
                "number of magnitude bins spanning each operation's range",
            )
            .at_least(2),
        ];
        keys.extend(Sampling::keys(SECTION));
        ComponentInfo::new(
            Kind::Augmentation,
            "randaugment",
            "RandAugment: num_ops random operations at one magnitude, per image in the loader",
        )
        .papers(&["1909.13719"])
        .switched_by("augmentation.use_randaugment", Stage::Image)
        .keys(keys)
    }

    fn build(&self, config: &ConfigView, ctx: &DataContext) -> Result<Box<dyn ImageStage>> {
        let key = |k: &str| format!("{SECTION}.{k}");
        let bins = config.int(&key("num_magnitude_bins"))?;
        let m = config.int(&key("magnitude"))?;
        if !(0..bins).contains(&m) {
            plugin_bail!(
                "{} is {m}, but there are {bins} bins ({}): it must be below that",
                key("magnitude"),
                key("num_magnitude_bins")
            );
        }
        Ok(Box::new(RandAugment {
            num_ops: config.int(&key("num_ops"))?.max(0) as usize,
            magnitude: m as usize,
            num_magnitude_bins: bins as usize,
            sampling: Sampling::from_config(config, SECTION, ctx.n_channels)?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgclf_plugin_api::image::Interpolation;

    fn ra(num_ops: usize) -> RandAugment {
        RandAugment {
            num_ops,
            magnitude: 9,
            num_magnitude_bins: 31,
            sampling: Sampling {
                interpolation: Interpolation::Nearest,
                fill: vec![],
            },
        }
    }

    #[test]
    fn magnitudes_are_torchvisions_at_the_default_bin() {
        // torchvision: linspace(0, 0.3, 31)[9] = 0.09, linspace(0, 30, 31)[9] = 9, ...
        // (tests/augment_ops.rs compares every table with torchvision's exactly).
        let (shear, signed) = magnitude(Op::ShearX, 31, 9, 32, 32);
        assert!((shear - 0.09).abs() < 1e-7 && signed, "{shear}");
        assert_eq!(magnitude(Op::Rotate, 31, 9, 32, 32), (9.0, true));
        assert_eq!(magnitude(Op::Posterize, 31, 9, 32, 32), (7.0, false));
        assert_eq!(magnitude(Op::Solarize, 31, 9, 32, 32), (178.5, false));
        let (t, _) = magnitude(Op::TranslateX, 31, 30, 28, 32);
        assert_eq!(t, (150.0 / 331.0 * 32.0) as f32 as f64);
        assert_eq!(magnitude(Op::Equalize, 31, 9, 32, 32), (0.0, false));
    }

    #[test]
    fn draws_are_seeded_uniform_and_signed_by_chance() {
        let a = ra(2);
        assert_eq!(a.draw(7, 32, 32), a.draw(7, 32, 32));
        let draws: Vec<(Op, f64)> = (0..4000).flat_map(|s| a.draw(s, 32, 32)).collect();
        assert_eq!(draws.len(), 8000);
        for op in Op::ALL {
            let n = draws.iter().filter(|d| d.0 == op).count();
            // 8000 / 14 = 571 expected; 5 standard deviations is about 115.
            assert!((456..=686).contains(&n), "{op:?} drawn {n} times");
        }
        let rotations: Vec<f64> = draws
            .iter()
            .filter(|d| d.0 == Op::Rotate)
            .map(|d| d.1)
            .collect();
        assert!(rotations.iter().all(|m| m.abs() == 9.0));
        let negative = rotations.iter().filter(|m| **m < 0.0).count();
        assert!(
            negative * 3 > rotations.len() && negative * 3 < 2 * rotations.len(),
            "{negative} of {}",
            rotations.len()
        );
    }

    #[test]
    fn no_operation_keeps_the_image_and_the_seed_decides_the_result() {
        let pixels: Vec<u8> = (0..3 * 8 * 8).map(|i| (i * 37 % 256) as u8).collect();
        let run = |a: &RandAugment, seed: u64| {
            let mut d = pixels.clone();
            a.apply(
                ImageMut {
                    data: &mut d,
                    channels: 3,
                    height: 8,
                    width: 8,
                },
                seed,
            )
            .unwrap();
            d
        };
        assert_eq!(run(&ra(0), 3), pixels);
        let a = ra(3);
        assert_eq!(run(&a, 11), run(&a, 11));
        assert!((0..20).any(|s| run(&a, s) != run(&a, 11)));
    }
}
