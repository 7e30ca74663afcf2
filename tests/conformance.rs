//! The conformance suite: one test per component kind that runs over *every* discovered
//! component, so a new plugin is covered without writing a test. Models are also checked
//! against the reference's parameter counts and state-dict key/shape/dtype lists.

use imgclf::registry::{Discovery, Registry};
use imgclf::setup::{setup, Purpose, Request};
use imgclf_plugin_api::{
    Batch, DataContext, Kind, NamedTensor, ParamGroup, ScheduleContext, Stage,
};
use imgclf_tests::*;
use tch::{Device, Kind as K, Tensor};

fn registry() -> Registry {
    let r = Registry::discover(&Discovery {
        cli_paths: vec![plugin_dir()],
        files: vec![],
    })
    .unwrap();
    assert!(
        r.errors.is_empty(),
        "{:?}",
        r.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>()
    );
    assert!(
        !r.plugins.is_empty(),
        "no plugins in {}",
        plugin_dir().display()
    );
    r
}

fn request(config: Option<&str>, overrides: &[&str]) -> Request {
    let mut o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    o.extend(["device".to_string(), "cpu".to_string()]);
    Request {
        plugin: None,
        config_file: config.map(|c| workspace().join(c)),
        overrides: o,
        resume_config: None,
    }
}

fn state_of(m: &imgclf_plugin_api::ffi::HostModel) -> Vec<NamedTensor> {
    m.tensors().unwrap()
}

#[test]
fn every_model_builds_trains_and_round_trips_its_state_dict() {
    let reg = registry();
    let models: Vec<(String, Vec<(String, String)>)> = reg
        .of_kind(Kind::Model)
        .map(|e| (e.info.name.clone(), e.info.small.clone()))
        .collect();
    assert!(!models.is_empty());
    for (name, small) in &models {
        // The defaults (the paper-sized network) build on CIFAR-10 ...
        let s = setup(
            &reg,
            &request(None, &["model.name", name]),
            Purpose::Evaluate,
        )
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let full = imgclf::train::build_model(&reg, &s, Device::Cpu)
            .unwrap_or_else(|e| panic!("{name} with its defaults: {e:#}"));
        assert!(!state_of(&full).is_empty(), "{name}: no tensors");
        drop(full);
        // ... and the component's small variant trains on every dataset geometry.
        let mut built = 0;
        for dataset in ["CIFAR10", "FashionMNIST", "CIFAR100"] {
            let mut overrides = vec!["model.name", name, "dataset.name", dataset];
            for (k, v) in small {
                overrides.extend([k.as_str(), v.as_str()]);
            }
            let s = setup(&reg, &request(None, &overrides), Purpose::Evaluate)
                .unwrap_or_else(|e| panic!("{name} {small:?}: {e:#}"));
            let (c, hw, k) = (
                s.config.int("dataset.n_channels"),
                s.config.int("dataset.image_size"),
                s.config.int("dataset.n_classes"),
            );
            tch::manual_seed(0);
            let mut model = match imgclf::train::build_model(&reg, &s, Device::Cpu) {
                Ok(m) => m,
                // A model may not fit a geometry (VGG's five pools need 32x32), but then it
                // must say so in terms of the config.
                Err(e) => {
                    let msg = format!("{e:#}");
                    assert!(
                        msg.contains("dataset.image_size"),
                        "{name} on {dataset}: {msg}"
                    );
                    continue;
                }
            };
            built += 1;
            let x = Tensor::randn([2, c, hw, hw], (K::Float, Device::Cpu));
            let logits = model.forward(&x, true).unwrap();
            assert_eq!(logits.size(), vec![2, k], "{name} on {dataset}");
            logits
                .cross_entropy_for_logits(&Tensor::from_slice(&[0i64, 1]))
                .backward();
            let tensors = state_of(&model);
            let mut nonzero = 0;
            for t in tensors.iter().filter(|t| t.trainable) {
                let g = t.tensor.grad();
                assert!(g.defined(), "{name}: {} has no gradient", t.name);
                assert_eq!(g.size(), t.tensor.size());
                assert!(
                    g.isfinite().all().int64_value(&[]) == 1,
                    "{name}: non-finite gradient in {}",
                    t.name
                );
                nonzero += (g.abs().sum(K::Float).double_value(&[]) > 0.0) as usize;
            }
            assert!(nonzero > 0, "{name}: all gradients are zero");
            let names: std::collections::HashSet<&str> =
                tensors.iter().map(|t| t.name.as_str()).collect();
            assert_eq!(names.len(), tensors.len(), "{name}: duplicate tensor names");

            // Eval mode is deterministic, and saving + loading the state dict into a freshly
            // initialised model reproduces its outputs exactly.
            let y1 = tch::no_grad(|| model.forward(&x, false).unwrap());
            let y2 = tch::no_grad(|| model.forward(&x, false).unwrap());
            assert!(y1.equal(&y2), "{name}: eval forward is not deterministic");
            let d = scratch(&format!("conformance-{name}-{dataset}"));
            let path = d.join("w.safetensors");
            let named: Vec<(String, Tensor)> = tensors
                .iter()
                .map(|t| (t.name.clone(), t.tensor.shallow_clone()))
                .collect();
            imgclf::io::save_safetensors(&path, &named, Default::default()).unwrap();
            tch::manual_seed(1);
            let mut fresh = imgclf::train::build_model(&reg, &s, Device::Cpu).unwrap();
            let before = tch::no_grad(|| fresh.forward(&x, false).unwrap());
            assert!(
                !before.equal(&y1),
                "{name}: a different seed should give different weights"
            );
            let loaded = imgclf::train::checkpoint::load(&path).unwrap();
            imgclf::train::checkpoint::copy_into_model(&state_of(&fresh), &loaded.model, &path)
                .unwrap();
            let after = tch::no_grad(|| fresh.forward(&x, false).unwrap());
            assert!(
                after.equal(&y1),
                "{name}: state-dict round trip changed the outputs"
            );
        }
        assert!(built >= 2, "{name}: fits fewer than two dataset geometries");
    }
}

