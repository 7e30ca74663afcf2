//! TensorBoard event files: the TFRecord framing (length, masked CRC32C, data, masked CRC32C)
//! around `Event` protobufs (encoded with `prost`), with scalar, image and histogram summaries,
//! written the way PyTorch's `SummaryWriter` writes them (file name, file-version event, purge
//! step on resume), so TensorBoard and its Python reader open them.

use anyhow::{bail, Context, Result};
use prost::Message;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};
use tch::{Device, Kind, Tensor};

/// The protobuf messages of TensorFlow's `event.proto` and `summary.proto` that imgclf
/// writes (field numbers as there; the fields imgclf never sets are left out).
pub mod proto {
    /// `tensorflow.Event`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Event {
        #[prost(double, tag = "1")]
        pub wall_time: f64,
        #[prost(int64, tag = "2")]
        pub step: i64,
        #[prost(oneof = "What", tags = "3, 5, 7")]
        pub what: Option<What>,
    }

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum What {
        #[prost(string, tag = "3")]
        FileVersion(String),
        #[prost(message, tag = "5")]
        Summary(Summary),
        #[prost(message, tag = "7")]
        SessionLog(SessionLog),
    }

    /// `tensorflow.SessionLog`; `status` 1 is START, which makes TensorBoard discard the
    /// events at and after this event's step (the purge on resume).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SessionLog {
        #[prost(int32, tag = "1")]
        pub status: i32,
    }

    pub const SESSION_START: i32 = 1;

    /// `tensorflow.Summary`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Summary {
        #[prost(message, repeated, tag = "1")]
        pub value: Vec<Value>,
    }

    /// `tensorflow.Summary.Value`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Value {
        #[prost(string, tag = "1")]
        pub tag: String,
        #[prost(oneof = "Data", tags = "2, 4, 5")]
        pub data: Option<Data>,
    }

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Data {
        #[prost(float, tag = "2")]
        SimpleValue(f32),
        #[prost(message, tag = "4")]
        Image(Image),
        #[prost(message, tag = "5")]
        Histo(HistogramProto),
    }

    /// `tensorflow.Summary.Image`: an encoded PNG.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Image {
        #[prost(int32, tag = "1")]
        pub height: i32,
        #[prost(int32, tag = "2")]
        pub width: i32,
        /// 1 grey, 3 RGB, 4 RGBA.
        #[prost(int32, tag = "3")]
        pub colorspace: i32,
        #[prost(bytes = "vec", tag = "4")]
        pub encoded_image_string: Vec<u8>,
    }

    /// `tensorflow.HistogramProto`: bucket `i` counts the values in
    /// `(bucket_limit[i-1], bucket_limit[i]]`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HistogramProto {
        #[prost(double, tag = "1")]
        pub min: f64,
        #[prost(double, tag = "2")]
        pub max: f64,
        #[prost(double, tag = "3")]
        pub num: f64,
        #[prost(double, tag = "4")]
        pub sum: f64,
        #[prost(double, tag = "5")]
        pub sum_squares: f64,
        #[prost(double, repeated, tag = "6")]
        pub bucket_limit: Vec<f64>,
        #[prost(double, repeated, tag = "7")]
        pub bucket: Vec<f64>,
    }
}

use proto::{Data, Event, HistogramProto, SessionLog, Summary, What};

/// The file version TensorBoard expects first in every event file.
pub const FILE_VERSION: &str = "brain.Event:2";

/// CRC32C as TFRecord stores it: rotated right by 15 bits plus a constant, so that a CRC of
/// data that itself contains CRCs stays well distributed.
pub fn masked_crc32c(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: u64 length (little-endian), masked CRC of the length, the data, masked CRC of
/// the data.
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// The records of a TFRecord file, each checked against its CRCs. A truncated last record (a
/// writer killed mid-write) is an error, like any corruption.
pub fn read_records(path: &Path) -> Result<Vec<Vec<u8>>> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut records = Vec::new();
    let mut at = 0usize;
    let word = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest.len() < 12 {
            bail!("{}: truncated record header at byte {at}", path.display());
        }
        if masked_crc32c(&rest[..8]) != word(&rest[8..12]) {
            bail!("{}: bad length CRC at byte {at}", path.display());
        }
        let len = u64::from_le_bytes(rest[..8].try_into()?);
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| l.checked_add(16))
            .filter(|&e| e <= rest.len())
            .with_context(|| format!("{}: truncated record at byte {at}", path.display()))?;
        let data = &rest[12..end - 4];
        if masked_crc32c(data) != word(&rest[end - 4..end]) {
            bail!("{}: bad data CRC at byte {at}", path.display());
        }
        records.push(data.to_vec());
        at += end;
    }
    Ok(records)
}

