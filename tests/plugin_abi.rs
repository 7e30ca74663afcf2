//! The plugin ABI's promises: plugins built against the previous ABI load, versions are
//! compared by the ABI's own version (not imgclf's), the libtorch a plugin was built against is
//! compared with the one loaded at run time, unknown augmentation stages are refused at load,
//! and every optimizer keeps the parameter contract documented on `Optimizer`.

use imgclf::registry::{Discovery, Registry};
use imgclf::setup::{setup, Purpose, Request};
use imgclf_plugin_api::ffi::{abi_compatible, runtime_libtorch_version};
use imgclf_plugin_api::{Kind, NamedTensor, ParamGroup};
use imgclf_tests::*;
use serde_json::Value;
use tch::{Kind as K, Tensor};

fn list_json(extra: &[&str]) -> Value {
    let (code, out, err) = run(imgclf(&workspace())
        .args(extra)
        .args(["plugins", "list", "--json"]));
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn a_plugin_built_against_the_previous_abi_loads_and_its_model_builds() {
    let dir = fixture_dir("previous_abi");
    let v = list_json(&["--plugin-path", dir.to_str().unwrap()]);
    assert_eq!(v["errors"], serde_json::json!([]), "{v}");
    let p = v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "previous_abi")
        .unwrap_or_else(|| panic!("previous_abi not loaded: {v}"));
    assert_eq!(p["api_version"], "0.1.0");
    assert_ne!(
        imgclf_plugin_api::ABI_VERSION,
        "0.1.0",
        "the ABI has grown since"
    );
    // Its components work through the current host: the model is built and counted.
    let (code, out, err) = run(imgclf(&workspace()).args([
        "--plugin-path",
        dir.to_str().unwrap(),
        "train",
        "--config",
        "configs/fashion_mnist/resnet_preact.yaml",
        "model.name",
        "previous_abi_linear",
        "--dry-run",
    ]));
    assert_eq!(code, 0, "{err}");
    // 10 x 28*28 weights and 10 biases.
    assert!(out.contains("parameters: 7850"), "{out}");
}

/// The 0.1.0 fixture trains with the current host: the plain step, and SAM (a 0.1.2 step
/// hook from another plugin) driving the old plugin's model through the host's passes.
#[test]
fn a_plugin_built_against_the_previous_abi_trains_with_and_without_a_step_hook() {
    let dir = fixture_dir("previous_abi");
    let d = scratch("previous-abi-train");
    let data = d.join("data");
    fashion_mnist_subset(&data, 64, 16);
    let mut finals = Vec::new();
    for step in ["plain", "sam"] {
        let out = d.join(step);
        let (code, _, err) = run(imgclf(&workspace()).args([
            "--plugin-path",
            dir.to_str().unwrap(),
            "train",
            "--config",
            "configs/fashion_mnist/resnet_preact.yaml",
            "model.name",
            "previous_abi_linear",
            "dataset.dataset_dir",
            data.to_str().unwrap(),
            "train.output_dir",
            out.to_str().unwrap(),
            "train.batch_size",
            "32",
            "scheduler.epochs",
            "1",
            "train.val_first",
            "False",
            "train.use_test_as_val",
            "True",
            "device",
            "cpu",
            "train.step",
            step,
            "train.ema.enabled",
            "True",
        ]));
        assert_eq!(code, 0, "{step}: {err}");
        let last = jsonl(&out.join("metrics.jsonl"))
            .into_iter()
            .rfind(|r| r["split"] == "train")
            .unwrap_or_else(|| panic!("{step}: no training record"));
        assert_eq!(last["step"], 2, "{step}: 64 images in batches of 32");
        let w = imgclf::io::load_safetensors(&out.join("model_final_raw.safetensors"))
            .unwrap()
            .0;
        let fc = w.into_iter().find(|(n, _)| n == "fc.weight").unwrap().1;
        assert!(fc.isfinite().all().int64_value(&[]) == 1, "{step}");
        finals.push(fc);
    }
    assert!(
        !finals[0].equal(&finals[1]),
        "SAM trained as the plain step"
    );
    // The old plugin provides no step components; asking it for one names its ABI.
    let reg = Registry::discover(&Discovery {
        cli_paths: vec![dir.clone()],
        files: vec![],
    })
    .unwrap();
    let old = reg.plugin_by_name("previous_abi").unwrap();
    let e = old
        .create_step(
            "sam",
            &serde_json::json!({}),
            &imgclf_plugin_api::StepBuildContext {
                device: tch::Device::Cpu,
            },
        )
        .err()
        .unwrap()
        .0;
    assert!(
        e.contains("previous_abi")
            && e.contains("plugin ABI 0.1.0")
            && e.contains("no training-step hooks"),
        "{e}"
    );
}

