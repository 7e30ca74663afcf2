//! Pad-and-random-crop on a whole batch on the training device (torchvision's `RandomCrop`
//! with `padding`, `fill` and `padding_mode`, one independent offset per image).

use imgclf_plugin_api::rng::{step_rng, Rng};
use imgclf_plugin_api::{
    plugin_bail, Augmentation, AugmentationFactory, Batch, ComponentInfo, ConfigView, DataContext,
    KeyDecl, Kind, Result, Stage,
};
use tch::Tensor;

const SECTION: &str = "augmentation.random_crop";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PaddingMode {
    Constant,
    Edge,
    Reflect,
    Symmetric,
}

impl PaddingMode {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "constant" => PaddingMode::Constant,
            "edge" => PaddingMode::Edge,
            "reflect" => PaddingMode::Reflect,
            "symmetric" => PaddingMode::Symmetric,
            other => plugin_bail!(
                "{SECTION}.padding_mode `{other}` is not one of constant, edge, reflect, symmetric"
            ),
        })
    }

    /// Source index in `0..len` for padded coordinate `q` (in `0..len + 2 * pad`), or `None`
    /// where constant padding fills.
    fn source(self, q: i64, pad: i64, len: i64) -> Option<i64> {
        let s = q - pad;
        match self {
            PaddingMode::Constant => (0..len).contains(&s).then_some(s),
            PaddingMode::Edge => Some(s.clamp(0, len - 1)),
            PaddingMode::Reflect => Some(if s < 0 {
                -s
            } else if s >= len {
                2 * (len - 1) - s
            } else {
                s
            }),
            PaddingMode::Symmetric => Some(if s < 0 {
                -s - 1
            } else if s >= len {
                2 * len - 1 - s
            } else {
                s
            }),
        }
    }
}

pub struct RandomCrop {
    pub size: i64,
    pub padding: i64,
    pub fill: f64,
    pub mode: PaddingMode,
}

impl RandomCrop {
    /// Crops `images` (N x C x H x W) with per-image offsets `offsets[n] = (dy, dx)`, each in
    /// `0..=H + 2 * padding - size`.
    pub fn crop(&self, images: &Tensor, offsets: &[(i64, i64)]) -> Result<Tensor> {
        let (n, c, h, w) = images.size4()?;
        let (s, device) = (self.size, images.device());
        // Source index of every padded coordinate (-1 where constant padding fills): tiny
        // tables, so only O(N) numbers travel to the device, not O(N * H * W) indices.
        let table = |len: i64| -> Tensor {
            let t: Vec<i64> = (0..len + 2 * self.padding)
                .map(|q| self.mode.source(q, self.padding, len).unwrap_or(-1))
                .collect();
            Tensor::from_slice(&t).to_device(device)
        };
        let (dy, dx): (Vec<i64>, Vec<i64>) = offsets.iter().copied().unzip();
        let window = Tensor::arange(s, (tch::Kind::Int64, device)).unsqueeze(0);
        let rows = table(h).index_select(
            0,
            &(Tensor::from_slice(&dy).to_device(device).unsqueeze(1) + &window).flatten(0, 1),
        );
        let cols = table(w).index_select(
            0,
            &(Tensor::from_slice(&dx).to_device(device).unsqueeze(1) + &window).flatten(0, 1),
        );
        let (rows, cols) = (rows.view([n, s, 1]), cols.view([n, 1, s]));
        let index = (rows.clamp_min(0) * w + cols.clamp_min(0))
            .view([n, 1, s * s])
            .expand([n, c, s * s], false);
        let out = images
            .flatten(2, 3)
            .f_gather(2, &index, false)?
            .view([n, c, s, s]);
        if self.mode == PaddingMode::Constant {
            let filled = rows.lt(0).logical_or(&cols.lt(0)).view([n, 1, s, s]);
            Ok(out.masked_fill(&filled, self.fill))
        } else {
            Ok(out)
        }
    }
}

impl Augmentation for RandomCrop {
    fn apply(&mut self, batch: Batch, seed: u64) -> Result<Batch> {
        let (n, _, h, w) = batch.images.size4()?;
        let (range_y, range_x) = (
            h + 2 * self.padding - self.size,
            w + 2 * self.padding - self.size,
        );
        if range_y < 0 || range_x < 0 {
            plugin_bail!(
                "random crop of {} px does not fit a {h}x{w} image padded by {}",
                self.size,
                self.padding
            );
        }
        let mut rng = step_rng(seed);
        let offsets: Vec<(i64, i64)> = (0..n)
            .map(|_| (rng.gen_range(0..=range_y), rng.gen_range(0..=range_x)))
            .collect();
        Ok(Batch {
            images: self.crop(&batch.images, &offsets)?,
            ..batch
        })
    }
}

