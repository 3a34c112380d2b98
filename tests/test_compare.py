"""Recipe comparison: the Pareto front, the table and plots over two tiny recipes, and a comparison
interrupted mid-matrix that, rerun, does not train its completed runs again."""

import csv
import dataclasses
import json
import os
from pathlib import Path

import pytest

from ipu_effnet.analysis.compare import (
    BenchSettings,
    compare,
    matrix_recipes,
    recipes_from_files,
    run_state,
    train_recipe,
)
from ipu_effnet.analysis.plots import pareto_front
from ipu_effnet.analysis.report import format_summary, format_table
from ipu_effnet.errors import UsageError

TINY = """
backend: torch
model: {{name: efficientnet_tiny, num_classes: 4, resolution: 32, group_size: 16, drop_path_rate: 0.0}}
norm: {{kind: {norm}, groups: 4}}
data: {{dataset: generated, num_train: 16, num_val: 8, workers: 0}}
train: {{epochs: 1, micro_batch: 8, optimizer: sgd, lr: 0.05, lr_schedule: cosine, warmup_epochs: 0}}
logging: {{progress: false, log_every: 1}}
"""
# memory off: each CPU measurement is a fresh process (~2 s); the tests that check it turn it on
BENCH = BenchSettings(batch=2, steps=1, warmup=0, infer_seconds=0, rounds=1, train_steps=1, train_warmup=0,
                      train_seconds=0, target_error=0, memory=False)


def test_error_bar_spans_the_relative_error_either_side():
    from ipu_effnet.analysis.plots import error_bar

    assert error_bar(100.0, 0.05) == pytest.approx((95.0, 105.0))
    assert error_bar(100.0, 0.0) is None and error_bar(None, 0.05) is None and error_bar(100.0, None) is None


def test_speed_note_says_when_the_rounds_ran_out():
    from ipu_effnet.analysis.compare import SpeedMeasurement
    from ipu_effnet.analysis.report import speed_note

    rounds = [[1.0] * 20, [2.0] * 20]
    short = speed_note(SpeedMeasurement([1.0, 2.0], [0.01, 0.03], rounds, 275.4, 0.025))
    assert short.startswith("training speed: 20 rounds of 2 recipes taking turns, 275 s in all")
    assert "standard error 1.0%-3.0%" in short and "the largest, 3.00%, above the 2.50% aimed at" in short
    reached = speed_note(SpeedMeasurement([1.0, 2.0], [0.01, 0.02], rounds, 275.4, 0.025))
    assert "standard error 1.0%-2.0%" in reached and "aimed at" not in reached
    fixed = speed_note(SpeedMeasurement([1.0, 2.0], [0.01, 0.03], rounds, 275.4, 0.0))
    assert "aimed at" not in fixed
    inference = speed_note(SpeedMeasurement([1.0, 2.0], [0.01, 0.03], rounds, 61.0, 0.0, "inference"))
    assert inference.startswith("inference speed: 20 rounds of 2 recipes taking turns, 61 s in all")


def test_pareto_front_on_hand_made_points():
    points = [(1.0, 0.5), (2.0, 0.9), (3.0, 0.7), (2.5, 0.6), (4.0, 0.3), (0.5, 0.95), (4.0, 0.2), (2.0, 0.9)]
    # (2.5, 0.6) is beaten by (3, 0.7); (4, 0.2) by (4, 0.3); the repeated (2, 0.9) is kept once
    assert pareto_front(points) == [5, 1, 2, 4]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0)]) == [0]


def recipes(tmp_path, norms=("group", "layer")):
    paths = []
    for norm in norms:
        p = tmp_path / f"tiny-{norm}.yaml"
        p.write_text(TINY.format(norm=norm))
        paths.append(str(p))
    return recipes_from_files(paths)


