//! Running averages of loss and top-k accuracy, and the run's `metrics.jsonl`.

use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Top-1 and top-5 accuracy against (possibly mixed) target weights: the weight the targets
/// give the k highest-scoring classes, averaged over the batch. With one-hot targets this is
/// plain accuracy; with Mixup/CutMix/RICAP weights it is the reference's weighted accuracy.
pub fn topk_accuracy(logits: &Tensor, weights: &Tensor) -> (f64, f64) {
    let k = logits.size()[1].min(5);
    let (_, top) = logits.topk(k, 1, true, true);
    let hit = weights.gather(1, &top, false);
    let acc1 = hit.narrow(1, 0, 1).sum(Kind::Double).double_value(&[]);
    let acc5 = hit.sum(Kind::Double).double_value(&[]);
    let n = logits.size()[0] as f64;
    (acc1 / n, acc5 / n)
}

/// The same for hard labels, without building one-hot targets.
pub fn topk_accuracy_labels(logits: &Tensor, labels: &Tensor) -> (f64, f64) {
    let k = logits.size()[1].min(5);
    let (_, top) = logits.topk(k, 1, true, true);
    let hit = top.eq_tensor(&labels.unsqueeze(1)).to_kind(Kind::Double);
    let n = logits.size()[0] as f64;
    (
        hit.narrow(1, 0, 1).sum(Kind::Double).double_value(&[]) / n,
        hit.sum(Kind::Double).double_value(&[]) / n,
    )
}

#[derive(Default, Clone, Copy, Debug)]
pub struct Meter {
    pub n: f64,
    loss: f64,
    acc1: f64,
    acc5: f64,
}

impl Meter {
    pub fn update(&mut self, n: usize, loss: f64, acc1: f64, acc5: f64) {
        let n = n as f64;
        self.n += n;
        self.loss += loss * n;
        self.acc1 += acc1 * n;
        self.acc5 += acc5 * n;
    }
    pub fn loss(&self) -> f64 {
        self.loss / self.n.max(1.0)
    }
    pub fn acc1(&self) -> f64 {
        self.acc1 / self.n.max(1.0)
    }
    pub fn acc5(&self) -> f64 {
        self.acc5 / self.n.max(1.0)
    }
    /// The weighted sums behind the averages (image count, loss, acc@1, acc@5), e.g. to add
    /// them up across ranks.
    pub fn sums(&self) -> [f64; 4] {
        [self.n, self.loss, self.acc1, self.acc5]
    }
    pub fn from_sums(s: [f64; 4]) -> Meter {
        Meter {
            n: s[0],
            loss: s[1],
            acc1: s[2],
            acc5: s[3],
        }
    }
}

/// Appends one JSON object per line to `metrics.jsonl`.
pub struct MetricsFile {
    path: PathBuf,
}

impl MetricsFile {
    pub fn new(dir: &Path) -> Self {
        MetricsFile {
            path: dir.join("metrics.jsonl"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        epoch: u64,
        step: u64,
        split: &str,
        m: &Meter,
        lr: f64,
        images_per_sec: f64,
        elapsed_s: f64,
        extra: &[(String, f64)],
    ) -> Result<()> {
        let mut line = json!({
            "epoch": epoch, "step": step, "split": split, "loss": m.loss(), "acc1": m.acc1(), "acc5": m.acc5(),
            "lr": lr, "images_per_sec": images_per_sec, "elapsed_s": elapsed_s,
        });
        for (k, v) in extra {
            line[k] = json!(v);
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        // One write per line: a killed process leaves whole lines only.
        f.write_all(format!("{line}\n").as_bytes())?;
        Ok(())
    }

    /// On resume: drops records after the checkpoint's step (rewritten atomically).
    pub fn truncate_after(&self, global_step: u64) -> Result<()> {
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return Ok(());
        };
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s <= global_step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        crate::io::write_atomic(&self.path, kept.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_accuracy_equals_plain_accuracy_for_one_hot_and_mixes_for_soft() {
        let logits = Tensor::from_slice(&[3.0f32, 1.0, 0.0, 0.0, 2.0, 5.0]).view([2, 3]);
        let labels = Tensor::from_slice(&[0i64, 1]);
        let one_hot = labels.one_hot(3).to_kind(Kind::Float);
        let (a1, a5) = topk_accuracy(&logits, &one_hot);
        assert_eq!((a1, a5), (0.5, 1.0));
        assert_eq!(topk_accuracy_labels(&logits, &labels), (0.5, 1.0));
        // 0.7 of class 0 + 0.3 of class 2 on the first sample: top-1 (class 0) earns 0.7.
        let soft = Tensor::from_slice(&[0.7f32, 0.0, 0.3, 0.0, 1.0, 0.0]).view([2, 3]);
        let (a1, _) = topk_accuracy(&logits, &soft);
        assert!((a1 - 0.35).abs() < 1e-6);
    }

    #[test]
    fn meter_weights_by_batch_size() {
        let mut m = Meter::default();
        m.update(2, 1.0, 1.0, 1.0);
        m.update(6, 3.0, 0.0, 0.5);
        assert!((m.loss() - 2.5).abs() < 1e-12);
        assert!((m.acc1() - 0.25).abs() < 1e-12);
    }
}
