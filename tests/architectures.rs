//! Same weights, same outputs: every architecture and option of the reference, checked against
//! PyTorch on 3x32x32 (generated CIFAR-10/100 files) and 1x28x28 (real Fashion-MNIST) images,
//! and the ImageNet forms (`model.type imagenet`, tests/python/reference_imagenet_models.py) on
//! a generated image folder of 3x64x64 PNG images (`dataset.name ImageNet`, validation transform
//! without resize, so the network sees the pixels as PyTorch does).
//!
//! One Python process (tests/python/architecture_ground_truth.py, with the independent models of
//! tests/python/reference_models.py) reads the same config file and overrides as imgclf, builds
//! each case's network, randomises every weight, BN affine parameter and BN running statistic,
//! and writes the state dict under the reference's names, its eval-mode logits, one training
//! step (where training is deterministic) and how the reference initialises each tensor. Then:
//! - `imgclf evaluate --config configs/cifar/<model>.yaml --plugin <model> ...` loads that state
//!   dict and its `predictions.npz` logits must equal PyTorch's to float32 rounding: within
//!   [`MULTIPLE`] times the floor the ground truth measures on this machine (PyTorch's own
//!   logits with oneDNN off, with another thread count, and from one-ulp perturbations of the
//!   weights and images);
//! - the same model in this process takes the same training step (logits, every gradient, BN
//!   statistics after the step);
//! - a fresh model's parameters are drawn as the reference draws them, and its BN buffers hold
//!   what the reference's hold after it is built.
//!
//! Every case runs; a failure lists each disagreeing case with the command that reproduces it.
//!
//! The comparison is of the architectures, with ATen's BatchNorm: this binary (and every imgclf
//! it starts) runs with `IMGCLF_FUSED_BN_RELU=0`. The fused CPU BatchNorm + ReLU
//! (`plugin-api/cpp/bn_relu.cpp`) sums in another order, a change of float rounding larger
//! than the one-ulp perturbations that set this file's floors, and enough to flip a ReLU whose
//! input is a near-tie: resnext_2x2d@FashionMNIST has one pre-activation of 1.2e-6 in
//! stage2.block2, whose flip moves that BN's bias gradient by 4.4e-4. The fused op is compared
//! with ATen's ops by plugin-api's unit tests (values, gradients, running statistics) and, over
//! whole training runs, by tests/device_step.rs.

use imgclf::registry::{Discovery, Registry};
use imgclf::setup::{setup, Purpose, Request};
use imgclf_plugin_api::Kind;
use imgclf_tests::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Tensor};

/// Sets `IMGCLF_FUSED_BN_RELU=0` before `main`, while the process has one thread (see the top
/// of this file): the plugins read it once, at their first training-mode BatchNorm.
#[used]
#[link_section = ".init_array"]
static ATEN_BATCH_NORM: extern "C" fn() = {
    extern "C" fn aten_batch_norm() {
        std::env::set_var("IMGCLF_FUSED_BN_RELU", "0");
    }
    aten_batch_norm
};

/// The tolerance of every compared tensor, in multiples of its measured floor: the largest
/// change of PyTorch's own result when only float32 rounding changes (oneDNN off, another
/// number of threads, one-ulp perturbations of the weights and the input; measured per case by
/// tests/python/architecture_ground_truth.py on the machine that runs the test).
const MULTIPLE: f64 = 10.0;
/// Test images per dataset.
const N_IMAGES: usize = 24;
/// Side of the generated ImageNet-folder images (the ImageNet stem and four stages leave 2x2).
const IMAGENET_SIZE: u32 = 64;
/// Images per class (two classes) of the generated ImageNet folder.
const IMAGENET_PER_CLASS: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Dataset {
    Cifar10,
    Cifar100,
    FashionMnist,
    /// An image folder read as `dataset.name ImageNet`, with `model.type imagenet` networks.
    ImageNet,
}

impl Dataset {
    fn name(self) -> &'static str {
        match self {
            Dataset::Cifar10 => "CIFAR10",
            Dataset::Cifar100 => "CIFAR100",
            Dataset::FashionMnist => "FashionMNIST",
            Dataset::ImageNet => "ImageNet",
        }
    }
}

use Dataset::{Cifar10, Cifar100, FashionMnist, ImageNet};
const BOTH: &[Dataset] = &[Cifar10, FashionMnist];

/// What `imgclf evaluate` must do for a case.
#[derive(Clone, Copy)]
enum Expect {
    /// Logits equal to PyTorch's.
    SameLogits,
    /// A config error (the reference cannot build the network either) whose message contains
    /// each of these (lower-cased) words.
    ConfigError(&'static [&'static str]),
}

struct Case {
    /// Says what the case exercises.
    label: &'static str,
    /// Plugin, model and `configs/cifar/<plugin>.yaml`.
    plugin: &'static str,
    /// `model.<plugin>.<key> <value>` overrides. Cases set every key they rely on, so the values
    /// in the config file do not matter.
    options: &'static [(&'static str, &'static str)],
    /// Overrides outside `model.<plugin>` (`model.init_mode`).
    extra: &'static [(&'static str, &'static str)],
    datasets: &'static [Dataset],
    expect: Expect,
}

const fn case(
    label: &'static str,
    plugin: &'static str,
    options: &'static [(&'static str, &'static str)],
) -> Case {
    Case {
        label,
        plugin,
        options,
        extra: &[],
        datasets: BOTH,
        expect: Expect::SameLogits,
    }
}

