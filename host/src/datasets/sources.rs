//! Where CIFAR and the MNIST family are downloaded from: torchvision's mirrors, file names and
//! MD5s, and the overrides (`IMGCLF_DATASET_MIRROR`, `IMGCLF_DATASET_SOURCES`) that point at
//! another mirror or supply another file list.
//!
//! The layouts are torchvision's, so a folder filled by imgclf serves torchvision and the
//! reference unchanged: CIFAR's archive is kept in the dataset directory and extracted there
//! (`cifar-10-batches-py/`, `cifar-100-python/`); the MNIST family's four `.gz` files go to
//! `<dir>/<Name>/raw/`, each gunzipped beside itself.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Comma- or space-separated base URLs tried, in order, instead of torchvision's mirrors.
pub const MIRROR_ENV: &str = "IMGCLF_DATASET_MIRROR";
/// A JSON file with the mirrors and files (with MD5s) of some datasets; see [`Overrides`].
pub const SOURCES_ENV: &str = "IMGCLF_DATASET_SOURCES";

/// How the downloaded files become the dataset's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// One `.tar.gz` that holds `folder/`; extracted into the dataset directory.
    TarGz { folder: String },
    /// `.gz` files in `<dir>/<subdir>/`, each gunzipped beside itself (name without `.gz`).
    Gzipped { subdir: String },
}

/// A file to download and the MD5 it must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    pub name: String,
    pub md5: String,
}

/// Everything needed to download one dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub dataset: String,
    /// Base URLs, each ending with `/`; a file's URL is the base followed by its name.
    pub mirrors: Vec<String>,
    pub files: Vec<RemoteFile>,
    pub layout: Layout,
    /// MD5s of extracted files (torchvision checks CIFAR's batches); empty when unknown.
    pub contents: Vec<RemoteFile>,
    /// Where the mirrors and files came from, for messages ("torchvision", a file, a variable).
    pub origin: String,
}

impl Source {
    /// The URLs of `file`, one per mirror, in order.
    pub fn urls(&self, file: &RemoteFile) -> Vec<String> {
        self.mirrors
            .iter()
            .map(|m| format!("{m}{}", file.name))
            .collect()
    }

    /// The folder the downloaded files are put in.
    pub fn download_dir(&self, root: &Path) -> PathBuf {
        match &self.layout {
            Layout::TarGz { .. } => root.to_path_buf(),
            Layout::Gzipped { subdir } => root.join(subdir),
        }
    }
}

fn file(name: &str, md5: &str) -> RemoteFile {
    RemoteFile {
        name: name.into(),
        md5: md5.into(),
    }
}

fn cifar(
    dataset: &str,
    archive: &str,
    md5: &str,
    folder: &str,
    contents: &[(&str, &str)],
) -> Source {
    Source {
        dataset: dataset.into(),
        mirrors: vec!["https://www.cs.toronto.edu/~kriz/".into()],
        files: vec![file(archive, md5)],
        layout: Layout::TarGz {
            folder: folder.into(),
        },
        contents: contents.iter().map(|(n, m)| file(n, m)).collect(),
        origin: "torchvision".into(),
    }
}

fn idx(dataset: &str, mirrors: &[&str], md5s: [&str; 4]) -> Source {
    let names = [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ];
    Source {
        dataset: dataset.into(),
        mirrors: mirrors.iter().map(|m| m.to_string()).collect(),
        files: names.iter().zip(md5s).map(|(n, m)| file(n, m)).collect(),
        layout: Layout::Gzipped {
            subdir: format!("{dataset}/raw"),
        },
        contents: Vec::new(),
        origin: "torchvision".into(),
    }
}

