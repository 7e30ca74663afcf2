//! `constant`, step (`multistep`), `linear` and `cosine` learning-rate factors, stepped per
//! iteration as the reference's `LambdaLR` does: iteration `k` (from 0) trains with
//! `base_lr * factor(k)`.

use imgclf_plugin_api::{
    plugin_bail, ComponentInfo, ConfigView, Kind, Result, ScheduleContext, Scheduler,
    SchedulerFactory,
};

/// Multiplies the rate by `lr_decay` at each milestone epoch. An iteration exactly on a
/// milestone still uses the previous rate (the reference bisects with `bisect_left`).
pub struct Multistep {
    boundaries: Vec<u64>,
    lr_decay: f64,
}

impl Scheduler for Multistep {
    fn factor(&self, step: u64) -> f64 {
        let passed = self.boundaries.iter().filter(|&&b| step > b).count();
        self.lr_decay.powi(passed as i32)
    }
}

pub struct MultistepFactory;

impl SchedulerFactory for MultistepFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Scheduler,
            "multistep",
            "Step decay: lr * scheduler.lr_decay at each of scheduler.milestones (epochs)",
        )
    }

    fn build(&self, config: &ConfigView, ctx: &ScheduleContext) -> Result<Box<dyn Scheduler>> {
        let milestones = config.int_list("scheduler.milestones")?;
        if milestones.windows(2).any(|w| w[0] >= w[1]) || milestones.iter().any(|&m| m < 0) {
            plugin_bail!(
                "scheduler.milestones must be increasing non-negative epochs, got {milestones:?}"
            );
        }
        Ok(Box::new(Multistep {
            boundaries: milestones
                .iter()
                .map(|&m| m as u64 * ctx.steps_per_epoch)
                .collect(),
            lr_decay: config.float("scheduler.lr_decay")?,
        }))
    }
}

/// The base rate throughout.
pub struct Constant;

impl Scheduler for Constant {
    fn factor(&self, _step: u64) -> f64 {
        1.0
    }
}

pub struct ConstantFactory;

impl SchedulerFactory for ConstantFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(Kind::Scheduler, "constant", "Constant rate train.base_lr")
    }

    fn build(&self, _config: &ConfigView, _ctx: &ScheduleContext) -> Result<Box<dyn Scheduler>> {
        Ok(Box::new(Constant))
    }
}

/// Straight line from 1 to `lr_min_factor` over the schedule's iterations.
pub struct Linear {
    steps: u64,
    lr_min_factor: f64,
}

impl Scheduler for Linear {
    fn factor(&self, step: u64) -> f64 {
        1.0 + (self.lr_min_factor - 1.0) * step as f64 / self.steps.max(1) as f64
    }
}

pub struct LinearFactory;

impl SchedulerFactory for LinearFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Scheduler,
            "linear",
            "Linear decay to scheduler.lr_min_factor over the run",
        )
    }

    fn build(&self, config: &ConfigView, ctx: &ScheduleContext) -> Result<Box<dyn Scheduler>> {
        Ok(Box::new(Linear {
            steps: ctx.epochs * ctx.steps_per_epoch,
            lr_min_factor: config.float("scheduler.lr_min_factor")?,
        }))
    }
}

/// Half-cosine from 1 to `lr_min_factor` over the schedule's iterations.
pub struct Cosine {
    steps: u64,
    lr_min_factor: f64,
}

impl Scheduler for Cosine {
    fn factor(&self, step: u64) -> f64 {
        let t = step as f64 / self.steps.max(1) as f64;
        self.lr_min_factor
            + (1.0 - self.lr_min_factor) * 0.5 * (1.0 + (t * std::f64::consts::PI).cos())
    }
}

pub struct CosineFactory;

impl SchedulerFactory for CosineFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Scheduler,
            "cosine",
            "Cosine annealing to scheduler.lr_min_factor over the run (no restarts)",
        )
        .papers(&["1608.03983"])
    }

    fn build(&self, config: &ConfigView, ctx: &ScheduleContext) -> Result<Box<dyn Scheduler>> {
        Ok(Box::new(Cosine {
            steps: ctx.epochs * ctx.steps_per_epoch,
            lr_min_factor: config.float("scheduler.lr_min_factor")?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multistep_boundary_iteration_keeps_previous_rate() {
        let s = Multistep {
            boundaries: vec![80 * 10, 120 * 10],
            lr_decay: 0.1,
        };
        assert_eq!(s.factor(0), 1.0);
        assert_eq!(s.factor(800), 1.0);
        assert!((s.factor(801) - 0.1).abs() < 1e-15);
        assert!((s.factor(1200) - 0.1).abs() < 1e-15);
        assert!((s.factor(1201) - 0.01).abs() < 1e-15);
    }

    #[test]
    fn constant_and_linear_from_start_to_final_iteration() {
        assert_eq!(Constant.factor(0), 1.0);
        assert_eq!(Constant.factor(12345), 1.0);
        let s = Linear {
            steps: 200,
            lr_min_factor: 0.001,
        };
        assert_eq!(s.factor(0), 1.0);
        assert!((s.factor(100) - 0.5005).abs() < 1e-15);
        // The last trained iteration is 199: one step short of lr_min_factor.
        assert!((s.factor(199) - (1.0 - 0.999 * 199.0 / 200.0)).abs() < 1e-15);
        assert!((s.factor(200) - 0.001).abs() < 1e-15);
    }

    #[test]
    fn cosine_starts_at_one_and_ends_at_min() {
        let s = Cosine {
            steps: 100,
            lr_min_factor: 0.001,
        };
        assert_eq!(s.factor(0), 1.0);
        assert!((s.factor(50) - (0.001 + 0.999 * 0.5)).abs() < 1e-12);
        assert!((s.factor(100) - 0.001).abs() < 1e-12);
    }
}
