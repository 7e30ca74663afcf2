//! `imgclf preview`: runs the configured training input pipeline (crop, flip, normalise, erase,
//! mix, target transforms) on the first training batch and writes the augmented images as a
//! PNG grid, un-normalised, with a JSON side file giving every tile's labels and soft target,
//! so a user sees what a configuration does before training with it. With `--time N` it also
//! measures the pipeline's throughput (images/s over N training batches, from the decoded
//! dataset in memory to augmented batches on the training device), for `cargo xtask bench
//! pipeline`.

use crate::datasets::loader::{EpochPlan, Loader, RawBatch};
use crate::datasets::Split;
use crate::io::write_atomic;
use crate::plot::Canvas;
use crate::registry::Registry;
use crate::setup::{setup, Purpose, Request};
use crate::train::image_stage::{build_image_stages, StagedSamples};
use crate::train::{build_pipeline, data, device_of};
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

pub struct Args {
    /// The grid to write (optional with `time_steps`).
    pub output: Option<PathBuf>,
    /// Images shown (default: `min(train.batch_size, 64)`); with a multi-view augmentation
    /// (Dual-Cutout) every view is shown.
    pub count: Option<usize>,
    /// Pixels per image pixel.
    pub scale: usize,
    /// Time the pipeline over this many batches of `train.batch_size` and print JSON.
    pub time_steps: Option<u32>,
}

/// Gap between tiles, in output pixels.
const GAP: usize = 2;

/// The side file beside `output`: `grid.png` -> `grid.json`.
pub fn side_file(output: &Path) -> PathBuf {
    output.with_extension("json")
}

/// Runs the training pipeline over `steps` consecutive batches (after two untimed ones) as the
/// trainer does, waiting for the device at the end, and prints the rate as one JSON line.
fn time_pipeline(
    pipeline: &mut crate::train::Pipeline,
    train: &crate::datasets::ImageSet,
    order: &[usize],
    batch: usize,
    steps: u32,
    seed: u64,
    device: Device,
) -> Result<()> {
    if order.len() < batch {
        bail!(
            "--time needs at least one batch of train.batch_size {batch}; the training set has {} images",
            order.len()
        );
    }
    let per_epoch = order.len() / batch;
    let one = |k: usize| -> Result<()> {
        let at = (k % per_epoch) * batch;
        let (images, labels) = data::gather(train, &order[at..at + batch]);
        let p = pipeline.prepare(
            images.to_device(device),
            labels.to_device(device),
            seed,
            0,
            k as u64,
        )?;
        // The outputs live until here, as in a training step.
        drop((p.images, p.loss_targets));
        Ok(())
    };
    let report = time_steps(one, batch, steps, device)?;
    println!("{report}");
    Ok(())
}

/// Runs `one(k)` for two warm-up batches, then times `steps` more (CUDA synchronised at both
/// ends), and returns the JSON report: images/s, batch size, steps, seconds, device.
fn time_steps(
    mut one: impl FnMut(usize) -> Result<()>,
    batch: usize,
    steps: u32,
    device: Device,
) -> Result<serde_json::Value> {
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    for k in 0..2 {
        one(k)?;
    }
    sync();
    let t0 = std::time::Instant::now();
    for k in 0..steps as usize {
        one(k + 2)?;
    }
    sync();
    let secs = t0.elapsed().as_secs_f64();
    Ok(json!({
        "pipeline_images_per_sec": (steps as usize * batch) as f64 / secs.max(1e-9),
        "batch_size": batch,
        "steps": steps,
        "seconds": secs,
        "device": format!("{device:?}"),
    }))
}

/// The batches of consecutive epochs of `loader` (per-image stages in its workers), endlessly.
struct Epochs<'a> {
    loader: &'a Loader,
    batch: usize,
    seed: u64,
    epoch: u64,
    stream: Option<crate::datasets::loader::BatchStream>,
}

