//! What a run ran on: versions, devices, threads (`imgclf env` and each run's `env.yaml`).

use serde_json::{json, Value};

pub fn collect() -> Value {
    let cuda = tch::Cuda::is_available();
    let devices: Vec<String> = if cuda {
        (0..tch::Cuda::device_count())
            .map(|i| format!("cuda:{i}"))
            .collect()
    } else {
        vec![]
    };
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let runtime = imgclf_plugin_api::ffi::runtime_libtorch_version();
    json!({
        "imgclf_version": env!("CARGO_PKG_VERSION"),
        "plugin_api_version": imgclf_plugin_api::API_VERSION,
        "tch_version": "0.24.0",
        // The libtorch actually loaded (asked at run time) and the one the build's headers were.
        "libtorch_version": runtime.as_ref().map(|r| r.version.clone()).unwrap_or_else(|e| e.clone()),
        "libtorch_path": runtime.as_ref().ok().and_then(|r| r.path.clone()),
        "libtorch_build_version": imgclf_plugin_api::LIBTORCH_VERSION,
        "libtorch_cuda": crate::cuda::status(),
        "cuda_available": cuda,
        "cudnn_available": tch::Cuda::cudnn_is_available(),
        "cuda_devices": devices,
        "cpu": cpu_model,
        "cpu_cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "torch_threads": tch::get_num_threads(),
        // train.num_threads, OMP_NUM_THREADS or libtorch's default.
        "torch_threads_from": crate::threads::source(),
        // Where models' BatchNorm + ReLU run fused on the CPU (plugin-api/cpp/bn_relu.cpp):
        // IMGCLF_FUSED_BN_RELU unset (on: float32 and bfloat16) or `0` (ATen's ops).
        "fused_bn_relu": std::env::var("IMGCLF_FUSED_BN_RELU")
            .unwrap_or_else(|_| "on (default)".to_string()),
        // c10d backends the data-parallel shim was built with.
        "distributed_backends": distributed_backends(),
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
        "hostname": std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_string()).unwrap_or_default(),
    })
}

fn distributed_backends() -> Vec<&'static str> {
    if crate::dist::c10d::has_nccl() {
        vec!["gloo", "nccl"]
    } else {
        vec!["gloo"]
    }
}

/// The same facts as YAML.
pub fn to_yaml(v: &Value) -> String {
    serde_yaml_ng::to_string(v).unwrap_or_default()
}

/// The `tch` release plugins must pin (`tch = "=0.24.0"`): the host's.
pub const TCH_VERSION: &str = "0.24.0";
/// The `abi_stable` release the workspace's lockfile has (checked by a test): a plugin pins it
/// exactly, so that its build reuses the host's compiled dependencies.
pub const ABI_STABLE_VERSION: &str = "0.11.3";

/// The `plugin-api` crate this binary was built from (the workspace it was built in), when it
/// is still there: the path dependency of an out-of-tree plugin (plugin-api is not on crates.io).
pub fn plugin_api_source() -> Option<std::path::PathBuf> {
    std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../plugin-api"))
        .canonicalize()
        .ok()
        .filter(|p| p.join("Cargo.toml").is_file())
}

/// The target directory this binary was built in (`<target>/<profile>/imgclf`, marked by
/// cargo's `CACHEDIR.TAG` or `.rustc_info.json`): sharing it (`CARGO_TARGET_DIR`) makes a plugin reuse its compiled
/// torch-sys instead of building it again.
pub fn workspace_target_dir() -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?.canonicalize().ok()?;
    let target = exe.parent()?.parent()?;
    (target.join("CACHEDIR.TAG").is_file() || target.join(".rustc_info.json").is_file())
        .then(|| target.to_path_buf())
}

/// The libtorch directory (`LIBTORCH`) of the libtorch this process loaded: the folder above
/// `lib/libtorch_cpu.so`.
pub fn libtorch_dir() -> Option<std::path::PathBuf> {
    let runtime = imgclf_plugin_api::ffi::runtime_libtorch_version().ok()?;
    let lib = runtime.path?.canonicalize().ok()?;
    let dir = lib.parent()?;
    (dir.file_name()? == "lib").then(|| dir.parent().map(|p| p.to_path_buf()))?
}

/// What a plugin must be built against: `imgclf env`'s `plugin_build`.
pub fn plugin_build() -> Value {
    let libtorch = libtorch_dir();
    json!({
        "LIBTORCH": libtorch,
        "LD_LIBRARY_PATH": libtorch.as_ref().map(|d| d.join("lib")),
        "abi_version": imgclf_plugin_api::ABI_VERSION,
        "libtorch_version": imgclf_plugin_api::ffi::runtime_libtorch_version()
            .map(|r| r.version).unwrap_or_default(),
        "tch": format!("={TCH_VERSION}"),
        "abi_stable": format!("={ABI_STABLE_VERSION}"),
        "plugin_api": plugin_api_source(),
        "CARGO_TARGET_DIR": workspace_target_dir(),
    })
}

/// The shell lines to build a plugin against this imgclf (after `imgclf env`'s YAML).
pub fn build_instructions(b: &Value) -> String {
    let s = |k: &str| b[k].as_str().unwrap_or("").to_string();
    let mut out =
        String::from("\n# To build a plugin for this imgclf (see docs/plugin-guide.md):\n");
    if s("LIBTORCH").is_empty() {
        out += "#   (the loaded libtorch's folder could not be found: set LIBTORCH to the libtorch imgclf runs with)\n";
    } else {
        out += &format!(
            "#   export LIBTORCH={}\n#   export LD_LIBRARY_PATH={}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}\n",
            s("LIBTORCH"),
            s("LD_LIBRARY_PATH")
        );
    }
    if !s("CARGO_TARGET_DIR").is_empty() {
        out += &format!(
            "#   export CARGO_TARGET_DIR={}   # reuses imgclf's compiled torch-sys\n",
            s("CARGO_TARGET_DIR")
        );
    }
    out += &format!(
        "#   pins: tch = \"={TCH_VERSION}\", abi_stable = \"={ABI_STABLE_VERSION}\", imgclf-plugin-api (ABI {}) = {{ path = \"{}\" }}\n",
        imgclf_plugin_api::ABI_VERSION,
        if s("plugin_api").is_empty() { "<imgclf checkout>/plugin-api".to_string() } else { s("plugin_api") }
    );
    out += "#   start from a template: imgclf new-plugin NAME --kind model|augmentation|optimizer|scheduler\n";
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_pinned_abi_stable_is_the_lockfiles() {
        let lock =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).unwrap();
        let at = lock.find("name = \"abi_stable\"\nversion = \"").unwrap();
        let version = lock[at..].lines().nth(1).unwrap();
        assert_eq!(
            version,
            format!("version = \"{}\"", super::ABI_STABLE_VERSION)
        );
        assert!(lock.contains(&format!(
            "name = \"tch\"\nversion = \"{}\"",
            super::TCH_VERSION
        )));
    }
}
