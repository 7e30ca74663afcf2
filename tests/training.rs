//! Real training runs on real Fashion-MNIST subsets: accuracy after one epoch, output files,
//! exact resume after Ctrl-C and after `kill -9`, and the evaluate round trip.

use imgclf_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn train_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "--plugin",
        "resnet_preact",
        "--config",
        "configs/fashion_mnist/resnet_preact.yaml",
        "dataset.dataset_dir",
        data.to_str().unwrap(),
        "train.output_dir",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn train(data: &Path, out: &Path, extra: &[&str]) {
    let (code, _, err) = run(imgclf(&workspace()).args(train_args(data, out, extra)));
    assert_eq!(code, 0, "{err}");
}

#[test]
fn one_epoch_on_6000_real_fashion_mnist_images_reaches_60_percent() {
    let d = scratch("accuracy");
    let data = d.join("data");
    fashion_mnist_subset(&data, 6000, 1000);
    let out = d.join("out");
    train(&data, &out, &[]);
    for f in [
        "config.yaml",
        "env.yaml",
        "log.txt",
        "metrics.jsonl",
        "checkpoint_00001.safetensors",
        "model_final.safetensors",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let records = jsonl(&out.join("metrics.jsonl"));
    let val: Vec<_> = records.iter().filter(|r| r["split"] == "val").collect();
    assert_eq!(val.len(), 2, "val_first and after epoch 1: {records:?}");
    assert!(
        val[0]["acc1"].as_f64().unwrap() < 0.3,
        "untrained model is near chance"
    );
    let acc = val[1]["acc1"].as_f64().unwrap();
    assert!(acc >= 0.60, "validation accuracy after one epoch: {acc}");
    let train_recs: Vec<_> = records.iter().filter(|r| r["split"] == "train").collect();
    let last = train_recs.last().unwrap();
    for k in [
        "epoch",
        "step",
        "loss",
        "acc1",
        "acc5",
        "lr",
        "images_per_sec",
        "elapsed_s",
    ] {
        assert!(!last[k].is_null(), "{k} missing in {last}");
    }
    assert_eq!(last["step"], 46, "6000 / 128 with drop_last");
    let config = std::fs::read_to_string(out.join("config.yaml")).unwrap();
    assert!(
        config.contains("FashionMNIST") && config.contains("depth: 20"),
        "{config}"
    );
    // The output directory is never overwritten.
    let (code, _, err) = run(imgclf(&workspace()).args(train_args(&data, &out, &[])));
    assert_eq!(code, 1);
    assert!(
        err.contains("already exists") && err.contains("--resume"),
        "{err}"
    );
}

fn tensors(path: &Path) -> Vec<(String, tch::Tensor)> {
    imgclf::io::load_safetensors(path).unwrap().0
}

fn assert_same_weights(a: &Path, b: &Path) {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(ta.len(), tb.len());
    for ((na, xa), (nb, xb)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        assert!(
            xa.equal(xb),
            "{na} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

const SMALL: &[&str] = &[
    "model.resnet_preact.depth",
    "8",
    "train.batch_size",
    "32",
    "scheduler.epochs",
    "3",
    "train.log_period",
    "1",
    "train.val_first",
    "False",
];

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn reference_run() -> (PathBuf, PathBuf) {
    let d = scratch("resume-reference");
    let data = d.join("data");
    fashion_mnist_subset(&data, 640, 64);
    let out = d.join("out");
    train(&data, &out, SMALL);
    (data, out)
}

#[test]
fn resume_after_kill_9_and_after_ctrl_c_ends_with_the_same_weights() {
    let (data, reference) = reference_run();
    let reference_final = reference.join("model_final.safetensors");

    // kill -9 once the first epoch's checkpoint exists, then resume.
    let d = scratch("resume-kill");
    let out = d.join("out");
    let mut child = imgclf(&workspace())
        .args(train_args(&data, &out, SMALL))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("checkpoint_00001", Duration::from_secs(300), || {
        out.join("checkpoint_00001.safetensors").exists()
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !out.join("model_final.safetensors").exists(),
        "killed before the end"
    );
    let (code, _, err) =
        run(imgclf(&workspace()).args(["train", "--resume", out.to_str().unwrap()]));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("resumed from"), "{err}");
    assert_same_weights(&reference_final, &out.join("model_final.safetensors"));
    // metrics.jsonl has each step once.
    let steps: Vec<u64> = jsonl(&out.join("metrics.jsonl"))
        .iter()
        .filter(|r| r["split"] == "train")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=60).collect::<Vec<_>>());

    // Ctrl-C in the middle of an epoch saves a checkpoint there; resume continues from it.
    let d = scratch("resume-ctrlc");
    let out = d.join("out");
    let mut child = imgclf(&workspace())
        .args(train_args(&data, &out, SMALL))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("25 steps", Duration::from_secs(300), || {
        jsonl(&out.join("metrics.jsonl"))
            .iter()
            .filter(|r| r["split"] == "train")
            .count()
            >= 25
    });
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(130),
        "Ctrl-C exits with 130 after saving"
    );
    let saved: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("checkpoint_"))
        .collect();
    assert!(
        saved.iter().any(|n| n.contains("_step")),
        "mid-epoch checkpoint expected: {saved:?}"
    );
    let (code, _, err) =
        run(imgclf(&workspace()).args(["train", "--resume", out.to_str().unwrap()]));
    assert_eq!(code, 0, "{err}");
    assert_same_weights(&reference_final, &out.join("model_final.safetensors"));
}

