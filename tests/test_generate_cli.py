"""python -m detailflow_engine.generate: outputs, determinism across batch sizes, resume, refusals, bad input.

Runs on the tiny-a fixture (10 classes, 16 tokens, 64x64) through main(argv) in-process; one test
goes through `python -m` in a subprocess.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detailflow_engine import outputs
from detailflow_engine.generate import main

MANIFEST_KEYS = {"file", "index", "class", "seed", "cfg_scale", "temperature", "top_k", "top_p", "gradual_cfg",
                 "num_tokens", "ckpt", "tokenizer", "dtype"}


def model_args(tiny_a):
    return ["--ckpt", str(tiny_a / "prior"), "--tokenizer", str(tiny_a / "tokenizer"), "--device", "cpu"]


def run(tiny_a, out, *extra, capsys=None):
    rc = main(model_args(tiny_a) + ["--out", str(out)] + [str(x) for x in extra])
    if capsys is None:
        return rc
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def pngs(out: Path) -> dict:
    """{name: bytes} of the per-image PNGs (not the grid, not the strips)."""
    return {p.name: p.read_bytes() for p in sorted(out.glob("[0-9]" * 6 + ".png"))}


def manifest(out: Path) -> list:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def load(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def snapshot(folder: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# The reference run: 6 images cycling through classes 1, 2, 3 with seed 7, batch size 3.
REF_ARGS = ["--classes", "1,2", "3", "--num-images", 6, "--seed", 7]


@pytest.fixture(scope="module")
def reference(tiny_a, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert run(tiny_a, out, *REF_ARGS, "--batch-size", 3, "--progressive", "--npz") == 0
    return out


def test_outputs_and_manifest(tiny_a, reference):
    from detailflow_engine.pipeline import DetailFlowPipeline

    out = reference
    files = pngs(out)
    assert sorted(files) == [f"{i:06d}.png" for i in range(6)]
    recs = manifest(out)
    assert len(recs) == len(files) == 6
    for rec in recs:
        assert MANIFEST_KEYS <= set(rec), MANIFEST_KEYS - set(rec)
        assert (out / rec["file"]).is_file()
    assert [r["index"] for r in recs] == list(range(6))
    assert [r["file"] for r in recs] == sorted(files)
    assert [r["class"] for r in recs] == [1, 2, 3, 1, 2, 3]
    assert [r["seed"] for r in recs] == [7 + i for i in range(6)]
    assert {(r["cfg_scale"], r["top_k"], r["top_p"], r["num_tokens"], r["dtype"]) for r in recs} == \
        {(1.45, 0, 1.0, 16, "fp32")}
    assert recs[0]["ckpt"] == str((tiny_a / "prior").resolve())
    assert not list(out.glob(outputs.TMP_PREFIX + "*"))

    # the PNGs are the pipeline's images for (class, seed)
    pipe = DetailFlowPipeline.from_pretrained(tiny_a / "prior", tiny_a / "tokenizer", device="cpu")
    direct = pipe.generate([r["class"] for r in recs], seed=[r["seed"] for r in recs]).uint8
    images = np.stack([load(out / r["file"]) for r in recs])
    np.testing.assert_array_equal(images, direct)

    # grid: 6 images, 3 per row -> 2 rows of 64 px
    assert load(out / "grid.png").shape == (2 * 64, 3 * 64, 3)
    # progressive strips: one 64 px panel per scheduled step; the last panel is the final image
    n_steps = len(pipe.prior.config.generation_plan())
    for i in range(6):
        strip = load(out / f"{i:06d}_progressive.png")
        assert strip.shape == (64, n_steps * 64, 3)
        np.testing.assert_array_equal(strip[:, -64:], images[i])
    # npz for the ADM evaluator
    with np.load(out / "samples.npz") as npz:
        assert npz.files == ["arr_0"]
        arr = npz["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (6, 64, 64, 3)
    np.testing.assert_array_equal(arr, images)


def test_batch_size_does_not_change_images(tiny_a, reference, tmp_path, capsys):
    rc, stdout, _ = run(tiny_a, tmp_path / "b1", *REF_ARGS, "--batch-size", 1, capsys=capsys)
    assert rc == 0
    assert re.fullmatch(rf"wrote 6 images to {re.escape(str(tmp_path / 'b1'))} in [\d.]+ s "
                        rf"\([\d.]+ images/s\)\n", stdout), stdout
    assert pngs(tmp_path / "b1") == pngs(reference)


@pytest.mark.parametrize("weights", ["native", "int8"])
def test_bf16_batch_size_does_not_change_images(tiny_a, tmp_path, weights):
    """bf16 (and int8) images used to change with --batch-size (the prior switched GEMMs by rows)."""
    argv = ["--dtype", "bf16", "--weights", weights, "--classes", "all", "--num-images", 30, "--seed", 3]
    assert run(tiny_a, tmp_path / "b1", *argv, "--batch-size", 1) == 0
    assert run(tiny_a, tmp_path / "b30", *argv, "--batch-size", 30) == 0
    assert pngs(tmp_path / "b1") == pngs(tmp_path / "b30")


def test_num_per_class(tiny_a, reference, tmp_path):
    assert run(tiny_a, tmp_path, "--classes", "4 9", "--num-per-class", 2, "--seed", 3) == 0
    recs = manifest(tmp_path)
    assert [(r["class"], r["seed"]) for r in recs] == [(4, 3), (4, 4), (9, 5), (9, 6)]
    assert len(pngs(tmp_path)) == 4


def test_resume_after_interrupt(tiny_a, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save, saved = outputs.save_png, []

    def save_then_interrupt(path, array):
        if len(saved) == 3:
            raise KeyboardInterrupt
        real_save(path, array)
        saved.append(path)

    monkeypatch.setattr(outputs, "save_png", save_then_interrupt)
    rc, _, err = run(tiny_a, out, *REF_ARGS, "--batch-size", 2, capsys=capsys)
    assert rc == 130 and "--resume" in err
    monkeypatch.setattr(outputs, "save_png", real_save)
    assert len(pngs(out)) == 3 and len(manifest(out)) == 3
    assert not list(out.glob(outputs.TMP_PREFIX + "*"))

    # without --resume: refused; with it: finishes, byte-identical to the uninterrupted run
    before = snapshot(out)
    rc, _, err = run(tiny_a, out, *REF_ARGS, capsys=capsys)
    assert rc == 2 and err.startswith("error: ") and "--resume" in err
    assert snapshot(out) == before
    rc, stdout, _ = run(tiny_a, out, *REF_ARGS, "--batch-size", 3, "--resume", capsys=capsys)
    assert rc == 0 and "wrote 3 images" in stdout
    assert pngs(out) == pngs(reference)
    assert [r["index"] for r in manifest(out)] == list(range(6))
    assert (out / "grid.png").read_bytes() == (reference / "grid.png").read_bytes()


def test_resume_truncated_manifest_and_missing_pngs(tiny_a, reference, tmp_path):
    out = tmp_path / "run"
    assert run(tiny_a, out, *REF_ARGS, "--batch-size", 6) == 0
    lines = (out / "manifest.jsonl").read_text().splitlines(keepends=True)
    # a killed append: the last record cut in half; image 1's PNG lost; 4 and 5 never recorded
    (out / "manifest.jsonl").write_text("".join(lines[:3]) + lines[3][:25])
    for i in (1, 3, 4, 5):
        (out / f"{i:06d}.png").unlink()
    assert run(tiny_a, out, *REF_ARGS, "--resume") == 0
    assert pngs(out) == pngs(reference)
    recs = manifest(out)
    assert [r["index"] for r in recs] == list(range(6)) and [r["file"] for r in recs] == sorted(pngs(out))


def test_resume_refuses_other_settings(tiny_a, reference, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(tiny_a, out, *REF_ARGS) == 0
    capsys.readouterr()
    before = snapshot(out)
    seed8 = REF_ARGS[:-1] + [8]
    for args, name in ((REF_ARGS + ["--cfg-scale", 2.0], "cfg_scale"), (REF_ARGS + ["--top-k", 5], "top_k"),
                       (REF_ARGS + ["--gradual-cfg"], "gradual_cfg"), (seed8, "seed"),
                       (["--classes", "2,1,3", "--num-images", 6, "--seed", 7], "class")):
        rc, _, err = run(tiny_a, out, *args, "--resume", capsys=capsys)
        assert rc == 2 and err.startswith("error: ") and f"{name}=" in err and err.count("\n") == 1, err
    assert snapshot(out) == before


def test_refuses_to_overwrite_then_overwrite(tiny_a, reference, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(tiny_a, out, "--classes", 5, "--num-images", 4) == 0
    capsys.readouterr()
    before = snapshot(out)
    rc, _, err = run(tiny_a, out, "--classes", 5, "--num-images", 4, capsys=capsys)
    assert rc == 2 and err.startswith("error: ") and "--overwrite" in err and "--resume" in err
    assert err.count("\n") == 1
    assert snapshot(out) == before
    # one target file is enough to refuse, even without a manifest
    (out / "manifest.jsonl").unlink()
    before = snapshot(out)
    assert run(tiny_a, out, "--classes", 5, "--num-images", 1) == 2
    assert snapshot(out) == before
    # --overwrite replaces the run; the old run's extra images go with its manifest
    (out / "manifest.jsonl").write_text("".join(json.dumps({"file": f"{i:06d}.png", "index": i}) + "\n"
                                                for i in range(4)))
    assert run(tiny_a, out, *REF_ARGS[:2], "--num-images", 2, "--seed", 7, "--overwrite") == 0
    assert pngs(out) == {k: v for k, v in pngs(reference).items() if k in ("000000.png", "000001.png")}
    assert [r["index"] for r in manifest(out)] == [0, 1]


def _bad_inputs(tiny_a, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    full = tmp_path / "full"  # an existing --out with a previous run in it
    full.mkdir()
    (full / "manifest.jsonl").write_text("")
    (full / "000000.png").write_bytes(b"png")
    prior, tok = str(tiny_a / "prior"), str(tiny_a / "tokenizer")
    out = tmp_path / "out"
    cases = [  # (argv, text expected in the message, folder that must stay untouched)
        (["--classes", "10"], "class 10 is outside [0, 10)", out),
        (["--classes", "-1"], "class -1", out),
        (["--classes", "x"], "'x' is not an integer", out),
        (["--classes", "1,,2"], "empty class id between commas", out),
        (["--classes", "1,"], "empty class id between commas", out),
        (["--classes", "3", ",4"], "empty class id between commas", out),
        (["--num-tokens", "5"], "--num-tokens", out),
        (["--top-p", "0"], "--top-p", out),
        (["--top-p", "1.5"], "--top-p", out),
        (["--cfg-scale", "-1"], "--cfg-scale", out),
        (["--temperature", "-0.5"], "--temperature", out),
        (["--top-k", "-1"], "--top-k", out),
        (["--num-images", "0"], "--num-images", out),
        (["--batch-size", "0"], "--batch-size", out),
        (["--num-images", "2", "--num-per-class", "2"], "not allowed with", out),
        (["--resume", "--overwrite"], "not allowed with", out),
        (["--cfg-scale", "abc"], "--cfg-scale", out),
        (["--out", str(a_file / "sub")], "is a file, not a folder", a_file),
        (["--out", str(a_file)], "is not a folder", a_file),
        (["--out", str(full), "--classes", "3,10"], "class 10 is outside", full),
        (["--out", str(full), "--resume", "--top-p", "2"], "--top-p", full),
        (["--out", str(full), "--resume", "--ckpt-typo", "x"], "unrecognized arguments", full),
    ]
    model = ["--ckpt", prior, "--tokenizer", tok]
    cases = [(model + ["--out", str(out)] + argv if "--out" not in argv else model + argv, msg, where)
             for argv, msg, where in cases]
    cases += [
        (["--ckpt", prior, "--out", str(out)], "--ckpt and --tokenizer go together", out),
        (["--ckpt", str(tmp_path / "nope"), "--tokenizer", tok, "--out", str(out)], "does not exist", out),
        (["--ckpt", tok, "--tokenizer", tok, "--out", str(out)], "cannot load the model", out),
        (["--ckpt", prior, "--tokenizer", prior, "--out", str(out)], "cannot load the model", out),
        (["--ckpt", str(a_file), "--tokenizer", tok, "--out", str(out)], "cannot load the model", out),
    ]
    import torch

    if not torch.cuda.is_available():
        cases.append((model + ["--device", "cuda", "--out", str(out)], "no CUDA GPU", out))
    return cases


def test_bad_input_exits_2_and_leaves_out_alone(tiny_a, tmp_path, capsys):
    for argv, msg, where in _bad_inputs(tiny_a, tmp_path):
        before = (where.read_bytes(), where.stat().st_mtime_ns) if where.is_file() else \
            snapshot(where) if where.is_dir() else None
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and msg in err, (argv, err)
        assert "Traceback" not in err
        if where.name == "out":
            assert not where.exists(), argv
        elif where.is_dir():
            assert before == snapshot(where), argv
        else:
            assert before == (where.read_bytes(), where.stat().st_mtime_ns), argv


def test_out_that_cannot_be_created(tiny_a, tmp_path, monkeypatch, capsys):
    """An --out the file system refuses (even to root: a name too long, a read-only mount) is one
    'error:' line before anything runs: no progress bar first, nothing left behind."""
    import errno

    too_long = tmp_path / ("x" * 300) / "sub"
    mnt = tmp_path / "mnt"  # a folder whose file system refuses new entries, even to root
    mnt.mkdir()
    real_mkdir = os.mkdir

    def mkdir(path, *a, **k):
        if Path(path).parent == mnt:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)
    for out in (too_long, mnt / "out", mnt / "out" / "deeper"):
        rc, stdout, err = run(tiny_a, out, "--num-images", 1, capsys=capsys)
        assert rc == 2 and stdout == "", (out, stdout)
        assert err.startswith(f"error: cannot create --out {out}: ") and err.count("\n") == 1, err
        assert "generate" not in err and "img/s" not in err, err  # no progress bar before the error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt"] and not any(mnt.iterdir())  # nothing left


def test_one_image_is_singular(tiny_a, tmp_path, capsys):
    rc, stdout, _ = run(tiny_a, tmp_path / "one", "--num-images", 1, capsys=capsys)
    assert rc == 0 and stdout.startswith(f"wrote 1 image to {tmp_path / 'one'} in "), stdout


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder this process cannot write: chmod 555 for a normal user; for root (who writes there
    anyway) sysfs, where nobody may create files."""
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)
    elif sys.platform.startswith("linux") and Path("/sys/kernel").is_dir():
        yield Path("/sys")
    else:
        pytest.skip("running as root without a sysfs: no folder is read-only to this process")


