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
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

from detailflow_engine import outputs

EXIT_USAGE = 2
EXIT_FAILED = 1  # the run started and could not finish (disk full, a peer process gone)
INT64_MAX = 2 ** 63 - 1
MAX_IMAGES = 10_000_000  # one run's plan is held in memory: 10 M images is 50x FID-50k
DIST_TIMEOUT_S = 600  # a collective waits this long for a peer (torch's default: 30 minutes)
# A manifest record's settings: an image depends on these (plus its class and seed), so --resume
# requires them to match. device and batch size are recorded/ignored: they do not select the image.
SETTING_KEYS = ("cfg_scale", "temperature", "top_k", "top_p", "gradual_cfg", "num_tokens",
                "ckpt", "tokenizer", "ema", "dtype", "weights", "progressive",
                "prior_sha256", "tokenizer_sha256")  # the weights as loaded, not just their folder


class UsageError(Exception):
    """Bad input: reported as one ``error: ...`` line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors become one 'error: ...' line too
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m detailflow_engine.generate",
                description="Generate class-conditional images with a DetailFlow prior + tokenizer.")
    m = p.add_argument_group("model (both or neither; neither = the embedded default model)")
    m.add_argument("--ckpt", metavar="PATH|REPO", help="prior: model folder, .pt or .safetensors, or a Hugging "
                   "Face repo id owner/name[@revision] (a local path wins)")
    m.add_argument("--tokenizer", metavar="PATH|REPO", help="tokenizer: model folder, .pt or .safetensors, or a "
                   "Hugging Face repo id")
    m.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto "
                   "(under torchrun, cuda means the GPU of the local rank)")
    m.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="default: fp32")
    m.add_argument("--no-cuda-graphs", action="store_true",
                   help="on a GPU, launch each decode step's kernels eagerly instead of replaying CUDA graphs")
    m.add_argument("--weights", default="native", choices=["native", "int8"],
                   help="prior weights as stored (native, in --dtype) or weight-only int8 (default: native)")

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

    if not 0 <= args.cfg_scale < math.inf:
        bad(f"--cfg-scale must be a finite number >= 0, got {args.cfg_scale}")
    if not 0 <= args.temperature < math.inf:
        bad(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k < 0:
        bad(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        bad(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.num_images is not None and not 1 <= args.num_images <= MAX_IMAGES:
        bad(f"--num-images must be in 1..{MAX_IMAGES:,}, got {args.num_images}")
    if args.num_per_class is not None and not 1 <= args.num_per_class <= MAX_IMAGES:
        bad(f"--num-per-class must be in 1..{MAX_IMAGES:,}, got {args.num_per_class}")
    if args.batch_size < 1:
        bad(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_tokens is not None and args.num_tokens < 1:
        bad(f"--num-tokens must be >= 1, got {args.num_tokens}")
    if not 0 < args.dist_timeout < math.inf:
        bad(f"--dist-timeout must be a positive number of seconds, got {args.dist_timeout}")
    if args.grid_max < 0:
        bad(f"--grid-max must be >= 0, got {args.grid_max}")
    if (args.ckpt is None) != (args.tokenizer is None):
        bad("--ckpt and --tokenizer go together: give both, or neither for the embedded default model")


def check_out_writable(out: Path) -> None:
    """--out must be a writable folder, or creatable; checked before anything is loaded or run.

    Permissions alone do not tell (root passes every os.access check, yet /proc or /sys still refuse;
    a too-long name fails its stat), so the check also tries: a uniquely named probe folder in the
    nearest existing ancestor of a missing --out, and for root a probe file in an existing --out,
    each removed at once (--out is left as it was; for other users os.access answers for an
    existing folder, read-only mounts included)."""
    try:
        exists = out.exists()
    except OSError as e:  # e.g. a name too long for the file system
        raise UsageError(f"cannot create --out {out}: {_one_line(e)}") from None
    if exists:
        if not out.is_dir():
            raise UsageError(f"--out {out} exists and is not a folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise UsageError(f"--out {out} is not writable")
        if not (hasattr(os, "geteuid") and os.geteuid() == 0):
            return
        try:
            fd, probe = tempfile.mkstemp(dir=out, prefix=".detailflow-probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise UsageError(f"--out {out} is not writable: {_one_line(e)}") from None
        return
    anc = out.absolute().parent
    try:
        while not anc.exists() and anc != anc.parent:
            anc = anc.parent
    except OSError as e:
        raise UsageError(f"cannot create --out {out}: {_one_line(e)}") from None
    if not anc.is_dir():
        raise UsageError(f"cannot create --out {out}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UsageError(f"cannot create --out {out}: {anc} is not writable")
    try:  # a uniquely named probe folder: several ranks (torchrun) may check the same --out at once
        os.rmdir(tempfile.mkdtemp(dir=anc, prefix=".detailflow-probe-"))
    except OSError as e:
        raise UsageError(f"cannot create --out {out}: cannot create folders in {anc} "
                         f"({e.strerror or _one_line(e)})") from None


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg


def resolve_model_arg(flag: str, given: str) -> Path:
    """A local path (must exist) or a Hugging Face repo id -> local path; problems are UsageErrors."""
    from detailflow_engine import hub

    if Path(given).exists() or hub.parse_repo_id(given) is None:
        if not Path(given).exists():
            raise UsageError(f"{flag} {given} does not exist")
        return Path(given)
    try:
        return hub.resolve_model_path(given)
    except hub.HubError as e:
        raise UsageError(f"{flag} {given}: {_one_line(e)}") from None


def load_pipeline(args, device=None):
    """-> (pipeline, prior path, tokenizer path); any loading problem is a UsageError.

    ``device``: this process's device (torchrun: the local rank's GPU); default ``--device``."""
    from detailflow_engine.loading import resolve_device

    device = args.device if device is None else device
    try:
        resolve_device(device)
    except ValueError as e:
        raise UsageError(f"--device {args.device}: {_one_line(e)}") from None
    if args.ckpt is None:
        from detailflow_engine.assets import default_model_paths

        try:
            prior_path, tok_path = default_model_paths()
        except FileNotFoundError as e:
            raise UsageError(_one_line(e)) from None
    else:
        prior_path = resolve_model_arg("--ckpt", args.ckpt)
        tok_path = resolve_model_arg("--tokenizer", args.tokenizer)
    from detailflow_engine.pipeline import DetailFlowPipeline

    try:
        pipe = DetailFlowPipeline.from_pretrained(prior_path, tok_path, device=device, dtype=args.dtype,
                                                  weights=args.weights, cuda_graphs=not args.no_cuda_graphs)
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
        if per * len(classes) > MAX_IMAGES:
            raise UsageError(f"--num-per-class {per} x {len(classes)} classes = {per * len(classes):,} images, "
                             f"more than {MAX_IMAGES:,} in one run: split it over several --out folders")
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

class Dist:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1); a no-op single process otherwise."""

    def __init__(self):
        env = os.environ
        try:
            self.world = int(env.get("WORLD_SIZE", "1"))
            self.rank = int(env.get("RANK", "0"))
            self.local_rank = int(env.get("LOCAL_RANK", "0"))
        except ValueError:
            raise UsageError("WORLD_SIZE/RANK/LOCAL_RANK must be integers (as torchrun sets them)") from None
        if not 0 <= self.rank < max(self.world, 1):
            raise UsageError(f"RANK={self.rank} is outside [0, WORLD_SIZE={self.world})")
        self.active = False

    def init(self, device: str, timeout_s: float = DIST_TIMEOUT_S) -> str:
        """Start the process group (gloo on CPU, nccl on CUDA) -> this rank's device."""
        if self.world <= 1:
            return device
        import torch
        import torch.distributed as dist

        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if cuda:
            if not torch.cuda.is_available():
                raise UsageError("--device cuda: device 'cuda' was requested but no CUDA GPU is available")
            if self.local_rank >= torch.cuda.device_count():
                raise UsageError(f"LOCAL_RANK {self.local_rank} but only {torch.cuda.device_count()} GPUs: "
                                 f"use --nproc-per-node <= the GPU count")
            torch.cuda.set_device(self.local_rank)
            device = f"cuda:{self.local_rank}"
        else:
            device = "cpu"
        if not dist.is_initialized():
            from datetime import timedelta

            # bounded: a frozen or killed peer fails the others within minutes, not half an hour
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
        self.active = True
        return device

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (small, picklable), in rank order."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        got = [None] * self.world
        dist.all_gather_object(got, obj)
        return got

    def agree(self, error: Optional[str]) -> None:
        """A collective check point: if any rank failed, every rank raises that rank's error."""
        first = next((e for e in self.gather(error) if e), None)
        if first:
            raise UsageError(first)

    def close(self) -> None:
        if self.active:
            from datetime import timedelta

            import torch.distributed as dist

            # Tear down together: a gloo rank that destroys its group while its peer is still
            # inside the last collective can abort ("terminate called without an active exception").
            try:
                if dist.get_backend() == "gloo":
                    dist.monitored_barrier(timeout=timedelta(seconds=60))
                else:
                    dist.barrier()
            except RuntimeError:  # a peer is gone: nothing left to wait for
                pass
            dist.destroy_process_group()
            self.active = False


