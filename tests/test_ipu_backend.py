"""The IPU backend without the Poplar SDK: a test double of poptorch (tests/poptorch_double) stands in.

The double records what the backend asks poptorch for and runs the model eagerly on the CPU, so these
tests check the options a config produces, where pipeline stages and recomputation checkpoints go, the
batch rule, the loss inside forward, half precision with fp32 Proxy Norm statistics, and that the
learning rate reaches the device through setOptimizer exactly when it changes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ipu_effnet.config import load, model_kwargs
from ipu_effnet.errors import UsageError
from ipu_effnet.models import create_model
from ipu_effnet.training.model import TrainingModel
from ipu_effnet.training.optim import create_optimizer, set_lr

ROOT = Path(__file__).resolve().parents[1]
DOUBLE = Path(__file__).resolve().parent / "poptorch_double"
TINY = ROOT / "configs" / "tiny-cpu.yaml"
POD_RECIPES = sorted((ROOT / "configs").glob("*pod*.yaml"))




def tiny_cfg(*overrides):
    return load(TINY, ["model.name=efficientnet_tiny", "backend=ipu", *overrides])


def tiny_setup(cfg, optimizer="sgd"):
    name, kwargs = model_kwargs(cfg)
    model = create_model(name, **kwargs)
    tm = TrainingModel.from_config(model, cfg.train)
    opt = create_optimizer(model, optimizer, lr=cfg.train.lr, weight_decay=1e-5, momentum=0.9)
    return model, tm, opt


def batch(n, res=32, classes=10):
    g = torch.Generator().manual_seed(n)
    return (torch.randint(0, 256, (n, 3, res, res), dtype=torch.uint8, generator=g),
            torch.randint(0, classes, (n,), generator=g))


# ----------------------------------------------------------------------------------------------------
# poptorch absent


@pytest.mark.slow
def test_backend_ipu_without_poptorch_exits_2_naming_the_sdk():
    out = subprocess.run([sys.executable, "-m", "ipu_effnet", "train", "--config",
                          "configs/efficientnet-b0-g16-gn-pod16.yaml", "--set", "backend=ipu", "--out", "/nonexistent/x"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "poptorch" in lines[0] and "Poplar SDK" in lines[0]
    assert "requirements-ipu.txt" in lines[0]


def test_auto_falls_back_to_torch_with_one_log_line():
    from ipu_effnet.backends import resolve_backend

    said = []
    assert resolve_backend("auto", log=said.append) == "torch"
    assert len(said) == 1 and "torch" in said[0]


def test_auto_picks_ipu_when_poptorch_imports(poptorch):
    from ipu_effnet.backends import resolve_backend

    said = []
    assert resolve_backend("auto", log=said.append) == "ipu" and "ipu" in said[0]


# ----------------------------------------------------------------------------------------------------
# Options from a config (table-driven)

OPTION_CASES = [
    # overrides, expected option values (method name -> argument)
    ([], {"replicationFactor": 1, "deviceIterations": 1, "Training.gradientAccumulation": 1,
          "Precision.setPartialsType": torch.float32, "Precision.enableStochasticRounding": False,
          "setAvailableMemoryProportion": {"IPU0": 0.15}, "randomSeed": 0}),
    (["ipu.replicas=4", "ipu.device_iterations=3", "train.grad_accum=5", "train.seed=7"],
     {"replicationFactor": 4, "deviceIterations": 3, "Training.gradientAccumulation": 5, "randomSeed": 7}),
    (["train.precision=16.16"], {"Precision.setPartialsType": torch.float16}),
    (["train.precision=16.32"], {"Precision.setPartialsType": torch.float32}),
    (["train.precision=32.32"], {"Precision.setPartialsType": torch.float32}),
    (["ipu.stochastic_rounding=true"], {"Precision.enableStochasticRounding": True}),
    (["ipu.auto_loss_scaling=true"], {"Training.setAutomaticLossScaling": True}),
    (["ipu.ipus_per_replica=2", "ipu.pipeline_splits=[blocks.3.0]", "train.grad_accum=3",
      "ipu.available_memory_proportion=[0.2, 0.3]"],
     {"setAvailableMemoryProportion": {"IPU0": 0.2, "IPU1": 0.3}, "setExecutionStrategy": "PipelinedExecution"}),
    (["ipu.ipus_per_replica=2", "ipu.pipeline_splits=[blocks.3.0]", "train.grad_accum=3"],
     {"setAvailableMemoryProportion": {"IPU0": 0.15, "IPU1": 0.15}}),
    (["ipu.executable_cache=/tmp/cache"], {"enableExecutableCaching": "/tmp/cache"}),
    (["ipu.synthetic_data=true"], {"enableSyntheticData": True}),
    (["ipu.compile_only=true", "ipu.executable_cache=/tmp/cache"], {"useOfflineIpuTarget": 2}),
    (["ipu.ipu_model=true"], {"useIpuModel": True}),
    (["ipu.optimizer_state_offchip=true"], {"TensorLocations.setOptimizerLocation": {"onChip": False}}),
    (["ipu.replicas=2", "ipu.replicated_tensor_sharding=true"],
     {"TensorLocations.setOptimizerLocation": {"useReplicatedTensorSharding": True}}),
]


@pytest.mark.parametrize("overrides,expected", OPTION_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_options_from_config(poptorch, overrides, expected):
    from ipu_effnet.backends.ipu import build_options

    opts = build_options(tiny_cfg(*overrides), poptorch)
    for key, value in expected.items():
        assert key in opts.values, f"{key} not set"
        assert opts.values[key] == value, key
    assert opts.values["Training.accumulationAndReplicationReductionType"] == poptorch.ReductionType.Mean
    assert opts.values["outputMode"] == poptorch.OutputMode.All
    if "ipu.compile_only=true" not in overrides[:1] and "ipu.ipu_model=true" not in overrides:
        assert "useIpuModel" not in opts.values  # hardware present in the double


def test_inference_options_iterate_at_least_once_per_stage(poptorch):
    from ipu_effnet.backends.ipu import build_options

    cfg = tiny_cfg("ipu.ipus_per_replica=2", "ipu.pipeline_splits=[blocks.3.0]", "train.grad_accum=3")
    opts = build_options(cfg, poptorch, train=False)
    assert opts.values["deviceIterations"] == 2 and "Training.gradientAccumulation" not in opts.values


def test_no_hardware_falls_back_to_the_ipu_model_with_a_log_line(poptorch):
    from ipu_effnet.backends.ipu import build_options

    poptorch.reset(hardware=False)
    said = []
    opts = build_options(tiny_cfg(), poptorch, log=said.append)
    assert opts.values["useIpuModel"] is True and any("IPU Model" in s for s in said)
    with pytest.raises(UsageError, match="replication"):
        build_options(tiny_cfg("ipu.replicas=2"), poptorch)


def test_popdist_options_under_poprun(poptorch, monkeypatch):
    from ipu_effnet.backends.ipu import build_options, import_popdist

    monkeypatch.setenv("POPDIST_NUM_INSTANCES", "4")
    monkeypatch.setenv("POPDIST_INSTANCE_INDEX", "1")
    monkeypatch.setenv("POPDIST_NUM_TOTAL_REPLICAS", "8")
    monkeypatch.setenv("POPDIST_NUM_IPUS_PER_REPLICA", "2")
    popdist = import_popdist()
    assert popdist is not None
    cfg = tiny_cfg("ipu.replicas=8", "ipu.ipus_per_replica=2", "ipu.pipeline_splits=[blocks.3.0]",
                   "train.grad_accum=3")
    opts = build_options(cfg, poptorch, popdist)
    assert popdist.INIT_CALLS == [1] and opts.init_before  # popdist.init() first, once
    import_popdist()
    assert popdist.INIT_CALLS == [1]
    assert getattr(opts, "popdist", False) and opts.ipus_per_replica == 2
    assert opts.replication_factor == 2 and "replicationFactor" not in opts.values  # popdist sets it
    with pytest.raises(UsageError, match="poprun started 8"):
        build_options(tiny_cfg("ipu.replicas=4", "ipu.ipus_per_replica=2", "ipu.pipeline_splits=[blocks.3.0]",
                               "train.grad_accum=3"), poptorch, popdist)


# ----------------------------------------------------------------------------------------------------
# Validation before compilation


@pytest.mark.parametrize("overrides,match", [
    (["ipu.ipus_per_replica=2", "ipu.pipeline_splits=[blocks.3.0]", "train.grad_accum=2"], "grad_accum >= 3|>= 3"),
    (["ipu.ipus_per_replica=2"], "needs ipu.pipeline_splits"),
    (["train.precision=bf16"], "no IPU equivalent"),
    (["ipu.replicated_tensor_sharding=true"], "replicas >= 2"),
    (["ipu.compile_only=true", "ipu.ipu_model=true", "ipu.executable_cache=c"], "compile_only"),
    (["ipu.compile_only=true"], "executable_cache"),
])
def test_config_errors_before_compilation(overrides, match):
    from ipu_effnet.backends.ipu import validate_ipu_config

    with pytest.raises(UsageError, match=match):
        validate_ipu_config(tiny_cfg(*overrides))


def test_combined_batch_rule():
    from ipu_effnet.backends.ipu import validate_ipu_config

    cfg = tiny_cfg("train.micro_batch=4", "ipu.device_iterations=2", "ipu.replicas=2", "train.grad_accum=3")
    layout = validate_ipu_config(cfg)
    assert layout.host_batch == 4 * 2 * 2 * 3 and layout.global_batch == 4 * 3 * 2
    assert validate_ipu_config(cfg, instances=2).host_batch == 4 * 2 * 1 * 3
    with pytest.raises(UsageError) as err:
        validate_ipu_config(cfg, num_samples=40)
    msg = str(err.value)
    assert "48 images" in msg and "40" in msg and "\n" not in msg
    with pytest.raises(UsageError, match="does not divide"):
        validate_ipu_config(cfg, instances=4 if cfg.ipu.replicas % 4 else 3)


@pytest.mark.parametrize("recipe", ["native", "halfres"])
def test_the_finetune_section_is_checked_up_front_whatever_the_recipe(recipe):
    from ipu_effnet.backends.ipu import validate_ipu_config

    pipelined = ["ipu.ipus_per_replica=2", "ipu.pipeline_splits=[blocks.3.0]", "train.grad_accum=3",
                 f"recipe={recipe}", "model.resolution=96", "finetune.resolution=128"]
    assert validate_ipu_config(tiny_cfg(*pipelined)).grad_accum == 3  # finetune falls back on train's batch
    with pytest.raises(UsageError, match=r"^finetune.grad_accum = 2: a pipeline .* >= 3"):
        validate_ipu_config(tiny_cfg(*pipelined, "finetune.grad_accum=2"))
    layout = validate_ipu_config(tiny_cfg(*pipelined, "finetune.micro_batch=8", "finetune.grad_accum=5"))
    assert (layout.micro_batch, layout.grad_accum) == (tiny_cfg(*pipelined).train.micro_batch, 3)


def test_unknown_split_names_the_nearest_paths():
    from ipu_effnet.backends.ipu import validate_ipu_config

    cfg = tiny_cfg("ipu.ipus_per_replica=2", "ipu.pipeline_splits=[blocks.3.0.conv_px]", "train.grad_accum=3")
    model = create_model("efficientnet_tiny", num_classes=10)
    with pytest.raises(UsageError) as err:
        validate_ipu_config(cfg, model)
    assert "ipu.pipeline_splits" in str(err.value) and "blocks.3.0.conv_pw" in str(err.value)
    cfg = tiny_cfg("ipu.ipus_per_replica=3", "ipu.pipeline_splits=[blocks.4.0, blocks.2.0]", "train.grad_accum=5")
    with pytest.raises(UsageError, match="forward order"):
        validate_ipu_config(cfg, model)
    with pytest.raises(UsageError, match="ipu.recompute"):
        validate_ipu_config(tiny_cfg("ipu.recompute=[blocks.9]"), model)


@pytest.mark.parametrize("recipe", POD_RECIPES, ids=lambda p: p.stem)
def test_every_ipu_recipe_validates(recipe):
    from ipu_effnet.backends.ipu import check_recipes

    (layout,) = check_recipes([str(recipe)])
    cfg = load(recipe)
    assert cfg.backend == "ipu" and layout.global_batch == cfg.train.micro_batch * cfg.train.grad_accum * cfg.ipu.replicas


def test_ipu_recipes_mirror_the_published_configs():
    assert len(POD_RECIPES) == 6
    expect = {  # micro-batch, accumulation, replicas, device iterations, split, global batch
        "efficientnet-b0-g16-gn-pod16": (20, 5, 8, 1, "blocks.3.0.conv_pw", 800),
        "efficientnet-b0-g16-lnpn-pod16": (20, 5, 8, 1, "blocks.3.0.conv_pw", 800),
        "efficientnet-b4-g16-gn-pod16": (4, 64, 8, 4, "blocks.3.0.conv_dw", 2048),
        "efficientnet-b4-g16-lnpn-pod16": (4, 64, 8, 4, "blocks.3.0.conv_dw", 2048),
        "efficientnet-b0-g16-gn-halfres-pod16": (40, 3, 8, 1, "blocks.3.0.conv_pw", 960),
        "efficientnet-b0-g16-lnpn-halfres-pod16": (40, 3, 8, 1, "blocks.3.0.conv_pw", 960),
    }
    for path in POD_RECIPES:
        cfg = load(path)
        t, i = cfg.train, cfg.ipu
        got = (t.micro_batch, t.grad_accum, i.replicas, i.device_iterations, i.pipeline_splits[0],
               t.micro_batch * t.grad_accum * i.replicas)
        assert got == expect[path.stem], path.stem
        assert i.ipus_per_replica == 2 and t.precision == "16.16" and i.loss_scaling == 128
        assert i.stochastic_rounding == ("b4" in path.stem)
        assert i.available_memory_proportion == ([0.1] if "b4" in path.stem else [0.15])
        assert cfg.norm.proxy == ("lnpn" in path.stem)
        # B4: Graphcore's memory settings (sharded optimiser state, recomputation at two residual outputs)
        assert i.replicated_tensor_sharding == ("b4" in path.stem)
        assert i.recompute == (["blocks.1.1", "blocks.1.3"] if "b4" in path.stem else [])
        if "halfres" in path.stem:
            assert (cfg.recipe, cfg.model.resolution, cfg.finetune.resolution) == ("halfres", 160, 224)
            assert (cfg.finetune.micro_batch, cfg.finetune.grad_accum, cfg.finetune.first_trainable) == (20, 5, "blocks.5.3")


# ----------------------------------------------------------------------------------------------------
# The model: stages, checkpoints, loss, precision


def test_begin_block_at_the_configured_modules_with_ipu_ids(poptorch):
    from ipu_effnet.backends.ipu import prepare_model

    cfg = tiny_cfg("ipu.ipus_per_replica=3", "ipu.pipeline_splits=[blocks.2.0, blocks.5.1.conv_dw]",
                   "train.grad_accum=5", "ipu.recompute=[blocks.1.0, blocks.4.0]")
    model, tm, _ = tiny_setup(cfg)
    prepare_model(tm, cfg, poptorch)
    begins = [c for c in poptorch.CALLS if c[0] == "BeginBlock"]
    assert begins == [("BeginBlock", "blocks.2.0", 1), ("BeginBlock", "blocks.5.1.conv_dw", 2)]
    marked = {name: m.double_begin_block for name, m in model.named_modules() if hasattr(m, "double_begin_block")}
    assert marked == {"blocks.2.0": ("blocks.2.0", 1), "blocks.5.1.conv_dw": ("blocks.5.1.conv_dw", 2)}
    tm.train()
    images, labels = batch(4)
    loss, _ = tm(images, labels)
    assert poptorch.STAGE_TRACE == [1, 2]  # stage 1 starts before stage 2 in the forward
    checkpoints = [c for c in poptorch.CALLS if c[0] == "recomputationCheckpoint"]
    out_1 = model.blocks[1][0](model.blocks[0](model.stem(tm.normalize(images))))
    assert len(checkpoints) == 2 and checkpoints[0][1] == (tuple(out_1.shape),)
    assert ("identity_loss", "none", torch.float32) in poptorch.CALLS


def test_loss_is_computed_inside_forward_and_a_step_trains(poptorch):
    from ipu_effnet.backends import prepare

    cfg = tiny_cfg("train.micro_batch=4", "train.grad_accum=2", "ipu.replicas=2", "ipu.device_iterations=2")
    model, tm, opt = tiny_setup(cfg)
    runner = prepare("ipu", tm, opt, cfg)
    assert runner.host_batch == 4 * 2 * 2 * 2
    images, labels = batch(runner.host_batch)
    before = [p.detach().clone() for p in model.parameters()]
    out = runner.step(images, labels)
    assert set(out) == {"loss", "correct", "samples"} and out["samples"] == 32
    assert out["loss"] > 0 and 0 <= out["correct"] <= 32
    # the device copy trained; the host model sees it only after copyWeightsToHost
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    runner.sync_weights_to_host()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert any(c[:2] == ("identity_loss", "none") for c in poptorch.CALLS)
    with pytest.raises(ValueError, match="exactly 32"):
        runner.step(*batch(8))


def test_mixing_coefficients_are_drawn_on_the_host(poptorch):
    from ipu_effnet.backends import prepare

    cfg = tiny_cfg("train.micro_batch=4", "train.grad_accum=2", "train.mixup_alpha=0.2", "train.cutmix=true")
    _, tm, opt = tiny_setup(cfg)
    runner = prepare("ipu", tm, opt, cfg)
    coeffs, boxes = runner.mixing_inputs(batch(8)[0])
    assert coeffs.shape == (8,) and bool((coeffs >= 0.5).all()) and boxes.shape == (2, 4)
    assert runner.step(*batch(8))["samples"] == 8


def test_half_precision_keeps_proxy_statistics_and_loss_in_fp32(poptorch):
    from ipu_effnet.backends import prepare
    from norms.proxy import ProxyNormAct

    cfg = tiny_cfg("norm.kind=layer", "norm.proxy=true", "train.precision=16.16", "train.micro_batch=4")
    model, tm, opt = tiny_setup(cfg)
    pn = [m for m in model.modules() if isinstance(m, ProxyNormAct)]
    assert pn and any(m.impl != "reference" for m in pn)
    runner = prepare("ipu", tm, opt, cfg)
    assert all(m.impl == "reference" for m in pn)  # plain autograd ops: traceable by poptorch
    assert next(model.parameters()).dtype == torch.float16
    for m in pn:
        assert m.proxy_points.dtype == torch.float32
        mean, var = m.proxy_stats()
        assert mean.dtype == var.dtype == torch.float32
    kwargs = runner.ipu_optimizer.poptorch_kwargs
    assert kwargs["loss_scaling"] == 128 and kwargs["velocity_accum_type"] == torch.float32
    out = runner.step(*batch(4))
    assert torch.isfinite(torch.tensor(out["loss"]))
    assert ("identity_loss", "none", torch.float32) in poptorch.CALLS  # the loss is fp32


def test_optimizers_map_to_poptorch_with_the_same_groups(poptorch):
    from ipu_effnet.backends.ipu import to_poptorch_optimizer

    cfg = tiny_cfg()
    for name, cls in (("rmsprop_tf", poptorch.optim.RMSprop), ("sgd", poptorch.optim.SGD),
                      ("adamw", poptorch.optim.AdamW)):
        _, _, opt = tiny_setup(cfg, optimizer=name)
        ipu_opt = to_poptorch_optimizer(opt, poptorch, cfg)
        assert isinstance(ipu_opt, cls)
        assert [len(g["params"]) for g in ipu_opt.param_groups] == [len(g["params"]) for g in opt.param_groups]
        assert [g["weight_decay"] for g in ipu_opt.param_groups] == [g["weight_decay"] for g in opt.param_groups]
        assert ipu_opt.poptorch_kwargs["loss_scaling"] == 1.0  # fp32: no loss scaling
        if name == "rmsprop_tf":
            assert ipu_opt.poptorch_kwargs["use_tf_variant"] is True
            assert ipu_opt.defaults["alpha"] == opt.defaults["alpha"] and ipu_opt.defaults["eps"] == 1e-3


def test_set_optimizer_only_when_the_lr_changes(poptorch):
    from ipu_effnet.backends import prepare

    cfg = tiny_cfg("train.micro_batch=2")
    _, tm, opt = tiny_setup(cfg)
    runner = prepare("ipu", tm, opt, cfg)
    images, labels = batch(2)
    runner.step(images, labels)
    runner.step(images, labels)
    assert runner.executor.set_optimizer_calls == []
    set_lr(opt, 0.01)
    runner.step(images, labels)
    assert runner.executor.set_optimizer_calls == [[0.01, 0.01]]
    runner.step(images, labels)
    set_lr(opt, 0.01)
    runner.step(images, labels)
    assert len(runner.executor.set_optimizer_calls) == 1
    set_lr(opt, 0.002)
    runner.step(images, labels)
    assert runner.executor.set_optimizer_calls[-1] == [0.002, 0.002]


def test_inference_runs_through_an_inference_model(poptorch):
    from ipu_effnet.backends import prepare

    cfg = tiny_cfg("train.micro_batch=2", "ipu.ipus_per_replica=2", "ipu.pipeline_splits=[blocks.3.0]",
                   "train.grad_accum=3")
    _, tm, opt = tiny_setup(cfg)
    runner = prepare("ipu", tm, opt, cfg)
    runner.step(*batch(runner.host_batch))
    assert runner.eval_batch == 2 * 2
    losses, logits = runner.evaluate(*batch(runner.eval_batch))
    assert logits.shape == (4, 10) and losses.shape == (2,)
    assert not runner.executor.isAttachedToDevice()  # the training program let go of the IPUs


def test_evaluate_loader_pads_the_last_batch_and_counts_every_sample(poptorch):
    from ipu_effnet.backends import prepare

    cfg = tiny_cfg("train.micro_batch=4")
    _, tm, opt = tiny_setup(cfg)
    runner = prepare("ipu", tm, opt, cfg)
    images, labels = batch(10)
    loader = [(images[:4], labels[:4]), (images[4:8], labels[4:8]), (images[8:], labels[8:])]
    got = runner.evaluate_loader(loader)
    assert got["samples"] == 10 and 0 <= got["top1"] <= got["top5"] <= 1
    tm.eval()
    with torch.no_grad():
        logits = tm(images)
    expected = torch.nn.functional.cross_entropy(logits.float(), labels)
    assert got["loss"] == pytest.approx(float(expected), rel=1e-4)
    assert not runner._inference.isAttachedToDevice()  # detached after the pass: the IPUs are free
    with torch.no_grad():  # new host weights (e.g. a swapped-in average): the next pass must see them
        for p in tm.model.parameters():
            p.mul_(0.5)
        logits = tm(images)
    again = runner.evaluate_loader(loader)
    assert again["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits.float(), labels)),
                                          rel=1e-4)
    assert again["loss"] != pytest.approx(got["loss"], rel=1e-6)


def test_poprun_instance(poptorch, monkeypatch):
    from ipu_effnet.backends.ipu import poprun_instance

    assert poprun_instance() == (0, 1)
    monkeypatch.setenv("POPDIST_NUM_INSTANCES", "4")
    monkeypatch.setenv("POPDIST_INSTANCE_INDEX", "3")
    assert poprun_instance() == (3, 4)


def test_data_loader_yields_host_batches(poptorch):
    from ipu_effnet.backends.ipu import build_options, create_data_loader

    cfg = tiny_cfg("train.micro_batch=2", "train.grad_accum=2", "ipu.device_iterations=2")
    opts = build_options(cfg, poptorch)
    data = torch.utils.data.TensorDataset(*batch(24))
    loader = create_data_loader(opts, data, 2, train=True, workers=0, poptorch=poptorch)
    assert loader.mode == poptorch.DataLoaderMode.Sync
    assert [len(x) for x, _ in loader] == [8, 8, 8]


def test_the_package_never_imports_the_double():
    for path in (ROOT / "ipu_effnet").rglob("*.py"):
        assert "poptorch_double" not in path.read_text(), path


@pytest.mark.slow
def test_bn_recalibration_is_a_logged_skip_on_the_ipu_backend(poptorch, tmp_path):
    """Recomputing the average's BatchNorm statistics would need a third poptorch program: the loop says
    it skips, and the summary and checkpoint say the statistics are the averaged ones."""
    from ipu_effnet.run import train
    from ipu_effnet.training.checkpoint import latest_checkpoint, load_checkpoint

    cfg = tiny_cfg("model.resolution=32", "model.num_classes=4", "model.group_size=16", "norm.kind=batch",
                   "data.num_train=8", "data.num_val=4", "train.micro_batch=4", "train.epochs=1",
                   "logging.progress=false")
    logged = []
    summary = train(cfg, tmp_path, log=logged.append)
    assert summary["averaged_bn_stats"] == "averaged" and summary["bn_recalibration_images"] == 0
    assert sum("not done on the ipu backend" in m for m in logged) == 1
    assert not load_checkpoint(latest_checkpoint(tmp_path))["averagers"]["epoch"]["bn_stats"]


@pytest.mark.slow
def test_the_training_loop_runs_on_the_ipu_backend(poptorch, tmp_path):
    """train() with backend=ipu: the runner, host-side weight sync, evaluation and checkpoints, end to end
    through the double (which runs the model eagerly on the CPU)."""
    from ipu_effnet.run import train
    from ipu_effnet.training.checkpoint import latest_checkpoint, load_checkpoint

    cfg = tiny_cfg("model.resolution=32", "model.num_classes=4", "model.group_size=16", "norm.kind=layer",
                   "norm.proxy=true", "data.num_train=16", "data.num_val=8", "train.micro_batch=4",
                   "train.epochs=2", "train.ema_decay=0.5", "logging.progress=false")
    summary = train(cfg, tmp_path, log=lambda _m: None)
    assert summary["steps"] == 2 * (16 // 4) and 0.0 <= summary["val_top1"] <= 1.0
    assert summary["val_top1_ema"] is not None
    ckpt = load_checkpoint(latest_checkpoint(tmp_path))
    assert ckpt["epoch"] == 2
    # the weights that came back from the device are the trained ones, not the initial ones
    torch.manual_seed(cfg.train.seed)  # train() seeds the same way before building its model
    name, kwargs = model_kwargs(cfg)
    initial = create_model(name, **kwargs).state_dict()
    changed = [k for k, v in initial.items() if v.is_floating_point() and not torch.equal(v, ckpt["model"][k])]
    assert "classifier.weight" in changed and len(changed) > len(initial) // 2


@pytest.mark.slow
def test_a_resumed_ipu_run_carries_the_device_optimiser_state(poptorch, tmp_path):
    """The poptorch optimiser's state lives on the device; checkpoints hold it ("ipu_state") and a resumed
    run loads it back, so momentum survives: resuming from epoch 1 ends bitwise where the straight run did."""
    import shutil

    from ipu_effnet.run import train
    from ipu_effnet.training.checkpoint import latest_checkpoint, load_checkpoint

    cfg = tiny_cfg("model.resolution=32", "model.num_classes=4", "model.group_size=16", "norm.kind=group",
                   "model.drop_rate=0.0", "model.drop_path_rate=0.0", "data.num_train=16", "data.num_val=8",
                   "train.micro_batch=4", "train.epochs=2", "train.optimizer=sgd", "train.lr_schedule=constant",
                   "train.warmup_epochs=0", "train.keep_checkpoints=2", "logging.progress=false")
    train(cfg, tmp_path / "straight", log=lambda _m: None)
    final = latest_checkpoint(tmp_path / "straight")
    saved = load_checkpoint(final)["extra"]["ipu_optimizer"]
    assert saved["ipu_state"] and all(k.endswith("momentum_buffer") for k in saved["ipu_state"])

    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    (tmp_path / "resumed" / "checkpoints" / final.name).unlink()  # as if stopped after epoch 1
    train(cfg, tmp_path / "resumed", resume=True, log=lambda _m: None)
    a, b = load_checkpoint(final), load_checkpoint(latest_checkpoint(tmp_path / "resumed"))
    assert a["step"] == b["step"] == 8
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_ipu_optimiser_state_from_elsewhere_is_refused(poptorch):
    from ipu_effnet.backends.ipu import prepare_ipu
    from ipu_effnet.training.checkpoint import CheckpointError

    cfg = tiny_cfg()
    _, tm, opt = tiny_setup(cfg)
    runner = prepare_ipu(tm, opt, cfg)
    with pytest.raises(CheckpointError, match="not written by the IPU backend"):
        runner.load_optimizer_state(opt.state_dict())  # a torch optimiser's state: no "ipu_state"


@pytest.mark.slow
@pytest.mark.distributed
def test_two_poprun_instances_report_metrics_over_both_shards(tmp_path):
    """Two poprun instances (POPDIST_* set as poprun would, the double as poptorch): instance 0 logs the
    validation over both shards, through gloo host collectives, and alone writes the run directory."""
    import json
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = ["model.name=efficientnet_tiny", "model.resolution=32", "model.num_classes=4",
                 "model.group_size=16", "norm.kind=group", "data.num_train=16", "data.num_val=10",
                 "train.micro_batch=2", "train.epochs=1", "ipu.replicas=2", "backend=ipu",
                 "distributed.host_collectives=gloo", "logging.progress=false"]
    procs = []
    for i in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{DOUBLE}{os.pathsep}{ROOT}",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), POPDIST_NUM_INSTANCES="2",
                   POPDIST_INSTANCE_INDEX=str(i), POPDIST_NUM_TOTAL_REPLICAS="2", POPDIST_NUM_IPUS_PER_REPLICA="1")
        args = [sys.executable, "-m", "ipu_effnet", "train", "--config", str(TINY), "--out", str(tmp_path / "run")]
        for o in overrides:
            args += ["--set", o]
        procs.append(subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "poprun: instance 1/2, host collectives through torch.distributed" in outs[0][0]
    assert outs[1][0].strip() == ""  # instance 1 says nothing
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_samples"] == 10 and summary["world_size"] == 2  # 5 per shard, summed


# ----------------------------------------------------------------------------------------------------
# The device lifecycle (the double in hardware mode: one attached program per set of IPUs)


def test_train_evaluate_train_hands_the_ipus_over(poptorch):
    from ipu_effnet.backends import prepare

    cfg = tiny_cfg("train.micro_batch=2", "model.num_classes=10")
    model, tm, opt = tiny_setup(cfg)
    runner = prepare("ipu", tm, opt, cfg)
    images, labels = batch(runner.host_batch)
    runner.step(images, labels)
    assert poptorch.attached_programs() == [runner.executor]
    val = runner.evaluate_loader([batch(runner.eval_batch)])
    assert val["samples"] == 2 and poptorch.attached_programs() == []  # inference detached at the end
    runner.step(images, labels)  # the training program re-attaches
    assert poptorch.attached_programs() == [runner.executor]
    runner.release()
    assert poptorch.attached_programs() == [] and not runner.executor.isCompiled()
    assert all(type(t) is torch.Tensor for t in model.state_dict().values())  # unwrapped
    with pytest.raises(RuntimeError, match="released"):
        runner.step(images, labels)


def test_evaluation_sees_the_trained_weights(poptorch):
    """The inference program gets the training program's weights through the host (detach, attach)."""
    from ipu_effnet.backends import prepare

    cfg = tiny_cfg("train.micro_batch=2", "model.drop_rate=0.0", "model.drop_path_rate=0.0")
    model, tm, opt = tiny_setup(cfg)
    runner = prepare("ipu", tm, opt, cfg)
    images, labels = batch(runner.eval_batch)
    before = runner.evaluate_loader([(images, labels)])
    for _ in range(3):
        runner.step(*batch(runner.host_batch))
    after = runner.evaluate_loader([(images, labels)])
    tm.eval()
    with torch.no_grad():  # the host now holds the trained weights; its forward is the reference
        expected = torch.nn.functional.cross_entropy(tm(images).float(), labels)
    assert after["loss"] == pytest.approx(float(expected), rel=1e-4) and after["loss"] != before["loss"]