def test_read_only_out(tiny_a, read_only_folder, capsys):
    ro = read_only_folder
    before = sorted(p.name for p in ro.iterdir())
    for out in (ro, ro / "sub"):
        assert run(tiny_a, out, "--num-images", 1) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert "not writable" in err or f"cannot create --out {out}" in err, err
    assert sorted(p.name for p in ro.iterdir()) == before


def test_read_only_out_check(tiny_a, tmp_path, monkeypatch, capsys):
    """The same refusal through a stubbed os.access (runs as root too, where chmod cannot deny)."""
    import detailflow_engine.cli as cli  # the --out check lives there

    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(cli.os, "access", lambda path, mode: Path(path) != ro)
    for out in (ro, ro / "sub"):
        assert run(tiny_a, out, "--num-images", 1) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "not writable" in err and err.count("\n") == 1
    assert list(ro.iterdir()) == []


def test_bf16_runs_or_refuses_cleanly(tiny_a, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = run(tiny_a, out, "--dtype", "bf16", "--num-images", 2, capsys=capsys)
    if rc == 0:
        assert len(pngs(out)) == 2 and manifest(out)[0]["dtype"] == "bf16"
    else:  # e.g. an op without a bf16 CPU kernel: one line, --out never created
        assert rc == 2 and err.splitlines()[-1].startswith("error: ") and "Traceback" not in err, err
        assert not out.exists()


def test_default_model(tmp_path, capsys):
    from detailflow_engine.assets import default_model_paths

    out = tmp_path / "out"
    try:
        default_model_paths()
    except FileNotFoundError:
        assert main(["--out", str(out), "--device", "cpu", "--num-images", "2"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "default model" in err and err.count("\n") == 1
        assert not out.exists()
        return
    assert main(["--out", str(out), "--device", "cpu", "--num-images", "2"]) == 0
    assert len(pngs(out)) == 2 and len(manifest(out)) == 2


def python_m(*argv):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "detailflow_engine.generate", *map(str, argv)],
                          capture_output=True, text=True, timeout=120, env=env)


def test_python_m_generates(tiny_a, reference, tmp_path):
    out = tmp_path / "out"
    proc = python_m(*model_args(tiny_a), *REF_ARGS, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"wrote 6 images to .* in [\d.]+ s \([\d.]+ images/s\)\n", proc.stdout), proc.stdout
    assert "6/6" in proc.stderr  # the tqdm bar
    assert pngs(out) == pngs(reference)


def test_python_m_error_has_no_traceback(tiny_a, tmp_path):
    out = tmp_path / "out"
    proc = python_m(*model_args(tiny_a), "--classes", "3,11", "--out", out)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == "error: --classes: class 11 is outside [0, 10) for this model"
    assert proc.stdout == "" and not out.exists()


# ---------------------------------------------------------------------- torch.distributed (torchrun)

def _torchrun(nproc, *argv, timeout=240):
    """torchrun --standalone (a free port: parallel test runs do not collide); on a timeout the
    whole process group (launcher and workers) is killed, so no rank is left behind."""
    import signal

    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "detailflow_engine.generate", *map(str, argv)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _default_model_or_skip():
    from detailflow_engine.assets import default_model_paths

    try:
        default_model_paths()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("dtype,nproc", [("fp32", 2), ("bf16", 3)])
def test_torchrun_processes_match_one(tmp_path, dtype, nproc):
    """gloo ranks on the default model write exactly the files of a single-process run (bf16 too:
    its images once changed with the batch size, so other ranks' batches gave other files)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    _default_model_or_skip()
    argv = ["--device", "cpu", "--dtype", dtype, "--classes", "1,4,7", "--num-images", 5, "--seed", 11, "--npz",
            "--progressive"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([str(a) for a in argv] + ["--batch-size", "4", "--out", str(one)]) == 0
    proc = _torchrun(nproc, *argv, "--batch-size", 2, "--out", two)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(rf"wrote 5 images to .* by {nproc} processes in", proc.stdout), proc.stdout
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    assert len([n for n in names if re.fullmatch(r"\d{6}\.png", n)]) == 5 and "samples.npz" in names
    for name in names:  # PNGs, strips, grid, npz and the manifest: byte for byte
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_torchrun_frozen_peer_fails_in_bounded_time(tmp_path):
    """A rank that hangs inside its first batch: the others give up after --dist-timeout with one
    error line instead of waiting torch's default 30 minutes."""
    import time

    _default_model_or_skip()
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, time\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import detailflow_engine.pipeline as p\n"
        "    p.DetailFlowPipeline.generate = lambda *a, **k: time.sleep(3600)\n")
    out = tmp_path / "out"
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(hook) + (os.pathsep + old if old else "")
    try:
        t0 = time.monotonic()
        proc = _torchrun(2, "--device", "cpu", "--classes", "3", "--num-images", 4, "--batch-size", 1,
                         "--dist-timeout", 10, "--out", out, timeout=150)
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    assert proc.returncode != 0 and time.monotonic() - t0 < 150
    assert "error: rank 0: a peer process stopped answering" in proc.stderr, proc.stderr[-2000:]


