"""Reading recipes: YAML files with `base:` inheritance and `section.key=value` overrides merged into one
nested dict (remembering which source set each key), then validated into a `Config`; `dump` and
`write_resolved` write it back as YAML that loads to an equal `Config`."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import yaml

from ipu_effnet.config.schema import Config, ConfigError
from ipu_effnet.config.validation import Origins, build_config, show

DEFAULTS_SOURCE = "<defaults>"
OVERRIDE_SOURCE = "--set"


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
    return build_config(tree, Origins(origins, source))


def apply_overrides(cfg: Config, overrides: Sequence[str], source: str = OVERRIDE_SOURCE) -> Config:
    """A new Config: `cfg` with `section.key=value` overrides applied and validated again."""
    tree = cfg.to_dict()
    origins: Dict[str, str] = {}
    _apply_override_list(tree, overrides, origins, source)
    return build_config(tree, Origins(origins, source))


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
                          f"not {_type_name(data)} ({show(data)})")
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
        raise ConfigError(f"{path}: base = {show(bases)} is not a file name or a list of file names")
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
        raise ConfigError(f"{OVERRIDE_SOURCE}: {show(text)} is not of the form section.key=value "
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
# Message helpers


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _type_name(value: Any) -> str:
    return {list: "a list", str: "a string", int: "an integer", float: "a number",
            bool: "a boolean"}.get(type(value), type(value).__name__)
