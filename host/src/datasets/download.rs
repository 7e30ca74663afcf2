//! Downloading CIFAR and the MNIST family when their files are missing: HTTP(S) through `ureq`
//! (rustls), mirrors tried in order, a partial download resumed with an HTTP `Range` request,
//! the MD5 checked before anything is extracted, and extraction into a temporary folder that is
//! renamed into place, so a dataset folder is either complete or absent.
//!
//! Downloads go to `<file>.part` beside the final file; only a download whose MD5 matches is
//! renamed to its final name, and a mismatch deletes the `.part` file. One process at a time
//! downloads into a folder (an advisory lock on `.imgclf-download-<Name>.lock`).
//!
//! Environment: `IMGCLF_DOWNLOAD=0` turns automatic downloads off (training then reports the
//! missing files), `IMGCLF_DOWNLOAD_TIMEOUT` sets the connect and read timeouts in seconds
//! (default 30), and [`sources`](super::sources) documents the mirror and file-list overrides.

use super::sources::{Layout, Overrides, RemoteFile, Source};
use super::{DatasetInfo, Split};
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Set to `0` (or `false`, `no`, `off`) to never download automatically.
pub const DOWNLOAD_ENV: &str = "IMGCLF_DOWNLOAD";
/// Connect and read timeout in seconds (fractions allowed).
pub const TIMEOUT_ENV: &str = "IMGCLF_DOWNLOAD_TIMEOUT";

/// How downloads behave.
#[derive(Debug, Clone)]
pub struct Options {
    /// Longest wait for a connection (DNS included).
    pub connect_timeout: Duration,
    /// Longest wait for any single read of the response (a stalled server fails after this).
    pub read_timeout: Duration,
    /// Tries of one URL while each try makes progress (a dropped connection is resumed).
    pub attempts_per_url: usize,
    /// Draw a progress bar on a terminal.
    pub progress: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(30),
            attempts_per_url: 5,
            progress: true,
        }
    }
}

impl Options {
    /// Defaults with `IMGCLF_DOWNLOAD_TIMEOUT` applied.
    pub fn from_env() -> Result<Self> {
        let mut o = Options::default();
        if let Ok(v) = std::env::var(TIMEOUT_ENV) {
            let secs: f64 = v
                .trim()
                .parse()
                .ok()
                .filter(|s: &f64| s.is_finite() && *s > 0.0)
                .with_context(|| {
                    format!("{TIMEOUT_ENV} must be a positive number of seconds, got `{v}`")
                })?;
            o.connect_timeout = Duration::from_secs_f64(secs);
            o.read_timeout = Duration::from_secs_f64(secs);
        }
        Ok(o)
    }
}

/// True unless `IMGCLF_DOWNLOAD` turns automatic downloads off.
pub fn enabled_by_env() -> bool {
    !matches!(
        std::env::var(DOWNLOAD_ENV)
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
            .as_str(),
        "0" | "false" | "no" | "off"
    )
}

/// True when both splits of the dataset are found in `dir`.
pub fn present(info: &DatasetInfo, dir: &Path) -> bool {
    info.locate(dir, Split::Train).is_ok() && info.locate(dir, Split::Test).is_ok()
}

/// What training and evaluation call before reading a dataset: when its files are missing
/// from `dir` and downloads are on, download them (from the sources after the environment's
/// overrides). Datasets without a download source are left to the loader's not-found error.
/// Only the `splits` the command reads must be present (evaluation reads the test split alone).
pub fn ensure(info: &DatasetInfo, dir: &Path, splits: &[Split]) -> Result<()> {
    if !enabled_by_env() {
        return Ok(());
    }
    // Datasets without a source (image folders) are not even looked at here.
    let Some(source) = Overrides::from_env().source(info.name)? else {
        return Ok(());
    };
    let dir = super::expand_home(dir);
    if splits.iter().all(|&split| info.locate(&dir, split).is_ok()) {
        return Ok(());
    }
    download(info, &dir, &source, &Options::from_env()?)
}

