//! Optimizers and schedules against PyTorch: from the same initial weights (`train.checkpoint`),
//! on the whole tiny dataset as one batch without random augmentation, the weights after a few
//! steps equal those of the reference's training loop (tests/python/check_optimizers.py) for
//! every optimizer, schedule and warmup, with and without no_weight_decay_on_bn, gradient
//! clipping and Ghost BN; and every optimizer resumes exactly from its checkpointed state.
//!
//! The comparison is well-conditioned so that it holds on any x86-64 CPU: real Fashion-MNIST
//! images, a small network whose weights were first trained to a moderate loss, and rates at
//! which a step is stable. Its tolerance is measured, not chosen: PyTorch reruns each case with
//! oneDNN off, with one thread and from one-ulp perturbations of the weights and the images;
//! imgclf must lie within [`MULTIPLE`] times the largest of those differences (per tensor), and
//! each case's one-detail mutations (Nesterov off, a milestone moved, decay on BatchNorm) must
//! land at least [`FAR`] times the tolerance away.

use imgclf_tests::*;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

const DEPTH: i64 = 8;
const CHANNELS: i64 = 4;
const IMAGES: usize = 32;
/// Full-batch SGD steps that bring the initial weights to a moderate loss (about 2.3 -> 0.7).
const PRETRAIN_STEPS: &str = "40";
/// The tolerance, in multiples of the measured rounding floor of each tensor.
const MULTIPLE: f64 = 10.0;
/// How far (in tolerances) a one-detail change of the semantics must land.
const FAR: f64 = 50.0;

/// The config of one case: shared defaults, then the case's keys.
fn config(keys: &[(&str, Value)]) -> Map<String, Value> {
    let mut c = Map::new();
    for (k, v) in [
        ("train.optimizer", json!("sgd")),
        ("train.base_lr", json!(0.02)),
        ("train.momentum", json!(0.9)),
        ("train.nesterov", json!(false)),
        ("train.weight_decay", json!(5e-4)),
        ("train.no_weight_decay_on_bn", json!(false)),
        ("train.gradient_clip", json!(0.0)),
        ("train.subdivision", json!(1)),
        ("scheduler.epochs", json!(5)),
        ("scheduler.type", json!("constant")),
        ("scheduler.warmup.type", json!("none")),
        ("scheduler.warmup.epochs", json!(0)),
    ] {
        c.insert(k.into(), v);
    }
    for (k, v) in keys {
        c.insert(k.to_string(), v.clone());
    }
    c
}

fn train(data: &Path, init: &Path, out: &Path, config: &Map<String, Value>, extra: &[&str]) {
    let mut cmd = pytorch_trajectory_train(data, out, DEPTH, CHANNELS);
    cmd.args([
        "train.checkpoint",
        init.to_str().unwrap(),
        "train.batch_size",
        &IMAGES.to_string(),
        "train.val_period",
        "0",
    ]);
    for (k, v) in config {
        cmd.args([k.clone(), literal(v)]);
    }
    cmd.args(extra);
    let (code, _, err) = run(&mut cmd);
    assert_eq!(code, 0, "{}: {err}", out.display());
}

fn python() -> Option<PathBuf> {
    std::env::var_os("IMGCLF_PYTHON").map(PathBuf::from)
}

fn script() -> PathBuf {
    workspace().join("tests/python/check_optimizers.py")
}

/// Initial weights: from PyTorch when it is at hand, else from an imgclf run of zero steps'
/// worth (its first checkpoint is as good a starting point for the resume checks).
fn initial_weights(d: &Path, data: &Path) -> PathBuf {
    let init = d.join("init.safetensors");
    if let Some(py) = python() {
        let o = Command::new(py)
            .arg(script())
            .args(["init", "--out", init.to_str().unwrap()])
            .args(["--depth", &DEPTH.to_string()])
            .args(["--initial-channels", &CHANNELS.to_string()])
            .args(["--dataset-dir", data.to_str().unwrap()])
            .args(["--steps", PRETRAIN_STEPS])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        return init;
    }
    let out = d.join("init-run");
    let mut cmd = pytorch_trajectory_train(data, &out, DEPTH, CHANNELS);
    cmd.args([
        "train.batch_size",
        &IMAGES.to_string(),
        "train.val_period",
        "0",
    ]);
    let (code, _, err) = run(&mut cmd);
    assert_eq!(code, 0, "{err}");
    out.join("model_final.safetensors")
}

