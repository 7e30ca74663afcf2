//! Records the libtorch version this crate is compiled against, read from the headers of the
//! libtorch the build uses: `IMGCLF_LIBTORCH_BUILD_VERSION` (e.g. `2.11.0`, or `unknown`) and
//! `IMGCLF_LIBTORCH_BUILD_ORIGIN` (the file it was read from).
//!
//! The libtorch is the one torch-sys found: its library directory arrives as
//! `DEP_TCH_LIBTORCH_LIB` (torch-sys has `links = "tch"`), the headers sit in `../include`
//! beside it. torch-sys's own overrides, `LIBTORCH_INCLUDE` and `LIBTORCH`, are tried first.

use std::path::{Path, PathBuf};

/// Where the version `#define`s live, newest header layout first.
const HEADERS: [&str; 2] = [
    "include/torch/headeronly/version.h",
    "include/torch/csrc/api/include/torch/version.h",
];

fn roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    for var in ["LIBTORCH_INCLUDE", "LIBTORCH"] {
        println!("cargo:rerun-if-env-changed={var}");
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            roots.push(PathBuf::from(v));
        }
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") {
        if let Some(parent) = Path::new(&lib).parent() {
            roots.push(parent.to_path_buf());
        }
    }
    roots
}

/// The integer value of `#define NAME value`.
fn define(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("#define")?.trim_start();
        let value = rest.strip_prefix(name)?;
        if !value.starts_with(char::is_whitespace) {
            return None;
        }
        value.trim().parse().ok()
    })
}

/// `major.minor.patch` from a version header that defines all three.
fn version_from_header(text: &str) -> Option<String> {
    let major = define(text, "TORCH_VERSION_MAJOR")?;
    let minor = define(text, "TORCH_VERSION_MINOR")?;
    let patch = define(text, "TORCH_VERSION_PATCH")?;
    Some(format!("{major}.{minor}.{patch}"))
}

fn find() -> Option<(String, PathBuf)> {
    for root in roots() {
        for h in HEADERS {
            let path = root.join(h);
            println!("cargo:rerun-if-changed={}", path.display());
            if let Some(v) = std::fs::read_to_string(&path)
                .ok()
                .as_deref()
                .and_then(version_from_header)
            {
                return Some((v, path));
            }
        }
        // A libtorch zip without the headers above still has its `build-version`.
        let path = root.join("build-version");
        if let Ok(text) = std::fs::read_to_string(&path) {
            let v = text.trim().split('+').next().unwrap_or("").to_string();
            if !v.is_empty() {
                return Some((v, path));
            }
        }
    }
    None
}

fn main() {
    let (version, origin) = match find() {
        Some((v, p)) => (v, p.display().to_string()),
        None => {
            println!(
                "cargo:warning=imgclf-plugin-api-build-info: no libtorch version header found; \
                 plugins built now record libtorch `unknown`, which every imgclf refuses"
            );
            ("unknown".to_string(), String::new())
        }
    };
    println!("cargo:rustc-env=IMGCLF_LIBTORCH_BUILD_VERSION={version}");
    println!("cargo:rustc-env=IMGCLF_LIBTORCH_BUILD_ORIGIN={origin}");
}
