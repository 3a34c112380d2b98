"""The recipe study: the verdict rule on made-up per-seed numbers (one case per verdict), presets and the
plan, and a 2-seed micro study on a subset of the Imagenette copy next to the checkout (4 classes x 24
training images at 64 px) that writes every output, with means and spreads that match the per-seed rows."""

import csv
import math
import os
import statistics
from pathlib import Path

import pytest

from ipu_effnet.analysis.compare import BenchSettings
from ipu_effnet.analysis.study import (
    RUN_COLUMNS,
    STUDY_COLUMNS,
    findings_for,
    load_preset,
    plan_study,
    study,
    verdict,
)
from ipu_effnet.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
IMAGENETTE = Path(os.environ.get("IPU_EFFNET_IMAGENETTE", ROOT.parent / "shared" / "imagenette2-224"))
needs_imagenette = pytest.mark.skipif(
    not (IMAGENETTE / "train").is_dir(),
    reason=f"the Imagenette copy {IMAGENETTE} (train/, val/) is absent; set IPU_EFFNET_IMAGENETTE or run "
           "`./run.sh download imagenette --to DIR`")


# ----------------------------------------------------------------------------------------------------
# The verdict rule


def test_verdict_supported_when_the_difference_exceeds_twice_its_standard_error():
    v = verdict([0.80, 0.82, 0.81], [0.70, 0.71, 0.69])
    se = math.sqrt(statistics.variance([0.80, 0.82, 0.81]) / 3 + statistics.variance([0.70, 0.71, 0.69]) / 3)
    assert v.verdict == "supported"
    assert v.diff == pytest.approx(0.11)
    assert v.se == pytest.approx(se)
    assert v.n == (3, 3)


def test_verdict_contradicted_when_the_difference_has_the_other_sign_beyond_twice_its_error():
    v = verdict([0.60, 0.62], [0.70, 0.71])
    assert v.verdict == "contradicted"
    assert v.diff == pytest.approx(-0.095)
    # the same numbers for a claim that says a < b are a support
    assert verdict([0.60, 0.62], [0.70, 0.71], sign=-1).verdict == "supported"


def test_verdict_within_noise_when_the_seeds_spread_more_than_the_means_differ():
    v = verdict([0.70, 0.80], [0.72, 0.76])
    assert v.verdict == "within noise"
    assert abs(v.diff) <= 2 * v.se
    # the boundary: a = [x, x + 0.2], b = [0, 0] gives se = 0.1 and d = x + 0.1, so 2 se is crossed at x = 0.1
    assert verdict([0.09, 0.29], [0.0, 0.0]).verdict == "within noise"
    assert verdict([0.11, 0.31], [0.0, 0.0]).verdict == "supported"
    assert verdict([-0.31, -0.11], [0.0, 0.0]).verdict == "contradicted"
    assert verdict([0.5, 0.5], [0.5, 0.5]).verdict == "within noise"  # no difference, no spread


def test_verdict_one_sided_quantity_and_too_few_seeds():
    # a gap (e.g. best minus training resolution) against 0: se = s / sqrt(n)
    v = verdict([32.0, 32.0, 64.0])
    assert v.verdict == "supported" and v.diff == pytest.approx(128 / 3)
    assert verdict([-16.0, 16.0]).verdict == "within noise"
    one = verdict([0.9], [0.5, 0.6])
    assert one.verdict is None and one.se is None and one.diff == pytest.approx(0.35)


def test_findings_give_numbers_without_verdicts_below_two_seeds():
    runs = [{"recipe": "lnpn-native", "norm": "lnpn", "kind": "native", "top1": 0.6, "best_resolution": 160,
             "train_resolution": 128, "train_images_per_sec": 100.0},
            {"recipe": "bn-native", "norm": "bn", "kind": "native", "top1": 0.7, "best_resolution": 128,
             "train_resolution": 128, "train_images_per_sec": 110.0}]
    found = {f["id"]: f for f in findings_for(runs)}
    assert set(found) == {"lnpn-vs-bn", "fixres-lnpn", "fixres-bn"}  # no ln, gn or half-res runs
    assert found["lnpn-vs-bn"]["diff"] == pytest.approx(-10.0)  # points
    assert all(f["verdict"] is None for f in found.values())


# ----------------------------------------------------------------------------------------------------
# Presets and the plan


