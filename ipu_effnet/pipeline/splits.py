"""Module paths -> modules, for pipeline splits and recomputation points.

A split names the first module of the next pipeline stage: `stem`, `blocks.<stage>.<index>`, `head`, or
finer, `blocks.3.0.conv_pw`. The same names drive `poptorch.BeginBlock` (stage k on IPU k) and torch
pipelining, so resolving them lives here, shared by the IPU backend and the split planner.

    modules = resolve_module_paths(model, ["blocks.3.0"], key="ipu.pipeline_splits")
    stages = stage_starts(model, ["blocks.3.0"])      # [(1, "blocks.3.0", module)]

A name that is no module of the model raises `UsageError` with the valid paths nearest to the typo.
"""

from __future__ import annotations

import difflib
from typing import Dict, List, Sequence, Tuple

import torch.nn as nn

from ipu_effnet.errors import UsageError

__all__ = ["module_order", "resolve_module_paths", "stage_starts", "valid_module_paths"]


def valid_module_paths(model: nn.Module) -> List[str]:
    """Every named submodule path of `model`, in definition (forward) order; the root ('') left out."""
    return [name for name, _ in model.named_modules() if name]


def module_order(model: nn.Module) -> Dict[str, int]:
    """Path -> position in `named_modules` order (a parent comes before its children)."""
    return {name: i for i, name in enumerate(valid_module_paths(model))}


def _near(name: str, valid: Sequence[str], n: int = 3) -> List[str]:
    close = difflib.get_close_matches(name, valid, n=n, cutoff=0.6)
    if close:
        return close
    # nothing similar as a whole: offer the siblings under the longest prefix that exists
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut]) + "."
        children = [v for v in valid if v.startswith(prefix) and "." not in v[len(prefix):]]
        if children:
            return children[:8]
    return [v for v in valid if "." not in v][:8]


def resolve_module_paths(model: nn.Module, paths: Sequence[str], key: str = "module path") -> List[nn.Module]:
    """The modules named by `paths` (in the order given); UsageError naming `key` for an unknown one."""
    modules = dict(model.named_modules())
    valid = None
    out = []
    for path in paths:
        if not path or path not in modules:
            valid = valid if valid is not None else valid_module_paths(model)
            near = _near(path, valid)
            raise UsageError(f"{key}: {path!r} names no module of the model; nearest valid paths: "
                             f"{', '.join(near)} (all of them: python -m ipu_effnet info --model NAME --modules)")
        out.append(modules[path])
    return out


def stage_starts(model: nn.Module, splits: Sequence[str],
                 key: str = "ipu.pipeline_splits") -> List[Tuple[int, str, nn.Module]]:
    """(stage index, path, module) for each split: split k starts stage k + 1 (on IPU k + 1).

    The splits must follow the model's forward order, taken as `named_modules` order (definition order,
    which is the forward order of the models built here). A later split may lie inside an earlier one
    (`blocks.3.0`, then `blocks.3.0.conv_dw`): the new stage starts when that inner module runs.
    """
    modules = resolve_module_paths(model, splits, key)
    order = module_order(model)
    positions = [order[s] for s in splits]
    for (a, pa), (b, pb) in zip(zip(splits, positions), zip(splits[1:], positions[1:])):
        if pb <= pa:
            raise UsageError(f"{key}: {list(splits)!r}: {b!r} comes before {a!r} in the model; "
                             "list the splits in forward order")
    return [(k + 1, path, module) for k, (path, module) in enumerate(zip(splits, modules))]
