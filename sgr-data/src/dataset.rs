use crate::{DataError, Result};

/// Images stored as bytes (N × C × H × W, channel-planar) with integer labels.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageDataset {
    /// Name, e.g. `digits/train`.
    pub name: String,
    /// Channels.
    pub channels: usize,
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
    /// Number of classes.
    pub num_classes: usize,
    /// Value of a fully-on pixel (255 for 8-bit images, 16 for the digits).
    pub pixel_max: f32,
    pixels: Vec<u8>,
    labels: Vec<u32>,
}

impl ImageDataset {
    /// A data set from raw parts; checks that the sizes agree and labels are in range.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: impl Into<String>,
        channels: usize,
        height: usize,
        width: usize,
        num_classes: usize,
        pixel_max: f32,
        pixels: Vec<u8>,
        labels: Vec<u32>,
    ) -> Result<Self> {
        let name = name.into();
        let per = crate::size::product(&[channels, height, width]);
        let Some(total) = per.and_then(|per| per.checked_mul(labels.len())) else {
            return Err(DataError::Invalid(format!(
                "{name}: {} images of {channels}x{height}x{width} overflow the address space",
                labels.len()
            )));
        };
        if per == Some(0) || pixels.len() != total {
            return Err(DataError::Invalid(format!(
                "{name}: {} pixel bytes for {} labels of {channels}x{height}x{width}",
                pixels.len(),
                labels.len()
            )));
        }
        if let Some((i, l)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= num_classes)
        {
            return Err(DataError::Invalid(format!(
                "{name}: label {l} of sample {i} is not below {num_classes} classes"
            )));
        }
        Ok(Self {
            name,
            channels,
            height,
            width,
            num_classes,
            pixel_max,
            pixels,
            labels,
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the data set is empty.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes of one image.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The pixels of sample `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.pixels[i * n..(i + 1) * n]
    }

    /// Labels.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// Appends another data set of the same geometry.
    pub fn extend(&mut self, other: ImageDataset) -> Result<()> {
        if (other.channels, other.height, other.width, other.num_classes)
            != (self.channels, self.height, self.width, self.num_classes)
        {
            return Err(DataError::Invalid(format!(
                "cannot append {} to {}: different geometry",
                other.name, self.name
            )));
        }
        self.pixels.extend(other.pixels);
        self.labels.extend(other.labels);
        Ok(())
    }

    /// Per-channel mean and standard deviation of pixel values scaled to [0, 1].
    pub fn channel_stats(&self) -> (Vec<f32>, Vec<f32>) {
        let hw = self.height * self.width;
        let mut sum = vec![0f64; self.channels];
        let mut sq = vec![0f64; self.channels];
        for i in 0..self.len() {
            let img = self.image(i);
            for c in 0..self.channels {
                for &p in &img[c * hw..(c + 1) * hw] {
                    let v = p as f64 / self.pixel_max as f64;
                    sum[c] += v;
                    sq[c] += v * v;
                }
            }
        }
        let n = (self.len() * hw).max(1) as f64;
        let mean: Vec<f32> = sum.iter().map(|s| (s / n) as f32).collect();
        let std = sq
            .iter()
            .zip(&mean)
            .map(|(q, &m)| ((q / n - (m as f64).powi(2)).max(1e-12)).sqrt() as f32)
            .collect();
        (mean, std)
    }
}

impl crate::Source for ImageDataset {
    fn name(&self) -> &str {
        &self.name
    }

    fn len(&self) -> usize {
        self.labels.len()
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn label(&self, i: usize) -> u32 {
        self.labels[i]
    }

    fn image(&self, i: usize) -> Result<crate::Image> {
        Ok(crate::Image::from_planar_u8(
            self.channels,
            self.height,
            self.width,
            ImageDataset::image(self, i),
            self.pixel_max,
        ))
    }
}
