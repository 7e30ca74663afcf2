//! CIFAR-10 / CIFAR-100 loaders for the binary releases and torchvision's pickled python releases.
//!
//! Search order for a directory `dir` (the first layout holding every file of the requested split
//! wins; binary is preferred over python because it needs no pickle decoding):
//! 1. binary release in `dir/cifar-10-batches-bin/` (CIFAR-100: `dir/cifar-100-binary/`);
//! 2. binary release directly in `dir` (dir *is* that folder);
//! 3. python release in `dir/cifar-10-batches-py/` (CIFAR-100: `dir/cifar-100-python/`), the
//!    layout torchvision downloads to;
//! 4. python release directly in `dir`.
//!
//! Images come out as N x 3 x 32 x 32 uint8 (each record is the R plane, then G, then B, each
//! 32x32 row-major), the same in both releases. CIFAR-100 uses the fine (100-class) labels.

use std::path::{Path, PathBuf};

use super::error::SearchedLocation;
use super::{check_labels, read_file, DatasetError, DatasetInfo, ImageSet, Split};
use crate::pickle;

/// Bytes of one CIFAR image (3 x 32 x 32).
const IMAGE_BYTES: usize = 3 * 32 * 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Release {
    Binary,
    Python,
}

struct CifarSpec {
    bin_folder: &'static str,
    bin_train: &'static [&'static str],
    bin_test: &'static [&'static str],
    /// Label bytes before the image in a binary record; the label used is the last of them.
    label_bytes: usize,
    py_folder: &'static str,
    py_train: &'static [&'static str],
    py_test: &'static [&'static str],
    /// Dict key of the labels in a python batch.
    label_key: &'static str,
    /// Name of the downloadable archives, for the hint.
    archives: &'static str,
}

static CIFAR10: CifarSpec = CifarSpec {
    bin_folder: "cifar-10-batches-bin",
    bin_train: &[
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
    ],
    bin_test: &["test_batch.bin"],
    label_bytes: 1,
    py_folder: "cifar-10-batches-py",
    py_train: &[
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
    ],
    py_test: &["test_batch"],
    label_key: "labels",
    archives: "cifar-10-binary.tar.gz or cifar-10-python.tar.gz",
};

static CIFAR100: CifarSpec = CifarSpec {
    bin_folder: "cifar-100-binary",
    bin_train: &["train.bin"],
    bin_test: &["test.bin"],
    label_bytes: 2,
    py_folder: "cifar-100-python",
    py_train: &["train"],
    py_test: &["test"],
    label_key: "fine_labels",
    archives: "cifar-100-binary.tar.gz or cifar-100-python.tar.gz",
};

pub(super) fn locate_cifar10(
    info: &DatasetInfo,
    dir: &Path,
    split: Split,
) -> Result<Vec<PathBuf>, DatasetError> {
    locate(&CIFAR10, info, dir, split).map(|(_, files)| files)
}

pub(super) fn locate_cifar100(
    info: &DatasetInfo,
    dir: &Path,
    split: Split,
) -> Result<Vec<PathBuf>, DatasetError> {
    locate(&CIFAR100, info, dir, split).map(|(_, files)| files)
}

pub(super) fn load_cifar10(
    info: &DatasetInfo,
    dir: &Path,
    split: Split,
) -> Result<ImageSet, DatasetError> {
    load(&CIFAR10, info, dir, split)
}

pub(super) fn load_cifar100(
    info: &DatasetInfo,
    dir: &Path,
    split: Split,
) -> Result<ImageSet, DatasetError> {
    load(&CIFAR100, info, dir, split)
}

fn locate(
    spec: &CifarSpec,
    info: &DatasetInfo,
    dir: &Path,
    split: Split,
) -> Result<(Release, Vec<PathBuf>), DatasetError> {
    let (bin_files, py_files) = match split {
        Split::Train => (spec.bin_train, spec.py_train),
        Split::Test => (spec.bin_test, spec.py_test),
    };
    let candidates = [
        (
            Release::Binary,
            "binary",
            dir.join(spec.bin_folder),
            bin_files,
        ),
        (Release::Binary, "binary", dir.to_path_buf(), bin_files),
        (
            Release::Python,
            "python (torchvision)",
            dir.join(spec.py_folder),
            py_files,
        ),
        (
            Release::Python,
            "python (torchvision)",
            dir.to_path_buf(),
            py_files,
        ),
    ];
    let mut searched = Vec::new();
    for (release, layout, folder, names) in candidates {
        let missing: Vec<String> = names
            .iter()
            .filter(|n| !folder.join(n).is_file())
            .map(|n| n.to_string())
            .collect();
        if missing.is_empty() {
            return Ok((release, names.iter().map(|n| folder.join(n)).collect()));
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
            "{}/ or {}/ (extracted from {})",
            spec.bin_folder, spec.py_folder, spec.archives
        ),
    })
}

