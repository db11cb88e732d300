#!/usr/bin/env python3
"""Builds the PyTorch reference fixtures of tests/baselines_reference.rs (run once; outputs are
committed).

    pip install torch safetensors numpy   # written with torch 2.13, safetensors 0.8
    python3 scripts/fixtures_baselines.py

An independent PyTorch reference for the local objectives of the baselines: InfoPro (Wang et
al., ICLR 2021) with cross-entropy or the supervised contrastive loss, and DGL's MLP-SR
auxiliary classifier (Belilovsky et al., ICML 2020) with cross-entropy. The modules below are
written from the papers' published code's layer lists (InfoPro's `Decoder` / `AuxClassifier`
'1c2f' / `SupConLoss`, DGL's `auxillary_classifier2` with aux_type 'mlp-sr'), with PyTorch's
own layers (`nn.Conv2d`, `nn.BatchNorm2d/1d`, `nn.BCELoss`, `F.interpolate(...,
align_corners=True)`, `F.adaptive_avg_pool2d`, `F.cross_entropy`).

Every module is built and seeded in float32; its weights (BatchNorm gamma/beta and running
statistics made random, so that nothing is 0/1), the feature map `h`, the normalised image and
the labels are stored as float32 / int64; then the module is copied to float64 and the
reference is computed from those exact float32 values, in float64, in training mode (batch
statistics; PyTorch's running-statistics update). Seeds are chosen so that no ReLU input lies
within 1e-4 of 0, so that float32 and float64 take the same ReLU branches.

The sizes are small on purpose (the fixtures are committed, under 200 KB together): batches of
6 with repeated classes and classes with a single sample, 4-channel feature maps (so the 1c2f
head's conv is 4 -> 8 with stride 2, InfoPro's C < 64 rule), a 6x6 map and 11x11 image
(cross-entropy), a non-square 5x6 map and 9x11 image (contrastive, an 8-d projection, τ = 0.07),
a 7x7 map (DGL: pooled to ceil(7/4) = 2 with overlapping bins).

Files written under tests/fixtures/baselines/:

- infopro_ce.safetensors, infopro_contrast.safetensors: the InfoPro objective
  λ2·task(head(h)) + λ1·BCELoss(sigmoid(decoder(h)), clamp(x·std + mean, 0, 1));
- dgl.safetensors: cross-entropy of DGL's MLP-SR head;

each with
- the parameters and buffers under sgr's names (`aux.0.conv.weight`, `aux.0.decoder.0.bias`,
  `aux.0.blocks.0.1.running_var`, `aux.0.classifier.9.weight`, ...), float32
  (`num_batches_tracked`: int64 scalars, as PyTorch stores them);
- `__h__` (the module output, float32), `__input__` (the normalised image, float32; a dummy for
  DGL), `__labels__` (int64);
- `__loss__` (float64 scalar), `__grad_h__` (dL/dh), `__grad__.<name>` (dL/d<name>, for every
  trainable tensor), `__logits__` (cross-entropy cases), all float64;
- `__hvp_h__`: d/dh <dL/dh, v> (float64), with v the fixed direction
  v[i] = ((37·i) mod 17)/8 − 1 over the row-major flattened h (exact in float32);
- `__after__.<bn>.running_mean` / `.running_var` (float64) / `.num_batches_tracked` (int64) of
  every BatchNorm after the one training-mode forward;
- metadata: the torch version, and `config` (JSON: weights, temperature, pixel statistics,
  classes, ...).

- functions.safetensors: plain functions, float32 inputs and float64 references:
  `__bce.z__`, `__bce.t__` (targets in [0, 1] with exact 0s and 1s), `__bce.loss__`,
  `__bce.grad__` (BCELoss()(sigmoid(z), t) and its gradient in z);
  `__supcon.x__` (raw rows), `__supcon.labels__` (one class with a single sample: an anchor
  with no positive), `__supcon.normalized__` (F.normalize(x, dim=1)) and, for each temperature
  τ in the metadata, `__supcon.<τ>.loss__`, `__supcon.<τ>.grad__` (SupCon of the normalised
  rows, base temperature = τ, and its gradient in the raw x);
  `__up.<i>.x__`, `__up.<i>.w__`, `__up.<i>.y__` = F.interpolate(x, size, bilinear,
  align_corners=True), `__up.<i>.grad__` = d/dx sum(y·w), for the sizes in the metadata
  (`upsample`: [[h, w, h_out, w_out], ...]).

Every extra name starts with `__`, which no parameter name does.
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import safetensors
from safetensors.torch import save_file

OUT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "baselines"
)
PREFIX = "aux.0"
# CIFAR-10's channel statistics: the reconstruction target is x·std + mean.
MEAN = [0.4914, 0.4822, 0.4465]
STD = [0.2470, 0.2435, 0.2616]
RELU_MARGIN = 1e-4

# ---------------------------------------------------------------------------------------------
# The reference modules.


class InfoproAux(nn.Module):
    """InfoPro's CIFAR '1c2f' head and its decoder, under sgr's names.

    Head: conv3x3 (no bias; C -> 2C with stride 2 when C < 64, else C -> C with stride 1) + BN
    + ReLU + global average pool + Linear(-> 128) + ReLU + Linear(128 -> outputs).
    Decoder: bilinear upsampling with aligned corners to the image's size, conv3x3(C -> width,
    bias) + BN + ReLU + conv3x3(width -> 3, bias); the sigmoid is applied in the loss (InfoPro's
    `nn.Sigmoid` + `nn.BCELoss`).

    Both take `pre`, a list that collects every ReLU input (to check the margins)."""

    def __init__(self, c, outputs, width=12, image_channels=3):
        super().__init__()
        cout, stride = (2 * c, 2) if c < 64 else (c, 1)
        self.conv = nn.Conv2d(c, cout, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.fc1 = nn.Linear(cout, 128)
        self.fc2 = nn.Linear(128, outputs)
        self.decoder = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, image_channels, 3, padding=1),
        )

    def head(self, h, pre):
        a = self.bn(self.conv(h))
        pre.append(a)
        z = F.adaptive_avg_pool2d(F.relu(a), 1).flatten(1)
        b = self.fc1(z)
        pre.append(b)
        return self.fc2(F.relu(b))

    def reconstruction(self, h, size, pre):
        up = F.interpolate(h, size=size, mode="bilinear", align_corners=True)
        a = self.decoder[1](self.decoder[0](up))
        pre.append(a)
        return self.decoder[3](self.decoder[2](a))


def supcon_reference(features, labels, temperature, base_temperature):
    """SupCon (Khosla et al. 2020), one view, contrast_mode 'all': for anchor i,
    -(τ/τ_base) · mean over positives p (same label, p != i) of
    log( exp(f_i·f_p/τ) / Σ_{j != i} exp(f_i·f_j/τ) ); anchors without a positive give 0;
    the mean is over all anchors."""
    n = features.shape[0]
    sim = features @ features.T / temperature
    eye = torch.eye(n, dtype=torch.bool)
    positives = (labels[:, None] == labels[None, :]) & ~eye
    lse = torch.logsumexp(sim.masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    log_prob = sim - lse
    count = positives.sum(1).clamp(min=1).to(features.dtype)
    mean_pos = (log_prob * positives.to(features.dtype)).sum(1) / count
    return -(temperature / base_temperature) * mean_pos.mean()


def supcon_loop(features, labels, temperature):
    """The same loss as explicit loops, to check `supcon_reference`."""
    n = features.shape[0]
    total = 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        denom = sum(math.exp(float(features[i] @ features[j]) / temperature) for j in others)
        pos = [p for p in others if labels[p] == labels[i]]
        if pos:
            s = sum(float(features[i] @ features[p]) / temperature - math.log(denom) for p in pos)
            total += -s / len(pos)
    return total / n


class DglMlpSr(nn.Module):
    """DGL's 'mlp-sr' auxiliary classifier (n_lin = 3, mlp_layers = 3): adaptive average pool
    to ceil(s/4) x ceil(s/4); 3 x [conv1x1(C -> C, no bias) + BN + ReLU]; adaptive average pool
    to 2x2; flatten (4C); 3 x [Linear(4C -> 4C) + BatchNorm1d + ReLU]; Linear(4C -> classes).
    (DGL's module also owns a BatchNorm2d `bn` that its forward skips when mlp_layers > 0; it is
    left out.)"""

    def __init__(self, c, classes, side):
        super().__init__()
        self.side = side
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)) for _ in range(3)]
        )
        f = 4 * c
        layers = []
        for _ in range(3):
            layers += [nn.Linear(f, f), nn.BatchNorm1d(f), nn.ReLU()]
        layers.append(nn.Linear(f, classes))
        self.classifier = nn.Sequential(*layers)

    def forward(self, h, pre):
        s = math.ceil(self.side / 4)
        out = F.adaptive_avg_pool2d(h, (s, s))
        for blk in self.blocks:
            a = blk(out)
            pre.append(a)
            out = F.relu(a)
        out = F.adaptive_avg_pool2d(out, (2, 2)).flatten(1)
        for i in range(0, 9, 3):
            a = self.classifier[i + 1](self.classifier[i](out))
            pre.append(a)
            out = F.relu(a)
        return self.classifier[9](out)


# ---------------------------------------------------------------------------------------------
# Helpers.


def randomise_batchnorms(module):
    """Random gamma, beta and running statistics, a non-zero counter."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(3)


