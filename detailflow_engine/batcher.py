"""DetailFlowBatcher: collect concurrent requests for a few milliseconds, run them as one batch.

A service calls ``submit`` (or the blocking ``generate``) from many threads; one worker thread
takes the queued requests, waits up to ``max_wait_ms`` for more (or until ``max_batch`` images
are queued), groups requests whose sampling settings are identical, runs each group through
``pipeline.generate`` as one batch, and hands every request its own slice of the result.

Why batching cannot change an image: the pipeline keys every random draw by (image seed, token
position), and a request's seeds are expanded exactly as a lone ``pipeline.generate`` call
expands them (int seed s -> s, s + 1, ...; a list -> one seed per image). So a request gets the
same images as ``pipeline.generate(labels, seed=seeds, **settings)`` alone.

    with DetailFlowBatcher(pipe) as batcher:           # in a web handler, from any thread:
        result = batcher.generate([207], seed=42)        # GenerationResult of this request only
        fut = batcher.submit([1, 2], seed=[5, 9], cfg_scale=2.0)   # concurrent.futures.Future
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from detailflow_engine.pipeline import DetailFlowPipeline, GenerationResult
from detailflow_engine.sampling_settings import SETTING_NAMES, SamplingSettings, checked_labels, label_list, seed_list

# The longest gathering wait: beyond a minute a request would rather time out than wait for
# company, and threading.Condition.wait overflows on huge or infinite timeouts.
MAX_WAIT_MS = 60_000.0


class BatcherClosed(RuntimeError):
    """submit() after close(), or a request still queued when close(cancel_pending=True) ran."""


class BatcherDied(RuntimeError):
    """The worker thread died (a bug or a fatal error): every pending and later request fails with this."""


class _RequestFuture(Future):
    """A request's Future whose blocking waits refuse to deadlock: waiting for it on the batcher's own
    worker thread (e.g. in a done-callback), or on a thread inside a generation of the batcher's
    pipeline (e.g. in a ``pipeline.generate`` callback: the worker needs that pipeline), raises
    RuntimeError at once instead of waiting forever."""

    def __init__(self, batcher: Optional["DetailFlowBatcher"] = None):
        super().__init__()
        self._batcher = batcher

    def _check_wait(self) -> None:
        b = self._batcher
        if b is None or self.done():
            return
        if threading.current_thread() is b._worker:
            raise RuntimeError("waiting for a batcher request on the batcher's own worker thread (e.g. in a "
                               "future's done-callback) would wait forever: the worker runs the requests")
        held = getattr(b.pipeline, "held_by_current_thread", None)
        if held is not None and held():
            raise RuntimeError("waiting for a batcher request inside a generation of the batcher's pipeline "
                               "(e.g. from a pipeline.generate callback) would wait forever: the batcher's "
                               "worker needs that pipeline; wait after the generation returns")

    def result(self, timeout=None):
        self._check_wait()
        return super().result(timeout)

    def exception(self, timeout=None):
        self._check_wait()
        return super().exception(timeout)


@dataclass
class _Request:
    labels: List[int]
    seeds: List[int]
    settings: SamplingSettings  # requests batch together only when these are equal
    future: Future = field(default_factory=Future)


def request_settings(settings: dict, pipe: DetailFlowPipeline) -> SamplingSettings:
    """A request's settings -> SamplingSettings with num_tokens resolved against the model (None and
    block_size are the same request, so they batch together); bad values raise as in pipeline.generate."""
    unknown = sorted(set(settings) - set(SETTING_NAMES))
    if unknown:
        raise TypeError(f"unknown setting(s) {unknown}; the batcher takes {sorted(SETTING_NAMES)} "
                        f"(no callback: previews are per-call, use pipeline.generate)")
    s = SamplingSettings(**settings)
    return s.with_num_tokens(pipe.prior.config.generation_plan(s.num_tokens)[-1].stop)


class DetailFlowBatcher:
    """Micro-batching front end of a :class:`DetailFlowPipeline` (thread-safe).

    Args:
        pipeline: the pipeline to run (it may also be called directly from other threads).
        max_batch: the most images per batch; a request with more images runs alone in one batch.
        max_wait_ms: how long the worker waits for more requests after the first one arrives.
    """

    def __init__(self, pipeline: DetailFlowPipeline, max_batch: int = 16, max_wait_ms: float = 5.0):
        if pipeline.tokenizer is None:
            raise ValueError("the batcher needs a pipeline with a tokenizer (it returns images)")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if (isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float, np.integer, np.floating))
                or not 0 <= max_wait_ms <= MAX_WAIT_MS):
            raise ValueError(f"max_wait_ms must be a number in [0, {MAX_WAIT_MS:g}], got {max_wait_ms!r}")
        self.pipeline, self.max_batch, self.max_wait = pipeline, max_batch, float(max_wait_ms) / 1000.0
        self._queue: List[_Request] = []
        self._cond = threading.Condition()
        self._closed = False
        self._died: Optional[BaseException] = None  # set once, by the dying worker
        self._in_flight: List[_Request] = []  # taken from the queue, not yet answered
        self.batches_run = 0  # statistics: batches run and images generated
        self.images_run = 0
        # optional observer of every batch run: on_batch(images, seconds) on the worker thread (a
        # server's metrics); an exception in it is ignored, it never fails a request
        self.on_batch: Optional[Callable[[int, float], None]] = None
        self._worker = threading.Thread(target=self._loop, name="DetailFlowBatcher", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ client side

    def submit(self, labels, seed: Union[int, Sequence[int]] = 0, **settings) -> Future:
        """Queue a request -> Future of its :class:`GenerationResult` (images in request order).

        ``labels`` and ``seed`` as in ``pipeline.generate`` (int seed s: image i uses s + i);
        settings: cfg_scale, temperature, top_k, top_p, gradual_cfg, num_tokens. Bad input fails
        this request's future (ValueError/TypeError), never anyone else's.
        """
        fut: Future = _RequestFuture(self)
        try:
            key = request_settings(settings, self.pipeline)  # the batching key
            labs = checked_labels(label_list(labels), self.pipeline.prior.config.num_classes)
            seeds = seed_list(seed, len(labs))  # ints within int64, or a ValueError naming the seed
        except Exception as e:  # noqa: BLE001 - bad input belongs to this request's future
            fut.set_exception(e)
            return fut
        req = _Request(labs, seeds, key, fut)
        with self._cond:
            if self._died is not None:
                fut.set_exception(self._death_error())
                return fut
            if self._closed:
                fut.set_exception(BatcherClosed("the batcher is closed"))
                return fut
            self._queue.append(req)
            self._cond.notify_all()
        return fut

    def generate(self, labels, seed: Union[int, Sequence[int]] = 0, timeout: Optional[float] = None,
                 **settings) -> GenerationResult:
        """Blocking submit: the request's GenerationResult (raises what the request raised)."""
        return self.submit(labels, seed=seed, **settings).result(timeout)

    def close(self, cancel_pending: bool = False, timeout: Optional[float] = None) -> None:
        """Stop accepting requests; finish the queued ones (or fail them with BatcherClosed), join."""
        with self._cond:
            self._closed = True
            if cancel_pending:
                for req in self._queue:
                    req.future.set_exception(BatcherClosed("the batcher was closed before this request ran"))
                self._queue.clear()
            self._cond.notify_all()
        if threading.current_thread() is self._worker:
            return
        held = getattr(self.pipeline, "held_by_current_thread", None)
        if held is not None and held() and self._worker.is_alive():
            raise RuntimeError("the batcher is closed, but close() inside a generation of its pipeline cannot "
                               "wait for the worker (it needs that pipeline): the queued requests finish once "
                               "the generation returns")
        self._worker.join(timeout)

    def __enter__(self) -> "DetailFlowBatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ worker side

    def _take(self) -> Optional[List[_Request]]:
        """Block for the first request, then gather for max_wait or until max_batch images are queued."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None  # closed and drained
            deadline = time.monotonic() + self.max_wait
            while not self._closed and sum(len(r.labels) for r in self._queue) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            taken = self._queue
            self._queue = []
            self._in_flight = list(taken)
            return taken

    def _death_error(self) -> BatcherDied:
        e = self._died
        return BatcherDied(f"the batcher's worker thread died ({type(e).__name__}: {e}); "
                           f"create a new DetailFlowBatcher")

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # noqa: BLE001 - whatever killed the worker, nobody may hang on it
            with self._cond:
                self._died = e
                pending = self._in_flight + self._queue
                self._in_flight, self._queue = [], []
            for r in pending:
                if not r.future.done():
                    err = self._death_error()
                    err.__cause__ = e  # the worker's own traceback stays reachable from every future
                    r.future.set_exception(err)

    def _serve(self) -> None:
        while True:
            reqs = self._take()
            if reqs is None:
                return
            groups: Dict[SamplingSettings, List[_Request]] = {}
            for r in reqs:
                if r.future.set_running_or_notify_cancel():  # skip requests the caller cancelled
                    groups.setdefault(r.settings, []).append(r)
            for key, group in groups.items():
                for batch in self._pack(group):
                    self._run(key, batch)

    def _pack(self, group: List[_Request]) -> List[List[_Request]]:
        """Split a settings group into batches of at most max_batch images (in arrival order)."""
        batches, cur, n = [], [], 0
        for r in group:
            if cur and n + len(r.labels) > self.max_batch:
                batches.append(cur)
                cur, n = [], 0
            cur.append(r)
            n += len(r.labels)
        if cur:
            batches.append(cur)
        return batches

    def _run(self, key: SamplingSettings, batch: List[_Request]) -> None:
        labels = [lab for r in batch for lab in r.labels]
        seeds = [s for r in batch for s in r.seeds]
        t0 = time.perf_counter()
        try:
            result = self.pipeline.generate(labels, seed=seeds, **key.kwargs())
        except Exception as e:  # noqa: BLE001 - the worker must survive any request
            if len(batch) > 1:
                for r in batch:  # rerun alone: the failure lands only on the request that causes it
                    self._run(key, [r])
                return
            batch[0].future.set_exception(e)
            return
        self.batches_run += 1
        self.images_run += len(labels)
        if self.on_batch is not None:
            try:
                self.on_batch(len(labels), time.perf_counter() - t0)
            except Exception:  # noqa: BLE001 - an observer never fails the batch
                pass
        k = 0
        for r in batch:
            n = len(r.labels)
            r.future.set_result(GenerationResult(tokens=result.tokens[k:k + n].clone(),
                                                 pixels=result.pixels[k:k + n].clone(),
                                                 seeds=list(r.seeds), labels=list(r.labels)))
            k += n


__all__ = ["DetailFlowBatcher", "BatcherClosed", "BatcherDied", "MAX_WAIT_MS", "request_settings"]
