//! Project automation (`cargo xtask <command>`): libtorch provisioning, building the host and
//! every plugin, the test suite, CI checks, the quick start, benchmarks and generated docs.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

const TORCH_VERSION: &str = "2.11.0";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The torch installation to build against and run the PyTorch side of benchmarks with.
struct Torch {
    /// `.../site-packages/torch` (LIBTORCH) and its `lib/`.
    libtorch: PathBuf,
    python: PathBuf,
}

fn cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("imgclf");
    }
    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into())).join(".cache/imgclf")
}

/// LIBTORCH or LIBTORCH_USE_PYTORCH when set; otherwise PyPI's torch==2.11.0 in a virtualenv
/// cached per user and torch version (installed on first use, reused by every clone).
fn torch() -> Result<Torch> {
    if let Some(l) = std::env::var_os("LIBTORCH") {
        // A libtorch inside a Python environment (`<env>/lib/python3.X/site-packages/torch`)
        // comes with the Python that runs the PyTorch side of tests and benchmarks.
        let beside = Path::new(&l)
            .ancestors()
            .nth(4)
            .map(|env| env.join("bin/python"))
            .filter(|p| p.exists());
        let python = std::env::var_os("IMGCLF_PYTHON")
            .map(PathBuf::from)
            .or(beside)
            .unwrap_or_else(|| "python3".into());
        return Ok(Torch {
            libtorch: PathBuf::from(l),
            python,
        });
    }
    if std::env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        let python = std::env::var_os("PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| "python3".into());
        let dir = output(Command::new(&python).args([
            "-c",
            "import torch, os; print(os.path.dirname(torch.__file__))",
        ]))?;
        return Ok(Torch {
            libtorch: PathBuf::from(dir),
            python,
        });
    }
    let venv = cache_dir()
        .join(format!("torch-{TORCH_VERSION}"))
        .join("venv");
    let python = venv.join("bin/python");
    let probe = |python: &Path| {
        output(Command::new(python).args([
            "-c",
            "import torch, os, numpy; assert torch.__version__.split('+')[0] == '2.11.0', torch.__version__; print(os.path.dirname(torch.__file__))",
        ]))
    };
    if let Ok(dir) = probe(&python) {
        return Ok(Torch {
            libtorch: PathBuf::from(dir),
            python,
        });
    }
    eprintln!(
        "xtask: installing torch=={TORCH_VERSION} from PyPI into {} (once per machine, ~5 GB)",
        venv.display()
    );
    std::fs::create_dir_all(venv.parent().unwrap())?;
    if !python.exists() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg(format!("torch=={TORCH_VERSION}"))
        .arg("numpy"))?;
    let dir = probe(&python)?;
    Ok(Torch {
        libtorch: PathBuf::from(dir),
        python,
    })
}

fn cargo(t: &Torch) -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root())
        .env("LIBTORCH", &t.libtorch)
        .env("IMGCLF_C10D_NCCL", nccl_build_mode(t))
        .env_remove("LIBTORCH_USE_PYTORCH");
    c.env("LD_LIBRARY_PATH", ld_path(t));
    c
}

/// How host/build.rs builds ProcessGroupNCCL into the c10d shim: against the CUDA wheel's own
/// `nccl.h` (nvidia-nccl-cu13, a torch dependency), which also needs the CUDA 13.0 `crt/` and
/// CCCL headers: PyPI's nvidia-cuda-crt and nvidia-cuda-cccl, installed once into the venv here.
/// With a CUDA wheel the build then `require`s NCCL, so CI always compiles and links it.
fn nccl_build_mode(t: &Torch) -> &'static str {
    let Some(nvidia) = t.libtorch.parent().map(|site| site.join("nvidia")) else {
        return "auto";
    };
    if !nvidia.join("nccl/include/nccl.h").exists() {
        return "auto";
    }
    let include = nvidia.join("cu13/include");
    if !(include.join("crt/host_defines.h").exists()
        && include.join("cccl/cuda/std/version").exists())
    {
        eprintln!(
            "xtask: installing the CUDA 13.0 crt and CCCL headers (ProcessGroupNCCL's build) into {}",
            t.python.display()
        );
        let installed = run(Command::new(&t.python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "nvidia-cuda-crt==13.0.*",
            "nvidia-cuda-cccl==13.0.*",
        ]));
        if let Err(e) = installed {
            eprintln!("xtask: {e:#}; building the c10d shim without NCCL");
            return "auto";
        }
    }
    "require"
}

