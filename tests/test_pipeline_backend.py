"""backend: pipeline (torch.distributed.pipelining): stages cut at the split names reproduce the network,
two ranks under torchrun train to the same weights as one process with the same global batch, and every
configuration the backend cannot run is a one-line UsageError."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny import tiny

from ipu_effnet.backends import prepare, resolve_backend
from ipu_effnet.backends.pipeline import StageModule, build_stage_steps, check_pipeline_config, stage_modules
from ipu_effnet.config import load, model_kwargs
from ipu_effnet.errors import UsageError
from ipu_effnet.models import create_model
from ipu_effnet.run import train
from ipu_effnet.training.checkpoint import latest_checkpoint, load_checkpoint
from ipu_effnet.training.model import TrainingModel

ROOT = Path(__file__).resolve().parents[1]
# Batch-independent norm (group), no dropout or drop path, one memory layout (the torch backend's default
# is channels-last, the pipeline's is not): one process and a pipeline compute the same thing.
TINY = tiny(
    "train.grad_accum=4",
    "train.optimizer=sgd",
    "train.lr=0.05",
    "train.lr_schedule=constant",
    "train.warmup_epochs=0",
    "train.label_smoothing=0.1",
    "train.channels_last=false",
)


def tiny_cfg(*extra: str):
    return load(ROOT / "configs" / "tiny-cpu.yaml", TINY + list(extra))


def tiny_model(cfg, seed: int = 0):
    torch.manual_seed(seed)
    name, kwargs = model_kwargs(cfg)
    return create_model(name, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port()), *argv],
                          capture_output=True, text=True, cwd=cwd, env=env)


def planner_split(cfg, stages: int = 2):
    """The planner's splits for the config's model at its resolution and micro-batch."""
    from ipu_effnet.models.profile import profile_model
    from ipu_effnet.pipeline.cost import build_cost_model
    from ipu_effnet.pipeline.planner import plan

    name, kwargs = model_kwargs(cfg)
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    cm = build_cost_model(model, profile_model(model, cfg.model.resolution), model_name=name,
                          micro_batch=cfg.train.micro_batch, precision=cfg.train.precision,
                          optimiser=cfg.train.optimizer, grad_accum=cfg.train.grad_accum, stages=stages)
    return plan(cm, stages).splits


# ---------------------------------------------------------------------------------------------------
# Stages in one process


@pytest.mark.parametrize("splits", [
    ["blocks.2.0.se"],                     # inside a block without a residual
    ["blocks.5.1.conv_dw", "head"],        # inside a residual block: the block input crosses too
    ["blocks.0", "blocks.5.1.conv_pw", "pool", "classifier"],  # a stage of blocks; the alias of a block
])
def test_stages_chained_reproduce_the_network_and_own_every_parameter_once(splits):
    cfg = tiny_cfg()
    model = tiny_model(cfg)
    tm = TrainingModel(model).eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    expected = tm(images)
    stages = build_stage_steps(model, splits)
    assert len(stages) == len(splits) + 1
    modules = [StageModule(tm, steps, first=k == 0) for k, steps in enumerate(stages)]
    y = (images,)
    crossings = []
    for module in modules:
        out = module(*y)
        y = out if isinstance(out, tuple) else (out,)
        crossings.append(len(y))
    torch.testing.assert_close(y[0], expected, atol=0, rtol=0)
    if "blocks.5.1.conv_dw" in splits:
        assert crossings[0] == 2  # (y, block input) into the middle of blocks.5.1
    owned = [id(p) for m in modules for p in m.parameters()]
    assert len(owned) == len(set(owned)) and set(owned) == {id(p) for p in model.parameters()}


def test_uncut_blocks_run_whole_and_cut_blocks_run_their_children():
    model = tiny_model(tiny_cfg())
    first, second = build_stage_steps(model, ["blocks.5.1.se"])
    kinds = [(s.kind, s.path) for s in first]
    assert kinds[:3] == [("module", "stem"), ("module", "blocks.0.0"), ("module", "blocks.1.0")]
    assert kinds[-5:] == [("enter", "blocks.5.1"), ("module", "blocks.5.1.conv_pw"), ("module", "blocks.5.1.norm1"),
                          ("module", "blocks.5.1.conv_dw"), ("module", "blocks.5.1.norm2")]
    kinds = [(s.kind, s.path) for s in second]
    assert kinds[:5] == [("module", "blocks.5.1.se"), ("module", "blocks.5.1.conv_pwl"),
                         ("module", "blocks.5.1.norm3"), ("residual", "blocks.5.1"), ("module", "blocks.6.0")]
    assert stage_modules(model, second)[0] is model.blocks[5][1].se


# ---------------------------------------------------------------------------------------------------
# What the backend refuses


@pytest.mark.parametrize("split, words", [
    ("blocks.2.0.se.conv_reduce", ["inside blocks.2.0.se", "blocks.2.0.se, blocks.2.0.conv_pwl"]),
    ("blocks.5.1.drop_path", ["residual sum", "blocks.5.1, blocks.6.0"]),
    ("head.conv", ["inside head", "head, pool"]),
    ("stem", ["starts the model"]),
    ("blocks.9.0", ["names no module"]),
])
def test_splits_the_backend_cannot_cut_are_rejected_naming_the_nearest(split, words):
    with pytest.raises(UsageError) as err:
        build_stage_steps(tiny_model(tiny_cfg()), [split])
    message = str(err.value)
    assert "ipu.pipeline_splits" in message and all(w in message for w in words), message


def test_two_splits_at_the_same_point_leave_a_stage_empty():
    with pytest.raises(UsageError, match="leaves stage 1 empty"):
        build_stage_steps(tiny_model(tiny_cfg()), ["blocks.3.0", "blocks.3.0.conv_pw"])


def test_config_checks_world_size_schedule_and_fp16():
    cfg = tiny_cfg("ipu.ipus_per_replica=2", "ipu.pipeline_splits=[blocks.3.0]")
    tm = TrainingModel(tiny_model(cfg))
    assert check_pipeline_config(cfg, tm, world_size=2, amp_dtype=None) == 2
    with pytest.raises(UsageError, match=r"makes 2 stages, one rank each, but the world size is 3; "
                                         r"run torchrun --nproc_per_node 2"):
        check_pipeline_config(cfg, tm, world_size=3, amp_dtype=None)
    with pytest.raises(UsageError, match="fp16"):
        check_pipeline_config(cfg, tm, 2, torch.float16)
    short = tiny_cfg("ipu.ipus_per_replica=2", "ipu.pipeline_splits=[blocks.3.0]", "train.grad_accum=1")
    with pytest.raises(UsageError, match="1F1B schedule over 2 stages needs at least 2 micro-batches"):
        check_pipeline_config(short, tm, 2, None)
    gpipe = tiny_cfg("ipu.ipus_per_replica=2", "ipu.pipeline_splits=[blocks.3.0]", "train.grad_accum=1",
                     "distributed.pipeline_schedule=gpipe")
    assert check_pipeline_config(gpipe, tm, 2, None) == 2
    with pytest.raises(UsageError, match="needs ipu.pipeline_splits"):
        check_pipeline_config(tiny_cfg(), tm, 1, None)


def test_without_torchrun_the_runner_says_how_to_start_it():
    cfg = tiny_cfg("ipu.ipus_per_replica=2", "ipu.pipeline_splits=[blocks.3.0]")
    tm = TrainingModel(tiny_model(cfg))
    optimizer = torch.optim.SGD(tm.parameters(), lr=0.1)
    with pytest.raises(UsageError, match="torchrun --nproc_per_node 2"):
        prepare("pipeline", tm, optimizer, cfg)


def test_a_torch_without_pipelining_is_a_usage_error(monkeypatch):
    assert resolve_backend("pipeline") == "pipeline"
    monkeypatch.setitem(sys.modules, "torch.distributed.pipelining", None)  # import now raises ImportError
    with pytest.raises(UsageError, match=r"needs torch.distributed.pipelining \(torch >= 2.4; this torch is "):
        resolve_backend("pipeline")


# ---------------------------------------------------------------------------------------------------
# Two ranks against one process


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_at_the_planners_split_match_one_process(tmp_path):
    """Acceptance: `train` with backend pipeline under torchrun (gloo, 2 ranks, 1F1B over 4 micro-batches)
    at the planner's 2-stage split writes the same weights after two optimiser steps as backend torch in
    one process with the same global batch (4 x 4)."""
    cfg = tiny_cfg()
    splits = planner_split(cfg)
    assert len(splits) == 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1): the same kernels, the same rounding
    try:
        one = train(cfg, tmp_path / "one", log=lambda _m: None)
    finally:
        torch.set_num_threads(threads)
    sets = [a for o in TINY + ["backend=pipeline", "ipu.ipus_per_replica=2", f"ipu.pipeline_splits=[{splits[0]}]"]
            for a in ("--set", o)]
    two = torchrun("-m", "ipu_effnet", "train", "--config", "configs/tiny-cpu.yaml", *sets, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert f"pipeline: 2 stages over 2 ranks, splits ['{splits[0]}']; 1f1b schedule" in two.stdout
    a = load_checkpoint(latest_checkpoint(tmp_path / "one"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "two"))
    assert a["step"] == b["step"] == one["steps"] == 2
    init = tiny_model(cfg).state_dict()
    moved = diff = 0.0
    for key, value in a["model"].items():
        if value.is_floating_point():
            diff = max(diff, float((b["model"][key] - value).abs().max()))
            moved = max(moved, float((value - init[key]).abs().max()))
    assert moved > 1e-3  # the two steps changed the weights, so agreeing says something
    print(f"max abs weight difference, pipeline vs one process: {diff:.3g}")
    assert diff <= 1e-5, diff
    # the optimiser state of both stages reached rank 0's checkpoint (a resume needs all of it)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) == len(list(init))
    for i in sa:
        torch.testing.assert_close(sb[i]["momentum_buffer"], sa[i]["momentum_buffer"], atol=1e-5, rtol=0)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["global_batch"] == 16 and summary["val_top1"] == one["val_top1"]


WORKER = """
import json, sys
import torch
import torch.distributed as dist
sys.path.insert(0, {root!r})
from ipu_effnet.backends import prepare
from ipu_effnet.config import load, model_kwargs
from ipu_effnet.models import create_model
from ipu_effnet.training.model import TrainingModel
from ipu_effnet.training.optim import optimizer_from_config

