//! The `imgclf` binary's commands: plugin listing and inspection, broken and panicking plugins,
//! config errors, dry runs and corrupt dataset files.

use imgclf_tests::*;
use serde_json::Value;

fn list_json(extra: &[&str]) -> Value {
    let dir = workspace();
    let (code, out, err) = run(imgclf(&dir).args(extra).args(["plugins", "list", "--json"]));
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn component<'a>(v: &'a Value, plugin: &str, name: &str) -> &'a Value {
    let p = v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == plugin)
        .unwrap_or_else(|| panic!("no plugin {plugin}: {v}"));
    p["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no component {name}"))
}

#[test]
fn plugins_list_shows_every_plugin_with_its_components_and_papers() {
    let v = list_json(&[]);
    assert!(v["errors"].as_array().unwrap().is_empty(), "{v}");
    let m = component(&v, "resnet_preact", "resnet_preact");
    assert_eq!(m["kind"], "model");
    assert_eq!(m["papers"][0], "1603.05027");
    assert_eq!(component(&v, "baseline", "sgd")["kind"], "optimizer");
    assert_eq!(component(&v, "baseline", "cosine")["kind"], "scheduler");
    assert_eq!(
        component(&v, "baseline", "random_crop")["switch"],
        "augmentation.use_random_crop"
    );
    // Human-readable form names the file each plugin came from.
    let (code, out, _) = run(imgclf(&workspace()).args(["plugins", "list"]));
    assert_eq!(code, 0);
    assert!(
        out.contains("resnet_preact") && out.contains("libimgclf_plugin_resnet_preact.so"),
        "{out}"
    );
}

#[test]
fn plugins_inspect_shows_keys_defaults_choices_and_help() {
    let (code, out, err) =
        run(imgclf(&workspace()).args(["plugins", "inspect", "resnet_preact", "--json"]));
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let keys = v["components"][0]["keys"].as_array().unwrap();
    let depth = keys
        .iter()
        .find(|k| k["key"] == "model.resnet_preact.depth")
        .unwrap();
    assert_eq!(depth["default"], 110);
    assert_eq!(depth["type"], "int");
    let bt = keys
        .iter()
        .find(|k| k["key"] == "model.resnet_preact.block_type")
        .unwrap();
    assert_eq!(bt["choices"], serde_json::json!(["basic", "bottleneck"]));
    let stages = keys
        .iter()
        .find(|k| k["key"] == "model.resnet_preact.preact_stage")
        .unwrap();
    assert_eq!(stages["default"], serde_json::json!([true, true, true]));
    let (code, out, _) = run(imgclf(&workspace()).args(["plugins", "inspect", "baseline"]));
    assert_eq!(code, 0);
    assert!(
        out.contains("augmentation.random_crop.padding_mode") && out.contains("\"reflect\""),
        "{out}"
    );
    let (code, _, err) = run(imgclf(&workspace()).args(["plugins", "inspect", "resnet_preat"]));
    assert_eq!(code, 1);
    assert!(
        err.contains("no plugin named `resnet_preat`") && err.contains("resnet_preact"),
        "{err}"
    );
}

