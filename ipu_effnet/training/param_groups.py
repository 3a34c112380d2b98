"""Which parameters get weight decay: two optimiser parameter groups.

The rule (EfficientNet reference and Graphcore's recipe, docs/reference.md sections 4 and 6):

- decayed: every parameter with 2 or more dimensions (convolution and linear weights);
- not decayed: 1-D parameters (biases, norm gamma and beta);
- except where a module says otherwise. A module may declare

      decay_params = ("proxy_weight", "proxy_bias")      # decayed although 1-D
      no_decay_params = ("pos_embed",)                   # not decayed although 2+ dims

  naming its *own* parameters (not its children's). Proxy Norm declares its gamma_t and beta_t this way,
  because the reference decays them while leaving gamma and beta alone. No module class is hard-coded
  here, so a new layer states its own rule where it is defined.

    from ipu_effnet.training.param_groups import param_groups, describe
    optimiser = torch.optim.SGD(param_groups(model, weight_decay=1e-5), lr=0.1, momentum=0.9)
    print(describe(model))

The groups are plain `{"params": [...], "weight_decay": wd}` dicts with no extra keys (poptorch's
optimisers accept exactly the keys torch's do); the decayed group always comes first.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch.nn as nn

DECAY_ATTR = "decay_params"
NO_DECAY_ATTR = "no_decay_params"

NamedParams = List[Tuple[str, nn.Parameter]]


def is_decayed(module: nn.Module, name: str, param: nn.Parameter) -> bool:
    """The rule for one parameter `name` owned directly by `module`."""
    if name in getattr(module, NO_DECAY_ATTR, ()):
        return False
    if name in getattr(module, DECAY_ATTR, ()):
        return True
    return param.dim() >= 2


@dataclass
class ParamSplit:
    """Named parameters on each side of the rule, in `model.named_modules()` order."""

    decay: NamedParams = field(default_factory=list)
    no_decay: NamedParams = field(default_factory=list)


def split_params(model: nn.Module, trainable_only: bool = True) -> ParamSplit:
    """Split `model`'s parameters by the rule. Shared parameters appear once (first owner wins);
    with `trainable_only`, parameters with requires_grad=False (frozen layers) are left out."""
    split = ParamSplit()
    seen = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or (trainable_only and not param.requires_grad):
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{name}" if module_name else name
            (split.decay if is_decayed(module, name, param) else split.no_decay).append((full_name, param))
    return split


def param_groups(model: nn.Module, weight_decay: float, trainable_only: bool = True) -> List[dict]:
    """Two parameter groups for a torch optimiser: [decayed (weight_decay), not decayed (0.0)]."""
    split = split_params(model, trainable_only=trainable_only)
    return [
        {"params": [p for _, p in split.decay], "weight_decay": float(weight_decay)},
        {"params": [p for _, p in split.no_decay], "weight_decay": 0.0},
    ]


def counts(model: nn.Module, trainable_only: bool = True) -> Dict[str, Dict[str, object]]:
    """Per side of the rule: number of tensors, number of values, and tensors per parameter name
    (the last component: weight, bias, proxy_weight, ...). Plain data, for JSON summaries."""
    split = split_params(model, trainable_only=trainable_only)
    out: Dict[str, Dict[str, object]] = {}
    for side, named in (("decay", split.decay), ("no_decay", split.no_decay)):
        by_name = Counter(name.rsplit(".", 1)[-1] for name, _ in named)
        out[side] = {
            "tensors": len(named),
            "values": sum(p.numel() for _, p in named),
            "by_name": dict(sorted(by_name.items())),
        }
    return out


def describe(model: nn.Module, trainable_only: bool = True) -> str:
    """Two human lines, e.g.
    `weight decay:    83 tensors, 4,011,364 values (proxy_bias 49, proxy_weight 49, weight 83)`."""
    lines = []
    both = counts(model, trainable_only=trainable_only)
    for side, label in (("decay", "weight decay"), ("no_decay", "no weight decay")):
        c = both[side]
        names = ", ".join(f"{k} {v}" for k, v in c["by_name"].items()) or "none"
        lines.append(f"{label + ':':<16} {c['tensors']} tensors, {c['values']:,} values ({names})")
    return "\n".join(lines)
