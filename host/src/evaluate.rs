//! `imgclf evaluate`: the reference's `evaluate.py`: test-split predictions of a checkpoint
//! written to `predictions.npz` (`preds` logits, `probs`, `labels`, `loss`, `acc`), plus the
//! confusion matrix (`confusion_matrix.csv` and `.png`) beside it.

use crate::datasets::loader::Loader;
use crate::datasets::Split;
use crate::io::{save_npz, NpyArray};
use crate::registry::Registry;
use crate::setup::{setup, Purpose, Request};
use crate::train::{build_model, checkpoint, data, device_of, Normalizer};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

pub struct Summary {
    pub loss: f64,
    pub acc: f64,
    pub output: PathBuf,
}

pub fn run(registry: &Registry, request: &Request) -> Result<Summary> {
    let s = setup(registry, request, Purpose::Evaluate)?;
    let c = &s.config;
    let ckpt = c.str("test.checkpoint");
    if ckpt.is_empty() {
        bail!("test.checkpoint is empty: pass the weights to evaluate, e.g. `test.checkpoint experiments/exp00/model_final.safetensors`");
    }
    let ckpt = PathBuf::from(ckpt);
    let out_dir = match c.str("test.output_dir") {
        "" => ckpt
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".")),
        d => PathBuf::from(d),
    };
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let device = device_of(c)?;
    let mut model = build_model(registry, &s, device)?;
    let tensors = model.tensors()?;
    let loaded = checkpoint::load(&ckpt)
        .with_context(|| format!("test.checkpoint = '{}'", ckpt.display()))?;
    checkpoint::copy_into_model(&tensors, &loaded.model, &ckpt)?;

    crate::datasets::download::ensure(s.dataset, &s.dataset_dir, &[crate::datasets::Split::Test])?;
    // In-memory sets whole; image folders (val/) streamed by test.dataloader.num_workers.
    let test = Loader::configured(
        s.dataset.open(&s.dataset_dir, Split::Test, c)?,
        c,
        "test.dataloader",
    );
    let (mean, std) = s.dataset.stats(c)?;
    let norm = Normalizer::new(&mean, &std, device);
    let bs = c.int("test.batch_size").max(1) as usize;
    let (mut all_logits, mut loss_sum, mut correct) = (Vec::new(), 0.0, 0i64);
    let mut true_labels: Vec<i64> = Vec::with_capacity(test.len());
    let bar = indicatif::ProgressBar::new(test.len() as u64);
    tch::no_grad(|| -> Result<()> {
        for raw in test.in_order((0..test.len()).collect(), bs) {
            let raw = raw?;
            let (images, labels) = data::to_device(&raw, &test, device)?;
            let logits = model.forward(&norm.apply(&images), false)?;
            let k = raw.labels.len();
            true_labels.extend_from_slice(&raw.labels);
            loss_sum += logits.cross_entropy_for_logits(&labels).double_value(&[]) * k as f64;
            correct += logits
                .argmax(1, false)
                .eq_tensor(&labels)
                .sum(Kind::Int64)
                .int64_value(&[]);
            all_logits.push(logits.to_device(tch::Device::Cpu).to_kind(Kind::Float));
            bar.inc(k as u64);
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    let preds = Tensor::cat(&all_logits, 0);
    let probs = preds.softmax(1, Kind::Float);
    let labels = preds.argmax(1, false);
    let n = true_labels.len().max(1) as f64;
    let (loss, acc) = (loss_sum / n, correct as f64 / n);
    let n_classes = c.int("dataset.n_classes") as usize;
    let confusion = crate::confusion::ConfusionMatrix::new(
        &true_labels,
        &Vec::<i64>::try_from(&labels)?,
        n_classes,
    )?;
    let (cm_csv, cm_png) = confusion.write(
        &out_dir,
        &crate::confusion::names_for(c.str("dataset.name"), n_classes),
    )?;
    tracing::info!(
        "confusion matrix: {} and {}",
        cm_csv.display(),
        cm_png.display()
    );
    let output = out_dir.join("predictions.npz");
    save_npz(
        &output,
        &[
            NpyArray::from_tensor("preds", &preds)?,
            NpyArray::from_tensor("probs", &probs)?,
            NpyArray::from_tensor("labels", &labels)?,
            NpyArray::scalar_f64("loss", loss),
            NpyArray::scalar_f64("acc", acc),
        ],
    )?;
    tracing::info!(
        "Loss {loss:.4} Accuracy {acc:.4} ({} test images); wrote {}",
        true_labels.len(),
        output.display()
    );
    Ok(Summary { loss, acc, output })
}
