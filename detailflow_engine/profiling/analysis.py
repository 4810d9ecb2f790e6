"""A run's exported torch.profiler trace -> stage and per-op tables; the machine's floors; the merged trace.

The analysis reads the Chrome trace that torch.profiler exports (fast, and the same events a
trace viewer shows) rather than `prof.events()`, whose Python-side parsing costs seconds per run.

Stage times are exclusive: a stage range nested in another (VQ lookup inside decoder, the
prior's embedding inside a step) is charged to itself only, so the stages plus "unattributed"
(loop overhead, CFG mixing in the reference loop, ...) add up to the run's root range. Work of
one stage done inside another's extension call (the draw of the engine's CPU prior_step) is
timed by the kernel and moved to its stage and op (Counters.charge), so the tables keep one
sampling row whichever way the engine samples.

Per-op rows walk the event tree under the root: the outermost event of a known kind takes its
whole (inclusive) time -- our kernels (`detailflow::*`), torch GEMMs, attention, norms -- and any
other aten op likewise under its own name; the self time of our Python-level ranges (stages,
root) is "Python / framework" time between ops. So the op rows also add up to the root.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from detailflow_engine.profiling.instrument import NORM_RANGE, RUN_PREFIX, STAGE_PREFIX, STAGES

GEMM_OPS = {"aten::linear", "aten::matmul", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
            "aten::einsum", "aten::_addmm_activation"}
NORM_OPS = {NORM_RANGE, "aten::layer_norm", "aten::native_layer_norm", "aten::rms_norm",
            "aten::_fused_rms_norm", "aten::group_norm"}
PYTHON_ROW = "Python / framework (between ops)"


def category(name: str) -> Optional[str]:
    if name.startswith("detailflow::"):
        return "ours"
    if name in GEMM_OPS:
        return "torch GEMM"
    if "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name:
        return "attention"
    if name in NORM_OPS:
        return "norm"
    if name.startswith("aten::") or name.startswith("prim::"):
        return "other"
    return None  # our own Python-level ranges: look inside


_ELT = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8, "int": 4, "long int": 8, "signed char": 1,
        "c10::Float8_e4m3fn": 1}


class Node:
    """One complete ('X') event of a Chrome trace, with the events it contains on the same thread."""

    __slots__ = ("name", "cat", "ts", "dur", "args", "children")

    def __init__(self, e: dict):
        self.name, self.cat = e.get("name", ""), e.get("cat", "")
        self.ts, self.dur = float(e["ts"]), float(e.get("dur", 0.0))
        self.args = e.get("args") or {}
        self.children: List["Node"] = []

    @property
    def end(self) -> float:
        return self.ts + self.dur


def load_trace(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def build_trees(trace: dict) -> List[Node]:
    """Top-level nodes of every CPU thread (nesting = time containment on the thread, as the profiler's)."""
    by_thread: Dict[tuple, List[Node]] = defaultdict(list)
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and "ts" in e and e.get("cat") in ("cpu_op", "user_annotation", "cuda_runtime",
                                                                   "python_function", "cuda_driver"):
            by_thread[(e.get("pid"), e.get("tid"))].append(Node(e))
    roots: List[Node] = []
    eps = 1e-3  # us: timestamps are floats
    for nodes in by_thread.values():
        nodes.sort(key=lambda n: (n.ts, -n.dur))
        stack: List[Node] = []
        for n in nodes:
            while stack and not (n.ts < stack[-1].end and n.end <= stack[-1].end + eps):
                stack.pop()
            (stack[-1].children if stack else roots).append(n)
            stack.append(n)
    return roots


def find_root(trace_or_roots, run: str) -> Node:
    """The `run::<run>` range (the whole profiled generation + decode)."""
    roots = build_trees(trace_or_roots) if isinstance(trace_or_roots, dict) else trace_or_roots
    name = RUN_PREFIX + run
    found = []

    def visit(n):
        if n.name == name:
            found.append(n)
            return
        for c in n.children:
            visit(c)

    for r in roots:
        visit(r)
    if len(found) != 1:
        raise RuntimeError(f"expected one {name!r} range in the profile, found {len(found)}")
    return found[0]


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def gemm_cost(node: Node) -> tuple:
    """(FLOPs, bytes of the weight operand) of a GEMM-like or attention event from its recorded shapes."""
    dims, types = node.args.get("Input Dims") or [], node.args.get("Input type") or []
    elt = _ELT.get(types[1] if len(types) > 1 else "", 4)
    try:
        if node.name == "aten::linear" and len(dims) >= 2 and len(dims[1]) == 2:
            n, k = dims[1]
            return 2.0 * _prod(dims[0][:-1]) * n * k, n * k * elt
        if node.name in ("aten::mm", "aten::matmul") and len(dims) >= 2 and len(dims[0]) >= 2 and len(dims[1]) >= 2:
            (m, k), n = dims[0][-2:], dims[1][-1]
            return 2.0 * _prod(dims[0][:-2]) * m * k * n, _prod(dims[1]) * elt
        if node.name in ("aten::addmm", "aten::baddbmm", "aten::bmm"):
            a, b = (dims[1], dims[2]) if node.name != "aten::bmm" else (dims[0], dims[1])
            elt = _ELT.get(types[2] if node.name != "aten::bmm" else types[1], 4)
            return 2.0 * _prod(a) * b[-1], _prod(b) * elt
        if "scaled_dot_product" in node.name and len(dims) >= 2 and len(dims[0]) == 4:
            b, h, lq, d = dims[0]
            return 4.0 * b * h * lq * dims[1][-2] * d, 0.0
    except (ValueError, IndexError, TypeError):
        pass
    return 0.0, 0.0


@dataclass
class RunProfile:
    """What one profiled run (engine or reference) yields."""

    name: str
    total_us: float  # the root range of the profiled run
    wall_s: float  # the same run timed without the profiler
    stages_us: Dict[str, float] = field(default_factory=dict)  # profiled, exclusive
    stage_calls: Dict[str, int] = field(default_factory=dict)
    ops: List[dict] = field(default_factory=list)
    timed_stages_s: Dict[str, float] = field(default_factory=dict)  # unprofiled run, exclusive
    gpu_kernels: List[dict] = field(default_factory=list)

    @property
    def unattributed_us(self) -> float:
        return self.total_us - sum(self.stages_us.values())

    @property
    def timed_unattributed_s(self) -> float:
        return self.wall_s - sum(self.timed_stages_s.values())


def stage_times(root: Node) -> tuple:
    """Exclusive time and call count of every stage under root (stage ranges may nest)."""
    times: Dict[str, float] = defaultdict(float)
    calls: Dict[str, int] = defaultdict(int)

    def visit(n: Node, owner: Optional[str]):
        for c in n.children:
            if c.name.startswith(STAGE_PREFIX):
                stage = c.name[len(STAGE_PREFIX):]
                times[stage] += c.dur
                calls[stage] += owner != stage  # a range inside its own stage is not another call
                if owner is not None:
                    times[owner] -= c.dur  # the nested stage is not the outer one's time
                visit(c, stage)
            else:
                visit(c, owner)

    visit(root, None)
    return {s: times.get(s, 0.0) for s in STAGES}, {s: calls.get(s, 0) for s in STAGES}


def op_rows(root: Node, counters=None) -> List[dict]:
    """Per-op rows (name, category, calls, ms, GB/s, GFLOP/s) that add up to the root range."""
    acc: Dict[str, dict] = {}

    def add(name: str, cat: str, us: float, calls: int, flops: float = 0.0, nbytes: float = 0.0):
        row = acc.setdefault(name, dict(name=name, category=cat, calls=0, us=0.0, flops=0.0, bytes=0.0))
        row["calls"] += calls
        row["us"] += us
        row["flops"] += flops
        row["bytes"] += nbytes

    def visit(n: Node):
        own = n.dur
        for c in n.children:
            cat = category(c.name)
            if cat is None:
                visit(c)
            else:
                flops, nbytes = gemm_cost(c) if cat in ("torch GEMM", "attention") else (0.0, 0.0)
                add(c.name, cat, c.dur, 1, flops, nbytes)
            own -= c.dur
        add(PYTHON_ROW, "python", max(own, 0.0), 0)

    visit(root)
    for _, _, outer_op, op, seconds in (counters.charges if counters is not None else ()):
        if outer_op in acc:  # time a kernel measured inside itself for another op (prior_step's draw)
            acc[outer_op]["us"] -= seconds * 1e6
            add(op, "ours", seconds * 1e6, 1)
    rows = []
    for row in acc.values():
        secs = row["us"] / 1e6
        nbytes, flops = row.pop("bytes"), row.pop("flops")
        if counters is not None and row["name"] in counters.bytes:
            nbytes, flops = counters.bytes[row["name"]], counters.flops[row["name"]]
        row.update(ms=row.pop("us") / 1e3, bytes=nbytes or None, flops=flops or None,
                   gbs=(nbytes / secs / 1e9) if nbytes and secs > 0 else None,
                   gflops=(flops / secs / 1e9) if flops and secs > 0 else None)
        rows.append(row)
    order = {"ours": 0, "torch GEMM": 1, "attention": 2, "norm": 3, "other": 4, "python": 5}
    rows.sort(key=lambda r: (order[r["category"]], -r["ms"]))
    return rows


def gpu_kernels(trace: dict, top: int = 15) -> List[dict]:
    """Device time by kernel name (CUDA activity), largest first."""
    acc: Dict[str, list] = defaultdict(lambda: [0, 0.0])
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") == "kernel":
            acc[e.get("name", "?")][0] += 1
            acc[e.get("name", "?")][1] += float(e.get("dur", 0.0))
    rows = [dict(name=k, calls=c, ms=us / 1e3) for k, (c, us) in acc.items()]
    return sorted(rows, key=lambda r: -r["ms"])[:top]


def analyze(trace: dict, run: str, wall_s: float, timer=None, counters=None) -> RunProfile:
    """A run's exported Chrome trace -> its stages and ops; `timer`: the unprofiled run's stage times."""
    root = find_root(trace, run)
    stages, calls = stage_times(root)
    for outer, stage, _, _, seconds in (counters.charges if counters is not None else ()):
        stages[outer] -= seconds * 1e6  # a kernel's own time for another stage (prior_step's draw)
        stages[stage] += seconds * 1e6
        calls[stage] += 1
    timed = {s: timer.times.get(STAGE_PREFIX + s, 0.0) for s in STAGES} if timer is not None else {}
    return RunProfile(run, root.dur, wall_s, stages, calls, op_rows(root, counters), timed, gpu_kernels(trace))


# ------------------------------------------------------------------ floors


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device: torch.device, repeats: int) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_floors(device: torch.device, dtype: torch.dtype, read_mb: int = 256, gemm_n: int = 1536,
                   repeats: int = 5) -> dict:
    """This machine, now: streaming-read GB/s (a large sum) and GEMM GFLOP/s (n x n x n, model dtype),
    each the best of ``repeats`` timed runs (GEMM: ``repeats`` + 2) after one untimed: a floor is a
    peak, and on a shared machine any single run can be slowed by a neighbour."""
    x = torch.ones(read_mb << 18, dtype=torch.float32, device=device)  # read_mb MiB of fp32
    read_s = _best_time(lambda: x.sum(), device, repeats)
    del x
    a = torch.randn(gemm_n, gemm_n, device=device).to(dtype)
    b = torch.randn(gemm_n, gemm_n, device=device).to(dtype)
    gemm_s = _best_time(lambda: torch.mm(a, b), device, repeats + 2)
    return dict(read_gbs=(read_mb << 20) / read_s / 1e9, gemm_gflops=2.0 * gemm_n ** 3 / gemm_s / 1e9,
                read_mb=read_mb, gemm_n=gemm_n, gemm_dtype=str(dtype).replace("torch.", ""),
                read_repeats=repeats, gemm_repeats=repeats + 2)


