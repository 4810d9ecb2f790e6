"""Serving throughput and latency: the direct batcher, HTTP mode, Ray mode with 1 and 2 replicas.

Closed loop: C client threads each send one-image requests back to back (class i % 10, its own
seed) for --seconds after a warm-up; throughput = answered requests / seconds, p50/p99 of each
request's wall time. Direct: DetailFlowBatcher.generate in this process. HTTP / Ray: the server
(python -m detailflow_engine.serve [--ray --replicas N]) in a subprocess on a free loopback port,
the clients here on keep-alive connections (so they share the machine's cores with the server,
as a co-located client would). Default model, CPU.

    python benchmarks/bench_serve.py                                   # every mode, C = 1 4 16 64
    python benchmarks/bench_serve.py --modes direct http --concurrency 16 --seconds 5
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import threading
import time
from pathlib import Path



def serve_util_server():
    """tests/serve_util.Server (the tests' server launcher; tests/ is not a package), loaded from its file."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tests" / "serve_util.py"
    spec = importlib.util.spec_from_file_location("serve_util", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Server


def run_load(call, concurrency: int, seconds: float, warmup_s: float):
    """C threads calling call(thread, i) back to back -> (requests/s, p50 ms, p99 ms, errors) of the
    answers that land in [warm-up end, warm-up end + seconds]."""
    lat, errors, lock = [], [0], threading.Lock()
    t_start = time.monotonic() + warmup_s
    t_end = t_start + seconds

    def worker(t):
        i = 0
        while True:
            t0 = time.monotonic()
            if t0 >= t_end:
                return
            ok = call(t, i)
            t1 = time.monotonic()
            i += 1
            if t_start <= t1 <= t_end:  # every answer that lands in the window (a closed loop's rounds
                # at high concurrency outlast a request, so "started and ended inside" would undercount)
                with lock:
                    if ok:
                        lat.append(t1 - t0)
                    else:
                        errors[0] += 1

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(seconds + warmup_s + 120)
    if not lat:
        return 0.0, float("nan"), float("nan"), errors[0]
    lat.sort()
    p99 = lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]
    return len(lat) / seconds, statistics.median(lat) * 1e3, p99 * 1e3, errors[0]


def http_caller(port: int):
    conns = {}
    body = [json.dumps({"class_label": i % 10, "seed": 1000 + i}).encode() for i in range(10_000)]

    def call(t, i):
        conn = conns.get(t)
        if conn is None:
            conn = conns[t] = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            conn.request("POST", "/v1/generate", body=body[(t * 997 + i) % len(body)],
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            return r.status == 200
        except OSError:
            conn.close()
            conns.pop(t, None)
            return False

    return call


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=["direct", "http", "ray1", "ray2"],
                   choices=["direct", "http", "ray1", "ray2"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per cell (default: 8)")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server / each replica")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=20.0, help="both modes (default: 20, as serve)")
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args()

    rows = []
    for mode in a.modes:
        if mode == "direct":
            # as the server process: the engine's threading policy before torch loads, same threads
            os.environ["OMP_NUM_THREADS"] = str(a.threads)
            from detailflow_engine import DetailFlowBatcher
            from detailflow_engine.pipeline import DetailFlowPipeline

            import torch

            torch.set_num_threads(a.threads)
            pipe = DetailFlowPipeline.from_pretrained(device="cpu")
            batcher = DetailFlowBatcher(pipe, max_batch=a.max_batch, max_wait_ms=a.max_wait_ms)

            def call(t, i):
                batcher.generate([(t + i) % 10], seed=[1000 + t * 997 + i], timeout=120)
                return True

            server, caller = None, call
        else:
            Server = serve_util_server()
            extra = [] if mode == "http" else ["--ray", "--replicas", mode[-1], "--ray-num-cpus", "2"]
            server = Server("--device", "cpu", "--max-batch", str(a.max_batch), "--max-wait-ms",
                            str(a.max_wait_ms), *extra, env={"OMP_NUM_THREADS": str(a.threads),
                                                             "RAY_USAGE_STATS_ENABLED": "0"},
                            drop_env=("RAY_ADDRESS",), ready_s=180)
            caller = http_caller(server.port)
        try:
            for c in a.concurrency:
                rps, p50, p99, err = run_load(caller, c, a.seconds, a.warmup)
                row = {"mode": mode, "concurrency": c, "images_per_s": round(rps, 1), "p50_ms": round(p50, 1),
                       "p99_ms": round(p99, 1), "errors": err}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            if server is not None:
                server.close()
            else:
                batcher.close()

    names = {"direct": "direct batcher", "http": "HTTP (uvicorn)", "ray1": "Ray Serve, 1 replica",
             "ray2": "Ray Serve, 2 replicas"}
    print("\n| mode | concurrency | images/s | p50 ms | p99 ms | vs direct |\n|---|---:|---:|---:|---:|---:|")
    direct = {r["concurrency"]: r["images_per_s"] for r in rows if r["mode"] == "direct"}
    for r in rows:
        rel = f"{r['images_per_s'] / direct[r['concurrency']]:.0%}" if direct.get(r["concurrency"]) else "-"
        print(f"| {names[r['mode']]} | {r['concurrency']} | {r['images_per_s']:.1f} | {r['p50_ms']:.1f} | "
              f"{r['p99_ms']:.1f} | {rel} |" + (f" ({r['errors']} errors)" if r["errors"] else ""))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
