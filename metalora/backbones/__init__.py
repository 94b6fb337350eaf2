from .base import Backbone, BackboneIdentity, Preprocess, sha256_file
from .models import BACKBONES, create_backbone, efficientnet_lite0_key_map, efficientnet_lite0_weights_path, load_exact

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneIdentity",
    "Preprocess",
    "create_backbone",
    "efficientnet_lite0_key_map",
    "efficientnet_lite0_weights_path",
    "load_exact",
    "sha256_file",
]
