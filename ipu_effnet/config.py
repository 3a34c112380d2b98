"""The configuration tree: YAML recipes with inheritance, command-line overrides, strict validation.

A recipe is a YAML mapping of sections (model, norm, data, train, finetune, ipu, distributed, logging)
plus three top-level keys (name, recipe, backend). `base: other.yaml` (or a list of files, applied in
order) inherits from other recipes, with paths relative to the including file; sections merge key by
key, the including file wins and lists are replaced whole. Command-line overrides `section.key=value`
come last, their values read as YAML (`3`, `0.1`, `true`, `[blocks.3.0]`, `null`).

Every key is checked before any heavy work (google/automl's `hparams` strictness): an unknown key, a
value of the wrong type, a string outside its choices or a number out of range raises `ConfigError`
with one line naming the file (or `--set`), the dotted key, the value and what would be valid. As in
timm's `train.py`, the resolved config is written into the run directory (`write_resolved`) and loads
back to the same `Config`.

    cfg = load("configs/efficientnet-b0-g16-gn.yaml", ["train.epochs=10", "backend=torch"])
    name, kwargs = model_kwargs(cfg)            # create_model(name, **kwargs): models never see cfg

Adding a field is one line in its section: `name: Type = option(default, choices=..., ge=...)`. Types
are the ones `_coerce` knows: str, int, float, bool, Optional[...] of those, List[...] of those.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from ipu_effnet.errors import UsageError

if TYPE_CHECKING:  # norms imports torch: only when a NormSpec is actually built
    from norms import NormSpec

__all__ = [
    "BACKENDS",
    "DATASETS",
    "DIST_BACKENDS",
    "JPEG_DECODERS",
    "LR_SCHEDULES",
    "INIT_FORMATS",
    "NORM_KINDS",
    "OPTIMIZERS",
    "PADDINGS",
    "PRECISIONS",
    "RECIPES",
    "RESAMPLERS",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "FinetuneConfig",
    "IpuConfig",
    "LoggingConfig",
    "ModelConfig",
    "NormConfig",
    "TrainConfig",
    "apply_overrides",
    "dump",
    "load",
    "model_kwargs",
    "norm_spec",
    "option",
    "parse_override",
    "write_resolved",
]

# Allowed strings, one tuple per choice so that other modules can dispatch on the same names.
NORM_KINDS = ("batch", "group", "layer", "none")
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

DEFAULTS_SOURCE = "<defaults>"
OVERRIDE_SOURCE = "--set"


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
class NormConfig:
    kind: str = option("batch", choices=NORM_KINDS)
    groups: int = option(4, ge=1)  # GroupNorm groups (Graphcore's G16 configs: 4)
    eps: float = option(1e-3, gt=0)
    momentum: float = option(0.01, ge=0, le=1)  # BatchNorm running statistics, PyTorch convention
    proxy: bool = False  # Proxy Norm after the activation (group and layer only)
    proxy_eps: float = option(0.03, gt=0)
    proxy_points: int = option(200, ge=2)


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
    norm: NormConfig = field(default_factory=NormConfig)
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
        return _build_config(copy.deepcopy(d), _Origins({}, source))


# ----------------------------------------------------------------------------------------------------
# Public API


def load(path: Optional[Union[str, os.PathLike]], overrides: Sequence[str] = ()) -> Config:
    """Read a YAML recipe (None: all defaults), follow `base:`, apply `section.key=value` overrides,
    validate, and return the Config."""
    tree: Dict[str, Any] = {}
    origins: Dict[str, str] = {}
    source = DEFAULTS_SOURCE
    if path is not None:
        source = os.fspath(path)
        _apply_file(source, tree, origins, ())
    _apply_override_list(tree, overrides, origins)
    return _build_config(tree, _Origins(origins, source))


def apply_overrides(cfg: Config, overrides: Sequence[str], source: str = OVERRIDE_SOURCE) -> Config:
    """A new Config: `cfg` with `section.key=value` overrides applied and validated again."""
    tree = cfg.to_dict()
    origins: Dict[str, str] = {}
    _apply_override_list(tree, overrides, origins, source)
    return _build_config(tree, _Origins(origins, source))


def dump(cfg: Config) -> str:
    """YAML text of the resolved config; `load` reads it back to an equal Config."""
    return yaml.dump(cfg.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def write_resolved(cfg: Config, run_dir: Union[str, os.PathLike], source: Optional[str] = None,
                   overrides: Sequence[str] = ()) -> Path:
    """Write `run_dir/config.yaml`: a comment header (source file, overrides), then the resolved YAML."""
    from ipu_effnet import __version__

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    header = [
        f"# Resolved configuration, written by ipu_effnet {__version__}.",
        "# Repeat the run with: python -m ipu_effnet train --config <this file>",
        f"# source: {_one_line(os.fspath(source)) if source is not None else '(defaults)'}",
    ]
    if overrides:
        header.append("# overrides:")
        header.extend(f"#   --set {_one_line(text)}" for text in overrides)
    else:
        header.append("# overrides: (none)")
    out = run_dir / "config.yaml"
    out.write_text("\n".join(header) + "\n" + dump(cfg), encoding="utf-8")
    return out


def norm_spec(cfg: Config, source: str = "<config>") -> NormSpec:
    """The config's `norms.NormSpec`; a bad combination (e.g. proxy with batch) raises ConfigError."""
    from norms import NormSpec

    n = cfg.norm
    try:
        return NormSpec(kind=n.kind, groups=n.groups, eps=n.eps, momentum=n.momentum, proxy=n.proxy,
                        proxy_eps=n.proxy_eps, proxy_points=n.proxy_points)
    except ValueError as exc:
        raise ConfigError(f"{source}: invalid 'norm' section (kind={n.kind!r}, proxy={n.proxy!r}, "
                          f"groups={n.groups!r}): {exc}") from None


