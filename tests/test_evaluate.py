"""Evaluation tool: Frechet distance math, the shipped Fashion-MNIST classifier, the CLI end to end."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from detailflow_engine import evaluate as ev
from detailflow_engine.classifier import DEFAULT_CLASSIFIER, FEATURE_DIM, classifier_metadata, load_classifier
from detailflow_ref.datasets import fashion_mnist_available, fashion_mnist_root, load_fashion_mnist

needs_fmnist = pytest.mark.skipif(
    not fashion_mnist_available(),
    reason=f"Fashion-MNIST not found at {fashion_mnist_root()} (set DETAILFLOW_FASHION_MNIST to the folder "
           f"with the four idx .gz files)")


@pytest.fixture
def one_thread():
    """Run CPU-heavy bits on one thread: on a shared, oversubscribed machine that is several times faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------- Frechet distance

class _IdentityTokenizer(torch.nn.Module):
    """Decodes every prefix back to the encoded image itself: a lossless 'tokenizer'."""

    image_size = 32

    def __init__(self):
        super().__init__()
        self.quant_conv = torch.nn.Linear(1, 1)
        self.schedule = type("S", (), {"scheduled_tokens": (1, 4), "decode_size": staticmethod(lambda t: 32)})()

    def encode(self, pixels):
        return pixels

    def decode(self, codes, num_tokens=None):
        return codes


def test_reconstruction_curve_returns_full_token_reconstructions():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 32, 32), generator=gen, dtype=torch.uint8)
    curve, recon = ev.reconstruction_curve(_IdentityTokenizer(), images, batch_size=2)
    assert torch.equal(recon, images)  # uint8 -> [-1, 1] -> uint8 is exact
    assert [p["tokens"] for p in curve] == [1, 4] and all(p["psnr"] >= 99 for p in curve)


def test_frechet_zero_for_identical_statistics():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
    mu, sigma = ev.feature_statistics(f)
    assert ev.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    # singular covariance (fewer samples than dimensions) is fine too
    mu, sigma = ev.feature_statistics(f[:5])
    assert ev.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_1d_and_diagonal_by_hand():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert ev.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx((1 - 3) ** 2 + (2 - 3) ** 2)
    assert ev.frechet_distance(1.0, 4.0, 3.0, 9.0) == pytest.approx(5.0)  # scalars are accepted
    # diagonal: the sum of the per-dimension 1-D distances
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 2.0])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([4.0, 4.0, 1.0])
    want = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())
    assert ev.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want)


def test_frechet_full_covariance_matches_eigenvalue_formula():
    # tr((S1 S2)^(1/2)) = sum of sqrt of the (real, >= 0) eigenvalues of S1 S2: an independent route
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    tr = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    want = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr)
    got = ev.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(want, rel=1e-9)
    assert ev.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-9)


def test_frechet_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape mismatch"):
        ev.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="N >= 2"):
        ev.feature_statistics(np.zeros((1, 4)))


def test_psnr_and_resize_helpers():
    a = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    b = a.clone()
    b[1] = 255
    p = ev.psnr_u8(b, a)
    assert p[0] == 100.0 and p[1] == pytest.approx(0.0)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert ev.resize(x, 32).shape == (2, 3, 32, 32)
    assert torch.allclose(ev.resize(x, 32), x.reshape(2, 3, 32, 2, 32, 2).mean((3, 5)), atol=1e-6)  # area
    assert ev.resize(x[..., :16, :16], 32).shape == (2, 3, 32, 32)
    assert ev.resize(x, 64) is x
    assert ev.to_uint8(torch.tensor([-1.0, 0.0, 1.0, 2.0])).tolist() == [0, 128, 255, 255]


# ---------------------------------------------------------------------- classifier

def test_classifier_loads_and_is_accurate(one_thread):
    if not fashion_mnist_available():
        pytest.skip(f"Fashion-MNIST not found at {fashion_mnist_root()} (set DETAILFLOW_FASHION_MNIST)")
    assert DEFAULT_CLASSIFIER.is_file(), f"the shipped classifier weights are missing: {DEFAULT_CLASSIFIER}"
    clf = load_classifier()
    x, y = load_fashion_mnist("test")
    x = torch.from_numpy(x[:2000]).permute(0, 3, 1, 2).float() / 127.5 - 1
    logits, feats = clf.predict(x)
    assert logits.shape == (2000, 10) and feats.shape == (2000, FEATURE_DIM)
    acc = float((logits.argmax(1).numpy() == y[:2000]).mean())
    assert acc >= 0.85, f"classifier accuracy {acc:.4f} on 2000 test images"
    meta = classifier_metadata()
    assert meta["architecture"] == clf.architecture and meta["test_accuracy"] >= 0.85
    assert meta["command"].startswith("python -m detailflow_engine.train_classifier")


def test_classifier_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_classifier(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="safetensors"):
        load_classifier(bad)
    with pytest.raises(ValueError, match="classifier input"):
        load_classifier().features(torch.zeros(1, 3, 28, 28))


def test_reconstruction_frechet_compares_like_with_like():
    rng = np.random.default_rng(0)
    test = rng.normal(size=(600, 8))
    exact = ev.reconstruction_frechet(test[:200].copy(), test)  # a lossless tokenizer
    assert exact["reconstructions_vs_rest_of_test"] == exact["originals_vs_rest_of_test"]
    assert exact["originals_vs_rest_of_test"] == pytest.approx(
        ev.frechet_distance_features(test[:200], test[200:]), abs=1e-4)
    blurred = ev.reconstruction_frechet(0.5 * test[:200] + 0.3, test)  # shrunk and shifted features
    assert blurred["reconstructions_vs_rest_of_test"] > exact["originals_vs_rest_of_test"] + 0.5
    assert blurred["originals_vs_rest_of_test"] == exact["originals_vs_rest_of_test"]
    assert ev.reconstruction_frechet(test[:599], test) is None  # one test image left: no estimate