#[test]
fn an_abi_incompatible_plugin_is_refused_clearly_and_hides_nothing() {
    let dir = fixture_dir("abi_mismatch");
    let v = list_json(&["--plugin-path", dir.to_str().unwrap()]);
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{v}");
    let msg = errors[0]["message"].as_str().unwrap();
    assert!(msg.contains("incompatible plugin ABI"), "{msg}");
    assert!(
        msg.lines().count() <= 2 && msg.len() < 1500,
        "message should be short: {msg}"
    );
    assert!(errors[0]["path"].as_str().unwrap().contains("abi_mismatch"));
    // The good plugins are still there, and training setup still works.
    component(&v, "resnet_preact", "resnet_preact");
    let (code, out, err) = run(imgclf(&workspace()).args([
        "--plugin-path",
        dir.to_str().unwrap(),
        "train",
        "--config",
        "configs/cifar/resnet_preact.yaml",
        "model.resnet_preact.depth",
        "20",
        "--dry-run",
    ]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("parameters: 272282"), "{out}");
    assert!(
        err.contains("plugin not loaded") && err.contains("abi_mismatch"),
        "{err}"
    );
}

#[test]
fn a_plugin_built_against_another_libtorch_is_refused() {
    let dir = fixture_dir("version_mismatch");
    let v = list_json(&["--plugin-path", dir.to_str().unwrap()]);
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{v}");
    let msg = errors[0]["message"].as_str().unwrap();
    assert!(
        msg.starts_with(
            "built against libtorch 2.10.0, but the libtorch loaded at run time is 2.11.0"
        ),
        "{msg}"
    );
    component(&v, "resnet_preact", "resnet_preact");
}

#[test]
fn a_file_that_is_not_a_plugin_is_reported_with_the_others() {
    let d = scratch("not-a-plugin");
    std::fs::write(d.join("libgarbage.so"), b"not an ELF file").unwrap();
    let abi = fixture_dir("abi_mismatch");
    let v = list_json(&[
        "--plugin-path",
        d.to_str().unwrap(),
        "--plugin-path",
        abi.to_str().unwrap(),
    ]);
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(
        errors.len(),
        2,
        "all load errors are reported together: {v}"
    );
    assert!(errors
        .iter()
        .any(|e| e["path"].as_str().unwrap().ends_with("libgarbage.so")));
    component(&v, "baseline", "sgd");
}

#[test]
fn a_panic_while_building_a_model_is_an_error_naming_plugin_and_component() {
    let dir = fixture_dir("panicking");
    let (code, _, err) = run(imgclf(&workspace()).args([
        "--plugin-path",
        dir.to_str().unwrap(),
        "train",
        "--plugin",
        "panicking",
        "model.name",
        "panics_on_build",
        "--dry-run",
    ]));
    assert_eq!(code, 1, "the host survives and exits with an error: {err}");
    assert!(err.contains("plugin `panicking`, model `panics_on_build`: panicked: deliberate panic while building"), "{err}");
}

#[test]
fn a_panic_in_forward_during_training_is_an_error_and_the_host_survives() {
    let d = scratch("panic-forward");
    let data = d.join("data");
    fashion_mnist_subset(&data, 64, 16);
    let dir = fixture_dir("panicking");
    let (code, _, err) = run(imgclf(&workspace()).args([
        "--plugin-path",
        dir.to_str().unwrap(),
        "train",
        "--config",
        "configs/fashion_mnist/resnet_preact.yaml",
        "model.name",
        "panics_in_forward",
        "dataset.dataset_dir",
        data.to_str().unwrap(),
        "train.output_dir",
        d.join("out").to_str().unwrap(),
        "train.batch_size",
        "32",
        "train.val_first",
        "False",
    ]));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(
            "plugin `panicking`, model `panics_in_forward`: panicked: deliberate panic in forward"
        ),
        "{err}"
    );
}

fn train_err(args: &[&str]) -> String {
    let (code, out, err) = run(imgclf(&workspace()).arg("train").args(args));
    assert_eq!(code, 1, "expected failure for {args:?}: {out}{err}");
    err
}

