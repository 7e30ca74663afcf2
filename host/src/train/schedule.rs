//! The learning rate of every iteration: the host's warmup composed with the scheduler
//! plugin's factor.

use crate::registry::Registry;
use crate::setup::Setup;
use anyhow::{bail, Result};
use imgclf_plugin_api::ffi::HostScheduler;
use imgclf_plugin_api::ScheduleContext;

/// The learning-rate factor of every iteration: optional warmup, then the main schedule, as
/// the reference's `CombinedScheduler` composes them (an iteration on a boundary belongs to
/// the earlier segment).
pub struct LrSchedule {
    pub base_lr: f64,
    warmup_steps: u64,
    warmup_kind: String,
    start_factor: f64,
    exponent: f64,
    main: HostScheduler,
}

impl LrSchedule {
    pub fn lr(&self, step: u64) -> Result<f64> {
        if self.warmup_steps > 0 && step <= self.warmup_steps {
            let t = step as f64 / self.warmup_steps as f64;
            let f = match self.warmup_kind.as_str() {
                "linear" => self.start_factor + (1.0 - self.start_factor) * t,
                // The reference multiplies by base_lr twice here; we use the intended factor.
                _ => self.start_factor + (1.0 - self.start_factor) * t.powf(self.exponent),
            };
            return Ok(self.base_lr * f);
        }
        Ok(self.base_lr * self.main.factor(step - self.warmup_steps)?)
    }
}

pub fn build_schedule(registry: &Registry, s: &Setup, steps_per_epoch: u64) -> Result<LrSchedule> {
    let c = &s.config;
    let epochs = c.int("scheduler.epochs");
    let kind = c.str("scheduler.warmup.type").to_string();
    let warmup_epochs = if kind == "none" {
        0
    } else {
        c.int("scheduler.warmup.epochs")
    };
    if epochs < 1 || warmup_epochs < 0 || warmup_epochs > epochs {
        bail!("scheduler.epochs ({epochs}) must be >= 1 and scheduler.warmup.epochs ({warmup_epochs}) within it");
    }
    let entry = s
        .scheduler
        .as_ref()
        .expect("training setup has a scheduler");
    let ctx = ScheduleContext {
        steps_per_epoch,
        epochs: (epochs - warmup_epochs) as u64,
    };
    let main =
        registry
            .plugin(entry)
            .create_scheduler(&entry.info.name, &c.section_json(""), &ctx)?;
    Ok(LrSchedule {
        base_lr: c.float("train.base_lr"),
        warmup_steps: warmup_epochs as u64 * steps_per_epoch,
        warmup_kind: kind,
        start_factor: c.float("scheduler.warmup.start_factor"),
        exponent: c.float("scheduler.warmup.exponent"),
        main,
    })
}