/// Small depths and widths; between them every block type, shortcut kind and option of the
/// reference's `models/cifar/`.
const CASES: &[Case] = &[
    // VGG flattens its last map into fc. 32x32 -> 1x1 after five pools; on 28x28 the fifth pool
    // meets a 1x1 map (0x0 out) and the reference fails to build: a config error naming the size.
    Case {
        datasets: &[Cifar10, Cifar100],
        ..case(
            "vgg_bn",
            "vgg",
            &[
                ("n_channels", "[4, 8, 8, 16, 16]"),
                ("n_layers", "[1, 1, 2, 1, 1]"),
                ("use_bn", "True"),
            ],
        )
    },
    Case {
        datasets: &[Cifar10],
        ..case(
            "vgg_without_bn",
            "vgg",
            &[
                ("n_channels", "[4, 8, 8, 16, 16]"),
                ("n_layers", "[1, 2, 1, 1, 1]"),
                ("use_bn", "False"),
            ],
        )
    },
    Case {
        datasets: &[FashionMnist],
        expect: Expect::ConfigError(&["image", "28"]),
        ..case(
            "vgg_28x28_has_no_feature_map",
            "vgg",
            &[
                ("n_channels", "[4, 8, 8, 16, 16]"),
                ("n_layers", "[1, 1, 1, 1, 1]"),
                ("use_bn", "True"),
            ],
        )
    },
    Case {
        extra: &[("model.init_mode", "kaiming_fan_in")],
        ..case(
            "resnet_basic_fan_in",
            "resnet",
            &[
                ("depth", "8"),
                ("block_type", "basic"),
                ("initial_channels", "4"),
            ],
        )
    },
    case(
        "resnet_bottleneck",
        "resnet",
        &[
            ("depth", "11"),
            ("block_type", "bottleneck"),
            ("initial_channels", "4"),
        ],
    ),
    case(
        "resnet_preact_basic_preact_stage_2_only",
        "resnet_preact",
        &[
            ("depth", "14"),
            ("block_type", "basic"),
            ("initial_channels", "4"),
            ("remove_first_relu", "False"),
            ("add_last_bn", "False"),
            ("preact_stage", "[False, True, False]"),
        ],
    ),
    case(
        "resnet_preact_bottleneck_wo_first_relu_w_last_bn",
        "resnet_preact",
        &[
            ("depth", "11"),
            ("block_type", "bottleneck"),
            ("initial_channels", "4"),
            ("remove_first_relu", "True"),
            ("add_last_bn", "True"),
            ("preact_stage", "[True, False, True]"),
        ],
    ),
    // Dropout is inactive in eval mode; widening 1 gives an identity shortcut in stage 1.
    case(
        "wrn_dropout",
        "wrn",
        &[
            ("depth", "10"),
            ("initial_channels", "4"),
            ("widening_factor", "2"),
            ("drop_rate", "0.3"),
        ],
    ),
    case(
        "wrn_identity_shortcut",
        "wrn",
        &[
            ("depth", "16"),
            ("initial_channels", "4"),
            ("widening_factor", "1"),
            ("drop_rate", "0.0"),
        ],
    ),
    // Transition widths are truncated: growth 3, 2 * 3 + 3 = 9 channels * 0.5 -> 4.
    Case {
        datasets: &[Cifar10, Cifar100, FashionMnist],
        ..case(
            "densenet_bc_dropout",
            "densenet",
            &[
                ("depth", "10"),
                ("block_type", "bottleneck"),
                ("growth_rate", "3"),
                ("drop_rate", "0.2"),
                ("compression_rate", "0.5"),
            ],
        )
    },
    case(
        "densenet_basic_compression_0.7",
        "densenet",
        &[
            ("depth", "10"),
            ("block_type", "basic"),
            ("growth_rate", "4"),
            ("drop_rate", "0.0"),
            ("compression_rate", "0.7"),
        ],
    ),
    case(
        "densenet_basic_no_compression",
        "densenet",
        &[
            ("depth", "7"),
            ("block_type", "basic"),
            ("growth_rate", "3"),
            ("drop_rate", "0.0"),
            ("compression_rate", "1.0"),
        ],
    ),
    // Widths 4, 4.5, 5, ... round half to even (numpy): 4 4 5 6 6 6 7; shortcuts: identity,
    // zero-padded, pooled + padded, pooled without padding.
    case(
        "pyramidnet_basic_half_to_even_widths",
        "pyramidnet",
        &[
            ("depth", "14"),
            ("initial_channels", "4"),
            ("block_type", "basic"),
            ("alpha", "3"),
        ],
    ),
    case(
        "pyramidnet_bottleneck",
        "pyramidnet",
        &[
            ("depth", "11"),
            ("initial_channels", "4"),
            ("block_type", "bottleneck"),
            ("alpha", "6"),
        ],
    ),
    case(
        "pyramidnet_bottleneck_fractional_steps",
        "pyramidnet",
        &[
            ("depth", "20"),
            ("initial_channels", "4"),
            ("block_type", "bottleneck"),
            ("alpha", "7"),
        ],
    ),
    case(
        "resnext_2x2d",
        "resnext",
        &[
            ("depth", "20"),
            ("initial_channels", "8"),
            ("cardinality", "2"),
            ("base_channels", "2"),
        ],
    ),
    case(
        "resnext_4x1d_depthwise_stage_1",
        "resnext",
        &[
            ("depth", "11"),
            ("initial_channels", "4"),
            ("cardinality", "4"),
            ("base_channels", "1"),
        ],
    ),
    // Eval mode averages the two branches whatever the shake options; stage 1's first block has
    // a stride-1 skip (16 -> 8 channels) in the first case, an identity in the second.
    case(
        "shake_shake_2x8d",
        "shake_shake",
        &[
            ("depth", "8"),
            ("initial_channels", "8"),
            ("shake_forward", "True"),
            ("shake_backward", "True"),
            ("shake_image", "True"),
        ],
    ),
    // Without shake, training mode is deterministic too (both branches weighted 1/2 forward and
    // backward), so its training step is compared.
    case(
        "shake_shake_2x8d_no_shake",
        "shake_shake",
        &[
            ("depth", "8"),
            ("initial_channels", "8"),
            ("shake_forward", "False"),
            ("shake_backward", "False"),
            ("shake_image", "False"),
        ],
    ),
    case(
        "shake_shake_2x16d_shake_backward_only",
        "shake_shake",
        &[
            ("depth", "14"),
            ("initial_channels", "16"),
            ("shake_forward", "False"),
            ("shake_backward", "True"),
            ("shake_image", "False"),
        ],
    ),
    // The reference's SE network always initialises fan-out, whatever model.init_mode says.
    Case {
        extra: &[("model.init_mode", "kaiming_fan_in")],
        ..case(
            "se_resnet_preact_basic_init_mode_ignored",
            "se_resnet_preact",
            &[
                ("depth", "8"),
                ("initial_channels", "16"),
                ("se_reduction", "4"),
                ("block_type", "basic"),
                ("remove_first_relu", "False"),
                ("add_last_bn", "False"),
                ("preact_stage", "[True, True, True]"),
            ],
        )
    },
    case(
        "se_resnet_preact_bottleneck_wo_first_relu_w_last_bn",
        "se_resnet_preact",
        &[
            ("depth", "11"),
            ("initial_channels", "8"),
            ("se_reduction", "8"),
            ("block_type", "bottleneck"),
            ("remove_first_relu", "True"),
            ("add_last_bn", "True"),
            ("preact_stage", "[False, True, True]"),
        ],
    ),
    // The reference's models/imagenet/ (model.type imagenet): 7x7/2 stem and max-pool, four
    // stages of n_blocks; small widths, 64x64 images.
    imagenet(
        "imagenet_resnet_basic",
        "resnet",
        &[
            ("n_blocks", "[1, 2, 1, 1]"),
            ("block_type", "basic"),
            ("initial_channels", "4"),
        ],
    ),
    Case {
        extra: &[("model.init_mode", "kaiming_fan_in")],
        ..imagenet(
            "imagenet_resnet_bottleneck_fan_in",
            "resnet",
            &[
                ("n_blocks", "[1, 1, 2, 1]"),
                ("block_type", "bottleneck"),
                ("initial_channels", "4"),
            ],
        )
    },
    imagenet(
        "imagenet_resnet_preact_basic_preact_stages_1_3",
        "resnet_preact",
        &[
            ("n_blocks", "[1, 2, 1, 1]"),
            ("block_type", "basic"),
            ("initial_channels", "4"),
            ("remove_first_relu", "False"),
            ("add_last_bn", "False"),
            ("preact_stage", "[True, False, True, False]"),
        ],
    ),
    imagenet(
        "imagenet_resnet_preact_bottleneck_wo_first_relu_w_last_bn",
        "resnet_preact",
        &[
            ("n_blocks", "[1, 1, 1, 2]"),
            ("block_type", "bottleneck"),
            ("initial_channels", "4"),
            ("remove_first_relu", "True"),
            ("add_last_bn", "True"),
            ("preact_stage", "[False, True, True, True]"),
        ],
    ),
    imagenet(
        "imagenet_densenet_bc",
        "densenet",
        &[
            ("n_blocks", "[1, 2, 1, 2]"),
            ("block_type", "bottleneck"),
            ("growth_rate", "3"),
            ("drop_rate", "0.0"),
            ("compression_rate", "0.5"),
        ],
    ),
    imagenet(
        "imagenet_densenet_basic_dropout_compression_0.7",
        "densenet",
        &[
            ("n_blocks", "[2, 1, 1, 1]"),
            ("block_type", "basic"),
            ("growth_rate", "4"),
            ("drop_rate", "0.2"),
            ("compression_rate", "0.7"),
        ],
    ),
    // imgclf's option for torchvision's DenseNet: ReLU after bn_last.
    imagenet(
        "imagenet_densenet_relu_before_pool",
        "densenet",
        &[
            ("n_blocks", "[1, 1, 1, 1]"),
            ("block_type", "bottleneck"),
            ("growth_rate", "4"),
            ("drop_rate", "0.0"),
            ("compression_rate", "0.5"),
            ("relu_before_pool", "True"),
        ],
    ),
    imagenet(
        "imagenet_pyramidnet_basic",
        "pyramidnet",
        &[
            ("n_blocks", "[1, 2, 1, 1]"),
            ("initial_channels", "4"),
            ("block_type", "basic"),
            ("alpha", "3"),
        ],
    ),
    imagenet(
        "imagenet_pyramidnet_bottleneck",
        "pyramidnet",
        &[
            ("n_blocks", "[1, 1, 2, 1]"),
            ("initial_channels", "4"),
            ("block_type", "bottleneck"),
            ("alpha", "7"),
        ],
    ),
    imagenet(
        "imagenet_resnext_2x2d",
        "resnext",
        &[
            ("n_blocks", "[1, 2, 1, 1]"),
            ("initial_channels", "4"),
            ("cardinality", "2"),
            ("base_channels", "2"),
        ],
    ),
    // Dropout after fc1 and fc2: only eval mode is deterministic.
    imagenet(
        "imagenet_vgg_bn",
        "vgg",
        &[
            ("n_channels", "[4, 8, 8, 16, 16]"),
            ("n_layers", "[1, 1, 2, 1, 1]"),
            ("use_bn", "True"),
        ],
    ),
    imagenet(
        "imagenet_vgg_without_bn",
        "vgg",
        &[
            ("n_channels", "[4, 4, 8, 8, 8]"),
            ("n_layers", "[1, 2, 1, 1, 1]"),
            ("use_bn", "False"),
        ],
    ),
];

