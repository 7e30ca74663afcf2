//! torchvision's uint8 image operations, on one `channels x height x width` image in place:
//! the operation set of RandAugment, TrivialAugment and AutoAugment (torchvision 0.26,
//! `transforms/autoaugment.py::_apply_op` over `transforms/_functional_tensor.py`), for
//! per-image stages ([`crate::ImageStage`]). Plain Rust, no libtorch: the loader's worker
//! threads run it.
//!
//! Each operation follows torchvision's tensor arithmetic step by step (float32 products and
//! sums, truncation when casting back to uint8, round-half-to-even where torchvision rounds), so
//! that the results equal torchvision's bit for bit; `tests/augment_ops.rs` checks that on
//! real and generated images. The affine operations (shear, translate, rotate) sample as
//! `grid_sample` does and may pick the neighbouring source pixel where torchvision's matrix
//! product rounds a source coordinate to the other side of a half-pixel boundary.

use crate::component::ImageMut;
use crate::config::{ConfigView, KeyDecl};
use crate::error::{Error, Result};

/// How affine operations sample the source image (torchvision's tensor backend supports these
/// two).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interpolation {
    Nearest,
    Bilinear,
}

impl Interpolation {
    pub const NAMES: [&'static str; 2] = ["nearest", "bilinear"];

    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "nearest" => Ok(Interpolation::Nearest),
            "bilinear" => Ok(Interpolation::Bilinear),
            other => Err(Error(format!(
                "unknown interpolation `{other}` (nearest or bilinear)"
            ))),
        }
    }
}

/// How the affine operations sample and fill: `<section>.interpolation` and `<section>.fill`
/// (torchvision's `interpolation` and `fill` arguments), shared by the AutoAugment family.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    pub interpolation: Interpolation,
    /// Empty: torchvision's `fill=None` (zeros outside the image).
    pub fill: Vec<f64>,
}

impl Sampling {
    pub fn keys(section: &str) -> Vec<KeyDecl> {
        vec![
            KeyDecl::str(
                &format!("{section}.interpolation"),
                "nearest",
                "sampling of shear, translate and rotate (torchvision's default: nearest)",
            )
            .choices(&Interpolation::NAMES),
            KeyDecl::float_list(
                &format!("{section}.fill"),
                &[],
                "pixel value (0..255) outside the image after shear, translate and rotate: one \
                 value, or one per channel; empty: zeros (torchvision's fill=None)",
            ),
        ]
    }

    /// Reads and checks the keys for images of `channels` channels.
    pub fn from_config(config: &ConfigView, section: &str, channels: i64) -> Result<Self> {
        let key = |k: &str| format!("{section}.{k}");
        let fill = config.float_list(&key("fill"))?;
        if !(fill.is_empty() || fill.len() == 1 || fill.len() as i64 == channels) {
            return Err(Error(format!(
                "{} has {} values, but the images have {channels} channel(s): give none, one, or {channels}",
                key("fill"),
                fill.len()
            )));
        }
        if let Some(v) = fill.iter().find(|v| !(0.0..=255.0).contains(*v)) {
            return Err(Error(format!(
                "{} holds {v}, outside the pixel range 0..255",
                key("fill")
            )));
        }
        Ok(Sampling {
            interpolation: Interpolation::from_name(&config.str(&key("interpolation"))?)?,
            fill,
        })
    }

    /// [`apply_op`] with these settings.
    pub fn apply(&self, img: &mut ImageMut<'_>, op: Op, magnitude: f64) -> Result<()> {
        apply_op(img, op, magnitude, self.interpolation, &self.fill)
    }
}

/// The operations, in torchvision's order (the order of its augmentation-space dicts, which
/// is what a uniformly drawn operation index refers to).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Identity,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
    Rotate,
    Brightness,
    Color,
    Contrast,
    Sharpness,
    Posterize,
    Solarize,
    AutoContrast,
    Equalize,
}

impl Op {
    pub const ALL: [Op; 14] = [
        Op::Identity,
        Op::ShearX,
        Op::ShearY,
        Op::TranslateX,
        Op::TranslateY,
        Op::Rotate,
        Op::Brightness,
        Op::Color,
        Op::Contrast,
        Op::Sharpness,
        Op::Posterize,
        Op::Solarize,
        Op::AutoContrast,
        Op::Equalize,
    ];

