//! Where training reports go. The loop reports once per step and once per finished epoch
//! (training and validation); every sink receives the same report: the log (stderr and
//! `log.txt`), the progress bar and `metrics.jsonl`. A new destination is a new [`Sink`].

use super::metrics::{Meter, MetricsFile};
use anyhow::Result;
use imgclf_plugin_api::NamedTensor;
use std::path::Path;
use tch::Tensor;

/// One optimisation step.
pub struct StepReport<'a> {
    /// 1-based epoch being trained.
    pub epoch: u64,
    pub epochs: u64,
    /// Steps done in this epoch (1-based index of the step just taken).
    pub step_in_epoch: u64,
    pub steps_per_epoch: u64,
    /// Steps done since the start of training.
    pub global_step: u64,
    pub lr: f64,
    /// This step's numbers.
    pub loss: f64,
    pub acc1: f64,
    pub acc5: f64,
    /// The running averages of the epoch so far.
    pub running: &'a Meter,
    pub images_per_sec: f64,
    pub elapsed_s: f64,
    /// Whether this step is on a `train.log_period` boundary (or ends the epoch).
    pub log: bool,
    /// Per-part scalars (name, value), e.g. the loss scale.
    pub extra: &'a [(String, f64)],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

/// A finished pass over the training or validation set.
pub struct EpochReport<'a> {
    pub split: Split,
    /// Completed epochs (0 for the validation before training).
    pub epoch: u64,
    pub global_step: u64,
    pub meter: &'a Meter,
    pub lr: f64,
    /// The rate the schedule holds after this pass (the next step's): the reference's
    /// `scheduler.get_last_lr()` at the end of an epoch, its `Train/LearningRate`.
    pub next_lr: f64,
    pub images: usize,
    pub seconds: f64,
    pub elapsed_s: f64,
}

impl EpochReport<'_> {
    pub fn images_per_sec(&self) -> f64 {
        self.images as f64 / self.seconds.max(1e-9)
    }
}

pub trait Sink {
    /// An epoch starts (at `start_step` when resuming inside it).
    fn epoch_start(&mut self, _epoch: u64, _epochs: u64, _steps: u64, _start_step: u64) {}
    fn step(&mut self, _r: &StepReport) -> Result<()> {
        Ok(())
    }
    fn epoch(&mut self, _r: &EpochReport) -> Result<()> {
        Ok(())
    }
    /// The first batch of a pass as the model sees it (`[N, C, H, W]`, normalised and
    /// augmented): of each training epoch (`epoch`: the 1-based epoch being trained) and of
    /// each validation (`epoch`: completed epochs).
    fn images(&mut self, _split: Split, _epoch: u64, _batch: &Tensor) -> Result<()> {
        Ok(())
    }
    /// The model's tensors after the validation at `epoch`.
    fn parameters(&mut self, _epoch: u64, _tensors: &[NamedTensor]) -> Result<()> {
        Ok(())
    }
    /// Training stops (finished, interrupted or failed).
    fn finish(&mut self) {}
}

/// Every sink of a run; each report goes to all of them.
#[derive(Default)]
pub struct Sinks(Vec<Box<dyn Sink>>);

impl Sinks {
    /// The sinks of a run writing to `out`; a rank that does not write gets none.
    pub fn for_run(out: &Path, writer: bool) -> Sinks {
        if !writer {
            return Sinks::default();
        }
        Sinks(vec![
            Box::new(ProgressSink::default()),
            Box::new(LogSink),
            Box::new(JsonlSink(MetricsFile::new(out))),
        ])
    }
    pub fn push(&mut self, sink: Box<dyn Sink>) {
        self.0.push(sink);
    }
    pub fn epoch_start(&mut self, epoch: u64, epochs: u64, steps: u64, start_step: u64) {
        for s in &mut self.0 {
            s.epoch_start(epoch, epochs, steps, start_step);
        }
    }
    pub fn step(&mut self, r: &StepReport) -> Result<()> {
        self.0.iter_mut().try_for_each(|s| s.step(r))
    }
    pub fn epoch(&mut self, r: &EpochReport) -> Result<()> {
        self.0.iter_mut().try_for_each(|s| s.epoch(r))
    }
    pub fn images(&mut self, split: Split, epoch: u64, batch: &Tensor) -> Result<()> {
        self.0
            .iter_mut()
            .try_for_each(|s| s.images(split, epoch, batch))
    }
    pub fn parameters(&mut self, epoch: u64, tensors: &[NamedTensor]) -> Result<()> {
        self.0
            .iter_mut()
            .try_for_each(|s| s.parameters(epoch, tensors))
    }
    pub fn finish(&mut self) {
        for s in &mut self.0 {
            s.finish();
        }
    }
}

