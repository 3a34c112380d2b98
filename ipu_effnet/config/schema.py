"""The config tree: one dataclass per section, `option` (a field's default and checks), `ConfigError`,
the allowed strings of each choice, and what the tree turns into (`model_kwargs`). The `norm` section is
`norms.NormSpec` itself.

Adding a field is one line in its section: `name: Type = option(default, choices=..., ge=...)`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ipu_effnet.errors import UsageError
from norms.spec import NormSpec  # the `norm` section; torch-free, like the rest of the tree

# Allowed strings, one tuple per choice so that other modules can dispatch on the same names.
DATASETS = ("imagenet", "generated", "digits")
OPTIMIZERS = ("rmsprop_tf", "sgd", "adamw")
LR_SCHEDULES = ("exponential", "cosine", "constant")
PRECISIONS = ("32.32", "16.32", "16.16", "bf16")  # weights.partials, Graphcore's convention
RECIPES = ("native", "halfres", "progressive")
BACKENDS = ("auto", "torch", "ipu", "pipeline")
DIST_BACKENDS = ("auto", "gloo", "nccl")
HOST_COLLECTIVES = ("auto", "horovod", "gloo")  # backends/host_collectives.py
PIPELINE_SCHEDULES = ("1f1b", "gpipe")  # backend pipeline: torch.distributed.pipelining schedules
JPEG_DECODERS = ("auto", "pillow", "simplejpeg")  # data/decode.py
RESAMPLERS = ("auto", "pillow", "torch")  # data/decode.py: the training crop's resize
PADDINGS = ("symmetric", "same")  # models/padding.py
INIT_FORMATS = ("auto", "ipu_effnet", "timm", "geffnet", "tf_efficientnet", "torchvision",
                "efficientnet_pytorch")  # models/importer.py


class ConfigError(UsageError):
    """A bad config: one line naming the file (or --set), the dotted key, the value and what is valid."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).splitlines()))


def option(default: Any, *, choices: Optional[Sequence[str]] = None, ge: Optional[float] = None,
           gt: Optional[float] = None, le: Optional[float] = None, lt: Optional[float] = None,
           module_path: bool = False) -> Any:
    """A config field: its default and the checks the validator applies to it (to each element of a list).

    choices: the allowed strings; ge/gt/le/lt: bounds on a number; module_path: a dotted module path of
    the model as built ('stem', 'blocks.3.0', 'blocks.3.0.conv_pw', 'head').
    """
    checks = {"choices": tuple(choices) if choices is not None else None, "ge": ge, "gt": gt, "le": le,
              "lt": lt, "module_path": module_path or None}
    metadata = {k: v for k, v in checks.items() if v is not None}
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
    return field(default=default, metadata=metadata)


# ----------------------------------------------------------------------------------------------------
# The tree. A field's comment says what it means; None usually means "the model's own default".


@dataclass
class ModelConfig:
    name: str = "efficientnet_b0"  # checked against ipu_effnet.models.list_models()
    num_classes: int = option(1000, ge=1)
    in_chans: int = option(3, ge=1)
    group_size: Optional[int] = option(None, ge=1)  # channels per depthwise group; None: the variant's
    expand_ratio: Optional[float] = option(None, gt=0)  # None: the variant's (6, or 4 for G16)
    act: str = "silu"  # checked against norms.ACT_NAMES
    drop_rate: Optional[float] = option(None, ge=0, lt=1)  # dropout before the classifier; None: variant's
    drop_path_rate: float = option(0.2, ge=0, lt=1)  # stochastic depth at the last block
    resolution: Optional[int] = option(None, ge=8)  # training resolution; None: the model's native one
    fit_group_size: bool = False  # True: use gcd(group_size, channels) where it does not divide; False: variant's default
    padding: str = option("symmetric", choices=PADDINGS)  # strided convolutions: symmetric k // 2, or TensorFlow's SAME
    init_from: Optional[str] = None  # a state dict file to start from (models/importer.py); not used when resuming
    init_format: str = option("auto", choices=INIT_FORMATS)  # the file's parameter names and numerics


