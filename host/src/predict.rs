//! `imgclf predict --run DIR IMAGE|FOLDER...`: the top-k classes of the user's own images
//! with a trained run (its `config.yaml` and final or chosen weights), printed and written to
//! `predict.json` and `predict.csv`.
//!
//! Images (PNG, JPEG) are decoded with the `image` crate and brought to the dataset's geometry
//! the way the reference's validation transform would see them: grey for one channel (PIL's
//! `convert('L')` weights), RGB for three (alpha dropped); with `tta.use_resize` the shorter side
//! is resized to `tta.resize` and with `tta.use_center_crop` an `image_size` square is cut from
//! the centre, as the reference's ImageNet validation transform does (the code image folders
//! use, `datasets::transform`). An image that is then
//! still not `image_size` x `image_size` (the CIFAR transform has no resize at all) has its
//! shorter side resized to `image_size` (bilinear, antialiased, aspect kept) and the centre
//! square cut out. Then the dataset's mean/std normalisation, as in training.

use crate::datasets::classes::class_names;
use crate::datasets::transform::{Geometry as TransformGeometry, Rgb, Transform};
use crate::registry::Registry;
use crate::setup::{setup, Purpose, Request};
use crate::train::{build_model, checkpoint, device_of, Normalizer};
use anyhow::{bail, Context, Result};
use image::{DynamicImage, GenericImageView};
use serde_json::json;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// `imgclf predict` arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct PredictArgs {
    /// Training output directory: its config.yaml, and model_final.safetensors (or its newest
    /// checkpoint) unless --checkpoint is given.
    #[arg(long, value_name = "DIR")]
    pub run: PathBuf,
    /// Weights to use instead of the run's final ones (imgclf checkpoint, safetensors or torch.save file).
    #[arg(long, value_name = "FILE")]
    pub checkpoint: Option<PathBuf>,
    /// How many of the most probable classes to report per image.
    #[arg(long, value_name = "K", default_value_t = 5)]
    pub top_k: usize,
    /// Folder for predict.json and predict.csv (default: the run directory).
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// Images per forward pass (default: test.batch_size of the run).
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,
    /// PNG or JPEG files, or folders searched recursively for *.png, *.jpg, *.jpeg.
    #[arg(required = true, value_name = "IMAGE|FOLDER")]
    pub inputs: Vec<PathBuf>,
}

/// One class of an image's top-k.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranked {
    pub class: i64,
    pub name: String,
    pub probability: f64,
}

/// Every image's top-k, and the files written.
#[derive(Debug)]
pub struct Predictions {
    pub images: Vec<(PathBuf, Vec<Ranked>)>,
    pub json: PathBuf,
    pub csv: PathBuf,
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| ["png", "jpg", "jpeg"].contains(&e.to_ascii_lowercase().as_str()))
}

/// The files named, and the images found (recursively, sorted) in the folders named.
pub fn collect_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let mut found = Vec::new();
            let mut stack = vec![input.clone()];
            while let Some(d) = stack.pop() {
                for e in
                    std::fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))?
                {
                    let p = e?.path();
                    if p.is_dir() {
                        stack.push(p);
                    } else if is_image(&p) {
                        found.push(p);
                    }
                }
            }
            if found.is_empty() {
                bail!("{} holds no .png, .jpg or .jpeg file", input.display());
            }
            found.sort();
            out.extend(found);
        } else if input.is_file() {
            out.push(input.clone());
        } else {
            bail!("{}: no such file or folder", input.display());
        }
    }
    Ok(out)
}

/// How an image is brought to the model's input geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub channels: usize,
    pub image_size: u32,
    /// `tta.resize` when `tta.use_resize`.
    pub resize: Option<u32>,
    /// `tta.use_center_crop`.
    pub center_crop: bool,
}

