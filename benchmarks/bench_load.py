"""Load time and anonymous memory of `load_model` on a TerDiT-600M-config file.

    python benchmarks/bench_load.py [--json] [--config 600m] [--repeat 5]

The file is made by benchmarks/make_checkpoint.py + the real converter (cached, see bench_step.py)
and read once into the page cache first. Each load runs in a fresh subprocess and reports the growth
of RssAnon (anonymous memory: the weights must stay mapped, not copied) and the wall time of
`load_model(path, verify=True)` and `verify=False`, next to the time to read the file's bytes once
(the baseline measured in the same run).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

_WORKER = r"""
import json, sys, time
def rss_anon_mb():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('RssAnon'):
                return int(line.split()[1]) / 1024
import numpy, terdit_edge
path, verify = sys.argv[1], sys.argv[2] == '1'
a0 = rss_anon_mb(); t0 = time.perf_counter()
model = terdit_edge.load_model(path, backend='numpy', verify=verify)
t1 = time.perf_counter(); a1 = rss_anon_mb()
print(json.dumps({'seconds': t1 - t0, 'rss_anon_added_mb': a1 - a0}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--config", default="600m")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    sys.path.insert(0, HERE)
    from bench_step import prepare

    _, path = prepare(a.config)
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass
    read_s = time.perf_counter() - t0
    rows = {"file_mb": os.path.getsize(path) / 1e6, "read_file_seconds": read_s}
    for verify in (True, False):
        runs = []
        for _ in range(a.repeat):
            r = subprocess.run([sys.executable, "-c", _WORKER, path, "1" if verify else "0"],
                               capture_output=True, text=True, check=True)
            runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        best = min(runs, key=lambda r: r["seconds"])
        key = "verify" if verify else "no_verify"
        rows[key] = {"seconds": best["seconds"], "rss_anon_added_mb": max(r["rss_anon_added_mb"] for r in runs),
                     "ratio_to_read": best["seconds"] / read_s}
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{a.config} file: {rows['file_mb']:.1f} MB; reading its bytes once (page cache): {read_s:.3f} s")
    for key in ("verify", "no_verify"):
        r = rows[key]
        print(f"load_model({key.replace('_', ' ')}): {r['seconds']:.3f} s ({r['ratio_to_read']:.2f}x the read), "
              f"RssAnon +{r['rss_anon_added_mb']:.1f} MB")


if __name__ == "__main__":
    main()
