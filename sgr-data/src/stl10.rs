//! STL-10 binary files: `*_X.bin` holds 96×96×3 u8 images, each channel stored column-major;
//! `*_y.bin` holds labels 1..10 as u8.

use std::path::Path;

use crate::{DataError, ImageDataset, Result};

const SIDE: usize = 96;
const IMAGE: usize = 3 * SIDE * SIDE;

/// Reads an STL-10 image file and its label file.
pub fn load_stl10_pair(images: &Path, labels: &Path, name: &str) -> Result<ImageDataset> {
    let x = crate::error::read_file(images, sgr_schema::file::limits::DATA)?;
    let y = crate::error::read_file(labels, sgr_schema::file::limits::DATA)?;
    if x.is_empty() || x.len() % IMAGE != 0 {
        return Err(DataError::Format {
            path: images.to_path_buf(),
            problem: format!(
                "truncated or not STL-10: {} bytes is not a positive multiple of {IMAGE} (96x96x3)",
                x.len()
            ),
        });
    }
    let n = x.len() / IMAGE;
    if y.len() != n {
        return Err(DataError::Format {
            path: labels.to_path_buf(),
            problem: format!("{} labels for {n} images in {}", y.len(), images.display()),
        });
    }
    let mut labs = Vec::with_capacity(n);
    for (i, &l) in y.iter().enumerate() {
        if !(1..=10).contains(&l) {
            return Err(DataError::Format {
                path: labels.to_path_buf(),
                problem: format!("label {l} of sample {i} is outside 1..=10"),
            });
        }
        labs.push(u32::from(l - 1));
    }
    // Column-major per channel → row-major.
    let mut pixels = vec![0u8; x.len()];
    for s in 0..n {
        for c in 0..3 {
            let base = s * IMAGE + c * SIDE * SIDE;
            for col in 0..SIDE {
                for row in 0..SIDE {
                    pixels[base + row * SIDE + col] = x[base + col * SIDE + row];
                }
            }
        }
    }
    ImageDataset::new(name, 3, SIDE, SIDE, 10, 255.0, pixels, labs)
}

/// Loads `train` or `test` from the extracted `stl10_binary` folder (or its parent).
pub fn load_stl10_dir(dir: &Path, train: bool) -> Result<ImageDataset> {
    let split = if train { "train" } else { "test" };
    let root = [dir.to_path_buf(), dir.join("stl10_binary")]
        .into_iter()
        .find(|d| d.join(format!("{split}_X.bin")).is_file())
        .ok_or_else(|| DataError::NotFound {
            what: format!("{split}_X.bin"),
            dir: dir.to_path_buf(),
            hint: "download stl10_binary.tar.gz from https://cs.stanford.edu/~acoates/stl10/ and extract it there".into(),
        })?;
    load_stl10_pair(
        &root.join(format!("{split}_X.bin")),
        &root.join(format!("{split}_y.bin")),
        &format!("stl10/{split}"),
    )
}
