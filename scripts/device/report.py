#!/usr/bin/env python3
"""Turns the raw results of scripts/device/check.sh (OUT/bench.jsonl, tests.log, gpu.txt) into
OUT/check.json and OUT/check.md: the sgr-against-PyTorch table and the issue's targets.

    python3 scripts/device/report.py OUT

Standard library only. A cell measured in several pairs reports the median of its pairs.
"""
import json
import os
import re
import statistics
import sys

MIB = 2**20


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def cells(rows):
    """(model, method) -> the medians of its pairs, in the order measured."""
    out = {}
    for r in rows:
        c = out.setdefault((r["model"], r["method"]), {"sgr": [], "torch": [], "errors": []})
        for side in ("sgr", "torch"):
            if r[side]:
                c[side].append(r[side])
            elif r.get(side + "_error"):
                c["errors"].append(f"{side}: {r[side + '_error']}")
    for c in out.values():
        for side in ("sgr", "torch"):
            runs = c.pop(side)
            c[side] = {
                "pairs": len(runs),
                "images_per_s": median([v["images_per_s"] for v in runs]),
                "median_step_seconds": median([v["median_step_seconds"] for v in runs]),
                "peak_device_memory_bytes": median([v.get("peak_device_memory_bytes") for v in runs]),
                "peak_memory_bytes": median([v.get("peak_memory_bytes") for v in runs]),
                "images_per_s_each": [v["images_per_s"] for v in runs],
            }
        s, t = c["sgr"]["images_per_s"], c["torch"]["images_per_s"]
        c["speed_ratio"] = s / t if s and t else None
        sm, tm = c["sgr"]["peak_device_memory_bytes"], c["torch"]["peak_device_memory_bytes"]
        c["memory_ratio"] = sm / tm if sm and tm else None
    return out


def targets(c):
    """The issue's targets: (what, value, bound, met)."""
    def get(model, method):
        return c.get((model, method))

    out = []
    for model, first, then in (("resnet50", 0.5, 1.0), ("deit-s", 1.0, None)):
        cell = get(model, "bp")
        r = cell["speed_ratio"] if cell else None
        out.append((f"{model} bp images/s, sgr / PyTorch", r, first, ">="))
        if then:
            out.append((f"{model} bp images/s, sgr / PyTorch (then)", r, then, ">="))
    for model in sorted({m for m, _ in c}):
        g = get(model, "greedy --modules 4")
        s = get(model, "sgr --modules 4 --sgr-grad forward-difference")
        b = get(model, "bp")
        gs = g and g["sgr"]["median_step_seconds"]
        ss = s and s["sgr"]["median_step_seconds"]
        out.append((f"{model} sgr K=4 step / greedy K=4 step (sgr)", ss / gs if gs and ss else None, 2.0, "<="))
        bm = b and b["sgr"]["peak_device_memory_bytes"]
        sm = s and s["sgr"]["peak_device_memory_bytes"]
        out.append((f"{model} sgr K=4 peak device memory / bp's (sgr)", sm / bm if bm and sm else None, 0.6, "<="))
    return [
        {"target": what, "value": v, "bound": f"{op} {bound}",
         "met": None if v is None else (v >= bound if op == ">=" else v <= bound)}
        for what, v, bound, op in out
    ]


def tests_summary(path):
    if not os.path.exists(path):
        return None
    text = open(path, encoding="utf-8", errors="replace").read()
    m = re.search(r"test result: (\w+)\. (\d+) passed; (\d+) failed", text)
    failed = re.findall(r"^test (\S+) \.\.\. FAILED", text, re.M)
    return {"result": m.group(1) if m else "did not finish", "passed": int(m.group(2)) if m else None,
            "failed": int(m.group(3)) if m else None, "failed_tests": failed}


def fmt(v, spec):
    return "—" if v is None else format(v, spec)


def main():
    out = sys.argv[1]
    rows = [json.loads(l) for l in open(os.path.join(out, "bench.jsonl")) if l.strip()]
    c = cells(rows)
    tg = targets(c)
    gpu = open(os.path.join(out, "gpu.txt")).read().strip() if os.path.exists(os.path.join(out, "gpu.txt")) else ""
    tests = tests_summary(os.path.join(out, "tests.log"))
    report = {
        "gpu": gpu, "tests": tests, "raw": rows, "targets": tg,
        "cells": [{"model": m, "method": meth, **v} for (m, meth), v in c.items()],
    }
    with open(os.path.join(out, "check.json"), "w") as f:
        json.dump(report, f, indent=1)
    lines = [f"GPU: {gpu}", ""]
    if tests:
        lines += [f"Device tests: {tests['result']}, {tests['passed']} passed, {tests['failed']} failed"
                  + (f" ({', '.join(tests['failed_tests'])})" if tests["failed_tests"] else ""), ""]
    lines += ["| model | method | sgr img/s | PyTorch img/s | sgr / PyTorch | sgr peak device MiB "
              "| PyTorch peak device MiB | sgr / PyTorch memory |",
              "|---|---|---|---|---|---|---|---|"]
    for (model, method), v in c.items():
        s, t = v["sgr"], v["torch"]
        mib = lambda b: None if b is None else b / MIB
        lines.append(
            f"| {model} | {method} | {fmt(s['images_per_s'], '.1f')} | {fmt(t['images_per_s'], '.1f')} "
            f"| {fmt(v['speed_ratio'], '.2f')} | {fmt(mib(s['peak_device_memory_bytes']), '.0f')} "
            f"| {fmt(mib(t['peak_device_memory_bytes']), '.0f')} | {fmt(v['memory_ratio'], '.2f')} |")
    errors = [(m, meth, e) for (m, meth), v in c.items() for e in v["errors"]]
    if errors:
        lines += ["", "Failed measurements:"] + [f"- {m} {meth}: {e}" for m, meth, e in errors]
    lines += ["", "| target | value | bound | met |", "|---|---|---|---|"]
    for t in tg:
        met = "not measured" if t["met"] is None else ("yes" if t["met"] else "no")
        lines.append(f"| {t['target']} | {fmt(t['value'], '.2f')} | {t['bound']} | {met} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "check.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
