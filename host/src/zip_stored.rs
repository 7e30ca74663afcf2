//! Minimal zip reader for archives of stored (uncompressed) entries, the container of
//! `torch.save` files: central directory (zip64 included), entry data as slices of the file.
//!
//! Compressed or encrypted entries are refused rather than decoded: PyTorch never writes them,
//! and a reader that only slices keeps tensor data zero-copy until it is turned into tensors.

use std::collections::HashMap;

/// Why the bytes are not a readable zip archive (the caller adds the file name).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ZipError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ZipError> {
    Err(ZipError(msg.into()))
}

const LOCAL_HEADER: u32 = 0x0403_4b50;
const CENTRAL_HEADER: u32 = 0x0201_4b50;
const END_OF_CENTRAL_DIR: u32 = 0x0605_4b50;
const ZIP64_END_LOCATOR: u32 = 0x0706_4b50;
const ZIP64_END_OF_CENTRAL_DIR: u32 = 0x0606_4b50;

/// One entry of the central directory.
#[derive(Debug, Clone)]
struct Entry {
    method: u16,
    flags: u16,
    crc32: u32,
    compressed_size: u64,
    size: u64,
    local_header: u64,
}

/// A zip archive held in memory.
#[derive(Debug)]
pub struct Archive<'a> {
    bytes: &'a [u8],
    /// Entry names in central-directory order.
    names: Vec<String>,
    entries: HashMap<String, Entry>,
}

