"""The HTTP contract of ``python -m detailflow_engine.serve`` (uvicorn) and its Ray Serve mode.

One FastAPI app factory serves both: ``create_app(get_state)`` where ``get_state()`` returns the
process's (or the Ray replica's) :class:`ServeState`: one pipeline, one DetailFlowBatcher, and the
metrics.

    POST /v1/generate   {"class_label": 3, "seed": 7, "cfg_scale": 1.45, ...}
                        -> 200 image/png (or JSON with the base64 PNG and tokens when
                           Accept: application/json); 4xx JSON {"error": "..."} for a bad body
    GET  /healthz       -> model (classes, tokens, image size), device, dtype, weights
    GET  /metrics       -> Prometheus text: requests by status, batch sizes, latency, queue depth

The image is exactly ``DetailFlowPipeline.generate([class_label], seed=[seed], **settings)``: the
batcher groups requests by settings, and the engine is batch-invariant, so company in a batch
never changes a row. Handlers never block the event loop: they await the batcher's Future.

fastapi is imported here (the [serve] extra); the base package never imports this module.
"""


import asyncio
import base64
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from detailflow_engine.batcher import BatcherClosed, BatcherDied, DetailFlowBatcher, request_settings
from detailflow_engine.outputs import png_bytes
from detailflow_engine.pipeline import DetailFlowPipeline
from detailflow_engine.sampling_settings import INT64, SETTING_NAMES, SettingsError

MAX_BODY_BYTES = 16 * 1024  # a generate body is ~200 bytes; anything past this is refused with 413
DEFAULT_TIMEOUT_S = 120.0  # a request still unanswered after this gets 504 (the batcher keeps running)
FIELDS = ("class_label", "seed") + SETTING_NAMES

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class BadRequest(Exception):
    def __init__(self, status: int, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


class _Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total, self.sum = 0, 0.0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.total += 1
        self.sum += v

    def lines(self, name: str) -> List[str]:
        out = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.total}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.total}"]
        return out


