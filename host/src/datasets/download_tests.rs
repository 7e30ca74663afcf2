//! Downloads against a loopback HTTP server written here (std `TcpListener`, one thread per
//! connection, `Connection: close`), serving CIFAR-format tarballs and IDX `.gz` files made in
//! the official formats: success, mirror fallback, resume after a dropped connection, resume of
//! an earlier partial file, corrupt file, 404, a refused connection and a stalled server.

use super::*;
use crate::datasets::sources::{Layout, RemoteFile, Source};
use crate::datasets::testutil::{gzip, label, pixels, py2_cifar_batch, PickleWriter, TempDir};
use crate::datasets::{find, Split};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// How the server answers a path prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// The file, honouring `Range`.
    Ok,
    /// The first request gets the headers of the whole file and half of it, then the
    /// connection closes; later requests are served as `Ok`.
    DropFirst,
    /// The file with one byte changed.
    Corrupt,
    /// 404 Not Found.
    Missing,
    /// Reads the request and never answers (until the test ends, at most 10 s).
    Stall,
}

/// (path, Range header) of every request, in order.
type RequestLog = Arc<Mutex<Vec<(String, Option<String>)>>>;

struct Server {
    port: u16,
    log: RequestLog,
    stop: Arc<AtomicBool>,
}

impl Server {
    fn start(files: HashMap<String, Vec<u8>>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let files = Arc::new(files);
        let dropped = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let (log2, stop2) = (log.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (files, log, stop, dropped) =
                    (files.clone(), log2.clone(), stop2.clone(), dropped.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &files, &log, &stop, &dropped);
                });
            }
        });
        Server { port, log, stop }
    }

    fn url(&self, mode: &str) -> String {
        format!("http://127.0.0.1:{}/{mode}/", self.port)
    }

    fn requests(&self) -> Vec<(String, Option<String>)> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(
    mut conn: TcpStream,
    files: &HashMap<String, Vec<u8>>,
    log: &Mutex<Vec<(String, Option<String>)>>,
    stop: &AtomicBool,
    dropped: &Mutex<std::collections::HashSet<String>>,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
        }
    }
    let path = first.split_whitespace().nth(1).unwrap_or("").to_string();
    if stop.load(Ordering::SeqCst) || path.is_empty() {
        return Ok(());
    }
    log.lock().unwrap().push((path.clone(), range.clone()));
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let mode = match parts.next().unwrap_or("") {
        "ok" => Mode::Ok,
        "drop" => Mode::DropFirst,
        "corrupt" => Mode::Corrupt,
        "stall" => Mode::Stall,
        _ => Mode::Missing,
    };
    let name = parts.next().unwrap_or("").to_string();
    let body = files.get(&name);
    let send_404 = |conn: &mut TcpStream| {
        conn.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found",
        )
    };
    let Some(body) = body else {
        return send_404(&mut conn);
    };
    match mode {
        Mode::Missing => send_404(&mut conn),
        Mode::Stall => {
            let start = Instant::now();
            while !stop.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        }
        Mode::DropFirst if dropped.lock().unwrap().insert(name.clone()) => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            conn.write_all(head.as_bytes())?;
            conn.write_all(&body[..body.len() / 2])?;
            conn.flush()?;
            conn.shutdown(std::net::Shutdown::Both)
        }
        _ => {
            let mut body = body.clone();
            if mode == Mode::Corrupt {
                let mid = body.len() / 2;
                body[mid] ^= 0xff;
            }
            let start = range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|s| s.parse::<usize>().ok());
            let head = match start {
                Some(s) if s >= body.len() => {
                    let h = format!(
                        "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    return conn.write_all(h.as_bytes());
                }
                Some(s) => format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {s}-{}/{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len() - 1,
                    body.len(),
                    body.len() - s
                ),
                None => format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                ),
            };
            conn.write_all(head.as_bytes())?;
            conn.write_all(&body[start.unwrap_or(0)..])
        }
    }
}