def batchnorms(module):
    return [
        (name, m)
        for name, m in module.named_modules()
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))
    ]


def hvp_direction(shape, dtype):
    n = math.prod(shape)
    v = torch.tensor([((37 * i) % 17) / 8.0 - 1.0 for i in range(n)], dtype=dtype)
    return v.reshape(shape)


def min_abs(tensors):
    return min(float(t.detach().abs().min()) for t in tensors)


def objective_fixture(module, loss_fn, h32, extras32):
    """Stores `module`'s float32 state, then evaluates `loss_fn(module64, h64, pre)` in float64
    (training mode): loss, gradients, Hessian-vector product in h, BatchNorm buffers after.
    Returns (tensors, min |ReLU input|)."""
    module.train()
    out = {f"{PREFIX}.{k}": v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    out["__h__"] = h32.contiguous()
    out.update(extras32)
    m64 = module.double()
    h = h32.double().requires_grad_(True)
    pre = []
    loss, logits = loss_fn(m64, h, pre)
    names = [n for n, p in m64.named_parameters()]
    params = [p for n, p in m64.named_parameters()]
    grads = torch.autograd.grad(loss, [h] + params, create_graph=True)
    v = hvp_direction(h.shape, torch.float64)
    (hvp,) = torch.autograd.grad((grads[0] * v).sum(), h)
    out["__loss__"] = loss.detach().reshape(())
    out["__grad_h__"] = grads[0].detach()
    out["__hvp_h__"] = hvp.detach()
    for n, g in zip(names, grads[1:]):
        out[f"__grad__.{PREFIX}.{n}"] = g.detach()
    if logits is not None:
        out["__logits__"] = logits.detach()
    for name, bn in batchnorms(m64):
        base = f"__after__.{PREFIX}.{name}"
        out[f"{base}.running_mean"] = bn.running_mean.detach().clone()
        out[f"{base}.running_var"] = bn.running_var.detach().clone()
        out[f"{base}.num_batches_tracked"] = bn.num_batches_tracked.detach().clone()
    return out, min_abs(pre)


def infopro(name, seed, c, h_hw, img_hw, labels, classes, weights, task, feature_dim=None,
            temperature=None):
    """An InfoPro fixture; retries seeds until every ReLU input is away from 0."""
    lam_recon, lam_task = weights
    outputs = classes if task == "cross_entropy" else feature_dim
    for attempt in range(100):
        torch.manual_seed(seed + 1000 * attempt)
        module = InfoproAux(c, outputs)
        randomise_batchnorms(module)
        y = torch.tensor(labels, dtype=torch.int64)
        n = len(labels)
        h32 = torch.randn(n, c, *h_hw)
        # Images partly outside [0, 1], so that the clamp of the target matters.
        img = torch.rand(n, 3, *img_hw) * 1.4 - 0.2
        mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        std = torch.tensor(STD).view(1, 3, 1, 1)
        x32 = ((img - mean) / std).float()

        def loss_fn(m, h, pre):
            x = x32.double()
            target = (x * torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
                      + torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)).clamp(0, 1)
            recon_logits = m.reconstruction(h, img_hw, pre)
            assert recon_logits.abs().max() < 15, "BCELoss would clamp its logs"
            recon = nn.BCELoss()(torch.sigmoid(recon_logits), target)
            out = m.head(h, pre)
            if task == "cross_entropy":
                task_loss, logits = F.cross_entropy(out, y), out
            else:
                feats = F.normalize(out, dim=1)
                task_loss, logits = supcon_reference(feats, y, temperature, temperature), None
                loop = supcon_loop(feats.detach(), y, temperature)
                assert abs(loop - float(task_loss.detach())) < 1e-10, (loop, float(task_loss))
            return lam_task * task_loss + lam_recon * recon, logits

        tensors, margin = objective_fixture(
            module, loss_fn, h32, {"__input__": x32, "__labels__": y}
        )
        if margin > RELU_MARGIN:
            break
    else:
        raise RuntimeError(f"{name}: no seed keeps the ReLU inputs away from 0")
    clamped = float(((x32 * torch.tensor(STD).view(1, 3, 1, 1)
                      + torch.tensor(MEAN).view(1, 3, 1, 1)) - 0.5).abs().gt(0.5).float().mean())
    config = {
        "objective": "infopro" if task == "cross_entropy" else "infopro-contrast",
        "channels": c,
        "classes": classes,
        "recon_weight": lam_recon,
        "task_weight": lam_task,
        "temperature": temperature,
        "feature_dim": feature_dim,
        "decoder_width": 12,
        "mean": MEAN,
        "std": STD,
        "seed": seed + 1000 * attempt,
        "relu_margin": margin,
        "clamped_fraction": clamped,
    }
    return tensors, config


