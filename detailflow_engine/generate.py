"""python -m detailflow_engine.generate: class labels -> PNGs, manifest.jsonl, grid.png (+ strips, npz).

    python -m detailflow_engine.generate --out samples                        # the embedded default model
    python -m detailflow_engine.generate --ckpt PRIOR --tokenizer TOK --classes 207,360 --num-per-class 4

    torchrun --nproc-per-node 4 -m detailflow_engine.generate --num-images 50000 --npz --out fid50k
    python -m detailflow_engine.generate --ckpt ByteVisionLab/DetailFlow-16-GPT-L \
        --tokenizer ByteVisionLab/DetailFlow-16 --classes 207 --num-per-class 8   # Hub repo ids

Image i (global index) gets class classes[i % len(classes)] with --num-images, or classes[i // n]
with --num-per-class n, and seed --seed + i. The pipeline keys every draw by (seed, token
position), so an image depends only on (model, settings, class, seed), never on --batch-size or
on how many processes share the run.

Multi-process (torchrun sets WORLD_SIZE/RANK/LOCAL_RANK): rank r generates the images
todo[r::world] (gloo on CPU, nccl on CUDA with one GPU per local rank) and writes their PNGs
itself (atomically); after every round of batches the ranks all-gather the finished images'
manifest records and rank 0 appends them, then writes grid.png and the .npz at the end. The
output folder is byte-identical to a single-process run's.

Safety: everything (arguments, --out, the models, the classes, a resumed manifest) is checked
before anything is created in --out; bad input is one ``error: ...`` line on stderr and exit 2.
Existing outputs are never replaced without --overwrite; --resume finishes an interrupted run.
Files are written atomically (temp file + os.replace) and the manifest is appended (and fsynced)
one line per finished image, so an interrupted run leaves only whole files behind.

Where the parts live: the flag checks shared with the other CLIs in ``cli``, the sampling flags'
checks in ``sampling_settings``, torchrun in ``distributed``, and the --out bookkeeping (what the
folder holds, --resume against the manifest, --overwrite cleanup, grid and npz) in ``run_folder``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import List, Optional

from detailflow_engine import cli, outputs, run_folder
from detailflow_engine.cli import (Parser, UsageError, check_out_writable, int_items, load_pipeline, one_line,
                                   settings_from_args)
from detailflow_engine.device_dtype import DEVICES, DTYPES, WEIGHT_MODES, WEIGHTS_HELP
from detailflow_engine.distributed import DIST_TIMEOUT_S, Dist
from detailflow_engine.sampling_settings import SETTING_NAMES, SettingsError, seed_list

EXIT_FAILED = 1  # the run started and could not finish (disk full, a peer process gone)
MAX_IMAGES = 10_000_000  # one run's plan is held in memory: 10 M images is 50x FID-50k


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m detailflow_engine.generate",
               description="Generate class-conditional images with a DetailFlow prior + tokenizer.")
    m = p.add_argument_group("model (both or neither; neither = the embedded default model)")
    m.add_argument("--ckpt", metavar="PATH|REPO", help="prior: model folder, .pt or .safetensors, or a Hugging "
                   "Face repo id owner/name[@revision] (a local path wins)")
    m.add_argument("--tokenizer", metavar="PATH|REPO", help="tokenizer: model folder, .pt or .safetensors, or a "
                   "Hugging Face repo id")
    m.add_argument("--device", default="auto", choices=DEVICES, help="default: auto "
                   "(under torchrun, cuda means the GPU of the local rank)")
    m.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="default: fp32")
    m.add_argument("--no-cuda-graphs", action="store_true",
                   help="on a GPU, launch each decode step's kernels eagerly instead of replaying CUDA graphs")
    m.add_argument("--weights", default="native", choices=WEIGHT_MODES, help=WEIGHTS_HELP)

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
    o.add_argument("--dist-timeout", type=float, default=DIST_TIMEOUT_S, metavar="S",
                   help=f"torchrun: how long a process waits for its peers before failing (default {DIST_TIMEOUT_S} s)")
    o.add_argument("--grid-max", type=int, default=1024, metavar="N",
                   help="grid.png tiles the first N images (default: 1024; 0 = no grid)")
    return p


# ---------------------------------------------------------------------- argument checks

def parse_classes(tokens: List[str]) -> Optional[List[int]]:
    """['1,2', '3'] -> [1, 2, 3]; ['all'] -> None (every class of the model). An empty item between
    commas ('1,,2', '1,', ',2') is refused: it is a typo, not a class."""
    items = []
    for tok in tokens:
        parts = tok.split(",")
        for part in parts:
            words = part.split()
            if not words and len(parts) > 1:
                raise UsageError(f"--classes {tok!r}: empty class id between commas (give ids like 1,2)")
            items += words
    if not items:
        raise UsageError("--classes is empty: give class ids or 'all'")
    if any(t.lower() == "all" for t in items):
        if len(items) > 1:
            raise UsageError("--classes: give 'all' alone or a list of class ids, not both")
        return None
    return int_items("--classes", items, "class id")


def check_numbers(args) -> None:
    """The flags' own ranges (the sampling flags: SamplingSettings); the model-dependent ones come later."""
    def bad(msg):
        raise UsageError(msg)

    settings_from_args(args)
    if args.num_images is not None and not 1 <= args.num_images <= MAX_IMAGES:
        bad(f"--num-images must be in 1..{MAX_IMAGES:,}, got {args.num_images}")
    if args.num_per_class is not None and not 1 <= args.num_per_class <= MAX_IMAGES:
        bad(f"--num-per-class must be in 1..{MAX_IMAGES:,}, got {args.num_per_class}")
    if args.batch_size < 1:
        bad(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0 < args.dist_timeout < math.inf:
        bad(f"--dist-timeout must be a positive number of seconds, got {args.dist_timeout}")
    if args.grid_max < 0:
        bad(f"--grid-max must be >= 0, got {args.grid_max}")
    if (args.ckpt is None) != (args.tokenizer is None):
        bad("--ckpt and --tokenizer go together: give both, or neither for the embedded default model")


def plan_images(args, classes: List[int]) -> List[tuple]:
    """[(index, class, seed)] for the whole run."""
    if args.num_images is not None:
        labels = [classes[i % len(classes)] for i in range(args.num_images)]
    else:
        per = 1 if args.num_per_class is None else args.num_per_class
        if per * len(classes) > MAX_IMAGES:
            raise UsageError(f"--num-per-class {per} x {len(classes)} classes = {per * len(classes):,} images, "
                             f"more than {MAX_IMAGES:,} in one run: split it over several --out folders")
        labels = [c for c in classes for _ in range(per)]
    try:
        seeds = seed_list(args.seed, len(labels))
    except SettingsError as e:
        raise UsageError(f"--seed {args.seed}: {e}") from None
    return [(i, c, s) for i, (c, s) in enumerate(zip(labels, seeds))]



# ---------------------------------------------------------------------- main

def main(argv: Optional[List[str]] = None) -> int:
    dist = None

    def body(argv):
        nonlocal dist
        dist = Dist()
        return _run(argv, dist)

    try:  # torchrun: one copy of a usage error, from rank 0
        return cli.run(body, argv, report=lambda: dist is None or not dist.active or dist.rank == 0)
    finally:
        if dist is not None:
            dist.close()


def _run(argv, dist: Dist) -> int:
    """_main, with a failure after the start (disk full, a peer gone) as one line and exit 1."""
    try:
        return _main(argv, dist)
    except OSError as e:  # mid-run: disk full, folder removed; what was finished stays recorded
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"error: writing the outputs failed{where}: {e.strerror or one_line(e)}; the finished images "
              f"are recorded in the manifest: fix it and rerun with --resume", file=sys.stderr)
        return EXIT_FAILED
    except RuntimeError as e:
        if not dist.active:
            raise
        # a collective that timed out or lost a peer (torch.distributed raises RuntimeError / DistError)
        print(f"error: rank {dist.rank}: a peer process stopped answering ({one_line(e)[:200]}); the finished "
              f"images are recorded: rerun with --resume", file=sys.stderr)
        return EXIT_FAILED


