"""Inference from a run: the network a checkpoint holds, ready to deploy or to answer for a few images.

    model, ckpt, cfg, path = load_inference_model("runs/quickstart/runs/g16-bn-native")
    images, names = load_images(["cat.jpg", "photos/"], resolution=224)   # uint8 N x 3 x R x R
    probs = model(images).softmax(1)

`InferenceModel` is the inference copy of the network (`models/fold.inference_copy`: BatchNorm folded
into the convolutions, Proxy Norm's statistics frozen) behind the normalisation that training applies
on the device (`training/model.py`): it takes uint8 RGB images, N x 3 x R x R with values 0..255, the
project's host/device boundary, and returns the logits. `export` writes this module as ONNX or
TorchScript; `predict` runs it. Images are prepared as the validation images are: shorter side resized
to R / 0.875, then the centre R x R crop (`data.transforms.EvalTransform`).

Class names come from the checkpoint (`extra.classes`: the training data's class folder names, or the
digits) and are `class <i>` where it has none (generated data, older checkpoints).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ipu_effnet.errors import UsageError

__all__ = ["InferenceModel", "class_names", "find_images", "load_images", "load_inference_model"]


class InferenceModel(nn.Module):
    """uint8 images in, logits out: (x / 255 - mean) / std, then the inference copy of the network."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        from ipu_effnet.models.fold import inference_copy
        from ipu_effnet.training.model import IMAGENET_MEAN, IMAGENET_STD

        self.network = inference_copy(network)
        self.register_buffer("scale", (1.0 / (255.0 * torch.tensor(IMAGENET_STD))).view(1, 3, 1, 1))
        self.register_buffer("shift", (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1))
        self.num_classes = int(getattr(network, "num_classes", 0))
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.scale.dtype) * self.scale + self.shift
        return self.network(x)


def load_inference_model(checkpoint: str, averaged: bool = False, overrides: Sequence[str] = ()
                         ) -> Tuple[InferenceModel, Dict[str, Any], Any, Path]:
    """(InferenceModel, checkpoint dict, config, checkpoint path) for a run directory or checkpoint file."""
    from ipu_effnet.run.run_dirs import load_run_checkpoint
    from ipu_effnet.training.checkpoint import rebuild_model

    path, ckpt, cfg = load_run_checkpoint(checkpoint, overrides)
    network = rebuild_model(ckpt, averager="epoch" if averaged else None)
    return InferenceModel(network), ckpt, cfg, path


def class_names(ckpt: Dict[str, Any], num_classes: int) -> List[str]:
    stored = (ckpt.get("extra") or {}).get("classes")
    if stored and len(stored) == num_classes:
        return [str(c) for c in stored]
    return [f"class {i}" for i in range(num_classes)]


def find_images(paths: Sequence[os.PathLike]) -> List[Path]:
    """Image files named, and those under the folders named (recursively, sorted), in the given order."""
    from ipu_effnet.data import image_extensions

    exts = tuple(e.lower() for e in image_extensions())
    found: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in exts))
        elif p.is_file():
            found.append(p)
        else:
            raise UsageError(f"{p}: no such file or folder")
    if not found:
        raise UsageError(f"no images in {', '.join(map(str, paths))} (extensions: {', '.join(exts)})")
    return found


def load_images(paths: Sequence[os.PathLike], resolution: int,
                limit: Optional[int] = None) -> Tuple[torch.Tensor, List[Path]]:
    """uint8 N x 3 x R x R of the images found in `paths`, prepared as validation images are."""
    from PIL import Image, UnidentifiedImageError

    from ipu_effnet.data.datasets import prepare_mode
    from ipu_effnet.data.transforms import EvalTransform

    files = find_images(paths)[:limit]
    transform = EvalTransform(resolution, decoder="pillow")
    out = []
    for f in files:
        try:
            with Image.open(f) as img:
                out.append(transform(prepare_mode(img).convert("RGB")))
        except (UnidentifiedImageError, OSError) as exc:
            raise UsageError(f"{f}: not an image Pillow can read ({exc})") from None
    return torch.stack(out), files
