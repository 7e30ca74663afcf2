//! Fuzz target: the CIFAR-10/100 readers (binary batches and pickled python batches) through
//! the public loader, on a batch file holding the input. The first byte picks the release and
//! the dataset; the rest is the file.
#![no_main]

use imgclf::datasets::{find, Split};
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;

/// One scratch directory per fuzzing process, laid out as each release expects.
fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("imgclf-fuzz-cifar-{}", std::process::id()));
    for sub in [
        "cifar-10-batches-bin",
        "cifar-10-batches-py",
        "cifar-100-binary",
        "cifar-100-python",
    ] {
        let _ = std::fs::create_dir_all(d.join(sub));
    }
    d
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let (dataset, file) = match pick % 4 {
        0 => ("CIFAR10", "cifar-10-batches-bin/test_batch.bin"),
        1 => ("CIFAR10", "cifar-10-batches-py/test_batch"),
        2 => ("CIFAR100", "cifar-100-binary/test.bin"),
        _ => ("CIFAR100", "cifar-100-python/test"),
    };
    let dir = scratch();
    // Only the chosen file exists, so the loader reads the chosen release.
    for other in [
        "cifar-10-batches-bin/test_batch.bin",
        "cifar-10-batches-py/test_batch",
        "cifar-100-binary/test.bin",
        "cifar-100-python/test",
    ] {
        let _ = std::fs::remove_file(dir.join(other));
    }
    if std::fs::write(dir.join(file), body).is_err() {
        return;
    }
    let info = find(dataset).expect("a built-in dataset");
    if let Ok(set) = info.load(&dir, Split::Test) {
        assert_eq!(set.images.len(), set.labels.len() * set.image_bytes());
    }
});