def best_floors(*measured: dict) -> dict:
    """Several measure_floors results (e.g. before and after the runs) -> the best of each floor."""
    best = dict(measured[0])
    for m in measured[1:]:
        best["read_gbs"] = max(best["read_gbs"], m["read_gbs"])
        best["gemm_gflops"] = max(best["gemm_gflops"], m["gemm_gflops"])
        best["read_repeats"] += m["read_repeats"]
        best["gemm_repeats"] += m["gemm_repeats"]
    best["measurements"] = len(measured)
    return best


def _decode_linears(prior: torch.nn.Module) -> list:
    from detailflow_engine.linear import DecodeLinear  # the engine layer, imported on use only

    return [m for m in prior.modules() if isinstance(m, DecodeLinear)]


def streamed_weight_bytes(prior: torch.nn.Module) -> int:
    """Bytes read per prior step: every weight of the transformer and the output head as held (a
    DecodeLinear's packed panels, scales and column sums; other parameters and buffers as stored);
    embeddings are gathered, not streamed, and the KV cache is not a weight."""
    total = sum(m.held_bytes for m in _decode_linears(prior))
    for name, t in list(prior.named_parameters()) + list(prior.named_buffers()):
        if "embed" in name or "cache" in name:
            continue
        total += t.numel() * t.element_size()
    return total