pub struct RandomCropFactory;

impl AugmentationFactory for RandomCropFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Augmentation,
            "random_crop",
            "Pad each side, then crop a random image_size window",
        )
        .papers(&["1512.03385"])
        .switched_by("augmentation.use_random_crop", Stage::Geometric)
        .keys(vec![
            KeyDecl::int(
                &format!("{SECTION}.padding"),
                4,
                "pixels of padding on each side",
            )
            .at_least(0),
            KeyDecl::int(
                &format!("{SECTION}.fill"),
                0,
                "pixel value (0-255) of constant padding",
            )
            .range(imgclf_plugin_api::config::IntRange::between(0, 255)),
            KeyDecl::str(
                &format!("{SECTION}.padding_mode"),
                "constant",
                "how the border is padded",
            )
            .choices(&["constant", "edge", "reflect", "symmetric"]),
        ])
    }

    fn build(&self, config: &ConfigView, ctx: &DataContext) -> Result<Box<dyn Augmentation>> {
        let padding = config.int(&format!("{SECTION}.padding"))?;
        if padding < 0 {
            plugin_bail!("{SECTION}.padding must be >= 0, got {padding}");
        }
        Ok(Box::new(RandomCrop {
            size: ctx.image_size,
            padding,
            fill: config.float(&format!("{SECTION}.fill"))?,
            mode: PaddingMode::parse(&config.str(&format!("{SECTION}.padding_mode"))?)?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind as K};

    fn image() -> Tensor {
        // 1 x 1 x 3 x 3 with values 1..9
        Tensor::arange_start(1, 10, (K::Float, Device::Cpu)).view([1, 1, 3, 3])
    }

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(&t.flatten(0, -1)).unwrap()
    }

    #[test]
    fn constant_padding_fills_and_offsets_shift_the_window() {
        let c = RandomCrop {
            size: 3,
            padding: 1,
            fill: 0.0,
            mode: PaddingMode::Constant,
        };
        assert_eq!(
            values(&c.crop(&image(), &[(1, 1)]).unwrap()),
            (1..=9).map(|v| v as f32).collect::<Vec<_>>()
        );
        assert_eq!(
            values(&c.crop(&image(), &[(0, 0)]).unwrap()),
            vec![0., 0., 0., 0., 1., 2., 0., 4., 5.]
        );
        assert_eq!(
            values(&c.crop(&image(), &[(2, 2)]).unwrap()),
            vec![5., 6., 0., 8., 9., 0., 0., 0., 0.]
        );
    }

    #[test]
    fn padding_modes_match_numpy_pad() {
        // Row 0 of a window at (0, 0) with padding 2 on [[1,2,3],...]: columns -2, -1, 0.
        let row0 = |mode| {
            let c = RandomCrop {
                size: 3,
                padding: 2,
                fill: 0.0,
                mode,
            };
            values(&c.crop(&image(), &[(2, 0)]).unwrap())[..3].to_vec()
        };
        assert_eq!(row0(PaddingMode::Edge), vec![1., 1., 1.]);
        assert_eq!(row0(PaddingMode::Reflect), vec![3., 2., 1.]);
        assert_eq!(row0(PaddingMode::Symmetric), vec![2., 1., 1.]);
    }

    #[test]
    fn offsets_are_uniform_over_the_padded_range_and_seeded() {
        let mut c = RandomCrop {
            size: 3,
            padding: 1,
            fill: -1.0,
            mode: PaddingMode::Constant,
        };
        let batch = || Batch {
            images: image().repeat([4000, 1, 1, 1]),
            targets: Tensor::zeros([4000, 10], (K::Float, Device::Cpu)),
            views: 1,
        };
        let a = c.apply(batch(), 7).unwrap().images;
        let b = c.apply(batch(), 7).unwrap().images;
        assert!(a.equal(&b));
        // The centre pixel of the window equals 5 only at offset (1,1): probability 1/9.
        let centre = a.select(2, 1).select(2, 1).flatten(0, -1);
        let frac = centre
            .eq(5.0)
            .to_kind(K::Float)
            .mean(K::Float)
            .double_value(&[]);
        assert!((frac - 1.0 / 9.0).abs() < 0.02, "{frac}");
    }
}
