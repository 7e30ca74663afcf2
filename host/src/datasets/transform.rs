//! The reference's ImageNet transforms (`create_imagenet_transform`) with torchvision's
//! semantics, on one decoded RGB image, written as C x H x W uint8.
//!
//! Training: `RandomResizedCrop(image_size)` (scale (0.08, 1), ratio (3/4, 4/3), ten tries then
//! the central fallback; bilinear with antialiasing, as PIL) when `augmentation.use_random_crop`,
//! else `CenterCrop(image_size)`; then `RandomHorizontalFlip(p)` when
//! `augmentation.use_random_horizontal_flip`. Validation: `Resize(tta.resize)` (shorter side)
//! when `tta.use_resize`, then `CenterCrop(image_size)` when `tta.use_center_crop`.
//! Normalisation happens after batching, on the training device, like every dataset's.
//! Random draws come from the caller's generator, seeded per (seed, epoch, sample).

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use imgclf_plugin_api::rng::Rng;

/// A crop rectangle in source pixels; it may extend past the image (center crop of a smaller
/// image), where the output is 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    pub top: i64,
    pub left: i64,
    pub height: usize,
    pub width: usize,
}

/// torchvision's `RandomResizedCrop.get_params`: up to ten draws of an area fraction in
/// `scale` and a log-uniform aspect ratio in `ratio` whose box fits; otherwise the whole image
/// clipped to the ratio range, centred.
pub fn random_resized_crop_box(
    width: usize,
    height: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut impl Rng,
) -> CropBox {
    let area = (width * height) as f64;
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target_area = area * rng.gen_range(scale.0..scale.1);
        let aspect = rng.gen_range(log_lo..log_hi).exp();
        // Python's round(): half to even.
        let w = (target_area * aspect).sqrt().round_ties_even() as i64;
        let h = (target_area / aspect).sqrt().round_ties_even() as i64;
        if 0 < w && w as usize <= width && 0 < h && h as usize <= height {
            let top = rng.gen_range(0..=(height as i64 - h));
            let left = rng.gen_range(0..=(width as i64 - w));
            return CropBox {
                top,
                left,
                height: h as usize,
                width: w as usize,
            };
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio.0.min(ratio.1) {
        (
            width,
            (width as f64 / ratio.0.min(ratio.1)).round_ties_even() as usize,
        )
    } else if in_ratio > ratio.0.max(ratio.1) {
        (
            (height as f64 * ratio.0.max(ratio.1)).round_ties_even() as usize,
            height,
        )
    } else {
        (width, height)
    };
    CropBox {
        top: ((height - h) / 2) as i64,
        left: ((width - w) / 2) as i64,
        height: h,
        width: w,
    }
}

/// torchvision's `center_crop`: a smaller image is zero-padded by `(crop - size) // 2` before
/// its start; otherwise the offset is `round((size - crop) / 2)` (half to even).
pub fn center_crop_box(width: usize, height: usize, crop_h: usize, crop_w: usize) -> CropBox {
    let offset = |size: usize, crop: usize| -> i64 {
        if crop > size {
            -(((crop - size) / 2) as i64)
        } else {
            ((size - crop) as f64 / 2.0).round_ties_even() as i64
        }
    };
    CropBox {
        top: offset(height, crop_h),
        left: offset(width, crop_w),
        height: crop_h,
        width: crop_w,
    }
}

/// torchvision's `Resize(size)` with an int: the shorter side becomes `size`, the longer one
/// `int(size * long / short)`. Returns (width, height).
pub fn resize_shorter_side(width: usize, height: usize, size: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = (size as f64 * long as f64 / short as f64) as usize;
    if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// A decoded RGB image, rows of `width * 3` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl Rgb {
    /// The `b` box of the image, zero outside it.
    pub fn crop(&self, b: CropBox) -> Rgb {
        let mut data = vec![0u8; b.width * b.height * 3];
        let x0 = b.left.max(0);
        let x1 = (b.left + b.width as i64).min(self.width as i64);
        if x1 > x0 {
            let n = (x1 - x0) as usize * 3;
            for y in 0..b.height {
                let sy = b.top + y as i64;
                if sy < 0 || sy >= self.height as i64 {
                    continue;
                }
                let src = (sy as usize * self.width + x0 as usize) * 3;
                let dst = (y * b.width + (x0 - b.left) as usize) * 3;
                data[dst..dst + n].copy_from_slice(&self.data[src..src + n]);
            }
        }
        Rgb {
            width: b.width,
            height: b.height,
            data,
        }
    }

    /// Resized to `width` x `height`, bilinear with antialiasing (PIL's `BILINEAR`).
    pub fn resize(&self, resizer: &mut Resizer, width: usize, height: usize) -> Rgb {
        if (width, height) == (self.width, self.height) {
            return self.clone();
        }
        let src = ImageRef::new(
            self.width as u32,
            self.height as u32,
            &self.data,
            PixelType::U8x3,
        )
        .expect("an Rgb buffer holds width * height * 3 bytes");
        let mut dst = Image::new(width as u32, height as u32, PixelType::U8x3);
        resizer
            .resize(
                &src,
                &mut dst,
                &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear)),
            )
            .expect("source and destination are both U8x3 and non-empty");
        Rgb {
            width,
            height,
            data: dst.into_vec(),
        }
    }

    /// Writes the image as C x H x W into `out` (3 * height * width bytes), mirrored
    /// left-right when `flip`.
    pub fn write_chw(&self, flip: bool, out: &mut [u8]) {
        let plane = self.width * self.height;
        debug_assert_eq!(out.len(), 3 * plane);
        let (r, rest) = out.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for y in 0..self.height {
            let row = &self.data[y * self.width * 3..(y + 1) * self.width * 3];
            let o = y * self.width;
            for (x, px) in row.chunks_exact(3).enumerate() {
                let dx = if flip { self.width - 1 - x } else { x };
                r[o + dx] = px[0];
                g[o + dx] = px[1];
                b[o + dx] = px[2];
            }
        }
    }
}

