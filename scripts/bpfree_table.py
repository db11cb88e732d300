#!/usr/bin/env python3
"""Prints the BP-free tables of docs/bpfree.md from the run records that
scripts/bpfree_tables.sh writes (default docs/results/bpfree; a second folder, e.g.
target/bpfree, is read for runs not recorded yet).

Usage: python3 scripts/bpfree_table.py [RECORD_DIR [RUN_DIR]]
"""
import json
import os
import statistics
import sys

record = sys.argv[1] if len(sys.argv) > 1 else "docs/results/bpfree"
runs = sys.argv[2] if len(sys.argv) > 2 else "target/bpfree"

ROWS = {
    "bp": "BP",
    "lgbp": "LG-BP",
    "lgbp-sgr": "LG-BP+SGR",
    "fgw": "LG-FG-W",
    "fga": "LG-FG-A",
    "fga-sgr": "LG-FG-A+SGR",
}


def load(name):
    """(summary, config, last epoch record) of a run, or None."""
    for folder in (record, runs):
        d = os.path.join(folder, name)
        if os.path.exists(os.path.join(d, "summary.json")):
            summary = json.load(open(os.path.join(d, "summary.json")))
            config = json.load(open(os.path.join(d, "config.json")))
            lines = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl")) if l.strip()]
            epochs = [l for l in lines if "train_accuracy" in l]
            return summary, config, epochs[-1] if epochs else {}
    return None


def pct(x):
    return f"{100 * x:.2f}"


def table1():
    print("Table 1: localmixer-m-1-16 on MNIST (Ren et al.'s rows), seed 0")
    print()
    print("| row | paper test err % | lr (validation) | epochs | test err % | train err % | s/epoch |")
    print("|---|---|---|---|---|---|---|")
    paper = {"bp": 2.41, "lgbp": 2.81, "fgw": 5.66, "fga": 2.55}
    for r in ["bp", "lgbp", "fgw", "fga"]:
        got = load(f"t1-{r}")
        if got is None:
            print(f"| {ROWS[r]} | {paper[r]} | not run | | | | |")
            continue
        s, c, last = got
        t = c["trainer"]
        print(
            f"| {ROWS[r]} | {paper[r]} | {t['lr']} | {s['epochs']} | {pct(s['test_error'])} | "
            f"{pct(1 - last.get('train_accuracy', float('nan')))} | "
            f"{s['train_seconds'] / max(s['epochs'], 1):.1f} |"
        )
    print()


def mean_sd(xs):
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{100 * xs[0]:.2f} (1 seed)"
    return f"{100 * statistics.mean(xs):.2f} ± {100 * statistics.stdev(xs):.2f}"


def seeds(prefix):
    """Per-seed records of runs `{prefix}-seed0..2`: test and train errors, s/epoch, the
    boundary cosines per boundary (mean over seeds) and λ."""
    test, train, cos, secs, lam = [], [], [], [], "–"
    for seed in range(3):
        got = load(f"{prefix}-seed{seed}")
        if got is None:
            continue
        s, c, last = got
        test.append(s["test_error"])
        train.append(1 - last.get("train_accuracy", float("nan")))
        secs.append(s["train_seconds"] / max(s["epochs"], 1))
        cos.append(s.get("final_boundary_cos") or [])
        sgr = c["trainer"].get("sgr")
        if sgr:
            lam = sgr["lambda"]
    per_boundary = [statistics.mean(col) for col in zip(*cos)] if cos and cos[0] else []
    cos_s = " ".join(f"{v:.2f}" for v in per_boundary) or "–"
    return test, train, secs, cos_s, lam


def table2():
    for ds in ["mnist", "fashion-mnist"]:
        print(f"Table 2: localmixer-mnist, K = 4, {ds}, 10 000 training images")
        print()
        print("| row | λ | seeds | test err % | train err % | cos(a,b) per boundary | s/epoch |")
        print("|---|---|---|---|---|---|---|")
        for r in ["bp", "lgbp", "lgbp-sgr", "fga", "fga-sgr"]:
            test, train, secs, cos_s, lam = seeds(f"t2-{ds}-{r}")
            if not test:
                print(f"| {ROWS[r]} | | 0 | | | | |")
                continue
            print(
                f"| {ROWS[r]} | {lam} | {len(test)} | {mean_sd(test)} | {mean_sd(train)} | "
                f"{cos_s} | {statistics.mean(secs):.1f} |"
            )
        print()


def table3():
    print("Table 3: resnet8, K = 4, 0c1f heads, fashion-mnist, 10 000 training images, 30 epochs")
    print()
    # No times: these runs shared the cores with other work, were paused and resumed.
    print("| row | λ (validation) | seeds | test err % | train err % | cos(a,b) per boundary |")
    print("|---|---|---|---|---|---|")
    rows = [("greedy", "greedy"), ("sgr-forward", "greedy+sgr, forward"),
            ("sgr-backward", "greedy+sgr, backward")]
    for r, label in rows:
        test, train, _, cos_s, lam = seeds(f"t3-{r}")
        if not test:
            print(f"| {label} | | 0 | | | |")
            continue
        print(
            f"| {label} | {lam} | {len(test)} | {mean_sd(test)} | {mean_sd(train)} | "
            f"{cos_s} |"
        )
    print()


table1()
table2()
table3()