fn md5_hex(bytes: &[u8]) -> String {
    use md5::{Digest, Md5};
    Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

const N_PER_BATCH: usize = 12;

/// `cifar-10-python.tar.gz` as the official archive lays it out: the folder, five training
/// batches, the test batch and `batches.meta`, each a Python 2 pickle.
fn cifar10_tarball() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    b.append_data(&mut dir, "cifar-10-batches-py/", std::io::empty())
        .unwrap();
    let mut meta = PickleWriter::new();
    meta.op(b'}').put().op(b'(');
    meta.string(b"num_cases_per_batch").int(N_PER_BATCH as i64);
    meta.string(b"label_names").op(b']').put().op(b'(');
    for n in crate::datasets::classes::class_names("CIFAR10").unwrap() {
        meta.string(n.as_bytes());
    }
    meta.op(b'e');
    meta.string(b"num_vis").int(3072).op(b'u');
    let meta = meta.finish();
    let batch = py2_cifar_batch(N_PER_BATCH, 10, false);
    let mut entries: Vec<(String, Vec<u8>)> = (1..=5)
        .map(|i| (format!("data_batch_{i}"), batch.clone()))
        .collect();
    entries.push(("test_batch".into(), batch.clone()));
    entries.push(("batches.meta".into(), meta));
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, format!("cifar-10-batches-py/{name}"), &data[..])
            .unwrap();
    }
    gzip(&b.into_inner().unwrap())
}

fn idx_images(n: usize) -> Vec<u8> {
    let mut v = 0x0803u32.to_be_bytes().to_vec();
    for d in [n as u32, 28, 28] {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend(pixels(n, 28 * 28));
    v
}

fn idx_labels(n: usize) -> Vec<u8> {
    let mut v = 0x0801u32.to_be_bytes().to_vec();
    v.extend_from_slice(&(n as u32).to_be_bytes());
    v.extend((0..n).map(|i| label(i, 10) as u8));
    v
}

/// The four `.gz` files of an MNIST-family dataset.
fn idx_files() -> Vec<(String, Vec<u8>)> {
    vec![
        ("train-images-idx3-ubyte.gz".into(), gzip(&idx_images(30))),
        ("train-labels-idx1-ubyte.gz".into(), gzip(&idx_labels(30))),
        ("t10k-images-idx3-ubyte.gz".into(), gzip(&idx_images(10))),
        ("t10k-labels-idx1-ubyte.gz".into(), gzip(&idx_labels(10))),
    ]
}

fn source(
    dataset: &str,
    mirrors: Vec<String>,
    files: &[(String, Vec<u8>)],
    layout: Layout,
) -> Source {
    Source {
        dataset: dataset.into(),
        mirrors,
        files: files
            .iter()
            .map(|(n, d)| RemoteFile {
                name: n.clone(),
                md5: md5_hex(d),
            })
            .collect(),
        layout,
        contents: Vec::new(),
        origin: "test".into(),
    }
}

fn cifar_source(mirrors: Vec<String>, tarball: &[u8]) -> Source {
    let files = [("cifar-10-python.tar.gz".to_string(), tarball.to_vec())];
    source(
        "CIFAR10",
        mirrors,
        &files,
        Layout::TarGz {
            folder: "cifar-10-batches-py".into(),
        },
    )
}

fn quick() -> Options {
    Options {
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_millis(400),
        attempts_per_url: 3,
        progress: false,
    }
}

/// Files and folders directly in `dir` (names), sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn cifar10_downloads_verifies_and_extracts_to_torchvision_layout() {
    let tarball = cifar10_tarball();
    let server = Server::start(HashMap::from([(
        "cifar-10-python.tar.gz".to_string(),
        tarball.clone(),
    )]));
    let root = TempDir::new("dl-cifar");
    let info = find("CIFAR10").unwrap();
    let mut src = cifar_source(vec![server.url("ok")], &tarball);
    // The extracted batches' MD5s are checked too when the file list gives them.
    let batch_md5 = md5_hex(&py2_cifar_batch(N_PER_BATCH, 10, false));
    src.contents = [
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
    ]
    .iter()
    .chain(&["data_batch_5", "test_batch"])
    .map(|n| RemoteFile {
        name: n.to_string(),
        md5: batch_md5.clone(),
    })
    .collect();
    assert!(!present(info, root.path()));
    download(info, root.path(), &src, &quick()).unwrap();
    assert_eq!(
        listing(root.path()),
        [
            ".imgclf-download-CIFAR10.lock",
            "cifar-10-batches-py",
            "cifar-10-python.tar.gz"
        ]
    );
    let train = info.load(root.path(), Split::Train).unwrap();
    assert_eq!(train.len(), 5 * N_PER_BATCH);
    assert_eq!(train.labels[..3], [1, 4, 7]);
    assert_eq!(
        info.load(root.path(), Split::Test).unwrap().len(),
        N_PER_BATCH
    );
    let st = status(info, root.path(), Some(&src)).unwrap();
    assert_eq!(st.verification, Verification::Verified { files: 6 });
    // Present now: a second download fetches nothing.
    let before = server.requests().len();
    download(info, root.path(), &src, &quick()).unwrap();
    assert_eq!(server.requests().len(), before);
}

