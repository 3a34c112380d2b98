"""The EfficientNet family: B0..B7, their G16 variants, EfficientNetV2-S/M/L.

    from ipu_effnet.models import create_model, list_models
    model = create_model("efficientnet_b0_g16", norm=NormSpec(kind="layer", proxy=True))
"""

from .builder import BlockArgs, build_blocks, make_divisible
from .efficientnet import EfficientNet
from .factory import create_model, create_model_from_args, get_model_def, list_models, native_resolution
from .specs import MODELS, ModelDef, StageSpec

__all__ = [
    "MODELS",
    "BlockArgs",
    "EfficientNet",
    "ModelDef",
    "StageSpec",
    "build_blocks",
    "create_model",
    "create_model_from_args",
    "get_model_def",
    "list_models",
    "make_divisible",
    "native_resolution",
]
