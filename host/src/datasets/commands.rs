//! `imgclf datasets list` and `imgclf datasets download NAME`: where each dataset is read from,
//! whether it is there and matches the known checksums, and fetching it on request.

use super::download::{self, Options, Status, Verification};
use super::sources::Overrides;
use super::{find, names, registry, DatasetInfo};
use anyhow::{Context, Result};
use serde_json::json;
use std::path::{Path, PathBuf};

/// The folder a dataset is read from: `root` when given (as `dataset.dataset_dir`), else the
/// reference's default for the dataset.
fn folder(info: &DatasetInfo, root: Option<&Path>) -> PathBuf {
    super::expand_home(&root.map_or_else(|| PathBuf::from(info.default_dir()), Path::to_path_buf))
}

fn verification_text(v: &Verification) -> (&'static str, String) {
    match v {
        Verification::Verified { files } => ("verified", format!("{files} files match their MD5s")),
        Verification::Mismatch(list) => (
            "mismatch",
            list.iter()
                .map(|(p, got, want)| format!("{} has MD5 {got}, expected {want}", p.display()))
                .collect::<Vec<_>>()
                .join("; "),
        ),
        Verification::Unverified(why) => ("unverified", why.clone()),
        Verification::Missing => ("missing", String::new()),
    }
}

fn files_json(r: &Result<Vec<PathBuf>, String>) -> serde_json::Value {
    match r {
        Ok(files) => json!(files),
        Err(_) => serde_json::Value::Null,
    }
}

/// Prints every dataset's folder and state; with `root`, every dataset is looked up there.
pub fn list(root: Option<&Path>, as_json: bool, overrides: &Overrides) -> Result<()> {
    let mut rows = Vec::new();
    for info in registry() {
        let dir = folder(info, root);
        if dir.as_os_str().is_empty() {
            // A generic dataset without a default folder (ImageFolder): nothing to look at.
            continue;
        }
        let source = overrides.source(info.name)?;
        let st: Status = download::status(info, &dir, source.as_ref())?;
        rows.push((info, st, source));
    }
    if as_json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|(info, st, source)| {
                let (state, detail) = verification_text(&st.verification);
                let missing: Vec<&String> = [&st.train, &st.test]
                    .into_iter()
                    .filter_map(|r| r.as_ref().err())
                    .collect();
                json!({
                    "name": info.name,
                    "dir": st.dir,
                    "present": st.train.is_ok() && st.test.is_ok(),
                    "state": state,
                    "detail": detail,
                    "train": files_json(&st.train),
                    "test": files_json(&st.test),
                    "missing": missing,
                    "downloadable": source.is_some(),
                    "mirrors": source.as_ref().map(|s| s.mirrors.clone()),
                    "files": source.as_ref().map(|s| s.files.iter().map(|f| json!({"name": f.name, "md5": f.md5})).collect::<Vec<_>>()),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "datasets": v })).unwrap_or_default()
        );
        return Ok(());
    }
    println!("{:<13} {:<11} folder", "dataset", "state");
    for (info, st, source) in &rows {
        let (state, detail) = verification_text(&st.verification);
        println!("{:<13} {:<11} {}", info.name, state, st.dir.display());
        match &st.verification {
            Verification::Missing => {
                if let Some(s) = source {
                    println!(
                        "  download: imgclf datasets download {}{} (from {})",
                        info.name,
                        root.map(|r| format!(" --root {}", r.display()))
                            .unwrap_or_default(),
                        s.mirrors.join(" or ")
                    );
                }
            }
            _ if !detail.is_empty() => println!("  {detail}"),
            _ => {}
        }
    }
    Ok(())
}

/// Downloads one dataset into `root` (default: the reference's folder for it).
pub fn download_one(name: &str, root: Option<&Path>, overrides: &Overrides) -> Result<PathBuf> {
    let info = find(name).with_context(|| {
        let close: Vec<&str> = names()
            .into_iter()
            .filter(|n| n.eq_ignore_ascii_case(name) || strsim::jaro_winkler(n, name) > 0.85)
            .collect();
        format!(
            "no dataset named `{name}`{}; datasets: {}",
            if close.is_empty() {
                String::new()
            } else {
                format!(" (did you mean {}?)", close.join(", "))
            },
            names().join(", ")
        )
    })?;
    let dir = folder(info, root);
    let source = overrides.source(info.name)?.with_context(|| {
        format!(
            "{} has no download source; put its files into {}",
            info.name,
            dir.display()
        )
    })?;
    if download::present(info, &dir) {
        let st = download::status(info, &dir, Some(&source))?;
        let (state, detail) = verification_text(&st.verification);
        println!(
            "{} is already in {} ({state}{})",
            info.name,
            dir.display(),
            if detail.is_empty() {
                String::new()
            } else {
                format!(": {detail}")
            }
        );
        return Ok(dir);
    }
    download::download(info, &dir, &source, &Options::from_env()?)?;
    println!(
        "{} downloaded and verified into {}",
        info.name,
        dir.display()
    );
    Ok(dir)
}

/// `imgclf datasets ...`.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum DatasetsCmd {
    /// Every dataset: the folder it is read from, present or missing, verified or not.
    List {
        /// Look every dataset up in DIR (as dataset.dataset_dir) instead of the reference's
        /// default folders.
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        sources: SourceArgs,
    },
    /// Download, verify and extract one dataset (CIFAR10, CIFAR100, MNIST, FashionMNIST, KMNIST).
    Download {
        name: String,
        /// Dataset directory (as dataset.dataset_dir; default: the reference's folder).
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
        #[command(flatten)]
        sources: SourceArgs,
    },
    /// Image folders: `stats DIR` (mean/std of a folder).
    #[command(flatten)]
    Folder(super::folder_cmd::FolderCmd),
}

/// Mirror and file-list overrides on the command line (they win over the environment).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SourceArgs {
    /// Base URL to download from instead of torchvision's mirrors (repeatable, tried in order;
    /// also IMGCLF_DATASET_MIRROR).
    #[arg(long, value_name = "URL")]
    mirror: Vec<String>,
    /// JSON file of mirrors and files with MD5s per dataset (also IMGCLF_DATASET_SOURCES).
    #[arg(long, value_name = "FILE.json")]
    sources: Option<PathBuf>,
}

impl SourceArgs {
    fn overrides(&self) -> Overrides {
        let mut o = Overrides::from_env();
        if !self.mirror.is_empty() {
            o.mirrors = self.mirror.clone();
        }
        if let Some(s) = &self.sources {
            o.sources = Some(s.clone());
        }
        o
    }
}

/// Runs `imgclf datasets list|download`.
pub fn run(cmd: &DatasetsCmd) -> Result<()> {
    match cmd {
        DatasetsCmd::List {
            root,
            json,
            sources,
        } => list(root.as_deref(), *json, &sources.overrides()),
        DatasetsCmd::Download {
            name,
            root,
            sources,
        } => download_one(name, root.as_deref(), &sources.overrides()).map(|_| ()),
        DatasetsCmd::Folder(cmd) => super::folder_cmd::run(cmd),
    }
}
