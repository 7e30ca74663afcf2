//! Datasets that arrive by themselves and prediction on the user's images, through the `imgclf`
//! binary: the real Fashion-MNIST served by a loopback mirror (`datasets download`, `datasets
//! list`, the automatic download before a command reads the data, the offline error), then
//! `predict` and `evaluate`'s confusion matrix with a tiny run trained on it.

use imgclf_tests::*;
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const GZ_FILES: [&str; 4] = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
];

/// A loopback HTTP server for the files of one folder (GET only, no Range, `Connection: close`).
struct Mirror {
    port: u16,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Mirror {
    fn serve(files: HashMap<String, PathBuf>) -> Mirror {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stop2) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut first = String::new();
                let _ = reader.read_line(&mut first);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                }
                let name = first
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("")
                    .trim_start_matches('/')
                    .to_string();
                let _ = match files.get(&name).and_then(|p| std::fs::read(p).ok()) {
                    Some(body) => conn
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                body.len()
                            )
                            .as_bytes(),
                        )
                        .and_then(|_| conn.write_all(&body)),
                    None => conn.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    ),
                };
            }
        });
        Mirror {
            port,
            requests,
            stop,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Debian's Fashion-MNIST `.gz` files (recompressed: their MD5s are not torchvision's, so the
/// file list with their checksums is supplied as a user would for another mirror).
fn debian_fashion_mnist_mirror(d: &Path) -> (Mirror, PathBuf) {
    let src = Path::new(FASHION_MNIST);
    let files: HashMap<String, PathBuf> = GZ_FILES
        .iter()
        .map(|n| (n.to_string(), src.join(n)))
        .collect();
    let mirror = Mirror::serve(files);
    let md5s: serde_json::Map<String, Value> = GZ_FILES
        .iter()
        .map(|n| {
            let md5 = imgclf::datasets::download::md5_file(&src.join(n))
                .expect("Fashion-MNIST (apt-get install dataset-fashion-mnist)");
            (n.to_string(), Value::String(md5))
        })
        .collect();
    let sources = d.join("sources.json");
    let doc = serde_json::json!({"FashionMNIST": {"mirrors": [mirror.url()], "files": md5s}});
    std::fs::write(&sources, doc.to_string()).unwrap();
    (mirror, sources)
}

fn list_json(root: &Path, sources: &Path) -> Vec<Value> {
    let (code, out, err) = run(imgclf(&workspace()).args([
        "datasets",
        "list",
        "--json",
        "--root",
        root.to_str().unwrap(),
        "--sources",
        sources.to_str().unwrap(),
    ]));
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["datasets"].as_array().unwrap().clone()
}

fn entry<'a>(list: &'a [Value], name: &str) -> &'a Value {
    list.iter().find(|d| d["name"] == name).unwrap()
}

#[test]
fn fashion_mnist_downloads_from_a_mirror_lists_as_verified_and_loads_like_the_original() {
    let d = scratch("datasets-download");
    let (mirror, sources) = debian_fashion_mnist_mirror(&d);
    let root = d.join("data");

    let before = list_json(&root, &sources);
    for name in ["CIFAR10", "CIFAR100", "MNIST", "FashionMNIST", "KMNIST"] {
        assert_eq!(entry(&before, name)["downloadable"], true, "{name}");
    }
    for ds in &before {
        assert_eq!(ds["state"], "missing", "{ds}");
        assert_eq!(ds["present"], false);
        assert_eq!(ds["dir"], root.to_str().unwrap());
    }
    assert_eq!(
        entry(&before, "CIFAR10")["mirrors"][0],
        "https://www.cs.toronto.edu/~kriz/"
    );
    assert_eq!(
        entry(&before, "CIFAR10")["files"][0]["md5"],
        "c58f30108f718f92721af3b95e74349a"
    );

    let (code, out, err) = run(imgclf(&workspace()).args([
        "datasets",
        "download",
        "FashionMNIST",
        "--root",
        root.to_str().unwrap(),
        "--sources",
        sources.to_str().unwrap(),
    ]));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("FashionMNIST downloaded and verified into"),
        "{out}"
    );
    assert_eq!(mirror.requests.load(Ordering::SeqCst), 4);
    let raw = root.join("FashionMNIST/raw");
    for n in GZ_FILES {
        assert!(raw.join(n).is_file(), "{n}");
        assert!(
            raw.join(n.trim_end_matches(".gz")).is_file(),
            "{n} gunzipped"
        );
    }

    let after = list_json(&root, &sources);
    let f = entry(&after, "FashionMNIST");
    assert_eq!(f["state"], "verified", "{f}");
    assert_eq!(f["present"], true);
    assert_eq!(entry(&after, "MNIST")["state"], "missing");

    // Torchvision's MD5s (no sources file): Debian's recompressed files are reported, not trusted.
    let (code, out, err) = run(imgclf(&workspace())
        .env_remove("IMGCLF_DATASET_SOURCES")
        .args(["datasets", "list", "--root", root.to_str().unwrap()]));
    assert_eq!(code, 0, "{err}");
    let line = out.lines().find(|l| l.starts_with("FashionMNIST")).unwrap();
    assert!(line.contains("mismatch"), "{out}");
    assert!(
        out.contains("expected 8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        "{out}"
    );

    // The same images and labels as the files they came from.
    let info = imgclf::datasets::find("FashionMNIST").unwrap();
    for split in [
        imgclf::datasets::Split::Train,
        imgclf::datasets::Split::Test,
    ] {
        let got = info.load(&root, split).unwrap();
        let want = info.load(Path::new(FASHION_MNIST), split).unwrap();
        assert!(got == want, "{split}");
    }

    // A second download finds it in place and fetches nothing.
    let (code, out, _) = run(imgclf(&workspace()).args([
        "datasets",
        "download",
        "FashionMNIST",
        "--root",
        root.to_str().unwrap(),
        "--sources",
        sources.to_str().unwrap(),
    ]));
    assert_eq!(code, 0);
    assert!(
        out.contains("is already in") && out.contains("verified"),
        "{out}"
    );
    assert_eq!(mirror.requests.load(Ordering::SeqCst), 4);

    let (code, _, err) = run(imgclf(&workspace()).args(["datasets", "download", "fashionmnist"]));
    assert_eq!(code, 1);
    assert!(err.contains("did you mean FashionMNIST?"), "{err}");
}

