"""A generate run's bookkeeping in its --out: which files it makes, what the folder already holds,
the --resume check against the manifest, the --overwrite cleanup and the whole-run outputs.

The file formats themselves (atomic writes, the manifest lines, grid, strips, npz) are in
``outputs``; this module decides, for one run, which of them to keep, check, remove or write.
Problems are UsageErrors naming the flag to change (--resume, --overwrite, --out).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import List

from detailflow_engine import outputs
from detailflow_engine.cli import UsageError, one_line

# A manifest record's settings: an image depends on these (plus its class and seed), so --resume
# requires them to match. device and batch size are recorded/ignored: they do not select the image.
SETTING_KEYS = ("cfg_scale", "temperature", "top_k", "top_p", "gradual_cfg", "num_tokens",
                "ckpt", "tokenizer", "ema", "dtype", "weights", "progressive",
                "prior_sha256", "tokenizer_sha256")  # the weights as loaded, not just their folder


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

def existing_run(out: Path, args, plan: List[tuple], settings: dict):
    """What --out holds, checked against this run with nothing written -> (records, clean, found):
    the manifest records a --resume keeps, whether the manifest is whole, and the folder's state
    (``take_folder`` compares it again under the lock)."""
    manifest_path = out / outputs.MANIFEST
    records, clean = [], True
    names = [outputs.MANIFEST] + target_files(len(plan), args)
    found = outputs.folder_state(out, names)
    if out.is_dir():
        if args.resume and manifest_path.exists():
            try:
                records, clean = outputs.read_manifest(manifest_path)
            except (outputs.ManifestError, OSError) as e:
                raise UsageError(f"--resume: {one_line(e)}; use --overwrite or a new --out") from None
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
    return records, clean, (names, found)


def _listing(names: List[str]) -> str:
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def take_folder(out: Path, found):
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



def save_own(path: Path, image, overwrite: bool) -> None:
    """Write an image's PNG. A file already at that name that the manifest does not record is
    replaced only if it is this run's own (an image is deterministic, so a PNG written before an
    interruption has exactly these bytes) or with --overwrite; anything else is not ours to lose."""
    if not overwrite and path.exists():
        if path.read_bytes() == outputs.png_bytes(image):
            return
        raise UsageError(f"--resume: {path} is not an image of this run (no manifest record, other pixels); "
                         f"move it away, or use --overwrite or a new --out")
    outputs.save_png(path, image)


def write_run_outputs(args, out: Path, plan, done, manifest_path: Path) -> None:
    """The whole-run outputs (manifest rewritten whole, grid, npz), from the PNGs on disk."""
    outputs.write_manifest(manifest_path, [done[i] for i in sorted(done)])
    paths = [out / outputs.image_name(i) for i, _, _ in plan]
    if args.grid_max:
        shown = [outputs.load_png(p) for p in paths[:args.grid_max]]
        outputs.save_png(out / outputs.GRID, outputs.tile(shown, outputs.grid_columns(len(shown))))
    if args.npz:
        outputs.write_npz(out / outputs.NPZ, paths)
    outputs.fsync_dir(out)


def remove_previous_run(out: Path, plan, args) -> None:
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

