"""`check`: a recipe is validated, its model built and its module paths resolved before any compute."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ipu_effnet.cli import main
from ipu_effnet.config import load

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted([*(ROOT / "configs").glob("*.yaml"), *(ROOT / "configs" / "quickstart").glob("*.yaml")])


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ipu_effnet", *argv], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_every_recipe_checks(recipe, capsys):
    assert main(["check", "--config", str(recipe), "--json"]) == 0
    assert '"params"' in capsys.readouterr().out


@pytest.mark.slow
def test_misspelt_key_in_yaml_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {ROOT / 'configs' / 'tiny-cpu.yaml'}\ntrain:\n  epohcs: 3\n")
    out = run_cli("check", "--config", str(bad))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "train.epohcs" in lines[0] and "train.epochs" in lines[0] and "bad.yaml" in lines[0]
    assert out.stdout == ""


@pytest.mark.slow
def test_overrides_are_recorded_in_the_resolved_config(tmp_path):
    out = run_cli("check", "--config", "configs/tiny-cpu.yaml", "--set", "train.epochs=3",
                  "--set", "norm.kind=layer", "--out", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    written = tmp_path / "run" / "config.yaml"
    text = written.read_text()
    assert "--set train.epochs=3" in text and "--set norm.kind=layer" in text
    data = yaml.safe_load(text)
    assert data["train"]["epochs"] == 3 and data["norm"]["kind"] == "layer"
    cfg = load(written)
    assert cfg == load("configs/tiny-cpu.yaml", ["train.epochs=3", "norm.kind=layer"])


def test_a_split_naming_no_module_is_refused_with_the_closest_paths(capsys):
    status = main(["check", "--config", "configs/tiny-cpu.yaml", "--set", "ipu.ipus_per_replica=2",
                   "--set", "ipu.pipeline_splits=[blocks.3.0.conv_px]"])
    assert status == 2
    err = capsys.readouterr().err
    assert "blocks.3.0.conv_px" in err and "blocks.3.0.conv_pw" in err


def test_a_group_size_that_does_not_divide_is_refused(capsys):
    status = main(["check", "--config", "configs/tiny-cpu.yaml", "--set", "model.name=efficientnet_b3",
                   "--set", "model.group_size=16"])
    assert status == 2
    assert "group_size 16 does not divide the 40 channels" in capsys.readouterr().err


def test_the_global_batch_counts_replicas_only_on_ipus(capsys):
    import json

    argv = ["check", "--config", "configs/tiny-cpu.yaml", "--set", "train.micro_batch=8", "--set",
            "train.grad_accum=2", "--set", "ipu.replicas=4", "--json"]
    assert main(argv) == 0  # the torch backend: one process's share, whatever ipu.replicas says
    assert json.loads(capsys.readouterr().out)["global_batch"] == 16
    assert main(argv[:-1] + ["--set", "backend=ipu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["global_batch"] == 64