impl Drop for Sinks {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The reference's log lines, through `tracing` (stderr and the run's `log.txt`).
pub struct LogSink;

impl Sink for LogSink {
    fn epoch_start(&mut self, epoch: u64, _epochs: u64, _steps: u64, _start: u64) {
        tracing::info!("Train {epoch}");
    }
    fn step(&mut self, r: &StepReport) -> Result<()> {
        if r.log {
            let m = r.running;
            let extra: String = r.extra.iter().map(|(k, v)| format!(" {k} {v}")).collect();
            tracing::info!(
                "Epoch {} Step {}/{} lr {:.6} loss {:.4} ({:.4}) acc@1 {:.4} ({:.4}) acc@5 {:.4} ({:.4}) {:.0} img/s{extra}",
                r.epoch,
                r.step_in_epoch,
                r.steps_per_epoch,
                r.lr,
                r.loss,
                m.loss(),
                r.acc1,
                m.acc1(),
                r.acc5,
                m.acc5(),
                r.images_per_sec
            );
        }
        Ok(())
    }
    fn epoch(&mut self, r: &EpochReport) -> Result<()> {
        match r.split {
            Split::Train => tracing::info!("Elapsed {:.2}s", r.seconds),
            Split::Val => tracing::info!(
                "Val {}: loss {:.4} acc@1 {:.4} acc@5 {:.4} ({} images, {:.1}s)",
                r.epoch,
                r.meter.loss(),
                r.meter.acc1(),
                r.meter.acc5(),
                r.images,
                r.seconds
            ),
        }
        Ok(())
    }
}

/// A progress bar per epoch on stderr; log lines are drawn around it.
#[derive(Default)]
pub struct ProgressSink {
    bar: Option<indicatif::ProgressBar>,
}

impl Sink for ProgressSink {
    fn epoch_start(&mut self, epoch: u64, epochs: u64, steps: u64, start_step: u64) {
        let bar = indicatif::ProgressBar::new(steps);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("epoch {epoch}/{epochs}"));
        bar.set_position(start_step);
        crate::logging::set_progress_bar(Some(bar.clone()));
        self.bar = Some(bar);
    }
    fn step(&mut self, r: &StepReport) -> Result<()> {
        if let Some(bar) = &self.bar {
            bar.set_position(r.step_in_epoch);
            bar.set_message(format!(
                "loss {:.4} acc@1 {:.4} lr {:.5}",
                r.running.loss(),
                r.running.acc1(),
                r.lr
            ));
        }
        Ok(())
    }
    fn epoch(&mut self, r: &EpochReport) -> Result<()> {
        if r.split == Split::Train {
            self.finish();
        }
        Ok(())
    }
    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
            crate::logging::set_progress_bar(None);
        }
    }
}

/// One JSON line per logged training step and per validation in `metrics.jsonl`.
pub struct JsonlSink(pub MetricsFile);

impl Sink for JsonlSink {
    fn step(&mut self, r: &StepReport) -> Result<()> {
        if r.log {
            self.0.record(
                r.epoch,
                r.global_step,
                "train",
                r.running,
                r.lr,
                r.images_per_sec,
                r.elapsed_s,
                r.extra,
            )?;
        }
        Ok(())
    }
    fn epoch(&mut self, r: &EpochReport) -> Result<()> {
        if r.split == Split::Val {
            self.0.record(
                r.epoch,
                r.global_step,
                "val",
                r.meter,
                r.lr,
                r.images_per_sec(),
                r.elapsed_s,
                &[],
            )?;
        }
        Ok(())
    }
}
