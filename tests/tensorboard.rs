//! TensorBoard event files of a real (tiny) Fashion-MNIST run, read back with TensorBoard's
//! own reader (tests/python/read_tensorboard.py): every scalar equals `metrics.jsonl`, the
//! images decode, every parameter has its histograms, and a resume purges what the
//! interrupted run wrote past its checkpoint. Also `imgclf plot`.

use imgclf_tests::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn python() -> PathBuf {
    std::env::var_os("IMGCLF_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| "python3".into())
}

/// What TensorBoard's EventAccumulator reads from the event files of `dir`.
fn read_tensorboard(dir: &Path) -> Value {
    let out = Command::new(python())
        .arg(workspace().join("tests/python/read_tensorboard.py"))
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python().display()));
    assert!(
        out.status.success(),
        "TensorBoard's reader failed on {} (IMGCLF_PYTHON needs `pip install tensorboard`; \
         cargo xtask test installs it):\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A scalar tag as step -> value; a step seen twice (curves doubling back) fails.
fn scalars(tb: &Value, tag: &str) -> BTreeMap<u64, f32> {
    let mut m = BTreeMap::new();
    for e in tb["scalars"][tag]
        .as_array()
        .unwrap_or_else(|| panic!("no scalar {tag} in {}", tb["scalars"]))
    {
        let step = e[0].as_u64().unwrap();
        let old = m.insert(step, e[1].as_f64().unwrap() as f32);
        assert!(old.is_none(), "{tag}: step {step} twice");
    }
    m
}

fn f32_of(v: &Value) -> f32 {
    v.as_f64().unwrap() as f32
}

fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| {
        p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("events.out.tfevents.")
    });
    v.sort();
    v
}

