"""python -m detailflow_engine.serve: the HTTP contract, in a subprocess on a free loopback port.

Every image a request gets is exactly the lone pipeline call's (PNG bytes and pixels), whatever the
concurrency; every bad body gets a 4xx JSON error naming the field and the server keeps serving;
SIGINT finishes the requests in flight and exits 0.
"""
from __future__ import annotations

import base64
import json
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serve_util import Server, png_array, post_generate, request

pytest.importorskip("fastapi", reason='the [serve] extra is not installed (pip install -e ".[serve]")')
pytest.importorskip("uvicorn", reason='the [serve] extra is not installed (pip install -e ".[serve]")')

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = [{}, {"cfg_scale": 2.0, "top_k": 20}, {"temperature": 0.8, "top_p": 0.9, "gradual_cfg": True},
            {"num_tokens": 8}]


def cases(n: int):
    """n requests: classes, seeds (some large, one negative) and four settings groups."""
    out = []
    for i in range(n):
        seed = [7 * i + 3, 2 ** 62 + i, -5 - i][i % 3]
        out.append(dict({"class_label": i % 10, "seed": seed}, **SETTINGS[i % len(SETTINGS)]))
    return out


@pytest.fixture(scope="module")
def pipe():
    from detailflow_engine.pipeline import DetailFlowPipeline

    return DetailFlowPipeline.from_pretrained(device="cpu")


def lone_png(pipe, body) -> bytes:
    from detailflow_engine.outputs import png_bytes

    settings = {k: v for k, v in body.items() if k not in ("class_label", "seed")}
    return png_bytes(pipe.generate([body["class_label"]], seed=[body["seed"]], **settings).uint8[0])


@pytest.fixture(scope="module")
def server():
    s = Server("--device", "cpu", "--max-batch", "16", "--max-wait-ms", "5", env={"OMP_NUM_THREADS": "1"})
    try:
        yield s
    finally:
        s.close()


def check_images(pipe, port: int, n: int = 40, threads: int = 8, timeout: float = 60.0, retries: int = 0,
                 stats=None):
    """n concurrent requests from `threads` threads; each image must equal the lone pipeline call.
    A 5xx answer is retried up to `retries` times (stats["retried"] counts them)."""
    bodies = cases(n)
    stats = {} if stats is None else stats

    def one(body):
        for attempt in range(retries + 1):
            status, headers, data = post_generate(port, body, timeout=timeout)
            if status == 200 or not (500 <= status < 600) or attempt == retries:
                return status, headers, data
            stats["retried"] = stats.get("retried", 0) + 1
            time.sleep(0.5)

    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as ex:
        answers = list(ex.map(one, bodies))
    wall = time.monotonic() - t0
    for body, (status, headers, data) in zip(bodies, answers):
        assert status == 200, (body, status, data[:300])
        assert headers["content-type"] == "image/png"
        assert headers["x-detailflow-class-label"] == str(body["class_label"])
        assert headers["x-detailflow-seed"] == str(body["seed"])
        used = json.loads(headers["x-detailflow-settings"])
        for k, v in body.items():
            if k not in ("class_label", "seed"):
                assert used[k] == v
        want = lone_png(pipe, body)
        np.testing.assert_array_equal(png_array(data), png_array(want))
        assert data == want  # the same PNG bytes too (deterministic encoder)
    return wall


def test_concurrent_requests_equal_lone_calls(pipe, server):
    check_images(pipe, server.port, n=40, threads=8)
    status, _, text = request(server.port, "GET", "/metrics")
    text = text.decode()
    assert status == 200
    assert 'detailflow_requests_total{status="200"}' in text
    # batching happened (40 requests, 8 at a time) and is visible
    count = [ln for ln in text.splitlines() if ln.startswith("detailflow_batch_size_count")][0]
    sizes = [ln for ln in text.splitlines() if ln.startswith("detailflow_batch_size_sum")][0]
    assert int(count.split()[1]) >= 1 and float(sizes.split()[1]) >= 40
    for name in ("detailflow_request_latency_seconds_bucket", "detailflow_queue_depth ",
                 "# TYPE detailflow_batch_size histogram"):
        assert name in text


def test_json_answer(pipe, server):
    body = {"class_label": 4, "seed": 11, "cfg_scale": 3.0}
    status, headers, data = post_generate(server.port, body, accept="application/json")
    assert status == 200 and headers["content-type"] == "application/json"
    out = json.loads(data)
    want = pipe.generate([4], seed=[11], cfg_scale=3.0)
    assert out["tokens"] == want.tokens[0].tolist()
    assert base64.b64decode(out["png_base64"]) == lone_png(pipe, body)
    assert out["settings"]["cfg_scale"] == 3.0 and out["settings"]["top_k"] == 0
    assert out["settings"]["num_tokens"] == pipe.prior.config.block_size
    assert (out["class_label"], out["seed"]) == (4, 11)


def test_healthz(server, pipe):
    status, headers, data = request(server.port, "GET", "/healthz")
    h = json.loads(data)
    assert status == 200 and headers["content-type"] == "application/json"
    assert h["model"] == {"num_classes": 10, "num_tokens": pipe.prior.config.block_size,
                          "image_size": pipe.tokenizer.image_size, "group_size": pipe.prior.config.group_size}
    assert (h["device"], h["dtype"], h["weights"]) == ("cpu", "fp32", "native")