def test_shipped_presets_load_and_their_recipes_validate(tmp_path):
    from ipu_effnet.config import load

    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "b").mkdir()
    for name in ("imagenette-cpu", "imagenette-gpu"):
        preset = load_preset(name)
        assert preset.norms == ["bn", "gn", "ln", "lnpn"] and preset.kinds == ["native", "halfres"]
        plan = plan_study(preset, str(tmp_path), seeds=2)
        assert len(plan.runs) == 16 and len({r.name for r in plan.runs}) == 16
        assert "model.num_classes=2" in plan.overrides
        for r in plan.runs:
            cfg = load(preset.base, r.overrides + plan.overrides)
            assert cfg.train.seed == r.seed and cfg.recipe == r.kind
            assert cfg.norm.proxy == (r.norm == "lnpn")
            if r.kind == "halfres":  # trains below the fine-tune (= native test) size
                assert cfg.model.resolution < cfg.finetune.resolution


def test_bad_presets_and_options_fail_with_one_line(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(UsageError, match="no such preset"):
        load_preset("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: ../configs/tiny-cpu.yaml\nnorms: [bn]\ncolour: red\n")
    with pytest.raises(UsageError, match="unknown key"):
        load_preset(str(bad))
    bad.write_text(f"base: {ROOT / 'configs' / 'tiny-cpu.yaml'}\nnorms: [bn, xn]\n")
    with pytest.raises(UsageError, match="xn"):
        load_preset(str(bad))
    preset = load_preset("imagenette-cpu")
    with pytest.raises(UsageError, match="--seeds"):
        plan_study(preset, str(tmp_path), overrides=["train.seed=3"])
    with pytest.raises(UsageError, match="no such directory"):
        plan_study(preset, str(tmp_path / "missing"))
    with pytest.raises(UsageError, match="expected train"):
        plan_study(preset, str(tmp_path / "train" / "a"))
    with pytest.raises(UsageError, match="kind"):
        plan_study(preset, str(tmp_path), kinds=["fast"])


# ----------------------------------------------------------------------------------------------------
# The micro study


MICRO_RECIPE = """
backend: torch
model: {name: efficientnet_tiny, num_classes: 10, resolution: 64, group_size: 16, drop_path_rate: 0.0}
norm: {kind: batch, groups: 4}
data: {dataset: imagenet, workers: 0, verify_images: false}
train: {epochs: 1, micro_batch: 24, optimizer: adamw, lr: 0.004, lr_schedule: cosine, warmup_epochs: 0,
        weight_decay: 0.05, bn_recalibration_batches: 1, weight_avg_decay: 0.5}
finetune: {epochs: 1, resolution: 64, lr: 0.02}
logging: {progress: false, log_every: 5}
"""
MICRO_PRESET = """
base: micro-recipe.yaml
norms: [bn, lnpn]
kinds: [native, halfres]
seeds: 2
resolutions: [48, 64]
kind_overrides:
  native: [model.resolution=64]
  halfres: [model.resolution=32, finetune.resolution=64]
"""


def micro_subset(dest: Path, classes: int = 4, train: int = 24, val: int = 6) -> Path:
    """DEST/train/<wnid>/ and DEST/val/<wnid>/: links to the first images of the first classes."""
    for split, count in (("train", train), ("val", val)):
        for wnid in sorted(p.name for p in (IMAGENETTE / split).iterdir() if p.is_dir())[:classes]:
            (dest / split / wnid).mkdir(parents=True)
            for img in sorted((IMAGENETTE / split / wnid).iterdir())[:count]:
                (dest / split / wnid / img.name).symlink_to(img.resolve())
    return dest


def _read(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@needs_imagenette
def test_micro_study_writes_every_output_and_its_means_match_the_seeds(tmp_path):
    data = micro_subset(tmp_path / "data")
    (tmp_path / "micro-recipe.yaml").write_text(MICRO_RECIPE)
    (tmp_path / "micro.yaml").write_text(MICRO_PRESET)
    plan = plan_study(load_preset(str(tmp_path / "micro.yaml")), str(data))
    assert "model.num_classes=4" in plan.overrides
    bench = BenchSettings(batch=2, steps=1, warmup=0, infer_seconds=0, rounds=1, train_steps=1, train_warmup=0, train_seconds=0,
                          target_error=0, memory=False)
    out = tmp_path / "study"
    result = study(plan, out, bench=bench, progress=False, log=lambda _m: None)
    for name in ("runs.csv", "study.csv", "study.md", "findings.md", "accuracy_vs_resolution.png", "pareto.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not (out / "compare.md").exists()  # the study writes its own summary, not compare's

    runs = _read(out / "runs.csv")
    assert list(runs[0]) == RUN_COLUMNS and len(runs) == 8
    assert sorted({(r["recipe"], r["seed"]) for r in runs}) == sorted(
        (f"{n}-{k}", str(s)) for n in ("bn", "lnpn") for k in ("native", "halfres") for s in (0, 1))
    assert {r["train_resolution"] for r in runs if r["kind"] == "halfres"} == {"32"}
    assert {r["test_resolution"] for r in runs} == {"64"}
    rows = _read(out / "study.csv")
    assert list(rows[0]) == STUDY_COLUMNS and [r["recipe"] for r in rows] == [
        "bn-native", "bn-halfres", "lnpn-native", "lnpn-halfres"]
    for row in rows:
        seeds = [r for r in runs if r["recipe"] == row["recipe"]]
        assert row["seeds"] == "2"
        for key in ("top1", "best_top1", "best_resolution", "train_images_per_sec", "infer_images_per_sec"):
            values = [float(r[key]) for r in seeds]
            assert float(row[f"{key}_mean"]) == pytest.approx(statistics.fmean(values)), key
            assert float(row[f"{key}_std"]) == pytest.approx(statistics.stdev(values)), key
    # the seed reaches the run: the two seeds' trained weights differ
    from ipu_effnet.analysis.sweep import resolve_checkpoint
    from ipu_effnet.training.checkpoint import load_checkpoint

    weights = [load_checkpoint(resolve_checkpoint(out / "runs" / f"bn-native-s{s}"))["model"] for s in (0, 1)]
    assert weights[0].keys() == weights[1].keys()
    assert any(not weights[0][k].equal(weights[1][k]) for k in weights[0] if weights[0][k].is_floating_point())

    findings = (out / "findings.md").read_text()
    assert "Verdict rule" in findings
    verdict_lines = [line for line in findings.splitlines() if line.startswith("- **")]
    ids = {f["id"] for f in result.findings}
    assert {"lnpn-vs-bn", "halfres-vs-native-bn", "halfres-vs-native-lnpn", "fixres-bn",
            "halfres-speed-lnpn"} <= ids and "lnpn-vs-ln" not in ids
    assert len(verdict_lines) == len(result.findings)
    assert all(any(w in line for w in ("**supported**", "**contradicted**", "**within noise**"))
               for line in verdict_lines)
    lnpn_bn = next(f for f in result.findings if f["id"] == "lnpn-vs-bn")
    top1 = {k: [float(r["top1"]) for r in runs if r["recipe"] == k] for k in ("lnpn-native", "bn-native")}
    assert lnpn_bn["diff"] == pytest.approx(100 * (statistics.fmean(top1["lnpn-native"])
                                                   - statistics.fmean(top1["bn-native"])))
    table = (out / "study.md").read_text()
    assert "LN+PN half-res + FT" in table and " ± " in table

    # rerun (seed 0 only): nothing trains again, the sweeps are reused, the outputs are rewritten
    plan0 = plan_study(load_preset(str(tmp_path / "micro.yaml")), str(data), seeds=1)
    swept = {r.name: (out / "runs" / r.name / "sweep.csv").stat().st_mtime_ns for r in plan0.runs}
    again = study(plan0, out, bench=bench, progress=False, log=lambda _m: None,
                  train_fn=lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert sorted(again.skipped) == sorted(r.name for r in plan0.runs) and not again.trained
    # (sweep.csv keeps 6 decimals)
    assert [r["top1"] for r in again.runs] == pytest.approx([r["top1"] for r in result.runs if r["seed"] == 0],
                                                           abs=1e-6)
    assert swept == {r.name: (out / "runs" / r.name / "sweep.csv").stat().st_mtime_ns for r in plan0.runs}
    assert len(_read(out / "runs.csv")) == 4 and "no verdict" in (out / "findings.md").read_text()


def test_the_command_answers_bad_input_with_one_line_and_status_2(tmp_path, capsys):
    from ipu_effnet.cli import main

    (tmp_path / "train" / "a").mkdir(parents=True)
    assert main(["study", "--data", str(tmp_path), "--preset", "nope", "--out", str(tmp_path / "o")]) == 2
    assert main(["study", "--data", str(tmp_path), "--norms", "bn,xx", "--out", str(tmp_path / "o")]) == 2
    assert main(["study", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert not (tmp_path / "o").exists()  # nothing ran
