"""Checkpoints: a resumed run continues bit-identically; atomic writes; corrupt and non-plain files
give a clear error; the newest complete checkpoint is found; a checkpoint rebuilds its own model."""

from __future__ import annotations

import random
import zipfile

import numpy as np
import pytest
import torch

from ipu_effnet.config import Config
from ipu_effnet.models import create_model
from ipu_effnet.training.averaging import WeightAverager
from ipu_effnet.training.checkpoint import (
    CheckpointError,
    checkpoint_name,
    get_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    make_checkpoint,
    rebuild_model,
    restore_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from ipu_effnet.training.model import TrainingModel
from ipu_effnet.training.optim import create_optimizer, set_lr
from ipu_effnet.training.schedules import LRSchedule

STEPS_PER_EPOCH = 2


class Custom:
    """Not plain data: weights_only loading must refuse it."""

    def __init__(self):
        self.x = 1


def _batches():
    g = torch.Generator().manual_seed(123)
    return [(torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g),
             torch.randint(0, 10, (6,), generator=g)) for _ in range(4)]


def _make_run(seed):
    torch.manual_seed(seed)
    net = create_model("efficientnet_tiny", num_classes=10, norm="group")
    tm = TrainingModel(net, label_smoothing=0.1, mixup_alpha=0.2, cutmix=True).train()
    opt = create_optimizer(tm, "rmsprop_tf", lr=0.01, weight_decay=1e-5)
    sched = LRSchedule("exponential", 0.01, warmup_epochs=1)
    averagers = {"epoch": WeightAverager(0.97), "ema": WeightAverager(0.9, interval="step")}
    return tm, opt, sched, averagers


def _step(i, tm, opt, sched, averagers, batches):
    # python's and numpy's generators choose the batch and a flip, torch's drives mixing and drop-path:
    # all three must come back from the checkpoint for the losses to match
    images, labels = batches[random.randrange(len(batches))]
    if np.random.rand() < 0.5:
        images = images.flip(-1)
    set_lr(opt, sched.at_step(i, STEPS_PER_EPOCH))
    loss, _ = tm(images, labels)
    opt.zero_grad()
    loss.backward()
    opt.step()
    averagers["ema"].update(tm.model)
    if (i + 1) % STEPS_PER_EPOCH == 0:
        averagers["epoch"].update(tm.model)
    return loss.detach()