    /// torchvision's name of the operation (`ShearX`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Op::Identity => "Identity",
            Op::ShearX => "ShearX",
            Op::ShearY => "ShearY",
            Op::TranslateX => "TranslateX",
            Op::TranslateY => "TranslateY",
            Op::Rotate => "Rotate",
            Op::Brightness => "Brightness",
            Op::Color => "Color",
            Op::Contrast => "Contrast",
            Op::Sharpness => "Sharpness",
            Op::Posterize => "Posterize",
            Op::Solarize => "Solarize",
            Op::AutoContrast => "AutoContrast",
            Op::Equalize => "Equalize",
        }
    }

    pub fn from_name(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|o| o.name() == name)
    }

    /// Whether the operation moves pixels (and so uses interpolation and fill).
    pub fn is_affine(self) -> bool {
        matches!(
            self,
            Op::ShearX | Op::ShearY | Op::TranslateX | Op::TranslateY | Op::Rotate
        )
    }
}

/// `torch.linspace(start, end, steps)` in float32, as ATen's CPU kernel computes it for the
/// short tables of the AutoAugment family: the first half counted up from `start`, the second
/// half down from `end`, each value one fused multiply-add (the kernel's scalar loop, compiled
/// with FMA contraction). ATen's AVX2 kernels compute 16 or more steps in 8-lane vectors
/// instead, which moves a few values by one float32 ulp (TrivialAugmentWide's translate bin 15
/// is 15.999999 there, so `int()` makes it 15 pixels); its AVX-512 kernels, like this, run the
/// scalar loop for up to 31 steps.
pub fn linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// torchvision's posterize bits: `8 - (arange(bins) / ((bins - 1) / divisor)).round().int()`
/// (divisor 4 for RandAugment, 6 for TrivialAugmentWide).
pub fn posterize_bits(bins: usize, divisor: f64) -> Vec<f32> {
    let d = ((bins as f64 - 1.0) / divisor) as f32;
    (0..bins)
        .map(|i| 8.0 - (i as f32 / d).round_ties_even())
        .collect()
}

/// Applies `op` with `magnitude` (signed, as torchvision passes it to `_apply_op`) to `img`.
/// `fill` is torchvision's `fill` for the affine operations: empty for `None` (zeros outside,
/// its default), else one value per channel (or one for all).
pub fn apply_op(
    img: &mut ImageMut<'_>,
    op: Op,
    magnitude: f64,
    interpolation: Interpolation,
    fill: &[f64],
) -> Result<()> {
    if img.channels != 1 && img.channels != 3 {
        return Err(Error(format!(
            "image operations take 1 or 3 channels, got {}",
            img.channels
        )));
    }
    if !fill.is_empty() && fill.len() != 1 && fill.len() != img.channels {
        return Err(Error(format!(
            "fill has {} values for an image of {} channels (give 1 or {})",
            fill.len(),
            img.channels,
            img.channels
        )));
    }
    let (w, h) = (img.width as f64, img.height as f64);
    match op {
        Op::Identity => {}
        Op::ShearX => {
            let m = inverse_affine(
                [-w * 0.5, -h * 0.5],
                0.0,
                [0.0, 0.0],
                [magnitude.atan().to_degrees(), 0.0],
            );
            warp(img, &m, interpolation, fill);
        }
        Op::ShearY => {
            let m = inverse_affine(
                [-w * 0.5, -h * 0.5],
                0.0,
                [0.0, 0.0],
                [0.0, magnitude.atan().to_degrees()],
            );
            warp(img, &m, interpolation, fill);
        }
        Op::TranslateX => {
            let m = inverse_affine([0.0, 0.0], 0.0, [magnitude.trunc(), 0.0], [0.0, 0.0]);
            warp(img, &m, interpolation, fill);
        }
        Op::TranslateY => {
            let m = inverse_affine([0.0, 0.0], 0.0, [0.0, magnitude.trunc()], [0.0, 0.0]);
            warp(img, &m, interpolation, fill);
        }
        Op::Rotate => {
            // F.rotate passes -angle to the inverse matrix (affine and rotate disagree on the
            // direction).
            let m = inverse_affine([0.0, 0.0], -magnitude, [0.0, 0.0], [0.0, 0.0]);
            warp(img, &m, interpolation, fill);
        }
        Op::Brightness => brightness(img, 1.0 + magnitude),
        Op::Color => saturation(img, 1.0 + magnitude),
        Op::Contrast => contrast(img, 1.0 + magnitude),
        Op::Sharpness => sharpness(img, 1.0 + magnitude),
        Op::Posterize => posterize(img, magnitude as i64),
        Op::Solarize => solarize(img, magnitude),
        Op::AutoContrast => autocontrast(img),
        Op::Equalize => equalize(img),
    }
    Ok(())
}

// ---------------------------------------------------------------- colour operations

