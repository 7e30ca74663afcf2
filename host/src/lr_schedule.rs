//! `imgclf lr-schedule`: the learning rate of every training iteration, exactly as `imgclf
//! train` would use it (warmup composed with the scheduler plugin), as a table, CSV or plot.

use crate::plot::{Canvas, BLACK, BLUE, GREY};
use crate::registry::Registry;
use crate::setup::{setup, Purpose, Request};
use crate::train::data::batches_per_epoch;
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::PathBuf;

#[derive(Clone, Debug, Default)]
pub struct Args {
    /// Iterations per epoch; from the training set size and `train.batch_size` when `None`.
    pub steps_per_epoch: Option<u64>,
    pub csv: bool,
    pub plot: Option<PathBuf>,
}

/// One training iteration: 1-based epoch (as the training log), global step from 0, rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Row {
    pub epoch: u64,
    pub step: u64,
    pub lr: f64,
}

/// Training images per epoch after the reference's validation split.
fn train_images(s: &crate::setup::Setup) -> Result<usize> {
    let c = &s.config;
    let n = s
        .dataset
        .load(&s.dataset_dir, crate::datasets::Split::Train)
        .with_context(|| {
            "steps per epoch come from the training set size: pass --steps-per-epoch N to skip reading it"
        })?
        .len();
    if c.bool("train.use_test_as_val") {
        return Ok(n);
    }
    Ok(n - (n as f64 * c.float("train.val_ratio")) as usize)
}

pub fn rows(
    registry: &Registry,
    request: &Request,
    steps_per_epoch: Option<u64>,
) -> Result<Vec<Row>> {
    let s = setup(registry, request, Purpose::Train)?;
    let c = &s.config;
    let spe = match steps_per_epoch {
        Some(0) => bail!("--steps-per-epoch must be >= 1"),
        Some(n) => n,
        None => {
            let batch = c.int("train.batch_size");
            if batch < 1 {
                bail!("train.batch_size must be >= 1, got {batch}");
            }
            let n = train_images(&s)?;
            let spe = batches_per_epoch(n, batch as usize, c.bool("train.dataloader.drop_last"));
            if spe == 0 {
                bail!("the training set has {n} images, fewer than one batch of train.batch_size {batch} with drop_last");
            }
            spe as u64
        }
    };
    let schedule = crate::train::build_schedule(registry, &s, spe)?;
    let epochs = c.int("scheduler.epochs") as u64;
    let mut out = Vec::with_capacity((epochs * spe) as usize);
    for step in 0..epochs * spe {
        out.push(Row {
            epoch: step / spe + 1,
            step,
            lr: schedule.lr(step)?,
        });
    }
    Ok(out)
}

pub fn run(registry: &Registry, request: &Request, args: &Args) -> Result<()> {
    let rows = rows(registry, request, args.steps_per_epoch)?;
    if let Some(path) = &args.plot {
        if path.extension().and_then(|e| e.to_str()) != Some("png") {
            bail!(
                "--plot {} : the plot is a PNG file, name it *.png",
                path.display()
            );
        }
        crate::io::write_atomic(path, &plot(&rows).to_png())
            .with_context(|| format!("cannot write the plot {}", path.display()))?;
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if args.csv {
        writeln!(out, "epoch,step,lr")?;
        for r in &rows {
            writeln!(out, "{},{},{}", r.epoch, r.step, r.lr)?;
        }
    } else {
        writeln!(out, "{:>6} {:>9}  lr", "epoch", "step")?;
        for r in &rows {
            writeln!(out, "{:>6} {:>9}  {}", r.epoch, r.step, r.lr)?;
        }
    }
    out.flush()?;
    Ok(())
}

/// A number with at most 4 significant digits, as short as possible.
fn label(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if !(1e-3..1e4).contains(&v.abs()) {
        return format!("{v:.2e}");
    }
    let digits = (3 - v.abs().log10().floor() as i32).max(0) as usize;
    let s = format!("{v:.digits$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Rate against epoch: axes, epoch ticks, three rate ticks, the curve.
pub fn plot(rows: &[Row]) -> Canvas {
    let (w, h) = (900i64, 450i64);
    let (left, right, top, bottom) = (80i64, 20i64, 20i64, 50i64);
    let mut c = Canvas::new(w as usize, h as usize);
    let max_lr = rows.iter().map(|r| r.lr).fold(0.0f64, f64::max);
    let y_max = if max_lr > 0.0 { max_lr * 1.05 } else { 1.0 };
    let n = rows.len().max(1) as f64;
    let epochs = rows.last().map(|r| r.epoch).unwrap_or(1);
    let spe = n / epochs as f64;
    let x_of = |step: f64| left + ((w - left - right) as f64 * step / n).round() as i64;
    let y_of = |lr: f64| (h - bottom) - ((h - bottom - top) as f64 * lr / y_max).round() as i64;
    // Epoch ticks: at most ~12, at 1, 2 or 5 times a power of ten.
    let mut tick = 1u64;
    for m in [1u64, 2, 5].iter().cycle().scan(1u64, |p, &m| {
        let v = *p * m;
        if m == 5 {
            *p *= 10;
        }
        Some(v)
    }) {
        tick = m;
        if epochs / m <= 12 {
            break;
        }
    }
    for e in (0..=epochs).step_by(tick as usize) {
        let x = x_of(e as f64 * spe);
        c.line((x, top), (x, h - bottom), GREY, 1);
        let t = e.to_string();
        c.text(
            x - Canvas::text_width(&t, 2) / 2,
            h - bottom + 8,
            &t,
            2,
            BLACK,
        );
    }
    for v in [0.0, max_lr / 2.0, max_lr] {
        let y = y_of(v);
        c.line((left, y), (w - right, y), GREY, 1);
        let t = label(v);
        c.text(left - 8 - Canvas::text_width(&t, 2), y - 5, &t, 2, BLACK);
    }
    c.line((left, top), (left, h - bottom), BLACK, 1);
    c.line((left, h - bottom), (w - right, h - bottom), BLACK, 1);
    c.text(
        w / 2 - Canvas::text_width("epoch", 2) / 2,
        h - 18,
        "epoch",
        2,
        BLACK,
    );
    c.text(8, top, "lr", 2, BLACK);
    let mut prev = None;
    for (i, r) in rows.iter().enumerate() {
        let p = (x_of(i as f64), y_of(r.lr));
        if let Some(q) = prev {
            c.line(q, p, BLUE, 2);
        }
        prev = Some(p);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_short() {
        assert_eq!(label(0.1), "0.1");
        assert_eq!(label(0.05), "0.05");
        assert_eq!(label(1.6), "1.6");
        assert_eq!(label(0.0001), "1.00e-4");
        assert_eq!(label(0.0), "0");
    }

    #[test]
    fn plot_draws_the_curve_where_the_rate_is() {
        let rows: Vec<Row> = (0..100)
            .map(|s| Row {
                epoch: s / 10 + 1,
                step: s,
                lr: if s < 50 { 0.1 } else { 0.01 },
            })
            .collect();
        let c = plot(&rows);
        // Step 25 at the rate 0.1 (top of the range, y_max = 0.105).
        let x = 80 + (800.0 * 25.0 / 100.0f64).round() as usize;
        let y = 400 - (380.0 * 0.1 / 0.105f64).round() as usize;
        assert_eq!(c.pixel(x, y), BLUE);
        assert_ne!(
            c.pixel(x, 400 - (380.0 * 0.01 / 0.105f64).round() as usize),
            BLUE
        );
    }
}
