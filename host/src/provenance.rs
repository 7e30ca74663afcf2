//! Runs that remember their plugins: `env.yaml` lists every plugin a run loaded (name,
//! version, file, SHA-256, ABI version, components); `imgclf train --resume DIR`, `predict
//! --run DIR` and `evaluate --config DIR/config.yaml` load those files again without
//! `--plugin-path`, and say precisely which plugin is missing or changed, and the fix.

use crate::registry::Registry;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// One plugin as a run's `env.yaml` records it.
#[derive(Clone, Debug, PartialEq)]
pub struct Recorded {
    pub name: String,
    pub version: String,
    pub file: PathBuf,
    pub sha256: String,
    pub abi_version: String,
    /// `kind name` of each component, e.g. `model mobilenetv2`.
    pub components: Vec<String>,
}

/// The SHA-256 of a file, as lowercase hex (what `sha256sum` prints).
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Where [`sha256_cached`] keeps the checksums it computed: `$XDG_CACHE_HOME/imgclf/plugin-sha256`
/// (default `~/.cache/...`), else the temporary folder.
fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("imgclf/plugin-sha256")
}

/// [`sha256_file`], remembered per (file, size, modification time): a debug build's plugins
/// are about 50 MB each, and every run records them all. A file rewritten in any way gets a new
/// size or time, hence a new checksum.
pub fn sha256_cached(path: &Path) -> Result<String> {
    use std::hash::{Hash, Hasher};
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos());
    let Some(mtime) = mtime else {
        return sha256_file(path);
    };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (path, meta.len(), mtime).hash(&mut h);
    let entry = cache_dir().join(format!("{:016x}", h.finish()));
    let valid = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    if let Ok(text) = std::fs::read_to_string(&entry) {
        // `path size mtime sha256`: the key is checked, not only its hash.
        let want = format!("{} {} {mtime} ", path.display(), meta.len());
        if let Some(sha) = text.strip_prefix(&want).map(str::trim) {
            if valid(sha) {
                return Ok(sha.to_string());
            }
        }
    }
    let sha = sha256_file(path)?;
    // A cache only: failing to write it costs time, nothing else.
    if std::fs::create_dir_all(cache_dir()).is_ok() {
        let line = format!("{} {} {mtime} {sha}\n", path.display(), meta.len());
        let _ = crate::io::write_atomic(&entry, line.as_bytes());
    }
    Ok(sha)
}

/// Every loaded plugin, for `env.yaml`'s `plugins` list.
pub fn record(reg: &Registry) -> Result<serde_json::Value> {
    let mut out = Vec::new();
    for p in &reg.plugins {
        let file = p.path.canonicalize().unwrap_or_else(|_| p.path.clone());
        out.push(serde_json::json!({
            "name": p.name,
            "version": p.version,
            "file": file,
            "sha256": sha256_cached(&file)?,
            "abi_version": p.api_version,
            "libtorch_version": p.libtorch_version,
            "components": p.components.iter()
                .map(|c| format!("{} {}", c.kind.as_str(), c.name)).collect::<Vec<_>>(),
        }));
    }
    Ok(serde_json::Value::Array(out))
}

/// The plugins recorded in `dir/env.yaml`: none when the file or its `plugins` list is
/// missing (runs from before the record existed).
pub fn read(dir: &Path) -> Result<Vec<Recorded>> {
    let path = dir.join("env.yaml");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(Vec::new());
    };
    let v: serde_json::Value = serde_yaml_ng::from_str(&text)
        .with_context(|| format!("{} is not valid YAML", path.display()))?;
    let Some(list) = v.get("plugins").and_then(|p| p.as_array()) else {
        return Ok(Vec::new());
    };
    let s = |p: &serde_json::Value, k: &str| {
        p.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    Ok(list
        .iter()
        .map(|p| Recorded {
            name: s(p, "name"),
            version: s(p, "version"),
            file: PathBuf::from(s(p, "file")),
            sha256: s(p, "sha256"),
            abi_version: s(p, "abi_version"),
            components: p
                .get("components")
                .and_then(|c| c.as_array())
                .map(|c| {
                    c.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
        })
        .filter(|r| !r.name.is_empty())
        .collect())
}

/// The recorded files that still exist: loaded before the search path, so the run gets the
/// very files it was trained with.
pub fn existing_files(recorded: &[Recorded]) -> Vec<PathBuf> {
    recorded
        .iter()
        .filter(|r| r.file.is_file())
        .map(|r| r.file.clone())
        .collect()
}

/// How strictly [`verify`] treats a plugin whose file changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strictness {
    /// `train --resume`: a changed plugin is an error (unless `--allow-plugin-changes`).
    Resume { allow_changes: bool },
    /// `predict`, `evaluate`: a changed plugin is a warning.
    Use,
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(16)]
}

