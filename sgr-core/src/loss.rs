//! Losses and metrics written from primitives (differentiable twice).

use candle_core::{DType, Tensor, D};

use crate::Result;

/// Row-wise log-softmax, stable, differentiable twice (the shift is a detached constant, which
/// leaves the value and every derivative unchanged).
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let shift = logits.max_keepdim(D::Minus1)?.detach();
    let z = logits.broadcast_sub(&shift)?;
    let lse = z.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(z.broadcast_sub(&lse)?)
}

/// One-hot matrix `(batch, classes)` of integer labels, in `dtype`.
pub fn one_hot(labels: &Tensor, classes: usize, dtype: DType) -> Result<Tensor> {
    let labels = labels.to_dtype(DType::U32)?;
    let n = labels.dim(0)?;
    let ids = Tensor::arange(0u32, classes as u32, labels.device())?
        .reshape((1, classes))?
        .broadcast_as((n, classes))?;
    let lab = labels.reshape((n, 1))?.broadcast_as((n, classes))?;
    Ok(ids.eq(&lab)?.to_dtype(dtype)?)
}

/// Mean cross-entropy of `logits` `(batch, classes)` against integer `labels` `(batch,)`.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (n, classes) = logits.dims2()?;
    let oh = one_hot(labels, classes, logits.dtype())?;
    let lsm = log_softmax(logits)?;
    Ok((lsm.mul(&oh)?.sum_all()? * (-1.0 / n as f64))?)
}

/// Number of rows whose arg-max equals the label.
pub fn correct_count(logits: &Tensor, labels: &Tensor) -> Result<usize> {
    let pred = logits.argmax(D::Minus1)?.to_dtype(DType::U32)?;
    let lab = labels.to_dtype(DType::U32)?;
    let eq = pred.eq(&lab)?.to_dtype(DType::U32)?.sum_all()?;
    Ok(eq.to_scalar::<u32>()? as usize)
}

/// Number of rows whose label is among the `k` largest logits.
pub fn topk_correct_count(logits: &Tensor, labels: &Tensor, k: usize) -> Result<usize> {
    let logits = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let labels = labels.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    let mut correct = 0;
    for (row, &y) in logits.iter().zip(labels.iter()) {
        let target = row[y as usize];
        let better = row.iter().filter(|&&v| v > target).count();
        if better < k {
            correct += 1;
        }
    }
    Ok(correct)
}