/// `_blend`: `ratio * a + (1 - ratio) * b` in float32, clamped to [0, 255] and truncated.
#[inline]
fn blend(a: u8, b: f32, ratio: f32, rest: f32) -> u8 {
    let v = ratio * a as f32 + rest * b;
    v.clamp(0.0, 255.0) as u8
}

/// `adjust_brightness`: blend with black.
pub fn brightness(img: &mut ImageMut<'_>, factor: f64) {
    let (ratio, rest) = (factor as f32, (1.0 - factor) as f32);
    for p in img.data.iter_mut() {
        *p = blend(*p, 0.0, ratio, rest);
    }
}

/// `rgb_to_grayscale` of pixel `i`: `(0.2989 r + 0.587 g + 0.114 b)` in float32, truncated.
#[inline]
fn gray_at(data: &[u8], plane: usize, i: usize) -> u8 {
    let (r, g, b) = (
        data[i] as f32,
        data[plane + i] as f32,
        data[2 * plane + i] as f32,
    );
    (0.2989f32 * r + 0.587f32 * g + 0.114f32 * b) as u8
}

/// `adjust_saturation`: blend with the grayscale image (a single-channel image is unchanged).
pub fn saturation(img: &mut ImageMut<'_>, factor: f64) {
    if img.channels != 3 {
        return;
    }
    let (ratio, rest) = (factor as f32, (1.0 - factor) as f32);
    let plane = img.plane();
    for i in 0..plane {
        let g = gray_at(img.data, plane, i) as f32;
        for c in 0..3 {
            let p = &mut img.data[c * plane + i];
            *p = blend(*p, g, ratio, rest);
        }
    }
}

/// `adjust_contrast`: blend with the mean of the grayscale image (float32; the integer sum is
/// exact in float32 for images up to 2^24 / 255 pixels, as torch's sum then is).
pub fn contrast(img: &mut ImageMut<'_>, factor: f64) {
    let plane = img.plane();
    let sum: u64 = if img.channels == 3 {
        (0..plane).map(|i| gray_at(img.data, plane, i) as u64).sum()
    } else {
        img.data.iter().map(|&p| p as u64).sum()
    };
    let mean = sum as f32 / plane as f32;
    let (ratio, rest) = (factor as f32, (1.0 - factor) as f32);
    for p in img.data.iter_mut() {
        *p = blend(*p, mean, ratio, rest);
    }
}

/// `adjust_sharpness`: blend with the image smoothed by the 3x3 kernel (1 1 1; 1 5 1; 1 1 1)/13
/// inside a one-pixel border (rounded to the nearest integer: k/13 is never a half, so the
/// integer rounding equals torch's float one), the border kept.
pub fn sharpness(img: &mut ImageMut<'_>, factor: f64) {
    let (h, w) = (img.height, img.width);
    if h <= 2 || w <= 2 {
        return;
    }
    let (ratio, rest) = (factor as f32, (1.0 - factor) as f32);
    let plane = img.plane();
    let mut blurred = vec![0u8; plane];
    for c in 0..img.channels {
        let ch = &mut img.data[c * plane..(c + 1) * plane];
        blurred.copy_from_slice(ch);
        for y in 1..h - 1 {
            for x in 1..w - 1 {
                let mut k = 4 * ch[y * w + x] as u32;
                for dy in 0..3 {
                    let row = (y + dy - 1) * w;
                    k += ch[row + x - 1] as u32 + ch[row + x] as u32 + ch[row + x + 1] as u32;
                }
                blurred[y * w + x] = ((2 * k + 13) / 26) as u8;
            }
        }
        for (p, &b) in ch.iter_mut().zip(&blurred) {
            *p = blend(*p, b as f32, ratio, rest);
        }
    }
}

/// `posterize`: keep the top `bits` bits.
pub fn posterize(img: &mut ImageMut<'_>, bits: i64) {
    let mask = (-(1i64 << (8 - bits.clamp(0, 8)))) as u8;
    for p in img.data.iter_mut() {
        *p &= mask;
    }
}

/// `solarize`: invert every pixel at or above `threshold`.
pub fn solarize(img: &mut ImageMut<'_>, threshold: f64) {
    let t = threshold as f32;
    for p in img.data.iter_mut() {
        if *p as f32 >= t {
            *p = 255 - *p;
        }
    }
}

