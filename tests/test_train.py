"""The training loop end to end on CPU: outputs, resume after a kill, data parallel under torchrun."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny import tiny

from ipu_effnet.cli import main
from ipu_effnet.config import load
from ipu_effnet.run import train
from ipu_effnet.training.checkpoint import latest_checkpoint, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY = tiny("train.epochs=3")


def cli(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "ipu_effnet", *argv], capture_output=True, text=True, cwd=ROOT,
                          env=env, **kwargs)


def sets(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


def test_train_writes_the_run_directory(tmp_path):
    cfg = load(ROOT / "configs" / "tiny-cpu.yaml", TINY + ["train.epochs=2", "train.grad_accum=2", "train.ema_decay=0.9", "train.keep_checkpoints=1"])
    summary = train(cfg, tmp_path / "run", log=lambda _m: None)
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text()) == pytest.approx(summary)
    for key in ("val_top1", "val_top5", "train_images_per_sec", "val_top1_averaged"):
        assert key in summary
    assert 0.0 <= summary["val_top1"] <= 1.0 and summary["train_images_per_sec"] > 0
    assert summary["steps"] == 2 * (32 // 8) and summary["global_batch"] == 8
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]
    assert load(run / "config.yaml") == cfg
    ckpt = load_checkpoint(latest_checkpoint(run))
    assert ckpt["epoch"] == 2 and ckpt["model_args"]["name"] == "efficientnet_tiny"
    assert sorted(ckpt["averagers"]) == ["ema", "epoch"] and ckpt["averagers"]["ema"]["num_updates"] == 8
    assert len(list((run / "checkpoints").glob("*.pt"))) == 1  # keep_checkpoints=1
    assert summary["val_top1_ema"] is not None


def test_evaluate_command_reproduces_the_final_validation(tmp_path, capsys):
    cfg = load(ROOT / "configs" / "tiny-cpu.yaml", TINY + ["train.epochs=1"])
    summary = train(cfg, tmp_path / "run", log=lambda _m: None)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["top1"] == pytest.approx(summary["val_top1"]) and out["samples"] == 12
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--res", "48", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["resolution"] == 48


# The child holds still after its first checkpoint is on disk, so the kill lands at a known point
# however loaded the machine is (a run of a few hundred milliseconds can otherwise finish first).
HOLD_AFTER_FIRST_CHECKPOINT = """
import sys, time
from pathlib import Path
from ipu_effnet.training import checkpoint
real_save = checkpoint.save_checkpoint
def save(path, state, keep=None):
    saved = real_save(path, state, keep=keep)
    Path(sys.argv[1]).write_text(str(saved))
    while True:
        time.sleep(1)
checkpoint.save_checkpoint = save
from ipu_effnet.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    common = ["train", "--config", "configs/tiny-cpu.yaml", *sets(TINY + ["train.epochs=4"])]
    straight = cli(*common, "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr

    run, saved = tmp_path / "killed", tmp_path / "saved"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", HOLD_AFTER_FIRST_CHECKPOINT, str(saved), *common, "--out", str(run)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not saved.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, stderr
    first = latest_checkpoint(run)
    assert first is not None and str(first) == saved.read_text() and load_checkpoint(first)["epoch"] == 1
    resumed = cli("train", "--resume", str(run), "--set", "logging.progress=false")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout

    a = load_checkpoint(latest_checkpoint(tmp_path / "straight"))
    b = load_checkpoint(latest_checkpoint(run))
    assert a["epoch"] == b["epoch"] == 4 and a["step"] == b["step"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    sa = json.loads((tmp_path / "straight" / "summary.json").read_text())
    sb = json.loads((run / "summary.json").read_text())
    assert (sa["val_top1"], sa["val_loss"]) == (sb["val_top1"], sb["val_loss"])


@pytest.mark.slow
def test_train_refuses_to_overwrite_checkpoints(tmp_path):
    cfg_args = ["train", "--config", "configs/tiny-cpu.yaml", *sets(TINY + ["train.epochs=1"]), "--out", str(tmp_path)]
    assert cli(*cfg_args).returncode == 0
    again = cli(*cfg_args)
    assert again.returncode == 2 and "--resume" in again.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_match_one_process_with_twice_the_batch(tmp_path):
    base = sets(TINY + ["train.epochs=1", "data.num_train=16", "train.optimizer=sgd", "train.lr=0.05",
                        "train.lr_schedule=constant", "train.warmup_epochs=0"])
    one = cli("train", "--config", "configs/tiny-cpu.yaml", *base, "--set", "train.micro_batch=8",
              "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "ipu_effnet", "train",
                          "--config", "configs/tiny-cpu.yaml", *base, "--set", "train.micro_batch=4",
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_checkpoint(latest_checkpoint(tmp_path / "one"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "two"))
    assert a["step"] == b["step"] == 2
    for key, value in a["model"].items():
        if value.is_floating_point():
            torch.testing.assert_close(b["model"][key], value, atol=1e-5, rtol=0, msg=key)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