@dataclass
class DataConfig:
    dataset: str = option("generated", choices=DATASETS)
    path: Optional[str] = None  # ImageNet folder (train/, val/); unused by generated and digits
    eval_resolution: Optional[int] = option(None, ge=8)  # None: the resolution the model was trained at
    workers: int = option(4, ge=0)
    num_train: Optional[int] = option(None, ge=1)  # generated data: images per epoch (None: the default)
    num_val: Optional[int] = option(None, ge=1)
    max_corrupt_fraction: float = option(0.01, ge=0, le=1)  # unreadable images skipped and counted; more stops the run
    verify_images: bool = True  # imagenet: open every file's header when scanning (empty/non-image files found up front)
    jpeg_decoder: str = option("auto", choices=JPEG_DECODERS)  # imagenet: auto = simplejpeg if installed (Pillow's pixels, faster)
    resampler: str = option("auto", choices=RESAMPLERS)  # imagenet training crops: auto = torch's uint8 kernel in loader workers


@dataclass
class TrainConfig:
    epochs: float = option(350.0, ge=0)
    micro_batch: int = option(32, ge=1)  # per replica and per step; global = micro x accum x replicas
    grad_accum: int = option(1, ge=1)
    optimizer: str = option("rmsprop_tf", choices=OPTIMIZERS)
    lr: float = option(0.05, ge=0)  # at the global batch the recipe states, or at lr_reference_batch
    lr_reference_batch: Optional[int] = option(None, ge=1)  # set: lr scales linearly to the global batch
    lr_schedule: str = option("exponential", choices=LR_SCHEDULES)
    warmup_epochs: float = option(5.0, ge=0)
    weight_decay: float = option(1e-5, ge=0)
    momentum: float = option(0.9, ge=0, lt=1)
    label_smoothing: float = option(0.1, ge=0, lt=1)
    mixup_alpha: float = option(0.0, ge=0)  # 0: no mixup
    cutmix: bool = False
    precision: str = option("32.32", choices=PRECISIONS)
    channels_last: Optional[bool] = None  # None: on with the torch backend (1.6x B0 training on CPU), off on IPUs and the pipeline backend
    seed: int = option(0, ge=0)
    weight_avg_decay: float = option(0.97, ge=0, le=1)  # exponential average over per-epoch checkpoints
    ema_decay: Optional[float] = option(None, ge=0, lt=1)  # set: also a per-step EMA of the weights
    # BatchNorm statistics of the averaged weights (and EMA) recomputed at the phase's end over this many
    # micro-batches of the phase's own training loader per process (0: off; ignored without BatchNorm).
    # Training images with the training transform, as SWA's update_bn: the averaged weights were trained
    # on that distribution, and its statistics are the ones the stale averages were estimates of, so the
    # averaged model is evaluated under the same train/test conditions as the final one (the evaluation
    # transform at the test size would be test-time adaptation). 100 x micro-batch 32 = 3,200 images.
    bn_recalibration_batches: int = option(100, ge=0)
    checkpoint_every: int = option(1, ge=1)  # epochs
    keep_checkpoints: int = option(3, ge=1)  # newest checkpoints kept in the run directory
    max_bad_steps: int = option(20, ge=1)  # consecutive non-finite steps fp16 loss scaling may skip before the run stops
    randaugment_magnitude: Optional[float] = option(None, ge=0)  # automl's scale (10: classic max); None/0: off
    randaugment_ops: int = option(2, ge=1)  # RandAugment operations per image
    progressive_stages: int = option(4, ge=1)  # recipe progressive: M stages (EfficientNetV2 Algorithm 1)
    progressive_resolution: List[int] = option([], ge=32)  # [S_0, S_e]; []: [native / 2, native]
    progressive_dropout: List[float] = option([], ge=0, lt=1)  # [start, end]; []: the model's dropout throughout
    progressive_randaugment: List[float] = option([], ge=0)  # [start, end] magnitudes; []: randaugment_magnitude
    progressive_mixup: List[float] = option([], ge=0)  # [start, end] alphas; []: mixup_alpha throughout


