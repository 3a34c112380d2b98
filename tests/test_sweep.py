"""Resolution sweep: default resolutions, and `sweep` on a tiny trained checkpoint writing csv and png."""

import csv
import json

import pytest

from ipu_effnet.analysis.sweep import default_resolutions, parse_resolutions
from ipu_effnet.cli import main
from ipu_effnet.errors import UsageError

TINY = """
backend: torch
model: {name: efficientnet_tiny, num_classes: 4, resolution: 32, group_size: 16, drop_path_rate: 0.0}
norm: {kind: group, groups: 4}
data: {dataset: generated, num_train: 16, num_val: 12, workers: 0}
train: {epochs: 1, micro_batch: 8, optimizer: sgd, lr: 0.05, lr_schedule: cosine, warmup_epochs: 0}
logging: {progress: false, log_every: 1}
"""


def tiny_run(tmp_path, name="run", overrides=()):
    from ipu_effnet.config import load
    from ipu_effnet.run import train

    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(TINY)
    run_dir = tmp_path / name
    train(load(recipe, list(overrides)), run_dir, log=lambda _msg: None)
    return run_dir


def test_default_resolutions_follow_the_rule():
    # 0.5x..1.5x in steps of 32, multiples of 32 inside the range, training resolution included
    assert default_resolutions(224) == [128, 160, 192, 224, 256, 288, 320]
    assert default_resolutions(240) == [128, 160, 192, 224, 240, 256, 288, 320, 352]
    assert default_resolutions(128) == [64, 96, 128, 160, 192]
    assert default_resolutions(32, step=32) == [32]
    # small models step by 8 px
    assert default_resolutions(32) == [16, 24, 32, 40, 48]


def test_parse_resolutions():
    assert parse_resolutions("160, 128,160") == [128, 160]
    for bad in ("abc", "", "4"):
        with pytest.raises(UsageError):
            parse_resolutions(bad)


def test_sweep_writes_csv_and_png(tmp_path, capsys):
    run_dir = tiny_run(tmp_path)
    out = tmp_path / "out"
    assert main(["sweep", "--checkpoint", str(run_dir), "--res", "48,32,40", "--out", str(out),
                 "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["train_resolution"] == 32
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["resolution"]) for r in rows] == [32, 40, 48]
    assert all(int(r["images"]) == 12 for r in rows)
    assert all(0.0 <= float(r["top1"]) <= float(r["top5"]) <= 1.0 for r in rows)
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the row at the training resolution is what `evaluate` reports there
    summary = json.loads((run_dir / "summary.json").read_text())
    assert float(rows[0]["top1"]) == pytest.approx(summary["val_top1"])


def test_sweep_defaults_to_the_run_directory_and_default_resolutions(tmp_path):
    run_dir = tiny_run(tmp_path)
    ckpt = next((run_dir / "checkpoints").glob("*.pt"))
    assert main(["sweep", "--checkpoint", str(ckpt), "--no-progress"]) == 0
    with open(run_dir / "sweep.csv") as f:
        assert [int(r["resolution"]) for r in csv.DictReader(f)] == [16, 24, 32, 40, 48]
    assert (run_dir / "sweep.png").is_file()


def test_sweep_of_a_missing_path_is_a_usage_error(tmp_path):
    assert main(["sweep", "--checkpoint", str(tmp_path / "nope")]) == 2
