"""Weight averaging: the per-epoch exponential average (decay 0.97, Masters et al. 2021) against its
closed form, buffers, evaluation with the averaged weights, state round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ipu_effnet.training.averaging import WeightAverager


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def _set_all(net: nn.Module, value: float, step: int) -> None:
    """Every floating entry of the state := value (+ a per-entry offset); num_batches_tracked := step."""
    with torch.no_grad():
        for i, t in enumerate(net.state_dict().values()):
            if t.is_floating_point():
                t.fill_(value + 0.01 * i)
            else:
                t.fill_(step)


@pytest.mark.slow
def test_epoch_average_after_three_epochs_equals_the_closed_form():
    net = _net()
    d = 0.97
    avg = WeightAverager(decay=d)
    weights = [1.0, 2.0, 5.0]
    for epoch, w in enumerate(weights, start=1):
        _set_all(net, w, step=10 * epoch)
        avg.update(net)
    assert avg.num_updates == 3
    state = avg.averaged_state()
    for i, (name, t) in enumerate(net.state_dict().items()):
        if t.is_floating_point():
            off = 0.01 * i
            # first epoch initialises: avg = d^2 w1 + d (1 - d) w2 + (1 - d) w3
            closed = d * d * (1.0 + off) + d * (1 - d) * (2.0 + off) + (1 - d) * (5.0 + off)
            assert state[name].dtype == torch.float32
            torch.testing.assert_close(state[name], torch.full_like(state[name], closed), rtol=1e-6, atol=1e-7)
        else:  # integer buffers are copied from the latest weights
            assert torch.equal(state[name], torch.full_like(t, 30))
    # BatchNorm running statistics take part
    assert "1.running_mean" in state and "1.running_var" in state and "1.num_batches_tracked" in state


def test_first_update_copies_and_decay_one_keeps_the_first():
    net = _net()
    avg = WeightAverager(decay=1.0)
    avg.update(net)
    first = {k: v.clone() for k, v in net.state_dict().items()}
    _set_all(net, 3.0, 1)
    avg.update(net)
    for k, v in avg.averaged_state().items():
        if v.is_floating_point():
            assert torch.equal(v, first[k])


def test_copy_to_and_swapped_in_evaluate_the_average_and_restore_the_live_weights():
    net = _net()
    avg = WeightAverager(decay=0.5)
    _set_all(net, 1.0, 1)
    avg.update(net)
    _set_all(net, 3.0, 2)
    avg.update(net)  # average: 2.0 (+ offsets)
    live = {k: v.clone() for k, v in net.state_dict().items()}
    expected_bias = torch.full((2,), 2.0 + 0.01 * list(live).index("3.bias"))
    with avg.swapped_in(net) as inside:
        assert inside is net
        torch.testing.assert_close(net[3].bias.detach(), expected_bias)
    for k, v in net.state_dict().items():
        assert torch.equal(v, live[k]), k
    # the swap puts the live weights back even when evaluation fails
    with pytest.raises(RuntimeError, match="boom"), avg.swapped_in(net):
        raise RuntimeError("boom")
    assert torch.equal(net[3].bias, live["3.bias"])
    target = _net()
    avg.copy_to(target)
    torch.testing.assert_close(target[3].bias.detach(), expected_bias)


def test_state_dict_round_trip_continues_identically():
    net = _net()
    a = WeightAverager(decay=0.9, interval="step")
    _set_all(net, 1.0, 1)
    a.update(net)
    _set_all(net, 2.0, 2)
    a.update(net)
    b = WeightAverager()
    b.load_state_dict(a.state_dict())
    assert (b.decay, b.interval, b.num_updates) == (0.9, "step", 2)
    _set_all(net, 4.0, 3)
    a.update(net)
    b.update(net)
    for k, v in a.averaged_state().items():
        assert torch.equal(v, b.averaged_state()[k])


def test_half_weights_are_averaged_in_fp32():
    net = nn.Linear(2, 2).half()
    avg = WeightAverager(decay=0.97)
    for w in (1.0, 1.001):
        with torch.no_grad():
            net.weight.fill_(w)
        avg.update(net)
    value = avg.averaged_state()["weight"]
    assert value.dtype == torch.float32
    # 1 * 0.97 + 1.001 (as fp16: 1.0009765625) * 0.03, not representable in fp16
    assert value[0, 0].item() == pytest.approx(0.97 + 0.03 * 1.0009765625, rel=1e-6)
    avg.copy_to(net)
    assert net.weight.dtype == torch.float16


def test_errors():
    with pytest.raises(RuntimeError, match="empty"):
        WeightAverager().copy_to(_net())
    with pytest.raises(ValueError):
        WeightAverager(decay=1.5)
    with pytest.raises(ValueError):
        WeightAverager(interval="batch")
    avg = WeightAverager()
    avg.update(_net())
    with pytest.raises(KeyError):
        avg.update(nn.Linear(2, 2))
