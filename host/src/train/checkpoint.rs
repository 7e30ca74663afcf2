//! Checkpoints: `checkpoint_<epoch:05d>.safetensors` (model tensors under `model.`, optimizer
//! state under `optimizer.`, trainer position in the metadata), written atomically, and
//! loading weights from an imgclf checkpoint, a PyTorch state dict in safetensors, or a
//! `torch.save` file (a state dict or the reference's checkpoint dict).

use crate::io::{parse_safetensors, save_safetensors};
use crate::torch_file::{self, Format};
use anyhow::{bail, Context, Result};
use imgclf_plugin_api::NamedTensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

pub const FORMAT: &str = "imgclf-checkpoint-1";

/// Where training stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    /// Completed epochs (the reference's `epoch` of the checkpoint).
    pub epoch: u64,
    /// Steps already done in epoch `epoch + 1` (0 at an epoch boundary).
    pub step_in_epoch: u64,
    pub global_step: u64,
}

pub fn file_name(p: &Position) -> String {
    if p.step_in_epoch == 0 {
        format!("checkpoint_{:05}.safetensors", p.epoch)
    } else {
        format!(
            "checkpoint_{:05}_step{:07}.safetensors",
            p.epoch, p.global_step
        )
    }
}

pub fn save(
    dir: &Path,
    pos: &Position,
    model: &[NamedTensor],
    optimizer: &[NamedTensor],
    extra: &[(String, Tensor)],
) -> Result<PathBuf> {
    let mut tensors: Vec<(String, Tensor)> = model
        .iter()
        .map(|t| (format!("model.{}", t.name), t.tensor.shallow_clone()))
        .collect();
    tensors.extend(
        optimizer
            .iter()
            .map(|t| (format!("optimizer.{}", t.name), t.tensor.shallow_clone())),
    );
    tensors.extend(extra.iter().map(|(n, t)| (n.clone(), t.shallow_clone())));
    let meta = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("epoch".to_string(), pos.epoch.to_string()),
        ("step_in_epoch".to_string(), pos.step_in_epoch.to_string()),
        ("global_step".to_string(), pos.global_step.to_string()),
    ]);
    let path = dir.join(file_name(pos));
    save_safetensors(&path, &tensors, meta)?;
    Ok(path)
}

pub struct Loaded {
    pub position: Option<Position>,
    pub model: HashMap<String, Tensor>,
    pub optimizer: Vec<NamedTensor>,
    /// The training parts' state (names with their part's prefix, e.g. `precision.`).
    pub extra: Vec<(String, Tensor)>,
}

fn meta_u64(meta: &HashMap<String, String>, key: &str, path: &Path) -> Result<u64> {
    meta.get(key)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{}: checkpoint metadata lacks `{key}`", path.display()))
}

/// Reads weights, telling the format by content (never by extension): an imgclf checkpoint; a
/// plain state dict in safetensors (any safetensors file without imgclf's metadata, e.g. the
/// PyTorch reference's `model.state_dict()` saved with `safetensors.torch`); or a `torch.save`
/// zip file holding a state dict or a checkpoint dict with the state dict under `model` (what
/// the reference's fvcore `Checkpointer` writes). A plain state dict whose keys all start with
/// `module.` (DataParallel / DistributedDataParallel) loses that prefix.
pub fn load(path: &Path) -> Result<Loaded> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let plain = match torch_file::sniff(&bytes) {
        Format::Safetensors => {
            let (tensors, meta) = parse_safetensors(path, &bytes)?;
            if meta.get("format").map(String::as_str) == Some(FORMAT) {
                return imgclf_checkpoint(path, tensors, &meta);
            }
            tensors
        }
        Format::Zip | Format::LegacyTorch => {
            let sd = torch_file::load_state_dict(path, &bytes)?;
            if !sd.ignored.is_empty() {
                tracing::info!(
                    "{}: checkpoint dict; loading its 'model' entry (ignoring {})",
                    path.display(),
                    sd.ignored.join(", ")
                );
            }
            sd.tensors
        }
        Format::Unknown => bail!(
            "{} is neither a safetensors file nor a torch.save file (it starts with {:02x?}); \
             pass an imgclf checkpoint, a state dict saved with \
             safetensors.torch.save_file, or a file written by torch.save",
            path.display(),
            &bytes[..bytes.len().min(8)]
        ),
    };
    Ok(Loaded {
        position: None,
        model: strip_module_prefix(path, plain),
        optimizer: vec![],
        extra: vec![],
    })
}