def test_compile_builds_both_programs_on_an_offline_target(poptorch, tmp_path):
    from ipu_effnet.backends import prepare

    cfg = tiny_cfg("train.micro_batch=2", "ipu.compile_only=true", f"ipu.executable_cache={tmp_path}")
    _, tm, opt = tiny_setup(cfg)
    runner = prepare("ipu", tm, opt, cfg)
    with pytest.raises(AssertionError, match="offline"):
        runner.step(*batch(runner.host_batch))
    runner.compile(*batch(runner.host_batch), *batch(runner.eval_batch))
    assert runner.executor.isCompiled() and runner._inference.isCompiled()
    assert poptorch.attached_programs() == [] and len(list(tmp_path.glob("*.popef"))) == 2


def test_the_device_rng_state_is_set_once_compiled(poptorch):
    from ipu_effnet.backends import prepare

    cfg = tiny_cfg("train.micro_batch=2")
    _, tm, opt = tiny_setup(cfg)
    runner = prepare("ipu", tm, opt, cfg)
    assert runner.device_rng_state() is None
    state = [5] + [7] * 16
    runner.set_device_rng_state(state)  # from a checkpoint, before the first compilation
    assert runner.device_rng_state() == state
    runner.compile(*batch(runner.host_batch))
    assert runner.executor.rng_state == state
    assert runner.checkpoint_extra()["ipu_rng"] == state