/// Downloads, verifies and extracts `source` into `root` (the dataset directory) unless the
/// dataset is already there.
pub fn download(info: &DatasetInfo, root: &Path, source: &Source, opts: &Options) -> Result<()> {
    let root = super::expand_home(root);
    let folder = source.download_dir(&root);
    std::fs::create_dir_all(&folder).map_err(|e| {
        anyhow::anyhow!(
            "cannot download {}: cannot create {}: {e}\n{}",
            info.name,
            folder.display(),
            manual_hint(source, &root)
        )
    })?;
    let _lock = FolderLock::acquire(&root.join(format!(".imgclf-download-{}.lock", info.name)))?;
    // Another process may have finished while this one waited for the lock.
    if present(info, &root) {
        return Ok(());
    }
    let agent = agent(opts);
    match &source.layout {
        Layout::TarGz { folder: extracted } => {
            let target = root.join(extracted);
            if target.exists() {
                bail!(
                    "{} exists but does not hold every {} file ({}); move it away or delete it, then run again",
                    target.display(),
                    info.name,
                    missing_summary(info, &root)
                );
            }
            let mut archives = Vec::new();
            for f in &source.files {
                archives.push(fetch_verified(&agent, source, f, &folder, &root, opts)?);
            }
            for archive in &archives {
                extract_tar_gz(info, archive, &root, extracted, &source.contents)?;
            }
        }
        Layout::Gzipped { .. } => {
            for f in &source.files {
                let plain = folder.join(f.name.strip_suffix(".gz").unwrap_or(&f.name));
                if plain.is_file() {
                    continue;
                }
                let gz = fetch_verified(&agent, source, f, &folder, &root, opts)?;
                if gz != plain {
                    gunzip_atomic(&gz, &plain)?;
                }
            }
        }
    }
    if !present(info, &root) {
        bail!(
            "downloaded and extracted {} into {}, but its files are still incomplete: {}",
            info.name,
            root.display(),
            missing_summary(info, &root)
        );
    }
    tracing::info!("{} is ready in {}", info.name, root.display());
    Ok(())
}

