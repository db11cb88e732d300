#!/usr/bin/env python3
"""Prints the tables of docs/baselines.md from the run directories of scripts/baselines_fmnist.sh.

    python3 scripts/baselines_table.py [OUT_DIR]     # default: target/baselines

For each finished run (a folder with summary.json): test (or validation) error, train time,
peak memory (RSS) and the boundary cosines cos(a_{k-1}, b_k) of the last epoch (mean, min, max
over the 15 boundaries), plus the mean cosine of the first epoch from metrics.jsonl. Runs not
finished yet are listed as such. Standard library only.
"""
import json
import os
import sys


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


if __name__ == "__main__":
    main()
