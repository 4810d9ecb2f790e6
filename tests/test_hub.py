"""Released weights by Hugging Face repo id, offline against a hub-cache layout built from tiny-a.

The cache is laid out as huggingface_hub keeps it: models--owner--name/{blobs/<hash>,
refs/main, snapshots/<commit>/<file> -> ../../blobs/<hash>}. A file the repo has but that was
never downloaded is a dangling symlink there.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from detailflow_engine import hub
from detailflow_engine.generate import main

COMMIT = "0123456789abcdef0123456789abcdef01234567"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def add_repo(cache: Path, repo_id: str, src: Path, missing=(), ref="main", commit=COMMIT) -> Path:
    """Put model folder ``src`` into the cache as repo_id@commit; ``missing`` files are listed
    (dangling links) but not downloaded."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snap = storage / "snapshots" / commit
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src).as_posix()
        data = f.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for rel in missing:
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(storage / "blobs" / ("never-downloaded-" + rel.replace("/", "_")),
                                        link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def offline_cache(tiny_a, tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hub"
    add_repo(cache, "tiny-org/tiny-a-prior", tiny_a / "prior")
    add_repo(cache, "tiny-org/tiny-a-tokenizer", tiny_a / "tokenizer")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # relative names like tiny-org/... do not exist locally
    return cache


def test_resolve_offline(offline_cache):
    p = hub.resolve_model_path("tiny-org/tiny-a-prior")
    assert p == offline_cache / "models--tiny-org--tiny-a-prior" / "snapshots" / COMMIT / "checkpoints" / "16.pt"
    assert hub.resolve_model_path(f"tiny-org/tiny-a-prior@{COMMIT}") == p  # a commit as the revision


def test_from_pretrained_by_repo_id_matches_local(tiny_a, offline_cache):
    from detailflow_engine.pipeline import DetailFlowPipeline

    by_id = DetailFlowPipeline.from_pretrained("tiny-org/tiny-a-prior", "tiny-org/tiny-a-tokenizer", device="cpu")
    local = DetailFlowPipeline.from_pretrained(tiny_a / "prior", tiny_a / "tokenizer", device="cpu")
    for (k, a), (_, b) in zip(sorted(by_id.prior.state_dict().items()), sorted(local.prior.state_dict().items())):
        assert torch.equal(a, b), k
    np.testing.assert_array_equal(by_id.generate([1, 2], seed=5).uint8, local.generate([1, 2], seed=5).uint8)


def test_cli_by_repo_id(tiny_a, offline_cache, tmp_path):
    out_id, out_local = tmp_path / "id", tmp_path / "local"
    common = ["--device", "cpu", "--classes", "3", "--num-images", "2", "--seed", "4"]
    assert main(["--ckpt", "tiny-org/tiny-a-prior", "--tokenizer", "tiny-org/tiny-a-tokenizer",
                 "--out", str(out_id)] + common) == 0
    assert main(["--ckpt", str(tiny_a / "prior"), "--tokenizer", str(tiny_a / "tokenizer"),
                 "--out", str(out_local)] + common) == 0
    for name in ("000000.png", "000001.png", "grid.png"):
        assert (out_id / name).read_bytes() == (out_local / name).read_bytes()
    assert "models--tiny-org--tiny-a-prior" in (out_id / "manifest.jsonl").read_text()


def test_picks_latest_step_and_fetches_nothing_else(tiny_a, offline_cache):
    """A repo with optimizer states and older steps that were never downloaded still loads:
    only config.json, config.yaml and the newest checkpoint are needed."""
    add_repo(offline_cache, "tiny-org/train-run", tiny_a / "prior",
             missing=["checkpoints/8.pt", "optimizer.pt", "README.md"])
    p = hub.resolve_model_path("tiny-org/train-run")
    assert p.name == "16.pt"
    from detailflow_engine.loading import load_prior

    load_prior(p, device="cpu")


def test_local_path_wins(tiny_a, offline_cache, tmp_path):
    import shutil

    shutil.copytree(tiny_a / "prior", tmp_path / "tiny-org" / "not-in-cache")
    assert hub.resolve_model_path("tiny-org/not-in-cache") == Path("tiny-org/not-in-cache")
    from detailflow_engine.pipeline import DetailFlowPipeline

    DetailFlowPipeline.from_pretrained("tiny-org/not-in-cache", "tiny-org/tiny-a-tokenizer", device="cpu")


def test_offline_errors(tiny_a, offline_cache, tmp_path, capsys):
    with pytest.raises(hub.HubError, match="not in the Hugging Face cache"):
        hub.resolve_model_path("tiny-org/absent")
    with pytest.raises(hub.HubError, match="not in the Hugging Face cache"):
        hub.resolve_model_path("tiny-org/tiny-a-prior@v2")
    add_repo(offline_cache, "tiny-org/partial", tiny_a / "prior", missing=["checkpoints/32.pt"])
    with pytest.raises(hub.HubError, match="checkpoints/32.pt is not in the cached snapshot"):
        hub.resolve_model_path("tiny-org/partial")
    out = tmp_path / "out"
    for ckpt, msg in (("tiny-org/absent", "--ckpt tiny-org/absent: "), ("no/such/path", "does not exist")):
        rc = main(["--ckpt", ckpt, "--tokenizer", "tiny-org/tiny-a-tokenizer", "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and msg in err and err.count("\n") == 1, err
    assert not out.exists()


def test_missing_huggingface_hub_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(hub.HubError, match="pip install huggingface_hub"):
        hub.resolve_model_path("ByteVisionLab/DetailFlow-16-GPT-L")
    assert hub.resolve_model_path("plain-name") == Path("plain-name")  # not a repo id: no import
    rc = main(["--ckpt", "ByteVisionLab/DetailFlow-16-GPT-L", "--tokenizer", "ByteVisionLab/DetailFlow-16",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "huggingface_hub" in err and err.count("\n") == 1


def test_online_downloads_only_what_inference_needs(tiny_a, tmp_path, monkeypatch):
    """Online path with the Hub mocked: list the repo, download exactly the configs + one checkpoint."""
    hf = pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants  # noqa: F401
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf.constants, "HF_HUB_OFFLINE", False, raising=False)
    monkeypatch.setattr(hf.constants, "is_offline_mode", lambda: False, raising=False)
    repo_files = ["config.json", "config.yaml", "checkpoints/8.pt", "checkpoints/16.pt", "README.md",
                  "optimizer/state.pt"]
    fetched = []

    def fake_download(repo_id, filename, revision=None, cache_dir=None, **kw):
        fetched.append((repo_id, filename, revision))
        return str(tiny_a / "prior" / filename)

    monkeypatch.setattr(hub, "_unreachable", lambda hf: None)  # the mocked Hub is "reachable"
    monkeypatch.setattr(hf.HfApi, "list_repo_files", lambda self, repo_id, revision=None, **kw: repo_files)
    monkeypatch.setattr(hf, "hf_hub_download", fake_download)
    p = hub.resolve_model_path("ByteVisionLab/DetailFlow-16-GPT-L@v1", cache_dir=tmp_path)
    assert p == tiny_a / "prior" / "checkpoints" / "16.pt"
    assert fetched == [("ByteVisionLab/DetailFlow-16-GPT-L", f, "v1")
                       for f in ("config.json", "config.yaml", "checkpoints/16.pt")]


def test_pick_files_rules():
    cfg = ["config.json", "config.yaml"]
    assert hub.pick_files(cfg + ["checkpoints/100.pt", "checkpoints/99.pt", "checkpoints/1000.pt"], "r")[-1] == \
        "checkpoints/1000.pt"
    assert hub.pick_files(cfg + ["checkpoints/5.pt", "model.safetensors"], "r")[-1] == "model.safetensors"
    assert hub.pick_files(cfg + ["checkpoints/prior.safetensors"], "r")[-1] == "checkpoints/prior.safetensors"
    with pytest.raises(hub.HubError, match="no config.yaml"):
        hub.pick_files(["config.json", "checkpoints/5.pt"], "r")
    with pytest.raises(hub.HubError, match="no weights"):
        hub.pick_files(cfg + ["README.md"], "r")
    with pytest.raises(hub.HubError, match="several .safetensors"):
        hub.pick_files(cfg + ["a.safetensors", "b.safetensors"], "r")
    assert hub.parse_repo_id("ByteVisionLab/DetailFlow-16-GPT-L") == ("ByteVisionLab/DetailFlow-16-GPT-L", None)
    assert hub.parse_repo_id("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    for not_repo in ("/abs/path", "./rel/x", "a/b/c", "model.pt", "org/x.safetensors", "../up/x"):
        assert hub.parse_repo_id(not_repo) is None, not_repo


@pytest.fixture
def no_network(tmp_path, monkeypatch):
    """Online mode (no HF_HUB_OFFLINE) with the Hub endpoint on a closed local port: a network
    that refuses the connection, as a machine without network does."""
    hf = pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants  # noqa: F401
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf.constants, "HF_HUB_OFFLINE", False, raising=False)
    monkeypatch.setattr(hf.constants, "is_offline_mode", lambda: False, raising=False)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens there
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "hub"


def test_no_network_fails_fast_with_the_offline_hint(no_network, tmp_path, capsys):
    """huggingface_hub alone retries a dead network for about 25 s; the probe answers in seconds."""
    import time

    t0 = time.monotonic()
    with pytest.raises(hub.HubError, match="not in the Hugging Face cache.*cannot connect to 127.0.0.1:9.*"
                                           "HF_HUB_OFFLINE=1"):
        hub.resolve_model_path("ByteVisionLab/DetailFlow-16")
    rc = main(["--ckpt", "ByteVisionLab/DetailFlow-16-GPT-L", "--tokenizer", "ByteVisionLab/DetailFlow-16",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --ckpt ByteVisionLab/DetailFlow-16-GPT-L: ") and \
        "offline" in err and err.count("\n") == 1, err
    assert time.monotonic() - t0 < 2 * hub.PROBE_TIMEOUT_S + 2
    assert not (tmp_path / "o").exists()


def test_no_network_uses_the_cache(tiny_a, no_network):
    snap = add_repo(no_network, "tiny-org/tiny-a-prior", tiny_a / "prior")
    assert hub.resolve_model_path("tiny-org/tiny-a-prior") == snap / "checkpoints" / "16.pt"