impl Epochs<'_> {
    fn next_batch(&mut self) -> Result<RawBatch> {
        loop {
            let stream = self.stream.get_or_insert_with(|| {
                let n = self.loader.len();
                self.loader.epoch(EpochPlan {
                    order: data::epoch_order(n, self.seed, self.epoch),
                    batch_size: self.batch,
                    start: 0,
                    end: n / self.batch,
                    seed: self.seed,
                    epoch: self.epoch,
                })
            });
            match stream.next() {
                Some(b) => return Ok(b?),
                None => {
                    self.stream = None;
                    self.epoch += 1;
                }
            }
        }
    }
}

/// [`time_pipeline`] with per-image stages: the batches come from the training loader (its
/// `train.dataloader.num_workers` threads run the stages ahead of the consumer), then go to the
/// device and through the batch pipeline, as in training.
fn time_loader_pipeline(
    pipeline: &mut crate::train::Pipeline,
    loader: &Loader,
    batch: usize,
    steps: u32,
    seed: u64,
    device: Device,
) -> Result<()> {
    if loader.len() < batch {
        bail!(
            "--time needs at least one batch of train.batch_size {batch}; the training set has {} images",
            loader.len()
        );
    }
    let mut epochs = Epochs {
        loader,
        batch,
        seed,
        epoch: 0,
        stream: None,
    };
    let one = |k: usize| -> Result<()> {
        let raw = epochs.next_batch()?;
        let (images, labels) = data::to_device(&raw, loader, device)?;
        let p = pipeline.prepare(images, labels, seed, 0, k as u64)?;
        drop((p.images, p.loss_targets));
        Ok(())
    };
    let mut report = time_steps(one, batch, steps, device)?;
    report["num_workers"] = json!(loader.num_workers);
    println!("{report}");
    Ok(())
}

