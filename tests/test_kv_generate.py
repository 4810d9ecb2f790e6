"""The plain-torch KV-cache peer (detailflow_ref.kv_generate) against the official goldens and the
reference's full-prefix generation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from detailflow_engine.config import PriorConfig
from detailflow_ref.generate import generate
from detailflow_ref.gpt import Transformer, load_prior_checkpoint
from detailflow_ref.kv_generate import KVCachePeer, kv_cache_generate


@pytest.fixture(scope="module")
def ema_model(tiny_a):
    return load_prior_checkpoint(tiny_a / "prior" / "checkpoints" / "16.pt", which="ema")


def test_greedy_tokens_match_the_official_goldens(ema_model, golden):
    tokens = kv_cache_generate(ema_model, torch.from_numpy(golden["gen_labels"]), cfg_scale=1.5, top_k=1)
    assert np.array_equal(tokens.numpy(), golden["gen_tokens"])


def test_sampled_tokens_equal_the_full_prefix_reference(ema_model, golden):
    labels = torch.from_numpy(golden["gen_labels"])
    kw = dict(cfg_scale=2.0, temperature=1.3, top_k=20, top_p=0.9, gradual_cfg=True)
    want = generate(ema_model, labels, generator=torch.Generator().manual_seed(7), **kw)
    got = kv_cache_generate(ema_model, labels, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(got, want)


@pytest.mark.parametrize("group_size, causal_num", [(1, 1), (2, 4), (4, 8)])
@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_random_models_greedy_equal_reference(group_size, causal_num, cfg_scale):
    cfg = PriorConfig.from_dicts(dict(dim=64, n_layer=2, n_head=4, vocab_size=97, block_size=24,
                                      num_classes=5, group_size=group_size, causal_num=causal_num))
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    labels = torch.tensor([0, 3, 1])
    want = generate(model, labels, cfg_scale=cfg_scale, top_k=1)
    peer = KVCachePeer(model, 6 if cfg_scale > 1 else 3)
    assert torch.equal(kv_cache_generate(model, labels, cfg_scale=cfg_scale, top_k=1, peer=peer), want)
    # a shorter plan, on the same cache buffers
    short = kv_cache_generate(model, labels, cfg_scale=cfg_scale, top_k=1, num_tokens=causal_num + group_size,
                              peer=peer)
    assert torch.equal(short, want[:, :causal_num + group_size])
