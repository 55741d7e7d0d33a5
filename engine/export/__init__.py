"""Export and compile: ONNX graphs of the three components, TensorRT engines built from them, and the
on-disk cache both live in, keyed by everything they depend on."""

from engine.export.cache import ArtefactKey, ArtefactStore, Entry, engine_store, model_content_hash
from engine.export.contracts import COMPONENT_NAMES, CONTRACTS, ComponentContract, TensorSpec
from engine.export.profiles import ModelDims, Profile, Range, default_profiles

__all__ = [
    "COMPONENT_NAMES",
    "CONTRACTS",
    "ArtefactKey",
    "ArtefactStore",
    "ComponentContract",
    "Entry",
    "ModelDims",
    "Profile",
    "Range",
    "TensorSpec",
    "default_profiles",
    "engine_store",
    "model_content_hash",
]
