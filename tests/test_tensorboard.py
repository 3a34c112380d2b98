"""TensorBoard event files (training/tb.py), read back with TensorBoard's own reader."""

import json
from pathlib import Path

import pytest

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tiny import tiny

from ipu_effnet.config import load  # noqa: E402
from ipu_effnet.errors import UsageError  # noqa: E402
from ipu_effnet.run import train  # noqa: E402
from ipu_effnet.training import tb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = tiny("train.epochs=2", "logging.log_every=3")


def accumulator(path: Path) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator, tag: str):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def records(run: Path, kind: str):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_events_hold_what_metrics_jsonl_holds(tmp_path):
    cfg = load(ROOT / "configs" / "tiny-cpu.yaml", TINY)
    run = tmp_path / "run"
    train(cfg, run, log=lambda _m: None)
    acc = accumulator(run / "tensorboard")
    steps = records(run, "step")
    assert [r["step"] for r in steps] == [3, 6, 9, 12, 15]  # 2 epochs of 8 steps, every 3rd step
    for key, tag in tb.STEP_TAGS.items():
        got = scalars(acc, tag)
        assert [s for s, _ in got] == [r["step"] for r in steps], tag
        assert [v for _, v in got] == pytest.approx([r[key] for r in steps], rel=1e-6), tag
    epochs = records(run, "epoch")
    assert len(epochs) == 2
    for key, tag in tb.EPOCH_TAGS.items():
        got = scalars(acc, tag)
        assert [s for s, _ in got] == [r["step"] for r in epochs], tag
        assert [v for _, v in got] == pytest.approx([r[key] for r in epochs], rel=1e-6), tag
    assert [v for _, v in scalars(acc, "epoch/resolution")] == [32.0, 32.0]
    assert "train/loss_scale" not in acc.Tags()["scalars"]  # fp32 on the CPU: no loss scale
    text = acc.Tensors("config/train/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "efficientnet_tiny" in text and "log_every: 3" in text


def test_halfres_phases_share_one_run_with_steps_counted_on(tmp_path):
    cfg = load(ROOT / "configs" / "tiny-cpu.yaml",
               TINY + ["recipe=halfres", "train.epochs=1", "finetune.epochs=1", "finetune.resolution=64",
                       "finetune.micro_batch=8"])
    run = tmp_path / "run"
    summary = train(cfg, run, log=lambda _m: None)
    assert not (run / "train" / "tensorboard").exists() and not (run / "finetune" / "tensorboard").exists()
    acc = accumulator(run / "tensorboard")
    main_steps = summary["phases"]["train"]["steps"]
    ft = records(run / "finetune", "epoch")
    val = scalars(acc, "val/top1")
    # one value per phase epoch: training (its own steps), then fine-tuning (steps after those)
    assert [s for s, _ in val] == [records(run / "train", "epoch")[0]["step"], main_steps + ft[0]["step"]]
    assert val[-1][1] == pytest.approx(summary["val_top1"], rel=1e-6)
    assert [v for _, v in scalars(acc, "epoch/resolution")] == [32.0, 64.0]
    assert {"config/train/text_summary", "config/finetune/text_summary"} <= set(acc.Tags()["tensors"])


def test_resumed_run_purges_what_followed_its_checkpoint(tmp_path):
    from ipu_effnet.training.checkpoint import list_checkpoints

    cfg = load(ROOT / "configs" / "tiny-cpu.yaml", TINY + ["logging.log_every=1"])
    run = tmp_path / "run"
    train(cfg, run, log=lambda _m: None)
    first = list_checkpoints(run / "checkpoints")[0]  # after epoch 1 (step 8)
    for later in list_checkpoints(run / "checkpoints")[1:]:
        later.unlink()
    (run / "summary.json").unlink()
    assert first.name.endswith("s000000008.pt")
    train(cfg, run, resume=True, log=lambda _m: None)
    got = scalars(accumulator(run / "tensorboard"), "train/loss")
    assert [s for s, _ in got] == list(range(1, 17))  # steps 9..16 once, not twice


def test_tensorboard_setting(monkeypatch):
    assert tb.want_tensorboard(None) and tb.want_tensorboard(True) and not tb.want_tensorboard(False)
    monkeypatch.setattr(tb, "tensorboard_available", lambda: False)
    monkeypatch.setattr(tb, "_said_missing", [])
    said = []
    assert not tb.want_tensorboard(None, said.append) and not tb.want_tensorboard(None, said.append)
    assert len(said) == 1 and "requirements-extras.txt" in said[0]  # once per process
    with pytest.raises(UsageError, match="requirements-extras.txt"):
        tb.want_tensorboard(True)
