"""poptorch.optim double: torch's optimisers that accept (and record) poptorch's extra arguments."""

from typing import Any, Dict

import torch

_EXTRA = ("loss_scaling", "accum_type", "first_order_momentum_accum_type", "second_order_momentum_accum_type",
          "velocity_accum_type", "use_tf_variant")


class _Recording:
    """As poptorch's optimisers: state_dict() carries the device-side state under "ipu_state" (here the
    torch state, flattened to "index/key" names) and "ipu_param", with torch's own "state" left empty;
    load_state_dict() refuses a state without them, as poptorch does."""

    poptorch_kwargs: Dict[str, Any]

    def _split(self, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        self.poptorch_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _EXTRA}
        return kwargs

    def state_dict(self) -> Dict[str, Any]:
        host = torch.optim.Optimizer.state_dict(self)
        ipu_state = {f"{index}/{key}": value.clone() for index, entries in host["state"].items()
                     for key, value in entries.items() if torch.is_tensor(value)}
        ipu_param = {f"lr/{i}": torch.tensor(float(g["lr"])) for i, g in enumerate(host["param_groups"])}
        return {"ipu_state": ipu_state, "ipu_param": ipu_param, "state": {}, "param_groups": host["param_groups"]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not ("ipu_state" in state and "ipu_param" in state):
            raise RuntimeError("Only IPU optimizer states can be loaded onto the IPU.")
        entries: Dict[int, Dict[str, Any]] = {}
        for name, value in state["ipu_state"].items():
            index, key = name.split("/", 1)
            entries.setdefault(int(index), {})[key] = value.clone()
        torch.optim.Optimizer.load_state_dict(self, {"state": entries, "param_groups": state["param_groups"]})


class RMSprop(_Recording, torch.optim.RMSprop):
    def __init__(self, params: Any, **kwargs: Any) -> None:
        torch.optim.RMSprop.__init__(self, params, **self._split(kwargs))


class SGD(_Recording, torch.optim.SGD):
    def __init__(self, params: Any, **kwargs: Any) -> None:
        torch.optim.SGD.__init__(self, params, **self._split(kwargs))


class AdamW(_Recording, torch.optim.AdamW):
    def __init__(self, params: Any, **kwargs: Any) -> None:
        torch.optim.AdamW.__init__(self, params, **self._split(kwargs))
