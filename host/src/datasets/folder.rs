//! Class-per-folder image collections, listed exactly as torchvision's `ImageFolder` lists them.
//!
//! `root/<class>/.../<image>`: the classes are the sub-directories of `root` (symlinks followed,
//! hidden ones included), sorted by name, numbered from 0 in that order. The samples of each
//! class are the files under its folder, at any depth, whose lower-cased name ends with one of
//! [`IMG_EXTENSIONS`]; the folders of a class are visited in the order of their sorted paths and
//! the files of a folder in the order of their sorted names (torchvision's
//! `sorted(os.walk(class_dir, followlinks=True))` then `sorted(fnames)`). A class folder without
//! any image is an error, as in torchvision. Only the list of paths is kept in memory.

use super::loader::Samples;
use super::transform::{Rgb, Transform};
use super::DatasetError;
use fast_image_resize::Resizer;
use imgclf_plugin_api::rng::StepRng;
use std::cell::RefCell;
use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// torchvision's `IMG_EXTENSIONS`, matched against the lower-cased file name.
pub const IMG_EXTENSIONS: &[&str] = &[
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
];

/// The classes and samples of one class-per-folder directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFolder {
    pub root: PathBuf,
    /// Class names, sorted; a sample's label is the index of its class here.
    pub classes: Vec<String>,
    /// (path, label) in torchvision's order.
    pub samples: Vec<(PathBuf, i64)>,
}

