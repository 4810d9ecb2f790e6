"""DetailFlowBatcher and a thread-safe pipeline: batched/concurrent requests get their lone-call images."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from detailflow_engine import DetailFlowBatcher
from detailflow_engine.batcher import BatcherClosed, BatcherDied
from conftest import in_thread


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe():
    from detailflow_engine.assets import default_model_paths
    from detailflow_engine.pipeline import DetailFlowPipeline

    try:
        default_model_paths()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return DetailFlowPipeline.from_pretrained(device="cpu")


# 16 requests: mixed sizes, int and list seeds, two settings groups (and one coarser num_tokens)
def _requests():
    reqs = []
    for i in range(16):
        labels = [(3 * i + j) % 10 for j in range(1 + i % 3)]
        seed = 1000 + 17 * i if i % 2 else [50 + i, 7 * i + 1, 99][:len(labels)]
        settings = {} if i % 4 else {"cfg_scale": 2.0, "top_k": 20}
        if i == 5:
            settings = {"num_tokens": 8}
        reqs.append((labels, seed, settings))
    return reqs


@pytest.fixture(scope="module")
def lone(pipe):
    """Each request's images from a lone pipeline.generate call (the oracle)."""
    return [pipe.generate(labels, seed=seed, **settings).uint8 for labels, seed, settings in _requests()]


def test_lone_calls_are_batch_independent(pipe, lone):
    """The premise: one batch of all images of a settings group equals the lone calls."""
    reqs = [(r, o) for r, o in zip(_requests(), lone) if not r[2]]
    labels = [lab for (labels, _, _), _ in reqs for lab in labels]
    seeds = [s for (labels, seed, _), _ in reqs
             for s in (seed if isinstance(seed, list) else [seed + j for j in range(len(labels))])]
    together = pipe.generate(labels, seed=seeds).uint8
    np.testing.assert_array_equal(together, np.concatenate([o for _, o in reqs]))


def test_16_threads_generate_and_batcher(pipe, lone):
    reqs = _requests()
    start = threading.Barrier(16)
    with DetailFlowBatcher(pipe, max_batch=8, max_wait_ms=20) as batcher:
        def call(i):
            labels, seed, settings = reqs[i]
            start.wait()  # all threads at once: requests really overlap
            if i % 2:  # half go straight to the (locked) pipeline, half through the batcher
                return pipe.generate(labels, seed=seed, **settings)
            return batcher.generate(labels, seed=seed, timeout=120, **settings)

        with ThreadPoolExecutor(16) as ex:
            results = list(ex.map(call, range(16)))
        assert batcher.batches_run < 8  # some requests did share a batch
    for (labels, seed, _), res, want in zip(reqs, results, lone):
        assert res.uint8.dtype == np.uint8
        np.testing.assert_array_equal(res.uint8, want)
        assert res.labels == labels and len(res.seeds) == len(labels)


def test_batcher_groups_and_splits(pipe, lone):
    reqs = _requests()
    with DetailFlowBatcher(pipe, max_batch=64, max_wait_ms=200) as batcher:
        futures = [batcher.submit(labels, seed=seed, **settings) for labels, seed, settings in reqs]
        results = [f.result(120) for f in futures]
        # three settings groups (defaults, cfg 2 + top-k 20, num_tokens 8), each one batch
        assert batcher.batches_run == 3
    for res, want in zip(results, lone):
        np.testing.assert_array_equal(res.uint8, want)
    assert results[5].pixels.shape[-1] == pipe.tokenizer.schedule.decode_size(8)


def test_bad_input_fails_only_its_request(pipe, lone):
    reqs = _requests()
    with DetailFlowBatcher(pipe, max_batch=64, max_wait_ms=100) as batcher:
        good = batcher.submit(reqs[1][0], seed=reqs[1][1])
        bad = [batcher.submit([3, 10]), batcher.submit([1], top_p=0), batcher.submit([1], num_tokens=7),
               batcher.submit([1, 2], seed=[1]), batcher.submit([1], callback=print),
               batcher.submit([1], cfg_scale="x"), batcher.submit([], seed=0)]
        good2 = batcher.submit(reqs[3][0], seed=reqs[3][1])
        np.testing.assert_array_equal(good.result(60).uint8, lone[1])
        np.testing.assert_array_equal(good2.result(60).uint8, lone[3])
        msgs = []
        for f in bad:
            with pytest.raises((ValueError, TypeError)) as ei:
                f.result(60)
            msgs.append(str(ei.value))
    assert "class label 10" in msgs[0] and "top_p" in msgs[1] and "num_tokens=7" in msgs[2]
    assert "seed" in msgs[3] and "callback" in msgs[4] and "cfg_scale" in msgs[5] and "empty" in msgs[6]


def test_runtime_failure_reaches_the_right_future(pipe, lone, monkeypatch):
    """An exception inside a batch run is retried per request: only the culprit's future fails."""
    real = type(pipe).generate

    def flaky(self, labels, **kw):
        if 7 in list(labels):
            raise RuntimeError("boom on class 7")
        return real(self, labels, **kw)

    monkeypatch.setattr(type(pipe), "generate", flaky)
    reqs = _requests()
    with DetailFlowBatcher(pipe, max_batch=64, max_wait_ms=100) as batcher:
        ok = batcher.submit(reqs[1][0], seed=reqs[1][1])
        boom = batcher.submit([7, 1], seed=3)
        with pytest.raises(RuntimeError, match="boom on class 7"):
            boom.result(60)
        np.testing.assert_array_equal(ok.result(60).uint8, lone[1])


