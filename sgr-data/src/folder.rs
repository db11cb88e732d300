//! ImageNet-style folders: `root/<class>/<image>` with JPEG or PNG files. Classes are indexed by
//! sorted folder name, or by an optional class-index file (one class name per line, the line
//! number being the index). Images are decoded when a sample is requested.
//!
//! Symbolic links: a class folder may be a link (e.g. to a class of a larger data set), but no
//! two class folders may resolve to the same place or one inside another, nor to a folder
//! holding the root. Inside a class folder, linked directories are not descended into (they
//! could loop, or reach another class), and a linked file is read only if it resolves to a
//! regular file; other special files (FIFOs, devices, sockets) are skipped too.

use std::path::{Path, PathBuf};

use crate::image::{decode_rgb, Image, Source};
use crate::{DataError, Result};

/// File extensions read as images (case-insensitive).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// An image-folder data set.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    name: String,
    classes: Vec<String>,
    samples: Vec<(PathBuf, u32)>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

/// Images under `dir`, in sorted order, descending into real (not linked) directories only.
fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<(PathBuf, std::fs::FileType)> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .map(|e| {
            let e = e.map_err(io_err(dir))?;
            let kind = e.file_type().map_err(io_err(&e.path()))?;
            Ok((e.path(), kind))
        })
        .collect::<Result<_>>()?;
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    for (p, kind) in entries {
        if kind.is_dir() {
            collect_images(&p, out)?;
        } else if is_image(&p) {
            let regular = kind.is_file()
                || (kind.is_symlink()
                    && std::fs::metadata(&p).map(|m| m.is_file()).unwrap_or(false));
            if regular {
                out.push(p);
            }
        }
    }
    Ok(())
}

/// Refuses class folders that resolve to the same place, one inside another, or to a folder
/// holding the root: their images would be read twice, under two labels.
fn check_disjoint(root: &Path, folders: &[String]) -> Result<()> {
    let canon = |p: &Path| std::fs::canonicalize(p).map_err(io_err(p));
    let real_root = canon(root)?;
    let mut real: Vec<(PathBuf, &str)> = Vec::with_capacity(folders.len());
    for f in folders {
        let r = canon(&root.join(f))?;
        if real_root.starts_with(&r) {
            return Err(DataError::Format {
                path: root.join(f),
                problem: format!(
                    "class folder `{f}` resolves to {}, which holds the data set root: remove the link",
                    r.display()
                ),
            });
        }
        real.push((r, f));
    }
    real.sort();
    for w in real.windows(2) {
        if w[1].0.starts_with(&w[0].0) {
            return Err(DataError::Format {
                path: root.join(w[1].1),
                problem: format!(
                    "class folders `{}` and `{}` overlap (both reach {}): each image must belong to one class",
                    w[0].1,
                    w[1].1,
                    w[1].0.display()
                ),
            });
        }
    }
    Ok(())
}

/// The class names of a class-index file: the first word of each non-empty line, by label.
fn read_class_index(p: &Path) -> Result<Vec<String>> {
    let text = sgr_schema::file::read_regular_string(p, sgr_schema::file::limits::TEXT)
        .map_err(io_err(p))?;
    let list: Vec<String> = text
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
        .filter(|l| !l.is_empty())
        .collect();
    let mut seen = std::collections::HashSet::new();
    if let Some(d) = list.iter().find(|c| !seen.insert(c.as_str())) {
        return Err(DataError::Format {
            path: p.to_path_buf(),
            problem: format!("class `{d}` is listed twice"),
        });
    }
    Ok(list)
}

impl ImageFolder {
    /// Scans `root`. With `class_index`, every class folder must be listed in it.
    pub fn open(root: &Path, class_index: Option<&Path>) -> Result<Self> {
        let listed = match class_index {
            None => None,
            Some(p) => Some((
                read_class_index(p)?,
                format!("the class-index file {}", p.display()),
            )),
        };
        Self::scan(root, listed)
    }

