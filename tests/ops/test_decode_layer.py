"""decode_layer (the fused CPU layer) against decode_layer_ref (the prior's per-op composition)."""
from __future__ import annotations

import math
import re

import pytest
import torch

from detailflow_engine.linear import DecodeLinear
from detailflow_engine.ops import _dispatch
from detailflow_engine.ops import decode_layer as dl
from detailflow_engine.ops.add_rmsnorm import add_rmsnorm
from detailflow_engine.ops.decode_layer import LayerWeights, decode_layer, decode_layer_ref, tolerance

pytestmark = pytest.mark.skipif(not hasattr(_dispatch.extension(), "decode_layer"),
                                reason="the extension has no decode_layer CPU kernel")


def make_layer(dim, H, F, dtype, weights="native", seed=0, zero_w1=False) -> LayerWeights:
    g = torch.Generator().manual_seed(seed)

    def linear(k_in, k_out, zero=False):
        lin = torch.nn.Linear(k_in, k_out, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(k_out, k_in, generator=g) / math.sqrt(k_in) * (0.0 if zero else 1.0))
        if weights == "native":
            lin = lin.to(dtype)
        return DecodeLinear(lin.requires_grad_(False), weights)

    norm = lambda: (1 + 0.2 * torch.randn(dim, generator=g)).to(dtype)  # noqa: E731
    return LayerWeights(linear(dim, 3 * dim), linear(dim, dim), linear(dim, F, zero_w1), linear(dim, F),
                        linear(F, dim), norm(), norm(), H)


