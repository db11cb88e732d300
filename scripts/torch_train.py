#!/usr/bin/env python3
"""PyTorch twin of `sgr train` on Fashion-MNIST: the same model, split, heads, recipe and seed
handling as sgr, for the accuracy comparison "the same model, recipe and seed in PyTorch".

Methods: `bp` (end to end, K=1), `greedy` (Greedy SL: every module on its own cross-entropy
head, all updated every step, in order 1..K, each module's input the previous module's output
from before its update), `sgr` (= greedy + λ·D(b_k, stopgrad(a_{k−1})) for modules k ≥ 2, the
forward direction of docs/method.md). The SGR parameter gradient is PyTorch's exact double
backward (what sgr's default finite differences approximate; sgr's `--sgr-grad exact`).

Models: torchvision `resnet18(num_classes=10)` (unit 0 = conv1+bn1+relu+maxpool, then one unit
per BasicBlock; heads infopro (default), dgl, 0c1f as sgr-models/src/resnet_imagenet.rs) and
`vit-cifar` (timm VisionTransformer, patch 4, width 128, depth 6, 4 heads, MLP ratio 2, qkv bias;
unit 0 = patch embedding + class token + position embedding, then one unit per block; heads
token (default), mean, block-token, block-mean as sgr-models/src/vit.rs). Modules: the uniform
split of the units (SplitPlan::uniform: the first modules get the extra unit); the last module
ends with the network's classifier and is trained on its logits.

Data (sgr-run/src/data.rs): IDX files, the first --train-limit training samples, pixels / 255,
zero-padded (centred) 28 → 32, grey → RGB, training augmentation RandomCrop 32 with zero
padding 2 + horizontal flip 0.5 (off with --no-augment), then Normalize with the mean and
(population) std of all 60 000 raw 28×28 training images. Batches shuffled per epoch, the
last one kept (drop_last false). Test: the full 10 000 images, eval mode.

Not part of CI. Usage:

    /work/torchenv/bin/python scripts/torch_train.py --model resnet18 --method sgr --epochs 5
    /work/torchenv/bin/python scripts/torch_train.py --self-test

Prints one JSON line per epoch and a final JSON summary.
"""
import argparse
import gzip
import json
import math
import os
import struct
import sys
import time
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# sgr's heads draw from a generator of their own (seed + this), so the backbone does not
# depend on K or the head.
HEAD_SEED_OFFSET = 0x9E3779B97F4A7C15
VIT_CIFAR = dict(patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0)
# sgr-models/src/vit.rs presets (patch 16 for 224×224).
VIT_PRESETS = {
    "vit-cifar": VIT_CIFAR,
    "deit-ti": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0),
    "deit-s": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "deit-b": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
}
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    return arr.reshape(dims)


def find(dir_, stem):
    for cand in (stem, stem + ".gz"):
        p = os.path.join(dir_, cand)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"{stem}[.gz] not in {dir_}")


def load_split(dir_, train):
    s = "train" if train else "t10k"
    x = read_idx(find(dir_, f"{s}-images-idx3-ubyte"))
    y = read_idx(find(dir_, f"{s}-labels-idx1-ubyte"))
    return x, y.astype(np.int64)


def channel_stats(x):
    """Normalize::from_dataset: f64 sums of p/255 over every raw training pixel, mean and
    population std rounded to f32 as ImageDataset::channel_stats does."""
    v = x.astype(np.float64) / 255.0
    n = v.size
    mean = np.float32(v.sum() / n)
    var = max((v * v).sum() / n - float(mean) ** 2, 1e-12)
    return float(mean), float(np.float32(math.sqrt(var)))


