"""Output without a terminal (console.py): plain progress lines, quiet non-main ranks, and a captured
quickstart that reads well as a log file."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ipu_effnet.console import LineProgress, process_rank, progress_bar

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_line_progress_prints_one_plain_line_per_interval(capsys):
    clock = Clock()
    bar = LineProgress(total=100, desc="epoch 1/3", unit="step", interval=30.0, clock=clock, file=sys.stdout)
    for _ in range(100):
        clock.now += 1.0  # one second per step: lines at 30, 60 and 90 s
        bar.update(1)
        bar.set_postfix(loss="2.301", refresh=False)
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and bar.lines == 3
    assert lines[0].startswith("epoch 1/3: 30/100 step (30%), 0:30 elapsed, about 1:10 left")
    assert lines[-1].endswith("loss=2.301")


def test_a_resumed_bar_counts_from_where_it_started(capsys):
    clock = Clock()
    bar = LineProgress(total=100, desc="part", unit="B", interval=10.0, clock=clock, file=sys.stdout, initial=50)
    for _ in range(10):
        clock.now += 1.0  # 1 B/s after the first 50: 50 left at 40 s
        bar.update(1)
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("part: 60/100 B (60%), 0:10 elapsed, about 0:40 left")


def test_short_work_and_disabled_bars_print_nothing(capsys):
    clock = Clock()
    for disable in (False, True):
        bar = LineProgress(range(10), interval=60.0, clock=clock, disable=disable, file=sys.stdout)
        assert list(bar) == list(range(10)) and bar.n == 10
    assert capsys.readouterr().out == ""


def test_progress_bar_is_plain_when_stderr_is_not_a_terminal(monkeypatch):
    with open(os.devnull, "w") as null:
        monkeypatch.setattr(sys, "stderr", null)
        assert isinstance(progress_bar(total=3, desc="x"), LineProgress)


def test_ranks_other_than_the_main_one_print_only_to_stderr():
    code = ("import sys, warnings; from ipu_effnet.console import quiet_other_ranks; quiet_other_ranks(); "
            "print('result line'); warnings.warn('a warning'); print('error: bad', file=sys.stderr)")
    for env, shown in (({"RANK": "1"}, False), ({"POPDIST_INSTANCE_INDEX": "2"}, False), ({"RANK": "0"}, True)):
        clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "POPDIST_INSTANCE_INDEX")}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                             env=dict(clean, **env))
        assert ("result line" in out.stdout) == shown, env
        assert "a warning" in out.stderr and "error: bad" in out.stderr
    assert process_rank() == int(os.environ.get("RANK", os.environ.get("POPDIST_INSTANCE_INDEX", "0")))


@pytest.mark.slow
def test_captured_quickstart_reads_well_and_tensorboard_lists_each_recipe(tmp_path):
    """`quickstart > log 2>&1`, shortened (--set): few lines, no carriage returns; one TensorBoard run per
    recipe."""
    out = tmp_path / "qs"
    log = tmp_path / "log"
    sets = ["data.num_train=32", "data.num_val=8", "train.epochs=1", "finetune.epochs=1", "train.micro_batch=8",
            "finetune.micro_batch=8", "train.bn_recalibration_batches=1"]
    with open(log, "wb") as f:
        proc = subprocess.run([sys.executable, "-m", "ipu_effnet", "quickstart", "--out", str(out),
                               "--bench-rounds", "1", "--bench-max-rounds", "1", "--bench-seconds", "0", "--bench-infer-seconds", "0", "--bench-steps", "1",
                               *[a for s in sets for a in ("--set", s)]], stdout=f, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    text = log.read_bytes().decode()
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text and "\x1b[" not in text  # no bar frames, no terminal control sequences
    lines = text.splitlines()
    assert 20 <= len(lines) <= 120, len(lines)  # the real quickstart (4 epochs) adds ~25 epoch lines
    assert sum(line.startswith("epoch 1/1: ") for line in lines) == 9  # 3 native + 3 x 2 half-res phases
    assert text.rstrip().splitlines()[-1].startswith("quickstart: 6 recipes in ")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(out))
    mux.Reload()
    recipes = sorted(p.stem for p in (ROOT / "configs" / "quickstart").glob("*.yaml"))
    assert len(recipes) == 6
    assert sorted(mux.Runs()) == [str(Path("runs") / r / "tensorboard") for r in recipes]
    for run in mux.Runs():
        assert "val/top1" in mux.GetAccumulator(run).Tags()["scalars"]
