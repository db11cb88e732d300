#!/usr/bin/env python3
"""Builds the timm ViT fixtures of tests/vit_models.rs (run once; outputs are committed).

    pip install torch timm safetensors   # written with torch 2.13, timm 1.0.31
    python3 scripts/fixtures_timm.py

For each reduced-size configuration below it builds timm's own
`timm.models.vision_transformer.VisionTransformer` (global_pool='token', class token, learned
position embeddings), seeds it, replaces every tensor by random non-trivial values (LayerNorm
gamma/beta, cls_token and pos_embed included: timm's init leaves them at 1/0/~0), runs it in eval
mode on a fixed input, and writes tests/fixtures/models/timm_<name>.safetensors with

- the state_dict, float32, under timm's names;
- `__input__` (2 x C x S x S, float32) and `__logits__` (2 x classes, float32, from the float32
  model) and `__logits_f64__` (float64, the float64 copy of the same weights): names with
  underscores that no timm parameter has;
- metadata: the torch and timm versions and the configuration as JSON (`config`).
"""
import json
import os

import torch
import timm
from timm.models.vision_transformer import VisionTransformer
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "models")

# name -> VisionTransformer keyword arguments (and the seed)
CONFIGS = {
    "vit": dict(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=48, depth=2,
                num_heads=3, mlp_ratio=4.0, seed=0),
    # vit-cifar's patch 4 and MLP ratio 2, one block, grey input
    "vit_p4": dict(img_size=16, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, depth=1,
                   num_heads=2, mlp_ratio=2.0, seed=1),
}


def randomise(model, gen):
    """Every tensor random and of order one, so that attention is far from uniform and LayerNorm's
    affine parameters, the class token and the position embeddings all matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                p.copy_(1.0 + 0.3 * r)
            elif name.endswith(".bias") or name in ("cls_token", "pos_embed"):
                p.copy_(0.3 * r)
            else:  # weights: unit-variance outputs
                fan_in = p[0].numel()
                p.copy_(r / fan_in ** 0.5)


def build(name, kw):
    kw = dict(kw)
    seed = kw.pop("seed")
    torch.manual_seed(seed)
    model = VisionTransformer(global_pool="token", class_token=True, qkv_bias=True,
                              drop_rate=0.1, attn_drop_rate=0.1, proj_drop_rate=0.1,
                              pos_drop_rate=0.1, drop_path_rate=0.1, **kw)
    gen = torch.Generator().manual_seed(1000 + seed)
    randomise(model, gen)
    model.eval()  # every dropout and drop-path is the identity
    x = torch.randn(2, kw["in_chans"], kw["img_size"], kw["img_size"], generator=gen)
    with torch.no_grad():
        logits = model(x)
        logits64 = model.double()(x.double())
    model.float()
    tensors = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    assert not any(k.startswith("__") for k in tensors)
    tensors["__input__"] = x.contiguous()
    tensors["__logits__"] = logits.contiguous()
    tensors["__logits_f64__"] = logits64.contiguous()
    meta = {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "config": json.dumps(kw, sort_keys=True),
    }
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, f"timm_{name}.safetensors")
    save_file(tensors, path, metadata=meta)
    size = os.path.getsize(path)
    assert size < 1 << 20, size
    diff = (logits.double() - logits64).abs().max().item()
    print(f"{path}: {len(tensors)} tensors, {size} bytes, f32 vs f64 logits {diff:.1e}")


if __name__ == "__main__":
    for name, kw in CONFIGS.items():
        build(name, kw)