def _main(argv, dist: Dist) -> int:
    args = build_parser().parse_args(argv)
    check_numbers(args)
    device = dist.init(args.device, args.dist_timeout)
    # Every rank runs the same checks; they agree before anything is written, so a problem that
    # shows on one rank only (its GPU, a file) stops all of them with that rank's message.
    error, prepared = None, None
    try:
        prepared = _prepare(args, device)
    except UsageError as e:
        error = str(e)
    dist.agree(error)
    pipe, out, plan, settings, records, clean, size, found = prepared
    try:
        return _generate(args, pipe, out, plan, settings, records, clean, size, found, dist)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished images are in {out}; rerun the same command with --resume "
              f"to finish", file=sys.stderr)
        return 130


def _prepare(args, device):
    """All checks and the model, with nothing written:
    -> (pipe, out, plan, settings, records, clean, size, what --out held)."""
    class_list = parse_classes(args.classes)
    out = Path(args.out)
    check_out_writable(out)

    pipe, prior_path, tok_path = load_pipeline(args, device)

    num_classes = pipe.prior.config.num_classes
    classes = list(range(num_classes)) if class_list is None else class_list
    for c in classes:
        if not 0 <= c < num_classes:
            raise UsageError(f"--classes: class {c} is outside [0, {num_classes}) for this model")
    try:
        steps = pipe.prior.config.generation_plan(args.num_tokens)
    except ValueError as e:
        raise UsageError(f"--num-tokens: {one_line(e)}") from None
    num_tokens = steps[-1].stop
    size = pipe.tokenizer.schedule.decode_size(num_tokens)
    plan = plan_images(args, classes)
    settings = {**settings_from_args(args).with_num_tokens(num_tokens).kwargs(),
                "ckpt": str(prior_path), "tokenizer": str(tok_path), "ema": True, "dtype": args.dtype,
                "weights": args.weights, "progressive": args.progressive,
                # a newer checkpoints/<N>.pt in the same folder is other weights: --resume must notice
                "prior_sha256": outputs.weights_fingerprint(pipe.prior),
                "tokenizer_sha256": outputs.weights_fingerprint(pipe.tokenizer)}
    records, clean, found = run_folder.existing_run(out, args, plan, settings)
    return pipe, out, plan, settings, records, clean, size, found