class FashionMnist:
    def __init__(self, data_dir, train_limit, augment, seed, mean, std, xtr, ytr, xte, yte):
        if train_limit is not None:
            xtr, ytr = xtr[:train_limit], ytr[:train_limit]
        # PadTo 32: zero padding, centred (2 each side), on [0, 1] values.
        pad = lambda a: F.pad(torch.from_numpy(a.astype(np.float32) / 255.0)[:, None], (2, 2, 2, 2))
        self.train_x, self.train_y = pad(xtr), torch.from_numpy(ytr)
        self.test_x, self.test_y = pad(xte), torch.from_numpy(yte)
        self.augment, self.seed, self.mean, self.std = augment, seed, mean, std

    def _finish(self, x):
        # GreyToRgb (commutes with crop and flip), then Normalize.
        return ((x - self.mean) / self.std).expand(-1, 3, -1, -1).contiguous()

    def _augment(self, x, g):
        # RandomCrop 32, zero padding 2: offsets 0..=4 into the 36×36 zero-padded image; then
        # HorizontalFlip p=0.5. Zeros are pixel value 0, normalised with the rest.
        n = x.shape[0]
        p = F.pad(x, (2, 2, 2, 2))
        oy = torch.randint(0, 5, (n,), generator=g)
        ox = torch.randint(0, 5, (n,), generator=g)
        flip = torch.rand(n, generator=g) < 0.5
        r = torch.arange(32)
        rows = oy[:, None] + r
        cols = ox[:, None] + torch.where(flip[:, None], 31 - r, r)
        idx = torch.arange(n)[:, None, None]
        return p[idx, 0, rows[:, :, None], cols[:, None, :]][:, None]

    def steps_per_epoch(self, batch):
        return -(-self.train_x.shape[0] // batch)

    def train_batches(self, epoch, batch):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.train_x.shape[0], generator=g)
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            x = self.train_x[idx]
            if self.augment:
                x = self._augment(x, g)
            yield self._finish(x), self.train_y[idx]

    def test_batches(self, batch=256):
        for i in range(0, self.test_x.shape[0], batch):
            yield self._finish(self.test_x[i:i + batch]), self.test_y[i:i + batch]


# ----------------------------------------------------------------------------------------------
# Models: units, split, heads
# ----------------------------------------------------------------------------------------------

def uniform_ends(units, k):
    """SplitPlan::uniform: K contiguous groups, sizes differing by at most one, larger first."""
    if not 1 <= k <= units:
        raise SystemExit(f"K must be in 1..={units}, got {k}")
    base, extra, ends, e = units // k, units % k, [], 0
    for j in range(k):
        e += base + (1 if j < extra else 0)
        ends.append(e - 1)
    return ends


def conv_bn_relu(cin, cout, k, stride, pad):
    return [nn.Conv2d(cin, cout, k, stride, pad, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=False)]


def torchvision_init(m):
    """sgr's Conv2d::new (Kaiming normal, fan-out), BN γ=1 β=0, PyTorch's default Linear."""
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(mod, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)
    return m


class InfoproHead(nn.Module):
    """InfoPro's ImageNet aux classifier (resnet_imagenet.rs InfoproHead): conv1×1(C→128)+BN+ReLU,
    conv3×3/2(128→256)+BN+ReLU, conv3×3/2(256→512)+BN+ReLU, conv1×1(512→2048)+BN+ReLU,
    GAP, Linear(2048→classes); Sequential indices as InfoPro's (0, 1, 3, 4, 6, 7, 9, 10, 14)."""

    def __init__(self, c, classes, widths=(64, 128, 256, 512)):
        super().__init__()
        _, w1, w2, w3 = widths
        layers = (conv_bn_relu(c, w1, 1, 1, 0) + conv_bn_relu(w1, w2, 3, 2, 1)
                  + conv_bn_relu(w2, w3, 3, 2, 1) + conv_bn_relu(w3, 4 * w3, 1, 1, 0)
                  + [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w3, classes)])
        self.net = nn.Sequential(*layers)
        torchvision_init(self)

    def forward(self, x):
        return self.net(x)


