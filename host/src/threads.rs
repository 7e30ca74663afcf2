//! libtorch's intra-op threads, set as PyTorch sets them: `train.num_threads` when above 0,
//! else `OMP_NUM_THREADS` when set (above 0), else libtorch's own default (which, like
//! PyTorch's, is one thread per physical core). Recorded in `env.yaml` and `imgclf env`.

use std::sync::Mutex;

/// The config key (host-owned, `0`: not set).
pub const KEY: &str = "train.num_threads";

static SOURCE: Mutex<&'static str> = Mutex::new("libtorch default");

/// Where the current thread count came from: `train.num_threads`, `OMP_NUM_THREADS` or
/// `libtorch default`.
pub fn source() -> &'static str {
    SOURCE.lock().map(|s| *s).unwrap_or("libtorch default")
}

fn set(n: i64, from: &'static str) {
    tch::set_num_threads(n as i32);
    if let Ok(mut s) = SOURCE.lock() {
        *s = from;
    }
}

/// `OMP_NUM_THREADS` as a positive count, if set.
pub fn from_env() -> Option<i64> {
    std::env::var("OMP_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .filter(|&n| n > 0)
}

/// At start-up, before any config: `OMP_NUM_THREADS`, if set (torchrun and
/// `--nproc-per-node` set it to share the cores between ranks).
pub fn apply_env() {
    if let Some(n) = from_env() {
        set(n, "OMP_NUM_THREADS");
    }
}

/// Once the config is frozen: `train.num_threads`, if above 0, wins over `OMP_NUM_THREADS`.
pub fn apply_config(config: &crate::config::Config) {
    let n = config.int(KEY);
    if n > 0 {
        set(n, KEY);
    }
}
