"""poptorch.optim double: torch's optimisers that accept (and record) poptorch's extra arguments."""

from typing import Any, Dict

import torch

_EXTRA = ("loss_scaling", "accum_type", "first_order_momentum_accum_type", "second_order_momentum_accum_type",
          "velocity_accum_type", "use_tf_variant")


class _Recording:
    poptorch_kwargs: Dict[str, Any]

    def _split(self, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        self.poptorch_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _EXTRA}
        return kwargs


class RMSprop(_Recording, torch.optim.RMSprop):
    def __init__(self, params: Any, **kwargs: Any) -> None:
        torch.optim.RMSprop.__init__(self, params, **self._split(kwargs))


class SGD(_Recording, torch.optim.SGD):
    def __init__(self, params: Any, **kwargs: Any) -> None:
        torch.optim.SGD.__init__(self, params, **self._split(kwargs))


class AdamW(_Recording, torch.optim.AdamW):
    def __init__(self, params: Any, **kwargs: Any) -> None:
        torch.optim.AdamW.__init__(self, params, **self._split(kwargs))