fn ld_path(t: &Torch) -> std::ffi::OsString {
    let mut paths = vec![t.libtorch.join("lib")];
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        paths.extend(std::env::split_paths(&old));
    }
    std::env::join_paths(paths).unwrap_or_default()
}

/// Names of the crate directories directly under `dir` (relative to the workspace), sorted.
fn crates_in(dir: &str) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(root().join(dir))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("Cargo.toml").exists())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    Ok(names)
}

/// The plugin crates (one per paper, under plugins/).
fn plugin_crates() -> Result<Vec<String>> {
    crates_in("plugins")
}

/// The deliberately broken plugins the tests load (under tests/fixtures/).
fn fixture_crates() -> Result<Vec<String>> {
    crates_in("tests/fixtures")
}

fn lib_name(krate: &str) -> String {
    format!("lib{}.so", krate.replace('-', "_"))
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    let tmp = to.with_extension("so.tmp");
    std::fs::copy(from, &tmp).with_context(|| format!("cannot copy {}", from.display()))?;
    std::fs::rename(&tmp, to)?;
    Ok(())
}

/// Builds the host and every plugin (and, for tests, the fixture plugins), then lays the
/// plugins out beside the binary in `<profile>/plugins/`.
fn build(t: &Torch, release: bool, fixtures: bool) -> Result<PathBuf> {
    let mut c = cargo(t);
    c.args(["build", "--package", "imgclf"]);
    for p in plugin_crates()? {
        c.args(["--package", &format!("imgclf-plugin-{p}")]);
    }
    if fixtures {
        for f in fixture_crates()? {
            c.args([
                "--package",
                &format!("imgclf-fixture-{}", f.replace('_', "-")),
            ]);
        }
    }
    if release {
        c.arg("--release");
    }
    run(&mut c)?;
    let profile = target_dir().join(if release { "release" } else { "debug" });
    let plugins = profile.join("plugins");
    std::fs::create_dir_all(&plugins)?;
    for p in plugin_crates()? {
        let name = lib_name(&format!("imgclf-plugin-{p}"));
        copy(&profile.join(&name), &plugins.join(&name))?;
    }
    if fixtures {
        for f in fixture_crates()? {
            let dir = profile.join("fixture-plugins").join(&f);
            std::fs::create_dir_all(&dir)?;
            let name = lib_name(&format!("imgclf-fixture-{}", f.replace('_', "-")));
            copy(&profile.join(&name), &dir.join(&name))?;
        }
    }
    Ok(profile)
}

const FASHION_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Debian's `dataset-fashion-mnist` (the real IDX files), installed when missing.
fn ensure_fashion_mnist() -> Result<()> {
    if Path::new(FASHION_DIR)
        .join("train-images-idx3-ubyte.gz")
        .exists()
    {
        return Ok(());
    }
    eprintln!(
        "xtask: installing Debian's dataset-fashion-mnist (real Fashion-MNIST) into {FASHION_DIR}"
    );
    let sudo = output(Command::new("id").arg("-u"))
        .map(|u| u != "0")
        .unwrap_or(true);
    let apt = |args: &[&str]| {
        let mut c = if sudo {
            Command::new("sudo")
        } else {
            Command::new("apt-get")
        };
        if sudo {
            c.arg("apt-get");
        }
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        run(&mut c)
    };
    if apt(&["install", "-y", "-q", "dataset-fashion-mnist"]).is_err() {
        apt(&["update", "-q"])?;
        apt(&["install", "-y", "-q", "dataset-fashion-mnist"])?;
    }
    Ok(())
}

fn dist(t: &Torch) -> Result<PathBuf> {
    let profile = build(t, true, false)?;
    let dist = target_dir().join("dist");
    let bin = dist.join("bin");
    let plugins = dist.join("lib/imgclf/plugins");
    std::fs::create_dir_all(&bin)?;
    if plugins.exists() {
        std::fs::remove_dir_all(&plugins)?;
    }
    std::fs::create_dir_all(&plugins)?;
    copy(&profile.join("imgclf"), &bin.join("imgclf"))?;
    for p in plugin_crates()? {
        let name = lib_name(&format!("imgclf-plugin-{p}"));
        copy(&profile.join(&name), &plugins.join(&name))?;
    }
    eprintln!(
        "xtask: {} and {} plugin(s) in {}",
        bin.join("imgclf").display(),
        plugin_crates()?.len(),
        plugins.display()
    );
    Ok(dist)
}