/// `autocontrast`: stretch each channel to [0, 255] (float32 scale, truncated); a constant
/// channel is kept.
pub fn autocontrast(img: &mut ImageMut<'_>) {
    let plane = img.plane();
    for ch in img.data.chunks_exact_mut(plane.max(1)) {
        let (lo, hi) = ch
            .iter()
            .fold((255u8, 0u8), |(lo, hi), &p| (lo.min(p), hi.max(p)));
        let (mut min, mut scale) = (lo as f32, 255.0f32 / (hi as f32 - lo as f32));
        if !scale.is_finite() {
            (min, scale) = (0.0, 1.0);
        }
        for p in ch.iter_mut() {
            *p = ((*p as f32 - min) * scale).clamp(0.0, 255.0) as u8;
        }
    }
}

/// `equalize`: per channel, torchvision's (PIL's) histogram equalisation lookup table.
pub fn equalize(img: &mut ImageMut<'_>) {
    let plane = img.plane();
    for ch in img.data.chunks_exact_mut(plane.max(1)) {
        let mut hist = [0u64; 256];
        for &p in ch.iter() {
            hist[p as usize] += 1;
        }
        let nonzero: Vec<u64> = hist.iter().copied().filter(|&n| n != 0).collect();
        let step = nonzero[..nonzero.len().saturating_sub(1)]
            .iter()
            .sum::<u64>()
            / 255;
        if step == 0 {
            continue;
        }
        let mut lut = [0u8; 256];
        let mut cum = 0u64;
        for (i, &n) in hist.iter().enumerate().take(255) {
            cum += n;
            lut[i + 1] = ((cum + step / 2) / step).min(255) as u8;
        }
        for p in ch.iter_mut() {
            *p = lut[*p as usize];
        }
    }
}

// ---------------------------------------------------------------- affine operations

/// torchvision's `_get_inverse_affine_matrix` (scale 1), in float64 as Python computes it:
/// output pixel (relative to the centre) -> source pixel. `center` is relative to the image
/// centre; angles in degrees.
fn inverse_affine(center: [f64; 2], angle: f64, translate: [f64; 2], shear: [f64; 2]) -> [f64; 6] {
    let rot = angle.to_radians();
    let (sx, sy) = (shear[0].to_radians(), shear[1].to_radians());
    let [cx, cy] = center;
    let [tx, ty] = translate;
    let a = (rot - sy).cos() / sy.cos();
    let b = -(rot - sy).cos() * sx.tan() / sy.cos() - rot.sin();
    let c = (rot - sy).sin() / sy.cos();
    let d = -(rot - sy).sin() * sx.tan() / sy.cos() + rot.cos();
    let mut m = [d, -b, 0.0, -c, a, 0.0];
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty);
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty);
    m[2] += cx;
    m[5] += cy;
    m
}

/// torchvision's tensor `affine`/`rotate` without `expand`: the sampling grid of
/// `_gen_affine_grid` (float32), then `grid_sample(align_corners=False, padding zeros)` and
/// the fill of the pixels sampled from outside.
fn warp(img: &mut ImageMut<'_>, m: &[f64; 6], interpolation: Interpolation, fill: &[f64]) {
    let (h, w, channels) = (img.height, img.width, img.channels);
    let plane = h * w;
    let (wf, hf) = (w as f32, h as f32);
    let theta: Vec<f32> = m.iter().map(|&v| v as f32).collect();
    // rescaled_theta = theta^T / [0.5 w, 0.5 h]
    let (hw, hh) = (0.5f32 * wf, 0.5f32 * hf);
    let (r00, r10, r20) = (theta[0] / hw, theta[1] / hw, theta[2] / hw);
    let (r01, r11, r21) = (theta[3] / hh, theta[4] / hh, theta[5] / hh);
    let fill_of = |c: usize| -> Option<f32> {
        match fill.len() {
            0 => None,
            1 => Some(fill[0] as f32),
            _ => Some(fill[c] as f32),
        }
    };
    let src = img.data.to_vec();
    let out = &mut *img.data;
    for y in 0..h {
        let by = y as f32 - hf * 0.5 + 0.5;
        for x in 0..w {
            let bx = x as f32 - wf * 0.5 + 0.5;
            let gx = bx * r00 + by * r10 + r20;
            let gy = bx * r01 + by * r11 + r21;
            // grid_sample's unnormalisation for align_corners=False.
            let ix = (gx + 1.0) * hw - 0.5;
            let iy = (gy + 1.0) * hh - 0.5;
            match interpolation {
                Interpolation::Nearest => {
                    let (sx, sy) = (ix.round_ties_even(), iy.round_ties_even());
                    let inside = sx >= 0.0 && sx < wf && sy >= 0.0 && sy < hf;
                    for c in 0..channels {
                        let v = if inside {
                            src[c * plane + sy as usize * w + sx as usize] as f32
                        } else {
                            fill_of(c).unwrap_or(0.0)
                        };
                        out[c * plane + y * w + x] = to_u8(v);
                    }
                }
                Interpolation::Bilinear => {
                    let (x0, y0) = (ix.floor(), iy.floor());
                    let (tx, ty) = (ix - x0, iy - y0);
                    let corners = [
                        (x0, y0, (1.0 - tx) * (1.0 - ty)),
                        (x0 + 1.0, y0, tx * (1.0 - ty)),
                        (x0, y0 + 1.0, (1.0 - tx) * ty),
                        (x0 + 1.0, y0 + 1.0, tx * ty),
                    ];
                    let mut mask = 0.0f32;
                    let mut inside = [false; 4];
                    for (k, &(cx, cy, wt)) in corners.iter().enumerate() {
                        inside[k] = cx >= 0.0 && cx < wf && cy >= 0.0 && cy < hf;
                        if inside[k] {
                            mask += wt;
                        }
                    }
                    for c in 0..channels {
                        let mut v = 0.0f32;
                        for (k, &(cx, cy, wt)) in corners.iter().enumerate() {
                            if inside[k] {
                                v += wt * src[c * plane + cy as usize * w + cx as usize] as f32;
                            }
                        }
                        if let Some(f) = fill_of(c) {
                            v = v * mask + (1.0 - mask) * f;
                        }
                        out[c * plane + y * w + x] = to_u8(v);
                    }
                }
            }
        }
    }
}

