"""What the training loop asks of every backend: one `Runner` interface.

    out = runner.step(images, labels)          # forward + backward + optimiser step on one host batch:
                                               # {"loss", "correct", "samples"} (+ "skipped", "scale")
    val = runner.evaluate_loader(loader, reduce=..., batches=...)   # {"top1", "top5", "loss", "samples"}
    runner.sync_weights_to_host()              # the host model holds the trained weights
    extra = runner.checkpoint_extra()          # what a checkpoint needs beyond the host model and optimiser
    runner.restore_extra(extra)                # ... put back into a new runner (a resumed run, a new stage)
    runner.release()                           # the device is free for the next phase; idempotent

and a few facts the loop acts on without naming the backend:

    compiled_per_stage      a compiled program keeps its input shapes and graph: a new stage of
                            progressive resizing needs a new runner (the old state carried over)
    compile_only            compile the programs and stop (ipu.compile_only)
    tolerates_bad_steps     a non-finite step is absorbed by loss scaling (fp16 with a GradScaler)
    static_loss_scale       the configured loss scale to log when the step reports none
    bn_recalibration_note   None when BatchNorm statistics of the weight averages can be recomputed on
                            the host; otherwise why not (said once)

The base class gives the host-side answers: weights already on the host, nothing extra to checkpoint,
nothing to release. `TorchRunner`, `PipelineRunner` and `IpuRunner` override what differs.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

Reduce = Callable[[Dict[str, float]], Dict[str, float]]


class Runner:
    """The base of every backend's runner (see the module docstring)."""

    compiled_per_stage = False
    compile_only = False
    static_loss_scale: Optional[float] = None
    bn_recalibration_note: Optional[str] = None

    @property
    def tolerates_bad_steps(self) -> bool:
        return getattr(self, "scaler", None) is not None

    def step(self, images: Any, labels: Any) -> Dict[str, Any]:  # pragma: no cover - every runner has one
        raise NotImplementedError

    def evaluate_loader(self, loader: Any, reduce: Optional[Reduce] = None,
                        batches: Optional[int] = None) -> Dict[str, float]:  # pragma: no cover
        raise NotImplementedError

    def sync_weights_to_host(self) -> None:
        return None

    def checkpoint_extra(self) -> Dict[str, Any]:
        return {}

    def restore_extra(self, extra: Mapping[str, Any]) -> None:
        return None

    def release(self) -> None:
        return None
