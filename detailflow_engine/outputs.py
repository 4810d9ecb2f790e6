"""Images out: decoder pixels to uint8, and the generate CLI's files (atomic files, the
append-only manifest, grid, strips, npz).

Every file is written to a temporary file in the destination folder, fsynced, then moved into
place with ``os.replace``: a reader (or an interrupted run) never sees a half-written file.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import numpy as np
import torch

TMP_PREFIX = ".detailflow-tmp-"  # leftovers of a killed run carry this prefix and are removed on --resume
MANIFEST = "manifest.jsonl"
GRID = "grid.png"
NPZ = "samples.npz"
LOCK = ".detailflow.lock"  # held (flock) by the one run writing a folder; left behind, harmless


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # mkstemp makes 0600 files; outputs get the usual open() permissions


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Decoder pixels (B, 3, H, W) ~[-1, 1] -> uint8 (B, H, W, 3): clamp(127.5 x + 128, 0, 255), truncated
    (the official rounding)."""
    return torch.clamp(127.5 * pixels + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8)


def image_name(index: int) -> str:
    return f"{index:06d}.png"


def progressive_name(index: int) -> str:
    return f"{index:06d}_progressive.png"


# ---------------------------------------------------------------------- atomic files

def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Call write(f) on a temporary file next to ``path``, fsync it, then os.replace it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=path.suffix, dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def png_bytes(array: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (deterministic: same array, same bytes)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path: Path, array: np.ndarray) -> None:
    atomic_write_bytes(path, png_bytes(array))


def load_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def remove_stale_temps(folder: Path) -> None:
    for p in Path(folder).glob(TMP_PREFIX + "*"):
        try:
            p.unlink()
        except OSError:
            pass


def fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- one writer per folder

class FolderLocked(RuntimeError):
    """Another process holds the folder's lock."""


class FolderLock:
    """An advisory lock (flock on ``folder/.detailflow.lock``) held while a run writes ``folder``.

    The kernel drops it when the process exits, killed or not, so a crashed run never leaves a
    folder locked. The file itself stays, empty (removing it would race with a second locker;
    a pid in it would make two runs' folders differ byte for byte).
    """

    def __init__(self, folder: Path):
        import fcntl

        self.path = Path(folder) / LOCK
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        self.unsupported = None  # why the file system cannot lock, when it cannot
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            os.close(fd)
            raise FolderLocked(f"{folder} is being written by another run (it holds {self.path})") from None
        except OSError as e:  # ENOLCK, EINVAL: a file system without flock (some network mounts)
            self.unsupported = e.strerror or str(e)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def folder_state(folder: Path, names: Iterable[str]) -> Tuple:
    """What a run found in ``folder``: the manifest's bytes' digest and which of ``names`` exist.
    Compared again under the lock, so a run never acts on a folder another run changed meanwhile."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
    return digest, tuple(n for n in names if (folder / n).exists())


def weights_fingerprint(module) -> str:
    """sha256 of a model's state dict as loaded (names, dtypes, shapes, bytes): the identity of
    the weights a run used, whatever file or folder they came from."""
    import torch

    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------------- manifest

class ManifestError(ValueError):
    """manifest.jsonl cannot be read (a malformed line other than a truncated last one)."""


def read_manifest(path: Path) -> Tuple[List[dict], bool]:
    """Parse manifest.jsonl -> (records, clean). A truncated or malformed LAST line is dropped
    (clean=False: the file should be rewritten before appending); a bad line elsewhere is an error."""
    text = Path(path).read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    records, clean = [], True
    if lines and lines[-1] == "":
        lines.pop()  # the file ends with a newline, as every complete record does
    elif lines:
        clean = False  # the last line has no newline: an interrupted append
    for k, line in enumerate(lines):
        last = k == len(lines) - 1
        if not line.strip():
            clean = False
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("index"), int) or "file" not in rec:
                raise ValueError("not a manifest record")
        except ValueError:
            if last:
                clean = False
                continue
            raise ManifestError(f"{path} line {k + 1} is not a valid manifest record") from None
        records.append(rec)
    return records, clean


def write_manifest(path: Path, records: Iterable[dict]) -> None:
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
    atomic_write_bytes(path, data)


class ManifestAppender:
    """Appends one JSON line per finished image, flushed and fsynced before the next image."""

    def __init__(self, path: Path):
        self.f = open(path, "a", encoding="utf-8")

    def append(self, record: dict) -> None:
        self.f.write(json.dumps(record, sort_keys=True) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------- grid, strip, npz

def tile(images: Sequence[np.ndarray], cols: int) -> np.ndarray:
    """Tile same-size (H, W, 3) images row-major, ``cols`` per row; empty cells are black."""
    h, w, c = images[0].shape
    rows = math.ceil(len(images) / cols)
    out = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for k, im in enumerate(images):
        r, q = divmod(k, cols)
        out[r * h:(r + 1) * h, q * w:(q + 1) * w] = im
    return out


def grid_columns(n: int) -> int:
    """Images per grid row: ceil(sqrt(n)), so the grid is about square."""
    return max(1, math.ceil(math.sqrt(n)))


def progressive_strip(previews: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Each (h, h, 3) preview upsampled to size x size with NEAREST-neighbour resampling (the
    coarse pixels stay visible as blocks), placed left to right: (size, len(previews) * size, 3)."""
    from PIL import Image

    ups = []
    for p in previews:
        im = Image.fromarray(np.ascontiguousarray(p))
        if im.size != (size, size):
            im = im.resize((size, size), Image.NEAREST)
        ups.append(np.asarray(im))
    return np.concatenate(ups, axis=1)


def write_npz(path: Path, paths: Sequence[Path]) -> Tuple[int, ...]:
    """ADM-evaluator samples file: key ``arr_0``, uint8 [N, H, W, 3], read back from the PNGs.

    The array is staged in a memory-mapped temporary .npy next to ``path`` (so 50k images do not
    need RAM), then written into the npz atomically."""
    first = load_png(paths[0])
    shape = (len(paths),) + first.shape
    fd, stage = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".npy", dir=Path(path).parent)
    os.close(fd)
    try:
        arr = np.lib.format.open_memmap(stage, mode="w+", dtype=np.uint8, shape=shape)
        arr[0] = first
        for k, p in enumerate(paths[1:], start=1):
            im = load_png(p)
            if im.shape != first.shape:
                raise ValueError(f"{p} is {im.shape}, expected {first.shape} like {paths[0]}")
            arr[k] = im
        arr.flush()
        atomic_write(path, lambda f: np.savez(f, arr_0=arr))
        del arr
    finally:
        os.unlink(stage)
    return shape


def records_by_index(records: Iterable[dict]) -> Dict[int, dict]:
    """Last record wins for a repeated index."""
    return {int(r["index"]): r for r in records}