#[test]
fn config_errors_name_the_key_its_source_and_the_fix() {
    let e = train_err(&[
        "--config",
        "configs/cifar/resnet_preact.yaml",
        "train.batchsize",
        "64",
        "--dry-run",
    ]);
    assert!(
        e.contains(
            "unknown config key `train.batchsize` (command line); did you mean `train.batch_size`?"
        ),
        "{e}"
    );
    let e = train_err(&[
        "--config",
        "configs/cifar/resnet_preact.yaml",
        "train.batch_size",
        "abc",
        "--dry-run",
    ]);
    assert!(
        e.contains("train.batch_size expects an integer, got 'abc'"),
        "{e}"
    );
    // Data-parallel training with the reference's default backend on a CPU: the error names
    // the key and the fix.
    let e = train_err(&["train.distributed", "True", "--dry-run"]);
    assert!(
        e.contains("train.dist.backend nccl reduces CUDA tensors, but device is cpu: set train.dist.backend gloo"),
        "{e}"
    );
    // Precision requests this build cannot serve are refused before anything runs.
    let e = train_err(&["train.precision", "O4", "--dry-run"]);
    assert!(e.contains("train.precision") && e.contains("O4"), "{e}");
    let e = train_err(&[
        "train.precision",
        "O3",
        "train.precision_dtype",
        "float8",
        "--dry-run",
    ]);
    assert!(
        e.contains(
            "train.precision_dtype must be one of 'float16', 'bfloat16', got 'float8' (command line)"
        ),
        "{e}"
    );
    let e = train_err(&["model.resnet_preact.block_type", "wide", "--dry-run"]);
    assert!(
        e.contains("model.resnet_preact.block_type must be one of 'basic', 'bottleneck'"),
        "{e}"
    );
    let e = train_err(&["--config", "configs/cifar/missing.yaml", "--dry-run"]);
    assert!(e.contains("configs/cifar/missing.yaml"), "{e}");
    let e = train_err(&["model.resnet_preact.depth", "21", "--dry-run"]);
    assert!(e.contains("model.resnet_preact.depth 21 is invalid"), "{e}");
    let e = train_err(&["--plugin", "resnet_preakt", "--dry-run"]);
    assert!(
        e.contains("no such plugin") && e.contains("did you mean") && e.contains("resnet_preact?"),
        "{e}"
    );
    let e = train_err(&[
        "augmentation.use_mixup",
        "True",
        "augmentation.use_cutmix",
        "True",
        "--dry-run",
    ]);
    assert!(
        e.contains("augmentation.use_mixup, augmentation.use_cutmix are all True")
            && e.contains("cannot be combined")
            && e.contains("augmentation.use_cutmix False"),
        "{e}"
    );
    // Checked by the plugin when the dry run builds the augmentations.
    let e = train_err(&[
        "augmentation.use_dual_cutout",
        "True",
        "augmentation.use_label_smoothing",
        "True",
        "--dry-run",
    ]);
    assert!(
        e.contains("augmentation.use_dual_cutout cannot be combined with augmentation.use_label_smoothing = True"),
        "{e}"
    );
    let e = train_err(&["train.optimizer", "adamw", "--dry-run"]);
    assert!(
        e.contains("train.optimizer = 'adamw'") && e.contains("available: ") && e.contains("sgd"),
        "{e}"
    );
    let e = train_err(&["dataset.name", "SVHN", "--dry-run"]);
    assert!(
        e.contains("dataset.name = 'SVHN'") && e.contains("FashionMNIST"),
        "{e}"
    );
    // Reference keys whose plugin is not installed: accepted at their defaults only. An
    // installation with only the baseline and resnet_preact plugins (the binary finds its
    // plugins beside itself).
    let d = scratch("minimal-install");
    std::fs::create_dir_all(d.join("plugins")).unwrap();
    let exe = d.join("imgclf");
    std::fs::copy(bin(), &exe).unwrap();
    for p in ["baseline", "resnet_preact"] {
        let so = format!("libimgclf_plugin_{p}.so");
        std::fs::copy(plugin_dir().join(&so), d.join("plugins").join(&so)).unwrap();
    }
    let minimal = |args: &[&str]| {
        let mut c = std::process::Command::new(&exe);
        c.current_dir(workspace())
            .env_remove("IMGCLF_PLUGIN_PATH")
            .arg("train")
            .args(args);
        run(&mut c)
    };
    let (code, _, err) = minimal(&[
        "model.wrn.depth",
        "28",
        "optim.adam.betas",
        "(0.9, 0.999)",
        "--dry-run",
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, _, e) = minimal(&["model.wrn.depth", "40", "--dry-run"]);
    assert!(
        code != 0
            && e.contains("model.wrn.depth = 40 is not supported yet")
            && e.contains("no loaded plugin declares"),
        "{e}"
    );
    let e = train_err(&["train.base_lr", "--dry-run"]);
    assert!(e.contains("pairs"), "{e}");
}

#[test]
fn dry_run_reports_model_parameters_and_dataset_and_writes_nothing() {
    let d = scratch("dry-run");
    let out = d.join("out");
    let (code, stdout, err) = run(imgclf(&workspace()).args([
        "train",
        "--plugin",
        "resnet_preact",
        "--config",
        "configs/cifar/resnet_preact.yaml",
        "model.resnet_preact.depth",
        "164",
        "model.resnet_preact.block_type",
        "bottleneck",
        "dataset.dataset_dir",
        d.join("nowhere").to_str().unwrap(),
        "train.output_dir",
        out.to_str().unwrap(),
        "--dry-run",
    ]));
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("parameters: 1619290"), "{stdout}");
    assert!(stdout.contains("NOT FOUND"), "{stdout}");
    assert!(
        stdout.contains("depth: 164"),
        "effective config printed: {stdout}"
    );
    assert!(!out.exists());
    let (code, stdout, _) = run(imgclf(&workspace()).args([
        "train",
        "--config",
        "configs/fashion_mnist/resnet_preact.yaml",
        "--dry-run",
    ]));
    assert_eq!(code, 0);
    assert!(
        stdout.contains("parameters: 271994") && stdout.contains("train: found"),
        "{stdout}"
    );
}

