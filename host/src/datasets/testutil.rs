//! Test helpers: unique temporary directories and writers for the official file formats.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("imgclf-datasets-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `data` to `rel` (creating parent folders) and returns the full path.
    pub fn write(&self, rel: &str, data: &[u8]) -> PathBuf {
        let p = self.0.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deterministic pixel value for image `i`, byte `j` (also used by the Python-made fixtures).
pub fn pixel(i: usize, j: usize) -> u8 {
    ((i * 31 + j * 7 + 3) % 256) as u8
}

/// Deterministic label for image `i` (also used by the Python-made fixtures).
pub fn label(i: usize, n_classes: usize) -> i64 {
    ((i * 3 + 1) % n_classes) as i64
}

/// `n` images of `size` bytes following [`pixel`].
pub fn pixels(n: usize, size: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| (0..size).map(move |j| pixel(i, j)))
        .collect()
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// Hand-rolled pickle writer producing the opcodes Python 2's cPickle emits at protocol 2.
#[derive(Default)]
pub struct PickleWriter {
    pub out: Vec<u8>,
    next_memo: u8,
}

impl PickleWriter {
    pub fn new() -> Self {
        let mut w = PickleWriter::default();
        w.out.extend_from_slice(&[0x80, 2]);
        w
    }
    pub fn op(&mut self, op: u8) -> &mut Self {
        self.out.push(op);
        self
    }
    /// BINPUT with the next memo key.
    pub fn put(&mut self) -> &mut Self {
        self.out.extend_from_slice(&[b'q', self.next_memo]);
        self.next_memo += 1;
        self
    }
    pub fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.out.push(b'c');
        self.out
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        self.put()
    }
    /// SHORT_BINSTRING or BINSTRING (a Python 2 str).
    pub fn string(&mut self, s: &[u8]) -> &mut Self {
        if s.len() < 256 {
            self.out.extend_from_slice(&[b'U', s.len() as u8]);
        } else {
            self.out.push(b'T');
            self.out.extend_from_slice(&(s.len() as i32).to_le_bytes());
        }
        self.out.extend_from_slice(s);
        self
    }
    pub fn int(&mut self, v: i64) -> &mut Self {
        if (0..256).contains(&v) {
            self.out.extend_from_slice(&[b'K', v as u8]);
        } else if (0..65536).contains(&v) {
            self.out.push(b'M');
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else {
            self.out.push(b'J');
            self.out.extend_from_slice(&(v as i32).to_le_bytes());
        }
        self
    }
    /// A numpy uint8 array of the given shape, as numpy 1.x under Python 2 pickles it.
    pub fn u8_array(&mut self, shape: &[usize], data: &[u8], dtype: &str) -> &mut Self {
        self.global("numpy.core.multiarray", "_reconstruct");
        self.global("numpy", "ndarray");
        self.int(0).op(0x85).string(b"b").op(0x87).op(b'R').put();
        self.op(b'(').int(1);
        self.op(b'(');
        for &d in shape {
            self.int(d as i64);
        }
        self.op(b't').put();
        self.global("numpy", "dtype");
        self.string(dtype.as_bytes())
            .int(0)
            .int(1)
            .op(0x87)
            .op(b'R')
            .put();
        self.op(b'(')
            .int(3)
            .string(b"|")
            .op(b'N')
            .op(b'N')
            .op(b'N')
            .int(-1)
            .int(-1)
            .int(0)
            .op(b't')
            .op(b'b');
        self.op(0x89).string(data).op(b't').op(b'b');
        self
    }
    pub fn int_list(&mut self, v: &[i64]) -> &mut Self {
        self.op(b']').put();
        // cPickle batches APPENDS in groups of 1000.
        for chunk in v.chunks(1000) {
            self.op(b'(');
            for &x in chunk {
                self.int(x);
            }
            self.op(b'e');
        }
        self
    }
    pub fn finish(&mut self) -> Vec<u8> {
        self.out.push(b'.');
        std::mem::take(&mut self.out)
    }
}

/// A CIFAR python batch as Python 2 wrote it: `{'batch_label', 'labels'|'fine_labels'+'coarse_labels', 'data', 'filenames'}`.
pub fn py2_cifar_batch(n: usize, n_classes: usize, cifar100: bool) -> Vec<u8> {
    let labels: Vec<i64> = (0..n).map(|i| label(i, n_classes)).collect();
    let mut w = PickleWriter::new();
    w.op(b'}').put().op(b'(');
    w.string(b"batch_label")
        .put()
        .string(b"testing batch 1 of 1")
        .put();
    if cifar100 {
        w.string(b"fine_labels").put().int_list(&labels);
        let coarse: Vec<i64> = (0..n).map(|i| (i % 20) as i64).collect();
        w.string(b"coarse_labels").put().int_list(&coarse);
    } else {
        w.string(b"labels").put().int_list(&labels);
    }
    w.string(b"data")
        .put()
        .u8_array(&[n, 3072], &pixels(n, 3072), "u1");
    w.string(b"filenames").put().op(b']').put().op(b'(');
    for i in 0..n {
        w.string(format!("img_{i}.png").as_bytes()).put();
    }
    w.op(b'e');
    w.op(b'u');
    w.finish()
}
