"""The IPU backend's runner: training steps of a poptorch.trainingModel and validation through a
poptorch.inferenceModel over the same TrainingModel, with poptorch's device lifecycle (one program
attached at a time, both released at a phase's end). backends/ipu.py prepares it.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ipu_effnet.backends.ipu_layout import IpuLayout
from ipu_effnet.backends.runner import Runner
from ipu_effnet.training.evaluation import summarise


class IpuRunner(Runner):
    """Training steps of a poptorch.trainingModel and validation through a poptorch.inferenceModel over
    the same TrainingModel; the same `step` contract as TorchRunner.

    Device lifecycle (Graphcore's): both programs need the same IPUs, so exactly one is attached at a
    time. `step` detaches the inference program if it holds the IPUs, and the training program then
    re-attaches (uploading the host weights, which detaching it had brought back). `evaluate_loader`
    detaches the training program (its weights come to the host), runs the inference program (attaching
    uploads the host weights; an attached one gets `copyWeightsToDevice`) and detaches it again at the
    end. `release` destroys both programs at a phase's end, so the next phase gets the IPUs.

    The loop sets the learning rate on the host optimiser (`set_lr`); `step` pushes it to the device with
    `setOptimizer` only when it changed since the last push.
    """

    # A compiled program takes one input signature and keeps its graph (dropout rates, mixing inputs):
    # progressive resizing releases the runner at each stage change and prepares a new one.
    compiled_per_stage = True
    bn_recalibration_note = ("train.bn_recalibration_batches: not done on the ipu backend; the averaged model "
                             "keeps its averaged BatchNorm statistics (evaluate/finetune/sweep --averaged warn "
                             "that they are stale)")  # would need a third program: BN in train mode, no optimiser

    def __init__(self, executor: Any, ipu_optimizer: Any, optimizer: torch.optim.Optimizer,
                 training_model: nn.Module, layout: IpuLayout, poptorch: Any,
                 inference_options: Any = None, instance: int = 0, instances: int = 1,
                 cache_dir: Optional[str] = None) -> None:
        self.executor = executor
        self.ipu_optimizer = ipu_optimizer
        self.optimizer = optimizer
        self.training_model = training_model
        self.layout = layout
        self.poptorch = poptorch
        self.inference_options = inference_options
        self.instance = instance  # for data sharding: rank = instance, world_size = instances
        self.instances = instances
        self.cache_dir = cache_dir
        self._pushed_lrs = self._host_lrs()
        self._inference: Any = None
        self._pending_rng: Optional[List[int]] = None  # a device RNG state to set once compiled
        self._released = False

    @property
    def host_batch(self) -> int:
        return self.layout.host_batch

    @property
    def eval_batch(self) -> int:
        return self.layout.eval_host_batch

    def _host_lrs(self) -> List[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def sync_lr(self) -> bool:
        """Push the host optimiser's learning rates to the device if they changed; True if pushed."""
        lrs = self._host_lrs()
        if lrs == self._pushed_lrs:
            return False
        for group, lr in zip(self.ipu_optimizer.param_groups, lrs):
            group["lr"] = lr
        self.executor.setOptimizer(self.ipu_optimizer)
        self._pushed_lrs = lrs
        return True

    def mixing_inputs(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Host-drawn mixup coefficients (one per image) and cutmix boxes (one row per micro-batch)."""
        tm = self.training_model
        extras = []
        if tm.mixup_alpha > 0:
            extras.append(tm.sample_mixup(images.shape[0]))
        if tm.cutmix:
            height, width = images.shape[-2], images.shape[-1]
            extras.append(torch.stack([tm.sample_cutmix_box(height, width) for _ in range(self.layout.micro_batches)]))
        return extras

    def _check_batch(self, images: torch.Tensor, labels: torch.Tensor, expected: int) -> None:
        if images.shape[0] != expected or labels.shape[0] != expected:
            raise ValueError(f"the IPU program takes host batches of exactly {expected} images "
                             f"({self.layout.describe()}); got {images.shape[0]}")

    def _check_live(self) -> None:
        if self._released:
            raise RuntimeError("the IPU programs were released (release()); prepare a new runner")

    @staticmethod
    def _detach(program: Any) -> None:
        if program is not None and program.isAttachedToDevice():
            program.detachFromDevice()  # a training program copies its weights to the host first

    def _compile_training(self, inputs: Sequence[torch.Tensor]) -> None:
        """Compile the training program (attaching it, online) and give it the pending device RNG state."""
        if not self.executor.isCompiled():
            self.executor.compile(*inputs)
            if self._pending_rng is not None:
                self.executor.rng_state = list(self._pending_rng)
                self._pending_rng = None

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
        self._check_live()
        self._check_batch(images, labels, self.layout.host_batch)
        self._detach(self._inference)  # the training program re-attaches to the IPUs it frees
        self.sync_lr()
        self.training_model.train()  # evaluate() switches the shared model to eval mode
        inputs = (images, labels, *self.mixing_inputs(images))
        self._compile_training(inputs)
        loss, logits = self.executor(*inputs)
        n = int(labels.shape[0])
        correct = int((logits.detach().float().argmax(-1).reshape(-1) == labels.reshape(-1)).sum())
        return {"loss": float(loss.detach().float().mean()), "correct": correct, "samples": n}

    def _inference_program(self) -> Any:
        if self._inference is None:
            self._inference = self.poptorch.inferenceModel(self.training_model.eval(), self.inference_options)
        return self._inference

    def compile(self, images: torch.Tensor, labels: torch.Tensor,
                eval_images: Optional[torch.Tensor] = None, eval_labels: Optional[torch.Tensor] = None) -> None:
        """Compile (and with ipu.executable_cache, cache) the training program, and the inference program
        when given an evaluation batch, without running either (ipu.compile_only: an offline target)."""
        self._check_live()
        self._check_batch(images, labels, self.layout.host_batch)
        self.training_model.train()
        self._compile_training((images, labels, *self.mixing_inputs(images)))
        if eval_images is not None:
            self._check_batch(eval_images, eval_labels, self.layout.eval_host_batch)
            self._detach(self.executor)
            self.training_model.eval()
            self._inference_program().compile(eval_images, eval_labels)
            self._detach(self._inference)

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(per-micro-batch losses, logits) of a batch of eval_batch images, through poptorch.inferenceModel
        over the same TrainingModel, with the training program detached. Leaves the inference program
        attached (evaluate_loader detaches it at the end)."""
        self._check_live()
        self._check_batch(images, labels, self.layout.eval_host_batch)
        self._detach(self.executor)
        return self._inference_program()(images, labels)

    def evaluate_loader(self, loader: Any,
                        reduce: Optional[Callable[[Dict[str, float]], Dict[str, float]]] = None,
                        batches: Optional[int] = None) -> Dict[str, float]:
        """Top-1, top-5 (fractions), mean plain cross entropy and sample count over `loader`'s batches of
        at most eval_batch images (a short last batch is padded, and the padding not counted), like
        `training.evaluation.evaluate`. Picks up the host model's current weights (e.g. swapped-in averages).
        `reduce` sums the counts over poprun instances (each evaluates its own shard); `batches`: run at
        least this many calls, padding with uncounted batches, so that every instance makes as many
        calls as the one with the longest shard (the replicas of one program run in lockstep)."""
        self._check_live()
        self._detach(self.executor)  # the trained weights come to the host
        if self._inference is not None and self._inference.isAttachedToDevice():
            self._inference.copyWeightsToDevice()  # the host weights may have changed since the last call
        sums = {"correct1": 0.0, "correct5": 0.0, "loss": 0.0, "samples": 0.0}
        size = self.layout.eval_host_batch
        calls = 0
        filler: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        for images, labels in loader:
            n = int(labels.shape[0])
            if n > size:
                raise ValueError(f"evaluation batches must hold at most {size} images, got {n}")
            if n < size:  # pad by repeating the first image: the program takes exactly `size`
                pad = size - n
                images = torch.cat([images, images[:1].expand(pad, *images.shape[1:])])
                labels = torch.cat([labels, labels[:1].expand(pad)])
            filler = (images, labels)
            _, logits = self.evaluate(images, labels)
            calls += 1
            logits, labels = logits.float()[:n], labels[:n]
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top == labels[:, None]
            sums["correct1"] += float(hit[:, 0].sum())
            sums["correct5"] += float(hit.any(1).sum())
            sums["loss"] += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            sums["samples"] += n
        while batches is not None and calls < batches and filler is not None:
            self.evaluate(*filler)  # padding: run, not counted
            calls += 1
        self._detach(self._inference)  # the training program re-attaches at the next step
        return summarise(reduce(sums) if reduce is not None else sums)

    def optimizer_state(self) -> Dict[str, Any]:
        """The poptorch optimiser's state for a checkpoint: its state_dict, which after a step holds the
        device-side state (momentum, RMSprop accumulators) under "ipu_state" and "ipu_param"."""
        return self.ipu_optimizer.state_dict()

    def load_optimizer_state(self, state: Mapping[str, Any]) -> None:
        """Restore what `optimizer_state` returned (a resumed run); poptorch uploads it with the next call."""
        from ipu_effnet.training.checkpoint import CheckpointError

        if "ipu_state" not in state or "ipu_param" not in state:
            raise CheckpointError("the checkpoint's IPU optimiser state has no 'ipu_state' / 'ipu_param': "
                                  "it was not written by the IPU backend")
        self.ipu_optimizer.load_state_dict(dict(state))  # the object the executor holds: no setOptimizer
        self._pushed_lrs = [float(g["lr"]) for g in self.ipu_optimizer.param_groups]  # what the device gets

    def device_rng_state(self) -> Optional[List[int]]:
        """The training program's RNG seed and state (dropout, stochastic depth and stochastic rounding
        on the device), or the state waiting to be set; None before the first compilation."""
        if self.executor.isCompiled():
            return [int(v) for v in self.executor.rng_state]
        return list(self._pending_rng) if self._pending_rng is not None else None

    def set_device_rng_state(self, state: Optional[Sequence[int]]) -> None:
        """Restore `device_rng_state()` (a resumed run): now if compiled, else right after compiling."""
        if state is None:
            return
        if self.executor.isCompiled():
            self.executor.rng_state = [int(v) for v in state]
        else:
            self._pending_rng = [int(v) for v in state]

    def checkpoint_extra(self) -> Dict[str, Any]:
        """What a checkpoint needs besides the host model: the device optimiser state and the device RNG."""
        return {"ipu_optimizer": self.optimizer_state(), "ipu_rng": self.device_rng_state()}

    def restore_extra(self, extra: Mapping[str, Any]) -> None:
        if extra.get("ipu_optimizer") is not None:
            self.load_optimizer_state(extra["ipu_optimizer"])
        self.set_device_rng_state(extra.get("ipu_rng"))

    def sync_weights_to_host(self) -> None:
        """Bring the trained weights back into the host model (before averaging or a checkpoint)."""
        if self.executor.isAttachedToDevice():
            self.executor.copyWeightsToHost()

    def detach(self) -> None:
        for program in (self.executor, self._inference):
            self._detach(program)

    def release(self) -> None:
        """Destroy both programs (weights and optimiser state come to the host first): the IPUs are free
        for the next phase or stage, and the model's tensors are plain again. Idempotent."""
        if self._released:
            return
        if self._inference is not None:
            self._inference.destroy()
        if self.executor.isCompiled():
            self._pending_rng = self.device_rng_state()
        self.executor.destroy()
        self._released = True


def create_data_loader(options: Any, dataset: Any, micro_batch: int, train: bool, workers: int,
                       poptorch: Any) -> Any:
    """poptorch.DataLoader over `dataset`: host batches of micro-batch x the options' combined factor,
    sharded per poprun instance by poptorch, asynchronous and rebatched when there are workers."""
    mode = poptorch.DataLoaderMode.AsyncRebatched if workers > 0 else poptorch.DataLoaderMode.Sync
    return poptorch.DataLoader(options, dataset, batch_size=micro_batch, shuffle=train, drop_last=train,
                               num_workers=workers, persistent_workers=workers > 0, mode=mode)