/// Whether `name` ends (case-insensitively) with one of [`IMG_EXTENSIONS`].
pub fn has_image_extension(name: &str) -> bool {
    let lower = name.to_lowercase();
    IMG_EXTENSIONS.iter().any(|e| lower.ends_with(e))
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> DatasetError + '_ {
    move |source| DatasetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The class folders of `root`, sorted (torchvision's `find_classes`).
pub fn find_classes(root: &Path) -> Result<Vec<String>, DatasetError> {
    let mut classes = Vec::new();
    for entry in std::fs::read_dir(root).map_err(io_error(root))? {
        let entry = entry.map_err(io_error(root))?;
        // `is_dir` of the path follows symlinks, as Python's DirEntry.is_dir().
        if entry.path().is_dir() {
            classes.push(entry.file_name());
        }
    }
    // Python sorts str by code point; UTF-8 byte order is the same order.
    classes.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
    if classes.is_empty() {
        return Err(DatasetError::Format {
            path: root.to_path_buf(),
            msg: "found no class folder: an image folder holds one sub-folder per class \
                  (root/<class>/<image>)"
                .into(),
        });
    }
    Ok(classes
        .into_iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect())
}

/// Every directory under `dir` (itself included, symlinks followed, each real directory once)
/// with the names of the non-directory entries in it.
fn walk(
    dir: &Path,
    seen: &mut HashSet<PathBuf>,
    out: &mut Vec<(PathBuf, Vec<OsString>)>,
) -> Result<(), DatasetError> {
    if let Ok(real) = dir.canonicalize() {
        if !seen.insert(real) {
            return Ok(()); // a symlink cycle: os.walk would loop, we stop
        }
    }
    let mut files = Vec::new();
    let mut subdirs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        let path = entry.path();
        if path.is_dir() {
            subdirs.push(path);
        } else {
            files.push(entry.file_name());
        }
    }
    out.push((dir.to_path_buf(), files));
    for sub in subdirs {
        walk(&sub, seen, out)?;
    }
    Ok(())
}

impl ImageFolder {
    /// Lists `root` as torchvision's `ImageFolder(root)` does.
    pub fn scan(root: &Path) -> Result<Self, DatasetError> {
        if !root.is_dir() {
            return Err(DatasetError::Io {
                path: root.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such directory (an image folder holds one sub-folder per class)",
                ),
            });
        }
        let classes = find_classes(root)?;
        let mut samples = Vec::new();
        let mut empty = Vec::new();
        for (label, class) in classes.iter().enumerate() {
            let mut dirs = Vec::new();
            walk(&root.join(class), &mut HashSet::new(), &mut dirs)?;
            dirs.sort_by(|a, b| {
                a.0.as_os_str()
                    .as_encoded_bytes()
                    .cmp(b.0.as_os_str().as_encoded_bytes())
            });
            let before = samples.len();
            for (dir, mut names) in dirs {
                names.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
                for name in names {
                    if has_image_extension(&name.to_string_lossy()) {
                        samples.push((dir.join(name), label as i64));
                    }
                }
            }
            if samples.len() == before {
                empty.push(class.as_str());
            }
        }
        if !empty.is_empty() {
            return Err(DatasetError::Format {
                path: root.to_path_buf(),
                msg: format!(
                    "found no image in the class folder(s) {}; image files end with one of {}",
                    empty.join(", "),
                    IMG_EXTENSIONS.join(", ")
                ),
            });
        }
        Ok(ImageFolder {
            root: root.to_path_buf(),
            classes,
            samples,
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// True when there is no sample.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// Reads and decodes an image file to 8-bit RGB (PIL's `convert('RGB')`: gray replicated,
/// alpha dropped); the format is taken from the content, not the name.
pub fn decode_rgb(path: &Path) -> Result<Rgb, DatasetError> {
    let bytes = std::fs::read(path).map_err(io_error(path))?;
    let img = image::load_from_memory(&bytes).map_err(|e| DatasetError::Format {
        path: path.to_path_buf(),
        msg: format!("cannot decode the image: {e}"),
    })?;
    let rgb = img.into_rgb8();
    let (width, height) = (rgb.width() as usize, rgb.height() as usize);
    if width == 0 || height == 0 {
        return Err(DatasetError::Format {
            path: path.to_path_buf(),
            msg: "the image is empty (0 pixels)".into(),
        });
    }
    Ok(Rgb {
        width,
        height,
        data: rgb.into_raw(),
    })
}

thread_local! {
    /// Each loading thread's resize buffers.
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

/// One split of an image folder with its transform: what the loader decodes, never all held.
pub struct FolderSplit {
    pub folder: ImageFolder,
    pub transform: Transform,
    /// Skip (and count) unreadable images instead of failing.
    pub skip_unreadable: bool,
    skipped: AtomicUsize,
}

impl FolderSplit {
    pub fn new(folder: ImageFolder, transform: Transform, skip_unreadable: bool) -> Self {
        FolderSplit {
            folder,
            transform,
            skip_unreadable,
            skipped: AtomicUsize::new(0),
        }
    }

    /// Unreadable images skipped so far.
    pub fn skipped(&self) -> usize {
        self.skipped.load(Ordering::Relaxed)
    }
}

impl Samples for FolderSplit {
    fn len(&self) -> usize {
        self.folder.len()
    }

    fn shape(&self) -> [usize; 3] {
        [3, self.transform.size, self.transform.size]
    }

    fn fill(
        &self,
        index: usize,
        rng: &mut StepRng,
        out: &mut [u8],
    ) -> Result<Option<i64>, DatasetError> {
        let (path, label) = &self.folder.samples[index];
        let img = match decode_rgb(path) {
            Ok(img) => img,
            Err(e) if self.skip_unreadable => {
                let n = self.skipped.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!("skipped unreadable image ({n} so far): {e}");
                return Ok(None);
            }
            Err(e) => {
                return Err(DatasetError::Format {
                    path: path.clone(),
                    msg: format!(
                        "{}; fix or remove the file, or set dataset.skip_unreadable True to skip such images",
                        match e {
                            DatasetError::Format { msg, .. } => msg,
                            other => other.to_string(),
                        }
                    ),
                })
            }
        };
        let done = RESIZER.with(|r| self.transform.apply(&img, &mut r.borrow_mut(), rng, out));
        match done {
            Some(()) => Ok(Some(*label)),
            None => Err(DatasetError::Format {
                path: path.clone(),
                msg: format!(
                    "the image is {}x{} after the validation transform, but batches need {s}x{s} \
                     (dataset.image_size); set tta.use_center_crop True",
                    img.width,
                    img.height,
                    s = self.transform.size
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datasets::testutil::TempDir;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"x").unwrap();
    }

    #[test]
    fn lists_like_torchvision() {
        let dir = TempDir::new("folder");
        let r = dir.path();
        for f in [
            "b/2.JPG",
            "b/10.png",
            "b/sub/1.jpeg",
            "b/sub b/0.webp",
            "b/notes.txt",
            "a/x.PnG",
            "a/z.tiff",
            "C/q.bmp",
        ] {
            touch(&r.join(f));
        }
        std::fs::write(r.join("loose.jpg"), b"x").unwrap();
        let f = ImageFolder::scan(r).unwrap();
        assert_eq!(f.classes, ["C", "a", "b"]);
        let got: Vec<(String, i64)> = f
            .samples
            .iter()
            .map(|(p, l)| (p.strip_prefix(r).unwrap().display().to_string(), *l))
            .collect();
        let want = [
            ("C/q.bmp", 0),
            ("a/x.PnG", 1),
            ("a/z.tiff", 1),
            ("b/10.png", 2),
            ("b/2.JPG", 2),
            // Folder paths sorted as strings: "b/sub" < "b/sub b" (a prefix sorts first).
            ("b/sub/1.jpeg", 2),
            ("b/sub b/0.webp", 2),
        ];
        let want: Vec<(String, i64)> = want.iter().map(|(p, l)| (p.to_string(), *l)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn empty_class_and_missing_root_are_errors() {
        let dir = TempDir::new("folder");
        touch(&dir.path().join("a/x.jpg"));
        touch(&dir.path().join("b/readme.txt"));
        let e = ImageFolder::scan(dir.path()).unwrap_err().to_string();
        assert!(e.contains("found no image in the class folder(s) b"), "{e}");
        let e = ImageFolder::scan(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
        let flat = TempDir::new("folder");
        touch(&flat.path().join("x.jpg"));
        let e = ImageFolder::scan(flat.path()).unwrap_err().to_string();
        assert!(e.contains("found no class folder"), "{e}");
    }

    #[test]
    fn extensions() {
        for n in [
            "a.jpg", "a.JPEG", "a.Png", "a.ppm", "a.pgm", "a.tif", "a.webp",
        ] {
            assert!(has_image_extension(n), "{n}");
        }
        for n in ["a.gif", "a.jpg.txt", "jpg", "a.heic"] {
            assert!(!has_image_extension(n), "{n}");
        }
    }
}
