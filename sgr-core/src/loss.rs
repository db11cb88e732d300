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

/// Mean binary cross-entropy of `sigmoid(z)` against `target` (same shape, values in [0, 1]):
/// mean(softplus(z) − t·z), written so that it is stable for any `z` and differentiable twice.
/// It equals PyTorch's `BCELoss()(torch.sigmoid(z), t)` wherever that does not clamp its logs
/// at −100.
pub fn binary_cross_entropy_with_logits(z: &Tensor, target: &Tensor) -> Result<Tensor> {
    let t = target.to_dtype(z.dtype())?.detach();
    // softplus(z) = max(z, 0) + log(1 + exp(−|z|)); the kinks of max and |·| cancel.
    let softplus = (z.relu()? + ((z.abs()?.neg()?.exp()? + 1.0)?.log()?))?;
    Ok((softplus - z.mul(&t)?)?.mean_all()?)
}

/// Rows scaled to unit L2 norm, as `torch.nn.functional.normalize(x, dim=1)` (the norm floored
/// at 1e-12).
pub fn l2_normalize_rows(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
    Ok(x.broadcast_div(&norm)?)
}

/// The supervised contrastive loss (Khosla et al. 2020) of one view per sample, as
/// `SupConLoss(contrast_mode="all", base_temperature=temperature)` in InfoPro's code.
///
/// `features` `(batch, dim)` are unit rows; for anchor i the positives are the other samples of
/// its class, and the loss is −mean over positives of log softmax_{j≠i}(f_i·f_j / τ). Anchors
/// without a positive contribute 0; the result is the mean over all anchors.
pub fn supervised_contrastive(
    features: &Tensor,
    labels: &Tensor,
    temperature: f64,
) -> Result<Tensor> {
    let n = features.dim(0)?;
    if n < 2 {
        // No other sample to contrast with: the loss is 0 (kept on the graph, so the caller's
        // backward still reaches the features).
        return Ok((features.sum_all()? * 0.0)?);
    }
    let dtype = features.dtype();
    let device = features.device();
    let sim = (features.matmul(&features.t()?)? / temperature)?;
    let shift = sim.max_keepdim(D::Minus1)?.detach();
    let logits = sim.broadcast_sub(&shift)?;
    let eye = Tensor::eye(n, dtype, device)?;
    let others = (Tensor::ones((n, n), dtype, device)? - &eye)?;
    let y = labels.to_dtype(DType::U32)?;
    let same = y
        .reshape((n, 1))?
        .broadcast_as((n, n))?
        .eq(&y.reshape((1, n))?.broadcast_as((n, n))?)?
        .to_dtype(dtype)?;
    let positives = same.mul(&others)?;
    let denom = logits.exp()?.mul(&others)?.sum_keepdim(D::Minus1)?.log()?;
    let log_prob = logits.broadcast_sub(&denom)?;
    // Anchors with no positive divide by 1 (their sum is 0), as the reference does.
    let count = positives.sum_keepdim(D::Minus1)?;
    let count = (&count + count.eq(0.0)?.to_dtype(dtype)?)?;
    let mean_pos = positives
        .mul(&log_prob)?
        .sum_keepdim(D::Minus1)?
        .div(&count)?;
    Ok((mean_pos.mean_all()? * -1.0)?)
}