#[test]
fn mnist_family_downloads_into_name_raw_gunzipped_beside_the_gz() {
    let files = idx_files();
    let server = Server::start(files.iter().cloned().collect());
    let root = TempDir::new("dl-kmnist");
    let info = find("KMNIST").unwrap();
    // First mirror answers 404: the second is used, as torchvision falls back.
    let src = source(
        "KMNIST",
        vec![server.url("missing"), server.url("ok")],
        &files,
        Layout::Gzipped {
            subdir: "KMNIST/raw".into(),
        },
    );
    download(info, root.path(), &src, &quick()).unwrap();
    let raw = root.path().join("KMNIST/raw");
    let mut expected: Vec<String> = files
        .iter()
        .flat_map(|(n, _)| [n.clone(), n.trim_end_matches(".gz").to_string()])
        .collect();
    expected.sort();
    assert_eq!(listing(&raw), expected);
    let test = info.load(root.path(), Split::Test).unwrap();
    assert_eq!((test.len(), test.height, test.width), (10, 28, 28));
    assert_eq!(
        info.locate(root.path(), Split::Train).unwrap()[0],
        raw.join("train-images-idx3-ubyte"),
        "the gunzipped file is read"
    );
    let paths: Vec<String> = server.requests().into_iter().map(|r| r.0).collect();
    assert_eq!(paths.len(), 8, "{paths:?}");
    assert!(paths[0].starts_with("/missing/") && paths[1].starts_with("/ok/"));
    let st = status(info, root.path(), Some(&src)).unwrap();
    assert_eq!(st.verification, Verification::Verified { files: 4 });
}

#[test]
fn a_dropped_connection_is_resumed_with_a_range_request() {
    let tarball = cifar10_tarball();
    let server = Server::start(HashMap::from([(
        "cifar-10-python.tar.gz".to_string(),
        tarball.clone(),
    )]));
    let root = TempDir::new("dl-drop");
    let info = find("CIFAR10").unwrap();
    let src = cifar_source(vec![server.url("drop")], &tarball);
    download(info, root.path(), &src, &quick()).unwrap();
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[0].1, None);
    assert_eq!(
        reqs[1].1.as_deref(),
        Some(format!("bytes={}-", tarball.len() / 2).as_str())
    );
    assert_eq!(
        std::fs::read(root.path().join("cifar-10-python.tar.gz")).unwrap(),
        tarball
    );
    assert_eq!(
        info.load(root.path(), Split::Test).unwrap().len(),
        N_PER_BATCH
    );
}

#[test]
fn a_partial_file_of_an_earlier_run_is_resumed() {
    let tarball = cifar10_tarball();
    let server = Server::start(HashMap::from([(
        "cifar-10-python.tar.gz".to_string(),
        tarball.clone(),
    )]));
    let root = TempDir::new("dl-part");
    let info = find("CIFAR10").unwrap();
    root.write("cifar-10-python.tar.gz.part", &tarball[..1000]);
    let src = cifar_source(vec![server.url("ok")], &tarball);
    download(info, root.path(), &src, &quick()).unwrap();
    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].1.as_deref(), Some("bytes=1000-"));
    assert!(!root.path().join("cifar-10-python.tar.gz.part").exists());
    assert!(present(info, root.path()));
}

#[test]
fn a_checksum_mismatch_deletes_the_download_and_says_so() {
    let tarball = cifar10_tarball();
    let server = Server::start(HashMap::from([(
        "cifar-10-python.tar.gz".to_string(),
        tarball.clone(),
    )]));
    let root = TempDir::new("dl-corrupt");
    let info = find("CIFAR10").unwrap();
    let src = cifar_source(vec![server.url("corrupt")], &tarball);
    let e = format!(
        "{:#}",
        download(info, root.path(), &src, &quick()).unwrap_err()
    );
    assert!(e.contains("checksum mismatch"), "{e}");
    assert!(
        e.contains(&format!("expected {}", md5_hex(&tarball))),
        "{e}"
    );
    assert!(e.contains("deleted it"), "{e}");
    assert!(e.contains(&server.url("corrupt")), "{e}");
    assert_eq!(listing(root.path()), [".imgclf-download-CIFAR10.lock"]);
    // A good mirror after the corrupt one is used.
    let src = cifar_source(vec![server.url("corrupt"), server.url("ok")], &tarball);
    download(info, root.path(), &src, &quick()).unwrap();
    assert!(present(info, root.path()));
}

