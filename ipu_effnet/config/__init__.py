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

Adding a field is one line in its section in `schema`: `name: Type = option(default, choices=...,
ge=...)`. Types are the ones `validation._coerce` knows: str, int, float, bool, Optional[...] of
those, List[...] of those.

Modules: `schema` (the dataclasses, `option`, `ConfigError`, the choice tuples,
`model_kwargs`), `loading` (YAML files, `base:` inheritance, overrides, `dump`, `write_resolved`),
`validation` (the dict tree -> dataclasses: coercion, unknown keys, the cross-field checks).
"""

from __future__ import annotations

from ipu_effnet.config.loading import apply_overrides, dump, load, parse_override, write_resolved
from ipu_effnet.config.schema import (
    BACKENDS,
    DATASETS,
    DIST_BACKENDS,
    HOST_COLLECTIVES,
    INIT_FORMATS,
    JPEG_DECODERS,
    LR_SCHEDULES,
    OPTIMIZERS,
    PADDINGS,
    PIPELINE_SCHEDULES,
    PRECISIONS,
    RECIPES,
    RESAMPLERS,
    Config,
    ConfigError,
    DataConfig,
    DistributedConfig,
    FinetuneConfig,
    IpuConfig,
    LoggingConfig,
    ModelConfig,
    TrainConfig,
    model_kwargs,
    option,
)
from ipu_effnet.config.validation import replace
from norms.spec import NORM_KINDS  # the norm section's kinds, where the norm section is defined

__all__ = [
    "BACKENDS",
    "DATASETS",
    "DIST_BACKENDS",
    "HOST_COLLECTIVES",
    "JPEG_DECODERS",
    "LR_SCHEDULES",
    "INIT_FORMATS",
    "NORM_KINDS",
    "OPTIMIZERS",
    "PADDINGS",
    "PIPELINE_SCHEDULES",
    "PRECISIONS",
    "RECIPES",
    "RESAMPLERS",
    "replace",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "FinetuneConfig",
    "IpuConfig",
    "LoggingConfig",
    "ModelConfig",
    "TrainConfig",
    "apply_overrides",
    "dump",
    "load",
    "model_kwargs",
    "option",
    "parse_override",
    "write_resolved",
]
