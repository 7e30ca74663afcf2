//! The SAM step, as davda54/sam's `first_step` / `second_step`:
//!
//! 1. forward/backward at `w` (this pass's loss and accuracy are the step's metrics);
//! 2. `e_w = rho * g / (||g||_2 + 1e-12)`, with ASAM (`sam.adaptive`) `e_w = rho * w^2 * g /
//!    (||w * g||_2 + 1e-12)` (the norm over every parameter's gradient together);
//! 3. `w += e_w`, forward/backward at `w + e_w`, with the model's buffers restored afterwards
//!    (BatchNorm's running statistics are updated by the first pass only, as davda54 recommends
//!    with its `disable_running_stats` on the second);
//! 4. `w` restored exactly (copied back, the storage kept); the host's optimizer then steps
//!    with the second pass's gradients (after clipping, unscaling and data-parallel averaging).
//!
//! The gradients of the first pass are this rank's own (the host averages across ranks once,
//! after the hook): with data-parallel training the perturbation is per rank, SAM's
//! "m-sharpness" with m the per-rank batch, as the paper's own implementation computes it.
//! Their scale (loss scaling, `train.subdivision`) cancels in `g / ||g||`.

use imgclf_plugin_api::{
    plugin_bail, ComponentInfo, ConfigView, KeyDecl, Kind, Result, StepBuildContext, StepFactory,
    StepHost, TrainingStep,
};
use tch::Tensor;

pub struct SamFactory;

impl StepFactory for SamFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Step,
            "sam",
            "SAM: step with the gradient at the worst nearby weights w + rho g / norm(g) (ASAM: scaled by abs(w))",
        )
        .papers(&["2010.01412", "2102.11600"])
        .keys(vec![
            KeyDecl::float(
                "sam.rho",
                0.05,
                "Radius of the neighbourhood (davda54/sam's rho; ASAM's paper uses larger ones, e.g. 2.0)",
            ),
            KeyDecl::bool(
                "sam.adaptive",
                false,
                "ASAM: perturb by rho * w^2 * g / ||w * g|| (scale-invariant sharpness)",
            ),
        ])
    }

    fn build(&self, config: &ConfigView, _ctx: &StepBuildContext) -> Result<Box<dyn TrainingStep>> {
        let rho = config.float("sam.rho")?;
        if !(rho >= 0.0 && rho.is_finite()) {
            plugin_bail!("sam.rho must be a finite number >= 0, got {rho}");
        }
        Ok(Box::new(Sam {
            rho,
            adaptive: config.bool("sam.adaptive")?,
        }))
    }
}

pub struct Sam {
    pub rho: f64,
    pub adaptive: bool,
}

