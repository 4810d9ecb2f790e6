"""DetailFlow Engine: fast inference for DetailFlow coarse-to-fine image generation.

Data flows one way: checkpoint -> config -> model -> pipeline.

    from detailflow_engine import DetailFlowPipeline
    pipe = DetailFlowPipeline.from_pretrained("path/to/prior", "path/to/tokenizer")
    out = pipe.generate([207, 360], cfg_scale=1.45, seed=0)
    out.images[0].save("dog.png")
"""
from detailflow_engine import threading_policy

threading_policy.apply()  # before anything loads torch (and its OpenMP runtime): see the module

from detailflow_engine.config import ConfigError, PriorConfig, TokenizerConfig, TowerConfig  # noqa: E402,F401

__version__ = "0.1.0"

_LAZY = {
    "DetailFlowPipeline": "detailflow_engine.pipeline",
    "GenerationResult": "detailflow_engine.pipeline",
    "DetailFlowBatcher": "detailflow_engine.batcher",
    "resolve_model_path": "detailflow_engine.hub",
    "load_prior": "detailflow_engine.loading",
    "load_tokenizer": "detailflow_engine.loading",
    "load_checkpoint": "detailflow_engine.checkpoint",
    "CheckpointError": "detailflow_engine.checkpoint",
}


def __getattr__(name):  # lazy: `import detailflow_engine` stays light (configs, checkpoint tools)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'detailflow_engine' has no attribute {name!r}")


__all__ = ["DetailFlowPipeline", "GenerationResult", "DetailFlowBatcher", "resolve_model_path", "load_prior", "load_tokenizer", "load_checkpoint",
           "CheckpointError", "ConfigError", "PriorConfig", "TokenizerConfig", "TowerConfig"]
