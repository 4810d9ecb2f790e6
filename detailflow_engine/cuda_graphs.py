"""CUDA graphs of the prior's decode steps: each step is one graph replay instead of ~15 launches
per layer from Python.

A decode step's kernels take the step's positions as launch arguments (cache offsets, rotary
rows), so a graph is captured per step (class step, single steps, group steps) for the cache's
batch: 23 graphs for DetailFlow-16, captured once during the first generation at that batch
size and replayed by every later one. Inputs go through static buffers (labels, tokens); all
graphs of one cache share a memory pool, which is safe because the steps run one after another
and each step's logits are consumed (sampled) before the next replay overwrites them.

Ownership runs one way: the pipeline holds the StepGraphs of its prior (and the on/off switch),
StepGraphs calls the prior's eager ``step_logits``, and the prior knows nothing of graphs. The
graphs hold the KV cache's addresses, so they are stale once ``prior.cache_epoch`` moves on
(``setup_caches`` reallocated); the pipeline then builds new ones.

Correctness rests on the step code being capture-safe: no host synchronization (our op wrappers
skip host-side value checks while capturing) and every kernel launched on torch's current stream.
Output is identical with and without graphs: the same kernels run on the same inputs.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch


class StepGraphs:
    """Captured decode steps of one Prior for its current KV cache (rows = cache batch)."""

    def __init__(self, prior):
        cfg = prior.config
        dev = prior.device
        self.prior = prior
        self.rows = prior.cache_batch
        self.cache_epoch = prior.cache_epoch
        self.labels = torch.zeros(self.rows, dtype=torch.int64, device=dev)
        self.tokens = torch.zeros(self.rows, cfg.block_size, dtype=torch.int64, device=dev)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: Dict[Tuple[int, int], Tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def fits(self, prior) -> bool:
        """Whether these graphs were captured on `prior`'s current KV cache."""
        return prior is self.prior and prior.cache_epoch == self.cache_epoch

    def _eager(self, step) -> torch.Tensor:
        return self.prior.step_logits(self.labels, self.tokens, step)

    def run(self, labels: torch.Tensor, tokens: torch.Tensor, step) -> torch.Tensor:
        if labels.shape[0] != self.rows or tokens.shape[0] != self.rows:
            raise ValueError(f"step graphs were built for {self.rows} rows, got labels {tuple(labels.shape)} "
                             f"and tokens {tuple(tokens.shape)}: call prior.setup_caches first")
        if labels.data_ptr() != self.labels.data_ptr():
            self.labels.copy_(labels)
        if tokens.data_ptr() != self.tokens.data_ptr():
            self.tokens[:, :tokens.shape[1]].copy_(tokens[:, :self.tokens.shape[1]])
        key = (step.start, step.stop)
        entry = self.graphs.get(key)
        if entry is not None:
            entry[0].replay()
            return entry[1]
        # First use: the eager run computes this step for real (and warms up lazy inits such as
        # cuBLAS workspaces); capture then only records (capture executes nothing), so the cache
        # written by the eager run stays valid.
        logits = self._eager(step)
        torch.cuda.current_stream().synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self._eager(step)
        self.graphs[key] = (graph, static_out)
        return logits
