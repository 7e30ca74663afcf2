//! The plugin kit for outside authors: `imgclf env` (threads, what to build against), runs that
//! remember their plugins (env.yaml, resume without --plugin-path, precise errors), `imgclf
//! plugins check` and `imgclf new-plugin`. (Building the template crate out of tree is
//! `cargo xtask template-check`, run by CI.)

use imgclf_tests::*;
use serde_json::Value;
use std::path::Path;

#[test]
fn env_reports_threads_from_omp_num_threads_and_what_to_build_plugins_against() {
    let (code, out, err) = run(imgclf(&workspace())
        .env("OMP_NUM_THREADS", "1")
        .args(["env", "--json"]));
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["torch_threads"], 1, "{out}");
    assert_eq!(v["torch_threads_from"], "OMP_NUM_THREADS");
    let b = &v["plugin_build"];
    let libtorch = Path::new(b["LIBTORCH"].as_str().expect("LIBTORCH"));
    assert!(libtorch.join("lib").is_dir(), "{b}");
    assert!(
        libtorch.join("include/torch").is_dir() || libtorch.join("include").is_dir(),
        "{b}"
    );
    assert_eq!(b["abi_version"], imgclf_plugin_api::ABI_VERSION);
    assert_eq!(b["tch"], "=0.24.0");
    assert!(b["plugin_api"]
        .as_str()
        .is_some_and(|p| Path::new(p).join("Cargo.toml").is_file()));
    assert!(v["plugin_search_path"].is_array());
    // The text form ends with the commands to build a plugin.
    let (code, out, err) = run(imgclf(&workspace())
        .env_remove("OMP_NUM_THREADS")
        .arg("env"));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("export LIBTORCH=") && out.contains("new-plugin"),
        "{out}"
    );
    assert!(
        out.contains("torch_threads_from: libtorch default"),
        "{out}"
    );
}

