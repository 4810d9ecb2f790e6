"""Shared pieces of the reference trainers: distributed setup, EMA, LR schedules, batches,
official-layout output folders, logging and image grids.

Output folder (the official layout, read by ``detailflow_engine.checkpoint.load_checkpoint``
and by the official loaders)::

    <results_dir>/config.json            the model's official ModelArgs dict (every field)
    <results_dir>/config.yaml            the training arguments
    <results_dir>/checkpoints/<steps:07d>.pt
    <results_dir>/log.jsonl              one JSON object per logged step (ours)
    <results_dir>/samples/*.png          periodic image grids (ours)

Checkpoint files are written to a temporary name in the same folder and hard-linked into
place, so a crash never leaves a half-written ``.pt`` under its final name and an existing
file is never replaced unless ``overwrite`` is set. ``args`` inside a checkpoint is an
``argparse.Namespace`` of plain values only (str, int, float, bool, None, lists), which is
what ``torch.load(weights_only=True)`` plus the Namespace global accepts.

Distributed: launch with ``torchrun`` (``python -m torch.distributed.run --nproc-per-node N``);
the process group uses nccl on CUDA devices and gloo on CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml

CKPT_DIGITS = 7  # official names: checkpoints/0005000.pt


# --------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.initialized:
            dist.barrier()

    def all_reduce_mean(self, values: dict) -> dict:
        """Average a dict of floats (or 0-d tensors) over ranks; returns floats."""
        values = {k: float(v) for k, v in values.items()}
        if not self.initialized or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        t /= self.world_size
        return {k: float(v) for k, v in zip(keys, t.tolist())}


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda' / 'cuda:N' / 'cpu' as given."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: CUDA is not available on this machine")
    return dev


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else single process.

    CUDA: one GPU per process (cuda:LOCAL_RANK), backend nccl. CPU: backend gloo.
    """
    dev = resolve_device(device)
    if dev.type == "cuda":  # as the official trainers
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        return DistInfo(device=dev)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev, initialized=True)


def teardown_distributed(info: DistInfo) -> None:
    if info.initialized and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, info: DistInfo, find_unused_parameters: bool = False) -> nn.Module:
    if not info.initialized:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


CPU_BF16_HELP = ("on the CPU too: bf16 autocast and the math attention kernel (about 2.2x faster training "
                 "steps on CPUs with AMX / AVX512-BF16; slower on CPUs without them)")


def autocast(device: torch.device, mixed_precision: str, cpu_bf16: bool = False):
    """bf16/fp16 autocast on CUDA; on the CPU a no-op unless ``cpu_bf16``.

    ``cpu_bf16``: bf16 autocast on the CPU plus the math SDPA kernel, whose backward beats the CPU
    flash-attention kernel by far on the tokenizer's short masked sequences (measured: 46% of a
    step in the flash backward).
    """
    if device.type == "cpu" and cpu_bf16:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(device_type="cpu", dtype=torch.bfloat16))
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        return stack
    if device.type != "cuda" or mixed_precision == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
    return torch.autocast(device_type="cuda", dtype=dtype)


# --------------------------------------------------------------------------- EMA, LR


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, decay: float = 0.9999) -> None:
    """Official utils/ema.py: ema = decay * ema + (1 - decay) * param, parameters only (not buffers).

    Only parameters that train are averaged: a frozen one (e.g. the encoder and codebook under
    ``--train-decoder-only``) keeps its value bit for bit, where decay * x + (1 - decay) * x would
    drift by rounding (~15% of fp32 elements after 100 steps) and move the EMA's codes.
    """
    ema_params = OrderedDict(ema_model.named_parameters())
    trained = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    if not trained:
        return
    targets = [ema_params[name] for name, _ in trained]
    sources = [param.data for _, param in trained]
    # the per-tensor ema.mul_(decay).add_(param, alpha=1 - decay), batched into two launches
    torch._foreach_mul_(targets, decay)
    torch._foreach_add_(targets, sources, alpha=1 - decay)


def requires_grad(model: nn.Module, flag: bool = True) -> None:
    for p in model.parameters():
        p.requires_grad = flag


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine",
              warmup_start: float = 0.005, end: float = 0.01) -> float:
    """Multiplier of the base LR after ``step`` optimizer steps.

    Official train_c2i ``lr_lambda``: linear warmup from ``warmup_start`` to 1 over
    ``warmup_steps``, then cosine from 1 down to ``end`` at ``total_steps`` ('cosine') or
    1 ('constant').
    """
    if step < warmup_steps:
        return warmup_start + (step / warmup_steps) * (1 - warmup_start)
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r} (cosine or constant)")
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))