class Metrics:
    """Prometheus counters of one process (thread-safe; the batcher's worker observes batches)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Dict[str, int] = {}
        self.latency = _Histogram(LATENCY_BUCKETS)
        self.batch_size = _Histogram(BATCH_BUCKETS)
        self.batch_seconds = _Histogram(LATENCY_BUCKETS)
        self.in_flight = 0

    def request_done(self, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[str(status)] = self.requests.get(str(status), 0) + 1
            self.latency.observe(seconds)

    def batch_done(self, images: int, seconds: float) -> None:
        with self._lock:
            self.batch_size.observe(images)
            self.batch_seconds.observe(seconds)

    def text(self, queued: int) -> str:
        with self._lock:
            lines = ["# HELP detailflow_requests_total POST /v1/generate requests answered, by HTTP status",
                     "# TYPE detailflow_requests_total counter"]
            lines += [f'detailflow_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
            lines += ["# HELP detailflow_request_latency_seconds POST /v1/generate time from body to answer",
                      "# TYPE detailflow_request_latency_seconds histogram"]
            lines += self.latency.lines("detailflow_request_latency_seconds")
            lines += ["# HELP detailflow_batch_size images per batch the batcher ran",
                      "# TYPE detailflow_batch_size histogram"]
            lines += self.batch_size.lines("detailflow_batch_size")
            lines += ["# HELP detailflow_batch_seconds time of one batch's pipeline.generate",
                      "# TYPE detailflow_batch_seconds histogram"]
            lines += self.batch_seconds.lines("detailflow_batch_seconds")
            lines += ["# HELP detailflow_queue_depth requests admitted and not yet answered",
                      "# TYPE detailflow_queue_depth gauge", f"detailflow_queue_depth {self.in_flight}",
                      "# HELP detailflow_batcher_queued requests waiting in the batcher for a batch",
                      "# TYPE detailflow_batcher_queued gauge", f"detailflow_batcher_queued {queued}"]
        return "\n".join(lines) + "\n"


@dataclass
class ServeState:
    """What one serving process (or Ray replica) holds: one pipeline, one batcher, its metrics."""

    pipeline: DetailFlowPipeline
    batcher: DetailFlowBatcher
    info: dict  # device, dtype, weights, model paths: reported by /healthz
    metrics: Metrics = field(default_factory=Metrics)
    timeout_s: float = DEFAULT_TIMEOUT_S

    @classmethod
    def create(cls, pipeline: DetailFlowPipeline, max_batch: int = 16, max_wait_ms: float = 5.0,
               info: Optional[dict] = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> "ServeState":
        batcher = DetailFlowBatcher(pipeline, max_batch=max_batch, max_wait_ms=max_wait_ms)
        state = cls(pipeline, batcher, dict(info or {}), timeout_s=timeout_s)
        batcher.on_batch = state.metrics.batch_done
        return state

    def health(self) -> dict:
        pc, tok = self.pipeline.prior.config, self.pipeline.tokenizer
        return {"status": "ok",
                "model": {"num_classes": pc.num_classes, "num_tokens": pc.block_size,
                          "image_size": tok.image_size, "group_size": pc.group_size},
                "device": str(self.pipeline.device), "dtype": self.info.get("dtype"),
                "weights": self.info.get("weights", "native"),
                "max_batch": self.batcher.max_batch, "max_wait_ms": self.batcher.max_wait * 1000.0,
                **{k: v for k, v in self.info.items() if k not in ("dtype", "weights")}}

    def close(self, timeout: Optional[float] = 30.0) -> None:
        self.batcher.close(timeout=timeout)


# ---------------------------------------------------------------------- request body

def _type_name(v) -> str:
    return {bool: "a bool", int: "an int", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def parse_body(raw: bytes) -> dict:
    """JSON body -> {"class_label", "seed", settings...}: one int label and one int64 seed checked here
    (a request is one image); the settings as given, checked by SamplingSettings in ``submit``."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(400, f"the body is not JSON ({e}); send an object like "
                              f'{{"class_label": 3, "seed": 0}}') from None
    if not isinstance(body, dict):
        raise BadRequest(400, f"the body must be a JSON object, got {_type_name(body)}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise BadRequest(422, f"unknown field(s) {unknown}; the fields are {list(FIELDS)}", unknown[0])
    for name in ("class_label", "seed"):
        if name not in body:
            raise BadRequest(422, f"{name} is required (an int)", name)
    for name in ("class_label", "seed"):
        v = body[name]
        if not isinstance(v, int) or isinstance(v, bool):
            raise BadRequest(422, f"{name} must be an int, got {_type_name(v)} {json.dumps(v)[:60]}", name)
        if not INT64[0] <= v <= INT64[1]:
            raise BadRequest(422, f"{name} {v} does not fit in int64", name)
    return body


def _field(e: Exception) -> Optional[str]:
    """The request field a ValueError/TypeError is about (a SettingsError names it)."""
    if isinstance(e, SettingsError):
        return "class_label" if e.argument == "class_labels" else e.argument
    return _field_of(str(e))


def _field_of(message: str) -> Optional[str]:
    m = message.lower()
    if m.startswith("class label") or "class_labels" in m:
        return "class_label"
    for name in FIELDS:
        if m.startswith(name) or f"{name}=" in m or f"{name} " in m:
            return name
    return None


def settings_of(params: dict) -> dict:
    return {k: params[k] for k in SETTING_NAMES if k in params}


def submit(state: ServeState, params: dict):
    """-> (Future, the normalized settings); a bad value raises BadRequest(422) naming the field."""
    pipe = state.pipeline
    try:
        used = request_settings(settings_of(params), pipe).kwargs()
    except (ValueError, TypeError) as e:
        raise BadRequest(422, str(e), _field(e)) from None
    fut = state.batcher.submit([params["class_label"]], seed=[params["seed"]], **used)
    if fut.done() and isinstance(fut.exception(), (ValueError, TypeError)):
        raise BadRequest(422, str(fut.exception()), _field(fut.exception()))
    return fut, used


# ---------------------------------------------------------------------- the app

def error(status: int, message: str, field_name: Optional[str] = None):
    """The JSON error answer: {"error": message[, "field": name]}."""
    from fastapi.responses import JSONResponse

    body = {"error": message}
    if field_name:
        body["field"] = field_name
    return JSONResponse(body, status_code=status)


async def read_body(request, max_body_bytes: int = MAX_BODY_BYTES) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise BadRequest(400, f"bad Content-Length {length!r}") from None
        if n > max_body_bytes:
            raise BadRequest(413, f"the body is {n} bytes, more than the limit of {max_body_bytes}")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > max_body_bytes:
            raise BadRequest(413, f"the body is more than the limit of {max_body_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def handle_generate(state: ServeState, request, max_body_bytes: int = MAX_BODY_BYTES):
    """POST /v1/generate (the handler of both modes; it only awaits, never blocks the event loop)."""
    from fastapi.responses import JSONResponse, Response

    t0 = time.perf_counter()
    status = 500
    state.metrics.in_flight += 1
    try:
        try:
            params = parse_body(await read_body(request, max_body_bytes))
            fut, used = submit(state, params)
        except BadRequest as e:
            status = e.status
            return error(e.status, e.message, e.field)
        try:
            result = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), state.timeout_s)
        except asyncio.TimeoutError:
            status = 504
            return error(504, f"no image after {state.timeout_s:g} s (the server is overloaded); retry later")
        except (BatcherClosed, BatcherDied) as e:
            status = 503
            return error(503, f"the server is shutting down or its worker failed: {e}")
        except (ValueError, TypeError) as e:  # a check only the generation itself makes
            status = 422
            return error(422, str(e), _field(e))
        except Exception as e:  # noqa: BLE001
            status = 500
            return error(500, f"generation failed: {type(e).__name__}: {e}")
        image = result.uint8[0]
        png = png_bytes(image) if image.shape[0] <= 64 else await asyncio.to_thread(png_bytes, image)
        headers = {"X-DetailFlow-Class-Label": str(params["class_label"]),
                   "X-DetailFlow-Seed": str(params["seed"]),
                   "X-DetailFlow-Settings": json.dumps(used, separators=(",", ":")),
                   "X-DetailFlow-Image-Size": str(image.shape[0])}
        status = 200
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"class_label": params["class_label"], "seed": params["seed"],
                                 "settings": used, "image_size": int(image.shape[0]),
                                 "tokens": result.tokens[0].tolist(),
                                 "png_base64": base64.b64encode(png).decode("ascii")}, headers=headers)
        return Response(png, media_type="image/png", headers=headers)
    finally:
        state.metrics.in_flight -= 1
        state.metrics.request_done(status, time.perf_counter() - t0)


