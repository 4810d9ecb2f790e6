"""Checkpoint loading, safety checks and the safetensors conversion (detailflow_engine.checkpoint)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detailflow_engine import convert
from detailflow_engine.checkpoint import (CheckpointConfigError, CheckpointError, ConfigError,
                                          LoadedCheckpoint, TOKENIZER_TRAINING_PREFIXES,
                                          check_state_dict, load_checkpoint,
                                          save_safetensors_folder)
from detailflow_engine.config import PriorConfig, TokenizerConfig
from conftest import copy_model

REPO = Path(__file__).resolve().parents[1]
TINY_A_TRAINING_KEYS = {"encoder.refined_tokens", "refine_conv.weight", "refine_conv.bias",
                        "quantize.codebook_used"}


@pytest.fixture
def tok_dir(tiny_a, tmp_path):
    return copy_model(tiny_a / "tokenizer", tmp_path / "tokenizer")


@pytest.fixture
def prior_dir(tiny_a, tmp_path):
    return copy_model(tiny_a / "prior", tmp_path / "prior")


def _same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- loading

def test_tokenizer_loads_from_folder_and_pt(tiny_a):
    folder = tiny_a / "tokenizer"
    a = load_checkpoint(folder, "tokenizer")
    b = load_checkpoint(folder / "checkpoints" / "16.pt", "tokenizer")
    assert isinstance(a.config, TokenizerConfig) and a.config == b.config
    assert a.which == b.which == "model"
    assert a.folder == b.folder == folder
    assert a.weights_path == folder / "checkpoints" / "16.pt"
    _same_tensors(a.state_dict, b.state_dict)
    assert set(a.skipped) == TINY_A_TRAINING_KEYS
    assert not any(k.startswith(TOKENIZER_TRAINING_PREFIXES) for k in a.state_dict)
    assert any(k.startswith("quantize.") for k in a.state_dict)  # the codebook itself is kept
    full = load_checkpoint(folder, "tokenizer", skip_prefixes=())
    assert set(full.state_dict) == set(a.state_dict) | TINY_A_TRAINING_KEYS and not full.skipped


def test_prior_ema_by_default_model_on_request(tiny_a):
    folder = tiny_a / "prior"
    ema = load_checkpoint(folder, "prior")
    model = load_checkpoint(folder / "checkpoints" / "16.pt", "prior", ema=False)
    assert isinstance(ema.config, PriorConfig)
    assert (ema.which, model.which) == ("ema", "model")
    assert ema.state_dict.keys() == model.state_dict.keys()
    assert any(not torch.equal(ema.state_dict[k], model.state_dict[k]) for k in ema.state_dict)
    _same_tensors(load_checkpoint(folder, "prior", ema=True).state_dict, ema.state_dict)


def test_explicit_ema_missing_is_an_error(tiny_a):
    pt = tiny_a / "tokenizer" / "checkpoints" / "16.pt"
    with pytest.raises(CheckpointError, match=r"no 'ema' state dict.*keys present.*'model'") as exc:
        load_checkpoint(pt, "tokenizer", ema=True)
    assert str(pt) in str(exc.value)


def test_training_checkpoint_with_args_namespace(prior_dir):
    """A full train_c2i.py checkpoint: args Namespace, optimizer, scheduler; largest step wins."""
    src = torch.load(prior_dir / "checkpoints" / "16.pt", map_location="cpu", weights_only=True)
    params = [torch.nn.Parameter(t.clone()) for t in list(src["model"].values())[:2]]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sum(p.sum() for p in params).backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lambda s: 1.0)
    ckpt = {"model": src["model"], "ema": {k: v + 1 for k, v in src["ema"].items()},
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "steps": 32,
            "args": argparse.Namespace(gpt_model="GPT-custom-L2-D64-H4", lr=1e-4, ema=True,
                                       image_size=[64, 64], vq_ckpt=None)}
    torch.save(ckpt, prior_dir / "checkpoints" / "0000032.pt")
    loaded = load_checkpoint(prior_dir, "prior")
    assert loaded.weights_path.name == "0000032.pt" and loaded.which == "ema"
    _same_tensors(loaded.state_dict, ckpt["ema"])


def test_configs_beside_the_pt(tiny_a, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("config.json", "config.yaml", "checkpoints/16.pt"):
        (flat / Path(name).name).write_bytes((tiny_a / "prior" / name).read_bytes())
    loaded = load_checkpoint(flat / "16.pt", "prior")
    assert loaded.folder == flat and loaded.which == "ema"


# --------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("missing", ["config.json", "config.yaml"])
def test_missing_config_names_expected_path(prior_dir, missing):
    (prior_dir / missing).unlink()
    with pytest.raises(CheckpointConfigError, match=f"missing {missing}: expected {prior_dir / missing}"):
        load_checkpoint(prior_dir, "prior")
    with pytest.raises(CheckpointConfigError) as exc:  # from the .pt: names both places looked at
        load_checkpoint(prior_dir / "checkpoints" / "16.pt", "prior")
    assert str(prior_dir / missing) in str(exc.value)
    assert str(prior_dir / "checkpoints" / missing) in str(exc.value)


def test_unknown_tower_is_named(tok_dir):
    cfg = json.loads((tok_dir / "config.json").read_text())
    cfg["encoder_model"] = "siglip2_huge"
    (tok_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="siglip2_huge") as exc:
        load_checkpoint(tok_dir, "tokenizer")
    assert isinstance(exc.value, ConfigError)  # config problems are both kinds of error
    assert str(tok_dir / "config.json") in str(exc.value)


def _write_bad(path: Path, what: str, good: Path) -> None:
    if what == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif what == "text":
        path.write_text("this is not a checkpoint\n")
    elif what == "empty":
        path.write_bytes(b"")
    elif what == "tensor":
        torch.save(torch.zeros(3), path)
    elif what == "no_model":
        torch.save({"weights": {"a": torch.zeros(1)}, "steps": 3}, path)
    elif what == "model_not_dict":
        torch.save({"model": torch.zeros(2)}, path)
    elif what == "legacy_no_model":
        torch.save([1, 2], path, _use_new_zipfile_serialization=False)


@pytest.mark.parametrize("what,match", [
    ("truncated", "corrupt or truncated"), ("text", "not a PyTorch checkpoint"),
    ("empty", "not a PyTorch checkpoint"), ("tensor", "holds a Tensor"),
    ("no_model", r"no 'ema' or 'model' state dict.*steps"), ("model_not_dict", "expected a state dict"),
    ("legacy_no_model", "holds a list"),
])
def test_bad_pt_files(prior_dir, what, match):
    pt = prior_dir / "checkpoints" / "16.pt"
    bad = prior_dir / "checkpoints" / "bad.pt"
    _write_bad(bad, what, pt)
    with pytest.raises(CheckpointError, match=match) as exc:
        load_checkpoint(bad, "prior")
    assert str(bad) in str(exc.value)
    if what == "truncated":  # also via the folder, where it is the newest step
        pt.unlink()
        bad.rename(prior_dir / "checkpoints" / "20.pt")
        with pytest.raises(CheckpointError, match="20.pt"):
            load_checkpoint(prior_dir, "prior")


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match=f"checkpoint not found: {tmp_path / 'nope.pt'}"):
        load_checkpoint(tmp_path / "nope.pt", "prior")
    with pytest.raises(CheckpointError, match="kind must be"):
        load_checkpoint(tmp_path, "vae")


def test_folder_without_weights_or_ambiguous(prior_dir, tmp_path):
    (prior_dir / "checkpoints" / "16.pt").rename(tmp_path / "16.pt")
    with pytest.raises(CheckpointError, match="no weights found"):
        load_checkpoint(prior_dir, "prior")
    (tmp_path / "16.pt").rename(prior_dir / "checkpoints" / "16.pt")
    (prior_dir / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="ambiguous"):
        load_checkpoint(prior_dir, "prior")


class _Evil:
    """Unpickling this creates the marker file (a stand-in for os.system & co.)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _CustomArgs:  # a training script's own class in the checkpoint: not allowed either
    pass