fn train_args(data: &Path, out: &Path) -> Vec<String> {
    [
        "train",
        "--config",
        "configs/fashion_mnist/resnet_preact.yaml",
        "model.name",
        "previous_abi_linear",
        "dataset.dataset_dir",
        data.to_str().unwrap(),
        "train.output_dir",
        out.to_str().unwrap(),
        "scheduler.epochs",
        "2",
        "train.batch_size",
        "32",
        "validation.batch_size",
        "64",
        "train.val_first",
        "False",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Cuts the finished run back to its first epoch, so that `--resume` has work to do.
fn cut_to_first_epoch(out: &Path) {
    for f in ["checkpoint_00002.safetensors", "model_final.safetensors"] {
        let _ = std::fs::remove_file(out.join(f));
    }
}

#[test]
fn a_run_remembers_its_out_of_tree_plugin_and_resume_finds_it_or_names_it() {
    let d = scratch("remembers");
    let data = d.join("data");
    fashion_mnist_subset(&data, 64, 16);
    // An out-of-tree plugin: a file in a folder of its own, not beside the binary.
    let plugins = d.join("my-plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let so = "libimgclf_fixture_previous_abi.so";
    std::fs::copy(fixture_dir("previous_abi").join(so), plugins.join(so)).unwrap();
    let file = plugins.join(so).canonicalize().unwrap();
    let out = d.join("out");
    // OMP_NUM_THREADS 2, but the key wins.
    let (code, _, err) = run(imgclf(&workspace())
        .env("OMP_NUM_THREADS", "2")
        .arg("--plugin-path")
        .arg(&plugins)
        .args(train_args(&data, &out))
        .args(["train.num_threads", "1"]));
    assert_eq!(code, 0, "{err}");
    let env = std::fs::read_to_string(out.join("env.yaml")).unwrap();
    assert!(env.contains("torch_threads: 1\n"), "{env}");
    assert!(
        env.contains("torch_threads_from: train.num_threads"),
        "{env}"
    );
    assert!(env.contains("name: previous_abi\n"), "{env}");
    assert!(env.contains(&format!("file: {}", file.display())), "{env}");
    assert!(env.contains("abi_version: 0.1.0"), "{env}");
    let sha = imgclf::provenance::sha256_file(&file).unwrap();
    assert!(env.contains(&format!("sha256: {sha}")), "{env}");
    assert!(env.contains("- model previous_abi_linear"), "{env}");

    // Resume without --plugin-path: the recorded file is found again.
    cut_to_first_epoch(&out);
    let resume = |extra: &[&str]| {
        run(imgclf(&workspace())
            .arg("train")
            .arg("--resume")
            .arg(&out)
            .args(extra))
    };
    let (code, _, err) = resume(&[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.join("model_final.safetensors").exists());

    // The file is gone: the error names the plugin, the file and the fix, not a config key.
    cut_to_first_epoch(&out);
    std::fs::remove_file(&file).unwrap();
    let (code, _, err) = resume(&[]);
    assert_ne!(code, 0);
    assert!(err.contains("plugin `previous_abi`"), "{err}");
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(
        err.contains("does not exist any more") && err.contains("--plugin-path"),
        "{err}"
    );
    assert!(
        !err.contains("did you mean") && !err.contains("unknown config key"),
        "{err}"
    );

    // Another build of it (other bytes, still a valid library): refused, then accepted on
    // request and recorded.
    let mut bytes = std::fs::read(fixture_dir("previous_abi").join(so)).unwrap();
    bytes.extend_from_slice(b"another build");
    std::fs::write(&file, &bytes).unwrap();
    let (code, _, err) = resume(&[]);
    assert_ne!(code, 0);
    assert!(
        err.contains("plugin `previous_abi` changed") && err.contains("--allow-plugin-changes"),
        "{err}"
    );
    let (code, _, err) = resume(&["--allow-plugin-changes"]);
    assert_eq!(code, 0, "{err}");
    let env = std::fs::read_to_string(out.join("env.yaml")).unwrap();
    let new_sha = imgclf::provenance::sha256_file(&file).unwrap();
    assert!(env.contains(&format!("sha256: {new_sha}")), "{env}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn plugins_check_passes_good_plugins_and_fails_a_broken_one_per_check() {
    // A model (the previous ABI's linear classifier), and the baseline plugin's optimizer,
    // schedules and augmentations.
    let (code, out, err) = run(imgclf(&workspace())
        .args(["plugins", "check"])
        .arg(fixture_dir("previous_abi")));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("PASS  model previous_abi_linear"), "{out}");
    assert!(out.contains("state-dict round trip"), "{out}");
    let (code, out, err) = run(imgclf(&workspace())
        .args(["plugins", "check"])
        .arg(plugin_dir().join("libimgclf_plugin_baseline.so")));
    assert_eq!(code, 0, "{out}{err}");
    for line in [
        "PASS  optimizer sgd",
        "PASS  scheduler cosine",
        "1 step(s) per epoch",
        "PASS  augmentation random_crop",
        " 0 failed",
    ] {
        assert!(out.contains(line), "{line}: {out}");
    }
    // A plugin that panics: each failing check is reported, and the exit code says so.
    let (code, out, _) = run(imgclf(&workspace())
        .args(["plugins", "check", "--json"])
        .arg(fixture_dir("panicking")));
    assert_eq!(code, 1, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["passed"], false);
    let failed: Vec<&Value> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["passed"] == false)
        .collect();
    assert!(
        failed
            .iter()
            .any(|c| c["component"] == "model panics_on_build"
                && c["error"]
                    .as_str()
                    .unwrap()
                    .contains("deliberate panic while building")),
        "{out}"
    );
    assert!(
        failed
            .iter()
            .any(|c| c["component"] == "model panics_in_forward"),
        "{out}"
    );
    // Not a plugin at all.
    let d = scratch("check-empty");
    let (code, _, err) = run(imgclf(&workspace()).args(["plugins", "check"]).arg(&d));
    assert_ne!(code, 0);
    assert!(err.contains("no plugin file"), "{err}");
}

#[test]
fn new_plugin_writes_a_crate_with_the_hosts_pins() {
    let d = scratch("new-plugin");
    let dir = d.join("one_cycle");
    let (code, out, err) = run(imgclf(&workspace()).args([
        "new-plugin",
        "one_cycle",
        "--kind",
        "scheduler",
        "--dir",
        dir.to_str().unwrap(),
    ]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("plugins check"), "{out}");
    let toml = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    assert!(
        toml.contains("name = \"imgclf-plugin-one_cycle\""),
        "{toml}"
    );
    assert!(toml.contains("tch = \"=0.24.0\""), "{toml}");
    assert!(
        toml.contains("crate-type = [\"cdylib\", \"rlib\"]"),
        "{toml}"
    );
    let api = workspace().join("plugin-api").canonicalize().unwrap();
    assert!(
        toml.contains(&format!("path = \"{}\"", api.display())),
        "{toml}"
    );
    let lib = std::fs::read_to_string(dir.join("src/lib.rs")).unwrap();
    assert!(lib.contains("impl Scheduler for OneCycle"), "{lib}");
    let ffi = std::fs::read_to_string(dir.join("src/ffi.rs")).unwrap();
    assert!(ffi.contains("export_plugin!") && ffi.contains("name: \"one_cycle\""));
    assert_eq!(
        std::fs::read(dir.join("Cargo.lock")).unwrap(),
        std::fs::read(workspace().join("Cargo.lock")).unwrap()
    );
    // Not over an existing crate, and only valid names.
    let (code, _, err) = run(imgclf(&workspace()).args([
        "new-plugin",
        "one_cycle",
        "--kind",
        "model",
        "--dir",
        dir.to_str().unwrap(),
    ]));
    assert!(code != 0 && err.contains("not empty"), "{err}");
    let (code, _, err) =
        run(imgclf(&workspace()).args(["new-plugin", "One-Cycle", "--kind", "model"]));
    assert!(code != 0 && err.contains("lowercase"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}
