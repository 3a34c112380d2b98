"""Whole runs on the ipu backend through the poptorch double in hardware mode (one attached program per
set of IPUs, device-side weights and RNG, frozen signatures, wrapped tensors): the device lifecycle
of a first real run, on tiny models and a handful of generated images.

- a BatchNorm half-resolution recipe: validation after each epoch, a checkpoint each epoch, SIGKILL
  after epoch 1, a bitwise resume, the fine-tune phase and a resolution sweep;
- LayerNorm + Proxy Norm over a 2-stage pipeline and 2 replicas under two poprun-like instances;
- progressive resizing in 2 stages (one program per stage);
- ipu.compile_only: both programs compiled into the executable cache, exit 0 naming it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ipu_effnet.cli import main
from ipu_effnet.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DOUBLE = Path(__file__).resolve().parent / "poptorch_double"
TINY = ROOT / "configs" / "tiny-cpu.yaml"




def sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{DOUBLE}{os.pathsep}{ROOT}", **extra)


# BatchNorm, dropout, stochastic depth and mixup: the device RNG, the host RNG and the BN buffers all
# matter for a bitwise resume
BN_HALFRES = ["model.name=efficientnet_tiny", "backend=ipu", "recipe=halfres", "model.resolution=32",
              "finetune.resolution=64", "finetune.epochs=1", "model.num_classes=4", "model.group_size=16",
              "norm.kind=batch", "model.drop_rate=0.3", "model.drop_path_rate=0.2", "train.mixup_alpha=0.2",
              "data.num_train=8", "data.num_val=6", "train.micro_batch=4", "train.epochs=2",
              "train.checkpoint_every=1", "train.keep_checkpoints=3", "train.bn_recalibration_batches=0",
              "logging.progress=false"]

# SIGKILL right after the first checkpoint (epoch 1 of phase 1) has its final name
KILL_AFTER_FIRST_SAVE = """
import os, signal, sys
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    real_replace(src, dst, *args, **kwargs)
    if os.path.basename(str(dst)).startswith("ckpt-"):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