/// Python packages the tests use beside torch and numpy, installed into the test Python when
/// missing: `tensorboard` (its event reader checks the event files imgclf writes),
/// `torchvision` (its ImageFolder order and transforms are what image folders must match).
const TEST_PYTHON_PACKAGES: &[(&str, &str)] =
    &[("tensorboard", "tensorboard"), ("torchvision", TORCHVISION)];

fn ensure_test_python_packages(t: &Torch) -> Result<()> {
    for (module, package) in TEST_PYTHON_PACKAGES {
        let probe = Command::new(&t.python)
            .args(["-c", &format!("import {module}")])
            .output();
        if probe.is_ok_and(|o| o.status.success()) {
            continue;
        }
        eprintln!(
            "xtask: installing {package} from PyPI for {}",
            t.python.display()
        );
        // A Python that pip may not change still runs every other test.
        if let Err(e) = run(Command::new(&t.python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            package,
        ])) {
            eprintln!("xtask: warning: {e:#}; the tests that need {package} will fail");
        }
    }
    Ok(())
}

fn test(t: &Torch, extra: &[String]) -> Result<()> {
    ensure_fashion_mnist()?;
    ensure_test_python_packages(t)?;
    let profile = build(t, false, true)?;
    let mut c = cargo(t);
    // Every test binary runs even when an earlier one fails; the summary lists them all.
    c.args([
        "test",
        "--no-fail-fast",
        "--workspace",
        "--exclude",
        "xtask",
    ])
    .env("IMGCLF_BIN", profile.join("imgclf"))
    .env("IMGCLF_PLUGIN_DIR", profile.join("plugins"))
    .env("IMGCLF_FIXTURE_DIR", profile.join("fixture-plugins"))
    .env("IMGCLF_PYTHON", &t.python)
    .env("IMGCLF_QUIET_PLUGIN_PANICS", "1")
    .args(extra);
    run_tests(c)
}

/// Runs `cargo test`, passing its output through, and ends with a summary of every failing test
/// binary and test (an error when there is any).
fn run_tests(mut cmd: Command) -> Result<()> {
    use std::io::{BufRead, Write};
    eprintln!("xtask: {cmd:?}");
    // One pipe for stdout and stderr keeps cargo's "Running" lines in order with the tests.
    let (reader, writer) = std::io::pipe().context("cannot create a pipe")?;
    cmd.stdout(writer.try_clone()?).stderr(writer);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    // `cmd` holds the pipe's write ends: without dropping it, reading would never end.
    drop(cmd);
    let mut summary = TestSummary::default();
    let mut out = std::io::stdout();
    for line in std::io::BufReader::new(reader).split(b'\n') {
        let line = line.context("reading cargo test's output")?;
        out.write_all(&line)?;
        out.write_all(b"\n")?;
        summary.line(&String::from_utf8_lossy(&line));
    }
    let status = child.wait()?;
    match summary.report() {
        None if status.success() => Ok(()),
        report => {
            eprintln!(
                "\nxtask: cargo test failed ({status})\n{}",
                report
                    .unwrap_or_else(|| "  no failing test or binary named in its output\n".into())
            );
            bail!("the test suite failed")
        }
    }
}

/// A test binary that failed: cargo's name for it, how to rerun it, its failing tests.
#[derive(Debug, Default, PartialEq)]
struct FailedBinary {
    binary: String,
    rerun: Option<String>,
    tests: Vec<String>,
}

/// Failing tests and test binaries, read line by line from `cargo test --no-fail-fast` output.
#[derive(Default)]
struct TestSummary {
    /// The binary running now (from cargo's `Running tests/cli.rs (...)` line).
    current: String,
    failed: Vec<FailedBinary>,
}

impl TestSummary {
    fn entry(&mut self) -> &mut FailedBinary {
        if self.failed.last().is_none_or(|f| f.binary != self.current) {
            self.failed.push(FailedBinary {
                binary: self.current.clone(),
                ..Default::default()
            });
        }
        self.failed.last_mut().expect("just pushed")
    }