fn missing_summary(info: &DatasetInfo, root: &Path) -> String {
    [Split::Train, Split::Test]
        .iter()
        .filter_map(|&s| info.locate(root, s).err())
        .map(|e| e.to_string().replace('\n', " "))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The manual fallback: which files, from where, into which folder.
fn manual_hint(source: &Source, root: &Path) -> String {
    let files: Vec<String> = source
        .files
        .iter()
        .map(|f| format!("{} (MD5 {})", f.name, f.md5))
        .collect();
    let what = match &source.layout {
        Layout::TarGz { folder } => format!("and extract it there (it holds {folder}/)"),
        Layout::Gzipped { .. } => "(gunzipped or not)".to_string(),
    };
    format!(
        "to install it by hand, download {} from {} into {} {what}; or point {} at a mirror that serves them, or set {}=0 to stop downloading",
        files.join(", "),
        source.mirrors.join(" or "),
        source.download_dir(root).display(),
        super::sources::MIRROR_ENV,
        DOWNLOAD_ENV,
    )
}

fn agent(opts: &Options) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_resolve(Some(opts.connect_timeout))
        .timeout_connect(Some(opts.connect_timeout))
        .timeout_recv_response(Some(opts.read_timeout))
        .timeout_per_read(Some(opts.read_timeout))
        .user_agent(format!("imgclf/{}", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

/// The MD5 of a file as 32 lower-case hex digits.
pub fn md5_file(path: &Path) -> Result<String> {
    use md5::{Digest, Md5};
    let mut f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut h = Md5::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

/// Downloads `file` into `folder` unless a verified copy is there; returns its path.
fn fetch_verified(
    agent: &ureq::Agent,
    source: &Source,
    file: &RemoteFile,
    folder: &Path,
    root: &Path,
    opts: &Options,
) -> Result<PathBuf> {
    let dest = folder.join(&file.name);
    if dest.is_file() {
        let md5 = md5_file(&dest)?;
        if md5 == file.md5 {
            return Ok(dest);
        }
        std::fs::remove_file(&dest).with_context(|| format!("cannot delete {}", dest.display()))?;
        tracing::warn!(
            "{} has MD5 {md5}, expected {}: deleted it and downloading it again",
            dest.display(),
            file.md5
        );
    }
    let part = part_path(&dest);
    let mut failures = Vec::new();
    for url in source.urls(file) {
        let mut fresh_retry_done = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let resumed_from = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
            if resumed_from > 0 {
                tracing::info!("resuming {url} at byte {resumed_from}");
            } else {
                tracing::info!("downloading {url} to {}", dest.display());
            }
            match get_into(agent, &url, &part, opts) {
                Ok(()) => {}
                Err(e) => {
                    failures.push(format!("{url}: {}", e.message));
                    if e.progress && attempt < opts.attempts_per_url {
                        continue;
                    }
                    break;
                }
            }
            let md5 = md5_file(&part)?;
            if md5 == file.md5 {
                std::fs::rename(&part, &dest).with_context(|| {
                    format!("cannot rename {} to {}", part.display(), dest.display())
                })?;
                return Ok(dest);
            }
            std::fs::remove_file(&part)
                .with_context(|| format!("cannot delete {}", part.display()))?;
            failures.push(format!(
                "{url}: checksum mismatch: the download has MD5 {md5}, expected {}; deleted it",
                file.md5
            ));
            tracing::warn!("{}", failures.last().unwrap());
            // A stale partial file from another version may have spoiled a resumed download:
            // one fresh try of the same URL.
            if resumed_from > 0 && !fresh_retry_done {
                fresh_retry_done = true;
                continue;
            }
            break;
        }
    }
    bail!(
        "cannot download {} for {}; tried:\n  - {}\n{}",
        file.name,
        source.dataset,
        failures.join("\n  - "),
        manual_hint(source, root)
    )
}

struct AttemptError {
    message: String,
    /// Bytes arrived before the failure, so trying the same URL again resumes further on.
    progress: bool,
}

fn attempt_error(message: impl Into<String>, progress: bool) -> AttemptError {
    AttemptError {
        message: message.into(),
        progress,
    }
}

/// `bytes START-END/TOTAL` of a Content-Range header: (START, TOTAL if given).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _) = range.split_once('-')?;
    Some((start.trim().parse().ok()?, total.trim().parse().ok()))
}

/// One GET of `url`, appended to `part` when the server resumes (206), written from the
/// start otherwise (200).
fn get_into(
    agent: &ureq::Agent,
    url: &str,
    part: &Path,
    opts: &Options,
) -> Result<(), AttemptError> {
    let offset = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let mut request = agent.get(url);
    if offset > 0 {
        request = request.header("Range", format!("bytes={offset}-"));
    }
    let response = request
        .call()
        .map_err(|e| attempt_error(e.to_string(), false))?;
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let length: Option<u64> = header("content-length").and_then(|v| v.trim().parse().ok());
    let (mut file, start, total) = match status {
        200 => {
            let f = File::create(part).map_err(|e| {
                attempt_error(format!("cannot write {}: {e}", part.display()), false)
            })?;
            (f, 0, length)
        }
        206 if offset > 0 => {
            let (start, total) = header("content-range")
                .as_deref()
                .and_then(parse_content_range)
                .ok_or_else(|| {
                    attempt_error("206 response without a usable Content-Range", false)
                })?;
            if start != offset {
                // Start over rather than splice at the wrong place.
                let _ = std::fs::remove_file(part);
                return Err(attempt_error(
                    format!("asked to resume at byte {offset}, the server resumed at {start}"),
                    true,
                ));
            }
            let f = std::fs::OpenOptions::new()
                .append(true)
                .open(part)
                .map_err(|e| {
                    attempt_error(format!("cannot write {}: {e}", part.display()), false)
                })?;
            (f, offset, total.or(length.map(|l| l + offset)))
        }
        // The partial file already holds everything: its checksum decides.
        416 if offset > 0 => return Ok(()),
        _ => {
            let reason = response
                .status()
                .canonical_reason()
                .map(|r| format!(" {r}"))
                .unwrap_or_default();
            return Err(attempt_error(format!("HTTP {status}{reason}"), false));
        }
    };
    let bar = if opts.progress {
        indicatif::ProgressBar::with_draw_target(
            total,
            indicatif::ProgressDrawTarget::stderr_with_hz(4),
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    bar.set_message(url.rsplit('/').next().unwrap_or(url).to_string());
    bar.set_position(start);
    let mut reader = response.into_body().into_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut received = 0u64;
    let result = loop {
        match reader.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if let Err(e) = file.write_all(&buf[..n]) {
                    break Err(attempt_error(
                        format!("cannot write {}: {e}", part.display()),
                        false,
                    ));
                }
                received += n as u64;
                bar.inc(n as u64);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                break Err(attempt_error(
                    format!("the transfer failed after {} bytes: {e}", start + received),
                    received > 0,
                ))
            }
        }
    };
    bar.finish_and_clear();
    let _ = file.sync_all();
    result?;
    if let Some(total) = total {
        if start + received != total {
            return Err(attempt_error(
                format!(
                    "the connection closed after {} of {total} bytes",
                    start + received
                ),
                received > 0,
            ));
        }
    }
    Ok(())
}

/// Extracts `archive` into a temporary folder under `root`, checks it holds `folder/` with
/// every file of the dataset (and the `contents` MD5s when known), then renames `folder/` into
/// `root`.
fn extract_tar_gz(
    info: &DatasetInfo,
    archive: &Path,
    root: &Path,
    folder: &str,
    contents: &[RemoteFile],
) -> Result<()> {
    let tmp = root.join(format!(".imgclf-extract-{folder}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let cleanup = TempTree(tmp.clone());
    tracing::info!("extracting {}", archive.display());
    let f = File::open(archive).with_context(|| format!("cannot read {}", archive.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(f)));
    tar.set_preserve_permissions(false);
    tar.unpack(&tmp)
        .with_context(|| format!("cannot extract {}", archive.display()))?;
    let extracted = tmp.join(folder);
    if !extracted.is_dir() {
        bail!(
            "{} does not hold the folder {folder}/ the dataset needs",
            archive.display()
        );
    }
    if !present(info, &tmp) {
        bail!(
            "{} does not hold every {} file: {}",
            archive.display(),
            info.name,
            missing_summary(info, &tmp)
        );
    }
    for c in contents {
        let p = extracted.join(&c.name);
        if !p.is_file() {
            bail!("{} lacks {folder}/{}", archive.display(), c.name);
        }
        let md5 = md5_file(&p)?;
        if md5 != c.md5 {
            bail!(
                "{folder}/{} extracted from {} has MD5 {md5}, expected {}",
                c.name,
                archive.display(),
                c.md5
            );
        }
    }
    let target = root.join(folder);
    std::fs::rename(&extracted, &target).with_context(|| {
        format!(
            "cannot move the extracted {} to {}",
            extracted.display(),
            target.display()
        )
    })?;
    drop(cleanup);
    Ok(())
}

/// Gunzips `gz` into a temporary file beside `plain`, then renames it to `plain`.
fn gunzip_atomic(gz: &Path, plain: &Path) -> Result<()> {
    let tmp = plain.with_file_name(format!(
        ".{}.tmp-{}",
        plain.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let f = File::open(gz).with_context(|| format!("cannot read {}", gz.display()))?;
        let mut dec = flate2::read::MultiGzDecoder::new(std::io::BufReader::new(f));
        let mut out =
            File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::io::copy(&mut dec, &mut out)
            .with_context(|| format!("cannot gunzip {}", gz.display()))?;
        out.sync_all()?;
        std::fs::rename(&tmp, plain)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), plain.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes a temporary folder when dropped.
struct TempTree(PathBuf);

impl Drop for TempTree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An exclusive advisory lock (flock) held until dropped; released by the OS if the process dies.
struct FolderLock(#[allow(dead_code)] File);

impl FolderLock {
    fn acquire(path: &Path) -> Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot create the lock file {}", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::io::AsRawFd;
            // SAFETY: flock on a file descriptor this function owns for the lock's lifetime.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                tracing::info!(
                    "another imgclf is downloading into this folder ({}); waiting for it",
                    path.display()
                );
                // SAFETY: as above, blocking this time.
                if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
                    bail!(
                        "cannot lock {}: {}",
                        path.display(),
                        std::io::Error::last_os_error()
                    );
                }
            }
        }
        Ok(FolderLock(f))
    }
}

/// How far a dataset folder can be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// Every file read has torchvision's MD5 (or the one of the supplied file list).
    Verified { files: usize },
    /// Some files differ from the known MD5s: (file, its MD5, the expected MD5).
    Mismatch(Vec<(PathBuf, String, String)>),
    /// Present, but no checksum is known for what is there (the reason says why).
    Unverified(String),
    /// Some split's files are missing.
    Missing,
}

/// The state of one dataset in one folder, for `imgclf datasets list`.
#[derive(Debug, Clone)]
pub struct Status {
    pub dir: PathBuf,
    /// Files found per split, or what is missing.
    pub train: Result<Vec<PathBuf>, String>,
    pub test: Result<Vec<PathBuf>, String>,
    pub verification: Verification,
}

/// Finds and checks the dataset's files in `dir` against `source`'s MD5s.
pub fn status(info: &DatasetInfo, dir: &Path, source: Option<&Source>) -> Result<Status> {
    let dir = super::expand_home(dir);
    let found = |split| info.locate(&dir, split).map_err(|e| e.to_string());
    let (train, test) = (found(Split::Train), found(Split::Test));
    let verification = match (&train, &test, source) {
        (Ok(a), Ok(b), Some(source)) => {
            let mut files: Vec<&PathBuf> = a.iter().chain(b).collect();
            files.sort();
            files.dedup();
            verify(&files, source)?
        }
        (Ok(_), Ok(_), None) => Verification::Unverified("no checksums known".into()),
        _ => Verification::Missing,
    };
    Ok(Status {
        dir,
        train,
        test,
        verification,
    })
}

fn verify(files: &[&PathBuf], source: &Source) -> Result<Verification> {
    let known = |name: &str| {
        source
            .contents
            .iter()
            .chain(&source.files)
            .find(|f| f.name == name)
            .cloned()
    };
    let mut mismatches = Vec::new();
    let mut unknown = Vec::new();
    for path in files {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        // A file with a known MD5, or a plain IDX file whose downloaded `.gz` is beside it.
        let checked = match known(&name) {
            Some(f) => Some(((*path).clone(), f)),
            None => {
                let gz = path.with_file_name(format!("{name}.gz"));
                known(&format!("{name}.gz"))
                    .filter(|_| gz.is_file())
                    .map(|f| (gz, f))
            }
        };
        match checked {
            Some((p, f)) => {
                let md5 = md5_file(&p)?;
                if md5 != f.md5 {
                    mismatches.push((p, md5, f.md5));
                }
            }
            None => unknown.push(name.to_string()),
        }
    }
    Ok(if !mismatches.is_empty() {
        Verification::Mismatch(mismatches)
    } else if !unknown.is_empty() {
        Verification::Unverified(format!("no known MD5 for {}", unknown.join(", ")))
    } else {
        Verification::Verified { files: files.len() }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_is_parsed() {
        assert_eq!(
            parse_content_range("bytes 100-199/200"),
            Some((100, Some(200)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("items 5-9/10"), None);
    }

    #[test]
    fn md5_of_known_bytes() {
        let dir = super::super::testutil::TempDir::new("md5");
        let p = dir.write("abc", b"abc");
        assert_eq!(md5_file(&p).unwrap(), "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(
            part_path(Path::new("/x/a.tar.gz")),
            PathBuf::from("/x/a.tar.gz.part")
        );
    }
}

#[cfg(test)]
#[path = "download_tests.rs"]
mod loopback_tests;