/// Drops the `module.` prefix DataParallel / DistributedDataParallel put on every key.
fn strip_module_prefix(path: &Path, tensors: Vec<(String, Tensor)>) -> HashMap<String, Tensor> {
    let prefixed = !tensors.is_empty() && tensors.iter().all(|(n, _)| n.starts_with("module."));
    if prefixed {
        tracing::info!(
            "{}: every key starts with `module.` (a DataParallel / DistributedDataParallel \
             state dict); loading them without that prefix",
            path.display()
        );
    }
    tensors
        .into_iter()
        .map(|(n, t)| match n.strip_prefix("module.") {
            Some(s) if prefixed => (s.to_string(), t),
            _ => (n, t),
        })
        .collect()
}

fn imgclf_checkpoint(
    path: &Path,
    tensors: Vec<(String, Tensor)>,
    meta: &HashMap<String, String>,
) -> Result<Loaded> {
    let position = Position {
        epoch: meta_u64(meta, "epoch", path)?,
        step_in_epoch: meta_u64(meta, "step_in_epoch", path)?,
        global_step: meta_u64(meta, "global_step", path)?,
    };
    let (mut model, mut optimizer, mut extra) = (HashMap::new(), Vec::new(), Vec::new());
    for (name, t) in tensors {
        if let Some(n) = name.strip_prefix("model.") {
            model.insert(n.to_string(), t);
        } else if let Some(n) = name.strip_prefix("optimizer.") {
            optimizer.push(NamedTensor {
                name: n.to_string(),
                tensor: t,
                trainable: false,
            });
        } else {
            extra.push((name, t));
        }
    }
    Ok(Loaded {
        position: Some(position),
        model,
        optimizer,
        extra,
    })
}

/// Copies `weights` into the model's tensors in place. Every model tensor must be present with
/// its shape; extra entries are refused, except BatchNorm `num_batches_tracked` counters. A
/// torchvision state dict is read under the reference's names first
/// ([`super::torchvision::to_reference_names`]).
pub fn copy_into_model(
    model: &[NamedTensor],
    weights: &HashMap<String, Tensor>,
    origin: &Path,
) -> Result<()> {
    let mapped = super::torchvision::to_reference_names(model, weights);
    let (weights, torchvision) = match &mapped {
        Some((family, renamed)) => {
            tracing::info!(
                "{}: a torchvision {} state dict; loading it under the reference's names",
                origin.display(),
                family.name()
            );
            (renamed, Some(family.name()))
        }
        None => (weights, None),
    };
    let mut missing = Vec::new();
    let mut mismatched = Vec::new();
    for t in model {
        match weights.get(&t.name) {
            None if t.name.ends_with("num_batches_tracked") => {}
            None => missing.push(t.name.clone()),
            Some(w) if w.size() != t.tensor.size() => mismatched.push(format!(
                "{} (checkpoint {:?}, model {:?})",
                t.name,
                w.size(),
                t.tensor.size()
            )),
            Some(_) => {}
        }
    }
    let names: std::collections::HashSet<&str> = model.iter().map(|t| t.name.as_str()).collect();
    let unexpected: Vec<&String> = weights
        .keys()
        .filter(|k| !names.contains(k.as_str()) && !k.ends_with("num_batches_tracked"))
        .collect();
    if !missing.is_empty() || !mismatched.is_empty() || !unexpected.is_empty() {
        let mut msg = format!("{} does not fit this model:", origin.display());
        if !missing.is_empty() {
            msg += &format!("\n  missing ({}): {}", missing.len(), missing.join(", "));
        }
        if !mismatched.is_empty() {
            msg += &format!(
                "\n  wrong shape ({}): {}",
                mismatched.len(),
                mismatched.join(", ")
            );
        }
        if !unexpected.is_empty() {
            let mut u: Vec<&str> = unexpected.iter().map(|s| s.as_str()).collect();
            u.sort();
            msg += &format!("\n  unexpected ({}): {}", u.len(), u.join(", "));
        }
        if let Some(family) = torchvision {
            bail!(
                "{msg}\n  (names mapped from torchvision's {family}; the network must be the \
                 model.type imagenet form with the same layout: see the README's torchvision \
                 table for the configs that match resnet18/34, resnext50_32x4d, densenet121 \
                 and vgg16(_bn), and set dataset.n_classes to the file's classes)"
            );
        }
        bail!("{msg}\n  (is the checkpoint for the same model.name and options?)");
    }
    tch::no_grad(|| -> Result<()> {
        for t in model {
            if let Some(w) = weights.get(&t.name) {
                let mut dst = t.tensor.shallow_clone();
                dst.f_copy_(&w.to_device(dst.device()).to_kind(dst.kind()))?;
            }
        }
        Ok(())
    })
}

