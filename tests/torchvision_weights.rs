//! torchvision's ImageNet state dicts load into the reference's ImageNet networks under a name
//! mapping (host/src/train/torchvision.rs) and give torchvision's own logits:
//! - resnet18, resnet34, resnext50_32x4d, densenet121 (with `model.densenet.relu_before_pool
//!   True`; without it the reference's DenseNet differs by that ReLU, and the logits do too),
//!   and torchvision's VGG class with and without BN (a smaller feature stack at 224x224: the
//!   classifier is torchvision's fixed one), random weights and BN statistics, 2 images;
//! - the full-size torchvision state dicts (resnet18, resnet34, resnext50_32x4d, densenet121,
//!   vgg16_bn, vgg16) map onto the reference's state-dict lists of the configs/imagenet/
//!   networks, name for name and shape for shape;
//! - `imgclf train` fine-tunes from a torchvision file given as `train.checkpoint`.

use imgclf::registry::{Discovery, Registry};
use imgclf::setup::{setup, Purpose, Request};
use imgclf_tests::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Tensor};

fn python() -> PathBuf {
    std::env::var_os("IMGCLF_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| "python3".into())
}

/// One torchvision model against one imgclf config.
struct Case {
    id: &'static str,
    /// torchvision.models constructor (or "VGG", see tests/python/torchvision_weights.py).
    model: &'static str,
    kwargs: Value,
    size: i64,
    config: &'static str,
    overrides: &'static [&'static str],
    /// Whether the logits must agree (false: the computations differ, so they must not).
    same: bool,
}

fn cases() -> Vec<Case> {
    let n10 = json!({"num_classes": 10});
    // cfg [8, 8, M, 16, M, 16, 16, 16, M, 32, M, 512, M]: stages of 2, 1, 3, 1, 1 convs.
    let vgg = |bn: bool| {
        json!({"num_classes": 10, "batch_norm": bn,
               "cfg": [8, 8, "M", 16, "M", 16, 16, 16, "M", 32, "M", 512, "M"]})
    };
    const VGG_SMALL: &[&str] = &[
        "model.vgg.n_channels",
        "[8, 16, 16, 32, 512]",
        "model.vgg.n_layers",
        "[2, 1, 3, 1, 1]",
    ];
    vec![
        Case {
            id: "resnet18",
            model: "resnet18",
            kwargs: n10.clone(),
            size: 64,
            config: "configs/imagenet/resnet18.yaml",
            overrides: &[],
            same: true,
        },
        Case {
            id: "resnet34",
            model: "resnet34",
            kwargs: n10.clone(),
            size: 64,
            config: "configs/imagenet/resnet34.yaml",
            overrides: &[],
            same: true,
        },
        Case {
            id: "resnext50_32x4d",
            model: "resnext50_32x4d",
            kwargs: n10.clone(),
            size: 64,
            config: "configs/imagenet/resnext50_32x4d.yaml",
            overrides: &[],
            same: true,
        },
        Case {
            id: "densenet121",
            model: "densenet121",
            kwargs: n10.clone(),
            size: 64,
            config: "configs/imagenet/densenet121.yaml",
            overrides: &["model.densenet.relu_before_pool", "True"],
            same: true,
        },
        // The reference's DenseNet pools bn_last's output without torchvision's ReLU.
        Case {
            id: "densenet121_as_the_reference",
            model: "densenet121",
            kwargs: n10,
            size: 64,
            config: "configs/imagenet/densenet121.yaml",
            overrides: &[],
            same: false,
        },
        Case {
            id: "vgg_bn",
            model: "VGG",
            kwargs: vgg(true),
            size: 224,
            config: "configs/imagenet/vgg16.yaml",
            overrides: VGG_SMALL,
            same: true,
        },
        Case {
            id: "vgg",
            model: "VGG",
            kwargs: vgg(false),
            size: 224,
            config: "configs/imagenet/vgg16.yaml",
            overrides: &[
                "model.vgg.n_channels",
                "[8, 16, 16, 32, 512]",
                "model.vgg.n_layers",
                "[2, 1, 3, 1, 1]",
                "model.vgg.use_bn",
                "False",
            ],
            same: true,
        },
    ]
}

