//! RandAugment's and TrivialAugment's operations against torchvision's tensor implementation:
//! every operation at several magnitudes (torchvision's own bins, both signs) on real
//! Fashion-MNIST images (1 x 28 x 28) and on generated RGB images (square and not), through
//! tests/python/check_augment_ops.py; and the magnitude tables against torchvision's
//! augmentation spaces.
//!
//! Colour and histogram operations (brightness, color, contrast, sharpness, posterize,
//! solarize, autocontrast, equalize) and identity must be exact. Affine operations (shear,
//! translate, rotate) with nearest sampling pick a source pixel by rounding a float32 source
//! coordinate; torchvision gets that coordinate from a batched matrix product whose summation
//! order and fused multiply-adds are the BLAS kernel's, imgclf from the same float32 terms
//! summed left to right. The two agree to a few float32 ulps, so they can round to different
//! pixels only where the source coordinate lies within ~1e-5 pixel of a half-pixel boundary:
//! translations (whole pixels) never do, shears and rotations rarely. The tolerance is
//! therefore on the count of differing values: none for translations, at most
//! [`AFFINE_DIFFERING`] of the values per case for shears and rotations. Bilinear sampling
//! additionally rounds the blended value, so it may differ by one level: at most
//! [`BILINEAR_DIFFERING`] of the values, each by at most 1.

use imgclf_plugin_api::image::{apply_op, Interpolation, Op};
use imgclf_plugin_api::ImageMut;
use imgclf_plugin_randaugment::randaugment;
use imgclf_plugin_trivialaugment::trivialaugment;
use imgclf_tests::*;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;

/// Largest share of differing values per shear or rotation case (nearest sampling).
const AFFINE_DIFFERING: f64 = 0.002;
/// Largest share of differing values per affine case with bilinear sampling.
const BILINEAR_DIFFERING: f64 = 0.01;

struct Img {
    shape: [usize; 3],
    data: Vec<u8>,
}

/// Real Fashion-MNIST training images.
fn fashion_mnist(n: usize) -> Vec<Img> {
    let set = imgclf::datasets::find("FashionMNIST")
        .unwrap()
        .load(
            std::path::Path::new(FASHION_MNIST),
            imgclf::datasets::Split::Train,
        )
        .expect("Fashion-MNIST (apt-get install dataset-fashion-mnist)");
    (0..n)
        .map(|i| Img {
            shape: [1, 28, 28],
            data: set.image(i * 997).to_vec(),
        })
        .collect()
}

/// Generated RGB images: smooth colour gradients with seeded noise, one with a narrow value
/// range (autocontrast and equalize stretch it) and one with a constant channel.
fn generated_rgb(h: usize, w: usize, n: usize, seed: u64) -> Vec<Img> {
    let mut s = seed;
    let mut noise = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as i64 % 41 - 20
    };
    (0..n)
        .map(|k| {
            let mut data = vec![0u8; 3 * h * w];
            for c in 0..3 {
                for y in 0..h {
                    for x in 0..w {
                        let base = match c {
                            0 => 255 * x / w,
                            1 => 255 * y / h,
                            _ => 128 + (x as i64 - y as i64).unsigned_abs() as usize * 2,
                        } as i64;
                        let v = match k {
                            1 => 90 + (base + noise()) / 8,
                            2 if c == 1 => 77,
                            _ => base + noise() * (k as i64 + 1),
                        };
                        data[c * h * w + y * w + x] = v.clamp(0, 255) as u8;
                    }
                }
            }
            Img {
                shape: [3, h, w],
                data,
            }
        })
        .collect()
}

/// The magnitudes tested for `op`: torchvision's RandAugment bins 3, 9, 30 and
/// TrivialAugmentWide bins 20, 30, both signs where signed; posterize at every bit depth;
/// solarize at several thresholds.
fn magnitudes(op: Op, h: usize, w: usize) -> Vec<f64> {
    match op {
        Op::Identity | Op::AutoContrast | Op::Equalize => vec![0.0],
        Op::Posterize => (1..=8).map(f64::from).collect(),
        Op::Solarize => vec![255.0, 178.5, 127.5, 60.0, 0.0],
        _ => {
            let mut m: Vec<f64> = [3, 9, 30]
                .iter()
                .map(|&b| randaugment::magnitude(op, 31, b, h, w).0)
                .collect();
            let (wide, _) = trivialaugment::magnitudes(op, 31);
            m.extend([wide[20], wide[30]]);
            m.iter().flat_map(|&v| [v, -v]).collect()
        }
    }
}

fn tables() -> Value {
    let mut out = Vec::new();
    for (h, w) in [(28, 28), (32, 32), (20, 36)] {
        for bins in [31, 10] {
            let ops: Vec<Value> = Op::ALL
                .iter()
                .map(|&op| {
                    let (_, signed) = randaugment::magnitude(op, bins, 0, h, w);
                    let none = matches!(op, Op::Identity | Op::AutoContrast | Op::Equalize);
                    let m: Vec<f64> = if none {
                        vec![]
                    } else {
                        (0..bins)
                            .map(|b| randaugment::magnitude(op, bins, b, h, w).0)
                            .collect()
                    };
                    json!({"op": op.name(), "magnitudes": m, "signed": signed})
                })
                .collect();
            out.push(
                json!({"method": "randaugment", "bins": bins, "height": h, "width": w,
                            "ops": ops}),
            );
        }
    }
    for bins in [31, 10] {
        let ops: Vec<Value> = Op::ALL
            .iter()
            .map(|&op| {
                let (m, signed) = trivialaugment::magnitudes(op, bins);
                json!({"op": op.name(), "magnitudes": m, "signed": signed})
            })
            .collect();
        out.push(json!({"method": "trivialaugment", "bins": bins, "ops": ops}));
    }
    Value::Array(out)
}

