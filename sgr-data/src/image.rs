//! Decoded images and the [`Source`] trait every data set implements.

use std::path::Path;

use crate::{DataError, Result};

/// An image as channel-planar (C × H × W) `f32` values in [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// Channels.
    pub channels: usize,
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
    /// `channels * height * width` values, channel-planar, row-major.
    pub data: Vec<f32>,
}

impl Image {
    /// A zero image.
    pub fn zeros(channels: usize, height: usize, width: usize) -> Self {
        Self {
            channels,
            height,
            width,
            data: vec![0.0; channels * height * width],
        }
    }

    /// From channel-planar bytes, scaled by `max` (255 for 8-bit images).
    pub fn from_planar_u8(
        channels: usize,
        height: usize,
        width: usize,
        bytes: &[u8],
        max: f32,
    ) -> Self {
        Self {
            channels,
            height,
            width,
            data: bytes.iter().map(|&b| b as f32 / max).collect(),
        }
    }

    /// Value at (c, y, x).
    #[inline]
    pub fn at(&self, c: usize, y: usize, x: usize) -> f32 {
        self.data[(c * self.height + y) * self.width + x]
    }

    /// Mutable value at (c, y, x).
    #[inline]
    pub fn at_mut(&mut self, c: usize, y: usize, x: usize) -> &mut f32 {
        &mut self.data[(c * self.height + y) * self.width + x]
    }

    /// One channel's plane.
    pub fn plane(&self, c: usize) -> &[f32] {
        let n = self.height * self.width;
        &self.data[c * n..(c + 1) * n]
    }
}

/// Decodes a JPEG or PNG file to RGB: grey, grey+alpha, RGBA and 16-bit images are converted
/// (alpha dropped, 16-bit scaled to [0, 1]).
pub fn decode_rgb(path: &Path) -> Result<Image> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_rgb_bytes(&bytes, path)
}

/// Like [`decode_rgb`] from bytes; `path` only names the source in errors.
pub fn decode_rgb_bytes(bytes: &[u8], path: &Path) -> Result<Image> {
    let img = image::load_from_memory(bytes).map_err(|e| DataError::Format {
        path: path.to_path_buf(),
        problem: format!("cannot decode image: {e}"),
    })?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let hw = w * h;
    let mut data = vec![0f32; 3 * hw];
    if img.color().bytes_per_pixel() / img.color().channel_count() > 1 {
        let rgb = img.to_rgb32f();
        for (i, p) in rgb.pixels().enumerate() {
            for c in 0..3 {
                data[c * hw + i] = p.0[c].clamp(0.0, 1.0);
            }
        }
    } else {
        let rgb = img.to_rgb8();
        for (i, p) in rgb.pixels().enumerate() {
            for c in 0..3 {
                data[c * hw + i] = p.0[c] as f32 / 255.0;
            }
        }
    }
    Ok(Image {
        channels: 3,
        height: h,
        width: w,
        data,
    })
}

/// A labelled collection of images that a [`crate::Loader`] can batch.
pub trait Source: Send + Sync {
    /// Name, e.g. `cifar10/train`.
    fn name(&self) -> &str;
    /// Number of samples.
    fn len(&self) -> usize;
    /// Whether there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Number of classes.
    fn num_classes(&self) -> usize;
    /// Label of sample `i`.
    fn label(&self, i: usize) -> u32;
    /// Decoded image of sample `i`, values in [0, 1].
    fn image(&self, i: usize) -> Result<Image>;
}

/// The first `n` samples of another source (`--train-limit`).
pub struct Subset {
    inner: std::sync::Arc<dyn Source>,
    n: usize,
    name: String,
}

impl Subset {
    /// The first `n` samples of `inner` (all if fewer).
    pub fn first(inner: std::sync::Arc<dyn Source>, n: usize) -> Self {
        let n = n.min(inner.len());
        let name = format!("{}[..{n}]", inner.name());
        Self { inner, n, name }
    }
}

impl Source for Subset {
    fn name(&self) -> &str {
        &self.name
    }

    fn len(&self) -> usize {
        self.n
    }

    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }

    fn label(&self, i: usize) -> u32 {
        self.inner.label(i)
    }

    fn image(&self, i: usize) -> Result<Image> {
        self.inner.image(i)
    }
}
