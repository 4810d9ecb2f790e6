"""python -m detailflow_engine.reconstruct: strips follow the schedule, match the tokenizer, bad input exits 2."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from detailflow_engine.reconstruct import main


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok(tiny_a):
    from detailflow_engine.loading import load_tokenizer

    return load_tokenizer(tiny_a / "tokenizer", device="cpu")


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    a = tmp_path / "in" / "noise.png"
    a.parent.mkdir()
    Image.fromarray(rng.integers(0, 256, (80, 60, 3), dtype=np.uint8)).save(a)  # not square, not 64
    b = tmp_path / "in" / "ramp.jpg"
    ramp = np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8)
    Image.fromarray(ramp).convert("L").save(b)  # grayscale JPEG: converted to RGB
    return [a, b]


def load(path):
    with Image.open(path) as im:
        return np.asarray(im)


def expected_panels(tok, path, budgets):
    """The oracle: center crop + bicubic resize, encode all tokens, decode each prefix, NEAREST-upsample."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        s = min(im.size)
        left, top = (im.size[0] - s) // 2, (im.size[1] - s) // 2
        im = im.crop((left, top, left + s, top + s)).resize((64, 64), Image.BICUBIC)
    x = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float() / 127.5 - 1
    codes = tok.encode(x)
    sizes = [tok.schedule.decode_size(t) for t in budgets]
    height = max(sizes)
    panels = []
    for t in budgets:
        dec = torch.clamp(127.5 * tok.decode(codes, num_tokens=t) + 128, 0, 255).to(torch.uint8)
        arr = dec[0].permute(1, 2, 0).numpy()
        panels.append(np.asarray(Image.fromarray(arr).resize((height, height), Image.NEAREST)))
    return sizes, panels


def test_default_budgets_follow_schedule(tiny_a, tok, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*map(str, images), "--tokenizer", str(tiny_a / "tokenizer"), "--device", "cpu",
                 "--out", str(out)]) == 0
    scheduled = tok.schedule.scheduled_tokens
    assert "wrote 2 strips" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["noise_strip.png", "ramp_strip.png"]
    for path in images:
        strip = load(out / f"{path.stem}_strip.png")
        sizes, panels = expected_panels(tok, path, scheduled)
        h = max(sizes)
        assert h == tok.schedule.decode_size(tok.num_tokens)
        assert strip.shape == (h, len(scheduled) * h, 3)
        for k, want in enumerate(panels):
            np.testing.assert_array_equal(strip[:, k * h:(k + 1) * h], want)


def test_chosen_budgets(tiny_a, tok, images, tmp_path):
    out = tmp_path / "out"
    assert main([str(images[0]), "--tokens", "12,4", "8", "--tokenizer", str(tiny_a / "tokenizer"),
                 "--device", "cpu", "--out", str(out)]) == 0
    strip = load(out / "noise_strip.png")
    sizes, panels = expected_panels(tok, images[0], [4, 8, 12])  # sorted: coarse to fine
    h = max(sizes)
    assert h == tok.schedule.decode_size(12) and strip.shape == (h, 3 * h, 3)
    np.testing.assert_array_equal(strip, np.concatenate(panels, axis=1))
    # the first panel is a 4-token decode: blocks of (h / its size) identical pixels
    block = h // tok.schedule.decode_size(4)
    assert block > 1 and (strip[:block, :block] == strip[0, 0]).all()


def test_default_model_and_python_m(images, tmp_path):
    from detailflow_engine.assets import default_model_paths

    try:
        default_model_paths()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "detailflow_engine.reconstruct", str(images[1]), "--device", "cpu",
                           "--tokens", "4,64", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert load(out / "ramp_strip.png").shape == (32, 64, 3)  # default model: 32 px at 64 tokens


def test_bad_input_exits_2(tiny_a, images, tmp_path, capsys):
    bad = tmp_path / "in" / "broken.png"
    bad.write_bytes(b"not a png")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    other = tmp_path / "other"
    other.mkdir()
    (other / "noise.png").write_bytes(images[0].read_bytes())
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "noise_strip.png").write_bytes(b"old")
    out = tmp_path / "out"
    tok = ["--tokenizer", str(tiny_a / "tokenizer"), "--device", "cpu"]
    cases = [
        ([str(images[0]), str(bad), "--out", str(out)], "cannot read image"),
        ([str(tmp_path / "missing.png"), "--out", str(out)], "does not exist"),
        ([str(images[0]), "--tokens", "5", "--out", str(out)], "5 is not a scheduled prefix"),
        ([str(images[0]), "--tokens", "17", "--out", str(out)], "17 is not a scheduled prefix"),
        ([str(images[0]), "--tokens", "8,x", "--out", str(out)], "'x' is not an integer"),
        ([str(images[0]), "--out", str(a_file)], "is not a folder"),
        ([str(images[0]), str(other / "noise.png"), "--out", str(out)], "same file stem"),
        ([str(images[0]), "--out", str(existing)], "--overwrite"),
        ([str(images[0]), "--tokenizer", str(tmp_path), "--out", str(out)], "cannot load the tokenizer"),
        ([str(images[0]), "--tokenizer", str(tmp_path / "nope"), "--out", str(out)], "does not exist"),
        ([str(images[0]), "--batch-size", "0", "--out", str(out)], "--batch-size"),
        ([str(images[0])], "--out"),
    ]
    for argv, msg in cases:
        rc = main(argv + tok if "--tokenizer" not in argv else argv + ["--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and msg in err, (argv, err)
    assert not out.exists()
    assert (existing / "noise_strip.png").read_bytes() == b"old"
    assert main([str(images[0]), "--out", str(existing), "--overwrite"] + tok) == 0
    assert load(existing / "noise_strip.png").shape == (64, 7 * 64, 3)


def test_fifo_bomb_and_full_disk(tiny_a, images, tmp_path, monkeypatch, capsys):
    """A FIFO is refused without opening it (it would block), a header claiming a huge image is
    refused before decoding, and a full disk is one line."""
    import errno
    import os

    from detailflow_engine import outputs

    tok = ["--tokenizer", str(tiny_a / "tokenizer"), "--device", "cpu"]
    fifo = tmp_path / "in" / "pipe.png"
    os.mkfifo(fifo)
    bomb = tmp_path / "in" / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(bomb)  # 100 M pixels in a small file
    out = tmp_path / "out"
    for path, msg in ((fifo, "is not a regular file"), (bomb, "decompression bomb")):
        rc = main([str(path), "--out", str(out)] + tok)
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and msg in err, err
    assert not out.exists()

    def full(path, array):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(outputs, "save_png", full)
    rc = main([str(images[0]), "--out", str(out)] + tok)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: cannot write") and "No space left" in err and err.count("\n") == 1