fn load(
    spec: &CifarSpec,
    info: &DatasetInfo,
    dir: &Path,
    split: Split,
) -> Result<ImageSet, DatasetError> {
    let (release, files) = locate(spec, info, dir, split)?;
    let mut set = ImageSet {
        images: Vec::new(),
        labels: Vec::new(),
        channels: 3,
        height: 32,
        width: 32,
    };
    for path in &files {
        let data = read_file(path)?;
        let (images, labels) = match release {
            Release::Binary => parse_binary(spec, path, &data)?,
            Release::Python => parse_python(spec, path, &data)?,
        };
        check_labels(path, &labels, info.n_classes)?;
        set.images.extend_from_slice(&images);
        set.labels.extend(labels);
    }
    Ok(set)
}

/// Splits a binary batch into image bytes and labels.
fn parse_binary(
    spec: &CifarSpec,
    path: &Path,
    data: &[u8],
) -> Result<(Vec<u8>, Vec<i64>), DatasetError> {
    let record = spec.label_bytes + IMAGE_BYTES;
    if data.is_empty() || !data.len().is_multiple_of(record) {
        return Err(DatasetError::BadRecordLength {
            path: path.to_path_buf(),
            len: data.len() as u64,
            record,
            what: if spec.label_bytes == 1 {
                "the CIFAR-10 binary format (1 label byte + 3072 pixel bytes)"
            } else {
                "the CIFAR-100 binary format (coarse and fine label bytes + 3072 pixel bytes)"
            },
        });
    }
    let n = data.len() / record;
    let mut images = Vec::with_capacity(n * IMAGE_BYTES);
    let mut labels = Vec::with_capacity(n);
    for rec in data.chunks_exact(record) {
        labels.push(rec[spec.label_bytes - 1] as i64);
        images.extend_from_slice(&rec[spec.label_bytes..]);
    }
    Ok((images, labels))
}

