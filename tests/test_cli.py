"""What the CLIs share (detailflow_engine/cli.py): one error line and exit 2, the same words for the
same bad sampling value in every tool, and no CLI reaching into another's private helpers."""
from __future__ import annotations

import subprocess
import sys

import pytest

from detailflow_engine import cli, evaluate, generate, profile
from detailflow_engine.sampling_settings import SamplingSettings

TOOLS = {"generate": generate.main, "profile": profile.main, "evaluate": evaluate.main}


# flags -> the one error line every tool prints for them
SAME_LINE = {
    "--top-p 2": "error: --top-p must be a number in (0, 1], got 2.0",
    "--cfg-scale nan": "error: --cfg-scale must be a finite number >= 0, got nan",
    "--temperature -1": "error: --temperature must be a finite number >= 0, got -1.0",
    "--top-k -3": "error: --top-k must be an int >= 0 (0 = off), got -3",
    "--dtype fp16": "error: argument --dtype: invalid choice: 'fp16' (choose from fp32, bf16)",
    "--device tpu": "error: argument --device: invalid choice: 'tpu' (choose from auto, cpu, cuda)",
}


@pytest.mark.parametrize("flags", sorted(SAME_LINE))
@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_the_same_bad_value_gets_the_same_line_everywhere(tool, flags, capsys, tmp_path):
    """Checked before any model is loaded or anything written; SamplingSettings words the sampling
    errors, reworded as the flag; the spellings come from device_dtype."""
    argv, line = flags.split(), SAME_LINE[flags]
    assert TOOLS[tool](argv + (["--out", str(tmp_path / "out")] if tool == "generate" else [])) == 2
    err = capsys.readouterr().err
    # compared without quotes: argparse quotes the choices in some Python versions only
    assert err.count("\n") == 1 and err.rstrip("\n").replace("'", "") == line.replace("'", ""), err
    assert not (tmp_path / "out").exists()


def test_settings_from_args_keeps_defaults_for_missing_flags():
    class Args:
        top_k = 5

    assert cli.settings_from_args(Args()) == SamplingSettings(top_k=5)
    with pytest.raises(cli.UsageError, match=r"^--num-tokens must be None or an int >= 1, got 0$"):
        cli.settings_from_args(type("A", (), {"num_tokens": 0})())


def test_generate_seed_beyond_int64_is_named(tiny_a, tmp_path, capsys):
    argv = ["--ckpt", str(tiny_a / "prior"), "--tokenizer", str(tiny_a / "tokenizer"), "--device", "cpu",
            "--classes", "1", "--num-images", "2", "--seed", str(2 ** 63 - 1), "--out", str(tmp_path / "o")]
    assert generate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --seed {2 ** 63 - 1}: seed {2 ** 63 - 1} (+ image index up to 1) must fit "
                          f"in int64") and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_help_returns_0(capsys):
    assert profile.main(["--help"]) == 0 and "usage:" in capsys.readouterr().out


def test_reconstruct_and_serve_do_not_load_generate():
    """The shared flag checks live in cli.py: reconstruct and serve no longer import the generate CLI."""
    code = ("import sys, detailflow_engine.reconstruct, detailflow_engine.serve; "
            "print('detailflow_engine.generate' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
