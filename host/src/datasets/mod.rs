//! Dataset registry and loaders for the image datasets the trainer supports (CIFAR, MNIST family).
//!
//! Every supported dataset is one entry of a static registry ([`registry`]); an entry carries the
//! dataset's shape, its normalisation statistics, the directory the reference uses by default and
//! the functions that find and read its files. Loading is pure Rust and produces uint8 NCHW images
//! plus i64 labels ([`ImageSet`]); conversion to tensors happens elsewhere.
//!
//! Formats read:
//! * CIFAR-10 / CIFAR-100 binary releases (`cifar-10-batches-bin/`, `cifar-100-binary/`);
//! * CIFAR-10 / CIFAR-100 python releases as used by torchvision (`cifar-10-batches-py/`,
//!   `cifar-100-python/`), decoded by a restricted pickle reader that never executes anything;
//! * IDX files (plain or `.gz`) for MNIST, FashionMNIST and KMNIST, either flat in the directory
//!   or in torchvision's `<dir>/<Name>/raw/` layout.
//!
//! * image folders (`ImageNet`, `ImageFolder`): `dataset_dir/{train,val}/<class>/<image>` listed
//!   as torchvision's `ImageFolder` ([`folder`]), decoded and transformed image by image in the
//!   loader's worker threads ([`loader`], [`transform`]), never held whole.
//!
//! See [`cifar`] and [`idx`] for the exact search order when several layouts are present.

mod cifar;
pub mod classes;
pub mod commands;
pub mod download;
mod error;
pub mod folder;
pub mod folder_cmd;
mod idx;
pub mod loader;
mod ndarray;
pub mod open;
pub mod sources;
pub mod transform;

#[cfg(test)]
mod testutil;

use std::fmt;
use std::path::{Path, PathBuf};

pub use error::{DatasetError, SearchedLocation};

/// Which part of a dataset to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    /// Lower-case name used in messages ("train" / "test").
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Images as uint8 NCHW (N x C x H x W, row-major), labels as i64.
#[derive(Clone, PartialEq, Eq)]
pub struct ImageSet {
    pub images: Vec<u8>,
    pub labels: Vec<i64>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl ImageSet {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when the set holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes of one image per image (C * H * W).
    pub fn image_bytes(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The C*H*W bytes of image `i` (channel planes, each row-major). Panics when out of range.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_bytes();
        &self.images[i * n..(i + 1) * n]
    }
}

impl fmt::Debug for ImageSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageSet")
            .field("len", &self.len())
            .field("channels", &self.channels)
            .field("height", &self.height)
            .field("width", &self.width)
            .finish_non_exhaustive()
    }
}

type LocateFn = fn(&DatasetInfo, &Path, Split) -> Result<Vec<PathBuf>, DatasetError>;
type LoadFn = fn(&DatasetInfo, &Path, Split) -> Result<ImageSet, DatasetError>;

/// Static description of one supported dataset.
#[derive(Debug)]
pub struct DatasetInfo {
    /// Name as written in `dataset.name` of a config (e.g. "CIFAR10").
    pub name: &'static str,
    pub n_classes: usize,
    pub n_channels: usize,
    /// Side of the (square) images.
    pub image_size: usize,
    /// Per-channel mean of pixel values scaled to [0, 1].
    pub mean: &'static [f64],
    /// Per-channel standard deviation of pixel values scaled to [0, 1].
    pub std: &'static [f64],
    default_dir: &'static str,
    /// Read image by image from `dataset_dir/{train,val}/<class>/` ([`folder`], [`open`])
    /// instead of whole into memory.
    pub image_folder: bool,
    locate_fn: LocateFn,
    load_fn: LoadFn,
}