/// The image as C x H x W uint8 planes of the model's geometry (see the module docs), through
/// the same validation transform as image-folder datasets (`datasets::transform`: torchvision's
/// `Resize` and `CenterCrop`, bilinear with antialiasing).
pub fn to_planes(img: DynamicImage, g: &Geometry) -> Vec<u8> {
    let (width, height) = img.dimensions();
    let rgb = img.to_rgb8().into_raw();
    let grey = g.channels == 1;
    let data = if grey {
        // PIL's convert('L') first, as a one-channel dataset reads its images:
        // L = R * 299/1000 + G * 587/1000 + B * 114/1000, rounded.
        rgb.chunks_exact(3)
            .flat_map(|p| {
                let l = ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000)
                    >> 16) as u8;
                [l; 3]
            })
            .collect()
    } else {
        rgb
    };
    let src = Rgb {
        width: width as usize,
        height: height as usize,
        data,
    };
    let s = g.image_size as usize;
    let validation = Transform {
        geometry: TransformGeometry::ResizeCenterCrop {
            resize: g.resize.map(|r| r as usize),
            center_crop: g.center_crop,
        },
        size: s,
        flip_prob: 0.0,
    };
    // No randomness in validation transforms; the generator is never drawn from.
    let mut rng = imgclf_plugin_api::rng::step_rng(0);
    let mut chw = vec![0u8; 3 * s * s];
    if validation.apply_alone(&src, &mut rng, &mut chw).is_none() {
        let fit = Transform {
            geometry: TransformGeometry::ResizeCenterCrop {
                resize: Some(s),
                center_crop: true,
            },
            ..validation
        };
        fit.apply_alone(&src, &mut rng, &mut chw)
            .expect("a center crop always has the output size");
    }
    if grey {
        chw.truncate(s * s);
    }
    chw
}