def test_cli_numbers_refused(tiny_a, tmp_path, capsys):
    out = tmp_path / "out"
    for args, flag in ((["--cfg-scale", "inf"], "--cfg-scale"), (["--temperature", "inf"], "--temperature"),
                       (["--cfg-scale", "nan"], "--cfg-scale"), (["--num-images", 10 ** 12], "--num-images"),
                       (["--num-per-class", 10 ** 7, "--classes", "all"], "--num-per-class"),
                       (["--dist-timeout", "0"], "--dist-timeout")):
        rc, _, err = run(tiny_a, out, *args, capsys=capsys)
        assert rc == 2 and err.startswith(f"error: {flag}") and err.count("\n") == 1, err
    assert not out.exists()


def test_disk_full_mid_run(tiny_a, reference, tmp_path, monkeypatch, capsys):
    """ENOSPC after 2 images: one error line, exit 1, the 2 images recorded; --resume finishes."""
    import errno

    out = tmp_path / "run"
    real_save, saved = outputs.save_png, []

    def save_until_full(path, array):
        if len(saved) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(path, array)
        saved.append(path)

    monkeypatch.setattr(outputs, "save_png", save_until_full)
    rc, _, err = run(tiny_a, out, *REF_ARGS, capsys=capsys)
    assert rc == 1 and err.count("error: ") == 1 and "No space left on device" in err and "--resume" in err, err
    assert "Traceback" not in err and len(manifest(out)) == 2
    monkeypatch.setattr(outputs, "save_png", real_save)
    assert run(tiny_a, out, *REF_ARGS, "--resume") == 0
    assert pngs(out) == pngs(reference)


