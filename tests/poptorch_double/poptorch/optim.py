"""poptorch.optim double: the optimisers poptorch offers, with its extra arguments applied where they
change the numbers and recorded where they do not.

- loss_scaling: the program multiplies the loss by it before the backward pass (see the executor); the
  optimiser divides the gradients by it before the update, so a power of two changes nothing in fp32;
- RMSprop(use_tf_variant=True): TensorFlow's RMSprop (squared-gradient accumulator starting at 1, eps
  inside the square root, the learning rate applied inside the momentum buffer); otherwise torch's;
- accum_type, first/second_order_momentum_accum_type, velocity_accum_type: recorded in `accum_types`
  (default fp32 where poptorch defaults to fp32, the parameters' dtype for accum_type).
"""

from typing import Any, Dict

import torch

_EXTRA = ("loss_scaling", "accum_type", "first_order_momentum_accum_type", "second_order_momentum_accum_type",
          "velocity_accum_type", "use_tf_variant")
_ACCUM_KEYS = ("accum_type", "first_order_momentum_accum_type", "second_order_momentum_accum_type",
               "velocity_accum_type")


class _Recording:
    """As poptorch's optimisers: state_dict() carries the device-side state under "ipu_state" (here the
    torch state, flattened to "index/key" names) and "ipu_param", with torch's own "state" left empty;
    load_state_dict() refuses a state without them, as poptorch does."""

    poptorch_kwargs: Dict[str, Any]

    def _split(self, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        self.poptorch_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _EXTRA}
        for key, value in self.poptorch_kwargs.items():
            if key in _ACCUM_KEYS and value not in (torch.float16, torch.float32):
                raise ValueError(f"{key} must be torch.float16 or torch.float32, got {value!r}")
        return kwargs

    @property
    def accum_types(self) -> Dict[str, torch.dtype]:
        """The accumulator dtypes poptorch would use: those given, else its defaults."""
        return {key: self.poptorch_kwargs.get(key, torch.float32) for key in _ACCUM_KEYS}

    @property
    def loss_scaling(self) -> float:
        return float(self.poptorch_kwargs.get("loss_scaling", 1.0) or 1.0)

    def _unscale(self) -> None:
        scaling = self.loss_scaling
        if scaling != 1.0:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.div_(scaling)

    def state_dict(self) -> Dict[str, Any]:
        host = torch.optim.Optimizer.state_dict(self)
        ipu_state = {f"{index}/{key}": torch.as_tensor(value).clone() for index, entries in host["state"].items()
                     for key, value in entries.items() if torch.is_tensor(value) or isinstance(value, (int, float))}
        ipu_param = {f"lr/{i}": torch.tensor(float(g["lr"])) for i, g in enumerate(host["param_groups"])}
        return {"ipu_state": ipu_state, "ipu_param": ipu_param, "state": {}, "param_groups": host["param_groups"]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not ("ipu_state" in state and "ipu_param" in state):
            raise RuntimeError("Only IPU optimizer states can be loaded onto the IPU.")
        entries: Dict[int, Dict[str, Any]] = {}
        for name, value in state["ipu_state"].items():
            index, key = name.split("/", 1)
            entries.setdefault(int(index), {})[key] = value.clone()
        for entry in entries.values():
            if "step" in entry and entry["step"].dim() == 0 and not entry["step"].is_floating_point():
                entry["step"] = int(entry["step"])
        torch.optim.Optimizer.load_state_dict(self, {"state": entries, "param_groups": state["param_groups"]})


class RMSprop(_Recording, torch.optim.RMSprop):
    def __init__(self, params: Any, **kwargs: Any) -> None:
        torch.optim.RMSprop.__init__(self, params, **self._split(kwargs))
        self.tf_variant = bool(self.poptorch_kwargs.get("use_tf_variant", False))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        self._unscale()
        if not self.tf_variant:
            return torch.optim.RMSprop.step(self, closure)
        for group in self.param_groups:
            lr, alpha, eps, momentum, wd = (group["lr"], group["alpha"], group["eps"], group["momentum"],
                                            group["weight_decay"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["square_avg"] = torch.ones_like(p, dtype=torch.float32)
                    state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                g = p.grad.float()
                if wd:
                    g = g + wd * p.float()
                ms = state["square_avg"].mul_(alpha).add_((1.0 - alpha) * g * g)
                delta = g / torch.sqrt(ms + eps)
                if momentum:
                    delta = state["momentum_buffer"].mul_(momentum).add_(lr * delta)
                    p.sub_(delta.to(p.dtype))
                else:
                    p.sub_((lr * delta).to(p.dtype))
        return None


class SGD(_Recording, torch.optim.SGD):
    def __init__(self, params: Any, **kwargs: Any) -> None:
        torch.optim.SGD.__init__(self, params, **self._split(kwargs))

    def step(self, closure: Any = None) -> Any:
        with torch.no_grad():
            self._unscale()
        return torch.optim.SGD.step(self, closure)


class AdamW(_Recording, torch.optim.AdamW):
    def __init__(self, params: Any, **kwargs: Any) -> None:
        torch.optim.AdamW.__init__(self, params, **self._split(kwargs))

    def step(self, closure: Any = None) -> Any:
        with torch.no_grad():
            self._unscale()
        return torch.optim.AdamW.step(self, closure)
