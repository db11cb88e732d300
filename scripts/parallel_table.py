#!/usr/bin/env python3
"""Tables of docs/parallel.md ("Results") from scripts/parallel_bench.sh's records.

Usage: python3 scripts/parallel_table.py [docs/results/parallel/bench.jsonl]
"""
import json
import sys

MIB = 1024 * 1024
# Link bandwidths (bytes/s) of the scaling model: a GPU's PCIe 4.0 x16 link, 100 Gb/s
# InfiniBand and 10 Gb/s Ethernet between hosts.
LINKS = [("PCIe 4.0 x16", 25e9), ("100 Gb/s IB", 12.5e9), ("10 GbE", 1.25e9)]


def main(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    cases = []
    for r in rows:
        if r["mode"] != "model" and r["case"] not in cases:
            cases.append(r["case"])
    print("| case | pair | sequential img/s | pipeline img/s | ratio | heap MiB seq / pipe | RSS MiB seq / pipe | worker heap MiB (est.) |")
    print("|---|---|---|---|---|---|---|---|")
    for c in cases:
        by_pair = {}
        for r in rows:
            if r["case"] == c:
                by_pair.setdefault(r["pair"], {})[r["mode"]] = r
        ratios = []
        for pair in sorted(by_pair):
            s, p = by_pair[pair].get("sequential"), by_pair[pair].get("pipeline")
            if not (s and p):
                continue
            ratio = p["images_per_s"] / s["images_per_s"]
            ratios.append(ratio)
            workers = " / ".join(str(b // MIB) for b in p["pipeline"]["worker_heap_bytes"])
            stages = " ".join("%d-%d" % (a, b - 1) for a, b in p["pipeline"]["stages"])
            print(
                "| %s (%s) | %d | %.1f | %.1f | %.2f× | %d / %d | %d / %d | %s |"
                % (
                    c, stages, pair, s["images_per_s"], p["images_per_s"], ratio,
                    s["peak_heap_bytes"] // MIB, p["peak_heap_bytes"] // MIB,
                    (s["peak_memory_bytes"] or 0) // MIB, (p["peak_memory_bytes"] or 0) // MIB,
                    workers,
                )
            )
        if ratios:
            print("| %s | mean | | | %.2f× | | | |" % (c, sum(ratios) / len(ratios)))
    models = [r for r in rows if r["mode"] == "model"]
    if not models:
        return
    print()
    print("Scaling model: K modules on K devices, per-module step times measured here (2 threads, before the pipeline starts),")
    print("batch %d. Speed-up = Σ t_k / max t_k; an epoch of S steps takes (S + K − 1) · max t_k." % models[0]["batch_size"])
    print()
    head = "| K | module step times (s) | Σ t | max t | speed-up | largest message MiB |"
    head += "".join(" + message time on %s |" % n for n, _ in LINKS)
    print(head)
    print("|---" * (6 + len(LINKS)) + "|")
    for r in models:
        p = r["pipeline"]
        t = p["module_seconds"]
        msg = max(p["message_bytes"]) + r["batch_size"] * (3 * 32 * 32 * 4 + 4)
        total, worst = sum(t), max(t)
        cells = [
            str(r["modules"]),
            " ".join("%.3f" % x for x in t),
            "%.3f" % total,
            "%.3f" % worst,
            "%.2f×" % (total / worst),
            "%.1f" % (msg / MIB),
        ]
        for _, bw in LINKS:
            # A message not overlapped with compute adds to the slowest worker's step.
            cells.append("%.2f× (%.1f ms)" % (total / (worst + msg / bw), 1e3 * msg / bw))
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/results/parallel/bench.jsonl")
