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
