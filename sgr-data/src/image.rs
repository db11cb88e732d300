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

/// The most pixels a decoded image may have (8192 × 8192): its `f32` planes take 12 bytes a
/// pixel, and a small compressed file can declare a huge image.
pub const MAX_PIXELS: u64 = 1 << 26;

/// Most pixels one byte of a file can hold, with a 2x margin: deflate (PNG) inflates at most
/// 1032:1 and a pixel takes at least one bit; a JPEG codes each 8x8 block in at least one bit.
/// What decoding one image may allocate besides its pixels (ICC profiles are at most a few
/// MiB in practice).
const MAX_METADATA_BYTES: u64 = 16 << 20;

fn pixels_per_byte(format: Option<image::ImageFormat>) -> u64 {
    match format {
        Some(image::ImageFormat::Jpeg) => 2 * 512,
        _ => 2 * 8 * 1032,
    }
}

/// Decodes a JPEG or PNG file to RGB: grey, grey+alpha, RGBA and 16-bit images are converted
/// (alpha dropped, 16-bit scaled to [0, 1]). A file cut short, an image of more than
/// [`MAX_PIXELS`] pixels, or one whose declared size its file is too small to hold, is an
/// error.
pub fn decode_rgb(path: &Path) -> Result<Image> {
    let bytes = crate::error::read_file(path, sgr_schema::file::limits::IMAGE)?;
    decode_rgb_bytes(&bytes, path)
}

/// Checks an image file without decoding its pixels: a JPEG or PNG must be complete (every
/// chunk or segment present), and its header must declare a size within [`MAX_PIXELS`] that
/// the file can hold. This finds the files [`decode_rgb`] would refuse, except those whose
/// compressed pixel data itself is corrupt.
pub fn check_image(path: &Path) -> Result<()> {
    let bytes = crate::error::read_file(path, sgr_schema::file::limits::IMAGE)?;
    header(&bytes, path).map(|_| ())
}

fn reader<'a>(
    bytes: &'a [u8],
    path: &Path,
    max_alloc: u64,
) -> Result<image::ImageReader<std::io::Cursor<&'a [u8]>>> {
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_alloc);
    let mut r = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DataError::Format {
            path: path.to_path_buf(),
            problem: format!("cannot read image: {e}"),
        })?;
    r.limits(limits);
    Ok(r)
}

/// The structure and declared size of an image: completeness, the header under a small
/// budget, and the size checks. Returns the width and height.
fn header(bytes: &[u8], path: &Path) -> Result<(u32, u32)> {
    let bad = |problem: String| DataError::Format {
        path: path.to_path_buf(),
        problem,
    };
    let format = image::guess_format(bytes).ok();
    match format {
        Some(image::ImageFormat::Png) => crate::complete::png(bytes),
        Some(image::ImageFormat::Jpeg) => crate::complete::jpeg(bytes),
        _ => Ok(()),
    }
    .map_err(|e| bad(format!("cannot decode image: {e}")))?;
    // Under a small budget: what a decoder allocates before the pixels (a compressed colour
    // profile, text chunks) is bounded by it, not by the pixel budget.
    let (w, h) = reader(bytes, path, MAX_METADATA_BYTES)?
        .into_dimensions()
        .map_err(|e| match e {
            image::ImageError::Limits(_) => bad(format!(
                "the image's metadata (colour profile, text) needs more than {} MiB to decode",
                MAX_METADATA_BYTES >> 20
            )),
            e => bad(format!("cannot decode image: {e}")),
        })?;
    let pixels = u64::from(w) * u64::from(h);
    if pixels > MAX_PIXELS {
        return Err(bad(format!(
            "image of {w}x{h} pixels is larger than the {MAX_PIXELS} pixels allowed (corrupt header?)"
        )));
    }
    if pixels > (bytes.len() as u64).saturating_mul(pixels_per_byte(format)) {
        return Err(bad(format!(
            "image of {w}x{h} pixels cannot be held in {} bytes: corrupt header or truncated file",
            bytes.len()
        )));
    }
    Ok((w, h))
}

/// Like [`decode_rgb`] from bytes; `path` only names the source in errors.
pub fn decode_rgb_bytes(bytes: &[u8], path: &Path) -> Result<Image> {
    let cannot = |e: image::ImageError| DataError::Format {
        path: path.to_path_buf(),
        problem: format!("cannot decode image: {e}"),
    };
    let (w, h) = header(bytes, path)?;
    // Then the pixels: at most 8 bytes each (16-bit RGBA), plus the metadata budget.
    let budget = MAX_METADATA_BYTES + 8 * u64::from(w) * u64::from(h);
    let decoder = reader(bytes, path, budget)?
        .into_decoder()
        .map_err(cannot)?;
    if image::ImageDecoder::dimensions(&decoder) != (w, h) {
        return Err(DataError::Format {
            path: path.to_path_buf(),
            problem: "the image's header gives two different sizes".into(),
        });
    }
    let img = image::DynamicImage::from_decoder(decoder).map_err(cannot)?;
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

/// A contiguous range of another source's samples (`--train-limit`, `--validation`).
pub struct Subset {
    inner: std::sync::Arc<dyn Source>,
    start: usize,
    n: usize,
    name: String,
}

impl Subset {
    /// The first `n` samples of `inner` (all if fewer).
    pub fn first(inner: std::sync::Arc<dyn Source>, n: usize) -> Self {
        let n = n.min(inner.len());
        let name = format!("{}[..{n}]", inner.name());
        Self {
            inner,
            start: 0,
            n,
            name,
        }
    }

    /// Samples `range` of `inner`, clipped to its length.
    pub fn range(inner: std::sync::Arc<dyn Source>, range: std::ops::Range<usize>) -> Self {
        let end = range.end.min(inner.len());
        let start = range.start.min(end);
        let name = format!("{}[{start}..{end}]", inner.name());
        Self {
            inner,
            start,
            n: end - start,
            name,
        }
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
        self.inner.label(self.start + i)
    }

    fn image(&self, i: usize) -> Result<Image> {
        self.inner.image(self.start + i)
    }
}