fn request(case: &Case) -> Request {
    let mut overrides: Vec<String> = case.overrides.iter().map(|s| s.to_string()).collect();
    let size = case.size.to_string();
    for w in [
        "dataset.image_size",
        &size,
        "dataset.n_classes",
        "10",
        "device",
        "cpu",
    ] {
        overrides.push(w.to_string());
    }
    Request {
        plugin: None,
        config_file: Some(workspace().join(case.config)),
        overrides,
        resume_config: None,
    }
}

/// Runs the Python side once: the small cases' files, and the full-size key/shape lists.
fn torchvision_files(dir: &Path, cases: &[Case], full: &[&str]) -> Value {
    let spec: Vec<Value> = cases
        .iter()
        .map(|c| json!({"id": c.id, "model": c.model, "kwargs": c.kwargs, "size": c.size}))
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    let cases_path = dir.join("cases.json");
    std::fs::write(&cases_path, Value::Array(spec).to_string()).unwrap();
    let shapes = dir.join("shapes.json");
    let out = Command::new(python())
        .arg(workspace().join("tests/python/torchvision_weights.py"))
        .arg("--cases")
        .arg(&cases_path)
        .arg("--out")
        .arg(dir)
        .arg("--shapes")
        .arg(&shapes)
        .arg("--full")
        .args(full)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} (set IMGCLF_PYTHON to a Python with torch and torchvision, or \
                 run `cargo xtask test`): {e}",
                python().display()
            )
        });
    assert!(
        out.status.success(),
        "tests/python/torchvision_weights.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(&shapes).unwrap()).unwrap()
}

