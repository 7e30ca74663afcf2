//! From command line to a frozen config and the chosen components: builds the schema from
//! the host's keys and every loaded component's keys, merges defaults < (on `--resume`, the
//! run's saved config) < `--config` file < `KEY VALUE` overrides, derives the dataset geometry
//! and the device, freezes, and resolves `model.name`, `train.optimizer`, `scheduler.type` and
//! the `augmentation.use_*` switches through the registry.

use crate::config::{
    host_schema, reference_plugin_keys, Config, ConfigBuilder, KeySpec, Schema, Source, Value,
    ValueType,
};
use crate::datasets::{self, DatasetInfo};
use crate::registry::{Entry, Registry};
use anyhow::{bail, Context, Result};
use imgclf_plugin_api::{KeyType, Kind, Stage};
use std::path::{Path, PathBuf};

/// The reference's augmentation switches, in the order its pipeline applies them; the order
/// of augmentations within one [`Stage`].
const REFERENCE_SWITCH_ORDER: &[&str] = &[
    "augmentation.use_random_crop",
    "augmentation.use_random_horizontal_flip",
    "augmentation.use_cutout",
    "augmentation.use_random_erasing",
    "augmentation.use_dual_cutout",
    "augmentation.use_mixup",
    "augmentation.use_ricap",
    "augmentation.use_cutmix",
    "augmentation.use_label_smoothing",
];

/// `train.step`'s default: the host's own step (one forward/backward), not a plugin.
pub const PLAIN_STEP: &str = "plain";

/// What the user asked for on the command line.
#[derive(Clone, Debug, Default)]
pub struct Request {
    /// `--plugin NAME|PATH`: the plugin whose model is trained.
    pub plugin: Option<String>,
    pub config_file: Option<PathBuf>,
    pub overrides: Vec<String>,
    /// `--resume DIR`: DIR's `config.yaml`, merged first (after the defaults); the `--config`
    /// file and the overrides apply on top of it.
    pub resume_config: Option<PathBuf>,
}

/// What a command needs: training needs everything; evaluation only the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    Train,
    Evaluate,
}

pub struct Setup {
    pub config: Config,
    pub dataset: &'static DatasetInfo,
    pub dataset_dir: PathBuf,
    pub model: Entry,
    pub optimizer: Option<Entry>,
    pub scheduler: Option<Entry>,
    /// `train.step`: the training-step hook (None: the plain step).
    pub step: Option<Entry>,
    /// Enabled augmentations in pipeline order.
    pub augmentations: Vec<Entry>,
    /// On resume: the keys whose value differs from the saved run's (none of them fixed).
    pub resume_changes: Vec<crate::resume::Change>,
}

fn key_type(t: &KeyType) -> ValueType {
    match t {
        KeyType::Bool => ValueType::Bool,
        KeyType::Int => ValueType::Int,
        KeyType::Float => ValueType::Float,
        KeyType::Str => ValueType::Str,
        KeyType::List(inner) => ValueType::list_of(key_type(inner)),
    }
}

/// A JSON value from a plugin's key declaration as a config value.
pub fn value_from_json(v: &serde_json::Value) -> Option<Value> {
    Some(match v {
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64()?),
        },
        serde_json::Value::String(s) => Value::Str(s.clone()),
        serde_json::Value::Array(a) => {
            Value::List(a.iter().map(value_from_json).collect::<Option<_>>()?)
        }
        _ => return None,
    })
}

/// The host's keys plus every loaded component's keys (and augmentation switches the host
/// does not already declare).
pub fn full_schema(registry: &Registry) -> Result<Schema> {
    let mut schema = host_schema();
    // Dataset keys beyond the reference's (dataset.mean/std, dataset.skip_unreadable).
    schema.extend(datasets::open::keys())?;
    for kind in Kind::ALL {
        for entry in registry.of_kind(kind) {
            let owner = &registry.plugin(entry).name;
            for k in &entry.info.keys {
                let default = value_from_json(&k.default).with_context(|| {
                    format!(
                        "plugin `{owner}` declares key `{}` with an unusable default {}",
                        k.key, k.default
                    )
                })?;
                let mut spec =
                    KeySpec::new(&k.key, key_type(&k.ty), default, &k.help).owned_by(owner);
                if !k.choices.is_empty() {
                    let choices: Vec<Value> =
                        k.choices.iter().filter_map(value_from_json).collect();
                    spec = spec.with_choices(choices);
                }
                if let Some(range) = k.range {
                    spec = spec.with_range(range);
                }
                // Components of one plugin may share a key (adam and amsgrad both read
                // optim.adam.betas); the same declaration twice is one key.
                if let Some(existing) = schema.get(&spec.key) {
                    if existing.owner == spec.owner
                        && existing.ty == spec.ty
                        && existing.default == spec.default
                        && existing.choices == spec.choices
                        && existing.range == spec.range
                    {
                        continue;
                    }
                }
                schema.add(spec).with_context(|| {
                    format!(
                        "plugin `{owner}` ({})",
                        registry.plugin(entry).path.display()
                    )
                })?;
            }
            if let Some(switch) = &entry.info.switch {
                if schema.get(switch).is_none() {
                    let help = format!("enable {}", entry.info.description);
                    schema.add(
                        KeySpec::new(switch, ValueType::Bool, Value::Bool(false), &help)
                            .owned_by(owner),
                    )?;
                }
            }
        }
    }
    // Reference keys whose plugin is not loaded: accepted at their defaults only.
    for spec in reference_plugin_keys() {
        if schema.get(&spec.key).is_none() && !schema.contains_section(&spec.key) {
            schema.add(spec)?;
        }
    }
    Ok(schema)
}

