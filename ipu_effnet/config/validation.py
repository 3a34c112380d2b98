"""Validation: the nested dict of a recipe -> the dataclasses of `schema`. Every value is coerced to
its field's type and checked against its choices and bounds (`_coerce`); unknown keys get the closest
valid one; `_check_*` apply the rules that involve more than one field or another module's names
(models, activations, Proxy Norm). Every failure is a one-line `ConfigError` naming the source."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import typing
from typing import Any, Dict, List, Union

from ipu_effnet.config.schema import Config, ConfigError


class Origins:
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
    head = f"{where}: unknown key {dotted!r} (value {show(value)})"
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


def _build(cls: type, data: Any, prefix: str, where: Origins) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        name = prefix[:-1] or "config"
        raise ConfigError(f"{where(name)}: {name} = {show(data)} is not a mapping of keys "
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
    return _construct(cls, kwargs, prefix[:-1], where(prefix[:-1]))


def _construct(cls: type, kwargs: Dict[str, Any], section: str, where: str, base: Any = None) -> Any:
    """`cls(**kwargs)` (or `base` with `kwargs` replaced), with a section's own check of its fields
    together (`norms.NormSpec`: Proxy Norm needs a group or layer kind) as a ConfigError naming it."""
    try:
        return cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)
    except ValueError as exc:
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ConfigError(f"{where}: invalid {section!r} section ({given}): {exc}") from None


def build_config(tree: Dict[str, Any], where: Origins) -> Config:
    cfg = _build(Config, tree, "", where)
    _check_config(cfg, where)
    return cfg


def replace(cfg: Config, changes: Dict[str, Any], source: str = "<derived>") -> Config:
    """`cfg` with dotted fields changed (`{"model.resolution": 96, "recipe": "native"}`): each section
    through `dataclasses.replace`, each new value coerced and checked as if a recipe had set it, then the
    cross-field checks once. How a phase of a recipe gets its own config."""
    fields: Dict[str, Dict[str, Any]] = {"": {}}
    for dotted, value in changes.items():
        section, _, key = dotted.rpartition(".")
        owner = getattr(cfg, section) if section else cfg
        if "." in section or not dataclasses.is_dataclass(owner) or key not in {f.name for f in dataclasses.fields(owner)}:
            raise _unknown_key(type(owner) if dataclasses.is_dataclass(owner) else Config, key, value,
                               section + "." if section else "", source)
        f = {f.name: f for f in dataclasses.fields(owner)}[key]
        fields.setdefault(section, {})[key] = _coerce(_hints(type(owner))[key], value, dotted, source, f.metadata)
    top = fields.pop("")
    sections = {name: _construct(type(getattr(cfg, name)), kv, name, source, base=getattr(cfg, name))
                for name, kv in fields.items()}
    new = dataclasses.replace(cfg, **top, **sections)
    _check_config(new, Origins({}, source))
    return new


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
            raise ConfigError(f"{where}: {key} = {show(value)} is not a list; expected {_describe(tp)}")
        if not isinstance(value, list):
            value = [value]  # a single value stands for a one-element list
        return [_scalar(item_tp, v, f"{key}[{i}]", where, meta) for i, v in enumerate(value)]
    return _scalar(tp, value, key, where, meta)


def _scalar(tp: type, value: Any, key: str, where: str, meta: Any) -> Any:
    bad = f"{where}: {key} = {show(value)}"
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


def _check_config(cfg: Config, where: Origins) -> None:
    """Checks that involve more than one field, or another module's list of names."""
    models = _known_models()
    if cfg.model.name not in models:
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


def _check_batch_mixing(cfg: Config, where: Origins) -> None:
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


def _check_halfres_sizes(cfg: Config, where: Origins) -> None:
    """The half-resolution recipe trains at S and fine-tunes at S' with S % 32 == S' % 32 (the network's
    total stride is 32: the last feature maps are then cropped and padded alike at both sizes). Checked
    where model.resolution is set; other pairs are for `train` (native) followed by `finetune --res`."""
    if cfg.recipe != "halfres" or cfg.model.resolution is None:
        return
    train_res = cfg.model.resolution
    ft_res = cfg.finetune.resolution
    if ft_res is None:
        from ipu_effnet.models import native_resolution

        ft_res = native_resolution(cfg.model.name)  # a known name: _check_config checked it first
    if (train_res - ft_res) % 32:
        below = train_res - (train_res - ft_res) % 32
        options = [r for r in (below, below + 32) if r >= 8]
        raise ConfigError(f"{where('model.resolution')}: model.resolution = {train_res} with recipe halfres and a "
                          f"fine-tune at {ft_res} px: expected a training size with the same remainder modulo 32 "
                          f"({ft_res % 32}), e.g. {' or '.join(map(str, options))}; for other pairs train with "
                          f"recipe native and fine-tune with the finetune command")


def _known_models() -> List[str]:
    """The names create_model builds: the published family plus the small test model(s)."""
    from ipu_effnet.models import list_models

    return list(list_models(include_extra=True))


# ----------------------------------------------------------------------------------------------------
# Message helpers


def show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