/// Which geometric transform a split applies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Geometry {
    /// Training with `augmentation.use_random_crop`.
    RandomResizedCrop {
        scale: (f64, f64),
        ratio: (f64, f64),
    },
    /// Optional shorter-side resize, then an optional center crop to `image_size` (training
    /// without random crop: no resize, center crop).
    ResizeCenterCrop {
        resize: Option<usize>,
        center_crop: bool,
    },
}

/// The whole per-image transform of one split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transform {
    pub geometry: Geometry,
    /// Output side (`dataset.image_size`).
    pub size: usize,
    /// Probability of a horizontal flip (0 for validation).
    pub flip_prob: f64,
}

/// torchvision's `RandomResizedCrop` defaults.
pub const RRC_SCALE: (f64, f64) = (0.08, 1.0);
pub const RRC_RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);

impl Transform {
    /// [`apply`](Self::apply) with fresh resize buffers (one-off images, tests).
    pub fn apply_alone(&self, img: &Rgb, rng: &mut impl Rng, out: &mut [u8]) -> Option<()> {
        self.apply(img, &mut Resizer::new(), rng, out)
    }

    /// Applies the transform; `None` when the result is not `size` x `size` (a validation
    /// transform without center crop on an image of another size).
    pub fn apply(
        &self,
        img: &Rgb,
        resizer: &mut Resizer,
        rng: &mut impl Rng,
        out: &mut [u8],
    ) -> Option<()> {
        let s = self.size;
        let shaped = match self.geometry {
            Geometry::RandomResizedCrop { scale, ratio } => {
                let b = random_resized_crop_box(img.width, img.height, scale, ratio, rng);
                img.crop(b).resize(resizer, s, s)
            }
            Geometry::ResizeCenterCrop {
                resize,
                center_crop,
            } => {
                let resized;
                let img = match resize {
                    Some(r) => {
                        let (w, h) = resize_shorter_side(img.width, img.height, r);
                        resized = img.resize(resizer, w, h);
                        &resized
                    }
                    None => img,
                };
                if center_crop {
                    img.crop(center_crop_box(img.width, img.height, s, s))
                } else if img.width == s && img.height == s {
                    img.clone()
                } else {
                    return None;
                }
            }
        };
        let flip = self.flip_prob > 0.0 && rng.gen::<f64>() < self.flip_prob;
        shaped.write_chw(flip, out);
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgclf_plugin_api::rng::step_rng;

    #[test]
    fn random_resized_crop_boxes_stay_in_bounds_and_cover_the_scale_range() {
        let mut rng = step_rng(1);
        let (w, h) = (500usize, 375usize);
        let (mut min_frac, mut max_frac) = (f64::MAX, 0.0f64);
        for _ in 0..20000 {
            let b = random_resized_crop_box(w, h, RRC_SCALE, RRC_RATIO, &mut rng);
            assert!(b.top >= 0 && b.left >= 0);
            assert!(b.top as usize + b.height <= h && b.left as usize + b.width <= w);
            let frac = (b.width * b.height) as f64 / (w * h) as f64;
            let aspect = b.width as f64 / b.height as f64;
            // Rounding moves the box by at most half a pixel per side.
            assert!(frac > 0.08 * 0.95 && frac <= 1.0, "{frac}");
            assert!(
                aspect > 0.75 * 0.97 && aspect < 4.0 / 3.0 * 1.03,
                "{aspect}"
            );
            min_frac = min_frac.min(frac);
            max_frac = max_frac.max(frac);
        }
        assert!(min_frac < 0.1 && max_frac > 0.9, "{min_frac} {max_frac}");
    }

    #[test]
    fn random_resized_crop_falls_back_to_the_central_ratio_clipped_box() {
        // A 1000x10 strip: no draw of ratio <= 4/3 fits, so every try fails.
        let mut rng = step_rng(2);
        let b = random_resized_crop_box(1000, 10, RRC_SCALE, RRC_RATIO, &mut rng);
        // in_ratio 100 > 4/3: h = 10, w = round(10 * 4/3) = 13, centred.
        assert_eq!(
            b,
            CropBox {
                top: 0,
                left: (1000 - 13) / 2,
                height: 10,
                width: 13
            }
        );
        let b = random_resized_crop_box(10, 1000, RRC_SCALE, RRC_RATIO, &mut rng);
        assert_eq!((b.width, b.height), (10, 13));
        assert_eq!((b.top, b.left), ((1000 - 13) / 2, 0));
    }

    #[test]
    fn center_crop_matches_torchvision_rounding_and_padding() {
        // (375 - 224) / 2 = 75.5 rounds to 76 (half to even), (500 - 224) / 2 = 138.
        assert_eq!(
            center_crop_box(500, 375, 224, 224),
            CropBox {
                top: 76,
                left: 138,
                height: 224,
                width: 224
            }
        );
        // (5 - 2) / 2 = 1.5 rounds to 2; (4 - 2) / 2 = 1.
        assert_eq!(center_crop_box(4, 5, 2, 2).top, 2);
        assert_eq!(center_crop_box(4, 5, 2, 2).left, 1);
        // Smaller than the crop: padded by (crop - size) // 2 before.
        assert_eq!(center_crop_box(3, 10, 8, 8).left, -2);
        let img = Rgb {
            width: 3,
            height: 1,
            data: vec![1, 1, 1, 2, 2, 2, 3, 3, 3],
        };
        let c = img.crop(center_crop_box(3, 1, 1, 6));
        let reds: Vec<u8> = c.data.chunks(3).map(|p| p[0]).collect();
        // pad left (6 - 3) // 2 = 1, right 2.
        assert_eq!(reds, [0, 1, 2, 3, 0, 0]);
    }

    #[test]
    fn resize_shorter_side_truncates_the_longer_side() {
        assert_eq!(resize_shorter_side(500, 375, 256), (341, 256));
        assert_eq!(resize_shorter_side(375, 500, 256), (256, 341));
        assert_eq!(resize_shorter_side(300, 300, 256), (256, 256));
    }

    #[test]
    fn center_crop_output_is_exact_and_flip_mirrors() {
        let (w, h) = (7usize, 5usize);
        let data: Vec<u8> = (0..w * h * 3).map(|i| i as u8).collect();
        let img = Rgb {
            width: w,
            height: h,
            data,
        };
        let t = Transform {
            geometry: Geometry::ResizeCenterCrop {
                resize: None,
                center_crop: true,
            },
            size: 3,
            flip_prob: 0.0,
        };
        let mut out = vec![0u8; 27];
        t.apply(&img, &mut Resizer::new(), &mut step_rng(0), &mut out)
            .unwrap();
        // top = round(1.0) = 1, left = 2: R plane rows 1..4, cols 2..5.
        let expect_r: Vec<u8> = (1..4)
            .flat_map(|y| (2..5).map(move |x| ((y * w + x) * 3) as u8))
            .collect();
        assert_eq!(&out[..9], &expect_r[..]);
        let mut flipped = vec![0u8; 27];
        let t = Transform {
            flip_prob: 1.0,
            ..t
        };
        t.apply(&img, &mut Resizer::new(), &mut step_rng(0), &mut flipped)
            .unwrap();
        for y in 0..3 {
            for x in 0..3 {
                assert_eq!(flipped[y * 3 + x], out[y * 3 + 2 - x]);
            }
        }
        // A validation transform without center crop refuses other sizes.
        let t = Transform {
            geometry: Geometry::ResizeCenterCrop {
                resize: None,
                center_crop: false,
            },
            size: 3,
            flip_prob: 0.0,
        };
        assert!(t
            .apply(&img, &mut Resizer::new(), &mut step_rng(0), &mut out)
            .is_none());
    }

    #[test]
    fn resize_of_a_constant_image_is_constant() {
        let img = Rgb {
            width: 50,
            height: 40,
            data: vec![77; 50 * 40 * 3],
        };
        let r = img.resize(&mut Resizer::new(), 13, 17);
        assert_eq!((r.width, r.height), (13, 17));
        assert!(r.data.iter().all(|&v| v == 77));
    }
}
