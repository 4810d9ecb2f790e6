"""Convert an official DetailFlow model (folder or .pt) into a safetensors model folder.

    python -m detailflow_engine.convert SRC OUT --kind tokenizer|prior [--ema/--no-ema] [--dtype fp16] [--overwrite]

OUT receives config.json and config.yaml (byte-for-byte copies) and model.safetensors (the
inference weights only: training-only tensors, optimizer state and the unused EMA/model twin are
dropped). The result loads with ``detailflow_engine.checkpoint.load_checkpoint(OUT, kind)``.
Default weights: prior 'ema' if present else 'model'; tokenizer 'model'.
Bad input prints one ``error: ...`` line on stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from detailflow_engine import cli
from detailflow_engine.checkpoint import (KINDS, CheckpointError, ConfigError, load_checkpoint,
                                          save_safetensors_folder)
from detailflow_engine.device_dtype import STORAGE_DTYPES


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog="python -m detailflow_engine.convert",
        description="Convert an official DetailFlow checkpoint into a safetensors model folder.")
    p.add_argument("src", help="model folder, checkpoints/<N>.pt or .safetensors file")
    p.add_argument("out", help="output folder (config.json, config.yaml, model.safetensors)")
    p.add_argument("--kind", required=True, choices=KINDS, help="which model SRC holds")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="use the 'ema' (--ema) or 'model' (--no-ema) weights; "
                        "default: prior ema if present, tokenizer model")
    p.add_argument("--dtype", choices=list(STORAGE_DTYPES), default=None,
                   help="store floating-point weights in this dtype (default: as in SRC; fp16 is a storage "
                        "format only: the engine loads it as fp32 or bf16)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files in OUT")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run(_main, argv)


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    try:
        loaded = load_checkpoint(args.src, args.kind, ema=args.ema)
        out = save_safetensors_folder(loaded, args.out, overwrite=args.overwrite,
                                      dtype=STORAGE_DTYPES[args.dtype] if args.dtype else None)
    except (CheckpointError, ConfigError, OSError) as exc:
        raise cli.UsageError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - anything else from a foreign file: still one line
        raise cli.UsageError(f"cannot convert {args.src}: {type(exc).__name__}: {cli.one_line(exc)}") from None
    print(f"wrote {out}: {len(loaded.state_dict)} tensors from {loaded.weights_path} "
          f"({loaded.which!r} weights, {len(loaded.skipped)} training-only tensors dropped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
