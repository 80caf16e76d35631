"""Median and range over several recorded runs of bench_step.py / bench_matmul.py / bench_vae.py (--json).

    python benchmarks/bench_matmul.py --threads 2 --repeat 7 --json > run1.json   # ... run2, run3
    python benchmarks/summarize_runs.py run1.json run2.json run3.json

For every row (bench_step: implementation x threads; bench_matmul: shape x method x mode; bench_vae:
decoder) it prints each figure as "median [min-max]" over the runs, so a quoted number comes with
its spread rather than the best run.
"""
from __future__ import annotations

import json
import statistics
import sys


def fmt(values, spec):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, spec)
    return f"{format(med, spec)} [{format(min(values), spec)}-{format(max(values), spec)}]"


def rows_of(doc):
    """(kind, key, figures) for each row of one benchmark's JSON output."""
    if isinstance(doc, list):  # bench_step
        for r in doc:
            if "seconds" in r:
                yield "step", (r["name"], r["threads"]), {
                    "seconds": (r["seconds"], ".3f"), "vs torch": (r.get("speedup_vs_torch"), ".2f"),
                    "vs 1 thread": (r.get("speedup_vs_1_thread"), ".2f"), "peak RSS MB": (r["peak_rss_mb"], ".0f"),
                    "rel L2 vs fp32 %": (100 * r["rel_l2_vs_fp32"] if "rel_l2_vs_fp32" in r else None, ".2f")}
    elif "results" in doc:  # bench_matmul
        for r in doc["results"]:
            yield "matmul", (f"{r['M']}x{r['K']}x{r['N']}", r["method"], r["mode"]), {
                "ms": (1e3 * r["median_s"], ".3f"), "x numpy": (r["speedup_vs_numpy"], ".2f")}
        for r in doc.get("attention", []):
            yield "matmul", (f"attention {r['shape']}", r["method"], "fp32"), {
                "ms": (1e3 * r["median_s"], ".3f"), "x numpy": (r["speedup_vs_numpy"], ".2f")}
    elif "decode" in doc:  # bench_vae
        for name, r in doc["decode"].items():
            yield "vae", (name,), {"seconds": (r["median_s"], ".3f"),
                                   "x diffusers": (r["speedup_vs_diffusers"], ".2f"),
                                   "max abs err": (r["max_abs_err"], ".1e")}
    else:
        raise SystemExit("not a bench_step / bench_matmul / bench_vae --json output")


def main(paths) -> int:
    if not paths:
        raise SystemExit(__doc__)
    table: dict = {}
    for p in paths:
        with open(p) as f:
            try:
                doc = json.load(f)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{p}: not a benchmark's --json output ({e})") from None
            for kind, key, figures in rows_of(doc):
                entry = table.setdefault((kind, key), {})
                for name, (value, spec) in figures.items():
                    entry.setdefault(name, ([], spec))[0].append(value)
    print(f"{len(paths)} runs; each figure: median [min-max] over the runs")
    for (_kind, key), figures in table.items():
        cols = "  ".join(f"{name} {fmt(vals, spec)}" for name, (vals, spec) in figures.items()
                         if any(v is not None for v in vals))
        print(f"{' | '.join(map(str, key)):58s} {cols}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
