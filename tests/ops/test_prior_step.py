"""prior_step (one decode step in one call) against its composition: embeddings, decode_layers, head."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from detailflow_engine.loading import load_prior
from detailflow_engine.ops import _dispatch
from detailflow_engine.ops import prior_step as ps
from detailflow_engine.ops.decode_layer import tolerance
from detailflow_engine.ops.prior_step import PriorStepWeights, StepEmbeddings, prior_step, prior_step_ref

from tests.ops._kernel_marks import needs_cpu_kernel

pytestmark = needs_cpu_kernel("PriorStep")
MODES = ("native", "int8", "int4", "w8a8", "w4a8")


def _prior(tiny_a, dtype=torch.float32, weights="native", batch=3):
    prior = load_prior(tiny_a / "prior", dtype=dtype, weights=weights)
    prior.setup_caches(batch)
    return prior


def _inputs(prior, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = prior.config
    codes = torch.randint(0, cfg.vocab_size, (B, cfg.block_size), generator=g)
    labels = torch.randint(0, cfg.num_classes + 1, (B,), generator=g)
    return labels, codes


def _teacher_forced(prior, labels, codes, fn):
    """Every step of the plan through `fn` (prior_step or prior_step_ref) -> logits (B, T, V), caches."""
    with torch.inference_mode():
        out = [fn(prior.step_weights(s.start), labels, codes, s.start, s.stop) for s in prior.config.generation_plan()]
    caches = [t.clone() for t in prior.step_weights(1).stack.caches]
    return torch.cat(out, dim=1), caches


def _kernel_serves(prior) -> bool:
    w = prior.step_weights(0)
    return _dispatch.pick("prior_step", w, torch.zeros(w.stack.like.shape[0], dtype=torch.long),
                          torch.zeros(w.stack.like.shape[0], 1, dtype=torch.long)).name == "cpu"


@pytest.mark.parametrize("weights", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_identical_to_the_composition(tiny_a, dtype, weights):
    """The kernel copies rows, runs the stack's layer kernel and the head's GEMM: the composition's
    bits (logits and every cache), over a whole teacher-forced generation plan."""
    a, b = _prior(tiny_a, dtype, weights), _prior(tiny_a, dtype, weights)
    assert _kernel_serves(a)
    labels, codes = _inputs(a, 3)
    got, got_caches = _teacher_forced(a, labels, codes, prior_step)
    want, want_caches = _teacher_forced(b, labels, codes, prior_step_ref)
    assert got.dtype == torch.float32 and got.shape == (3, a.config.block_size, a.config.vocab_size)
    assert torch.equal(got, want)
    for x, y in zip(got_caches, want_caches):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_close_to_the_torch_references(tiny_a, dtype, monkeypatch):
    """STYLE practice 5 against every op's torch reference (DETAILFLOW_BACKEND=torch):
    max|kernel - ref32| <= 2 max|torch_lowp - ref32| + atol + rtol max|ref32|."""
    labels, codes = _inputs(_prior(tiny_a), 3, seed=3)
    got, _ = _teacher_forced(_prior(tiny_a, dtype), labels, codes, prior_step)
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref32, _ = _teacher_forced(_prior(tiny_a), labels, codes, prior_step)
        lowp, _ = _teacher_forced(_prior(tiny_a, dtype), labels, codes, prior_step)
    atol, rtol = tolerance(dtype)
    bound = 2 * (lowp - ref32).abs().max().item() + atol + rtol * ref32.abs().max().item()
    assert (got - ref32).abs().max().item() <= bound


@pytest.mark.parametrize("weights", ["native", "w4a8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_gets_the_same_bits_alone_and_in_a_batch(tiny_a, dtype, weights):
    alone, batch = _prior(tiny_a, dtype, weights, batch=1), _prior(tiny_a, dtype, weights, batch=5)
    labels, codes = _inputs(batch, 5, seed=7)
    many, _ = _teacher_forced(batch, labels, codes, prior_step)
    one, _ = _teacher_forced(alone, labels[3:4], codes[3:4], prior_step)
    assert torch.equal(one[0], many[3])


def test_positions_of_every_kind_and_odd_step_ranges(tiny_a):
    """Steps that straddle the class, token, special and group positions, against the composition."""
    a, b = _prior(tiny_a), _prior(tiny_a)
    labels, codes = _inputs(a, 3, seed=11)
    with torch.inference_mode():
        for start, stop in ((0, 6), (6, 7), (7, 13), (13, 16)):  # c = 4, g = 4: special rows at 5..7
            got = prior_step(a.step_weights(start), labels, codes, start, stop)
            want = prior_step_ref(b.step_weights(start), labels, codes, start, stop)
            assert torch.equal(got, want), (start, stop)


def test_strided_tokens_and_labels(tiny_a):
    a, b = _prior(tiny_a, batch=2), _prior(tiny_a, batch=2)
    labels, codes = _inputs(a, 2, seed=5)
    wide = torch.zeros(2, 2 * codes.shape[1], dtype=torch.long)
    wide[:, ::2] = codes
    strided_labels = torch.stack([labels, labels], dim=1)[:, 0]
    with torch.inference_mode():
        for s in a.config.generation_plan():
            got = prior_step(a.step_weights(s.start), strided_labels, wide[:, ::2], s.start, s.stop)
            want = prior_step_ref(b.step_weights(s.start), labels, codes, s.start, s.stop)
            assert torch.equal(got, want)


def test_the_pipeline_runs_one_extension_call_a_step(tiny_a, monkeypatch):
    """generate_tokens' steps all go through the kernel (and nothing else of the prior's)."""
    from detailflow_engine.ops import decode_layer as dl
    from detailflow_engine.pipeline import DetailFlowPipeline

    pipe = DetailFlowPipeline(load_prior(tiny_a / "prior"), None)
    calls = {"step": 0, "layers": 0}
    real = ps._cpu_impl

    def counted(*args):
        calls["step"] += 1
        return real(*args)

    def layers(*a, **k):
        calls["layers"] += 1
        return dl.decode_layers(*a, **k)

    monkeypatch.setattr(ps, "decode_layers", layers)
    monkeypatch.setattr(_dispatch, "_TABLE", dict(_dispatch._TABLE))
    _dispatch.register("prior_step", "cpu", counted, applies=ps._cpu_applies)
    tokens, _ = pipe.generate_tokens([1, 2], seed=0)
    assert calls == {"step": len(pipe.prior.config.generation_plan()), "layers": 0}
    assert tokens.shape == (2, pipe.prior.config.block_size)


def test_bad_ids_are_named_and_leave_the_caches_alone(tiny_a):
    prior = _prior(tiny_a, batch=2)
    labels, codes = _inputs(prior, 2)
    w = prior.step_weights(0)
    before = [t.clone() for t in w.stack.caches]
    bad_label = torch.tensor([0, prior.config.num_classes + 1])
    with torch.inference_mode():
        with pytest.raises(ValueError, match=r"labels\[1\] = 11 is not a class embedding row"):
            prior_step(w, bad_label, codes, 0, 1)
        bad = codes.clone()
        bad[1, 2] = prior.config.vocab_size
        with pytest.raises(ValueError, match=r"tokens\[1, 2\] = 256 is not a token id"):
            prior_step(w, labels, bad, 0, 4)
        bad[1, 2] = -1
        with pytest.raises(ValueError, match=r"tokens\[1, 2\] = -1"):
            prior_step(w, labels, bad, 0, 4)
    for x, y in zip(w.stack.caches, before):
        assert torch.equal(x, y)


def test_bad_arguments_are_named(tiny_a):
    prior = _prior(tiny_a, batch=2)
    labels, codes = _inputs(prior, 2)
    w = prior.step_weights(0)
    cases = [
        ((w, labels.int(), codes, 0, 1), r"`labels` must be int64 \(2,\)"),
        ((w, labels[:1], codes, 0, 1), r"`labels` must be int64 \(2,\)"),
        ((w, labels, codes[:1], 0, 1), r"`tokens` must be int64 \(2, T\)"),
        ((w, labels, codes.float(), 0, 1), r"`tokens` must be int64"),
        ((w, labels, codes, 3, 3), r"0 <= start < stop <= 16"),
        ((w, labels, codes, 15, 17), r"0 <= start < stop <= 16"),
        ((w, labels, codes[:, :5], 8, 12), r"read 8 token columns, `tokens` has 5"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            prior_step(*args)
    with pytest.raises(TypeError, match="`w` must be a PriorStepWeights"):
        prior_step(w.stack, labels, codes, 0, 1)
    with pytest.raises(TypeError, match="`start` must be an int"):
        prior_step(w, labels, codes, 0.0, 1)


def test_bad_weights_are_named(tiny_a):
    prior = _prior(tiny_a, batch=2)
    w = prior.step_weights(0)
    emb, stack = w.embeddings, w.stack
    with pytest.raises(ValueError, match=r"`embeddings.tok_table` must be \(rows, 64\) torch.float32"):
        PriorStepWeights(StepEmbeddings(emb.cls_table, emb.tok_table[:, :8], emb.spe_table, 4, 4), stack,
                         prior.output, prior.freqs_cis, 1e-5)
    with pytest.raises(ValueError, match="special rows"):
        PriorStepWeights(StepEmbeddings(emb.cls_table, emb.tok_table, emb.spe_table[:2], 4, 4), stack,
                         prior.output, prior.freqs_cis, 1e-5)
    with pytest.raises(ValueError, match="`freqs_cis` must be float32"):
        PriorStepWeights(emb, stack, prior.output, prior.freqs_cis.double(), 1e-5)
    with pytest.raises(ValueError, match="`eps`"):
        PriorStepWeights(emb, stack, prior.output, prior.freqs_cis, float("nan"))
    with pytest.raises(TypeError, match="`head` must be callable"):
        PriorStepWeights(emb, stack, None, prior.freqs_cis, 1e-5)
    from detailflow_engine.ops.decode_layer import LayerStack

    no_norm = LayerStack(stack.layers, stack.k_caches, stack.v_caches)
    with pytest.raises(ValueError, match="must have a first_norm"):
        PriorStepWeights(emb, no_norm, prior.output, prior.freqs_cis, 1e-5)


def test_the_binding_checks_its_arguments(tiny_a):
    prior = _prior(tiny_a, batch=2)
    labels, codes = _inputs(prior, 2)
    kernel = prior.step_weights(0).kernel()
    out = torch.empty(2, 1, prior.config.vocab_size)
    args = dict(labels=labels.data_ptr(), tokens=codes.data_ptr(), ldt=16, num_tokens=16, start=0, n=1,
                logits=out.data_ptr(), eps=1e-5, sum_lanes=8, num_threads=1)
    for change, match in (({"n": 0}, "n must be > 0"), ({"start": 16}, "start \\+ n must be <= L_max"),
                          ({"logits": 0}, "logits is a null pointer"), ({"ldt": -1}, "ldt must be >= 0"),
                          ({"sum_lanes": 0}, "sum_lanes")):
        with pytest.raises(ValueError, match=match):
            kernel.run(*{**args, **change}.values())


def test_the_composition_serves_what_the_kernel_does_not(tiny_a):
    """A head that is a plain nn.Linear, or grad through the embeddings: the composition, same values."""
    a, b = _prior(tiny_a), _prior(tiny_a)
    labels, codes = _inputs(a, 3)
    want, _ = _teacher_forced(b, labels, codes, prior_step)
    plain = torch.nn.Linear(a.config.dim, a.config.vocab_size, bias=False)
    with torch.no_grad():
        plain.weight.copy_(a.output.weight)
    a.output = plain
    a._step = None
    assert not _kernel_serves(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the once-per-process torch fallback warning
        got, _ = _teacher_forced(a, labels, codes, prior_step)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    c = _prior(tiny_a)
    c.tok_embeddings.weight.requires_grad_(True)
    c._step = None
    w = c.step_weights(0)
    assert w.needs_grad and not ps._cpu_applies(w, labels, codes)
    with torch.no_grad():
        assert ps._cpu_applies(w, labels, codes)


def test_copies_bind_their_own_addresses(tiny_a):
    prior = _prior(tiny_a)
    labels, codes = _inputs(prior, 3)
    want, _ = _teacher_forced(prior, labels, codes, prior_step)
    twin = copy.deepcopy(prior)
    assert twin.step_weights(1).kernel() is not prior.step_weights(1).kernel()
    got, _ = _teacher_forced(twin, labels, codes, prior_step)
    assert torch.equal(got, want)


def test_a_broken_kernel_fails_its_selfcheck(monkeypatch):
    monkeypatch.setattr(_dispatch, "_TABLE", dict(_dispatch._TABLE))
    monkeypatch.setattr(_dispatch, "_CHECKED", {})

    def broken(w, labels, tokens, start, stop):
        out = ps._cpu_impl(w, labels, tokens, start, stop)
        out[:, -1] += 1.0
        return out

    _dispatch.register("prior_step", "cpu", broken, applies=ps._cpu_applies)
    with pytest.warns(RuntimeWarning, match="self-check of prior_step on the cpu backend failed"):
        assert _dispatch.selfcheck("cpu")["prior_step"] == "torch"


# --- sampling in the same call -----------------------------------------------------------------

SAMPLINGS = [dict(temperature=1.0, top_k=0, top_p=1.0), dict(temperature=0.7, top_k=20, top_p=0.9),
             dict(temperature=1.3, top_k=0, top_p=0.5), dict(temperature=1.0, top_k=1, top_p=1.0)]


def _sampled_generation(prior, labels, seeds, fn, cfg_scale, settings):
    """A whole generation plan through `fn` with a sampler: (tokens, logits) as the pipeline runs it."""
    from detailflow_engine.ops.group_sample import GroupSampler

    T = prior.config.block_size
    rows = torch.cat([labels, torch.full_like(labels, prior.null_class)]) if cfg_scale > 1 else labels
    prior.setup_caches(rows.shape[0])
    tokens = torch.full((rows.shape[0], T), 7, dtype=torch.long)
    sampler = GroupSampler(seeds, T, **settings)
    with torch.inference_mode():
        logits = [fn(prior.step_weights(s.start), rows, tokens, s.start, s.stop, sampler, cfg_scale)
                  for s in prior.config.generation_plan()]
    return tokens, torch.cat(logits, dim=1)


@pytest.mark.parametrize("settings", SAMPLINGS)
@pytest.mark.parametrize("cfg_scale", [1.0, 1.45])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampling_in_the_call_draws_the_samplers_tokens(tiny_a, dtype, cfg_scale, settings):
    """Tokens (every row of each image) and logits as the composition's: the step, then the sampler."""
    a, b = _prior(tiny_a, dtype), _prior(tiny_a, dtype)
    labels, seeds = torch.tensor([1, 4, 9]), torch.tensor([5, 0, 123456789])
    got, got_logits = _sampled_generation(a, labels, seeds, prior_step, cfg_scale, settings)
    want, want_logits = _sampled_generation(b, labels, seeds, prior_step_ref, cfg_scale, settings)
    assert torch.equal(got, want) and torch.equal(got_logits, want_logits)
    if cfg_scale > 1:
        assert torch.equal(got[:3], got[3:])  # the null rows continue the same images
    assert 0 <= got.min() and got.max() < a.config.vocab_size


