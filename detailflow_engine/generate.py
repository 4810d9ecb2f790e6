"""python -m detailflow_engine.generate: class labels -> PNGs, manifest.jsonl, grid.png (+ strips, npz).

    python -m detailflow_engine.generate --out samples                        # the embedded default model
    python -m detailflow_engine.generate --ckpt PRIOR --tokenizer TOK --classes 207,360 --num-per-class 4

Image i (global index) gets class classes[i % len(classes)] with --num-images, or classes[i // n]
with --num-per-class n, and seed --seed + i. The pipeline keys every draw by (seed, token
position), so an image depends only on (model, settings, class, seed), never on --batch-size.

Safety: everything (arguments, --out, the models, the classes, a resumed manifest) is checked
before anything is created in --out; bad input is one ``error: ...`` line on stderr and exit 2.
Existing outputs are never replaced without --overwrite; --resume finishes an interrupted run.
Files are written atomically (temp file + os.replace) and the manifest is appended (and fsynced)
one line per finished image, so an interrupted run leaves only whole files behind.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import List, Optional

from detailflow_engine import outputs

EXIT_USAGE = 2
INT64_MAX = 2 ** 63 - 1
# A manifest record's settings: an image depends on these (plus its class and seed), so --resume
# requires them to match. device and batch size are recorded/ignored: they do not select the image.
SETTING_KEYS = ("cfg_scale", "temperature", "top_k", "top_p", "gradual_cfg", "num_tokens",
                "ckpt", "tokenizer", "ema", "dtype", "progressive")


class UsageError(Exception):
    """Bad input: reported as one ``error: ...`` line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors become one 'error: ...' line too
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m detailflow_engine.generate",
                description="Generate class-conditional images with a DetailFlow prior + tokenizer.")
    m = p.add_argument_group("model (both or neither; neither = the embedded default model)")
    m.add_argument("--ckpt", metavar="PATH", help="prior: model folder, .pt or .safetensors")
    m.add_argument("--tokenizer", metavar="PATH", help="tokenizer: model folder, .pt or .safetensors")
    m.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto")
    m.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="default: fp32")

    w = p.add_argument_group("what to generate")
    w.add_argument("--classes", nargs="+", metavar="C", default=["all"],
                   help="class ids, comma- or space-separated, or 'all' (default: all)")
    n = w.add_mutually_exclusive_group()
    n.add_argument("--num-images", type=int, metavar="N",
                   help="N images cycling through the classes (image i gets classes[i %% len])")
    n.add_argument("--num-per-class", type=int, metavar="N",
                   help="N images per class, class by class (default: 1)")
    w.add_argument("--seed", type=int, default=0, help="image i (global index) uses seed + i (default: 0)")
    w.add_argument("--num-tokens", type=int, metavar="T",
                   help="stop at this step boundary: a coarser image (default: all tokens)")

    s = p.add_argument_group("sampling")
    s.add_argument("--cfg-scale", type=float, default=1.45, help="classifier-free guidance, > 1 enables it "
                   "(default: 1.45)")
    s.add_argument("--temperature", type=float, default=1.0, help="default: 1.0")
    s.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    s.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]; 1 = off (default)")
    s.add_argument("--gradual-cfg", action="store_true", help="decay the CFG scale over the group steps")
    s.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: 16); "
                   "does not change the images")

    o = p.add_argument_group("output")
    o.add_argument("--out", default="samples", metavar="DIR", help="output folder (default: samples)")
    e = o.add_mutually_exclusive_group()
    e.add_argument("--overwrite", action="store_true", help="replace the outputs of a previous run in --out")
    e.add_argument("--resume", action="store_true",
                   help="finish an interrupted run: keep the images in its manifest, generate the rest")
    o.add_argument("--progressive", action="store_true",
                   help="also write {index:06d}_progressive.png: the decoded prefix after every step, "
                        "nearest-neighbour upsampled to the final size, left to right")
    o.add_argument("--npz", action="store_true",
                   help="also write samples.npz for the ADM evaluator (key arr_0, uint8 [N, H, W, 3])")
    o.add_argument("--grid-max", type=int, default=1024, metavar="N",
                   help="grid.png tiles the first N images (default: 1024; 0 = no grid)")
    return p


# ---------------------------------------------------------------------- argument checks

