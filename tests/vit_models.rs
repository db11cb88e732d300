//! ViT/DeiT: parameter counts, gradients, and logits against timm fixtures.