fn preview(data: &Path, out: &Path) -> std::process::Command {
    let mut c = imgclf(&workspace());
    c.args([
        "preview",
        "--config",
        "configs/fashion_mnist/resnet_preact.yaml",
        "dataset.dataset_dir",
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--count",
        "4",
    ]);
    c
}

#[test]
fn a_missing_dataset_is_downloaded_before_use_and_offline_is_a_clear_error() {
    let d = scratch("datasets-auto");
    let (mirror, sources) = debian_fashion_mnist_mirror(&d);

    // Downloads off: the loader's not-found error, and no request.
    let data = d.join("off");
    let (code, _, err) = run(preview(&data, &d.join("off.png")).env("IMGCLF_DOWNLOAD", "0"));
    assert_eq!(code, 1);
    assert!(err.contains("FashionMNIST train files not found"), "{err}");
    assert_eq!(mirror.requests.load(Ordering::SeqCst), 0);

    // Unreachable mirror: the URL tried, the files expected and the folder to put them in.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://127.0.0.1:{}/", l.local_addr().unwrap().port())
    };
    let data = d.join("offline");
    let (code, _, err) = run(preview(&data, &d.join("offline.png"))
        .env("IMGCLF_DATASET_MIRROR", &closed)
        .env("IMGCLF_DOWNLOAD_TIMEOUT", "5"));
    assert_eq!(code, 1);
    for needle in [
        format!("{closed}train-images-idx3-ubyte.gz"),
        "t10k-labels-idx1-ubyte.gz (MD5 bb300cfdad3c16e7a12a480ee83cd310)".to_string(),
        format!("into {}", data.join("FashionMNIST/raw").display()),
    ] {
        assert!(err.contains(&needle), "`{needle}` missing from: {err}");
    }

    // The mirror through the environment: preview downloads, then reads the real images.
    let data = d.join("auto");
    let out = d.join("grid.png");
    let (code, _, err) = run(preview(&data, &out).env("IMGCLF_DATASET_SOURCES", &sources));
    assert_eq!(code, 0, "{err}");
    assert!(out.is_file());
    assert!(data
        .join("FashionMNIST/raw/train-images-idx3-ubyte")
        .is_file());
    assert_eq!(mirror.requests.load(Ordering::SeqCst), 4);
}

fn write_png_grey(path: &Path, w: u32, h: u32, pixels: &[u8]) {
    let f = std::fs::File::create(path).unwrap();
    let mut e = png::Encoder::new(std::io::BufWriter::new(f), w, h);
    e.set_color(png::ColorType::Grayscale);
    e.set_depth(png::BitDepth::Eight);
    e.write_header().unwrap().write_image_data(pixels).unwrap();
}

const FASHION_NAMES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

