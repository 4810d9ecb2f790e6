"""The one-way layering of the package (README "What is where"), checked from the source.

1. bottom: the on-disk format and the model parts both sides share (BOTTOM below);
2. the engine runtime: imports only layer 1 (and itself), never ``detailflow_ref``;
3. the reference (python/detailflow_ref): imports only layer 1 of the engine;
4. the comparison tools (COMPARISON): may import both sides, lazily.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

ENGINE = REPO / "detailflow_engine"
REFERENCE = REPO / "python" / "detailflow_ref"
BOTTOM = {"config", "checkpoint", "schedule", "rotary", "siglip2", "quantizer", "outputs", "images", "classifier",
          "sampling_settings", "device_dtype"}
COMPARISON = {"profile", "evaluate", "train_classifier", "profiling"}
RUNTIME_IMPORTS = ["detailflow_engine", "detailflow_engine.pipeline", "detailflow_engine.batcher",
                   "detailflow_engine.generate", "detailflow_engine.reconstruct", "detailflow_engine.convert",
                   "detailflow_engine.prior", "detailflow_engine.tokenizer", "detailflow_engine.ops",
                   *(f"detailflow_engine.ops.{op}" for op in ("decode_gemm", "cache_attention", "group_sample",
                                                               "vq_lookup", "code_search", "add_rmsnorm", "rope_qkv"))]


def imported_modules(path: Path, package: str) -> set:
    """Every module a file imports (top level or inside functions), absolute names."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if not node.level:
                out.add(node.module)
                continue
            parts = package.split(".")  # relative: resolve against the file's package
            base = ".".join(parts[:len(parts) - node.level + 1])
            if node.module:
                out.add(f"{base}.{node.module}")
            else:  # from . import x: x is a module of the package
                out.update(f"{base}.{a.name}" for a in node.names)
    return out


def engine_files():
    for path in sorted(ENGINE.rglob("*.py")):
        rel = path.relative_to(ENGINE)
        yield rel.parts[0].removesuffix(".py"), path, ".".join(("detailflow_engine", *rel.parts[:-1]))


