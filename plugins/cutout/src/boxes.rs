//! Where Cutout puts its square: the reference's sampling rule (centre uniform over the image,
//! or over the positions that keep the square inside with `cut_inside`; the square is clipped
//! to the image), and the masking of a whole batch on its device.
//!
//! Plain functions with no registration, so Dual-Cutout (plugins/dual_cutout) compiles this same
//! file into its own crate instead of copying it.

use imgclf_plugin_api::augment::{rect_mask, Rect};
use imgclf_plugin_api::rng::{Rng, StepRng};
use imgclf_plugin_api::{plugin_bail, ConfigView, KeyDecl, Result};
use tch::Tensor;

pub const SECTION: &str = "augmentation.cutout";

/// Cutout's parameters (`augmentation.cutout.*`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CutoutBoxes {
    /// Probability that an image gets a square at all.
    pub prob: f64,
    /// Side of the square in pixels.
    pub mask_size: i64,
    /// Keep the whole square inside the image.
    pub cut_inside: bool,
    /// Value written into the square, in normalised space (0 is the dataset mean).
    pub mask_color: f64,
}

impl CutoutBoxes {
    /// The keys Cutout owns (Dual-Cutout reads them too).
    pub fn keys() -> Vec<KeyDecl> {
        vec![
            KeyDecl::float(
                &format!("{SECTION}.prob"),
                1.0,
                "probability of masking an image",
            ),
            KeyDecl::int(
                &format!("{SECTION}.mask_size"),
                16,
                "side of the square mask in pixels",
            )
            .at_least(1),
            KeyDecl::bool(
                &format!("{SECTION}.cut_inside"),
                false,
                "keep the whole square inside the image (else its centre may sit on the border)",
            ),
            KeyDecl::float(
                &format!("{SECTION}.mask_color"),
                0.0,
                "value of the masked pixels, in normalised space (0 = dataset mean)",
            ),
        ]
    }

    /// Reads and checks the keys for images of `image_size` pixels.
    pub fn from_config(config: &ConfigView, image_size: i64) -> Result<Self> {
        let b = CutoutBoxes {
            prob: config.float(&format!("{SECTION}.prob"))?,
            mask_size: config.int(&format!("{SECTION}.mask_size"))?,
            cut_inside: config.bool(&format!("{SECTION}.cut_inside"))?,
            mask_color: config.float(&format!("{SECTION}.mask_color"))?,
        };
        if !(0.0..=1.0).contains(&b.prob) {
            plugin_bail!("{SECTION}.prob must be in [0, 1], got {}", b.prob);
        }
        if b.mask_size < 1 {
            plugin_bail!("{SECTION}.mask_size must be >= 1, got {}", b.mask_size);
        }
        if b.cut_inside && b.mask_size > image_size {
            plugin_bail!(
                "{SECTION}.mask_size {} does not fit inside {image_size}x{image_size} images with {SECTION}.cut_inside True; lower the mask size or set cut_inside False",
                b.mask_size
            );
        }
        Ok(b)
    }

    /// The square for one `h` x `w` image (empty with probability `1 - prob`).
    pub fn sample(&self, rng: &mut StepRng, h: i64, w: i64) -> Rect {
        if rng.gen::<f64>() > self.prob {
            return Rect::EMPTY;
        }
        let half = self.mask_size / 2;
        let offset = i64::from(self.mask_size % 2 == 0);
        let (lo, hi_x, hi_y) = if self.cut_inside {
            (half, w + offset - half, h + offset - half)
        } else {
            (0, w + offset, h + offset)
        };
        let cx = rng.gen_range(lo..hi_x.max(lo + 1));
        let cy = rng.gen_range(lo..hi_y.max(lo + 1));
        let (x0, y0) = (cx - half, cy - half);
        Rect {
            y0: y0.max(0),
            y1: (y0 + self.mask_size).min(h),
            x0: x0.max(0),
            x1: (x0 + self.mask_size).min(w),
        }
    }

    /// Masks every image of `images` (N x C x H x W) independently; returns the squares too.
    pub fn apply(&self, images: &Tensor, rng: &mut StepRng) -> Result<(Tensor, Vec<Rect>)> {
        let (n, _, h, w) = images.size4()?;
        let rects: Vec<Rect> = (0..n).map(|_| self.sample(rng, h, w)).collect();
        if rects.iter().all(|r| r.area() == 0) {
            return Ok((images.shallow_clone(), rects));
        }
        let mask = rect_mask(&rects, h, w, images.device())?;
        Ok((images.f_masked_fill(&mask, self.mask_color)?, rects))
    }
}