#[test]
fn abi_versions_follow_their_own_semver_not_imgclfs() {
    for (host, plugin, ok) in [
        ("0.1.1", "0.1.0", true),
        ("0.1.2", "0.1.0", true),
        ("0.1.2", "0.1.1", true),
        ("0.1.1", "0.1.2", true),
        ("0.1.0", "0.1.1", true),
        ("0.1.1", "0.1.1", true),
        ("0.2.0", "0.1.1", false),
        ("0.1.1", "0.2.0", false),
        ("1.3.0", "1.0.2", true),
        ("1.0.0", "2.0.0", false),
        ("0.1.1", "0.1", false),
        ("0.1.1", "abc", false),
    ] {
        assert_eq!(abi_compatible(host, plugin), ok, "{host} vs {plugin}");
    }
    // The ABI version is plugin-api's own version, not the workspace's (a 0.2 imgclf release
    // must not lock out 0.1 plugins when the ABI did not change).
    let manifest = std::fs::read_to_string(workspace().join("plugin-api/Cargo.toml")).unwrap();
    assert!(!manifest.contains("version.workspace"), "{manifest}");
    assert!(
        manifest.contains(&format!("version = \"{}\"", imgclf_plugin_api::ABI_VERSION)),
        "{manifest}"
    );
    let changelog = std::fs::read_to_string(workspace().join("plugin-api/CHANGELOG.md")).unwrap();
    assert!(
        changelog.contains(&format!("## {}", imgclf_plugin_api::ABI_VERSION)),
        "plugin-api/CHANGELOG.md has no section for ABI {}",
        imgclf_plugin_api::ABI_VERSION
    );
}

#[test]
fn the_libtorch_loaded_at_run_time_is_asked_and_matches_the_build() {
    let rt = runtime_libtorch_version().unwrap();
    assert_eq!(rt.version, imgclf_plugin_api::LIBTORCH_VERSION);
    let path = rt.path.expect("the loader names the library");
    assert!(
        path.to_string_lossy().contains("libtorch_cpu"),
        "{}",
        path.display()
    );
    // The build-time version came from the headers of the libtorch the build used.
    let header = std::fs::read_to_string(imgclf_plugin_api::LIBTORCH_ORIGIN).unwrap();
    let minor = imgclf_plugin_api::LIBTORCH_VERSION
        .split('.')
        .nth(1)
        .unwrap();
    assert!(header.contains(&format!("TORCH_VERSION_MINOR {minor}")));
}

#[test]
fn a_plugin_built_against_another_libtorch_is_refused_naming_both_versions() {
    let dir = fixture_dir("version_mismatch");
    let v = list_json(&["--plugin-path", dir.to_str().unwrap()]);
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{v}");
    let msg = errors[0]["message"].as_str().unwrap();
    let loaded = runtime_libtorch_version().unwrap().version;
    assert!(
        msg.contains("built against libtorch 2.10.0")
            && msg.contains(&format!("loaded at run time is {loaded}"))
            && msg.contains("libtorch_cpu"),
        "{msg}"
    );
}

