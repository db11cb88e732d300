//! Bilinear resizing with `align_corners=True`, as two matrix products (rows, then columns),
//! so that it is linear in its input and differentiable twice with no decision to replay.

use candle_core::{Device, Tensor};

use crate::Result;

/// The `(n_out, n_in)` matrix of 1-D linear interpolation with the corner samples aligned:
/// output `i` samples input position `i·(n_in − 1)/(n_out − 1)` (PyTorch's `align_corners=True`).
pub fn interpolation_matrix(n_in: usize, n_out: usize) -> Vec<f64> {
    let mut m = vec![0.0; n_out * n_in];
    for i in 0..n_out {
        let src = if n_out > 1 {
            i as f64 * (n_in - 1) as f64 / (n_out - 1) as f64
        } else {
            0.0
        };
        let i0 = (src.floor() as usize).min(n_in - 1);
        let i1 = (i0 + 1).min(n_in - 1);
        let frac = src - i0 as f64;
        m[i * n_in + i0] += 1.0 - frac;
        m[i * n_in + i1] += frac;
    }
    m
}

fn matrix(n_in: usize, n_out: usize, like: &Tensor, device: &Device) -> Result<Tensor> {
    let m = Tensor::from_vec(interpolation_matrix(n_in, n_out), (n_out, n_in), device)?;
    Ok(m.to_dtype(like.dtype())?)
}

/// Resizes NCHW `x` to `h_out`×`w_out` by bilinear interpolation with aligned corners
/// (`F.interpolate(x, size, mode="bilinear", align_corners=True)`).
pub fn upsample_bilinear(x: &Tensor, h_out: usize, w_out: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if h == 0 || w == 0 || h_out == 0 || w_out == 0 {
        return Err(crate::Error::InvalidConfig(format!(
            "bilinear resize of a {h}×{w} map to {h_out}×{w_out}: every side must be ≥ 1"
        )));
    }
    if (h, w) == (h_out, w_out) {
        return Ok(x.clone());
    }
    let dev = x.device();
    // Columns: (b·c·h, w) × (w, w_out).
    let mw = matrix(w, w_out, x, dev)?;
    let y = x.reshape((b * c * h, w))?.matmul(&mw.t()?)?;
    // Rows: (h_out, h) × (b·c, h, w_out).
    let mh = matrix(h, h_out, x, dev)?;
    let y = mh
        .unsqueeze(0)?
        .broadcast_as((b * c, h_out, h))?
        .contiguous()?
        .matmul(&y.reshape((b * c, h, w_out))?)?;
    Ok(y.reshape((b, c, h_out, w_out))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    /// Direct evaluation of the align-corners formula at every output pixel, in f64.
    fn brute(x: &[f64], h: usize, w: usize, ho: usize, wo: usize) -> Vec<f64> {
        let pos = |i: usize, n_in: usize, n_out: usize| {
            if n_out > 1 {
                i as f64 * (n_in - 1) as f64 / (n_out - 1) as f64
            } else {
                0.0
            }
        };
        let mut out = vec![0.0; ho * wo];
        for i in 0..ho {
            for j in 0..wo {
                let (y, xq) = (pos(i, h, ho), pos(j, w, wo));
                let (y0, x0) = (y.floor() as usize, xq.floor() as usize);
                let (y1, x1) = ((y0 + 1).min(h - 1), (x0 + 1).min(w - 1));
                let (fy, fx) = (y - y0 as f64, xq - x0 as f64);
                let at = |r: usize, c: usize| x[r * w + c];
                out[i * wo + j] = (1.0 - fy) * ((1.0 - fx) * at(y0, x0) + fx * at(y0, x1))
                    + fy * ((1.0 - fx) * at(y1, x0) + fx * at(y1, x1));
            }
        }
        out
    }

    #[test]
    fn matches_the_formula_at_every_pixel() {
        for &(h, w, ho, wo) in &[(8, 8, 32, 32), (3, 5, 7, 4), (1, 4, 6, 6), (4, 4, 4, 9)] {
            let v: Vec<f64> = (0..2 * h * w)
                .map(|i| ((i * 37) % 11) as f64 - 5.0)
                .collect();
            let x = Tensor::from_vec(v.clone(), (1, 2, h, w), &Device::Cpu).unwrap();
            let y = upsample_bilinear(&x, ho, wo).unwrap();
            let y = y.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for c in 0..2 {
                let want = brute(&v[c * h * w..(c + 1) * h * w], h, w, ho, wo);
                for (a, b) in y[c * ho * wo..(c + 1) * ho * wo].iter().zip(&want) {
                    assert!((a - b).abs() < 1e-12, "{h}x{w}->{ho}x{wo}: {a} vs {b}");
                }
            }
        }
        let x = Tensor::zeros((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(upsample_bilinear(&x, 0, 3).is_err());
    }
}