def test_torchrun_bad_input_one_message(tmp_path):
    _default_model_or_skip()
    out = tmp_path / "out"
    proc = _torchrun(2, "--device", "cpu", "--classes", "3,12", "--out", out)
    assert proc.returncode != 0
    # both ranks exit 2; rank 0 alone prints the one-line error
    assert proc.stdout.count("error: --classes: class 12 is outside [0, 10) for this model") + \
        proc.stderr.count("error: --classes: class 12 is outside [0, 10) for this model") == 1
    assert "exitcode  : 2" in proc.stderr or "exitcode: 2" in proc.stderr
    assert not out.exists()


# ---------------------------------------------------------------------- --weights

def test_weights_flag(tiny_a, tmp_path, capsys):
    import inspect

    from detailflow_engine.loading import load_prior

    rc, _, err = run(tiny_a, tmp_path / "n", "--num-images", 1, "--weights", "native", capsys=capsys)
    assert rc == 0 and manifest(tmp_path / "n")[0]["weights"] == "native"
    rc, _, err = run(tiny_a, tmp_path / "bad", "--weights", "int3", capsys=capsys)
    assert rc == 2 and "--weights" in err and "invalid choice" in err
    rc, _, err = run(tiny_a, tmp_path / "q", "--num-images", 1, "--weights", "int8", capsys=capsys)
    if "weights" in inspect.signature(load_prior).parameters:
        assert rc == 0 or (rc == 2 and err.startswith("error: ")), err
        if rc == 0:
            assert manifest(tmp_path / "q")[0]["weights"] == "int8"
    else:  # load_prior cannot quantize yet: a clear refusal, nothing written
        assert rc == 2 and "int8" in err and err.count("\n") == 1 and not (tmp_path / "q").exists(), err