def model_kwargs(cfg: Config) -> Tuple[str, Dict[str, Any]]:
    """(name, kwargs) for `ipu_effnet.models.create_model(name, **kwargs)`: explicit constructor
    arguments, so models never see the config. Optional arguments appear only when set."""
    m = cfg.model
    kwargs: Dict[str, Any] = {
        "num_classes": m.num_classes,
        "in_chans": m.in_chans,
        "act": m.act,
        "drop_path_rate": m.drop_path_rate,
        "norm": norm_spec(cfg),
    }
    for key in ("group_size", "expand_ratio", "drop_rate"):
        if getattr(m, key) is not None:
            kwargs[key] = getattr(m, key)
    if m.fit_group_size:
        kwargs["fit_group_size"] = True
    if m.padding != "symmetric":
        kwargs["padding"] = m.padding
    return m.name, kwargs


# ----------------------------------------------------------------------------------------------------
# Reading files and overrides into one nested dict, remembering which source set each key


_BOOL_TAG = "tag:yaml.org,2002:bool"
_FLOAT_TAG = "tag:yaml.org,2002:float"
# YAML 1.1 (PyYAML) reads 1e-3 as text because it has no dot; YAML 1.2 and every reader of a recipe
# mean a number. Both the loader and the dumper (so that the text '1e3' gets quoted) know this form.
_EXP_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with two fixes for recipes: a duplicate key in a mapping is an error (YAML would keep
    the last silently), and only true/false are booleans, as in YAML 1.2 (YAML 1.1 also reads yes, no,
    on, off as booleans: `name=yes` stays a name)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, lists on one line: `pipeline_splits: [blocks.3.0]`."""


_Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=True))


def _own_resolvers(cls: type, yaml12_bools: bool) -> None:
    """Give `cls` its own copy of the implicit resolvers (old PyYAML shared the lists with SafeLoader),
    then add the exponent floats and, for reading, keep only YAML 1.2's booleans."""
    cls.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if not (yaml12_bools and tag == _BOOL_TAG)]
        for first, resolvers in cls.yaml_implicit_resolvers.items()
    }
    if yaml12_bools:
        cls.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                  list("tTfF"))
    cls.add_implicit_resolver(_FLOAT_TAG, _EXP_FLOAT, list("-+0123456789"))


# The dumper keeps YAML 1.1's booleans so that it quotes 'yes' and 'on' for YAML 1.1 readers too.
_own_resolvers(_StrictLoader, yaml12_bools=True)
_own_resolvers(_Dumper, yaml12_bools=False)


def _read_yaml(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "unreadable"
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML: {_one_line(str(exc))}") from None
    if data is None:  # an empty file, or comments only
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections and keys, "
                          f"not {_type_name(data)} ({_show(data)})")
    return data


