//! Compiles the C++ shim (`cpp/*.cpp`: autocast state, GradScaler ops, multi-tensor optimizer
//! kernels) against the headers of the libtorch `tch` links (`LIBTORCH`, which `cargo xtask`
//! always sets, or `LIBTORCH_INCLUDE`, or the Python torch with `LIBTORCH_USE_PYTORCH`).

use std::path::PathBuf;

fn env_rerun(name: &str) -> Option<String> {
    println!("cargo:rerun-if-env-changed={name}");
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// libtorch's root (`.../site-packages/torch` for the wheel).
fn libtorch_root() -> PathBuf {
    let root = env_rerun("LIBTORCH_INCLUDE")
        .or_else(|| env_rerun("LIBTORCH"))
        .or_else(|| {
            env_rerun("LIBTORCH_USE_PYTORCH")?;
            let out = std::process::Command::new("python3")
                .args(["-c", "import torch, os; print(os.path.dirname(torch.__file__))"])
                .output()
                .ok()?;
            Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        })
        .or_else(|| {
            // torch-sys's own choice, when this crate is built after it.
            let lib = env_rerun("DEP_TCH_LIBTORCH_LIB")?;
            Some(PathBuf::from(lib).parent()?.display().to_string())
        })
        .unwrap_or_else(|| {
            panic!("imgclf-plugin-api build: set LIBTORCH (cargo xtask build does) so the shim finds libtorch's headers")
        });
    PathBuf::from(root)
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let cpp_dir = manifest.join("cpp");
    println!("cargo:rerun-if-changed={}", cpp_dir.display());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&cpp_dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "cpp" || x == "h"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let sources: Vec<&PathBuf> = files
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == "cpp"))
        .collect();
    if sources.is_empty() {
        return;
    }
    let libtorch = libtorch_root();
    let abi = env_rerun("LIBTORCH_CXX11_ABI").unwrap_or_else(|| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&cpp_dir)
        .include(libtorch.join("include"))
        .include(libtorch.join("include/torch/csrc/api/include"))
        // The fused kernels' loops (bn_relu_kernels.h) are vectorised at -O3 whatever the
        // profile; no contraction into FMA, so a value computed twice (ReLU's mask, forward and
        // backward) is the same both times.
        .opt_level(3)
        .flag("-ffp-contract=off")
        // at::parallel_for is a header template over OpenMP's `parallel` pragma: without
        // -fopenmp the fused kernels would run on one thread.
        .flag("-fopenmp")
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .files(sources)
        .compile("imgclf_plugin_api_shim");
    println!(
        "cargo:rustc-link-search=native={}",
        libtorch.join("lib").display()
    );
    // GOMP_parallel for those pragmas. The soname is libgomp.so.1, libtorch's own OpenMP
    // runtime (torch/lib/libgomp.so.1, loaded with libtorch_cpu): one runtime, one thread team,
    // sized by torch's set_num_threads.
    println!("cargo:rustc-link-lib=gomp");
}