    fn line(&mut self, line: &str) {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix("Running ") {
            self.current = rest.split(" (").next().unwrap_or(rest).to_string();
        } else if let Some(rest) = l.strip_prefix("Doc-tests ") {
            self.current = format!("doc-tests {rest}");
        } else if let Some(name) = l
            .strip_prefix("test ")
            .and_then(|r| r.strip_suffix(" ... FAILED"))
        {
            self.entry().tests.push(name.to_string());
        } else if let Some(rest) = l.split("to rerun pass `").nth(1) {
            // Printed right after the binary that failed, crashed ones included.
            let rerun = rest.split('`').next().unwrap_or(rest).to_string();
            self.entry().rerun = Some(rerun);
        }
    }

    fn report(&self) -> Option<String> {
        if self.failed.is_empty() {
            return None;
        }
        let n: usize = self.failed.iter().map(|f| f.tests.len()).sum();
        let mut text = format!(
            "xtask: {n} failing test(s) in {} test binar{}:\n",
            self.failed.len(),
            if self.failed.len() == 1 { "y" } else { "ies" }
        );
        for f in &self.failed {
            let rerun = f
                .rerun
                .as_ref()
                .map(|r| format!(" (rerun: cargo xtask test {r})"))
                .unwrap_or_default();
            text += &format!("  {}{rerun}\n", f.binary);
            if f.tests.is_empty() {
                text += "    no test reported FAILED: the binary crashed or aborted (see its output above)\n";
            }
            for t in &f.tests {
                text += &format!("    {t}\n");
            }
        }
        Some(text)
    }
}

