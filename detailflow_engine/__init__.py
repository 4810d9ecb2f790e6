"""DetailFlow Engine: fast inference for DetailFlow coarse-to-fine image generation.

Data flows one way: checkpoint -> config -> model -> pipeline.
"""
from detailflow_engine.config import ConfigError, PriorConfig, TokenizerConfig, TowerConfig  # noqa: F401

__version__ = "0.1.0"
