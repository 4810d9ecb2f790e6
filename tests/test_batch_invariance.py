"""Batch invariance: an image is the same bits whatever rides with it, in every dtype and weights mode.

A batch of b images (classes and seeds fixed per index) must give, row for row, exactly the
tokens, step logits and float pixels of b lone calls. Batches 1, 7, 25, 48, 96 and 200 cross
every size boundary the engine has had: the decode GEMM's row tiles and chunks, its old switch
to F.linear above 192 (bf16) / 256 rows, and the decoder's torch GEMMs, whose kernels depend on
the number of rows. The lone calls are made once per mode; each batch is a prefix of them.
"""
from __future__ import annotations

import pytest
import torch

from detailflow_engine import DetailFlowPipeline
from detailflow_engine.ops import _dispatch

BATCHES = (1, 7, 25, 48, 96, 200)
MODES = [("fp32", "native"), ("bf16", "native"), ("fp32", "int8"), ("bf16", "int8"), ("bf16", "int4"),
         ("fp32", "w8a8"), ("bf16", "w8a8"), ("fp32", "w4a8"), ("bf16", "w4a8")]

needs_kernels = pytest.mark.skipif(not _dispatch.has_cpu_kernels(),
                                   reason="batch invariance needs the compiled decode_gemm (_C not built)")


def _requests(pipe, n):
    classes = pipe.prior.config.num_classes
    return [(i * 7) % classes for i in range(n)], [1000 + 13 * i for i in range(n)]


def _run(pipe, labels, seeds):
    """tokens (b, T), step logits [(rows, n, V)], pixels (b, 3, H, W) of one batch."""
    tokens, _, logits = pipe.generate_tokens(labels, seed=seeds, return_step_logits=True)
    return tokens, logits, pipe.tokenizer.decode(tokens)


def _row_logits(logits, i, b):
    """Row i's logits of every step: its cond row and, with CFG, its null-class row (i + b)."""
    return [step[[i, i + b]] if step.shape[0] == 2 * b else step[[i]] for step in logits]


def _check_batches(pipe, device=None):
    labels, seeds = _requests(pipe, max(BATCHES))
    lone = []
    for lab, s in zip(labels, seeds):
        tokens, logits, pixels = _run(pipe, [lab], [s])
        lone.append((tokens[0], _row_logits(logits, 0, 1), pixels[0]))
    for b in BATCHES:
        tokens, logits, pixels = _run(pipe, labels[:b], seeds[:b])
        uint8 = ((pixels * 127.5 + 128).clamp(0, 255)).to(torch.uint8)
        bad = [i for i in range(b)
               if not torch.equal(tokens[i], lone[i][0])
               or not all(torch.equal(a, c) for a, c in zip(_row_logits(logits, i, b), lone[i][1]))
               or not torch.equal(pixels[i], lone[i][2])
               or not torch.equal(uint8[i], ((lone[i][2] * 127.5 + 128).clamp(0, 255)).to(torch.uint8))]
        assert not bad, f"batch {b}: rows {bad[:10]} (of {len(bad)}) differ from lone calls"


@needs_kernels
@pytest.mark.parametrize("dtype,weights", MODES, ids=[f"{d}-{w}" for d, w in MODES])
def test_default_model_batches_equal_lone_calls(dtype, weights):
    pipe = DetailFlowPipeline.from_pretrained(device="cpu", dtype=dtype, weights=weights)
    _check_batches(pipe)


@needs_kernels
@pytest.mark.parametrize("dtype,weights", [("bf16", "native"), ("bf16", "int8")], ids=["bf16", "bf16-int8"])
def test_tiny_a_batches_equal_lone_calls(tiny_a, dtype, weights):
    """The fixture model (other widths, vocabulary and schedule)."""
    pipe = DetailFlowPipeline.from_pretrained(tiny_a / "prior", tiny_a / "tokenizer", device="cpu",
                                              dtype=dtype, weights=weights)
    _check_batches(pipe)


@needs_kernels
def test_thread_count_does_not_change_images():
    """torchrun ranks run with other thread counts than a single process: same bits."""
    pipe = DetailFlowPipeline.from_pretrained(device="cpu", dtype="bf16")
    labels, seeds = _requests(pipe, 25)
    threads = torch.get_num_threads()
    two = _run(pipe, labels, seeds)
    try:
        torch.set_num_threads(1)
        one = _run(pipe, labels, seeds)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[2], two[2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,weights", MODES, ids=[f"{d}-{w}" for d, w in MODES])
def test_gpu_batches_equal_lone_calls(dtype, weights):
    pipe = DetailFlowPipeline.from_pretrained(device="cuda", dtype=dtype, weights=weights)
    _check_batches(pipe)