/// `# <model>  config: <file>  overrides: <k v ...>` then `# parameters (trainable elements): N`,
/// then `name [shape] dtype` lines.
struct Case {
    name: String,
    model: String,
    config: String,
    overrides: Vec<String>,
    params: i64,
    tensors: Vec<String>,
}

fn cases() -> Vec<Case> {
    let dir = workspace().join("tests/data/reference/state_dict");
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let mut lines = text.lines();
        let head = lines
            .next()
            .unwrap()
            .trim_start_matches('#')
            .trim()
            .to_string();
        let (model, rest) = head.split_once("config:").unwrap();
        let (config, overrides) = rest.split_once("overrides:").unwrap_or((rest, ""));
        let params = lines
            .next()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        out.push(Case {
            name: f.file_stem().unwrap().to_string_lossy().to_string(),
            model: model.trim().to_string(),
            config: config.trim().to_string(),
            overrides: split_keeping_brackets(overrides),
            params,
            tensors: lines
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect(),
        });
    }
    out
}

/// Splits on whitespace outside `[...]` / `(...)`, so `k [True, False]` stays two words.
fn split_keeping_brackets(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0i32);
    for ch in s.chars() {
        match ch {
            '[' | '(' => depth += 1,
            ']' | ')' => depth -= 1,
            _ => {}
        }
        if ch.is_whitespace() && depth == 0 {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(ch);
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn dtype(k: K) -> &'static str {
    match k {
        K::Float => "float32",
        K::Int64 => "int64",
        _ => "other",
    }
}

#[test]
fn models_match_the_reference_parameter_counts_and_state_dicts() {
    let reg = registry();
    let (mut checked, mut uncovered) = (Vec::new(), Vec::new());
    for case in cases() {
        if reg.get(Kind::Model, &case.model).is_none() {
            uncovered.push(case.name);
            continue;
        }
        let overrides: Vec<&str> = case.overrides.iter().map(String::as_str).collect();
        let s = setup(
            &reg,
            &request(Some(&case.config), &overrides),
            Purpose::Evaluate,
        )
        .unwrap_or_else(|e| panic!("{}: {e:#}", case.name));
        let model = imgclf::train::build_model(&reg, &s, Device::Cpu).unwrap();
        let tensors = state_of(&model);
        assert_eq!(
            imgclf::train::parameter_count(&tensors),
            case.params,
            "{}: parameter count",
            case.name
        );
        let ours: Vec<String> = tensors
            .iter()
            .map(|t| {
                format!(
                    "{} {:?} {}",
                    t.name,
                    t.tensor.size(),
                    dtype(t.tensor.kind())
                )
            })
            .collect();
        assert_eq!(
            ours, case.tensors,
            "{}: state dict (names, shapes, dtypes, order)",
            case.name
        );
        checked.push(case.name);
    }
    eprintln!("checked against the reference: {checked:?}\nno plugin loaded for: {uncovered:?}");
    for model in reg.of_kind(Kind::Model) {
        let has_case = cases().iter().any(|c| c.model == model.info.name);
        assert!(
            has_case,
            "model `{}` has no reference case in tests/data/reference/state_dict",
            model.info.name
        );
    }
    assert!(!checked.is_empty());
}

#[test]
fn every_augmentation_keeps_shapes_targets_and_is_seeded() {
    let reg = registry();
    // Per-image stages have their own test below.
    for e in reg
        .of_kind(Kind::Augmentation)
        .filter(|e| e.info.stage != Some(Stage::Image))
    {
        let s = setup(&reg, &request(None, &[]), Purpose::Train).unwrap();
        let ctx = DataContext {
            n_channels: 3,
            image_size: 32,
            n_classes: 10,
            mean: vec![0.5; 3],
            std: vec![0.25; 3],
            device: Device::Cpu,
        };
        let mut aug = reg
            .plugin(e)
            .create_augmentation(&e.info.name, &s.config.section_json(""), &ctx)
            .unwrap();
        let images = Tensor::rand([8, 3, 32, 32], (K::Float, Device::Cpu)) * 255.0;
        let targets = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 6, 7])
            .one_hot(10)
            .to_kind(K::Float);
        let run = |aug: &mut imgclf_plugin_api::ffi::HostAugmentation, seed| {
            aug.apply(
                Batch {
                    images: images.copy(),
                    targets: targets.copy(),
                    views: 1,
                },
                seed,
            )
            .unwrap()
        };
        let a = run(&mut aug, 3);
        let b = run(&mut aug, 3);
        let name = &e.info.name;
        assert_eq!(
            a.images.size(),
            vec![8 * a.views as i64, 3, 32, 32],
            "{name}"
        );
        assert_eq!(a.targets.size(), vec![8, 10], "{name}");
        let sums = a.targets.sum_dim_intlist(1, false, K::Float);
        assert!(
            sums.allclose(
                &Tensor::ones([8], (K::Float, Device::Cpu)),
                1e-5,
                1e-6,
                false
            ),
            "{name}: targets sum to 1"
        );
        assert!(
            a.images.equal(&b.images) && a.targets.equal(&b.targets),
            "{name}: same seed, same result"
        );
        // Target transforms (label smoothing) are deterministic functions of the targets.
        if e.info.stage != Some(Stage::Target) {
            let c = run(&mut aug, 4);
            assert!(
                !c.images.equal(&a.images) || !c.targets.equal(&a.targets),
                "{name}: another seed changes something"
            );
        }
    }
}

