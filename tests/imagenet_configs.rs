//! The reference's seven `configs/imagenet/*.yaml` train: `imgclf train --dry-run` builds each
//! network at the config's own size (3x224x224, 1000 classes) with the reference's parameter
//! count (tests/data/reference/params.md), and a few steps plus validation run on a small
//! generated image folder (2 classes, 64x64 crops, batches of 2; at 32 pixels the last stage
//! would normalise 1x1 maps of single images, which the reference refuses too).

use imgclf_tests::*;
use std::path::Path;

/// Config file stem and the reference's parameter count at 224x224 with 1000 classes.
const CONFIGS: &[(&str, i64)] = &[
    ("densenet121", 7_978_856),
    ("pyramidnet200", 62_368_168),
    ("resnet18", 11_689_512),
    ("resnet34", 21_797_672),
    ("resnet_preact_18", 11_687_848),
    ("resnext50_32x4d", 25_028_904),
    ("vgg16", 138_365_992),
];

/// Runs `f` over the configs, two processes at a time (CI has two cores), and collects the
/// failures.
fn over_configs(f: impl Fn(&str, i64) -> Option<String> + Sync) -> Vec<String> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let mut failures = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&(name, params)) = CONFIGS.get(i) else {
                            break;
                        };
                        failures.extend(f(name, params));
                    }
                    failures
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    })
}

#[test]
fn every_imagenet_config_is_in_the_repo() {
    let mut files: Vec<String> = std::fs::read_dir(workspace().join("configs/imagenet"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let expected: Vec<String> = CONFIGS.iter().map(|(n, _)| format!("{n}.yaml")).collect();
    assert_eq!(files, expected);
}

#[test]
fn every_imagenet_config_dry_runs_with_the_reference_parameter_count() {
    let failures = over_configs(|name, params| {
        let config = format!("configs/imagenet/{name}.yaml");
        let (code, out, err) = run(imgclf(&workspace()).args([
            "train",
            "--dry-run",
            "--config",
            &config,
            "device",
            "cpu",
        ]));
        if code != 0 {
            return Some(format!("{config}: dry run failed ({code}): {err}"));
        }
        let line = format!("parameters: {params}\n");
        (!out.contains(&line)).then(|| format!("{config}: no `{}` in:\n{out}", line.trim()))
    });
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

fn train(data: &Path, out: &Path, name: &str) -> Option<String> {
    let config = format!("configs/imagenet/{name}.yaml");
    let mut args: Vec<String> = [
        "train",
        "--config",
        &config,
        "dataset.dataset_dir",
        data.to_str().unwrap(),
        "dataset.image_size",
        "64",
        "dataset.n_classes",
        "2",
        "device",
        "cpu",
        "train.batch_size",
        "2",
        "validation.batch_size",
        "4",
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
    .collect();
    if name == "vgg16" {
        // The config's subdivision 8 needs batches of 8; 2 keeps it subdividing.
        args.extend(["train.subdivision".to_string(), "2".to_string()]);
    }
    let (code, _, err) = run(imgclf(&workspace()).args(&args));
    if code != 0 {
        return Some(format!("{config}: training failed ({code}):\n{err}"));
    }
    let metrics = jsonl(&out.join("metrics.jsonl"));
    let finite = |split: &str| {
        metrics
            .iter()
            .any(|m| m["split"] == split && m["loss"].as_f64().is_some_and(f64::is_finite))
    };
    if !(finite("train") && finite("val")) {
        return Some(format!(
            "{config}: no finite train and val loss in metrics.jsonl: {metrics:?}"
        ));
    }
    let log = std::fs::read_to_string(out.join("log.txt")).unwrap_or_default();
    (!log.contains("train: 4 images, 2 steps/epoch; val: 4 images"))
        .then(|| format!("{config}: unexpected data in log.txt:\n{log}"))
}

#[test]
fn every_imagenet_config_trains_a_few_steps_on_a_small_folder() {
    let dir = scratch("imagenet-configs");
    let data = dir.join("data");
    write_image_folder(&data, &["cat", "dog"], 2);
    let failures = over_configs(|name, _| train(&data, &dir.join(name), name));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    let _ = std::fs::remove_dir_all(&dir);
}
