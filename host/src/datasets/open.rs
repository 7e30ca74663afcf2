//! From a config to loadable splits: the dataset keys imgclf adds to the reference's, the values
//! image-folder datasets derive, and each split opened for the loader (an in-memory set whole,
//! an image folder as a streamed [`FolderSplit`] with the reference's ImageNet transforms).

use super::folder::{find_classes, FolderSplit, ImageFolder};
use super::loader::Samples;
use super::transform::{Geometry, Transform, RRC_RATIO, RRC_SCALE};
use super::{DatasetError, DatasetInfo, ImageSet, Split};
use crate::config::{Config, ConfigBuilder, KeySpec, Source, Value, ValueType};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The switches an image-folder dataset serves itself, per image in its loader (random-resized
/// crop, flip), instead of the batch augmentation plugins of fixed-size datasets.
pub const FOLDER_SWITCHES: &[&str] = &[
    "augmentation.use_random_crop",
    "augmentation.use_random_horizontal_flip",
];

/// Dataset keys beyond the reference's.
pub fn keys() -> Vec<KeySpec> {
    let floats = ValueType::list_of(ValueType::Float);
    vec![
        KeySpec::new(
            "dataset.mean",
            floats.clone(),
            Value::List(vec![]),
            "Per-channel mean of the pixels scaled to [0, 1], for normalisation; empty: the dataset's own (ImageNet's for image folders)",
        ),
        KeySpec::new(
            "dataset.std",
            floats,
            Value::List(vec![]),
            "Per-channel standard deviation of the pixels scaled to [0, 1]; empty: the dataset's own",
        ),
        KeySpec::new(
            "dataset.skip_unreadable",
            ValueType::Bool,
            Value::Bool(false),
            "Image folders: skip images that cannot be read or decoded (each warned and counted) instead of stopping with an error naming the file",
        ),
    ]
}

fn is_default(b: &ConfigBuilder, key: &str) -> bool {
    matches!(b.source(key), Some(Source::Default))
}

/// The folder of a split: `train/`, and `val/` for validation and testing (ImageNet has no
/// labelled test set; the reference validates on `val/`).
pub fn split_dir(dir: &Path, split: Split) -> PathBuf {
    dir.join(match split {
        Split::Train => "train",
        Split::Test => "val",
    })
}

impl DatasetInfo {
    /// Sets the values the reference derives from `dataset.name` (and, for image folders, the
    /// ones a user left at their defaults).
    pub fn derive_config(&self, b: &mut ConfigBuilder) -> Result<()> {
        let set = |b: &mut ConfigBuilder, key: &str, v: Value| -> Result<()> {
            b.set(key, v, Source::Derived)?;
            Ok(())
        };
        if !self.image_folder {
            // The reference's update_config: the name fixes the geometry.
            set(b, "dataset.image_size", Value::Int(self.image_size as i64))?;
            set(b, "dataset.n_channels", Value::Int(self.n_channels as i64))?;
            set(b, "dataset.n_classes", Value::Int(self.n_classes as i64))?;
        } else {
            // Image folders keep what the config says, as the reference's ImageNet does; only
            // values left at the CIFAR defaults are replaced.
            set(b, "dataset.n_channels", Value::Int(3))?;
            if is_default(b, "dataset.image_size") {
                set(b, "dataset.image_size", Value::Int(self.image_size as i64))?;
            }
            if is_default(b, "dataset.n_classes") {
                let n = match self.n_classes {
                    0 => dir_of(b, self)
                        .and_then(|d| find_classes(&split_dir(&d, Split::Train)).ok())
                        .map_or(10, |c| c.len()),
                    n => n,
                };
                set(b, "dataset.n_classes", Value::Int(n as i64))?;
            }
            for key in ["tta.use_resize", "tta.use_center_crop"] {
                if is_default(b, key) {
                    set(b, key, Value::Bool(true))?;
                }
            }
            if is_default(b, "tta.resize") {
                // 256 for 224, as the reference's ImageNet configs: the crop keeps 7/8 of the side.
                let size = match b.get("dataset.image_size") {
                    Some(Value::Int(s)) => *s,
                    _ => self.image_size as i64,
                };
                set(b, "tta.resize", Value::Int((size * 8 + 3) / 7))?;
            }
        }
        if matches!(b.get("dataset.dataset_dir"), Some(Value::Str(s)) if s.is_empty()) {
            set(
                b,
                "dataset.dataset_dir",
                Value::Str(self.default_dir.to_string()),
            )?;
        }
        Ok(())
    }

    /// Whether `switch` is served by this dataset's loader (image folders' crop and flip).
    pub fn serves_switch(&self, switch: &str) -> bool {
        self.image_folder && FOLDER_SWITCHES.contains(&switch)
    }

    /// Per-channel mean and std: `dataset.mean` / `dataset.std` when set, else the dataset's.
    pub fn stats(&self, c: &Config) -> Result<(Vec<f64>, Vec<f64>)> {
        let pick = |key: &str, own: &[f64]| -> Result<Vec<f64>> {
            let v = c.float_list(key);
            if v.is_empty() {
                return Ok(own.to_vec());
            }
            let channels = c.int("dataset.n_channels") as usize;
            if v.len() != channels {
                bail!(
                    "{key} has {} values but the images have {channels} channels",
                    v.len()
                );
            }
            Ok(v)
        };
        let std = pick("dataset.std", self.std)?;
        if let Some(bad) = std.iter().find(|s| **s <= 0.0) {
            bail!("dataset.std values must be > 0, got {bad}");
        }
        Ok((pick("dataset.mean", self.mean)?, std))
    }

    /// One split for the loader: in-memory datasets whole, image folders streamed.
    pub fn open(&self, dir: &Path, split: Split, c: &Config) -> Result<Arc<dyn Samples>> {
        if !self.image_folder {
            return Ok(Arc::new(self.load(dir, split)?));
        }
        Ok(Arc::new(self.open_folder(dir, split, c)?))
    }

    /// The split's image folder with its transform (training or validation).
    pub fn open_folder(&self, dir: &Path, split: Split, c: &Config) -> Result<FolderSplit> {
        let root = split_dir(&super::expand_home(dir), split);
        let folder = ImageFolder::scan(&root).with_context(|| {
            format!(
                "{} reads dataset.dataset_dir/{{train,val}}/<class>/<image>",
                self.name
            )
        })?;
        let n_classes = c.int("dataset.n_classes") as usize;
        if folder.classes.len() > n_classes {
            bail!(
                "{} has {} class folders but dataset.n_classes is {n_classes}; set dataset.n_classes {}",
                root.display(),
                folder.classes.len(),
                folder.classes.len()
            );
        }
        if split == Split::Test {
            // torchvision numbers val/'s classes on their own; differing sets would mislabel.
            let train_root = split_dir(&super::expand_home(dir), Split::Train);
            if let Ok(train) = find_classes(&train_root) {
                if train != folder.classes {
                    let only_val: Vec<&String> = folder
                        .classes
                        .iter()
                        .filter(|c| !train.contains(c))
                        .collect();
                    let only_train: Vec<&String> = train
                        .iter()
                        .filter(|c| !folder.classes.contains(c))
                        .collect();
                    bail!(
                        "{} and {} must hold the same class folders (labels are their sorted positions); only in val: {only_val:?}, only in train: {only_train:?}",
                        train_root.display(),
                        root.display()
                    );
                }
            }
        }
        Ok(FolderSplit::new(
            folder,
            transform(c, split),
            c.bool("dataset.skip_unreadable"),
        ))
    }
}

/// The reference's `create_imagenet_transform` for a split, from the config.
pub fn transform(c: &Config, split: Split) -> Transform {
    let size = c.int("dataset.image_size").max(1) as usize;
    match split {
        Split::Train => Transform {
            geometry: if c.bool("augmentation.use_random_crop") {
                Geometry::RandomResizedCrop {
                    scale: RRC_SCALE,
                    ratio: RRC_RATIO,
                }
            } else {
                Geometry::ResizeCenterCrop {
                    resize: None,
                    center_crop: true,
                }
            },
            size,
            flip_prob: if c.bool("augmentation.use_random_horizontal_flip") {
                c.float("augmentation.random_horizontal_flip.prob")
            } else {
                0.0
            },
        },
        Split::Test => Transform {
            geometry: Geometry::ResizeCenterCrop {
                resize: c
                    .bool("tta.use_resize")
                    .then(|| c.int("tta.resize").max(1) as usize),
                center_crop: c.bool("tta.use_center_crop"),
            },
            size,
            flip_prob: 0.0,
        },
    }
}

fn dir_of(b: &ConfigBuilder, info: &DatasetInfo) -> Option<PathBuf> {
    let d = match b.get("dataset.dataset_dir") {
        Some(Value::Str(s)) if !s.is_empty() => s.clone(),
        _ => info.default_dir.to_string(),
    };
    (!d.is_empty()).then(|| super::expand_home(Path::new(&d)))
}

/// `locate` of image-folder datasets: the split's folder and its class folders (cheap: the
/// images are listed only when the split is opened).
pub(super) fn locate_folder(
    info: &DatasetInfo,
    dir: &Path,
    split: Split,
) -> Result<Vec<PathBuf>, DatasetError> {
    let root = split_dir(dir, split);
    if !root.is_dir() {
        return Err(DatasetError::NotFound {
            dataset: info.name,
            split: split.as_str(),
            searched: vec![super::SearchedLocation {
                layout: "image folder",
                dir: dir.to_path_buf(),
                missing: vec![format!(
                    "{}/",
                    root.file_name().unwrap_or_default().to_string_lossy()
                )],
            }],
            hint: "train/<class>/<image> and val/<class>/<image>".into(),
        });
    }
    find_classes(&root)?;
    Ok(vec![root])
}

/// `load` of image-folder datasets: refused, they are streamed.
pub(super) fn load_folder(
    info: &DatasetInfo,
    dir: &Path,
    _split: Split,
) -> Result<ImageSet, DatasetError> {
    Err(DatasetError::Format {
        path: dir.to_path_buf(),
        msg: format!(
            "{} is an image folder, read image by image by the loader, never whole",
            info.name
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::host_schema;

    fn builder(overrides: &[&str]) -> ConfigBuilder {
        let mut schema = host_schema();
        schema.extend(keys()).unwrap();
        schema
            .add(KeySpec::new(
                "augmentation.random_horizontal_flip.prob",
                ValueType::Float,
                Value::Float(0.5),
                "flip",
            ))
            .unwrap();
        let mut b = ConfigBuilder::new(schema);
        let args: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        b.merge_overrides(&args).unwrap();
        b
    }

    #[test]
    fn image_folders_keep_user_geometry_and_derive_the_rest() {
        let info = super::super::find("ImageNet").unwrap();
        let mut b = builder(&["dataset.name", "ImageNet", "dataset.image_size", "64"]);
        info.derive_config(&mut b).unwrap();
        let c = b.build().unwrap();
        assert_eq!(c.int("dataset.image_size"), 64);
        assert_eq!(c.int("dataset.n_classes"), 1000);
        assert_eq!(c.int("dataset.n_channels"), 3);
        assert!(c.bool("tta.use_resize") && c.bool("tta.use_center_crop"));
        assert_eq!(c.int("tta.resize"), 73);
        assert_eq!(c.str("dataset.dataset_dir"), "~/datasets/ImageNet");
        let (mean, std) = info.stats(&c).unwrap();
        assert_eq!(mean, [0.485, 0.456, 0.406]);
        assert_eq!(std, [0.229, 0.224, 0.225]);
        let t = transform(&c, Split::Test);
        assert_eq!(
            t.geometry,
            Geometry::ResizeCenterCrop {
                resize: Some(73),
                center_crop: true
            }
        );
        assert_eq!(transform(&c, Split::Train).flip_prob, 0.5);

        let mut b = builder(&["dataset.name", "ImageNet"]);
        info.derive_config(&mut b).unwrap();
        let c = b.build().unwrap();
        assert_eq!(
            (c.int("dataset.image_size"), c.int("tta.resize")),
            (224, 256)
        );

        // CIFAR keeps the reference's derivation.
        let mut b = builder(&["dataset.image_size", "64"]);
        super::super::find("CIFAR10")
            .unwrap()
            .derive_config(&mut b)
            .unwrap();
        assert_eq!(b.build().unwrap().int("dataset.image_size"), 32);
    }

    #[test]
    fn generic_folders_count_their_classes_and_take_user_stats() {
        let dir = crate::datasets::testutil::TempDir::new("open");
        for c in ["x", "y", "z"] {
            dir.write(&format!("train/{c}/a.png"), b"x");
        }
        let info = super::super::find("ImageFolder").unwrap();
        let d = dir.path().display().to_string();
        let mut b = builder(&[
            "dataset.name",
            "ImageFolder",
            "dataset.dataset_dir",
            &d,
            "dataset.mean",
            "[0.5, 0.5, 0.5]",
            "dataset.std",
            "[0.25, 0.25, 0.25]",
        ]);
        info.derive_config(&mut b).unwrap();
        let c = b.build().unwrap();
        assert_eq!(c.int("dataset.n_classes"), 3);
        assert_eq!(info.stats(&c).unwrap(), (vec![0.5; 3], vec![0.25; 3]));
        // Classes beyond dataset.n_classes are refused, naming the fix.
        let mut b = builder(&[
            "dataset.name",
            "ImageFolder",
            "dataset.dataset_dir",
            &d,
            "dataset.n_classes",
            "2",
        ]);
        info.derive_config(&mut b).unwrap();
        let c = b.build().unwrap();
        let e = info
            .open_folder(dir.path(), Split::Train, &c)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("set dataset.n_classes 3"), "{e}");
        assert!(info.serves_switch("augmentation.use_random_crop"));
        assert!(!info.serves_switch("augmentation.use_cutout"));
    }
}
