//! The conformance suite, as library code: `imgclf plugins check PATH` runs it on any plugin
//! file or folder, and `tests/conformance.rs` runs the same checks on every in-tree plugin.
//!
//! Each component is checked with its defaults and its small variant
//! ([`imgclf_plugin_api::ComponentInfo::small`]) against the written contracts
//! (docs/plugin-guide.md, "Contracts"):
//! - models: the defaults build; the small variant, on every dataset geometry it fits, gives
//!   logits of the right shape, finite gradients (not all zero) for every trainable tensor,
//!   unique tensor names, a deterministic eval forward, and the same outputs after a state-dict
//!   round trip through a safetensors file into a model built with another seed; a geometry it
//!   does not fit must be refused with an error naming `dataset.image_size`;
//! - augmentations: shapes kept (`views * N` images), soft targets summing to one, the same
//!   seed giving the same batch and (except target transforms) another seed another batch;
//! - optimizers: the parameter contract (values kept by `build`, storage kept by steps), the
//!   loss of a small problem decreasing, and an exact resume: state saved after some steps and
//!   loaded into a fresh optimizer gives bit-identical further steps;
//! - schedulers: the schedule contract: built for any `steps_per_epoch >= 1`, every factor
//!   finite and `>= 0` (for every step of the schedule, 0 to `steps_per_epoch * epochs`), and a pure
//!   function of the step (two builds agree bit for bit). A factor of 1 at step 0 is *not*
//!   required (a one-cycle schedule starts low).
//!
//! Reference cases (parameter counts and state-dict names, [`reference`]) are an optional input.

pub mod reference;

use crate::config::{Config, ConfigBuilder};
use crate::registry::{Entry, Registry};
use crate::setup::full_schema;
use imgclf_plugin_api::{
    Batch, DataContext, Kind, ModelContext, NamedTensor, ParamGroup, ScheduleContext, Stage,
};
use tch::{Device, Kind as K, Tensor};

/// The outcome of one check of one component.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// `model resnet`.
    pub component: String,
    /// What was checked, e.g. `small variant on FashionMNIST: forward, backward, ...`.
    pub check: String,
    /// `Err` says what failed.
    pub result: Result<(), String>,
}

/// Every outcome, in the order the checks ran.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub outcomes: Vec<Outcome>,
}

impl Report {
    pub fn add(&mut self, component: &str, check: impl Into<String>, result: Result<(), String>) {
        self.outcomes.push(Outcome {
            component: component.to_string(),
            check: check.into(),
            result,
        });
    }

    pub fn failures(&self) -> Vec<&Outcome> {
        self.outcomes.iter().filter(|o| o.result.is_err()).collect()
    }

    pub fn passed(&self) -> bool {
        self.failures().is_empty()
    }

    /// One `PASS`/`FAIL` line per check, then a summary line.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for o in &self.outcomes {
            match &o.result {
                Ok(()) => out += &format!("PASS  {:<28} {}\n", o.component, o.check),
                Err(e) => {
                    out += &format!(
                        "FAIL  {:<28} {}\n      {}\n",
                        o.component,
                        o.check,
                        e.replace('\n', "\n      ")
                    )
                }
            }
        }
        let failed = self.failures().len();
        out += &format!(
            "{} checks: {} passed, {failed} failed\n",
            self.outcomes.len(),
            self.outcomes.len() - failed
        );
        out
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "passed": self.passed(),
            "checks": self.outcomes.iter().map(|o| serde_json::json!({
                "component": o.component, "check": o.check, "passed": o.result.is_ok(),
                "error": o.result.as_ref().err(),
            })).collect::<Vec<_>>(),
        })
    }
}

type R = Result<(), String>;

fn err(e: impl std::fmt::Display) -> String {
    format!("{e:#}")
}

