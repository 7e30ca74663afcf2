//! Error type for locating and reading dataset files; every message names the file involved.

use std::path::PathBuf;

/// One place a loader looked for a dataset, with the files it did not find there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchedLocation {
    /// Layout name, e.g. "CIFAR-10 binary" or "torchvision raw".
    pub layout: &'static str,
    pub dir: PathBuf,
    pub missing: Vec<String>,
}

fn format_searched(searched: &[SearchedLocation]) -> String {
    let mut s = String::new();
    for loc in searched {
        s.push_str(&format!(
            "\n  - {} layout in {}: missing {}",
            loc.layout,
            loc.dir.display(),
            loc.missing.join(", ")
        ));
    }
    s
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error(
        "{dataset} {split} files not found; looked in:{}\n\
         point dataset.dataset_dir at the folder holding {hint}",
        format_searched(.searched)
    )]
    NotFound {
        dataset: &'static str,
        split: &'static str,
        searched: Vec<SearchedLocation>,
        hint: String,
    },

    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{}: length {len} bytes is not a non-zero multiple of the {record}-byte record size of {what}; \
         the file is truncated or in another format, re-download and extract it",
        path.display()
    )]
    BadRecordLength {
        path: PathBuf,
        len: u64,
        record: usize,
        what: &'static str,
    },

    #[error(
        "{}: expected {expected} bytes ({what}) but its content is {actual} bytes; \
         the file is truncated or damaged, re-download it",
        path.display()
    )]
    BadLength {
        path: PathBuf,
        /// u128: an IDX header's three u32 dimensions multiply past u64.
        expected: u128,
        actual: u64,
        what: String,
    },

    #[error(
        "{}: bad magic number {found:#010x}, expected {expected:#010x} ({what}); \
         is this the right file?",
        path.display()
    )]
    BadMagic {
        path: PathBuf,
        expected: u32,
        found: u32,
        what: &'static str,
    },

    #[error(
        "{}: label {label} of image {index} is out of range, expected 0..{n_classes}",
        path.display()
    )]
    LabelOutOfRange {
        path: PathBuf,
        index: usize,
        label: i64,
        n_classes: usize,
    },

    #[error(
        "{} holds {n_images} images but {} holds {n_labels} labels; they must agree",
        images.display(),
        labels.display()
    )]
    CountMismatch {
        images: PathBuf,
        n_images: u64,
        labels: PathBuf,
        n_labels: u64,
    },

    #[error(
        "{}: unsupported pickle opcode {opcode:#04x} at byte offset {offset}; \
         expected a CIFAR python batch written by pickle protocol 2-5",
        path.display()
    )]
    UnknownOpcode {
        path: PathBuf,
        opcode: u8,
        offset: usize,
    },

    #[error("{}: malformed pickle at byte offset {offset}: {msg}", path.display())]
    Pickle {
        path: PathBuf,
        offset: usize,
        msg: String,
    },

    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },

    /// A per-image stage (a plugin's `Stage::Image` augmentation) failed on a training image.
    #[error("training image {index}: {msg}")]
    ImageStage { index: usize, msg: String },
}

impl From<crate::pickle::PickleError> for DatasetError {
    fn from(e: crate::pickle::PickleError) -> Self {
        use crate::pickle::PickleError as P;
        match e {
            P::UnknownOpcode {
                path,
                opcode,
                offset,
            } => DatasetError::UnknownOpcode {
                path,
                opcode,
                offset,
            },
            P::Malformed { path, offset, msg } => DatasetError::Pickle { path, offset, msg },
        }
    }
}
