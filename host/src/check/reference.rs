//! Optional reference cases for models: a text file per case,
//! `# <model>  config: <file>  overrides: <k v ...>`, then `# parameters (trainable elements): N`,
//! then one `name [shape] dtype` line per state-dict tensor (what
//! `tests/python/` writes from the PyTorch reference). `imgclf plugins check --reference DIR`
//! compares each model that has a case with it.

use super::{err, Report};
use crate::registry::Registry;
use imgclf_plugin_api::Kind;
use std::path::{Path, PathBuf};
use tch::Kind as K;

/// One reference case.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    pub model: String,
    /// Config file, relative to the case folder's workspace (`configs/...`); empty: none.
    pub config: String,
    pub overrides: Vec<String>,
    pub params: i64,
    pub tensors: Vec<String>,
}

/// Splits on whitespace outside `[...]` / `(...)`, so `k [True, False]` stays two words.
pub fn split_keeping_brackets(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0i32);
    for ch in s.chars() {
        match ch {
            '[' | '(' => depth += 1,
            ']' | ')' => depth -= 1,
            _ => {}
        }
        if ch.is_whitespace() && depth == 0 {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(ch);
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Every case file in `dir`, sorted by name.
pub fn cases(dir: &Path) -> anyhow::Result<Vec<Case>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f)?;
        let bad = || {
            anyhow::anyhow!(
                "{}: not a reference case (see `imgclf plugins check --help`)",
                f.display()
            )
        };
        let mut lines = text.lines();
        let head = lines
            .next()
            .ok_or_else(bad)?
            .trim_start_matches('#')
            .trim()
            .to_string();
        let (model, rest) = head.split_once("config:").ok_or_else(bad)?;
        let (config, overrides) = rest.split_once("overrides:").unwrap_or((rest, ""));
        let params = lines
            .next()
            .and_then(|l| l.rsplit(':').next())
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(bad)?;
        out.push(Case {
            name: f
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string(),
            model: model.trim().to_string(),
            config: config.trim().to_string(),
            overrides: split_keeping_brackets(overrides),
            params,
            tensors: lines
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect(),
        });
    }
    Ok(out)
}

fn dtype(k: K) -> &'static str {
    match k {
        K::Float => "float32",
        K::Int64 => "int64",
        _ => "other",
    }
}

/// Checks every case whose model is loaded; `config` files are resolved against `root`.
/// Returns the names of the cases checked.
pub fn check(reg: &Registry, cases: &[Case], root: &Path, report: &mut Report) -> Vec<String> {
    let mut checked = Vec::new();
    for case in cases {
        let Some(e) = reg.get(Kind::Model, &case.model) else {
            continue;
        };
        let label = super::label(e);
        let r = (|| -> Result<(), String> {
            let mut req = crate::setup::Request {
                overrides: case.overrides.clone(),
                ..Default::default()
            };
            req.overrides
                .extend(["device".to_string(), "cpu".to_string()]);
            if !case.config.is_empty() {
                req.config_file = Some(root.join(&case.config));
            }
            let s = crate::setup::setup(reg, &req, crate::setup::Purpose::Evaluate).map_err(err)?;
            let model = crate::train::build_model(reg, &s, tch::Device::Cpu).map_err(err)?;
            let tensors = model.tensors().map_err(err)?;
            let params = crate::train::parameter_count(&tensors);
            if params != case.params {
                return Err(format!(
                    "{params} parameters, the reference has {}",
                    case.params
                ));
            }
            let ours: Vec<String> = tensors
                .iter()
                .map(|t| {
                    format!(
                        "{} {:?} {}",
                        t.name,
                        t.tensor.size(),
                        dtype(t.tensor.kind())
                    )
                })
                .collect();
            if let Some(i) = (0..ours.len().max(case.tensors.len()))
                .find(|&i| ours.get(i) != case.tensors.get(i))
            {
                return Err(format!(
                    "state dict differs at tensor {i}: ours {:?}, the reference's {:?} ({} vs {} tensors)",
                    ours.get(i),
                    case.tensors.get(i),
                    ours.len(),
                    case.tensors.len()
                ));
            }
            Ok(())
        })();
        report.add(
            &label,
            format!(
                "reference case {}: parameter count and state-dict names, shapes, dtypes",
                case.name
            ),
            r,
        );
        checked.push(case.name.clone());
    }
    checked
}
