"""python -m detailflow_engine.serve --ray --replicas 2: the same HTTP contract over Ray Serve.

One server (its own local Ray cluster with 2 CPUs) for the module: images equal lone pipeline
calls under concurrency, bad bodies get 4xx JSON errors, a replica killed mid-load is replaced
by Serve while every request succeeds (at most after a retry of a 5xx), and SIGTERM shuts Serve
and the cluster down, leaving none of the processes it started. Marked ``ray`` (CI runs it;
``-m "not ray"`` skips it, about a minute on 2 cores).
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from serve_util import Server, alive, cmdline, descendants, post_generate, request

pytest.importorskip("fastapi", reason='the [serve] extra is not installed (pip install -e ".[serve]")')
pytest.importorskip("ray.serve", reason='the [serve] extra is not installed (pip install -e ".[serve]")')

from test_serve import BAD, check_images, lone_png  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def pipe():
    from detailflow_engine.pipeline import DetailFlowPipeline

    return DetailFlowPipeline.from_pretrained(device="cpu")


@pytest.fixture(scope="module")
def server():
    # no cluster to join (RAY_ADDRESS dropped), so the server starts its own local one with 2 CPUs
    s = Server("--ray", "--replicas", "2", "--ray-num-cpus", "2", "--device", "cpu", "--max-wait-ms", "5",
               "--request-timeout", "30", env={"OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"},
               drop_env=("RAY_ADDRESS",), ready_s=180)
    try:
        yield s
    finally:
        s.close()


def replicas(server):
    pids = {p for p in descendants(server.proc.pid) if cmdline(p).startswith("ray::ServeReplica")}
    server.seen |= pids
    return alive(pids)


def test_ray_concurrent_requests_equal_lone_calls(pipe, server):
    assert len(replicas(server)) == 2
    check_images(pipe, server.port, n=40, threads=8)


def test_ray_healthz_and_metrics(server):
    status, _, data = request(server.port, "GET", "/healthz")
    h = json.loads(data)
    assert status == 200 and h["model"]["num_classes"] == 10 and h["device"] == "cpu"
    status, _, text = request(server.port, "GET", "/metrics")
    assert status == 200 and "detailflow_batch_size_bucket" in text.decode()


def test_ray_bad_requests(pipe, server):
    for body, status, field, words in BAD:
        got, headers, data = post_generate(server.port, body)
        assert got == status, (body[:60], data[:300])
        assert headers["content-type"] == "application/json"
        err = json.loads(data)
        assert words.lower() in err["error"].lower(), err
        if field is not None:
            assert err.get("field") == field
    body = {"class_label": 2, "seed": 77}
    status, _, data = post_generate(server.port, body)
    assert status == 200 and data == lone_png(pipe, body)


def test_ray_replica_killed_mid_load(pipe, server):
    before = replicas(server)
    assert len(before) == 2
    victim = sorted(before)[0]
    killer = threading.Timer(1.0, os.kill, (victim, signal.SIGKILL))
    killer.start()
    try:  # every request succeeds, at most after retries of a 5xx; none waits past its 60 s timeout
        stats = {}
        check_images(pipe, server.port, n=40, threads=8, timeout=60, retries=4, stats=stats)
    finally:
        killer.cancel()
    print(f"replica {victim} killed mid-load: retried 5xx answers: {stats.get('retried', 0)}")
    assert victim not in alive({victim})
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # Serve starts a replacement
        now = replicas(server)
        if len(now) == 2 and victim not in now:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"Serve did not replace the killed replica within 90 s (replicas: {replicas(server)})")
    status = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        body = {"class_label": 5, "seed": 5}
        status, _, data = post_generate(server.port, body, timeout=30)
        if status == 200:
            assert data == lone_png(pipe, body)
            break
        time.sleep(0.5)
    assert status == 200


def test_ray_sigterm_shuts_down_and_leaves_no_processes(server):
    """Last: SIGTERM -> Serve and the local cluster it started shut down, exit 0, no process left."""
    started = descendants(server.proc.pid)
    assert any("raylet" in cmdline(p) for p in started), "no raylet under the server: not its own cluster?"
    t0 = time.monotonic()
    server.signal(signal.SIGTERM)
    rc = server.wait(60)
    assert rc == 0, (rc, server.output())
    deadline = time.monotonic() + 30
    while alive(server.seen) and time.monotonic() < deadline:
        time.sleep(0.25)
    left = {p: cmdline(p)[:80] for p in alive(server.seen)}
    assert not left, f"processes the server started are still running: {left}"
    assert time.monotonic() - t0 < 60


def test_build_app_args_for_serve_run_and_kuberay():
    """`serve run ...:build_app k=v` and a config file's args arrive as strings: typed here."""
    from detailflow_engine.serve_ray import _config_from_args, app, build_app

    cfg = _config_from_args({"replicas": "2", "max_wait_ms": "10", "no_cuda_graphs": "true", "device": "cpu",
                             "max_batch": 8})
    assert cfg == {"replicas": 2, "max_wait_ms": 10.0, "no_cuda_graphs": True, "device": "cpu", "max_batch": 8}
    assert build_app({"replicas": "2"}) is not None and app is not None