#[test]
fn every_reference_single_device_command_is_accepted() {
    // Every README command of the reference that trains on one device (the multi-GPU ones
    // start with `python -m torch.distributed.launch`).
    let commands = std::fs::read_to_string(workspace().join("tests/data/commands.txt")).unwrap();
    let (mut checked, mut large, mut mixed) = (0, 0, 0);
    let mut models = std::collections::BTreeSet::new();
    for line in commands
        .lines()
        .filter(|l| l.starts_with("python train.py"))
    {
        let args = split_command(line.trim_start_matches("python train.py"));
        let (code, out, err) = run(imgclf(&workspace())
            .arg("train")
            .args(&args)
            .arg("--dry-run"));
        // The large-batch experiments (LARS, Ghost BN, no weight decay on BN) must run.
        let large_batch = [
            "train.optimizer lars",
            "train.subdivision",
            "train.no_weight_decay_on_bn True",
        ]
        .iter()
        .any(|k| line.contains(k));
        // The FP16 experiments (apex opt levels O3 and O1) run on native autocast.
        if line.contains("train.precision O") && !line.contains("train.precision O0") {
            mixed += 1;
        }
        assert!(code == 0, "{line}\n{out}{err}");
        checked += 1;
        assert!(out.contains("parameters: "), "{out}");
        let config = &args[args.iter().position(|a| a == "--config").unwrap() + 1];
        models.insert(config.rsplit('/').next().unwrap().to_string());
        if large_batch {
            large += 1;
            assert!(out.contains("batch_size: 4096"), "{out}");
            if line.contains("lars") {
                assert!(out.contains("optimizer: lars (lars "), "{out}");
            }
        }
    }
    // Every CIFAR architecture the reference README trains is among the accepted commands
    // (all but se_resnet_preact, which has no README command; configs/ covers it).
    assert_eq!(models.len(), 8, "{models:?}");
    assert!(checked >= 25, "only {checked} commands ran");
    assert_eq!(mixed, 2, "the O3 and O1 commands");
    assert_eq!(
        large, 3,
        "LARS, Ghost BN and no-weight-decay-on-BN commands"
    );
}

#[test]
fn corrupt_dataset_files_are_errors_naming_the_file() {
    let d = scratch("corrupt");
    let data = d.join("data");
    fashion_mnist_subset(&data, 64, 16);
    let images = data.join("train-images-idx3-ubyte");
    let bytes = std::fs::read(&images).unwrap();
    std::fs::write(&images, &bytes[..bytes.len() - 100]).unwrap();
    let e = train_err(&[
        "--config",
        "configs/fashion_mnist/resnet_preact.yaml",
        "dataset.dataset_dir",
        data.to_str().unwrap(),
        "train.output_dir",
        d.join("out").to_str().unwrap(),
    ]);
    assert!(e.contains("train-images-idx3-ubyte"), "{e}");
    let labels = data.join("t10k-labels-idx1-ubyte");
    std::fs::write(&images, &bytes).unwrap();
    let mut l = std::fs::read(&labels).unwrap();
    l[3] = 0x07; // bad magic
    std::fs::write(&labels, &l).unwrap();
    let e = train_err(&[
        "--config",
        "configs/fashion_mnist/resnet_preact.yaml",
        "dataset.dataset_dir",
        data.to_str().unwrap(),
        "train.output_dir",
        d.join("out2").to_str().unwrap(),
    ]);
    assert!(e.contains("t10k-labels-idx1-ubyte"), "{e}");
}

