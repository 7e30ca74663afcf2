//! `imgclf plot DIR [DIR...]`: the loss, accuracy and learning-rate curves of one or several
//! runs (training and validation, from each run's `metrics.jsonl`) drawn into one PNG, so runs
//! can be compared by looking. Drawing uses the shared canvas of [`crate::plot`].

use crate::plot::{Canvas, Rgb, BLACK, GREY};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct PlotArgs {
    /// Run directories (a run's train.output_dir, holding metrics.jsonl).
    #[arg(required = true, value_name = "DIR")]
    pub dirs: Vec<PathBuf>,
    /// The PNG to write.
    #[arg(short, long, value_name = "FILE.png", default_value = "curves.png")]
    pub output: PathBuf,
}

/// Line colours of the runs, in order (matplotlib's tab10).
pub const COLORS: [Rgb; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

/// A curve: (epoch, value) points.
pub type Curve = Vec<(f64, f64)>;

/// What one run's `metrics.jsonl` holds, per quantity: training (at fractional epochs, from
/// the logged running averages) and validation (at whole epochs).
#[derive(Debug, Default)]
pub struct RunCurves {
    pub name: String,
    pub train: [Curve; 4],
    pub val: [Curve; 3],
}

/// The quantities drawn, one panel each: (title, index in `train`, index in `val`).
const PANELS: [(&str, usize, Option<usize>); 4] = [
    ("loss", 0, Some(0)),
    ("acc@1", 1, Some(1)),
    ("acc@5", 2, Some(2)),
    ("lr", 3, None),
];

/// Reads `dir/metrics.jsonl`. A training record of epoch `e` at global step `s` is drawn at
/// epoch `s / steps_per_epoch`, the steps per epoch taken from the complete epochs (the last
/// step of every epoch is always logged).
pub fn read_run(dir: &Path) -> Result<RunCurves> {
    let path = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {} (is {} a run's train.output_dir?)",
            path.display(),
            dir.display()
        )
    })?;
    let mut train = Vec::new();
    let mut val = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
        let num = |k: &str| v[k].as_f64();
        let (Some(epoch), Some(step)) = (num("epoch"), num("step")) else {
            bail!("{} line {}: no epoch or step", path.display(), i + 1);
        };
        let values = [num("loss"), num("acc1"), num("acc5"), num("lr")];
        match v["split"].as_str() {
            Some("train") => train.push((epoch, step, values)),
            Some("val") => val.push((epoch, values)),
            _ => {}
        }
    }
    if train.is_empty() && val.is_empty() {
        bail!("{} holds no training or validation records", path.display());
    }
    // Complete epochs end at step epoch * steps_per_epoch; a partial last one ends earlier.
    let steps_per_epoch = train
        .iter()
        .filter(|(e, _, _)| *e >= 1.0)
        .map(|(e, s, _)| s / e)
        .fold(0.0f64, f64::max);
    let mut run = RunCurves {
        name: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string()),
        ..Default::default()
    };
    for (epoch, step, values) in train {
        let x = if steps_per_epoch > 0.0 {
            step / steps_per_epoch
        } else {
            epoch
        };
        for (k, v) in values.iter().enumerate() {
            if let Some(v) = v.filter(|v| v.is_finite()) {
                run.train[k].push((x, v));
            }
        }
    }
    for (epoch, values) in val {
        for (k, v) in values.iter().take(3).enumerate() {
            if let Some(v) = v.filter(|v| v.is_finite()) {
                run.val[k].push((epoch, v));
            }
        }
    }
    Ok(run)
}