fn read_npz(path: &Path) -> std::collections::HashMap<String, Vec<u8>> {
    let mut z = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).unwrap();
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut buf).unwrap();
            (f.name().trim_end_matches(".npy").to_string(), buf)
        })
        .collect()
}

fn npy_payload(bytes: &[u8]) -> (String, &[u8]) {
    let hl = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    (
        String::from_utf8_lossy(&bytes[10..10 + hl]).to_string(),
        &bytes[10 + hl..],
    )
}

#[test]
fn evaluate_round_trips_model_final_and_bad_checkpoints_are_clear_errors() {
    let d = scratch("evaluate");
    let data = d.join("data");
    fashion_mnist_subset(&data, 512, 100);
    let out = d.join("out");
    train(
        &data,
        &out,
        &[
            "model.resnet_preact.depth",
            "8",
            "train.batch_size",
            "64",
            "train.val_first",
            "False",
        ],
    );
    let weights = out.join("model_final.safetensors");
    let eval_dir = d.join("eval");
    let args = |ckpt: &Path, dir: &Path| -> Vec<String> {
        [
            "evaluate",
            "--config",
            "configs/fashion_mnist/resnet_preact.yaml",
            "model.resnet_preact.depth",
            "8",
            "dataset.dataset_dir",
            data.to_str().unwrap(),
            "test.checkpoint",
            ckpt.to_str().unwrap(),
            "test.output_dir",
            dir.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let (code, _, err) = run(imgclf(&workspace()).args(args(&weights, &eval_dir)));
    assert_eq!(code, 0, "{err}");
    let npz = read_npz(&eval_dir.join("predictions.npz"));
    for k in ["preds", "probs", "labels", "loss", "acc"] {
        assert!(npz.contains_key(k), "{k} missing");
    }
    let (header, preds) = npy_payload(&npz["preds"]);
    assert!(
        header.contains("'<f4'") && header.contains("(100, 10)"),
        "{header}"
    );
    assert_eq!(preds.len(), 100 * 10 * 4);
    let (header, acc) = npy_payload(&npz["acc"]);
    assert!(header.contains("'shape': ()"), "{header}");
    let acc = f64::from_le_bytes(acc.try_into().unwrap());
    let val = jsonl(&out.join("metrics.jsonl"))
        .into_iter()
        .rfind(|r| r["split"] == "val")
        .unwrap();
    assert!(
        (acc - val["acc1"].as_f64().unwrap()).abs() < 1e-9,
        "evaluate acc {acc} vs training's final val {val}"
    );

    // The PyTorch reference architecture loads the state dict strictly and predicts the same
    // logits (when the PyTorch used for building is at hand).
    if let Some(python) = std::env::var_os("IMGCLF_PYTHON") {
        let check = || {
            Command::new(&python)
                .arg(workspace().join("tests/python/check_predictions.py"))
                .args([
                    "--weights",
                    weights.to_str().unwrap(),
                    "--dataset-dir",
                    data.to_str().unwrap(),
                ])
                .args([
                    "--predictions",
                    eval_dir.join("predictions.npz").to_str().unwrap(),
                    "--depth",
                    "8",
                ])
                .args([
                    "--n-channels",
                    "1",
                    "--image-size",
                    "28",
                    "--n-classes",
                    "10",
                    "--mean",
                    "0.2860",
                    "--std",
                    "0.3530",
                ])
                .output()
                .unwrap()
        };
        // One run: the check's tolerance is measured from PyTorch's own rounding floor.
        let o = check();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            o.status.success(),
            "PyTorch reference disagrees with imgclf's predictions:\n{text}"
        );
        assert!(text.contains("times the floor"), "{text}");
    }

    // A state dict missing a tensor and one with a wrong shape: the error lists the names.
    let (mut t, _) = imgclf::io::load_safetensors(&weights).unwrap();
    t.retain(|(n, _)| n != "fc.bias");
    if let Some((_, w)) = t.iter_mut().find(|(n, _)| n == "conv.weight") {
        *w = tch::Tensor::zeros([3, 3], (tch::Kind::Float, tch::Device::Cpu));
    }
    let broken = d.join("broken.safetensors");
    imgclf::io::save_safetensors(&broken, &t, Default::default()).unwrap();
    let (code, _, err) = run(imgclf(&workspace()).args(args(&broken, &d.join("eval2"))));
    assert_eq!(code, 1);
    assert!(
        err.contains("missing (1): fc.bias") && err.contains("wrong shape (1): conv.weight"),
        "{err}"
    );

    // The final weights also serve as initial weights (train.checkpoint).
    let out2 = d.join("out2");
    train(
        &data,
        &out2,
        &[
            "model.resnet_preact.depth",
            "8",
            "train.checkpoint",
            weights.to_str().unwrap(),
            "scheduler.epochs",
            "1",
        ],
    );
    let first_val = jsonl(&out2.join("metrics.jsonl"))
        .into_iter()
        .find(|r| r["split"] == "val")
        .unwrap();
    assert!(
        (first_val["acc1"].as_f64().unwrap() - acc).abs() < 1e-9,
        "val_first of a run started from the weights"
    );
}

#[test]
fn every_augmentation_trains_a_few_steps_on_real_fashion_mnist_with_finite_losses() {
    let d = scratch("augmentations");
    let data = d.join("data");
    fashion_mnist_subset(&data, 128, 32);
    let on = |k: &'static str| [k, "True"];
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("cutout", on("augmentation.use_cutout").to_vec()),
        (
            "random_erasing",
            on("augmentation.use_random_erasing").to_vec(),
        ),
        ("dual_cutout", on("augmentation.use_dual_cutout").to_vec()),
        ("mixup", on("augmentation.use_mixup").to_vec()),
        (
            "ricap",
            [
                on("augmentation.use_ricap"),
                ["augmentation.use_random_crop", "False"],
            ]
            .concat(),
        ),
        ("cutmix", on("augmentation.use_cutmix").to_vec()),
        (
            "label_smoothing",
            on("augmentation.use_label_smoothing").to_vec(),
        ),
        (
            "cutout_random_erasing_mixup_label_smoothing",
            [
                on("augmentation.use_cutout"),
                on("augmentation.use_random_erasing"),
                on("augmentation.use_mixup"),
                on("augmentation.use_label_smoothing"),
            ]
            .concat(),
        ),
    ];
    for (name, extra) in cases {
        let out = d.join(name);
        let mut args = vec![
            "model.resnet_preact.depth",
            "8",
            "train.batch_size",
            "32",
            "scheduler.epochs",
            "1",
            "train.log_period",
            "1",
            "train.val_first",
            "False",
        ];
        args.extend(extra);
        train(&data, &out, &args);
        let rows = jsonl(&out.join("metrics.jsonl"));
        let train_rows: Vec<_> = rows.iter().filter(|r| r["split"] == "train").collect();
        assert_eq!(
            train_rows.len(),
            4,
            "{name}: 128 images / 32 = 4 steps: {rows:?}"
        );
        for r in rows.iter() {
            let loss = r["loss"].as_f64().unwrap();
            assert!(loss.is_finite() && loss > 0.0, "{name}: {r}");
        }
        assert!(rows.iter().any(|r| r["split"] == "val"), "{name}: {rows:?}");
        let log = std::fs::read_to_string(out.join("log.txt")).unwrap();
        let component = name.strip_suffix("_random_erasing_mixup_label_smoothing");
        let component = component.unwrap_or(name);
        assert!(
            log.lines()
                .any(|l| l.contains("augmentations: ") && l.contains(&format!("{component} ("))),
            "{name}: the log names the augmentation: {log}"
        );
    }
}
