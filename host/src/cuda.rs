//! Makes CUDA usable: a binary linked with `tch` does not load `libtorch_cuda.so` (the linker's
//! `--as-needed` drops it), so libtorch's CUDA kernels would never register. We `dlopen` it
//! ourselves, optionally (a CPU-only machine simply lacks it), before anything queries CUDA.

use std::path::PathBuf;

/// Directory of the `libtorch_cpu.so` this process mapped, from `/proc/self/maps`.
fn libtorch_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .and_then(|p| PathBuf::from(p).parent().map(PathBuf::from))
}

/// Loads `libtorch_cuda.so` if it exists next to `libtorch_cpu.so` (or on the loader's search
/// path). Must run first in `main`. Returns what happened, for `imgclf env`. `IMGCLF_NO_CUDA=1`
/// skips it (CPU only: faster start, less memory).
pub fn preload() -> String {
    if std::env::var_os("IMGCLF_NO_CUDA").is_some_and(|v| !v.is_empty() && v != "0") {
        return "not loaded (IMGCLF_NO_CUDA is set)".into();
    }
    let mut candidates: Vec<PathBuf> = libtorch_dir()
        .into_iter()
        .map(|d| d.join("libtorch_cuda.so"))
        .collect();
    candidates.push(PathBuf::from("libtorch_cuda.so"));
    let mut last_err = String::new();
    for c in candidates {
        if c.is_absolute() && !c.exists() {
            continue;
        }
        // SAFETY: loading libtorch's own CUDA library runs its static initialisers, which only
        // register kernels with the dispatcher; the handle is kept for the process lifetime.
        match unsafe {
            libloading::os::unix::Library::open(
                Some(&c),
                libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
            )
        } {
            Ok(lib) => {
                std::mem::forget(lib);
                return format!("loaded {}", c.display());
            }
            Err(e) => last_err = e.to_string(),
        }
    }
    if last_err.is_empty() {
        "libtorch_cuda.so not present (CPU-only libtorch)".into()
    } else {
        format!("libtorch_cuda.so not loaded: {last_err}")
    }
}

static STATUS: std::sync::OnceLock<String> = std::sync::OnceLock::new();

pub fn init() {
    STATUS.get_or_init(preload);
}

pub fn status() -> &'static str {
    STATUS.get().map(String::as_str).unwrap_or("not attempted")
}