/// A number with at most 3 significant digits, short.
fn tick_label(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if !(1e-3..1e4).contains(&v.abs()) {
        return format!("{v:.1e}");
    }
    let digits = (2 - v.abs().log10().floor() as i32).max(0) as usize;
    let s = format!("{v:.digits$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Panel size and the layout around the panels.
const PANEL_W: i64 = 600;
const PANEL_H: i64 = 360;
const MARGIN_L: i64 = 70;
const MARGIN_R: i64 = 20;
const MARGIN_T: i64 = 30;
const MARGIN_B: i64 = 40;
const LEGEND_LINE: i64 = 18;

/// The size of the picture of `n_runs` runs: 2 x 2 panels under a legend.
pub fn picture_size(n_runs: usize) -> (usize, usize) {
    let legend = 16 + LEGEND_LINE * (n_runs as i64 + 1);
    ((2 * PANEL_W) as usize, (legend + 2 * PANEL_H) as usize)
}

/// Draws the runs: a legend (colour per run; thin lines training, thick lines with dots
/// validation), then loss, acc@1, acc@5 and lr against epochs.
pub fn draw(runs: &[RunCurves]) -> Canvas {
    let (w, h) = picture_size(runs.len());
    let mut c = Canvas::new(w, h);
    let legend_h = 16 + LEGEND_LINE * (runs.len() as i64 + 1);
    c.text(
        10,
        8,
        "thin: train    thick with dots: val    x: epoch",
        2,
        BLACK,
    );
    for (i, run) in runs.iter().enumerate() {
        let y = 8 + LEGEND_LINE * (i as i64 + 1);
        let color = COLORS[i % COLORS.len()];
        c.line((10, y + 5), (40, y + 5), color, 3);
        c.text(50, y, &run.name, 2, BLACK);
    }
    for (p, (title, ti, vi)) in PANELS.iter().enumerate() {
        let x0 = (p as i64 % 2) * PANEL_W;
        let y0 = legend_h + (p as i64 / 2) * PANEL_H;
        let curves: Vec<(Rgb, &Curve, bool)> = runs
            .iter()
            .enumerate()
            .flat_map(|(i, r)| {
                let color = COLORS[i % COLORS.len()];
                let mut v = vec![(color, &r.train[*ti], false)];
                if let Some(vi) = vi {
                    v.push((color, &r.val[*vi], true));
                }
                v
            })
            .collect();
        panel(&mut c, (x0, y0), title, &curves);
    }
    c
}

/// One panel at `origin`: frame, ticks, title and the curves (`true`: validation style).
fn panel(c: &mut Canvas, origin: (i64, i64), title: &str, curves: &[(Rgb, &Curve, bool)]) {
    let (left, top) = (origin.0 + MARGIN_L, origin.1 + MARGIN_T);
    let (right, bottom) = (origin.0 + PANEL_W - MARGIN_R, origin.1 + PANEL_H - MARGIN_B);
    let points = curves.iter().flat_map(|(_, c, _)| c.iter());
    let (mut x_max, mut y_min, mut y_max) = (0.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points {
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if !y_min.is_finite() {
        (y_min, y_max) = (0.0, 1.0);
    }
    if y_min > 0.0 && y_min < 0.5 * y_max {
        y_min = 0.0;
    }
    if y_max - y_min < 1e-12 {
        y_max = y_min + y_min.abs().max(1.0) * 0.1;
    }
    let x_max = x_max.max(1.0);
    let x_of = |x: f64| left + ((right - left) as f64 * x / x_max).round() as i64;
    let y_of =
        |y: f64| bottom - ((bottom - top) as f64 * (y - y_min) / (y_max - y_min)).round() as i64;
    // Epoch ticks at 1, 2 or 5 times a power of ten, at most ~10.
    let mut tick = 1.0;
    for m in [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0] {
        tick = m;
        if x_max / m <= 10.0 {
            break;
        }
    }
    let mut e = 0.0;
    while e <= x_max + 1e-9 {
        let x = x_of(e);
        c.line((x, top), (x, bottom), GREY, 1);
        let t = tick_label(e);
        c.text(x - Canvas::text_width(&t, 2) / 2, bottom + 8, &t, 2, BLACK);
        e += tick;
    }
    for k in 0..=4 {
        let v = y_min + (y_max - y_min) * k as f64 / 4.0;
        let y = y_of(v);
        c.line((left, y), (right, y), GREY, 1);
        let t = tick_label(v);
        c.text(left - 8 - Canvas::text_width(&t, 2), y - 5, &t, 2, BLACK);
    }
    c.line((left, top), (left, bottom), BLACK, 1);
    c.line((left, bottom), (right, bottom), BLACK, 1);
    c.text(
        (left + right) / 2 - Canvas::text_width(title, 2) / 2,
        origin.1 + 10,
        title,
        2,
        BLACK,
    );
    for (color, curve, val) in curves {
        let thick = if *val { 3 } else { 1 };
        let mut prev = None;
        for &(x, y) in curve.iter() {
            let p = (x_of(x), y_of(y));
            if let Some(q) = prev {
                c.line(q, p, *color, thick);
            }
            if *val {
                for dx in -3..=3 {
                    c.line((p.0 + dx, p.1 - 3), (p.0 + dx, p.1 + 3), *color, 1);
                }
            }
            prev = Some(p);
        }
    }
}

/// `imgclf plot`: reads every run, draws them, writes the PNG atomically.
pub fn run(args: &PlotArgs) -> Result<()> {
    let runs = args
        .dirs
        .iter()
        .map(|d| read_run(d.as_path()))
        .collect::<Result<Vec<_>>>()?;
    let png = draw(&runs).to_png();
    crate::io::write_atomic(&args.output, &png)?;
    println!(
        "{} ({} run{})",
        args.output.display(),
        runs.len(),
        if runs.len() == 1 { "" } else { "s" }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_run(dir: &Path, loss0: f64) {
        std::fs::create_dir_all(dir).unwrap();
        let mut s = String::new();
        s += r#"{"epoch":0,"step":0,"split":"val","loss":2.3,"acc1":0.1,"acc5":0.5,"lr":0.1}"#;
        s += "\n";
        for step in 1..=8u64 {
            let epoch = step.div_ceil(4);
            let loss = loss0 / step as f64;
            s += &format!(
                "{{\"epoch\":{epoch},\"step\":{step},\"split\":\"train\",\"loss\":{loss},\"acc1\":0.5,\"acc5\":0.9,\"lr\":0.1}}\n"
            );
            if step % 4 == 0 {
                s += &format!(
                    "{{\"epoch\":{epoch},\"step\":{step},\"split\":\"val\",\"loss\":{loss},\"acc1\":0.6,\"acc5\":0.95,\"lr\":0.1}}\n"
                );
            }
        }
        std::fs::write(dir.join("metrics.jsonl"), s).unwrap();
    }

    #[test]
    fn train_points_sit_at_fractional_epochs_and_val_at_whole_ones() {
        let dir = std::env::temp_dir().join(format!("imgclf-curves-{}", std::process::id()));
        write_run(&dir, 2.0);
        let r = read_run(&dir).unwrap();
        let xs: Vec<f64> = r.train[0].iter().map(|p| p.0).collect();
        assert_eq!(xs, [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]);
        assert_eq!(r.val[0], [(0.0, 2.3), (1.0, 0.5), (2.0, 0.25)]);
        assert_eq!(r.train[3].len(), 8);
        let c = draw(&[r]);
        assert_eq!((c.width, c.height), picture_size(1));
        // The first run's colour appears (legend and curves).
        let blue = (0..c.height)
            .flat_map(|y| (0..c.width).map(move |x| (x, y)))
            .filter(|&(x, y)| c.pixel(x, y) == COLORS[0])
            .count();
        assert!(blue > 100, "{blue}");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(read_run(&dir).is_err());
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(tick_label(0.125), "0.125");
        assert_eq!(tick_label(2.0), "2");
        assert_eq!(tick_label(0.0), "0");
        assert_eq!(tick_label(1234.4), "1234");
    }
}
