//! The training step's device options on the CPU (the only device CI has): the device-resident
//! dataset (`train.dataloader.on_device on`) trains exactly as the host loader does, and a
//! channels_last run (`train.channels_last on`) resumes bit-exactly.

use imgclf_tests::*;
use std::path::Path;

fn train(data: &Path, out: &Path, extra: &[&str]) {
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
        "model.resnet_preact.initial_channels",
        "4",
        "train.batch_size",
        "32",
        "train.val_period",
        "0",
        "train.use_tensorboard",
        "False",
        "scheduler.epochs",
        "2",
        "train.checkpoint_period",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let (code, _, err) = run(imgclf(&workspace()).args(&args));
    assert_eq!(code, 0, "{err}");
}

fn weights(out: &Path) -> Vec<(String, tch::Tensor)> {
    let mut t = imgclf::io::load_safetensors(&out.join("model_final.safetensors"))
        .unwrap()
        .0;
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

#[test]
fn device_resident_data_trains_like_the_loader_and_channels_last_resumes_exactly() {
    let d = scratch("device-step");
    let data = d.join("data");
    fashion_mnist_subset(&data, 320, 32);
    let host = d.join("host");
    train(
        &data,
        &host,
        &[
            "train.dataloader.on_device",
            "off",
            "train.channels_last",
            "off",
        ],
    );
    let resident = d.join("resident");
    train(
        &data,
        &resident,
        &[
            "train.dataloader.on_device",
            "on",
            "train.channels_last",
            "off",
        ],
    );
    let nhwc = d.join("nhwc");
    train(
        &data,
        &nhwc,
        &[
            "train.dataloader.on_device",
            "on",
            "train.channels_last",
            "on",
        ],
    );
    let (a, b) = (weights(&host), weights(&resident));
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(
            ta.equal(tb),
            "{na}: the resident batches differ from the loader's"
        );
    }
    // Not asserted here: channels_last against NCHW after 20 steps at lr 0.1 differed by more
    // than 1e-4 (bn.bias); whether that is summation order amplified over the steps or a
    // difference in the step needs a well-conditioned one-step comparison first.
    // Resume from epoch 1 with channels_last and the resident set: bit-identical end.
    let cut = d.join("nhwc-cut");
    std::fs::create_dir_all(&cut).unwrap();
    for e in std::fs::read_dir(&nhwc).unwrap() {
        let p = e.unwrap().path();
        let f = p.file_name().unwrap().to_str().unwrap().to_string();
        if p.is_file() && f != "checkpoint_00002.safetensors" && f != "model_final.safetensors" {
            std::fs::copy(&p, cut.join(&f)).unwrap();
        }
    }
    let (code, _, err) =
        run(imgclf(&workspace()).args(["train", "--resume", cut.to_str().unwrap()]));
    assert_eq!(code, 0, "{err}");
    for ((n, x), (_, y)) in weights(&nhwc).iter().zip(weights(&cut)) {
        assert!(x.equal(&y), "{n} differs after resume");
    }
}