#[test]
fn env_reports_versions_and_devices() {
    let (code, out, err) = run(imgclf(&workspace()).args(["env", "--json"]));
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["libtorch_version"], "2.11.0");
    assert_eq!(v["tch_version"], "0.24.0");
    assert!(v["cuda_available"].is_boolean());
    assert!(v["torch_threads"].as_i64().unwrap() >= 1);
}

#[test]
fn every_config_in_configs_is_accepted_or_refused_as_not_supported_yet() {
    let mut files = Vec::new();
    let mut dirs = vec![workspace().join("configs")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml") {
                files.push(p);
            }
        }
    }
    files.sort();
    assert!(files.len() >= 30, "{files:?}");
    let mut accepted = 0;
    for f in &files {
        let (code, out, err) =
            run(imgclf(&workspace()).args(["train", "--config", f.to_str().unwrap(), "--dry-run"]));
        if code == 0 {
            accepted += 1;
            assert!(out.contains("parameters: "), "{}: {out}", f.display());
        } else {
            // Unknown keys or wrong types would be bugs in configs/; only missing plugins and
            // features are acceptable reasons.
            assert!(
                err.contains("not supported yet"),
                "{} is neither accepted nor refused as not supported yet: {err}",
                f.display()
            );
        }
    }
    assert!(accepted >= 5, "only {accepted} configs accepted");
}

