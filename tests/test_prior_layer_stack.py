"""The prior's LayerStack (what forward_step's decode_layers reads) follows reloads, moves and new caches."""
from __future__ import annotations

import pytest
import torch

from detailflow_engine.loading import load_prior


def teacher_forced_logits(prior, labels, codes):
    prior.setup_caches(codes.shape[0])
    with torch.inference_mode():
        return torch.cat([prior.forward_step(prior.step_embeddings(labels, codes, s.start, s.stop), s.start)
                          for s in prior.config.generation_plan()], dim=1)


def _inputs(prior, B=2):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, prior.config.vocab_size, (B, prior.config.block_size), generator=g)
    return torch.arange(B) % prior.config.num_classes, codes


def _perturbed(state):
    g = torch.Generator().manual_seed(1)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v
            for k, v in state.items()}


def test_a_reload_between_steps_takes_effect_at_the_next_step(tiny_a):
    prior, fresh = load_prior(tiny_a / "prior"), load_prior(tiny_a / "prior")
    labels, codes = _inputs(prior)
    before = teacher_forced_logits(prior, labels, codes)
    new_state = _perturbed(prior.state_dict())
    fresh.load_state_dict(new_state)
    want = teacher_forced_logits(fresh, labels, codes)
    assert not torch.equal(before, want)
    stack = prior.layer_stack(3)
    prior.load_state_dict(new_state)
    assert prior.layer_stack(3) is not stack  # rebuilt mid-generation, not only at the next start 0
    assert torch.equal(teacher_forced_logits(prior, labels, codes), want)


def test_the_stack_follows_to_and_setup_caches(tiny_a):
    prior = load_prior(tiny_a / "prior")
    labels, codes = _inputs(prior)
    teacher_forced_logits(prior, labels, codes)
    stack = prior.layer_stack(5)
    assert prior.layer_stack(5) is stack  # reused within a generation
    prior.to(torch.bfloat16)
    bf16 = prior.layer_stack(5)
    assert bf16 is not stack and bf16.like.dtype == torch.bfloat16
    prior.setup_caches(3)
    assert prior.layer_stack(5) is not bf16
    assert prior.layer_stack(5).k_caches[0] is prior.layers[0].attention.kv_cache.k_cache
    labels3, codes3 = _inputs(prior, B=3)
    assert teacher_forced_logits(prior, labels3, codes3).shape[0] == 3


def test_forward_step_without_caches_says_so(tiny_a):
    prior = load_prior(tiny_a / "prior")
    x = torch.zeros(1, 1, prior.config.dim)
    with pytest.raises(RuntimeError, match="call setup_caches"):
        prior.forward_step(x, 0)


def test_a_prior_that_ran_steps_can_be_deep_copied(tiny_a):
    """The stack's extension object is not copied: the copy binds its own tensors' addresses."""
    import copy

    prior = load_prior(tiny_a / "prior")
    labels, codes = _inputs(prior)
    want = teacher_forced_logits(prior, labels, codes)
    twin = copy.deepcopy(prior)
    assert twin.layer_stack(3) is not prior.layer_stack(3)
    assert torch.equal(teacher_forced_logits(twin, labels, codes), want)


def test_the_stack_is_kept_across_generations_until_something_it_reads_is_replaced(tiny_a):
    """Checked at every generation's first step: reused while nothing changed, rebuilt after a swapped
    linear, a parameter given new storage or a submodule reloaded on its own, and the next
    generation then reads the new weights."""
    from detailflow_engine.linear import DecodeLinear

    prior = load_prior(tiny_a / "prior")
    labels, codes = _inputs(prior)
    teacher_forced_logits(prior, labels, codes)
    stack = prior.layer_stack(0)
    assert prior.layer_stack(0) is stack and prior.step_weights(0).stack is stack
    new_state = _perturbed(prior.state_dict())
    changed = dict(prior.state_dict())

    def expected(*keys):
        for k in keys:
            changed[k] = new_state[k]
        fresh = load_prior(tiny_a / "prior")
        fresh.load_state_dict(changed)
        return teacher_forced_logits(fresh, labels, codes)

    lin = torch.nn.Linear(prior.config.ffn_hidden, prior.config.dim, bias=False)  # a linear swapped
    with torch.no_grad():
        lin.weight.copy_(new_state["layers.1.feed_forward.w2.weight"])
    prior.layers[1].feed_forward.w2 = DecodeLinear(lin)
    assert prior.layer_stack(0) is not stack
    assert torch.equal(teacher_forced_logits(prior, labels, codes), expected("layers.1.feed_forward.w2.weight"))
    stack = prior.layer_stack(0)
    prior.norm.weight.data = new_state["norm.weight"].clone()  # new storage
    assert prior.layer_stack(0) is not stack
    assert torch.equal(teacher_forced_logits(prior, labels, codes), expected("norm.weight"))
    stack = prior.layer_stack(0)
    prior.layers[0].attention.wqkv.load_state_dict({"weight": new_state["layers.0.attention.wqkv.weight"]})
    assert prior.layer_stack(0) is not stack  # a new packed weight
    assert torch.equal(teacher_forced_logits(prior, labels, codes), expected("layers.0.attention.wqkv.weight"))