def test_sampling_writes_only_the_steps_columns(tiny_a):
    from detailflow_engine.ops.group_sample import GroupSampler

    prior = _prior(tiny_a, batch=2)
    labels, codes = _inputs(prior, 2)
    sampler = GroupSampler(torch.tensor([3]), prior.config.block_size)
    step = prior.config.generation_plan()[-1]
    before = codes.clone()
    with torch.inference_mode():
        prior_step(prior.step_weights(step.start), labels, codes, step.start, step.stop, sampler, 1.5)
    assert torch.equal(codes[:, :step.start], before[:, :step.start])
    assert torch.equal(codes[0, step.start:], codes[1, step.start:])


def test_sampling_into_strided_tokens(tiny_a):
    """Tokens the kernel cannot write in place (a column stride): the sampler writes them, same values."""
    a, b = _prior(tiny_a, batch=2), _prior(tiny_a, batch=2)
    labels, seeds = torch.tensor([2]), torch.tensor([11])
    want, _ = _sampled_generation(b, labels, seeds, prior_step, 1.45, SAMPLINGS[1])
    from detailflow_engine.ops.group_sample import GroupSampler

    T = a.config.block_size
    rows = torch.tensor([2, a.null_class])
    wide = torch.full((2, 2 * T), 7, dtype=torch.long)
    sampler = GroupSampler(seeds, T, **SAMPLINGS[1])
    with torch.inference_mode():
        for s in a.config.generation_plan():
            prior_step(a.step_weights(s.start), rows, wide[:, ::2], s.start, s.stop, sampler, 1.45)
    assert torch.equal(wide[:, ::2], want)