def test_importing_the_runtime_loads_no_reference_module():
    code = ("import importlib, json, sys\n"
            f"for m in {RUNTIME_IMPORTS!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'detailflow_ref')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_only_the_comparison_tools_import_the_reference():
    offenders = {str(path.relative_to(REPO)) for top, path, pkg in engine_files()
                 if top not in COMPARISON
                 and any(m.split(".")[0] == "detailflow_ref" for m in imported_modules(path, pkg))}
    assert offenders == set()


def test_the_bottom_layer_stands_alone():
    """Layer 1 imports nothing above it: no runtime module, no ops, no reference."""
    wrong = {}
    for top, path, pkg in engine_files():
        if top in BOTTOM:
            ours = {m for m in imported_modules(path, pkg) if m.split(".")[0] in ("detailflow_engine", "detailflow_ref")}
            above = {m for m in ours if m.split(".")[0] == "detailflow_ref"
                     or (m != "detailflow_engine" and m.split(".")[1] not in BOTTOM)}
            if above:
                wrong[top] = sorted(above)
    assert wrong == {}


def test_the_reference_uses_only_the_bottom_layer():
    wrong = {}
    for path in sorted(REFERENCE.glob("*.py")):
        engine = {m for m in imported_modules(path, "detailflow_ref") if m.split(".")[0] == "detailflow_engine"}
        above = {m for m in engine if m == "detailflow_engine" or m.split(".")[1] not in BOTTOM}
        if above:
            wrong[path.name] = sorted(above)
    assert wrong == {}


def test_the_layers_checker_sees_imports():
    """The checks above can fail: the parser finds lazy, aliased and relative imports."""
    src = REPO / "tests" / "fixtures" / "_layers_probe.py"
    try:
        src.write_text("def f():\n    import detailflow_ref.gpt as g\n    from ..prior import Prior\n")
        found = imported_modules(src, "detailflow_engine.ops")
    finally:
        src.unlink()
    assert found == {"detailflow_ref.gpt", "detailflow_engine.prior"}


# ------------------------------------------------------------------ one swap, one forward path


@pytest.mark.parametrize("dtype, weights", [("fp32", "native"), ("bf16", "native"), ("fp32", "int8"), ("bf16", "int8")])
def test_linears_are_swapped_once_at_load(tiny_a, dtype, weights):
    from detailflow_engine.linear import DecodeLinear
    from detailflow_engine.loading import load_prior

    prior = load_prior(tiny_a / "prior", device="cpu", dtype=dtype, weights=weights)
    linears = {name: type(m).__name__ for name, m in prior.named_modules()
               if isinstance(m, (torch.nn.Linear, DecodeLinear))}
    assert linears and set(linears.values()) == {"DecodeLinear"}, linears
    modes = {name: m.weights for name, m in prior.named_modules() if isinstance(m, DecodeLinear)}
    assert modes.pop("output") == "native"
    assert set(modes.values()) == {weights}
    before = dict(prior.named_modules())
    prior.setup_caches(3)  # allocates caches, swaps nothing
    after = dict(prior.named_modules())
    assert all(after[name] is m for name, m in before.items() if isinstance(m, DecodeLinear))


def test_prior_has_no_fused_ops_switch():
    import detailflow_engine.prior as prior_mod

    assert not hasattr(prior_mod, "FUSED_OPS") and not hasattr(prior_mod, "fused_ops")
    # the pipeline owns the CUDA graphs; the prior neither imports them nor holds them
    assert "detailflow_engine.cuda_graphs" not in imported_modules(ENGINE / "prior.py", "detailflow_engine")
    assert "detailflow_engine.cuda_graphs" in imported_modules(ENGINE / "pipeline.py", "detailflow_engine")


# ------------------------------------------------------------------ memory: one copy of the weights


@pytest.mark.parametrize("weights", ["native", "int8", "int4", "w8a8", "w4a8"])
def test_the_loaded_prior_holds_its_linears_once(tiny_a, weights):
    """Every linear of a loaded prior holds only its packed layout: no parameter, buffer or kept
    source beside the panels, and the tensors it holds add up to the panels' bytes (+ scales)."""
    from detailflow_engine.linear import DecodeLinear
    from detailflow_engine.loading import load_prior

    prior = load_prior(tiny_a / "prior", device="cpu", dtype="bf16", weights=weights)
    held = {t.data_ptr() for t in list(prior.parameters()) + list(prior.buffers())}
    linears = [(name, m) for name, m in prior.named_modules() if isinstance(m, DecodeLinear)]
    assert len(linears) == 5 * prior.config.n_layer + 1
    for name, m in linears:
        assert list(m.parameters()) == [] and list(m.buffers()) == [], name
        p = m.packed_for(torch.zeros(1, m.in_features, dtype=torch.bfloat16))
        assert p is not None and p.source is None and p.packed.data_ptr() not in held, name


def test_decode_only_tokenizer(tiny_a):
    from detailflow_engine.loading import load_tokenizer

    full = load_tokenizer(tiny_a / "tokenizer")
    dec = load_tokenizer(tiny_a / "tokenizer", encoder=False)
    assert not any(k.startswith(("encoder.", "quant_conv.")) for k in dec.state_dict())
    assert set(full.state_dict()) - set(dec.state_dict()) and all(
        k.startswith(("encoder.", "quant_conv.")) for k in set(full.state_dict()) - set(dec.state_dict()))
    codes = torch.randint(0, full.config.codebook_size, (2, full.num_tokens))
    assert torch.equal(dec.decode(codes), full.decode(codes))
    with pytest.raises(RuntimeError, match="without its encoder"):
        dec.encode(torch.zeros(1, 3, 32, 32))


def test_release_pages_keeps_mapped_values(tmp_path):
    """The loader hands a mapped checkpoint's pages back after each copy; they read back the same."""
    from detailflow_engine.checkpoint import release_pages

    want = {"a": torch.randn(3000, 700), "b": torch.arange(100000, dtype=torch.float32)}
    torch.save(want, tmp_path / "x.pt")
    got = torch.load(tmp_path / "x.pt", mmap=True, weights_only=True)
    for k in want:
        assert torch.equal(got[k], want[k])
        release_pages(got[k])
        assert torch.equal(got[k], want[k])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_streamed_load_equals_a_plain_load_and_cast(tiny_a, dtype):
    """Filling the model in its dtype, tensor by tensor, gives the values of load_state_dict + .to()."""
    from detailflow_engine.checkpoint import load_checkpoint
    from detailflow_engine.loading import load_prior
    from detailflow_engine.prior import Prior

    loaded = load_checkpoint(tiny_a / "prior", "prior")
    plain = Prior(loaded.config)
    plain.load_state_dict(loaded.state_dict, strict=True)
    plain = plain.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    streamed = load_prior(tiny_a / "prior", dtype=dtype)
    a, b = plain.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