/// Decodes a python batch (a pickled dict) into image bytes and labels.
fn parse_python(
    spec: &CifarSpec,
    path: &Path,
    data: &[u8],
) -> Result<(Vec<u8>, Vec<i64>), DatasetError> {
    let format_err = |msg: String| DatasetError::Format {
        path: path.to_path_buf(),
        msg,
    };
    let tree = pickle::parse(path, data)?;
    if !tree.root_is_dict() {
        return Err(format_err(
            "expected a pickled dict (a CIFAR python batch)".into(),
        ));
    }
    let data_id = tree.dict_get("data").ok_or_else(|| {
        format_err("the pickled dict has no 'data' entry; not a CIFAR python batch".into())
    })?;
    let array = tree
        .u8_array(data_id)
        .map_err(|e| format_err(format!("entry 'data': {e}")))?;
    if array.shape.len() != 2 || array.shape[1] != IMAGE_BYTES {
        return Err(format_err(format!(
            "entry 'data' has shape {:?}, expected (N, {IMAGE_BYTES})",
            array.shape
        )));
    }
    let n = array.shape[0];
    let labels_id = tree.dict_get(spec.label_key).ok_or_else(|| {
        format_err(format!(
            "the pickled dict has no '{}' entry; is this the right CIFAR release?",
            spec.label_key
        ))
    })?;
    let labels = tree
        .int_list(labels_id)
        .ok_or_else(|| format_err(format!("entry '{}' is not a list of ints", spec.label_key)))?;
    if labels.len() != n {
        return Err(format_err(format!(
            "entry 'data' holds {n} images but entry '{}' holds {} labels; they must agree",
            spec.label_key,
            labels.len()
        )));
    }
    Ok((array.data, labels))
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{label, pixel, pixels, py2_cifar_batch, TempDir};
    use super::super::{find, Split};
    use super::*;

    /// A binary batch of `n` records following the test formulas (CIFAR-100: coarse = i % 20).
    fn binary_batch(n: usize, cifar100: bool) -> Vec<u8> {
        let n_classes = if cifar100 { 100 } else { 10 };
        let mut out = Vec::new();
        for i in 0..n {
            if cifar100 {
                out.push((i % 20) as u8);
            }
            out.push(label(i, n_classes) as u8);
            out.extend((0..IMAGE_BYTES).map(|j| pixel(i, j)));
        }
        out
    }

    fn assert_formula(set: &ImageSet, n: usize, n_classes: usize) {
        assert_eq!((set.channels, set.height, set.width), (3, 32, 32));
        assert_eq!(set.len(), n);
        assert_eq!(set.images.len(), n * IMAGE_BYTES);
        for i in 0..n {
            assert_eq!(set.labels[i], label(i, n_classes), "label of image {i}");
            let img = set.image(i);
            for j in [0, 1, 1023, 1024, 2047, 2048, 3071] {
                assert_eq!(img[j], pixel(i, j), "image {i} byte {j}");
            }
        }
        assert_eq!(set.images, pixels(n, IMAGE_BYTES));
    }

    fn fixture(name: &str) -> &'static [u8] {
        macro_rules! fixtures {
            ($($f:literal),*) => {
                match name {
                    $($f => include_bytes!(concat!("../../../tests/data/cifar_pickle/", $f)),)*
                    _ => panic!("no fixture {name}"),
                }
            };
        }
        fixtures!(
            "cifar10_p2_str.pkl",
            "cifar10_p2_bytes.pkl",
            "cifar10_p3_str.pkl",
            "cifar10_p3_bytes.pkl",
            "cifar10_p4_str.pkl",
            "cifar10_p4_bytes.pkl",
            "cifar10_p5_str.pkl",
            "cifar10_p5_bytes.pkl",
            "cifar100_p2_str.pkl",
            "cifar100_p2_bytes.pkl",
            "cifar100_p3_str.pkl",
            "cifar100_p3_bytes.pkl",
            "cifar100_p4_str.pkl",
            "cifar100_p4_bytes.pkl",
            "cifar100_p5_str.pkl",
            "cifar100_p5_bytes.pkl"
        )
    }

    #[test]
    fn cifar10_binary_test_split_16_images() {
        let t = TempDir::new("c10bin");
        let f = t.write(
            "cifar-10-batches-bin/test_batch.bin",
            &binary_batch(16, false),
        );
        let info = find("CIFAR10").unwrap();
        assert_eq!(info.locate(t.path(), Split::Test).unwrap(), vec![f]);
        let set = info.load(t.path(), Split::Test).unwrap();
        assert_formula(&set, 16, 10);
    }

    #[test]
    fn cifar10_binary_train_concatenates_batches_in_order_and_dir_may_be_the_folder() {
        let t = TempDir::new("c10train");
        let all = binary_batch(10, false);
        let rec = 1 + IMAGE_BYTES;
        for b in 0..5 {
            t.write(
                &format!("cifar-10-batches-bin/data_batch_{}.bin", b + 1),
                &all[b * 2 * rec..(b + 1) * 2 * rec],
            );
        }
        let info = find("CIFAR10").unwrap();
        let inner = t.path().join("cifar-10-batches-bin");
        let files = info.locate(&inner, Split::Train).unwrap();
        assert_eq!(files.len(), 5);
        assert!(files[4].ends_with("data_batch_5.bin"));
        assert_formula(&info.load(&inner, Split::Train).unwrap(), 10, 10);
        assert_formula(&info.load(t.path(), Split::Train).unwrap(), 10, 10);
    }

    #[test]
    fn cifar100_binary_uses_fine_labels() {
        let t = TempDir::new("c100bin");
        t.write("cifar-100-binary/test.bin", &binary_batch(16, true));
        t.write("cifar-100-binary/train.bin", &binary_batch(3, true));
        let info = find("CIFAR100").unwrap();
        assert_formula(&info.load(t.path(), Split::Test).unwrap(), 16, 100);
        assert_formula(&info.load(t.path(), Split::Train).unwrap(), 3, 100);
    }

    #[test]
    fn cifar_python_as_written_by_python2() {
        let t = TempDir::new("c10py2");
        t.write(
            "cifar-10-batches-py/test_batch",
            &py2_cifar_batch(16, 10, false),
        );
        let info = find("CIFAR10").unwrap();
        assert!(info.locate(t.path(), Split::Test).unwrap()[0]
            .ends_with("cifar-10-batches-py/test_batch"));
        assert_formula(&info.load(t.path(), Split::Test).unwrap(), 16, 10);

        t.write("cifar-100-python/train", &py2_cifar_batch(16, 100, true));
        t.write("cifar-100-python/test", &py2_cifar_batch(4, 100, true));
        let info = find("CIFAR100").unwrap();
        assert_formula(&info.load(t.path(), Split::Train).unwrap(), 16, 100);
        // dir may be the python folder itself.
        assert_formula(
            &info
                .load(&t.path().join("cifar-100-python"), Split::Test)
                .unwrap(),
            4,
            100,
        );
    }

    #[test]
    fn cifar_python_fixtures_from_python3_all_protocols() {
        for (ds, folder, file, n_classes) in [
            ("cifar10", "cifar-10-batches-py", "test_batch", 10),
            ("cifar100", "cifar-100-python", "test", 100),
        ] {
            let info = find(if n_classes == 10 {
                "CIFAR10"
            } else {
                "CIFAR100"
            })
            .unwrap();
            for proto in 2..=5 {
                for keys in ["str", "bytes"] {
                    let name = format!("{ds}_p{proto}_{keys}.pkl");
                    let t = TempDir::new("fixture");
                    t.write(&format!("{folder}/{file}"), fixture(&name));
                    let set = info
                        .load(t.path(), Split::Test)
                        .unwrap_or_else(|e| panic!("{name}: {e}"));
                    let n = if proto == 2 && keys == "str" { 16 } else { 2 };
                    assert_formula(&set, n, n_classes);
                }
            }
        }
    }

    #[test]
    fn binary_preferred_over_python() {
        let t = TempDir::new("prefer");
        t.write(
            "cifar-10-batches-py/test_batch",
            &py2_cifar_batch(2, 10, false),
        );
        t.write(
            "cifar-10-batches-bin/test_batch.bin",
            &binary_batch(3, false),
        );
        let info = find("CIFAR10").unwrap();
        let files = info.locate(t.path(), Split::Test).unwrap();
        assert!(
            files[0].ends_with("cifar-10-batches-bin/test_batch.bin"),
            "{files:?}"
        );
        assert_eq!(info.load(t.path(), Split::Test).unwrap().len(), 3);
    }

    #[test]
    fn truncated_binary_names_file_length_and_record_size() {
        let t = TempDir::new("trunc");
        let mut data = binary_batch(2, false);
        data.pop();
        t.write("cifar-10-batches-bin/test_batch.bin", &data);
        let err = find("CIFAR10")
            .unwrap()
            .load(t.path(), Split::Test)
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                DatasetError::BadRecordLength {
                    len: 6145,
                    record: 3073,
                    ..
                }
            ),
            "{msg}"
        );
        assert!(
            msg.contains("test_batch.bin") && msg.contains("6145") && msg.contains("3073"),
            "{msg}"
        );

        let mut data = binary_batch(2, true);
        data.truncate(3074 + 5);
        t.write("cifar-100-binary/test.bin", &data);
        let msg = find("CIFAR100")
            .unwrap()
            .load(t.path(), Split::Test)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("test.bin") && msg.contains("3079") && msg.contains("3074"),
            "{msg}"
        );

        t.write("cifar-100-binary/test.bin", &[]);
        let msg = find("CIFAR100")
            .unwrap()
            .load(t.path(), Split::Test)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("length 0 bytes"), "{msg}");
    }

    #[test]
    fn label_out_of_range() {
        let t = TempDir::new("label");
        let mut data = binary_batch(3, false);
        data[3073] = 10;
        t.write("cifar-10-batches-bin/test_batch.bin", &data);
        let err = find("CIFAR10")
            .unwrap()
            .load(t.path(), Split::Test)
            .unwrap_err();
        assert!(
            matches!(
                err,
                DatasetError::LabelOutOfRange {
                    index: 1,
                    label: 10,
                    n_classes: 10,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("test_batch.bin"), "{err}");

        // A CIFAR-100 python batch read as CIFAR-10 has no 'labels' key.
        t.write(
            "x/cifar-10-batches-py/test_batch",
            &py2_cifar_batch(2, 100, true),
        );
        let err = find("CIFAR10")
            .unwrap()
            .load(&t.path().join("x"), Split::Test)
            .unwrap_err();
        assert!(err.to_string().contains("no 'labels' entry"), "{err}");
        // Labels of 0..100 in a CIFAR-10 python batch are out of range.
        let mut w = super::super::testutil::PickleWriter::new();
        w.op(b'}').put().op(b'(');
        w.string(b"data")
            .u8_array(&[2, 3072], &pixels(2, 3072), "u1");
        w.string(b"labels").int_list(&[3, 42]);
        w.op(b'u');
        t.write("y/cifar-10-batches-py/test_batch", &w.finish());
        let err = find("CIFAR10")
            .unwrap()
            .load(&t.path().join("y"), Split::Test)
            .unwrap_err();
        assert!(
            matches!(
                err,
                DatasetError::LabelOutOfRange {
                    index: 1,
                    label: 42,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn missing_dir_lists_where_it_looked() {
        let t = TempDir::new("missing");
        let dir = t.path().join("nowhere");
        let err = find("CIFAR10")
            .unwrap()
            .locate(&dir, Split::Train)
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&dir.join("cifar-10-batches-bin").display().to_string()),
            "{msg}"
        );
        assert!(
            msg.contains(&dir.join("cifar-10-batches-py").display().to_string()),
            "{msg}"
        );
        assert!(
            msg.contains("data_batch_1.bin") && msg.contains("data_batch_5"),
            "{msg}"
        );
        assert!(msg.contains("dataset.dataset_dir"), "{msg}");
        let DatasetError::NotFound { searched, .. } = err else {
            panic!()
        };
        assert_eq!(searched.len(), 4);

        // Partial train set: only the missing batch is named for that location.
        for b in 1..=4 {
            t.write(
                &format!("cifar-10-batches-bin/data_batch_{b}.bin"),
                &binary_batch(1, false),
            );
        }
        let err = find("CIFAR10")
            .unwrap()
            .load(t.path(), Split::Train)
            .unwrap_err();
        let DatasetError::NotFound { searched, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(searched[0].missing, vec!["data_batch_5.bin".to_string()]);

        let msg = find("CIFAR100")
            .unwrap()
            .load(&dir, Split::Test)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("cifar-100-binary") && msg.contains("cifar-100-python"),
            "{msg}"
        );
    }

    #[test]
    fn python_batch_errors_name_the_file() {
        let t = TempDir::new("pyerr");
        let info = find("CIFAR10").unwrap();
        let load_bytes = |name: &str, bytes: &[u8]| {
            t.write(&format!("{name}/cifar-10-batches-py/test_batch"), bytes);
            info.load(&t.path().join(name), Split::Test).unwrap_err()
        };

        // Unknown opcode (0xff) right after PROTO.
        let err = load_bytes("op", &[0x80, 2, 0xff, b'.']);
        assert!(
            matches!(
                err,
                DatasetError::UnknownOpcode {
                    opcode: 0xff,
                    offset: 2,
                    ..
                }
            ),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("test_batch") && msg.contains("0xff") && msg.contains("offset 2"),
            "{msg}"
        );

        // Truncated pickle.
        let full = py2_cifar_batch(2, 10, false);
        let err = load_bytes("trunc", &full[..full.len() / 2]);
        assert!(matches!(err, DatasetError::Pickle { .. }), "{err}");
        assert!(err.to_string().contains("test_batch"), "{err}");

        // Wrong dtype.
        let mut w = super::super::testutil::PickleWriter::new();
        w.op(b'}').put().op(b'(');
        w.string(b"data")
            .u8_array(&[1, 3072], &pixels(1, 3072), "i1");
        w.string(b"labels").int_list(&[3]).op(b'u');
        let err = load_bytes("dtype", &w.finish());
        assert!(err.to_string().contains("'|u1'"), "{err}");

        // Wrong shape / byte count.
        let mut w = super::super::testutil::PickleWriter::new();
        w.op(b'}').put().op(b'(');
        w.string(b"data")
            .u8_array(&[1, 1024], &pixels(1, 1024), "u1");
        w.string(b"labels").int_list(&[3]).op(b'u');
        let err = load_bytes("shape", &w.finish());
        assert!(err.to_string().contains("expected (N, 3072)"), "{err}");
        let mut w = super::super::testutil::PickleWriter::new();
        w.op(b'}').put().op(b'(');
        w.string(b"data")
            .u8_array(&[2, 3072], &pixels(1, 3072), "u1");
        w.string(b"labels").int_list(&[3, 4]).op(b'u');
        let err = load_bytes("bytes", &w.finish());
        assert!(
            err.to_string()
                .contains("needs 6144 bytes but its data holds 3072"),
            "{err}"
        );

        // Label count mismatch.
        let mut w = super::super::testutil::PickleWriter::new();
        w.op(b'}').put().op(b'(');
        w.string(b"data")
            .u8_array(&[2, 3072], &pixels(2, 3072), "u1");
        w.string(b"labels").int_list(&[3]).op(b'u');
        let err = load_bytes("count", &w.finish());
        assert!(
            err.to_string()
                .contains("holds 2 images but entry 'labels' holds 1"),
            "{err}"
        );

        // Not a dict.
        let err = load_bytes("list", &[0x80, 2, b']', b'.']);
        assert!(err.to_string().contains("expected a pickled dict"), "{err}");
    }
}
