"""Transformer models as op graphs: configs, the zoo, and build_graph."""

from models.config import ConfigError, ModelConfig, load_model, zoo_names
from models.graph import build_graph
from models.ops import Op

__all__ = ["ConfigError", "ModelConfig", "Op", "build_graph", "load_model", "zoo_names"]
