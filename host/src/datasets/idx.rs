//! IDX-format loader (plain or gzip) shared by MNIST, FashionMNIST and KMNIST.
//!
//! Files read: `train-images-idx3-ubyte` + `train-labels-idx1-ubyte` (train) and
//! `t10k-images-idx3-ubyte` + `t10k-labels-idx1-ubyte` (test), each either plain or with a `.gz`
//! suffix. Search order for a directory `dir` (the first location holding both files of the split
//! wins; within a location the plain file is preferred over its `.gz`):
//! 1. `dir` itself (flat layout, e.g. Debian's `/usr/share/datasets/fashion-mnist/`);
//! 2. `dir/<Name>/raw/` (torchvision's layout; Name = MNIST, FashionMNIST or KMNIST).

use std::io::Read;
use std::path::{Path, PathBuf};

use super::error::SearchedLocation;
use super::{check_labels, read_file, DatasetError, DatasetInfo, ImageSet, Split};

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

fn base_names(split: Split) -> [&'static str; 2] {
    match split {
        Split::Train => ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"],
        Split::Test => ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"],
    }
}

/// Returns `[images, labels]` paths.
pub(super) fn locate(
    info: &DatasetInfo,
    dir: &Path,
    split: Split,
) -> Result<Vec<PathBuf>, DatasetError> {
    let names = base_names(split);
    let candidates = [
        ("flat", dir.to_path_buf()),
        ("torchvision raw", dir.join(info.name).join("raw")),
    ];
    let mut searched = Vec::new();
    for (layout, folder) in candidates {
        let mut found = Vec::new();
        let mut missing = Vec::new();
        for name in names {
            let plain = folder.join(name);
            let gz = folder.join(format!("{name}.gz"));
            if plain.is_file() {
                found.push(plain);
            } else if gz.is_file() {
                found.push(gz);
            } else {
                missing.push(format!("{name}[.gz]"));
            }
        }
        if missing.is_empty() {
            return Ok(found);
        }
        searched.push(SearchedLocation {
            layout,
            dir: folder,
            missing,
        });
    }
    Err(DatasetError::NotFound {
        dataset: info.name,
        split: split.as_str(),
        searched,
        hint: format!(
            "the IDX files ({}[.gz], {}[.gz]) directly, or the folder holding {}/raw/ with them",
            names[0], names[1], info.name
        ),
    })
}

pub(super) fn load(info: &DatasetInfo, dir: &Path, split: Split) -> Result<ImageSet, DatasetError> {
    let files = locate(info, dir, split)?;
    let (images_path, labels_path) = (&files[0], &files[1]);

    let raw = read_maybe_gz(images_path)?;
    let dims = parse_header(
        images_path,
        &raw,
        IMAGES_MAGIC,
        3,
        "IDX images: magic, count, rows, cols",
    )?;
    let (n, height, width) = (dims[0], dims[1], dims[2]);
    let images_start = 4 + 4 * 3;

    let raw_labels = read_maybe_gz(labels_path)?;
    let ldims = parse_header(
        labels_path,
        &raw_labels,
        LABELS_MAGIC,
        1,
        "IDX labels: magic, count",
    )?;
    let n_labels = ldims[0];
    let labels_start = 4 + 4;

    if n != n_labels {
        return Err(DatasetError::CountMismatch {
            images: images_path.clone(),
            n_images: n as u64,
            labels: labels_path.clone(),
            n_labels: n_labels as u64,
        });
    }
    check_body(
        images_path,
        raw.len(),
        images_start,
        &[n, height, width],
        "pixel",
    )?;
    check_body(labels_path, raw_labels.len(), labels_start, &[n], "label")?;

    let labels: Vec<i64> = raw_labels[labels_start..]
        .iter()
        .map(|&b| b as i64)
        .collect();
    check_labels(labels_path, &labels, info.n_classes)?;

    let mut images = raw;
    images.drain(..images_start);
    Ok(ImageSet {
        images,
        labels,
        channels: 1,
        height,
        width,
    })
}

/// Reads a file, gunzipping it when its name ends in `.gz`.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DatasetError> {
    let data = read_file(path)?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::with_capacity(data.len() * 2);
        flate2::read::MultiGzDecoder::new(&data[..])
            .read_to_end(&mut out)
            .map_err(|source| DatasetError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    source.kind(),
                    format!("gzip decompression failed ({source}); the download is damaged, re-download it"),
                ),
            })?;
        Ok(out)
    } else {
        Ok(data)
    }
}