def _apply_file(path: str, tree: Dict[str, Any], origins: Dict[str, str],
                chain: Tuple[Tuple[str, str], ...]) -> None:
    """Merge `path` (after its bases, in order) into `tree`. chain: (real path, shown path) of includers."""
    real = os.path.realpath(path)
    if any(real == r for r, _ in chain):
        loop = " -> ".join([shown for _, shown in chain] + [path])
        raise ConfigError(f"{chain[-1][1]}: inheritance cycle: {loop}")
    data = _read_yaml(path)
    bases = data.pop("base", None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: base = {_show(bases)} is not a file name or a list of file names")
    for base in bases:
        base_path = base if os.path.isabs(base) else os.path.normpath(os.path.join(os.path.dirname(path), base))
        if not os.path.isfile(base_path):
            raise ConfigError(f"{path}: base = {base!r} not found (looked for {base_path})")
        _apply_file(base_path, tree, origins, chain + ((real, path),))
    _merge(tree, data, origins, path)


def _merge(dst: Dict[str, Any], src: Dict[str, Any], origins: Dict[str, str], source: str,
           prefix: str = "") -> None:
    """Deep merge: mappings merge key by key, anything else (lists included) replaces; src wins."""
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        origins[dotted] = source
        old = dst.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            _merge(old, value, origins, source, dotted + ".")
        elif isinstance(old, dict) and value is None:
            continue  # `section:` with nothing under it changes nothing
        else:
            dst[key] = copy.deepcopy(value)
            _mark(value, origins, source, dotted + ".")


def _mark(value: Any, origins: Dict[str, str], source: str, prefix: str) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            origins[f"{prefix}{key}"] = source
            _mark(sub, origins, source, f"{prefix}{key}.")


def parse_override(text: str) -> Tuple[str, Any]:
    """'section.key=value' -> ('section.key', value read as YAML)."""
    key, sep, raw = str(text).partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{OVERRIDE_SOURCE}: {_show(text)} is not of the form section.key=value "
                          "(e.g. train.epochs=10, backend=torch)")
    try:
        value = yaml.load(raw, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or _one_line(str(exc))
        raise ConfigError(f"{OVERRIDE_SOURCE}: {key} = {raw!r} is not a valid YAML value: {problem}") from None
    return key, value


def _apply_override_list(tree: Dict[str, Any], overrides: Sequence[str], origins: Dict[str, str],
                         source: str = OVERRIDE_SOURCE) -> None:
    if isinstance(overrides, str):  # one override passed bare, not in a list
        overrides = [overrides]
    for text in overrides:
        key, value = parse_override(text)
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        _merge(tree, nested, origins, source)


# ----------------------------------------------------------------------------------------------------
# Validation: dict tree -> dataclasses


class _Origins:
    """Which source (file or --set) set each dotted key; the nearest enclosing key answers otherwise."""

    def __init__(self, origins: Dict[str, str], default: str) -> None:
        self.origins = origins
        self.default = default

    def __call__(self, dotted: str) -> str:
        key = dotted.split("[", 1)[0]
        while key:
            if key in self.origins:
                return self.origins[key]
            key = key.rpartition(".")[0]
        return self.default


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _all_keys(cls: type = Config, prefix: str = "") -> List[str]:
    """Every dotted key of the tree, sections included."""
    keys = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, f"{prefix}{f.name}."))
    return keys


def _unknown_key(cls: type, key: Any, value: Any, prefix: str, where: str) -> ConfigError:
    dotted = f"{prefix}{key}"
    head = f"{where}: unknown key {dotted!r} (value {_show(value)})"
    names = [f.name for f in dataclasses.fields(cls)]
    all_keys = _all_keys()
    if isinstance(key, str):
        if dotted in all_keys:  # `train.epochs: 3` written flat inside a file
            section, _, leaf = dotted.rpartition(".")
            return ConfigError(f"{head}; nest it: {section}: {{{leaf}: ...}}")
        guesses = [prefix + k for k in difflib.get_close_matches(key, names, n=1, cutoff=0.6)]
        guesses += [k for k in all_keys if k.rpartition(".")[2] == key]  # right name, wrong section
        if not guesses:
            guesses = difflib.get_close_matches(dotted, all_keys, n=1, cutoff=0.75)
        if guesses:
            return ConfigError(f"{head}; did you mean {' or '.join(repr(k) for k in guesses)}?")
    scope = f"in {prefix[:-1]!r}" if prefix else "at the top level"
    return ConfigError(f"{head}; valid keys {scope}: {', '.join(names)}")


def _build(cls: type, data: Any, prefix: str, where: _Origins) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        name = prefix[:-1] or "config"
        raise ConfigError(f"{where(name)}: {name} = {_show(data)} is not a mapping of keys "
                          f"(valid keys: {', '.join(f.name for f in dataclasses.fields(cls))})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(cls, key, value, prefix, where(f"{prefix}{key}"))
    hints = _hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        dotted = prefix + name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], dotted + ".", where)
        else:
            kwargs[name] = _coerce(tp, data[name], dotted, where(dotted), f.metadata)
    return cls(**kwargs)


