//! Helpers shared by the integration tests: where the built binary and plugins are, scratch
//! directories, and small datasets cut from the real Fashion-MNIST.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn from_env_or(var: &str, default: PathBuf) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or(default)
}

/// The `imgclf` binary built by `cargo xtask test`.
pub fn bin() -> PathBuf {
    let b = from_env_or("IMGCLF_BIN", workspace().join("target/debug/imgclf"));
    assert!(
        b.exists(),
        "{} missing: run the tests with `cargo xtask test`",
        b.display()
    );
    b
}

pub fn plugin_dir() -> PathBuf {
    from_env_or(
        "IMGCLF_PLUGIN_DIR",
        workspace().join("target/debug/plugins"),
    )
}

pub fn fixture_dir(name: &str) -> PathBuf {
    from_env_or(
        "IMGCLF_FIXTURE_DIR",
        workspace().join("target/debug/fixture-plugins"),
    )
    .join(name)
}

/// `imgclf` with a clean environment for plugin discovery, run in `cwd`.
pub fn imgclf(cwd: &Path) -> Command {
    let mut c = Command::new(bin());
    c.current_dir(cwd)
        .env_remove("IMGCLF_PLUGIN_PATH")
        .env("IMGCLF_QUIET_PLUGIN_PANICS", "1");
    c
}

pub fn run(c: &mut Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = c.output().expect("cannot run imgclf");
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into(),
        String::from_utf8_lossy(&stderr).into(),
    )
}

/// A fresh scratch directory under target/test-scratch.
pub fn scratch(name: &str) -> PathBuf {
    let d = workspace()
        .join("target/test-scratch")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

fn idx_file(path: &Path, magic: u32, dims: &[u32], data: &[u8]) {
    let mut bytes = magic.to_be_bytes().to_vec();
    for d in dims {
        bytes.extend_from_slice(&d.to_be_bytes());
    }
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

/// Writes an MNIST-format dataset (plain IDX files) into `dir`.
pub fn write_idx_dataset(
    dir: &Path,
    train: &imgclf::datasets::ImageSet,
    test: &imgclf::datasets::ImageSet,
) {
    std::fs::create_dir_all(dir).unwrap();
    for (prefix, set) in [("train", train), ("t10k", test)] {
        let n = set.len() as u32;
        idx_file(
            &dir.join(format!("{prefix}-images-idx3-ubyte")),
            0x803,
            &[n, set.height as u32, set.width as u32],
            &set.images,
        );
        let labels: Vec<u8> = set.labels.iter().map(|&l| l as u8).collect();
        idx_file(
            &dir.join(format!("{prefix}-labels-idx1-ubyte")),
            0x801,
            &[n],
            &labels,
        );
    }
}

fn head(set: &imgclf::datasets::ImageSet, n: usize) -> imgclf::datasets::ImageSet {
    let per = set.channels * set.height * set.width;
    imgclf::datasets::ImageSet {
        images: set.images[..n * per].to_vec(),
        labels: set.labels[..n].to_vec(),
        channels: set.channels,
        height: set.height,
        width: set.width,
    }
}

/// The first `n_train` / `n_test` images of the real Fashion-MNIST, as IDX files in `dir`.
pub fn fashion_mnist_subset(dir: &Path, n_train: usize, n_test: usize) {
    let info = imgclf::datasets::find("FashionMNIST").unwrap();
    let src = Path::new(FASHION_MNIST);
    let train = info
        .load(src, imgclf::datasets::Split::Train)
        .expect("Fashion-MNIST (apt-get install dataset-fashion-mnist)");
    let test = info.load(src, imgclf::datasets::Split::Test).unwrap();
    write_idx_dataset(dir, &head(&train, n_train), &head(&test, n_test));
}

/// Reads a JSON-lines file.
pub fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("bad line {l:?} in {}: {e}", path.display()))
        })
        .collect()
}

/// The float32 array `key` of an `.npz` file (as `imgclf evaluate` writes them): its shape and
/// its values in C order.
pub fn npz_f32(path: &Path, key: &str) -> Result<(Vec<usize>, Vec<f32>), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut entry = zip
        .by_name(&format!("{key}.npy"))
        .map_err(|e| format!("{}: no `{key}` array: {e}", path.display()))?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut entry, &mut bytes).map_err(|e| e.to_string())?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(format!("{}: `{key}` is not an .npy array", path.display()));
    }
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
    };
    let header = String::from_utf8_lossy(&bytes[start..start + len]).to_string();
    if !header.contains("'descr': '<f4'") || !header.contains("'fortran_order': False") {
        return Err(format!(
            "{}: `{key}` is not a C-order float32 array: {header}",
            path.display()
        ));
    }
    let shape: Vec<usize> = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| format!("{}: no shape in {header}", path.display()))?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|e| format!("shape {s:?}: {e}")))
        .collect::<Result<_, _>>()?;
    let data = &bytes[start + len..];
    if data.len() != 4 * shape.iter().product::<usize>() {
        return Err(format!(
            "{}: `{key}` holds {} bytes for shape {shape:?}",
            path.display(),
            data.len()
        ));
    }
    let values = data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((shape, values))
}

