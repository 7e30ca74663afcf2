//! Image folders (`dataset.name ImageNet` / `ImageFolder`): the listing order and the
//! transforms' geometry against torchvision itself (the test Python's torchvision, which
//! `cargo xtask test` installs), and `imgclf train` / `imgclf evaluate` on a small generated
//! folder of JPEG and PNG images of odd sizes with one corrupt file.

use imgclf::datasets::folder::{decode_rgb, ImageFolder};
use imgclf::datasets::transform::{
    random_resized_crop_box, Geometry, Transform, RRC_RATIO, RRC_SCALE,
};
use imgclf_plugin_api::rng::step_rng;
use imgclf_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn python() -> PathBuf {
    std::env::var_os("IMGCLF_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| "python3".into())
}

/// Runs `code` in the test Python with `args` (sys.argv[1:]) and parses its last stdout line.
fn torchvision(code: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(python())
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python().display()));
    assert!(
        out.status.success(),
        "{} failed (it needs torchvision, which `cargo xtask test` installs; set IMGCLF_PYTHON): {}",
        python().display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("")).unwrap()
}

fn touch(p: &Path) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, b"not decoded when listing").unwrap();
}

#[test]
fn listing_matches_torchvision_image_folder() {
    let dir = scratch("folder-listing");
    write_image_folder(&dir, &["zebra", "Cat", "dog", "_x"], 4);
    let train = dir.join("train");
    for f in [
        "dog/sub/a.jpeg",
        "dog/sub b/b.JPEG",
        "dog/sub.x/c.png",
        "dog/sub/deeper/d.webp",
        "dog/notes.txt",
        "dog/archive.jpg.bak",
        ".hidden/h.png",
        "Cat/Z.tif",
        "Cat/a.TIFF",
        "Cat/é.ppm",
        "Cat/e.pgm",
        "Cat/f.bmp",
    ] {
        touch(&train.join(f));
    }
    let ours = ImageFolder::scan(&train).unwrap();
    let theirs = torchvision(
        "import json, os, sys, torchvision\n\
         root = sys.argv[1]\n\
         ds = torchvision.datasets.ImageFolder(root)\n\
         print(json.dumps({'classes': ds.classes,\n\
             'samples': [[os.path.relpath(p, root), t] for p, t in ds.samples]}))",
        &[train.to_str().unwrap()],
    );
    let classes: Vec<String> = serde_json::from_value(theirs["classes"].clone()).unwrap();
    assert_eq!(ours.classes, classes);
    let samples: Vec<(String, i64)> = serde_json::from_value(theirs["samples"].clone()).unwrap();
    let mine: Vec<(String, i64)> = ours
        .samples
        .iter()
        .map(|(p, l)| {
            (
                p.strip_prefix(&train)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string(),
                *l,
            )
        })
        .collect();
    assert_eq!(mine, samples);
    assert!(mine.len() > 20);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn transforms_match_torchvision_geometry() {
    let dir = scratch("folder-transforms");
    // A lossless 37x29 image with distinct pixels.
    let img = image::RgbImage::from_fn(37, 29, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 8) as u8, ((x * 3 + y * 5) % 256) as u8])
    });
    let png = dir.join("a.png");
    img.save(&png).unwrap();
    let script = r#"import json, sys, numpy as np, torch
from PIL import Image
import torchvision.transforms as T
img = Image.open(sys.argv[1]).convert('RGB')
out = {}
for name, t in [('crop16', T.CenterCrop(16)), ('crop40', T.CenterCrop(40)),
                ('resize20_crop16', T.Compose([T.Resize(20), T.CenterCrop(16)])),
                ('resize64_crop48', T.Compose([T.Resize(64), T.CenterCrop(48)]))]:
    a = np.asarray(t(img))
    out[name] = a.transpose(2, 0, 1).reshape(-1).tolist()
torch.manual_seed(0)
rrc = T.RandomResizedCrop(224)
big = Image.new('RGB', (500, 375))
fr, lr = [], []
for _ in range(20000):
    i, j, h, w = rrc.get_params(big, rrc.scale, rrc.ratio)
    fr.append(h * w / (500 * 375)); lr.append(np.log(w / h))
