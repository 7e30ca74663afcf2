//! PyTorch checkpoints load unchanged: one PyTorch ResNet-preact saved as a bare `torch.save`
//! state dict, as the reference's checkpoint dict (zip and legacy format), as a DataParallel
//! state dict and as safetensors gives the same `imgclf evaluate` predictions, equal to
//! PyTorch's own logits, and serves as `train.checkpoint`.

use imgclf_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEPTH: &str = "8";

fn evaluate(data: &Path, ckpt: &Path, out: &Path) -> (Vec<usize>, Vec<f32>, String) {
    let (code, _, err) = run(imgclf(&workspace()).args([
        "evaluate",
        "--config",
        "configs/fashion_mnist/resnet_preact.yaml",
        "model.resnet_preact.depth",
        DEPTH,
        "dataset.dataset_dir",
        data.to_str().unwrap(),
        "test.checkpoint",
        ckpt.to_str().unwrap(),
        "test.output_dir",
        out.to_str().unwrap(),
    ]));
    assert_eq!(code, 0, "evaluate {}: {err}", ckpt.display());
    let (shape, preds) = npz_f32(&out.join("predictions.npz"), "preds").unwrap();
    (shape, preds, err)
}

#[test]
fn torch_save_checkpoints_evaluate_like_safetensors_and_pytorch() {
    let Some(python) = std::env::var_os("IMGCLF_PYTHON").map(PathBuf::from) else {
        eprintln!(
            "IMGCLF_PYTHON not set: no PyTorch to write the checkpoints (the torch.save reader's \
             unit tests in host/src/torch_file.rs use checked-in files)"
        );
        return;
    };
    let d = scratch("torch-checkpoints");
    let data = d.join("data");
    fashion_mnist_subset(&data, 64, 100);
    let saved = d.join("saved");
    let o = Command::new(&python)
        .arg(workspace().join("tests/python/save_torch_checkpoints.py"))
        .args(["--out", saved.to_str().unwrap()])
        .args(["--dataset-dir", data.to_str().unwrap(), "--depth", DEPTH])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "save_torch_checkpoints.py failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );

    let (shape, reference, _) = evaluate(&data, &saved.join("weights.safetensors"), &d.join("st"));
    assert_eq!(shape, [100, 10]);
    let (_, logits) = npz_f32(&saved.join("logits.npz"), "logits").unwrap();
    // The tolerance: ten times PyTorch's own rounding floor, measured on this machine.
    let (_, floor) = npz_f32(&saved.join("logits.npz"), "floor").unwrap();
    let tolerance = 10.0 * floor[0];
    assert!(tolerance > 0.0 && tolerance < 1e-3, "floor {floor:?}");
    let max_diff = reference
        .iter()
        .zip(&logits)
        .map(|(a, b)| (a - b).abs())
        .fold(
            0.0f32,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        );
    assert!(
        max_diff <= tolerance,
        "imgclf vs PyTorch logits differ by {max_diff}, beyond {tolerance} (10 times the floor)"
    );

    for (file, log) in [
        ("bare.pth", None),
        (
            "reference.pth",
            Some("loading its 'model' entry (ignoring optimizer, scheduler, epoch, global_step, config)"),
        ),
        (
            "reference_legacy.pth",
            Some("loading its 'model' entry (ignoring optimizer, scheduler, epoch, global_step, config)"),
        ),
        ("data_parallel.pth", Some("every key starts with `module.`")),
    ] {
        let (shape, preds, err) = evaluate(&data, &saved.join(file), &d.join(file));
        assert_eq!(shape, [100, 10], "{file}");
        assert!(preds == reference, "{file}: predictions differ from the safetensors ones");
        if let Some(log) = log {
            assert!(err.contains(log), "{file}: the log lacks {log:?}:\n{err}");
        }
    }

    // The reference checkpoint as initial weights: the validation before the first step sees
    // exactly these weights.
    let out = d.join("train");
    let (code, _, err) = run(imgclf(&workspace()).args([
        "train",
        "--config",
        "configs/fashion_mnist/resnet_preact.yaml",
        "model.resnet_preact.depth",
        DEPTH,
        "dataset.dataset_dir",
        data.to_str().unwrap(),
        "train.output_dir",
        out.to_str().unwrap(),
        "train.checkpoint",
        saved.join("reference.pth").to_str().unwrap(),
        "train.batch_size",
        "32",
        "scheduler.epochs",
        "1",
    ]));
    assert_eq!(code, 0, "{err}");
    let first_val = jsonl(&out.join("metrics.jsonl"))
        .into_iter()
        .find(|r| r["split"] == "val")
        .unwrap();
    let (loss, acc) = loss_and_accuracy(&data, &reference);
    let (val_loss, val_acc) = (
        first_val["loss"].as_f64().unwrap(),
        first_val["acc1"].as_f64().unwrap(),
    );
    assert!(
        (val_acc - acc).abs() < 1e-9 && (val_loss - loss).abs() < 1e-4,
        "first validation of a run from reference.pth: loss {val_loss} acc {val_acc}; the \
         weights evaluate to loss {loss} acc {acc}"
    );
}

/// Mean cross-entropy and accuracy of `logits` (N x 10) on the test labels in `data`.
fn loss_and_accuracy(data: &Path, logits: &[f32]) -> (f64, f64) {
    let test = imgclf::datasets::find("FashionMNIST")
        .unwrap()
        .load(data, imgclf::datasets::Split::Test)
        .unwrap();
    let (mut loss, mut correct) = (0.0, 0);
    for (row, &label) in logits.chunks(10).zip(&test.labels) {
        let row: Vec<f64> = row.iter().map(|&v| v as f64).collect();
        let max = row.iter().cloned().fold(f64::MIN, f64::max);
        let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        loss += lse - row[label as usize];
        let best = (0..10).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
        correct += (best == label as usize) as usize;
    }
    let n = test.labels.len() as f64;
    (loss / n, correct as f64 / n)
}

/// Without PyTorch at hand: the checked-in `torch.save` files reach the model through the CLI
/// (a DataParallel state dict loses its prefix, then does not fit ResNet-preact), and a
/// damaged file is an error naming it.
#[test]
fn checked_in_torch_save_files_through_evaluate() {
    let d = scratch("torch-checkpoints-cli");
    let data = d.join("data");
    fashion_mnist_subset(&data, 8, 8);
    let fixture = workspace().join("tests/data/torch_save/data_parallel.pth");
    let eval = |ckpt: &Path| {
        run(imgclf(&workspace()).args([
            "evaluate",
            "--config",
            "configs/fashion_mnist/resnet_preact.yaml",
            "model.resnet_preact.depth",
            DEPTH,
            "dataset.dataset_dir",
            data.to_str().unwrap(),
            "test.checkpoint",
            ckpt.to_str().unwrap(),
            "test.output_dir",
            d.join("eval").to_str().unwrap(),
        ]))
    };
    let (code, _, err) = eval(&fixture);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("every key starts with `module.`")
            && err.contains("data_parallel.pth does not fit this model")
            && err.contains("unexpected (2): bias, weight"),
        "{err}"
    );

    let bytes = std::fs::read(&fixture).unwrap();
    let cut = d.join("cut.pth");
    std::fs::write(&cut, &bytes[..bytes.len() - 30]).unwrap();
    let (code, _, err) = eval(&cut);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cut.pth: cannot read this torch.save file") && err.contains("truncated"),
        "{err}"
    );
}