def test_bad_samplers_are_named(tiny_a):
    from detailflow_engine.ops.group_sample import GroupSampler

    prior = _prior(tiny_a, batch=2)
    labels, codes = _inputs(prior, 2)
    w = prior.step_weights(0)
    with pytest.raises(TypeError, match="`sampler` must be None or a GroupSampler"):
        prior_step(w, labels, codes, 0, 1, sampler=object())
    with pytest.raises(ValueError, match="sampler's 3 seeds on cpu do not fit 2 cache rows"):
        prior_step(w, labels, codes, 0, 1, sampler=GroupSampler(torch.tensor([1, 2, 3]), 16))
    with pytest.raises(ValueError, match=r"writes token columns \[8, 12\) but `tokens` has 16 and the sampler 10"):
        prior_step(w, labels, codes, 8, 12, sampler=GroupSampler(torch.tensor([1]), 10))
    with pytest.raises(ValueError, match="`cfg_scale` must be >= 0"):
        prior_step(w, labels, codes, 0, 1, sampler=GroupSampler(torch.tensor([1]), 16), cfg_scale=-1.0)


def test_the_sampling_binding_checks_its_arguments(tiny_a):
    prior = _prior(tiny_a, batch=2)
    labels, codes = _inputs(prior, 2)
    kernel = prior.step_weights(0).kernel()
    out = torch.empty(2, 4, prior.config.vocab_size)
    seeds, positions = torch.tensor([1]), torch.arange(16)
    args = [labels.data_ptr(), codes.data_ptr(), 16, 16, 12, 4, out.data_ptr(), 1e-5, 8, 1, seeds.data_ptr(),
            positions.data_ptr(), 1, 1.5, 1.0, 0, 1 << 24, False]
    kernel.run_sampled(*args)  # the valid call runs
    for i, value, match in ((3, 14, r"columns \[12, 16\) but tokens has 14"), (12, 3, "R must be B or 2B"),
                            (15, 1, "top_k must be 0 or in"), (14, 0.0, "temperature must be > 0"),
                            (10, 0, "seeds is a null pointer")):
        bad = list(args)
        bad[i] = value
        with pytest.raises(ValueError, match=match):
            kernel.run_sampled(*bad)