fn lint(t: &Torch) -> Result<()> {
    run(cargo(t).args(["fmt", "--all", "--check"]))?;
    run(cargo(t).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    docs(t, true)
}

/// The plugin table of the README, generated from `imgclf plugins list --json`.
fn docs(t: &Torch, check: bool) -> Result<()> {
    let profile = build(t, false, false)?;
    let json = output(Command::new(profile.join("imgclf")).args(["plugins", "list", "--json"]))?;
    let v: serde_json::Value = serde_json::from_str(&json)?;
    let mut table = String::from(
        "| plugin | component | kind | paper | description |\n|---|---|---|---|---|\n",
    );
    for p in v["plugins"].as_array().into_iter().flatten() {
        for c in p["components"].as_array().into_iter().flatten() {
            let papers: Vec<String> = c["papers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a.as_str())
                .map(|a| format!("[arXiv:{a}](https://arxiv.org/abs/{a})"))
                .collect();
            table += &format!(
                "| `{}` | `{}` | {} | {} | {} |\n",
                p["name"].as_str().unwrap_or(""),
                c["name"].as_str().unwrap_or(""),
                c["kind"].as_str().unwrap_or(""),
                papers.join(", "),
                c["description"].as_str().unwrap_or("")
            );
        }
    }
    let readme_path = root().join("README.md");
    let readme = std::fs::read_to_string(&readme_path)?;
    let (begin, end) = ("<!-- plugins:begin -->\n", "<!-- plugins:end -->");
    let (Some(b), Some(e)) = (readme.find(begin), readme.find(end)) else {
        bail!("README.md lacks the {begin:?} ... {end:?} markers");
    };
    let updated = format!("{}{begin}{table}{}", &readme[..b], &readme[e..]);
    if check {
        if updated != readme {
            bail!("README.md's plugin table is out of date: run `cargo xtask docs`");
        }
        eprintln!("xtask: README plugin table is up to date");
    } else {
        std::fs::write(&readme_path, updated)?;
    }
    Ok(())
}

fn quickstart(t: &Torch, extra: &[String]) -> Result<()> {
    ensure_fashion_mnist()?;
    let dist = dist(t)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let out = format!("experiments/quickstart/{stamp}");
    let mut c = Command::new(dist.join("bin/imgclf"));
    c.current_dir(root())
        .args([
            "train",
            "--plugin",
            "resnet_preact",
            "--config",
            "configs/fashion_mnist/resnet_preact.yaml",
            "train.output_dir",
            &out,
        ])
        .args(extra);
    run(&mut c)?;
    eprintln!("xtask: outputs in {out}/ (config.yaml, env.yaml, log.txt, metrics.jsonl, checkpoints, model_final.safetensors)");
    Ok(())
}

/// torchvision built for the venv's torch, installed into the venv on first use (torch 2.11
/// pairs with torchvision 0.26.0; pip keeps the installed torch since 0.26.0 requires it).
const TORCHVISION: &str = "torchvision==0.26.0";

fn ensure_torchvision(t: &Torch) -> Result<()> {
    let version = |py: &Path| {
        output(Command::new(py).args(["-c", "import torchvision; print(torchvision.__version__)"]))
    };
    if let Ok(v) = version(&t.python) {
        if v.trim().starts_with("0.26.") {
            return Ok(());
        }
        bail!("the bench venv has torchvision {v}, but its torch 2.11 needs {TORCHVISION}; run `{} -m pip install {TORCHVISION}`", t.python.display());
    }
    eprintln!(
        "xtask: installing {TORCHVISION} into {}",
        t.python.display()
    );
    run(Command::new(&t.python).args(["-m", "pip", "install", "--quiet", TORCHVISION]))?;
    let torch =
        output(Command::new(&t.python).args(["-c", "import torch; print(torch.__version__)"]))?;
    if !torch.trim().starts_with("2.11.") {
        bail!(
            "installing {TORCHVISION} changed the venv's torch to {torch}; reinstall torch 2.11.0"
        );
    }
    Ok(())
}

fn bench(t: &Torch, extra: &[String]) -> Result<()> {
    // `bench models ...`: per-architecture forward/backward throughput (no data needed).
    // `bench pipeline ...`: the input pipeline (crop, flip, normalise, cutout, mixup) against
    // torchvision transforms + DataLoader collate; then the loader with per-image RandAugment
    // and TrivialAugment against torchvision's in a DataLoader with the same num_workers.
    // `bench fashion-mnist ...`: ResNet-preact-20 training on real Fashion-MNIST against eager.
    // `bench [--device D] ...`: the training step (ResNet-preact-20 and WRN-28-10, batch 128,
    // float32 and mixed precision) against PyTorch's best eager recipe.
    let (script, extra) = match extra.first().map(String::as_str) {
        Some("models") => ("xtask/bench/models.py", &extra[1..]),
        Some("dist") => ("xtask/bench/dist.py", &extra[1..]),
        Some("fashion-mnist") => ("xtask/bench/bench.py", &extra[1..]),
        Some("pipeline") => {
            ensure_torchvision(t)?;
            ("xtask/bench/pipeline.py", &extra[1..])
        }
        // `bench loader ...`: image-folder decoding (JPEG, random-resized crop, flip,
        // normalise) against torchvision's ImageFolder + DataLoader.
        Some("loader") => {
            ensure_torchvision(t)?;
            ("xtask/bench/loader.py", &extra[1..])
        }
        _ => ("xtask/bench/step.py", extra),
    };
    ensure_fashion_mnist()?;
    let dist = dist(t)?;
    run(Command::new(&t.python)
        .arg(root().join(script))
        .arg("--imgclf")
        .arg(dist.join("bin/imgclf"))
        .arg("--root")
        .arg(root())
        .args(extra)
        .env("LD_LIBRARY_PATH", ld_path(t)))
}

/// The cargo-fuzz targets (`fuzz/fuzz_targets/<name>.rs`), one per parser of untrusted input,
/// with the folders of real files that seed each corpus.
const FUZZ_TARGETS: [(&str, &[&str]); 5] = [
    ("pickle", &["tests/data/cifar_pickle"]),
    ("torch_file", &["tests/data/torch_save"]),
    ("cifar", &[]),
    ("idx", &[]),
    (
        "config_yaml",
        &[
            "configs/cifar",
            "configs/fashion_mnist",
            "configs/imagenet",
            "configs/augmentations",
            "configs/datasets",
        ],
    ),
];

/// `cargo xtask fuzz [--seconds N] [TARGET]...`: builds the fuzz targets (cargo-fuzz, installed
/// when missing; `RUSTC_BOOTSTRAP=1` because it passes nightly flags, no sanitizer) and runs
/// each for N seconds (default 25), starting from the seed files. A crash fails the command and
/// leaves the input in `fuzz/artifacts/<target>/`.
fn fuzz(t: &Torch, args: &[String]) -> Result<()> {
    let mut seconds = 25u64;
    let mut only = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                seconds = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .context("--seconds needs a whole number")?
            }
            name if FUZZ_TARGETS.iter().any(|(n, _)| *n == name) => only.push(name.to_string()),
            other => bail!(
                "unknown fuzz target `{other}` (targets: {})",
                FUZZ_TARGETS.map(|(n, _)| n).join(", ")
            ),
        }
    }
    let has_cargo_fuzz = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_cargo_fuzz {
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let fuzz = |args: &[&str]| {
        let mut c = cargo(t);
        c.env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz"])
            .args(args)
            .args(["--sanitizer", "none"]);
        c
    };
    run(&mut fuzz(&["build"]))?;
    let corpora = target_dir().join("fuzz-corpus");
    for (name, seeds) in FUZZ_TARGETS {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        let corpus = corpora.join(name);
        std::fs::create_dir_all(&corpus)?;
        seed_corpus(name, &corpus)?;
        let mut c = fuzz(&["run", name]);
        c.arg(&corpus);
        for s in seeds {
            c.arg(root().join(s));
        }
        c.args([
            "--",
            &format!("-max_total_time={seconds}"),
            "-rss_limit_mb=4096",
            "-timeout=20",
            "-print_final_stats=1",
        ]);
        run(&mut c)?;
    }
    Ok(())
}

