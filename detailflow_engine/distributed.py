"""torch.distributed for the generate CLI under torchrun: init, gather, agree, close; a no-op alone.

torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; rank r runs on gloo (CPU) or nccl (CUDA, one GPU per
local rank). A problem found by one rank becomes every rank's UsageError at the next ``agree``.
"""
from __future__ import annotations

import os
from typing import Optional

from detailflow_engine.cli import UsageError

DIST_TIMEOUT_S = 600  # a collective waits this long for a peer (torch's default: 30 minutes)


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