def _build_config(tree: Dict[str, Any], where: _Origins) -> Config:
    cfg = _build(Config, tree, "", where)
    _check_config(cfg, where)
    return cfg


_MODULE_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
_TYPE_WORDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _coerce(tp: Any, value: Any, key: str, where: str, meta: Any) -> Any:
    """Check `value` against the field type `tp` and its checks; return it (ints become floats)."""
    if typing.get_origin(tp) is Union:
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
    elif value is None:
        raise ConfigError(f"{where}: {key} = null is not allowed; expected {_describe(tp)}")
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, dict):
            raise ConfigError(f"{where}: {key} = {_show(value)} is not a list; expected {_describe(tp)}")
        if not isinstance(value, list):
            value = [value]  # a single value stands for a one-element list
        return [_scalar(item_tp, v, f"{key}[{i}]", where, meta) for i, v in enumerate(value)]
    return _scalar(tp, value, key, where, meta)


def _scalar(tp: type, value: Any, key: str, where: str, meta: Any) -> Any:
    bad = f"{where}: {key} = {_show(value)}"
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{bad} is not a boolean; expected true or false")
    elif tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{bad} is a boolean, not an integer")
        if not isinstance(value, int):
            raise ConfigError(f"{bad} is not an integer")
    elif tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{bad} is a boolean, not a number")
        if isinstance(value, int):
            value = float(value)
        if not isinstance(value, float):
            raise ConfigError(f"{bad} is not a number")
        if not math.isfinite(value):
            raise ConfigError(f"{bad} is not a finite number")
    elif tp is str:
        if meta.get("choices") and isinstance(value, (int, float)) and str(value) in meta["choices"]:
            value = str(value)  # precision: 16.16 written without quotes
        if not isinstance(value, str):
            raise ConfigError(f"{bad} is not a string (quote it if it is meant as text)")
    else:  # a field type this validator does not know: a programming error, not a user's
        raise TypeError(f"config field {key}: unsupported type {tp!r}")

    choices = meta.get("choices")
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{bad} is not one of {', '.join(map(repr, choices))}{hint}")
    ge, gt, le, lt = (meta.get(k) for k in ("ge", "gt", "le", "lt"))
    if ((ge is not None and not value >= ge) or (gt is not None and not value > gt)
            or (le is not None and not value <= le) or (lt is not None and not value < lt)):
        raise ConfigError(f"{bad} is out of range; expected {_describe_range(ge, gt, le, lt)}")
    if meta.get("module_path") and not _MODULE_PATH.match(value):
        fixed = value.strip().strip("/").replace("/", ".")
        hint = f"; did you mean {fixed!r}?" if _MODULE_PATH.match(fixed) else ""
        raise ConfigError(f"{bad} is not a module path like 'blocks.3.0' or 'blocks.3.0.conv_pw'{hint}")
    return value


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp)
        return f"a list of {_PLURALS[item_tp]} ([] for none)"
    return _TYPE_WORDS.get(tp, repr(tp))