/// `_cast_squeeze_out`: round half to even, then cast (saturating here).
#[inline]
fn to_u8(v: f32) -> u8 {
    v.round_ties_even().clamp(0.0, 255.0) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(data: &mut [u8], c: usize, h: usize, w: usize) -> ImageMut<'_> {
        ImageMut {
            data,
            channels: c,
            height: h,
            width: w,
        }
    }

    #[test]
    fn linspace_and_posterize_tables_match_torchvisions_ends() {
        let l = linspace_f32(0.0, 0.3, 31);
        assert_eq!((l[0], l[30], l.len()), (0.0, 0.3f32, 31));
        assert_eq!(
            posterize_bits(31, 4.0)[..3],
            [8.0, 8.0, 8.0],
            "bins 0..3 round to 0"
        );
        assert_eq!(posterize_bits(31, 4.0)[30], 4.0);
        assert_eq!(posterize_bits(31, 6.0)[30], 2.0);
    }

    #[test]
    fn translation_moves_whole_pixels_and_fills() {
        let mut d: Vec<u8> = (1..=16).collect();
        let mut img = image(&mut d, 1, 4, 4);
        apply_op(
            &mut img,
            Op::TranslateX,
            1.7,
            Interpolation::Nearest,
            &[9.0],
        )
        .unwrap();
        // int(1.7) = 1 pixel to the right, the first column filled.
        assert_eq!(&d[..4], &[9, 1, 2, 3]);
        assert_eq!(&d[12..], &[9, 13, 14, 15]);
    }

    #[test]
    fn point_operations() {
        let mut d = vec![0u8, 100, 128, 255];
        solarize(&mut image(&mut d, 1, 2, 2), 128.0);
        assert_eq!(d, [0, 100, 127, 0]);
        let mut d = vec![0u8, 100, 131, 255];
        posterize(&mut image(&mut d, 1, 2, 2), 4);
        assert_eq!(d, [0, 96, 128, 240]);
        let mut d = vec![50u8, 100, 150, 50];
        autocontrast(&mut image(&mut d, 1, 2, 2));
        assert_eq!(d, [0, 127, 255, 0]);
        let mut d = vec![7u8; 4];
        autocontrast(&mut image(&mut d, 1, 2, 2));
        assert_eq!(d, [7; 4]);
        let mut d = vec![10u8, 200];
        brightness(&mut image(&mut d, 1, 1, 2), 1.5);
        assert_eq!(d, [15, 255]);
    }

    #[test]
    fn wrong_channel_counts_and_fills_are_errors() {
        let mut d = vec![0u8; 8];
        let e = apply_op(
            &mut image(&mut d, 2, 2, 2),
            Op::Rotate,
            1.0,
            Interpolation::Nearest,
            &[],
        )
        .unwrap_err();
        assert!(e.0.contains("1 or 3 channels"), "{e}");
        let mut d = vec![0u8; 12];
        let e = apply_op(
            &mut image(&mut d, 3, 2, 2),
            Op::Rotate,
            1.0,
            Interpolation::Nearest,
            &[1.0, 2.0],
        )
        .unwrap_err();
        assert!(e.0.contains("fill has 2 values"), "{e}");
    }
}