def test_malicious_pickle_refused_and_not_executed(prior_dir, tmp_path):
    marker = tmp_path / "pwned"
    evil = prior_dir / "checkpoints" / "99.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "args": _Evil(marker)}, evil)
    with pytest.raises(CheckpointError, match=r"needs global \S*open.*not executed") as exc:
        load_checkpoint(prior_dir, "prior")  # the folder picks 99.pt, the newest step
    assert str(evil) in str(exc.value)
    assert not marker.exists()
    # The payload is live: an unrestricted unpickler would have run it.
    control = tmp_path / "control"
    torch.save(_Evil(control), tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False).close()  # returns the opened file
    assert control.exists()


def test_custom_class_refused(prior_dir):
    bad = prior_dir / "checkpoints" / "7.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "args": _CustomArgs()}, bad)
    with pytest.raises(CheckpointError, match=r"needs global \S*_CustomArgs"):
        load_checkpoint(bad, "prior")


# --------------------------------------------------------------------------- check_state_dict

def test_check_state_dict():
    expected = {"a.weight": torch.Size([4, 3]), "a.bias": (4,), "b": torch.empty(2, 2, device="meta")}
    good = {"a.weight": torch.zeros(4, 3), "a.bias": torch.zeros(4), "b": torch.zeros(2, 2)}
    check_state_dict(expected, good, "tiny")
    with pytest.raises(CheckpointError, match=r"^tiny: .*1 missing key\(s\): a\.bias"):
        check_state_dict(expected, {k: v for k, v in good.items() if k != "a.bias"}, "tiny")
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): extra\.w"):
        check_state_dict(expected, {**good, "extra.w": torch.zeros(1)}, "tiny")
    with pytest.raises(CheckpointError, match=r"a\.weight expected \(4, 3\) found \(3, 4\)"):
        check_state_dict(expected, {**good, "a.weight": torch.zeros(3, 4)}, "tiny")
    many = {f"k{i}": (1,) for i in range(8)}
    with pytest.raises(CheckpointError, match=r"8 missing key\(s\): k0; k1; k2; k3; k4; \.\.\. and 3 more"):
        check_state_dict(many, {}, "x")