/// Checks that every plugin recorded for the run in `dir` is loaded, from a file with the
/// recorded checksum. All problems are reported together, each with its fix.
pub fn verify(
    reg: &Registry,
    recorded: &[Recorded],
    dir: &Path,
    command: &str,
    strictness: Strictness,
) -> Result<()> {
    let mut problems = Vec::new();
    for r in recorded {
        let uses = if r.components.is_empty() {
            String::new()
        } else {
            format!(" (provides {})", r.components.join(", "))
        };
        let Some(p) = reg.plugin_by_name(&r.name) else {
            let why = if !r.file.exists() {
                format!("{} does not exist any more", r.file.display())
            } else if let Some(e) = reg
                .errors
                .iter()
                .find(|e| e.path.canonicalize().ok().as_deref() == Some(r.file.as_path()))
            {
                format!("{} failed to load: {}", r.file.display(), e.message)
            } else {
                format!("{} did not load", r.file.display())
            };
            problems.push(format!(
                "plugin `{}` {}{uses} is missing: the run was trained with {} (sha256 {}), and {why}.\n    \
                 fix: put that file back, or pass --plugin-path DIR with the folder that holds it now",
                r.name,
                r.version,
                r.file.display(),
                short(&r.sha256),
            ));
            continue;
        };
        if r.sha256.is_empty() {
            continue;
        }
        let now = sha256_cached(&p.path.canonicalize().unwrap_or_else(|_| p.path.clone()))?;
        if now != r.sha256 {
            let msg = format!(
                "plugin `{}` changed: the run was trained with {} (version {}, sha256 {}), but {} \
                 (version {}, sha256 {}) is loaded",
                r.name,
                r.file.display(),
                r.version,
                short(&r.sha256),
                p.path.display(),
                p.version,
                short(&now)
            );
            match strictness {
                Strictness::Resume {
                    allow_changes: false,
                } => problems.push(format!(
                    "{msg}.\n    fix: restore the original file (or put it on --plugin-path), or resume with the new build anyway: --allow-plugin-changes"
                )),
                _ => tracing::warn!("{msg}"),
            }
        }
    }
    if !problems.is_empty() {
        bail!(
            "{command} {}: {} of the run's plugins {}:\n  - {}",
            dir.display(),
            problems.len(),
            if problems.len() == 1 {
                "is not available"
            } else {
                "are not available"
            },
            problems.join("\n  - ")
        );
    }
    Ok(())
}

/// Replaces the `plugins` list of `dir/env.yaml` with the plugins loaded now (a resume that
/// accepted changed plugins records the new files, so the next resume checks against them).
pub fn rewrite(dir: &Path, reg: &Registry) -> Result<()> {
    let path = dir.join("env.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let mut v: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap_or(serde_json::json!({}));
    if !v.is_object() {
        v = serde_json::json!({});
    }
    v["plugins"] = record(reg)?;
    crate::io::write_atomic(&path, crate::envinfo::to_yaml(&v).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_is_the_standard_digest() {
        let d = std::env::temp_dir().join(format!("imgclf-sha-{}", std::process::id()));
        std::fs::write(&d, b"abc").unwrap();
        assert_eq!(
            sha256_file(&d).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(sha256_cached(&d).unwrap(), sha256_file(&d).unwrap());
        assert_eq!(sha256_cached(&d).unwrap(), sha256_file(&d).unwrap());
        std::fs::write(&d, b"abcd").unwrap();
        assert_eq!(
            sha256_cached(&d).unwrap(),
            "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589"
        );
        let _ = std::fs::remove_file(&d);
    }
}