# ---------------------------------------------------------------------- one writer, own files, same weights

def test_second_writer_is_refused(tiny_a, tmp_path, capsys):
    """A folder locked by another run: one error line, nothing written (issue: two runs into one
    --out interleaved their manifests)."""
    out = tmp_path / "run"
    out.mkdir()
    held = outputs.FolderLock(out)
    try:
        before = snapshot(out)
        rc, _, err = run(tiny_a, out, "--classes", 1, "--num-images", 2, capsys=capsys)
        assert rc == 2 and err.startswith("error: ") and "another run" in err and err.count("\n") == 1, err
        assert snapshot(out) == before
    finally:
        held.release()
    assert run(tiny_a, out, "--classes", 1, "--num-images", 2) == 0  # released: the folder is usable


def test_two_runs_started_together_never_mix(tiny_a, tmp_path):
    """Two processes, other seeds, one new folder: exactly one writes it, the other exits 2 with one
    line; every manifest record describes the PNG beside it."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "detailflow_engine.generate"] + model_args(tiny_a) + [
        "--classes", "1,2", "--num-images", 8, "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([str(c) for c in cmd + ["--seed", seed]], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for seed in (1, 100)]
    results = [(p.wait(timeout=180), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close(), p.stderr.close()
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert loser.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in loser
    winner_seed = manifest(out)[0]["seed"]
    assert [r["seed"] for r in manifest(out)] == list(range(winner_seed, winner_seed + 8))
    # the winner's images are exactly what a lone run with its seed writes
    solo = tmp_path / "solo"
    assert run(tiny_a, solo, "--classes", "1,2", "--num-images", 8, "--seed", winner_seed) == 0
    assert pngs(out) == pngs(solo)


def test_folder_changed_while_starting_is_refused(tiny_a, tmp_path, monkeypatch, capsys):
    """Another run writes --out after this one's checks: refused under the lock, its files kept."""
    from detailflow_engine.pipeline import DetailFlowPipeline

    out = tmp_path / "run"
    real = DetailFlowPipeline.generate

    def generate_while_other_run_writes(self, *a, **kw):
        out.mkdir(exist_ok=True)
        (out / "000000.png").write_bytes(b"the other run's image")
        return real(self, *a, **kw)

    monkeypatch.setattr(DetailFlowPipeline, "generate", generate_while_other_run_writes)
    rc, _, err = run(tiny_a, out, "--classes", 1, "--num-images", 2, capsys=capsys)
    assert rc == 2 and "changed by another run" in err and err.count("\n") == 1, err
    assert (out / "000000.png").read_bytes() == b"the other run's image"
    assert not (out / "manifest.jsonl").exists()