/// A small class-per-folder dataset in `dir/{train,val}/<class>/`: `per_class` images per
/// class and split, of odd sizes (a few pixels to ~70, both orientations), alternately JPEG
/// and PNG (one gray-scale PNG per class), each class with its own colour so that a model can
/// learn it. Returns the class names in torchvision's order.
pub fn write_image_folder(dir: &Path, classes: &[&str], per_class: usize) -> Vec<String> {
    let sizes = [
        (37u32, 29u32),
        (50, 41),
        (23, 64),
        (71, 33),
        (9, 12),
        (45, 45),
    ];
    for split in ["train", "val"] {
        for (k, class) in classes.iter().enumerate() {
            let folder = dir.join(split).join(class);
            std::fs::create_dir_all(&folder).unwrap();
            for i in 0..per_class {
                let (w, h) = sizes[(i + k) % sizes.len()];
                let base = [
                    (k * 80 % 256) as u8,
                    (255 - k * 60 % 256) as u8,
                    (k * 37 % 256) as u8,
                ];
                let img = image::RgbImage::from_fn(w, h, |x, y| {
                    let n = ((x * 7 + y * 13 + i as u32 * 5) % 40) as u8;
                    image::Rgb([
                        base[0].saturating_add(n),
                        base[1].saturating_sub(n),
                        base[2].wrapping_add(n),
                    ])
                });
                let path = match i % 3 {
                    0 => folder.join(format!("img{i:03}.jpg")),
                    1 => folder.join(format!("img{i:03}.PNG")),
                    _ => {
                        let gray = image::DynamicImage::ImageRgb8(img.clone()).into_luma8();
                        gray.save(folder.join(format!("img{i:03}.png"))).unwrap();
                        continue;
                    }
                };
                img.save(&path).unwrap();
            }
        }
    }
    let mut names: Vec<String> = classes.iter().map(|c| c.to_string()).collect();
    names.sort();
    names
}

/// A small CIFAR-10 in the official binary format (`cifar-10-batches-bin/`: five training
/// batches `data_batch_{1..5}.bin` of `per_batch` records and `test_batch.bin` of `n_test`;
/// each record a label byte and 3072 pixels, R then G then B planes). Pixels are
/// deterministic noise, labels cycle through the ten classes.
pub fn write_cifar10_binary(dir: &Path, per_batch: usize, n_test: usize) {
    let folder = dir.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&folder).unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut records = |n: usize, offset: usize| {
        let mut bytes = Vec::with_capacity(n * 3073);
        for i in 0..n {
            bytes.push(((i + offset) % 10) as u8);
            bytes.extend((0..3072).map(|_| {
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
            }));
        }
        bytes
    };
    for b in 1..=5 {
        let data = records(per_batch, b);
        std::fs::write(folder.join(format!("data_batch_{b}.bin")), data).unwrap();
    }
    let test = records(n_test, 0);
    std::fs::write(folder.join("test_batch.bin"), test).unwrap();
}

/// Splits a shell command line (single quotes group words, as in the reference README).
pub fn split_command(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for ch in s.chars() {
        match ch {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// A Python literal for a `KEY VALUE` override holding a JSON value (`True`, `0.02`, `sgd`).
pub fn literal(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Makes `imgclf` compute the network as PyTorch does, for the tests that follow PyTorch's
/// trajectory at one-ulp floors (optimizers, step hooks): ATen's BatchNorm rather than the fused
/// BatchNorm + ReLU. Pair it with `train.channels_last off` in the config (NCHW); both round
/// differently from PyTorch's eager network, beyond those floors. tests/device_step.rs compares
/// the fused op and NHWC with ATen's on their own.
pub fn as_pytorch_computes(c: &mut Command) -> &mut Command {
    c.env("IMGCLF_FUSED_BN_RELU", "0")
}

/// `imgclf train` of a small ResNet-preact (`depth`, `channels`) on the Fashion-MNIST files in
/// `data`, writing to `out`: CPU, seed 0, the test set as validation, no random augmentation,
/// NCHW and ATen's BatchNorm ([`as_pytorch_computes`]). Callers add their own keys.
pub fn pytorch_trajectory_train(data: &Path, out: &Path, depth: i64, channels: i64) -> Command {
    let mut c = imgclf(&workspace());
    c.args([
        "train",
        "--config",
        "configs/fashion_mnist/resnet_preact.yaml",
        "dataset.dataset_dir",
        data.to_str().unwrap(),
        "train.output_dir",
        out.to_str().unwrap(),
        "model.resnet_preact.depth",
        &depth.to_string(),
        "model.resnet_preact.initial_channels",
        &channels.to_string(),
        "train.use_test_as_val",
        "True",
        "train.val_first",
        "False",
        "augmentation.use_random_crop",
        "False",
        "augmentation.use_random_horizontal_flip",
        "False",
        "device",
        "cpu",
        "train.seed",
        "0",
        "train.channels_last",
        "off",
    ]);
    as_pytorch_computes(&mut c);
    c
}