@pytest.mark.slow
def test_compare_writes_table_and_plots_and_rerun_skips_completed_runs(tmp_path):
    out = tmp_path / "cmp"
    calls = []

    def interrupted(cfg, run_dir, **kwargs):
        calls.append(run_dir.name)
        if len(calls) == 2:  # killed in the middle of the second recipe, after its first checkpoint
            raise KeyboardInterrupt
        return train_recipe(cfg, run_dir, **kwargs)

    rs = recipes(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        compare(rs, out, bench=BENCH, progress=False, log=lambda _m: None, train_fn=interrupted)
    first = out / "runs" / "tiny-group" / "summary.json"
    assert run_state(out / "runs" / "tiny-group") == "complete"
    assert run_state(out / "runs" / "tiny-layer") == "new"
    mtime = os.stat(first).st_mtime_ns

    calls.clear()

    def counting(cfg, run_dir, **kwargs):
        calls.append((run_dir.name, kwargs["resume"]))
        return train_recipe(cfg, run_dir, **kwargs)

    result = compare(rs, out, sweep_resolutions=[32, 40], bench=BENCH, progress=False, log=lambda _m: None,
                     train_fn=counting)
    assert calls == [("tiny-layer", False)]
    assert result.skipped == ["tiny-group"] and result.trained == ["tiny-layer"]
    assert os.stat(first).st_mtime_ns == mtime
    for name in ("compare.md", "compare.csv", "accuracy_vs_resolution.png", "pareto.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["recipe"] for r in rows] == ["tiny-group", "tiny-layer"]
    for r in rows:
        assert r["model"] == "efficientnet_tiny"
        assert int(r["train_resolution"]) == 32 and int(r["test_resolution"]) == 32
        assert float(r["params"]) > 0 and float(r["gmacs_train"]) > 0
        assert float(r["gmacs_train"]) == pytest.approx(float(r["gmacs_test"]))
        assert float(r["infer_images_per_sec"]) > 0 and float(r["train_images_per_sec"]) > 0
        assert float(r["run_train_images_per_sec"]) > 0  # the run's own average, kept beside it
        assert r["train_error"] == "" and r["infer_error"] == ""  # one round (BENCH): no standard error yet
        assert int(r["bench_batch"]) == BENCH.batch
        assert 0.0 <= float(r["top1"]) <= 1.0
        assert int(r["best_resolution"]) in (32, 40)
        assert r["peak_memory_mb"] == "" and r["memory_kind"] == ""  # memory off: not measured
    assert [r["norm"] for r in rows] == ["group", "layer"]
    md = (out / "compare.md").read_text()
    assert "| tiny-group |" in md and "GMACs train" in md and "not measured" in md
    speed = result.training_speed
    assert speed.rounds == BENCH.rounds and len(speed.round_rates) == 2 and speed.seconds > 0
    assert f"in {speed.seconds:.0f} s" in md and "train ±" in md and "standard error" in md
    inference = result.inference_speed
    assert inference.what == "inference" and inference.rounds == BENCH.rounds and len(inference.round_rates) == 2
    assert [float(r["infer_images_per_sec"]) for r in rows] == pytest.approx(inference.rates)
    assert f"(median of the rounds, {inference.rounds} round in {inference.seconds:.0f} s)" in md and "infer ±" in md
    assert f"(the recipes taking turns, {speed.rounds} round in {speed.seconds:.0f} s)" in md
    text = format_summary(result)
    assert "most accurate:" in text and "reused 1 complete run(s): tiny-group" in text
    rounds = "1 round" if speed.rounds == 1 else f"{speed.rounds} rounds"
    assert f"training speed: {rounds} of 2 recipes taking turns" in text
    assert f"inference speed: {rounds} of 2 recipes taking turns" in text
    assert json.loads((out / "inference_speed.json").read_text())["measurement"] == "inference"
    recorded = json.loads((out / "training_speed.json").read_text())
    assert recorded["rounds"] == speed.rounds and sorted(recorded["recipes"]) == ["tiny-group", "tiny-layer"]
    assert recorded["recipes"]["tiny-layer"]["rounds"] == speed.round_rates[1]
    assert recorded["recipes"]["tiny-layer"]["images_per_sec"] == pytest.approx(float(rows[1]["train_images_per_sec"]))

    # a third call trains nothing and reuses the sweeps
    calls.clear()
    sweep_mtime = os.stat(out / "runs" / "tiny-layer" / "sweep.csv").st_mtime_ns
    result = compare(rs, out, bench=BENCH, progress=False, log=lambda _m: None, train_fn=counting)
    assert calls == [] and result.skipped == ["tiny-group", "tiny-layer"]
    assert os.stat(out / "runs" / "tiny-layer" / "sweep.csv").st_mtime_ns == sweep_mtime


@pytest.mark.slow
def test_an_interrupted_run_is_resumed(tmp_path):
    out = tmp_path / "cmp"
    rs = recipes(tmp_path, norms=("group",))
    run_dir = out / "runs" / "tiny-group"
    compare(rs, out, sweep_resolutions=[32], bench=dataclasses.replace(BENCH, memory=True), progress=False,
            log=lambda _m: None)
    # peak memory as bench measures it: a fresh process's VmHWM, interpreter and torch included
    with open(out / "compare.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["memory_kind"] == "vmhwm" and "VmHWM" in row["memory_method"]
    assert float(row["peak_memory_mb"]) >= float(row["built_memory_mb"]) > 50
    md = (out / "compare.md").read_text()
    assert "VmHWM" in md and "fresh Python process" in md and "not measured" not in md
    (run_dir / "summary.json").unlink()  # as if killed after the last checkpoint
    assert run_state(run_dir) == "partial"
    calls = []

    def counting(cfg, run_dir, **kwargs):
        calls.append(kwargs["resume"])
        return train_recipe(cfg, run_dir, **kwargs)

    compare(rs, out, sweep_resolutions=[32], bench=BENCH, progress=False, log=lambda _m: None, train_fn=counting)
    assert calls == [True] and run_state(run_dir) == "complete"


def test_bad_inputs_fail_before_training(tmp_path):
    with pytest.raises(UsageError):
        recipes_from_files([str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.format(norm="group") + "trian: {epochs: 1}\n")
    with pytest.raises(UsageError):
        compare(recipes_from_files([str(bad)]), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "runs").exists()
    with pytest.raises(UsageError):
        matrix_recipes(str(bad), ["xx"], ["native"])
    m = matrix_recipes(str(bad), ["bn", "lnpn"], ["native", "halfres"])
    assert [r.name for r in m] == ["bad-bn-native", "bad-bn-halfres", "bad-lnpn-native", "bad-lnpn-halfres"]
    assert "norm.proxy=true" in m[2].overrides


@pytest.mark.parametrize("command", ["compare", "quickstart", "study"])
def test_bench_options_reach_the_settings_and_bad_ones_fail_before_any_work(command, tmp_path, capsys):
    from ipu_effnet.cli import build_parser, main
    from ipu_effnet.commands.compare import bench_settings

    required = {"compare": ["--recipes", "x.yaml"], "quickstart": [], "study": ["--data", "d"]}[command]
    out = ["--out", str(tmp_path / "out")]
    parser, _ = build_parser()
    args = parser.parse_args([command, *required, *out, "--bench-rounds", "9", "--bench-seconds", "0",
                              "--bench-threads", "1", "--bench-max-rounds", "12", "--bench-target-error", "0.05",
                              "--bench-infer-seconds", "0.5"])
    got = bench_settings(args)
    assert (got.rounds, got.train_seconds, got.threads, got.infer_seconds) == (9, 0.0, 1, 0.5)
    assert (got.max_rounds, got.target_error) == (12, 0.05)
    default = bench_settings(parser.parse_args([command, *required, *out]))
    assert (default.rounds, default.train_seconds, default.threads, default.infer_seconds) == (10, 2.0, None, 1.0)
    assert (default.max_rounds, default.target_error) == (20, 0.02)
    quick = bench_settings(parser.parse_args([command, *required, *out, "--bench-max-rounds", "5"]))
    assert (quick.rounds, quick.max_rounds) == (5, 5)  # the default least follows a lower most
    for option, value in [("--bench-rounds", "0"), ("--bench-seconds", "-1"), ("--bench-seconds", "nan"),
                          ("--bench-infer-seconds", "-1"), ("--bench-infer-seconds", "inf"),
                          ("--bench-threads", "0"), ("--bench-batch", "0"), ("--bench-max-rounds", "0"),
                          ("--bench-target-error", "1.5"), ("--bench-target-error", "-0.1"),
                          ("--bench-target-error", "nan")]:
        assert main([command, *required, *out, option, value]) == 2
        assert f"{option} {value}" in capsys.readouterr().err.replace("-1.0", "-1")
    assert main([command, *required, *out, "--bench-rounds", "9", "--bench-max-rounds", "8"]) == 2
    assert "--bench-max-rounds 8: must be at least --bench-rounds (9)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_table_formats_missing_values():
    table = format_table([{"recipe": "a", "top1": 0.5, "train_images_per_sec": None}])
    assert "| a |" in table and "50.00%" in table and " - " in table


@pytest.mark.slow
def test_training_speed_is_measured_with_the_recipes_taking_turns(monkeypatch):
    """measure_training runs the recipe's real step (the weights move) in rounds that alternate over the
    recipes, and gives each the median of its rounds."""
    import torch

    from ipu_effnet.analysis import bench as bench_mod
    from ipu_effnet.analysis.bench import Timing
    from ipu_effnet.analysis.compare import measure_training
    from ipu_effnet.config import load, model_kwargs
    from ipu_effnet.models import create_model

    order, rates = [], iter([10.0, 100.0, 30.0, 300.0, 20.0, 200.0])

    def fake_measure(workload):
        workload.step()
        order.append(workload.resolution)
        return Timing(next(rates), 1.0)

    monkeypatch.setattr(bench_mod, "measure", fake_measure)
    jobs = []
    for res in (32, 16):
        cfg = load(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml", ["model.name=efficientnet_tiny", "model.num_classes=4",
                                                         "train.micro_batch=2"])
        name, kwargs = model_kwargs(cfg)
        jobs.append({"model": create_model(name, **kwargs), "cfg": cfg, "resolution": res})
    before = jobs[0]["model"].classifier.weight.detach().clone()
    got = measure_training(jobs, BenchSettings(rounds=3))
    assert order == [32, 16, 32, 16, 32, 16]
    assert got == [20.0, 200.0]
    assert not torch.equal(before, jobs[0]["model"].classifier.weight)


def _training_jobs(count: int):
    from ipu_effnet.config import load, model_kwargs
    from ipu_effnet.models import create_model

    jobs = []
    for _ in range(count):
        cfg = load(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml",
                   ["model.name=efficientnet_tiny", "model.num_classes=4", "train.micro_batch=2"])
        name, kwargs = model_kwargs(cfg)
        jobs.append({"model": create_model(name, **kwargs), "cfg": cfg, "resolution": 16})
    return jobs


def test_training_speed_ratios_come_from_rounds_measured_back_to_back(monkeypatch):
    """A round in which the machine got busier moves both jobs of that round: the second job's figure
    is the first's median times the median of the per-round ratios (here 10, 5, 10: 10), not the ratio
    of the medians (150 / 20 = 7.5)."""
    from ipu_effnet.analysis import bench as bench_mod
    from ipu_effnet.analysis.bench import Timing
    from ipu_effnet.analysis.compare import measure_training

    rates = iter([10.0, 100.0, 30.0, 150.0, 20.0, 200.0])
    monkeypatch.setattr(bench_mod, "measure", lambda workload: Timing(next(rates), 1.0))
    got = measure_training(_training_jobs(2), BenchSettings(rounds=3, train_seconds=0, target_error=0))
    assert got == [20.0, 200.0]


def test_training_speed_error_ignores_load_that_moves_every_job_alike(monkeypatch):
    """Rounds in which every job is twice as fast as in the round before give standard error 0 (the load
    moved them alike), and the measurement stops at the least rounds. A job that doubles against the
    other in one round of three: each job's log rate relative to the round's geometric mean moves by
    ln(2) / 2 in that round, so both get sqrt(pi / 2) * (ln(2) / 2 / sqrt(3)) / sqrt(3)."""
    import math

    from ipu_effnet.analysis import bench as bench_mod
    from ipu_effnet.analysis.bench import Timing
    from ipu_effnet.analysis.compare import measure_training_speed, relative_errors

    rates = iter([10.0, 100.0, 20.0, 200.0, 40.0, 400.0])
    monkeypatch.setattr(bench_mod, "measure", lambda workload: Timing(next(rates), 1.0))
    speed = measure_training_speed(_training_jobs(2), BenchSettings(rounds=3, train_seconds=0))
    assert speed.round_rates == [[10.0, 20.0, 40.0], [100.0, 200.0, 400.0]]
    assert speed.rates == [20.0, 200.0] and speed.rounds == 3 and speed.seconds > 0
    assert speed.errors == pytest.approx([0.0, 0.0], abs=1e-12)

    expected = math.sqrt(math.pi / 2) * math.log(2) / 6
    assert relative_errors([[10.0, 10.0, 10.0], [100.0, 200.0, 100.0]]) == pytest.approx([expected, expected])
    assert relative_errors([[100.0, 100.0]]) == pytest.approx([0.0])  # one job: its own rates
    assert relative_errors([[100.0], [200.0]]) == [None, None]        # one round: no error yet
    assert relative_errors([]) == []


def _alternating_rates(monkeypatch):
    """The first job steady at 100 img/s, the second alternating 100 and 200 against it."""
    from ipu_effnet.analysis import bench as bench_mod
    from ipu_effnet.analysis.bench import Timing

    calls = []

    def fake_measure(workload):
        calls.append(workload)
        job, round_ = (len(calls) - 1) % 2, (len(calls) - 1) // 2
        return Timing(100.0 if job == 0 else (200.0 if round_ % 2 else 100.0), 1.0)

    monkeypatch.setattr(bench_mod, "measure", fake_measure)


def test_training_speed_goes_on_until_the_standard_error_is_reached(monkeypatch):
    """Past the least rounds the recipes keep taking turns while a standard error is above the target:
    it stops at the first round at which every error is at most the target, or at the most rounds."""
    from ipu_effnet.analysis.compare import measure_training_speed, relative_errors

    _alternating_rates(monkeypatch)
    settings = BenchSettings(rounds=3, train_seconds=0, target_error=0.08, max_rounds=40)
    speed = measure_training_speed(_training_jobs(2), settings)
    assert speed.rounds > 3 and speed.target_error == 0.08
    assert max(speed.errors) <= 0.08
    assert max(relative_errors([r[:-1] for r in speed.round_rates])) > 0.08  # one round fewer: not yet

    capped = measure_training_speed(_training_jobs(2), dataclasses.replace(settings, max_rounds=4))
    assert capped.rounds == 4 and max(capped.errors) > 0.08
    fixed = measure_training_speed(_training_jobs(2), dataclasses.replace(settings, target_error=0))
    assert fixed.rounds == 3 and fixed.target_error == 0
    alone = measure_training_speed(_training_jobs(1), settings)
    assert alone.rounds == 3 and alone.target_error == 0  # one job: no ratio to make precise


def test_training_speed_measures_at_least_train_seconds_per_round(monkeypatch):
    """The number of timed steps is sized from a calibration step to fill train_seconds (never fewer
    than train_steps); with train_seconds 0 it is exactly train_steps."""
    from ipu_effnet.analysis import bench as bench_mod
    from ipu_effnet.analysis.bench import Timing
    from ipu_effnet.analysis.compare import measure_training

    steps = []

    def fake_measure(workload):
        steps.append(workload.config.steps)
        return Timing(1.0, 1.0)

    monkeypatch.setattr(bench_mod, "measure", fake_measure)
    measure_training(_training_jobs(1), BenchSettings(rounds=1, train_steps=2, train_seconds=0))
    measure_training(_training_jobs(1), BenchSettings(rounds=1, train_steps=2, train_seconds=600.0))
    assert steps[0] == 2 and steps[1] > 2



def test_training_speed_times_the_step_bench_builds(monkeypatch):
    """compare's training column and bench's train mode time one definition of a training step:
    bench.training_workload, here given the recipe's TrainConfig (its loss, optimiser, accumulation)."""
    from ipu_effnet.analysis import bench as bench_mod
    from ipu_effnet.analysis.compare import measure_training

    built, real = [], bench_mod.training_workload

    def spy(cfg, network, res, train=None):
        built.append((cfg, network, res, train))
        return real(cfg, network, res, train=train)

    monkeypatch.setattr(bench_mod, "training_workload", spy)
    jobs = _training_jobs(1)
    (rate,) = measure_training(jobs, BenchSettings(rounds=1, train_steps=1, train_warmup=0, train_seconds=0))
    ((cfg, network, res, train),) = built
    assert network is jobs[0]["model"] and res == 16 and train is jobs[0]["cfg"].train
    assert (cfg.mode, cfg.batch, cfg.num_classes, cfg.res) == ("train", 2 * train.grad_accum, 4, 16)
    assert rate > 0

def test_inference_speed_takes_turns_on_the_inference_copy_without_grad(monkeypatch):
    """compare's inference column is measured as its training column is: the recipes take turns round by
    round, each round's passes sized from a calibration pass to fill infer_seconds. What it times is the
    network evaluate, sweep and predict run: the inference copy (BatchNorm folded; eval mode) on
    channels_last input, without autograd, while the recipe's own network stays as it was."""
    import torch

    from ipu_effnet.analysis import bench as bench_mod
    from ipu_effnet.analysis.compare import measure_inference_speed
    from ipu_effnet.models import create_model
    from ipu_effnet.models.fold import count_batchnorm

    models = [create_model("efficientnet_tiny", num_classes=4, norm=norm) for norm in ("batch", "group")]
    seen = []
    for i, model in enumerate(models):
        model.train()
        model.register_forward_pre_hook(lambda mod, args, i=i: seen.append(
            (i, mod.training, torch.is_grad_enabled(), tuple(args[0].shape), count_batchnorm(mod),
             args[0].is_contiguous(memory_format=torch.channels_last))))
    real, steps = bench_mod.measure, []

    def spy(workload):
        steps.append(workload.config.steps)
        return real(workload)

    monkeypatch.setattr(bench_mod, "measure", spy)
    jobs = [{"model": models[0], "resolution": 32}, {"model": models[1], "resolution": 16}]
    settings = BenchSettings(batch=3, steps=2, warmup=1, infer_seconds=0, rounds=2, target_error=0)
    speed = measure_inference_speed(jobs, settings)
    assert speed.what == "inference" and speed.rounds == 2 and all(rate > 0 for rate in speed.rates)
    assert [i for i, *_ in seen] == [0] * 3 + [1] * 3 + [0] * 3 + [1] * 3  # warm-up + timed, in turns
    assert not any(training or grad for _, training, grad, *_ in seen)
    assert {(i, shape) for i, _, _, shape, *_ in seen} == {(0, (3, 3, 32, 32)), (1, (3, 3, 16, 16))}
    assert all(batchnorms == 0 and channels_last for *_, batchnorms, channels_last in seen)  # the folded copy
    assert models[0].training and count_batchnorm(models[0]) > 0  # the recipe's network untouched
    assert steps == [2, 2, 2, 2]

    steps.clear()
    measure_inference_speed(jobs[1:], dataclasses.replace(settings, infer_seconds=0.3, rounds=1))
    assert steps[0] > 2  # a pass of this network takes far less than 0.3 s / 2


@pytest.mark.slow
def test_inference_memory_comes_from_a_fresh_process_and_grows_with_the_batch():
    """compare's CPU memory figure is bench's: the VmHWM of a fresh process per measurement, so a larger
    inference batch reports a larger peak (in this process the high-water mark would hide it)."""
    from ipu_effnet.analysis.compare import measure_inference_memory
    from ipu_effnet.models import create_model

    args = create_model("efficientnet_tiny", num_classes=4, norm="group").model_args
    small = measure_inference_memory(args, 64, BenchSettings(batch=1, threads=1))
    large = measure_inference_memory(args, 64, BenchSettings(batch=96, threads=1))
    for m in (small, large):
        assert "VmHWM" in m["method"] and m["peak_rss_mb"] >= m["built_rss_mb"] > 50
    assert large["steps_rss_mb"] > small["steps_rss_mb"] + 10
    assert large["peak_rss_mb"] > small["peak_rss_mb"] + 10
