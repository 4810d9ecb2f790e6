"""Peak memory of loading + one batch-1 generation, per dtype and weights mode (issue 22 item 4).

Writes DetailFlow-16-size random weights once as official-layout fp32 checkpoints (as released:
the prior's `checkpoints/N.pt` holds `model` and `ema`, the tokenizer's `model`), then runs each
mode in a fresh process: `DetailFlowPipeline.from_pretrained(...)` and one generation of one
image (CFG 1.45, greedy). Reports the process's peak RSS (ru_maxrss: pages of the memory-mapped
checkpoint count, as a container's limit counts them), the bytes of the parameters the model
holds for inference, and the target 1.2 x parameters + 400 MB.

    python -m benchmarks.bench_memory                          # bf16 and fp32, native and int8
    python -m benchmarks.bench_memory --modes bf16:native --no-encoder
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import detailflow_engine  # the threading policy first
import torch
from detailflow_engine.pipeline import DetailFlowPipeline

prior, tok, dtype, weights, encoder = sys.argv[1:6]
t0 = time.perf_counter()
kw = {} if encoder == "default" else {"encoder": encoder == "yes"}
pipe = DetailFlowPipeline.from_pretrained(prior, tok, device="cpu", dtype=dtype, weights=weights, **kw)
load_s = time.perf_counter() - t0
rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
pipe.generate([3], cfg_scale=1.45, top_k=1)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
held = pipe.held_parameter_bytes() if hasattr(pipe, "held_parameter_bytes") else sum(
    t.numel() * t.element_size() for m in (pipe.prior, pipe.tokenizer) for t in m.state_dict().values())
print(json.dumps(dict(load_s=load_s, peak_rss_load=rss_load, peak_rss=rss, param_bytes=held)))
"""


def write_checkpoints(root: Path) -> tuple:
    import torch
    import yaml

    from detailflow_engine.presets import PRESETS, preset_configs, randomize_
    from detailflow_ref.gpt import Transformer
    from detailflow_ref.tokenizer import VQModel

    pj, py, tj, ty = PRESETS["detailflow16"]
    pcfg, tcfg = preset_configs("detailflow16")
    out = []
    for name, cfg_json, cfg_yaml, build in (("prior", pj, py, lambda: Transformer(pcfg)),
                                           ("tokenizer", tj, ty, lambda: VQModel(tcfg))):
        folder = root / name
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(cfg_json))
        (folder / "config.yaml").write_text(yaml.safe_dump(cfg_yaml))
        sd = randomize_(build(), 0).state_dict()
        obj = {"model": sd, "ema": sd} if name == "prior" else {"model": sd}
        torch.save(obj, folder / "checkpoints" / "1.pt")
        out.append(folder)
        del sd, obj
    return tuple(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=["bf16:native", "bf16:int8", "bf16:int4", "bf16:w8a8", "bf16:w4a8", "fp32:native", "fp32:int8"],
                    help="dtype:weights pairs")
    ap.add_argument("--encoder", choices=["default", "yes", "no"], default="default",
                    help="from_pretrained(encoder=...): default leaves the argument out")
    ap.add_argument("--dir", default=None, help="keep the checkpoints here (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.dir or tmp)
        if (root / "prior" / "checkpoints" / "1.pt").is_file():
            prior, tok = root / "prior", root / "tokenizer"
        else:
            prior, tok = write_checkpoints(root)
        print(f"# checkpoints: prior {os.path.getsize(prior / 'checkpoints' / '1.pt') / 1e9:.2f} GB (model + ema), "
              f"tokenizer {os.path.getsize(tok / 'checkpoints' / '1.pt') / 1e9:.2f} GB, fp32; encoder={args.encoder}")
        print("| dtype | weights | load s | peak RSS after load GB | peak RSS GB | parameters held GB "
              "| target GB (1.2 x params + 0.4) | peak / target |")
        print("|---|---|---|---|---|---|---|---|")
        for mode in args.modes:
            dtype, weights = mode.split(":")
            res = subprocess.run([sys.executable, "-c", CHILD, str(prior), str(tok), dtype, weights, args.encoder],
                                 capture_output=True, text=True)
            if res.returncode:
                print(f"| {dtype} | {weights} | failed: {res.stderr.strip().splitlines()[-1]} |")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            target = 1.2 * r["param_bytes"] + 400e6
            print(f"| {dtype} | {weights} | {r['load_s']:.1f} | {r['peak_rss_load'] / 1e9:.2f} | {r['peak_rss'] / 1e9:.2f} "
                  f"| {r['param_bytes'] / 1e9:.2f} | {target / 1e9:.2f} | {r['peak_rss'] / target:.2f} |", flush=True)


if __name__ == "__main__":
    main()
