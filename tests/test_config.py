"""ipu_effnet.config: YAML recipes with inheritance, overrides, strict validation, resolved copies."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
import yaml

from ipu_effnet import config as C
from ipu_effnet.config import Config, ConfigError, dump, load, model_kwargs, write_resolved

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# configs/study/*.yaml are `study` presets (a base recipe plus the matrix), checked in tests/test_study.py
STUDY_PRESETS = sorted((CONFIGS / "study").glob("*.yaml"))
RECIPES = sorted(p for p in CONFIGS.glob("**/*.yaml") if p not in STUDY_PRESETS)


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


def error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load(path, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------------
# Defaults and the dict round trip


def test_defaults_load_and_match_the_dataclasses():
    cfg = load(None)
    assert cfg == Config()
    assert cfg.model.name == "efficientnet_b0" and cfg.norm.kind == "batch"
    assert cfg.train.optimizer == "rmsprop_tf" and cfg.train.epochs == 350.0
    assert cfg.ipu.available_memory_proportion == [0.15]
    assert cfg.recipe == "native" and cfg.backend == "auto"
    assert Config.from_dict({}) == cfg


def test_list_defaults_are_not_shared_between_instances():
    a, b = Config(), Config()
    a.ipu.pipeline_splits.append("blocks.3.0")
    a.ipu.available_memory_proportion[0] = 0.5
    assert b.ipu.pipeline_splits == [] and b.ipu.available_memory_proportion == [0.15]


def test_from_dict_validates_and_converts_ints_to_floats():
    cfg = Config.from_dict({"train": {"epochs": 10, "lr": 1}, "model": {"expand_ratio": 4}})
    assert cfg.train.epochs == 10.0 and isinstance(cfg.train.epochs, float)
    assert isinstance(cfg.train.lr, float) and isinstance(cfg.model.expand_ratio, float)
    with pytest.raises(ConfigError, match=r"^mine: unknown key 'train\.epohcs'"):
        Config.from_dict({"train": {"epohcs": 3}}, source="mine")


def test_empty_file_and_empty_section_give_defaults(tmp_path):
    assert load(write(tmp_path / "empty.yaml", "# nothing here\n")) == Config()
    assert load(write(tmp_path / "section.yaml", "ipu:\ntrain:\n  epochs: 3\n")).ipu == Config().ipu


# ---------------------------------------------------------------------------------------------------
# Inheritance


def test_child_overrides_base_nested_sections_merge_and_lists_replace(tmp_path):
    write(tmp_path / "base.yaml", """\
        model: {num_classes: 5}
        train: {epochs: 10, lr: 0.1, mixup_alpha: 0.2}
        ipu: {ipus_per_replica: 3, pipeline_splits: [blocks.1.0, blocks.4.0], recompute: [stem]}
        """)
    child = write(tmp_path / "sub" / "child.yaml", """\
        base: ../base.yaml        # relative to this file, not to the working directory
        train: {lr: 0.2}
        ipu: {ipus_per_replica: 2, pipeline_splits: [blocks.3.0]}
        """)
    cfg = load(child)
    assert cfg.train.lr == 0.2  # child wins
    assert cfg.train.epochs == 10 and cfg.train.mixup_alpha == 0.2  # the rest of the section merges
    assert cfg.model.num_classes == 5  # untouched sections come from the base
    assert cfg.ipu.pipeline_splits == ["blocks.3.0"]  # lists are replaced, not concatenated
    assert cfg.ipu.recompute == ["stem"]


def test_chains_and_lists_of_bases_apply_in_order(tmp_path):
    write(tmp_path / "a.yaml", "train: {epochs: 1, lr: 0.1, seed: 1}\n")
    write(tmp_path / "b.yaml", "base: a.yaml\ntrain: {lr: 0.2}\n")
    write(tmp_path / "c.yaml", "train: {seed: 3, micro_batch: 7}\n")
    top = write(tmp_path / "top.yaml", "base: [b.yaml, c.yaml]\ntrain: {micro_batch: 9}\n")
    t = load(top).train
    assert (t.epochs, t.lr, t.seed, t.micro_batch) == (1, 0.2, 3, 9)


def test_diamond_inheritance_is_not_a_cycle(tmp_path):
    write(tmp_path / "root.yaml", "train: {epochs: 1}\n")
    write(tmp_path / "left.yaml", "base: root.yaml\ntrain: {lr: 0.3}\n")
    write(tmp_path / "right.yaml", "base: root.yaml\n")
    top = write(tmp_path / "top.yaml", "base: [left.yaml, right.yaml]\n")
    assert load(top).train.lr == 0.3


def test_inheritance_cycle_is_detected(tmp_path):
    a = write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    message = error(a)
    assert "cycle" in message and "a.yaml -> " in message and "b.yaml -> " in message
    self_ref = write(tmp_path / "self.yaml", "base: self.yaml\n")
    assert "cycle" in error(self_ref)


def test_missing_base_names_the_including_file_and_the_path(tmp_path):
    child = write(tmp_path / "child.yaml", "base: nope.yaml\n")
    message = error(child)
    assert message.startswith(child) and "'nope.yaml' not found" in message
    assert str(tmp_path / "nope.yaml") in message
    assert "not a file name" in error(write(tmp_path / "bad.yaml", "base: 3\n"))


def test_error_names_the_base_file_that_holds_the_bad_key(tmp_path):
    base = write(tmp_path / "base.yaml", "train: {micro_batch: 0}\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\ntrain: {lr: 0.1}\n")
    assert error(child).startswith(f"{base}: train.micro_batch = 0 is out of range")


# ---------------------------------------------------------------------------------------------------
# Overrides and the resolved copy


def test_overrides_nested_top_level_list_null_and_numbers(tmp_path):
    path = write(tmp_path / "r.yaml", "name: run\nmodel: {drop_rate: 0.3}\ntrain: {epochs: 10}\n")
    cfg = load(path, [
        "train.epochs=3", "backend=ipu", "ipu.ipus_per_replica=2", "ipu.pipeline_splits=[blocks.3.0]",
        "model.drop_rate=null", "name=null", "train.weight_decay=1e-4", "norm={kind: group, groups: 8}",
        "train.cutmix=true",
    ])
    assert cfg.train.epochs == 3.0 and cfg.backend == "ipu"
    assert cfg.ipu.pipeline_splits == ["blocks.3.0"]
    assert cfg.model.drop_rate is None and cfg.name is None
    assert cfg.train.weight_decay == pytest.approx(1e-4)  # YAML 1.1 reads "1e-4" as text; accepted
    assert (cfg.norm.kind, cfg.norm.groups) == ("group", 8)
    assert cfg.train.cutmix is True


def test_a_single_value_stands_for_a_one_element_list():
    cfg = load(None, ["ipu.ipus_per_replica=2", "ipu.pipeline_splits=blocks.3.0",
                      "ipu.available_memory_proportion=0.1"])
    assert cfg.ipu.pipeline_splits == ["blocks.3.0"] and cfg.ipu.available_memory_proportion == [0.1]


def test_later_overrides_win_and_bad_overrides_are_named():
    assert load(None, ["train.lr=0.1", "train.lr=0.3"]).train.lr == 0.3
    assert error(None, ["train.epochs"]).startswith("--set: 'train.epochs' is not of the form section.key=value")
    assert "not of the form" in error(None, ["train..epochs=3"])
    message = error(None, ["train.epohcs=3"])
    assert message == "--set: unknown key 'train.epohcs' (value 3); did you mean 'train.epochs'?"
    assert "is not a valid YAML value" in error(None, ["ipu.recompute=[stem"])


def test_write_resolved_round_trips_and_records_source_and_overrides(tmp_path):
    recipe = str(CONFIGS / "efficientnet-b0-g16-gn.yaml")
    overrides = ["train.epochs=3", "ipu.recompute=[blocks.2.0, head]", "model.drop_rate=null",
                 "data.path=/data/imagenet", "name=yes"]
    cfg = load(recipe, overrides)
    out = write_resolved(cfg, tmp_path / "run" / "nested", source=recipe, overrides=overrides)
    assert out == tmp_path / "run" / "nested" / "config.yaml"
    text = out.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any(recipe in line for line in header)
    for o in overrides:
        assert any(line.strip("# ").endswith(o) for line in header), o
    again = load(out)
    assert again == cfg and again.name == "yes"  # 'yes' stays a string, not YAML 1.1's true
    assert write_resolved(Config(), tmp_path / "d").read_text().count("(none)") == 1


def test_dump_round_trips_every_field_type():
    cfg = load(None, ["name=x", "train.precision=16.16", "ipu.available_memory_proportion=[0.1, 0.2]",
                      "ipu.ipus_per_replica=2", "finetune.first_trainable=blocks.5.3",
                      "data.path='123'", "train.weight_decay=0.00001"])
    assert cfg.train.precision == "16.16" and cfg.data.path == "123"
    assert Config.from_dict(yaml.safe_load(dump(cfg))) == cfg


def test_yaml_reading_rules_for_recipes(tmp_path):
    # 1e-5 is a number (YAML 1.2), only true/false are booleans, precision may be written unquoted.
    path = write(tmp_path / "r.yaml", "name: yes\ntrain: {weight_decay: 1e-5, lr: 2E-2, precision: 16.16}\n")
    cfg = load(path)
    assert cfg.name == "yes" and cfg.train.weight_decay == pytest.approx(1e-5) and cfg.train.lr == 0.02
    assert cfg.train.precision == "16.16"
    assert "train.cutmix = 'yes' is not a boolean" in error(None, ["train.cutmix=yes"])
    assert "train.lr = '0.1' is not a number" in error(None, ["train.lr='0.1'"])  # quoted means text
    odd = load(None, ["name='1e3'", "logging.out_dir=on"])
    assert (odd.name, odd.logging.out_dir) == ("1e3", "on")
    assert Config.from_dict(yaml.safe_load(dump(odd))) == odd  # also for plain YAML 1.1 readers


def test_apply_overrides_to_a_built_config():
    cfg = C.apply_overrides(Config(), ["train.lr=0.5", "recipe=halfres"])
    assert cfg.train.lr == 0.5 and cfg.recipe == "halfres" and Config().train.lr == 0.05
    with pytest.raises(ConfigError, match="--set: train.lr = -1 is out of range"):
        C.apply_overrides(cfg, ["train.lr=-1"])


# ---------------------------------------------------------------------------------------------------
# Error messages: one line, the file, the key, the value, what is valid


def test_misspelt_key_in_a_file_names_file_key_value_and_closest_key(tmp_path):
    path = write(tmp_path / "x.yaml", "train:\n  epohcs: 3\n")
    assert error(path) == f"{path}: unknown key 'train.epohcs' (value 3); did you mean 'train.epochs'?"
    assert "did you mean 'train'?" in error(write(tmp_path / "s.yaml", "trian: {epochs: 3}\n"))
    assert "did you mean 'backend'?" in error(write(tmp_path / "t.yaml", "bakend: torch\n"))


def test_unknown_key_in_the_wrong_section_points_to_the_right_one(tmp_path):
    message = error(write(tmp_path / "x.yaml", "lr: 0.1\n"))
    assert "unknown key 'lr'" in message and "'train.lr'" in message and "'finetune.lr'" in message
    assert "did you mean 'model.group_size' or 'norm.groups'?" in error(write(tmp_path / "y.yaml", "model: {groups: 4}\n"))
    flat = error(write(tmp_path / "z.yaml", "train.epochs: 3\n"))
    assert "unknown key 'train.epochs'" in flat and "nest it" in flat


def test_unknown_key_without_a_close_match_lists_the_section(tmp_path):
    message = error(write(tmp_path / "x.yaml", "logging: {zzzzzz: 1}\n"))
    assert "valid keys in 'logging': out_dir, log_every, progress" in message


@pytest.mark.parametrize("override, expected", [
    ("train.epochs=ten", "--set: train.epochs = 'ten' is not a number"),
    ("train.micro_batch=true", "--set: train.micro_batch = True is a boolean, not an integer"),
    ("train.micro_batch=2.5", "--set: train.micro_batch = 2.5 is not an integer"),
    ("train.lr=false", "--set: train.lr = False is a boolean, not a number"),
    ("train.cutmix=1", "--set: train.cutmix = 1 is not a boolean; expected true or false"),
    ("train.epochs=.inf", "--set: train.epochs = inf is not a finite number"),
    ("train.epochs=null", "--set: train.epochs = null is not allowed; expected a number"),
    ("ipu.recompute=null", "expected a list of strings ([] for none)"),
    ("ipu.recompute={a: 1}", "--set: ipu.recompute = {'a': 1} is not a list"),
    ("ipu.recompute=[stem, 3]", "--set: ipu.recompute[1] = 3 is not a string"),
    ("logging.out_dir=5", "--set: logging.out_dir = 5 is not a string"),
    ("train=5", "--set: train = 5 is not a mapping"),
    ("train.optimizer=adam",
     "--set: train.optimizer = 'adam' is not one of 'rmsprop_tf', 'sgd', 'adamw'; did you mean 'adamw'?"),
    ("norm.kind=Group", "'batch', 'group', 'layer', 'none'"),
    ("train.precision=16", "--set: train.precision = 16 is not a string"),
    ("recipe=half", "--set: recipe = 'half' is not one of 'native', 'halfres', 'progressive'"),
])
def test_type_and_choice_errors(override, expected):
    assert expected in error(None, [override])


@pytest.mark.parametrize("override, expected", [
    ("train.lr=-0.1", "train.lr = -0.1 is out of range; expected >= 0"),
    ("train.epochs=-1", "expected >= 0"),
    ("finetune.epochs=-1", "finetune.epochs = -1 is out of range"),
    ("train.micro_batch=0", "train.micro_batch = 0 is out of range; expected >= 1"),
    ("train.grad_accum=0", "expected >= 1"),
    ("ipu.replicas=0", "ipu.replicas = 0 is out of range"),
    ("ipu.ipus_per_replica=0", "ipu.ipus_per_replica = 0 is out of range"),
    ("model.drop_rate=1", "model.drop_rate = 1 is out of range; expected 0 <= value < 1"),
    ("model.drop_path_rate=-0.1", "expected 0 <= value < 1"),
    ("train.label_smoothing=1.0", "train.label_smoothing = 1.0 is out of range; expected 0 <= value < 1"),
    ("model.resolution=4", "model.resolution = 4 is out of range; expected >= 8"),
    ("finetune.resolution=0", "expected >= 8"),
    ("data.eval_resolution=7", "expected >= 8"),
    ("ipu.available_memory_proportion=[0.1, 0]",
     "ipu.available_memory_proportion[1] = 0 is out of range; expected 0 < value <= 1"),
    ("ipu.available_memory_proportion=1.5", "expected 0 < value <= 1"),
])
def test_range_errors(override, expected):
    assert expected in error(None, [override])


def test_range_edges_are_accepted():
    cfg = load(None, ["train.lr=0", "train.epochs=0", "model.drop_rate=0", "train.label_smoothing=0.99",
                      "model.resolution=8", "ipu.available_memory_proportion=1"])
    assert cfg.ipu.available_memory_proportion == [1.0] and cfg.model.resolution == 8


def test_file_errors(tmp_path):
    missing = str(tmp_path / "missing.yaml")
    assert error(missing) == f"{missing}: config file not found"
    bad = write(tmp_path / "bad.yaml", "train:\n  epochs: 3\n   lr: [0.1\n")
    message = error(bad)
    assert message.startswith(f"{bad}: malformed YAML at line 3")
    listed = write(tmp_path / "list.yaml", "- train\n- model\n")
    assert error(listed).startswith(f"{listed}: the top level must be a mapping")
    dup = write(tmp_path / "dup.yaml", "train:\n  epochs: 3\n  epochs: 4\n")
    assert error(dup) == f"{dup}: malformed YAML at line 3, column 3: duplicate key 'epochs'"


def test_module_paths_are_checked_and_slashes_get_a_hint():
    message = error(None, ["finetune.first_trainable=blocks/5/3"])
    assert "is not a module path" in message and "did you mean 'blocks.5.3'?" in message
    assert "ipu.pipeline_splits[0] = 'blocks 3'" in error(None, ["ipu.pipeline_splits=['blocks 3']"])


def test_pipeline_splits_must_match_the_ipus_per_replica():
    assert "makes 3 stages but ipu.ipus_per_replica = 2" in error(
        None, ["ipu.ipus_per_replica=2", "ipu.pipeline_splits=[blocks.1.0, blocks.3.0]"])
    assert "more than once" in error(
        None, ["ipu.ipus_per_replica=3", "ipu.pipeline_splits=[blocks.1.0, blocks.1.0]"])
    assert load(None, ["ipu.ipus_per_replica=4"]).ipu.pipeline_splits == []  # empty: the planner chooses
    assert "one value, or one per IPU (2)" in error(
        None, ["ipu.ipus_per_replica=2", "ipu.available_memory_proportion=[0.1, 0.2, 0.3]"])


# ---------------------------------------------------------------------------------------------------
# Cross-module checks: norms and models


def test_the_norm_section_is_the_norm_spec_and_bad_combinations_name_the_norm_section(tmp_path):
    from norms import NORM_KINDS, NormSpec

    assert C.NORM_KINDS is NORM_KINDS
    cfg = load(None, ["norm.kind=layer", "norm.proxy=true", "norm.eps=1e-5", "norm.proxy_points=64"])
    assert cfg.norm == NormSpec(kind="layer", proxy=True, eps=1e-5, proxy_points=64)
    assert cfg.norm.label == "layer+proxy"
    path = write(tmp_path / "pn.yaml", "norm: {kind: batch, proxy: true}\n")
    message = error(path)
    assert message.startswith(f"{path}: invalid 'norm' section (kind='batch', proxy=True)") and "Proxy Norm" in message
    with pytest.raises(ConfigError, match="^phase: invalid 'norm' section \\(proxy=True\\): Proxy Norm needs"):
        C.replace(Config(), {"norm.proxy": True}, source="phase")
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().norm.proxy = True  # a section that was checked stays checked


def test_norm_spec_checks_its_fields_from_the_metadata_the_config_reads():
    from norms import NormSpec

    with pytest.raises(ValueError, match="norm groups must be >= 1, got 0"):
        NormSpec(groups=0)
    with pytest.raises(ValueError, match="norm kind 'batchnorm' is not one of batch, group, layer, none"):
        NormSpec(kind="batchnorm")
    with pytest.raises(ValueError, match="norm momentum must be <= 1, got 1.5"):
        NormSpec(momentum=1.5)
    # the loader reports the same bound with the key and where it was set
    assert "norm.groups = 0 is out of range; expected >= 1" in error(None, ["norm.groups=0"])
    assert "norm.momentum = 1.5 is out of range; expected 0 <= value <= 1" in error(None, ["norm.momentum=1.5"])


def test_unknown_activation_suggests_the_closest():
    assert "model.act = 'slu' is not one of" in error(None, ["model.act=slu"])
    assert "did you mean 'silu'?" in error(None, ["model.act=slu"])


def test_model_kwargs_are_explicit_and_optional_ones_appear_only_when_set():
    name, kwargs = model_kwargs(Config())
    assert name == "efficientnet_b0"
    assert set(kwargs) == {"num_classes", "in_chans", "act", "drop_path_rate", "norm"}
    cfg = load(None, ["model.name=efficientnet_b4_g16", "model.group_size=8", "model.expand_ratio=4",
                      "model.drop_rate=0.4", "model.fit_group_size=true", "norm.kind=group",
                      "model.num_classes=10"])
    name, kwargs = model_kwargs(cfg)
    assert name == "efficientnet_b4_g16"
    assert kwargs["group_size"] == 8 and kwargs["expand_ratio"] == 4.0 and kwargs["drop_rate"] == 0.4
    assert kwargs["fit_group_size"] is True and kwargs["num_classes"] == 10
    assert kwargs["norm"].kind == "group"


def test_unknown_model_name_suggests_the_closest():
    message = error(None, ["model.name=efficientnet_b0_g61"])
    assert message.startswith("--set: model.name = 'efficientnet_b0_g61' is not a known model")
    assert "did you mean 'efficientnet_b0_g16'?" in message
    assert load(None, ["model.name=efficientnetv2_s"]).model.name == "efficientnetv2_s"


# ---------------------------------------------------------------------------------------------------
# The recipes in configs/


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(CONFIGS)) for p in RECIPES])
def test_every_recipe_loads_round_trips_and_gives_model_kwargs(path):
    assert path.read_text().startswith("#"), "each recipe starts with a comment saying what it is"
    cfg = load(path)
    assert Config.from_dict(yaml.safe_load(dump(cfg))) == cfg
    name, kwargs = model_kwargs(cfg)
    assert name == cfg.model.name and kwargs["norm"].kind == cfg.norm.kind


@pytest.mark.parametrize("path", STUDY_PRESETS, ids=[p.name for p in STUDY_PRESETS])
def test_every_study_preset_starts_with_a_comment_and_names_a_base_recipe(path):
    assert path.read_text().startswith("#"), "each preset starts with a comment saying what it is"
    preset = yaml.safe_load(path.read_text())
    assert (path.parent / preset["base"]).is_file() and (path.parent / preset["base"]) in RECIPES


def test_recipes_follow_the_published_configs():
    def get(name):
        cfg = load(CONFIGS / name)
        t, i = cfg.train, cfg.ipu
        return cfg, t.micro_batch * t.grad_accum * i.replicas

    for model in ("b0", "b4"):
        for variant, kind, g16 in (("g1-bn", "batch", False), ("g16-gn", "group", True),
                                   ("g16-ln", "layer", True)):
            cfg, _ = get(f"efficientnet-{model}-{variant}.yaml")
            assert cfg.model.name == f"efficientnet_{model}" + ("_g16" if g16 else "")
            assert cfg.norm.kind == kind and not cfg.norm.proxy
            assert cfg.data.dataset == "imagenet" and cfg.train.optimizer == "rmsprop_tf"
            assert cfg.train.lr_schedule == "exponential" and cfg.train.warmup_epochs == 5
            assert cfg.train.epochs == 350 and cfg.train.label_smoothing == 0.1
            assert cfg.train.weight_decay == pytest.approx(1e-5)

    cfg, batch = get("efficientnet-b0-g16-gn.yaml")  # 20 x 5 x 8, 2 IPUs, lr 0.05 at 800
    assert (batch, cfg.train.micro_batch, cfg.ipu.ipus_per_replica) == (800, 20, 2)
    assert cfg.train.lr == 0.05 and cfg.train.mixup_alpha == 0.1 and not cfg.train.cutmix
    assert cfg.norm.groups == 4 and cfg.norm.eps == pytest.approx(1e-3)
    cfg, batch = get("efficientnet-b4-g16-gn.yaml")  # 4 x 64 x 8, lr 0.1 at 2048
    assert (batch, cfg.train.lr, cfg.train.mixup_alpha, cfg.train.cutmix) == (2048, 0.1, 0.2, True)
    assert cfg.ipu.available_memory_proportion == [0.1] and cfg.ipu.device_iterations == 4
    cfg, batch = get("efficientnet-b4-g1-bn.yaml")  # 4 x 48 x 4 on 4 IPUs
    assert batch == 768 and cfg.ipu.pipeline_splits == ["blocks.1.1", "blocks.3.0", "blocks.4.5"]
    assert cfg.train.lr == pytest.approx(0.1 * 768 / 2048)
    cfg, _ = get("efficientnet-b0-g16-lnpn.yaml")
    assert (cfg.norm.kind, cfg.norm.proxy) == ("layer", True)
    cfg, _ = get("efficientnet-b0-g16-gn-halfres.yaml")
    assert (cfg.recipe, cfg.model.resolution, cfg.finetune.resolution) == ("halfres", 160, 224)
    assert (cfg.finetune.first_trainable, cfg.finetune.lr, cfg.finetune.epochs) == ("blocks.5.3", 0.25, 2)


def test_tiny_cpu_recipe():
    cfg = load(CONFIGS / "tiny-cpu.yaml")
    assert (cfg.model.name, cfg.norm.kind, cfg.model.resolution) == ("efficientnet_b0_g16", "group", 32)
    assert (cfg.model.num_classes, cfg.train.micro_batch, cfg.train.epochs) == (10, 4, 1)
    assert cfg.data.dataset == "generated" and cfg.train.precision == "32.32"


def test_replace_changes_fields_section_by_section_and_leaves_the_original():
    cfg = load(None, ["model.resolution=128", "train.epochs=5"])
    new = C.replace(cfg, {"recipe": "native", "model.resolution": 96, "train.lr": 1, "train.cutmix": True})
    assert (new.model.resolution, new.recipe, new.train.cutmix) == (96, "native", True)
    assert new.train.lr == 1.0 and isinstance(new.train.lr, float)  # coerced as a recipe's value would be
    assert new.train.epochs == 5 and new.model.name == cfg.model.name
    assert (cfg.model.resolution, cfg.train.lr, cfg.train.cutmix) != (96, 1.0, True)
    assert load(None, ["recipe=native", "model.resolution=96", "train.lr=1", "train.cutmix=true",
                       "train.epochs=5"]) == new


def test_replace_checks_values_keys_and_cross_field_rules_naming_its_source():
    cfg = load(None)
    with pytest.raises(ConfigError, match=r"^<phase>: train.optimizer = 'adamx' .*adamw"):
        C.replace(cfg, {"train.optimizer": "adamx"}, source="<phase>")
    with pytest.raises(ConfigError, match=r"<phase>.*did you mean 'train.epochs'"):
        C.replace(cfg, {"train.epoch": 3}, source="<phase>")
    with pytest.raises(ConfigError, match="same remainder modulo 32"):
        C.replace(cfg, {"recipe": "halfres", "model.resolution": 100, "finetune.resolution": 224})
    with pytest.raises(ConfigError, match="too small for mixup"):
        C.replace(cfg, {"train.mixup_alpha": 0.2, "train.micro_batch": 1})


def test_the_config_and_the_norm_spec_import_without_torch():
    import subprocess
    import sys

    code = ("import sys, ipu_effnet.config, norms; "
            "print('torch' in sys.modules, 'GroupNormAct' in dir(norms), norms.NormSpec(kind='layer').label); "
            "norms.GroupNormAct; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout.split()
    assert out == ["False", "True", "layer", "True"]