def dgl(seed, c, h_hw, labels, classes):
    for attempt in range(100):
        torch.manual_seed(seed + 1000 * attempt)
        module = DglMlpSr(c, classes, h_hw[0])
        randomise_batchnorms(module)
        y = torch.tensor(labels, dtype=torch.int64)
        h32 = torch.randn(len(labels), c, *h_hw)

        def loss_fn(m, h, pre):
            logits = m(h, pre)
            return F.cross_entropy(logits, y), logits

        tensors, margin = objective_fixture(
            module, loss_fn, h32, {"__input__": torch.zeros(len(labels), 1), "__labels__": y}
        )
        if margin > RELU_MARGIN:
            break
    else:
        raise RuntimeError("dgl: no seed keeps the ReLU inputs away from 0")
    config = {
        "objective": "dgl",
        "channels": c,
        "classes": classes,
        "seed": seed + 1000 * attempt,
        "relu_margin": margin,
    }
    return tensors, config


def functions():
    torch.manual_seed(7)
    out = {}
    # BCE of sigmoid(z): logits of both signs and up to |z| = 8, targets in [0, 1].
    z32 = torch.linspace(-8, 8, 35).reshape(5, 7)[torch.randperm(5)] + 0.1 * torch.randn(5, 7)
    t32 = torch.rand(5, 7)
    t32[0, :3] = 0.0
    t32[1, :3] = 1.0
    z = z32.double().requires_grad_(True)
    loss = nn.BCELoss()(torch.sigmoid(z), t32.double())
    (g,) = torch.autograd.grad(loss, z)
    out.update({"__bce.z__": z32, "__bce.t__": t32, "__bce.loss__": loss.detach().reshape(()),
                "__bce.grad__": g})
    # SupCon; class 3 has one sample (an anchor with no positive).
    x32 = torch.randn(7, 5)
    labels = torch.tensor([0, 1, 0, 2, 1, 3, 2], dtype=torch.int64)
    out.update({"__supcon.x__": x32, "__supcon.labels__": labels})
    x = x32.double().requires_grad_(True)
    f = F.normalize(x, dim=1)
    out["__supcon.normalized__"] = f.detach()
    temperatures = [0.07, 0.5]
    for tau in temperatures:
        loss = supcon_reference(f, labels, tau, tau)
        loop = supcon_loop(f.detach(), labels, tau)
        assert abs(loop - float(loss.detach())) < 1e-10, (loop, float(loss.detach()))
        (g,) = torch.autograd.grad(loss, x, retain_graph=True)
        out[f"__supcon.{tau}.loss__"] = loss.detach().reshape(())
        out[f"__supcon.{tau}.grad__"] = g
    # Bilinear resizing with aligned corners: up, non-square, down, 1-pixel input and output,
    # and the identity.
    sizes = [[3, 5, 7, 9], [4, 4, 11, 6], [6, 5, 3, 4], [1, 1, 3, 4], [1, 4, 3, 7],
             [4, 3, 1, 1], [2, 3, 2, 3]]
    for i, (h, w, ho, wo) in enumerate(sizes):
        x32 = torch.randn(1, 2, h, w)
        w32 = torch.randn(1, 2, ho, wo)
        x = x32.double().requires_grad_(True)
        y = F.interpolate(x, size=(ho, wo), mode="bilinear", align_corners=True)
        (g,) = torch.autograd.grad((y * w32.double()).sum(), x)
        out.update({f"__up.{i}.x__": x32, f"__up.{i}.w__": w32, f"__up.{i}.y__": y.detach(),
                    f"__up.{i}.grad__": g})
    config = {"supcon_temperatures": temperatures, "upsample": sizes}
    return out, config


def save(name, tensors, config):
    path = os.path.join(OUT, f"{name}.safetensors")
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    meta = {
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "config": json.dumps(config),
    }
    save_file(tensors, path, metadata=meta)
    print(f"{path}: {len(tensors)} tensors, {os.path.getsize(path)} bytes, {config}")


def main():
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    labels = [0, 1, 0, 2, 1, 3]
    save("infopro_ce", *infopro("infopro_ce", 11, 4, (6, 6), (11, 11), labels, 4, (5.0, 0.5),
                                "cross_entropy"))
    # Non-square feature map and image, a non-integer upsampling factor; classes 2 and 3 have
    # a single sample (anchors without a positive).
    save("infopro_contrast", *infopro("infopro_contrast", 12, 4, (5, 6), (9, 11), labels, 4,
                                      (2.0, 1.5), "contrast", feature_dim=8, temperature=0.07))
    # A 7x7 map: DGL pools it to ceil(7/4) = 2 (overlapping bins 0..4 and 3..7).
    save("dgl", *dgl(13, 4, (7, 7), [0, 1, 0, 2, 1, 4], 5))
    save("functions", *functions())


if __name__ == "__main__":
    main()