fn decode_png(hex: &str) -> (u32, u32, Vec<u8>) {
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let mut r = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .unwrap();
    let mut buf = vec![0; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

const STEPS_PER_EPOCH: u64 = 4; // 512 images, batch 128

fn train(data: &Path, out: &Path, extra: &[&str]) -> String {
    let mut args: Vec<String> = [
        "train",
        "--plugin",
        "resnet_preact",
        "--config",
        "configs/fashion_mnist/resnet_preact.yaml",
        "dataset.dataset_dir",
        data.to_str().unwrap(),
        "train.output_dir",
        out.to_str().unwrap(),
        "model.resnet_preact.depth",
        "8",
        "train.log_period",
        "1",
        "validation.batch_size",
        "64",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let (code, _, err) = run(imgclf(&workspace()).args(args));
    assert_eq!(code, 0, "{err}");
    err
}

#[test]
fn event_files_hold_metrics_jsonl_in_tensorboards_reader_and_resume_purges() {
    let d = scratch("tensorboard");
    let data = d.join("data");
    fashion_mnist_subset(&data, 512, 128);
    let out = d.join("out");
    train(
        &data,
        &out,
        &[
            "scheduler.epochs",
            "3",
            "scheduler.type",
            "multistep",
            "scheduler.milestones",
            "[2]",
            "tensorboard.train_images",
            "True",
            "tensorboard.val_images",
            "True",
            "tensorboard.model_params",
            "True",
        ],
    );
    assert_eq!(event_files(&out).len(), 1);
    assert_eq!(event_files(&out.join("running")).len(), 1);
    // The run is cut short after its second checkpoint: what it wrote for epoch 3 is
    // orphaned. Resuming trains epoch 3 again; TensorBoard must show it once.
    for f in ["checkpoint_00003.safetensors", "model_final.safetensors"] {
        std::fs::remove_file(out.join(f)).unwrap();
    }
    let before = read_tensorboard(&out);
    assert_eq!(scalars(&before, "Train/Loss").len(), 3);
    // Only --resume: a --config or KEY VALUE here would apply on top of the saved config.
    let (code, _, err) =
        run(imgclf(&workspace()).args(["train", "--resume", out.to_str().unwrap()]));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("resumed from"), "{err}");
    assert_eq!(event_files(&out).len(), 2, "a new event file per run");
    let events = imgclf::tensorboard::read_events(&event_files(&out)[1]).unwrap();
    assert!(
        events.iter().any(|e| e.step == 3
            && matches!(
                e.what,
                Some(imgclf::tensorboard::proto::What::SessionLog(_))
            )),
        "purge at epoch 3: {events:?}"
    );

    let records = jsonl(&out.join("metrics.jsonl"));
    let train_recs: Vec<&Value> = records.iter().filter(|r| r["split"] == "train").collect();
    let val_recs: Vec<&Value> = records.iter().filter(|r| r["split"] == "val").collect();
    assert_eq!(train_recs.len() as u64, 3 * STEPS_PER_EPOCH);
    assert_eq!(val_recs.len(), 4, "val_first and after each of 3 epochs");

    // Running scalars: one per logged step, at the global step, equal to metrics.jsonl.
    let running = read_tensorboard(&out.join("running"));
    for (tag, key) in [
        ("Train/RunningLoss", "loss"),
        ("Train/RunningAcc1", "acc1"),
        ("Train/RunningAcc5", "acc5"),
        ("Train/RunningLearningRate", "lr"),
    ] {
        let s = scalars(&running, tag);
        let expected: BTreeMap<u64, f32> = train_recs
            .iter()
            .map(|r| (r["step"].as_u64().unwrap(), f32_of(&r[key])))
            .collect();
        assert_eq!(s, expected, "{tag}");
    }

    // Per-epoch scalars: the epoch's averages (= the running averages at its last step).
    let tb = read_tensorboard(&out);
    let last_of_epoch = |e: u64| {
        train_recs
            .iter()
            .rfind(|r| r["epoch"].as_u64() == Some(e))
            .unwrap()
    };
    let first_of_epoch = |e: u64| {
        train_recs
            .iter()
            .find(|r| r["epoch"].as_u64() == Some(e))
            .unwrap()
    };
    for (tag, key) in [
        ("Train/Loss", "loss"),
        ("Train/Acc1", "acc1"),
        ("Train/Acc5", "acc5"),
    ] {
        let expected: BTreeMap<u64, f32> = (1..=3)
            .map(|e| (e, f32_of(&last_of_epoch(e)[key])))
            .collect();
        assert_eq!(scalars(&tb, tag), expected, "{tag}");
    }
    // Train/LearningRate is the reference's scheduler.get_last_lr() after the epoch: the
    // rate of the next step.
    let lr = scalars(&tb, "Train/LearningRate");
    let expected: BTreeMap<u64, f32> = [
        (1, f32_of(&first_of_epoch(2)["lr"])),
        (2, f32_of(&first_of_epoch(3)["lr"])),
        (3, f32_of(&last_of_epoch(3)["lr"])),
    ]
    .into();
    assert_eq!(lr, expected);
    // The rates themselves follow the reference's CombinedScheduler, whose
    // `bisect_left(offsets, step) - 1` keeps the old rate at the milestone step itself:
    // global step s (1-based) trains at f(s - 1), and f(8) (the first step of epoch 3) is
    // still 0.1; decay (lr_decay 0.1) starts at step 10. So Train/LearningRate after epoch 2
    // is 0.1 too, as the reference logs it.
    for r in &train_recs {
        let step = r["step"].as_u64().unwrap();
        let want = if step - 1 <= 2 * STEPS_PER_EPOCH {
            0.1f32
        } else {
            0.1f32 * 0.1f32
        };
        let got = f32_of(&r["lr"]);
        assert!(
            (got - want).abs() <= 1e-6 * want,
            "step {step}: lr {got}, reference {want}"
        );
    }
    assert_eq!(lr[&2], 0.1f32);
    for (tag, steps) in [("Train/Time", 1..=3), ("Val/Time", 0..=3)] {
        let s = scalars(&tb, tag);
        assert_eq!(
            s.keys().copied().collect::<Vec<_>>(),
            steps.collect::<Vec<_>>()
        );
        assert!(s.values().all(|&t| t > 0.0 && t < 600.0), "{tag}: {s:?}");
    }
    for (tag, key, first) in [
        ("Val/Loss", "loss", 1),
        ("Val/Acc1", "acc1", 0),
        ("Val/Acc5", "acc5", 0),
    ] {
        let expected: BTreeMap<u64, f32> = val_recs
            .iter()
            .filter(|r| r["epoch"].as_u64().unwrap() >= first)
            .map(|r| (r["epoch"].as_u64().unwrap(), f32_of(&r[key])))
            .collect();
        assert_eq!(scalars(&tb, tag), expected, "{tag}");
    }

    // Images: a grid of the first batch, 8 per row with 2 pixels of padding.
    let images = &tb["images"];
    let train_images = images["Train/Image"].as_array().unwrap();
    let steps: Vec<u64> = train_images
        .iter()
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3]);
    for e in train_images {
        let (w, h, px) = decode_png(e["png"].as_str().unwrap());
        // 128 images of 28x28: 8 columns, 16 rows of 30 pixels, plus 2.
        assert_eq!((w, h), (242, 482));
        assert_eq!(
            (e["width"].as_u64(), e["height"].as_u64()),
            (Some(242), Some(482))
        );
        assert!(px.contains(&255) && px.iter().any(|&p| p > 0 && p < 255));
    }
    let val_images = images["Val/Image"].as_array().unwrap();
    assert_eq!(val_images.len(), 1, "at epoch 0 only, as the reference");
    assert_eq!(val_images[0]["step"], 0);
    assert_eq!(decode_png(val_images[0]["png"].as_str().unwrap()).0, 242);

    // Histograms: every parameter (no buffers) after each validation.
    let hist = tb["histograms"].as_object().unwrap();
    assert!(hist.contains_key("conv.weight"), "{:?}", hist.keys());
    assert!(
        !hist.keys().any(|k| k.contains("running_")),
        "buffers are not parameters: {:?}",
        hist.keys()
    );
    // The histograms at epoch 1 are of the weights checkpoint_00001 holds.
    let (saved, _) =
        imgclf::io::load_safetensors(&out.join("checkpoint_00001.safetensors")).unwrap();
    let params: BTreeMap<String, &tch::Tensor> = saved
        .iter()
        .filter_map(|(n, t)| Some((n.strip_prefix("model.")?.to_string(), t)))
        .filter(|(n, _)| !n.ends_with("running_mean") && !n.ends_with("running_var"))
        .filter(|(n, _)| !n.ends_with("num_batches_tracked"))
        .collect();
    assert_eq!(
        hist.keys().collect::<Vec<_>>(),
        params.keys().collect::<Vec<_>>()
    );
    for (tag, events) in hist {
        let t = params[tag].to_kind(tch::Kind::Double);
        let at1 = &events[1];
        assert_eq!(at1["num"].as_f64().unwrap(), t.numel() as f64, "{tag}");
        let sum = t.sum(tch::Kind::Double).double_value(&[]);
        let tol = 1e-9 * t.abs().sum(tch::Kind::Double).double_value(&[]).max(1.0);
        assert!(
            (at1["sum"].as_f64().unwrap() - sum).abs() <= tol,
            "{tag}: {at1} vs {sum}"
        );
        // The proto's double max, as float32: the parameter's largest float32 value.
        assert_eq!(
            at1["max"].as_f64().unwrap() as f32,
            t.max().double_value(&[]) as f32,
            "{tag}"
        );
        let events = events.as_array().unwrap();
        let steps: Vec<u64> = events.iter().map(|e| e["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, [0, 1, 2, 3], "{tag}");
        for e in events {
            let num = e["num"].as_f64().unwrap();
            assert!(num >= 1.0, "{tag}");
            assert_eq!(e["bucket_total"].as_f64().unwrap(), num, "{tag}");
            assert!(e["min"].as_f64().unwrap() <= e["max"].as_f64().unwrap());
        }
    }

    // `imgclf plot` reads the same run.
    let png = d.join("curves.png");
    let (code, stdout, err) =
        run(imgclf(&d).args(["plot", out.to_str().unwrap(), "-o", png.to_str().unwrap()]));
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("curves.png"), "{stdout}");
    let (w, h, _) = read_png(&png);
    assert_eq!((w, h), imgclf::curves::picture_size(1));
    let _ = std::fs::remove_dir_all(&d);
}

fn read_png(path: &Path) -> (usize, usize, Vec<u8>) {
    let file = std::fs::File::open(path).unwrap();
    let mut r = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap();
    let mut buf = vec![0; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width as usize, info.height as usize, buf)
}

/// A run directory whose metrics.jsonl has 3 epochs of 4 logged steps; the loss falls as
/// `scale / step`.
fn synthetic_run(dir: &Path, scale: f64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut s = String::new();
    for step in 1..=12u64 {
        let epoch = step.div_ceil(4);
        let line = serde_json::json!({"epoch": epoch, "step": step, "split": "train",
            "loss": scale / step as f64, "acc1": 1.0 - 0.5 / step as f64,
            "acc5": 1.0, "lr": 0.1 * scale});
        s += &format!("{line}\n");
        if step % 4 == 0 {
            let line = serde_json::json!({"epoch": epoch, "step": step, "split": "val",
                "loss": scale / step as f64, "acc1": 0.5, "acc5": 0.9, "lr": 0.1});
            s += &format!("{line}\n");
        }
    }
    std::fs::write(dir.join("metrics.jsonl"), s).unwrap();
}

#[test]
fn plot_draws_each_run_in_its_colour_and_different_runs_differently() {
    let d = scratch("plot");
    let (a, b) = (d.join("run_a"), d.join("run_b"));
    synthetic_run(&a, 1.0);
    synthetic_run(&b, 3.0);
    let plot = |dirs: &[&Path], name: &str| {
        let png = d.join(name);
        let mut args: Vec<String> = vec!["plot".into()];
        args.extend(dirs.iter().map(|p| p.to_str().unwrap().to_string()));
        args.extend(["-o".into(), png.to_str().unwrap().into()]);
        let (code, _, err) = run(imgclf(&d).args(args));
        assert_eq!(code, 0, "{err}");
        read_png(&png)
    };
    let (w, h, only_a) = plot(&[&a], "a.png");
    assert_eq!((w, h), imgclf::curves::picture_size(1));
    let (_, _, only_b) = plot(&[&b], "b.png");
    assert_eq!(only_a.len(), only_b.len());
    // The legends name different runs and the curves lie elsewhere: many pixels differ.
    let differing = only_a
        .chunks(3)
        .zip(only_b.chunks(3))
        .filter(|(p, q)| p != q)
        .count();
    assert!(differing > 500, "{differing} pixels differ");
    let (w, h, both) = plot(&[&a, &b], "both.png");
    assert_eq!((w, h), imgclf::curves::picture_size(2));
    let count = |c: [u8; 3]| both.chunks(3).filter(|p| *p == c).count();
    let (first, second) = (
        count(imgclf::curves::COLORS[0]),
        count(imgclf::curves::COLORS[1]),
    );
    assert!(first > 200 && second > 200, "{first} {second}");
    // A directory without metrics.jsonl is an error that says what is missing.
    let (code, _, err) = run(imgclf(&d).args(["plot", d.to_str().unwrap()]));
    assert_ne!(code, 0);
    assert!(err.contains("metrics.jsonl"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn use_tensorboard_false_writes_no_event_files() {
    let d = scratch("tensorboard-off");
    let data = d.join("data");
    fashion_mnist_subset(&data, 128, 64);
    let out = d.join("out");
    train(
        &data,
        &out,
        &["train.use_tensorboard", "False", "train.val_first", "False"],
    );
    assert!(out.join("metrics.jsonl").exists());
    assert!(event_files(&out).is_empty());
    assert!(!out.join("running").exists());
    let _ = std::fs::remove_dir_all(&d);
}