/// Checks the magic number and returns the `ndim` big-endian dimensions that follow it.
fn parse_header(
    path: &Path,
    data: &[u8],
    magic: u32,
    ndim: usize,
    what: &'static str,
) -> Result<Vec<usize>, DatasetError> {
    let header = 4 + 4 * ndim;
    if data.len() < 4 {
        return Err(DatasetError::BadLength {
            path: path.to_path_buf(),
            expected: header as u128,
            actual: data.len() as u64,
            what: format!("at least the header: {what}"),
        });
    }
    let be = |i: usize| u32::from_be_bytes(data[i..i + 4].try_into().unwrap());
    let found = be(0);
    if found != magic {
        return Err(DatasetError::BadMagic {
            path: path.to_path_buf(),
            expected: magic,
            found,
            what: if magic == IMAGES_MAGIC {
                "IDX uint8 3-d images"
            } else {
                "IDX uint8 1-d labels"
            },
        });
    }
    if data.len() < header {
        return Err(DatasetError::BadLength {
            path: path.to_path_buf(),
            expected: header as u128,
            actual: data.len() as u64,
            what: format!("at least the header: {what}"),
        });
    }
    Ok((0..ndim).map(|d| be(4 + 4 * d) as usize).collect())
}

/// Checks that the file holds exactly header + product(dims) bytes.
fn check_body(
    path: &Path,
    len: usize,
    header: usize,
    dims: &[usize],
    unit: &str,
) -> Result<(), DatasetError> {
    // Up to three u32 dimensions: their product fits in u128 (< 2^96) but not in u64.
    let body = dims.iter().map(|&d| d as u128).product::<u128>();
    let expected = header as u128 + body;
    if len as u128 != expected {
        let shape: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
        return Err(DatasetError::BadLength {
            path: path.to_path_buf(),
            expected,
            actual: len as u64,
            what: format!("{header}-byte header + {} {unit} bytes", shape.join(" x ")),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{gzip, label, pixel, TempDir};
    use super::super::{find, Split};
    use super::*;

    fn idx_images(n: usize, h: usize, w: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for v in [IMAGES_MAGIC, n as u32, h as u32, w as u32] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        for i in 0..n {
            out.extend((0..h * w).map(|j| pixel(i, j)));
        }
        out
    }

    fn idx_labels(n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for v in [LABELS_MAGIC, n as u32] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.extend((0..n).map(|i| label(i, 10) as u8));
        out
    }

    fn assert_formula(set: &ImageSet, n: usize, h: usize, w: usize) {
        assert_eq!(
            (set.len(), set.channels, set.height, set.width),
            (n, 1, h, w)
        );
        assert_eq!(set.images.len(), n * h * w);
        for i in 0..n {
            assert_eq!(set.labels[i], label(i, 10));
            assert!(
                set.image(i)
                    .iter()
                    .enumerate()
                    .all(|(j, &p)| p == pixel(i, j)),
                "image {i}"
            );
        }
    }

    #[test]
    fn flat_plain_16_images() {
        let t = TempDir::new("idxflat");
        t.write("t10k-images-idx3-ubyte", &idx_images(16, 28, 28));
        t.write("t10k-labels-idx1-ubyte", &idx_labels(16));
        let info = find("MNIST").unwrap();
        let files = info.locate(t.path(), Split::Test).unwrap();
        assert_eq!(
            files,
            vec![
                t.path().join("t10k-images-idx3-ubyte"),
                t.path().join("t10k-labels-idx1-ubyte")
            ]
        );
        assert_formula(&info.load(t.path(), Split::Test).unwrap(), 16, 28, 28);
        // Sizes come from the file.
        t.write("train-images-idx3-ubyte", &idx_images(5, 4, 3));
        t.write("train-labels-idx1-ubyte", &idx_labels(5));
        assert_formula(&info.load(t.path(), Split::Train).unwrap(), 5, 4, 3);
    }

    #[test]
    fn flat_gz_and_torchvision_raw_layouts_for_each_dataset() {
        for name in ["MNIST", "FashionMNIST", "KMNIST"] {
            let info = find(name).unwrap();
            let t = TempDir::new("idxraw");
            t.write(
                &format!("{name}/raw/train-images-idx3-ubyte.gz"),
                &gzip(&idx_images(16, 28, 28)),
            );
            t.write(
                &format!("{name}/raw/train-labels-idx1-ubyte.gz"),
                &gzip(&idx_labels(16)),
            );
            t.write(
                &format!("{name}/raw/t10k-images-idx3-ubyte"),
                &idx_images(3, 28, 28),
            );
            t.write(
                &format!("{name}/raw/t10k-labels-idx1-ubyte"),
                &idx_labels(3),
            );
            let files = info.locate(t.path(), Split::Train).unwrap();
            assert!(
                files[0].ends_with(format!("{name}/raw/train-images-idx3-ubyte.gz")),
                "{files:?}"
            );
            assert_formula(&info.load(t.path(), Split::Train).unwrap(), 16, 28, 28);
            assert_formula(&info.load(t.path(), Split::Test).unwrap(), 3, 28, 28);

            let flat = TempDir::new("idxgz");
            flat.write("t10k-images-idx3-ubyte.gz", &gzip(&idx_images(16, 28, 28)));
            flat.write("t10k-labels-idx1-ubyte.gz", &gzip(&idx_labels(16)));
            assert_formula(&info.load(flat.path(), Split::Test).unwrap(), 16, 28, 28);
        }
    }

    #[test]
    fn plain_preferred_over_gz_and_flat_over_raw() {
        let t = TempDir::new("idxpref");
        t.write("t10k-images-idx3-ubyte", &idx_images(2, 28, 28));
        t.write("t10k-images-idx3-ubyte.gz", b"not gzip");
        t.write("t10k-labels-idx1-ubyte.gz", &gzip(&idx_labels(2)));
        t.write("MNIST/raw/t10k-images-idx3-ubyte", &idx_images(3, 28, 28));
        t.write("MNIST/raw/t10k-labels-idx1-ubyte", &idx_labels(3));
        let info = find("MNIST").unwrap();
        let files = info.locate(t.path(), Split::Test).unwrap();
        assert_eq!(files[0], t.path().join("t10k-images-idx3-ubyte"));
        assert_eq!(files[1], t.path().join("t10k-labels-idx1-ubyte.gz"));
        assert_eq!(info.load(t.path(), Split::Test).unwrap().len(), 2);
    }

    #[test]
    fn truncated_file_names_file_expected_and_actual() {
        let t = TempDir::new("idxtrunc");
        let mut img = idx_images(4, 28, 28);
        img.truncate(img.len() - 100);
        t.write("t10k-images-idx3-ubyte.gz", &gzip(&img));
        t.write("t10k-labels-idx1-ubyte", &idx_labels(4));
        let err = find("KMNIST")
            .unwrap()
            .load(t.path(), Split::Test)
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                DatasetError::BadLength {
                    expected: 3152,
                    actual: 3052,
                    ..
                }
            ),
            "{msg}"
        );
        assert!(
            msg.contains("t10k-images-idx3-ubyte.gz")
                && msg.contains("3152")
                && msg.contains("3052"),
            "{msg}"
        );

        // Truncated labels, and a file too short for its header.
        t.write("t10k-images-idx3-ubyte.gz", &gzip(&idx_images(4, 28, 28)));
        let mut lab = idx_labels(4);
        lab.pop();
        t.write("t10k-labels-idx1-ubyte", &lab);
        let msg = find("KMNIST")
            .unwrap()
            .load(t.path(), Split::Test)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("t10k-labels-idx1-ubyte") && msg.contains("expected 12 bytes"),
            "{msg}"
        );
        t.write("t10k-labels-idx1-ubyte", &lab[..6]);
        let msg = find("KMNIST")
            .unwrap()
            .load(t.path(), Split::Test)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("t10k-labels-idx1-ubyte") && msg.contains("header"),
            "{msg}"
        );

        // Dimensions whose product overflows u64 (found by `cargo xtask fuzz`):
        // a length error naming the exact expected size, not an arithmetic panic.
        let mut huge = Vec::new();
        for v in [IMAGES_MAGIC, 2, u32::MAX, u32::MAX] {
            huge.extend_from_slice(&v.to_be_bytes());
        }
        huge.extend_from_slice(&[1, 2, 3]);
        t.write("t10k-images-idx3-ubyte.gz", &gzip(&huge));
        t.write("t10k-labels-idx1-ubyte", &idx_labels(2));
        let err = find("KMNIST")
            .unwrap()
            .load(t.path(), Split::Test)
            .unwrap_err();
        let expected = 16 + 2 * (u32::MAX as u128) * (u32::MAX as u128);
        assert!(
            matches!(err, DatasetError::BadLength { expected: e, actual: 19, .. } if e == expected),
            "{err}"
        );
        assert!(err.to_string().contains(&expected.to_string()), "{err}");

        // A damaged gzip stream.
        let gz = gzip(&idx_images(4, 28, 28));
        t.write("t10k-images-idx3-ubyte.gz", &gz[..gz.len() / 2]);
        t.write("t10k-labels-idx1-ubyte", &idx_labels(4));
        let msg = find("KMNIST")
            .unwrap()
            .load(t.path(), Split::Test)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("t10k-images-idx3-ubyte.gz"), "{msg}");
    }

    #[test]
    fn bad_magic() {
        let t = TempDir::new("idxmagic");
        // Labels where images are expected.
        t.write("train-images-idx3-ubyte", &idx_labels(4));
        t.write("train-labels-idx1-ubyte", &idx_labels(4));
        let err = find("FashionMNIST")
            .unwrap()
            .load(t.path(), Split::Train)
            .unwrap_err();
        assert!(
            matches!(
                err,
                DatasetError::BadMagic {
                    expected: 0x803,
                    found: 0x801,
                    ..
                }
            ),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("train-images-idx3-ubyte")
                && msg.contains("0x00000801")
                && msg.contains("0x00000803"),
            "{msg}"
        );

        t.write("train-images-idx3-ubyte", &idx_images(4, 28, 28));
        t.write("train-labels-idx1-ubyte", &idx_images(4, 28, 28));
        let msg = find("FashionMNIST")
            .unwrap()
            .load(t.path(), Split::Train)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("train-labels-idx1-ubyte") && msg.contains("bad magic"),
            "{msg}"
        );
    }

    #[test]
    fn label_out_of_range_and_count_mismatch() {
        let t = TempDir::new("idxlabel");
        t.write("t10k-images-idx3-ubyte", &idx_images(4, 28, 28));
        let mut lab = idx_labels(4);
        lab[8 + 2] = 10;
        t.write("t10k-labels-idx1-ubyte", &lab);
        let err = find("MNIST")
            .unwrap()
            .load(t.path(), Split::Test)
            .unwrap_err();
        assert!(
            matches!(
                err,
                DatasetError::LabelOutOfRange {
                    index: 2,
                    label: 10,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("t10k-labels-idx1-ubyte"), "{err}");

        t.write("t10k-labels-idx1-ubyte", &idx_labels(5));
        let err = find("MNIST")
            .unwrap()
            .load(t.path(), Split::Test)
            .unwrap_err();
        assert!(
            matches!(
                err,
                DatasetError::CountMismatch {
                    n_images: 4,
                    n_labels: 5,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn missing_dir_lists_where_it_looked() {
        let t = TempDir::new("idxmissing");
        t.write("train-images-idx3-ubyte.gz", &gzip(&idx_images(1, 28, 28)));
        let err = find("KMNIST")
            .unwrap()
            .locate(t.path(), Split::Train)
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&t.path().display().to_string()), "{msg}");
        assert!(
            msg.contains(&t.path().join("KMNIST/raw").display().to_string()),
            "{msg}"
        );
        assert!(msg.contains("train-labels-idx1-ubyte[.gz]"), "{msg}");
        assert!(msg.contains("dataset.dataset_dir"), "{msg}");
        let DatasetError::NotFound { searched, .. } = err else {
            panic!()
        };
        assert_eq!(
            searched[0].missing,
            vec!["train-labels-idx1-ubyte[.gz]".to_string()]
        );
        assert_eq!(searched[1].missing.len(), 2);
    }

    /// The Debian/Ubuntu `fashion-mnist` package's files (CI installs it).
    #[test]
    fn system_fashion_mnist() {
        let dir = Path::new("/usr/share/datasets/fashion-mnist");
        for f in [
            "train-images-idx3-ubyte.gz",
            "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
        ] {
            assert!(
                dir.join(f).is_file(),
                "{} missing: install the fashion-mnist package",
                dir.join(f).display()
            );
        }
        let info = find("FashionMNIST").unwrap();
        let train = info.load(dir, Split::Train).unwrap();
        assert_eq!(
            (train.len(), train.channels, train.height, train.width),
            (60000, 1, 28, 28)
        );
        let test = info.load(dir, Split::Test).unwrap();
        assert_eq!(
            (test.len(), test.channels, test.height, test.width),
            (10000, 1, 28, 28)
        );
        // Balanced classes: 6000 / 1000 images per class.
        for (set, per) in [(&train, 6000), (&test, 1000)] {
            let mut counts = [0usize; 10];
            set.labels.iter().for_each(|&l| counts[l as usize] += 1);
            assert_eq!(counts, [per; 10]);
        }
        let mean =
            train.images.iter().map(|&p| p as f64).sum::<f64>() / train.images.len() as f64 / 255.0;
        assert!((mean - info.mean[0]).abs() < 1e-3, "mean {mean}");
    }
}