/// The frozen config for `overrides` (`KEY VALUE` pairs), on the CPU: defaults of every loaded
/// component, then the overrides, then the values derived from `dataset.name`.
pub fn config(reg: &Registry, overrides: &[(String, String)]) -> anyhow::Result<Config> {
    let mut b = ConfigBuilder::new(full_schema(reg)?);
    let mut args: Vec<String> = vec!["device".into(), "cpu".into()];
    for (k, v) in overrides {
        args.extend([k.clone(), v.clone()]);
    }
    b.merge_overrides(&args)?;
    let name = match b.get("dataset.name") {
        Some(crate::config::Value::Str(s)) => s.clone(),
        _ => anyhow::bail!("dataset.name is not a string"),
    };
    let dataset = crate::datasets::find(&name)
        .ok_or_else(|| anyhow::anyhow!("dataset.name = '{name}' is not supported"))?;
    dataset.derive_config(&mut b)?;
    Ok(b.build()?)
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn label(e: &Entry) -> String {
    format!("{} {}", e.info.kind.as_str(), e.info.name)
}

fn small_text(e: &Entry) -> String {
    if e.info.small.is_empty() {
        "defaults".to_string()
    } else {
        e.info
            .small
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Runs every check on each of `entries` (all kinds), in kind order.
pub fn check(reg: &Registry, entries: &[Entry]) -> Report {
    let mut report = Report::default();
    let scratch = std::env::temp_dir().join(format!("imgclf-check-{}", std::process::id()));
    for e in entries {
        match e.info.kind {
            Kind::Model => check_model(reg, e, &scratch, &mut report),
            Kind::Augmentation => check_augmentation(reg, e, &mut report),
            Kind::Optimizer => check_optimizer(reg, e, &mut report),
            Kind::Scheduler => check_scheduler(reg, e, &mut report),
            Kind::Step => check_step(reg, e, &mut report),
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    report
}

/// Every component of `kind` in the registry.
pub fn entries_of(reg: &Registry, kind: Kind) -> Vec<Entry> {
    reg.of_kind(kind).cloned().collect()
}

// ------------------------------------------------------------------ models

const GEOMETRIES: [&str; 3] = ["CIFAR10", "FashionMNIST", "CIFAR100"];

fn model_context(c: &Config) -> ModelContext {
    ModelContext {
        n_channels: c.int("dataset.n_channels"),
        image_size: c.int("dataset.image_size"),
        n_classes: c.int("dataset.n_classes"),
        device: Device::Cpu,
    }
}

fn build_model(
    reg: &Registry,
    e: &Entry,
    c: &Config,
) -> anyhow::Result<imgclf_plugin_api::ffi::HostModel> {
    Ok(reg
        .plugin(e)
        .create_model(&e.info.name, &c.section_json(""), &model_context(c))?)
}

fn check_model(reg: &Registry, e: &Entry, scratch: &std::path::Path, report: &mut Report) {
    let name = &e.info.name;
    let l = label(e);
    let defaults = (|| -> R {
        let c = config(reg, &pairs(&[("model.name", name)])).map_err(err)?;
        let m = build_model(reg, e, &c).map_err(err)?;
        if m.tensors().map_err(err)?.is_empty() {
            return Err("the model has no tensors".into());
        }
        Ok(())
    })();
    report.add(&l, "defaults build on CIFAR10", defaults);
    let mut built = 0;
    for dataset in GEOMETRIES {
        let mut o = pairs(&[("model.name", name), ("dataset.name", dataset)]);
        o.extend(e.info.small.iter().cloned());
        let what = format!(
            "{} on {dataset}: forward, backward, finite gradients, eval determinism, state-dict round trip",
            small_text(e)
        );
        let r = model_round(reg, e, &o, &scratch.join(format!("{name}-{dataset}")));
        match r {
            Ok(true) => {
                built += 1;
                report.add(&l, what, Ok(()));
            }
            Ok(false) => report.add(
                &l,
                format!(
                    "{} on {dataset}: refused, naming dataset.image_size",
                    small_text(e)
                ),
                Ok(()),
            ),
            Err(msg) => report.add(&l, what, Err(msg)),
        }
    }
    report.add(
        &l,
        "fits at least two of the dataset geometries (3x32x32 10/100 classes, 1x28x28)",
        if built >= 2 {
            Ok(())
        } else {
            Err(format!("built on {built} of {}", GEOMETRIES.len()))
        },
    );
}

/// `Ok(false)`: the model refused the geometry, in terms of the config.
fn model_round(
    reg: &Registry,
    e: &Entry,
    overrides: &[(String, String)],
    dir: &std::path::Path,
) -> Result<bool, String> {
    let c = config(reg, overrides).map_err(err)?;
    let ctx = model_context(&c);
    tch::manual_seed(0);
    let mut model = match build_model(reg, e, &c) {
        Ok(m) => m,
        Err(e) => {
            let msg = err(e);
            return if msg.contains("dataset.image_size") {
                Ok(false)
            } else {
                Err(format!("build: {msg}"))
            };
        }
    };
    let x = Tensor::randn(
        [2, ctx.n_channels, ctx.image_size, ctx.image_size],
        (K::Float, Device::Cpu),
    );
    let logits = model.forward(&x, true).map_err(err)?;
    if logits.size() != vec![2, ctx.n_classes] {
        return Err(format!(
            "forward: logits of shape {:?}, expected [2, {}]",
            logits.size(),
            ctx.n_classes
        ));
    }
    logits
        .f_log_softmax(-1, K::Float)
        .map_err(err)?
        .f_nll_loss(
            &Tensor::from_slice(&[0i64, 1]),
            None::<Tensor>,
            tch::Reduction::Mean,
            -100,
        )
        .map_err(err)?
        .f_backward()
        .map_err(err)?;
    let tensors = model.tensors().map_err(err)?;
    let mut nonzero = 0;
    for t in tensors.iter().filter(|t| t.trainable) {
        let g = t.tensor.grad();
        if !g.defined() {
            return Err(format!("backward: `{}` has no gradient", t.name));
        }
        if g.size() != t.tensor.size() {
            return Err(format!(
                "backward: the gradient of `{}` has another shape",
                t.name
            ));
        }
        if g.isfinite().all().int64_value(&[]) != 1 {
            return Err(format!("backward: non-finite gradient in `{}`", t.name));
        }
        nonzero += (g.abs().sum(K::Float).double_value(&[]) > 0.0) as usize;
    }
    if nonzero == 0 {
        return Err("backward: every gradient is zero".into());
    }
    let mut names = std::collections::HashSet::new();
    for t in &tensors {
        if !names.insert(t.name.as_str()) {
            return Err(format!("tensors: the name `{}` appears twice", t.name));
        }
    }
    let y1 = tch::no_grad(|| model.forward(&x, false)).map_err(err)?;
    let y2 = tch::no_grad(|| model.forward(&x, false)).map_err(err)?;
    if !y1.equal(&y2) {
        return Err("eval: two forwards of the same input differ".into());
    }
    std::fs::create_dir_all(dir).map_err(err)?;
    let path = dir.join("w.safetensors");
    let named: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|t| (t.name.clone(), t.tensor.shallow_clone()))
        .collect();
    crate::io::save_safetensors(&path, &named, Default::default()).map_err(err)?;
    tch::manual_seed(1);
    let mut fresh = build_model(reg, e, &c).map_err(err)?;
    let before = tch::no_grad(|| fresh.forward(&x, false)).map_err(err)?;
    if before.equal(&y1) {
        return Err("initialisation: another seed gives the same outputs (is the model seeded from tch::manual_seed?)".into());
    }
    let loaded = crate::train::checkpoint::load(&path).map_err(err)?;
    crate::train::checkpoint::copy_into_model(&fresh.tensors().map_err(err)?, &loaded.model, &path)
        .map_err(err)?;
    let after = tch::no_grad(|| fresh.forward(&x, false)).map_err(err)?;
    if !after.equal(&y1) {
        return Err(
            "state dict: loading the saved tensors into a fresh model changed the outputs".into(),
        );
    }
    Ok(true)
}

// ------------------------------------------------------------------ augmentations

fn check_augmentation(reg: &Registry, e: &Entry, report: &mut Report) {
    let l = label(e);
    for dataset in ["CIFAR10", "FashionMNIST"] {
        let mut o = pairs(&[("dataset.name", dataset)]);
        if let Some(switch) = &e.info.switch {
            o.push((switch.clone(), "True".into()));
        }
        o.extend(e.info.small.iter().cloned());
        let what = format!(
            "{} on {dataset}: shapes kept, soft targets sum to 1, seeded",
            small_text(e)
        );
        report.add(&l, what, augmentation_round(reg, e, &o));
    }
}

fn augmentation_round(reg: &Registry, e: &Entry, overrides: &[(String, String)]) -> R {
    if e.info.stage == Some(Stage::Image) {
        return image_stage_round(reg, e, overrides);
    }
    let c = config(reg, overrides).map_err(err)?;
    let (ch, hw, k) = (
        c.int("dataset.n_channels"),
        c.int("dataset.image_size"),
        c.int("dataset.n_classes"),
    );
    let ctx = DataContext {
        n_channels: ch,
        image_size: hw,
        n_classes: k,
        mean: vec![0.5; ch as usize],
        std: vec![0.25; ch as usize],
        device: Device::Cpu,
    };
    let mut aug = reg
        .plugin(e)
        .create_augmentation(&e.info.name, &c.section_json(""), &ctx)
        .map_err(err)?;
    let n = 8i64;
    tch::manual_seed(0);
    let images = Tensor::rand([n, ch, hw, hw], (K::Float, Device::Cpu)) * 255.0;
    let targets = Tensor::arange(n, (K::Int64, Device::Cpu))
        .remainder(k)
        .one_hot(k)
        .to_kind(K::Float);
    let mut run = |seed| {
        aug.apply(
            Batch {
                images: images.copy(),
                targets: targets.copy(),
                views: 1,
            },
            seed,
        )
        .map_err(err)
    };
    let a = run(3)?;
    let b = run(3)?;
    if a.images.size() != vec![n * a.views as i64, ch, hw, hw] {
        return Err(format!(
            "images of shape {:?}, expected [{} x {n}, {ch}, {hw}, {hw}] ({} views)",
            a.images.size(),
            a.views,
            a.views
        ));
    }
    if a.targets.size() != vec![n, k] {
        return Err(format!(
            "targets of shape {:?}, expected [{n}, {k}]",
            a.targets.size()
        ));
    }
    let sums = a.targets.sum_dim_intlist(1, false, K::Float);
    if !sums.allclose(
        &Tensor::ones([n], (K::Float, Device::Cpu)),
        1e-5,
        1e-6,
        false,
    ) {
        return Err(format!("soft targets do not sum to 1: {sums}"));
    }
    if !(a.images.equal(&b.images) && a.targets.equal(&b.targets)) {
        return Err(
            "the same seed gave different batches (draw every random number from the seed)".into(),
        );
    }
    // Target transforms (label smoothing) are deterministic functions of the targets.
    if e.info.stage != Some(Stage::Target) {
        let c = run(4)?;
        if c.images.equal(&a.images) && c.targets.equal(&a.targets) {
            return Err("another seed gave the same batch".into());
        }
    }
    Ok(())
}

/// A per-image stage (ABI 0.1.2) on uint8 images of the dataset's geometry: the image keeps
/// its size (it is transformed in place), the same seed gives the same image, and some other
/// seed changes it.
fn image_stage_round(reg: &Registry, e: &Entry, overrides: &[(String, String)]) -> R {
    let c = config(reg, overrides).map_err(err)?;
    let (ch, hw) = (
        c.int("dataset.n_channels") as usize,
        c.int("dataset.image_size") as usize,
    );
    let ctx = DataContext {
        n_channels: ch as i64,
        image_size: hw as i64,
        n_classes: c.int("dataset.n_classes"),
        mean: vec![0.5; ch],
        std: vec![0.25; ch],
        device: Device::Cpu,
    };
    let stage = reg
        .plugin(e)
        .create_image_stage(&e.info.name, &c.section_json(""), &ctx)
        .map_err(err)?;
    let pixels: Vec<u8> = (0..ch * hw * hw).map(|i| (i * 7919 % 251) as u8).collect();
    let run = |seed: u64| -> Result<Vec<u8>, String> {
        let mut d = pixels.clone();
        stage
            .apply(
                imgclf_plugin_api::ImageMut {
                    data: &mut d,
                    channels: ch,
                    height: hw,
                    width: hw,
                },
                seed,
            )
            .map_err(err)?;
        Ok(d)
    };
    let a = run(3)?;
    if a != run(3)? {
        return Err(
            "the same seed gave different images (draw every random number from the seed)".into(),
        );
    }
    for seed in 4..24 {
        if run(seed)? != a {
            return Ok(());
        }
    }
    Err("20 other seeds all gave the same image".into())
}

// ------------------------------------------------------------------ training steps

fn check_step(reg: &Registry, e: &Entry, report: &mut Report) {
    let l = label(e);
    let mut o = pairs(&[("train.step", &e.info.name)]);
    let built = |o: &[(String, String)]| -> R {
        let c = config(reg, o).map_err(err)?;
        reg.plugin(e)
            .create_step(
                &e.info.name,
                &c.section_json(""),
                &imgclf_plugin_api::StepBuildContext {
                    device: Device::Cpu,
                },
            )
            .map(|_| ())
            .map_err(err)
    };
    report.add(&l, "builds with its defaults", built(&o));
    if !e.info.small.is_empty() {
        o.extend(e.info.small.iter().cloned());
        report.add(&l, small_text(e) + ": builds", built(&o));
    }
}

// ------------------------------------------------------------------ optimizers

fn check_optimizer(reg: &Registry, e: &Entry, report: &mut Report) {
    let l = label(e);
    let mut o = pairs(&[("train.optimizer", &e.info.name)]);
    o.extend(e.info.small.iter().cloned());
    report.add(
        &l,
        format!(
            "{}: parameter contract, loss decreases, resumes exactly",
            small_text(e)
        ),
        optimizer_round(reg, e, &o),
    );
}

/// Two parameters in two groups (with and without weight decay).
fn optimizer_problem(
    reg: &Registry,
    e: &Entry,
    c: &Config,
) -> Result<(Vec<Tensor>, imgclf_plugin_api::ffi::HostOptimizer), String> {
    let w = Tensor::from_slice(&[1.0f32, -2.0, 3.0]).set_requires_grad(true);
    let m = Tensor::from_slice(&[0.5f32, -0.25, 0.75, 1.5, -1.0, 0.1])
        .reshape([2, 3])
        .set_requires_grad(true);
    let group = |name: &str, t: &Tensor, wd| ParamGroup {
        weight_decay: wd,
        params: vec![NamedTensor {
            name: name.into(),
            tensor: t.shallow_clone(),
            trainable: true,
        }],
    };
    let before: Vec<Tensor> = [&w, &m].iter().map(|t| t.detach().copy()).collect();
    let opt = reg
        .plugin(e)
        .create_optimizer(
            &e.info.name,
            &c.section_json(""),
            vec![group("w", &w, 1e-4), group("m", &m, 0.0)],
        )
        .map_err(err)?;
    for (t, b) in [&w, &m].iter().zip(&before) {
        if !t.detach().equal(b) {
            return Err("build changed a parameter's values (the parameter contract allows moving its storage, never its values)".into());
        }
    }
    Ok((vec![w, m], opt))
}

fn loss(p: &[Tensor]) -> Tensor {
    (&p[0] * &p[0]).sum(K::Float) + (p[1].sin() + &p[1] * &p[1]).sum(K::Float)
}

fn steps(p: &[Tensor], opt: &mut imgclf_plugin_api::ffi::HostOptimizer, n: usize) -> R {
    for _ in 0..n {
        for t in p {
            t.shallow_clone().zero_grad();
        }
        loss(p).f_backward().map_err(err)?;
        opt.step(0.01).map_err(err)?;
    }
    Ok(())
}

fn optimizer_round(reg: &Registry, e: &Entry, overrides: &[(String, String)]) -> R {
    let c = config(reg, overrides).map_err(err)?;
    let (p, mut a) = optimizer_problem(reg, e, &c)?;
    let initial = loss(&p).double_value(&[]);
    let ptrs: Vec<usize> = p.iter().map(|t| t.data_ptr() as usize).collect();
    steps(&p, &mut a, 5)?;
    if p.iter().map(|t| t.data_ptr() as usize).collect::<Vec<_>>() != ptrs {
        return Err("a step moved a parameter's storage (steps must update it in place)".into());
    }
    let after = loss(&p).double_value(&[]);
    if after >= initial || after.is_nan() {
        return Err(format!(
            "the loss did not decrease in 5 steps at lr 0.01: {initial} -> {after}"
        ));
    }
    // Save (a deep copy, as a checkpoint file would), load into a fresh optimizer over a
    // copy of the parameters, and step both.
    let state: Vec<NamedTensor> = a
        .state()
        .map_err(err)?
        .into_iter()
        .map(|t| NamedTensor {
            name: t.name,
            tensor: t.tensor.detach().copy(),
            trainable: t.trainable,
        })
        .collect();
    let (q, mut b) = optimizer_problem(reg, e, &c)?;
    tch::no_grad(|| {
        for (dst, src) in q.iter().zip(&p) {
            let mut dst = dst.shallow_clone();
            dst.copy_(src);
        }
    });
    b.load_state(state)
        .map_err(|e| format!("load_state of its own state: {e}"))?;
    steps(&p, &mut a, 3)?;
    steps(&q, &mut b, 3)?;
    for (i, (x, y)) in p.iter().zip(&q).enumerate() {
        if !x.detach().equal(&y.detach()) {
            let diff = (x - y).abs().max().double_value(&[]);
            return Err(format!(
                "resume: after state save/load, 3 more steps differ from the uninterrupted run (parameter {}, max difference {diff:e}); state() must hold everything the steps depend on",
                ["w", "m"][i]
            ));
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ schedulers

/// Steps per epoch the schedule contract requires to work (1: `train` first builds every
/// schedule with one step per epoch to check its config).
pub const STEPS_PER_EPOCH: [u64; 3] = [1, 7, 391];

fn check_scheduler(reg: &Registry, e: &Entry, report: &mut Report) {
    let l = label(e);
    let mut o = pairs(&[("scheduler.type", &e.info.name)]);
    o.extend(e.info.small.iter().cloned());
    for spe in STEPS_PER_EPOCH {
        report.add(
            &l,
            format!(
                "{}, {spe} step(s) per epoch: builds, every factor finite and >= 0, deterministic",
                small_text(e)
            ),
            scheduler_round(reg, e, &o, spe),
        );
    }
}

fn scheduler_round(reg: &Registry, e: &Entry, overrides: &[(String, String)], spe: u64) -> R {
    let c = config(reg, overrides).map_err(err)?;
    let warmup = if c.str("scheduler.warmup.type") == "none" {
        0
    } else {
        c.int("scheduler.warmup.epochs")
    };
    let epochs = (c.int("scheduler.epochs") - warmup).max(1) as u64;
    let ctx = ScheduleContext {
        steps_per_epoch: spe,
        epochs,
    };
    let build = || {
        reg.plugin(e)
            .create_scheduler(&e.info.name, &c.section_json(""), &ctx)
            .map_err(err)
    };
    let (a, b) = (build()?, build()?);
    let total = spe * epochs;
    let stride = (total / 2000).max(1);
    let mut step = 0;
    while step <= total {
        let f = a.factor(step).map_err(err)?;
        if !f.is_finite() || f < 0.0 {
            return Err(format!(
                "factor({step}) = {f} ({epochs} epochs of {spe} steps)"
            ));
        }
        let g = b.factor(step).map_err(err)?;
        let again = a.factor(step).map_err(err)?;
        if f.to_bits() != g.to_bits() || f.to_bits() != again.to_bits() {
            return Err(format!(
                "factor({step}) is not a pure function of the step: {f}, {g}, {again}"
            ));
        }
        step += if step < spe * 2 { 1 } else { stride };
    }
    Ok(())
}
