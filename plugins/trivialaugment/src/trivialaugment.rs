//! TrivialAugment Wide as torchvision 0.26 draws it: one of the 14 operations uniformly, at a
//! uniformly drawn bin of its `num_magnitude_bins` "wide" magnitudes, negated with probability
//! 1/2 for signed operations; applied to each training image in the data loader.

use imgclf_plugin_api::image::{linspace_f32, posterize_bits, Op, Sampling};
use imgclf_plugin_api::rng::{step_rng, Rng};
use imgclf_plugin_api::{
    ComponentInfo, ConfigView, DataContext, ImageMut, ImageStage, ImageStageFactory, KeyDecl, Kind,
    Result, Stage,
};

pub const SECTION: &str = "augmentation.trivialaugment";

/// torchvision's `TrivialAugmentWide._augmentation_space`: the magnitudes of `op` over `bins`
/// bins (none for the operations without one) and whether they are signed.
pub fn magnitudes(op: Op, bins: usize) -> (Vec<f64>, bool) {
    let lin = |end: f64| -> Vec<f64> {
        linspace_f32(0.0, end, bins)
            .into_iter()
            .map(f64::from)
            .collect()
    };
    match op {
        Op::Identity | Op::AutoContrast | Op::Equalize => (Vec::new(), false),
        Op::ShearX | Op::ShearY => (lin(0.99), true),
        Op::TranslateX | Op::TranslateY => (lin(32.0), true),
        Op::Rotate => (lin(135.0), true),
        Op::Brightness | Op::Color | Op::Contrast | Op::Sharpness => (lin(0.99), true),
        Op::Posterize => (
            posterize_bits(bins, 6.0)
                .into_iter()
                .map(f64::from)
                .collect(),
            false,
        ),
        Op::Solarize => (
            linspace_f32(255.0, 0.0, bins)
                .into_iter()
                .map(f64::from)
                .collect(),
            false,
        ),
    }
}

/// TrivialAugment's parameters (`augmentation.trivialaugment.*`).
#[derive(Clone, Debug, PartialEq)]
pub struct TrivialAugment {
    pub num_magnitude_bins: usize,
    pub sampling: Sampling,
    /// [`magnitudes`] of each operation of [`Op::ALL`].
    tables: Vec<(Vec<f64>, bool)>,
}

impl TrivialAugment {
    pub fn new(num_magnitude_bins: usize, sampling: Sampling) -> Self {
        TrivialAugment {
            num_magnitude_bins,
            sampling,
            tables: Op::ALL
                .iter()
                .map(|&op| magnitudes(op, num_magnitude_bins))
                .collect(),
        }
    }

    /// The operation and signed magnitude drawn for one image by `seed`.
    pub fn draw(&self, seed: u64) -> (Op, f64) {
        let mut rng = step_rng(seed);
        let k = rng.gen_range(0..Op::ALL.len());
        let (table, signed) = &self.tables[k];
        let m = if table.is_empty() {
            0.0
        } else {
            table[rng.gen_range(0..table.len())]
        };
        let negate = *signed && rng.gen::<bool>();
        (Op::ALL[k], if negate { -m } else { m })
    }
}

impl ImageStage for TrivialAugment {
    fn apply(&self, mut image: ImageMut<'_>, seed: u64) -> Result<()> {
        let (op, m) = self.draw(seed);
        self.sampling.apply(&mut image, op, m)
    }
}

pub struct TrivialAugmentFactory;

impl ImageStageFactory for TrivialAugmentFactory {
    fn info(&self) -> ComponentInfo {
        let mut keys = vec![KeyDecl::int(
            &format!("{SECTION}.num_magnitude_bins"),
            31,
            "number of magnitude bins spanning each operation's (wide) range",
        )
        .at_least(2)];
        keys.extend(Sampling::keys(SECTION));
        ComponentInfo::new(
            Kind::Augmentation,
            "trivialaugment",
            "TrivialAugment Wide: one random operation at a random magnitude, per image in the loader",
        )
        .papers(&["2103.10158"])
        .switched_by("augmentation.use_trivialaugment", Stage::Image)
        .keys(keys)
    }

    fn build(&self, config: &ConfigView, ctx: &DataContext) -> Result<Box<dyn ImageStage>> {
        let bins = config.int(&format!("{SECTION}.num_magnitude_bins"))?;
        Ok(Box::new(TrivialAugment::new(
            bins.max(2) as usize,
            Sampling::from_config(config, SECTION, ctx.n_channels)?,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgclf_plugin_api::image::Interpolation;

    fn ta() -> TrivialAugment {
        TrivialAugment::new(
            31,
            Sampling {
                interpolation: Interpolation::Nearest,
                fill: vec![],
            },
        )
    }

    #[test]
    fn wide_magnitudes_are_torchvisions() {
        let (rot, signed) = magnitudes(Op::Rotate, 31);
        assert_eq!((rot[0], rot[30], rot[1], signed), (0.0, 135.0, 4.5, true));
        let (bits, _) = magnitudes(Op::Posterize, 31);
        assert_eq!((bits[0], bits[30]), (8.0, 2.0));
        assert_eq!(magnitudes(Op::TranslateY, 31).0[30], 32.0);
        assert!(magnitudes(Op::AutoContrast, 31).0.is_empty());
    }

    #[test]
    fn one_seeded_operation_per_image_at_every_bin() {
        let a = ta();
        assert_eq!(a.draw(5), a.draw(5));
        let draws: Vec<(Op, f64)> = (0..14_000).map(|s| a.draw(s)).collect();
        for op in Op::ALL {
            let n = draws.iter().filter(|d| d.0 == op).count();
            // 1000 expected; 5 standard deviations is about 150.
            assert!((850..=1150).contains(&n), "{op:?} drawn {n} times");
        }
        let rotations: std::collections::BTreeSet<i64> = draws
            .iter()
            .filter(|d| d.0 == Op::Rotate)
            .map(|d| (d.1 * 10.0) as i64)
            .collect();
        // 31 bins, both signs (0 once): 61 distinct values.
        assert_eq!(rotations.len(), 61, "{rotations:?}");
    }

    #[test]
    fn the_image_changes_with_the_seed_and_only_with_it() {
        let pixels: Vec<u8> = (0..8 * 8).map(|i| (i * 53 % 256) as u8).collect();
        let run = |seed: u64| {
            let mut d = pixels.clone();
            ta().apply(
                ImageMut {
                    data: &mut d,
                    channels: 1,
                    height: 8,
                    width: 8,
                },
                seed,
            )
            .unwrap();
            d
        };
        assert_eq!(run(4), run(4));
        assert!((0..20).any(|s| run(s) != run(4)));
    }
}