def _describe_range(ge: Any, gt: Any, le: Any, lt: Any) -> str:
    low = f"{_num(ge)} <= " if ge is not None else f"{_num(gt)} < " if gt is not None else ""
    high = f" <= {_num(le)}" if le is not None else f" < {_num(lt)}" if lt is not None else ""
    if low and high:
        return f"{low}value{high}"
    return f">= {_num(ge)}" if ge is not None else f"> {_num(gt)}" if gt is not None else high.strip()


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _check_config(cfg: Config, where: _Origins) -> None:
    """Checks that involve more than one field, or another module's list of names."""
    models = _known_models()
    if models is not None and cfg.model.name not in models:
        close = difflib.get_close_matches(cfg.model.name, models, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"{where('model.name')}: model.name = {cfg.model.name!r} is not a known model; "
                          f"{hint}(known: {', '.join(models)})")
    from norms import ACT_NAMES

    if cfg.model.act not in ACT_NAMES:
        close = difflib.get_close_matches(cfg.model.act, ACT_NAMES, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where('model.act')}: model.act = {cfg.model.act!r} is not one of "
                          f"{', '.join(map(repr, ACT_NAMES))}{hint}")
    norm_spec(cfg, source=where("norm"))

    ipu = cfg.ipu
    splits = ipu.pipeline_splits
    duplicates = sorted({s for s in splits if splits.count(s) > 1})
    if duplicates:
        raise ConfigError(f"{where('ipu.pipeline_splits')}: ipu.pipeline_splits = {splits!r} names "
                          f"{', '.join(map(repr, duplicates))} more than once")
    if splits and len(splits) != ipu.ipus_per_replica - 1:
        raise ConfigError(f"{where('ipu.pipeline_splits')}: ipu.pipeline_splits = {splits!r} makes "
                          f"{len(splits) + 1} stages but ipu.ipus_per_replica = {ipu.ipus_per_replica}; "
                          f"give ipus_per_replica - 1 splits (or [] to let the planner choose)")
    for key in ("progressive_resolution", "progressive_dropout", "progressive_randaugment", "progressive_mixup"):
        value = getattr(cfg.train, key)
        if len(value) not in (0, 2):
            raise ConfigError(f"{where('train.' + key)}: train.{key} = {value!r} needs two values, "
                              f"[start, end] (or [] for the default)")
    _check_batch_mixing(cfg, where)
    _check_halfres_sizes(cfg, where)
    amp = ipu.available_memory_proportion
    if len(amp) not in (1, ipu.ipus_per_replica):
        raise ConfigError(f"{where('ipu.available_memory_proportion')}: ipu.available_memory_proportion = "
                          f"{amp!r} needs one value, or one per IPU ({ipu.ipus_per_replica})")


def _check_batch_mixing(cfg: Config, where: _Origins) -> None:
    """Mixup pairs sample i with i - 1 of its micro-batch and cutmix with i - 2 (the batch rolled by one
    and by two): with fewer samples the partner is the sample itself and the augmentation silently
    does nothing."""
    t = cfg.train
    mixup = t.mixup_alpha > 0 or any(v > 0 for v in t.progressive_mixup)
    # mixup + cutmix: sample i mixes with i - 1, then takes a patch of the mixed i - 2, itself mixed with
    # i - 3: four distinct samples take part
    need = 4 if (t.cutmix and mixup) else 3 if t.cutmix else 2 if mixup else 1
    if t.micro_batch < need:
        what = "mixup + cutmix" if (mixup and t.cutmix) else "cutmix" if t.cutmix else "mixup"
        partner = "one, two and three" if (t.cutmix and mixup) else "two" if t.cutmix else "one"
        raise ConfigError(f"{where('train.micro_batch')}: train.micro_batch = {t.micro_batch} is too small for "
                          f"{what} (the partner of each sample is the micro-batch rolled by {partner}); expected "
                          f"train.micro_batch >= {need}, or turn {what} off")


def _check_halfres_sizes(cfg: Config, where: _Origins) -> None:
    """The half-resolution recipe trains at S and fine-tunes at S' with S % 32 == S' % 32 (the network's
    total stride is 32: the last feature maps are then cropped and padded alike at both sizes). Checked
    where model.resolution is set; other pairs are for `train` (native) followed by `finetune --res`."""
    if cfg.recipe != "halfres" or cfg.model.resolution is None:
        return
    train_res = cfg.model.resolution
    ft_res = cfg.finetune.resolution
    if ft_res is None:
        try:
            from ipu_effnet.models import native_resolution

            ft_res = native_resolution(cfg.model.name)
        except (ImportError, KeyError, ValueError):
            return
    if (train_res - ft_res) % 32:
        below = train_res - (train_res - ft_res) % 32
        options = [r for r in (below, below + 32) if r >= 8]
        raise ConfigError(f"{where('model.resolution')}: model.resolution = {train_res} with recipe halfres and a "
                          f"fine-tune at {ft_res} px: expected a training size with the same remainder modulo 32 "
                          f"({ft_res % 32}), e.g. {' or '.join(map(str, options))}; for other pairs train with "
                          f"recipe native and fine-tune with the finetune command")


def _known_models() -> Optional[List[str]]:
    """Names from ipu_effnet.models.list_models(), or None when that module cannot be imported yet."""
    try:
        from ipu_effnet.models import list_models
    except ImportError:
        return None
    try:  # the published family plus the small test model(s), which create_model also builds
        return list(list_models(include_extra=True))
    except TypeError:
        return list(list_models())


# ----------------------------------------------------------------------------------------------------
# Message helpers


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _type_name(value: Any) -> str:
    return {list: "a list", str: "a string", int: "an integer", float: "a number",
            bool: "a boolean"}.get(type(value), type(value).__name__)
