//! Fuzz target: the IDX readers (MNIST, Fashion-MNIST, KMNIST; plain and gzipped) through the
//! public loader. The first two bytes give the length of the images file, the rest holds the
//! images file then the labels file; bit 0 of the third byte asks for gzip.
#![no_main]

use imgclf::datasets::{find, Split};
use libfuzzer_sys::fuzz_target;
use std::io::Write;

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = e.write_all(data);
    e.finish().unwrap_or_default()
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let split = u16::from_le_bytes([data[0], data[1]]) as usize;
    let zipped = data[2] & 1 == 1;
    let rest = &data[3..];
    let (images, labels) = rest.split_at(split.min(rest.len()));
    let dir = std::env::temp_dir().join(format!("imgclf-fuzz-idx-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    for name in ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"] {
        let _ = std::fs::remove_file(dir.join(name));
        let _ = std::fs::remove_file(dir.join(format!("{name}.gz")));
    }
    let write = |name: &str, bytes: &[u8]| {
        if zipped {
            std::fs::write(dir.join(format!("{name}.gz")), gz(bytes))
        } else {
            std::fs::write(dir.join(name), bytes)
        }
    };
    if write("t10k-images-idx3-ubyte", images).is_err()
        || write("t10k-labels-idx1-ubyte", labels).is_err()
    {
        return;
    }
    let info = find("FashionMNIST").expect("a built-in dataset");
    if let Ok(set) = info.load(&dir, Split::Test) {
        assert_eq!(set.images.len(), set.labels.len() * set.image_bytes());
    }
});