dist.init_process_group("gloo")
cfg = load({config!r}, {overrides!r})
torch.manual_seed(0)
name, kwargs = model_kwargs(cfg)
model = create_model(name, **kwargs)
tm = TrainingModel.from_config(model, cfg.train)
optimizer = optimizer_from_config(model, cfg.train)
runner = prepare("pipeline", tm, optimizer, cfg)
batches = torch.load({batches!r})
metrics = [runner.step(images, labels) for images, labels in batches]
runner.sync_weights_to_host()
torch.save({{"model": model.state_dict(), "optimizer": optimizer.state_dict(), "metrics": metrics}},
           {out!r}.format(dist.get_rank()))
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_gpipe_with_a_residual_crossing_ranks_and_mixing_matches_torch_runner_on_every_rank(tmp_path):
    """The runner alone: GPipe over 4 micro-batches, split inside residual block blocks.5.1 (two tensors
    cross), rmsprop_tf with weight decay, label smoothing, mixup and cutmix (drawn on rank 0 in
    TrainingModel's order, so the same coefficients as one process); after sync_weights_to_host both ranks hold the full model and
    optimiser state of the single-process TorchRunner run, and report its loss and top-1 hits."""
    from ipu_effnet.backends.torch_backend import TorchRunner
    from ipu_effnet.training.optim import optimizer_from_config

    overrides = TINY + ["backend=pipeline", "ipu.ipus_per_replica=2", "ipu.pipeline_splits=[blocks.5.1.conv_dw]",
                        "distributed.pipeline_schedule=gpipe", "train.optimizer=rmsprop_tf", "train.lr=0.01",
                        "train.mixup_alpha=0.2", "train.cutmix=true"]
    cfg = load(ROOT / "configs" / "tiny-cpu.yaml", overrides)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=gen),
                torch.randint(0, 4, (16,), generator=gen)) for _ in range(2)]
    torch.save(batches, tmp_path / "batches.pt")
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER.format(root=str(ROOT), config=str(ROOT / "configs" / "tiny-cpu.yaml"),
                                                    overrides=overrides, batches=str(tmp_path / "batches.pt"),
                                                    out=str(tmp_path / "rank{}.pt"))))
    run = torchrun(str(script), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]

    torch.manual_seed(0)
    model = tiny_model(cfg)
    tm = TrainingModel.from_config(model, cfg.train)
    optimizer = optimizer_from_config(model, cfg.train)
    runner = TorchRunner(tm, optimizer, cfg.train.grad_accum)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks
    try:
        expected = [runner.step(images, labels) for images, labels in batches]
    finally:
        torch.set_num_threads(threads)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for key, value in model.state_dict().items():
            torch.testing.assert_close(got["model"][key], value, atol=1e-5, rtol=0, msg=f"rank {rank}: {key}")
        for i, state in optimizer.state_dict()["state"].items():
            for name, value in state.items():
                # squared-gradient averages: the shortcut's gradient is summed in another order across
                # ranks, so compare these relative to their size
                torch.testing.assert_close(got["optimizer"]["state"][i][name], value, atol=1e-6, rtol=1e-4)
        for g, e in zip(got["metrics"], expected):
            assert g["correct"] == e["correct"] and g["samples"] == e["samples"] == 16
            assert abs(g["loss"] - e["loss"]) < 1e-5
