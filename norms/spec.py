"""The normalisation choice, made once per model and passed down to every block.

A `NormSpec` is a small frozen value: blocks never decide which normalisation to use, they call
`make_norm_act(spec, channels, act=...)` and get one module that normalises, applies the affine and the
activation (and, for Proxy Norm, the proxy renormalisation after the activation).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, fields, replace
from typing import Union

NORM_KINDS = ("batch", "group", "layer", "none")
BATCH_INDEPENDENT_KINDS = ("group", "layer", "none")


@dataclass(frozen=True)
class NormSpec:
    """Which normalisation a model uses, with its hyper-parameters.

    kind:         batch | group | layer (GroupNorm with one group) | none
    groups:       number of groups for kind="group" (Graphcore's configs use 4)
    eps:          epsilon of the normaliser (1e-3 as the EfficientNet reference)
    momentum:     BatchNorm running-statistics momentum, PyTorch convention (0.01 = TF's 0.99)
    proxy:        add Proxy Norm after the activation (group and layer only)
    proxy_eps:    epsilon of the proxy renormalisation (0.03 in the paper)
    proxy_points: number of fixed standard-normal quantiles the proxy statistics use (200)
    """

    # Each field's checks live in its metadata, in the vocabulary `ipu_effnet.config` reads for every
    # config field (choices, ge, gt, le, lt): the config's `norm` section is this class.
    kind: str = field(default="batch", metadata={"choices": NORM_KINDS})
    groups: int = field(default=4, metadata={"ge": 1})
    eps: float = field(default=1e-3, metadata={"gt": 0})
    momentum: float = field(default=0.01, metadata={"ge": 0, "le": 1})
    proxy: bool = False
    proxy_eps: float = field(default=0.03, metadata={"gt": 0})
    proxy_points: int = field(default=200, metadata={"ge": 2})

    def __post_init__(self) -> None:
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if "choices" in meta and value not in meta["choices"]:
                raise ValueError(f"norm {f.name} {value!r} is not one of {', '.join(meta['choices'])}")
            for key, ok, word in (("ge", operator.ge, ">="), ("gt", operator.gt, ">"), ("le", operator.le, "<="),
                                  ("lt", operator.lt, "<")):
                if key in meta and not ok(value, meta[key]):
                    raise ValueError(f"norm {f.name} must be {word} {meta[key]}, got {value}")
        if self.proxy and self.kind not in ("group", "layer"):
            raise ValueError(f"Proxy Norm needs kind 'group' or 'layer', got kind {self.kind!r}")

    @property
    def batch_independent(self) -> bool:
        """True when a sample's output never depends on the other samples of its batch."""
        return self.kind in BATCH_INDEPENDENT_KINDS

    @property
    def num_groups(self) -> int:
        """GroupNorm's group count for this kind: 1 for layer (LayerNorm is GroupNorm with one group)."""
        return 1 if self.kind == "layer" else self.groups

    @property
    def label(self) -> str:
        """The short name runs and tables use: the kind, with "+proxy" for Proxy Norm ("layer+proxy");
        `as_norm_spec` reads it back."""
        return self.kind + ("+proxy" if self.proxy else "")

    def with_(self, **changes) -> NormSpec:
        return replace(self, **changes)


def check_group_count(num_channels: int, num_groups: int) -> None:
    """GroupNorm (and Proxy Norm over it) splits the channels into equal groups: refuse a count that
    does not divide them, naming both."""
    if num_channels % num_groups:
        raise ValueError(f"GroupNorm with {num_groups} groups needs a channel count divisible by {num_groups}; "
                         f"got {num_channels} channels")


def as_norm_spec(norm: Union[NormSpec, str, None]) -> NormSpec:
    """Accept a NormSpec, a kind string ("batch", "group", "layer", "none"; "layer+proxy" and
    "group+proxy" for Proxy Norm), or None (BatchNorm)."""
    if norm is None:
        return NormSpec()
    if isinstance(norm, NormSpec):
        return norm
    if isinstance(norm, str):
        kind, _, suffix = norm.partition("+")
        if suffix not in ("", "proxy", "pn"):
            raise ValueError(f"norm {norm!r}: expected KIND or KIND+proxy with KIND in {', '.join(NORM_KINDS)}")
        return NormSpec(kind=kind, proxy=bool(suffix))
    raise TypeError(f"norm must be a NormSpec or a kind string, got {type(norm).__name__}")
