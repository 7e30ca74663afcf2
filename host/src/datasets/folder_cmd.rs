//! `imgclf datasets stats DIR` (per-channel mean and std of an image folder, for
//! `dataset.mean` / `dataset.std`) and the hidden `imgclf datasets loader-bench DIR` that
//! `cargo xtask bench loader` times.

use super::folder::{decode_rgb, FolderSplit, ImageFolder};
use super::loader::{spawn, EpochPlan, Samples};
use super::transform::{Geometry, Transform, RRC_RATIO, RRC_SCALE};
use anyhow::{Context, Result};
use imgclf_plugin_api::rng::{mix_seed, step_rng};
use rand::seq::SliceRandom;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The image-folder commands under `imgclf datasets`.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum FolderCmd {
    /// Per-channel mean and std of every image of a class-per-folder directory (pixels scaled
    /// to [0, 1], over all pixels of all images), for dataset.mean and dataset.std.
    Stats {
        /// A class-per-folder directory, e.g. DATASET_DIR/train.
        dir: PathBuf,
        /// Decoding threads.
        #[arg(long, default_value_t = 4)]
        workers: usize,
        #[arg(long)]
        json: bool,
    },
    /// Images/s of the image-folder training loader (decode, random-resized crop, flip,
    /// normalise); used by `cargo xtask bench loader`.
    #[command(hide = true)]
    LoaderBench {
        dir: PathBuf,
        #[arg(long, default_value_t = 2)]
        workers: usize,
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        /// Timed epochs, after one untimed.
        #[arg(long, default_value_t = 2)]
        epochs: u64,
        #[arg(long, default_value_t = 224)]
        image_size: usize,
    },
}

/// Runs one of the image-folder commands.
pub fn run(cmd: &FolderCmd) -> Result<()> {
    match cmd {
        FolderCmd::Stats { dir, workers, json } => {
            let (mean, std, n) = folder_stats(dir, *workers)?;
            if *json {
                println!("{}", json!({"images": n, "mean": mean, "std": std}));
            } else {
                let fmt = |v: &[f64]| {
                    v.iter()
                        .map(|x| format!("{x:.4}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                println!("{n} images in {}", dir.display());
                println!("dataset.mean: [{}]", fmt(&mean));
                println!("dataset.std: [{}]", fmt(&std));
            }
            Ok(())
        }
        FolderCmd::LoaderBench {
            dir,
            workers,
            batch_size,
            epochs,
            image_size,
        } => {
            let r = loader_bench(dir, *workers, *batch_size, *epochs, *image_size)?;
            println!("{r}");
            Ok(())
        }
    }
}

/// (mean, std, images) over all pixels of all images under `dir`, decoded by `workers` threads.
pub fn folder_stats(dir: &Path, workers: usize) -> Result<(Vec<f64>, Vec<f64>, usize)> {
    let folder = ImageFolder::scan(dir)?;
    let next = AtomicUsize::new(0);
    // Per channel: sum, sum of squares (exact in u64 per image, f64 across images); pixels.
    let total = Mutex::new(([0f64; 3], [0f64; 3], 0f64));
    let first_error = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((path, _)) = folder.samples.get(i) else {
                    return;
                };
                match decode_rgb(path) {
                    Ok(img) => {
                        let (mut sum, mut sq) = ([0u64; 3], [0u64; 3]);
                        for px in img.data.chunks_exact(3) {
                            for ((s, q), &v) in sum.iter_mut().zip(sq.iter_mut()).zip(px) {
                                *s += v as u64;
                                *q += v as u64 * v as u64;
                            }
                        }
                        let mut t = total.lock().unwrap_or_else(|p| p.into_inner());
                        for (c, (s, q)) in sum.iter().zip(&sq).enumerate() {
                            t.0[c] += *s as f64;
                            t.1[c] += *q as f64;
                        }
                        t.2 += (img.width * img.height) as f64;
                    }
                    Err(e) => {
                        first_error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                        next.store(usize::MAX / 2, Ordering::Relaxed);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e).context("imgclf datasets stats");
    }
    let (sum, sq, n) = total.into_inner().unwrap_or_else(|p| p.into_inner());
    let mean: Vec<f64> = (0..3).map(|c| sum[c] / n / 255.0).collect();
    let std: Vec<f64> = (0..3)
        .map(|c| ((sq[c] / n / 65025.0) - mean[c] * mean[c]).max(0.0).sqrt())
        .collect();
    Ok((mean, std, folder.len()))
}

/// Times the training loader over `dir` (JSON: images, seconds, images_per_s).
fn loader_bench(
    dir: &Path,
    workers: usize,
    batch_size: usize,
    epochs: u64,
    image_size: usize,
) -> Result<serde_json::Value> {
    let folder = ImageFolder::scan(dir)?;
    let transform = Transform {
        geometry: Geometry::RandomResizedCrop {
            scale: RRC_SCALE,
            ratio: RRC_RATIO,
        },
        size: image_size,
        flip_prob: 0.5,
    };
    let split: Arc<dyn Samples> = Arc::new(FolderSplit::new(folder, transform, false));
    let n = split.len();
    let batches = n.div_ceil(batch_size.max(1));
    let mean = [0.485f32, 0.456, 0.406];
    let std = [0.229f32, 0.224, 0.225];
    let plane = image_size * image_size;
    let mut normalised: Vec<f32> = Vec::new();
    let mut images = 0usize;
    let mut t0 = Instant::now();
    for epoch in 0..=epochs {
        if epoch == 1 {
            t0 = Instant::now(); // epoch 0 is the untimed warm-up
            images = 0;
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut step_rng(mix_seed(&[0, epoch])));
        let plan = EpochPlan {
            order,
            batch_size,
            start: 0,
            end: batches,
            seed: 0,
            epoch,
        };
        for batch in spawn(split.clone(), plan, workers) {
            let batch = batch?;
            // What ToTensor + Normalize do: (x / 255 - mean) / std as float32.
            normalised.resize(batch.images.len(), 0.0);
            for (k, (o, &v)) in normalised.iter_mut().zip(&batch.images).enumerate() {
                let c = (k / plane) % 3;
                *o = (v as f32 / 255.0 - mean[c]) / std[c];
            }
            images += batch.labels.len();
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    std::hint::black_box(&normalised);
    Ok(json!({
        "images": images,
        "seconds": secs,
        "images_per_s": images as f64 / secs.max(1e-9),
        "workers": workers,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datasets::testutil::TempDir;

    fn png(w: u32, h: u32, rgb: [u8; 3]) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb(rgb));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn stats_are_over_all_pixels() {
        let dir = TempDir::new("stats");
        // 1x1 black and 1x3 white: red mean 3/4, std sqrt(3/4 - 9/16) = sqrt(3)/4.
        dir.write("a/0.png", &png(1, 1, [0, 0, 0]));
        dir.write("b/1.png", &png(1, 3, [255, 255, 0]));
        let (mean, std, n) = folder_stats(dir.path(), 2).unwrap();
        assert_eq!(n, 2);
        assert!((mean[0] - 0.75).abs() < 1e-12, "{mean:?}");
        assert!((std[0] - 3f64.sqrt() / 4.0).abs() < 1e-12, "{std:?}");
        assert_eq!((mean[2], std[2]), (0.0, 0.0));
        dir.write("b/2.png", b"not a png");
        let e = format!("{:#}", folder_stats(dir.path(), 2).unwrap_err());
        assert!(e.contains("2.png"), "{e}");
    }
}