def test_preparing_leaves_the_host_rng_alone(poptorch):
    """Options.randomSeed reseeds torch; a resumed run's restored RNG state must survive preparation."""
    from ipu_effnet.backends import prepare

    cfg = tiny_cfg("train.seed=3")
    _, tm, opt = tiny_setup(cfg)
    torch.manual_seed(1234)
    torch.rand(3)
    state = torch.get_rng_state()
    prepare("ipu", tm, opt, cfg)
    assert torch.equal(torch.get_rng_state(), state)


def test_half_precision_keeps_fp32_gradient_accumulators(poptorch):
    from ipu_effnet.backends.ipu import to_poptorch_optimizer

    for precision in ("16.16", "16.32", "32.32"):
        cfg = tiny_cfg(f"train.precision={precision}")
        for name in ("rmsprop_tf", "adamw", "sgd"):
            _, _, opt = tiny_setup(cfg, optimizer=name)
            accum = to_poptorch_optimizer(opt, poptorch, cfg).accum_types
            assert set(accum.values()) == {torch.float32}, (precision, name, accum)


def test_engine_options_make_workers_deterministic_and_keep_the_users(poptorch, monkeypatch):
    import json

    from ipu_effnet.backends.ipu import build_options

    monkeypatch.setenv("POPLAR_ENGINE_OPTIONS", json.dumps({"opt.enableMultiAccessCopies": "false"}))
    build_options(tiny_cfg(), poptorch)
    got = json.loads(__import__("os").environ["POPLAR_ENGINE_OPTIONS"])
    assert got == {"target.deterministicWorkers": "portable", "opt.enableMultiAccessCopies": "false"}
    monkeypatch.setenv("POPLAR_ENGINE_OPTIONS", "not json")
    with pytest.raises(UsageError, match="POPLAR_ENGINE_OPTIONS"):
        build_options(tiny_cfg(), poptorch)