/// `imgclf lr-schedule` rows as (epoch, step, lr), from its CSV output.
fn lr_rows(args: &[&str]) -> Vec<(u64, u64, f64)> {
    let (code, out, err) = run(imgclf(&workspace()).arg("lr-schedule").args(args));
    assert_eq!(code, 0, "{err}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("epoch,step,lr"), "{out}");
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn lr_schedule_prints_every_iteration_with_warmup_and_milestone_boundaries() {
    // 1 warmup epoch + 4 main epochs of 4 iterations; milestones count from the warmup's end,
    // and an iteration on a boundary belongs to the earlier segment (the reference's
    // CombinedScheduler).
    let rows = lr_rows(&[
        "--config",
        "configs/fashion_mnist/resnet_preact.yaml",
        "scheduler.epochs",
        "5",
        "scheduler.warmup.type",
        "linear",
        "scheduler.warmup.epochs",
        "1",
        "scheduler.warmup.start_factor",
        "0.1",
        "scheduler.type",
        "multistep",
        "scheduler.milestones",
        "[2, 3]",
        "--steps-per-epoch",
        "4",
        "--csv",
    ]);
    assert_eq!(rows.len(), 20);
    assert_eq!(rows[0], (1, 0, 0.1 * 0.1));
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    assert!(close(rows[2].2, 0.1 * (0.1 + 0.9 * 0.5)));
    assert_eq!((rows[4].0, rows[4].1), (2, 4));
    assert!(close(rows[4].2, 0.1), "warmup end: {:?}", rows[4]);
    assert!(
        close(rows[12].2, 0.1),
        "first milestone iteration keeps the rate"
    );
    assert!(close(rows[13].2, 0.01), "{:?}", rows[13]);
    assert!(close(rows[16].2, 0.01) && close(rows[17].2, 0.001));
    assert_eq!(rows[19].0, 5);

    // Exponential warmup with the intended factor start + (1 - start) t^exponent: it ends at
    // base_lr, not at base_lr^2 as the reference's ExponentialScheduler would.
    let rows = lr_rows(&[
        "--config",
        "configs/fashion_mnist/resnet_preact.yaml",
        "scheduler.epochs",
        "3",
        "scheduler.warmup.type",
        "exponential",
        "scheduler.warmup.epochs",
        "1",
        "scheduler.warmup.start_factor",
        "0.1",
        "scheduler.warmup.exponent",
        "2",
        "scheduler.type",
        "linear",
        "scheduler.lr_min_factor",
        "0.5",
        "--steps-per-epoch",
        "4",
        "--csv",
    ]);
    assert_eq!(rows.len(), 12);
    assert!(close(rows[2].2, 0.1 * (0.1 + 0.9 * 0.25)), "{:?}", rows[2]);
    assert!(
        close(rows[4].2, 0.1),
        "warmup end at base_lr: {:?}",
        rows[4]
    );
    // Linear from 1 to 0.5 over the 8 main iterations; iteration 4 + k uses factor(k).
    assert!(close(rows[5].2, 0.1 * (1.0 - 0.5 / 8.0)), "{:?}", rows[5]);
    assert!(
        close(rows[11].2, 0.1 * (1.0 - 0.5 * 7.0 / 8.0)),
        "final LR {:?}",
        rows[11]
    );

    // Warmup type none ignores scheduler.warmup.epochs: the cosine spans all 4 epochs (the
    // reference would shorten it to 2 and extrapolate it upwards past its end).
    let rows = lr_rows(&[
        "--config",
        "configs/fashion_mnist/resnet_preact.yaml",
        "scheduler.epochs",
        "4",
        "scheduler.warmup.type",
        "none",
        "scheduler.warmup.epochs",
        "2",
        "scheduler.type",
        "cosine",
        "scheduler.lr_min_factor",
        "0.0",
        "--steps-per-epoch",
        "1",
        "--csv",
    ]);
    let cosine = |k: f64| 0.1 * 0.5 * (1.0 + (k / 4.0 * std::f64::consts::PI).cos());
    for (k, row) in rows.iter().enumerate() {
        assert!(close(row.2, cosine(k as f64)), "{rows:?}");
    }
}

#[test]
fn lr_schedule_counts_steps_from_the_dataset_and_plots_atomically() {
    let d = scratch("lr-schedule");
    let data = d.join("data");
    fashion_mnist_subset(&data, 100, 10);
    let plot = d.join("plots").join("lr.png");
    std::fs::create_dir_all(plot.parent().unwrap()).unwrap();
    // 100 images, val_ratio 0.1 -> 90 training images; batch 40 with drop_last -> 2 per epoch.
    let common = [
        "--config",
        "configs/fashion_mnist/resnet_preact.yaml",
        "dataset.dataset_dir",
        data.to_str().unwrap(),
        "train.batch_size",
        "40",
        "train.use_test_as_val",
        "False",
        "train.val_ratio",
        "0.1",
        "scheduler.epochs",
        "7",
        "scheduler.type",
        "sgdr",
        "scheduler.T0",
        "1",
        "scheduler.T_mul",
        "2",
    ];
    let (code, out, err) = run(imgclf(&workspace())
        .arg("lr-schedule")
        .args(common)
        .args(["--plot", plot.to_str().unwrap()]));
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1 + 7 * 2, "{out}");
    assert!(lines[0].contains("epoch") && lines[0].contains("lr"));
    // SGDR cycles of 1, 2, 4 epochs: iteration 2 ends cycle 1 at the minimum, 3 restarts.
    let lr = |i: usize| -> f64 {
        lines[1 + i]
            .split_whitespace()
            .nth(2)
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(lr(2).abs() < 1e-12, "lr_min_factor 0: {}", lines[3]);
    assert!(lr(3) > 0.08, "restart: {}", lines[4]);
    let png = std::fs::read(&plot).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let names: Vec<_> = std::fs::read_dir(plot.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["lr.png"], "no temporary files left behind");

    // Cycles that do not fill the schedule, and a plot that is not a PNG, are clear errors.
    let (code, _, err) = run(imgclf(&workspace())
        .arg("lr-schedule")
        .args(common)
        .args(["scheduler.epochs", "6"]));
    assert_ne!(code, 0);
    assert!(
        err.contains("scheduler.T0") && err.contains("cover 7 epochs"),
        "{err}"
    );
    let (code, _, err) = run(imgclf(&workspace())
        .arg("lr-schedule")
        .args(common)
        .args(["--plot", d.join("lr.jpg").to_str().unwrap()]));
    assert_ne!(code, 0);
    assert!(err.contains("PNG"), "{err}");
}

#[test]
fn throughput_times_training_and_prediction_of_the_configured_model() {
    let (code, out, err) = run(imgclf(&workspace()).args([
        "throughput",
        "--config",
        "configs/cifar/wrn.yaml",
        "model.wrn.depth",
        "10",
        "model.wrn.widening_factor",
        "1",
        "--batch-size",
        "4",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--json",
        "device",
        "cpu",
    ]));
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["model"], "wrn");
    assert_eq!(v["batch_size"], 4);
    assert_eq!(v["input"], serde_json::json!([3, 32, 32]));
    assert!(
        v["summary"].as_str().unwrap().starts_with("WRN-10-1"),
        "{v}"
    );
    for k in ["train_images_per_sec", "eval_images_per_sec"] {
        let r = v[k].as_f64().unwrap();
        assert!(r.is_finite() && r > 0.0, "{k}: {r}");
    }
    let (code, _, err) =
        run(imgclf(&workspace()).args(["throughput", "--plugin", "wrn", "--batch-size", "0"]));
    assert_ne!(code, 0);
    assert!(err.contains("--batch-size"), "{err}");
}

fn decode_png(path: &std::path::Path) -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

#[test]
fn preview_writes_a_png_grid_of_augmented_images_and_their_soft_labels() {
    let d = scratch("preview");
    let data = d.join("data");
    fashion_mnist_subset(&data, 64, 16);
    let preview = |out: &std::path::Path, extra: &[&str]| {
        let (code, stdout, err) = run(imgclf(&workspace())
            .args([
                "preview",
                "--config",
                "configs/fashion_mnist/resnet_preact.yaml",
                "dataset.dataset_dir",
                data.to_str().unwrap(),
            ])
            .args(extra)
            .args(["--output", out.to_str().unwrap(), "--scale", "1"]));
        assert_eq!(code, 0, "{err}");
        assert!(stdout.contains(out.to_str().unwrap()), "{stdout}");
        let side: Value =
            serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).unwrap())
                .unwrap();
        (decode_png(out), side)
    };
    // Cutout + Mixup on 9 images: a 3 x 3 grid of 28 px tiles with 2 px gaps.
    let out = d.join("out").join("grid.png");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let ((w, h, pixels), side) = preview(
        &out,
        &[
            "augmentation.use_cutout",
            "True",
            "augmentation.use_mixup",
            "True",
            "--count",
            "9",
        ],
    );
    assert_eq!((w, h), (3 * 28 + 4 * 2, 3 * 28 + 4 * 2));
    assert_eq!(pixels.len(), (w * h * 3) as usize);
    let tiles = side["tiles"].as_array().unwrap();
    assert_eq!(tiles.len(), 9);
    assert_eq!(side["augmentations"][3], "mixup");
    let mut mixed = 0;
    for t in tiles {
        let soft: Vec<f64> = t["soft_label"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(soft.len(), 10);
        assert!((soft.iter().sum::<f64>() - 1.0).abs() < 1e-5, "{t}");
        let label = t["label"].as_i64().unwrap();
        assert!((0..10).contains(&label));
        assert!(soft[label as usize] > 0.0, "{t}");
        mixed += usize::from(soft.iter().filter(|&&p| p > 0.0).count() > 1);
    }
    assert!(mixed > 0, "mixup mixes labels: {side}");
    let names: Vec<String> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(names.len(), 2, "no temporary files left behind: {names:?}");

    // Cutout alone masks with the dataset mean (mask_color 0 in normalised space): grey
    // round(0.2860 * 255) = 73 squares of at least 8 x 8 pixels (16 px squares, clipped).
    let ((w, _, pixels), side) = preview(
        &d.join("out").join("cutout.png"),
        &["augmentation.use_cutout", "True", "--count", "4"],
    );
    assert_eq!(
        side["tiles"][0]["soft_label"][side["tiles"][0]["label"].as_u64().unwrap() as usize],
        1.0
    );
    let px = |x: u32, y: u32| pixels[((y * w + x) * 3) as usize];
    for (row, col) in [(0u32, 0u32), (0, 1), (1, 0), (1, 1)] {
        let (x0, y0) = (2 + col * 30, 2 + row * 30);
        let grey = (0..28)
            .flat_map(|y| (0..28).map(move |x| (x, y)))
            .filter(|&(x, y)| px(x0 + x, y0 + y) == 73)
            .count();
        assert!(grey >= 64, "tile ({row}, {col}): {grey} mask pixels");
    }

    // Dual-Cutout shows both views of each image side by side.
    let ((w, h, _), side) = preview(
        &d.join("out").join("dual.png"),
        &["augmentation.use_dual_cutout", "True", "--count", "4"],
    );
    assert_eq!((w, h), (4 * 28 + 5 * 2, 2 * 28 + 3 * 2));
    assert_eq!(side["views"], 2);
    assert_eq!(side["tiles"].as_array().unwrap().len(), 8);

    let (code, _, err) = run(imgclf(&workspace()).args([
        "preview",
        "--config",
        "configs/fashion_mnist/resnet_preact.yaml",
    ]));
    assert_eq!(code, 1);
    assert!(err.contains("--output FILE.png"), "{err}");
}