# --- StepRunner: the steps of one generation ----------------------------------------------------

def test_the_runner_draws_what_prior_step_draws_and_follows_new_weights(tiny_a):
    from detailflow_engine.ops.group_sample import GroupSampler
    from detailflow_engine.ops.prior_step import StepRunner

    a, b = _prior(tiny_a, batch=6), _prior(tiny_a, batch=6)
    labels, seeds = torch.tensor([1, 4, 9]), torch.tensor([5, 0, 123456789])
    want, want_logits = _sampled_generation(b, labels, seeds, prior_step, 1.45, SAMPLINGS[1])
    T = a.config.block_size
    rows = torch.cat([labels, torch.full_like(labels, a.null_class)])
    tokens = torch.full((6, T), 7, dtype=torch.long)
    run = StepRunner(a.step_weights, rows, tokens, GroupSampler(seeds, T, **SAMPLINGS[1]))
    logits = []
    with torch.inference_mode():
        for s in a.config.generation_plan():
            logits.append(run(s.start, s.stop, 1.45).clone())  # a buffer the next step of its length reuses
            assert run.kernel is not None  # the CPU kernel, called directly
    assert torch.equal(tokens, want) and torch.equal(torch.cat(logits, dim=1), want_logits)
    first = run.weights
    a.setup_caches(5)  # new caches: new step weights, which the runner binds at its next step
    a.setup_caches(6)
    tokens.fill_(7)
    with torch.inference_mode():
        for s in a.config.generation_plan():
            run(s.start, s.stop, 1.45)
    assert run.weights is not first and torch.equal(tokens, want)


