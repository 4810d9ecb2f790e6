"""labels -> tokens -> pixels: KV-cached group-parallel generation with fused sampling.

One obvious step loop (gpt-fast's generate.py shape): for each step of the plan, embed the
step's new positions, run them through the cached prior, and sample the step's tokens with
``group_sample`` (CFG mix, temperature, top-k, top-p, a draw keyed by (image seed, position)).
An image's tokens therefore depend only on its own seed, never on the batch it rode in.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import torch

from detailflow_engine.cuda_graphs import StepGraphs
from detailflow_engine.loading import load_prior, load_tokenizer, resolve_device, resolve_dtype, resolve_weights
from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.group_sample import GroupSampler
from detailflow_engine.ops.prior_step import StepRunner, write_step_tokens
from detailflow_engine.outputs import to_uint8
from detailflow_engine.prior import Prior
from detailflow_engine.sampling_settings import SamplingSettings, checked_labels, label_list, seed_list
from detailflow_engine.schedule import Step, cfg_scale_for_step
from detailflow_engine.tokenizer import Tokenizer

# callback(step, tokens_so_far (B, t), preview) -> None; preview() decodes the prefix on demand.
Callback = Callable[[Step, torch.Tensor, Callable[[], torch.Tensor]], None]


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # (B, t) int64
    pixels: torch.Tensor  # (B, 3, H, W) float32: the decoder's raw output, roughly [-1, 1], NOT clamped
    seeds: List[int] = field(default_factory=list)
    labels: List[int] = field(default_factory=list)

    @property
    def uint8(self) -> np.ndarray:
        """(B, H, W, 3) uint8 with the official rounding: clamp(127.5 x + 128, 0, 255) truncated."""
        return to_uint8(self.pixels).cpu().numpy()

    @property
    def images(self) -> list:
        from PIL import Image

        return [Image.fromarray(a) for a in self.uint8]




class DetailFlowPipeline:
    """Class labels -> images with a DetailFlow prior and tokenizer. Safe to call from threads."""

    def __init__(self, prior: Prior, tokenizer: Optional[Tokenizer], cuda_graphs: bool = True):
        """``tokenizer`` may be None for a tokens-only pipeline (generate_tokens). ``cuda_graphs``:
        on a GPU, replay each decode step as a captured CUDA graph (same output, fewer launches);
        the attribute of that name switches it later."""
        self.prior, self.tokenizer = prior, tokenizer
        self.cuda_graphs = bool(cuda_graphs)
        self._step_graphs: Optional[StepGraphs] = None  # of the prior's current KV cache
        self._lock = threading.Lock()  # the KV cache is per pipeline: one generation at a time
        self._owner: Optional[int] = None  # thread id holding _lock (re-entry from a callback is an error)
        if tokenizer is None:
            return
        pc, tc = prior.config, tokenizer.config
        if pc.vocab_size != tc.codebook_size:
            raise ValueError(f"prior vocab_size {pc.vocab_size} != tokenizer codebook_size {tc.codebook_size}: "
                             f"mismatched checkpoints")
        if pc.block_size > tc.num_latent_tokens:
            raise ValueError(f"prior block_size {pc.block_size} > tokenizer num_latent_tokens "
                             f"{tc.num_latent_tokens}: mismatched checkpoints")

    @classmethod
    def from_pretrained(cls, prior_path=None, tokenizer_path=None, device=None, dtype=None,
                        ema: bool = True, weights: str = "native", cuda_graphs: bool = True,
                        encoder: bool = True) -> "DetailFlowPipeline":
        """Load both models. With no paths: the embedded default model.

        Each path is a model folder, a .pt or a .safetensors file, or a Hugging Face repo id
        (``owner/name[@revision]``, e.g. ``ByteVisionLab/DetailFlow-16-GPT-L``; needs huggingface_hub;
        a path that exists locally always wins). ``weights``: "native" (the checkpoint's weights in
        ``dtype``), "int8" / "int4" (weight-only decode GEMMs for the prior's blocks) or "w8a8" / "w4a8"
        (int8 / int4 weights and per-row int8 activations; see loading.load_prior). ``cuda_graphs``: on a
        GPU, replay each decode step as a captured CUDA graph (default; same output, fewer launches).
        ``encoder=False``: load only the tokenizer's decoding half (a generate-only service; at
        DetailFlow-16 size 184M parameters fewer); ``pipe.tokenizer.encode`` then raises.
        """
        if not isinstance(encoder, bool):
            raise ValueError(f"encoder must be a bool, got {encoder!r}")
        weights = resolve_weights(weights)  # before any path is resolved (a Hub download)
        device, dtype = resolve_device(device), resolve_dtype(dtype)
        if prior_path is None and tokenizer_path is None:
            from detailflow_engine.assets import default_model_paths

            prior_path, tokenizer_path = default_model_paths()
        if prior_path is None or tokenizer_path is None:
            raise ValueError("give both prior_path and tokenizer_path, or neither for the default model")
        from detailflow_engine.hub import resolve_model_path

        prior_path, tokenizer_path = resolve_model_path(prior_path), resolve_model_path(tokenizer_path)
        prior = load_prior(prior_path, ema=ema, device=device, dtype=dtype, weights=weights)
        pipe = cls(prior, load_tokenizer(tokenizer_path, device=device, dtype=dtype, encoder=encoder),
                   cuda_graphs=cuda_graphs)
        # each compiled kernel proves itself once on this device before it serves (ops/_dispatch),
        # here rather than inside the first generation or a CUDA-graph capture
        _dispatch.selfcheck(device)
        return pipe

    @property
    def device(self) -> torch.device:
        return self.prior.device

    def held_by_current_thread(self) -> bool:
        """True while this thread runs a generation of this pipeline (e.g. inside its callback)."""
        return self._owner == threading.get_ident()

    @contextlib.contextmanager
    def _locked(self):
        """The pipeline's lock; a thread that already holds it (a callback calling back into the
        pipeline) gets a RuntimeError at once instead of waiting for itself forever."""
        if self.held_by_current_thread():
            raise RuntimeError("DetailFlowPipeline.generate/generate_tokens called from inside a generation "
                               "of the same pipeline (e.g. from its callback): the pipeline runs one generation "
                               "at a time and this one would wait for itself forever; call it after the "
                               "callback returns, or use a second pipeline")
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None

    # ------------------------------------------------------------------ generation

    def _labels(self, class_labels) -> List[int]:
        """class_labels as given -> ints in [0, num_classes); a SettingsError (ValueError) names the problem."""
        return checked_labels(label_list(class_labels), self.prior.config.num_classes)

    def _check_result_size(self, n: int, num_tokens: Optional[int]) -> None:
        """Refuse a call whose float32 pixels alone would not fit: name the size."""
        plan = self.prior.config.generation_plan(num_tokens)
        side = self.tokenizer.schedule.decode_size(plan[-1].stop)
        need = n * 3 * side * side * 4
        budget = self.images_per_pass(False) * self._cache_bytes(False)
        if need > budget:
            raise ValueError(f"{n} images of {side} px need {need / 2 ** 30:.1f} GB of float32 pixels, more "
                             f"than the {budget / 2 ** 30:.1f} GB this call may hold: generate them in smaller "
                             f"calls (the generate CLI and the batcher do)")

    def _cache_bytes(self, use_cfg: bool) -> int:
        """Memory one image needs during generation: its KV-cache rows and one step's fp32 logits."""
        c = self.prior.config
        elt = self.prior.dtype.itemsize
        per_row = c.n_layer * 2 * c.block_size * c.dim * elt + c.group_size * c.vocab_size * 4 * 2
        return per_row * (2 if use_cfg else 1)

    def images_per_pass(self, use_cfg: bool = True) -> int:
        """The most images one generation pass holds; larger calls run in passes of this size.
        Budget: a quarter of the machine's memory on the CPU, half of the GPU's on CUDA."""
        if self.device.type == "cuda":
            budget = torch.cuda.get_device_properties(self.device).total_memory // 2
        else:
            try:
                budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
            except (ValueError, OSError, AttributeError):
                budget = 4 << 30
        return max(1, budget // self._cache_bytes(use_cfg))

    @torch.inference_mode()
    def generate_tokens(self, class_labels, cfg_scale: float = 1.45, temperature: float = 1.0,
                        top_k: int = 0, top_p: float = 1.0, gradual_cfg: bool = False,
                        seed: Union[int, Sequence[int]] = 0, num_tokens: Optional[int] = None,
                        callback: Optional[Callback] = None, return_step_logits: bool = False):
        """Sample token sequences (B, t); with ``return_step_logits`` also the raw logits of each step.

        CFG runs when cfg_scale > 1: rows [cond | null class] in one batch, mixed as u + s (c - u).
        cfg_scale <= 1 samples from the conditional logits alone (the official code asserts instead).
        """
        settings = SamplingSettings(cfg_scale, temperature, top_k, top_p, gradual_cfg, num_tokens)
        labels = self._labels(class_labels)
        return self._generate_tokens(labels, seed_list(seed, len(labels)), settings, callback, return_step_logits)

    def _generate_tokens(self, labels: List[int], seeds: List[int], settings: SamplingSettings,
                         callback: Optional[Callback] = None, return_step_logits: bool = False):
        """generate_tokens on checked labels, seeds and settings."""
        s = settings
        cfg_scale, temperature, top_k, top_p, gradual_cfg = s.cfg_scale, s.temperature, s.top_k, s.top_p, s.gradual_cfg
        cfg = self.prior.config
        plan = cfg.generation_plan(s.num_tokens)
        B, T = len(labels), plan[-1].stop
        use_cfg = s.use_cfg
        per_pass = self.images_per_pass(use_cfg)
        if B > per_pass:
            if callback is not None or return_step_logits:
                raise ValueError(f"{B} images do not fit in one pass here ({per_pass} do: the KV cache "
                                 f"takes {self._cache_bytes(use_cfg) / 2 ** 20:.1f} MB per image); with a "
                                 f"callback or return_step_logits, give at most {per_pass} class labels per call")
            # passes of per_pass images: batch invariance makes the result the same as one pass
            parts = [self._generate_tokens(labels[i:i + per_pass], seeds[i:i + per_pass], s)[0]
                     for i in range(0, B, per_pass)]
            return torch.cat(parts), seeds
        label_t = torch.tensor(labels, dtype=torch.int64, device=self.device)
        seed_t = torch.tensor(seeds, dtype=torch.int64, device=self.device)
        rows = torch.cat([label_t, torch.full_like(label_t, self.prior.null_class)]) if use_cfg else label_t
        num_groups = T // cfg.group_size  # as the official loop: groups of the tokens generated
        with self._locked():
            self.prior.setup_caches(rows.shape[0])
            tokens = torch.zeros(rows.shape[0], T, dtype=torch.int64, device=self.device)
            sampler = GroupSampler(seed_t, T, temperature=temperature, top_k=int(top_k), top_p=float(top_p))
            run = StepRunner(self.prior.step_weights, rows, tokens, sampler)
            step_logits = []
            for step in plan:
                # (rows, n, V) fp32; the step's tokens are in `tokens` after it, in the null rows too
                # (they continue the same images)
                logits = self._sampled_step(run, step,
                                            cfg_scale_for_step(cfg_scale, step.group_index, num_groups, gradual_cfg))
                if return_step_logits:
                    step_logits.append(logits.clone())
                if callback is not None:
                    prefix = tokens[:B, :step.stop].clone()
                    callback(step, prefix, lambda p=prefix: self.tokenizer.decode(p))
            out = tokens[:B].clone()
        return (out, seeds, step_logits) if return_step_logits else (out, seeds)

    def _sampled_step(self, run: StepRunner, step: Step, cfg_scale: float) -> torch.Tensor:
        """One decode step: its logits, and its tokens drawn and written into `run.tokens`. On the
        GPU (CUDA graphs on) a graph replay, then the sampler; else the eager step, which samples
        in the same call (ops.prior_step.StepRunner: one extension call on the CPU). The logits are
        a buffer that a later step overwrites (a replay's, or the runner's): consume them first."""
        rows, tokens = run.labels, run.tokens
        if not (self.cuda_graphs and rows.is_cuda):
            return run(step.start, step.stop, cfg_scale)
        if self._step_graphs is None or not self._step_graphs.fits(self.prior):
            self._step_graphs = StepGraphs(self.prior)
        logits = self._step_graphs.run(rows, tokens, step)
        write_step_tokens(tokens, run.sampler(logits, step.start, step.stop, cfg_scale), step.start, step.stop)
        return logits

    @torch.inference_mode()
    def generate(self, class_labels, cfg_scale: float = 1.45, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, gradual_cfg: bool = False, seed: Union[int, Sequence[int]] = 0,
                 num_tokens: Optional[int] = None, callback: Optional[Callback] = None) -> GenerationResult:
        """Generate images for class labels.

        Args:
            class_labels: ints in [0, num_classes) (list, tensor or one int).
            cfg_scale: guidance scale (> 1 enables CFG); temperature, top_k (0 = off), top_p (1 = off).
            gradual_cfg: decay the scale over the group steps as the official code does.
            seed: int (image i uses seed + i) or one seed per image.
            num_tokens: stop at this step boundary (a coarser image at its schedule size).
            callback: called after every step as callback(step, tokens_so_far, preview);
                preview() decodes the current prefix at its schedule size (coarse-to-fine view).
        Returns:
            GenerationResult with .tokens (B, t) int64, .pixels (B, 3, H, W), .images (PIL).
        """
        if self.tokenizer is None:
            raise ValueError("this pipeline has no tokenizer: use generate_tokens, or give a tokenizer")
        settings = SamplingSettings(cfg_scale, temperature, top_k, top_p, gradual_cfg, num_tokens)
        labels = label_list(class_labels)  # read once: a generator is consumed here
        self._check_result_size(len(labels), settings.num_tokens)
        labels = self._labels(labels)
        tokens, seeds = self._generate_tokens(labels, seed_list(seed, len(labels)), settings, callback)
        with self._locked():
            pixels = self.tokenizer.decode(tokens)
        return GenerationResult(tokens=tokens, pixels=pixels, seeds=seeds, labels=labels)