def test_resume_refuses_files_it_did_not_write(tiny_a, reference, tmp_path, capsys):
    # no manifest: a foreign PNG and grid are nobody's run, so --resume must not replace them
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "000003.png").write_bytes(b"someone's picture")
    (out / "grid.png").write_bytes(b"someone's grid")
    before = snapshot(out)
    rc, _, err = run(tiny_a, out, *REF_ARGS, "--resume", capsys=capsys)
    assert rc == 2 and "no manifest.jsonl" in err and "000003.png" in err and err.count("\n") == 1, err
    assert snapshot(out) == before

    # a manifest of this run, plus an unrecorded PNG: replaced only if it is this run's own image
    out = tmp_path / "partial"
    assert run(tiny_a, out, *REF_ARGS, "--batch-size", 6) == 0
    lines = (out / "manifest.jsonl").read_text().splitlines(keepends=True)
    (out / "manifest.jsonl").write_text("".join(lines[:3]))  # images 3..5 on disk, unrecorded
    (out / "000004.png").write_bytes((reference / "000001.png").read_bytes())  # a foreign image
    capsys.readouterr()
    rc, _, err = run(tiny_a, out, *REF_ARGS, "--resume", capsys=capsys)
    assert rc == 2 and "000004.png is not an image of this run" in err and err.count("\n") == 1, err
    assert (out / "000004.png").read_bytes() == (reference / "000001.png").read_bytes()
    (out / "000004.png").unlink()  # the user moved it away: 3 and 5 are this run's own, kept
    assert run(tiny_a, out, *REF_ARGS, "--resume") == 0
    assert pngs(out) == pngs(reference)