class DglHead(nn.Module):
    """DGL's aux classifier (resnet_imagenet.rs DglHead), basic blocks (no side halving):
    adaptive avg pool to ⌈s/4⌉, 3 × [conv1×1 C→C + BN + ReLU], adaptive avg pool 2×2, flatten,
    3 × [Linear 4C→4C + BatchNorm1d + ReLU], Linear(4C → classes)."""

    def __init__(self, c, classes, halve_side=False):
        super().__init__()
        self.halve_side = halve_side
        self.blocks = nn.Sequential(*sum((conv_bn_relu(c, c, 1, 1, 0) for _ in range(3)), []))
        f = 4 * c
        mlp = []
        for _ in range(3):
            mlp += [nn.Linear(f, f), nn.BatchNorm1d(f), nn.ReLU()]
        self.classifier = nn.Sequential(*mlp, nn.Linear(f, classes))
        torchvision_init(self)

    def forward(self, x):
        side = lambda n: max(-(-((n // 2) if self.halve_side else n) // 4), 1)
        h = F.adaptive_avg_pool2d(x, (side(x.shape[2]), side(x.shape[3])))
        h = F.adaptive_avg_pool2d(self.blocks(h), 2).flatten(1)
        return self.classifier(h)


class GapLinearHead(nn.Module):
    """Greedy SL's `0c1f`: global average pool + Linear(C → classes)."""

    def __init__(self, c, classes):
        super().__init__()
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


class ResNetClassifier(nn.Module):
    def __init__(self, fc):
        super().__init__()
        self.fc = fc

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet_units(name, classes):
    import torchvision
    m = getattr(torchvision.models, name)(num_classes=classes)
    units = [nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)]
    channels = [64]
    names = ["stem"]
    for s, layer in enumerate([m.layer1, m.layer2, m.layer3, m.layer4], 1):
        for b, blk in enumerate(layer):
            units.append(blk)
            last = blk.conv3 if hasattr(blk, "conv3") else blk.conv2
            channels.append(last.out_channels)
            names.append(f"layer{s}.{b}")
    return units, channels, names, ResNetClassifier(m.fc)


class VitEmbed(nn.Module):
    """Unit 0: patch embedding, class token, position embedding and its dropout."""

    def __init__(self, vit):
        super().__init__()
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.pos_embed = vit.pos_embed
        self.pos_drop = vit.pos_drop
        self.patch_drop = vit.patch_drop
        self.norm_pre = vit.norm_pre

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.norm_pre(self.patch_drop(self.pos_drop(x)))


class VitClassifier(nn.Module):
    """Final norm, class token, (head dropout: drop_rate 0 as sgr has none), head."""

    def __init__(self, vit):
        super().__init__()
        self.norm, self.head_drop, self.head = vit.norm, vit.head_drop, vit.head

    def forward(self, x):
        return self.head(self.head_drop(self.norm(x)[:, 0]))


class TokenHead(nn.Module):
    """vit.rs TokenHead: optional Transformer block, LayerNorm (eps 1e-6), class token (`token`)
    or mean of the patch tokens (`mean`), Linear; timm's init (trunc normal 0.02, zero bias)."""

    def __init__(self, kind, dim, heads, mlp_ratio, classes, dropout):
        super().__init__()
        from timm.models.vision_transformer import Block, init_weights_vit_timm
        self.block = None
        if kind.startswith("block-"):
            self.block = Block(dim, heads, mlp_ratio, qkv_bias=True, proj_drop=dropout,
                               attn_drop=dropout, drop_path=0.0,
                               norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)
        self.mean = kind.endswith("mean")
        for mod in self.modules():
            init_weights_vit_timm(mod)

    def forward(self, x):
        if self.block is not None:
            x = self.block(x)
        h = self.norm(x)
        return self.head(h[:, 1:].mean(1) if self.mean else h[:, 0])


def vit_units(name, classes, dropout, drop_path, image_size=32):
    from timm.models.vision_transformer import VisionTransformer
    cfg = VIT_PRESETS[name]
    v = VisionTransformer(img_size=image_size, in_chans=3, num_classes=classes,
                          global_pool="token", qkv_bias=True, drop_rate=0.0,
                          pos_drop_rate=dropout, proj_drop_rate=dropout, attn_drop_rate=dropout,
                          drop_path_rate=drop_path, **cfg)
    units = [VitEmbed(v)] + list(v.blocks)
    names = ["embed"] + [f"blocks.{i}" for i in range(len(v.blocks))]
    return units, [cfg["embed_dim"]] * len(units), names, VitClassifier(v)


class LocalModule(nn.Module):
    def __init__(self, body, head):
        super().__init__()
        self.body = body
        self.head = head  # None for the last module: its body ends with the classifier


def build(a):
    """The network as K LocalModules, the split ends and the unit labels."""
    torch.manual_seed(a.seed)
    classes = getattr(a, "classes", 10)
    is_resnet = a.model in RESNETS
    if is_resnet:
        if a.dropout or a.drop_path:
            raise SystemExit(f"{a.model} has no dropout or drop-path")
        units, channels, names, classifier = resnet_units(a.model, classes)
    else:
        units, channels, names, classifier = vit_units(
            a.model, classes, a.dropout, a.drop_path, getattr(a, "image_size", 32))
    cfg = VIT_PRESETS.get(a.model)
    ends = uniform_ends(len(units), a.modules)
    torch.manual_seed((a.seed + HEAD_SEED_OFFSET) % (1 << 63))
    mods, start = [], 0
    for j, end in enumerate(ends):
        body = list(units[start:end + 1])
        head = None
        if j == len(ends) - 1:
            body.append(classifier)
        elif is_resnet:
            c = channels[end]
            # DGL's map-size bookkeeping halves the side for bottleneck ResNets (as sgr).
            bottleneck = a.model not in ("resnet18", "resnet34")
            head = {"infopro": lambda: InfoproHead(c, classes),
                    "dgl": lambda: DglHead(c, classes, halve_side=bottleneck),
                    "0c1f": lambda: GapLinearHead(c, classes)}[a.aux_head]()
        else:
            head = TokenHead(a.aux_head, cfg["embed_dim"], cfg["num_heads"],
                             cfg["mlp_ratio"], classes, a.dropout)
        mods.append(LocalModule(nn.Sequential(*body), head))
        start = end + 1
    # Unfused attention: twice differentiable (the CPU flash kernel is not), the same in all
    # methods. A caller that never differentiates twice (scripts/torch_reference.py's bp and
    # finite-difference methods) keeps timm's fused attention with `fused_attn=True`.
    if not getattr(a, "fused_attn", False):
        for m in mods:
            for sub in m.modules():
                if hasattr(sub, "fused_attn"):
                    sub.fused_attn = False
    return mods, ends, names


def module_params(mod, k):
    """Named trainable parameters of module k, with sgr-style names for the decay scope."""
    out = []
    for n, p in mod.body.named_parameters():
        out.append((n, p))
    if mod.head is not None:
        out += [(f"aux.{k}.{n}", p) for n, p in mod.head.named_parameters()]
    return out


def decays(name, p, scope):
    """DecayScope::decays."""
    if scope == "all":
        return True
    return (p.ndim > 1 and not name.endswith("pos_embed") and not name.endswith("cls_token")
            and not name.endswith(".bias"))


def make_optimizer(named, a):
    dec = [p for n, p in named if decays(n, p, a.decay_scope)]
    nodec = [p for n, p in named if not decays(n, p, a.decay_scope)]
    groups = [g for g in ({"params": dec, "weight_decay": a.weight_decay},
                          {"params": nodec, "weight_decay": 0.0}) if g["params"]]
    if a.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=a.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.999), eps=1e-8)


def schedule_lr(a, step, spe, total):
    """Schedule::lr, per optimizer step."""
    if a.schedule == "constant":
        return a.lr
    warm = int(math.floor(a.warmup_epochs * spe + 0.5))  # Rust's f64::round (x >= 0)
    if step < warm:
        return a.lr * (step + 1) / warm
    span = max(total - warm, 1)
    t = min((step - warm) / span, 1.0)
    return 0.5 * a.lr * (1.0 + math.cos(math.pi * t))


def distance(kind, s, t):
    """Distance::eval (s the regularised gradient, t its target), differentiable through s."""
    if kind == "squared-l2":
        return s.shape[0] * (s - t).pow(2).sum()
    tiny = 1e-30
    if kind == "cosine":
        dot = (s * t).sum()
        return 1.0 - dot / ((s.pow(2).sum() + tiny).sqrt() * (t.pow(2).sum() + tiny).sqrt())
    s2, t2 = s.flatten(1), t.flatten(1)
    dot = (s2 * t2).sum(1)
    return 1.0 - (dot / ((s2.pow(2).sum(1) + tiny).sqrt() * (t2.pow(2).sum(1) + tiny).sqrt())).mean()


def boundary_stats(a, b):
    """cos(a, b) (0 if either is zero) and ‖a − b‖/‖a‖ over the batch as one vector, f64."""
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = a.norm().item(), b.norm().item()
    cos = (a @ b).item() / (na * nb) if na * nb > 0 else 0.0
    rel = (a - b).norm().item() / na if na > 0 else float("nan")
    return cos, rel


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, mods, a, spe):
        self.mods, self.a, self.spe = mods, a, spe
        self.named = [module_params(m, k) for k, m in enumerate(mods)]
        self.params = [[p for _, p in n] for n in self.named]
        self.opts = [make_optimizer(n, a) for n in self.named]
        self.total = a.epochs * spe
        self.step = 0

    def lam(self):
        progress = self.step / max(self.spe, 1)
        if self.a.sgr_warmup > 0 and progress < self.a.sgr_warmup:
            return self.a.sgr_lambda * max(progress / self.a.sgr_warmup, 0.0)
        return self.a.sgr_lambda

    def train_step(self, x, y):
        """Trainer::local_step (bp: the same with K = 1). Returns (per-module losses, correct,
        per-boundary (cos, rel, D or None))."""
        a = self.a
        lr = schedule_lr(a, self.step, self.spe, self.total)
        lam = self.lam()
        K = len(self.mods)
        h, prev_a = x, None
        losses, bstats, correct = [], [], 0
        for k, (mod, params, opt) in enumerate(zip(self.mods, self.params, self.opts)):
            last = k == K - 1
            inp = h.detach().requires_grad_(k > 0)
            out = mod.body(inp)
            logits = out if last else mod.head(out)
            loss = F.cross_entropy(logits, y, label_smoothing=a.label_smoothing)
            use_sgr = a.method == "sgr" and k > 0
            wrt = ([inp] if k > 0 else []) + ([] if last else [out])
            g = torch.autograd.grad(loss, params + wrt, create_graph=use_sgr, allow_unused=True)
            P = len(params)
            grads = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g[:P])]
            b = g[P] if k > 0 else None
            out_grad = None if last else g[-1].detach()
            d_value = None
            if use_sgr:
                # J_k = L_k + λ·D(b_k, stopgrad(a_{k−1})): ∇_θ D by double backward, added as
                # λ·∇_θ D to ∇_θ L_k (sgr's add_scaled), D before λ reported.
                d = distance(a.sgr_distance, b, prev_a)
                term = torch.autograd.grad(d, params, allow_unused=True)
                d_value = d.item()
                grads = [gi.detach() + (0.0 if ti is None else lam * ti.detach())
                         for gi, ti in zip(grads, term)]
            if k > 0:
                cos, rel = boundary_stats(prev_a, b.detach())
                bstats.append((cos, rel, d_value))
            for p, gi in zip(params, grads):
                p.grad = gi.detach()
            if a.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, a.clip_grad_norm)
            for grp in opt.param_groups:
                grp["lr"] = lr
            opt.step()
            losses.append(loss.item())
            if last:
                correct = (logits.argmax(1) == y).sum().item()
            prev_a = out_grad
            h = out.detach()
        self.step += 1
        return losses, correct, bstats, lr

    @torch.no_grad()
    def evaluate(self, batches):
        for m in self.mods:
            m.eval()
        loss, correct, n = 0.0, 0, 0
        for x, y in batches:
            h = x
            for m in self.mods:
                h = m.body(h)
            loss += F.cross_entropy(h, y, reduction="sum").item()
            correct += (h.argmax(1) == y).sum().item()
            n += y.shape[0]
        for m in self.mods:
            m.train()
        return loss / max(n, 1), correct / max(n, 1), n