def test_close_drains_then_refuses(pipe, lone):
    reqs = _requests()
    batcher = DetailFlowBatcher(pipe, max_wait_ms=1000)
    fut = batcher.submit(reqs[1][0], seed=reqs[1][1])
    t0 = time.monotonic()
    batcher.close()  # wakes the worker early: the queued request still runs
    assert time.monotonic() - t0 < 30
    np.testing.assert_array_equal(fut.result(0).uint8, lone[1])
    with pytest.raises(BatcherClosed):
        batcher.submit([1]).result(0)
    assert not batcher._worker.is_alive()

    b2 = DetailFlowBatcher(pipe, max_wait_ms=10_000)
    f2 = b2.submit([1, 2], seed=0)
    b2.close(cancel_pending=True)
    with pytest.raises(BatcherClosed):
        f2.result(30)  # cancelled before it ran (or, if the worker had taken it, a result)


def test_constructor_checks(pipe):
    for kw in ({"max_batch": 0}, {"max_batch": 2.5}, {"max_wait_ms": -1}):
        with pytest.raises(ValueError):
            DetailFlowBatcher(pipe, **kw)
    # an infinite or huge wait used to kill the worker (OverflowError in Condition.wait) and
    # leave every request hanging: refused up front, naming the setting
    for bad in (float("inf"), 1e16, float("nan"), "5", None, True):
        with pytest.raises(ValueError, match="max_wait_ms"):
            DetailFlowBatcher(pipe, max_wait_ms=bad)


def test_worker_death_fails_pending_and_later_requests(pipe):
    """If the worker thread dies, nobody waits forever: queued and later requests fail at once."""
    batcher = DetailFlowBatcher(pipe, max_batch=4, max_wait_ms=50)

    def boom(group):
        raise SystemExit("simulated fatal error in the worker")

    batcher._pack = boom  # the worker calls it after gathering
    futs = [batcher.submit([1], seed=i) for i in range(3)]
    for f in futs:
        with pytest.raises(BatcherDied, match="worker thread died.*simulated fatal error"):
            f.result(10)
    batcher._worker.join(10)
    assert not batcher._worker.is_alive()
    t0 = time.monotonic()
    with pytest.raises(BatcherDied):
        batcher.submit([2], seed=0).result(10)
    assert time.monotonic() - t0 < 1.0
    batcher.close(timeout=5)


def test_waiting_inside_a_pipeline_callback_raises(pipe, lone):
    """A pipeline.generate callback that waits for the batcher would deadlock (the worker needs the
    pipeline the callback holds): the wait raises RuntimeError at once. A submit without waiting is
    fine and is answered once the generation returns."""
    labels, seed, settings = _requests()[1]
    with DetailFlowBatcher(pipe, max_batch=4, max_wait_ms=1) as batcher:
        seen, futs = [], []

        def callback(step, tokens, preview):
            if step.start == 0:
                futs.append(batcher.submit(labels, seed=seed, **settings))
                t0 = time.monotonic()
                for wait in (lambda: batcher.generate([1], seed=0), futs[0].result, futs[0].exception):
                    try:
                        wait()
                    except RuntimeError as e:
                        seen.append(str(e))
                assert time.monotonic() - t0 < 1.0

        res = in_thread(lambda: pipe.generate([4], seed=3, callback=callback))[0]
        assert not isinstance(res, BaseException), res
        assert len(seen) == 3 and all("would wait forever" in m for m in seen), seen
        np.testing.assert_array_equal(futs[0].result(30).uint8, lone[1])
        np.testing.assert_array_equal(batcher.generate(labels, seed=seed, timeout=30, **settings).uint8, lone[1])


def test_waiting_on_the_worker_thread_raises(pipe, lone):
    """A done-callback runs on the worker thread: waiting there for another request would wait for
    itself forever, so it raises; the worker keeps serving."""
    labels, seed, settings = _requests()[1]
    with DetailFlowBatcher(pipe, max_batch=4, max_wait_ms=1) as batcher:
        seen = []

        def on_done(_):
            assert threading.current_thread() is batcher._worker
            try:
                batcher.generate([1], seed=0)
            except RuntimeError as e:
                seen.append(str(e))

        with batcher._cond:  # the worker cannot take the request before its callback is attached
            fut = batcher.submit([2], seed=5)
            fut.add_done_callback(on_done)
        assert not isinstance(in_thread(lambda: fut.result(30))[0], BaseException)
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen and "worker thread" in seen[0]
        out = in_thread(lambda: batcher.generate(labels, seed=seed, timeout=30, **settings))[0]
        np.testing.assert_array_equal(out.uint8, lone[1])


def test_close_inside_a_pipeline_callback_raises(pipe, lone):
    """close() would join a worker that needs the pipeline the callback holds: it closes, raises at
    once, and the queued request still finishes once the generation returns."""
    labels, seed, settings = _requests()[1]
    batcher = DetailFlowBatcher(pipe, max_batch=4, max_wait_ms=1)
    seen, futs = [], []

    def callback(step, tokens, preview):
        if step.start == 0:
            futs.append(batcher.submit(labels, seed=seed, **settings))
            try:
                batcher.close()
            except RuntimeError as e:
                seen.append(str(e))

    res = in_thread(lambda: pipe.generate([4], seed=3, callback=callback))[0]
    assert not isinstance(res, BaseException), res
    assert len(seen) == 1 and "cannot wait for the worker" in seen[0]
    np.testing.assert_array_equal(futs[0].result(30).uint8, lone[1])
    with pytest.raises(BatcherClosed):
        batcher.submit([1]).result(5)
    batcher.close(timeout=10)
    assert not batcher._worker.is_alive()
