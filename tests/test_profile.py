"""python -m detailflow_engine.profile on the embedded model (CPU): tables, kernel names, trace, CLI errors."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from detailflow_engine import profile
from detailflow_engine.ops import _dispatch
from detailflow_engine.profiling import report
from detailflow_engine.profiling.instrument import STAGES

REPO_ROOT = profile.__file__.rsplit("/detailflow_engine/", 1)[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One profile of engine + reference (greedy, CFG), with the ops that really ran recorded
    independently of the profiler: every `_dispatch.pick` call, by op name."""
    trace = tmp_path_factory.mktemp("profile") / "trace.json"
    picked = set()
    real_pick = _dispatch.pick

    def spy(op, *args, **kwargs):
        picked.add(op)
        return real_pick(op, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(_dispatch, "pick", spy)
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a shared 2-core machine can be 5x slower
    fd_err = tmp_path_factory.mktemp("fd2") / "stderr"
    saved = os.dup(2)
    try:
        with open(fd_err, "wb") as f:  # what native code writes to fd 2 lands here
            os.dup2(f.fileno(), 2)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = profile.main(["--device", "cpu", "--batch-size", "2", "--compare-reference", "--json",
                                   "--trace", str(trace)])
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        mp.undo()
        torch.set_num_threads(threads)
    assert rc == 0
    STDERR.update(python=err.getvalue(), fd=fd_err.read_text(errors="replace"))
    return json.loads(out.getvalue()), trace, picked


STDERR = {}  # what the profile of `run` wrote to stderr: through sys.stderr, and to fd 2 natively


def test_no_profiler_chatter_on_stderr(run):
    """The torch profiler's native 'USDT: ... SyncActivityProfilerHandler' lines stay out of the terminal."""
    for where, text in STDERR.items():
        assert "USDT" not in text and "SyncActivityProfilerHandler" not in text, (where, text)


def test_quiet_profiler_stderr_passes_other_lines_on(capfd):
    import ctypes

    libc = ctypes.CDLL(None)
    with profile.quiet_profiler_stderr():
        os.write(2, b"USDT:2026-01-01 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"a real problem\n")
        libc.fflush(None)
    err = capfd.readouterr().err
    assert err == "a real problem\n", err


def test_floor_below_one_is_flagged(run):
    """engine/floor < 1 means the floor was measured low: the row says so, in JSON and in the text."""
    import copy

    rep, _, _ = run
    for r in rep["stages"]:
        if "floor_measured_low" in r:
            below = [v for v in (r.get("engine_vs_floor"), r.get("reference_vs_floor")) if v is not None and v < 1]
            assert r["floor_measured_low"] == bool(below), r
    fake = copy.deepcopy(rep)
    dec = next(r for r in fake["stages"] if r["stage"] == "decoder")
    dec.update(engine_vs_floor=0.84, floor_measured_low=True)
    text = report.format_text(fake, 12)
    assert "| 0.84x (floor measured low) |" in text
    assert "floor measured low for decoder:" in text
    assert "best of " in text and " reads and " in text and "GEMMs, before and after the runs" in text
    plain = report.format_text(rep, 12)
    assert ("floor measured low" in plain) == any(r.get("floor_measured_low") for r in rep["stages"])


def test_memory_peak_is_reported(run):
    rep, _, _ = run
    assert rep["memory"]["peak_rss_bytes"] > 50e6 and rep["memory"]["preset_peak"] is None
    assert "# memory: peak RSS of this process " in report.format_text(rep, 12)
    fake = dict(rep, memory=dict(rep["memory"], preset_peak=report.preset_peak_text("detailflow16", True)))
    assert ("; this random-weights profile peaks at about 8 GB of RAM with --compare-reference (about 5 GB "
            "without)") in report.format_text(fake, 12)


def _stage_rows(rep):
    return {r["stage"]: r for r in rep["stages"]}


@pytest.mark.parametrize("side", ["engine", "reference"])
def test_stages_add_up_to_total(run, side):
    rep, _, _ = run
    rows = _stage_rows(rep)
    for col in (f"{side}_ms", f"{side}_profiled_ms"):  # the unprofiled run and the profiled one
        total = rows["total"][col]
        named = sum(rows[s][col] for s in STAGES)
        assert total > 0 and abs(named - total) <= 0.10 * total, f"{col}: stages {named:.2f} ms vs total {total:.2f} ms"
        assert rows["unattributed"][col] == pytest.approx(total - named)
    for s in ("prior: class step", "prior: single steps", "prior: group steps", "sampling", "decoder"):
        assert rows[s][f"{side}_ms"] > 0, f"{side}: stage {s!r} got no time"
    assert all(rows[s][f"{side}_ms"] >= 0 for s in STAGES)
    # the op rows partition the same root range
    ops_ms = sum(o["ms"] for o in rep["ops"][side])
    total = rows["total"][f"{side}_profiled_ms"]
    assert abs(ops_ms - total) <= 0.01 * total + 0.05


def test_stage_calls_follow_the_step_plan(run):
    from detailflow_engine.assets import default_model_paths
    from detailflow_engine.loading import load_prior

    rep, _, _ = run
    cfg = load_prior(default_model_paths()[0]).config
    plan = cfg.generation_plan()
    rows = _stage_rows(rep)
    for side in ("engine", "reference"):
        assert rows["prior: class step"][f"{side}_calls"] == 1
        assert rows["prior: single steps"][f"{side}_calls"] == cfg.causal_num - 1
        assert rows["prior: group steps"][f"{side}_calls"] == len(plan) - cfg.causal_num
    assert rows["decoder"]["engine_calls"] == rows["decoder"]["reference_calls"] == 1
    assert rows["sampling"]["engine_calls"] == rows["sampling"]["reference_calls"] == len(plan)


def test_every_kernel_that_ran_is_named(run):
    rep, _, picked = run
    assert picked, "no op of ours ran"
    if _dispatch.has_cpu_kernels():  # the built engine's hot path on the CPU
        # embeddings, layers (their cache_attention, decode_gemms), head and draw are one prior_step
        # call a step; the draw is timed inside it and shown as group_sample
        assert {"prior_step", "vq_lookup"} <= picked
        rows = {o["name"]: o for o in rep["ops"]["engine"]}
        assert rows["detailflow::group_sample"]["calls"] == rows["detailflow::prior_step"]["calls"]
        assert 0 < rows["detailflow::group_sample"]["ms"] < rows["detailflow::prior_step"]["ms"]
    rows = {o["name"]: o for o in rep["ops"]["engine"]}
    for op in picked:
        assert f"detailflow::{op}" in rows, f"{op} ran but is not in the per-op table"
        assert rows[f"detailflow::{op}"]["calls"] >= 1 and rows[f"detailflow::{op}"]["category"] == "ours"
    assert not any(o["name"].startswith("detailflow::") for o in rep["ops"]["reference"])
    for op in {"decode_gemm", "prior_step"} & picked:
        assert rows[f"detailflow::{op}"]["gbs"] > 0  # weights streamed are known


def test_tokens_identical_under_greedy(run):
    rep, _, _ = run
    t = rep["tokens_identical"]
    assert t["identical"] and t["equal_fraction"] == 1.0
    assert t["count"] == 2 * rep["config"]["prior"]["tokens"]


def test_floors_and_ratios(run):
    rep, _, _ = run
    fl = rep["floors"]
    assert fl["read_gbs"] > 0 and fl["gemm_gflops"] > 0 and fl["decoder_flops"] > 0
    assert fl["weights_streamed_per_step_bytes"] > 0
    for r in rep["stages"]:
        if r["stage"] in STAGES:
            assert r["floor_ms"] >= 0
            if r["engine_ms"] > 0:
                assert r["ratio"] == pytest.approx(r["reference_ms"] / r["engine_ms"])


def test_trace_is_json_with_our_ranges(run):
    _, trace, picked = run
    data = json.loads(trace.read_text())
    events = data["traceEvents"]
    names = {e.get("name") for e in events}
    for op in picked:
        assert f"detailflow::{op}" in names
    assert {"run::engine", "run::reference"} <= names
    assert all(f"stage::{s}" in names for s in ("prior: group steps", "sampling", "decoder"))
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}

    def pid_of(name):
        return next(e["pid"] for e in events if e.get("name") == name and e.get("ph") == "X")

    assert pid_of("run::engine") != pid_of("run::reference")
    assert procs[pid_of("run::engine")].startswith("engine")
    assert procs[pid_of("run::reference")].startswith("reference")


def test_profile_ranges_only_when_on():
    from detailflow_engine.ops.group_sample import group_sample

    logits = torch.randn(2, 3, 50)
    seeds, pos = torch.tensor([1, 2]), torch.arange(3)
    b = _dispatch.pick("group_sample", logits, seeds, pos)
    assert b in _dispatch._TABLE["group_sample"]  # off: the registered backend itself, no wrapper
    with torch.profiler.profile() as prof:
        group_sample(logits, seeds, pos, top_k=1)
    assert not any(e.name == "detailflow::group_sample" for e in prof.events())
    _dispatch.set_profile_ranges(True)
    try:
        with torch.profiler.profile() as prof:
            on = group_sample(logits, seeds, pos, top_k=1)
    finally:
        _dispatch.set_profile_ranges(False)
    assert any(e.name == "detailflow::group_sample" for e in prof.events())
    assert torch.equal(on, group_sample(logits, seeds, pos, top_k=1))


@pytest.mark.parametrize("argv, needle", [
    (["--batch-size", "0"], "--batch-size"),
    (["--ckpt", "x"], "both --ckpt and --tokenizer"),
    (["--random-weights", "nope"], "not a preset"),
    (["--random-weights", "detailflow16", "--ckpt", "a", "--tokenizer", "b"], "--random-weights"),
    (["--ckpt", "/no/such/prior", "--tokenizer", "/no/such/tok"], "no such file"),
    (["--top-p", "0"], "--top-p"),
    (["--cfg-scale", "-1"], "--cfg-scale"),
    (["--trace", "/no/such/dir/t.json"], "does not exist"),
    (["--trace", "/proc/detailflow-trace.json"], "cannot write it"),  # refused before, not after, the run
    (["--cfg-scale", "nan"], "--cfg-scale must be a finite number"),
    (["--temperature", "inf"], "--temperature must be a finite number"),
    (["--dtype", "fp8"], "invalid choice"),
    (["--bogus"], "unrecognized"),
])
def test_bad_arguments_exit_2(argv, needle, capsys):
    assert profile.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cli_cuda_without_gpu_exits_2():
    proc = subprocess.run([sys.executable, "-m", "detailflow_engine.profile", "--device", "cuda"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --device cuda: no CUDA GPU is available"]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("weights", ["native", "int8", "int4", "w8a8", "w4a8"])
def test_the_weight_floor_counts_the_packed_weights(tiny_a, weights):
    """The floor's bytes per step are what the prior holds: a DecodeLinear has no parameters, so
    its panels (+ scales, column sums) must be counted; tiny-a's 64-wide linears pad nothing but
    w8a8's K to a multiple of 4 (already one), so the state dict's bytes are the same."""
    from detailflow_engine.loading import load_prior
    from detailflow_engine.profiling.analysis import linear_weight_elems, streamed_weight_bytes

    prior = load_prior(tiny_a / "prior", device="cpu", weights=weights)
    state = {n: t for n, t in prior.state_dict().items() if "embed" not in n and "cache" not in n}
    extra = 4 * sum(m.out_features for m in prior.layers.modules() if getattr(m, "weights", None) == "w8a8")
    assert streamed_weight_bytes(prior) == sum(t.numel() * t.element_size() for t in state.values()) + extra
    # int4 / w4a8 state dicts hold two codes a byte
    assert linear_weight_elems(prior) == sum(t.numel() * (2 if t.dtype == torch.uint8 else 1)
                                             for n, t in state.items() if n.endswith("weight") and t.dim() == 2)


@pytest.mark.parametrize("fast", [True, False])
def test_profiler_ranges_are_named_in_the_trace_either_way(fast, monkeypatch):
    """profiler_range: torch's RecordFunctionFast, or record_function where a torch lacks it."""
    if not fast:
        monkeypatch.setattr(_dispatch, "_FAST_RANGE", None)
    elif _dispatch._FAST_RANGE is None:
        pytest.skip("this torch has no RecordFunctionFast")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with _dispatch.profiler_range("stage::probe"):
            torch.zeros(3).sum()
    names = [e.name for e in prof.events()]
    assert names.count("stage::probe") == 1