/// Seed inputs that need a prefix a target reads first (the dataset loaders' selector bytes).
fn seed_corpus(name: &str, corpus: &Path) -> Result<()> {
    let pickles = root().join("tests/data/cifar_pickle");
    match name {
        "cifar" => {
            // Byte 0 picks the release: 1 CIFAR-10 python, 3 CIFAR-100 python, 0/2 binary.
            for (pick, prefix) in [(1u8, "cifar10_"), (3, "cifar100_")] {
                for e in std::fs::read_dir(&pickles)? {
                    let path = e?.path();
                    let file = path.file_name().unwrap_or_default().to_string_lossy();
                    if file.starts_with(prefix) && file.ends_with(".pkl") {
                        let mut bytes = vec![pick];
                        bytes.extend(std::fs::read(&path)?);
                        std::fs::write(corpus.join(format!("seed-{file}")), bytes)?;
                    }
                }
            }
            let mut record = vec![0u8];
            record.extend(std::iter::repeat_n(7u8, 3073));
            std::fs::write(corpus.join("seed-cifar10-binary"), record)?;
        }
        "idx" => {
            // Two images of 2x2 and their labels: split at the images file's length.
            let images: Vec<u8> = [0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2]
                .into_iter()
                .chain([1, 2, 3, 4, 5, 6, 7, 8])
                .collect();
            let labels = [0u8, 0, 8, 1, 0, 0, 0, 2, 3, 9];
            let mut bytes = (images.len() as u16).to_le_bytes().to_vec();
            bytes.push(0);
            bytes.extend(&images);
            bytes.extend(labels);
            std::fs::write(corpus.join("seed-idx"), bytes)?;
        }
        _ => {}
    }
    Ok(())
}