def make_lr_scheduler(optimizer, total_steps: int, warmup_steps: int, schedule: str,
                      warmup_start: float = 0.005, end: float = 0.01):
    """A LambdaLR over :func:`lr_factor` (its state_dict holds only plain values)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, schedule, warmup_start, end))


def weight_decay_groups(model: nn.Module, weight_decay: float):
    """Official creat_optimizer groups: tensors with dim >= 2 decay, the rest (norms, biases) do not."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for _, p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0}]


# --------------------------------------------------------------------------- data


class TensorBatches:
    """Random batches from a whole dataset held as one tensor (e.g. preloaded on the GPU).

    Each rank draws its own permutation (seed + rank + epoch); an epoch is one pass over a
    random permutation, split into ``len // (batch * world)`` steps like a DistributedSampler
    with drop_last.
    """

    def __init__(self, tensors: tuple[torch.Tensor, ...], batch_size: int, info: DistInfo, seed: int):
        self.tensors = tensors
        self.n = tensors[0].shape[0]
        self.batch_size = batch_size
        self.info = info
        self.seed = seed
        self.steps_per_epoch = max(self.n // (batch_size * info.world_size), 1)
        if self.n < batch_size:
            raise ValueError(f"dataset of {self.n} items is smaller than the per-rank batch {batch_size}")

    def batches(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        step = start_step
        while True:
            epoch, k = divmod(step, self.steps_per_epoch)
            if k == 0 or step == start_step:
                g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
                perm = torch.randperm(self.n, generator=g)  # same permutation on every rank
                perm = perm.to(self.tensors[0].device)
            lo = (k * self.info.world_size + self.info.rank) * self.batch_size
            idx = perm[lo: lo + self.batch_size]
            yield tuple(t[idx] for t in self.tensors)
            step += 1


# --------------------------------------------------------------------------- output folder


def plain_namespace(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of ``args`` holding only values weights_only loading accepts (others become str)."""
    out = {}
    for k, v in vars(args).items():
        out[k] = _plain(v)
    return argparse.Namespace(**out)


def _plain(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return str(v)


def write_text_atomic(path: Path, text: str, overwrite: bool = False) -> None:
    """Write text to ``path`` via a temp file; refuse to replace a different existing file."""
    path = Path(path)
    if path.exists():
        if path.read_text() == text:
            return
        if not overwrite:
            raise FileExistsError(f"{path} already exists with different content "
                                  f"(pass --overwrite to replace it, or choose another --results-dir)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_model_configs(folder: Path, model_args: dict, train_args: dict, overwrite: bool = False) -> None:
    """folder/config.json (indent 4, like the official json_dump) and folder/config.yaml."""
    write_text_atomic(Path(folder) / "config.json", json.dumps(model_args, ensure_ascii=False, indent=4), overwrite)
    write_text_atomic(Path(folder) / "config.yaml",
                      yaml.safe_dump(_plain(train_args), sort_keys=False, default_flow_style=False), overwrite)


def checkpoint_path(folder: Path, steps: int) -> Path:
    return Path(folder) / "checkpoints" / f"{steps:0{CKPT_DIGITS}d}.pt"


def save_checkpoint(folder: Path, steps: int, payload: dict, overwrite: bool = False) -> Path:
    """torch.save ``payload`` to folder/checkpoints/<steps>.pt atomically, never replacing silently."""
    dst = checkpoint_path(folder, steps)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass --overwrite to replace it)")
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        if overwrite:
            os.replace(tmp, dst)
        else:
            try:
                os.link(tmp, dst)  # fails if dst appeared meanwhile: never clobbers
            except FileExistsError:
                raise FileExistsError(f"{dst} already exists (pass --overwrite to replace it)") from None
            except OSError:  # no hard links on this file system
                os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst


def latest_checkpoint(folder: Path) -> Optional[Path]:
    ckpts = [p for p in (Path(folder) / "checkpoints").glob("*.pt") if p.stem.isdigit()]
    return max(ckpts, key=lambda p: int(p.stem)) if ckpts else None


def load_training_checkpoint(path: Path) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_init_checkpoint(path: Path) -> tuple[Path, dict]:
    """--init-from: a training checkpoint (.pt) or a run folder's newest one, which must hold a 'model' state."""
    path = Path(path)
    ckpt_path = latest_checkpoint(path) if path.is_dir() else path
    if ckpt_path is None or not ckpt_path.is_file():
        raise FileNotFoundError(f"--init-from {path}: no training checkpoint there")
    ckpt = load_training_checkpoint(ckpt_path)
    if not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"--init-from {ckpt_path}: not a training checkpoint (no 'model' state)")
    return ckpt_path, ckpt


def load_init_weights(module: torch.nn.Module, state: dict, ckpt_path: Path) -> None:
    """Strict load of --init-from weights, with an error that says which run they came from."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"--init-from {ckpt_path} does not match the model flags of this run: {exc}") from None


def prepare_results_dir(folder: Path, resume: bool, overwrite: bool) -> Optional[Path]:
    """Checks before training: returns the checkpoint to resume from (or None).

    Existing checkpoints without ``--resume`` are an error (no silent overwrite) unless
    ``--overwrite``.
    """
    last = latest_checkpoint(folder)
    if last is not None and not resume and not overwrite:
        raise FileExistsError(f"{folder} already holds checkpoints (newest {last.name}); pass --resume to "
                              f"continue training or --overwrite to start again over it")
    return last if resume else None


def trainer_parser(module: str, doc: str, *, global_batch_size: int, vis_every: int, vis_what: str):
    """A trainer's command line with the "output and run" flags both trainers take
    -> (parser, that argument group, for the trainer's own run flags)."""
    p = argparse.ArgumentParser(prog=f"python -m detailflow_ref.{module}", description=doc.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("output and run")
    g.add_argument("--results-dir", required=True, help="model folder (official layout) to write")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --results-dir")
    g.add_argument("--overwrite", action="store_true", help="allow replacing existing configs/checkpoints")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda")
    g.add_argument("--mixed-precision", default="bf16", choices=["none", "bf16"],
                   help="autocast dtype on CUDA (CPU runs fp32)")
    g.add_argument("--cpu-bf16", action="store_true", help=CPU_BF16_HELP)
    g.add_argument("--global-seed", type=int, default=0)
    g.add_argument("--max-steps", type=int, default=1000, help="total optimizer steps")
    g.add_argument("--global-batch-size", type=int, default=global_batch_size)
    g.add_argument("--log-every", type=int, default=50)
    g.add_argument("--ckpt-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--vis-every", type=int, default=vis_every, help=f"{vis_what} every N steps (0: only at the end)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="tqdm progress bar on stderr")
    g.add_argument("--write-state-hash", action="store_true",
                   help="write state_hash_rank<R>.txt at the end (DDP checks)")
    return p, g


def add_adam_ema_arguments(g, *, ema: bool) -> None:
    """The optimizer and EMA flags both trainers share (Adam betas, clipping, EMA)."""
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.95)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, default=ema)
    g.add_argument("--ema-decay", type=float, default=0.9999)


def due(every: int, step: int, last: bool) -> bool:
    """Whether a periodic action (log, samples, checkpoint) runs at this step (0 = only at the end)."""
    return bool(every and step % every == 0) or last


class StatsWindow:
    """The step statistics summed since the last log line; `mean` averages them over the steps
    and the ranks and starts a new window."""

    def __init__(self, skip: tuple[str, ...] = ("lr",)):
        self.skip = skip
        self.sums: dict = {}
        self.n = 0

    def add(self, stats: dict) -> None:
        for k, v in stats.items():
            if k not in self.skip:
                self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.n += 1

    def mean(self, info: DistInfo) -> dict:
        avg = info.all_reduce_mean({k: v / self.n for k, v in self.sums.items()})
        self.sums, self.n = {}, 0
        return avg


def fit_and_leave(trainer):
    """trainer.fit(), then leave the process group whatever happened -> the trainer.

    Under torchrun a trainer joins the process group. To run several trainers in one process,
    share one group instead (re-initialising gloo in a process can hang):
    ``info = init_distributed(dev)``, then ``<Trainer>(args, info=info).fit()`` for each, then
    ``teardown_distributed(info)``.
    """
    try:
        trainer.fit()
    finally:
        teardown_distributed(trainer.info)
    return trainer


class CheckpointedRun:
    """What both trainers do with a run: split the global batch over the ranks, write the configs,
    save checkpoints, resume (weights, EMA, optimizer, step, per-rank RNG) and warm-start.

    A subclass calls `init_run` first in its __init__, then sets `model_args`, `train_yaml`,
    `ema` (or None), `optimizer` and `steps`; it names the trained module in `trained_module`,
    adds its own state through `extra_state` / `load_extra_state`, and says what --init-from
    takes in `load_init_weights`.
    """

    def init_run(self, args: argparse.Namespace, info: Optional[DistInfo]) -> None:
        self.args = args
        self.info = info or init_distributed(args.device)
        self.device = self.info.device
        if args.global_batch_size % self.info.world_size:
            raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by "
                             f"{self.info.world_size} processes")
        self.local_batch = args.global_batch_size // self.info.world_size
        self.folder = Path(args.results_dir)

    @property
    def trained_module(self) -> nn.Module:
        raise NotImplementedError

    def extra_state(self) -> dict:
        """Checkpoint entries beyond model, optimizer, steps, args and EMA."""
        return {}

    def load_extra_state(self, ckpt: dict, where: str) -> None:
        """Restore what `extra_state` saved (`where` names the checkpoint for error messages)."""

    def load_init_weights(self, path: Path) -> None:
        raise NotImplementedError

    def prepare_folder(self) -> None:
        """Write the configs and resume from the newest checkpoint when --resume."""
        a = self.args
        resume_from = prepare_results_dir(self.folder, a.resume, a.overwrite)
        if self.info.is_main:
            write_model_configs(self.folder, self.model_args, self.train_yaml,
                                overwrite=a.overwrite or resume_from is not None)
        self.info.barrier()
        if resume_from is not None:
            self.load_state(resume_from)
        elif a.init_from:
            self.load_init_weights(Path(a.init_from))

    def load_state(self, path: Path) -> None:
        ckpt = load_training_checkpoint(path)
        self.trained_module.load_state_dict(ckpt["model"], strict=True)
        if self.ema is not None:
            self.ema.load_state_dict(ckpt.get("ema", ckpt["model"]), strict=True)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.load_extra_state(ckpt, f"--resume {path}")
        self.steps = int(ckpt["steps"])
        torch.manual_seed(self.args.global_seed * 7919 + self.steps * self.info.world_size + self.info.rank)

    def checkpoint_payload(self) -> dict:
        payload = {"model": self.trained_module.state_dict(), "optimizer": self.optimizer.state_dict(),
                   "steps": self.steps, "args": plain_namespace(self.args)}
        if self.ema is not None:
            payload["ema"] = self.ema.state_dict()
        payload.update(self.extra_state())
        return payload

    def save_checkpoint(self) -> Optional[Path]:
        path = None
        if self.info.is_main:
            path = save_checkpoint(self.folder, self.steps, self.checkpoint_payload(), overwrite=self.args.overwrite)
        self.info.barrier()
        return path


def state_dict_hash(model: nn.Module, exclude: tuple[str, ...] = ()) -> str:
    """sha256 over the state dict's names, dtypes, shapes and bytes (rank-agreement checks)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        if exclude and k.startswith(exclude):
            continue
        t = v.detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------- logging


class JsonlLogger:
    """Appends one JSON object per call to <folder>/log.jsonl (main rank only)."""

    def __init__(self, folder: Path, enabled: bool = True, name: str = "log.jsonl"):
        self.path = Path(folder) / name
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")


def progress(total: int, initial: int, enabled: bool, desc: str):
    """A tqdm bar on stderr (or a silent stand-in when tqdm is missing or disabled)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    if tqdm is None or not enabled:
        return _NoBar()
    return tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True,
                mininterval=1.0)


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


# --------------------------------------------------------------------------- images


def save_image_grid(rows: list[torch.Tensor], path: Path, size: Optional[int] = None) -> Path:
    """Save rows of images (each (n, 3, h, w) in [-1, 1]) as one PNG grid.

    Images of other sizes are resized to ``size`` (default: the largest) with nearest
    neighbour, so coarse prefixes show their real pixels.
    """
    from PIL import Image

    size = size or max(r.shape[-1] for r in rows)
    ncol = max(r.shape[0] for r in rows)
    canvas = np.full((len(rows) * size, ncol * size, 3), 255, dtype=np.uint8)
    for i, r in enumerate(rows):
        r = r.detach().float().cpu()
        if r.shape[-1] != size:
            r = torch.nn.functional.interpolate(r, size=(size, size), mode="nearest")
        u8 = torch.clamp(127.5 * r + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for j in range(r.shape[0]):
            canvas[i * size:(i + 1) * size, j * size:(j + 1) * size] = u8[j]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))