from ipu_effnet.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_bn_halfres_recipe_survives_validation_a_kill_and_the_fine_tune_phase(poptorch, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed run's process (OMP_NUM_THREADS=1): the same float reductions
    try:
        _bn_halfres(poptorch, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _bn_halfres(poptorch, tmp_path):
    straight = tmp_path / "straight"
    assert main(["train", "--config", str(TINY), *sets(BN_HALFRES), "--out", str(straight)]) == 0
    # every program was destroyed at its phase's end: nothing holds the IPUs
    assert poptorch.attached_programs() == []
    training = [p for p in poptorch.PROGRAMS if p.training]
    inference = [p for p in poptorch.PROGRAMS if not p.training]
    assert len(training) == 2 and len(inference) == 2  # phase 1 and the fine-tune phase
    assert not any(p.isCompiled() for p in poptorch.PROGRAMS)
    epochs = [json.loads(line) for line in (straight / "train" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and all(0 <= r["val_top1"] <= 1 for r in epochs)
    assert len(list_checkpoints(straight / "train" / "checkpoints")) == 2  # one per epoch
    ckpt = load_checkpoint(latest_checkpoint(straight / "train"))  # plain tensors: a weights_only load
    assert ckpt["extra"]["ipu_rng"] and ckpt["extra"]["ipu_optimizer"]["ipu_state"]
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["finetune_resolution"] == 64 and summary["finetune_steps"] == 2

    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_SAVE, "train", "--config", str(TINY),
                           *sets(BN_HALFRES), "--out", str(killed)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert load_checkpoint(latest_checkpoint(killed / "train"))["epoch"] == 1
    poptorch.reset(hardware=True)
    assert main(["train", "--resume", str(killed)]) == 0
    for phase in ("train", "finetune"):
        a = load_checkpoint(latest_checkpoint(straight / phase))
        b = load_checkpoint(latest_checkpoint(killed / phase))
        assert a["step"] == b["step"]
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), (phase, key)
        for key, value in a["averagers"]["epoch"]["average"].items():
            assert torch.equal(value, b["averagers"]["epoch"]["average"][key]), (phase, key)
    assert json.loads((killed / "summary.json").read_text())["val_top1"] == summary["val_top1"]

    from ipu_effnet.analysis.sweep import sweep_checkpoint

    rows = sweep_checkpoint(latest_checkpoint(straight / "finetune"), [32, 64])
    assert [r["resolution"] for r in rows] == [32, 64] and all(r["images"] == 6 for r in rows)


def test_progressive_recipe_compiles_one_program_per_stage(poptorch, tmp_path):
    overrides = ["model.name=efficientnet_tiny", "backend=ipu", "recipe=progressive", "train.progressive_stages=2",
                 "train.progressive_resolution=[32, 64]", "train.progressive_dropout=[0.1, 0.3]",
                 "model.num_classes=4", "model.group_size=16", "norm.kind=group", "data.num_train=8",
                 "data.num_val=4", "train.micro_batch=4", "train.epochs=2", "logging.progress=false"]
    assert main(["train", "--config", str(TINY), *sets(overrides), "--out", str(tmp_path / "run")]) == 0
    training = [p for p in poptorch.PROGRAMS if p.training]
    assert len(training) == 2  # one per stage, each at its resolution
    assert [p.calls[0][1][0] for p in training] == [(4, 3, 32, 32), (4, 3, 64, 64)]
    assert poptorch.attached_programs() == [] and not any(p.isCompiled() for p in poptorch.PROGRAMS)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stage_resolutions"] == [32, 64] and summary["steps"] == 4


@pytest.mark.slow
def test_compile_only_fills_the_cache_and_exits_0_naming_it(tmp_path):
    cache = tmp_path / "cache"
    overrides = ["model.name=efficientnet_tiny", "backend=ipu", "model.num_classes=4", "model.group_size=16",
                 "data.num_train=8", "data.num_val=4", "ipu.compile_only=true", f"ipu.executable_cache={cache}"]
    proc = subprocess.run([sys.executable, "-m", "ipu_effnet", "train", "--config", str(TINY), *sets(overrides),
                           "--out", str(tmp_path / "run")], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(cache) in proc.stdout
    assert len(list(cache.glob("*.popef"))) == 2  # the training and the inference program
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.slow
@pytest.mark.distributed
def test_lnpn_pipeline_with_two_replicas_under_two_instances(tmp_path):
    """Two poprun instances, one replica each of a 2-stage pipeline, LayerNorm + Proxy Norm; 9 validation
    images make shards of 5 and 4, and both instances must still make the same number of calls."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = ["model.name=efficientnet_tiny", "model.resolution=32", "model.num_classes=4",
                 "model.group_size=16", "norm.kind=layer", "norm.proxy=true", "data.num_train=12",
                 "data.num_val=9", "train.micro_batch=2", "train.grad_accum=3", "train.epochs=2",
                 "ipu.replicas=2", "ipu.ipus_per_replica=2", "ipu.pipeline_splits=[blocks.3.0]", "backend=ipu",
                 "distributed.host_collectives=gloo", "logging.progress=false"]
    trace = tmp_path / "trace"
    trace.mkdir()
    procs = []
    for i in range(2):
        e = env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), POPDIST_NUM_INSTANCES="2",
                POPDIST_INSTANCE_INDEX=str(i), POPDIST_NUM_TOTAL_REPLICAS="2", POPDIST_NUM_IPUS_PER_REPLICA="2",
                POPTORCH_DOUBLE_TRACE=str(trace))
        procs.append(subprocess.Popen([sys.executable, "-m", "ipu_effnet", "train", "--config", str(TINY),
                                       *sets(overrides), "--out", str(tmp_path / "run")], env=e, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_samples"] == 9 and summary["world_size"] == 2 and summary["steps"] == 2 * 1
    logs = [f.read_text().split() for f in sorted(trace.iterdir())]
    assert len(logs) == 2
    counts = [(log.count("training"), log.count("inference")) for log in logs]
    assert counts[0] == counts[1], counts  # equal calls: the shorter shard ran a padding batch
    # 3 evaluation passes (after each epoch, then the weight average), each 2 calls of 4 images for the
    # longer shard of 5; one training call per epoch
    assert counts[0] == (2, 3 * 2), counts
