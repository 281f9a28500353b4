"""BNext binary neural networks.

>>> import models
>>> net = models.create_model("bnext_tiny", num_classes=10, stem="cifar", width_mult=0.25)

Importing the package also registers the model names with timm
(``timm.create_model("bnext_tiny", num_classes=10)``).
"""

from .bnext import BNext, BNext18
from .checkpoint import CheckpointMismatchError, check_state_dict, load_checkpoint, read_state_dict
from .factory import MODEL_NAMES, create_model, list_models, register_with_timm
from .fused_ops import AdamWUpdate, adamw_update_many, compile_options
from .layers import BinaryConv2d, QuantConv2d, QuantLinear, SqueezeExcite
from .precision import (
    LayerPrecision,
    apply_constraints,
    binarizers,
    constrained_binary_weights,
    get_temperature,
    latent_binary_parameters,
    layer_precision,
    parameter_bits,
    quantize_real_layers,
    set_temperature,
)
from .quantizers import HardSign, LearnableBias, fake_quantize, progressive_binarize, sign_ste

register_with_timm()

__all__ = [
    "MODEL_NAMES",
    "AdamWUpdate",
    "BNext",
    "BNext18",
    "BinaryConv2d",
    "CheckpointMismatchError",
    "HardSign",
    "LayerPrecision",
    "LearnableBias",
    "QuantConv2d",
    "QuantLinear",
    "SqueezeExcite",
    "adamw_update_many",
    "apply_constraints",
    "binarizers",
    "check_state_dict",
    "compile_options",
    "constrained_binary_weights",
    "create_model",
    "fake_quantize",
    "get_temperature",
    "latent_binary_parameters",
    "layer_precision",
    "list_models",
    "load_checkpoint",
    "parameter_bits",
    "progressive_binarize",
    "quantize_real_layers",
    "read_state_dict",
    "register_with_timm",
    "set_temperature",
    "sign_ste",
]
