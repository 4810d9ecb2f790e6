"""Ray Serve mode: the same FastAPI app (serve_app) as a Serve deployment, N replicas.

Each replica holds one pipeline and one DetailFlowBatcher (num_gpus=1 per replica on CUDA). Used
by ``python -m detailflow_engine.serve --ray --replicas N [--ray-address ADDR]``, and by Ray's
own tools (a KubeRay RayService runs the same thing from a Serve config file):

    serve run detailflow_engine.serve_ray:app                                   # the default model
    serve run detailflow_engine.serve_ray:build_app ckpt=PRIOR tokenizer=TOK device=cuda dtype=bf16 replicas=4

Needs the [serve] extra (ray[serve], fastapi, uvicorn).
"""
import logging
import os
import signal
import sys
import threading
from typing import Optional

from fastapi import Request
from ray import serve

from detailflow_engine import serve_app

APP_NAME = "detailflow"
fastapi_app = serve_app.base_app()


@serve.deployment(name="DetailFlow", max_ongoing_requests=64, health_check_period_s=5,
                  health_check_timeout_s=30, graceful_shutdown_timeout_s=20, graceful_shutdown_wait_loop_s=1)
@serve.ingress(fastapi_app)
class DetailFlowDeployment:
    """One replica: loads the model named by ``config`` (serve.model_config) and serves the HTTP contract."""

    def __init__(self, config: Optional[dict] = None):
        from detailflow_engine.cli import UsageError
        from detailflow_engine.serve import load_state

        self.state = None
        try:
            self.state = load_state(dict(config or {}))
        except UsageError as e:  # one line in the Serve logs and the deploy error, no traceback
            raise RuntimeError(f"cannot start a DetailFlow replica: {e}") from None

    @fastapi_app.post("/v1/generate")
    async def generate(self, request: Request):
        return await serve_app.handle_generate(self.state, request)

    @fastapi_app.get("/healthz")
    async def healthz(self):
        return serve_app.handle_healthz(self.state)

    @fastapi_app.get("/metrics")
    async def metrics(self):
        return serve_app.handle_metrics(self.state)

    def check_health(self) -> None:  # Serve replaces a replica whose batcher died
        if self.state is None or self.state.batcher._died is not None:
            raise RuntimeError("the replica's batcher worker died")

    def __del__(self):
        state = getattr(self, "state", None)
        if state is not None:
            state.close(timeout=10)


_INT_KEYS = ("max_batch", "replicas")
_FLOAT_KEYS = ("max_wait_ms", "request_timeout", "cpus_per_replica", "num_gpus")


def _config_from_args(args: dict) -> dict:
    """`serve run ...:build_app key=value` / a config file's args (strings or values) -> typed config."""
    out = {}
    for k, v in (args or {}).items():
        if k in _INT_KEYS:
            v = int(v)
        elif k in _FLOAT_KEYS:
            v = float(v)
        elif k == "no_cuda_graphs":
            v = v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")
        out[k] = v
    return out


def deployment(config: dict, replicas: int = 1, cpus_per_replica: float = 1.0, num_gpus: Optional[float] = None):
    """The bound Serve application: ``replicas`` replicas of the model named by ``config``."""
    if num_gpus is None:
        num_gpus = 1.0 if config.get("device") == "cuda" else 0.0
    opts = {"num_cpus": cpus_per_replica}
    if num_gpus:
        opts["num_gpus"] = num_gpus
    return DetailFlowDeployment.options(num_replicas=replicas, ray_actor_options=opts).bind(config)


def build_app(args: Optional[dict] = None):
    """Serve application builder (``serve run detailflow_engine.serve_ray:build_app key=value ...``).

    Keys: ckpt, tokenizer, device, dtype, weights, max_batch, max_wait_ms, request_timeout,
    no_cuda_graphs, replicas, cpus_per_replica, num_gpus (default: 1 when device=cuda)."""
    cfg = _config_from_args(args or {})
    replicas = cfg.pop("replicas", 1)
    cpus = cfg.pop("cpus_per_replica", 1.0)
    gpus = cfg.pop("num_gpus", None)
    return deployment(cfg, replicas=replicas, cpus_per_replica=cpus, num_gpus=gpus)


app = build_app({})  # `serve run detailflow_engine.serve_ray:app`: one replica of the default model


def serve_ray(args) -> int:
    """The CLI's --ray mode: join (or start) a Ray cluster, deploy, serve until SIGINT/SIGTERM."""
    import ray

    from detailflow_engine.serve import model_config

    stop = threading.Event()

    def on_signal(sig, frame):
        stop.set()

    old = {}
    address = args.ray_address or os.environ.get("RAY_ADDRESS") or None
    init = {"include_dashboard": False, "logging_level": logging.WARNING}
    if address is None and args.ray_num_cpus is not None:
        init["num_cpus"] = args.ray_num_cpus
    try:
        ray.init(address=address, **init)
        # after ray.init, which installs its own handlers: a signal stops the loop below, then Serve
        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        config = model_config(args)
        gpus = None
        if args.device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1:
            gpus = 1.0  # replicas resolve "auto" to their GPU
        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            serve.run(deployment(config, replicas=args.replicas, cpus_per_replica=args.cpus_per_replica,
                                 num_gpus=gpus), name=APP_NAME, route_prefix="/", blocking=False)
        except Exception as e:  # noqa: BLE001 - a replica that cannot load the model
            msg = " ".join(str(e).split())[-600:]
            print(f"error: the Ray Serve deployment failed: {msg}", file=sys.stderr)
            return 1
        where = address or "a local Ray cluster"
        print(f"serving on http://{args.host}:{args.port} with Ray Serve ({args.replicas} replica(s) on {where}; "
              f"POST /v1/generate, GET /healthz, GET /metrics)", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
        return 0
    finally:
        for s, h in old.items():  # a second signal during shutdown ends the process the usual way
            signal.signal(s, h)
        try:
            if ray.is_initialized():
                try:
                    serve.shutdown()
                finally:
                    ray.shutdown()  # a local cluster that ray.init started stops with it
        except Exception as e:  # noqa: BLE001
            print(f"warning: Ray shutdown: {e}", file=sys.stderr)
        print("stopped", file=sys.stderr, flush=True)
