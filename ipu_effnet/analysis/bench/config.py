"""What one configuration of `bench` runs: `BenchConfig`, its checks (`validate`, no torch import), the
`--vs KEY=VALUE` syntax (`with_overrides`) and the short label the report names it by."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields, replace
from typing import Any, Dict, Optional, Tuple

from ipu_effnet.errors import UsageError

MODES = ("train", "infer", "data")
DEVICES = ("cpu", "cuda", "ipu")
PRECISIONS = ("fp32", "bf16", "fp16")
IMPLS = ("ours", "geffnet")  # geffnet: the benchmark-only peer (requirements-bench.txt)
GEFFNET_INSTALL = "pip install --no-deps geffnet==1.0.2"  # --no-deps: geffnet declares torchvision

# Fields shown in a configuration's label even at their default value; the rest only when changed.
_ALWAYS_SHOWN = ("norm", "batch", "threads", "channels_last")
_NEVER_SHOWN = ("model", "res", "steps", "warmup", "num_classes", "mode")
_DATA_FIELDS = ("data_path", "preprocess", "workers", "draft", "decoder", "resampler", "data_images", "jpeg_size")
PREPROCESSING = ("train", "eval")  # data mode: TrainTransform (random-resized crop + flip) or EvalTransform
_MODEL_FIELDS = ("norm", "group_size", "expand_ratio", "channels_last", "precision", "impl", "fold_bn",
                 "compile", "proxy_impl", "threads")


@dataclass(frozen=True)
class BenchConfig:
    """One configuration to measure. res=None means the model's native training resolution;
    threads=None leaves torch's thread count as it is.

    mode "data" times the training data loader instead of the model: RandomResizedCrop to `res`, flip,
    uint8 batches of `batch`, from `data_path` (an ImageNet-style folder with train/<class>/<image>) or,
    without it, from `data_images` generated JPEGs of `jpeg_size` ("WIDTHxHEIGHT") in a temporary folder;
    `draft=False` decodes every JPEG at full size before resizing (the comparison for reduced-scale decoding);
    `decoder` and `resampler` are `data.jpeg_decoder` and `data.resampler` (data/decode.py): "pillow" for
    both, with draft=False, is the plain decode-everything-then-resize baseline. `preprocess="eval"` times
    the evaluation preprocessing instead (resize to res / 0.875, centre crop; always the Pillow resampler).
    """

    model: str = "efficientnet_b0_g16"
    norm: str = "layer"
    group_size: Optional[int] = None
    expand_ratio: Optional[float] = None
    res: Optional[int] = None
    batch: int = 16
    steps: int = 5
    warmup: int = 2
    threads: Optional[int] = None
    channels_last: bool = False
    mode: str = "train"
    num_classes: int = 1000
    proxy_impl: Optional[str] = None  # Proxy Norm implementation (norms/proxy_ops.py); None: the default
    device: str = "cpu"
    precision: str = "fp32"  # bf16 / fp16: autocast (fp16 on CUDA only, with loss scaling in training); weights stay fp32
    impl: str = "ours"
    fold_bn: bool = True  # inference: BatchNorm folded, Proxy Norm's statistics frozen (models/fold.py)
    compile: bool = False  # torch.compile the model (torch >= 2.0)
    data_path: Optional[str] = None
    preprocess: str = "train"
    workers: int = 0
    draft: bool = True
    decoder: str = "auto"
    resampler: str = "auto"
    data_images: int = 64
    jpeg_size: str = "500x375"

    def validate(self) -> BenchConfig:
        """Cheap checks (no torch import); raises UsageError naming the option."""
        from ipu_effnet.config import JPEG_DECODERS, RESAMPLERS
        from norms import as_norm_spec

        for key, valid in (("mode", MODES), ("device", DEVICES), ("precision", PRECISIONS), ("impl", IMPLS),
                           ("decoder", JPEG_DECODERS), ("resampler", RESAMPLERS), ("preprocess", PREPROCESSING)):
            if getattr(self, key) not in valid:
                raise UsageError(f"{key} {getattr(self, key)!r}: expected one of {', '.join(valid)}")
        try:
            as_norm_spec(self.norm)
        except ValueError as exc:
            raise UsageError(f"norm {self.norm!r}: {exc}") from None
        for key in ("batch", "steps", "num_classes", "data_images"):
            if getattr(self, key) < 1:
                raise UsageError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("warmup", "workers"):
            if getattr(self, key) < 0:
                raise UsageError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"threads must be >= 1, got {self.threads}")
        if self.proxy_impl is not None:
            from norms.proxy_ops import IMPLS as PROXY_IMPLS

            if self.proxy_impl not in PROXY_IMPLS:
                raise UsageError(f"proxy_impl {self.proxy_impl!r}: expected one of {', '.join(PROXY_IMPLS)}")
        if self.res is not None and self.res < 32:
            raise UsageError(f"res {self.res}: the resolution must be at least 32 (five stride-2 stages)")
        if self.precision == "fp16" and self.device == "cpu":
            raise UsageError("precision fp16: autocast to float16 needs device cuda (on CPU use bf16)")
        self.jpeg_dims()
        if self.impl == "geffnet":
            if self.norm != "batch" or self.group_size not in (None, 1) or self.expand_ratio is not None \
                    or self.proxy_impl is not None:
                raise UsageError("impl geffnet: geffnet builds only the published models (norm batch, no "
                                 "group_size, expand_ratio or proxy_impl)")
            if not (self.model.startswith("efficientnet_b") and self.model[len("efficientnet_b"):].isdigit()):
                raise UsageError(f"impl geffnet: model {self.model!r} has no geffnet counterpart; "
                                 "expected efficientnet_b0 ... efficientnet_b7")
        return self

    def jpeg_dims(self) -> Tuple[int, int]:
        width, sep, height = self.jpeg_size.lower().partition("x")
        if not (sep and width.isdigit() and height.isdigit() and int(width) >= 8 and int(height) >= 8):
            raise UsageError(f"jpeg_size {self.jpeg_size!r}: expected WIDTHxHEIGHT, e.g. 500x375")
        return int(width), int(height)

    def with_overrides(self, text: str) -> BenchConfig:
        """A copy with `KEY=VALUE KEY=VALUE ...` applied (the `--vs` syntax; `-` and `_` both work in keys)."""
        changes: Dict[str, Any] = {}
        for item in text.split():
            key, sep, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or not key:
                raise UsageError(f"--vs item {item!r}: expected KEY=VALUE")
            changes[key] = _parse_field(key, value)
        if not changes:
            raise UsageError("--vs needs at least one KEY=VALUE")
        return replace(self, **changes).validate()

    def label(self, reference: Optional[BenchConfig] = None) -> str:
        """Short text naming the options; with `reference`, only those that differ from it."""
        defaults = BenchConfig()
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if reference is not None:
                if getattr(reference, f.name) != value:
                    parts.append(f"{f.name}={value}")
            elif f.name == "model":
                if self.mode != "data":
                    parts.append(value)
            elif not self._shown(f.name):
                continue
            elif f.name == "channels_last":
                parts.append("channels-last" if value else "nchw")
            elif value is not None and (f.name in _ALWAYS_SHOWN or value != getattr(defaults, f.name)):
                parts.append(f"{f.name}={value}")
        return " ".join(parts) or "(no difference)"

    def _shown(self, name: str) -> bool:
        """Whether a field belongs in this mode's label (data fields in the data mode, model fields otherwise)."""
        if name in _NEVER_SHOWN:
            return False
        if self.mode == "data":
            return name in _DATA_FIELDS or name not in _MODEL_FIELDS
        return name not in _DATA_FIELDS


def _parse_field(key: str, value: str) -> Any:
    types = {f.name: f.type for f in fields(BenchConfig)}
    if key not in types:
        close = difflib.get_close_matches(key, list(types), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(types)}"
        raise UsageError(f"--vs key {key!r} is not a bench option{hint}")
    kind = str(types[key])  # annotations are strings under `from __future__ import annotations`
    try:
        if value.lower() in ("none", "") and kind.startswith("Optional"):
            return None
        if "bool" in kind:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if "int" in kind:
            return int(value)
        if "float" in kind:
            return float(value)
        return value
    except ValueError:
        raise UsageError(f"--vs {key}={value!r}: expected {kind}") from None
