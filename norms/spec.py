"""The normalisation choice, made once per model and passed down to every block.

A `NormSpec` is a small frozen value: blocks never decide which normalisation to use, they call
`make_norm_act(spec, channels, act=...)` and get one module that normalises, applies the affine and the
activation (and, for Proxy Norm, the proxy renormalisation after the activation).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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

    kind: str = "batch"
    groups: int = 4
    eps: float = 1e-3
    momentum: float = 0.01
    proxy: bool = False
    proxy_eps: float = 0.03
    proxy_points: int = 200

    def __post_init__(self) -> None:
        if self.kind not in NORM_KINDS:
            raise ValueError(f"norm kind {self.kind!r} is not one of {', '.join(NORM_KINDS)}")
        if self.groups < 1:
            raise ValueError(f"norm groups must be >= 1, got {self.groups}")
        if not self.eps > 0:
            raise ValueError(f"norm eps must be > 0, got {self.eps}")
        if not 0 <= self.momentum <= 1:
            raise ValueError(f"norm momentum must be in [0, 1], got {self.momentum}")
        if self.proxy and self.kind not in ("group", "layer"):
            raise ValueError(f"Proxy Norm needs kind 'group' or 'layer', got kind {self.kind!r}")
        if not self.proxy_eps > 0:
            raise ValueError(f"norm proxy_eps must be > 0, got {self.proxy_eps}")
        if self.proxy_points < 2:
            raise ValueError(f"norm proxy_points must be >= 2, got {self.proxy_points}")

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
