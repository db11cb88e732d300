#!/usr/bin/env python3
"""Prints the tables of scripts/perf_imagenet.sh from its records (docs/results/perf27/runs.jsonl):
sgr against PyTorch per pair (speed and peak RSS ratios), and SGR against greedy on DeiT-S K=4."""
import json
import sys

path = sys.argv[1] if len(sys.argv) > 1 else "docs/results/perf27/runs.jsonl"
recs = [json.loads(l) for l in open(path) if l.strip()]
mib = lambda b: b / 2**20
print("| model | sgr img/s | PyTorch img/s | speed | sgr peak MiB | PyTorch peak MiB | memory |")
print("|---|---|---|---|---|---|---|")
i = 0
while i + 1 < len(recs):
    a, b = recs[i], recs[i + 1]
    if a["side"] == "sgr" and b["side"] == "torch" and a["report"]["method"] == "bp":
        c, t = a["report"], b["report"]
        print(f"| {a['model']} | {c['images_per_s']:.2f} | {t['images_per_s']:.2f} | "
              f"{c['images_per_s'] / t['images_per_s']:.2f}× | {mib(c['peak_memory_bytes']):.0f} | "
              f"{mib(t['peak_memory_bytes']):.0f} | {c['peak_memory_bytes'] / t['peak_memory_bytes']:.2f}× |")
        i += 2
    else:
        i += 1
print()
print("| DeiT-S K=4 pair | greedy s/step | sgr (forward difference) s/step | ratio |")
print("|---|---|---|---|")
local = [r["report"] for r in recs if r["side"] == "sgr" and r["report"]["modules"] == 4]
for n, (g, s) in enumerate(zip(local[0::2], local[1::2]), 1):
    print(f"| {n} | {g['median_step_seconds']:.2f} | {s['median_step_seconds']:.2f} | "
          f"{s['median_step_seconds'] / g['median_step_seconds']:.2f}× |")