#[test]
fn reference_augmentation_commands_and_configs_run_with_their_augmentations_on() {
    // Every single-device README command that switches an augmentation on, and every config in
    // configs/augmentations: the dry run builds the augmentations (their config checks) and
    // lists the switched-on one as active.
    let commands = std::fs::read_to_string(workspace().join("tests/data/commands.txt")).unwrap();
    let mut runs: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
    for line in commands
        .lines()
        .filter(|l| l.starts_with("python train.py"))
    {
        let args = split_command(line.trim_start_matches("python train.py"));
        let on: Vec<String> = args
            .windows(2)
            .filter(|w| w[0].starts_with("augmentation.use_") && w[1] == "True")
            .map(|w| w[0].trim_start_matches("augmentation.use_").to_string())
            .filter(|a| !a.starts_with("random_crop") && !a.starts_with("random_horizontal"))
            .collect();
        if !on.is_empty() {
            runs.push((line.to_string(), args, on));
        }
    }
    let dir = workspace().join("configs/augmentations/cifar");
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        runs.push((
            p.display().to_string(),
            vec!["--config".into(), p.display().to_string()],
            vec![name],
        ));
    }
    let names: Vec<&str> = runs.iter().flat_map(|r| &r.2).map(String::as_str).collect();
    for a in [
        "cutout",
        "random_erasing",
        "mixup",
        "ricap",
        "dual_cutout",
        "cutmix",
        "label_smoothing",
    ] {
        assert!(names.contains(&a), "nothing runs {a}: {names:?}");
    }
    for (what, args, on) in &runs {
        let (code, out, err) = run(imgclf(&workspace())
            .arg("train")
            .args(args)
            .arg("--dry-run"));
        assert_eq!(code, 0, "{what}\n{out}{err}");
        let active = out
            .lines()
            .find(|l| l.starts_with("augmentations: "))
            .unwrap_or_default();
        for a in on {
            assert!(active.contains(&format!("{a} ({a} ")), "{what}: {active}");
        }
        if on.iter().any(|a| a == "ricap") {
            assert!(!active.contains("random_crop"), "{what}: {active}");
        }
    }
}

