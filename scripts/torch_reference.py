#!/usr/bin/env python3
"""PyTorch reference of `sgr bench`: the identical CIFAR ResNet (option-A shortcuts, BatchNorm,
torchvision names), the same split tables and aux heads, the same methods (bp, greedy; sgr with
the exact double backward or the same finite differences), timed the same way (median step after one warm-up step, peak RSS).

Not part of CI. Usage (same thread count as sgr, e.g. 2):

    pip install torch
    python3 scripts/torch_reference.py --model resnet32 --method bp --batch-size 128 --steps 3 --threads 2
    python3 scripts/torch_reference.py --device cuda --model resnet50 --input-size 224 --classes 1000 --batch-size 64

Prints one JSON object with the fields of `sgr bench --json`. On CUDA a step is timed until the
GPU has finished it (torch.cuda.synchronize), as `sgr bench` does, and peak_device_memory_bytes
is torch's allocator high-water mark over the warm-up and timed steps (cuDNN autotuning stays
off, PyTorch's default, unless --cudnn-benchmark).
"""
import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

INFOPRO = {
    32: {2: [(2, 1)], 3: [(1, 4), (2, 4)], 4: [(1, 2), (2, 1), (3, 0)],
         8: [(1, 0), (1, 2), (1, 4), (2, 1), (2, 3), (3, 0), (3, 2)],
         16: [(0, 0)] + [(1, b) for b in range(5)] + [(2, b) for b in range(5)] + [(3, b) for b in range(4)]},
    110: {2: [(2, 8)], 3: [(1, 17), (2, 17)], 4: [(1, 11), (2, 7), (3, 3)],
          8: [(1, 4), (1, 11), (2, 0), (2, 7), (2, 14), (3, 3), (3, 10)],
          16: [(1, 1), (1, 4), (1, 7), (1, 10), (1, 13), (1, 16), (2, 1), (2, 4), (2, 7), (2, 11),
               (2, 15), (3, 1), (3, 5), (3, 9), (3, 13)]},
}


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = stride != 1 or cin != cout
        self.pad = cout - cin

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        sc = x
        if self.down:
            sc = x[:, :, ::2, ::2]
            sc = F.pad(sc, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(h + sc)


class Stem(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)

    def forward(self, x):
        return F.relu(self.bn1(self.conv1(x)))


class Classifier(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


class Head(nn.Module):
    def __init__(self, c, classes, kind):
        super().__init__()
        self.kind = kind
        if kind == "0c1f":
            self.fc = nn.Linear(c, classes)
        else:
            cout, stride = (c * 2, 2) if c < 64 else (c, 1)
            self.conv = nn.Conv2d(c, cout, 3, stride, 1, bias=False)
            self.bn = nn.BatchNorm2d(cout)
            self.fc1 = nn.Linear(cout, 128)
            self.fc2 = nn.Linear(128, classes)

    def forward(self, x):
        if self.kind == "0c1f":
            return self.fc(x.mean((2, 3)))
        h = F.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc2(F.relu(self.fc1(h)))


def build(depth, cin, classes, k, head):
    n = (depth - 2) // 6
    units, channels, c = [Stem(cin)], [16], 16
    for s in range(1, 4):
        cout = 16 << (s - 1)
        for b in range(n):
            units.append(Block(c, cout, 2 if s > 1 and b == 0 else 1))
            channels.append(cout)
            c = cout
    nunits = len(units)
    if k == 1:
        ends = [nunits - 1]
    elif depth in INFOPRO and k in INFOPRO[depth]:
        unit = lambda s, b: 0 if s == 0 else 1 + (s - 1) * n + b
        ends = [unit(s, b) for s, b in INFOPRO[depth][k]] + [nunits - 1]
    else:
        base, extra, ends, e = nunits // k, nunits % k, [], 0
        for j in range(k):
            e += base + (1 if j < extra else 0)
            ends.append(e - 1)
    modules, start = [], 0
    for j, end in enumerate(ends):
        body = list(units[start:end + 1])
        if j == len(ends) - 1:
            body.append(Classifier(classes))
            h = None
        else:
            h = Head(channels[end], classes, head)
        modules.append((nn.Sequential(*body), h))
        start = end + 1
    return modules


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet32")
    ap.add_argument("--method", default="bp", choices=["bp", "greedy", "sgr"])
    ap.add_argument("--modules", type=int, default=None)
    ap.add_argument("--aux-head", default="auto",
                    help="auto: 1c2f (CIFAR ResNets), infopro (ImageNet ResNets), token (ViTs)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--in-channels", type=int, default=3)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sgr-lambda", type=float, default=1.0)
    ap.add_argument("--sgr-grad", default="exact",
                    choices=["exact", "finite-difference", "forward-difference"])
    ap.add_argument("--sgr-fd-epsilon", type=float, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--unfused-attn", action="store_true",
                    help="timm models: the math attention path (kept probabilities) even where "
                         "timm's fused attention would serve")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="let cuDNN time its algorithms (torch.backends.cudnn.benchmark)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = a.cudnn_benchmark
    k = 1 if a.method == "bp" else (a.modules or 4)
    cifar = a.model.startswith("resnet") and (int(a.model[6:]) - 2) % 6 == 0 and int(a.model[6:]) >= 8
    if cifar:
        mods = build(int(a.model[6:]), a.in_channels, a.classes, k, "1c2f" if a.aux_head == "auto" else a.aux_head)
    else:
        # The zoo's other models (torchvision ResNets, timm ViTs) as scripts/torch_train.py
        # builds them: the same units, uniform split and aux heads as sgr.
        import os
        import sys
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import torch_train
        head = a.aux_head
        if head in ("auto", "1c2f"):
            head = "infopro" if a.model in torch_train.RESNETS else "token"
        # timm's own fused attention (scaled_dot_product_attention) wherever nothing is
        # differentiated twice, i.e. all but the exact SGR way; --unfused-attn forces the
        # math path (softmax probabilities kept for backward) for comparison.
        exact = a.method.startswith("sgr") and a.sgr_grad == "exact"
        t = argparse.Namespace(model=a.model, modules=k, aux_head=head, seed=0, dropout=0.0,
                               drop_path=0.0, classes=a.classes, image_size=a.input_size,
                               fused_attn=not (exact or a.unfused_attn))
        local, _, _ = torch_train.build(t)
        mods = [(m.body, m.head) for m in local]
    for body, head in mods:
        body.to(dev)
        if head is not None:
            head.to(dev)
    opts = []
    for body, head in mods:
        params = list(body.parameters()) + (list(head.parameters()) if head is not None else [])
        opts.append(torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4))
    x = torch.randn(a.batch_size, a.in_channels, a.input_size, a.input_size, device=dev)
    y = torch.arange(a.batch_size, device=dev) % a.classes

    def step():
        h, prev_a = x, None
        for j, ((body, head), opt) in enumerate(zip(mods, opts)):
            opt.zero_grad(set_to_none=True)
            inp = h.detach().requires_grad_(j > 0)
            out = body(inp)
            if head is None:
                logits, probe = out, None
            else:
                probe = torch.zeros_like(out, requires_grad=True)
                logits = head(out + probe)
            loss = F.cross_entropy(logits, y)
            if a.method == "sgr" and j > 0 and a.sgr_grad != "exact":
                # The same finite differences as sgr: base pass, then one (one-sided) or two
                # (central) perturbed forward + backward passes at inp ± ε·v/rms(v). The ± passes
                # use plain ReLU (sgr replays the base masks: the same cost, a multiply instead
                # of a threshold), so this is a timing reference, not an accuracy one.
                params = [q for q in opt.param_groups[0]["params"]]
                wrt = [inp] if probe is None else [inp, probe]
                g = torch.autograd.grad(loss, wrt + params)
                b, base = g[0], g[len(wrt):]
                v = 2.0 * a.batch_size * (b - prev_a)
                rms = v.pow(2).mean().sqrt().item()
                one_sided = a.sgr_grad == "forward-difference"
                eps = a.sgr_fd_epsilon or (1e-3 if one_sided else 5e-3)
                step_ = v * (eps / max(rms, 1e-30))
                signs = [1.0] if one_sided else [1.0, -1.0]
                def perturbed(s_):
                    o = body(inp.detach() + s_ * step_)
                    return F.cross_entropy(o if head is None else head(o), y)

                losses = [perturbed(s_) for s_ in signs]
                diff = losses[0] if one_sided else losses[0] - losses[1]
                dg = torch.autograd.grad(diff, params)
                scale = a.sgr_lambda * rms / (eps if one_sided else 2.0 * eps)
                for q, g0, gd in zip(params, base, dg):
                    q.grad = g0 + scale * (gd - g0 if one_sided else gd)
                next_a = g[1].detach() if probe is not None else None
            elif a.method == "sgr" and j > 0:
                # J = L + λ·B·Σ||b − a_prev||² with b = ∂L/∂inp: exact double backward; this
                # module's own a = ∂L/∂out comes from its plain loss.
                wrt = [inp] if probe is None else [inp, probe]
                g = torch.autograd.grad(loss, wrt, create_graph=True)
                d = a.batch_size * (g[0] - prev_a).pow(2).sum()
                (loss + a.sgr_lambda * d).backward()
                next_a = g[1].detach() if probe is not None else None
            else:
                loss.backward()
                next_a = probe.grad.detach() if probe is not None else None
            prev_a = next_a
            opt.step()
            h = out
        return loss

    for body, head in mods:
        body.train()
        if head is not None:
            head.train()
    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats(dev)
    step()
    times = []
    for _ in range(a.steps):
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    print(json.dumps({
        "implementation": f"pytorch {torch.__version__}",
        "model": a.model, "method": a.method,
        "sgr_grad": a.sgr_grad if a.method == "sgr" else None, "modules": k, "batch_size": a.batch_size,
        "input": [a.in_channels, a.input_size, a.input_size], "threads": a.threads,
        "steps": a.steps, "median_step_seconds": med, "images_per_s": a.batch_size / med,
        "step_seconds": times,
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device": a.device,
        "cudnn_benchmark": a.cudnn_benchmark if cuda else None,
        "peak_device_memory_bytes": torch.cuda.max_memory_allocated(dev) if cuda else None,
    }))


if __name__ == "__main__":
    main()