def parse_classes(tokens: List[str]) -> Optional[List[int]]:
    """['1,2', '3'] -> [1, 2, 3]; ['all'] -> None (every class of the model)."""
    items = [t for tok in tokens for t in re.split(r"[,\s]+", tok.strip()) if t]
    if not items:
        raise UsageError("--classes is empty: give class ids or 'all'")
    if any(t.lower() == "all" for t in items):
        if len(items) > 1:
            raise UsageError("--classes: give 'all' alone or a list of class ids, not both")
        return None
    out = []
    for t in items:
        try:
            out.append(int(t))
        except ValueError:
            raise UsageError(f"--classes: {t!r} is not an integer class id") from None
    return out


def check_numbers(args) -> None:
    def bad(msg):
        raise UsageError(msg)

    if args.cfg_scale < 0 or args.cfg_scale != args.cfg_scale:
        bad(f"--cfg-scale must be >= 0, got {args.cfg_scale}")
    if args.temperature < 0 or args.temperature != args.temperature:
        bad(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k < 0:
        bad(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        bad(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.num_images is not None and args.num_images < 1:
        bad(f"--num-images must be >= 1, got {args.num_images}")
    if args.num_per_class is not None and args.num_per_class < 1:
        bad(f"--num-per-class must be >= 1, got {args.num_per_class}")
    if args.batch_size < 1:
        bad(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_tokens is not None and args.num_tokens < 1:
        bad(f"--num-tokens must be >= 1, got {args.num_tokens}")
    if args.grid_max < 0:
        bad(f"--grid-max must be >= 0, got {args.grid_max}")
    if (args.ckpt is None) != (args.tokenizer is None):
        bad("--ckpt and --tokenizer go together: give both, or neither for the embedded default model")


def check_out_writable(out: Path) -> None:
    """--out must be a writable folder, or creatable: checked without creating anything."""
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"--out {out} exists and is not a folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise UsageError(f"--out {out} is not writable")
        return
    anc = out.absolute().parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise UsageError(f"cannot create --out {out}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UsageError(f"cannot create --out {out}: {anc} is not writable")


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg


def load_pipeline(args):
    """-> (pipeline, prior path, tokenizer path); any loading problem is a UsageError."""
    from detailflow_engine.loading import resolve_device

    try:
        resolve_device(args.device)
    except ValueError as e:
        raise UsageError(f"--device {args.device}: {_one_line(e)}") from None
    if args.ckpt is None:
        from detailflow_engine.assets import default_model_paths

        try:
            prior_path, tok_path = default_model_paths()
        except FileNotFoundError as e:
            raise UsageError(_one_line(e)) from None
    else:
        prior_path, tok_path = Path(args.ckpt), Path(args.tokenizer)
        for flag, path in (("--ckpt", prior_path), ("--tokenizer", tok_path)):
            if not path.exists():
                raise UsageError(f"{flag} {path} does not exist")
    from detailflow_engine.pipeline import DetailFlowPipeline

    try:
        pipe = DetailFlowPipeline.from_pretrained(prior_path, tok_path, device=args.device, dtype=args.dtype)
    except (ValueError, OSError) as e:  # CheckpointError / ConfigError are ValueErrors
        raise UsageError(f"cannot load the model (--ckpt {prior_path}, --tokenizer {tok_path}): "
                         f"{_one_line(e)}") from None
    except Exception as e:  # anything else from a foreign file: still one line, no traceback
        raise UsageError(f"cannot load the model (--ckpt {prior_path}, --tokenizer {tok_path}): "
                         f"{type(e).__name__}: {_one_line(e)}") from None
    return pipe, Path(prior_path).resolve(), Path(tok_path).resolve()


def plan_images(args, classes: List[int]) -> List[tuple]:
    """[(index, class, seed)] for the whole run."""
    if args.num_images is not None:
        labels = [classes[i % len(classes)] for i in range(args.num_images)]
    else:
        per = 1 if args.num_per_class is None else args.num_per_class
        labels = [c for c in classes for _ in range(per)]
    if not -(2 ** 63) <= args.seed or args.seed + len(labels) - 1 > INT64_MAX:
        raise UsageError(f"--seed {args.seed}: seed + image index must fit in int64")
    return [(i, c, args.seed + i) for i, c in enumerate(labels)]


def target_files(n: int, args) -> List[str]:
    names = [outputs.image_name(i) for i in range(n)]
    if args.progressive:
        names += [outputs.progressive_name(i) for i in range(n)]
    if args.grid_max:
        names.append(outputs.GRID)
    if args.npz:
        names.append(outputs.NPZ)
    return names


def check_resume(out: Path, records: List[dict], settings: dict, plan: List[tuple]) -> None:
    """Every recorded image must come from this run's settings, class and seed."""
    n = len(plan)
    for rec in records:
        i = int(rec["index"])
        if not 0 <= i < n:
            raise UsageError(f"--resume: {out / outputs.MANIFEST} records image {i} but this run has only {n} "
                             f"images (--num-images/--num-per-class/--classes differ); use the same "
                             f"settings, or --overwrite or a new --out")
        for key in SETTING_KEYS:
            if key not in rec or rec[key] != settings[key]:
                raise UsageError(f"--resume: setting {key} does not match: the manifest in {out} has "
                                 f"{key}={rec.get(key, '(missing)')!r}, this run has {key}={settings[key]!r}; "
                                 f"use the same settings, or --overwrite or a new --out")
        _, cls, seed = plan[i]
        for key, want in (("class", cls), ("seed", seed)):
            if rec.get(key) != want:
                raise UsageError(f"--resume: image {i} has {key}={rec.get(key)!r} in the manifest in {out}, "
                                 f"this run gives it {key}={want!r} (--classes/--seed/--num-* differ); "
                                 f"use the same settings, or --overwrite or a new --out")
        if rec.get("file") != outputs.image_name(i):
            raise UsageError(f"--resume: image {i} is recorded as {rec.get('file')!r}, expected "
                             f"{outputs.image_name(i)!r}")


# ---------------------------------------------------------------------- main

def main(argv: Optional[List[str]] = None) -> int:
    try:
        return _main(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


def _main(argv) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    check_numbers(args)
    class_list = parse_classes(args.classes)
    out = Path(args.out)
    check_out_writable(out)

    pipe, prior_path, tok_path = load_pipeline(args)
    from detailflow_engine.prior import step_plan

    num_classes = pipe.prior.config.num_classes
    classes = list(range(num_classes)) if class_list is None else class_list
    for c in classes:
        if not 0 <= c < num_classes:
            raise UsageError(f"--classes: class {c} is outside [0, {num_classes}) for this model")
    try:
        steps = step_plan(pipe.prior.config, args.num_tokens)
    except ValueError as e:
        raise UsageError(f"--num-tokens: {_one_line(e)}") from None
    num_tokens = steps[-1].stop
    size = pipe.tokenizer.schedule.decode_size(num_tokens)
    plan = plan_images(args, classes)
    settings = {"cfg_scale": args.cfg_scale, "temperature": args.temperature, "top_k": args.top_k,
                "top_p": args.top_p, "gradual_cfg": args.gradual_cfg, "num_tokens": num_tokens,
                "ckpt": str(prior_path), "tokenizer": str(tok_path), "ema": True, "dtype": args.dtype,
                "progressive": args.progressive}

    # ---- what is in --out already (still nothing written)
    manifest_path = out / outputs.MANIFEST
    records, clean = [], True
    if out.is_dir():
        if args.resume and manifest_path.exists():
            try:
                records, clean = outputs.read_manifest(manifest_path)
            except (outputs.ManifestError, OSError) as e:
                raise UsageError(f"--resume: {_one_line(e)}; use --overwrite or a new --out") from None
            check_resume(out, records, settings, plan)
        elif not args.resume and not args.overwrite:
            present = [name for name in [outputs.MANIFEST] + target_files(len(plan), args)
                       if (out / name).exists()]
            if present:
                more = f" and {len(present) - 3} more" if len(present) > 3 else ""
                raise UsageError(f"--out {out} already holds {', '.join(present[:3])}{more}: use --resume to "
                                 f"finish that run, --overwrite to replace it, or a new --out")
    try:
        return _generate(args, pipe, out, plan, settings, records, clean, size)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished images are in {out}; rerun the same command with --resume "
              f"to finish", file=sys.stderr)
        return 130


def _generate(args, pipe, out: Path, plan, settings, records, clean, size) -> int:
    from tqdm import tqdm

    from detailflow_engine.pipeline import to_uint8

    manifest_path = out / outputs.MANIFEST
    if args.overwrite:
        records, clean = [], True
    # keep the recorded images whose PNG (and strip) is really there; the rest are made again
    done = {}
    for i, rec in outputs.records_by_index(records).items():
        if (out / outputs.image_name(i)).is_file() and (
                not args.progressive or (out / outputs.progressive_name(i)).is_file()):
            done[i] = rec
    todo = [item for item in plan if item[0] not in done]
    batches = [todo[b:b + args.batch_size] for b in range(0, len(todo), args.batch_size)]

    def run_batch(batch):
        previews = []

        def keep_preview(step, tokens, preview):
            previews.append(to_uint8(preview()).cpu().numpy())

        result = pipe.generate([c for _, c, _ in batch], cfg_scale=args.cfg_scale, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, gradual_cfg=args.gradual_cfg,
                               seed=[s for _, _, s in batch], num_tokens=settings["num_tokens"],
                               callback=keep_preview if args.progressive else None)
        return result.uint8, previews

    record_base = dict(settings, device=str(pipe.device), size=size)
    t0 = time.perf_counter()
    bar = tqdm(total=len(plan), initial=len(done), unit="img", file=sys.stderr, desc="generate",
               dynamic_ncols=True)
    try:
        # The first batch runs before --out is touched: a model that cannot run here (an op
        # without a kernel for this device/dtype) fails with --out as it was.
        first = None
        if batches:
            try:
                first = run_batch(batches[0])
            except NotImplementedError as e:
                bar.leave = False  # erase the bar: the error is the one line left
                bar.close()
                raise UsageError(f"the model cannot run with --device {pipe.device.type} --dtype {args.dtype}: "
                                 f"{_one_line(e)}") from None

        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create --out {out}: {_one_line(e)}") from None
        outputs.remove_stale_temps(out)
        if args.overwrite:
            _remove_previous_run(out, plan, args)
        if args.overwrite or not clean or len(done) != len(records) or not manifest_path.exists():
            outputs.write_manifest(manifest_path, [done[i] for i in sorted(done)])

        with outputs.ManifestAppender(manifest_path) as manifest:
            for k, batch in enumerate(batches):
                images, previews = first if k == 0 else run_batch(batch)
                first = None
                for j, (i, cls, seed) in enumerate(batch):
                    rec = dict(record_base, file=outputs.image_name(i), index=i, seed=seed, **{"class": cls})
                    if args.progressive:
                        strip = outputs.progressive_strip([p[j] for p in previews], size)
                        outputs.save_png(out / outputs.progressive_name(i), strip)
                        rec["progressive_file"] = outputs.progressive_name(i)
                    outputs.save_png(out / outputs.image_name(i), images[j])
                    manifest.append(rec)
                    done[i] = rec
                    bar.update(1)
                del images, previews
    finally:
        bar.close()

    # ---- whole-run outputs, from the PNGs on disk
    outputs.write_manifest(manifest_path, [done[i] for i in sorted(done)])
    paths = [out / outputs.image_name(i) for i, _, _ in plan]
    if args.grid_max:
        shown = [outputs.load_png(p) for p in paths[:args.grid_max]]
        outputs.save_png(out / outputs.GRID, outputs.tile(shown, outputs.grid_columns(len(shown))))
    if args.npz:
        outputs.write_npz(out / outputs.NPZ, paths)
    outputs.fsync_dir(out)
    dt = time.perf_counter() - t0
    n = len(todo)
    kept = f"; {len(plan) - n} were already there" if len(plan) > n else ""
    print(f"wrote {n} images to {out} in {dt:.1f} s ({n / max(dt, 1e-9):.2f} images/s){kept}")
    return 0


def _remove_previous_run(out: Path, plan, args) -> None:
    """--overwrite: drop the replaced run's manifest and the files it recorded that this run will not
    rewrite (so the folder never mixes two runs); other files in --out are left alone."""
    manifest_path = out / outputs.MANIFEST
    old = []
    if manifest_path.exists():
        try:
            old, _ = outputs.read_manifest(manifest_path)
        except (outputs.ManifestError, OSError):
            old = []
    keep = {outputs.image_name(i) for i, _, _ in plan}
    if args.progressive:
        keep |= {outputs.progressive_name(i) for i, _, _ in plan}
    stale = set()
    for rec in old:
        for key in ("file", "progressive_file"):
            name = rec.get(key)
            if isinstance(name, str) and re.fullmatch(r"\d{6}(_progressive)?\.png", name):
                stale.add(name)
    for i, _, _ in plan:
        stale.add(outputs.progressive_name(i))  # an older --progressive strip of a replaced image
    for name in sorted(stale - keep) + ([outputs.GRID] if not args.grid_max else []) + \
            ([outputs.NPZ] if not args.npz else []):
        try:
            (out / name).unlink()
        except FileNotFoundError:
            pass


if __name__ == "__main__":
    sys.exit(main())
