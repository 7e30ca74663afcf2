//! Confusion matrix of a test split (rows: true class, columns: predicted class), written by
//! `imgclf evaluate` as `confusion_matrix.csv` (counts, with class names) and
//! `confusion_matrix.png` (each row's fractions as shades of blue, class indices on the axes and
//! the counts in the cells when there are at most 20 classes).

use crate::plot::Canvas;
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// Counts `m[t][p]` of images of true class `t` predicted as `p`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfusionMatrix {
    pub counts: Vec<Vec<u64>>,
}

impl ConfusionMatrix {
    pub fn new(truth: &[i64], predicted: &[i64], n_classes: usize) -> Result<Self> {
        if truth.len() != predicted.len() {
            bail!("{} labels but {} predictions", truth.len(), predicted.len());
        }
        let mut counts = vec![vec![0u64; n_classes]; n_classes];
        for (&t, &p) in truth.iter().zip(predicted) {
            let ok = |v: i64| v >= 0 && (v as usize) < n_classes;
            if !ok(t) || !ok(p) {
                bail!("class {t} or {p} outside 0..{n_classes}");
            }
            counts[t as usize][p as usize] += 1;
        }
        Ok(ConfusionMatrix { counts })
    }

    pub fn n_classes(&self) -> usize {
        self.counts.len()
    }

    /// CSV: a header `true\predicted,<names>`, then one row per true class.
    pub fn to_csv(&self, names: &[String]) -> String {
        let field = |s: &str| {
            if s.contains([',', '"', '\n']) {
                format!("\"{}\"", s.replace('"', "\"\""))
            } else {
                s.to_string()
            }
        };
        let mut out = String::from("true\\predicted");
        for n in names {
            out.push(',');
            out.push_str(&field(n));
        }
        out.push('\n');
        for (row, name) in self.counts.iter().zip(names) {
            out.push_str(&field(name));
            for c in row {
                out.push_str(&format!(",{c}"));
            }
            out.push('\n');
        }
        out
    }

    /// The matrix as a PNG heat map (row-normalised).
    pub fn to_png(&self) -> Vec<u8> {
        let n = self.n_classes().max(1);
        let cell = (640 / n).clamp(4, 48) as i64;
        let label = if n <= 100 { 3 * 4 * 2 + 8 } else { 4 };
        let margin = label as i64;
        let side = margin + cell * n as i64 + 4;
        let mut c = Canvas::new(side as usize, side as usize);
        let show_counts = n <= 20;
        for (t, row) in self.counts.iter().enumerate() {
            let total: u64 = row.iter().sum();
            for (p, &count) in row.iter().enumerate() {
                let frac = if total == 0 {
                    0.0
                } else {
                    count as f64 / total as f64
                };
                // White (0) to dark blue (1).
                let shade = |w: f64, b: f64| (w + (b - w) * frac).round() as u8;
                let colour = [shade(255.0, 8.0), shade(255.0, 48.0), shade(255.0, 107.0)];
                let (x0, y0) = (margin + p as i64 * cell, margin + t as i64 * cell);
                for y in y0..y0 + cell {
                    for x in x0..x0 + cell {
                        c.set(x, y, colour);
                    }
                }
                if show_counts {
                    let text = count.to_string();
                    let scale = if cell >= 32 { 2 } else { 1 };
                    let w = Canvas::text_width(&text, scale);
                    if w < cell - 2 {
                        let ink = if frac > 0.5 { [255; 3] } else { [0; 3] };
                        c.text(
                            x0 + (cell - w) / 2,
                            y0 + (cell - 5 * scale) / 2,
                            &text,
                            scale,
                            ink,
                        );
                    }
                }
            }
        }
        if n <= 100 {
            let step = if cell >= 12 {
                1
            } else {
                (12 / cell as usize).max(1)
            };
            for i in (0..n).step_by(step) {
                let text = i.to_string();
                let w = Canvas::text_width(&text, 2);
                let mid = margin + i as i64 * cell + cell / 2;
                // Predicted class above the columns, true class left of the rows.
                c.text(mid - w / 2, 2, &text, 2, [0; 3]);
                c.text(margin - w - 4, mid - 5, &text, 2, [0; 3]);
            }
        }
        c.to_png()
    }

    /// Writes `confusion_matrix.csv` and `.png` into `dir`; returns their paths.
    pub fn write(&self, dir: &Path, names: &[String]) -> Result<(PathBuf, PathBuf)> {
        let csv = dir.join("confusion_matrix.csv");
        let png = dir.join("confusion_matrix.png");
        crate::io::write_atomic(&csv, self.to_csv(names).as_bytes())?;
        crate::io::write_atomic(&png, &self.to_png())?;
        Ok((csv, png))
    }
}

/// Class names of `dataset` (or "class N") for `n_classes` classes.
pub fn names_for(dataset: &str, n_classes: usize) -> Vec<String> {
    let known = crate::datasets::classes::class_names(dataset);
    (0..n_classes)
        .map(|i| {
            known
                .and_then(|k| k.get(i))
                .map(|s| s.to_string())
                .unwrap_or_else(|| format!("class {i}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_rows_are_truth_columns_predictions() {
        let m = ConfusionMatrix::new(&[0, 0, 1, 2, 2, 2], &[0, 1, 1, 2, 0, 2], 3).unwrap();
        assert_eq!(m.counts, [[1, 1, 0], [0, 1, 0], [1, 0, 2]]);
        let names = vec!["a".to_string(), "b,c".into(), "d".into()];
        assert_eq!(
            m.to_csv(&names),
            "true\\predicted,a,\"b,c\",d\na,1,1,0\n\"b,c\",0,1,0\nd,1,0,2\n"
        );
        assert!(ConfusionMatrix::new(&[0], &[3], 3).is_err());
        assert!(ConfusionMatrix::new(&[0, 1], &[0], 3).is_err());
        let png = m.to_png();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(names_for("FashionMNIST", 10)[0], "T-shirt/top");
        assert_eq!(names_for("Nothing", 2), ["class 0", "class 1"]);
    }
}
