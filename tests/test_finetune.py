"""Fine-tuning (docs/reference.md section 5): only the modules from first_trainable on change; frozen
parameters and frozen BatchNorm statistics stay bitwise equal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import tiny

from ipu_effnet.cli import main
from ipu_effnet.config import load, model_kwargs
from ipu_effnet.models import create_model
from ipu_effnet.run.recipes import finetune_config
from ipu_effnet.training.averaging import WeightAverager
from ipu_effnet.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
)
from ipu_effnet.training.freeze import default_first_trainable, freeze_before, frozen_module_names

ROOT = Path(__file__).resolve().parents[1]
TINY = tiny(
    "norm.kind=batch",
    "data.num_train=16",
    "data.num_val=8",
    "train.micro_batch=8",
    "train.mixup_alpha=0.2",
    drop=("model.group_size", "model.drop_rate"),
)


def test_frozen_modules_come_before_the_first_trainable_one():
    model = create_model("efficientnet_b0", num_classes=10)
    names = frozen_module_names(model, "blocks.5.3")
    assert names[0] == "stem" and "blocks.4" in names and names[-1] == "blocks.5.2"
    assert "blocks.5" not in names and "head" not in names and "blocks.6" not in names
    assert default_first_trainable(model) == "blocks.5.3"  # B0: Graphcore's choice
    freeze_before(model, "blocks.5.3")
    assert not any(p.requires_grad for p in model.stem.parameters())
    assert all(p.requires_grad for p in model.blocks[5][3].parameters())
    model.train()
    model(torch.zeros(2, 3, 32, 32))  # the pre-hook puts the frozen modules back in eval mode
    assert not model.blocks[2].training and model.head.training


def test_finetune_config_is_section_5():
    cfg = load(ROOT / "configs" / "efficientnet-b0-g16-gn-halfres.yaml")
    ft = finetune_config(cfg)
    t = ft.train
    assert (t.optimizer, t.momentum, t.lr, t.lr_schedule, t.warmup_epochs) == ("sgd", 0.0, 0.25, "cosine", 0.0)
    assert (t.mixup_alpha, t.cutmix, t.micro_batch, t.grad_accum, t.epochs) == (0.0, False, 20, 5, 2.0)
    assert ft.model.resolution == ft.data.eval_resolution == 224 and ft.recipe == "native"


@pytest.mark.slow
def test_finetune_command_trains_only_the_last_layers(tmp_path):
    cfg = load(ROOT / "configs" / "tiny-cpu.yaml", TINY)
    name, kwargs = model_kwargs(cfg)
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    avg = WeightAverager(0.97)
    avg.update(model)
    with torch.no_grad():  # a second, different state: the fine-tune must start from the average
        for p in model.parameters():
            p.add_(0.01)
    avg.update(model)
    ckpt_path = save_checkpoint(tmp_path / "run" / "checkpoints" / "ckpt-e0001-s000000002.pt",
                                make_checkpoint(model, epoch=1, step=2, averagers={"epoch": avg}, config=cfg.to_dict()))
    start = avg.averaged_state()

    out = tmp_path / "ft"
    assert main(["finetune", "--checkpoint", str(ckpt_path), "--res", "40", "--averaged", "--lr", "0.5",
                 "--first-trainable", "blocks.4", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resolution"] == 40 and summary["first_trainable"] == "blocks.4"
    assert "val_top1_before_finetune" in summary
    end = load_checkpoint(latest_checkpoint(out))["model"]
    frozen = frozen_module_names(model, "blocks.4")
    changed, kept = [], []
    for key, value in start.items():
        is_frozen = any(key.startswith(f + ".") for f in frozen)
        same = torch.equal(value.to(end[key].dtype), end[key])
        if is_frozen:
            assert same, f"frozen {key} changed"
            kept.append(key)
        elif key.endswith("weight") and not same:
            changed.append(key)
    assert any("running_mean" in k for k in kept) and any("running_var" in k for k in kept)
    assert any(k.startswith("classifier") for k in changed) and any(k.startswith("blocks.4") for k in changed)
    with pytest.raises(SystemExit):
        main(["finetune", "--checkpoint", str(ckpt_path)])  # --res is required
    assert main(["finetune", "--checkpoint", str(ckpt_path), "--res", "40", "--out", str(out)]) == 2  # done already
