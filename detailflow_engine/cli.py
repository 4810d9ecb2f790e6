"""What every command-line tool shares: bad input is one ``error: ...`` line and exit status 2.

    parser = cli.Parser(prog=...)              # argparse errors raise UsageError instead of exiting
    def _main(argv): args = parser.parse_args(argv); ...; raise cli.UsageError("--x must be ...")
    def main(argv=None): return cli.run(_main, argv)

Also the checks several tools make on the same flags: the sampling flags (one SamplingSettings,
its errors reworded as the flag), --out, and a model path or Hugging Face repo id.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, List, Optional

from detailflow_engine.sampling_settings import DEFAULTS, SamplingSettings, SettingsError

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input: reported as one ``error: ...`` line, exit status 2."""


class _ParserExit(Exception):
    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class Parser(argparse.ArgumentParser):
    """argparse whose errors are UsageErrors (one line, no usage block) and whose --help returns
    its status through ``run`` instead of exiting the interpreter."""

    def error(self, message):
        raise UsageError(message)

    def exit(self, status=0, message=None):
        if message:
            sys.stderr.write(message)
        raise _ParserExit(status)


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def run(body: Callable[[Optional[List[str]]], int], argv: Optional[List[str]] = None,
        report: Callable[[], bool] = lambda: True) -> int:
    """body(argv) -> its exit status; a UsageError -> one ``error:`` line (when ``report()``), status 2."""
    try:
        return body(argv)
    except _ParserExit as e:  # --help, --version
        return e.status
    except UsageError as e:
        if report():
            print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE


def int_items(flag_name: str, items: List[str], what: str = "") -> List[int]:
    """['3', '12'] -> [3, 12]; a word that is not an int is a UsageError ("--classes: 'x' is not an
    integer class id")."""
    out = []
    for t in items:
        try:
            out.append(int(t))
        except ValueError:
            raise UsageError(f"{flag_name}: {t!r} is not an integer{' ' + what if what else ''}") from None
    return out


def flag(argument: str) -> str:
    return "--" + argument.replace("_", "-")


def settings_from_args(args, num_tokens: Optional[int] = None) -> SamplingSettings:
    """The sampling flags (those a tool has; the others keep their defaults) -> SamplingSettings;
    a bad value is a UsageError worded as its flag ("--top-p must be a number in (0, 1], got 2.0")."""
    given = {name: getattr(args, name, getattr(DEFAULTS, name)) for name in
             ("cfg_scale", "temperature", "top_k", "top_p", "gradual_cfg")}
    try:
        return SamplingSettings(**given, num_tokens=getattr(args, "num_tokens", num_tokens))
    except SettingsError as e:
        msg = str(e)
        raise UsageError(flag(e.argument) + msg[len(e.argument):] if msg.startswith(e.argument)
                         else f"{flag(e.argument)}: {msg}") from None


def check_out_writable(out: Path) -> None:
    """--out must be a writable folder, or creatable; checked before anything is loaded or run.

    Permissions alone do not tell (root passes every os.access check, yet /proc or /sys still refuse;
    a too-long name fails its stat), so the check also tries: a uniquely named probe folder in the
    nearest existing ancestor of a missing --out, and for root a probe file in an existing --out,
    each removed at once (--out is left as it was; for other users os.access answers for an
    existing folder, read-only mounts included)."""
    try:
        exists = out.exists()
    except OSError as e:  # e.g. a name too long for the file system
        raise UsageError(f"cannot create --out {out}: {one_line(e)}") from None
    if exists:
        if not out.is_dir():
            raise UsageError(f"--out {out} exists and is not a folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise UsageError(f"--out {out} is not writable")
        if not (hasattr(os, "geteuid") and os.geteuid() == 0):
            return
        try:
            fd, probe = tempfile.mkstemp(dir=out, prefix=".detailflow-probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise UsageError(f"--out {out} is not writable: {one_line(e)}") from None
        return
    anc = out.absolute().parent
    try:
        while not anc.exists() and anc != anc.parent:
            anc = anc.parent
    except OSError as e:
        raise UsageError(f"cannot create --out {out}: {one_line(e)}") from None
    if not anc.is_dir():
        raise UsageError(f"cannot create --out {out}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UsageError(f"cannot create --out {out}: {anc} is not writable")
    try:  # a uniquely named probe folder: several ranks (torchrun) may check the same --out at once
        os.rmdir(tempfile.mkdtemp(dir=anc, prefix=".detailflow-probe-"))
    except OSError as e:
        raise UsageError(f"cannot create --out {out}: cannot create folders in {anc} "
                         f"({e.strerror or one_line(e)})") from None


def resolve_model_arg(flag_name: str, given: str) -> Path:
    """A local path (must exist) or a Hugging Face repo id -> local path; problems are UsageErrors."""
    from detailflow_engine import hub

    if Path(given).exists() or hub.parse_repo_id(given) is None:
        if not Path(given).exists():
            raise UsageError(f"{flag_name} {given} does not exist")
        return Path(given)
    try:
        return hub.resolve_model_path(given)
    except hub.HubError as e:
        raise UsageError(f"{flag_name} {given}: {one_line(e)}") from None


def check_device(flag_value: str, device=None) -> None:
    """--device (or this process's device under torchrun) must be usable here."""
    from detailflow_engine.device_dtype import resolve_device

    try:
        resolve_device(flag_value if device is None else device)
    except ValueError as e:
        raise UsageError(f"--device {flag_value}: {one_line(e)}") from None


def load_pipeline(args, device=None, encoder: bool = True):
    """--ckpt/--tokenizer (or neither: the embedded model), --device, --dtype, --weights,
    --no-cuda-graphs -> (pipeline, prior path, tokenizer path); any loading problem is a UsageError.

    ``device``: this process's device (torchrun: the local rank's GPU); default ``--device``.
    ``encoder=False``: only the tokenizer's decoding half (a service that never encodes)."""
    device = args.device if device is None else device
    check_device(args.device, device)
    if args.ckpt is None:
        from detailflow_engine.assets import default_model_paths

        try:
            prior_path, tok_path = default_model_paths()
        except FileNotFoundError as e:
            raise UsageError(one_line(e)) from None
    else:
        prior_path = resolve_model_arg("--ckpt", args.ckpt)
        tok_path = resolve_model_arg("--tokenizer", args.tokenizer)
    from detailflow_engine.pipeline import DetailFlowPipeline

    try:
        pipe = DetailFlowPipeline.from_pretrained(prior_path, tok_path, device=device, dtype=args.dtype,
                                                  weights=args.weights, cuda_graphs=not args.no_cuda_graphs,
                                                  encoder=encoder)
    except (ValueError, OSError) as e:  # CheckpointError / ConfigError are ValueErrors
        raise UsageError(f"cannot load the model (--ckpt {prior_path}, --tokenizer {tok_path}): "
                         f"{one_line(e)}") from None
    except Exception as e:  # anything else from a foreign file: still one line, no traceback
        raise UsageError(f"cannot load the model (--ckpt {prior_path}, --tokenizer {tok_path}): "
                         f"{type(e).__name__}: {one_line(e)}") from None
    return pipe, Path(prior_path).resolve(), Path(tok_path).resolve()
