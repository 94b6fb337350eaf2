from .adapter import SEED_MODES, Adapter, AdapterConfig, FrozenSeed, MappingNet, resolve_targets
from .formats import FORMATS, Branch, CPBranch, LoRABranch, TRBranch, create_branch, reference_forward
from .model import MetaLoRAModel, Output, Segment

__all__ = [
    "FORMATS",
    "SEED_MODES",
    "Adapter",
    "AdapterConfig",
    "Branch",
    "CPBranch",
    "FrozenSeed",
    "LoRABranch",
    "MappingNet",
    "MetaLoRAModel",
    "Output",
    "Segment",
    "TRBranch",
    "create_branch",
    "reference_forward",
    "resolve_targets",
]
