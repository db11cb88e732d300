//! torchvision ResNets: parameter counts, gradients, and logits against PyTorch fixtures.
