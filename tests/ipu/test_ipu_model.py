"""The IPU backend with real poptorch on the IPU Model (simulator): `pytest -m ipu`.

Needs the Poplar SDK (poptorch); skipped everywhere else. Small models and batches: the IPU Model
compiles and runs on the host CPU, minutes per program.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.ipu

poptorch = pytest.importorskip(
    "poptorch", reason="poptorch ships only with the Poplar SDK: source its enable script and pip install "
                       "its poptorch wheel to run the IPU tests (see docs/ipu.md)")

from ipu_effnet.backends import prepare  # noqa: E402
from ipu_effnet.config import load, model_kwargs  # noqa: E402
from ipu_effnet.models import create_model  # noqa: E402
from ipu_effnet.training.model import TrainingModel  # noqa: E402
from ipu_effnet.training.optim import create_optimizer, set_lr  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _small_ipu_model(monkeypatch):
    monkeypatch.setenv("POPTORCH_SMALL_IPU_MODEL", "1")


def setup(*overrides):
    cfg = load(ROOT / "configs" / "tiny-cpu.yaml", ["model.name=efficientnet_tiny", "backend=ipu",
                                                   "ipu.ipu_model=true", "train.micro_batch=2", *overrides])
    name, kwargs = model_kwargs(cfg)
    model = create_model(name, **kwargs)
    tm = TrainingModel.from_config(model, cfg.train)
    opt = create_optimizer(model, cfg.train.optimizer, lr=cfg.train.lr, weight_decay=1e-5)
    return cfg, model, tm, opt


def data(n, res=32):
    return torch.randint(0, 256, (n, 3, res, res), dtype=torch.uint8), torch.randint(0, 10, (n,))


def test_training_step_on_the_ipu_model():
    cfg, model, tm, opt = setup("train.grad_accum=2")
    runner = prepare("ipu", tm, opt, cfg)
    before = [p.detach().clone() for p in model.parameters()]
    out = runner.step(*data(runner.host_batch))
    assert out["samples"] == 4 and out["loss"] > 0
    set_lr(opt, cfg.train.lr / 2)
    runner.step(*data(runner.host_batch))
    runner.sync_weights_to_host()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    runner.detach()


def test_two_stage_pipelined_step_on_the_ipu_model():
    cfg, _, tm, opt = setup("ipu.ipus_per_replica=2", "ipu.pipeline_splits=[blocks.3.0]", "train.grad_accum=3",
                            "norm.kind=layer", "norm.proxy=true")
    runner = prepare("ipu", tm, opt, cfg)
    out = runner.step(*data(runner.host_batch))
    assert out["samples"] == 6 and torch.isfinite(torch.tensor(out["loss"]))
    runner.detach()


def test_inference_on_the_ipu_model():
    cfg, _, tm, opt = setup()
    runner = prepare("ipu", tm, opt, cfg)
    losses, logits = runner.evaluate(*data(runner.eval_batch))
    assert logits.shape == (runner.eval_batch, 10) and torch.isfinite(logits.float()).all()
    runner.detach()


def test_lifecycle_train_evaluate_train_checkpoint_finetune(tmp_path):
    """Graphcore's order on the real poptorch: the training program detaches for validation, the
    inference program detaches after it, training re-attaches; a checkpoint holds plain tensors; the
    programs are destroyed before the fine-tune phase builds its own."""
    from ipu_effnet.training.checkpoint import (
        load_checkpoint,
        make_checkpoint,
        rebuild_model,
        save_checkpoint,
    )
    from ipu_effnet.training.freeze import freeze_before

    cfg, model, tm, opt = setup("norm.kind=batch", "train.grad_accum=2")
    runner = prepare("ipu", tm, opt, cfg)
    runner.step(*data(runner.host_batch))
    val = runner.evaluate_loader([data(runner.eval_batch)])
    assert val["samples"] == runner.eval_batch
    assert not runner.executor.isAttachedToDevice() and not runner._inference.isAttachedToDevice()
    runner.step(*data(runner.host_batch))
    runner.sync_weights_to_host()
    state = make_checkpoint(model, opt, epoch=1, step=2, extra=runner.checkpoint_extra())
    path = save_checkpoint(tmp_path / "ckpt-e0001-s000000002.pt", state)  # refuses tensor subclasses
    assert isinstance(state["extra"]["ipu_rng"], list)
    runner.release()
    assert not runner.executor.isCompiled()

    ft_model = rebuild_model(load_checkpoint(path))
    freeze_before(ft_model, None)
    ft_cfg, _, _, _ = setup("norm.kind=batch")
    ft_tm = TrainingModel.from_config(ft_model, ft_cfg.train)
    ft_opt = create_optimizer(ft_model, "sgd", lr=0.01, momentum=0.0)
    ft_runner = prepare("ipu", ft_tm, ft_opt, ft_cfg)
    out = ft_runner.step(*data(ft_runner.host_batch))  # (two steps of BatchNorm statistics: values say nothing)
    assert out["samples"] == ft_runner.host_batch
    ft_runner.evaluate_loader([data(ft_runner.eval_batch)])
    ft_runner.release()


def test_lnpn_lifecycle_with_the_proxy_buffer_moved_to_the_ipu():
    """LayerNorm + Proxy Norm: poptorch moves the model to the IPU, which runs ProxyNormAct._apply and
    rebuilds its quantile buffer; training, validation and training again must still run, and the host
    buffer stays fp32."""
    from norms.proxy import ProxyNormAct

    cfg, model, tm, opt = setup("norm.kind=layer", "norm.proxy=true", "train.precision=16.32")
    runner = prepare("ipu", tm, opt, cfg)
    for _ in range(2):
        out = runner.step(*data(runner.host_batch))
        assert torch.isfinite(torch.tensor(out["loss"]))
        val = runner.evaluate_loader([data(runner.eval_batch)])
        assert 0.0 <= val["top1"] <= 1.0
    runner.release()
    points = [m.proxy_points for m in model.modules() if isinstance(m, ProxyNormAct)]
    assert points and all(p.dtype == torch.float32 and type(p) is torch.Tensor for p in points)
