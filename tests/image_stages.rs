//! The per-image stage (ABI 0.1.2) in real training runs on real Fashion-MNIST: RandAugment
//! and TrivialAugment train a few steps, change what the model sees, give the same weights for
//! any `train.dataloader.num_workers`, and refuse a device-resident training set.

use imgclf_tests::*;
use std::path::Path;

fn train(data: &Path, out: &Path, extra: &[&str]) -> (i32, String) {
    let mut args = vec![
        "train",
        "--config",
        "configs/fashion_mnist/resnet_preact.yaml",
        "dataset.dataset_dir",
        data.to_str().unwrap(),
        "train.output_dir",
        out.to_str().unwrap(),
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
    let (code, _, err) = run(imgclf(&workspace()).args(&args));
    (code, err)
}

fn weights(out: &Path) -> Vec<(String, tch::Tensor)> {
    imgclf::io::load_safetensors(&out.join("model_final.safetensors"))
        .unwrap()
        .0
}

fn same(a: &Path, b: &Path) -> bool {
    let (wa, wb) = (weights(a), weights(b));
    wa.len() == wb.len()
        && wa
            .iter()
            .zip(&wb)
            .all(|(x, y)| x.0 == y.0 && x.1.equal(&y.1))
}

#[test]
fn randaugment_and_trivialaugment_train_reproducibly_for_any_worker_count() {
    let d = scratch("image-stages");
    let data = d.join("data");
    fashion_mnist_subset(&data, 128, 32);
    let plain = d.join("plain");
    let (code, err) = train(&data, &plain, &["train.dataloader.num_workers", "2"]);
    assert_eq!(code, 0, "{err}");
    for (name, keys) in [
        (
            "randaugment",
            vec![
                "augmentation.use_randaugment",
                "True",
                "augmentation.randaugment.num_ops",
                "3",
                "augmentation.randaugment.magnitude",
                "12",
            ],
        ),
        (
            "trivialaugment",
            vec![
                "augmentation.use_trivialaugment",
                "True",
                "augmentation.trivialaugment.fill",
                "[128.0]",
            ],
        ),
    ] {
        let mut outs = Vec::new();
        for workers in ["0", "2"] {
            let out = d.join(format!("{name}-{workers}"));
            let mut args = keys.clone();
            args.extend(["train.dataloader.num_workers", workers]);
            let (code, err) = train(&data, &out, &args);
            assert_eq!(code, 0, "{name}, {workers} workers: {err}");
            let rows = jsonl(&out.join("metrics.jsonl"));
            let steps = rows.iter().filter(|r| r["split"] == "train").count();
            assert_eq!(steps, 4, "{name}: 128 images / 32 = 4 steps: {rows:?}");
            assert!(
                rows.iter()
                    .all(|r| r["loss"].as_f64().is_some_and(|l| l.is_finite() && l > 0.0)),
                "{name}: {rows:?}"
            );
            let log = std::fs::read_to_string(out.join("log.txt")).unwrap();
            assert!(
                log.contains(&format!("per-image stage {name} in {workers} data-loading")),
                "{name}: {log}"
            );
            outs.push(out);
        }
        assert!(
            same(&outs[0], &outs[1]),
            "{name}: 0 and 2 workers must train the same weights"
        );
        assert!(
            !same(&outs[0], &plain),
            "{name}: the stage must change what the model sees"
        );
    }
    // A device-resident set would bypass the loader, and so the stage.
    let (code, err) = train(
        &data,
        &d.join("resident"),
        &[
            "augmentation.use_randaugment",
            "True",
            "train.dataloader.on_device",
            "on",
        ],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("per-image stage randaugment") && err.contains("on_device auto or off"),
        "{err}"
    );
    // A magnitude outside the bins is a config error naming both keys.
    let (code, err) = train(
        &data,
        &d.join("bad"),
        &[
            "augmentation.use_randaugment",
            "True",
            "augmentation.randaugment.magnitude",
            "31",
        ],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("augmentation.randaugment.magnitude is 31")
            && err.contains("augmentation.randaugment.num_magnitude_bins"),
        "{err}"
    );
}
