"""Pretrained weights in: a G1 EfficientNet's state dict from another code base, loaded into our model.

    python -m ipu_effnet train --config ... --init-from efficientnet_b0.pth [--init-format geffnet]
    (the same as --set model.init_from=FILE --set model.init_format=FORMAT)

Files only (no downloads): a `torch.save` of a state dict, optionally inside a dict under "state_dict"
or "model" (timm's and many training scripts' checkpoints), with or without DataParallel's "module."
prefix, or an ipu_effnet checkpoint. Loaded with weights_only=True, so a file that holds a pickled model
rather than its tensors is refused and nothing in it runs.

Formats: how a file names its tensors, and the numerics its weights were trained with.

    format                names (stem conv)        BatchNorm eps  padding    whose weights
    timm, geffnet         conv_stem, bn1, blocks.  1e-5           symmetric  efficientnet_b0 ... (PyTorch-trained)
    tf_efficientnet       as timm                  1e-3           same       timm's/geffnet's tf_efficientnet_* (TF-trained)
    efficientnet_pytorch  _conv_stem, _blocks.k.   1e-3           same       lukemelas' EfficientNet.from_name/pretrained
    torchvision           features.0.0             1e-5           symmetric  torchvision's efficientnet_b0 ... (V1)
    ipu_effnet            stem.conv                as stored      as stored  this project's checkpoints and state dicts

`auto` tells the families apart by their names; timm and geffnet name the PyTorch-trained and the
TF-ported weights alike, so auto takes the PyTorch numerics unless the file name contains "tf_" (pass
tf_efficientnet to be sure). Before the model is built, `run.recipes.init_numerics` sets norm.eps and model.padding
to the format's and says so: weights compute what they were trained to compute only with the eps and
padding they were trained with.

The mapping goes block by block from our module names (`blocks.<stage>.<index>`, MBConv's conv_pw,
norm1, conv_dw, norm2, se, conv_pwl, norm3; an expand-1 block has no conv_pw/norm1) to the format's,
and every tensor is checked by shape. A tensor the model needs that the file lacks, a shape that differs,
or a tensor of the file that the model has no place for (a deeper network's extra blocks) stops the load
with one line naming it; only the classifier may differ, in its class count, and is then left as
initialised (a line says so). BatchNorm's num_batches_tracked counter is taken when present.
Only EfficientNet V1 (MBConv) layouts are mapped; EfficientNetV2's Fused-MBConv stages are not.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from ipu_effnet.errors import UsageError

__all__ = ["FORMATS", "ImportReport", "Numerics", "detect_format", "load_pretrained",
           "read_state_dict", "source_names"]

FORMATS = ("auto", "ipu_effnet", "timm", "geffnet", "tf_efficientnet", "torchvision", "efficientnet_pytorch")


@dataclass(frozen=True)
class Numerics:
    eps: Optional[float]      # BatchNorm epsilon (None: keep the config's)
    padding: Optional[str]    # "symmetric" | "same" (None: keep the config's)


FORMAT_NUMERICS: Dict[str, Numerics] = {
    "timm": Numerics(1e-5, "symmetric"),
    "geffnet": Numerics(1e-5, "symmetric"),
    "torchvision": Numerics(1e-5, "symmetric"),
    "tf_efficientnet": Numerics(1e-3, "same"),
    "efficientnet_pytorch": Numerics(1e-3, "same"),
}

_COUNTER = "num_batches_tracked"


@dataclass
class ImportReport:
    path: str
    format: str
    loaded: int = 0                                            # tensors copied in
    reinitialised: List[str] = field(default_factory=list)     # classifier tensors left as initialised
    skipped: List[str] = field(default_factory=list)           # file tensors not used (counters only)
    counters_missing: int = 0                                  # BatchNorm counters the file lacks


def _fail(path: Any, message: str) -> UsageError:
    return UsageError(f"--init-from {path}: {message}")


# ----------------------------------------------------------------------------------------------------
# Reading


def read_state_dict(path: os.PathLike) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    """(state dict, model_args or None) from a file: a state dict, a dict holding one, or an ipu_effnet
    checkpoint. weights_only loading; the "module." prefix of DataParallel is removed."""
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise _fail(path, "refused by weights_only loading: the file holds objects other than tensors "
                          "(a pickled model?); save model.state_dict() instead") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _fail(path, f"not a readable torch file ({first[:200]})") from None
    model_args = None
    if isinstance(obj, Mapping) and obj.get("format") == "ipu_effnet.checkpoint":
        model_args = obj.get("model_args")
        obj = obj.get("model")
    elif isinstance(obj, Mapping) and not _tensor_dict(obj):
        for key in ("state_dict", "model", "model_state_dict", "net"):
            if isinstance(obj.get(key), Mapping) and _tensor_dict(obj[key]):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not _tensor_dict(obj):
        raise _fail(path, "holds no state dict (a mapping of names to tensors, alone or under 'state_dict' "
                          "or 'model')")
    state = {str(k): v for k, v in obj.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, model_args


def _tensor_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def detect_format(state: Mapping[str, torch.Tensor], path: Any = "") -> str:
    """The format whose names the state dict uses (timm for timm's and geffnet's names; tf_efficientnet
    when the file name contains 'tf_')."""
    if "conv_stem.weight" in state:
        return "tf_efficientnet" if "tf_" in Path(str(path)).name.lower() else "timm"
    if "_conv_stem.weight" in state:
        return "efficientnet_pytorch"
    if "features.0.0.weight" in state:
        return "torchvision"
    if "stem.conv.weight" in state:
        return "ipu_effnet"
    shown = ", ".join(list(state)[:4])
    raise _fail(path, f"names of an unknown layout ({shown}, ...); expected timm/geffnet (conv_stem.weight), "
                      "efficientnet_pytorch (_conv_stem.weight), torchvision (features.0.0.weight) or "
                      "ipu_effnet (stem.conv.weight) names")


def _resolve(path: Any, fmt: str) -> Tuple[str, Dict[str, torch.Tensor], Numerics, str]:
    """(format, state dict, numerics, how the format was chosen)."""
    if fmt not in FORMATS:
        raise _fail(path, f"--init-format {fmt!r} is not one of {', '.join(FORMATS)}")
    state, model_args = read_state_dict(path)
    how = "given"
    if fmt == "auto":
        fmt = detect_format(state, path)
        how = "detected from its names"
        if fmt == "timm":
            how += "; timm/geffnet names: PyTorch-trained numerics assumed (--init-format tf_efficientnet " \
                   "for the TF-ported tf_efficientnet_* weights)"
    if fmt == "ipu_effnet":
        norm = (model_args or {}).get("norm") or {}
        numerics = Numerics(norm.get("eps"), (model_args or {}).get("padding", "symmetric") if model_args else None)
    else:
        numerics = FORMAT_NUMERICS[fmt]
    return fmt, state, numerics, how


# ----------------------------------------------------------------------------------------------------
# The numerics the weights were trained with


def weights_numerics(path: str, fmt: str = "auto") -> Tuple[str, Numerics, str]:
    """(format, the eps and padding its weights were trained with, how the format was told) for a weights
    file; `run.recipes.init_numerics` sets them in a config before the model is built."""
    fmt, _state, numerics, how = _resolve(path, fmt)
    return fmt, numerics, how


# ----------------------------------------------------------------------------------------------------
# Names


def _block_pairs(fmt: str, expand: bool) -> List[Tuple[str, str]]:
    """(our submodule, theirs) inside one MBConv block."""
    if fmt in ("timm", "geffnet", "tf_efficientnet"):
        if expand:
            return [("conv_pw", "conv_pw"), ("norm1", "bn1"), ("conv_dw", "conv_dw"), ("norm2", "bn2"),
                    ("se.conv_reduce", "se.conv_reduce"), ("se.conv_expand", "se.conv_expand"),
                    ("conv_pwl", "conv_pwl"), ("norm3", "bn3")]
        return [("conv_dw", "conv_dw"), ("norm2", "bn1"), ("se.conv_reduce", "se.conv_reduce"),
                ("se.conv_expand", "se.conv_expand"), ("conv_pwl", "conv_pw"), ("norm3", "bn2")]
    if fmt == "efficientnet_pytorch":
        pairs = [("conv_pw", "_expand_conv"), ("norm1", "_bn0")] if expand else []
        return pairs + [("conv_dw", "_depthwise_conv"), ("norm2", "_bn1"), ("se.conv_reduce", "_se_reduce"),
                        ("se.conv_expand", "_se_expand"), ("conv_pwl", "_project_conv"), ("norm3", "_bn2")]
    if fmt == "torchvision":  # block.<j>: [expansion], depthwise, squeeze-excitation, projection
        j = 1 if expand else 0
        pairs = [("conv_pw", "block.0.0"), ("norm1", "block.0.1")] if expand else []
        return pairs + [("conv_dw", f"block.{j}.0"), ("norm2", f"block.{j}.1"), ("se.conv_reduce", f"block.{j + 1}.fc1"),
                        ("se.conv_expand", f"block.{j + 1}.fc2"), ("conv_pwl", f"block.{j + 2}.0"),
                        ("norm3", f"block.{j + 2}.1")]
    raise ValueError(fmt)


def source_names(model: nn.Module, fmt: str) -> List[Tuple[str, str]]:
    """(our module prefix, the format's) for every module of `model` that holds tensors."""
    if fmt == "ipu_effnet":
        return [(name, name) for name, _ in model.named_modules() if name]
    if any(a.block != "mbconv" for stage in model.block_args for a in stage):
        raise UsageError(f"--init-format {fmt}: only EfficientNet V1 layouts (MBConv blocks) are mapped; "
                         f"{model.model_args.get('name') if hasattr(model, 'model_args') else 'this model'} "
                         "has Fused-MBConv stages")
    timm_like = fmt in ("timm", "geffnet", "tf_efficientnet")
    if timm_like:
        pairs = [("stem.conv", "conv_stem"), ("stem.norm", "bn1")]
    elif fmt == "efficientnet_pytorch":
        pairs = [("stem.conv", "_conv_stem"), ("stem.norm", "_bn0")]
    else:
        pairs = [("stem.conv", "features.0.0"), ("stem.norm", "features.0.1")]
    flat = 0
    for s, stage in enumerate(model.block_args):
        for i, args in enumerate(stage):
            ours = f"blocks.{s}.{i}"
            theirs = {"efficientnet_pytorch": f"_blocks.{flat}", "torchvision": f"features.{s + 1}.{i}"}.get(
                fmt, ours)
            for a, b in _block_pairs(fmt, args.mid_chs != args.in_chs):
                pairs.append((f"{ours}.{a}", f"{theirs}.{b}"))
            flat += 1
    if timm_like:
        pairs += [("head.conv", "conv_head"), ("head.norm", "bn2"), ("classifier", "classifier")]
    elif fmt == "efficientnet_pytorch":
        pairs += [("head.conv", "_conv_head"), ("head.norm", "_bn1"), ("classifier", "_fc")]
    else:
        last = len(model.block_args) + 1
        pairs += [("head.conv", f"features.{last}.0"), ("head.norm", f"features.{last}.1"),
                  ("classifier", "classifier.1")]
    return pairs


def _key_map(model: nn.Module, fmt: str) -> Dict[str, str]:
    """Our state-dict key -> the format's key, for every key of model.state_dict()."""
    prefixes = dict(source_names(model, fmt))
    out = {}
    for key in model.state_dict():
        module, _, leaf = key.rpartition(".")
        if module not in prefixes:
            raise UsageError(f"--init-format {fmt}: no mapping for {key} (not an EfficientNet V1 layout?)")
        out[key] = f"{prefixes[module]}.{leaf}"
    return out


# ----------------------------------------------------------------------------------------------------
# Loading


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def _model_numerics(model: nn.Module) -> Numerics:
    from .padding import Conv2dSame

    eps = [m.eps for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    same = any(isinstance(m, Conv2dSame) for m in model.modules())
    return Numerics(eps[0] if eps else None, "same" if same else "symmetric")


def load_pretrained(model: nn.Module, path: os.PathLike, fmt: str = "auto",
                    log: Callable[[str], None] = print) -> ImportReport:
    """Copy the file's tensors into `model` (see the module docstring); returns what was done."""
    fmt, state, numerics, _how = _resolve(path, fmt)
    have = _model_numerics(model)
    for what, want, got in (("norm.eps", numerics.eps, have.eps), ("model.padding", numerics.padding, have.padding)):
        if want is not None and got is not None and want != got:
            log(f"warning: --init-from {path}: the model has {what}={got} but {fmt} weights were trained with "
                f"{what}={want}; its outputs will differ from the source model's")
    report = ImportReport(str(path), fmt)
    mapping = _key_map(model, fmt)
    own = model.state_dict()
    new: Dict[str, torch.Tensor] = {}
    used = set()
    for key, src in mapping.items():
        target = own[key]
        if src not in state:
            if key.endswith(_COUNTER):
                report.counters_missing += 1
                new[key] = target
                continue
            raise _fail(path, f"{fmt} file has no tensor {src} for the model's {key} {_shape(target)}")
        value = state[src]
        used.add(src)
        if tuple(value.shape) != tuple(target.shape):
            if key.startswith("classifier."):
                report.reinitialised.append(key)
                new[key] = target
                continue
            raise _fail(path, f"{src} has shape {_shape(value)} in the file but the model's {key} has "
                              f"{_shape(target)} (another variant, group size or width? check model.name)")
        new[key] = value.to(dtype=target.dtype)
        report.loaded += 1
    unused = [k for k in state if k not in used]
    report.skipped = [k for k in unused if k.endswith(_COUNTER)]
    extra = [k for k in unused if not k.endswith(_COUNTER)]
    if extra:
        shown = ", ".join(extra[:6]) + (f" ... ({len(extra)} in all)" if len(extra) > 6 else "")
        raise _fail(path, f"{len(extra)} tensor(s) of the {fmt} file have no place in the model: {shown} "
                          "(a deeper or different network? check model.name and norm.kind)")
    model.load_state_dict(new, strict=True)
    if report.reinitialised:
        classes = state[mapping["classifier.weight"]].shape[0]
        log(f"init-from {path}: classifier re-initialised: the file's classifier has {classes} classes, the "
            f"model's {own['classifier.weight'].shape[0]} ({', '.join(report.reinitialised)})")
    notes = []
    if report.counters_missing:
        notes.append(f"{report.counters_missing} BatchNorm counters not in the file (kept)")
    if report.skipped:
        notes.append(f"unmapped: {', '.join(report.skipped[:3])}{' ...' if len(report.skipped) > 3 else ''} "
                     f"({len(report.skipped)} BatchNorm counters)")
    log(f"init-from {path}: {report.loaded} tensors loaded ({fmt} format)" + (f"; {'; '.join(notes)}" if notes else ""))
    return report
