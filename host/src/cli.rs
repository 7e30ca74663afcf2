//! Command-line interface: `imgclf train | evaluate | predict | lr-schedule | throughput |
//! preview | datasets list | datasets download | plugins list | plugins inspect | plugins check |
//! new-plugin | env`.

use crate::registry::{Discovery, Registry};
use crate::setup::{plugin_file, Request};
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use imgclf_plugin_api::ffi::{info_to_json, LoadedPlugin};
use imgclf_plugin_api::Kind;
use serde_json::json;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "imgclf",
    version,
    about = "Image-classification training with plugins (models, augmentations, optimizers, schedulers)"
)]
pub struct Cli {
    /// Extra folder to search for plugins (repeatable; searched before IMGCLF_PLUGIN_PATH and
    /// the folder beside the binary).
    #[arg(long = "plugin-path", global = true, value_name = "DIR")]
    plugin_path: Vec<PathBuf>,
    /// Debug logging (also RUST_LOG).
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model (like the reference's `python train.py`).
    Train(TrainCmd),
    /// Predict the test split with a checkpoint (like the reference's `python evaluate.py`).
    Evaluate(ConfigArgs),
    /// Print (and plot) the learning rate of every training iteration of a config.
    LrSchedule(LrScheduleCmd),
    /// Draw the loss, accuracy and learning-rate curves of one or more runs into a PNG.
    Plot(crate::curves::PlotArgs),
    /// Images per second the configured model trains and predicts on (synthetic inputs).
    Throughput(ThroughputCmd),
    /// Write a PNG grid of augmented training images (and their soft labels beside it).
    Preview(PreviewCmd),
    /// Classify your own images with a trained run (top-k classes, written as JSON and CSV).
    Predict(crate::predict::PredictArgs),
    /// List the datasets (folder, present, verified) or download one.
    #[command(subcommand)]
    Datasets(crate::datasets::commands::DatasetsCmd),
    /// List or inspect the plugins found on the plugin path.
    #[command(subcommand)]
    Plugins(PluginsCmd),
    /// Write a ready out-of-tree plugin crate (Cargo.toml, src/lib.rs with a working component
    /// and its test, src/ffi.rs) to start a plugin from; see docs/plugin-guide.md.
    NewPlugin(crate::new_plugin::NewPluginArgs),
    /// Versions, devices and threads this imgclf runs with, and what to build plugins against
    /// (LIBTORCH, the ABI version, the pins, the plugin search path).
    Env {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
struct ConfigArgs {
    /// Plugin (name or path to its .so) whose model is used; sets model.name.
    #[arg(long)]
    plugin: Option<String>,
    /// YAML config file (e.g. configs/cifar/resnet_preact.yaml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Dotted overrides: KEY VALUE pairs with Python-literal values (`train.base_lr 0.2`).
    /// Options may come before, between or after them; negative numbers are values. A value
    /// that starts with `-` and is not a plain number (`-1e-3`) goes after `--`.
    #[arg(allow_negative_numbers = true, value_name = "KEY VALUE")]
    overrides: Vec<String>,
}

#[derive(Args, Debug)]
struct TrainCmd {
    /// Continue the run in DIR from its newest complete checkpoint, with DIR's config.yaml.
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// Load plugins, merge and validate the config, build the model and report; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// With --resume: continue even though a plugin file differs from the one the run was
    /// trained with (its checksum in DIR/env.yaml); the new files are recorded.
    #[arg(long)]
    allow_plugin_changes: bool,
    /// Data-parallel on this machine: start N ranks of this command (train.distributed True,
    /// torchrun's environment), forward signals, stop all when one fails.
    #[arg(long, value_name = "N")]
    nproc_per_node: Option<usize>,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Args, Debug)]
struct LrScheduleCmd {
    /// Iterations per epoch (default: from the training set size and train.batch_size).
    #[arg(long, value_name = "N")]
    steps_per_epoch: Option<u64>,
    /// Comma-separated `epoch,step,lr` instead of a table.
    #[arg(long)]
    csv: bool,
    /// Also draw the schedule into this PNG file.
    #[arg(long, value_name = "FILE.png")]
    plot: Option<PathBuf>,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Args, Debug)]
struct ThroughputCmd {
    /// Images per step (default: train.batch_size).
    #[arg(long, value_name = "N")]
    batch_size: Option<i64>,
    /// Timed steps of each phase (train, eval).
    #[arg(long, value_name = "N", default_value_t = 20)]
    steps: u32,
    /// Untimed steps before timing.
    #[arg(long, value_name = "N", default_value_t = 3)]
    warmup: u32,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Args, Debug)]