/// `name [shape]` lines of a reference state-dict list (tests/data/reference/state_dict).
fn reference_list(case: &str) -> BTreeSet<String> {
    let path = workspace().join(format!("tests/data/reference/state_dict/{case}.txt"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.rsplit_once(' ').unwrap().0.trim().to_string())
        .collect()
}

#[test]
fn torchvision_weights_give_torchvisions_logits() {
    let dir = scratch("torchvision-weights");
    let cases = cases();
    let full = [
        "resnet18",
        "resnet34",
        "resnext50_32x4d",
        "densenet121",
        "vgg16_bn",
        "vgg16",
    ];
    let shapes = torchvision_files(&dir, &cases, &full);
    tch::set_num_threads(1);
    let reg = Registry::discover(&Discovery {
        cli_paths: vec![plugin_dir()],
        files: vec![],
    })
    .unwrap();

    let mut failures = Vec::new();
    let mut table = Vec::new();
    for case in &cases {
        let pth = dir.join(format!("{}.pth", case.id));
        let s = setup(&reg, &request(case), Purpose::Evaluate)
            .unwrap_or_else(|e| panic!("{}: {e:#}", case.id));
        let mut model = imgclf::train::build_model(&reg, &s, Device::Cpu).unwrap();
        let tensors = model.tensors().unwrap();
        let loaded = imgclf::train::checkpoint::load(&pth).unwrap();
        if let Err(e) = imgclf::train::checkpoint::copy_into_model(&tensors, &loaded.model, &pth) {
            failures.push(format!("{}: {e:#}", case.id));
            continue;
        }
        let (expected, _) =
            imgclf::io::load_safetensors(&dir.join(format!("{}.safetensors", case.id))).unwrap();
        let get = |k: &str| -> &Tensor { &expected.iter().find(|(n, _)| n == k).unwrap().1 };
        let logits = tch::no_grad(|| model.forward(get("input"), false)).unwrap();
        let want = get("logits");
        let diff = (&logits - want).abs().max().double_value(&[]);
        let scale = want.abs().max().double_value(&[]);
        // Ten times PyTorch's own float32 rounding floor, and never under 1e-5 of the scale.
        let floor = get("floor").double_value(&[0]);
        let tolerance = (10.0 * floor).max(1e-5 * scale.max(1.0));
        table.push(format!(
            "{:<30} max abs diff {diff:.2e} (tolerance {tolerance:.2e}, |logit| <= {scale:.2})",
            case.id
        ));
        match (case.same, diff <= tolerance) {
            (true, false) => failures.push(format!(
                "{}: logits differ from torchvision's by {diff:.3e} (tolerance {tolerance:.2e})",
                case.id
            )),
            (false, true) => failures.push(format!(
                "{}: logits equal torchvision's ({diff:.3e}), yet the networks differ",
                case.id
            )),
            _ => {}
        }
        let _ = std::fs::remove_file(&pth);
    }

    // Full size: torchvision's key/shape lists, renamed, are the reference's state dicts.
    for name in full {
        let reference_case = match name {
            "vgg16_bn" | "vgg16" => "imagenet_vgg16".to_string(),
            other => format!("imagenet_{other}"),
        };
        let mut want = reference_list(&reference_case);
        if name == "vgg16" {
            want.retain(|l| !l.contains(".bn"));
        }
        let entries: Vec<(String, Vec<i64>)> =
            serde_json::from_value(shapes[name].clone()).unwrap();
        let keys: Vec<(&str, usize)> = entries.iter().map(|(k, s)| (k.as_str(), s.len())).collect();
        let Some((_, names)) = imgclf::train::torchvision::reference_names(&keys) else {
            failures.push(format!(
                "{name}: not recognised as a torchvision state dict"
            ));
            continue;
        };
        let got: BTreeSet<String> = entries
            .iter()
            .map(|(k, s)| format!("{} {s:?}", names[k]))
            .collect();
        if got != want {
            failures.push(format!(
                "{name} vs {reference_case}: only in torchvision's (renamed): {:?}; only in the \
                 reference's: {:?}",
                got.difference(&want).take(5).collect::<Vec<_>>(),
                want.difference(&got).take(5).collect::<Vec<_>>()
            ));
        } else {
            table.push(format!(
                "{name:<30} {} tensors map onto {reference_case}",
                got.len()
            ));
        }
    }
    eprintln!("{}", table.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn train_fine_tunes_from_a_torchvision_file() {
    let dir = scratch("torchvision-train");
    let cases: Vec<Case> = cases().into_iter().filter(|c| c.id == "resnet18").collect();
    torchvision_files(&dir.join("tv"), &cases, &[]);
    let pth = dir.join("tv/resnet18.pth");
    let data = dir.join("data");
    write_image_folder(&data, &["a", "b"], 2);
    let base = |out: &Path, config: &str| -> Vec<String> {
        [
            "train",
            "--config",
            config,
            "train.checkpoint",
            pth.to_str().unwrap(),
            "dataset.dataset_dir",
            data.to_str().unwrap(),
            "dataset.image_size",
            "64",
            "dataset.n_classes",
            "10",
            "device",
            "cpu",
            "train.batch_size",
            "2",
            "validation.batch_size",
            "2",
            "train.dataloader.num_workers",
            "1",
            "validation.dataloader.num_workers",
            "1",
            "scheduler.epochs",
            "1",
            "train.output_dir",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let (code, _, err) =
        run(imgclf(&workspace()).args(base(&dir.join("run"), "configs/imagenet/resnet18.yaml")));
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("torchvision ResNet/ResNeXt state dict"),
        "no word of the mapping: {err}"
    );
    // resnet18's weights do not fit resnet34: the error says what is missing and why.
    let (code, _, err) =
        run(imgclf(&workspace()).args(base(&dir.join("run34"), "configs/imagenet/resnet34.yaml")));
    assert_ne!(code, 0);
    assert!(
        err.contains("missing") && err.contains("stage1.block3.conv1.weight"),
        "{err}"
    );
    assert!(err.contains("torchvision"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