out['rrc'] = [float(np.mean(fr)), float(np.std(fr)), float(np.mean(lr)), float(np.std(lr))]
print(json.dumps(out))"#;
    let theirs = torchvision(script, &[png.to_str().unwrap()]);
    let rgb = decode_rgb(&png).unwrap();
    let apply = |resize: Option<usize>, size: usize| -> Vec<u8> {
        let t = Transform {
            geometry: Geometry::ResizeCenterCrop {
                resize,
                center_crop: true,
            },
            size,
            flip_prob: 0.0,
        };
        let mut out = vec![0u8; 3 * size * size];
        t.apply_alone(&rgb, &mut step_rng(0), &mut out).unwrap();
        out
    };
    let want = |k: &str| -> Vec<u8> { serde_json::from_value(theirs[k].clone()).unwrap() };
    // Center crops (with zero padding when larger than the image) are exact.
    assert_eq!(apply(None, 16), want("crop16"));
    assert_eq!(apply(None, 40), want("crop40"));
    // Resizing is PIL's antialiased bilinear in another implementation: within rounding.
    for (resize, size, key) in [(20, 16, "resize20_crop16"), (64, 48, "resize64_crop48")] {
        let (ours, theirs) = (apply(Some(resize), size), want(key));
        assert_eq!(ours.len(), theirs.len());
        let max = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .max()
            .unwrap();
        assert!(max <= 1, "{key}: max difference {max}");
    }
    // Random-resized crop boxes: the same distribution as torchvision's get_params.
    let mut rng = step_rng(7);
    let (mut fr, mut lr) = (Vec::new(), Vec::new());
    for _ in 0..20000 {
        let b = random_resized_crop_box(500, 375, RRC_SCALE, RRC_RATIO, &mut rng);
        fr.push((b.width * b.height) as f64 / (500.0 * 375.0));
        lr.push((b.width as f64 / b.height as f64).ln());
    }
    let stats = |v: &[f64]| {
        let m = v.iter().sum::<f64>() / v.len() as f64;
        let s = (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
        (m, s)
    };
    let tv: Vec<f64> = serde_json::from_value(theirs["rrc"].clone()).unwrap();
    let ((fm, fs), (lm, ls)) = (stats(&fr), stats(&lr));
    // Standard errors of the means: about 0.002 (area) and 0.0012 (log ratio).
    assert!((fm - tv[0]).abs() < 0.01, "area mean {fm} vs {}", tv[0]);
    assert!((fs - tv[1]).abs() < 0.01, "area std {fs} vs {}", tv[1]);
    assert!(
        (lm - tv[2]).abs() < 0.008,
        "log-ratio mean {lm} vs {}",
        tv[2]
    );
    assert!(
        (ls - tv[3]).abs() < 0.008,
        "log-ratio std {ls} vs {}",
        tv[3]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn train_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "--config",
        "configs/datasets/imagenet.yaml",
        "model.name",
        "resnet_preact",
        "model.resnet_preact.depth",
        "8",
        "dataset.dataset_dir",
        data.to_str().unwrap(),
        "dataset.image_size",
        "32",
        "dataset.n_classes",
        "3",
        "device",
        "cpu",
        "train.batch_size",
        "4",
        "train.dataloader.num_workers",
        "2",
        "validation.batch_size",
        "8",
        "validation.dataloader.num_workers",
        "3",
        "scheduler.epochs",
        "1",
        "train.output_dir",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[test]
fn trains_and_evaluates_on_a_generated_folder_with_a_corrupt_image() {
    let dir = scratch("folder-train");
    let data = dir.join("data");
    write_image_folder(&data, &["ant", "bee", "cat"], 6);
    std::fs::write(
        data.join("train/bee/broken.jpg"),
        b"\xff\xd8 not really a jpeg",
    )
    .unwrap();

    // Without the key: an error that names the file and the key, no crash.
    let (code, _, err) =
        run(imgclf(&workspace()).args(train_args(&data, &dir.join("strict"), &[])));
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("broken.jpg") && err.contains("dataset.skip_unreadable"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    // With it: the image is skipped with a warning and training goes on; cutout (a batch
    // plugin) applies after the loader's crop and flip.
    let out = dir.join("run");
    let (code, _, err) = run(imgclf(&workspace()).args(train_args(
        &data,
        &out,
        &[
            "dataset.skip_unreadable",
            "True",
            "augmentation.use_cutout",
            "True",
            "augmentation.cutout.mask_size",
            "8",
        ],
    )));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("skipped unreadable image"), "{err}");
    let metrics = jsonl(&out.join("metrics.jsonl"));
    assert!(
        metrics.iter().any(|m| m["split"] == "val"),
        "no validation record: {metrics:?}"
    );
    // 19 training images (one skipped) in batches of 4 with drop_last: 4 steps.
    let log = std::fs::read_to_string(out.join("log.txt")).unwrap();
    assert!(
        log.contains("train: 19 images, 4 steps/epoch; val: 18 images"),
        "{log}"
    );
    let config = std::fs::read_to_string(out.join("config.yaml")).unwrap();
    for line in ["use_resize: true", "use_center_crop: true", "resize: 37"] {
        assert!(config.to_lowercase().contains(line), "{line}: {config}");
    }

    // The weights evaluate on val/ (the reference's validation transform).
    let (code, _, err) = run(imgclf(&workspace()).args([
        "evaluate",
        "--config",
        out.join("config.yaml").to_str().unwrap(),
        "test.checkpoint",
        out.join("model_final.safetensors").to_str().unwrap(),
        "test.output_dir",
        dir.join("eval").to_str().unwrap(),
    ]));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("(18 test images)"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stats_command_reports_mean_and_std_of_a_folder() {
    let dir = scratch("folder-stats");
    // Two solid images: (255, 0, 51) 4x4 and (0, 0, 51) 4x4.
    for (name, rgb) in [("a/x.png", [255u8, 0, 51]), ("b/y.png", [0, 0, 51])] {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        image::RgbImage::from_pixel(4, 4, image::Rgb(rgb))
            .save(&p)
            .unwrap();
    }
    let (code, out, err) =
        run(imgclf(&workspace()).args(["datasets", "stats", dir.to_str().unwrap(), "--json"]));
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let mean: Vec<f64> = serde_json::from_value(v["mean"].clone()).unwrap();
    let std: Vec<f64> = serde_json::from_value(v["std"].clone()).unwrap();
    assert!((mean[0] - 0.5).abs() < 1e-9 && (std[0] - 0.5).abs() < 1e-9);
    assert!((mean[2] - 0.2).abs() < 1e-9 && std[2].abs() < 1e-9);
    assert_eq!(v["images"], 2);
    let _ = std::fs::remove_dir_all(&dir);
}