def test_a_non_power_of_two_ipu_count_is_refused_not_simulated(poptorch):
    from ipu_effnet.backends.ipu import build_options

    with pytest.raises(UsageError, match="powers of two"):
        build_options(tiny_cfg("ipu.replicas=3"), poptorch)
    build_options(tiny_cfg("ipu.replicas=4"), poptorch)  # 4 IPUs: fine


def test_evaluation_pads_to_the_longest_shard(poptorch, monkeypatch, tmp_path):
    """Every instance makes as many inference calls as the one with the longest shard."""
    import os

    from ipu_effnet.backends import prepare

    monkeypatch.setenv("POPTORCH_DOUBLE_TRACE", str(tmp_path))
    cfg = tiny_cfg("train.micro_batch=2")
    _, tm, opt = tiny_setup(cfg)
    runner = prepare("ipu", tm, opt, cfg)
    images, labels = batch(3)
    got = runner.evaluate_loader([(images[:2], labels[:2]), (images[2:], labels[2:])], batches=4)
    assert got["samples"] == 3  # the padding batches are not counted
    full = runner.evaluate_loader([(images[:2], labels[:2]), (images[2:], labels[2:])])
    assert full == got
    calls = (tmp_path / f"{os.getpid()}.log").read_text().split()
    assert calls == ["inference"] * (4 + 2)