/// Per-image stages (ABI 0.1.2): on uint8 images of 1 and 3 channels, the same seed gives the
/// same image, some seed changes it, and the image keeps its size (it is transformed in place).
#[test]
fn every_image_stage_is_seeded_and_changes_images() {
    let reg = registry();
    let mut seen = 0;
    for e in reg
        .of_kind(Kind::Augmentation)
        .filter(|e| e.info.stage == Some(Stage::Image))
    {
        seen += 1;
        let s = setup(&reg, &request(None, &[]), Purpose::Train).unwrap();
        let name = &e.info.name;
        for (c, h, w) in [(3usize, 32usize, 32usize), (1, 28, 28)] {
            let ctx = DataContext {
                n_channels: c as i64,
                image_size: h as i64,
                n_classes: 10,
                mean: vec![0.5; c],
                std: vec![0.25; c],
                device: Device::Cpu,
            };
            let stage = reg
                .plugin(e)
                .create_image_stage(name, &s.config.section_json(""), &ctx)
                .unwrap();
            let pixels: Vec<u8> = (0..c * h * w).map(|i| (i * 7919 % 251) as u8).collect();
            let run = |seed: u64| {
                let mut d = pixels.clone();
                stage
                    .apply(
                        imgclf_plugin_api::ImageMut {
                            data: &mut d,
                            channels: c,
                            height: h,
                            width: w,
                        },
                        seed,
                    )
                    .unwrap();
                d
            };
            let a = run(3);
            assert_eq!(a, run(3), "{name}: same seed, same image");
            assert!(
                (4..24).any(|seed| run(seed) != a),
                "{name}: another seed changes something"
            );
        }
    }
    assert!(seen > 0, "no per-image stage loaded");
}