#[test]
fn not_found_and_refused_name_the_urls_the_files_and_the_folder() {
    let files = idx_files();
    let server = Server::start(files.iter().cloned().collect());
    let root = TempDir::new("dl-404");
    let info = find("FashionMNIST").unwrap();
    // A port nothing listens on: connection refused, as when a network blocks the host.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let refused = format!("http://127.0.0.1:{closed}/");
    let src = source(
        "FashionMNIST",
        vec![server.url("missing"), refused.clone()],
        &files,
        Layout::Gzipped {
            subdir: "FashionMNIST/raw".into(),
        },
    );
    let e = format!(
        "{:#}",
        download(info, root.path(), &src, &quick()).unwrap_err()
    );
    let raw = root.path().join("FashionMNIST/raw");
    for needle in [
        format!(
            "{}train-images-idx3-ubyte.gz: HTTP 404",
            server.url("missing")
        ),
        format!("{refused}train-images-idx3-ubyte.gz: "),
        "t10k-labels-idx1-ubyte.gz (MD5 ".to_string(),
        format!("into {}", raw.display()),
        "IMGCLF_DATASET_MIRROR".to_string(),
    ] {
        assert!(e.contains(&needle), "`{needle}` missing from: {e}");
    }
    assert!(
        listing(&raw).is_empty(),
        "nothing left behind: {:?}",
        listing(&raw)
    );
    assert!(!present(info, root.path()));
}

#[test]
fn a_stalled_server_times_out_instead_of_hanging() {
    let tarball = cifar10_tarball();
    let server = Server::start(HashMap::from([(
        "cifar-10-python.tar.gz".to_string(),
        tarball.clone(),
    )]));
    let root = TempDir::new("dl-stall");
    let info = find("CIFAR10").unwrap();
    let src = cifar_source(vec![server.url("stall")], &tarball);
    let t = Instant::now();
    let e = format!(
        "{:#}",
        download(info, root.path(), &src, &quick()).unwrap_err()
    );
    // The server would hold the connection for 10 s; the 0.4 s read timeout ends it first.
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    assert!(
        e.to_lowercase().contains("timeout") || e.contains("timed out"),
        "{e}"
    );
    assert!(e.contains(&server.url("stall")), "{e}");
    assert!(!root.path().join("cifar-10-batches-py").exists());
}

#[test]
fn a_broken_archive_leaves_no_dataset_folder() {
    // The file list vouches for a truncated archive: extraction fails, and neither a
    // half-extracted folder nor the temporary one remains.
    let tarball = cifar10_tarball();
    let broken = tarball[..tarball.len() / 3].to_vec();
    let server = Server::start(HashMap::from([(
        "cifar-10-python.tar.gz".to_string(),
        broken.clone(),
    )]));
    let root = TempDir::new("dl-broken");
    let info = find("CIFAR10").unwrap();
    let src = cifar_source(vec![server.url("ok")], &broken);
    let e = format!(
        "{:#}",
        download(info, root.path(), &src, &quick()).unwrap_err()
    );
    assert!(
        e.contains("cannot extract") || e.contains("does not hold every CIFAR10 file"),
        "{e}"
    );
    assert_eq!(
        listing(root.path()),
        [".imgclf-download-CIFAR10.lock", "cifar-10-python.tar.gz"]
    );
    assert!(info.locate(root.path(), Split::Train).is_err());
}

#[test]
fn an_incomplete_existing_folder_is_not_overwritten() {
    let root = TempDir::new("dl-existing");
    root.write("cifar-10-batches-py/data_batch_1", b"user's file");
    let info = find("CIFAR10").unwrap();
    let src = cifar_source(vec!["http://127.0.0.1:9/".into()], b"x");
    let e = format!(
        "{:#}",
        download(info, root.path(), &src, &quick()).unwrap_err()
    );
    assert!(
        e.contains("exists but does not hold every CIFAR10 file"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(root.path().join("cifar-10-batches-py/data_batch_1")).unwrap(),
        b"user's file"
    );
}