def test_check_state_dict_against_loaded_prior(tiny_a):
    loaded = load_checkpoint(tiny_a / "prior", "prior")
    expected = {k: v.shape for k, v in loaded.state_dict.items()}
    check_state_dict(expected, loaded.state_dict, "prior")
    key = "tok_embeddings.weight"
    expected[key] = torch.Size([loaded.config.vocab_size + 1, loaded.config.dim])
    with pytest.raises(CheckpointError, match=rf"{key} expected \(257, 64\) found \(256, 64\)"):
        check_state_dict(expected, loaded.state_dict, "prior")


# --------------------------------------------------------------------------- conversion

@pytest.mark.parametrize("kind", ["tokenizer", "prior"])
def test_convert_roundtrip(tiny_a, tmp_path, kind):
    src = load_checkpoint(tiny_a / kind, kind)
    out = save_safetensors_folder(src, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "config.yaml", "model.safetensors"]
    for name in ("config.json", "config.yaml"):
        assert (out / name).read_bytes() == (tiny_a / kind / name).read_bytes()
    back = load_checkpoint(out, kind)
    assert isinstance(back, LoadedCheckpoint) and back.weights_path == out / "model.safetensors"
    assert back.config == src.config and back.config.raw_json == src.config.raw_json
    assert back.which == src.which and not back.skipped
    _same_tensors(back.state_dict, src.state_dict)
    # the file itself, and the configs-two-levels-up layout
    (out / "checkpoints").mkdir()
    (out / "model.safetensors").rename(out / "checkpoints" / "model.safetensors")
    nested = load_checkpoint(out / "checkpoints" / "model.safetensors", kind)
    assert nested.folder == out
    _same_tensors(nested.state_dict, src.state_dict)


