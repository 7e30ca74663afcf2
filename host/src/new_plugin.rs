//! `imgclf new-plugin NAME --kind model|augmentation|optimizer|scheduler [--dir D]`: writes a
//! ready out-of-tree plugin crate from the templates in `host/templates/plugin/` (embedded in
//! the binary): `Cargo.toml` with the host's pins, `src/lib.rs` with a working, commented
//! component and its unit test, `src/ffi.rs` with `export_plugin!`, and imgclf's `Cargo.lock`
//! so every dependency has the host's exact version.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

const CARGO_TOML: &str = include_str!("../templates/plugin/Cargo.toml.in");
const FFI: &str = include_str!("../templates/plugin/ffi.rs.in");
const GITIGNORE: &str = include_str!("../templates/plugin/gitignore.in");
const MODEL: &str = include_str!("../templates/plugin/model.rs.in");
const AUGMENTATION: &str = include_str!("../templates/plugin/augmentation.rs.in");
const OPTIMIZER: &str = include_str!("../templates/plugin/optimizer.rs.in");
const SCHEDULER: &str = include_str!("../templates/plugin/scheduler.rs.in");

/// The kinds a template exists for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TemplateKind {
    Model,
    Augmentation,
    Optimizer,
    Scheduler,
}

impl TemplateKind {
    fn lib_rs(self) -> &'static str {
        match self {
            TemplateKind::Model => MODEL,
            TemplateKind::Augmentation => AUGMENTATION,
            TemplateKind::Optimizer => OPTIMIZER,
            TemplateKind::Scheduler => SCHEDULER,
        }
    }
    fn as_str(self) -> &'static str {
        match self {
            TemplateKind::Model => "model",
            TemplateKind::Augmentation => "augmentation",
            TemplateKind::Optimizer => "optimizer",
            TemplateKind::Scheduler => "scheduler",
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct NewPluginArgs {
    /// The plugin's (and its component's) name: lowercase letters, digits and `_`, e.g.
    /// `mobilenetv2`; the crate is `imgclf-plugin-NAME`.
    #[arg(value_name = "NAME")]
    pub name: String,
    /// What the component is.
    #[arg(long, value_enum)]
    pub kind: TemplateKind,
    /// Folder to create the crate in (default: ./NAME).
    #[arg(long, value_name = "D")]
    pub dir: Option<PathBuf>,
    /// The imgclf-plugin-api crate to depend on by path (default: the plugin-api of the
    /// checkout this imgclf was built from, as `imgclf env` shows).
    #[arg(long, value_name = "DIR")]
    pub plugin_api: Option<PathBuf>,
}

fn camel(name: &str) -> String {
    name.split('_')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut c = p.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// The files of a new plugin crate, as (relative path, contents).
pub fn render(name: &str, kind: TemplateKind, plugin_api: &Path) -> Result<Vec<(PathBuf, String)>> {
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid {
        bail!("new-plugin {name}: a plugin name is lowercase letters, digits and `_`, starting with a letter (e.g. mobilenetv2, one_cycle)");
    }
    let fill = |t: &str| {
        t.replace("__NAME__", name)
            .replace("__TYPE__", &camel(name))
            .replace("__KIND__", kind.as_str())
            .replace("__PLUGIN_API__", &plugin_api.display().to_string())
            .replace("__TCH__", crate::envinfo::TCH_VERSION)
            .replace("__ABI_STABLE__", crate::envinfo::ABI_STABLE_VERSION)
    };
    Ok(vec![
        (PathBuf::from("Cargo.toml"), fill(CARGO_TOML)),
        (PathBuf::from(".gitignore"), fill(GITIGNORE)),
        (PathBuf::from("src/lib.rs"), fill(kind.lib_rs())),
        (PathBuf::from("src/ffi.rs"), fill(FFI)),
    ])
}

pub fn run(a: &NewPluginArgs) -> Result<()> {
    let plugin_api = match &a.plugin_api {
        Some(p) => p
            .canonicalize()
            .with_context(|| format!("--plugin-api {}: no such folder", p.display()))?,
        None => crate::envinfo::plugin_api_source().context(
            "this imgclf was not built from a checkout that is still there: pass --plugin-api DIR with the plugin-api folder of an imgclf checkout",
        )?,
    };
    if !plugin_api.join("Cargo.toml").is_file() {
        bail!("--plugin-api {}: no Cargo.toml there", plugin_api.display());
    }
    let dir = a.dir.clone().unwrap_or_else(|| PathBuf::from(&a.name));
    if dir.exists()
        && std::fs::read_dir(&dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!(
            "new-plugin: {} exists and is not empty; choose another --dir",
            dir.display()
        );
    }
    let files = render(&a.name, a.kind, &plugin_api)?;
    for (rel, text) in &files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    // The host's lockfile: the same versions of every dependency, so a shared target dir reuses
    // them (cargo drops the entries the plugin does not need).
    if let Some(lock) = plugin_api
        .parent()
        .map(|w| w.join("Cargo.lock"))
        .filter(|l| l.is_file())
    {
        std::fs::copy(&lock, dir.join("Cargo.lock"))
            .with_context(|| format!("cannot copy {}", lock.display()))?;
    }
    let b = crate::envinfo::plugin_build();
    let s = |k: &str| b[k].as_str().unwrap_or("").to_string();
    println!(
        "created the {} plugin `{}` in {}",
        a.kind.as_str(),
        a.name,
        dir.display()
    );
    println!("next (docs/plugin-guide.md):");
    println!("  cd {}", dir.display());
    if !s("LIBTORCH").is_empty() {
        println!("  export LIBTORCH={}", s("LIBTORCH"));
        println!(
            "  export LD_LIBRARY_PATH={}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}",
            s("LD_LIBRARY_PATH")
        );
    }
    if !s("CARGO_TARGET_DIR").is_empty() {
        println!(
            "  export CARGO_TARGET_DIR={}   # reuse imgclf's compiled torch-sys",
            s("CARGO_TARGET_DIR")
        );
    }
    println!("  cargo test && cargo build");
    let target = if s("CARGO_TARGET_DIR").is_empty() {
        "target".to_string()
    } else {
        "$CARGO_TARGET_DIR".to_string()
    };
    println!(
        "  imgclf plugins check {target}/debug/libimgclf_plugin_{}.so",
        a.name
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_fills_every_placeholder() {
        for kind in [
            TemplateKind::Model,
            TemplateKind::Augmentation,
            TemplateKind::Optimizer,
            TemplateKind::Scheduler,
        ] {
            let files = render("one_cycle", kind, Path::new("/x/plugin-api")).unwrap();
            for (path, text) in &files {
                assert!(
                    !text.contains("__"),
                    "{kind:?} {}: {}",
                    path.display(),
                    text.lines().find(|l| l.contains("__")).unwrap_or("")
                );
            }
            let lib = &files.iter().find(|(p, _)| p.ends_with("lib.rs")).unwrap().1;
            assert!(lib.contains("OneCycleFactory"), "{kind:?}");
            assert!(lib.starts_with("//! "), "{kind:?}");
        }
        assert!(render("One", TemplateKind::Model, Path::new("/x")).is_err());
        assert!(render("a-b", TemplateKind::Model, Path::new("/x")).is_err());
    }

    /// Every `[profile.*]` table of the workspace, with its key lines, comments dropped.
    fn profiles(manifest: &str) -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = Vec::new();
        let mut current: Option<usize> = None;
        for line in manifest.lines().map(str::trim) {
            if line.starts_with('[') {
                current = line.starts_with("[profile.").then(|| {
                    out.push((line.to_string(), Vec::new()));
                    out.len() - 1
                });
            } else if let Some(i) = current {
                if !line.is_empty() && !line.starts_with('#') {
                    out[i].1.push(line.to_string());
                }
            }
        }
        out
    }

    /// Templates build with imgclf's target dir: their profiles must be the workspace's, or
    /// cargo builds torch-sys and every dependency a second time (and twice the disk).
    #[test]
    fn template_profiles_are_the_workspaces() {
        let workspace = include_str!("../../Cargo.toml");
        let ours = profiles(workspace);
        assert!(ours.len() >= 3, "{ours:?}");
        assert_eq!(profiles(CARGO_TOML), ours);
    }
}
