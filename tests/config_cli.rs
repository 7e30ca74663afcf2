//! The config from the command line, end to end: integer ranges refused before any work (and
//! shown by `plugins inspect`), and `train --resume DIR KEY VALUE...` applying the overrides on
//! top of DIR's saved config, refusing the keys that cannot change, recording what changed, and
//! extending a finished run.

use imgclf_tests::*;
use std::path::Path;

fn train(data: &Path, out: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut cmd = imgclf(&workspace());
    cmd.args([
        "train",
        "--config",
        "configs/fashion_mnist/resnet_preact.yaml",
        "dataset.dataset_dir",
        data.to_str().unwrap(),
        "train.output_dir",
        out.to_str().unwrap(),
        "model.resnet_preact.depth",
        "8",
        "model.resnet_preact.initial_channels",
        "4",
        "train.batch_size",
        "32",
        "train.val_first",
        "False",
    ]);
    cmd.args(extra);
    run(&mut cmd)
}

fn resume(dir: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut cmd = imgclf(&workspace());
    cmd.args(["train", "--resume", dir.to_str().unwrap()]);
    cmd.args(extra);
    run(&mut cmd)
}

#[test]
fn integers_outside_their_range_are_refused_before_any_work_naming_key_and_range() {
    let d = scratch("config-ranges");
    let out = d.join("out");
    let data = Path::new(FASHION_MNIST);
    let (code, _, err) = train(data, &out, &["train.batch_size", "-1"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("train.batch_size must be >= 1, got -1 (command line)"),
        "{err}"
    );
    assert!(!err.contains("18446744073709551615"), "{err}");
    assert!(!out.exists(), "a refused config created {}", out.display());

    // A plugin's key, from its declaration.
    let (code, _, err) = train(data, &out, &["model.resnet_preact.depth", "-2"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("model.resnet_preact.depth must be >= 1, got -2 (command line)"),
        "{err}"
    );

    // Evaluation's own batch size (accepted, and the run "succeeded", before).
    let (code, _, err) = run(imgclf(&workspace()).args([
        "evaluate",
        "--config",
        "configs/fashion_mnist/resnet_preact.yaml",
        "test.checkpoint",
        d.join("none.safetensors").to_str().unwrap(),
        "test.batch_size",
        "-5",
    ]));
    assert_ne!(code, 0);
    assert!(
        err.contains("test.batch_size must be >= 1, got -5 (command line)"),
        "{err}"
    );

    // The ranges are part of the listings.
    let (code, text, err) = run(imgclf(&workspace()).args(["plugins", "inspect", "resnet_preact"]));
    assert_eq!(code, 0, "{err}");
    let depth = text
        .lines()
        .find(|l| l.contains("model.resnet_preact.depth"))
        .unwrap_or_default();
    assert!(depth.contains("range: >= 1"), "{text}");
    let (code, text, err) = run(imgclf(&workspace()).args(["plugins", "inspect", "imgclf"]));
    assert_eq!(code, 0, "{err}");
    for key in [
        "train.batch_size",
        "test.batch_size",
        "scheduler.milestones",
    ] {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{key} ")))
            .unwrap_or_else(|| panic!("{key} not listed:\n{text}"));
        assert!(line.contains("range: >= 1"), "{line}");
    }
}

#[test]
fn resume_applies_overrides_on_top_of_the_saved_config_and_extends_a_finished_run() {
    let d = scratch("config-resume");
    let data = d.join("data");
    fashion_mnist_subset(&data, 64, 32);
    let out = d.join("run");
    let (code, _, err) = train(&data, &out, &["scheduler.epochs", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.join("checkpoint_00001.safetensors").exists());
    let epochs = |records: &[serde_json::Value]| -> Vec<u64> {
        records
            .iter()
            .filter(|r| r["split"] == "val")
            .map(|r| r["epoch"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(epochs(&jsonl(&out.join("metrics.jsonl"))), [1]);
    let saved = std::fs::read_to_string(out.join("config.yaml")).unwrap();

    // Keys that fix the model, the data order or the optimizer state: refused, all named,
    // and the run is left as it was.
    let (code, _, err) = resume(
        &out,
        &[
            "model.resnet_preact.depth",
            "20",
            "train.batch_size",
            "16",
            "scheduler.epochs",
            "2",
        ],
    );
    assert_ne!(code, 0);
    for part in [
        "cannot change when a run is resumed",
        "model.resnet_preact.depth 8 -> 20 (command line)",
        "train.batch_size 32 -> 16 (command line)",
    ] {
        assert!(err.contains(part), "{part}: {err}");
    }
    assert!(!err.contains("scheduler.epochs 1 -> 2"), "{err}");
    assert_eq!(
        std::fs::read_to_string(out.join("config.yaml")).unwrap(),
        saved
    );
    assert!(!out.join("resumes.jsonl").exists());

    // A finished run extended to two epochs: the override wins over config.yaml.
    let (code, _, err) = resume(&out, &["scheduler.epochs", "2", "train.log_period", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.join("checkpoint_00002.safetensors").exists(),
        "epoch 2 was not trained: {err}"
    );
    assert_eq!(epochs(&jsonl(&out.join("metrics.jsonl"))), [1, 2]);
    let log = std::fs::read_to_string(out.join("log.txt")).unwrap();
    assert!(
        log.contains("resume changes scheduler.epochs 1 -> 2 (command line)"),
        "{log}"
    );
    let history = jsonl(&out.join("resumes.jsonl"));
    assert_eq!(history.len(), 1, "{history:?}");
    let keys: Vec<&str> = history[0]["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["scheduler.epochs", "train.log_period"]);
    // config.yaml now holds the run's effective config: a plain resume keeps the new epochs.
    let config = std::fs::read_to_string(out.join("config.yaml")).unwrap();
    assert!(config.contains("epochs: 2"), "{config}");
    let (code, _, err) = resume(&out, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("nothing left to train"), "{err}");
    assert_eq!(epochs(&jsonl(&out.join("metrics.jsonl"))), [1, 2]);
    assert_eq!(jsonl(&out.join("resumes.jsonl")).len(), 2);
}
