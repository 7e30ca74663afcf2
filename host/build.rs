//! Gives the `imgclf` binary (and the host's test binaries) a RUNPATH to the libtorch it was
//! built against, so it runs from anywhere without LD_LIBRARY_PATH (which still overrides it),
//! and compiles the c10d shim (`cpp/c10d.cpp`, see `src/dist/`) against the same libtorch.
//!
//! The shim needs libtorch's headers (`LIBTORCH`, which `cargo xtask` always sets, or
//! `LIBTORCH_INCLUDE`), Gloo's headers (the torch wheel ships none: Debian's `libgloo-dev` in
//! `/usr/include`, or `IMGCLF_GLOO_INCLUDE`) and, for ProcessGroupNCCL, the `nccl.h` and CUDA
//! headers of the wheel's own pins (`nvidia-nccl-cu13`, `nvidia-cuda-runtime`, `nvidia-cuda-crt`,
//! `nvidia-cuda-cccl` in the same site-packages; `cargo xtask` installs the last two).
//! `IMGCLF_C10D_NCCL`: `auto` (default: NCCL when those headers and `libtorch_cuda.so` are there),
//! `require` (fail without them; what `cargo xtask` sets, so CI always compiles and links NCCL)
//! or `off`.

use std::path::{Path, PathBuf};

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
        .unwrap_or_else(|| {
            panic!("imgclf build: set LIBTORCH (cargo xtask build does) so the c10d shim finds libtorch's headers")
        });
    PathBuf::from(root)
}

fn gloo_include() -> PathBuf {
    let dir = env_rerun("IMGCLF_GLOO_INCLUDE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/include"));
    let probe = dir.join("gloo/rendezvous/store.h");
    println!("cargo:rerun-if-changed={}", probe.display());
    if !probe.exists() {
        panic!(
            "imgclf build: no Gloo headers at {} (the torch wheel ships none; ProcessGroupGloo needs them): \
             install Debian's libgloo-dev (`apt-get install libgloo-dev`, which .ci/run does) or set \
             IMGCLF_GLOO_INCLUDE to a directory holding gloo/",
            probe.display()
        );
    }
    dir
}

/// The NCCL/CUDA include directories of the wheel's pins, when all are there.
fn nccl_includes(libtorch: &Path) -> Result<Vec<PathBuf>, String> {
    let site = libtorch
        .parent()
        .ok_or("LIBTORCH has no parent directory")?;
    let nvidia = site.join("nvidia");
    let dirs = vec![
        nvidia.join("nccl/include"),
        nvidia.join("cu13/include"),
        nvidia.join("cu13/include/cccl"),
    ];
    let needed = [
        (dirs[0].join("nccl.h"), "nvidia-nccl-cu13"),
        (dirs[1].join("cuda_runtime_api.h"), "nvidia-cuda-runtime"),
        (dirs[1].join("crt/host_defines.h"), "nvidia-cuda-crt"),
        (dirs[2].join("cuda/std/version"), "nvidia-cuda-cccl"),
        (
            libtorch.join("lib/libtorch_cuda.so"),
            "torch (a CUDA wheel)",
        ),
    ];
    let mut missing = Vec::new();
    for (file, package) in &needed {
        println!("cargo:rerun-if-changed={}", file.display());
        if !file.exists() {
            missing.push(format!("{} ({package})", file.display()));
        }
    }
    if missing.is_empty() {
        Ok(dirs)
    } else {
        Err(format!("missing {}", missing.join(", ")))
    }
}

fn c10d_shim() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let cpp = manifest.join("cpp/c10d.cpp");
    println!("cargo:rerun-if-changed={}", cpp.display());
    let libtorch = libtorch_root();
    let abi = env_rerun("LIBTORCH_CXX11_ABI").unwrap_or_else(|| "1".to_owned());
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(libtorch.join("include"))
        .include(libtorch.join("include/torch/csrc/api/include"))
        .include(gloo_include())
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag("-DUSE_DISTRIBUTED")
        .flag("-DUSE_C10D_GLOO")
        .flag_if_supported("-Wno-interference-size")
        .file(&cpp);
    let mode = env_rerun("IMGCLF_C10D_NCCL").unwrap_or_else(|| "auto".to_owned());
    let nccl = match mode.as_str() {
        "off" => None,
        "auto" | "require" => match nccl_includes(&libtorch) {
            Ok(dirs) => Some(dirs),
            Err(e) if mode == "require" => {
                panic!("imgclf build: IMGCLF_C10D_NCCL=require but NCCL cannot be compiled: {e}")
            }
            Err(e) => {
                println!("cargo:warning=c10d shim built without NCCL: {e}");
                None
            }
        },
        other => {
            panic!("imgclf build: IMGCLF_C10D_NCCL must be auto, require or off, not {other:?}")
        }
    };
    if let Some(dirs) = &nccl {
        build
            .includes(dirs)
            .flag("-DUSE_C10D_NCCL")
            .flag("-DUSE_CUDA");
    }
    build.compile("imgclf_c10d");
    println!(
        "cargo:rustc-link-search=native={}",
        libtorch.join("lib").display()
    );
    if nccl.is_some() {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
        println!("cargo:rustc-cfg=imgclf_nccl");
    }
    println!("cargo:rustc-check-cfg=cfg(imgclf_nccl)");
}

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,--enable-new-dtags,-rpath,{lib}");
    }
    c10d_shim();
}
