//! `imgclf throughput`: how many images per second the configured model trains on (forward,
//! cross-entropy, backward) and predicts (eval-mode forward), on synthetic inputs of the
//! dataset's geometry on the configured device, without data loading, so that architectures
//! and devices can be compared (and `cargo xtask bench models` can set them beside PyTorch).

use crate::registry::Registry;
use crate::setup::{setup, Purpose, Request};
use crate::train::{build_model, device_of, parameter_count};
use anyhow::{bail, Result};
use serde_json::json;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

pub struct Args {
    /// Images per step (default: `train.batch_size`).
    pub batch_size: Option<i64>,
    /// Timed steps of each phase.
    pub steps: u32,
    /// Untimed steps first (allocator, cuDNN autotuning, caches).
    pub warmup: u32,
    pub json: bool,
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Images per second of `steps` calls of `f` on batches of `batch`, after `warmup` calls.
fn rate(device: Device, batch: i64, warmup: u32, steps: u32, mut f: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        f();
    }
    sync(device);
    let t = Instant::now();
    for _ in 0..steps {
        f();
    }
    sync(device);
    (batch * steps as i64) as f64 / t.elapsed().as_secs_f64()
}

pub fn run(registry: &Registry, request: &Request, args: &Args) -> Result<serde_json::Value> {
    let s = setup(registry, request, Purpose::Evaluate)?;
    let c = &s.config;
    let device = device_of(c)?;
    let batch = args.batch_size.unwrap_or_else(|| c.int("train.batch_size"));
    if batch < 1 || args.steps < 1 {
        bail!(
            "--batch-size and --steps must be at least 1 (got {batch} and {})",
            args.steps
        );
    }
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(c.bool("cudnn.benchmark"));
    }
    tch::manual_seed(c.int("train.seed"));
    let mut model = build_model(registry, &s, device)?;
    let tensors = model.tensors()?;
    let (ch, hw, k) = (
        c.int("dataset.n_channels"),
        c.int("dataset.image_size"),
        c.int("dataset.n_classes"),
    );
    let x = Tensor::randn([batch, ch, hw, hw], (Kind::Float, device));
    let y = Tensor::randint(k, [batch], (Kind::Int64, device));
    let params: Vec<Tensor> = tensors
        .iter()
        .filter(|t| t.trainable)
        .map(|t| t.tensor.shallow_clone())
        .collect();
    let mut failure = None;
    let train = rate(device, batch, args.warmup, args.steps, || {
        for p in &params {
            let mut p = p.shallow_clone();
            p.zero_grad();
        }
        match model.forward(&x, true) {
            Ok(logits) => logits.cross_entropy_for_logits(&y).backward(),
            Err(e) => failure = Some(e),
        }
    });
    if let Some(e) = failure.take() {
        return Err(e.into());
    }
    let eval = tch::no_grad(|| {
        rate(device, batch, args.warmup, args.steps, || {
            if let Err(e) = model.forward(&x, false) {
                failure = Some(e);
            }
        })
    });
    if let Some(e) = failure {
        return Err(e.into());
    }
    let result = json!({
        "model": s.model.info.name,
        "summary": model.summary(),
        "parameters": parameter_count(&tensors),
        "device": format!("{device:?}"),
        "threads": tch::get_num_threads(),
        "batch_size": batch,
        "input": [ch, hw, hw],
        "steps": args.steps,
        "warmup": args.warmup,
        "train_images_per_sec": train,
        "eval_images_per_sec": eval,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        println!("{}", model.summary());
        println!(
            "parameters {} | device {device:?} | batch {batch} of {ch}x{hw}x{hw} | {} steps after {} warm-up",
            result["parameters"], args.steps, args.warmup
        );
        println!("train (forward + loss + backward): {train:.1} images/s");
        println!("eval  (forward, no grad):          {eval:.1} images/s");
    }
    Ok(result)
}