fn cases() -> Vec<(&'static str, Map<String, Value>)> {
    let warm_lin = [
        ("scheduler.warmup.type", json!("linear")),
        ("scheduler.warmup.epochs", json!(2)),
        ("scheduler.warmup.start_factor", json!(0.1)),
    ];
    let warm_exp = [
        ("scheduler.warmup.type", json!("exponential")),
        ("scheduler.warmup.epochs", json!(2)),
        ("scheduler.warmup.start_factor", json!(0.2)),
        ("scheduler.warmup.exponent", json!(2)),
    ];
    let cosine = [
        ("scheduler.type", json!("cosine")),
        ("scheduler.lr_min_factor", json!(0.1)),
    ];
    let multistep = [
        ("scheduler.type", json!("multistep")),
        ("scheduler.milestones", json!([1, 2])),
        ("scheduler.lr_decay", json!(0.5)),
    ];
    let linear = [
        ("scheduler.type", json!("linear")),
        ("scheduler.lr_min_factor", json!(0.2)),
    ];
    // 3 main epochs after a 2-epoch warmup: cycles of 1 and 2 epochs.
    let sgdr = [
        ("scheduler.type", json!("sgdr")),
        ("scheduler.T0", json!(1)),
        ("scheduler.T_mul", json!(2.0)),
        ("scheduler.lr_min_factor", json!(0.05)),
    ];
    let no_wd_bn = [
        ("train.no_weight_decay_on_bn", json!(true)),
        ("train.weight_decay", json!(5e-2)),
    ];
    let clip = [("train.gradient_clip", json!(0.5))];
    let cat = |parts: &[&[(&str, Value)]]| -> Map<String, Value> { config(&parts.concat()) };
    let opt = |name: &str, lr: f64| -> Vec<(&'static str, Value)> {
        vec![
            ("train.optimizer", json!(name)),
            ("train.base_lr", json!(lr)),
        ]
    };
    let sgd_nesterov = [
        ("train.optimizer", json!("sgd")),
        ("train.nesterov", json!(true)),
    ];
    // Rates at which a step is stable from the pretrained weights (a fifth of the usual ones).
    let adam = opt("adam", 2e-3);
    let adam_betas = [("optim.adam.betas", json!([0.8, 0.99]))];
    let amsgrad = opt("amsgrad", 2e-3);
    let adabound = [
        opt("adabound", 2e-3),
        vec![
            ("optim.adabound.final_lr", json!(0.05)),
            ("optim.adabound.gamma", json!(0.1)),
        ],
    ]
    .concat();
    let adaboundw = [
        opt("adaboundw", 2e-3),
        vec![("train.weight_decay", json!(1e-2))],
    ]
    .concat();
    let lars = [
        opt("lars", 0.01),
        vec![("optim.lars.threshold", json!(0.5))],
    ]
    .concat();
    let ghost = [("train.subdivision", json!(4))];
    vec![
        (
            "sgd-nesterov-cosine-linear-warmup",
            cat(&[&sgd_nesterov, &cosine, &warm_lin]),
        ),
        (
            "sgd-multistep-no-wd-on-bn-clip",
            cat(&[&multistep, &no_wd_bn, &clip]),
        ),
        (
            "sgd-ghost-bn-clip-exponential-warmup",
            // Chunks of 8 images make steps sensitive: a smaller rate keeps them stable.
            // Clipping comes before the division by train.subdivision, as in the reference.
            cat(&[
                &ghost,
                &clip,
                &warm_exp,
                &linear,
                &[("train.base_lr", json!(0.004))],
            ]),
        ),
        (
            "adam-linear-exponential-warmup",
            cat(&[&adam, &adam_betas, &linear, &warm_exp]),
        ),
        (
            "adam-sgdr-no-wd-on-bn",
            cat(&[&adam, &sgdr, &warm_lin, &no_wd_bn]),
        ),
        ("amsgrad-constant-clip", cat(&[&amsgrad, &clip])),
        (
            "amsgrad-multistep-ghost-bn",
            cat(&[&amsgrad, &multistep, &ghost]),
        ),
        (
            "adabound-sgdr-linear-warmup",
            cat(&[&adabound, &sgdr, &warm_lin]),
        ),
        (
            "adabound-cosine-no-wd-on-bn-clip",
            cat(&[&adabound, &cosine, &no_wd_bn, &clip]),
        ),
        ("adaboundw-multistep", cat(&[&adaboundw, &multistep])),
        (
            "adaboundw-cosine-no-wd-on-bn",
            cat(&[&adaboundw, &cosine, &warm_exp, &no_wd_bn]),
        ),
        (
            "lars-cosine-linear-warmup",
            cat(&[&lars, &cosine, &warm_lin]),
        ),
        (
            "lars-multistep-no-wd-on-bn-clip",
            cat(&[&lars, &multistep, &no_wd_bn, &clip]),
        ),
        (
            "lars-sgdr-ghost-bn",
            cat(&[&lars, &sgdr, &warm_exp, &ghost]),
        ),
    ]
}

/// One-detail changes of a case's semantics that the comparison must tell apart from it.
fn mutations(case: &str) -> Vec<(&'static str, Value)> {
    let nesterov_off = ("Nesterov off", json!({"train.nesterov": false}));
    let milestone_moved = ("a milestone moved", json!({"scheduler.milestones": [1, 3]}));
    let decay_on_bn = (
        "weight decay on BatchNorm",
        json!({"train.no_weight_decay_on_bn": false}),
    );
    match case {
        "sgd-nesterov-cosine-linear-warmup" => vec![nesterov_off],
        "sgd-multistep-no-wd-on-bn-clip" => vec![milestone_moved, decay_on_bn],
        "adam-sgdr-no-wd-on-bn" => vec![decay_on_bn],
        "lars-multistep-no-wd-on-bn-clip" => vec![milestone_moved],
        _ => vec![],
    }
}