def linear_weight_elems(prior: torch.nn.Module) -> int:
    """Elements of the transformer's and the head's GEMM weights (2 FLOPs each per row)."""
    return (sum(m.in_features * m.out_features for m in _decode_linears(prior))
            + sum(p.numel() for n, p in prior.named_parameters() if p.dim() == 2 and "embed" not in n))


def stage_floors(floors: dict, *, plan, causal_num: int, rows: int, vocab: int, weight_bytes: int,
                 weight_elems: int, decoder_flops: float, vq_bytes: float, pixel_bytes: float) -> dict:
    """Seconds each stage needs at least on this machine: the prior steps stream all weights (or do
    their GEMM FLOPs, whichever is slower), sampling reads the logits once, the decoder does its GEMM
    FLOPs, VQ lookup and post-processing move their bytes once."""
    bw, fl = floors["read_gbs"] * 1e9, floors["gemm_gflops"] * 1e9
    out = {s: 0.0 for s in STAGES}
    from detailflow_engine.profiling.instrument import prior_stage

    for step in plan:
        n = step.stop - step.start
        out[prior_stage(step.start, causal_num)] += max(weight_bytes / bw, 2.0 * rows * n * weight_elems / fl)
        out["sampling"] += rows * n * vocab * 4 / bw
    out["VQ lookup"] = vq_bytes / bw
    out["decoder"] = decoder_flops / fl
    out["post-processing"] = pixel_bytes / bw
    return out


