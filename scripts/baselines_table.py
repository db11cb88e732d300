#!/usr/bin/env python3
"""Prints the tables of docs/baselines.md from the run directories of scripts/baselines_fmnist.sh.

    python3 scripts/baselines_table.py [OUT_DIR]     # default: target/baselines

For each finished run (a folder with summary.json): test (or validation) error, train time,
peak memory (RSS) and the boundary cosines cos(a_{k-1}, b_k) of the last epoch (mean, min, max
over the 15 boundaries), plus the mean cosine of the first epoch from metrics.jsonl. Runs not
finished yet are listed as such. Where a method has runs for several seeds (`NAME` is seed 0,
`NAME-seedN` seed N), a second table gives the mean and standard deviation over the seeds, and
for a method and its `+sgr` the per-seed difference of their errors. A third table puts the size
of each `+sgr` run's SGR term beside its local losses (last epoch): λ·D at the first boundary,
the median λ·D over the others, and the median local loss of the modules that carry the term.
Standard library only.
"""
import json
import os
import re
import statistics
import sys
from statistics import median


def epochs(path):
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    out.append(json.loads(line))
    return out


def row(out, name):
    d = os.path.join(out, name)
    s_path = os.path.join(d, "summary.json")
    if not os.path.exists(s_path):
        if os.path.isdir(d):
            done = len(epochs(os.path.join(d, "metrics.jsonl")))
            return f"| {name} | (running: {done} epochs done) | | | | |"
        return None
    s = json.load(open(s_path))
    cos = s.get("final_boundary_cos") or []
    first = epochs(os.path.join(d, "metrics.jsonl"))
    first_cos = [b["cos"] for b in first[0].get("boundaries", [])] if first else []
    mib = (s.get("peak_memory_bytes") or 0) / 2**20
    split = "val" if s.get("validation") else "test"

    def mean(v):
        return sum(v) / len(v) if v else float("nan")

    cos_txt = (
        f"{mean(cos):.3f} [{min(cos):.2f}, {max(cos):.2f}]" if cos else "—"
    )
    first_txt = f"{mean(first_cos):.3f}" if first_cos else "—"
    return (
        f"| {name} | {100 * s['test_error']:.2f} % ({split}) | {s['train_seconds']:.0f} s "
        f"| {mib:.0f} MiB | {first_txt} | {cos_txt} |"
    )


def seed_errors(out, names):
    """{method: {seed: test error}} for the methods with at least two seeds."""
    by = {}
    for n in names:
        m = re.fullmatch(r"(.+)-seed(\d+)", n)
        method, seed = (m.group(1), int(m.group(2))) if m else (n, 0)
        f = os.path.join(out, n, "summary.json")
        if os.path.exists(f):
            by.setdefault(method, {})[seed] = json.load(open(f))["test_error"]
    return {m: e for m, e in by.items() if len(e) > 1}


def mean_sd(v):
    return statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0


def seeds_table(out, names):
    by = seed_errors(out, names)
    if not by:
        return
    print()
    print("| method | seeds | test error: mean ± sd | per seed | +sgr − base, per seed |")
    print("|---|---|---|---|---|")
    for method in sorted(by):
        e = by[method]
        seeds = sorted(e)
        m, sd = mean_sd([e[s] for s in seeds])
        per = ", ".join(f"{100 * e[s]:.2f}" for s in seeds)
        diff = "—"
        base = by.get(method[: -len("+sgr")]) if method.endswith("+sgr") else None
        if base:
            common = [s for s in seeds if s in base]
            d = [100 * (e[s] - base[s]) for s in common]
            dm, dsd = mean_sd(d)
            diff = ", ".join(f"{x:+.2f}" for x in d) + f" (mean {dm:+.2f} ± {dsd:.2f})"
        print(
            f"| {method} | {', '.join(map(str, seeds))} | {100 * m:.2f} ± {100 * sd:.2f} % "
            f"| {per} | {diff} |"
        )


def strength_table(out, names):
    rows = []
    for n in names:
        d = os.path.join(out, n)
        cfg_path = os.path.join(d, "config.json")
        last = epochs(os.path.join(d, "metrics.jsonl"))
        if not os.path.exists(cfg_path) or not last:
            continue
        trainer = json.load(open(cfg_path)).get("trainer", {})
        sgr = trainer.get("sgr") if "sgr" in str(trainer.get("method", "")) else None
        dist = [b.get("sgr_distance") for b in last[-1].get("boundaries", [])]
        if not sgr or not dist or any(x is None for x in dist):
            continue
        lam = sgr["lambda"]
        losses = last[-1]["module_losses"][1:]
        ratio = median([lam * x / l for x, l in zip(dist, losses)])
        others = median([lam * x for x in dist[1:]]) if len(dist) > 1 else float("nan")
        rows.append(
            f"| {n} | {sgr['distance']}, λ = {lam:g} | {lam * dist[0]:.2e} "
            f"| {others:.2e} | {median(losses):.3f} | {ratio:.2e} |"
        )
    if rows:
        print()
        print("| run | SGR term | λ·D, boundary 1 | λ·D, median of the others "
              "| local loss, median | λ·D / local loss, median |")
        print("|---|---|---|---|---|---|")
        print("\n".join(rows))


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "target/baselines"
    names = sorted(
        n for n in os.listdir(out) if os.path.isdir(os.path.join(out, n))
    )
    print("| run | error | train time | peak memory | cos(a, b), epoch 1 (mean) "
          "| cos(a, b), last epoch: mean [min, max] |")
    print("|---|---|---|---|---|---|")
    for n in names:
        r = row(out, n)
        if r:
            print(r)
    seeds_table(out, names)
    strength_table(out, names)


if __name__ == "__main__":
    main()
