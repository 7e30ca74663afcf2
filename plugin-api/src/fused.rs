//! Fused ops of the C++ shim (`plugin-api/cpp/bn_relu.cpp`) behind the layers of [`crate::nn`].

use std::ffi::{c_char, c_void};
use std::sync::OnceLock;
use tch::Tensor;

extern "C" {
    fn imgclf_bn_relu_train(
        x: *const c_void,
        weight: *const c_void,
        bias: *const c_void,
        running_mean: *mut c_void,
        running_var: *mut c_void,
        momentum: f64,
        eps: f64,
        out: *mut *mut c_void,
    ) -> *mut c_char;
}

/// False when `IMGCLF_FUSED_BN_RELU` is `0` (or `false`, `off`): ATen's ops everywhere, to
/// compare or to rule the fused op out. On by default, float32 and bfloat16 alike.
pub(crate) fn bn_relu_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        !matches!(
            std::env::var("IMGCLF_FUSED_BN_RELU").as_deref(),
            Ok("0") | Ok("false") | Ok("off")
        )
    })
}

/// `relu(batch_norm(x, training=True))` as one autograd op, updating `bn`'s running statistics
/// (not its batch counter); `None` where the fused op does not apply (see bn_relu.cpp): the
/// caller then runs ATen's ops. A libtorch error inside the op panics, as tch's ops do.
pub(crate) fn bn_relu_train(
    x: &Tensor,
    bn: &crate::nn::BatchNorm2d,
    momentum: f64,
    eps: f64,
) -> Option<Tensor> {
    let mut out: *mut c_void = std::ptr::null_mut();
    let (mut running_mean, mut running_var) = (
        bn.running_mean.shallow_clone(),
        bn.running_var.shallow_clone(),
    );
    // SAFETY: every pointer is a live tch tensor for the duration of the call; the shim
    // modifies only the running statistics (in place, as batch_norm does) and stores either
    // NULL or a `new at::Tensor` in `out`.
    let message = unsafe {
        imgclf_bn_relu_train(
            x.as_ptr() as *const c_void,
            bn.weight.as_ptr() as *const c_void,
            bn.bias.as_ptr() as *const c_void,
            running_mean.as_mut_ptr() as *mut c_void,
            running_var.as_mut_ptr() as *mut c_void,
            momentum,
            eps,
            &mut out,
        )
    };
    if let Err(e) = crate::shim::check(message, "fused batch_norm + relu") {
        panic!("{e}");
    }
    if out.is_null() {
        return None;
    }
    // SAFETY: a non-NULL `out` is a `new at::Tensor` that nothing else owns; tch frees it.
    Some(unsafe { Tensor::from_ptr(out as *mut _) })
}

#[cfg(test)]
mod tests {
    use crate::nn::{BatchNorm2d, ParamStore};
    use tch::{Device, Kind, Tensor};

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Layout {
        Nchw,
        ChannelsLast,
    }