#[test]
fn an_augmentation_in_an_unknown_stage_is_refused_at_load_naming_the_plugin() {
    let dir = fixture_dir("unknown_stage");
    let v = list_json(&["--plugin-path", dir.to_str().unwrap()]);
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{v}");
    let msg = errors[0]["message"].as_str().unwrap();
    assert!(
        msg.contains("plugin `unknown_stage`")
            && msg.contains("future_aug")
            && msg.contains("stage 9"),
        "{msg}"
    );
    assert!(v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["name"] != "unknown_stage"));
}

/// The parameter contract on `imgclf_plugin_api::Optimizer`, for every optimizer: a model's
/// parameter objects and the views it derives after the optimizer is built follow every step;
/// `build` keeps values exactly; steps never move storage; and a view kept from before `build`
/// goes stale exactly when `build` re-homed the parameter.
#[test]
fn every_optimizer_keeps_the_parameter_contract() {
    let reg = Registry::discover(&Discovery {
        cli_paths: vec![plugin_dir()],
        files: vec![],
    })
    .unwrap();
    let optimizers: Vec<_> = reg.of_kind(Kind::Optimizer).collect();
    assert!(optimizers.iter().any(|e| e.info.name == "sgd"));
    for e in optimizers {
        let name = &e.info.name;
        let s = setup(
            &reg,
            &Request {
                plugin: None,
                config_file: None,
                overrides: ["train.optimizer", name.as_str(), "device", "cpu"]
                    .map(String::from)
                    .to_vec(),
                resume_config: None,
            },
            Purpose::Train,
        )
        .unwrap();
        let initial = [0.5f32, -1.0, 1.5, 2.0, -0.25, 0.75];
        let mut w = Tensor::from_slice(&initial)
            .view([2, 3])
            .set_requires_grad(true);
        let mut b = Tensor::from_slice(&[0.1f32, -0.2]).set_requires_grad(true);
        // A model that (wrongly) keeps a view made before the optimizer exists.
        let before = w.detach().view([-1]);
        let ptr_before = w.data_ptr();
        let group = ParamGroup {
            weight_decay: 1e-4,
            params: vec![
                NamedTensor {
                    name: "w".into(),
                    tensor: w.shallow_clone(),
                    trainable: true,
                },
                NamedTensor {
                    name: "b".into(),
                    tensor: b.shallow_clone(),
                    trainable: true,
                },
            ],
        };
        let mut opt = reg
            .plugin(e)
            .create_optimizer(name, &s.config.section_json(""), vec![group])
            .unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!(
            Vec::<f32>::try_from(w.detach().view([-1])).unwrap(),
            initial,
            "{name}: building the optimizer changed a parameter's values"
        );
        let rehomed = w.data_ptr() != ptr_before;
        // A model that follows the contract: a view made after the optimizer is built.
        let after = w.detach().view([-1]);
        let ptr_built = w.data_ptr();
        let x = Tensor::from_slice(&[1.0f32, 2.0, -1.0]);
        for _ in 0..3 {
            w.zero_grad();
            b.zero_grad();
            let y = w.matmul(&x) + &b;
            (&y * &y).sum(K::Float).backward();
            opt.step(0.05).unwrap_or_else(|err| panic!("{name}: {err}"));
        }
        let now = Vec::<f32>::try_from(w.detach().view([-1])).unwrap();
        assert_ne!(now, initial, "{name}: the model's parameter did not train");
        assert_eq!(
            w.data_ptr(),
            ptr_built,
            "{name}: a step moved the parameter's storage (only build may)"
        );
        assert_eq!(
            Vec::<f32>::try_from(&after).unwrap(),
            now,
            "{name}: a view made after build did not follow the steps"
        );
        let stale = Vec::<f32>::try_from(&before).unwrap() == initial;
        assert_eq!(
            stale,
            rehomed,
            "{name}: a view made before build is {} although build {} the parameter",
            if stale { "stale" } else { "live" },
            if rehomed { "re-homed" } else { "kept" }
        );
    }
}
