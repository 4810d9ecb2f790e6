"""The report of `python -m detailflow_engine.profile`: the run's numbers as one dict (the --json
output) and as text tables (stages engine beside reference, per-op rows, floors, memory)."""
from __future__ import annotations

import sys
from typing import Optional

import torch

from detailflow_engine.profiling.instrument import STAGES

# About how much RAM a random-weights preset's profile needs at its peak, GB: (engine only, with
# --compare-reference). Measured (peak RSS, /usr/bin/time -v) on the 2-core CPU box, fp32, batch 1: 4.9 / 7.9.
PRESET_PEAK_GB = {"detailflow16": (5, 8)}


def preset_peak_text(preset: str, with_reference: bool) -> str:
    alone, with_ref = PRESET_PEAK_GB[preset]
    return (f"peaks at about {with_ref} GB of RAM with --compare-reference (about {alone} GB without)"
            if with_reference else f"peaks at about {alone} GB of RAM (about {with_ref} GB with --compare-reference)")


def peak_rss_bytes() -> Optional[int]:
    """This process's peak resident memory so far (None where the OS does not say)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def build_report(args, device, dtype, pipe, eng, ref, floors, stage_floor, tokens_equal, weight_bytes,
                 decoder_flops) -> dict:
    total_floor = sum(stage_floor.values())

    def side(prefix: str, run, stage: Optional[str]) -> dict:
        """Columns of one run: unprofiled (timed) ms and share, profiled ms and share, calls."""
        if stage is None:  # unattributed
            ms, pms = run.timed_unattributed_s * 1e3, run.unattributed_us / 1e3
        elif stage == "total":
            ms, pms = run.wall_s * 1e3, run.total_us / 1e3
        else:
            ms, pms = run.timed_stages_s[stage] * 1e3, run.stages_us[stage] / 1e3
        row = {f"{prefix}_ms": ms, f"{prefix}_share": ms / (run.wall_s * 1e3),
               f"{prefix}_profiled_ms": pms, f"{prefix}_profiled_share": pms / (run.total_us / 1e3)}
        if stage not in (None, "total"):
            row[f"{prefix}_calls"] = run.stage_calls[stage]
        return row

    def vs(ms: float, floor_s: float):
        return ms / 1e3 / floor_s if floor_s > 0 else None

    def low(x) -> bool:  # a stage faster than its floor: the floor, not the stage, is off
        return x is not None and x < 1.0

    stages = []
    for s in STAGES + (None, "total"):
        name = {None: "unattributed", "total": "total"}.get(s, s)
        floor_s = total_floor if s == "total" else stage_floor.get(s, 0.0)
        row = dict(stage=name, **side("engine", eng, s))
        if s is not None:
            row.update(floor_ms=floor_s * 1e3, engine_vs_floor=vs(row["engine_ms"], floor_s))
            row["floor_measured_low"] = low(row["engine_vs_floor"])
        if ref is not None:
            row.update(side("reference", ref, s))
            row["ratio"] = row["reference_ms"] / row["engine_ms"] if row["engine_ms"] > 0 and s is not None else None
            if s is not None:
                row["reference_vs_floor"] = vs(row["reference_ms"], floor_s)
                row["floor_measured_low"] = row["floor_measured_low"] or low(row["reference_vs_floor"])
        stages.append(row)
    cfg = pipe.prior.config
    report = dict(
        config=dict(model=args.random_weights and f"random {args.random_weights}" or args.ckpt or "embedded default",
                    device=str(device), dtype=str(dtype).replace("torch.", ""), weights=args.weights,
                    batch_size=args.batch_size, cfg_scale=args.cfg_scale, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, threads=torch.get_num_threads(), torch=torch.__version__,
                    repeats=args.repeats, reference_repeats=args.reference_repeats if ref is not None else None,
                    prior=dict(dim=cfg.dim, n_layer=cfg.n_layer, vocab=cfg.vocab_size, tokens=cfg.block_size,
                               group_size=cfg.group_size, causal_num=cfg.causal_num),
                    image_size=pipe.tokenizer.image_size),
        wall_s=dict(engine=eng.wall_s, reference=ref.wall_s if ref else None),
        profiled_s=dict(engine=eng.total_us / 1e6, reference=ref.total_us / 1e6 if ref else None),
        floors=dict(floors, weights_streamed_per_step_bytes=weight_bytes, decoder_flops=decoder_flops,
                    total_ms=total_floor * 1e3),
        stages=stages,
        memory=dict(peak_rss_bytes=peak_rss_bytes(),
                    preset_peak=(preset_peak_text(args.random_weights, ref is not None)
                                 if args.random_weights in PRESET_PEAK_GB else None)),
        ops=dict(engine=eng.ops, reference=ref.ops if ref else None),
        gpu_kernels=dict(engine=eng.gpu_kernels, reference=ref.gpu_kernels if ref else None),
        tokens_identical=tokens_equal,
    )
    return report


def _fmt_ms(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _fmt_x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _fmt_pct(v) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def _fmt_vs_floor(v) -> str:
    """engine/floor: below 1x the floor itself was measured low, and the cell says so."""
    return _fmt_x(v) + (" (floor measured low)" if v is not None and v < 1.0 else "")


def format_text(rep: dict, max_ops: int) -> str:
    c, fl = rep["config"], rep["floors"]
    has_ref = rep["ops"]["reference"] is not None
    lines = [f"# DetailFlow profile: {c['model']} ({c['prior']['n_layer']}x{c['prior']['dim']} prior, "
             f"{c['prior']['tokens']} tokens, {c['image_size']} px), batch {c['batch_size']}, cfg {c['cfg_scale']}, "
             f"top_k {c['top_k']}, {c['dtype']} ({c['weights']} weights), {c['device']}, {c['threads']} threads, "
             f"torch {c['torch']}",
             f"# stages: unprofiled runs (the median-wall one of {c['repeats']}"
             + (f" / {c['reference_repeats']}" if has_ref else "")
             + "; perf_counter at stage boundaries, exclusive); ops: one more run under torch.profiler "
             f"(its overhead included). wall: engine {rep['wall_s']['engine'] * 1e3:.1f} ms"
             + (f", reference {rep['wall_s']['reference'] * 1e3:.1f} ms "
                f"({rep['wall_s']['reference'] / rep['wall_s']['engine']:.2f}x)" if has_ref else "")
             + f"; under the profiler: engine {rep['profiled_s']['engine'] * 1e3:.1f} ms"
             + (f", reference {rep['profiled_s']['reference'] * 1e3:.1f} ms" if has_ref else ""),
             f"# floors (measured now, best of {fl.get('read_repeats', '?')} reads and "
             f"{fl.get('gemm_repeats', '?')} GEMMs, before and after the runs): read {fl['read_gbs']:.1f} GB/s, "
             f"GEMM {fl['gemm_gflops']:.0f} GFLOP/s "
             f"({fl['gemm_dtype']}, n={fl['gemm_n']}); prior weights streamed/step "
             f"{fl['weights_streamed_per_step_bytes'] / 1e6:.1f} MB; decoder {fl['decoder_flops'] / 1e9:.2f} GFLOP",
             _memory_line(rep.get("memory") or {}),
             ""]
    if has_ref:
        lines += ["| stage | engine ms | share | reference ms | share | ref/engine | floor ms | engine/floor "
                  "| ref/floor |",
                  "|---|---|---|---|---|---|---|---|---|"]
    else:
        lines += ["| stage | engine ms | share | floor ms | engine/floor |", "|---|---|---|---|---|"]
    for r in rep["stages"]:
        if has_ref:
            lines.append(f"| {r['stage']} | {_fmt_ms(r['engine_ms'])} | {_fmt_pct(r['engine_share'])} | "
                         f"{_fmt_ms(r.get('reference_ms'))} | {_fmt_pct(r.get('reference_share'))} | "
                         f"{_fmt_x(r.get('ratio'))} | {_fmt_ms(r.get('floor_ms'))} | "
                         f"{_fmt_vs_floor(r.get('engine_vs_floor'))} | {_fmt_vs_floor(r.get('reference_vs_floor'))} |")
        else:
            lines.append(f"| {r['stage']} | {_fmt_ms(r['engine_ms'])} | {_fmt_pct(r['engine_share'])} | "
                         f"{_fmt_ms(r.get('floor_ms'))} | {_fmt_vs_floor(r.get('engine_vs_floor'))} |")
    low = [r["stage"] for r in rep["stages"] if r.get("floor_measured_low")]
    if low:
        lines.append(f"\nfloor measured low for {', '.join(low)}: the stage ran faster than its floor, so the floor "
                     f"is an underestimate here (a neighbour slowed the floor measurement, or the stage's shapes "
                     f"beat the n={fl['gemm_n']} probe GEMM); read such a stage as at its floor, not below it")
    if has_ref:
        t = rep["tokens_identical"]
        lines.append(f"\ntokens identical (engine vs reference): {'yes' if t['identical'] else 'NO'} "
                     f"({t['equal_fraction'] * 100:.1f}% of {t['count']} tokens equal)")
    for run in ("engine", "reference"):
        ops = rep["ops"][run]
        if ops is None:
            continue
        lines += ["", f"## ops: {run}", "| op | kind | calls | ms | share | GB/s | GFLOP/s |",
                  "|---|---|---|---|---|---|---|"]
        total = sum(o["ms"] for o in ops) or 1.0
        shown = [o for o in ops if o["category"] != "other"]
        others = [o for o in ops if o["category"] == "other"]
        shown_other, rest = others[:max(0, max_ops - len(shown))], others[max(0, max_ops - len(shown)):]
        rows = [o for o in ops if o in shown or o in shown_other]
        for o in rows:
            gbs = "-" if o["gbs"] is None else f"{o['gbs']:.1f}"
            gflops = "-" if o["gflops"] is None else f"{o['gflops']:.1f}"
            lines.append(f"| {o['name']} | {o['category']} | {o['calls']} | {o['ms']:.2f} | "
                         f"{o['ms'] / total * 100:.1f}% | {gbs} | {gflops} |")
        if rest:
            ms = sum(o["ms"] for o in rest)
            lines.append(f"| other aten ops ({len(rest)} kinds) | other | {sum(o['calls'] for o in rest)} | {ms:.2f} | "
                         f"{ms / total * 100:.1f}% | - | - |")
        kernels = rep["gpu_kernels"][run]
        if kernels:  # CUDA: device time by kernel (CPU rows above are launch-side times)
            lines += ["", f"## GPU kernels: {run}", "| kernel | calls | device ms |", "|---|---|---|"]
            lines += [f"| {k['name'][:80]} | {k['calls']} | {k['ms']:.3f} |" for k in kernels]
    return "\n".join(lines)


def _memory_line(mem: dict) -> str:
    peak = mem.get("peak_rss_bytes")
    line = "# memory: peak RSS of this process " + ("unknown" if peak is None else f"{peak / 1e9:.1f} GB")
    if mem.get("preset_peak"):
        line += f"; this random-weights profile {mem['preset_peak']}"
    return line
