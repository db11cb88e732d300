//! IDX files (MNIST, Fashion-MNIST), raw or gzip: big-endian magic 0x00000803 (u8 images,
//! 3 dimensions) or 0x00000801 (u8 labels, 1 dimension), then the dimensions as u32 BE.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::{DataError, ImageDataset, Result};

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| DataError::Format {
                path: path.to_path_buf(),
                problem: format!("corrupt or truncated gzip stream: {e}"),
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an IDX file of u8 values: returns the dimensions and the values.
pub fn read_idx(path: &Path, expect_dims: usize) -> Result<(Vec<usize>, Vec<u8>)> {
    let bytes = read_maybe_gz(path)?;
    let bad = |problem: String| DataError::Format {
        path: path.to_path_buf(),
        problem,
    };
    if bytes.len() < 4 {
        return Err(bad(format!(
            "truncated: {} bytes, no IDX header",
            bytes.len()
        )));
    }
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let want = 0x0000_0800 | expect_dims as u32;
    if magic != want {
        return Err(bad(format!(
            "wrong magic 0x{magic:08x}, expected 0x{want:08x} (u8 data with {expect_dims} dimension(s))"
        )));
    }
    let header = 4 + 4 * expect_dims;
    if bytes.len() < header {
        return Err(bad(format!("truncated header: {} bytes", bytes.len())));
    }
    let dims: Vec<usize> = (0..expect_dims)
        .map(|d| {
            let o = 4 + 4 * d;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let n: usize = dims.iter().product();
    if bytes.len() - header != n {
        return Err(bad(format!(
            "{} data bytes for dimensions {dims:?} ({n} expected){}",
            bytes.len() - header,
            if bytes.len() - header < n {
                " — truncated"
            } else {
                ""
            }
        )));
    }
    Ok((dims, bytes[header..].to_vec()))
}

/// Loads an image file and its label file into a data set.
pub fn load_idx_pair(
    images: &Path,
    labels: &Path,
    num_classes: usize,
    name: &str,
) -> Result<ImageDataset> {
    let (idims, pixels) = read_idx(images, 3)?;
    let (ldims, lab) = read_idx(labels, 1)?;
    if idims[0] != ldims[0] {
        return Err(DataError::Format {
            path: labels.to_path_buf(),
            problem: format!(
                "{} labels for {} images in {}",
                ldims[0],
                idims[0],
                images.display()
            ),
        });
    }
    if let Some((i, l)) = lab
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= num_classes)
    {
        return Err(DataError::Format {
            path: labels.to_path_buf(),
            problem: format!("label {l} of sample {i} is not below {num_classes}"),
        });
    }
    ImageDataset::new(
        name,
        1,
        idims[1],
        idims[2],
        num_classes,
        255.0,
        pixels,
        lab.into_iter().map(u32::from).collect(),
    )
}

/// Loads an MNIST-layout split from `dir`: `train-images-idx3-ubyte` / `t10k-...`, each raw or
/// with `.gz`.
pub fn load_mnist_dir(dir: &Path, train: bool, name: &str) -> Result<ImageDataset> {
    let stem = if train { "train" } else { "t10k" };
    let find = |kind: &str| -> Result<PathBuf> {
        let base = format!("{stem}-{kind}");
        for cand in [base.clone(), format!("{base}.gz")] {
            let p = dir.join(&cand);
            if p.is_file() {
                return Ok(p);
            }
        }
        Err(DataError::NotFound {
            what: format!("{base}[.gz]"),
            dir: dir.to_path_buf(),
            hint: format!(
                "put the four IDX files of {name} there (MNIST: https://yann.lecun.com/exdb/mnist/, Fashion-MNIST: Debian's dataset-fashion-mnist installs them in /usr/share/datasets/fashion-mnist)"
            ),
        })
    };
    let images = find("images-idx3-ubyte")?;
    let labels = find("labels-idx1-ubyte")?;
    load_idx_pair(
        &images,
        &labels,
        10,
        &format!("{name}/{}", if train { "train" } else { "test" }),
    )
}