/// Little-endian field reader over a byte slice; every read is bounds-checked.
struct Fields<'a> {
    b: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Fields<'a> {
    fn at(b: &'a [u8], pos: u64, what: &'static str) -> Result<Self, ZipError> {
        match usize::try_from(pos) {
            Ok(pos) if pos <= b.len() => Ok(Fields { b, pos, what }),
            _ => err(format!(
                "the {what} at byte {pos} lies beyond the end of the file ({} bytes; truncated file?)",
                b.len()
            )),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ZipError> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.b.len() => {
                let s = &self.b[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => err(format!(
                "the {} at byte {} is cut off by the end of the file ({} bytes; truncated file?)",
                self.what,
                self.pos,
                self.b.len()
            )),
        }
    }
    fn u16(&mut self) -> Result<u16, ZipError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, ZipError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, ZipError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn signature(&mut self, expected: u32) -> Result<(), ZipError> {
        let at = self.pos;
        let sig = self.u32()?;
        if sig != expected {
            return err(format!(
                "expected a {} at byte {at} but found signature {sig:#010x} (corrupt or truncated file?)",
                self.what
            ));
        }
        Ok(())
    }
}

/// Where the central directory lies and how many entries it holds.
struct Directory {
    count: u64,
    offset: u64,
    size: u64,
}

fn find_directory(b: &[u8]) -> Result<Directory, ZipError> {
    // The end record (22 bytes + a comment of at most 65535 bytes) closes the file.
    if b.len() < 22 {
        return err(format!(
            "{} bytes is too short for a zip archive (truncated file?)",
            b.len()
        ));
    }
    let lowest = b.len().saturating_sub(22 + 0xffff);
    let eocd = (lowest..=b.len() - 22)
        .rev()
        .find(|&i| {
            b[i..i + 4] == END_OF_CENTRAL_DIR.to_le_bytes()
                && i + 22 + u16::from_le_bytes([b[i + 20], b[i + 21]]) as usize == b.len()
        })
        .ok_or_else(|| {
            ZipError(
                "no end-of-central-directory record: the file is truncated or not a zip archive"
                    .into(),
            )
        })?;
    let mut f = Fields::at(b, eocd as u64 + 4, "end-of-central-directory record")?;
    let disk = f.u16()?;
    let dir_disk = f.u16()?;
    let _on_disk = f.u16()?;
    let count = f.u16()?;
    let size = f.u32()?;
    let offset = f.u32()?;
    if disk != 0 && disk != 0xffff || dir_disk != 0 && dir_disk != 0xffff {
        return err("multi-volume (split) zip archives are not supported");
    }
    if count != 0xffff && size != 0xffff_ffff && offset != 0xffff_ffff {
        // A zip64 end record may still be present (PyTorch always writes one); its values are
        // then equal to these.
        if eocd < 20 || b[eocd - 20..eocd - 16] != ZIP64_END_LOCATOR.to_le_bytes() {
            return Ok(Directory {
                count: count as u64,
                offset: offset as u64,
                size: size as u64,
            });
        }
    }
    if eocd < 20 {
        return err("zip64 archive without its zip64 end-of-central-directory locator");
    }
    let mut loc = Fields::at(
        b,
        eocd as u64 - 20,
        "zip64 end-of-central-directory locator",
    )?;
    loc.signature(ZIP64_END_LOCATOR)?;
    let _disk = loc.u32()?;
    let record = loc.u64()?;
    let mut r = Fields::at(b, record, "zip64 end-of-central-directory record")?;
    r.signature(ZIP64_END_OF_CENTRAL_DIR)?;
    let _record_size = r.u64()?;
    let _made_by = r.u16()?;
    let _needed = r.u16()?;
    let _disk = r.u32()?;
    let _dir_disk = r.u32()?;
    let _on_disk = r.u64()?;
    let count = r.u64()?;
    let size = r.u64()?;
    let offset = r.u64()?;
    Ok(Directory {
        count,
        offset,
        size,
    })
}

impl<'a> Archive<'a> {
    /// Reads the central directory of the archive in `bytes`.
    pub fn new(bytes: &'a [u8]) -> Result<Self, ZipError> {
        let dir = find_directory(bytes)?;
        let end = dir.offset.checked_add(dir.size);
        if end.is_none_or(|e| e > bytes.len() as u64) {
            return err(format!(
                "the central directory (bytes {}..+{}) lies beyond the end of the file ({} bytes; truncated file?)",
                dir.offset,
                dir.size,
                bytes.len()
            ));
        }
        let mut f = Fields::at(bytes, dir.offset, "central directory entry")?;
        let mut names = Vec::new();
        let mut entries = HashMap::new();
        for _ in 0..dir.count {
            f.signature(CENTRAL_HEADER)?;
            let _made_by = f.u16()?;
            let _needed = f.u16()?;
            let flags = f.u16()?;
            let method = f.u16()?;
            let _time = f.u32()?;
            let crc32 = f.u32()?;
            let mut compressed_size = f.u32()? as u64;
            let mut size = f.u32()? as u64;
            let name_len = f.u16()? as usize;
            let extra_len = f.u16()? as usize;
            let comment_len = f.u16()? as usize;
            let _disk = f.u16()?;
            let _internal = f.u16()?;
            let _external = f.u32()?;
            let mut local_header = f.u32()? as u64;
            let name = String::from_utf8_lossy(f.take(name_len)?).into_owned();
            let mut extra = Fields {
                b: f.take(extra_len)?,
                pos: 0,
                what: "zip64 extra field",
            };
            f.take(comment_len)?;
            // The zip64 extra field holds the 64-bit values of the fields saturated above, in
            // this order.
            while extra.pos + 4 <= extra.b.len() {
                let id = extra.u16()?;
                let len = extra.u16()? as usize;
                let mut field = Fields {
                    b: extra.take(len)?,
                    pos: 0,
                    what: "zip64 extra field",
                };
                if id == 0x0001 {
                    if size == 0xffff_ffff {
                        size = field.u64()?;
                    }
                    if compressed_size == 0xffff_ffff {
                        compressed_size = field.u64()?;
                    }
                    if local_header == 0xffff_ffff {
                        local_header = field.u64()?;
                    }
                }
            }
            names.push(name.clone());
            entries.insert(
                name,
                Entry {
                    method,
                    flags,
                    crc32,
                    compressed_size,
                    size,
                    local_header,
                },
            );
        }
        Ok(Archive {
            bytes,
            names,
            entries,
        })
    }

    /// Entry names in the order the archive lists them.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The content of entry `name` (None when there is no such entry), CRC-checked.
    pub fn read(&self, name: &str) -> Result<Option<&'a [u8]>, ZipError> {
        let Some(e) = self.entries.get(name) else {
            return Ok(None);
        };
        if e.flags & 1 != 0 {
            return err(format!("entry {name} is encrypted"));
        }
        if e.method != 0 {
            return err(format!(
                "entry {name} is compressed (method {}{}); only stored entries, as torch.save \
                 writes them, are supported: re-save the file with torch.save, or unzip and \
                 re-zip it with `zip -0`",
                e.method,
                if e.method == 8 { ", deflate" } else { "" }
            ));
        }
        if e.compressed_size != e.size {
            return err(format!(
                "entry {name} is stored but its compressed size {} differs from its size {}",
                e.compressed_size, e.size
            ));
        }
        let mut h = Fields::at(self.bytes, e.local_header, "local file header")?;
        h.signature(LOCAL_HEADER)?;
        h.take(22)?;
        let name_len = h.u16()? as usize;
        let extra_len = h.u16()? as usize;
        h.take(name_len + extra_len)?;
        let len = usize::try_from(e.size)
            .map_err(|_| ZipError(format!("entry {name} is too large ({} bytes)", e.size)))?;
        h.what = "entry data";
        let data = h.take(len).map_err(|_| {
            ZipError(format!(
                "entry {name} ({len} bytes at byte {}) is cut off by the end of the file ({} bytes; truncated file?)",
                h.pos,
                self.bytes.len()
            ))
        })?;
        let mut crc = flate2::Crc::new();
        crc.update(data);
        if crc.sum() != e.crc32 {
            return err(format!(
                "entry {name} fails its CRC-32 check (stored {:#010x}, computed {:#010x}): the file is corrupt",
                e.crc32,
                crc.sum()
            ));
        }
        Ok(Some(data))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a zip archive of stored entries the way PyTorch's writer lays them out (data
    /// descriptor flag, sizes only in the central directory, zip64 end records when `zip64`).
    pub(crate) fn write_zip(entries: &[(&str, &[u8])], zip64: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data) in entries {
            let offset = out.len() as u32;
            let mut crc = flate2::Crc::new();
            crc.update(data);
            out.extend_from_slice(&LOCAL_HEADER.to_le_bytes());
            out.extend_from_slice(&[0, 0, 8, 8, 0, 0, 0, 0, 0, 0]);
            out.extend_from_slice(&[0; 12]); // crc and sizes left to the descriptor
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(&4u16.to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"FB\0\0"); // PyTorch's alignment padding field
            out.extend_from_slice(data);
            out.extend_from_slice(&0x0807_4b50u32.to_le_bytes());
            out.extend_from_slice(&crc.sum().to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());

            central.extend_from_slice(&CENTRAL_HEADER.to_le_bytes());
            central.extend_from_slice(&[0x1e, 3, 0x2d, 0, 8, 8, 0, 0, 0, 0, 0, 0]);
            central.extend_from_slice(&crc.sum().to_le_bytes());
            let (size, off) = if zip64 {
                (0xffff_ffffu32, 0xffff_ffffu32)
            } else {
                (data.len() as u32, offset)
            };
            central.extend_from_slice(&size.to_le_bytes());
            central.extend_from_slice(&size.to_le_bytes());
            central.extend_from_slice(&(name.len() as u16).to_le_bytes());
            central.extend_from_slice(&(if zip64 { 28u16 } else { 0 }).to_le_bytes());
            central.extend_from_slice(&[0; 10]); // comment length, disk, attributes
            central.extend_from_slice(&off.to_le_bytes());
            central.extend_from_slice(name.as_bytes());
            if zip64 {
                central.extend_from_slice(&[1, 0, 24, 0]);
                central.extend_from_slice(&(data.len() as u64).to_le_bytes());
                central.extend_from_slice(&(data.len() as u64).to_le_bytes());
                central.extend_from_slice(&(offset as u64).to_le_bytes());
            }
        }
        let dir_offset = out.len();
        out.extend_from_slice(&central);
        let n = entries.len();
        if zip64 {
            let record = out.len() as u64;
            out.extend_from_slice(&ZIP64_END_OF_CENTRAL_DIR.to_le_bytes());
            out.extend_from_slice(&44u64.to_le_bytes());
            out.extend_from_slice(&[0x1e, 3, 0x2d, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            out.extend_from_slice(&(n as u64).to_le_bytes());
            out.extend_from_slice(&(n as u64).to_le_bytes());
            out.extend_from_slice(&(central.len() as u64).to_le_bytes());
            out.extend_from_slice(&(dir_offset as u64).to_le_bytes());
            out.extend_from_slice(&ZIP64_END_LOCATOR.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&record.to_le_bytes());
            out.extend_from_slice(&1u32.to_le_bytes());
        }
        out.extend_from_slice(&END_OF_CENTRAL_DIR.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        let (count, size, offset) = if zip64 {
            (0xffffu16, 0xffff_ffffu32, 0xffff_ffffu32)
        } else {
            (n as u16, central.len() as u32, dir_offset as u32)
        };
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out
    }

    #[test]
    fn reads_stored_entries_plain_and_zip64() {
        for zip64 in [false, true] {
            let bytes = write_zip(
                &[("a/data.pkl", b"\x80\x02N."), ("a/data/0", &[7u8; 10])],
                zip64,
            );
            let z = Archive::new(&bytes).unwrap();
            assert_eq!(z.names(), ["a/data.pkl", "a/data/0"]);
            assert_eq!(z.read("a/data.pkl").unwrap(), Some(&b"\x80\x02N."[..]));
            assert_eq!(z.read("a/data/0").unwrap(), Some(&[7u8; 10][..]));
            assert_eq!(z.read("a/data/1").unwrap(), None);
        }
    }

    #[test]
    fn damaged_archives_are_clear_errors() {
        let bytes = write_zip(
            &[("a/data.pkl", b"\x80\x02N."), ("a/data/0", &[7u8; 10])],
            true,
        );
        // Cut anywhere: the end record is gone.
        for cut in [0, 10, bytes.len() / 2, bytes.len() - 1] {
            let e = Archive::new(&bytes[..cut]).unwrap_err().0;
            assert!(e.contains("truncated"), "cut at {cut}: {e}");
        }
        // The first bytes lost (an incomplete download resumed wrongly): directory offsets
        // point past the data.
        let e = Archive::new(&bytes[40..]).unwrap_err().0;
        assert!(e.contains("truncated") || e.contains("corrupt"), "{e}");

        // A flipped data byte fails the CRC.
        let mut bad = bytes.clone();
        let at = bad.windows(10).position(|w| w == [7u8; 10]).unwrap();
        bad[at] = 8;
        let e = Archive::new(&bad).unwrap().read("a/data/0").unwrap_err().0;
        assert!(e.contains("a/data/0") && e.contains("CRC"), "{e}");

        // A deflated entry is refused with the fix.
        let mut deflated = write_zip(&[("a/data/0", &[7u8; 10])], false);
        let dir = deflated
            .windows(4)
            .position(|w| w == CENTRAL_HEADER.to_le_bytes())
            .unwrap();
        deflated[dir + 10] = 8;
        let e = Archive::new(&deflated)
            .unwrap()
            .read("a/data/0")
            .unwrap_err()
            .0;
        assert!(
            e.contains("a/data/0") && e.contains("compressed") && e.contains("torch.save"),
            "{e}"
        );

        let e = Archive::new(b"not a zip file at all, just some text....")
            .unwrap_err()
            .0;
        assert!(e.contains("not a zip archive"), "{e}");
    }
}