# ---------------------------------------------------------------------- CLI

def _run(capsys, *argv):
    code = ev.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generation_does_not_depend_on_batch_size(tiny_a, one_thread):
    from detailflow_engine.pipeline import DetailFlowPipeline

    pipe = DetailFlowPipeline.from_pretrained(tiny_a / "prior", tiny_a / "tokenizer", device="cpu")
    a, la = ev.generate_images(pipe, 2, 10, seed=5, batch_size=3, cfg_scale=1.45)
    b, lb = ev.generate_images(pipe, 2, 10, seed=5, batch_size=20, cfg_scale=1.45)
    assert la.tolist() == [c for c in range(10) for _ in range(2)] and torch.equal(la, lb)
    assert a.dtype == torch.uint8 and a.shape == (20, 3, 64, 64) and torch.equal(a, b)


@needs_fmnist
def test_evaluate_end_to_end_tiny_model(tiny_a, one_thread, capsys, tmp_path):
    out_file = tmp_path / "eval.json"
    code, out, err = _run(capsys, "--ckpt", str(tiny_a / "prior"), "--tokenizer", str(tiny_a / "tokenizer"),
                          "--num-per-class", "2", "--psnr-images", "8", "--device", "cpu", "--seed", "3",
                          "--out", str(out_file))
    assert code == 0, err
    res = json.loads(out)
    assert json.loads(out_file.read_text()) == res
    # it talks while it works: one progress bar per phase on stderr (stdout is the JSON alone)
    for phase in ("classify test set", "generate", "classify generated", "reconstruct (", "classify reconstructions"):
        assert f"{phase}" in err, (phase, err)
    assert "100%" in err and "10000/10000" in err and "20/20" in err and "8/8" in err, err
    assert set(res) >= {"model", "sampling", "classifier", "accuracy", "frechet_distance", "reconstruction"}
    assert res["model"]["image_size"] == 64 and res["model"]["num_classes"] == 10
    assert res["sampling"]["num_per_class"] == 2 and res["sampling"]["seed"] == 3

    assert res["classifier"]["test_accuracy"] >= 0.85 and res["classifier"]["num_test"] == 10000
    acc = res["accuracy"]
    assert 0 <= acc["overall"] <= 1 and len(acc["per_class"]) == 10
    assert [c["class"] for c in acc["per_class"]] == list(range(10))
    assert all(c["count"] == 2 and 0 <= c["accuracy"] <= 1 for c in acc["per_class"])
    assert sum(acc["predicted_counts"]) == 20
    assert acc["overall"] == pytest.approx(np.mean([c["accuracy"] for c in acc["per_class"]]))

    fd = res["frechet_distance"]
    for key in ("generated_vs_test", "generated_vs_test_half", "test_half_vs_test_half"):
        assert math.isfinite(fd[key]) and fd[key] >= 0
    assert fd["num_generated"] == 20 and fd["half_size"] == 20 and fd["feature_dim"] == FEATURE_DIM
    assert fd["num_test"] == 10000

    from detailflow_engine.loading import load_tokenizer

    sched = load_tokenizer(tiny_a / "tokenizer").schedule
    rec = res["reconstruction"]
    assert rec["num_images"] == 8 and rec["image_size"] == 64
    assert [p["tokens"] for p in rec["psnr_curve"]] == list(sched.scheduled_tokens)
    assert [p["resolution"] for p in rec["psnr_curve"]] == [sched.decode_size(t) for t in sched.scheduled_tokens]
    assert all(math.isfinite(p["psnr"]) and 0 < p["psnr"] <= 100 for p in rec["psnr_curve"])
    assert 0 <= rec["classifier_accuracy"] <= 1
    floor = rec["frechet_distance"]
    assert set(floor) == {"reconstructions_vs_rest_of_test", "originals_vs_rest_of_test"}
    assert all(math.isfinite(v) and v >= 0 for v in floor.values())


@pytest.mark.parametrize("argv, match", [
    (["--num-per-class", "0"], "--num-per-class"),
    (["--num-per-class", "two"], "invalid int"),
    (["--top-p", "0"], "--top-p"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-k", "-2"], "--top-k"),
    (["--batch-size", "0"], "--batch-size"),
    (["--psnr-images", "-1"], "--psnr-images"),
    (["--dtype", "int8"], "--dtype"),
    (["--ckpt", "somewhere"], "--tokenizer"),
    (["--bogus"], "unrecognized"),
])
def test_bad_arguments_exit_2(capsys, argv, match):
    with pytest.raises(SystemExit) as exc:  # argparse-level errors exit through parser.error
        code = ev.main(argv)
        raise SystemExit(code)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err


@needs_fmnist
def test_bad_paths_exit_2(capsys, tmp_path, tiny_a):
    code, out, err = _run(capsys, "--ckpt", str(tmp_path / "no-prior"), "--tokenizer", str(tmp_path / "no-tok"),
                          "--device", "cpu")
    assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1
    code, out, err = _run(capsys, "--ckpt", str(tiny_a / "prior"), "--tokenizer", str(tiny_a / "tokenizer"),
                          "--classifier", str(tmp_path / "none.safetensors"), "--device", "cpu")
    assert code == 2 and "classifier weights not found" in err and err.count("\n") == 1
    code, out, err = _run(capsys, "--ckpt", str(tiny_a / "prior"), "--tokenizer", str(tiny_a / "tokenizer"),
                          "--psnr-images", "10001", "--device", "cpu")
    assert code == 2 and "--psnr-images" in err
