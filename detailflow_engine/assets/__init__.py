"""The small embedded default model (Fashion-MNIST, 32x32), in the official folder layout."""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
DEFAULT_PRIOR = ASSETS / "default" / "prior"
DEFAULT_TOKENIZER = ASSETS / "default" / "tokenizer"


def default_model_paths() -> tuple[Path, Path]:
    """(prior folder, tokenizer folder) of the embedded default model."""
    for path in (DEFAULT_PRIOR, DEFAULT_TOKENIZER):
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"the embedded default model is missing: expected {path}/config.json "
                                    f"(reinstall the package, or pass --ckpt/--tokenizer)")
    return DEFAULT_PRIOR, DEFAULT_TOKENIZER