/// torchvision's sources (`torchvision/datasets/cifar.py`, `mnist.py`) for a dataset name of the
/// registry; `None` for datasets that are not downloaded.
pub fn torchvision(dataset: &str) -> Option<Source> {
    Some(match dataset {
        "CIFAR10" => cifar(
            "CIFAR10",
            "cifar-10-python.tar.gz",
            "c58f30108f718f92721af3b95e74349a",
            "cifar-10-batches-py",
            &[
                ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
                ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
                ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
                ("data_batch_4", "634d18415352ddfa80567beed471001a"),
                ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
                ("test_batch", "40351d587109b95175f43aff81a1287e"),
                ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
            ],
        ),
        "CIFAR100" => cifar(
            "CIFAR100",
            "cifar-100-python.tar.gz",
            "eb9058c3a382ffc7106e4002c42a8d85",
            "cifar-100-python",
            &[
                ("train", "16019d7e3df5f24257cddd939b257f8d"),
                ("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),
                ("meta", "7973b15100ade9c7d40fb424638fde48"),
            ],
        ),
        // The first mirror no longer serves the files; torchvision falls back to the second.
        "MNIST" => idx(
            "MNIST",
            &[
                "http://yann.lecun.com/exdb/mnist/",
                "https://ossci-datasets.s3.amazonaws.com/mnist/",
            ],
            [
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "d53e105ee54ea40749a09fcbcd1e9432",
                "9fb629c4189551a2d022fa330f9573f3",
                "ec29112dd5afa0611ce80d1b7f02629c",
            ],
        ),
        "FashionMNIST" => idx(
            "FashionMNIST",
            &["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
            [
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "25c81989df183df01b3e8a0aad5dffbe",
                "bef4ecab320f06d8554ea6380940ec79",
                "bb300cfdad3c16e7a12a480ee83cd310",
            ],
        ),
        "KMNIST" => idx(
            "KMNIST",
            &["http://codh.rois.ac.jp/kmnist/dataset/kmnist/"],
            [
                "bdb82020997e1d708af4cf47b453dcf7",
                "e144d726b3acfaa3e44228e80efcd344",
                "5c965bf0a639b31b8f53240b1b52f4d7",
                "7320c461ea6c1c855c0b718fb2a4b134",
            ],
        ),
        _ => return None,
    })
}

/// User-supplied replacements for torchvision's sources.
///
/// * `mirrors`: base URLs tried in order for every dataset (`IMGCLF_DATASET_MIRROR`, or
///   `--mirror` of `imgclf datasets download`); a trailing `/` is added when missing.
/// * `sources`: a JSON file (`IMGCLF_DATASET_SOURCES`, or `--sources`) mapping dataset names to
///   `{"mirrors": [URL, ...], "files": {NAME: MD5, ...}, "contents": {NAME: MD5, ...}}`; every
///   field is optional and replaces torchvision's (`contents`, the MD5s of extracted files, is
///   dropped when `files` is given without it, since torchvision's would not match).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub mirrors: Vec<String>,
    pub sources: Option<PathBuf>,
}

impl Overrides {
    /// The overrides set in the environment.
    pub fn from_env() -> Self {
        let mirrors = std::env::var(MIRROR_ENV)
            .map(|v| split_list(&v))
            .unwrap_or_default();
        let sources = std::env::var_os(SOURCES_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        Overrides { mirrors, sources }
    }

    /// The source of `dataset` after the overrides; `None` when it cannot be downloaded.
    pub fn source(&self, dataset: &str) -> Result<Option<Source>> {
        let mut source = torchvision(dataset);
        if let Some(path) = &self.sources {
            let table = read_sources_file(path)?;
            if let Some(entry) = table.get(dataset) {
                source = Some(apply_entry(source, dataset, entry, path)?);
            }
        }
        let Some(mut source) = source else {
            return Ok(None);
        };
        if !self.mirrors.is_empty() {
            source.mirrors = self.mirrors.iter().map(|m| with_slash(m)).collect();
            source.origin = format!("{} with mirrors from {MIRROR_ENV}", source.origin);
        }
        Ok(Some(source))
    }
}

fn split_list(v: &str) -> Vec<String> {
    v.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

fn with_slash(m: &str) -> String {
    if m.ends_with('/') {
        m.to_string()
    } else {
        format!("{m}/")
    }
}

fn read_sources_file(path: &Path) -> Result<BTreeMap<String, serde_json::Value>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{SOURCES_ENV}: cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{SOURCES_ENV}: {} is not a JSON object of dataset names",
            path.display()
        )
    })
}

fn md5_table(v: &serde_json::Value, what: &str, path: &Path) -> Result<Vec<RemoteFile>> {
    let Some(map) = v.as_object() else {
        bail!(
            "{}: `{what}` must be an object of file name to MD5",
            path.display()
        );
    };
    map.iter()
        .map(|(name, md5)| {
            let md5 = md5.as_str().filter(|m| is_md5(m)).with_context(|| {
                format!(
                    "{}: `{what}.{name}` must be an MD5 (32 hex digits), got {md5}",
                    path.display()
                )
            })?;
            if name.contains('/') || name.contains('\\') || name.starts_with('.') {
                bail!(
                    "{}: `{what}.{name}` is not a plain file name",
                    path.display()
                );
            }
            Ok(file(name, &md5.to_ascii_lowercase()))
        })
        .collect()
}

