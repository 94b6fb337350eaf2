from .adapter import Adapter, AdapterConfig, MappingNet, resolve_targets
from .formats import FORMATS, Branch, CPBranch, LoRABranch, TRBranch, create_branch, reference_forward
from .model import MetaLoRAModel, Output, Segment

__all__ = [
    "FORMATS",
    "Adapter",
    "AdapterConfig",
    "Branch",
    "CPBranch",
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