/// Resolves `--plugin`: a plugin name, or a path to a plugin file (loaded in addition to the
/// search path).
pub fn plugin_file(request: &Request) -> Option<PathBuf> {
    let p = request.plugin.as_ref()?;
    let path = Path::new(p);
    (p.contains('/') || p.ends_with(".so")).then(|| path.to_path_buf())
}

fn selected_plugin_name(registry: &Registry, request: &Request) -> Result<Option<String>> {
    let Some(p) = &request.plugin else {
        return Ok(None);
    };
    if let Some(file) = plugin_file(request) {
        let canonical = file
            .canonicalize()
            .with_context(|| format!("--plugin {}: no such file", file.display()))?;
        if let Some(loaded) = registry
            .plugins
            .iter()
            .find(|l| l.path.canonicalize().ok().as_ref() == Some(&canonical))
        {
            return Ok(Some(loaded.name.clone()));
        }
        let why = registry
            .errors
            .iter()
            .find(|e| e.path.canonicalize().ok().as_ref() == Some(&canonical))
            .map(|e| e.message.clone())
            .unwrap_or_else(|| "another plugin of the same name was found first".into());
        bail!("--plugin {}: could not be loaded: {why}", file.display());
    }
    if registry.plugin_by_name(p).is_none() {
        let names: Vec<&str> = registry.plugins.iter().map(|l| l.name.as_str()).collect();
        // The closest names only: with many plugins sharing a prefix (resnet, resnet_preact,
        // resnext) a plain threshold would suggest all of them.
        let mut scored: Vec<(f64, &str)> = names
            .iter()
            .map(|n| (strsim::jaro_winkler(n, p), *n))
            .filter(|(score, _)| *score > 0.8)
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
        let best = scored.first().map_or(0.0, |(score, _)| *score);
        let close: Vec<&str> = scored
            .into_iter()
            .take_while(|(score, _)| *score >= best - 0.05)
            .map(|(_, n)| n)
            .collect();
        bail!(
            "--plugin {p}: no such plugin{}; loaded plugins: {} (searched {})",
            if close.is_empty() {
                String::new()
            } else {
                format!(" (did you mean {}?)", close.join(", "))
            },
            if names.is_empty() {
                "none".into()
            } else {
                names.join(", ")
            },
            registry
                .searched
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(Some(p.clone()))
}

/// Merges the configuration and resolves the components.
pub fn setup(registry: &Registry, request: &Request, purpose: Purpose) -> Result<Setup> {
    let schema = full_schema(registry)?;
    let mut b = ConfigBuilder::new(schema);
    // On resume the saved run's config comes first: the command line applies on top of it.
    let mut saved = None;
    if let Some(resume) = &request.resume_config {
        let text = std::fs::read_to_string(resume).with_context(|| {
            format!(
                "--resume: cannot read {} (is this an imgclf output directory?)",
                resume.display()
            )
        })?;
        b.merge_yaml_str(&text, Source::Checkpoint(resume.clone()))?;
        b.set("train.resume", Value::Bool(true), Source::Derived)?;
        let values: std::collections::BTreeMap<String, Value> = b
            .schema()
            .keys()
            .filter_map(|k| Some((k.key.clone(), b.get(&k.key)?.clone())))
            .collect();
        saved = Some(values);
    }
    if let Some(file) = &request.config_file {
        b.merge_yaml_file(file)?;
    }
    b.merge_overrides(&request.overrides)?;

    // --plugin selects the model.
    if let Some(plugin) = selected_plugin_name(registry, request)? {
        let models: Vec<&Entry> = registry
            .of_kind(Kind::Model)
            .filter(|e| registry.plugin(e).name == plugin)
            .collect();
        let current = b.get("model.name").and_then(|v| {
            if let Value::Str(s) = v {
                Some(s.clone())
            } else {
                None
            }
        });
        let user_set = b.source("model.name").is_some_and(Source::is_user);
        match models.as_slice() {
            [] => bail!("--plugin {plugin}: this plugin provides no model; drop --plugin and set model.name instead"),
            [only] => {
                if user_set && current.as_deref() != Some(only.info.name.as_str()) {
                    bail!(
                        "--plugin {plugin} trains the model `{}`, but model.name is '{}' ({}); remove one of them",
                        only.info.name,
                        current.unwrap_or_default(),
                        b.source("model.name").map(|s| s.to_string()).unwrap_or_default()
                    );
                }
                b.set("model.name", Value::Str(only.info.name.clone()), Source::CommandLine)?;
            }
            many => {
                let names: Vec<&str> = many.iter().map(|e| e.info.name.as_str()).collect();
                if !current.as_deref().is_some_and(|c| names.contains(&c)) || !user_set {
                    bail!("--plugin {plugin} provides several models ({}); choose one with model.name", names.join(", "));
                }
            }
        }
    }

    // Values derived from dataset.name, as the reference's update_config does (but an explicit
    // dataset.dataset_dir is kept).
    let name = match b.get("dataset.name") {
        Some(Value::Str(s)) => s.clone(),
        _ => unreachable!("dataset.name is a host string key"),
    };
    let dataset = datasets::find(&name).with_context(|| {
        format!(
            "dataset.name = '{name}' ({}) is not supported yet; supported: {}",
            b.source("dataset.name")
                .map(|s| s.to_string())
                .unwrap_or_default(),
            datasets::names().join(", ")
        )
    })?;
    dataset.derive_config(&mut b)?;
    if matches!(b.get("device"), Some(Value::Str(s)) if s == "cuda") && !tch::Cuda::is_available() {
        tracing::warn!("device 'cuda' requested but CUDA is not available: training on the CPU");
        b.set("device", Value::Str("cpu".into()), Source::Derived)?;
    }
    let config = b.build()?;
    crate::threads::apply_config(&config);
    let resume_changes = match (&saved, &request.resume_config) {
        (Some(saved), Some(file)) => crate::resume::changes(
            saved,
            &config,
            file.parent().unwrap_or_else(|| Path::new(".")),
        )?,
        _ => Vec::new(),
    };

    let model = registry
        .require(Kind::Model, config.str("model.name"), "model.name")?
        .clone();
    let (mut optimizer, mut scheduler, mut augmentations) = (None, None, Vec::new());
    let mut step = None;
    if purpose == Purpose::Train {
        optimizer = Some(
            registry
                .require(
                    Kind::Optimizer,
                    config.str("train.optimizer"),
                    "train.optimizer",
                )?
                .clone(),
        );
        scheduler = Some(
            registry
                .require(
                    Kind::Scheduler,
                    config.str("scheduler.type"),
                    "scheduler.type",
                )?
                .clone(),
        );
        step = match config.str("train.step") {
            PLAIN_STEP => None,
            name => Some(registry.require(Kind::Step, name, "train.step")?.clone()),
        };
        let mut missing = Vec::new();
        for (key, value) in config.iter() {
            let is_switch = key.starts_with("augmentation.use_")
                || registry
                    .of_kind(Kind::Augmentation)
                    .any(|e| e.info.switch.as_deref() == Some(key));
            // Image folders crop and flip each image in their loader.
            if !is_switch || *value != Value::Bool(true) || dataset.serves_switch(key) {
                continue;
            }
            match registry
                .of_kind(Kind::Augmentation)
                .find(|e| e.info.switch.as_deref() == Some(key))
            {
                Some(e) => augmentations.push(e.clone()),
                None => missing.push(key.to_string()),
            }
        }
        if !missing.is_empty() {
            bail!(
                "{} not supported yet: no loaded plugin provides {}; set {} False or add the plugin to the plugin path",
                missing.iter().map(|k| format!("{k} = True")).collect::<Vec<_>>().join(", "),
                if missing.len() == 1 { "it" } else { "them" },
                missing.join(", ")
            );
        }
        let order = |e: &Entry| {
            let switch = e.info.switch.as_deref().unwrap_or("");
            let pos = REFERENCE_SWITCH_ORDER
                .iter()
                .position(|s| *s == switch)
                .unwrap_or(usize::MAX);
            (
                // Always set: load_plugin refuses augmentations without a known stage.
                e.info.stage,
                pos,
                e.info.name.clone(),
            )
        };
        augmentations.sort_by_key(order);
        let mixers: Vec<(&str, &str)> = augmentations
            .iter()
            .filter(|e| e.info.stage == Some(Stage::Mix))
            .map(|e| (e.info.name.as_str(), e.info.switch.as_deref().unwrap_or("")))
            .collect();
        if mixers.len() > 1 {
            let names: Vec<&str> = mixers.iter().map(|m| m.0).collect();
            let keys: Vec<&str> = mixers.iter().map(|m| m.1).collect();
            bail!(
                "{} are all True, but {} each mix whole batches and cannot be combined (the reference would silently use only one); keep one and set the others False, e.g. {} False",
                keys.join(", "),
                names.join(" and "),
                keys[1..].join(" False ")
            );
        }
    }
    let dataset_dir = datasets::expand_home(Path::new(config.str("dataset.dataset_dir")));
    Ok(Setup {
        config,
        dataset,
        dataset_dir,
        model,
        optimizer,
        scheduler,
        step,
        augmentations,
        resume_changes,
    })
}