def _generate(args, pipe, out: Path, plan, settings, records, clean, size, found, dist: Dist) -> int:
    from tqdm import tqdm

    from detailflow_engine.outputs import to_uint8

    manifest_path = out / outputs.MANIFEST
    lead = dist.rank == 0  # the one process that writes the manifest, grid and npz
    if args.overwrite:
        records, clean = [], True
    # keep the recorded images whose PNG (and strip) is really there; the rest are made again
    done = {}
    for i, rec in outputs.records_by_index(records).items():
        if (out / outputs.image_name(i)).is_file() and (
                not args.progressive or (out / outputs.progressive_name(i)).is_file()):
            done[i] = rec
    todo = [item for item in plan if item[0] not in done]
    world, bs = max(dist.world, 1), args.batch_size
    mine = todo[dist.rank::world]  # this rank's images; their seeds stay those of their global index
    batches = [mine[b:b + bs] for b in range(0, len(mine), bs)]
    rounds = max(-(-len(todo[r::world]) // bs) for r in range(world))  # every rank loops the same count

    sampling = {k: settings[k] for k in SETTING_NAMES}  # as checked by check_numbers, num_tokens resolved

    def run_batch(batch):
        previews = []

        def keep_preview(step, tokens, preview):
            previews.append(to_uint8(preview()).cpu().numpy())

        result = pipe.generate([c for _, c, _ in batch], seed=[s for _, _, s in batch], **sampling,
                               callback=keep_preview if args.progressive else None)
        return result.uint8, previews

    # the device type, not cuda:<rank>: records do not depend on which rank made the image
    record_base = dict(settings, device=pipe.device.type, size=size)
    t0 = time.perf_counter()
    bar = None  # shown once the run is under way: no bar above a setup error's one line
    manifest = lock = None
    try:
        # The first batch runs before --out is touched: a model that cannot run here (an op
        # without a kernel for this device/dtype) fails with --out as it was.
        first, error = None, None
        if batches:
            try:
                first = run_batch(batches[0])
            except NotImplementedError as e:
                error = (f"the model cannot run with --device {pipe.device.type} --dtype {args.dtype}: "
                         f"{one_line(e)}")
        dist.agree(error)

        error = None
        if lead:  # set up --out while the other ranks wait at the next check point
            try:
                out.mkdir(parents=True, exist_ok=True)
                lock = run_folder.take_folder(out, found)
                outputs.remove_stale_temps(out)
                if args.overwrite:
                    run_folder.remove_previous_run(out, plan, args)
                if args.overwrite or not clean or len(done) != len(records) or not manifest_path.exists():
                    outputs.write_manifest(manifest_path, [done[i] for i in sorted(done)])
                manifest = outputs.ManifestAppender(manifest_path)
            except OSError as e:
                error = f"cannot create --out {out}: {one_line(e)}"
            except UsageError as e:
                error = str(e)
        dist.agree(error)
        bar = tqdm(total=len(plan), initial=len(done), unit="img", file=sys.stderr, desc="generate",
                   dynamic_ncols=True, disable=not lead)

        for k in range(rounds):
            finished = []
            if k < len(batches):
                images, previews = first if k == 0 else run_batch(batches[k])
                first = None
                for j, (i, cls, seed) in enumerate(batches[k]):
                    rec = dict(record_base, file=outputs.image_name(i), index=i, seed=seed, **{"class": cls})
                    if args.progressive:
                        strip = outputs.progressive_strip([p[j] for p in previews], size)
                        run_folder.save_own(out / outputs.progressive_name(i), strip, args.overwrite)
                        rec["progressive_file"] = outputs.progressive_name(i)
                    run_folder.save_own(out / outputs.image_name(i), images[j], args.overwrite)
                    if dist.active:
                        finished.append(rec)
                    else:  # single process: record each image as soon as its files are in place
                        manifest.append(rec)
                        done[i] = rec
                        bar.update(1)
                del images, previews
            if dist.active:  # the ranks' PNGs of this round are in place: rank 0 records them
                gathered = sorted((r for part in dist.gather(finished) for r in part), key=lambda r: r["index"])
                if lead:
                    for rec in gathered:
                        manifest.append(rec)
                        done[rec["index"]] = rec
                    bar.update(len(gathered))
        if not lead:
            return 0
        run_folder.write_run_outputs(args, out, plan, done, manifest_path)
    except UsageError:
        if bar is not None:
            bar.leave = False  # erase the bar: the error is the one line left
        raise
    finally:
        if bar is not None:
            bar.close()
        if manifest is not None:
            manifest.close()
        if lock is not None:
            lock.release()
    dt = time.perf_counter() - t0
    n = len(todo)
    kept = f"; {len(plan) - n} were already there" if len(plan) > n else ""
    procs = f" by {world} processes" if dist.active else ""
    print(f"wrote {n} image{'' if n == 1 else 's'} to {out}{procs} in {dt:.1f} s ({n / max(dt, 1e-9):.2f} images/s){kept}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