fn decode(path: &Path) -> Result<DynamicImage> {
    image::ImageReader::open(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read {}", path.display()))?
        .decode()
        .with_context(|| format!("{}: not a readable PNG or JPEG image", path.display()))
}

fn weights(args: &PredictArgs) -> Result<PathBuf> {
    if let Some(c) = &args.checkpoint {
        return Ok(c.clone());
    }
    let fin = args.run.join("model_final.safetensors");
    if fin.is_file() {
        return Ok(fin);
    }
    match checkpoint::newest(&args.run)? {
        Some((path, pos)) => {
            tracing::warn!(
                "{} has no model_final.safetensors (training did not finish): using {} (epoch {})",
                args.run.display(),
                path.display(),
                pos.epoch
            );
            Ok(path)
        }
        None => bail!(
            "{} has neither model_final.safetensors nor a checkpoint; pass the weights with --checkpoint FILE",
            args.run.display()
        ),
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Runs `imgclf predict`.
pub fn run(registry: &Registry, args: &PredictArgs) -> Result<Predictions> {
    if args.top_k == 0 {
        bail!("--top-k must be at least 1");
    }
    let config_file = args.run.join("config.yaml");
    if !config_file.is_file() {
        bail!(
            "{} is not an imgclf run directory: it has no config.yaml (the folder train.output_dir of a training run)",
            args.run.display()
        );
    }
    let request = Request {
        config_file: Some(config_file),
        ..Request::default()
    };
    let s = setup(registry, &request, Purpose::Evaluate)?;
    let c = &s.config;
    let files = collect_inputs(&args.inputs)?;
    let weights = weights(args)?;
    let device = device_of(c)?;
    let mut model = build_model(registry, &s, device)?;
    let tensors = model.tensors()?;
    let loaded = checkpoint::load(&weights)
        .with_context(|| format!("--checkpoint {}", weights.display()))?;
    checkpoint::copy_into_model(&tensors, &loaded.model, &weights)?;

    let geometry = Geometry {
        channels: c.int("dataset.n_channels") as usize,
        image_size: c.int("dataset.image_size") as u32,
        resize: c.bool("tta.use_resize").then(|| c.int("tta.resize") as u32),
        center_crop: c.bool("tta.use_center_crop"),
    };
    let n_classes = c.int("dataset.n_classes");
    let k = args.top_k.min(n_classes as usize) as i64;
    // Built-in datasets' names; an image folder's are its sorted class folders (train/).
    let names: Vec<String> = match class_names(c.str("dataset.name")) {
        Some(n) => n.iter().map(|s| s.to_string()).collect(),
        None if s.dataset.image_folder => crate::datasets::folder::find_classes(
            &crate::datasets::open::split_dir(&s.dataset_dir, crate::datasets::Split::Train),
        )
        .unwrap_or_default(),
        None => Vec::new(),
    };
    let name_of = |i: i64| {
        names
            .get(i as usize)
            .cloned()
            .unwrap_or_else(|| format!("class {i}"))
    };
    let (mean, std) = s.dataset.stats(c)?;
    let norm = Normalizer::new(&mean, &std, device);
    let bs = args
        .batch_size
        .unwrap_or(c.int("test.batch_size").max(1) as usize)
        .max(1);
    let side = geometry.image_size as i64;
    let mut results = Vec::new();
    for chunk in files.chunks(bs) {
        let mut pixels =
            Vec::with_capacity(chunk.len() * geometry.channels * (side * side) as usize);
        for f in chunk {
            pixels.extend(to_planes(decode(f)?, &geometry));
        }
        let batch = Tensor::from_slice(&pixels)
            .view([chunk.len() as i64, geometry.channels as i64, side, side])
            .to_device(device);
        let probs = tch::no_grad(|| -> Result<Tensor> {
            let logits = model.forward(&norm.apply(&batch), false)?;
            Ok(logits.softmax(1, Kind::Float).to_device(tch::Device::Cpu))
        })?;
        let (values, indices) = probs.topk(k, 1, true, true);
        for (row, f) in chunk.iter().enumerate() {
            let vals = Vec::<f32>::try_from(values.get(row as i64))?;
            let idx = Vec::<i64>::try_from(indices.get(row as i64))?;
            let top: Vec<Ranked> = idx
                .iter()
                .zip(vals)
                .map(|(&i, p)| Ranked {
                    class: i,
                    name: name_of(i),
                    probability: p as f64,
                })
                .collect();
            results.push((f.clone(), top));
        }
    }

    let out_dir = args.output.clone().unwrap_or_else(|| args.run.clone());
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let doc = json!({
        "run": args.run,
        "checkpoint": weights,
        "dataset": c.str("dataset.name"),
        "model": c.str("model.name"),
        "top_k": k,
        "predictions": results.iter().map(|(f, top)| json!({
            "image": f,
            "top": top.iter().map(|r| json!({"class": r.class, "name": r.name, "probability": r.probability})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    let json_path = out_dir.join("predict.json");
    crate::io::write_atomic(
        &json_path,
        (serde_json::to_string_pretty(&doc)? + "\n").as_bytes(),
    )?;
    let mut csv = String::from("image,rank,class,name,probability\n");
    for (f, top) in &results {
        for (rank, r) in top.iter().enumerate() {
            csv.push_str(&format!(
                "{},{},{},{},{:.6}\n",
                csv_field(&f.display().to_string()),
                rank + 1,
                r.class,
                csv_field(&r.name),
                r.probability
            ));
        }
    }
    let csv_path = out_dir.join("predict.csv");
    crate::io::write_atomic(&csv_path, csv.as_bytes())?;
    Ok(Predictions {
        images: results,
        json: json_path,
        csv: csv_path,
    })
}

/// Prints the predictions as `imgclf predict` does.
pub fn print(p: &Predictions) {
    for (f, top) in &p.images {
        println!("{}", f.display());
        for (rank, r) in top.iter().enumerate() {
            println!(
                "  {}. {:<24} {:.4}",
                rank + 1,
                format!("{} ({})", r.name, r.class),
                r.probability
            );
        }
    }
    println!("wrote {} and {}", p.json.display(), p.csv.display());
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb as Pixel, RgbImage, RgbaImage};

    fn geometry(channels: usize, size: u32) -> Geometry {
        Geometry {
            channels,
            image_size: size,
            resize: None,
            center_crop: false,
        }
    }

    #[test]
    fn same_size_rgb_becomes_channel_planes_unchanged() {
        let img = RgbImage::from_fn(2, 2, |x, y| Pixel([x as u8, y as u8, 7]));
        let planes = to_planes(DynamicImage::ImageRgb8(img), &geometry(3, 2));
        assert_eq!(planes, [0, 1, 0, 1, 0, 0, 1, 1, 7, 7, 7, 7]);
    }

    #[test]
    fn grey_uses_pil_weights_and_alpha_is_dropped() {
        let img = RgbaImage::from_fn(1, 1, |_, _| image::Rgba([255, 0, 0, 0]));
        let planes = to_planes(DynamicImage::ImageRgba8(img), &geometry(1, 1));
        // PIL: Image.new('RGB', (1, 1), (255, 0, 0)).convert('L') -> 76.
        assert_eq!(planes, [76]);
        let img = RgbImage::from_fn(1, 1, |_, _| Pixel([10, 200, 30]));
        // (10*299 + 200*587 + 30*114) / 1000 = 123.8 -> 124.
        assert_eq!(
            to_planes(DynamicImage::ImageRgb8(img), &geometry(1, 1)),
            [124]
        );
    }

    #[test]
    fn other_sizes_are_resized_on_the_shorter_side_and_centre_cropped() {
        // 8 x 4: left half black, right half white; a 4 x 4 target keeps the centre columns.
        let img = RgbImage::from_fn(8, 4, |x, _| {
            if x < 4 {
                Pixel([0; 3])
            } else {
                Pixel([255; 3])
            }
        });
        let planes = to_planes(DynamicImage::ImageRgb8(img.clone()), &geometry(1, 4));
        assert_eq!(planes.len(), 16);
        // Shorter side already 4: only the centre crop (columns 2..6).
        assert_eq!(&planes[..4], &[0, 0, 255, 255]);
        // Downscaled to 2 x 2 (resize to 4 x 2, crop columns 1..3): dark left, bright right.
        let planes = to_planes(DynamicImage::ImageRgb8(img), &geometry(1, 2));
        assert!(planes[0] < 64 && planes[1] > 191, "{planes:?}");
        let g = Geometry {
            channels: 1,
            image_size: 2,
            resize: Some(4),
            center_crop: true,
        };
        let tall = RgbImage::from_fn(4, 8, |_, y| Pixel([(y * 30) as u8; 3]));
        // Resize 4 x 8 -> shorter side already 4; crop rows 3..5 and columns 1..3.
        assert_eq!(
            to_planes(DynamicImage::ImageRgb8(tall), &g),
            [90, 90, 120, 120]
        );
    }

    #[test]
    fn inputs_are_files_and_sorted_images_of_folders() {
        let dir =
            std::env::temp_dir().join(format!("imgclf-predict-inputs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        for f in ["b.png", "a.JPG", "sub/c.jpeg", "notes.txt"] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        let got = collect_inputs(&[dir.clone(), dir.join("notes.txt")]).unwrap();
        let rel: Vec<String> = got
            .iter()
            .map(|p| p.strip_prefix(&dir).unwrap().display().to_string())
            .collect();
        assert_eq!(rel, ["a.JPG", "b.png", "sub/c.jpeg", "notes.txt"]);
        let e = collect_inputs(&[dir.join("missing.png")]).unwrap_err();
        assert!(e.to_string().contains("missing.png: no such file"), "{e}");
        let empty = dir.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let e = collect_inputs(&[empty]).unwrap_err();
        assert!(e.to_string().contains("holds no .png"), "{e}");
        let bad = dir.join("bad.png");
        std::fs::write(&bad, b"not a png").unwrap();
        let e = decode(&bad).unwrap_err();
        assert!(format!("{e:#}").contains("bad.png"), "{e:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        assert_eq!(csv_field("T-shirt/top"), "T-shirt/top");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