/// A case of a `model.type imagenet` network on the generated image folder.
const fn imagenet(
    label: &'static str,
    plugin: &'static str,
    options: &'static [(&'static str, &'static str)],
) -> Case {
    Case {
        datasets: &[ImageNet],
        ..case(label, plugin, options)
    }
}

/// A class-per-folder ImageNet layout (`train/` and `val/`, two classes) of noise PNG images of
/// exactly [`IMAGENET_SIZE`] pixels a side, so the validation transform without resize (a
/// center crop of the full size) hands PyTorch's ground truth and imgclf the same pixels.
fn write_imagenet_folder(dir: &Path) {
    for split in ["train", "val"] {
        for (k, class) in ["n01", "n02"].iter().enumerate() {
            let folder = dir.join(split).join(class);
            std::fs::create_dir_all(&folder).unwrap();
            for i in 0..IMAGENET_PER_CLASS {
                let n = (IMAGENET_SIZE * IMAGENET_SIZE * 3) as usize;
                let pixels = noise(n, 0x51ed_2701_0000_0000 + (k * 100 + i) as u64);
                image::RgbImage::from_raw(IMAGENET_SIZE, IMAGENET_SIZE, pixels)
                    .unwrap()
                    .save(folder.join(format!("img{i:02}.png")))
                    .unwrap();
            }
        }
    }
}

