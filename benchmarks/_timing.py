"""The one timer every benchmark uses (STYLE.md practice 12).

Warm-up calls are excluded; the repeat count comes from a target duration; the median is
reported. On CUDA, per-iteration events; on CPU, perf_counter with the thread count recorded.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    median_s: float
    min_s: float
    repeats: int
    threads: int
    device: str

    def __str__(self) -> str:
        return f"{self.median_s * 1e3:.3f} ms (min {self.min_s * 1e3:.3f}, n={self.repeats}, {self.device}, threads={self.threads})"


def bench(fn: Callable[[], object], *, device: str = "cpu", warmup: int = 2,
          target_s: float = 1.0, min_repeats: int = 3, max_repeats: int = 1000) -> Timing:
    """Median wall time of fn() after warm-up; fn is called repeatedly with no arguments."""
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    # one timed probe decides the repeat count
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    probe = max(time.perf_counter() - t0, 1e-7)
    repeats = int(min(max_repeats, max(min_repeats, target_s / probe)))
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), repeats, torch.get_num_threads(), device)


def read_bandwidth_gbs(device: str = "cpu", nbytes: int = 512 << 20) -> float:
    """Plain streaming-read bandwidth of this machine, measured now (a large sum)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    t = bench(lambda: x.sum(), device=device, target_s=0.5)
    return nbytes / t.median_s / 1e9


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GRAPH_CALLS = 20  # calls captured in one graph by graph_time


def ms(t: Timing) -> str:
    return f"{t.median_s * 1e3:8.3f} ms (min {t.min_s * 1e3:.3f})"


def graph_replay(fn: Callable[[], object], *, calls: int = 1, warmup: int = 1) -> Callable[[], None]:
    """The replay of a CUDA graph holding `calls` calls of fn (warmed up on a side stream first,
    as the torch docs show: Triton compiles and cuBLAS picks its kernels outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


def graph_time(fn: Callable[[], object], target_s: float) -> float:
    """Per-call time of fn captured GRAPH_CALLS times in one CUDA graph, replayed."""
    return bench(graph_replay(fn, calls=GRAPH_CALLS), device="cuda", target_s=target_s).median_s / GRAPH_CALLS


def eager_and_graph(ours: Callable[[], object], torch_fn: Callable[[], object], *, device: str,
                    target_s: float, nbytes: int) -> str:
    """'eager: ours .. us  torch .. us (x..)' and on CUDA the same for graph replays, then our GB/s."""
    t_ours = bench(ours, device=device, target_s=target_s).median_s
    t_torch = bench(torch_fn, device=device, target_s=target_s).median_s
    line = f"eager: ours {t_ours * 1e6:8.1f} us  torch {t_torch * 1e6:8.1f} us (x{t_torch / t_ours:5.2f})"
    if device.startswith("cuda"):
        g_ours, g_torch = graph_time(ours, target_s), graph_time(torch_fn, target_s)
        return (line + f"  graph: ours {g_ours * 1e6:7.2f} us  torch {g_torch * 1e6:7.2f} us "
                f"(x{g_torch / g_ours:5.2f})  {nbytes / g_ours / 1e9:7.1f} GB/s")
    return line + f"  {nbytes / t_ours / 1e9:7.1f} GB/s"


def practice5_bound(ours: torch.Tensor, lowp: torch.Tensor, ref32: torch.Tensor, atol: float, rtol: float):
    """(max|ours - ref32|, its STYLE practice-5 bound 2 * max|lowp - ref32| + atol + rtol * max|ref32|),
    the rule the op tests assert."""
    err = (ours.float() - ref32).abs().max().item()
    bound = 2 * (lowp.float() - ref32).abs().max().item() + atol + rtol * ref32.abs().max().item()
    return err, bound


def cpu_backend(parser, args, op: str) -> str:
    """The CPU setup the op benchmarks share: refuse float16 (the CPU kernels take float32 and
    bfloat16), apply --threads, and name the backend that will run."""
    if "float16" in args.dtype:
        parser.error("--dtype float16 needs --device cuda (the CPU op takes float32 and bfloat16)")
    if args.threads:
        torch.set_num_threads(args.threads)
    from detailflow_engine.ops import _dispatch

    backend = "cpu" if _dispatch.has_cpu_kernels() else "torch (no _C: fallback)"
    return f"{op}: backend {backend}, torch {torch.__version__}, threads {torch.get_num_threads()}"


def rows_parser(doc: str, rows_help: str):
    """The command line of the row-wise fused-op benchmarks (add_rmsnorm, rope_qkv); each adds its sizes."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--rows", type=int, nargs="+", default=[2, 16, 512, 4096], help=rows_help)
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=list(DTYPES))
    ap.add_argument("--target-s", type=float, default=0.3, help="timing budget per measurement")
    ap.add_argument("--quick", action="store_true", help="short timings, fp32 only at 16 rows")
    ap.add_argument("--check", action="store_true", help="also compare each config with the _ref")
    return ap


def rows_configs(args):
    """(dtype name, dtype, rows) to run for a rows_parser command line (--quick: fp32 at 16 rows only)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (the Triton kernel needs one)")
    for name in args.dtype:
        dtype = DTYPES[name]
        for R in args.rows:
            if not (args.quick and dtype == torch.float32 and R != 16):
                yield name, dtype, R


def codebook_parser(doc: str, dtype_help: str):
    """The command line of the codebook-op benchmarks (code_search, vq_lookup); each adds its sizes."""
    import argparse

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="CUDA: few configs, short timing (< 20 s)")
    p.add_argument("--codebook", type=int, default=8192)
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--dtype", nargs="+", default=None, choices=list(DTYPES), help=dtype_help)
    p.add_argument("--target-s", type=float, default=0.5, help="timing budget per measurement")
    p.add_argument("--threads", type=int, default=None, help="torch and OpenMP threads (default: torch's)")
    return p


def run_model_bench(doc: str, unit: str, kernel_line: str, per_unit: Callable[[float], None],
                    model: Callable[[int, float], None], detailflow16: Callable[[int, float], None]) -> None:
    """The command line of the fused-step benchmarks (bench_decode_layer, bench_prior_step): the
    per-`unit` table unless --skip-<unit>s, then --model and --detailflow16 end to end."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", action="store_true", help="also time the embedded model end to end")
    ap.add_argument("--detailflow16", action="store_true", help="also time DetailFlow-16 size (random weights)")
    ap.add_argument(f"--skip-{unit}s", dest="skip", action="store_true", help=f"no per-{unit} table")
    ap.add_argument("--repeats", type=int, default=5, help="--model / --detailflow16: interleaved runs per side")
    ap.add_argument("--cfg-scale", type=float, default=1.45)
    ap.add_argument("--target-s", type=float, default=0.3, help=f"per-{unit} timing: seconds per measurement")
    args = ap.parse_args()
    print(f"# cpu x{torch.get_num_threads()}, {kernel_line}")
    if not args.skip:
        per_unit(args.target_s)
    if args.model:
        model(args.repeats, args.cfg_scale)
    if args.detailflow16:
        detailflow16(args.repeats, args.cfg_scale)
