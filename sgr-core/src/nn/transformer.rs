//! Transformer layers written from candle primitives (LayerNorm, GELU, softmax, attention).