struct PreviewCmd {
    /// The PNG grid to write; the labels go to the same name with `.json`.
    #[arg(long, value_name = "FILE.png")]
    output: Option<PathBuf>,
    /// Images shown (default: train.batch_size, at most 64).
    #[arg(long, value_name = "N")]
    count: Option<usize>,
    /// Output pixels per image pixel.
    #[arg(long, value_name = "N", default_value_t = 2)]
    scale: usize,
    /// Also time the input pipeline over N batches of train.batch_size; prints JSON.
    #[arg(long, value_name = "N")]
    time: Option<u32>,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Subcommand, Debug)]
enum PluginsCmd {
    /// Every plugin with its components.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One plugin: components, papers and every config key with default, range and help
    /// (`imgclf`: the host's own keys).
    Inspect {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// The conformance suite on a plugin file (or every plugin in a folder): each component
    /// with its defaults and small variant against the contracts of docs/plugin-guide.md.
    /// Prints PASS/FAIL per check; exits with 1 when any check fails.
    Check {
        /// A plugin file (`libfoo.so`) or a folder of plugin files.
        #[arg(value_name = "PATH")]
        path: PathBuf,
        /// Folder of reference cases for models (parameter counts and state-dict names, one
        /// file per case, the format of tests/data/reference/state_dict); optional.
        #[arg(long, value_name = "DIR")]
        reference: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn request(c: &ConfigArgs) -> Request {
    Request {
        plugin: c.plugin.clone(),
        config_file: c.config.clone(),
        overrides: c.overrides.clone(),
        resume_config: None,
    }
}

fn discover(cli: &Cli, request: Option<&Request>) -> Result<Registry> {
    let files = request.and_then(plugin_file).into_iter().collect();
    Registry::discover(&Discovery {
        cli_paths: cli.plugin_path.clone(),
        files,
    })
}

/// Like [`discover`], for a command on an existing run directory: the plugin files recorded
/// in its `env.yaml` are loaded first (no `--plugin-path` needed), then checked.
fn discover_run(
    cli: &Cli,
    request: Option<&Request>,
    dir: &std::path::Path,
    command: &str,
    strictness: crate::provenance::Strictness,
) -> Result<Registry> {
    let recorded = crate::provenance::read(dir)?;
    let mut files: Vec<PathBuf> = crate::provenance::existing_files(&recorded);
    files.extend(request.and_then(plugin_file));
    let reg = Registry::discover(&Discovery {
        cli_paths: cli.plugin_path.clone(),
        files,
    })?;
    reg.warn_load_errors();
    crate::provenance::verify(&reg, &recorded, dir, command, strictness)?;
    Ok(reg)
}

fn plugin_json(p: &LoadedPlugin) -> serde_json::Value {
    json!({
        "name": p.name, "version": p.version, "description": p.description, "path": p.path,
        "api_version": p.api_version, "libtorch_version": p.libtorch_version,
        "components": p.components.iter().map(info_to_json).collect::<Vec<_>>(),
    })
}

fn papers(p: &[String]) -> String {
    p.iter()
        .map(|a| format!("arXiv:{a}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_list(reg: &Registry, as_json: bool) {
    if as_json {
        let v = json!({
            "plugins": reg.plugins.iter().map(plugin_json).collect::<Vec<_>>(),
            "errors": reg.errors.iter().map(|e| json!({"path": e.path, "message": e.message})).collect::<Vec<_>>(),
            "search_path": reg.searched,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    if reg.plugins.is_empty() {
        println!(
            "no plugins found (searched: {})",
            reg.searched
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for p in &reg.plugins {
        println!(
            "{} {}  {}\n  file: {}",
            p.name,
            p.version,
            p.description,
            p.path.display()
        );
        for c in &p.components {
            let paper = if c.papers.is_empty() {
                String::new()
            } else {
                format!(" [{}]", papers(&c.papers))
            };
            println!(
                "  {:<12} {:<24} {}{paper}",
                c.kind.as_str(),
                c.name,
                c.description
            );
        }
    }
    if !reg.errors.is_empty() {
        println!("\nfailed to load ({}):", reg.errors.len());
        for e in &reg.errors {
            println!("  {}: {}", e.path.display(), e.message);
        }
    }
}

/// `imgclf plugins inspect imgclf`: the host's own keys, as a plugin's are shown.
fn print_host_keys(as_json: bool) {
    let schema = crate::config::host_schema();
    if as_json {
        let keys: Vec<serde_json::Value> = schema
            .keys()
            .map(|k| {
                json!({"key": k.key, "type": k.ty.to_string(), "default": k.default.to_string(),
                    "choices": k.choices.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
                    "range": k.range.map(|r| r.to_json()), "supported": k.supported,
                    "help": k.help})
            })
            .collect();
        let v = json!({"name": crate::config::HOST_OWNER, "keys": keys});
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    println!(
        "{} {}: the host's own keys",
        crate::config::HOST_OWNER,
        env!("CARGO_PKG_VERSION")
    );
    for k in schema.keys() {
        let choices = if k.choices.is_empty() {
            String::new()
        } else {
            let c: Vec<String> = k.choices.iter().map(|v| v.to_string()).collect();
            format!(" choices: {}", c.join(", "))
        };
        let range = k.range.map(|r| format!(" range: {r}")).unwrap_or_default();
        let unsupported = if k.supported {
            ""
        } else {
            " (not supported yet: default only)"
        };
        println!(
            "  {:<44} {:<10} default {}{choices}{range}{unsupported}\n      {}",
            k.key, k.ty, k.default, k.help
        );
    }
}

fn print_inspect(reg: &Registry, name: &str, as_json: bool) -> Result<()> {
    if name == crate::config::HOST_OWNER && reg.plugin_by_name(name).is_none() {
        print_host_keys(as_json);
        return Ok(());
    }
    let p = reg.plugin_by_name(name).with_context(|| {
        let names: Vec<&str> = reg.plugins.iter().map(|p| p.name.as_str()).collect();
        format!(
            "no plugin named `{name}`; loaded: {}",
            if names.is_empty() {
                "none".into()
            } else {
                names.join(", ")
            }
        )
    })?;
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&plugin_json(p)).unwrap_or_default()
        );
        return Ok(());
    }
    println!("{} {}\n  {}", p.name, p.version, p.description);
    println!(
        "  file: {}\n  plugin API {}, libtorch {}",
        p.path.display(),
        p.api_version,
        p.libtorch_version
    );
    for kind in Kind::ALL {
        for c in p.components.iter().filter(|c| c.kind == kind) {
            println!("\n{} `{}`: {}", kind.as_str(), c.name, c.description);
            if !c.papers.is_empty() {
                println!("  papers: {}", papers(&c.papers));
            }
            if let Some(s) = &c.switch {
                println!(
                    "  enabled by: {s} True (stage: {})",
                    c.stage.map(|s| s.as_str()).unwrap_or("?")
                );
            }
            for k in &c.keys {
                let choices = if k.choices.is_empty() {
                    String::new()
                } else {
                    format!(
                        " choices: {}",
                        k.choices
                            .iter()
                            .map(|v| v.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                let range = k.range.map(|r| format!(" range: {r}")).unwrap_or_default();
                println!(
                    "  {:<44} {:<10} default {}{choices}{range}\n      {}",
                    k.key,
                    k.ty.to_text(),
                    k.default,
                    k.help
                );
            }
        }
    }
    Ok(())
}

/// `imgclf plugins check PATH`: loads PATH (a file, or every plugin in a folder) with the
/// usual search path (whose plugins supply nothing but their config keys), and checks every
/// component of the plugins from PATH.
fn plugins_check(
    cli: &Cli,
    path: &std::path::Path,
    reference: Option<&std::path::Path>,
    as_json: bool,
) -> Result<i32> {
    let target = path
        .canonicalize()
        .with_context(|| format!("plugins check: {} does not exist", path.display()))?;
    let is_dir = target.is_dir();
    let mut cli_paths = cli.plugin_path.clone();
    let mut files = Vec::new();
    if is_dir {
        cli_paths.insert(0, target.clone());
    } else {
        files.push(target.clone());
    }
    let reg = Registry::discover(&Discovery { cli_paths, files })?;
    let from_target = |p: &std::path::Path| {
        let c = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        if is_dir {
            c.parent() == Some(target.as_path())
        } else {
            c == target
        }
    };
    let mut report = crate::check::Report::default();
    for e in reg.errors.iter().filter(|e| from_target(&e.path)) {
        report.add(
            &format!("file {}", e.path.display()),
            "loads as an imgclf plugin",
            Err(e.message.clone()),
        );
    }
    let mut entries = Vec::new();
    for (i, p) in reg.plugins.iter().enumerate() {
        if !from_target(&p.path) {
            continue;
        }
        report.add(
            &format!("plugin {}", p.name),
            format!(
                "loads: version {}, ABI {}, libtorch {}, {} component(s)",
                p.version,
                p.api_version,
                p.libtorch_version,
                p.components.len()
            ),
            Ok(()),
        );
        for kind in Kind::ALL {
            entries.extend(reg.of_kind(kind).filter(|e| e.plugin == i).cloned());
        }
    }
    if report.outcomes.is_empty() {
        anyhow::bail!(
            "plugins check: no plugin file in {} (plugin files end in .so, .dylib or .dll)",
            path.display()
        );
    }
    let checked = crate::check::check(&reg, &entries);
    report.outcomes.extend(checked.outcomes);
    if let Some(dir) = reference {
        let cases = crate::check::reference::cases(dir)?;
        let root = dir
            .ancestors()
            .find(|d| d.join("configs").is_dir())
            .unwrap_or(dir);
        let mut refs = crate::check::Report::default();
        crate::check::reference::check(&reg, &cases, root, &mut refs);
        let ours: std::collections::HashSet<String> = entries
            .iter()
            .map(|e| format!("model {}", e.info.name))
            .collect();
        report.outcomes.extend(
            refs.outcomes
                .into_iter()
                .filter(|o| ours.contains(&o.component)),
        );
    }
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report.json()).unwrap_or_default()
        );
    } else {
        print!("{}", report.text());
    }
    Ok(if report.passed() { 0 } else { 1 })
}

fn run(cli: Cli) -> Result<i32> {
    crate::logging::init(cli.verbose);
    crate::threads::apply_env();
    match &cli.command {
        Command::Train(t) if t.nproc_per_node.is_some() => {
            let n = t.nproc_per_node.unwrap_or(1);
            return crate::dist::launcher::launch(n, &crate::dist::launcher::rank_args());
        }
        Command::Train(t) => {
            let req = request(&t.config);
            let reg = match &t.resume {
                Some(dir) => {
                    let strictness = crate::provenance::Strictness::Resume {
                        allow_changes: t.allow_plugin_changes,
                    };
                    let reg = discover_run(&cli, Some(&req), dir, "--resume", strictness)?;
                    if t.allow_plugin_changes && !t.dry_run {
                        crate::provenance::rewrite(dir, &reg)?;
                    }
                    reg
                }
                None => {
                    let reg = discover(&cli, Some(&req))?;
                    reg.warn_load_errors();
                    reg
                }
            };
            let args = crate::train::TrainArgs {
                dry_run: t.dry_run,
                resume: t.resume.clone(),
            };
            crate::train::run(&reg, &req, &args)?;
        }
        Command::Evaluate(c) => {
            let req = request(c);
            // `--config RUN/config.yaml`: the run's recorded plugins.
            let run_dir = c
                .config
                .as_ref()
                .and_then(|f| f.parent())
                .filter(|d| d.join("env.yaml").is_file());
            let reg = match run_dir {
                Some(dir) => discover_run(
                    &cli,
                    Some(&req),
                    dir,
                    "--config",
                    crate::provenance::Strictness::Use,
                )?,
                None => {
                    let reg = discover(&cli, Some(&req))?;
                    reg.warn_load_errors();
                    reg
                }
            };
            let s = crate::evaluate::run(&reg, &req)?;
            println!(
                "loss {:.6} acc {:.6} -> {}",
                s.loss,
                s.acc,
                s.output.display()
            );
        }
        Command::LrSchedule(l) => {
            let req = request(&l.config);
            let reg = discover(&cli, Some(&req))?;
            reg.warn_load_errors();
            let args = crate::lr_schedule::Args {
                steps_per_epoch: l.steps_per_epoch,
                csv: l.csv,
                plot: l.plot.clone(),
            };
            crate::lr_schedule::run(&reg, &req, &args)?;
        }
        Command::Throughput(t) => {
            let req = request(&t.config);
            let reg = discover(&cli, Some(&req))?;
            reg.warn_load_errors();
            let args = crate::throughput::Args {
                batch_size: t.batch_size,
                steps: t.steps,
                warmup: t.warmup,
                json: t.json,
            };
            crate::throughput::run(&reg, &req, &args)?;
        }
        Command::Preview(p) => {
            let req = request(&p.config);
            let reg = discover(&cli, Some(&req))?;
            reg.warn_load_errors();
            let args = crate::preview::Args {
                output: p.output.clone(),
                count: p.count,
                scale: p.scale,
                time_steps: p.time,
            };
            crate::preview::run(&reg, &req, &args)?;
        }
        Command::Predict(p) => {
            let reg = discover_run(
                &cli,
                None,
                &p.run,
                "--run",
                crate::provenance::Strictness::Use,
            )?;
            crate::predict::print(&crate::predict::run(&reg, p)?);
        }
        Command::Plot(p) => crate::curves::run(p)?,
        Command::NewPlugin(a) => crate::new_plugin::run(a)?,
        Command::Datasets(d) => crate::datasets::commands::run(d)?,
        Command::Plugins(PluginsCmd::List { json }) => print_list(&discover(&cli, None)?, *json),
        Command::Plugins(PluginsCmd::Check {
            path,
            reference,
            json,
        }) => return plugins_check(&cli, path, reference.as_deref(), *json),
        Command::Plugins(PluginsCmd::Inspect { name, json }) => {
            let reg = discover(&cli, None)?;
            reg.warn_load_errors();
            print_inspect(&reg, name, *json)?;
        }
        Command::Env { json } => {
            let mut v = crate::envinfo::collect();
            v["plugin_search_path"] = json!(crate::registry::search_path(&cli.plugin_path));
            v["plugin_build"] = crate::envinfo::plugin_build();
            if *json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                print!("{}", crate::envinfo::to_yaml(&v));
                print!("{}", crate::envinfo::build_instructions(&v["plugin_build"]));
            }
        }
    }
    Ok(0)
}

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<crate::train::Interrupted>().is_some() => {
            tracing::warn!("{e}");
            130
        }
        Err(e) => {
            let msg = imgclf_plugin_api::error::clean_torch_message(&format!("{e:#}"));
            crate::dist::report_failure(&msg);
            eprintln!("error: {msg}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_between_and_after_the_overrides_are_options() {
        let cli = Cli::try_parse_from([
            "imgclf",
            "train",
            "a.b",
            "1",
            "--dry-run",
            "c.d",
            "-2",
            "--resume",
            "R",
            "e.f",
            "-0.5",
            "--plugin-path",
            "P",
            "--config",
            "C.yaml",
        ])
        .unwrap();
        let Command::Train(t) = &cli.command else {
            panic!("{cli:?}")
        };
        assert!(t.dry_run);
        assert_eq!(t.resume, Some(PathBuf::from("R")));
        assert_eq!(t.config.config, Some(PathBuf::from("C.yaml")));
        assert_eq!(t.config.overrides, ["a.b", "1", "c.d", "-2", "e.f", "-0.5"]);
        assert_eq!(cli.plugin_path, [PathBuf::from("P")]);
        let cli =
            Cli::try_parse_from(["imgclf", "train", "--dry-run", "--", "x", "-1e-3"]).unwrap();
        let Command::Train(t) = &cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(t.config.overrides, ["x", "-1e-3"]);
        let cli = Cli::try_parse_from([
            "imgclf",
            "lr-schedule",
            "x.y",
            "2",
            "--csv",
            "--steps-per-epoch",
            "7",
            "--plot",
            "s.png",
        ])
        .unwrap();
        let Command::LrSchedule(l) = &cli.command else {
            panic!("{cli:?}")
        };
        assert!(l.csv);
        assert_eq!(l.steps_per_epoch, Some(7));
        assert_eq!(l.plot, Some(PathBuf::from("s.png")));
        assert_eq!(l.config.overrides, ["x.y", "2"]);
        // A misspelt option is an error, not an override.
        let e = Cli::try_parse_from(["imgclf", "train", "a.b", "1", "--dry-rn"]).unwrap_err();
        assert!(e.to_string().contains("--dry-rn"), "{e}");
        let e = Cli::try_parse_from(["imgclf", "throughput", "--steps", "x"]).unwrap_err();
        assert!(e.to_string().contains("--steps"), "{e}");
    }
}
