"""Freezing the layers before a named module, for fine-tuning (docs/reference.md section 5).

The half-resolution recipe fine-tunes only the last layers at the test resolution: everything before
`finetune.first_trainable` (Graphcore's B0 recipe: `blocks.5.3`, B4: `blocks.6.1`) keeps its weights.
"Before" is module registration order, which for this model family is the order of the forward pass
(stem, blocks.0.0, ..., head, dropout, classifier). A module is frozen when it comes before the first
trainable module and is neither that module nor one of its ancestors; its parameters get
requires_grad=False and it is put in eval mode before every forward (a forward pre-hook, so that the
runner's `model.train()` each step cannot undo it): its norms use and keep their running statistics,
and stochastic depth inside it is off, so the frozen part is a fixed feature extractor.

Default (first_trainable None): the last two blocks, the head and the classifier train, which is
Graphcore's B0 choice (`blocks.5.3` is B0's second-to-last block). Name `stem` to train everything.

    frozen = freeze_before(model, "blocks.5.3")    # -> names of the frozen top-level modules
"""

from __future__ import annotations

import difflib
from typing import List, Optional

import torch.nn as nn

from ipu_effnet.errors import UsageError

__all__ = ["default_first_trainable", "freeze_before", "frozen_module_names"]


def default_first_trainable(model: nn.Module) -> str:
    """The second-to-last block (`blocks.<stage>.<index>`), or `head` for a model without two blocks."""
    blocks = [name for name, _ in model.named_modules() if name.count(".") == 2 and name.startswith("blocks.")]
    return blocks[-2] if len(blocks) >= 2 else "head"


def frozen_module_names(model: nn.Module, first_trainable: str) -> List[str]:
    """The maximal modules that come before `first_trainable` (see the module docstring)."""
    names = [name for name, _ in model.named_modules() if name]
    if first_trainable not in names:
        close = difflib.get_close_matches(first_trainable, names, n=3)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise UsageError(f"finetune.first_trainable = {first_trainable!r} names no module of the model{hint}")
    ancestors = set()
    parts = first_trainable.split(".")
    for i in range(1, len(parts)):
        ancestors.add(".".join(parts[:i]))
    frozen: List[str] = []
    for name in names[:names.index(first_trainable)]:
        if name in ancestors or any(name.startswith(f + ".") for f in frozen):
            continue
        frozen.append(name)
    return frozen


def freeze_before(model: nn.Module, first_trainable: Optional[str]) -> List[str]:
    """Freeze every module before `first_trainable` (None: `default_first_trainable`); returns their names."""
    path = first_trainable or default_first_trainable(model)
    names = frozen_module_names(model, path)
    modules = dict(model.named_modules())
    frozen = [modules[name] for name in names]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)

    def keep_frozen_in_eval(_module: nn.Module, _inputs: object) -> None:
        for m in frozen:
            if m.training:
                m.eval()

    model.register_forward_pre_hook(keep_frozen_in_eval)
    for m in frozen:
        m.eval()
    return names
