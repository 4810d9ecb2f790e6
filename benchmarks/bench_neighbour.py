"""Steadiness beside a busy neighbour: the engine alone vs next to a one-thread spin loop.

A shared 2-core machine often has one core taken by another process. Losing one of two cores
should cost at most 2x; fork-join threads that wait for a descheduled sibling at every barrier
cost far more (4.3-4.5x was measured before the engine decided its own threading). Each run is
a fresh `python -c` process that loads the embedded default model, warms up, and times
`--images` images (one batch) `--repeats` times; the spin loop, when on, is one more process
busy for the whole run. Reported: the median of the runs' medians, alone and beside the spinner,
and their ratio (target <= 2.2x).

    python -m benchmarks.bench_neighbour                 # 5 runs alone, 5 beside the spinner
    python -m benchmarks.bench_neighbour --env OMP_NUM_THREADS=2   # what a user's environment forces

The engine's own wait policy (detailflow_engine.threading_policy: a short spin, then sleep) is in
force when detailflow_engine is imported before torch, as in the runs here; `--torch-first`
imports torch first (libgomp's default long spin) to show the difference.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
if sys.argv[4] == "torch-first":
    import torch  # libgomp loads with its defaults, before the engine can set its wait policy
from detailflow_engine import DetailFlowPipeline, threading_policy
import torch
pipe = DetailFlowPipeline.from_pretrained(device="cpu", dtype=sys.argv[1])
labels = list(range(int(sys.argv[2])))
pipe.generate(labels, seed=0)
times = []
for _ in range(int(sys.argv[3])):
    t0 = time.perf_counter()
    pipe.generate(labels, seed=0)
    times.append(time.perf_counter() - t0)
print(json.dumps({"times": times, "threads": torch.get_num_threads(), "policy": threading_policy.state()}))
"""

SPIN = "while True:\n    pass\n"


def one_run(args, env) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, args.dtype, str(args.images), str(args.repeats),
                          "torch-first" if args.torch_first else "engine-first"],
                         env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"child failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="fresh processes per condition (default 5)")
    ap.add_argument("--repeats", type=int, default=5, help="timed generations per process (default 5)")
    ap.add_argument("--images", type=int, default=10, help="images per generation (default 10)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="extra environment for the runs")
    ap.add_argument("--torch-first", action="store_true",
                    help="import torch before detailflow_engine (libgomp's own wait policy)")
    args = ap.parse_args()
    env = dict(os.environ)
    env.update(kv.split("=", 1) for kv in args.env)
    rows = {}
    for condition in ("alone", "beside a spin loop"):
        spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if condition != "alone" else None
        try:
            runs = [one_run(args, env) for _ in range(args.runs)]
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
        medians = [statistics.median(r["times"]) for r in runs]
        rows[condition] = (statistics.median(medians), min(medians), max(medians), runs[0]["threads"],
                           runs[0]["policy"])
    print(f"# default model, {args.images} images x {args.repeats} per process, {args.runs} processes per "
          f"condition, {args.dtype}, cpu count {os.cpu_count()}, extra env {args.env or 'none'}")
    print("| condition | median s | min s | max s | torch threads | wait policy |")
    print("|---|---|---|---|---|---|")
    for name, (med, lo, hi, threads, policy) in rows.items():
        print(f"| {name} | {med:.3f} | {lo:.3f} | {hi:.3f} | {threads} | {policy} |")
    ratio = rows["beside a spin loop"][0] / rows["alone"][0]
    print(f"ratio (beside / alone, medians): {ratio:.2f}x (target <= 2.2x)")


if __name__ == "__main__":
    main()