def main(argv: Optional[List[str]] = None) -> int:
    dist = None
    try:
        dist = Dist()
        return _main(argv, dist)
    except UsageError as e:
        if dist is None or not dist.active or dist.rank == 0:  # torchrun: one copy of the message
            print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # mid-run: disk full, folder removed; what was finished stays recorded
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"error: writing the outputs failed{where}: {e.strerror or _one_line(e)}; the finished images "
              f"are recorded in the manifest: fix it and rerun with --resume", file=sys.stderr)
        return EXIT_FAILED
    except RuntimeError as e:
        if dist is None or not dist.active:
            raise
        # a collective that timed out or lost a peer (torch.distributed raises RuntimeError / DistError)
        print(f"error: rank {dist.rank}: a peer process stopped answering ({_one_line(e)[:200]}); the finished "
              f"images are recorded: rerun with --resume", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if dist is not None:
            dist.close()


def _main(argv, dist: "Dist") -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
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
        raise UsageError(f"--num-tokens: {_one_line(e)}") from None
    num_tokens = steps[-1].stop
    size = pipe.tokenizer.schedule.decode_size(num_tokens)
    plan = plan_images(args, classes)
    settings = {"cfg_scale": args.cfg_scale, "temperature": args.temperature, "top_k": args.top_k,
                "top_p": args.top_p, "gradual_cfg": args.gradual_cfg, "num_tokens": num_tokens,
                "ckpt": str(prior_path), "tokenizer": str(tok_path), "ema": True, "dtype": args.dtype,
                "weights": args.weights, "progressive": args.progressive,
                # a newer checkpoints/<N>.pt in the same folder is other weights: --resume must notice
                "prior_sha256": outputs.weights_fingerprint(pipe.prior),
                "tokenizer_sha256": outputs.weights_fingerprint(pipe.tokenizer)}

    # ---- what is in --out already (still nothing written)
    manifest_path = out / outputs.MANIFEST
    records, clean = [], True
    names = [outputs.MANIFEST] + target_files(len(plan), args)
    found = outputs.folder_state(out, names)
    if out.is_dir():
        if args.resume and manifest_path.exists():
            try:
                records, clean = outputs.read_manifest(manifest_path)
            except (outputs.ManifestError, OSError) as e:
                raise UsageError(f"--resume: {_one_line(e)}; use --overwrite or a new --out") from None
            check_resume(out, records, settings, plan)
        elif not args.overwrite:
            present = list(found[1])  # folder_state's list of the names that exist
            if present and args.resume:  # no manifest: nothing here is provably this run's
                raise UsageError(f"--resume: --out {out} has no {outputs.MANIFEST} but holds "
                                 f"{_listing(present)}, which no run recorded: move them away, or use "
                                 f"--overwrite or a new --out")
            if present:
                raise UsageError(f"--out {out} already holds {_listing(present)}: use --resume to "
                                 f"finish that run, --overwrite to replace it, or a new --out")
    found = (names, found)  # what --out held: checked again under the folder lock
    return pipe, out, plan, settings, records, clean, size, found


def _listing(names: List[str]) -> str:
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def _take_folder(out: Path, found):
    """Lock --out for this run (one writer per folder), then make sure that it still holds what
    the checks saw: another run may have written it while this one loaded and ran its first batch."""
    try:
        lock = outputs.FolderLock(out)
    except outputs.FolderLocked as e:
        raise UsageError(f"--out: {e}: wait for it to finish, or use another --out") from None
    if lock.unsupported:
        print(f"warning: cannot lock --out {out} ({lock.unsupported}): a second run writing it at the same "
              f"time would not be noticed", file=sys.stderr)
    names, state = found
    if outputs.folder_state(out, names) != state:
        lock.release()
        raise UsageError(f"--out {out} was changed by another run while this one was starting; "
                         f"nothing was written: rerun (with --resume to finish that run) or use another --out")
    return lock


def _generate(args, pipe, out: Path, plan, settings, records, clean, size, found, dist: "Dist") -> int:
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

    def run_batch(batch):
        previews = []

        def keep_preview(step, tokens, preview):
            previews.append(to_uint8(preview()).cpu().numpy())

        result = pipe.generate([c for _, c, _ in batch], cfg_scale=args.cfg_scale, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, gradual_cfg=args.gradual_cfg,
                               seed=[s for _, _, s in batch], num_tokens=settings["num_tokens"],
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
                         f"{_one_line(e)}")
        dist.agree(error)

        error = None
        if lead:  # set up --out while the other ranks wait at the next check point
            try:
                out.mkdir(parents=True, exist_ok=True)
                lock = _take_folder(out, found)
                outputs.remove_stale_temps(out)
                if args.overwrite:
                    _remove_previous_run(out, plan, args)
                if args.overwrite or not clean or len(done) != len(records) or not manifest_path.exists():
                    outputs.write_manifest(manifest_path, [done[i] for i in sorted(done)])
                manifest = outputs.ManifestAppender(manifest_path)
            except OSError as e:
                error = f"cannot create --out {out}: {_one_line(e)}"
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
                        _save_own(out / outputs.progressive_name(i), strip, args.overwrite)
                        rec["progressive_file"] = outputs.progressive_name(i)
                    _save_own(out / outputs.image_name(i), images[j], args.overwrite)
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
        _write_run_outputs(args, out, plan, done, manifest_path)
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


def _save_own(path: Path, image, overwrite: bool) -> None:
    """Write an image's PNG. A file already at that name that the manifest does not record is
    replaced only if it is this run's own (an image is deterministic, so a PNG written before an
    interruption has exactly these bytes) or with --overwrite; anything else is not ours to lose."""
    if not overwrite and path.exists():
        if path.read_bytes() == outputs.png_bytes(image):
            return
        raise UsageError(f"--resume: {path} is not an image of this run (no manifest record, other pixels); "
                         f"move it away, or use --overwrite or a new --out")
    outputs.save_png(path, image)


def _write_run_outputs(args, out: Path, plan, done, manifest_path: Path) -> None:
    """The whole-run outputs (manifest rewritten whole, grid, npz), from the PNGs on disk."""
    outputs.write_manifest(manifest_path, [done[i] for i in sorted(done)])
    paths = [out / outputs.image_name(i) for i, _, _ in plan]
    if args.grid_max:
        shown = [outputs.load_png(p) for p in paths[:args.grid_max]]
        outputs.save_png(out / outputs.GRID, outputs.tile(shown, outputs.grid_columns(len(shown))))
    if args.npz:
        outputs.write_npz(out / outputs.NPZ, paths)
    outputs.fsync_dir(out)


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
