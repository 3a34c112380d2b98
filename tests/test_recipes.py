"""Recipes end to end on a tiny model (native, halfres + fine-tune, progressive) and their pure policy:
Algorithm 1's stage values, the half-resolution sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import tiny

from ipu_effnet.config import load
from ipu_effnet.resolutions import halfres_resolution, halfres_rule
from ipu_effnet.run import train
from ipu_effnet.run.phases import stage_index
from ipu_effnet.run.recipes import algorithm1, progressive_stages
from ipu_effnet.training.checkpoint import latest_checkpoint, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = tiny(
    "data.num_train=16",
    "data.num_val=8",
    "train.micro_batch=8",
    drop=("model.resolution", "model.drop_rate"),
)
QUIET = {"log": lambda _m: None}


def test_algorithm1_values_for_v2_s_endpoints():
    assert algorithm1(128, 300, 4) == pytest.approx([128, 128 + 172 / 3, 128 + 344 / 3, 300])
    assert algorithm1(0.1, 0.3, 3) == pytest.approx([0.1, 0.2, 0.3])
    stages = progressive_stages(4, [128, 300], dropout=[0.1, 0.3], randaugment=[5, 15], mixup=[0, 0])
    assert [s.resolution for s in stages] == [128, 184, 240, 300]  # inner sizes to a multiple of 8
    assert [s.dropout for s in stages] == pytest.approx([0.1, 0.1 + 0.2 / 3, 0.1 + 0.4 / 3, 0.3])
    assert [s.randaugment for s in stages] == pytest.approx([5, 5 + 10 / 3, 5 + 20 / 3, 15])
    assert [s.mixup for s in stages] == [0, 0, 0, 0]
    assert [stage_index(e, 8, 4) for e in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]  # epochs split evenly


def test_halfres_sizes():
    assert [halfres_rule(n) for n in (224, 240, 300, 456)] == [160, 176, 204, 328]  # the paper's B0, B1, B3, B5
    assert halfres_rule(380) % 32 == 380 % 32
    cfg = load(ROOT / "configs" / "efficientnet-b4-g16-lnpn-halfres.yaml")
    assert halfres_resolution(cfg) == 252
    assert halfres_resolution(load(None, ["model.name=efficientnet_b2_g16"])) == 192
    assert halfres_resolution(load(None, ["model.name=efficientnet_tiny"])) == 32  # 64 / sqrt(2) = 45 -> 32


def test_native_recipe_is_train(tmp_path):
    cfg = load(ROOT / "configs" / "tiny-cpu.yaml", TINY + ["model.resolution=32"])
    summary = train(cfg, tmp_path, **QUIET)
    assert summary["recipe"] == "native" and summary["resolution"] == 32 and summary["steps"] == 2
    assert Path(summary["checkpoint"]).parent == tmp_path / "checkpoints"


def test_halfres_recipe_trains_fine_tunes_and_does_not_redo_phases(tmp_path):
    cfg = load(ROOT / "configs" / "tiny-cpu.yaml",
               TINY + ["recipe=halfres", "model.resolution=32", "finetune.resolution=64", "finetune.epochs=1"])
    summary = train(cfg, tmp_path, **QUIET)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert (summary["resolution"], summary["finetune_resolution"], summary["eval_resolution"]) == (32, 64, 64)
    for key in ("val_top1", "val_top5", "val_loss", "val_top1_averaged", "train_images_per_sec", "params",
                "val_top1_before_finetune", "finetune_images_per_sec"):
        assert summary[key] is not None, key
    assert set(summary["phases"]) == {"train", "finetune"}
    assert summary["val_top1"] == summary["phases"]["finetune"]["val_top1"]
    assert load_checkpoint(latest_checkpoint(tmp_path))["config"]["model"]["resolution"] == 64
    ft_ckpts = sorted((tmp_path / "finetune" / "checkpoints").iterdir())
    mtimes = [p.stat().st_mtime_ns for p in ft_ckpts]
    again = train(cfg, tmp_path, resume=True, **QUIET)  # both phases complete: nothing is redone
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "finetune" / "checkpoints").iterdir())] == mtimes
    assert again["val_top1"] == summary["val_top1"]


def test_progressive_recipe_runs_its_stages(tmp_path):
    cfg = load(ROOT / "configs" / "tiny-cpu-progressive.yaml", TINY[:-2] + ["train.epochs=3"])
    summary = train(cfg, tmp_path, **QUIET)
    assert summary["stage_resolutions"] == [32, 40, 48] and summary["resolution"] == 48
    assert summary["steps"] == 3 * 2
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == [1, 2, 3]


def test_only_the_main_process_speaks_for_a_recipe(monkeypatch):
    from ipu_effnet.run.recipes import is_main_process

    monkeypatch.delenv("RANK", raising=False)
    assert is_main_process()
    monkeypatch.setenv("RANK", "1")  # torchrun's second rank
    assert not is_main_process()