def run(a, data):
    mods, ends, names = build(a)
    dev = torch.device(a.device)
    for m in mods:
        m.to(dev).train()
    spe = data.steps_per_epoch(a.batch_size)
    tr = Trainer(mods, a, spe)
    torch.manual_seed((a.seed + 1) % (1 << 63))  # dropout / drop-path draws
    t_start = time.perf_counter()
    last = None
    train_seconds = 0.0
    for epoch in range(a.epochs):
        K = len(mods)
        sums, nb = [0.0] * K, [[0.0, 0.0, 0.0, 0, 0] for _ in range(K - 1)]
        correct = seen = steps = 0
        seconds = 0.0
        lr = a.lr
        for x, y in data.train_batches(epoch, a.batch_size):
            t0 = time.perf_counter()
            losses, c, bst, lr = tr.train_step(x.to(dev), y.to(dev))
            seconds += time.perf_counter() - t0
            for k, l in enumerate(losses):
                if not math.isfinite(l):
                    raise SystemExit(f"non-finite loss {l} at module {k}, step {tr.step - 1}")
                sums[k] += l
            for j, (cos, rel, d) in enumerate(bst):
                nb[j][0] += cos
                nb[j][1] += rel
                nb[j][3] += 1
                if d is not None:
                    nb[j][2] += d
                    nb[j][4] += 1
            correct += c
            seen += y.shape[0]
            steps += 1
        train_seconds += seconds
        t_eval = time.perf_counter()
        test_loss, test_acc, n_test = tr.evaluate(
            (x.to(dev), y.to(dev)) for x, y in data.test_batches())
        module_losses = [s / max(steps, 1) for s in sums]
        last = {
            "epoch": epoch + 1,
            "steps": steps,
            "train_loss": module_losses[-1],
            "module_losses": module_losses,
            "train_accuracy": correct / max(seen, 1),
            "test_accuracy": test_acc,
            "test_loss": test_loss,
            "lr": lr,
            "seconds": seconds,
            "eval_seconds": time.perf_counter() - t_eval,
            "boundaries": [{"boundary": j + 1, "cos": s[0] / max(s[3], 1),
                            "rel_dist": s[1] / max(s[3], 1),
                            "sgr_distance": (s[2] / s[4]) if s[4] else None}
                           for j, s in enumerate(nb)],
        }
        print(json.dumps(last), flush=True)
    summary = {
        "final_test_accuracy": last["test_accuracy"],
        "final_test_loss": last["test_loss"],
        "final_train_loss": last["train_loss"],
        "final_train_accuracy": last["train_accuracy"],
        "seconds": time.perf_counter() - t_start,
        "train_seconds": train_seconds,
        "model": a.model, "method": a.method, "modules": len(mods),
        "split_ends": ends, "module_units": [names[(ends[j - 1] + 1 if j else 0)] + ".." + names[e]
                                             for j, e in enumerate(ends)],
        "aux_head": a.aux_head if len(mods) > 1 else None,
        "epochs": a.epochs, "batch_size": a.batch_size, "steps_per_epoch": spe,
        "lr": a.lr, "optimizer": a.optimizer, "weight_decay": a.weight_decay,
        "decay_scope": a.decay_scope, "schedule": a.schedule, "warmup_epochs": a.warmup_epochs,
        "label_smoothing": a.label_smoothing, "dropout": a.dropout, "drop_path": a.drop_path,
        "clip_grad_norm": a.clip_grad_norm, "seed": a.seed, "augment": data.augment,
        "sgr": ({"lambda": a.sgr_lambda, "distance": a.sgr_distance, "grad": "exact",
                 "direction": "forward", "warmup_epochs": a.sgr_warmup}
                if a.method == "sgr" else None),
        "train_samples": int(data.train_x.shape[0]), "test_samples": int(data.test_x.shape[0]),
        "normalize": {"mean": data.mean, "std": data.std},
        "parameters": sum(p.numel() for ps in tr.params for p in ps),
        "threads": torch.get_num_threads(), "device": a.device,
        "implementation": f"pytorch {torch.__version__}",
    }
    print(json.dumps(summary), flush=True)
    return summary


