"""BatchNorm statistics recomputed for averaged weights (training/bn_stats.py, averaging.recalibrate_average):
the statistics equal the activations' per-batch means and variances, stale averaged statistics give a
different model, batch-independent norms are left alone without a forward pass, frozen subtrees keep
theirs, the stored statistics reach checkpoints and rebuilt models, the config key is validated."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from ipu_effnet.config import Config, apply_overrides
from ipu_effnet.errors import UsageError
from ipu_effnet.training.averaging import WeightAverager, averaged_model_state, recalibrate_average
from ipu_effnet.training.bn_stats import batchnorm_modules, recalibrate_batchnorm
from norms import BatchNormAct2d, GroupNormAct


def _bn_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, momentum=0.1), nn.Dropout(0.5),
                         nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def _batches(n: int = 5, size: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 8, 8, generator=g) * 2 + 1, torch.zeros(size, dtype=torch.long)) for _ in range(n)]


def _expected_stats(net: nn.Sequential, batches, index: int):
    """Independently: the input of net[index] per batch with every BN before it normalising by its batch
    statistics (train mode), reduced to the mean of per-batch means / unbiased variances."""
    means, variances = [], []
    for images, _ in batches:
        x = images
        for i, layer in enumerate(net):
            if i == index:
                break
            if isinstance(layer, nn.BatchNorm2d):
                mu = x.mean(dim=(0, 2, 3), keepdim=True)
                var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
                x = (x - mu) / torch.sqrt(var + layer.eps) * layer.weight[None, :, None, None] \
                    + layer.bias[None, :, None, None]
                if isinstance(layer, BatchNormAct2d):
                    x = layer.act(x)
            elif isinstance(layer, nn.Dropout):
                continue  # eval mode during recalibration
            else:
                x = layer(x)
        means.append(x.mean(dim=(0, 2, 3)))
        variances.append(x.var(dim=(0, 2, 3), unbiased=True))
    return torch.stack(means).mean(0), torch.stack(variances).mean(0)


@torch.no_grad()
def test_recalibrated_buffers_equal_the_per_batch_statistics_of_the_activations():
    net = _bn_net()
    net.train()
    tracked = net[1].num_batches_tracked.clone()
    batches = _batches()
    images = recalibrate_batchnorm(net, batches, num_batches=4)
    assert images == 32
    for index in (1, 4):
        mean, var = _expected_stats(net, batches[:4], index)
        torch.testing.assert_close(net[index].running_mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(net[index].running_var, var, rtol=1e-4, atol=1e-5)
    # momentum, num_batches_tracked and the modes come back
    assert net[1].momentum == 0.1 and net[4].momentum == 0.1
    assert torch.equal(net[1].num_batches_tracked, tracked)
    assert all(m.training for m in net.modules())


@torch.no_grad()
def test_micro_batches_cut_host_batches_and_count_towards_the_limit():
    net = _bn_net()
    host = _batches(n=2, size=8)
    assert recalibrate_batchnorm(net, host, num_batches=3, micro_batch=4) == 12  # 3 micro-batches of 4
    micro = [(img[i:i + 4], lab[i:i + 4]) for img, lab in host for i in (0, 4)][:3]
    mean, var = _expected_stats(net, micro, 1)
    torch.testing.assert_close(net[1].running_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net[1].running_var, var, rtol=1e-4, atol=1e-5)


def _trained_average():
    """An average of two quite different BN networks: averaged weights, averaged (stale) statistics."""
    net, other = _bn_net(0), _bn_net(1)
    for m, scale in ((net, 1.0), (other, 3.0)):
        with torch.no_grad():
            for bn in (m[1], m[4]):
                bn.running_mean.fill_(scale)
                bn.running_var.fill_(scale * 4)
    avg = WeightAverager(decay=0.5)
    avg.update(net)
    avg.update(other)
    return net, avg


def test_recalibrate_average_changes_the_averaged_model_and_keeps_the_live_one():
    net, avg = _trained_average()
    live = {k: v.clone() for k, v in net.state_dict().items()}
    x = _batches(n=1, seed=7)[0][0]
    stale = _bn_net()
    avg.copy_to(stale)
    stale.eval()
    assert recalibrate_average(avg, net, _batches(), num_batches=5) == 40
    for k, v in net.state_dict().items():
        assert torch.equal(v, live[k]), k  # the live weights are back
    assert avg.bn_stats_current and avg.bn_stats_images == 40
    fresh = _bn_net()
    avg.copy_to(fresh)
    fresh.eval()
    with torch.no_grad():
        out_stale, out_fresh = stale(x), fresh(x)
    assert (out_stale - out_fresh).abs().max() > 0.1  # visibly different outputs
    # the recomputed statistics are those of the averaged weights over the batches
    ref = _bn_net()
    avg.copy_to(ref)
    mean, var = _expected_stats(ref, _batches(), 4)
    torch.testing.assert_close(fresh[4].running_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fresh[4].running_var, var, rtol=1e-4, atol=1e-5)
    # the average itself still holds the averaged (raw) statistics: a resumed run continues the same average
    torch.testing.assert_close(avg.average["1.running_mean"], torch.full((4,), 2.0))
    # an update makes the statistics stale: the averaged model falls back to the averaged ones
    avg.update(net)
    assert not avg.bn_stats_current
    torch.testing.assert_close(avg.averaged_state()["1.running_mean"], torch.full((4,), 1.5))


def test_stored_statistics_round_trip_and_reach_rebuilt_models():
    net, avg = _trained_average()
    recalibrate_average(avg, net, _batches(), num_batches=5)
    state = avg.state_dict()
    again = WeightAverager()
    again.load_state_dict(state)
    assert again.bn_stats_current
    rebuilt = averaged_model_state(state)
    for k, v in avg.averaged_state().items():
        assert torch.equal(rebuilt[k], v), k
    assert torch.equal(rebuilt["4.running_var"], avg.bn_stats["4.running_var"])
    # a checkpoint written before recalibration existed: the averaged statistics, as before
    old = {k: v for k, v in state.items() if not k.startswith("bn_stats")}
    torch.testing.assert_close(averaged_model_state(old)["1.running_mean"], torch.full((4,), 2.0))


def test_rebuild_model_uses_the_stored_statistics_and_warns_without_them():
    from ipu_effnet.models import create_model
    from ipu_effnet.training.checkpoint import make_checkpoint, rebuild_model
    from ipu_effnet.training.model import TrainingModel

    model = create_model("efficientnet_tiny", num_classes=3)
    avg = WeightAverager()
    avg.update(model)
    batches = [(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.zeros(4)) for _ in range(2)]
    recalibrate_average(avg, model, batches, num_batches=2, forward=TrainingModel(model))
    ckpt = make_checkpoint(model, epoch=1, step=1, averagers={"epoch": avg}, include_rng=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rebuilt = rebuild_model(ckpt, averager="epoch")
    name = next(n for n, _ in batchnorm_modules(rebuilt))
    assert torch.equal(rebuilt.state_dict()[f"{name}.running_var"], avg.bn_stats[f"{name}.running_var"])
    assert not torch.equal(avg.bn_stats[f"{name}.running_var"], avg.average[f"{name}.running_var"])
    avg.update(model)  # stale now
    ckpt = make_checkpoint(model, epoch=2, step=2, averagers={"epoch": avg}, include_rng=False)
    with pytest.warns(UserWarning, match="no recomputed BatchNorm statistics"):
        rebuild_model(ckpt, averager="epoch")


class _Counting(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


@pytest.mark.parametrize("kind", ["group", "layer"])
def test_batch_independent_norms_are_untouched_and_run_no_forward_pass(kind):
    torch.manual_seed(0)
    groups = 2 if kind == "group" else 1
    net = nn.Sequential(nn.Conv2d(3, 4, 3), GroupNormAct(4, groups), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    counting = _Counting(net)
    avg = WeightAverager(decay=0.5)
    avg.update(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    average = {k: v.clone() for k, v in avg.average.items()}
    assert recalibrate_average(avg, net, _batches(), num_batches=5, forward=counting) == 0
    assert recalibrate_batchnorm(net, _batches(), num_batches=5, forward=counting) == 0
    assert counting.calls == 0
    assert not avg.bn_stats and not avg.bn_stats_current
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in avg.average.items():
        assert torch.equal(v, average[k]), k


def test_frozen_subtrees_keep_their_statistics_and_zero_batches_is_off():
    net = _bn_net()
    first = (net[1].running_mean.clone(), net[1].running_var.clone())
    counting = _Counting(net)
    assert recalibrate_batchnorm(net, _batches(), num_batches=0, forward=counting) == 0
    assert counting.calls == 0
    recalibrate_batchnorm(net, _batches(), num_batches=2, forward=counting, skip=["0", "1"])
    assert counting.calls == 2
    assert torch.equal(net[1].running_mean, first[0]) and torch.equal(net[1].running_var, first[1])
    assert not torch.equal(net[4].running_var, torch.ones(4))


def test_an_error_during_the_pass_restores_the_statistics():
    net = _bn_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}

    def broken():
        yield _batches(n=1)[0]
        raise RuntimeError("loader died")

    with pytest.raises(RuntimeError, match="loader died"):
        recalibrate_batchnorm(net, broken(), num_batches=5)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert net[1].momentum == 0.1


class _Capture:
    """A second process's view: records what it contributes and sums it with nothing else."""

    size = 2

    def __init__(self) -> None:
        self.sent = None

    def all_reduce_sum_tensor(self, tensor):
        self.sent = tensor.clone()
        return tensor.clone()


