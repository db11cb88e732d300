//! IDX files (MNIST, Fashion-MNIST), raw or gzip: big-endian magic 0x00000803 (u8 images,
//! 3 dimensions) or 0x00000801 (u8 labels, 1 dimension), then the dimensions as u32 BE.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::{DataError, ImageDataset, Result};

/// An IDX file's bytes, raw or decompressed from gzip (any number of members, as `zcat`).
struct Stream<'a> {
    path: &'a Path,
    gzip: bool,
    inner: Box<dyn Read + 'a>,
}

impl<'a> Stream<'a> {
    fn open(path: &'a Path) -> Result<Self> {
        let io = |source| DataError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = BufReader::new(
            sgr_schema::file::open_regular(path, sgr_schema::file::limits::DATA).map_err(io)?,
        );
        let gzip = file.fill_buf().map_err(io)?.starts_with(&[0x1f, 0x8b]);
        let inner: Box<dyn Read> = if gzip {
            Box::new(flate2::read::MultiGzDecoder::new(file))
        } else {
            Box::new(file)
        };
        Ok(Self { path, gzip, inner })
    }

    fn error(&self, e: std::io::Error) -> DataError {
        if self.gzip {
            DataError::Format {
                path: self.path.to_path_buf(),
                problem: format!("corrupt or truncated gzip stream: {e}"),
            }
        } else {
            DataError::Io {
                path: self.path.to_path_buf(),
                source: e,
            }
        }
    }

    /// Reads at most `limit` bytes: fewer only at the end of the data.
    fn read_up_to(&mut self, limit: u64) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        match (&mut self.inner).take(limit).read_to_end(&mut out) {
            Ok(_) => Ok(out),
            Err(e) => Err(self.error(e)),
        }
    }
}

/// Parses an IDX file of u8 values (raw or gzip): returns the dimensions and the values.
///
/// The header is read first; no more than the payload it declares (plus one byte, to tell a
/// file that is too long) is read or decompressed.
pub fn read_idx(path: &Path, expect_dims: usize) -> Result<(Vec<usize>, Vec<u8>)> {
    if !(1..=255).contains(&expect_dims) {
        return Err(DataError::Invalid(format!(
            "IDX files have 1 to 255 dimensions, not {expect_dims}"
        )));
    }
    let bad = |problem: String| DataError::Format {
        path: path.to_path_buf(),
        problem,
    };
    let mut s = Stream::open(path)?;
    let magic = s.read_up_to(4)?;
    if magic.len() < 4 {
        return Err(bad(format!(
            "truncated: {} bytes, no IDX header",
            magic.len()
        )));
    }
    let magic = u32::from_be_bytes([magic[0], magic[1], magic[2], magic[3]]);
    let want = 0x0000_0800 | expect_dims as u32;
    if magic != want {
        return Err(bad(format!(
            "wrong magic 0x{magic:08x}, expected 0x{want:08x} (u8 data with {expect_dims} dimension(s))"
        )));
    }
    let raw_dims = s.read_up_to(4 * expect_dims as u64)?;
    if raw_dims.len() < 4 * expect_dims {
        return Err(bad(format!(
            "truncated header: {} bytes",
            4 + raw_dims.len()
        )));
    }
    let dims: Vec<usize> = raw_dims
        .chunks_exact(4)
        .map(|d| u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize)
        .collect();
    let n = crate::size::product(&dims).ok_or_else(|| {
        bad(format!(
            "dimensions {dims:?} overflow: their product is not a size (corrupt header?)"
        ))
    })?;
    let data = s.read_up_to((n as u64).saturating_add(1))?;
    if data.len() > n {
        return Err(bad(format!(
            "holds more than the {n} bytes dimensions {dims:?} declare (corrupt header, or not one IDX file)"
        )));
    }
    if data.len() < n {
        return Err(bad(format!(
            "{} data bytes for dimensions {dims:?} ({n} expected) — truncated",
            data.len()
        )));
    }
    Ok((dims, data))
}

/// Loads an image file and its label file into a data set.
pub fn load_idx_pair(
    images: &Path,
    labels: &Path,
    num_classes: usize,
    name: &str,
) -> Result<ImageDataset> {
    let (idims, pixels) = read_idx(images, 3)?;
    if idims[1] == 0 || idims[2] == 0 {
        return Err(DataError::Format {
            path: images.to_path_buf(),
            problem: format!(
                "images of {}x{} pixels: an image file needs a positive height and width",
                idims[1], idims[2]
            ),
        });
    }
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
