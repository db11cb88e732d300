//! Pooling layers (max-pool with padding and a correct backward).