def test_converted_prior_remembers_ema(tiny_a, tmp_path):
    out = save_safetensors_folder(load_checkpoint(tiny_a / "prior", "prior"), tmp_path / "ema")
    assert load_checkpoint(out, "prior", ema=True).which == "ema"
    with pytest.raises(CheckpointError, match="holds only the 'ema' weights"):
        load_checkpoint(out, "prior", ema=False)


def test_convert_refuses_to_overwrite(tiny_a, tmp_path):
    loaded = load_checkpoint(tiny_a / "prior", "prior")
    out = save_safetensors_folder(loaded, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save_safetensors_folder(load_checkpoint(tiny_a / "prior", "prior", ema=False), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched, no temp files
    model = load_checkpoint(tiny_a / "prior", "prior", ema=False)
    save_safetensors_folder(model, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(before)
    _same_tensors(load_checkpoint(out, "prior").state_dict, model.state_dict)


def test_convert_cli(tiny_a, tmp_path, capsys):
    out = tmp_path / "tok"
    assert convert.main([str(tiny_a / "tokenizer"), str(out), "--kind", "tokenizer"]) == 0
    assert "4 training-only tensors dropped" in capsys.readouterr().out
    assert convert.main([str(tiny_a / "tokenizer"), str(out), "--kind", "tokenizer"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: refusing to overwrite") and err.count("\n") == 1
    assert convert.main([str(tiny_a / "tokenizer"), str(out), "--kind", "tokenizer", "--overwrite"]) == 0
    assert convert.main([str(tiny_a / "tokenizer"), str(tmp_path / "x"), "--kind", "tokenizer", "--ema"]) == 2
    assert "no 'ema' state dict" in capsys.readouterr().err


def test_convert_cli_subprocess_bad_input(tmp_path):
    bad = tmp_path / "m" / "checkpoints" / "1.pt"
    bad.parent.mkdir(parents=True)
    bad.write_text("not a checkpoint")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "python")])}
    proc = subprocess.run([sys.executable, "-m", "detailflow_engine.convert", str(bad),
                           str(tmp_path / "out"), "--kind", "prior"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    assert "config" in lines[0] and str(bad) in lines[0]  # no configs beside or two levels up
    assert not (tmp_path / "out").exists()


def test_convert_to_fp16_halves_the_file_and_loads(tiny_a, tmp_path):
    """--dtype fp16 stores half-precision weights; loading gives the same tensors up to fp16 rounding."""
    assert convert.main([str(tiny_a / "prior"), str(tmp_path / "p16"), "--kind", "prior", "--dtype", "fp16"]) == 0
    src = load_checkpoint(tiny_a / "prior", "prior")
    half = load_checkpoint(tmp_path / "p16", "prior")
    for name, t in src.state_dict.items():
        assert half.state_dict[name].dtype == torch.float16
        torch.testing.assert_close(half.state_dict[name].float(), t, atol=1e-7, rtol=1e-3)
    from detailflow_engine.loading import load_prior

    assert load_prior(tmp_path / "p16").output.weight.dtype == torch.float32  # cast back to the engine dtype


def test_convert_files_get_the_usual_mode(tiny_a, tmp_path):
    """mkstemp makes 0600 files; converted models are readable by others as open() would make them."""
    import os

    from detailflow_engine.convert import main as convert_main

    mask = os.umask(0o022)
    try:
        assert convert_main([str(tiny_a / "prior"), str(tmp_path / "out"), "--kind", "prior"]) == 0
    finally:
        os.umask(mask)
    for name in ("config.json", "config.yaml", "model.safetensors"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o644, name


def test_convert_disk_full_is_one_line(tiny_a, tmp_path, monkeypatch, capsys):
    import errno

    import detailflow_engine.checkpoint as ck
    from detailflow_engine.convert import main as convert_main

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.shutil, "copyfile", full)
    assert convert_main([str(tiny_a / "prior"), str(tmp_path / "out"), "--kind", "prior"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write") and "No space left on device" in err and err.count("\n") == 1
    assert not [p for p in (tmp_path / "out").iterdir()]  # no temp file left behind