/// The newest complete checkpoint in `dir` (highest global step), if any.
pub fn newest(dir: &Path) -> Result<Option<(PathBuf, Position)>> {
    let mut best: Option<(PathBuf, Position)> = None;
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = e?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        if !name.starts_with("checkpoint_") || !name.ends_with(".safetensors") {
            continue;
        }
        match load_position(&path) {
            Ok(pos) => {
                if best
                    .as_ref()
                    .is_none_or(|(_, b)| pos.global_step > b.global_step)
                {
                    best = Some((path, pos));
                }
            }
            Err(e) => tracing::warn!("ignoring unreadable checkpoint {}: {e:#}", path.display()),
        }
    }
    Ok(best)
}

fn load_position(path: &Path) -> Result<Position> {
    let bytes = std::fs::read(path)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let meta = meta.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        bail!("not an imgclf checkpoint");
    }
    Ok(Position {
        epoch: meta_u64(&meta, "epoch", path)?,
        step_in_epoch: meta_u64(&meta, "step_in_epoch", path)?,
        global_step: meta_u64(&meta, "global_step", path)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/data/torch_save")
            .join(name)
    }

    #[test]
    fn data_parallel_state_dict_loses_its_module_prefix() {
        let loaded = load(&fixture("data_parallel.pth")).unwrap();
        assert!(loaded.position.is_none() && loaded.optimizer.is_empty());
        let mut names: Vec<&String> = loaded.model.keys().collect();
        names.sort();
        assert_eq!(names, ["bias", "weight"]);
        let w = Vec::<f32>::try_from(loaded.model["weight"].flatten(0, -1)).unwrap();
        assert_eq!(w, [1.0, 2.0]);
        // Only a prefix every key has is dropped.
        let t = || Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu));
        let mixed = strip_module_prefix(
            Path::new("m"),
            vec![("module.a".into(), t()), ("b".into(), t())],
        );
        assert!(mixed.contains_key("module.a") && mixed.contains_key("b"));
    }

    #[test]
    fn legacy_checkpoint_dict_loads_and_unknown_files_name_the_fix() {
        let loaded = load(&fixture("checkpoint_legacy.pth")).unwrap();
        let row = &loaded.model["row"];
        assert_eq!(Vec::<f32>::try_from(row).unwrap(), [3.0, 4.0, 5.0]);
        let path = fixture("make_fixtures.py");
        let e = format!("{:#}", load(&path).err().unwrap());
        assert!(
            e.contains("make_fixtures.py") && e.contains("neither a safetensors file nor"),
            "{e}"
        );
    }
}