/// One case on one dataset.
struct Run<'a> {
    id: String,
    case: &'a Case,
    dataset: Dataset,
    config: String,
    /// Dotted overrides as passed to both imgclf and the Python ground truth.
    overrides: Vec<String>,
    dir: PathBuf,
}

impl Run<'_> {
    fn command_line(&self) -> String {
        format!(
            "imgclf evaluate --config {} --plugin {} {}",
            self.config,
            self.case.plugin,
            self.overrides
                .iter()
                .map(|w| if w.contains(' ') {
                    format!("'{w}'")
                } else {
                    w.clone()
                })
                .collect::<Vec<_>>()
                .join(" ")
        )
    }
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn noise(n: usize, mut state: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

/// A CIFAR test split in the official binary format: records of label byte(s) + 3072 pixels.
fn write_cifar_binary(dir: &Path, dataset: Dataset) {
    let (folder, file, label_bytes, classes) = match dataset {
        Cifar10 => ("cifar-10-batches-bin", "test_batch.bin", 1, 10),
        Cifar100 => ("cifar-100-binary", "test.bin", 2, 100),
        FashionMnist | ImageNet => unreachable!(),
    };
    let pixels = noise(N_IMAGES * 3072, 0x1234_5678_9abc_def1 + classes as u64);
    let mut bytes = Vec::new();
    for (i, image) in pixels.chunks(3072).enumerate() {
        let label = ((i * 7) % classes) as u8;
        // CIFAR-100 records carry the coarse label first, then the fine one.
        bytes.extend(std::iter::repeat_n(label, label_bytes));
        bytes.extend_from_slice(image);
    }
    let folder = dir.join(folder);
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join(file), bytes).unwrap();
}

fn python() -> PathBuf {
    std::env::var_os("IMGCLF_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| "python3".into())
}

/// Model components per loaded plugin, from `imgclf plugins list --json`.
fn loaded_models() -> (BTreeMap<String, Vec<String>>, Vec<Value>) {
    let (code, out, err) = run(imgclf(&workspace()).args(["plugins", "list", "--json"]));
    assert_eq!(code, 0, "imgclf plugins list --json: {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let mut models = BTreeMap::new();
    for p in v["plugins"].as_array().unwrap() {
        let names = p["components"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["kind"] == "model")
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect();
        models.insert(p["name"].as_str().unwrap().to_string(), names);
    }
    (models, v["errors"].as_array().cloned().unwrap_or_default())
}

fn f32s(t: &tch::Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(tch::Kind::Float).flatten(0, -1)).unwrap()
}

/// Compares imgclf's logits with PyTorch's: Ok(max abs diff) or a description of the mismatch.
fn compare(run: &Run, predictions: &Path, floor: f64) -> Result<f64, String> {
    if !(floor.is_finite() && floor > 0.0) {
        return Err(format!("no measured floor for the logits ({floor})"));
    }
    let tolerance = MULTIPLE * floor;
    let (shape, got) = npz_f32(predictions, "preds")?;
    let (expected, _) = imgclf::io::load_safetensors(&run.dir.join("expected.safetensors"))
        .map_err(|e| format!("{e:#}"))?;
    let want = &expected
        .iter()
        .find(|(n, _)| n == "logits")
        .ok_or("expected.safetensors lacks `logits`")?
        .1;
    let want_shape: Vec<usize> = want.size().iter().map(|&d| d as usize).collect();
    if shape != want_shape {
        return Err(format!(
            "preds has shape {shape:?}, PyTorch's logits {want_shape:?}"
        ));
    }
    let want = f32s(want);
    let cols = shape[1];
    let (mut worst, mut at, mut bad) = (0.0f64, 0, 0);
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        let d = (g as f64 - w as f64).abs();
        // NaN counts as a difference beyond every tolerance.
        let within = d <= tolerance;
        if !within {
            bad += 1;
        }
        if !worst.is_nan() && (d.is_nan() || d > worst) {
            worst = d;
            at = i;
        }
    }
    if bad > 0 {
        return Err(format!(
            "{bad} of {} logits differ beyond {tolerance:.2e} ({MULTIPLE} times the floor \
             {floor:.2e}); max abs diff {worst:.3e} \
             at image {} class {} (imgclf {}, PyTorch {})",
            got.len(),
            at / cols,
            at % cols,
            got[at],
            want[at]
        ));
    }
    Ok(worst)
}

