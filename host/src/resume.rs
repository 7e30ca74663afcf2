//! `imgclf train --resume DIR KEY VALUE...`: the command line applies on top of DIR's saved
//! config; keys that fix the model, the data, its order or the optimizer state cannot change;
//! what did change is logged and recorded in DIR (`config.yaml` updated, `resumes.jsonl`).

use crate::config::{Config, Source, Value};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// Sections whose every key is fixed on resume: the network (tensor shapes) and the data.
pub const FIXED_SECTIONS: &[&str] = &["model", "dataset"];

/// Single keys fixed on resume, each with the reason shown in the error.
pub const FIXED_KEYS: &[(&str, &str)] = &[
    (
        "train.batch_size",
        "steps per epoch, hence the checkpoint's position and the data order",
    ),
    ("train.seed", "the data order and the augmentations' draws"),
    ("train.val_ratio", "which images are trained on"),
    ("train.dataloader.drop_last", "steps per epoch"),
    ("train.distributed", "how the data is sharded"),
    ("train.dist.world_size", "how the data is sharded"),
    ("train.optimizer", "the optimizer state in the checkpoint"),
    (
        "train.no_weight_decay_on_bn",
        "the parameter groups of the optimizer state",
    ),
    ("train.precision", "the precision state in the checkpoint"),
    ("train.use_apex", "the precision state in the checkpoint"),
    (
        "train.start_epoch",
        "the position comes from the checkpoint",
    ),
    (
        "train.checkpoint",
        "the weights come from the run's checkpoint, not initial weights",
    ),
    ("train.output_dir", "the run stays in DIR"),
];

/// One key whose value differs from the saved run's.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub key: String,
    pub from: Value,
    pub to: Value,
    /// Where the new value came from (command line or a `--config` file).
    pub source: Source,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} -> {} ({})",
            self.key, self.from, self.to, self.source
        )
    }
}

/// Why `key` cannot change on resume, if it cannot.
pub fn fixed(key: &str) -> Option<&'static str> {
    if let Some(section) = FIXED_SECTIONS
        .iter()
        .find(|s| key.strip_prefix(**s).is_some_and(|r| r.starts_with('.')))
    {
        return Some(if *section == "model" {
            "the network and its tensor shapes"
        } else {
            "the data"
        });
    }
    FIXED_KEYS
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, why)| *why)
}

/// The keys of `config` whose value differs from `saved` (the run's values before the command
/// line); an error listing every change to a fixed key.
pub fn changes(
    saved: &BTreeMap<String, Value>,
    config: &Config,
    dir: &Path,
) -> Result<Vec<Change>> {
    let mut changed = Vec::new();
    for (key, value) in config.iter() {
        // Set internally on every resume.
        if key == "train.resume" {
            continue;
        }
        let Some(from) = saved.get(key) else {
            continue;
        };
        if from != value {
            changed.push(Change {
                key: key.to_string(),
                from: from.clone(),
                to: value.clone(),
                source: config.source(key).cloned().unwrap_or(Source::Derived),
            });
        }
    }
    let refused: Vec<String> = changed
        .iter()
        .filter_map(|c| fixed(&c.key).map(|why| format!("\n  - {c}: fixes {why}")))
        .collect();
    if !refused.is_empty() {
        bail!(
            "--resume {}: {} cannot change when a run is resumed:{}\nresume without {}, or start a new run from its config: imgclf train --config {} train.output_dir NEW_DIR ...",
            dir.display(),
            if refused.len() == 1 { "this key" } else { "these keys" },
            refused.concat(),
            if refused.len() == 1 { "it" } else { "them" },
            dir.join("config.yaml").display()
        );
    }
    Ok(changed)
}

/// Logs the changes and records them in the run directory: `config.yaml` becomes the new
/// effective config (so a later plain `--resume` keeps them) and `resumes.jsonl` gains one line
/// per resume with the time and every change.
pub fn record(dir: &Path, config: &Config, changes: &[Change]) -> Result<()> {
    if changes.is_empty() {
        tracing::info!("resuming with the saved config unchanged");
    }
    for c in changes {
        tracing::info!("resume changes {c}");
    }
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let line = serde_json::json!({
        "time": time,
        "changes": changes.iter().map(|c| serde_json::json!({
            "key": c.key, "from": c.from.to_string(), "to": c.to.to_string(),
            "source": c.source.to_string(),
        })).collect::<Vec<_>>(),
    });
    let path = dir.join("resumes.jsonl");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes())?;
    if !changes.is_empty() {
        crate::io::write_atomic(&dir.join("config.yaml"), config.to_yaml().as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_and_dataset_keys_and_the_listed_ones_are_fixed() {
        assert!(fixed("model.resnet_preact.depth").is_some());
        assert!(fixed("model.name").is_some());
        assert!(fixed("dataset.name").is_some());
        assert!(fixed("train.batch_size").is_some());
        assert!(fixed("train.optimizer").is_some());
        assert!(fixed("scheduler.epochs").is_none());
        assert!(fixed("train.base_lr").is_none());
        assert!(fixed("modelx.a").is_none());
        assert!(fixed("augmentation.use_cutout").is_none());
    }
}