fn tensors(path: &Path) -> Vec<(String, tch::Tensor)> {
    let mut t = imgclf::io::load_safetensors(path).unwrap().0;
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

#[test]
fn weights_after_five_steps_equal_pytorch_for_every_optimizer_and_schedule() {
    let d = scratch("optimizers-vs-pytorch");
    let data = d.join("data");
    fashion_mnist_subset(&data, IMAGES, 8);
    let init = initial_weights(&d, &data);
    let mut listed = Vec::new();
    for (name, cfg) in cases() {
        let out = d.join(name);
        train(&data, &init, &out, &cfg, &[]);
        let result = out.join("model_final.safetensors");
        // Every case trains: its weights left the initial ones.
        let moved = tensors(&init)
            .iter()
            .zip(tensors(&result))
            .any(|((_, a), (_, b))| a.kind() == tch::Kind::Float && !a.equal(&b));
        assert!(moved, "{name}: the weights did not change");
        let mutations: Vec<Value> = mutations(name)
            .into_iter()
            .map(|(label, config)| json!({"label": label, "config": config}))
            .collect();
        listed.push(json!({"name": name, "result": result, "config": cfg, "mutations": mutations}));
    }
    let Some(py) = python() else {
        eprintln!("IMGCLF_PYTHON not set: trained every case, compared none with PyTorch");
        return;
    };
    // The training order of each epoch (the whole set, shuffled), so that Ghost BN's chunks
    // and every sum see the images in imgclf's order.
    let orders: Vec<Vec<usize>> = (0..5)
        .map(|e| imgclf::train::data::epoch_order(IMAGES, 0, e))
        .collect();
    // imgclf runs libtorch with one thread per available CPU; so does the check.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let spec = json!({
        "dataset_dir": data, "orders": orders, "threads": threads, "init": init,
        "depth": DEPTH, "initial_channels": CHANNELS, "mean": 0.2860, "std": 0.3530,
        "multiple": MULTIPLE, "far": FAR, "cases": listed,
    });
    let cases_file = d.join("cases.json");
    std::fs::write(&cases_file, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    let o = Command::new(&py)
        .arg(script())
        .args(["check", "--cases", cases_file.to_str().unwrap()])
        // Idle OpenMP threads sleep instead of spinning: the same sums, and fast also on a
        // machine whose cores are busy with other work.
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("{text}");
    assert!(o.status.success(), "imgclf disagrees with PyTorch:\n{text}");
    assert_eq!(
        text.matches("of tolerance at").count(),
        cases().len(),
        "every case compared:\n{text}"
    );
    let mutated: usize = cases().iter().map(|(n, _)| mutations(n).len()).sum();
    assert!(mutated >= 4);
    assert_eq!(
        text.matches("times the tolerance at").count(),
        mutated,
        "every mutation trained:\n{text}"
    );
}

#[test]
fn every_optimizer_resumes_exactly_from_its_checkpointed_state() {
    let d = scratch("optimizers-resume");
    let data = d.join("data");
    fashion_mnist_subset(&data, IMAGES, 8);
    let init = initial_weights(&d, &data);
    for name in ["adam", "amsgrad", "adabound", "adaboundw", "lars"] {
        let cfg = config(&[
            ("train.optimizer", json!(name)),
            (
                "train.base_lr",
                json!(if name == "lars" { 0.05 } else { 1e-2 }),
            ),
            ("scheduler.epochs", json!(3)),
            ("scheduler.type", json!("cosine")),
        ]);
        let full = d.join(format!("{name}-full"));
        train(&data, &init, &full, &cfg, &["train.checkpoint_period", "1"]);
        // The same run stopped after epoch 2: drop what came later and resume.
        let cut = d.join(format!("{name}-cut"));
        std::fs::create_dir_all(&cut).unwrap();
        for e in std::fs::read_dir(&full).unwrap() {
            let p = e.unwrap().path();
            let f = p.file_name().unwrap().to_str().unwrap().to_string();
            if p.is_file() && f != "checkpoint_00003.safetensors" && f != "model_final.safetensors"
            {
                std::fs::copy(&p, cut.join(&f)).unwrap();
            }
        }
        let state: Vec<String> = tensors(&cut.join("checkpoint_00002.safetensors"))
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n.starts_with("optimizer."))
            .collect();
        assert!(
            !state.is_empty(),
            "{name}: no optimizer state in the checkpoint"
        );
        // The same computation as the run it resumes.
        let (code, _, err) = run(as_pytorch_computes(imgclf(&workspace()).args([
            "train",
            "--resume",
            cut.to_str().unwrap(),
        ])));
        assert_eq!(code, 0, "{name}: {err}");
        let a = tensors(&full.join("model_final.safetensors"));
        let b = tensors(&cut.join("model_final.safetensors"));
        assert_eq!(a.len(), b.len());
        for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            assert!(ta.equal(tb), "{name}: {na} differs after resume");
        }
    }
}