def _seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.mark.slow
def test_resume_from_checkpoint_gives_bit_identical_losses(tmp_path):
    batches = _batches()
    total, stop = 6, 4

    _seed_all(0)
    run = _make_run(0)
    uninterrupted = [_step(i, *run, batches) for i in range(total)]

    _seed_all(0)
    tm, opt, sched, avgs = _make_run(0)
    first = [_step(i, tm, opt, sched, avgs, batches) for i in range(stop)]
    state = make_checkpoint(tm, opt, epoch=stop // STEPS_PER_EPOCH, step=stop, averagers=avgs,
                            config=Config().to_dict())
    path = save_checkpoint(tmp_path / "checkpoints" / checkpoint_name(stop // STEPS_PER_EPOCH, stop), state)

    # a new process: other seeds, other initial weights, fresh optimiser and averagers
    _seed_all(99)
    tm2, opt2, sched2, avgs2 = _make_run(1)
    ckpt = load_checkpoint(latest_checkpoint(tmp_path))
    epoch, step = restore_checkpoint(ckpt, tm2, opt2, averagers=avgs2)
    assert (epoch, step) == (2, 4)
    rest = [_step(i, tm2, opt2, sched2, avgs2, batches) for i in range(step, total)]

    for a, b in zip(uninterrupted, first + rest):
        assert torch.equal(a, b), (uninterrupted, first + rest)
    for (name, p), q in zip(run[0].named_parameters(), tm2.parameters()):
        assert torch.equal(p, q), name
    for key in ("epoch", "ema"):
        for name, v in run[3][key].averaged_state().items():
            assert torch.equal(v, avgs2[key].averaged_state()[name]), (key, name)
    assert path.name == "ckpt-e0002-s000000004.pt"


def test_checkpoint_is_plain_data_that_weights_only_loading_accepts(tmp_path):
    torch.manual_seed(0)
    net = create_model("efficientnet_tiny", num_classes=10, norm="batch")
    opt = create_optimizer(net, "sgd", lr=0.1, momentum=0.9)
    avg = WeightAverager()
    avg.update(net)
    state = make_checkpoint(net, opt, epoch=1, step=10, averagers={"epoch": avg}, config=Config().to_dict(),
                            extra={"best_top1": 0.5})
    path = save_checkpoint(tmp_path / "c.pt", state)
    raw = torch.load(path, weights_only=True)  # the plain torch call, no allow-listing
    assert raw["model_args"] == net.model_args and raw["config"]["train"]["lr"] == Config().train.lr
    loaded = load_checkpoint(path)
    assert loaded["extra"] == {"best_top1": 0.5} and loaded["step"] == 10
    for k, v in net.state_dict().items():
        assert torch.equal(loaded["model"][k], v)


def test_rng_state_round_trip():
    state = get_rng_state()
    a = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    set_rng_state(state)
    b = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    assert a[:3] == b[:3] and torch.equal(a[3], b[3])


def test_failed_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / checkpoint_name(1, 10)
    save_checkpoint(path, {"format": "ipu_effnet.checkpoint", "version": 1, "value": torch.ones(3)})
    before = path.read_bytes()

    real_save = torch.save

    def save_then_fail(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"format": "ipu_effnet.checkpoint", "version": 1, "value": torch.zeros(3)})
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert torch.equal(load_checkpoint(path)["value"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left behind


def test_non_plain_state_is_refused_before_writing(tmp_path):
    with pytest.raises(TypeError, match=r"state\['extra'\]\['obj'\].*Custom"):
        save_checkpoint(tmp_path / "c.pt", {"extra": {"obj": Custom()}})
    with pytest.raises(TypeError, match=r"state\['best'\].*numpy.float64"):  # a float to isinstance only
        save_checkpoint(tmp_path / "c.pt", {"best": np.float64(0.5)})
    assert not list(tmp_path.iterdir())


def test_weights_only_load_refuses_a_pickled_custom_object(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "ipu_effnet.checkpoint", "version": 1, "obj": Custom()}, path)
    with pytest.raises(CheckpointError, match="weights_only") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def _tensor_data_offset(path):
    """Where the first tensor's bytes start in a torch zip archive (after its local file header)."""
    data = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(next(n for n in zf.namelist() if "/data/" in n))
    h = info.header_offset
    name_len = int.from_bytes(data[h + 26: h + 28], "little")
    extra_len = int.from_bytes(data[h + 28: h + 30], "little")
    return h + 30 + name_len + extra_len


def test_truncated_and_corrupt_files_raise_a_clear_error(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", {"format": "ipu_effnet.checkpoint", "version": 1,
                                                  "w": torch.randn(1000)})
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    flipped = tmp_path / "flipped.pt"
    corrupt = bytearray(data)
    corrupt[_tensor_data_offset(good) + 100] ^= 0xFF  # torch itself would load this without complaint
    flipped.write_bytes(bytes(corrupt))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    for path in (truncated, flipped, garbage):
        with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
            load_checkpoint(path)
        assert isinstance(err.value, ValueError) and str(path) in str(err.value)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(2)}, other)
    with pytest.raises(CheckpointError, match="not an ipu_effnet checkpoint"):
        load_checkpoint(other)


def test_latest_checkpoint_skips_incomplete_ones_and_keep_prunes(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    for epoch in range(1, 5):
        save_checkpoint(ckpt_dir / checkpoint_name(epoch, epoch * 100),
                        {"format": "ipu_effnet.checkpoint", "version": 1, "epoch": epoch}, keep=3)
    assert [p.name for p in list_checkpoints(ckpt_dir)] == [checkpoint_name(e, e * 100) for e in (2, 3, 4)]
    assert latest_checkpoint(tmp_path) == ckpt_dir / checkpoint_name(4, 400)
    # a newest file that is not a complete archive (e.g. copied in half) is skipped
    newest = ckpt_dir / checkpoint_name(5, 500)
    newest.write_bytes((ckpt_dir / checkpoint_name(4, 400)).read_bytes()[:50])
    (ckpt_dir / ".tmp-ckpt-e0006-s000000600.pt.abc").write_bytes(b"partial")  # ignored by name
    with pytest.warns(UserWarning, match="incomplete"):
        assert latest_checkpoint(tmp_path) == ckpt_dir / checkpoint_name(4, 400)
    assert latest_checkpoint(tmp_path / "nowhere") is None


def test_rebuild_model_from_checkpoint_with_its_weights_or_the_average(tmp_path):
    torch.manual_seed(0)
    net = create_model("efficientnet_tiny", num_classes=7, norm="layer+proxy", drop_path_rate=0.1).eval()
    avg = WeightAverager(0.5)
    avg.update(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    avg.update(net)
    path = save_checkpoint(tmp_path / "c.pt", make_checkpoint(TrainingModel(net), epoch=0, step=0,
                                                              averagers={"epoch": avg}))
    ckpt = load_checkpoint(path)
    rebuilt = rebuild_model(ckpt).eval()
    assert rebuilt.model_args == net.model_args
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(rebuilt(x), net(x))
    averaged = rebuild_model(ckpt, averager="epoch").eval()
    with avg.swapped_in(net):
        assert torch.equal(averaged(x), net(x))
    with pytest.raises(CheckpointError, match="no averager 'ema'"):
        rebuild_model(ckpt, averager="ema")