fn is_md5(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn apply_entry(
    base: Option<Source>,
    dataset: &str,
    entry: &serde_json::Value,
    path: &Path,
) -> Result<Source> {
    let Some(base) = base else {
        bail!(
            "{}: `{dataset}` cannot be downloaded (only CIFAR10, CIFAR100, MNIST, FashionMNIST and KMNIST can)",
            path.display()
        );
    };
    let Some(obj) = entry.as_object() else {
        bail!(
            "{}: `{dataset}` must be an object with mirrors, files and contents",
            path.display()
        );
    };
    for key in obj.keys() {
        if !["mirrors", "files", "contents"].contains(&key.as_str()) {
            bail!(
                "{}: `{dataset}.{key}` is not a known field (mirrors, files, contents)",
                path.display()
            );
        }
    }
    let mut source = base;
    if let Some(m) = obj.get("mirrors") {
        let list = m
            .as_array()
            .and_then(|a| a.iter().map(|v| v.as_str()).collect::<Option<Vec<_>>>())
            .with_context(|| {
                format!(
                    "{}: `{dataset}.mirrors` must be a list of URLs",
                    path.display()
                )
            })?;
        source.mirrors = list.into_iter().map(with_slash).collect();
    }
    if let Some(f) = obj.get("files") {
        let files = md5_table(f, &format!("{dataset}.files"), path)?;
        if files.is_empty() {
            bail!("{}: `{dataset}.files` is empty", path.display());
        }
        source.files = files;
        source.contents.clear();
    }
    if let Some(c) = obj.get("contents") {
        source.contents = md5_table(c, &format!("{dataset}.contents"), path)?;
    }
    source.origin = path.display().to_string();
    Ok(source)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datasets::testutil::TempDir;

    #[test]
    fn every_registered_dataset_has_torchvision_sources() {
        for name in ["CIFAR10", "CIFAR100", "MNIST", "FashionMNIST", "KMNIST"] {
            let d = crate::datasets::find(name).unwrap();
            let s = torchvision(d.name).unwrap();
            assert!(!s.mirrors.is_empty() && !s.files.is_empty(), "{}", d.name);
            for f in s.files.iter().chain(&s.contents) {
                assert!(is_md5(&f.md5), "{}: {}", d.name, f.name);
            }
            for m in &s.mirrors {
                assert!(m.ends_with('/'), "{m}");
            }
        }
        let c10 = torchvision("CIFAR10").unwrap();
        assert_eq!(
            c10.urls(&c10.files[0]),
            ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
        );
        assert_eq!(c10.files[0].md5, "c58f30108f718f92721af3b95e74349a");
        let f = torchvision("FashionMNIST").unwrap();
        assert_eq!(
            f.download_dir(Path::new("/d")),
            PathBuf::from("/d/FashionMNIST/raw")
        );
        assert_eq!(torchvision("MNIST").unwrap().mirrors.len(), 2);
        assert!(torchvision("ImageNet").is_none());
    }

    #[test]
    fn overrides_replace_mirrors_files_and_contents() {
        let dir = TempDir::new("sources");
        let path = dir.write(
            "sources.json",
            br#"{"CIFAR10": {"mirrors": ["http://127.0.0.1:9/a"],
                 "files": {"cifar-10-python.tar.gz": "00112233445566778899AABBCCDDEEFF"}},
                "KMNIST": {"contents": {"x": "00112233445566778899aabbccddeeff"}}}"#,
        );
        let o = Overrides {
            mirrors: vec![],
            sources: Some(path.clone()),
        };
        let c = o.source("CIFAR10").unwrap().unwrap();
        assert_eq!(c.mirrors, ["http://127.0.0.1:9/a/"]);
        assert_eq!(c.files[0].md5, "00112233445566778899aabbccddeeff");
        assert!(c.contents.is_empty(), "torchvision's batch MD5s dropped");
        assert_eq!(c.origin, path.display().to_string());
        let k = o.source("KMNIST").unwrap().unwrap();
        assert_eq!(k.files.len(), 4);
        assert_eq!(k.contents.len(), 1);
        assert_eq!(o.source("MNIST").unwrap(), torchvision("MNIST"));

        let o = Overrides {
            mirrors: split_list("http://a/x, http://b/y/"),
            sources: None,
        };
        let m = o.source("MNIST").unwrap().unwrap();
        assert_eq!(m.mirrors, ["http://a/x/", "http://b/y/"]);

        let bad = dir.write("bad.json", br#"{"CIFAR10": {"files": {"a": "xyz"}}}"#);
        let e = Overrides {
            mirrors: vec![],
            sources: Some(bad),
        }
        .source("CIFAR10")
        .unwrap_err();
        assert!(format!("{e:#}").contains("must be an MD5"), "{e:#}");
        let bad = dir.write("bad2.json", br#"{"CIFAR10": {"mirror": []}}"#);
        let e = Overrides {
            mirrors: vec![],
            sources: Some(bad),
        }
        .source("CIFAR10")
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("`CIFAR10.mirror` is not a known field"),
            "{e:#}"
        );
    }
}
