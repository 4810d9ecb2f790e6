"""Reference prior (python/detailflow_ref) vs the official implementation's golden outputs."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detailflow_engine.config import PriorConfig, read_config_files
from detailflow_engine.outputs import to_uint8
from detailflow_engine.schedule import cfg_scale_for_step, generation_plan
from detailflow_ref.generate import generate
from detailflow_engine.rotary import precompute_freqs_cis_2d
from detailflow_ref.gpt import Transformer, group_causal_mask, load_prior_checkpoint
from detailflow_ref.sampling import sample, top_k_top_p_filtering

ATOL = 1e-4
NINF = -float("inf")


def _maxabs(a, b) -> float:
    a = a.detach().cpu().numpy() if torch.is_tensor(a) else np.asarray(a)
    return float(np.abs(a.astype(np.float64) - np.asarray(b, dtype=np.float64)).max())


def _assert_close(name, got, want, atol=ATOL):
    assert tuple(got.shape) == tuple(want.shape), f"{name}: shape {tuple(got.shape)} != {want.shape}"
    err = _maxabs(got, want)
    assert err <= atol, f"{name}: max abs error {err:.3g} > {atol}"


@pytest.fixture(scope="module")
def prior_ckpt(tiny_a):
    return tiny_a / "prior" / "checkpoints" / "16.pt"


@pytest.fixture(scope="module")
def ema_model(prior_ckpt):
    return load_prior_checkpoint(prior_ckpt, which="ema")


# ----------------------------------------------------------------------------- structure


def test_freqs_cis_exact(ema_model, golden):
    want = golden["prior_freqs_cis"]
    got = ema_model.freqs_cis
    assert got.dtype == torch.float32 and tuple(got.shape) == want.shape
    assert torch.equal(got, torch.from_numpy(want)), f"max abs error {_maxabs(got, want):.3g}"
    cfg = ema_model.config
    assert torch.equal(precompute_freqs_cis_2d(cfg.block_size, cfg.group_size, cfg.head_dim), got)


def test_group_causal_mask_exact(ema_model, golden):
    want = golden["prior_group_causal_mask"]
    cfg = ema_model.config
    got = group_causal_mask(cfg.block_size, cfg.group_size, cfg.causal_num)
    assert got.dtype == torch.bool
    assert np.array_equal(got.numpy(), want), f"{int((got.numpy() != want).sum())} entries differ"
    # a small hand check: c = 2, g = 2 over 6 positions
    m = group_causal_mask(6, 2, 2).int().tolist()
    assert m == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0],
                 [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]


def test_gpt_l_keys_and_shapes_match_release(meta16):
    cfg = PriorConfig.from_dicts(*read_config_files(meta16 / "prior"))
    assert cfg.gpt_model == "GPT-L" and cfg.ffn_hidden == 2816
    with torch.device("meta"):
        model = Transformer(cfg)
    got = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    want = json.loads((meta16 / "state_dict_keys.json").read_text())["prior_state_dict"]
    assert [r[0] for r in got] == [r[0] for r in want]
    assert got == want
    assert model.freqs_cis.device.type == "cpu"  # built outside the meta context


def test_seq_len_rule(ema_model):
    # tiny-a: c = g = 4
    assert [ema_model.seq_len(n) for n in (0, 1, 3, 4, 8, 12)] == [1, 2, 4, 8, 12, 16]


# ----------------------------------------------------------------------------- teacher forcing


@pytest.mark.parametrize("which,key", [("ema", "prior_tf_logits"), ("model", "prior_tf_logits_model")])
def test_teacher_forcing_logits(prior_ckpt, golden, which, key):
    model = load_prior_checkpoint(prior_ckpt, which=which)
    idx = torch.from_numpy(golden["prior_tf_input"])
    assert torch.equal(idx, torch.from_numpy(golden["prior_tf_codes"])[:, :-model.config.group_size])
    with torch.no_grad():
        logits = model(idx, torch.from_numpy(golden["prior_tf_labels"]))
    assert logits.dtype == torch.float32
    _assert_close(key, logits, golden[key])
    if which == "ema":
        codes = torch.from_numpy(golden["prior_tf_codes"])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))
        err = abs(loss.item() - float(golden["prior_tf_loss"]))
        assert err <= 1e-5, f"prior_tf_loss: abs error {err:.3g}"


def test_state_dict_loads_strict_from_raw_checkpoint(prior_ckpt, ema_model):
    ckpt = torch.load(prior_ckpt, weights_only=True, map_location="cpu")
    model = Transformer(ema_model.config)
    model.load_state_dict(ckpt["ema"], strict=True)
    assert set(model.state_dict()) == set(ckpt["ema"])


# ----------------------------------------------------------------------------- generation


def test_greedy_generation_matches_official(ema_model, golden):
    labels = torch.from_numpy(golden["gen_labels"])
    out = generate(ema_model, labels, cfg_scale=1.5, temperature=1.0, top_k=1, top_p=1.0,
                   return_step_logits=True)
    want = golden["gen_tokens"]
    assert np.array_equal(out.tokens.numpy(), want), f"{int((out.tokens.numpy() != want).sum())} tokens differ"
    n_steps = len([k for k in golden if k.startswith("gen_step")])
    assert len(out.step_logits) == n_steps
    for i, got in enumerate(out.step_logits):
        _assert_close(f"gen_step{i:02d}_logits", got, golden[f"gen_step{i:02d}_logits"])
    _assert_close("gen_cfg_logits", out.cfg_logits, golden["gen_cfg_logits"])
    # tokens-only return value
    assert torch.equal(generate(ema_model, labels, cfg_scale=1.5, top_k=1), out.tokens)


def test_sampler_hook_sees_positions(ema_model, golden):
    seen = []

    def greedy(logits, positions):
        seen.append(positions.tolist())
        return logits.argmax(-1)

    tokens = generate(ema_model, torch.from_numpy(golden["gen_labels"]), cfg_scale=1.5, sampler=greedy)
    assert np.array_equal(tokens.numpy(), golden["gen_tokens"])
    assert seen == [[0], [1], [2], [3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]


def test_generation_without_cfg(ema_model, golden):
    labels = torch.from_numpy(golden["gen_labels"])
    out = generate(ema_model, labels, cfg_scale=1.0, return_step_logits=True,
                   generator=torch.Generator().manual_seed(0))
    b, t = labels.shape[0], ema_model.config.block_size
    assert out.tokens.shape == (b, t) and out.tokens.dtype == torch.int64
    assert int(out.tokens.min()) >= 0 and int(out.tokens.max()) < ema_model.config.vocab_size
    assert all(s.shape[0] == b for s in out.step_logits)  # no null-class rows
    # mixed logits are the raw conditional logits of the sampled positions
    assert torch.equal(out.cfg_logits[:, -4:], out.step_logits[-1][:, -4:])
    again = generate(ema_model, labels, cfg_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, out.tokens)


def test_sampled_generation_reproducible_with_generator(ema_model, golden):
    labels = torch.from_numpy(golden["gen_labels"])
    kw = dict(cfg_scale=2.0, temperature=1.3, top_k=20, top_p=0.9)
    a = generate(ema_model, labels, generator=torch.Generator().manual_seed(7), **kw)
    b = generate(ema_model, labels, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(a, b)


def test_gradual_cfg_scale_function():
    assert cfg_scale_for_step(1.5, None, 16, gradual_cfg=True) == 1.5  # class / single steps
    assert cfg_scale_for_step(1.5, 3, 16, gradual_cfg=False) == 1.5
    assert cfg_scale_for_step(1.5, 1, 16, gradual_cfg=True) == pytest.approx(1.5 * 16 / 17)
    assert cfg_scale_for_step(1.5, 15, 16, gradual_cfg=True) == pytest.approx(1.5 * 2 / 17)
    assert cfg_scale_for_step(2.0, 0, 4, gradual_cfg=True) == pytest.approx(2.0)


def test_generation_plan():
    steps = generation_plan(128, 8, 8)
    assert len(steps) == 23
    assert [s.prefix_len for s in steps[:9]] == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert steps[-1].prefix_len == 120 and (steps[-1].start, steps[-1].stop) == (120, 128)
    assert [s.group_index for s in steps[7:10]] == [None, 1, 2]


def test_gradual_cfg_in_generation(ema_model, golden):
    labels = torch.from_numpy(golden["gen_labels"])
    b, g = labels.shape[0], ema_model.config.group_size
    out = generate(ema_model, labels, cfg_scale=1.5, top_k=1, gradual_cfg=True, return_step_logits=True)
    num_groups = ema_model.config.block_size // g
    for step, raw in zip(generation_plan(ema_model.config.block_size, g, ema_model.config.causal_num), out.step_logits):
        c, u = raw[:b], raw[b:]
        s = 1.5 if step.group_index is None else 1.5 * (num_groups - step.group_index + 1) / (num_groups + 1)
        n = step.stop - step.start
        want = (u + (c - u) * s)[:, -n:]
        assert torch.equal(out.cfg_logits[:, step.start:step.stop], want), f"step {step}"
    assert torch.equal(out.tokens, out.cfg_logits.argmax(-1))


# ----------------------------------------------------------------------------- filtering


def _lp(probs):
    return torch.tensor([[math.log(p) for p in probs]], dtype=torch.float32)


def test_top_k_filtering_hand_example():
    x = torch.tensor([[1.0, 3.0, 2.0, 0.0], [2.0, 2.0, 2.0, 0.0]])
    before = x.clone()
    y = top_k_top_p_filtering(x, top_k=2)
    assert torch.equal(x, before), "caller's logits were edited in place"
    assert y.tolist() == [[NINF, 3.0, 2.0, NINF], [2.0, 2.0, 2.0, NINF]]  # ties with the k-th stay
    assert top_k_top_p_filtering(x, top_k=100).tolist() == x.tolist()  # k clamped to V


def test_top_p_filtering_hand_example():
    x = _lp([0.15, 0.5, 0.05, 0.3])  # sorted 0.5, 0.3, 0.15, 0.05; cumsum .5 .8 .95 1
    keep = lambda y: (y[0] > NINF).tolist()  # noqa: E731
    assert keep(top_k_top_p_filtering(x, top_p=0.7)) == [False, True, False, True]
    assert keep(top_k_top_p_filtering(x, top_p=0.9)) == [True, True, False, True]
    assert keep(top_k_top_p_filtering(x, top_p=0.4)) == [False, True, False, False]  # top token always kept
    # official quirk: min_tokens_to_keep is applied before the shift, so min + 1 survive
    assert keep(top_k_top_p_filtering(x, top_p=0.4, min_tokens_to_keep=2)) == [True, True, False, True]
    # top-k first, then top-p on the survivors (renormalised .625 / .375)
    assert keep(top_k_top_p_filtering(x, top_k=2, top_p=0.6)) == [False, True, False, False]
    assert keep(top_k_top_p_filtering(x, top_k=3, top_p=0.99)) == [True, True, False, True]
    kept = top_k_top_p_filtering(x, top_p=0.9)
    assert torch.equal(kept[0, [0, 1, 3]], x[0, [0, 1, 3]])


def test_sample_semantics():
    x = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 2.0]])
    idx, probs = sample(x, top_k=1)
    assert idx.tolist() == [[1], [0]] and idx.dtype == torch.int64
    assert torch.equal(probs.argmax(-1), idx[:, 0]) and bool((probs.sum(-1) - 1).abs().max() < 1e-6)
    idx3, _ = sample(x[:, None, :].expand(-1, 2, -1), top_k=1)  # (rows, L, V): last position
    assert idx3.tolist() == [[1], [0]]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(sample(x, generator=g1)[0], sample(x, generator=g2)[0])
    # near-zero temperature behaves like argmax
    assert sample(x, temperature=0.0, generator=g1)[0].tolist() == [[1], [0]]


# ----------------------------------------------------------------------------- tokens -> pixels


def test_generated_tokens_decode_to_golden_images(tiny_a, golden):
    tokenizer = pytest.importorskip("detailflow_ref.tokenizer")
    from detailflow_engine.config import TokenizerConfig

    cfg = TokenizerConfig.from_dicts(*read_config_files(tiny_a / "tokenizer"))
    sd = torch.load(tiny_a / "tokenizer" / "checkpoints" / "16.pt", weights_only=True, map_location="cpu")["model"]
    drop = ("encoder.refined_tokens", "refine_conv.", "quantize.codebook_used")
    vq = tokenizer.VQModel(cfg)
    vq.load_state_dict({k: v for k, v in sd.items() if not k.startswith(drop)}, strict=True)
    vq.eval()
    with torch.no_grad():
        pixels = vq.decode_code(torch.from_numpy(golden["gen_tokens"]), t=None, img_size=64)
    _assert_close("gen_images", pixels, golden["gen_images"], atol=5e-5)
    img = to_uint8(pixels)
    assert img.dtype == torch.uint8
    _assert_close("gen_images_uint8", img, golden["gen_images_uint8"], atol=1)
