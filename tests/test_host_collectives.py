"""Host-side collectives between processes (ipu_effnet/backends/host_collectives.py): the choice between
horovod and gloo under poprun, the rendezvous, and the collectives themselves across two real processes
on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from ipu_effnet.backends import host_collectives as hc
from ipu_effnet.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_instance_needs_no_collectives():
    comm = hc.poprun_collectives("horovod", 0, 1)  # not even horovod is needed alone
    assert isinstance(comm, hc.LocalCollectives)
    assert comm.all_reduce_sum({"a": 2.0}) == {"a": 2.0} and comm.broadcast_object(7) == 7


def test_shutdown_leaves_the_default_group_and_is_a_no_op_alone(tmp_path):
    import torch.distributed as dist

    hc.shutdown_process_group()  # nothing initialised: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    hc.shutdown_process_group()
    assert not dist.is_initialized()


def test_bad_choices_are_usage_errors(monkeypatch):
    with pytest.raises(UsageError, match="host_collectives = 'mpi' is not one of auto, horovod, gloo"):
        hc.poprun_collectives("mpi", 0, 2)
    monkeypatch.setattr(hc, "_import_horovod", lambda: None)
    with pytest.raises(UsageError, match="horovod does not import"):
        hc.poprun_collectives("horovod", 0, 2)
    assert hc.rendezvous({"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "4242"}) == "tcp://10.1.2.3:4242"
    assert hc.rendezvous({}) == f"tcp://127.0.0.1:{hc.DEFAULT_MASTER_PORT}"
    with pytest.raises(UsageError, match="MASTER_PORT = 'http'"):
        hc.rendezvous({"MASTER_PORT": "http"})


class FakeHorovod(types.SimpleNamespace):
    """horovod.torch's surface as the collectives use it, for one process that plays rank `rank`."""

    Sum = "sum"

    def __init__(self, rank: int, size: int) -> None:
        super().__init__(calls=[], _rank=rank, _size=size)

    def init(self):
        self.calls.append("init")

    def rank(self):
        return self._rank

    def size(self):
        return self._size

    def allreduce(self, tensor, op=None, name=None):
        self.calls.append(("allreduce", op))
        return tensor * self._size  # every rank contributed the same values

    def broadcast_parameters(self, params, root_rank=0):
        self.calls.append(("broadcast_parameters", sorted(params), root_rank))

    def broadcast_object(self, obj, root_rank=0):
        self.calls.append(("broadcast_object", root_rank))
        return obj


def test_auto_prefers_horovod_and_checks_its_layout(monkeypatch):
    hvd = FakeHorovod(1, 2)
    monkeypatch.setattr(hc, "_import_horovod", lambda: hvd)
    logged = []
    comm = hc.poprun_collectives("auto", 1, 2, log=logged.append)
    assert comm.name == "horovod" and hvd.calls == ["init"]
    assert comm.all_reduce_sum({"b": 1.5, "a": 2.0}) == {"a": 4.0, "b": 3.0}
    assert ("allreduce", "sum") in hvd.calls
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    comm.broadcast_module(model)
    names = next(c for c in hvd.calls if c[0] == "broadcast_parameters")[1]
    assert "0.weight" in names and "1.running_mean" in names  # buffers too: BatchNorm statistics
    assert logged == ["poprun: instance 2/2, host collectives through horovod"]
    monkeypatch.setattr(hc, "_import_horovod", lambda: FakeHorovod(0, 4))
    with pytest.raises(UsageError, match="horovod sees rank 0 of 4 but popdist says instance 1 of 2"):
        hc.poprun_collectives("auto", 1, 2)


WORKER = r"""
import json, sys, torch
from ipu_effnet.backends.host_collectives import poprun_collectives
instance, out = int(sys.argv[1]), sys.argv[2]
comm = poprun_collectives("gloo", instance, 2)
torch.manual_seed(100 + instance)                       # each instance would build different weights
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
model[1].running_mean.fill_(float(instance))
before = model[0].weight.detach().clone()
comm.broadcast_module(model)
sums = comm.all_reduce_sum({"samples": 10.0 + instance, "correct": float(instance)})
seed = comm.broadcast_object(1000 + instance)
from ipu_effnet.training.bn_stats import recalibrate_batchnorm
g = torch.Generator().manual_seed(7)
shards = [[torch.randn(4, 3, 6, 6, generator=g) + k for k in range(n)] for n in (2, 3)]  # 2 and 3 batches
shared_state = {k: v.clone() for k, v in model.state_dict().items()}
recalibrate_batchnorm(model, shards[instance], num_batches=10, collectives=comm)
torch.save({"weight": model[0].weight.detach(), "before": before, "running_mean": shared_state["1.running_mean"],
            "state": shared_state,
            "bn_mean": model[1].running_mean.clone(), "bn_var": model[1].running_var.clone(),
            "batches": shards[0] + shards[1]}, out + ".pt")
json.dump({"sums": sums, "seed": seed, "name": comm.name}, open(out + ".json", "w"))
from ipu_effnet.backends.host_collectives import shutdown_process_group
shutdown_process_group()                                # as the train command does at the end
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_two_poprun_instances_share_weights_metrics_and_seed_through_gloo(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i), str(tmp_path / f"i{i}")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    results = [json.loads((tmp_path / f"i{i}.json").read_text()) for i in range(2)]
    tensors = [torch.load(tmp_path / f"i{i}.pt") for i in range(2)]
    for r in results:
        assert r["name"] == "torch.distributed"
        assert r["sums"] == {"samples": 21.0, "correct": 1.0} and r["seed"] == 1000
    assert not torch.equal(tensors[0]["before"], tensors[1]["before"])
    assert torch.equal(tensors[1]["weight"], tensors[0]["before"])  # instance 0's weights everywhere
    assert torch.equal(tensors[1]["running_mean"], torch.zeros(4))  # buffers as well
    # BatchNorm recalibration over two shards (2 and 3 batches) through all_reduce_sum_tensor: both
    # instances end with the statistics one process computes over all five batches
    from ipu_effnet.training.bn_stats import recalibrate_batchnorm

    alone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    alone.load_state_dict(tensors[0]["state"])
    recalibrate_batchnorm(alone, tensors[0]["batches"], num_batches=10)
    assert not torch.equal(alone[1].running_var, torch.ones(4))
    for r in tensors:
        torch.testing.assert_close(r["bn_mean"], alone[1].running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["bn_var"], alone[1].running_var, rtol=1e-5, atol=1e-6)
