//! The TensorBoard sink: the event files the reference's `train.py` writes, where it writes
//! them. Per epoch into `train.output_dir` (`Train/Loss`, `Train/Acc1`, `Train/Acc5`,
//! `Train/Time`, `Train/LearningRate`; `Val/Loss` (not at epoch 0), `Val/Acc1`, `Val/Acc5`,
//! `Val/Time`), per logged step into `train.output_dir/running` (`Train/RunningLoss`,
//! `Train/RunningAcc1`, `Train/RunningAcc5`, `Train/RunningLearningRate`, at the global
//! step), and on request image grids of the first batch (`Train/Image` every epoch,
//! `Val/Image` at epoch 0) and a histogram per parameter after each validation.

use super::checkpoint::Position;
use super::sinks::{EpochReport, Sink, Split, StepReport};
use crate::config::Config;
use crate::tensorboard::{image_grid, EventWriter};
use anyhow::{Context, Result};
use imgclf_plugin_api::NamedTensor;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// What `tensorboard.*` asks for beyond the scalars.
#[derive(Clone, Copy, Debug, Default)]
pub struct Extras {
    pub train_images: bool,
    pub val_images: bool,
    pub model_params: bool,
}

impl Extras {
    pub fn from_config(c: &Config) -> Extras {
        Extras {
            train_images: c.bool("tensorboard.train_images"),
            val_images: c.bool("tensorboard.val_images"),
            model_params: c.bool("tensorboard.model_params"),
        }
    }
}

pub struct TensorBoardSink {
    /// `train.output_dir`: per-epoch scalars, images, histograms.
    epochs: EventWriter,
    /// `train.output_dir/running`: per-step running averages.
    running: EventWriter,
    extras: Extras,
}

impl TensorBoardSink {
    /// Opens new event files in `out` and `out/running`. When training does not start from
    /// the beginning (`--resume`, or `train.start_epoch`), the files carry the reference's
    /// purge steps: epoch `pos.epoch + 1` and global step `pos.global_step + 1`, so that
    /// TensorBoard drops what an interrupted run wrote past the checkpoint and the curves do
    /// not double back.
    pub fn create(out: &Path, pos: &Position, extras: Extras) -> Result<TensorBoardSink> {
        let fresh = pos.global_step == 0 && pos.epoch == 0;
        let purge = |step: u64| (!fresh).then_some(step as i64 + 1);
        Ok(TensorBoardSink {
            epochs: EventWriter::create(out, purge(pos.epoch))?,
            running: EventWriter::create(&out.join("running"), purge(pos.global_step))?,
            extras,
        })
    }
}

impl Sink for TensorBoardSink {
    fn step(&mut self, r: &StepReport) -> Result<()> {
        if r.log {
            let step = r.global_step as i64;
            let w = &mut self.running;
            w.scalar("Train/RunningLoss", step, r.running.loss())?;
            w.scalar("Train/RunningAcc1", step, r.running.acc1())?;
            w.scalar("Train/RunningAcc5", step, r.running.acc5())?;
            w.scalar("Train/RunningLearningRate", step, r.lr)?;
            w.flush()?;
        }
        Ok(())
    }

    fn epoch(&mut self, r: &EpochReport) -> Result<()> {
        let epoch = r.epoch as i64;
        let w = &mut self.epochs;
        let m = r.meter;
        match r.split {
            Split::Train => {
                w.scalar("Train/Loss", epoch, m.loss())?;
                w.scalar("Train/Acc1", epoch, m.acc1())?;
                w.scalar("Train/Acc5", epoch, m.acc5())?;
                w.scalar("Train/Time", epoch, r.seconds)?;
                w.scalar("Train/LearningRate", epoch, r.next_lr)?;
            }
            Split::Val => {
                // As the reference: no validation loss for the untrained model (it would set
                // the scale of the plot).
                if epoch > 0 {
                    w.scalar("Val/Loss", epoch, m.loss())?;
                }
                w.scalar("Val/Acc1", epoch, m.acc1())?;
                w.scalar("Val/Acc5", epoch, m.acc5())?;
                w.scalar("Val/Time", epoch, r.seconds)?;
            }
        }
        w.flush()
    }

    fn images(&mut self, split: Split, epoch: u64, batch: &Tensor) -> Result<()> {
        let tag = match split {
            Split::Train if self.extras.train_images => "Train/Image",
            Split::Val if self.extras.val_images && epoch == 0 => "Val/Image",
            _ => return Ok(()),
        };
        let grid = image_grid(batch).with_context(|| format!("TensorBoard {tag}"))?;
        self.epochs.image(tag, epoch as i64, &grid)?;
        self.epochs.flush()
    }

    fn parameters(&mut self, epoch: u64, tensors: &[NamedTensor]) -> Result<()> {
        if !self.extras.model_params {
            return Ok(());
        }
        for t in tensors.iter().filter(|t| t.trainable) {
            let values = Vec::<f64>::try_from(
                t.tensor
                    .detach()
                    .to_device(Device::Cpu)
                    .to_kind(Kind::Double)
                    .contiguous()
                    .view([-1]),
            )
            .with_context(|| format!("cannot read parameter {}", t.name))?;
            if !values.is_empty() {
                self.epochs.histogram(&t.name, epoch as i64, &values)?;
            }
        }
        self.epochs.flush()
    }
}