    /// Scans `root` with the classes a trained model was trained on (its class names, by
    /// label): every class folder must be one of them, so labels mean what they meant in
    /// training even when some classes have no folder here.
    pub fn open_with_classes(root: &Path, classes: &[String]) -> Result<Self> {
        Self::scan(root, Some((classes.to_vec(), "the model's classes".into())))
    }

    /// `listed`: the classes by label, and what listed them (for errors).
    fn scan(root: &Path, listed: Option<(Vec<String>, String)>) -> Result<Self> {
        let mut folders: Vec<String> = Vec::new();
        for e in std::fs::read_dir(root)
            .map_err(io_err(root))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
        {
            // A class is named by its folder in config.json and the model card: the name must be
            // text, where a lossy conversion would name a folder that does not exist.
            let name = e
                .file_name()
                .into_string()
                .map_err(|raw| DataError::Format {
                    path: e.path(),
                    problem: format!(
                        "the class folder's name {raw:?} is not valid UTF-8: rename the folder"
                    ),
                })?;
            folders.push(name);
        }
        folders.sort();
        if folders.is_empty() {
            return Err(DataError::NotFound {
                what: "class folders".into(),
                dir: root.to_path_buf(),
                hint: "expected root/<class>/<image>.jpg|png".into(),
            });
        }
        check_disjoint(root, &folders)?;
        let classes: Vec<String> = match listed {
            None => folders.clone(),
            Some((list, from)) => {
                if let Some(unknown) = folders.iter().find(|f| !list.contains(f)) {
                    return Err(DataError::Format {
                        path: root.join(unknown),
                        problem: format!("unknown class folder `{unknown}`: not in {from}"),
                    });
                }
                list
            }
        };
        if classes.len() < 2 {
            return Err(DataError::Format {
                path: root.to_path_buf(),
                problem: format!(
                    "{} class ({}): a classifier needs at least two; put each class's images \
                     in a folder of its own under {}",
                    classes.len(),
                    classes.join(", "),
                    root.display()
                ),
            });
        }
        let mut samples = Vec::new();
        for f in &folders {
            let label = classes.iter().position(|c| c == f).unwrap_or(0) as u32;
            let mut files = Vec::new();
            collect_images(&root.join(f), &mut files)?;
            samples.extend(files.into_iter().map(|p| (p, label)));
        }
        if samples.is_empty() {
            return Err(DataError::NotFound {
                what: format!("images ({})", IMAGE_EXTENSIONS.join(", ")),
                dir: root.to_path_buf(),
                hint: "expected root/<class>/<image>.jpg|png".into(),
            });
        }
        Ok(Self {
            name: root.display().to_string(),
            classes,
            samples,
        })
    }

    /// Checks every image without decoding its pixels ([`crate::check_image`]) on `threads`
    /// threads, so that a truncated or corrupt file is found before training rather than when
    /// it is first read. The error names the first bad file in sample order.
    pub fn check_files(&self, threads: usize) -> Result<()> {
        let threads = threads.clamp(1, 64);
        let chunk = self.samples.len().div_ceil(threads).max(1);
        let first_bad = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .samples
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .find_map(|(p, _)| crate::image::check_image(p).err())
                    })
                })
                .collect();
            // In chunk order: the first chunk's error is the first in sample order.
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .find_map(|e| e)
        });
        match first_bad {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Class names, by index.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Path and label of every sample.
    pub fn samples(&self) -> &[(PathBuf, u32)] {
        &self.samples
    }
}

impl Source for ImageFolder {
    fn name(&self) -> &str {
        &self.name
    }

    fn len(&self) -> usize {
        self.samples.len()
    }

    fn num_classes(&self) -> usize {
        self.classes.len()
    }

    fn label(&self, i: usize) -> u32 {
        self.samples[i].1
    }

    fn image(&self, i: usize) -> Result<Image> {
        decode_rgb(&self.samples[i].0)
    }
}