def handle_healthz(state: ServeState):
    from fastapi.responses import JSONResponse

    if state.batcher._died is not None:
        return error(503, "the batcher's worker died")
    return JSONResponse(state.health())


def handle_metrics(state: ServeState):
    from fastapi.responses import PlainTextResponse

    return PlainTextResponse(state.metrics.text(len(state.batcher._queue)), media_type="text/plain; version=0.0.4")


def base_app(lifespan=None):
    """A FastAPI app whose errors (404, 405, ...) are JSON {"error": ...} too; routes added by the caller."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="DetailFlow Engine", lifespan=lifespan)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return error(422, str(exc))

    return app


def create_app(get_state: Callable[[], ServeState], max_body_bytes: int = MAX_BODY_BYTES, lifespan=None):
    """The FastAPI app of the HTTP contract; ``get_state()`` -> this process's ServeState (the Ray
    deployment, serve_ray, routes the same handlers through its methods instead)."""
    from fastapi import Request

    app = base_app(lifespan)

    @app.post("/v1/generate")
    async def generate(request: Request):
        return await handle_generate(get_state(), request, max_body_bytes)

    @app.get("/healthz")
    async def healthz():
        return handle_healthz(get_state())

    @app.get("/metrics")
    async def metrics():
        return handle_metrics(get_state())

    return app


__all__ = ["create_app", "ServeState", "Metrics", "parse_body", "BadRequest", "MAX_BODY_BYTES"]