@dataclass
class FinetuneConfig:
    epochs: float = option(2.0, ge=0)
    resolution: Optional[int] = option(None, ge=8)  # None: the model's native resolution
    first_trainable: Optional[str] = option(None, module_path=True)  # e.g. blocks.5.3; None: the last two blocks on; stem: all
    lr: float = option(0.25, ge=0)
    micro_batch: Optional[int] = option(None, ge=1)  # None: train.micro_batch
    grad_accum: Optional[int] = option(None, ge=1)  # None: train.grad_accum
    label_smoothing: Optional[float] = option(None, ge=0, lt=1)  # None: train.label_smoothing


@dataclass
class IpuConfig:
    ipus_per_replica: int = option(1, ge=1)  # pipeline stages per replica
    replicas: int = option(1, ge=1)
    device_iterations: int = option(1, ge=1)
    pipeline_splits: List[str] = option([], module_path=True)  # first module of stages 1, 2, ...
    recompute: List[str] = option([], module_path=True)  # recomputation checkpoints
    available_memory_proportion: List[float] = option([0.15], gt=0, le=1)  # one value, or one per IPU
    loss_scaling: float = option(128.0, gt=0)
    stochastic_rounding: bool = False
    executable_cache: Optional[str] = None  # directory for compiled executables
    auto_loss_scaling: bool = False  # poptorch's automatic loss scaling (loss_scaling is then the start value)
    optimizer_state_offchip: bool = False  # optimiser state in Streaming Memory instead of on-chip SRAM
    replicated_tensor_sharding: bool = False  # shard optimiser state across replicas (needs replicas > 1)
    synthetic_data: bool = False  # no host I/O: data generated on the IPU (throughput measurements)
    compile_only: bool = False  # compile for an offline Mk2 target (fills executable_cache), then stop
    ipu_model: bool = False  # force the IPU Model (simulator); without IPUs attached it is used anyway


@dataclass
class DistributedConfig:
    backend: str = option("auto", choices=DIST_BACKENDS)  # torch.distributed under torchrun
    host_collectives: str = option("auto", choices=HOST_COLLECTIVES)  # between poprun instances
    pipeline_schedule: str = option("1f1b", choices=PIPELINE_SCHEDULES)  # backend pipeline: over grad_accum micro-batches


@dataclass
class LoggingConfig:
    out_dir: str = "runs"
    log_every: int = option(10, ge=1)  # steps
    progress: bool = True
    progress_interval: float = option(60.0, gt=0)  # seconds between plain progress lines when stderr is not a terminal
    tensorboard: Optional[bool] = None  # RUN/tensorboard/ event files; None: when the tensorboard package imports


@dataclass
class Config:
    name: Optional[str] = None  # run name; None: derived from the recipe file
    recipe: str = option("native", choices=RECIPES)
    backend: str = option("auto", choices=BACKENDS)
    model: ModelConfig = field(default_factory=ModelConfig)
    norm: NormSpec = field(default_factory=NormSpec)  # norms.NormSpec: its fields carry their checks
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    ipu: IpuConfig = field(default_factory=IpuConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> Dict[str, Any]:
        """Plain nested dicts and lists (a deep copy), as written by `dump`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any], source: str = "<dict>") -> Config:
        """Validate a (possibly partial) nested dict and build a Config; missing keys take defaults."""
        from ipu_effnet.config.validation import Origins, build_config  # it imports this module

        return build_config(copy.deepcopy(d), Origins({}, source))


# ----------------------------------------------------------------------------------------------------
# What the tree turns into


def model_kwargs(cfg: Config) -> Tuple[str, Dict[str, Any]]:
    """(name, kwargs) for `ipu_effnet.models.create_model(name, **kwargs)`: explicit constructor
    arguments, so models never see the config. Optional arguments appear only when set."""
    m = cfg.model
    kwargs: Dict[str, Any] = {
        "num_classes": m.num_classes,
        "in_chans": m.in_chans,
        "act": m.act,
        "drop_path_rate": m.drop_path_rate,
        "norm": cfg.norm,
    }
    for key in ("group_size", "expand_ratio", "drop_rate"):
        if getattr(m, key) is not None:
            kwargs[key] = getattr(m, key)
    if m.fit_group_size:
        kwargs["fit_group_size"] = True
    if m.padding != "symmetric":
        kwargs["padding"] = m.padding
    return m.name, kwargs
