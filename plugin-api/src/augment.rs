//! Helpers shared by batch augmentations: per-image rectangles (Cutout, Random Erasing, CutMix)
//! as boolean masks built on the training device from O(N) numbers, and the random pairing of
//! a batch with itself (Mixup, CutMix, RICAP).

use crate::error::Result;
use crate::rng::{Rng, StepRng};
use tch::{Device, Kind, Tensor};

/// A half-open pixel rectangle `[y0, y1) x [x0, x1)`; empty when `y1 <= y0` or `x1 <= x0`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rect {
    pub y0: i64,
    pub y1: i64,
    pub x0: i64,
    pub x1: i64,
}

impl Rect {
    /// The empty rectangle (an image left untouched).
    pub const EMPTY: Rect = Rect {
        y0: 0,
        y1: 0,
        x0: 0,
        x1: 0,
    };

    /// Pixels covered.
    pub fn area(&self) -> i64 {
        (self.y1 - self.y0).max(0) * (self.x1 - self.x0).max(0)
    }
}

/// `N x 1 x H x W` boolean mask, true inside `rects[n]` for image `n`.
pub fn rect_mask(rects: &[Rect], height: i64, width: i64, device: Device) -> Result<Tensor> {
    let n = rects.len() as i64;
    let flat: Vec<i64> = rects
        .iter()
        .flat_map(|r| [r.y0, r.y1, r.x0, r.x1])
        .collect();
    let r = Tensor::from_slice(&flat)
        .to_device(device)
        .view([n, 4, 1, 1]);
    let ys = Tensor::arange(height, (Kind::Int64, device)).view([1, height, 1]);
    let xs = Tensor::arange(width, (Kind::Int64, device)).view([1, 1, width]);
    let inside_y = ys
        .f_ge_tensor(&r.select(1, 0))?
        .logical_and(&ys.f_lt_tensor(&r.select(1, 1))?);
    let inside_x = xs
        .f_ge_tensor(&r.select(1, 2))?
        .logical_and(&xs.f_lt_tensor(&r.select(1, 3))?);
    Ok(inside_y.logical_and(&inside_x).unsqueeze(1))
}

/// A uniformly random permutation of `0..n` (Fisher-Yates), e.g. the partner of each image.
pub fn permutation(rng: &mut StepRng, n: i64) -> Vec<i64> {
    let mut p: Vec<i64> = (0..n).collect();
    for i in (1..p.len()).rev() {
        p.swap(i, rng.gen_range(0..=i));
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_cover_exactly_their_rectangles() {
        let rects = [
            Rect {
                y0: 1,
                y1: 3,
                x0: 0,
                x1: 2,
            },
            Rect::EMPTY,
        ];
        let m = rect_mask(&rects, 4, 5, Device::Cpu).unwrap();
        assert_eq!(m.size(), vec![2, 1, 4, 5]);
        let counts =
            Vec::<i64>::try_from(&m.sum_dim_intlist([1, 2, 3].as_slice(), false, Kind::Int64))
                .unwrap();
        assert_eq!(counts, vec![4, 0]);
        assert_eq!(rects[0].area(), 4);
        assert!(bool::try_from(&m.get(0).get(0).get(2).get(1)).unwrap());
        assert!(!bool::try_from(&m.get(0).get(0).get(3).get(1)).unwrap());
    }
}