def test_the_runner_checks_positions_and_arguments(tiny_a):
    from detailflow_engine.ops.group_sample import GroupSampler
    from detailflow_engine.ops.prior_step import StepRunner

    prior = _prior(tiny_a, batch=2)
    labels, codes = _inputs(prior, 2)
    run = StepRunner(prior.step_weights, labels, codes, GroupSampler(torch.tensor([3]), 16))
    with torch.inference_mode():
        run(0, 1, 1.5)
        with pytest.raises(ValueError, match=r"0 <= start < stop <= 16"):
            run(15, 17, 1.5)
        with pytest.raises(ValueError, match="`cfg_scale` must be >= 0"):
            run(1, 2, -1.0)
    with pytest.raises(TypeError, match="`sampler` must be a GroupSampler"):
        StepRunner(prior.step_weights, labels, codes, None)
    bad = StepRunner(prior.step_weights, labels[:1], codes, GroupSampler(torch.tensor([3]), 16))
    with pytest.raises(ValueError, match=r"`labels` must be int64 \(2,\)"):
        bad(0, 1, 1.5)


def test_the_runner_takes_a_swapped_table_entry(tiny_a, monkeypatch):
    """A CPU entry swapped in the table (the benchmarks' composition side) serves the runner's steps."""
    from detailflow_engine.ops.group_sample import GroupSampler
    from detailflow_engine.ops.prior_step import StepRunner

    monkeypatch.setattr(_dispatch, "_TABLE", dict(_dispatch._TABLE))
    calls = []

    def composition(*args):
        calls.append(args[3])
        return prior_step_ref(*args)

    _dispatch.register("prior_step", "cpu", composition, applies=ps._cpu_applies)
    a, b = _prior(tiny_a, batch=2), _prior(tiny_a, batch=2)
    labels, seeds = torch.tensor([2]), torch.tensor([11])
    want, _ = _sampled_generation(b, labels, seeds, prior_step_ref, 1.45, SAMPLINGS[0])
    rows = torch.tensor([2, a.null_class])
    tokens = torch.full((2, 16), 7, dtype=torch.long)
    run = StepRunner(a.step_weights, rows, tokens, GroupSampler(seeds, 16))
    with torch.inference_mode():
        for s in a.config.generation_plan():
            run(s.start, s.stop, 1.45)
    assert run.kernel is None and calls == [s.start for s in a.config.generation_plan()]
    assert torch.equal(tokens, want)