BAD = [  # (body, status, the field named, words of the message)
    (b'{"seed": 1}', 422, "class_label", "required"),
    (b'{"class_label": 1}', 422, "seed", "required"),
    (b'{"class_label": "3", "seed": 1}', 422, "class_label", "int"),
    (b'{"class_label": 1.0, "seed": 1}', 422, "class_label", "int"),
    (b'{"class_label": true, "seed": 1}', 422, "class_label", "int"),
    (b'{"class_label": 1, "seed": [1, 2]}', 422, "seed", "int"),
    (b'{"class_label": 1, "seed": 9223372036854775808}', 422, "seed", "int64"),
    (b'{"class_label": 10, "seed": 1}', 422, "class_label", "outside"),
    (b'{"class_label": -1, "seed": 1}', 422, "class_label", "outside"),
    (b'{"class_label": 1, "seed": 1, "cfg_scale": -1}', 422, "cfg_scale", ">= 0"),
    (b'{"class_label": 1, "seed": 1, "cfg_scale": "big"}', 422, "cfg_scale", "number"),
    (b'{"class_label": 1, "seed": 1, "temperature": -0.5}', 422, "temperature", ">= 0"),
    (b'{"class_label": 1, "seed": 1, "top_k": -2}', 422, "top_k", ">= 0"),
    (b'{"class_label": 1, "seed": 1, "top_k": 2.5}', 422, "top_k", "int"),
    (b'{"class_label": 1, "seed": 1, "top_p": 0}', 422, "top_p", "(0, 1]"),
    (b'{"class_label": 1, "seed": 1, "top_p": 1.5}', 422, "top_p", "(0, 1]"),
    (b'{"class_label": 1, "seed": 1, "gradual_cfg": 1}', 422, "gradual_cfg", "bool"),
    (b'{"class_label": 1, "seed": 1, "num_tokens": 5}', 422, "num_tokens", "step boundary"),
    (b'{"class_label": 1, "seed": 1, "num_tokens": 0}', 422, "num_tokens", "num_tokens"),
    (b'{"class_label": 1, "seed": 1, "steps": 3}', 422, "steps", "unknown"),
    (b'{"class_label": 1, "seed": 1, "cfg_scale": NaN}', 422, "cfg_scale", "finite"),
    (b'{"class_label": 1, "seed"', 400, None, "not JSON"),
    (b'', 400, None, "not JSON"),
    (b'\xff\xfe', 400, None, "not JSON"),
    (b'[1, 2]', 400, None, "object"),
    (b'{"class_label": 1, "seed": 1, "pad": "' + b"x" * 70_000 + b'"}', 413, None, "limit"),
]


@pytest.mark.parametrize("body,status,field,words", BAD, ids=[f"{i}-{b[:30]!r}" for i, (b, *_) in enumerate(BAD)])
def test_bad_request(server, body, status, field, words):
    got, headers, data = post_generate(server.port, body)
    assert got == status, data[:300]
    assert headers["content-type"] == "application/json"
    err = json.loads(data)
    assert words.lower() in err["error"].lower(), err
    if field is not None:
        assert err.get("field") == field, err
        assert field.replace("_", " ") in err["error"] or field in err["error"], err


def test_bad_requests_leave_the_server_serving(pipe, server):
    for body, *_ in BAD[:6]:
        post_generate(server.port, body)
    assert request(server.port, "GET", "/healthz")[0] == 200
    body = {"class_label": 9, "seed": 123}
    status, _, data = post_generate(server.port, body)
    assert status == 200 and data == lone_png(pipe, body)
    assert request(server.port, "GET", "/nope")[0] == 404
    status, headers, _ = request(server.port, "GET", "/v1/generate")
    assert status == 405 and headers["content-type"] == "application/json"
    status, _, text = request(server.port, "GET", "/metrics")
    assert 'detailflow_requests_total{status="422"}' in text.decode()


def test_sigint_finishes_in_flight_and_exits_0(pipe, server):
    """Last test of the module server: SIGINT while requests run; they get their images; exit 0 fast."""
    bodies = cases(8)
    with ThreadPoolExecutor(8) as ex:
        futs = [ex.submit(post_generate, server.port, b, None, 60.0) for b in bodies]
        time.sleep(0.05)
        t0 = time.monotonic()
        server.signal(signal.SIGINT)
        answers = [f.result(timeout=90) for f in futs]
    rc = server.wait(30)
    took = time.monotonic() - t0
    assert rc == 0, (rc, server.output())
    assert took < 30
    for body, (status, _, data) in zip(bodies, answers):
        # a request that reached the server before the signal gets its image; one that came after
        # may be refused (connection closed), never a wrong image
        if status == 200:
            assert data == lone_png(pipe, body)


def test_sigterm_exits_0():
    s = Server("--device", "cpu", env={"OMP_NUM_THREADS": "1"})
    try:
        t0 = time.monotonic()
        s.signal(signal.SIGTERM)
        rc = s.wait(30)
        assert rc == 0 and time.monotonic() - t0 < 30, (rc, s.output())
    finally:
        s.close()


def test_bad_flags_and_missing_extra(monkeypatch, capsys):
    from detailflow_engine import serve

    assert serve.main(["--ckpt", "x"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --ckpt and --tokenizer go together")
    assert serve.main(["--replicas", "2"]) == 2
    assert "--ray" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if the [serve] extra were not installed
    assert serve.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install -e ".[serve]"' in err[0] and err[0].startswith("error:")