def test_resume_refuses_other_weights(tiny_a, tmp_path, capsys):
    """A newer checkpoints/<N>.pt in the same folder is another model: --resume names it."""
    import shutil

    import torch

    prior = tmp_path / "prior"
    shutil.copytree(tiny_a / "prior", prior)
    argv = ["--ckpt", prior, "--tokenizer", tiny_a / "tokenizer", "--device", "cpu", "--classes", 1,
            "--num-images", 4]
    out = tmp_path / "run"
    assert main([str(a) for a in argv + ["--out", out]]) == 0
    capsys.readouterr()
    rec = manifest(out)[0]
    assert len(rec["prior_sha256"]) == 64 and len(rec["tokenizer_sha256"]) == 64
    (out / "000003.png").unlink()
    ckpt = torch.load(prior / "checkpoints" / "16.pt", map_location="cpu", weights_only=False)
    for sd in (ckpt["model"], ckpt.get("ema") or {}):
        sd["norm.weight"] = sd["norm.weight"] * 1.01
    torch.save(ckpt, prior / "checkpoints" / "32.pt")
    before = snapshot(out)
    rc = main([str(a) for a in argv + ["--out", out, "--resume"]])
    err = capsys.readouterr().err
    assert rc == 2 and "prior_sha256" in err and err.count("\n") == 1, err
    assert snapshot(out) == before