impl Sam {
    /// `e_w` of every parameter with a gradient, from the first pass's gradients.
    fn perturbations(&self, params: &[Tensor]) -> Result<Vec<(Tensor, Tensor)>> {
        let with_grad: Vec<(&Tensor, Tensor)> = params
            .iter()
            .map(|p| (p, p.grad()))
            .filter(|(_, g)| g.defined())
            .collect();
        if with_grad.is_empty() {
            plugin_bail!("the first pass left no gradient");
        }
        let norms = with_grad
            .iter()
            .map(|(p, g)| {
                if self.adaptive {
                    p.f_abs()?.f_mul(g)?.f_norm()
                } else {
                    g.f_norm()
                }
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        // rho / (norm + 1e-12) as PyTorch evaluates it: reciprocal, then times rho.
        let scale = Tensor::f_stack(&norms, 0)?
            .f_norm()?
            .f_add_scalar(1e-12)?
            .f_reciprocal()?
            .f_mul_scalar(self.rho)?;
        with_grad
            .into_iter()
            .map(|(p, g)| {
                let scale = scale.f_to_kind(p.kind())?;
                let e = if self.adaptive {
                    p.f_pow_tensor_scalar(2)?.f_mul(&g)?.f_mul(&scale)?
                } else {
                    g.f_mul(&scale)?
                };
                Ok((p.shallow_clone(), e))
            })
            .collect()
    }
}

impl TrainingStep for Sam {
    fn step(&mut self, host: &mut dyn StepHost) -> Result<()> {
        let params: Vec<Tensor> = host
            .tensors()?
            .into_iter()
            .filter(|t| t.trainable)
            .map(|t| t.tensor)
            .collect();
        host.forward_backward(false)?;
        let saved = tch::no_grad(|| -> Result<Vec<(Tensor, Tensor)>> {
            let mut saved = Vec::new();
            for (p, e) in self.perturbations(&params)? {
                saved.push((p.shallow_clone(), p.detach().copy()));
                let _ = p.shallow_clone().f_add_(&e)?;
            }
            Ok(saved)
        })?;
        let second = host.forward_backward(true);
        // Back to w whatever the second pass did, then report its error if any.
        tch::no_grad(|| -> Result<()> {
            for (p, old) in &saved {
                p.shallow_clone().f_copy_(old)?;
            }
            Ok(())
        })?;
        second.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgclf_plugin_api::{NamedTensor, StepContext};

    /// A host whose loss is 0.5 * sum(a * w^2) (gradient a * w), recording each pass.
    struct Quadratic {
        w: Tensor,
        a: Tensor,
        passes: Vec<(Vec<f32>, bool)>,
    }

    impl StepHost for Quadratic {
        fn forward_backward(&mut self, keep_buffers: bool) -> Result<f64> {
            let mut g = self.w.grad();
            if g.defined() {
                let _ = g.zero_();
            }
            let loss = (&self.a * &self.w * &self.w).sum(tch::Kind::Float) * 0.5;
            loss.backward();
            self.passes.push((
                Vec::<f32>::try_from(&self.w.detach()).unwrap(),
                keep_buffers,
            ));
            Ok(loss.double_value(&[]))
        }
        fn tensors(&self) -> Result<Vec<NamedTensor>> {
            Ok(vec![NamedTensor {
                name: "w".into(),
                tensor: self.w.shallow_clone(),
                trainable: true,
            }])
        }
        fn context(&self) -> StepContext {
            StepContext {
                lr: 0.1,
                global_step: 0,
                gradient_scale: 1.0,
                world_size: 1,
            }
        }
    }

    fn run(adaptive: bool) -> (Quadratic, Vec<f32>) {
        let w0 = [3.0f32, -4.0];
        let mut host = Quadratic {
            w: Tensor::from_slice(&w0).set_requires_grad(true),
            a: Tensor::from_slice(&[1.0f32, 2.0]),
            passes: vec![],
        };
        let mut sam = Sam { rho: 0.5, adaptive };
        sam.step(&mut host).unwrap();
        let w = Vec::<f32>::try_from(&host.w.detach()).unwrap();
        assert_eq!(w, w0, "w is restored exactly");
        let g = Vec::<f32>::try_from(&host.w.grad()).unwrap();
        (host, g)
    }

    #[test]
    fn sam_steps_with_the_gradient_at_the_perturbed_weights() {
        let (host, g) = run(false);
        // First pass at w with buffers updated, second at w + e_w with buffers kept.
        assert_eq!(host.passes.len(), 2);
        assert_eq!(host.passes[0], (vec![3.0, -4.0], false));
        assert!(host.passes[1].1);
        // g = a * w = (3, -8), ||g|| = sqrt(73); e_w = 0.5 g / ||g||.
        let n = 73f64.sqrt();
        let e = [0.5 * 3.0 / n, 0.5 * -8.0 / n];
        let perturbed = [3.0 + e[0], -4.0 + e[1]];
        for (got, want) in host.passes[1].0.iter().zip(perturbed) {
            assert!((*got as f64 - want).abs() < 1e-6);
        }
        // The gradient left for the optimizer is the one at w + e_w: a * (w + e_w).
        assert!((g[0] as f64 - perturbed[0]).abs() < 1e-6);
        assert!((g[1] as f64 - 2.0 * perturbed[1]).abs() < 1e-5);
    }

    #[test]
    fn asam_scales_the_perturbation_by_the_weights() {
        let (host, _) = run(true);
        // |w| g = (9, 32); e_w = 0.5 w^2 g / || |w| g ||.
        let n = (81.0f64 + 1024.0).sqrt();
        let perturbed = [3.0 + 0.5 * 9.0 * 3.0 / n, -4.0 + 0.5 * 16.0 * -8.0 / n];
        for (got, want) in host.passes[1].0.iter().zip(perturbed) {
            assert!((*got as f64 - want).abs() < 1e-5);
        }
    }
}