#[test]
fn every_optimizer_descends_and_round_trips_its_state() {
    let reg = registry();
    for e in reg.of_kind(Kind::Optimizer) {
        let s = setup(
            &reg,
            &request(None, &["train.optimizer", &e.info.name]),
            Purpose::Train,
        )
        .unwrap();
        let make = || {
            let w = Tensor::from_slice(&[1.0f32, -2.0, 3.0]).set_requires_grad(true);
            let group = ParamGroup {
                weight_decay: 1e-4,
                params: vec![NamedTensor {
                    name: "w".into(),
                    tensor: w.shallow_clone(),
                    trainable: true,
                }],
            };
            (
                w,
                reg.plugin(e)
                    .create_optimizer(&e.info.name, &s.config.section_json(""), vec![group])
                    .unwrap(),
            )
        };
        let (mut w, mut opt) = make();
        let loss = |w: &Tensor| (w * w).sum(K::Float);
        let initial = loss(&w).double_value(&[]);
        for _ in 0..5 {
            w.zero_grad();
            loss(&w).backward();
            opt.step(0.01).unwrap();
        }
        assert!(
            loss(&w).double_value(&[]) < initial,
            "{}: loss did not decrease",
            e.info.name
        );
        let state = opt.state().unwrap();
        let (_, mut fresh) = make();
        fresh
            .load_state(state)
            .unwrap_or_else(|err| panic!("{}: {err}", e.info.name));
    }
}

#[test]
fn every_scheduler_gives_finite_factors_starting_at_one() {
    let reg = registry();
    for e in reg.of_kind(Kind::Scheduler) {
        let s = setup(
            &reg,
            &request(None, &["scheduler.type", &e.info.name]),
            Purpose::Train,
        )
        .unwrap();
        let sched = reg
            .plugin(e)
            .create_scheduler(
                &e.info.name,
                &s.config.section_json(""),
                &ScheduleContext {
                    steps_per_epoch: 10,
                    epochs: 160,
                },
            )
            .unwrap();
        assert_eq!(sched.factor(0).unwrap(), 1.0, "{}", e.info.name);
        for step in (0..1600).step_by(7) {
            let f = sched.factor(step).unwrap();
            assert!(
                f.is_finite() && (0.0..=1.0).contains(&f),
                "{}: factor({step}) = {f}",
                e.info.name
            );
        }
    }
}

/// Every integer key of every component declares its range (checked by the host before any
/// work, shown by `plugins inspect`), and its default lies in it.
#[test]
fn every_integer_key_of_every_component_declares_a_range() {
    use imgclf_plugin_api::KeyType;
    let reg = registry();
    let mut missing = Vec::new();
    let mut checked = 0;
    for kind in Kind::ALL {
        for e in reg.of_kind(kind) {
            for k in &e.info.keys {
                let int = match &k.ty {
                    KeyType::Int => true,
                    KeyType::List(inner) => **inner == KeyType::Int,
                    _ => false,
                };
                if !int {
                    continue;
                }
                checked += 1;
                match k.range {
                    None => missing.push(format!("{} ({})", k.key, e.info.name)),
                    Some(r) => {
                        let defaults: Vec<i64> = match &k.default {
                            serde_json::Value::Array(a) => {
                                a.iter().filter_map(|v| v.as_i64()).collect()
                            }
                            v => v.as_i64().into_iter().collect(),
                        };
                        assert!(
                            defaults.iter().all(|d| r.contains(*d)),
                            "{}: default {} outside its range {r}",
                            k.key,
                            k.default
                        );
                    }
                }
            }
        }
    }
    assert!(checked >= 20, "only {checked} integer keys found");
    assert!(
        missing.is_empty(),
        "integer keys without a range: {missing:?}"
    );
}