def decoder_flops(tokenizer, tokens: torch.Tensor) -> float:
    """FLOPs of one decode of `tokens` (torch's FlopCounterMode: GEMMs and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        tokenizer.decode(tokens)
    return float(fc.get_total_flops())


# ------------------------------------------------------------------ trace


def merge_traces(parts: List[tuple], path: str) -> None:
    """[(label, loaded chrome trace)] -> one Chrome/Perfetto trace in which each run is its own process
    (pids renumbered per run, named by process_name metadata)."""
    merged, events = None, []
    next_pid = 1
    for label, data in parts:
        if merged is None:
            merged = {k: v for k, v in data.items() if k != "traceEvents"}
        names = {}
        for e in data.get("traceEvents", []):
            if e.get("ph") == "M" and e.get("name") == "process_name":
                names[e.get("pid")] = (e.get("args") or {}).get("name")
        pid_map = {}
        for e in data.get("traceEvents", []):
            if "pid" not in e:
                events.append(e)
                continue
            old = e["pid"]
            if old not in pid_map:
                pid_map[old] = next_pid
                next_pid += 1
            e = dict(e, pid=pid_map[old])
            if e.get("ph") == "M" and e.get("name") in ("process_name", "process_sort_index"):
                continue  # replaced below
            if e.get("ph") == "f" or e.get("ph") == "s":
                e["id"] = f"{label}:{e.get('id')}"  # flow ids must not collide between runs
            events.append(e)
        for old, new in pid_map.items():
            orig = names.get(old)
            events.append(dict(ph="M", name="process_name", pid=new, tid=0,
                               args=dict(name=f"{label}" + (f" ({orig})" if orig and orig != str(old) else ""))))
            events.append(dict(ph="M", name="process_sort_index", pid=new, tid=0, args=dict(sort_index=new)))
    merged = merged or {}
    merged["traceEvents"] = events
    text = json.dumps(merged)  # one C-encoder call: json.dump's chunked writes are much slower
    with open(path, "w") as f:
        f.write(text)