static REGISTRY: [DatasetInfo; 7] = [
    DatasetInfo {
        name: "CIFAR10",
        n_classes: 10,
        n_channels: 3,
        image_size: 32,
        mean: &[0.4914, 0.4822, 0.4465],
        std: &[0.2470, 0.2435, 0.2616],
        default_dir: "~/.torch/datasets/CIFAR10",
        image_folder: false,
        locate_fn: cifar::locate_cifar10,
        load_fn: cifar::load_cifar10,
    },
    DatasetInfo {
        name: "CIFAR100",
        n_classes: 100,
        n_channels: 3,
        image_size: 32,
        mean: &[0.5071, 0.4865, 0.4409],
        std: &[0.2673, 0.2564, 0.2762],
        default_dir: "~/.torch/datasets/CIFAR100",
        image_folder: false,
        locate_fn: cifar::locate_cifar100,
        load_fn: cifar::load_cifar100,
    },
    DatasetInfo {
        name: "MNIST",
        n_classes: 10,
        n_channels: 1,
        image_size: 28,
        mean: &[0.1307],
        std: &[0.3081],
        default_dir: "~/.torch/datasets",
        image_folder: false,
        locate_fn: idx::locate,
        load_fn: idx::load,
    },
    DatasetInfo {
        name: "FashionMNIST",
        n_classes: 10,
        n_channels: 1,
        image_size: 28,
        mean: &[0.2860],
        std: &[0.3530],
        default_dir: "~/.torch/datasets",
        image_folder: false,
        locate_fn: idx::locate,
        load_fn: idx::load,
    },
    DatasetInfo {
        name: "KMNIST",
        n_classes: 10,
        n_channels: 1,
        image_size: 28,
        mean: &[0.1904],
        std: &[0.3475],
        default_dir: "~/.torch/datasets",
        image_folder: false,
        locate_fn: idx::locate,
        load_fn: idx::load,
    },
    DatasetInfo {
        name: "ImageNet",
        n_classes: 1000,
        n_channels: 3,
        image_size: 224,
        mean: &[0.485, 0.456, 0.406],
        std: &[0.229, 0.224, 0.225],
        default_dir: "~/datasets/ImageNet",
        image_folder: true,
        locate_fn: open::locate_folder,
        load_fn: open::load_folder,
    },
    // Any class-per-folder collection: n_classes 0 = counted from train/ when not set.
    DatasetInfo {
        name: "ImageFolder",
        n_classes: 0,
        n_channels: 3,
        image_size: 224,
        mean: &[0.485, 0.456, 0.406],
        std: &[0.229, 0.224, 0.225],
        default_dir: "",
        image_folder: true,
        locate_fn: open::locate_folder,
        load_fn: open::load_folder,
    },
];

/// All supported datasets.
pub fn registry() -> &'static [DatasetInfo] {
    &REGISTRY
}

/// The registry entry whose name is exactly `name` (case-sensitive, as in the reference configs).
pub fn find(name: &str) -> Option<&'static DatasetInfo> {
    REGISTRY.iter().find(|d| d.name == name)
}

/// Names of all supported datasets, for error messages.
pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|d| d.name).collect()
}

impl DatasetInfo {
    /// Default directory when dataset.dataset_dir is empty, as the reference:
    /// "~/.torch/datasets/CIFAR10" for CIFAR10/CIFAR100 (with its own name), "~/.torch/datasets"
    /// for MNIST/FashionMNIST/KMNIST. Returned unexpanded; [`locate`](Self::locate) and
    /// [`load`](Self::load) expand a leading `~/`.
    pub fn default_dir(&self) -> String {
        self.default_dir.to_string()
    }

    /// Cheap check (no full read): which files would be read for this split; the error names what
    /// is missing and where it looked.
    pub fn locate(&self, dir: &Path, split: Split) -> Result<Vec<PathBuf>, DatasetError> {
        (self.locate_fn)(self, &expand_home(dir), split)
    }

    /// Reads and validates the whole split.
    pub fn load(&self, dir: &Path, split: Split) -> Result<ImageSet, DatasetError> {
        (self.load_fn)(self, &expand_home(dir), split)
    }
}

/// Replaces a leading `~` / `~/` with `$HOME` (left unchanged when HOME is not set).
pub fn expand_home(dir: &Path) -> PathBuf {
    let Some(s) = dir.to_str() else {
        return dir.to_path_buf();
    };
    let rest = if s == "~" {
        ""
    } else if let Some(rest) = s.strip_prefix("~/") {
        rest
    } else {
        return dir.to_path_buf();
    };
    match std::env::var_os("HOME") {
        Some(home) if !home.is_empty() => PathBuf::from(home).join(rest),
        _ => dir.to_path_buf(),
    }
}