# ----------------------------------------------------------------------------------------------
# Self-test
# ----------------------------------------------------------------------------------------------

def self_test(a, data):
    """λ = 0 sgr equals greedy in its first step; the SGR term is finite and non-zero and its
    double-backward gradient matches a finite difference of D (f64, one module)."""
    import copy
    x, y = next(data.train_batches(0, 32))
    ok = True
    for model, heads in (("resnet18", ("infopro", "dgl", "0c1f")),
                         ("vit-cifar", ("token", "mean", "block-token", "block-mean"))):
        for head in heads:
            b = copy.copy(a)
            b.model, b.aux_head, b.modules, b.dropout, b.drop_path = model, head, 4, 0.0, 0.0
            b.epochs = 1
            updated, stats = {}, {}
            for method, lam in (("greedy", 1.0), ("sgr", 0.0), ("sgr", 1.0)):
                c = copy.copy(b)
                c.method, c.sgr_lambda = method, lam
                mods, ends, _ = build(c)
                for m in mods:
                    m.train()
                tr = Trainer(mods, c, 10)
                _, _, bst, _ = tr.train_step(x, y)
                updated[(method, lam)] = [p.detach().clone() for ps in tr.params for p in ps]
                stats[(method, lam)] = bst
            g, s0, s1 = updated[("greedy", 1.0)], updated[("sgr", 0.0)], updated[("sgr", 1.0)]
            diff0 = max((p - q).abs().max().item() for p, q in zip(g, s0))
            diff1 = max((p - q).abs().max().item() for p, q in zip(g, s1))
            ds = [d for _, _, d in stats[("sgr", 1.0)]]
            good = (diff0 == 0.0 and diff1 > 0 and all(d is not None and math.isfinite(d) and d > 0
                                                        for d in ds))
            ok &= good
            print(json.dumps({"self_test": "lambda0_equals_greedy", "model": model, "head": head,
                              "split_ends": ends, "max_abs_diff_lambda0": diff0,
                              "max_abs_diff_lambda1": diff1, "sgr_distance": ds,
                              "boundary_cos": [round(s[0], 4) for s in stats[("sgr", 1.0)]],
                              "ok": good}), flush=True)
    ok &= check_term_grad(a, x, y)
    print(json.dumps({"self_test": "all", "ok": bool(ok)}), flush=True)
    return ok


