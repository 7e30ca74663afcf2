//! Files imgclf writes and reads: atomic writes (temporary file + rename), safetensors with
//! metadata, and NumPy `.npz` archives.

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Writes `bytes` to `path` so that readers see either the old file or the complete new one,
/// even if the process is killed mid-write.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .context("path has no file name")?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        other => bail!("cannot store a {other:?} tensor in safetensors"),
    })
}

fn kind_of(dtype: Dtype) -> Result<Kind> {
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        other => bail!("unsupported safetensors dtype {other:?}"),
    })
}

/// Raw little-endian bytes of a tensor (copied to the CPU).
pub fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.detach().to_device(Device::Cpu).contiguous();
    let numel = t.numel();
    let mut buf = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut buf, numel);
    buf
}

/// Saves named tensors (and string metadata) as one safetensors file, atomically.
pub fn save_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let data: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| {
            Ok((
                n.clone(),
                dtype_of(t.kind())?,
                t.size().iter().map(|&d| d as usize).collect(),
                tensor_bytes(t),
            ))
        })
        .collect::<Result<_>>()?;
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(n, d, s, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<_>>()?;
    let meta = if metadata.is_empty() {
        None
    } else {
        Some(metadata)
    };
    let bytes = safetensors::tensor::serialize(views, &meta)?;
    write_atomic(path, &bytes)
}

/// Named tensors and string metadata of a safetensors file.
pub type SafetensorsContent = (Vec<(String, Tensor)>, HashMap<String, String>);

/// Loads a safetensors file: its tensors (on the CPU, sorted by name) and metadata.
pub fn load_safetensors(path: &Path) -> Result<SafetensorsContent> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_safetensors(path, &bytes)
}

/// [`load_safetensors`] of the content `bytes` of `path` (named in errors).
pub fn parse_safetensors(path: &Path, bytes: &[u8]) -> Result<SafetensorsContent> {
    let parse = || -> Result<_> {
        let (_, meta) = SafeTensors::read_metadata(bytes)?;
        let st = SafeTensors::deserialize(bytes)?;
        let mut out = Vec::new();
        for (name, view) in st.tensors() {
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let t = Tensor::f_from_data_size(view.data(), &shape, kind_of(view.dtype())?)?;
            out.push((name, t));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((out, meta.metadata().clone().unwrap_or_default()))
    };
    parse().with_context(|| format!("{} is not a valid safetensors file", path.display()))
}

/// One array of an `.npz` archive.
pub struct NpyArray {
    pub name: String,
    /// NumPy type string, e.g. `<f4`, `<i8`, `<f8`.
    pub descr: &'static str,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl NpyArray {
    pub fn from_tensor(name: &str, t: &Tensor) -> Result<Self> {
        let descr = match t.kind() {
            Kind::Float => "<f4",
            Kind::Double => "<f8",
            Kind::Int64 => "<i8",
            Kind::Int => "<i4",
            Kind::Uint8 => "|u1",
            Kind::Bool => "|b1",
            other => bail!("cannot store a {other:?} tensor in .npy"),
        };
        Ok(NpyArray {
            name: name.into(),
            descr,
            shape: t.size().iter().map(|&d| d as usize).collect(),
            data: tensor_bytes(t),
        })
    }

    pub fn scalar_f64(name: &str, v: f64) -> Self {
        NpyArray {
            name: name.into(),
            descr: "<f8",
            shape: vec![],
            data: v.to_le_bytes().to_vec(),
        }
    }

    /// The `.npy` (format 1.0) bytes.
    pub fn to_npy(&self) -> Vec<u8> {
        let shape = match self.shape.as_slice() {
            [] => "()".to_string(),
            [n] => format!("({n},)"),
            dims => format!(
                "({})",
                dims.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let mut header = format!(
            "{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}",
            self.descr
        );
        let unpadded = 10 + header.len() + 1;
        header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&self.data);
        out
    }
}

/// Writes an uncompressed `.npz` (as `numpy.savez`), atomically.
pub fn save_npz(path: &Path, arrays: &[NpyArray]) -> Result<()> {
    let mut cursor = std::io::Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut cursor);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(arrays.iter().map(|a| a.data.len()).sum::<usize>() > u32::MAX as usize / 2);
        for a in arrays {
            zip.start_file(format!("{}.npy", a.name), opts)?;
            zip.write_all(&a.to_npy())?;
        }
        zip.finish()?;
    }
    write_atomic(path, &cursor.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("imgclf-io-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn safetensors_round_trip_keeps_values_dtypes_and_metadata() {
        let d = tmp("st");
        let p = d.join("x.safetensors");
        let a = Tensor::from_slice(&[1.5f32, -2.0, 3.25, 4.0]).view([2, 2]);
        let b = Tensor::from_slice(&[7i64]).view([]);
        let meta = HashMap::from([("epoch".to_string(), "3".to_string())]);
        save_safetensors(
            &p,
            &[
                ("w".into(), a.shallow_clone()),
                ("n".into(), b.shallow_clone()),
            ],
            meta,
        )
        .unwrap();
        let (loaded, meta) = load_safetensors(&p).unwrap();
        assert_eq!(meta["epoch"], "3");
        let get = |n: &str| {
            loaded
                .iter()
                .find(|(k, _)| k == n)
                .unwrap()
                .1
                .shallow_clone()
        };
        assert!(get("w").equal(&a));
        assert_eq!(get("n").kind(), Kind::Int64);
        assert_eq!(get("n").size(), Vec::<i64>::new());
        assert!(!std::fs::read_dir(&d).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".tmp")));
    }

    #[test]
    fn corrupt_safetensors_is_a_clear_error() {
        let d = tmp("bad");
        let p = d.join("bad.safetensors");
        std::fs::write(&p, b"definitely not safetensors").unwrap();
        let e = format!("{:#}", load_safetensors(&p).unwrap_err());
        assert!(
            e.contains("bad.safetensors") && e.contains("not a valid safetensors"),
            "{e}"
        );
    }

    #[test]
    fn npy_header_is_aligned_and_describes_the_array() {
        let a = NpyArray::from_tensor("preds", &Tensor::zeros([3, 10], (Kind::Float, Device::Cpu)))
            .unwrap();
        let bytes = a.to_npy();
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        assert!(
            header.contains("'descr': '<f4'") && header.contains("'shape': (3, 10)"),
            "{header}"
        );
        assert_eq!(bytes.len(), 10 + header_len + 3 * 10 * 4);
        let s = NpyArray::scalar_f64("acc", 0.5).to_npy();
        assert!(std::str::from_utf8(&s[10..74])
            .unwrap()
            .contains("'shape': ()"));
    }
}
