#!/usr/bin/env python3
"""Builds the torchvision ResNet fixtures of tests/torchvision_models.rs (run once; outputs are
committed).

    pip install torch torchvision safetensors   # written with torch 2.13, torchvision 0.28
    python3 scripts/fixtures_torchvision.py

For each reduced-size configuration below it builds torchvision's own
`torchvision.models.resnet.ResNet` with its `BasicBlock` or `Bottleneck` and its forward; only
the widths are smaller: torchvision hard-codes 64 stem channels and stage widths 64..512, so
`Reduced` rebuilds conv1, bn1, layer1..4 (with torchvision's `_make_layer`) and fc at the given
widths and re-applies torchvision's initialisation. It seeds the model, puts every BatchNorm in a
non-trivial state (random gamma/beta, then three train-mode forwards on random batches so that
the running statistics are neither 0/1 nor equal), and writes
tests/fixtures/models/torchvision_<name>.safetensors with

- the state_dict under torchvision's names, float32 (num_batches_tracked: int64 scalars, as
  PyTorch stores them);
- `__input__` (2 x 3 x 64 x 64, float32);
- `__logits__` (float32 model) and `__logits_f64__` (the float64 copy of the same weights), both
  in eval mode;
- `__train_logits_f64__`: one train-mode forward of the float64 copy on `__input__`, and
  `__after__.<bn>.running_mean` / `.running_var` / `.num_batches_tracked` of every BatchNorm after
  that forward (float64; the counter int64);
- metadata: the torch and torchvision versions and the configuration as JSON (`config`).

Every extra name starts with `__`, which no torchvision tensor name does.
"""
import json
import os

import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "models")

# name -> (block, layers, stage widths, stem width, classes, seed)
CONFIGS = {
    "basic": ("basic", [2, 1, 1, 1], [8, 16, 32, 64], 8, 10, 1),
    "bottleneck": ("bottleneck", [1, 2, 1, 1], [4, 8, 16, 32], 8, 10, 2),
}
BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
INPUT = (2, 3, 64, 64)


class Reduced(ResNet):
    """torchvision's ResNet (same blocks, `_make_layer` and forward) at smaller widths."""

    def __init__(self, block, layers, widths, stem, num_classes):
        super().__init__(block, layers, num_classes=num_classes)
        self.inplanes = stem
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(stem)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)
        # torchvision's initialisation (ResNet.__init__), on the rebuilt modules.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def build(name):
    block, layers, widths, stem, classes, seed = CONFIGS[name]
    torch.manual_seed(seed)
    model = Reduced(BLOCKS[block], layers, widths, stem, classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(INPUT) * 1.5 + 0.2)
    model.eval()
    return model, {
        "block": block,
        "layers": layers,
        "widths": widths,
        "stem_width": stem,
        "in_channels": 3,
        "num_classes": classes,
    }


def main():
    os.makedirs(OUT, exist_ok=True)
    for name in CONFIGS:
        model, config = build(name)
        torch.manual_seed(100)
        x = torch.randn(INPUT)
        tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        for k, v in tensors.items():
            assert not k.startswith("__")
            if v.is_floating_point():
                tensors[k] = v.float()
        with torch.no_grad():
            logits = model(x)
            m64 = Reduced(
                BLOCKS[config["block"]],
                config["layers"],
                config["widths"],
                config["stem_width"],
                config["num_classes"],
            ).double()
            m64.load_state_dict(model.state_dict())
            m64.eval()
            logits64 = m64(x.double())
            m64.train()
            train64 = m64(x.double())
        tensors["__input__"] = x.contiguous()
        tensors["__logits__"] = logits.contiguous()
        tensors["__logits_f64__"] = logits64.contiguous()
        tensors["__train_logits_f64__"] = train64.contiguous()
        for k, v in m64.state_dict().items():
            if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked"):
                tensors["__after__." + k] = v.detach().clone().contiguous()
        meta = {
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "config": json.dumps(config),
        }
        path = os.path.join(OUT, f"torchvision_{name}.safetensors")
        save_file(tensors, path, metadata=meta)
        params = sum(p.numel() for p in model.parameters())
        print(f"{path}: {params} parameters, {os.path.getsize(path)} bytes, "
              f"logits[0,:3] {logits[0, :3].tolist()}")


if __name__ == "__main__":
    main()