/// What CI runs for the plugin kit: `imgclf new-plugin` writes the template of every kind into
/// a temporary folder (out of tree), `cargo test` and `cargo build` it there against this
/// checkout's plugin-api with CARGO_TARGET_DIR set to the workspace's target dir (so torch-sys
/// and the other dependencies are reused, not rebuilt), and `imgclf plugins check` checks the
/// built plugin file.
fn template_check(t: &Torch) -> Result<()> {
    let profile = build(t, false, false)?;
    let imgclf = profile.join("imgclf");
    let tmp = std::env::temp_dir().join(format!("imgclf-template-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    for kind in ["model", "augmentation", "optimizer", "scheduler"] {
        let name = format!("template_{kind}");
        let dir = tmp.join(&name);
        eprintln!("xtask: template-check: {kind} in {}", dir.display());
        run(Command::new(&imgclf)
            .args(["new-plugin", &name, "--kind", kind, "--dir"])
            .arg(&dir)
            .env("LD_LIBRARY_PATH", ld_path(t)))?;
        for step in ["test", "build"] {
            let mut c = cargo(t);
            c.current_dir(&dir)
                .env("CARGO_TARGET_DIR", target_dir())
                .arg(step);
            run(&mut c)?;
        }
        run(Command::new(&imgclf)
            .args(["plugins", "check"])
            .arg(profile.join(lib_name(&format!("imgclf-plugin-{name}"))))
            .env("LD_LIBRARY_PATH", ld_path(t))
            .env_remove("IMGCLF_PLUGIN_PATH"))?;
    }
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!(
        "xtask: template-check: every template builds, passes its tests and `imgclf plugins check`"
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = args
        .split_first()
        .map(|(c, r)| (c.as_str(), r.to_vec()))
        .unwrap_or(("help", vec![]));
    match cmd {
        "build" => {
            let t = torch()?;
            build(&t, rest.iter().any(|a| a == "--release"), true)?;
        }
        "dist" => {
            dist(&torch()?)?;
        }
        "test" => test(&torch()?, &rest)?,
        "template-check" => template_check(&torch()?)?,
        "ci" => {
            let t = torch()?;
            test(&t, &[])?;
            template_check(&t)?;
            lint(&t)?;
            fuzz(&t, &[])?;
        }
        "lint" => lint(&torch()?)?,
        "fuzz" => fuzz(&torch()?, &rest)?,
        "docs" => docs(&torch()?, rest.iter().any(|a| a == "--check"))?,
        "quickstart" => quickstart(&torch()?, &rest)?,
        "bench" => bench(&torch()?, &rest)?,
        "libtorch" => println!("{}", torch()?.libtorch.display()),
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\
                 \x20 quickstart [KEY VALUE]...  build everything, train ResNet-preact-20 on Fashion-MNIST for one epoch\n\
                 \x20 test [cargo test args]     build everything (and the fixture plugins) and run the whole test suite\n\
                 \x20 ci                         what CI runs: test, lint, then fuzz\n\
                 \x20 fuzz [--seconds N] [T]...  run every fuzz target (fuzz/, cargo-fuzz) N seconds (default 25)\n\
                 \x20 template-check             build every `imgclf new-plugin` template out of tree (shared target dir), cargo test it, `imgclf plugins check` it\n\
                 \x20 lint                       fmt check, clippy -D warnings, README plugin table check\n\
                 \x20 dist                       release build into target/dist/{{bin,lib/imgclf/plugins}}\n\
                 \x20 build [--release]          build host, plugins and fixtures into target/<profile>/\n\
                 \x20 bench [--device cpu|cuda]  training step (ResNet-preact-20, WRN-28-10; float32, mixed) vs PyTorch's best eager recipe\n\
                 \x20 bench fashion-mnist [--steps N] ResNet-preact-20 on Fashion-MNIST vs PyTorch eager, same machine, same run\n\
                 \x20 bench models [--device D]  forward/backward throughput of every architecture vs PyTorch eager\n\
                 \x20 bench dist [--steps N]     data-parallel images/s on 1 and 2 ranks (Gloo) vs PyTorch DDP under torchrun\n\
                 \x20 bench pipeline [--device D] input pipeline (crop, flip, normalise, cutout, mixup; RandAugment, TrivialAugment in the loader) images/s vs torchvision\n\
                 \x20 bench loader [--workers W..] image-folder JPEG loading (decode, random-resized crop, flip, normalise) vs torchvision\n\
                 \x20 docs [--check]             regenerate (or check) the README's plugin table\n\
                 \x20 libtorch                   print the libtorch directory in use (installs it if needed)"
            );
            if cmd != "help" {
                bail!("unknown xtask command `{cmd}`");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_lists_every_failing_binary_and_test() {
        let mut s = TestSummary::default();
        for l in [
            "     Running unittests src/lib.rs (target/debug/deps/imgclf-1)",
            "test config::ok ... ok",
            "     Running tests/cli.rs (target/debug/deps/cli-2)",
            "test a_b ... FAILED",
            "test c_d ... FAILED",
            "error: test failed, to rerun pass `--test cli`",
            "     Running tests/optimizers.rs (target/debug/deps/optimizers-3)",
            "error: test failed, to rerun pass `--test optimizers`",
            "     Running tests/training.rs (target/debug/deps/training-4)",
            "test e ... ok",
        ] {
            s.line(l);
        }
        assert_eq!(
            s.failed,
            [
                FailedBinary {
                    binary: "tests/cli.rs".into(),
                    rerun: Some("--test cli".into()),
                    tests: vec!["a_b".into(), "c_d".into()],
                },
                FailedBinary {
                    binary: "tests/optimizers.rs".into(),
                    rerun: Some("--test optimizers".into()),
                    tests: vec![],
                },
            ]
        );
        let r = s.report().unwrap();
        assert!(r.contains("2 failing test(s) in 2 test binaries"), "{r}");
        assert!(r.contains("crashed"), "{r}");
        assert!(TestSummary::default().report().is_none());
    }
}
