"""HTTP serving: ``python -m detailflow_engine.serve`` (FastAPI on uvicorn), or ``--ray`` (Ray Serve).

    python -m detailflow_engine.serve                                  # default model, 127.0.0.1:8000
    python -m detailflow_engine.serve --ckpt PRIOR --tokenizer TOK --device cuda --dtype bf16 --port 8080
    python -m detailflow_engine.serve --ray --replicas 4 [--ray-address ADDR]

One pipeline and one DetailFlowBatcher per process (per Ray replica); the HTTP contract is in
``serve_app``. SIGINT / SIGTERM: the requests in flight finish, the worker stops, exit 0. Needs the
[serve] extra (fastapi, uvicorn, ray[serve]); without it: one ``error:`` line, exit 2. Bad flags:
one ``error:`` line, exit 2 (as ``generate``).
"""
from __future__ import annotations

import importlib
import math
import sys
from typing import List, Optional

from detailflow_engine import cli
from detailflow_engine.cli import Parser, UsageError, load_pipeline
from detailflow_engine.device_dtype import DEVICES, DTYPES, WEIGHT_MODES, WEIGHTS_HELP

EXTRA_HINT = 'pip install -e ".[serve]"'


def build_parser():
    p = Parser(prog="python -m detailflow_engine.serve",
               description="Serve DetailFlow images over HTTP (POST /v1/generate, GET /healthz, GET /metrics).")
    m = p.add_argument_group("model (both or neither; neither = the embedded default model)")
    m.add_argument("--ckpt", metavar="PATH|REPO", help="prior: model folder, .pt or .safetensors, or a Hub repo id")
    m.add_argument("--tokenizer", metavar="PATH|REPO", help="tokenizer: model folder, .pt or .safetensors, or a Hub repo id")
    m.add_argument("--device", default="auto", choices=DEVICES, help="default: auto")
    m.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="default: fp32")
    m.add_argument("--weights", default="native", choices=WEIGHT_MODES, help=WEIGHTS_HELP)
    m.add_argument("--no-cuda-graphs", action="store_true", help="on a GPU, run every decode step eagerly")
    s = p.add_argument_group("serving")
    s.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (0.0.0.0 for every interface)")
    s.add_argument("--port", type=int, default=8000, help="default: 8000")
    s.add_argument("--max-batch", type=int, default=16, help="the most images per batch (default: 16)")
    s.add_argument("--max-wait-ms", type=float, default=20.0,
                   help="how long a batch waits for company after its first request (default: 20; it must "
                        "cover a batch's answers going out and the next requests coming in, else batches split)")
    s.add_argument("--request-timeout", type=float, default=120.0, metavar="S",
                   help="a request unanswered after S seconds gets 504 (default: 120)")
    r = p.add_argument_group("Ray Serve")
    r.add_argument("--ray", action="store_true", help="deploy the same app with Ray Serve")
    r.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (default: 1)")
    r.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this Ray cluster (default: $RAY_ADDRESS, else start a local one)")
    r.add_argument("--ray-num-cpus", type=float, default=None, metavar="N",
                   help="a local Ray cluster's CPUs (default: all); ignored with --ray-address")
    r.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs per replica (default: 1)")
    return p


def check_args(args) -> None:
    if (args.ckpt is None) != (args.tokenizer is None):
        raise UsageError("--ckpt and --tokenizer go together: give both, or neither for the embedded default model")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if args.max_batch < 1:
        raise UsageError(f"--max-batch must be >= 1, got {args.max_batch}")
    if not 0 <= args.max_wait_ms <= 60_000:
        raise UsageError(f"--max-wait-ms must be in [0, 60000], got {args.max_wait_ms}")
    if not 0 < args.request_timeout < math.inf:
        raise UsageError(f"--request-timeout must be a positive number of seconds, got {args.request_timeout}")
    if args.replicas < 1:
        raise UsageError(f"--replicas must be >= 1, got {args.replicas}")
    if args.replicas != 1 and not args.ray:
        raise UsageError("--replicas needs --ray (one process serves one pipeline)")
    if args.ray_num_cpus is not None and not args.ray_num_cpus > 0:
        raise UsageError(f"--ray-num-cpus must be > 0, got {args.ray_num_cpus}")
    if not args.cpus_per_replica >= 0:
        raise UsageError(f"--cpus-per-replica must be >= 0, got {args.cpus_per_replica}")


def check_extra(ray: bool) -> None:
    need = ["fastapi", "uvicorn"] + (["ray.serve"] if ray else [])
    missing = []
    for name in need:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append("ray[serve]" if name == "ray.serve" else name)
    if missing:
        raise UsageError(f"serving needs {', '.join(missing)} (the [serve] extra): {EXTRA_HINT}")


def model_config(args) -> dict:
    """The flags a replica needs to load the same model (plain data: it travels to Ray replicas)."""
    return {"ckpt": args.ckpt, "tokenizer": args.tokenizer, "device": args.device, "dtype": args.dtype,
            "weights": args.weights, "no_cuda_graphs": args.no_cuda_graphs, "max_batch": args.max_batch,
            "max_wait_ms": args.max_wait_ms, "request_timeout": args.request_timeout}


def load_state(config: dict):
    """config (model_config) -> ServeState: the pipeline (UsageError on a loading problem) and its batcher."""
    import argparse

    from detailflow_engine.serve_app import ServeState

    ns = argparse.Namespace(**{k: config.get(k) for k in ("ckpt", "tokenizer", "device", "dtype", "weights")})
    ns.device = ns.device or "auto"
    ns.dtype = ns.dtype or "fp32"
    ns.weights = ns.weights or "native"
    ns.no_cuda_graphs = bool(config.get("no_cuda_graphs", False))
    pipe, prior_path, tok_path = load_pipeline(ns, encoder=False)  # generation only: no encoder held
    info = {"dtype": ns.dtype, "weights": ns.weights, "prior": str(prior_path), "tokenizer": str(tok_path)}
    return ServeState.create(pipe, max_batch=int(config.get("max_batch") or 16),
                             max_wait_ms=float(config.get("max_wait_ms", 20.0)), info=info,
                             timeout_s=float(config.get("request_timeout") or 120.0))


def _uvicorn_server(config):
    """uvicorn.Server whose SIGINT/SIGTERM stop it gracefully and are not re-raised afterwards (uvicorn
    re-raises them once it stops, which would end the process with the signal instead of exit 0)."""
    import contextlib
    import signal
    import threading

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    return Server(config)


def serve_http(args) -> int:
    import uvicorn

    from detailflow_engine.serve_app import create_app

    state = load_state(model_config(args))
    app = create_app(lambda: state)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=10, lifespan="off")
    server = _uvicorn_server(config)
    print(f"serving {state.info['prior']} on http://{args.host}:{args.port} "
          f"(device {state.pipeline.device}, {args.dtype}; POST /v1/generate, GET /healthz, GET /metrics)",
          file=sys.stderr, flush=True)
    try:
        server.run()  # uvicorn handles SIGINT/SIGTERM: stop accepting, finish the requests in flight
    finally:
        state.close(timeout=30)
    if not server.started:
        print(f"error: could not listen on {args.host}:{args.port}", file=sys.stderr)
        return 1
    print("stopped", file=sys.stderr, flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return cli.run(_main, argv)


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    check_extra(args.ray)
    if args.ray:
        from detailflow_engine.serve_ray import serve_ray

        return serve_ray(args)
    return serve_http(args)


if __name__ == "__main__":
    sys.exit(main())