/// The events of an event file, in order.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    read_records(path)?
        .iter()
        .map(|r| Event::decode(&r[..]).with_context(|| format!("{}: not an Event", path.display())))
        .collect()
}

/// The event files of `dir` (not of its subdirectories), in the order TensorBoard reads them.
pub fn event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file() && file_time(p).is_some())
        .collect();
    files.sort();
    Ok(files)
}

/// The seconds in an event file's name (`events.out.tfevents.<seconds>.<host>...`).
fn file_time(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let rest = name.strip_prefix("events.out.tfevents.")?;
    rest.split('.').next()?.parse().ok()
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or
    // truncates, and the final byte is kept 0.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    let name = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(0);
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    // The name becomes part of a file name.
    let name: String = name
        .chars()
        .map(|c| if c == '/' { '_' } else { c })
        .collect();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

static FILE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// An open event file. Every event is written as one whole record with one write, so a
/// killed process leaves at most a truncated last record.
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir` (created if missing), named as `SummaryWriter` names it. Its
    /// name sorts after every event file already there (TensorBoard reads them in name
    /// order), so a purge in it applies to what the earlier files hold. With `purge_step`
    /// (on resume), TensorBoard discards what the earlier files hold at that step and after.
    pub fn create(dir: &Path, purge_step: Option<i64>) -> Result<EventWriter> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let wall = now();
        let newest = event_files(dir)?.iter().filter_map(|p| file_time(p)).max();
        let secs = match newest {
            Some(t) if t >= wall as u64 => t + 1,
            _ => wall as u64,
        };
        let name = format!(
            "events.out.tfevents.{secs:010}.{}.{}.{}",
            hostname(),
            std::process::id(),
            FILE_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = EventWriter { file, path };
        w.write(Event {
            wall_time: wall,
            step: 0,
            what: Some(What::FileVersion(FILE_VERSION.into())),
        })?;
        if let Some(step) = purge_step {
            w.write(Event {
                wall_time: wall,
                step,
                what: Some(What::FileVersion(FILE_VERSION.into())),
            })?;
            w.write(Event {
                wall_time: wall,
                step,
                what: Some(What::SessionLog(SessionLog {
                    status: proto::SESSION_START,
                })),
            })?;
        }
        w.flush()?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&mut self, event: Event) -> Result<()> {
        self.file
            .write_all(&record(&event.encode_to_vec()))
            .with_context(|| format!("cannot write {}", self.path.display()))
    }

    fn summary(&mut self, tag: &str, step: i64, data: Data) -> Result<()> {
        self.write(Event {
            wall_time: now(),
            step,
            what: Some(What::Summary(Summary {
                value: vec![proto::Value {
                    tag: tag.into(),
                    data: Some(data),
                }],
            })),
        })
    }

    /// A scalar (stored as float32, as `SummaryWriter.add_scalar` stores it).
    pub fn scalar(&mut self, tag: &str, step: i64, value: f64) -> Result<()> {
        self.summary(tag, step, Data::SimpleValue(value as f32))
    }

    /// An RGB image, PNG-encoded.
    pub fn image(&mut self, tag: &str, step: i64, image: &RgbImage) -> Result<()> {
        let png = image.to_png()?;
        self.summary(
            tag,
            step,
            Data::Image(proto::Image {
                height: image.height as i32,
                width: image.width as i32,
                colorspace: 3,
                encoded_image_string: png,
            }),
        )
    }

    /// A histogram of `values` in TensorFlow's default buckets.
    pub fn histogram(&mut self, tag: &str, step: i64, values: &[f64]) -> Result<()> {
        self.summary(tag, step, Data::Histo(histogram(values)?))
    }

    /// Flushes the file to the operating system (each record is already written whole).
    pub fn flush(&mut self) -> Result<()> {
        self.file
            .flush()
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// TensorFlow's default histogram bucket edges (`SummaryWriter`'s `bins='tensorflow'`):
/// 0 and ±1e-12 growing by a factor 1.1 up to 1e20.
pub fn default_bucket_edges() -> Vec<f64> {
    let mut positive = Vec::new();
    let mut v = 1e-12;
    while v < 1e20 {
        positive.push(v);
        v *= 1.1;
    }
    let mut edges: Vec<f64> = positive.iter().rev().map(|v| -v).collect();
    edges.push(0.0);
    edges.extend(positive);
    edges
}

/// The histogram of `values` in the default buckets, trimmed to the range that holds values
/// (with one empty bucket before it, as `SummaryWriter` writes it). Each bucket is
/// `[edge_k, edge_k+1)` (the last one closed) and is stored with its right edge as limit;
/// values outside ±1e20 or not finite are counted in `num`, `min`, `max` and sums but in no
/// bucket.
pub fn histogram(values: &[f64]) -> Result<HistogramProto> {
    if values.is_empty() {
        bail!("a histogram of no values");
    }
    let edges = default_bucket_edges();
    let last = edges.len() - 1;
    let mut counts = vec![0f64; last];
    for &v in values {
        if !(edges[0]..=edges[last]).contains(&v) {
            continue;
        }
        // The number of edges <= v, minus one: the bucket whose left edge is v or below.
        let k = edges
            .partition_point(|&e| e <= v)
            .saturating_sub(1)
            .min(last - 1);
        counts[k] += 1.0;
    }
    let (mut bucket_limit, mut bucket) = (Vec::new(), Vec::new());
    if let (Some(first), Some(end)) = (
        counts.iter().position(|&c| c > 0.0),
        counts.iter().rposition(|&c| c > 0.0),
    ) {
        bucket_limit.push(edges[first]);
        bucket.push(0.0);
        for k in first..=end {
            bucket_limit.push(edges[k + 1]);
            bucket.push(counts[k]);
        }
    }
    Ok(HistogramProto {
        min: values.iter().copied().fold(f64::INFINITY, f64::min),
        max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        num: values.len() as f64,
        sum: values.iter().sum(),
        sum_squares: values.iter().map(|v| v * v).sum(),
        bucket_limit,
        bucket,
    })
}

/// An 8-bit RGB image, rows top to bottom.
#[derive(Clone, Debug, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

impl RgbImage {
    pub fn to_png(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, self.width as u32, self.height as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut w = enc.write_header().context("cannot encode a PNG")?;
            w.write_image_data(&self.pixels)
                .context("cannot encode a PNG")?;
        }
        Ok(out)
    }
}

/// `torchvision.utils.make_grid(batch, normalize=True, scale_each=True)` as
/// `SummaryWriter.add_image` stores it: each image of the `[N, C, H, W]` batch scaled to
/// [0, 1] by its own minimum and maximum, grey images repeated to RGB, laid out 8 per row
/// with 2 black pixels between and around them, then `x * 255` truncated to 8 bits.
pub fn image_grid(batch: &Tensor) -> Result<RgbImage> {
    let size = batch.size();
    let [n, c, h, w] = size[..] else {
        bail!("an image batch must be [N, C, H, W], not {size:?}");
    };
    if n < 1 || h < 1 || w < 1 || !(c == 1 || c == 3) {
        bail!("an image grid needs 1- or 3-channel images, not a batch of shape {size:?}");
    }
    let (n, c, h, w) = (n as usize, c as usize, h as usize, w as usize);
    let data = Vec::<f32>::try_from(
        batch
            .detach()
            .to_device(Device::Cpu)
            .to_kind(Kind::Float)
            .contiguous()
            .view([-1]),
    )
    .context("cannot read the image batch")?;
    const PER_ROW: usize = 8;
    const PAD: usize = 2;
    let cols = n.min(PER_ROW);
    let rows = n.div_ceil(cols);
    let (cell_h, cell_w) = (h + PAD, w + PAD);
    let (width, height) = (cols * cell_w + PAD, rows * cell_h + PAD);
    let mut pixels = vec![0u8; width * height * 3];
    for (k, img) in data.chunks_exact(c * h * w).enumerate() {
        let lo = img.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = img.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let scale = (hi - lo).max(1e-5);
        let (y0, x0) = ((k / cols) * cell_h + PAD, (k % cols) * cell_w + PAD);
        for y in 0..h {
            for x in 0..w {
                let at = ((y0 + y) * width + x0 + x) * 3;
                for ch in 0..3 {
                    let src = if c == 1 { 0 } else { ch };
                    let v = (img[(src * h + y) * w + x].clamp(lo, hi) - lo) / scale;
                    pixels[at + ch] = (v * 255.0).clamp(0.0, 255.0) as u8;
                }
            }
        }
    }
    Ok(RgbImage {
        width,
        height,
        pixels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("imgclf-tensorboard-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn crc32c_is_castagnoli_and_the_mask_is_tfrecords() {
        // The CRC-32C check value (RFC 3720's polynomial over "123456789").
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        // ((crc >> 15) | (crc << 17)) + 0xa282ead8, computed by hand.
        assert_eq!(masked_crc32c(b"123456789"), 0xc78a_b0e5);
    }

    #[test]
    fn records_round_trip_and_corruption_is_detected() {
        let dir = scratch("records");
        let mut w = EventWriter::create(&dir, None).unwrap();
        w.scalar("Train/Loss", 3, 0.25).unwrap();
        w.flush().unwrap();
        let path = w.path().to_path_buf();
        let events = read_events(&path).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].what, Some(What::FileVersion(FILE_VERSION.into())));
        let Some(What::Summary(s)) = &events[1].what else {
            panic!("not a summary: {:?}", events[1]);
        };
        assert_eq!(events[1].step, 3);
        assert_eq!(s.value[0].tag, "Train/Loss");
        assert_eq!(s.value[0].data, Some(Data::SimpleValue(0.25)));

        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = read_records(&path).unwrap_err().to_string();
        assert!(err.contains("bad data CRC"), "{err}");
        std::fs::write(&path, &bytes[..n - 3]).unwrap();
        let err = read_records(&path).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn purge_writes_file_version_and_session_start_at_the_step_and_sorts_last() {
        let dir = scratch("purge");
        let first = EventWriter::create(&dir, None).unwrap();
        let second = EventWriter::create(&dir, Some(7)).unwrap();
        assert_eq!(
            event_files(&dir).unwrap(),
            vec![first.path().to_path_buf(), second.path().to_path_buf()]
        );
        let events = read_events(second.path()).unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!((events[1].step, events[2].step), (7, 7));
        assert_eq!(events[1].what, Some(What::FileVersion(FILE_VERSION.into())));
        assert_eq!(
            events[2].what,
            Some(What::SessionLog(SessionLog {
                status: proto::SESSION_START
            }))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn histogram_counts_every_value_in_its_bucket() {
        let values = [0.0, 0.5, 0.5, -2.0, 3.0];
        let h = histogram(&values).unwrap();
        assert_eq!((h.min, h.max, h.num), (-2.0, 3.0, 5.0));
        assert_eq!(h.sum, 2.0);
        assert_eq!(h.sum_squares, 13.5);
        assert_eq!(h.bucket.iter().sum::<f64>(), 5.0);
        assert_eq!(h.bucket.len(), h.bucket_limit.len());
        assert_eq!(h.bucket[0], 0.0);
        assert!(h.bucket_limit.windows(2).all(|p| p[0] < p[1]));
        // Each value lies in (previous limit, its bucket's limit].
        for v in values {
            let k = h.bucket_limit.iter().position(|&l| v < l).unwrap();
            assert!(h.bucket[k] > 0.0, "{v} fell in an empty bucket");
            assert!(h.bucket_limit[k - 1] <= v);
        }
        // The last bucket holds 3.0, the first real one -2.0.
        assert_eq!(h.bucket[1], 1.0);
        assert_eq!(*h.bucket.last().unwrap(), 1.0);
        assert!(histogram(&[]).is_err());
    }

    #[test]
    fn image_grid_is_make_grid_with_each_image_scaled() {
        // Three 1-channel 2x3 images: ramps with different ranges, and a constant one.
        let a: Vec<f32> = (0..6).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..6).map(|i| -10.0 + 2.0 * i as f32).collect();
        let cst = vec![4.0f32; 6];
        let batch = Tensor::from_slice(&[a, b, cst].concat()).view([3, 1, 2, 3]);
        let g = image_grid(&batch).unwrap();
        // 3 per row (fewer than 8), 2 pixels of padding around each.
        assert_eq!((g.width, g.height), (3 * 5 + 2, 2 + 2 + 2));
        let px = |x: usize, y: usize| &g.pixels[(y * g.width + x) * 3..(y * g.width + x) * 3 + 3];
        assert_eq!(px(0, 0), [0, 0, 0]);
        // Image 0, first pixel: its minimum -> 0; last pixel: its maximum -> 255.
        assert_eq!(px(2, 2), [0, 0, 0]);
        assert_eq!(px(4, 3), [255, 255, 255]);
        // Image 1 scales the same ramp alike although its values differ.
        assert_eq!(px(7 + 1, 2), px(2 + 1, 2));
        assert_eq!(px(2 + 1, 2), [51, 51, 51]);
        // A constant image becomes 0.
        assert_eq!(px(12, 2), [0, 0, 0]);
        let png = g.to_png().unwrap();
        let dec = png::Decoder::new(std::io::Cursor::new(png));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (17, 6));
        assert_eq!(&buf[..info.buffer_size()], &g.pixels[..]);
        assert!(image_grid(&Tensor::zeros([2, 2, 4, 4], (Kind::Float, Device::Cpu))).is_err());
    }
}