/// The failure of a case whose plugin is not installed.
fn missing_plugin(r: &Run) -> String {
    format!(
        "{}: plugin `{}` is not loaded, so this case cannot be checked (not in {}: \
         `cargo xtask build` builds every crate under plugins/)",
        r.id,
        r.case.plugin,
        plugin_dir().display()
    )
}

/// The last lines of a command's stderr, for failure messages.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs `imgclf evaluate` for one case and judges it: a line for the summary table and, when the
/// case fails, what went wrong with the command that reproduces it.
fn check(f: &Fixture, r: &Run, models: &BTreeMap<String, Vec<String>>) -> (String, Option<String>) {
    let py = f.truth(r);
    let data_dir = |ds| f.data_dir(ds);
    let plugin = r.case.plugin;
    let line = |what: &str| format!("{:<66} {what}", r.id);
    if !models
        .get(plugin)
        .is_some_and(|m| m.iter().any(|n| n == plugin))
    {
        return (
            line("plugin missing"),
            Some(format!("{} (`{}`)", missing_plugin(r), r.command_line())),
        );
    }
    let eval_dir = r.dir.join("eval");
    let weights = r.dir.join("weights.safetensors");
    let mut args = vec![
        "evaluate".to_string(),
        "--config".into(),
        r.config.clone(),
        "--plugin".into(),
        plugin.into(),
    ];
    args.extend(r.overrides.iter().cloned());
    args.extend([
        "dataset.dataset_dir".into(),
        data_dir(r.dataset).to_string_lossy().into_owned(),
        "device".into(),
        "cpu".into(),
        "test.checkpoint".into(),
        weights.to_string_lossy().into_owned(),
        "test.output_dir".into(),
        eval_dir.to_string_lossy().into_owned(),
    ]);
    let reproduce = format!(
        "  reproduce: {} dataset.dataset_dir {} test.checkpoint {}",
        r.command_line(),
        data_dir(r.dataset).display(),
        weights.display()
    );
    match r.case.expect {
        Expect::ConfigError(words) => {
            if py["status"] != "reference_error" {
                return (
                    line("reference builds it"),
                    Some(format!(
                        "{}: the PyTorch reference was expected to refuse this network but \
                         built it: {py}",
                        r.id
                    )),
                );
            }
            let (code, _, err) = run(imgclf(&workspace()).args(&args));
            let lower = err.to_lowercase();
            if code != 0 && words.iter().all(|w| lower.contains(w)) {
                return (line("config error as expected"), None);
            }
            (
                line("no clear error"),
                Some(format!(
                    "{}: expected a config error mentioning {words:?} (the reference fails with \
                     {}), got exit code {code}:\n{}\n{reproduce}",
                    r.id,
                    py["message"],
                    tail(&err, 6)
                )),
            )
        }
        Expect::SameLogits => {
            if py["status"] != "ok" {
                return (
                    line("no ground truth"),
                    Some(format!("{}: the PyTorch ground truth failed: {py}", r.id)),
                );
            }
            let (code, _, err) = run(imgclf(&workspace()).args(&args));
            let verdict = if code != 0 {
                Err(format!(
                    "imgclf evaluate failed ({code}):\n{}",
                    tail(&err, 8)
                ))
            } else {
                compare(
                    r,
                    &eval_dir.join("predictions.npz"),
                    py["floors"]["logits"].as_f64().unwrap_or(f64::NAN),
                )
            };
            match verdict {
                Ok(diff) => (
                    line(&format!(
                        "max abs diff {diff:.2e} (|logit| <= {:.2})",
                        py["logit_absmax"].as_f64().unwrap_or(f64::NAN)
                    )),
                    None,
                ),
                Err(why) => (
                    line("MISMATCH"),
                    Some(format!("{}: {why}\n{reproduce}", r.id)),
                ),
            }
        }
    }
}

/// The generated datasets, every run, and the PyTorch ground truth for all of them, made once and
/// shared by the tests of this file.
struct Fixture {
    root: PathBuf,
    runs: Vec<Run<'static>>,
    results: Value,
}

impl Fixture {
    fn data_dir(&self, dataset: Dataset) -> PathBuf {
        self.root.join("data").join(dataset.name())
    }

    fn truth(&self, r: &Run) -> &Value {
        &self.results["cases"][&r.id]
    }
}

fn fixture() -> &'static Fixture {
    static FIXTURE: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    FIXTURE.get_or_init(prepare)
}

