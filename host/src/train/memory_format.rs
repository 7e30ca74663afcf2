//! `train.channels_last`: the model's 4-d weights and the input batches in the channels_last
//! (NHWC) memory format, which cuDNN's and oneDNN's fastest convolution, BatchNorm and
//! pooling kernels use; the logical shape stays N x C x H x W.
//!
//! `auto` turns it on where it is faster, which is everywhere imgclf runs: on CUDA (tensor-core
//! convolutions want NHWC), and on the CPU, where oneDNN's NHWC convolutions and imgclf's fused
//! BatchNorm + ReLU (`plugin-api/cpp/bn_relu.cpp`) train ResNet-preact-20 at 711-733 images/s
//! against 613 in NCHW (2-core Xeon, float32; bfloat16 1289 against ATen's 1136 in NHWC).

use crate::config::Config;
use anyhow::{bail, Context, Result};
use imgclf_plugin_api::NamedTensor;
use tch::{Device, Tensor};

/// Whether `train.channels_last` asks for channels_last on `device`.
pub fn wanted(config: &Config, device: Device) -> Result<bool> {
    Ok(match config.str("train.channels_last") {
        "auto" => device.is_cuda() || device == Device::Cpu,
        "on" => true,
        "off" => false,
        other => bail!("train.channels_last must be auto, on or off, got '{other}'"),
    })
}

/// `t` (4-d) with channels_last strides and the same values; other ranks unchanged.
pub fn channels_last(t: &Tensor) -> Result<Tensor> {
    if t.dim() != 4 || is_channels_last(t) {
        return Ok(t.shallow_clone());
    }
    // N,C,H,W -> N,H,W,C made contiguous, viewed back as N,C,H,W: channels_last strides.
    Ok(t.f_permute([0, 2, 3, 1])?
        .f_contiguous()?
        .f_permute([0, 3, 1, 2])?)
}

/// Whether `t` (4-d) is laid out N,H,W,C (dimensions of size 1 may have any stride).
pub fn is_channels_last(t: &Tensor) -> bool {
    let (size, stride) = (t.size(), t.stride());
    if size.len() != 4 {
        return false;
    }
    let mut expected = 1;
    for d in [1usize, 3, 2, 0] {
        if size[d] != 1 && stride[d] != expected {
            return false;
        }
        expected *= size[d];
    }
    true
}

/// Re-lays every 4-d tensor of the model (convolution weights) out as channels_last, in place:
/// the plugin holds the same tensors and trains them in the new layout. Call before the
/// optimizer is built so its state takes the same layout.
pub fn convert_model(tensors: &[NamedTensor]) -> Result<usize> {
    let mut converted = 0;
    tch::no_grad(|| -> Result<()> {
        for t in tensors.iter().filter(|t| t.tensor.dim() == 4) {
            if is_channels_last(&t.tensor) {
                continue;
            }
            let nhwc = channels_last(&t.tensor)?;
            t.tensor
                .shallow_clone()
                .f_set_data(&nhwc)
                .with_context(|| format!("channels_last for `{}`", t.name))?;
            converted += 1;
        }
        Ok(())
    })?;
    Ok(converted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn channels_last_keeps_values_and_shape_and_changes_strides() {
        let x = Tensor::arange(2 * 3 * 4 * 5, (Kind::Float, Device::Cpu)).view([2, 3, 4, 5]);
        assert!(!is_channels_last(&x));
        let y = channels_last(&x).unwrap();
        assert_eq!(y.size(), vec![2, 3, 4, 5]);
        assert_eq!(y.stride(), vec![60, 1, 15, 3]);
        assert!(is_channels_last(&y));
        assert!(x.equal(&y));
        // Other ranks and tensors already in the format pass through.
        let v = Tensor::ones([3], (Kind::Float, Device::Cpu));
        assert_eq!(channels_last(&v).unwrap().stride(), vec![1]);
        // A 1x1 convolution weight (C_in x 1 x 1 per output) is both layouts at once when C_in is 1.
        let w = Tensor::ones([8, 1, 1, 1], (Kind::Float, Device::Cpu));
        assert!(is_channels_last(&w));
    }

    #[test]
    fn converting_a_model_relays_its_weights_in_place_and_training_follows() {
        let w = Tensor::randn([4, 3, 3, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let b = Tensor::zeros([4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let before = w.detach().copy();
        let named = |n: &str, t: &Tensor| NamedTensor {
            name: n.into(),
            tensor: t.shallow_clone(),
            trainable: true,
        };
        let n = convert_model(&[named("conv.weight", &w), named("conv.bias", &b)]).unwrap();
        assert_eq!(n, 1);
        assert!(
            is_channels_last(&w),
            "the caller's handle sees the new layout"
        );
        assert!(w.detach().equal(&before));
        let x = Tensor::randn([2, 3, 8, 8], (Kind::Float, Device::Cpu));
        let y = x.conv2d(&w, Some(&b), [1, 1], [1, 1], [1, 1], 1);
        y.sum(Kind::Float).backward();
        assert!(
            is_channels_last(&w.grad()),
            "gradients follow the parameter's layout"
        );
        let reference = x.conv2d(&before, Some(&b.detach()), [1, 1], [1, 1], [1, 1], 1);
        assert!(y.allclose(&reference, 1e-5, 1e-5, false));
    }
}