class _SumCollectives:
    """Two processes: this one's contribution plus what the other one computed over its own shard."""

    size = 2

    def __init__(self, other_net: nn.Module, other_batches) -> None:
        self.other_net, self.other_batches = other_net, other_batches

    def all_reduce_sum_tensor(self, tensor):
        other = _Capture()
        recalibrate_batchnorm(self.other_net, self.other_batches, num_batches=10, collectives=other)
        return tensor + other.sent


def test_statistics_combined_over_processes_equal_one_process_over_all_batches():
    shard0, shard1 = _batches(n=2, seed=3), _batches(n=3, seed=4)
    net = _bn_net()
    recalibrate_batchnorm(net, shard0, num_batches=10, collectives=_SumCollectives(_bn_net(), shard1))
    alone = _bn_net()
    recalibrate_batchnorm(alone, shard0 + shard1, num_batches=10)
    for index in (1, 4):
        torch.testing.assert_close(net[index].running_mean, alone[index].running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(net[index].running_var, alone[index].running_var, rtol=1e-5, atol=1e-6)


def test_config_key_is_validated():
    assert Config().train.bn_recalibration_batches > 0
    assert apply_overrides(Config(), ["train.bn_recalibration_batches=0"]).train.bn_recalibration_batches == 0
    for bad in ("-1", "many", "2.5"):
        with pytest.raises(UsageError, match="bn_recalibration_batches"):
            apply_overrides(Config(), [f"train.bn_recalibration_batches={bad}"])


LOOP = [
    "model.name=efficientnet_tiny", "model.resolution=32", "model.num_classes=4", "model.group_size=16",
    "model.drop_rate=0.0", "model.drop_path_rate=0.0", "data.num_train=16", "data.num_val=4",
    "train.micro_batch=4", "train.epochs=1", "train.ema_decay=0.9", "logging.progress=false",
]


@pytest.mark.slow
def test_the_loop_recomputes_the_averages_statistics_and_stores_them_in_the_final_checkpoint(tmp_path):
    from pathlib import Path

    from ipu_effnet.config import load
    from ipu_effnet.run import train
    from ipu_effnet.training.checkpoint import latest_checkpoint, load_checkpoint, rebuild_model

    root = Path(__file__).resolve().parents[1]
    logged = []
    cfg = load(root / "configs" / "tiny-cpu.yaml", LOOP + ["norm.kind=batch", "train.bn_recalibration_batches=3"])
    summary = train(cfg, tmp_path / "bn", log=logged.append)
    assert summary["averaged_bn_stats"] == "recomputed" and summary["bn_recalibration_images"] == 3 * 4
    assert any("epoch average: BatchNorm statistics recomputed over 12" in m for m in logged)
    assert any("ema average: BatchNorm statistics recomputed" in m for m in logged)
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "bn"))
    for name in ("epoch", "ema"):
        entry = ckpt["averagers"][name]
        assert entry["bn_stats"] and entry["bn_stats_at"] == entry["num_updates"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # current statistics: no stale-statistics warning
        model = rebuild_model(ckpt, averager="epoch")
    key = next(k for k in ckpt["averagers"]["epoch"]["bn_stats"] if k.endswith("running_var"))
    assert torch.equal(model.state_dict()[key], ckpt["averagers"]["epoch"]["bn_stats"][key])
    assert not torch.equal(model.state_dict()[key], ckpt["averagers"]["epoch"]["average"][key])

    # GroupNorm: nothing recomputed, nothing stored
    cfg = load(root / "configs" / "tiny-cpu.yaml", LOOP + ["norm.kind=group"])
    summary = train(cfg, tmp_path / "gn", log=lambda _m: None)
    assert summary["averaged_bn_stats"] is None and summary["bn_recalibration_images"] == 0
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "gn"))
    assert not ckpt["averagers"]["epoch"]["bn_stats"] and not ckpt["averagers"]["ema"]["bn_stats"]