    fn laid_out(t: Tensor, layout: Layout) -> Tensor {
        match layout {
            Layout::Nchw => t.contiguous(),
            Layout::ChannelsLast => t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]),
        }
    }

    fn is_channels_last(t: &Tensor) -> bool {
        let (n, c, h, w) = t.size4().unwrap();
        t.stride() == [h * w * c, 1, w * c, c] && n > 0
    }

    /// Test inputs from a seeded generator of the test's own: libtorch's global generator is
    /// shared with the tests that run concurrently, which would make the inputs (and any
    /// outcome that depends on them) change from run to run.
    struct Normals(u64);

    impl Normals {
        fn uniform(&mut self) -> f64 {
            // xorshift64*, the top 53 bits as a float in (0, 1).
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let r = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
            ((r >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }

        /// Standard normal float32 values of `shape` (Box-Muller).
        fn randn(&mut self, shape: &[i64]) -> Tensor {
            let n: i64 = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    let (u, v) = (self.uniform(), self.uniform());
                    ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
                })
                .collect();
            Tensor::from_slice(&v).view(shape)
        }

        /// Uniform float32 values in [0, 1) of `shape`.
        fn rand(&mut self, shape: &[i64]) -> Tensor {
            let n: i64 = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| self.uniform() as f32).collect();
            Tensor::from_slice(&v).view(shape)
        }
    }

    /// A BatchNorm2d of `c` channels with non-trivial affine parameters (positive weights) and
    /// running statistics.
    fn layer(c: i64, g: &mut Normals) -> BatchNorm2d {
        let store = ParamStore::new(Device::Cpu);
        let bn = BatchNorm2d::new(&store.root(), c);
        tch::no_grad(|| {
            bn.weight.shallow_clone().copy_(&(g.rand(&[c]) + 0.5));
            bn.bias.shallow_clone().copy_(&(g.randn(&[c]) * 0.3));
            bn.running_mean.shallow_clone().copy_(&g.randn(&[c]));
            bn.running_var.shallow_clone().copy_(&(g.rand(&[c]) + 0.5));
        });
        bn
    }

    /// `x` rounded to `kind`, moved off ReLU's threshold: no element's batch-normalised value
    /// (with `bn`'s weight and bias) lies within 1e-3 of 0. Where it does, the fused op and
    /// ATen's, whose statistics round differently, may put it on opposite sides and disagree
    /// on that element's ReLU mask (its whole gradient), a legitimate difference that random
    /// inputs hit now and then. Elements there are pushed away by 5 % of their channel's
    /// standard deviation, in the direction they already lie.
    fn off_relu_ties(x: Tensor, bn: &BatchNorm2d, kind: Kind) -> Tensor {
        let c = bn.weight.size()[0];
        let w = bn.weight.to_kind(Kind::Double).view([1, c, 1, 1]);
        let b = bn.bias.to_kind(Kind::Double).view([1, c, 1, 1]);
        let mut x = x.to_kind(kind).to_kind(Kind::Double);
        for _ in 0..10 {
            let mean = x.mean_dim(&[0i64, 2, 3][..], true, Kind::Double);
            let var = (&x - &mean)
                .square()
                .mean_dim(&[0i64, 2, 3][..], true, Kind::Double);
            let z = (&x - &mean) / (&var + 1e-5).sqrt() * &w + &b;
            let near = z.abs().lt(1e-3);
            if near.sum(Kind::Int64).int64_value(&[]) == 0 {
                return x.to_kind(kind);
            }
            let direction = z.ge(0.0).to_kind(Kind::Double) * 2.0 - 1.0;
            let push = near.to_kind(Kind::Double) * direction * var.sqrt() * 0.05;
            x = (x + push).to_kind(kind).to_kind(Kind::Double);
        }
        panic!("could not move the test input off ReLU's threshold");
    }

    fn copy_of(bn: &BatchNorm2d) -> BatchNorm2d {
        let store = ParamStore::new(Device::Cpu);
        let other = BatchNorm2d::new(&store.root(), bn.weight.size()[0]);
        tch::no_grad(|| {
            for (dst, src) in [
                (&other.weight, &bn.weight),
                (&other.bias, &bn.bias),
                (&other.running_mean, &bn.running_mean),
                (&other.running_var, &bn.running_var),
            ] {
                dst.shallow_clone().copy_(src);
            }
        });
        other
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_kind(Kind::Float) - b.to_kind(Kind::Float))
            .abs()
            .max()
            .double_value(&[])
    }

    /// Output, input/weight/bias gradients and running statistics of relu(bn(x)) for a fixed
    /// upstream gradient, through `run`.
    fn outcome(
        bn: &BatchNorm2d,
        x: &Tensor,
        upstream: &Tensor,
        run: impl Fn(&BatchNorm2d, &Tensor) -> Tensor,
    ) -> Vec<Tensor> {
        let x = x.detach().set_requires_grad(true);
        for p in [&bn.weight, &bn.bias] {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let y = run(bn, &x);
        (&y * upstream).sum(Kind::Float).backward();
        vec![
            y.detach(),
            x.grad(),
            bn.weight.grad().copy(),
            bn.bias.grad().copy(),
            bn.running_mean.copy(),
            bn.running_var.copy(),
        ]
    }

    fn fused(bn: &BatchNorm2d, x: &Tensor) -> Tensor {
        super::bn_relu_train(x, bn, 0.1, 1e-5).expect("the fused op applies")
    }

    fn aten(bn: &BatchNorm2d, x: &Tensor) -> Tensor {
        bn.forward(x, true).relu()
    }

    /// Fused and ATen agree on every output for each layout, type and channel count, where the
    /// input has a large mean next to its spread (the variance must not cancel).
    #[test]
    fn fused_bn_relu_matches_aten_values_gradients_and_running_stats() {
        let mut g = Normals(7);
        let names = [
            "output",
            "input grad",
            "weight grad",
            "bias grad",
            "running_mean",
            "running_var",
        ];
        for &(n, c, h, w) in &[
            (4, 1, 5, 7),
            (3, 3, 8, 8),
            (8, 16, 6, 6),
            (2, 64, 5, 3),
            (2, 17, 4, 4),
            (24, 8, 28, 28),
            (24, 64, 7, 7),
            (24, 16, 14, 14),
        ] {
            for kind in [Kind::Float, Kind::BFloat16] {
                for format in [Layout::Nchw, Layout::ChannelsLast] {
                    let a = layer(c, &mut g);
                    let x = off_relu_ties(g.randn(&[n, c, h, w]) * 2.0 + 3.0, &a, kind);
                    let x = laid_out(x, format);
                    let upstream = g.randn(&[n, c, h, w]).to_kind(kind);
                    let b = copy_of(&a);
                    let ours = outcome(&a, &x, &upstream, fused);
                    let theirs = outcome(&b, &x, &upstream, aten);
                    assert_eq!(ours[0].kind(), kind);
                    assert_eq!(ours[1].kind(), kind);
                    if format == Layout::ChannelsLast && c > 1 {
                        assert!(is_channels_last(&ours[0]));
                    }
                    // bfloat16 keeps 8 bits: its outputs agree to a few units of the last place.
                    let tol = if kind == Kind::Float { 2e-4 } else { 0.1 };
                    for (i, name) in names.iter().enumerate() {
                        let scale = theirs[i]
                            .to_kind(Kind::Float)
                            .abs()
                            .max()
                            .double_value(&[])
                            .max(1.0);
                        let d = max_diff(&ours[i], &theirs[i]) / scale;
                        let tol = if i >= 2 && kind == Kind::Float {
                            1e-5
                        } else {
                            tol
                        };
                        assert!(
                            d <= tol,
                            "{name} of [{n},{c},{h},{w}] {kind:?} {format:?}: relative difference {d} > {tol}"
                        );
                    }
                }
            }
        }
    }

    /// Slices are fixed by the shape: 1 thread and 2 threads give the same bits.
    #[test]
    fn fused_bn_relu_is_bit_identical_across_thread_counts() {
        let mut g = Normals(3);
        let x = laid_out(g.randn(&[16, 32, 16, 16]), Layout::ChannelsLast);
        let upstream = g.randn(&[16, 32, 16, 16]);
        let a = layer(32, &mut g);
        let b = copy_of(&a);
        let before = tch::get_num_threads();
        tch::set_num_threads(1);
        let one = outcome(&a, &x, &upstream, fused);
        tch::set_num_threads(2);
        let two = outcome(&b, &x, &upstream, fused);
        tch::set_num_threads(before);
        for (p, q) in one.iter().zip(&two) {
            assert!(p.equal(q));
        }
    }

    /// NaN in, NaN out (the NaN-loss check must still see it), and no fused op where it does
    /// not apply: evaluation statistics, one value per channel, a float64 input.
    #[test]
    fn fused_bn_relu_keeps_nan_and_declines_what_it_does_not_cover() {
        let mut g = Normals(5);
        let bn = layer(4, &mut g);
        let x = g.randn(&[2, 4, 3, 3]);
        let _ = x
            .shallow_clone()
            .get(0)
            .get(1)
            .get(0)
            .get(0)
            .fill_(f64::NAN);
        let y = fused(&bn, &x);
        assert!(y.get(0).get(1).isnan().any().int64_value(&[]) == 1);
        assert!(y.get(0).get(0).isnan().any().int64_value(&[]) == 0);
        let single = g.randn(&[1, 4, 1, 1]);
        assert!(super::bn_relu_train(&single, &bn, 0.1, 1e-5).is_none());
        let double = g.randn(&[2, 4, 3, 3]).to_kind(Kind::Double);
        assert!(super::bn_relu_train(&double, &bn, 0.1, 1e-5).is_none());
        let strided = g.randn(&[2, 4, 6, 6]).slice(3, 0, 6, 2);
        assert!(super::bn_relu_train(&strided, &bn, 0.1, 1e-5).is_none());
        // forward_relu counts the batch once, fused or not, and leaves eval mode to ATen (a fresh
        // layer: the NaN above reached this one's running statistics, as it would ATen's).
        let bn = layer(4, &mut g);
        let x = x.nan_to_num(0.0, None, None);
        let before = bn.num_batches_tracked.int64_value(&[]);
        let _ = bn.forward_relu(&x, true);
        assert_eq!(bn.num_batches_tracked.int64_value(&[]), before + 1);
        let eval = bn.forward_relu(&x, false);
        assert!(eval.equal(&bn.forward(&x, false).relu()));
    }
}
