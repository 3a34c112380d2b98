"""`create_model(name, **options)`: the named variants of the family, built by one builder."""

from __future__ import annotations

import difflib
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Union

from norms import NormSpec, as_norm_spec

from .builder import build_blocks, head_channels, stem_channels
from .efficientnet import EfficientNet
from .specs import MODELS, ModelDef

# Models registered for tests and quick CPU runs, not part of the published family.
_EXTRA_MODELS = ("efficientnet_tiny",)


def list_models(include_extra: bool = False) -> List[str]:
    """Names of the published family (B0..B7, their G16 variants, V2-S/M/L); `include_extra` adds the
    small test model `efficientnet_tiny`."""
    return [name for name in MODELS if include_extra or name not in _EXTRA_MODELS]


def get_model_def(name: str) -> ModelDef:
    try:
        return MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(MODELS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(MODELS)}"
        raise ValueError(f"unknown model {name!r}{hint}") from None


def native_resolution(name: str) -> int:
    """The resolution a variant trains at natively (B0 224 ... B7 600; V2-S 300)."""
    return get_model_def(name).train_res


def create_model(name: str, num_classes: int = 1000, in_chans: int = 3,
                 norm: Union[NormSpec, str, None] = None, act: str = "silu",
                 group_size: Optional[int] = None, expand_ratio: Optional[float] = None,
                 fit_group_size: Optional[bool] = None, drop_rate: Optional[float] = None,
                 drop_path_rate: float = 0.2, padding: str = "symmetric") -> EfficientNet:
    """Build a named variant.

    norm:           a NormSpec or a kind string ("batch", "group", "layer", "none", "layer+proxy")
    group_size:     channels per group of the MBConv spatial convolutions (1 = depthwise, 16 = G16);
                    None keeps the variant's own (1, or 16 for *_g16)
    expand_ratio:   expansion of the inverted-residual stages (the first expand-1 stage stays at 1);
                    None keeps the variant's own (6 in V1, 4 for *_g16, the table's values in V2)
    fit_group_size: where group_size does not divide a convolution's channels, use
                    max(channels // group_size, 1) groups instead of failing (on for the *_g16
                    variants: B3..B6 have 24-, 40- or 56-channel expand-1 blocks)
    drop_rate:      dropout before the classifier; None keeps the variant's (0.2 for B0 ... 0.5 for B7)
    drop_path_rate: stochastic-depth rate of the last block (linear schedule from 0)
    padding:        "symmetric" (k // 2 on each side) or "same" (TensorFlow's SAME padding in the strided
                    convolutions, for weights trained with it: models/padding.py)

    The arguments are kept on the model as `model.model_args`, so a checkpoint can rebuild it.
    """
    mdef = get_model_def(name)
    spec = as_norm_spec(norm)
    gs = mdef.group_size if group_size is None else group_size
    er = mdef.expand_ratio if expand_ratio is None else expand_ratio
    fit = mdef.fit_group_size if fit_group_size is None else fit_group_size
    dr = mdef.drop_rate if drop_rate is None else drop_rate
    if er is not None and er <= 0:
        raise ValueError(f"expand_ratio must be > 0, got {er}")
    if padding not in ("symmetric", "same"):
        raise ValueError(f"padding must be 'symmetric' or 'same', got {padding!r}")
    if not 0 <= dr < 1 or not 0 <= drop_path_rate < 1:
        raise ValueError(f"drop_rate and drop_path_rate must be in [0, 1), got {dr} and {drop_path_rate}")
    block_args = build_blocks(mdef.stages, mdef.width, mdef.depth, group_size=gs, expand_ratio=er,
                              fit_group_size=fit, drop_path_rate=drop_path_rate)
    model = EfficientNet(block_args, stem_channels(mdef.stages, mdef.width), head_channels(mdef.width),
                         num_classes=num_classes, in_chans=in_chans, norm=spec, act=act, drop_rate=dr)
    if padding == "same":
        from .padding import use_same_padding

        use_same_padding(model)
    model.model_args = model_args_dict(name, num_classes=num_classes, in_chans=in_chans, norm=spec, act=act,
                                       group_size=gs, expand_ratio=er, fit_group_size=fit, drop_rate=dr,
                                       drop_path_rate=drop_path_rate)
    if padding != "symmetric":  # absent for the default: model_args of older checkpoints stay equal
        model.model_args["padding"] = padding
    model.train_resolution = mdef.train_res
    model.eval_resolution = mdef.eval_res
    return model


def model_args_dict(name: str, **kwargs: Any) -> Dict[str, Any]:
    """Plain-data constructor arguments (NormSpec as a dict): safe to store in a checkpoint."""
    out: Dict[str, Any] = {"name": name}
    for key, value in kwargs.items():
        out[key] = asdict(value) if isinstance(value, NormSpec) else value
    return out


def create_model_from_args(model_args: Dict[str, Any]) -> EfficientNet:
    """Rebuild a model from `model.model_args` (as stored in a checkpoint)."""
    args = dict(model_args)
    name = args.pop("name")
    if isinstance(args.get("norm"), dict):
        args["norm"] = NormSpec(**args["norm"])
    return create_model(name, **args)
