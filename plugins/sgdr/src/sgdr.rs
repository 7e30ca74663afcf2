//! Cosine cycles of `T0`, `int(T0 · T_mul)`, `int(int(T0 · T_mul) · T_mul)`, ... epochs that
//! must fill the schedule exactly, each from 1 down to `scheduler.lr_min_factor`, stepped per
//! iteration as the reference's `CombinedScheduler`: an iteration exactly on a cycle boundary
//! still belongs to the ending cycle (its minimum); the next one restarts the cosine at its
//! second point.

use imgclf_plugin_api::{
    plugin_bail, ComponentInfo, ConfigView, Kind, Result, ScheduleContext, Scheduler,
    SchedulerFactory,
};

pub struct Sgdr {
    /// Cycle lengths in iterations.
    cycles: Vec<u64>,
    lr_min_factor: f64,
}

/// Cycle lengths in epochs, as the reference builds them.
pub fn cycle_epochs(epochs: u64, t0: i64, t_mul: f64) -> Result<Vec<u64>> {
    if t0 < 1 {
        plugin_bail!("scheduler.T0 must be >= 1 epoch, got {t0}");
    }
    let mut cycles = vec![t0 as u64];
    while cycles.iter().sum::<u64>() < epochs {
        let next = (*cycles.last().unwrap_or(&0) as f64 * t_mul) as u64;
        if next == 0 {
            plugin_bail!("scheduler.T_mul = {t_mul} makes an empty SGDR cycle; use T_mul >= 1");
        }
        cycles.push(next);
    }
    let total: u64 = cycles.iter().sum();
    if total != epochs {
        plugin_bail!(
            "SGDR cycles of {cycles:?} epochs (scheduler.T0 = {t0}, scheduler.T_mul = {t_mul}) cover {total} epochs, but the schedule has {epochs} (scheduler.epochs minus warmup); the reference requires them to be equal: change scheduler.epochs or T0/T_mul"
        );
    }
    Ok(cycles)
}

impl Sgdr {
    pub fn new(cycle_epochs: &[u64], steps_per_epoch: u64, lr_min_factor: f64) -> Self {
        Sgdr {
            cycles: cycle_epochs.iter().map(|e| e * steps_per_epoch).collect(),
            lr_min_factor,
        }
    }
}

impl Scheduler for Sgdr {
    fn factor(&self, step: u64) -> f64 {
        // The cycle whose (start, end] holds `step` (step 0 in the first; past the end, the
        // last cycle continues).
        let mut start = 0;
        let mut index = 0;
        for (i, &len) in self.cycles.iter().enumerate() {
            index = i;
            if step <= start + len || i + 1 == self.cycles.len() {
                break;
            }
            start += len;
        }
        let len = self.cycles[index].max(1) as f64;
        let t = (step - start) as f64 / len;
        self.lr_min_factor
            + (1.0 - self.lr_min_factor) * 0.5 * (1.0 + (t * std::f64::consts::PI).cos())
    }
}

pub struct SgdrFactory;

impl SchedulerFactory for SgdrFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Scheduler,
            "sgdr",
            "Cosine annealing with warm restarts: cycles of scheduler.T0 epochs, each scheduler.T_mul times longer",
        )
        .papers(&["1608.03983"])
    }

    fn build(&self, config: &ConfigView, ctx: &ScheduleContext) -> Result<Box<dyn Scheduler>> {
        let cycles = cycle_epochs(
            ctx.epochs,
            config.int("scheduler.T0")?,
            config.float("scheduler.T_mul")?,
        )?;
        Ok(Box::new(Sgdr::new(
            &cycles,
            ctx.steps_per_epoch,
            config.float("scheduler.lr_min_factor")?,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(t: f64, min: f64) -> f64 {
        min + (1.0 - min) * 0.5 * (1.0 + (t * std::f64::consts::PI).cos())
    }

    #[test]
    fn cycles_double_and_must_fill_the_schedule() {
        assert_eq!(cycle_epochs(70, 10, 2.0).unwrap(), [10, 20, 40]);
        assert_eq!(cycle_epochs(30, 10, 1.0).unwrap(), [10, 10, 10]);
        // int() truncates each cycle, as the reference: 3, int(4.5) = 4, int(6.0) = 6.
        assert_eq!(cycle_epochs(13, 3, 1.5).unwrap(), [3, 4, 6]);
        let e = cycle_epochs(60, 10, 2.0).unwrap_err();
        assert!(e.0.contains("cover 70 epochs") && e.0.contains("60"), "{e}");
        assert!(cycle_epochs(10, 5, 0.1).is_err());
        assert!(cycle_epochs(10, 0, 1.0).is_err());
    }

    #[test]
    fn restarts_fall_after_the_boundary_iteration() {
        // Cycles of 2 and 4 epochs, 5 iterations per epoch: boundaries at 10 and 30.
        let s = Sgdr::new(&[2, 4], 5, 0.001);
        assert_eq!(s.factor(0), 1.0);
        assert!((s.factor(5) - cosine(0.5, 0.001)).abs() < 1e-12);
        assert!(
            (s.factor(10) - 0.001).abs() < 1e-12,
            "boundary: end of cycle 1"
        );
        assert!(
            (s.factor(11) - cosine(1.0 / 20.0, 0.001)).abs() < 1e-12,
            "restart"
        );
        assert!(s.factor(11) > 0.99);
        assert!((s.factor(20) - cosine(0.5, 0.001)).abs() < 1e-12);
        assert!(
            (s.factor(29) - cosine(19.0 / 20.0, 0.001)).abs() < 1e-12,
            "final iteration"
        );
        assert!((s.factor(30) - 0.001).abs() < 1e-12);
    }
}