#[test]
fn bad_optimizer_and_schedule_settings_fail_before_anything_is_written() {
    let d = scratch("bad-optim");
    let out = d.join("out");
    let base = [
        "train",
        "--config",
        "configs/fashion_mnist/resnet_preact.yaml",
        "train.output_dir",
        out.to_str().unwrap(),
    ];
    for (extra, expected) in [
        (
            &["train.optimizer", "adam", "optim.adam.betas", "[0.9]"][..],
            "optim.adam.betas must be two numbers",
        ),
        (
            &["train.optimizer", "adabound", "optim.adabound.gamma", "1.5"][..],
            "optim.adabound.gamma must be in [0, 1)",
        ),
        (
            &[
                "scheduler.type",
                "sgdr",
                "scheduler.epochs",
                "160",
                "scheduler.T0",
                "10",
                "scheduler.T_mul",
                "2.0",
            ][..],
            "cover 310 epochs, but the schedule has 160",
        ),
    ] {
        for dry in [true, false] {
            let mut cmd = imgclf(&workspace());
            cmd.args(base).args(extra);
            if dry {
                cmd.arg("--dry-run");
            }
            let (code, _, err) = run(&mut cmd);
            assert_eq!(code, 1, "{extra:?}: {err}");
            assert!(err.contains(expected), "{extra:?}: {err}");
            assert!(!out.exists(), "{extra:?}: nothing written");
        }
    }
}