pub fn run(registry: &Registry, request: &Request, args: &Args) -> Result<()> {
    if args.scale == 0 {
        bail!("--scale must be >= 1");
    }
    if args.output.is_none() && args.time_steps.is_none() {
        bail!("preview needs --output FILE.png (the grid to write)");
    }
    let s = setup(registry, request, Purpose::Train)?;
    let c = &s.config;
    let device = device_of(c)?;
    let mut pipeline = build_pipeline(registry, &s, device)?;
    crate::datasets::download::ensure(s.dataset, &s.dataset_dir, &[crate::datasets::Split::Train])?;
    let train = Arc::new(s.dataset.load(&s.dataset_dir, Split::Train)?);
    // Per-image stages (RandAugment, ...) run in the training loader, as in training.
    let stages = build_image_stages(registry, &s)?;
    let staged = (!stages.is_empty()).then(|| {
        Loader::configured(
            StagedSamples::wrap(train.clone(), stages),
            c,
            "train.dataloader",
        )
    });
    let n = args
        .count
        .unwrap_or_else(|| (c.int("train.batch_size").max(1) as usize).min(64))
        .clamp(1, train.len().max(1));
    let seed = c.int("train.seed") as u64;
    // The first batch of the first epoch, as training draws it.
    let order = data::epoch_order(train.len(), seed, 0);
    let (images, labels) = match &staged {
        Some(loader) => loader
            .epoch(EpochPlan {
                order: order[..n.min(order.len())].to_vec(),
                batch_size: n,
                start: 0,
                end: 1,
                seed,
                epoch: 0,
            })
            .next()
            .context("the training set is empty")??
            .tensors(),
        None => data::gather(&train, &order[..n.min(order.len())]),
    };
    let p = pipeline.prepare(
        images.to_device(device),
        labels.to_device(device),
        seed,
        0,
        0,
    )?;
    if let Some(steps) = args.time_steps {
        let batch = c.int("train.batch_size").max(1) as usize;
        match &staged {
            Some(loader) => {
                time_loader_pipeline(&mut pipeline, loader, batch, steps, seed, device)?
            }
            None => time_pipeline(&mut pipeline, &train, &order, batch, steps, seed, device)?,
        }
    }
    let Some(output) = &args.output else {
        return Ok(());
    };

    // Un-normalise to 0..255 bytes on the CPU.
    let (mean, std) = (s.dataset.mean, s.dataset.std);
    let ch = mean.len() as i64;
    let view = |v: &[f64]| {
        Tensor::from_slice(v)
            .to_kind(Kind::Float)
            .view([1, ch, 1, 1])
    };
    let pixels = ((p.images.to_device(Device::Cpu).to_kind(Kind::Float) * view(std) + view(mean))
        * 255.0)
        .round()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8);
    let (total, _, h, w) = pixels.size4()?;
    let views = p.views.max(1) as usize;
    let samples = total as usize / views;
    let bytes = Vec::<u8>::try_from(pixels.contiguous().flatten(0, -1))?;
    let targets = p.loss_targets.to_device(Device::Cpu).to_kind(Kind::Double);
    let labels = Vec::<i64>::try_from(p.labels.to_device(Device::Cpu))?;

    // Views of one sample sit side by side; rows hold whole samples.
    let per_row = ((samples as f64).sqrt().ceil() as usize).max(1);
    let cols = per_row * views;
    let rows = samples.div_ceil(per_row);
    let (th, tw) = (h as usize * args.scale, w as usize * args.scale);
    let mut canvas = Canvas::new(cols * tw + (cols + 1) * GAP, rows * th + (rows + 1) * GAP);
    let mut tiles = Vec::with_capacity(total as usize);
    let plane = (h * w) as usize;
    for i in 0..samples {
        let soft = Vec::<f64>::try_from(targets.get(i as i64))?;
        let mut top: Vec<(usize, f64)> = soft
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, p)| *p > 1e-6)
            .collect();
        top.sort_by(|a, b| b.1.total_cmp(&a.1));
        for v in 0..views {
            let (row, col) = (i / per_row, (i % per_row) * views + v);
            let (x0, y0) = (GAP + col * (tw + GAP), GAP + row * (th + GAP));
            let img = &bytes[(v * samples + i) * plane * ch as usize..][..plane * ch as usize];
            for y in 0..th {
                for x in 0..tw {
                    let at =
                        |k: usize| img[k * plane + (y / args.scale) * w as usize + x / args.scale];
                    let rgb = if ch == 1 {
                        [at(0); 3]
                    } else {
                        [at(0), at(1), at(2)]
                    };
                    canvas.set((x0 + x) as i64, (y0 + y) as i64, rgb);
                }
            }
            tiles.push(json!({
                "sample": i,
                "view": v,
                "row": row,
                "col": col,
                "label": labels[i],
                "soft_label": soft,
                "top": top.iter().take(4).map(|(k, p)| json!([k, p])).collect::<Vec<_>>(),
            }));
        }
    }
    let augmentations: Vec<&str> = s
        .augmentations
        .iter()
        .map(|e| e.info.name.as_str())
        .collect();
    let side = json!({
        "image": output.file_name().map(|f| f.to_string_lossy().to_string()),
        "dataset": s.dataset.name,
        "augmentations": augmentations,
        "samples": samples,
        "views": views,
        "tile": {"height": th, "width": tw, "gap": GAP},
        "grid": {"rows": rows, "cols": cols, "width": canvas.width, "height": canvas.height},
        "tiles": tiles,
    });
    write_atomic(output, &canvas.to_png())
        .with_context(|| format!("cannot write {}", output.display()))?;
    let side_path = side_file(output);
    write_atomic(&side_path, serde_json::to_string_pretty(&side)?.as_bytes())?;
    println!(
        "{} ({}x{} px, {samples} images{}, augmentations: {}) and {}",
        output.display(),
        canvas.width,
        canvas.height,
        if views > 1 {
            format!(" x {views} views")
        } else {
            String::new()
        },
        if augmentations.is_empty() {
            "none".to_string()
        } else {
            augmentations.join(", ")
        },
        side_path.display()
    );
    Ok(())
}
