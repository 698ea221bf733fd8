"""Load HF checkpoints into sharded parameters; per-family adapters; converters."""

from wa.models.checkpoint import CheckpointError, Loaded, build_model, find_weights, identity, load, read_config
from wa.models.families import FAMILIES, Family, ParamInfo, family_names, for_model_type

__all__ = ["FAMILIES", "CheckpointError", "Family", "Loaded", "ParamInfo", "build_model",
           "family_names", "find_weights", "for_model_type", "identity", "load", "read_config"]