#[test]
fn operations_and_magnitudes_equal_torchvisions() {
    let Some(py) = std::env::var_os("IMGCLF_PYTHON").map(PathBuf::from) else {
        eprintln!("IMGCLF_PYTHON not set: compared nothing with torchvision");
        return;
    };
    let d = scratch("augment-ops");
    let sets: Vec<(&str, Vec<Img>)> = vec![
        ("fashion_mnist", fashion_mnist(6)),
        ("rgb_32x32", generated_rgb(32, 32, 4, 7)),
        ("rgb_20x36", generated_rgb(20, 36, 3, 11)),
    ];
    let mut inputs = Vec::new();
    let mut images = Vec::new();
    let mut ranges = Vec::new();
    for (_, set) in &sets {
        let first = images.len();
        for img in set {
            images.push(json!({"shape": img.shape, "offset": inputs.len()}));
            inputs.extend_from_slice(&img.data);
        }
        ranges.push(first..images.len());
    }
    let mut cases = Vec::new();
    let mut outputs = Vec::new();
    for ((name, set), range) in sets.iter().zip(&ranges) {
        let [c, h, w] = set[0].shape;
        for op in Op::ALL {
            let samplings: Vec<(Interpolation, &str, Option<Vec<f64>>)> = if op.is_affine() {
                vec![
                    (Interpolation::Nearest, "nearest", None),
                    (
                        Interpolation::Nearest,
                        "nearest",
                        Some(if c == 3 {
                            vec![10.0, 200.0, 77.5]
                        } else {
                            vec![128.0]
                        }),
                    ),
                    (Interpolation::Bilinear, "bilinear", None),
                    (Interpolation::Bilinear, "bilinear", Some(vec![200.0])),
                ]
            } else {
                vec![(Interpolation::Nearest, "nearest", None)]
            };
            for m in magnitudes(op, h, w) {
                for (interp, interp_name, fill) in &samplings {
                    for img in set {
                        let mut data = img.data.clone();
                        let mut view = ImageMut {
                            data: &mut data,
                            channels: c,
                            height: h,
                            width: w,
                        };
                        apply_op(&mut view, op, m, *interp, fill.as_deref().unwrap_or(&[]))
                            .unwrap();
                        outputs.extend_from_slice(&data);
                    }
                    cases.push(json!({"set": name, "op": op.name(), "magnitude": m,
                                      "interpolation": interp_name, "fill": fill,
                                      "images": range.clone().collect::<Vec<_>>()}));
                }
            }
        }
    }
    std::fs::write(d.join("inputs.bin"), &inputs).unwrap();
    std::fs::write(d.join("outputs.bin"), &outputs).unwrap();
    let spec = json!({"images": images, "cases": cases, "tables": tables()});
    std::fs::write(d.join("cases.json"), spec.to_string()).unwrap();
    let out = Command::new(py)
        .arg(workspace().join("tests/python/check_augment_ops.py"))
        .arg(&d)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    // torch.linspace's float32 values depend on ATen's CPU kernel: imgclf's are those of its
    // AVX-512 (and scalar) kernels; its AVX2 kernels differ by an ulp in a few bins (see
    // `imgclf_plugin_api::image::linspace_f32`).
    if report["cpu_capability"] == "AVX512" {
        assert_eq!(report["tables"], json!([]), "magnitude tables differ");
    } else {
        eprintln!(
            "ATen CPU capability {}: tables compared for information only: {}",
            report["cpu_capability"], report["tables"]
        );
    }
    let mut failures = Vec::new();
    let (mut affine_values, mut affine_differing) = (0u64, 0u64);
    for case in report["cases"].as_array().unwrap() {
        let op = Op::from_name(case["op"].as_str().unwrap()).unwrap();
        let (differing, values) = (
            case["differing"].as_u64().unwrap(),
            case["values"].as_u64().unwrap(),
        );
        let max_abs = case["max_abs"].as_u64().unwrap();
        let bilinear = case["interpolation"] == "bilinear";
        let ok = match op {
            Op::TranslateX | Op::TranslateY if !bilinear => differing == 0,
            Op::ShearX | Op::ShearY | Op::Rotate if !bilinear => {
                differing as f64 <= AFFINE_DIFFERING * values as f64
            }
            _ if bilinear => max_abs <= 1 && differing as f64 <= BILINEAR_DIFFERING * values as f64,
            _ => differing == 0,
        };
        if op.is_affine() && !bilinear {
            affine_values += values;
            affine_differing += differing;
        }
        if !ok {
            failures.push(case.clone());
        }
    }
    eprintln!(
        "{} cases against torchvision {}; nearest affine: {affine_differing} of {affine_values} values differ",
        report["cases"].as_array().unwrap().len(),
        report["torchvision"]
    );
    assert!(
        failures.is_empty(),
        "{} cases differ from torchvision beyond the tolerance:\n{}",
        failures.len(),
        failures
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
}
