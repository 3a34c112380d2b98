"""The poptorch double refuses what poptorch 3.4 refuses: each test runs the pattern real poptorch
rejects and checks that the double rejects it too (and that the right pattern passes), so the IPU
backend's tests can see lifecycle mistakes without the SDK."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn


class Net(nn.Module):
    """A linear layer and a BatchNorm (a buffer), the loss marked with identity_loss."""

    def __init__(self, poptorch, losses: int = 1) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.drop = nn.Dropout(0.5)
        self.poptorch = poptorch
        self.losses = losses

    def forward(self, x, y):
        logits = self.drop(self.bn(self.fc(x)))
        loss = nn.functional.cross_entropy(logits, y)
        for _ in range(self.losses):
            loss = self.poptorch.identity_loss(loss, reduction="none")
        return loss, logits


def data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def programs(poptorch, ipu_model=False, lr=0.1):
    net = Net(poptorch)
    opts = poptorch.Options()
    if ipu_model:
        opts.useIpuModel(True)
    opt = poptorch.optim.SGD(net.parameters(), lr=lr)
    return net, poptorch.trainingModel(net, opts, optimizer=opt), poptorch.inferenceModel(net, opts)


def test_a_second_program_cannot_take_the_ipus_the_first_holds(poptorch):
    _, training, inference = programs(poptorch)
    training(*data())
    with pytest.raises(RuntimeError, match="Failed to acquire 1 IPU"):
        inference(*data())  # the training program still holds the IPUs
    training.detachFromDevice()
    inference(*data())
    # the training program's implicit re-attach fails while inference holds them (the epoch-2 failure)
    with pytest.raises(RuntimeError, match="Failed to acquire"):
        training(*data())
    inference.detachFromDevice()
    training(*data())  # re-attaches
    assert poptorch.attached_programs() == [training]


def test_the_ipu_model_never_fails_to_attach(poptorch):
    _, training, inference = programs(poptorch, ipu_model=True)
    training(*data())
    inference(*data())
    training(*data())
    assert training.isAttachedToDevice() and inference.isAttachedToDevice()


def test_detach_and_attach_need_a_compiled_program_in_the_right_state(poptorch):
    _, training, _ = programs(poptorch)
    with pytest.raises(RuntimeError, match="not been compiled"):
        training.detachFromDevice()
    with pytest.raises(RuntimeError, match="not been compiled"):
        _ = training.rng_state
    training(*data())
    with pytest.raises(RuntimeError, match="already attached"):
        training.attachToDevice()
    training.detachFromDevice()
    with pytest.raises(RuntimeError, match="not attached"):
        training.detachFromDevice()
    with pytest.raises(RuntimeError, match="not attached"):
        training.copyWeightsToHost()


def test_random_seed_reseeds_the_host_rng(poptorch):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    poptorch.Options().randomSeed(7)
    assert not torch.equal(torch.get_rng_state(), state)
    expected = torch.Generator().manual_seed(7).get_state()
    assert torch.equal(torch.get_rng_state(), expected)


def test_the_device_rng_can_be_read_and_set(poptorch):
    """Dropout draws from the program's own RNG: setting a saved state replays the same masks, and the
    host RNG has no influence on them."""
    _, training, _ = programs(poptorch, lr=0.0)  # lr 0: the weights stay, only the masks can differ
    x, y = data(8)
    training.compile(x, y)
    saved = training.rng_state
    assert isinstance(saved, list) and all(isinstance(v, int) for v in saved)
    first = training(x, y)[1]
    assert not torch.equal(training(x, y)[1], first)  # the RNG moved on: new masks
    torch.manual_seed(999)
    training.rng_state = saved
    assert torch.equal(training(x, y)[1], first)


def test_the_input_signature_freezes_at_the_first_call(poptorch):
    _, training, _ = programs(poptorch)
    x, y = data(4)
    training(x, y)
    with pytest.raises(RuntimeError, match="compiled for"):
        training(x.double(), y)  # dtype
    with pytest.raises(RuntimeError, match="compiled for"):
        training(torch.randn(4, 5), y)  # shape
    with pytest.raises(RuntimeError, match="Number of positional arguments"):
        training(x, y, torch.ones(4))  # count


def test_compile_freezes_the_signature_and_the_graph(poptorch):
    net, training, _ = programs(poptorch)
    training.compile(*data(4))
    with pytest.raises(RuntimeError, match="compiled for"):
        training(*data(8))
    net.drop.p = 0.1  # a progressive stage's new dropout rate is baked into the old program
    with pytest.raises(RuntimeError, match="keeps the graph"):
        training(*data(4))


def test_an_offline_target_only_compiles(poptorch, tmp_path):
    net = Net(poptorch)
    opts = poptorch.Options().useOfflineIpuTarget(2).enableExecutableCaching(str(tmp_path / "cache"))
    training = poptorch.trainingModel(net, opts, optimizer=poptorch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(AssertionError, match="offline device"):
        training(*data())
    training.compile(*data())
    assert training.isCompiled() and not training.isAttachedToDevice()
    assert len(list((tmp_path / "cache").iterdir())) == 1
    with pytest.raises(AssertionError, match="offline"):
        training.attachToDevice()
    with pytest.raises(AssertionError, match="offline device"):
        training(*data())


def test_wrapped_tensors_survive_detach_until_destroy(poptorch):
    net, training, _ = programs(poptorch)
    assert all(type(p) is poptorch.PoptorchParameter for p in net.parameters())
    assert type(net.state_dict()["bn.running_mean"]) is poptorch.PoptorchBuffer
    assert type(net.bn.running_mean.detach().clone()) is poptorch.PoptorchBuffer
    with pytest.raises(RuntimeError, match="already been wrapped"):
        poptorch.trainingModel(net, poptorch.Options(), optimizer=poptorch.optim.SGD(net.parameters(), lr=0.1))
    training(*data())
    training.destroy()
    assert all(type(b) is torch.Tensor for b in net.state_dict().values())
    assert not training.isCompiled() and poptorch.attached_programs() == []


def test_device_weights_reach_the_host_only_when_copied(poptorch):
    net, training, inference = programs(poptorch, lr=0.5)
    before = net.fc.weight.detach().clone()
    training(*data())
    assert torch.equal(net.fc.weight.detach(), before)  # the host sees the initial weights: stale
    training.copyWeightsToHost()
    trained = net.fc.weight.detach().clone()
    assert not torch.equal(trained, before)
    training(*data())
    training.detachFromDevice()  # detaching brings the weights back too
    assert not torch.equal(net.fc.weight.detach(), trained)


def test_the_inference_program_sees_host_weights_only_on_attach_or_copy(poptorch):
    net, training, inference = programs(poptorch, ipu_model=True)
    x, y = data()
    first = inference(x, y)[1]
    with torch.no_grad():
        net.fc.weight.mul_(0.0)
        net.fc.bias.fill_(1.0)
    assert torch.equal(inference(x, y)[1], first)  # stale: the device kept its copy
    inference.copyWeightsToDevice()
    assert not torch.equal(inference(x, y)[1], first)


def test_exactly_one_identity_loss_per_training_forward(poptorch):
    for losses in (0, 2):
        net = Net(poptorch, losses=losses)
        training = poptorch.trainingModel(net, poptorch.Options(),
                                          optimizer=poptorch.optim.SGD(net.parameters(), lr=0.1))
        with pytest.raises(RuntimeError, match="exactly one"):
            training(*data())
        poptorch.reset()


def test_a_second_begin_block_on_one_module_raises(poptorch):
    layer = nn.Linear(2, 2)
    poptorch.BeginBlock(layer, user_id="a", ipu_id=1)
    with pytest.raises(RuntimeError, match="already begins a block"):
        poptorch.BeginBlock(layer, user_id="a", ipu_id=1)


def test_popdist_options_refuse_replication_factor(poptorch, monkeypatch):
    monkeypatch.setenv("POPDIST_NUM_INSTANCES", "2")
    monkeypatch.setenv("POPDIST_NUM_TOTAL_REPLICAS", "4")
    import popdist
    import popdist.poptorch

    opts = popdist.poptorch.Options(ipus_per_replica=1)
    assert opts.replication_factor == 2 and not opts.init_before
    with pytest.raises(RuntimeError, match="popdist mode"):
        opts.replicationFactor(4)
    popdist.init()
    assert popdist.poptorch.Options().init_before


def test_rmsprop_tf_variant_and_loss_scaling_numerics(poptorch):
    """poptorch.optim.RMSprop(use_tf_variant=True) is TensorFlow's RMSprop (the project's RMSpropTF);
    loss scaling multiplies the loss and divides the gradients (a power of two: exact in fp32)."""
    from ipu_effnet.training.optim import RMSpropTF

    torch.manual_seed(0)
    reference, net = nn.Linear(4, 3), nn.Linear(4, 3)
    net.load_state_dict(reference.state_dict())
    kwargs = dict(lr=0.05, alpha=0.9, eps=1e-3, momentum=0.9)
    ref_opt = RMSpropTF(reference.parameters(), **kwargs)
    opt = poptorch.optim.RMSprop(net.parameters(), **kwargs, loss_scaling=128.0, use_tf_variant=True,
                                 accum_type=torch.float32)
    plain = poptorch.optim.RMSprop(nn.Linear(4, 3).parameters(), **kwargs)
    assert not plain.tf_variant
    x = torch.randn(8, 4)
    for _ in range(3):
        ref_opt.zero_grad()
        reference(x).square().mean().backward()
        ref_opt.step()
        opt.zero_grad()
        (net(x).square().mean() * opt.loss_scaling).backward()
        opt.step()
    for a, b in zip(reference.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # torch's RMSprop (eps outside the root, accumulator from 0) would differ after the first step
    other = nn.Linear(4, 3)
    other.load_state_dict(net.state_dict())
    torch_opt = torch.optim.RMSprop(other.parameters(), **kwargs)
    (other(x).square().mean()).backward()
    torch_opt.step()
    assert not torch.allclose(other.weight, net.weight)


def test_optimisers_record_their_accumulator_dtypes(poptorch):
    net = nn.Linear(2, 2)
    opt = poptorch.optim.AdamW(net.parameters(), lr=0.1, accum_type=torch.float16,
                               first_order_momentum_accum_type=torch.float32)
    assert opt.accum_types["accum_type"] == torch.float16
    assert opt.accum_types["first_order_momentum_accum_type"] == torch.float32
    assert opt.accum_types["second_order_momentum_accum_type"] == torch.float32  # poptorch's default
    with pytest.raises(ValueError, match="accum_type"):
        poptorch.optim.SGD(net.parameters(), lr=0.1, velocity_accum_type=torch.bfloat16)