def make_inputs(B, n, dim, H, L, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    d = dim // H
    h = torch.randn(B, n, dim, generator=g).to(dtype)
    y = torch.randn(B, n, dim, generator=g).to(dtype)
    k_cache = torch.randn(B, H, L, d, generator=g).to(dtype)
    v_cache = torch.randn(B, H, L, d, generator=g).to(dtype)
    freqs = torch.randn(n, d // 2, 2, generator=g)
    return h, y, k_cache, v_cache, freqs


def fused(h, y, w, k_cache, v_cache, freqs, start, eps=1e-5):
    assert _dispatch.pick("decode_layer", h, y, w, k_cache, v_cache, freqs).name == "cpu"
    return decode_layer(h, y, w, k_cache, v_cache, freqs, start, eps)


def as_fp32(w: LayerWeights) -> LayerWeights:
    """The same layer with fp32 activations: native weights upcast (exact), quantized ones shared."""
    def up(lin):
        if lin.weights != "native":
            return lin
        full = torch.nn.Linear(lin.in_features, lin.out_features, bias=False)
        with torch.no_grad():
            full.weight.copy_(lin.weight.float())
        return DecodeLinear(full.requires_grad_(False))

    return LayerWeights(*(up(lin) for lin in w.linears()), w.ffn_norm.float(), w.next_norm.float(), w.n_head)


def max_err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# (B, n, n_head, head_dim, ffn hidden): the embedded model's layer (8 x 32, 768) and odd ones
SHAPES = [(1, 1, 1, 16, 40), (2, 4, 3, 16, 40), (7, 1, 3, 64, 96), (2, 4, 8, 32, 768), (1, 8, 2, 64, 200)]


@pytest.mark.parametrize("weights", ["native", "int8", "int4", "w8a8", "w4a8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("start", [0, 9])
@pytest.mark.parametrize("B,n,H,d,F", SHAPES)
def test_matches_composition(B, n, H, d, F, start, dtype, weights):
    dim, L = H * d, 24
    w = make_layer(dim, H, F, dtype, weights)
    h, y, kc, vc, freqs = make_inputs(B, n, dim, H, L, dtype)
    kr, vr = kc.clone(), vc.clone()
    want = decode_layer_ref(h, y, w, kr, vr, freqs, start, 1e-5)  # the reference first: caches mutate
    got = fused(h, y, w, kc, vc, freqs, start)
    assert torch.equal(kc, kr) and torch.equal(vc, vr), "the cache write differs from rope_qkv + cache_attention"
    atol, rtol = tolerance(dtype)
    if dtype == torch.float32:
        for name, a, b in zip("hy", got, want):
            err, bound = max_err(a, b), atol + rtol * b.abs().max().item()
            print(f"{name}: max err {err:.3g} (bound {bound:.3g})")
            assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"
    else:  # STYLE practice 5: against the fp32 composition, within twice torch's own bf16 error
        w32 = as_fp32(w)
        k32, v32 = kr.float(), vr.float()
        ref32 = decode_layer_ref(h.float(), y.float(), w32, k32, v32, freqs, start, 1e-5)
        for name, a, b, r in zip("hy", got, want, ref32):
            err, torch_err = max_err(a, r), max_err(b, r)
            print(f"{name}: max err {err:.3g}, torch bf16 {torch_err:.3g}")
            assert err <= 2 * torch_err + atol, f"{name}: {err:.3g} > 2 * {torch_err:.3g} + {atol}"
    for t in got:
        assert t.shape == (B, n, dim) and t.dtype == dtype and t.is_contiguous()


@pytest.mark.parametrize("weights", ["native", "int8", "int4", "w8a8", "w4a8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_identical_without_the_silu(dtype, weights):
    """With w1 = 0 the SiLU (the one op whose exp differs from torch's) outputs exact zeros, so
    rotary, attention, both GEMM chains, the residual adds and both RMSNorms (sum in torch's
    order) must give the per-op path's bits."""
    B, n, H, d, F = 2, 4, 8, 32, 768
    dim = H * d
    w = make_layer(dim, H, F, dtype, weights, zero_w1=True)
    h, y, kc, vc, freqs = make_inputs(B, n, dim, H, 24, dtype)
    kr, vr = kc.clone(), vc.clone()
    want = decode_layer_ref(h, y, w, kr, vr, freqs, 5, 1e-5)
    got = fused(h, y, w, kc, vc, freqs, 5)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    for name, a, b in zip("hy", got, want):
        assert torch.equal(a, b), f"{name}: max difference {max_err(a, b):.3g} (expected the same bits)"


@pytest.mark.parametrize("weights", ["native", "int4", "w8a8", "w4a8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_gets_the_same_bits_alone_and_in_a_batch(dtype, weights):
    B, n, H, d, F = 7, 4, 3, 16, 40
    dim = H * d
    w = make_layer(dim, H, F, dtype, weights)
    h, y, kc, vc, freqs = make_inputs(B, n, dim, H, 16, dtype)
    alone = [fused(h[b:b + 1], y[b:b + 1], w, kc[b:b + 1].clone(), vc[b:b + 1].clone(), freqs, 6) for b in range(B)]
    batch = fused(h, y, w, kc, vc, freqs, 6)
    for b in range(B):
        for name, one, many in zip("hy", alone[b], batch):
            assert torch.equal(one[0], many[b]), f"row {b} {name} depends on the rows beside it"


def test_thread_count_does_not_change_the_bits():
    B, n, H, d, F = 2, 4, 8, 32, 768
    dim = H * d
    w = make_layer(dim, H, F, torch.float32)
    h, y, kc, vc, freqs = make_inputs(B, n, dim, H, 16, torch.float32)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            k, v = kc.clone(), vc.clone()
            results.append(fused(h, y, w, k, v, freqs, 3) + (k, v))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_non_contiguous_h_and_y():
    B, n, H, d, F = 3, 4, 3, 16, 40
    dim = H * d
    w = make_layer(dim, H, F, torch.float32)
    h, y, kc, vc, freqs = make_inputs(B, n, dim, H, 16, torch.float32)
    wide = torch.randn(B, n, 2 * dim)
    wide[..., 3:3 + dim] = h
    h_sliced = wide[..., 3:3 + dim]  # row stride 2 dim
    y_transposed = y.transpose(0, 1).contiguous().transpose(0, 1)  # (B, n) strides swapped
    assert not h_sliced.is_contiguous() and not y_transposed.is_contiguous()
    want = fused(h, y, w, kc.clone(), vc.clone(), freqs, 2)
    got = fused(h_sliced, y_transposed, w, kc.clone(), vc.clone(), freqs, 2)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_the_composition_serves_what_the_kernel_does_not():
    """Plain nn.Linear layers (no packed weight) and traced calls run the composition."""
    dim, H, F = 48, 3, 40
    w = make_layer(dim, H, F, torch.float32)
    plain = LayerWeights(*(torch.nn.Linear(m.in_features, m.out_features, bias=False) for m in w.linears()),
                         w.ffn_norm, w.next_norm, H)
    for m, lin in zip(w.linears(), plain.linears()):
        with torch.no_grad():
            lin.weight.copy_(m.weight)
    h, y, kc, vc, freqs = make_inputs(2, 1, dim, H, 8, torch.float32)
    assert _dispatch.pick("decode_layer", h, y, plain, kc, vc, freqs).name == "torch"
    kr, vr = kc.clone(), vc.clone()
    with torch.no_grad():
        got = decode_layer(h, y, plain, kc, vc, freqs, 4)
        want = decode_layer_ref(h, y, plain, kr, vr, freqs, 4, 1e-5)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_selfcheck_passes_on_the_cpu():
    backend = next(b for b in _dispatch._TABLE["decode_layer"] if b.name == "cpu")
    dl._selfcheck(backend, decode_layer_ref, torch.device("cpu"))  # raises on a mismatch
    assert _dispatch.selfcheck("cpu")["decode_layer"] == "cpu"


def test_torch_sum_order_probe_finds_torch_order():
    probe = torch.randn(203, generator=torch.Generator().manual_seed(3)) ** 2
    assert dl._sum_in_order(probe, dl._torch_sum_lanes()) == probe.sum().item()


def _bad_cases():
    dim, H, F, L = 48, 3, 40, 8
    w = make_layer(dim, H, F, torch.float32)
    h, y, kc, vc, freqs = make_inputs(2, 4, dim, H, L, torch.float32)
    ok = dict(h=h, y=y, w=w, k_cache=kc, v_cache=vc, freqs=freqs, start=2, eps=1e-5)
    wd = w.__dict__
    return ok, [
        ("y", dict(y=y.to(torch.int32)), "`y` must be float32"),
        ("h shape", dict(h=h[:, :3]), "`h` must have the shape"),
        ("h dtype", dict(h=h.double()), "`h` must have the shape, dtype"),
        ("w type", dict(w=list(w.linears())), "`w` must be a LayerWeights"),
        ("n_head", dict(w=LayerWeights(**{**wd, "n_head": 5})), "n_head * head_dim"),
        ("ffn_norm", dict(w=LayerWeights(**{**wd, "ffn_norm": w.ffn_norm.double()})), "`w.ffn_norm` must be (48,)"),
        ("next_norm", dict(w=LayerWeights(**{**wd, "next_norm": w.next_norm[:7]})), "`w.next_norm` must be (48,)"),
        ("k_cache shape", dict(k_cache=kc[:, :2]), "`k_cache` must be (B, n_head, L_max, head_dim)"),
        ("v_cache length", dict(v_cache=vc[:, :, :6].contiguous()), "`v_cache` must be (B, n_head, L_max"),
        ("v_cache strides", dict(v_cache=vc.transpose(0, 1).contiguous().transpose(0, 1)), "`v_cache` must be contiguous"),
        ("cache dtype", dict(k_cache=kc.bfloat16(), v_cache=vc.bfloat16()), "`k_cache` must be contiguous with the dtype"),
        ("freqs", dict(freqs=freqs[:3]), "`freqs` must be float32 of shape"),
        ("freqs device", dict(freqs=freqs.to("meta")), "`freqs` must be float32 of shape"),
        ("cache too short", dict(start=5), "`start` + n must be <= L_max"),
        ("start negative", dict(start=-1), "`start` must be >= 0"),
        ("start type", dict(start=1.5), "`start` must be an int"),
        ("eps", dict(eps=float("nan")), "`eps` must be a finite float"),
    ]


@pytest.mark.parametrize("case", [c[0] for c in _bad_cases()[1]])
def test_bad_input_names_the_argument(case):
    ok, cases = _bad_cases()
    _, change, message = next(c for c in cases if c[0] == case)
    kwargs = {**ok, **change}
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        decode_layer(**kwargs)


@pytest.mark.parametrize("weights,field,value,message", [
    ("w8a8", 7, 0, "wqkv: w8a8 needs column sums"),
    ("w8a8", 1, 10, "wqkv: packed must hold"),
    ("int4", 8, 3, "wqkv: int4 group must be even"),
    ("int4", 2, 0, "wqkv: int4 panels are bytes"),
    ("native", 6, 7, "wqkv: unknown packed format 7"),
])
def test_the_kernel_checks_each_packed_descriptor(monkeypatch, weights, field, value, message):
    """A descriptor that does not describe its panels is refused by name before any work."""
    dim, H, F = 48, 3, 40
    w = make_layer(dim, H, F, torch.float32, weights)
    h, y, kc, vc, freqs = make_inputs(2, 1, dim, H, 8, torch.float32)
    _dispatch.selfcheck("cpu")  # run with the real descriptors, before the patch
    good = dl.kernel_descriptor
    monkeypatch.setattr(dl, "kernel_descriptor", lambda p: tuple(
        value if i == field and p.N == 3 * dim else v for i, v in enumerate(good(p))))
    with pytest.raises(ValueError, match=re.escape(message)):
        fused(h, y, w, kc, vc, freqs, 0)


# ------------------------------------------------------------------ decode_layers: a stack in one call


def make_stack(kinds, B=2, H=3, d=16, F=40, L=16, seed=0):
    """A LayerStack of len(kinds) layers, kinds[i] = (dtype, weights) (one dtype for all), and its caches."""
    dim = H * d
    layers = [make_layer(dim, H, F, dtype, weights, seed=seed + i) for i, (dtype, weights) in enumerate(kinds)]
    caches = [make_inputs(B, 1, dim, H, L, kinds[0][0], seed=seed + 10 + i)[2:4] for i in range(len(kinds))]
    return dl.LayerStack(layers, [k for k, _ in caches], [v for _, v in caches])


def clone_caches(stack):
    return dl.LayerStack(stack.layers, [k.clone() for k in stack.k_caches], [v.clone() for v in stack.v_caches],
                         stack.first_norm)


def layer_by_layer(h, y, stack, freqs, start, layer_fn):
    for w, kc, vc in zip(stack.layers, stack.k_caches, stack.v_caches):
        h, y = layer_fn(h, y, w, kc, vc, freqs, start, 1e-5)
    return h, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,n,start", [(1, 1, 0), (2, 4, 5), (3, 8, 8)])
def test_a_stack_gives_the_bits_of_one_fused_call_a_layer(B, n, start, dtype):
    """One extension call for all layers (in place after the first) = decode_layer on each in turn."""
    stack = make_stack([(dtype, "native"), (dtype, "int8"), (dtype, "int4"), (dtype, "w8a8"), (dtype, "w4a8")], B=B)
    h, y, _, _, freqs = make_inputs(B, n, 48, 3, 16, dtype, seed=7)
    each = clone_caches(stack)
    assert stack.kernel_for(y) is not None
    assert _dispatch.pick("decode_layer", h, y, stack, None, None, freqs).name == "cpu"
    got = dl.decode_layers(h, y, stack, freqs, start)
    want = layer_by_layer(h, y, each, freqs, start, fused)
    for name, a, b in zip(("h", "y") + ("k_cache",) * 4 + ("v_cache",) * 4, got + stack.caches, want + each.caches):
        assert torch.equal(a, b), f"{name}: max difference {max_err(a, b):.3g} (expected the same bits)"
    for t in got:
        assert t.shape == (B, n, 48) and t.dtype == dtype and t.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_stack_with_a_first_norm_computes_y_in_the_same_call(dtype):
    """y None: the stack's first_norm of h (add_rmsnorm without a residual), then every layer."""
    first_norm = (1 + 0.2 * torch.randn(48, generator=torch.Generator().manual_seed(5))).to(dtype)
    plain = make_stack([(dtype, "native"), (dtype, "int8")], B=3)
    stack = dl.LayerStack(plain.layers, plain.k_caches, plain.v_caches, first_norm)
    h, _, _, _, freqs = make_inputs(3, 4, 48, 3, 16, dtype, seed=6)
    wide = torch.randn(3, 4, 2 * 48).to(dtype)
    wide[..., 7:55] = h
    each = clone_caches(stack)
    got = dl.decode_layers(wide[..., 7:55], None, stack, freqs, 4)  # strided h
    want = layer_by_layer(*add_rmsnorm(h, None, first_norm, 1e-5), each, freqs, 4, fused)
    for a, b in zip(got + stack.caches, want + each.caches):
        assert torch.equal(a, b), f"max difference {max_err(a, b):.3g} (expected the same bits)"
    with pytest.raises(ValueError, match=re.escape("`y` may be None only for a LayerStack with a first_norm")):
        dl.decode_layers(h, None, plain, freqs, 4)
    with pytest.raises(ValueError, match=re.escape("`first_norm` must be None or have the shape")):
        dl.LayerStack(plain.layers, plain.k_caches, plain.v_caches, first_norm[:5])


def test_a_stack_keeps_h_and_y_inputs_intact_and_reads_strided_rows():
    stack = make_stack([(torch.float32, "native")] * 2, B=3)
    h, y, _, _, freqs = make_inputs(3, 4, 48, 3, 16, torch.float32, seed=8)
    wide = torch.randn(3, 4, 2 * 48)
    wide[..., 5:53] = h
    h_sliced, h0, y0 = wide[..., 5:53], h.clone(), y.clone()
    each = clone_caches(stack)
    got = dl.decode_layers(h_sliced, y, stack, freqs, 2)
    want = layer_by_layer(h, y, each, freqs, 2, fused)
    assert torch.equal(h, h0) and torch.equal(y, y0) and torch.equal(wide[..., 5:53], h0)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_a_stack_goes_layer_by_layer_where_the_kernel_does_not_serve_it(monkeypatch):
    """A linear without a packed weight for y (its torch path; here forced) and
    DETAILFLOW_BACKEND=torch: each layer its own way."""
    stack = make_stack([(torch.float32, "native"), (torch.float32, "int8")])
    monkeypatch.setattr(stack.layers[1].wo, "packed_for", lambda x: None, raising=False)
    h, y, _, _, freqs = make_inputs(2, 4, 48, 3, 16, torch.float32, seed=9)
    assert stack.kernel_for(y) is None
    assert _dispatch.pick("decode_layer", h, y, stack, None, None, freqs).name == "cpu"
    for forced in (None, "torch"):
        if forced:
            monkeypatch.setenv(_dispatch.BACKEND_ENV, forced)
        a, b = clone_caches(stack), clone_caches(stack)
        got = dl.decode_layers(h, y, a, freqs, 3)
        want = layer_by_layer(h, y, b, freqs, 3, decode_layer if forced is None else decode_layer_ref)
        for x, z in zip(got + a.caches, want + b.caches):
            assert torch.equal(x, z)


def test_a_stack_of_plain_linears_runs_the_composition():
    stack = make_stack([(torch.float32, "native")] * 2)
    plain_layers = []
    for w in stack.layers:
        lins = [torch.nn.Linear(m.in_features, m.out_features, bias=False) for m in w.linears()]
        with torch.no_grad():
            for m, lin in zip(w.linears(), lins):
                lin.weight.copy_(m.weight)
        plain_layers.append(LayerWeights(*lins, w.ffn_norm, w.next_norm, w.n_head))
    plain = dl.LayerStack(plain_layers, stack.k_caches, stack.v_caches)
    h, y, _, _, freqs = make_inputs(2, 1, 48, 3, 16, torch.float32, seed=4)
    assert not plain.decode_linears
    assert _dispatch.pick("decode_layer", h, y, plain, None, None, freqs).name == "torch"
    with torch.no_grad():
        a, b = clone_caches(plain), clone_caches(plain)
        got = dl.decode_layers(h, y, a, freqs, 6)
        want = layer_by_layer(h, y, b, freqs, 6, decode_layer_ref)
    for x, z in zip(got + a.caches, want + b.caches):
        assert torch.equal(x, z)


def _bad_stack_cases():
    stack = make_stack([(torch.float32, "native")] * 2)
    h, y, _, _, freqs = make_inputs(2, 4, 48, 3, 16, torch.float32)
    ok = dict(h=h, y=y, stack=stack, freqs=freqs, start=2, eps=1e-5)
    return ok, [
        ("stack type", dict(stack=list(stack.layers)), "`stack` must be a LayerStack"),
        ("y batch", dict(h=h[:1], y=y[:1]), "`y` must be (B, n, dim) with the B, dim, dtype and device"),
        ("y dtype", dict(h=h.bfloat16(), y=y.bfloat16()), "`y` must be (B, n, dim) with the B, dim, dtype"),
        ("h shape", dict(h=h[:, :3]), "`h` must have the shape"),
        ("freqs", dict(freqs=freqs[:3]), "`freqs` must be float32 of shape"),
        ("cache too short", dict(start=13), "`start` + n must be <= L_max"),
        ("eps", dict(eps=-1.0), "`eps` must be a finite float"),
    ]


@pytest.mark.parametrize("case", [c[0] for c in _bad_stack_cases()[1]])
def test_decode_layers_bad_input_names_the_argument(case):
    ok, cases = _bad_stack_cases()
    _, change, message = next(c for c in cases if c[0] == case)
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        dl.decode_layers(**{**ok, **change})


def test_a_bad_stack_names_the_layer():
    stack = make_stack([(torch.float32, "native")] * 3)
    layers, ks, vs = list(stack.layers), list(stack.k_caches), list(stack.v_caches)
    bad = LayerWeights(*layers[1].linears(), layers[1].ffn_norm.bfloat16(), layers[1].next_norm, 3)
    cases = [
        (dict(layers=[]), "must be non-empty and of one length"),
        (dict(v_caches=vs[:2]), "must be non-empty and of one length"),
        (dict(layers=[layers[0], bad, layers[2]]), "`layers[1].w.ffn_norm` must be (48,)"),
        (dict(k_caches=[ks[0], ks[1], ks[2][:, :, :8].contiguous()]), "`layers[2].v_cache` must be (B, n_head, L_max"),
        (dict(k_caches=[ks[0], ks[1], ks[2][:, :, :8].contiguous()],
              v_caches=[vs[0], vs[1], vs[2][:, :, :8].contiguous()]), "`k_caches[2]` must have the shape of `k_caches[0]`"),
        (dict(k_caches=[ks[0][0]] + ks[1:]), "`k_caches[0]` must be (B, n_head, L_max, head_dim)"),
    ]
    for change, message in cases:
        args = {**dict(layers=layers, k_caches=ks, v_caches=vs), **change}
        with pytest.raises((ValueError, TypeError), match=re.escape(message)):
            dl.LayerStack(**args)
