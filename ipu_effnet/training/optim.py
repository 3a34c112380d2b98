"""Optimisers: RMSprop in TensorFlow's variant, SGD and AdamW, with weight decay by parameter group.

Graphcore's EfficientNet recipe (docs/reference.md section 6) trains with TensorFlow's RMSprop, which differs
from `torch.optim.RMSprop` in three ways that matter at lr 0.05 over 350 epochs:

- eps (1e-3) sits *inside* the square root: g / sqrt(ms + eps), not g / (sqrt(ms) + eps);
- the squared-gradient accumulator starts at 1, not 0 (no huge first steps);
- the learning rate is applied inside the momentum buffer, so a change of lr affects only new steps:

      ms  = alpha * ms + (1 - alpha) * g^2          alpha ("decay") 0.953125 in Graphcore's configs
      mom = momentum * mom + lr * g / sqrt(ms + eps)
      p   = p - mom

Weight decay is L2 on the gradient (g + wd * p) for rmsprop_tf and sgd, decoupled for adamw (torch's
AdamW: p *= 1 - lr * wd). Which parameters decay is decided by `param_groups` (2+ dimensional weights and
what modules declare; not biases or norm scales), so it is the same rule for every optimiser.

On the IPU, `RMSpropTF`'s hyperparameters map onto `poptorch.optim.RMSprop(..., use_tf_variant=True)`;
the IPU backend reads them from `param_groups`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Tuple

import torch
import torch.nn as nn

from ipu_effnet.training.param_groups import param_groups

__all__ = ["OPTIMIZER_NAMES", "RMSpropTF", "create_optimizer", "optimizer_from_config", "set_lr"]

OPTIMIZER_NAMES = ("rmsprop_tf", "sgd", "adamw")  # the same names as config.OPTIMIZERS

RMSPROP_TF_ALPHA = 0.953125  # Graphcore's rmsprop_decay
RMSPROP_TF_EPS = 1e-3
ADAMW_EPS = 1e-8


class RMSpropTF(torch.optim.Optimizer):
    """TensorFlow's RMSprop (see the module docstring for the update).

    State per parameter: `square_avg` (initialised to 1) and `momentum_buffer`, kept in fp32 when the
    parameter is fp16/bf16 (Graphcore's "fp32 optimiser state").
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.01, alpha: float = RMSPROP_TF_ALPHA,
                 eps: float = RMSPROP_TF_EPS, momentum: float = 0.9, weight_decay: float = 0.0) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0 <= alpha < 1:
            raise ValueError(f"alpha (decay) must be in [0, 1), got {alpha}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = {"lr": lr, "alpha": alpha, "eps": eps, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating state to each parameter's dtype on load; fp16/bf16 parameters keep their
        # state in fp32, so put the stored values back without the round trip through half precision
        saved = state_dict["state"]
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for index, p in zip(saved_group["params"], group["params"]):
                if index not in saved or p.dtype not in (torch.float16, torch.bfloat16):
                    continue
                for key in ("square_avg", "momentum_buffer"):
                    if key in saved[index]:
                        self.state[p][key] = saved[index][key].to(device=p.device, dtype=torch.float32,
                                                                  copy=True)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, alpha, eps = group["lr"], group["alpha"], group["eps"]
            momentum, weight_decay = group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("RMSpropTF does not support sparse gradients")
                state_dtype = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["square_avg"] = torch.ones_like(p, dtype=state_dtype, memory_format=torch.preserve_format)
                    if momentum > 0:
                        state["momentum_buffer"] = torch.zeros_like(
                            p, dtype=state_dtype, memory_format=torch.preserve_format)
                state["step"] += 1
                grad = p.grad.to(state_dtype)
                if weight_decay != 0:
                    grad = grad.add(p.to(state_dtype), alpha=weight_decay)
                square_avg = state["square_avg"]
                square_avg.mul_(alpha).addcmul_(grad, grad, value=1.0 - alpha)
                update = grad / square_avg.add(eps).sqrt_()
                if momentum > 0:
                    buf = state["momentum_buffer"]
                    buf.mul_(momentum).add_(update, alpha=lr)
                    p.sub_(buf.to(p.dtype))
                else:
                    p.sub_((update * lr).to(p.dtype))
        return loss


def create_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                     *, nesterov: bool = False, eps: Optional[float] = None, alpha: float = RMSPROP_TF_ALPHA,
                     betas: Tuple[float, float] = (0.9, 0.999),
                     trainable_only: bool = True) -> torch.optim.Optimizer:
    """An optimiser over `model`'s parameters in two groups (decayed first, then not decayed).

    name:      rmsprop_tf | sgd | adamw
    eps:       None: 1e-3 for rmsprop_tf (inside the square root), 1e-8 for adamw; unused by sgd
    momentum:  rmsprop_tf and sgd (0 for plain SGD, as in the fine-tuning recipe); unused by adamw
    nesterov:  sgd only (needs momentum > 0)
    frozen parameters (requires_grad=False) are left out with `trainable_only`.
    """
    groups = param_groups(model, weight_decay, trainable_only=trainable_only)
    groups = [g for g in groups if g["params"]]  # torch accepts empty groups, poptorch does not
    if not groups:
        raise ValueError("the model has no trainable parameters to optimise")
    if name == "rmsprop_tf":
        return RMSpropTF(groups, lr=lr, alpha=alpha, eps=RMSPROP_TF_EPS if eps is None else eps,
                         momentum=momentum)
    if name == "sgd":
        if nesterov and momentum <= 0:
            raise ValueError(f"nesterov SGD needs momentum > 0, got momentum = {momentum}")
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=ADAMW_EPS if eps is None else eps)
    raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZER_NAMES)}")


def optimizer_from_config(model: nn.Module, train: Any, lr: Optional[float] = None) -> torch.optim.Optimizer:
    """From a `config.TrainConfig` (optimizer, lr, weight_decay, momentum). `lr`: the initial learning
    rate to set (the schedule sets it again every step), default `train.lr`."""
    return create_optimizer(model, train.optimizer, train.lr if lr is None else lr,
                            weight_decay=train.weight_decay, momentum=train.momentum)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group (the schedule's value for this step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