fn prepare() -> Fixture {
    let root = scratch("architectures");
    let mut f = Fixture {
        root: root.clone(),
        runs: Vec::new(),
        results: Value::Null,
    };
    write_cifar_binary(&f.data_dir(Cifar10), Cifar10);
    write_cifar_binary(&f.data_dir(Cifar100), Cifar100);
    fashion_mnist_subset(&f.data_dir(FashionMnist), 1, N_IMAGES);
    write_imagenet_folder(&f.data_dir(ImageNet));

    for case in CASES {
        for &dataset in case.datasets {
            let mut overrides = Vec::new();
            let config = if dataset == ImageNet {
                let size = IMAGENET_SIZE.to_string();
                for (k, v) in [
                    ("model.type", "imagenet"),
                    ("model.name", case.plugin),
                    ("dataset.image_size", size.as_str()),
                    ("dataset.n_classes", "10"),
                    ("tta.use_resize", "False"),
                    ("tta.use_center_crop", "True"),
                ] {
                    overrides.extend([k.to_string(), v.to_string()]);
                }
                "configs/datasets/imagenet.yaml".to_string()
            } else {
                format!("configs/cifar/{}.yaml", case.plugin)
            };
            for (k, v) in case.options {
                overrides.push(format!("model.{}.{k}", case.plugin));
                overrides.push(v.to_string());
            }
            for (k, v) in case.extra {
                overrides.push(k.to_string());
                overrides.push(v.to_string());
            }
            overrides.extend(["dataset.name".to_string(), dataset.name().to_string()]);
            let id = format!("{}@{}", case.label, dataset.name());
            f.runs.push(Run {
                dir: root.join("cases").join(&id),
                id,
                case,
                dataset,
                config,
                overrides,
            });
        }
    }

    // PyTorch: every case in one process (importing torch takes seconds).
    let manifest = json!({
        "cases": f.runs.iter().enumerate().map(|(i, r)| json!({
            "id": r.id,
            "config": workspace().join(&r.config),
            "overrides": r.overrides,
            "dataset_dir": f.data_dir(r.dataset),
            "out_dir": r.dir,
            "seed": i,
        })).collect::<Vec<_>>(),
    });
    let manifest_path = root.join("manifest.json");
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    let results_path = root.join("results.json");
    let out = Command::new(python())
        .arg(workspace().join("tests/python/architecture_ground_truth.py"))
        .arg("--manifest")
        .arg(&manifest_path)
        .arg("--results")
        .arg(&results_path)
        .arg("--reference-dir")
        .arg(workspace().join("tests/data/reference/state_dict"))
        .arg("--configs")
        .arg(workspace())
        .args(["--threads", "1"])
        // Idle OpenMP threads sleep instead of spinning (the two-thread floor variant).
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} (set IMGCLF_PYTHON to a Python with torch and numpy, or run \
                 `cargo xtask test`): {e}",
                python().display()
            )
        });
    f.results = std::fs::read_to_string(&results_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| {
            panic!(
                "the PyTorch ground truth wrote no results ({}; set IMGCLF_PYTHON to a Python \
                 with torch and numpy):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let reference_check: Vec<&str> = f.results["reference_check"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    let wrong: Vec<&&str> = reference_check
        .iter()
        .filter(|l| !l.starts_with("ok "))
        .collect();
    assert!(
        wrong.is_empty() && reference_check.len() >= 29,
        "the PyTorch ground truth itself disagrees with the reference's state dicts: {wrong:#?}"
    );
    f
}

/// Cases whose model no loaded plugin provides, and models without a case.
fn coverage_failures(models: &BTreeSet<String>) -> Vec<String> {
    let covered: BTreeSet<&str> = CASES.iter().map(|c| c.plugin).collect();
    models
        .iter()
        .filter(|m| !covered.contains(m.as_str()))
        .map(|m| {
            format!("model `{m}` has no case in tests/architectures.rs: add its options to CASES")
        })
        .collect()
}

fn report(what: &str, table: &[String], failures: &[String], total: usize) {
    eprintln!("{what}:\n{}", table.join("\n"));
    assert!(
        failures.is_empty(),
        "{} of {total} {what} fail:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn every_architecture_gives_pytorchs_logits_for_the_same_weights() {
    let f = fixture();
    let (models, load_errors) = loaded_models();
    let mut failures = coverage_failures(&models.values().flatten().cloned().collect());
    if !load_errors.is_empty() {
        failures.push(format!("plugins failed to load: {load_errors:?}"));
    }

    // Two imgclf processes at a time (CI has two cores; each spends most of its second loading
    // the plugins).
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut outcomes: Vec<(usize, String, Option<String>)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(r) = f.runs.get(i) else { break };
                        let (line, failure) = check(f, r, &models);
                        done.push((i, line, failure));
                    }
                    done
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    outcomes.sort_by_key(|o| o.0);
    let table: Vec<String> = outcomes.iter().map(|o| o.1.clone()).collect();
    failures.extend(outcomes.into_iter().filter_map(|o| o.2));
    report(
        "architecture cases (eval logits)",
        &table,
        &failures,
        f.runs.len(),
    );
}

/// How far `got` is from `want`, as (max abs diff, max |want|); an error for different shapes or
/// kinds. Integer tensors must be equal.
fn distance(name: &str, got: &Tensor, want: &Tensor) -> Result<(f64, f64), String> {
    if got.size() != want.size() {
        return Err(format!(
            "{name}: shape {:?}, PyTorch {:?}",
            got.size(),
            want.size()
        ));
    }
    if want.kind() == tch::Kind::Int64 {
        return if got.kind() == tch::Kind::Int64 && got.equal(want) {
            Ok((0.0, 0.0))
        } else {
            Err(format!("{name}: {got} (PyTorch {want})"))
        };
    }
    let diff = (got.to_kind(tch::Kind::Double) - want.to_kind(tch::Kind::Double)).abs();
    let d = diff.max().double_value(&[]);
    let scale = want.abs().max().double_value(&[]);
    Ok((if d.is_nan() { f64::INFINITY } else { d }, scale))
}

/// An error with its causes (`{:#}` of anyhow).
fn msg(x: impl std::fmt::Display) -> String {
    format!("{x:#}")
}

/// One training step of imgclf's model (in this process, through the same registry and setup as
/// the binary) from a case's weights, compared with PyTorch's: Ok(largest difference in units of
/// its tensor's tolerance, and that tensor) or what differs.
fn train_step(reg: &Registry, r: &Run, floors: &Value) -> Result<(f64, String), String> {
    let want: std::collections::HashMap<String, Tensor> =
        imgclf::io::load_safetensors(&r.dir.join("expected.safetensors"))
            .map_err(msg)?
            .0
            .into_iter()
            .collect();
    let get = |k: &str| {
        want.get(k)
            .ok_or_else(|| format!("expected.safetensors lacks {k}"))
    };
    let mut overrides = r.overrides.clone();
    overrides.extend(["device".to_string(), "cpu".to_string()]);
    let request = Request {
        plugin: Some(r.case.plugin.to_string()),
        config_file: Some(workspace().join(&r.config)),
        overrides,
        resume_config: None,
    };
    let s = setup(reg, &request, Purpose::Evaluate).map_err(msg)?;
    let mut model = imgclf::train::build_model(reg, &s, Device::Cpu).map_err(msg)?;
    let tensors = model.tensors().map_err(msg)?;
    let weights = r.dir.join("weights.safetensors");
    let loaded = imgclf::train::checkpoint::load(&weights).map_err(msg)?;
    imgclf::train::checkpoint::copy_into_model(&tensors, &loaded.model, &weights).map_err(msg)?;
    let logits = model.forward(get("train/input")?, true).map_err(msg)?;
    let mut checks = vec![(
        "train logits".to_string(),
        "train/logits".to_string(),
        distance("train logits", &logits, get("train/logits")?),
    )];
    logits
        .cross_entropy_for_logits(get("train/labels")?)
        .backward();
    for t in &tensors {
        let (name, got, key) = if t.trainable {
            (
                format!("gradient of {}", t.name),
                t.tensor.grad(),
                format!("grad/{}", t.name),
            )
        } else {
            (
                format!("{} after the step", t.name),
                t.tensor.shallow_clone(),
                format!("after/{}", t.name),
            )
        };
        let verdict = if got.defined() {
            distance(&name, &got, get(&key)?)
        } else {
            Err(format!("{name}: none"))
        };
        checks.push((name, key, verdict));
    }
    let (mut worst, mut worst_name) = (0.0f64, String::new());
    let mut problems = Vec::new();
    for (name, key, verdict) in checks {
        match verdict {
            // Equal (integer tensors have no floor).
            Ok((0.0, _)) => {}
            Ok((d, scale)) => {
                let floor = floors[&key].as_f64().unwrap_or(f64::NAN);
                let rel = d / (MULTIPLE * floor);
                if rel > worst {
                    (worst, worst_name) = (rel, name.clone());
                }
                if rel.is_nan() || rel > 1.0 {
                    problems.push(format!(
                        "{name}: max abs diff {d:.3e}, {rel:.1} times the tolerance ({MULTIPLE} \
                         times the floor {floor:.2e}; largest value {scale:.3e})"
                    ));
                }
            }
            Err(why) => problems.push(why),
        }
    }
    if problems.is_empty() {
        return Ok((worst, worst_name));
    }
    let n = problems.len();
    problems.truncate(8);
    Err(format!(
        "{n} tensors differ beyond their tolerance: {}{}",
        problems.join("; "),
        if n > 8 { "; ..." } else { "" }
    ))
}

#[test]
fn every_architecture_takes_pytorchs_training_step() {
    let f = fixture();
    // Tiny tensors; the other test of this file runs two imgclf processes meanwhile.
    tch::set_num_threads(1);
    let reg = Registry::discover(&Discovery {
        cli_paths: vec![plugin_dir()],
        files: vec![],
    })
    .unwrap();
    let models: BTreeSet<String> = reg
        .of_kind(Kind::Model)
        .map(|e| e.info.name.clone())
        .collect();
    let mut failures = coverage_failures(&models);
    let (mut table, mut total) = (Vec::new(), 0);
    for r in &f.runs {
        if matches!(r.case.expect, Expect::ConfigError(_)) {
            continue;
        }
        let line = |what: &str| format!("{:<66} {what}", r.id);
        if f.truth(r)["status"] != "ok" {
            total += 1;
            table.push(line("no ground truth"));
            failures.push(format!(
                "{}: the PyTorch ground truth failed: {}",
                r.id,
                f.truth(r)
            ));
            continue;
        }
        if f.truth(r)["train_step"] != true {
            continue; // dropout or shake: training mode is random
        }
        total += 1;
        if reg.get(Kind::Model, r.case.plugin).is_none() {
            table.push(line("plugin missing"));
            failures.push(missing_plugin(r));
            continue;
        }
        match train_step(&reg, r, &f.truth(r)["floors"]) {
            Ok((rel, name)) => {
                table.push(line(&format!("max diff {rel:.2} of tolerance ({name})")))
            }
            Err(why) => {
                table.push(line("MISMATCH"));
                failures.push(format!(
                    "{}: {why}\n  config: {} {}",
                    r.id,
                    r.config,
                    r.overrides.join(" ")
                ));
            }
        }
    }
    report(
        "architecture cases (training step)",
        &table,
        &failures,
        total,
    );
}

/// Whether `t` could be a draw from the reference's initial distribution `spec`
/// (`["normal", std]`, `["uniform", bound]`, `["const", v]`, `["any"]`, from
/// tests/python/reference_models.py's `init_spec`): None, or what is wrong. The mean square (and
/// the mean) of a normal draw, and the mean square of a uniform one, must lie within 5 standard
/// errors; the weights come from a fixed seed, so the verdict is deterministic.
fn init_mismatch(t: &Tensor, spec: &Value) -> Option<String> {
    let kind = spec[0].as_str().unwrap_or("?");
    let v = spec[1].as_f64().unwrap_or(f64::NAN);
    let x = Vec::<f64>::try_from(t.to_kind(tch::Kind::Double).flatten(0, -1)).ok()?;
    let n = x.len() as f64;
    let ms = x.iter().map(|a| a * a).sum::<f64>() / n;
    let mean = x.iter().sum::<f64>() / n;
    let max = x.iter().fold(0.0f64, |m, a| m.max(a.abs()));
    match kind {
        "any" => None,
        "const" => x
            .iter()
            .find(|a| (*a - v).abs() > 1e-6 * v.abs().max(1.0))
            .map(|a| format!("holds {a}, the reference {v}")),
        "normal" => {
            let z_ms = (ms / (v * v) - 1.0).abs() * (n / 2.0).sqrt();
            let z_mean = mean.abs() / (v / n.sqrt());
            (z_ms > 5.0 || z_mean > 5.0).then(|| {
                format!(
                    "std {:.4} (mean {mean:.2e}) over {n} values, the reference draws N(0, {v:.4}) \
                     ({z_ms:.1} / {z_mean:.1} standard errors off)",
                    ms.sqrt()
                )
            })
        }
        "uniform" => {
            let z = (ms - v * v / 3.0).abs() / (4.0 * v.powi(4) / 45.0 / n).sqrt();
            (max > v * (1.0 + 1e-6) || z > 5.0).then(|| {
                format!(
                    "max |x| {max:.4}, rms {:.4} over {n} values, the reference draws \
                     U(-{v:.4}, {v:.4}) ({z:.1} standard errors off)",
                    ms.sqrt()
                )
            })
        }
        other => Some(format!("unknown spec {other}")),
    }
}

/// Builds every case's model afresh (fixed seed, no checkpoint) and compares the tensors that
/// `select` picks with the reference's initial state.
fn check_initial_state(what: &str, select: fn(&imgclf_plugin_api::NamedTensor) -> bool) {
    let f = fixture();
    let reg = Registry::discover(&Discovery {
        cli_paths: vec![plugin_dir()],
        files: vec![],
    })
    .unwrap();
    let mut failures = Vec::new();
    let (mut table, mut total) = (Vec::new(), 0);
    for (i, r) in f.runs.iter().enumerate() {
        if matches!(r.case.expect, Expect::ConfigError(_)) {
            continue;
        }
        total += 1;
        let line = |what: &str| format!("{:<66} {what}", r.id);
        let spec = &f.truth(r)["init"];
        if !spec.is_object() {
            table.push(line("no ground truth"));
            failures.push(format!(
                "{}: the PyTorch ground truth failed: {}",
                r.id,
                f.truth(r)
            ));
            continue;
        }
        if reg.get(Kind::Model, r.case.plugin).is_none() {
            table.push(line("plugin missing"));
            failures.push(missing_plugin(r));
            continue;
        }
        let mut overrides = r.overrides.clone();
        overrides.extend(["device".to_string(), "cpu".to_string()]);
        let request = Request {
            plugin: Some(r.case.plugin.to_string()),
            config_file: Some(workspace().join(&r.config)),
            overrides,
            resume_config: None,
        };
        tch::manual_seed(1000 + i as i64);
        let built = setup(&reg, &request, Purpose::Evaluate)
            .and_then(|s| imgclf::train::build_model(&reg, &s, Device::Cpu))
            .map_err(msg)
            .and_then(|m| m.tensors().map_err(msg));
        let tensors = match built {
            Ok(t) => t,
            Err(e) => {
                table.push(line("does not build"));
                failures.push(format!("{}: {e}", r.id));
                continue;
            }
        };
        let mut wrong: Vec<String> = tensors
            .iter()
            .filter(|t| select(t))
            .filter_map(|t| {
                let why = match spec.get(&t.name) {
                    Some(s) => init_mismatch(&t.tensor, s)?,
                    None => "is not in the reference's state dict".to_string(),
                };
                Some(format!("{} {why}", t.name))
            })
            .collect();
        if wrong.is_empty() {
            table.push(line("as the reference"));
        } else {
            table.push(line(&format!("{} tensors differ", wrong.len())));
            let n = wrong.len();
            wrong.truncate(6);
            failures.push(format!(
                "{}: {n} initial tensors differ from the reference's: {}{}\n  config: {} {}",
                r.id,
                wrong.join("; "),
                if n > 6 { "; ..." } else { "" },
                r.config,
                r.overrides.join(" ")
            ));
        }
    }
    report(what, &table, &failures, total);
}

/// Kaiming-normal weights with the fan of `model.init_mode` (always fan-out for
/// se_resnet_preact), PyTorch's uniform default for VGG's conv biases, zero Linear biases, BN
/// weight 1 and bias 0.
#[test]
fn every_architecture_initialises_its_parameters_like_the_reference() {
    check_initial_state("architecture cases (initial parameters)", |t| t.trainable);
}

/// The reference measures its feature size with one training-mode forward pass of a zero image
/// while building the network, which updates every BN once: a fresh reference model has
/// `num_batches_tracked` 1 and `running_var` 0.9 (0.9 * 1 + 0.1 * the zero variance of an
/// all-zero input), not PyTorch's defaults 0 and 1.
#[test]
fn every_architecture_starts_with_the_reference_bn_statistics() {
    check_initial_state("architecture cases (initial BN statistics)", |t| {
        !t.trainable
    });
}