def check_term_grad(a, x, y):
    """The term's gradient against a central difference of D along a random direction, f64."""
    import copy
    ok = True
    for model, head in (("resnet18", "0c1f"), ("vit-cifar", "token")):
        b = copy.copy(a)
        b.model, b.aux_head, b.modules, b.dropout, b.drop_path = model, head, 4, 0.0, 0.0
        mods, _, _ = build(b)
        mods = [m.double() for m in mods]
        xd = x.double()[:8]
        yd = y[:8]
        with torch.no_grad():
            h0 = mods[0].body(xd)
        inp0 = h0.detach().requires_grad_(True)
        out0 = mods[0].head(inp0)
        prev_a = torch.autograd.grad(F.cross_entropy(out0, yd), inp0)[0].detach()
        m1 = mods[1]
        params = [p for _, p in module_params(m1, 1)]
        # BatchNorm in training mode (batch statistics) without moving the running stats.
        for sub in m1.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                sub.momentum = 0.0

        def D():
            inp = h0.detach().requires_grad_(True)
            o = m1.body(inp)
            l = F.cross_entropy(m1.head(o), yd)
            bb = torch.autograd.grad(l, inp, create_graph=True)[0]
            return distance("squared-l2", bb, prev_a)

        d = D()
        gd = torch.autograd.grad(d, params, allow_unused=True)
        gen = torch.Generator().manual_seed(0)
        u = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        analytic = sum((gi * ui).sum().item() for gi, ui in zip(gd, u) if gi is not None)
        # Tiny step: D jumps where a ReLU mask flips (the exact HVP holds masks fixed).
        eps = 1e-8
        with torch.no_grad():
            for p, ui in zip(params, u):
                p.add_(eps * ui)
        dp = D().item()
        with torch.no_grad():
            for p, ui in zip(params, u):
                p.sub_(2 * eps * ui)
        dm = D().item()
        with torch.no_grad():
            for p, ui in zip(params, u):
                p.add_(eps * ui)
        numeric = (dp - dm) / (2 * eps)
        rel = abs(analytic - numeric) / max(abs(numeric), 1e-30)
        good = rel < 1e-4
        ok &= good
        print(json.dumps({"self_test": "sgr_term_grad_vs_finite_difference_f64", "model": model,
                          "D": d.item(), "analytic": analytic, "numeric": numeric,
                          "rel_err": rel, "ok": good}), flush=True)
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet18", choices=["resnet18", "vit-cifar"])
    ap.add_argument("--method", default="sgr", choices=["bp", "greedy", "sgr"])
    ap.add_argument("--modules", "-k", type=int, default=None,
                    help="K [default: 1 for bp, 4 otherwise]")
    ap.add_argument("--aux-head", default="auto",
                    choices=["auto", "infopro", "dgl", "0c1f", "token", "mean", "block-token",
                             "block-mean"],
                    help="auto: infopro for resnet18, token for vit-cifar")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--decay-scope", default=None, choices=["all", "weights"],
                    help="[default: all for sgd, weights for adamw]")
    ap.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    ap.add_argument("--warmup-epochs", type=float, default=None)
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--clip-grad-norm", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--no-augment", action="store_true")
    ap.add_argument("--sgr-lambda", type=float, default=1.0)
    ap.add_argument("--sgr-distance", default="squared-l2",
                    choices=["squared-l2", "cosine", "cosine-per-sample"])
    ap.add_argument("--sgr-grad", default="exact", choices=["exact"],
                    help="only the exact double backward here")
    ap.add_argument("--sgr-warmup", type=float, default=0.0)
    ap.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist"])
    ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (as sgr's comparison runs) or cuda")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--drop-path", type=float, default=0.0)
    ap.add_argument("--self-test", action="store_true",
                    help="check λ=0 sgr = greedy, the SGR term, its gradient; then exit")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.modules is None:
        a.modules = 1 if a.method == "bp" else 4
    if a.method == "bp" and a.modules != 1:
        raise SystemExit(f"method bp trains end to end: --modules must be 1, got {a.modules}")
    if a.aux_head == "auto":
        a.aux_head = "infopro" if a.model == "resnet18" else "token"
    resnet_heads, vit_heads = ("infopro", "dgl", "0c1f"), ("token", "mean", "block-token",
                                                           "block-mean")
    if a.aux_head not in (resnet_heads if a.model == "resnet18" else vit_heads):
        raise SystemExit(f"aux head {a.aux_head} does not fit {a.model}")
    if a.decay_scope is None:
        a.decay_scope = "all" if a.optimizer == "sgd" else "weights"
    if a.schedule == "constant" and a.warmup_epochs is not None:
        raise SystemExit("--warmup-epochs applies to --schedule cosine, not constant")
    a.warmup_epochs = a.warmup_epochs or 0.0
    if not 0.0 <= a.label_smoothing < 1.0:
        raise SystemExit("label smoothing must be in [0, 1)")
    xtr, ytr = load_split(a.data_dir, True)
    xte, yte = load_split(a.data_dir, False)
    mean, std = channel_stats(xtr)  # all 60 000 raw 28×28 images, before --train-limit
    data = FashionMnist(a.data_dir, a.train_limit, not a.no_augment, a.seed, mean, std,
                        xtr, ytr, xte, yte)
    if a.self_test:
        sys.exit(0 if self_test(a, data) else 1)
    run(a, data)


if __name__ == "__main__":
    main()