#[test]
fn predict_matches_evaluate_on_the_same_images_and_evaluate_writes_a_confusion_matrix() {
    let d = scratch("predict");
    let data = d.join("data");
    fashion_mnist_subset(&data, 64, 16);
    let run_dir = d.join("run");
    let (code, _, err) = run(imgclf(&workspace()).args([
        "train",
        "--config",
        "configs/fashion_mnist/resnet_preact.yaml",
        "model.resnet_preact.depth",
        "8",
        "dataset.dataset_dir",
        data.to_str().unwrap(),
        "train.output_dir",
        run_dir.to_str().unwrap(),
        "train.batch_size",
        "32",
        "train.val_first",
        "False",
    ]));
    assert_eq!(code, 0, "{err}");

    // evaluate: predictions.npz plus the confusion matrix beside it.
    let eval_dir = d.join("eval");
    let (code, out, err) = run(imgclf(&workspace()).args([
        "evaluate",
        "--config",
        run_dir.join("config.yaml").to_str().unwrap(),
        "test.checkpoint",
        run_dir.join("model_final.safetensors").to_str().unwrap(),
        "test.output_dir",
        eval_dir.to_str().unwrap(),
    ]));
    assert_eq!(code, 0, "{err}");
    let acc: f64 = out
        .split("acc ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    let (shape, probs) = npz_f32(&eval_dir.join("predictions.npz"), "probs").unwrap();
    assert_eq!(shape, [16, 10]);
    let csv = std::fs::read_to_string(eval_dir.join("confusion_matrix.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 11, "{csv}");
    assert_eq!(rows[0][0], "true\\predicted");
    assert_eq!(rows[0][1..], FASHION_NAMES);
    let counts: Vec<Vec<u64>> = rows[1..]
        .iter()
        .map(|r| r[1..].iter().map(|c| c.parse().unwrap()).collect())
        .collect();
    let total: u64 = counts.iter().flatten().sum();
    let diagonal: u64 = (0..10).map(|i| counts[i][i]).sum();
    assert_eq!(total, 16);
    assert!(
        (diagonal as f64 / 16.0 - acc).abs() < 1e-9,
        "{csv} vs acc {acc}"
    );
    let test = imgclf::datasets::find("FashionMNIST")
        .unwrap()
        .load(&data, imgclf::datasets::Split::Test)
        .unwrap();
    for (t, row) in counts.iter().enumerate() {
        let n = test.labels.iter().filter(|&&l| l == t as i64).count() as u64;
        assert_eq!(
            row.iter().sum::<u64>(),
            n,
            "row {t} counts the images of class {t}"
        );
    }
    let decoder =
        png::Decoder::new(std::fs::File::open(eval_dir.join("confusion_matrix.png")).unwrap());
    let reader = decoder.read_info().unwrap();
    assert!(reader.info().width >= 10 * 48 && reader.info().width == reader.info().height);

    // The 16 test images as 28x28 PNG files: predict sees what evaluate saw.
    let images = d.join("images");
    std::fs::create_dir_all(images.join("nested")).unwrap();
    for i in 0..16 {
        let sub = if i % 2 == 0 { "" } else { "nested/" };
        write_png_grey(
            &images.join(format!("{sub}img{i:02}.png")),
            28,
            28,
            test.image(i),
        );
    }
    // An RGB JPEG at 3x the size: converted to grey, resized and centre-cropped.
    let rgb = image::RgbImage::from_fn(84, 84, |x, y| {
        let v = test.image(0)[(y / 3 * 28 + x / 3) as usize];
        image::Rgb([v, v, v])
    });
    let jpeg = d.join("big.jpg");
    rgb.save(&jpeg).unwrap();
    let out_dir = d.join("predicted");
    let (code, out, err) = run(imgclf(&workspace()).args([
        "predict",
        "--run",
        run_dir.to_str().unwrap(),
        "--top-k",
        "3",
        "--output",
        out_dir.to_str().unwrap(),
        images.to_str().unwrap(),
        jpeg.to_str().unwrap(),
    ]));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("img00.png") && out.contains("big.jpg"),
        "{out}"
    );
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("predict.json")).unwrap())
            .unwrap();
    assert_eq!(doc["dataset"], "FashionMNIST");
    assert_eq!(doc["top_k"], 3);
    let preds = doc["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 17);
    for p in preds {
        let image = p["image"].as_str().unwrap();
        let top = p["top"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        let probs_top: Vec<f64> = top
            .iter()
            .map(|t| t["probability"].as_f64().unwrap())
            .collect();
        assert!(probs_top.windows(2).all(|w| w[0] >= w[1]), "{p}");
        for t in top {
            let class = t["class"].as_u64().unwrap() as usize;
            assert_eq!(t["name"], FASHION_NAMES[class]);
        }
        // Same probabilities as evaluate for the same test image.
        let Some(i) = image
            .rsplit('/')
            .next()
            .and_then(|n| n.strip_prefix("img"))
            .and_then(|n| n.strip_suffix(".png"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        for t in top {
            let class = t["class"].as_u64().unwrap() as usize;
            let want = probs[i * 10 + class] as f64;
            let got = t["probability"].as_f64().unwrap();
            assert!(
                (got - want).abs() < 1e-5,
                "image {i} class {class}: {got} vs {want}"
            );
        }
    }
    let csv = std::fs::read_to_string(out_dir.join("predict.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "image,rank,class,name,probability");
    assert_eq!(lines.len(), 1 + 17 * 3);

    // An unreadable image is an error naming it; a folder without images too.
    let bad = d.join("bad.png");
    std::fs::write(&bad, b"not a png").unwrap();
    let (code, _, err) = run(imgclf(&workspace()).args([
        "predict",
        "--run",
        run_dir.to_str().unwrap(),
        bad.to_str().unwrap(),
    ]));
    assert_eq!(code, 1);
    assert!(err.contains("bad.png"), "{err}");
    let (code, _, err) = run(imgclf(&workspace()).args([
        "predict",
        "--run",
        data.to_str().unwrap(),
        jpeg.to_str().unwrap(),
    ]));
    assert_eq!(code, 1);
    assert!(err.contains("is not an imgclf run directory"), "{err}");
}