/// Reads a whole file, mapping the error to one that names the file.
fn read_file(path: &Path) -> Result<Vec<u8>, DatasetError> {
    std::fs::read(path).map_err(|source| DatasetError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Checks that every label lies in `0..n_classes`.
fn check_labels(path: &Path, labels: &[i64], n_classes: usize) -> Result<(), DatasetError> {
    match labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l < 0 || l as u64 >= n_classes as u64)
    {
        Some((index, &label)) => Err(DatasetError::LabelOutOfRange {
            path: path.to_path_buf(),
            index,
            label,
            n_classes,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_has_reference_stats() {
        let names: Vec<_> = registry().iter().map(|d| d.name).collect();
        assert_eq!(
            names,
            [
                "CIFAR10",
                "CIFAR100",
                "MNIST",
                "FashionMNIST",
                "KMNIST",
                "ImageNet",
                "ImageFolder"
            ]
        );
        let c10 = find("CIFAR10").unwrap();
        assert_eq!((c10.n_classes, c10.n_channels, c10.image_size), (10, 3, 32));
        assert_eq!(c10.mean, &[0.4914, 0.4822, 0.4465]);
        assert_eq!(c10.std, &[0.2470, 0.2435, 0.2616]);
        let c100 = find("CIFAR100").unwrap();
        assert_eq!(c100.n_classes, 100);
        assert_eq!(c100.mean, &[0.5071, 0.4865, 0.4409]);
        assert_eq!(c100.std, &[0.2673, 0.2564, 0.2762]);
        let m = find("MNIST").unwrap();
        assert_eq!((m.n_classes, m.n_channels, m.image_size), (10, 1, 28));
        assert_eq!((m.mean, m.std), (&[0.1307][..], &[0.3081][..]));
        let f = find("FashionMNIST").unwrap();
        assert_eq!((f.mean, f.std), (&[0.2860][..], &[0.3530][..]));
        let k = find("KMNIST").unwrap();
        assert_eq!((k.mean, k.std), (&[0.1904][..], &[0.3475][..]));
        for d in registry() {
            assert_eq!(d.mean.len(), d.n_channels);
            assert_eq!(d.std.len(), d.n_channels);
        }
        assert!(find("cifar10").is_none());
        let inet = find("ImageNet").unwrap();
        assert_eq!((inet.n_classes, inet.image_size), (1000, 224));
        assert_eq!(inet.mean, &[0.485, 0.456, 0.406]);
        assert_eq!(inet.std, &[0.229, 0.224, 0.225]);
        assert!(inet.image_folder && !c10.image_folder);
    }

    #[test]
    fn default_dirs_match_reference() {
        assert_eq!(
            find("CIFAR10").unwrap().default_dir(),
            "~/.torch/datasets/CIFAR10"
        );
        assert_eq!(
            find("CIFAR100").unwrap().default_dir(),
            "~/.torch/datasets/CIFAR100"
        );
        for n in ["MNIST", "FashionMNIST", "KMNIST"] {
            assert_eq!(find(n).unwrap().default_dir(), "~/.torch/datasets");
        }
    }

    #[test]
    fn tilde_expansion() {
        let Some(home) = std::env::var_os("HOME") else {
            panic!("HOME must be set for this test");
        };
        let home = PathBuf::from(home);
        assert_eq!(
            expand_home(Path::new("~/.torch/datasets")),
            home.join(".torch/datasets")
        );
        assert_eq!(expand_home(Path::new("~")), home);
        assert_eq!(expand_home(Path::new("/data/x")), PathBuf::from("/data/x"));
        assert_eq!(expand_home(Path::new("~user/x")), PathBuf::from("~user/x"));
        assert_eq!(expand_home(Path::new("rel/~/x")), PathBuf::from("rel/~/x"));
    }

    #[test]
    fn image_accessor() {
        let set = ImageSet {
            images: (0..24).collect(),
            labels: vec![1, 2],
            channels: 3,
            height: 2,
            width: 2,
        };
        assert_eq!(set.len(), 2);
        assert!(!set.is_empty());
        assert_eq!(set.image(1), &(12..24).collect::<Vec<u8>>()[..]);
        assert_eq!(
            format!("{set:?}"),
            "ImageSet { len: 2, channels: 3, height: 2, width: 2, .. }"
        );
    }
}
