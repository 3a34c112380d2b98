"""The `bench` command and the ipu_effnet/analysis/bench package: option parsing, --vs, and a tiny real run."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from ipu_effnet.analysis.bench import (
    BenchConfig,
    BenchReport,
    ConfigResult,
    Timing,
    build_workload,
    format_report,
    run_bench,
)
from ipu_effnet.cli import main
from ipu_effnet.errors import UsageError

TINY = ["--model", "efficientnet_tiny", "--res", "32", "--batch", "2", "--steps", "1", "--warmup", "0", "--quiet"]


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


def test_vs_overrides_only_the_named_options():
    a = BenchConfig(model="efficientnet_b0_g16", norm="layer", res=160, batch=16)
    b = a.with_overrides("norm=layer+proxy batch=8 channels-last=true expand_ratio=6 group_size=none")
    assert (b.norm, b.batch, b.channels_last, b.expand_ratio, b.group_size) == ("layer+proxy", 8, True, 6.0, None)
    assert (b.model, b.res, b.steps) == (a.model, a.res, a.steps)
    assert b.label(a) == "norm=layer+proxy expand_ratio=6.0 batch=8 channels_last=True"  # field order
    with pytest.raises(UsageError, match="did you mean 'norm'"):
        a.with_overrides("nrom=layer")
    with pytest.raises(UsageError, match="expected KEY=VALUE"):
        a.with_overrides("layer")
    with pytest.raises(UsageError, match="batch='many'"):
        a.with_overrides("batch=many")
    with pytest.raises(UsageError, match="norm 'layr'"):
        a.with_overrides("norm=layr")
    with pytest.raises(UsageError, match="mode"):
        a.with_overrides("mode=fast")
    with pytest.raises(UsageError, match="proxy_impl 'fast'"):
        a.with_overrides("proxy_impl=fast")


def test_report_json_keeps_significant_figures_of_small_ratios():
    # a data-mode baseline 45x slower than A: the JSON ratio must still agree with its own medians
    a, b = BenchConfig(), BenchConfig(norm="layer+proxy")
    report = BenchReport([ConfigResult(a, 32, [Timing(1234.567, 1000.0)], {}),
                          ConfigResult(b, 32, [Timing(27.5653, 20.0)], {})],
                         repeats=1, environment={"torch": "x", "threads": 2, "cpus": 2, "load_average": [0.1]})
    out = json.loads(json.dumps(report.to_dict()))
    medians = [r["median"] for r in out["results"]]
    assert medians == [1234.57, 27.5653]
    assert out["ratio"] == pytest.approx(27.5653 / 1234.567, rel=1e-5)
    assert out["ratio"] == pytest.approx(medians[1] / medians[0], rel=1e-5)


def test_proxy_impl_option_sets_every_proxy_layer():
    from ipu_effnet.analysis.bench.build import build_model
    from norms.proxy import ProxyNormAct

    cfg = BenchConfig(model="efficientnet_tiny", norm="layer+proxy", res=32, batch=1, num_classes=10)
    for impl, want in ((None, "gn_silu"), ("reference", "reference"), ("inplace", "inplace")):
        model, res = build_model(cfg.with_overrides(f"proxy_impl={impl}"))
        impls = {m.impl for m in model.modules() if isinstance(m, ProxyNormAct)}
        assert impls == {want} and res == 32


@pytest.mark.slow
def test_train_mode_times_the_training_model_step(monkeypatch):
    """The train workload is the recipe's step: TrainingModel (uint8 host batch, the loss inside forward)
    driven by TorchRunner.step with SGD; one step moves the weights."""
    import torch

    from ipu_effnet.backends.torch_backend import TorchRunner
    from ipu_effnet.training.model import TrainingModel

    seen = []
    real_step = TorchRunner.step

    def spy(self, images, labels):
        weight = self.model.model.classifier.weight
        before = weight.detach().clone()
        out = real_step(self, images, labels)
        seen.append((type(self.model), images.dtype, tuple(images.shape), self.grad_accum, type(self.optimizer),
                     bool(labels.min() >= 0 and labels.max() < 10), not torch.equal(before, weight)))
        return out

    monkeypatch.setattr(TorchRunner, "step", spy)
    cfg = BenchConfig(model="efficientnet_tiny", norm="group", res=32, batch=4, steps=1, warmup=0, num_classes=10)
    build_workload(cfg).step()
    assert seen == [(TrainingModel, torch.uint8, (4, 3, 32, 32), 1, torch.optim.SGD, True, True)]


def test_report_ratio_is_b_over_a_of_the_medians():
    a, b = BenchConfig(), BenchConfig(norm="layer+proxy")
    report = BenchReport([ConfigResult(a, 224, [Timing(10, 5), Timing(12, 6), Timing(11, 5)], {}),
                          ConfigResult(b, 224, [Timing(9, 4), Timing(9.9, 4.5), Timing(10, 5)], {})],
                         repeats=3, environment={"torch": "x", "threads": 2, "cpus": 2, "load_average": [0.1]})
    assert report.ratio == pytest.approx(9.9 / 11)
    assert report.ratio_cpu == pytest.approx(4.5 / 5)
    assert report.paired_ratios == pytest.approx([0.9, 9.9 / 12, 10 / 11])
    assert report.paired_median == pytest.approx(0.9)  # of 0.9, 0.825, 0.909
    assert report.results[0].spread == pytest.approx(2 / 11)
    text = format_report(report)
    assert "B/A = 0.900: B is 10.0% slower" in text and "as A with norm=layer+proxy" in text
    assert json.loads(json.dumps(report.to_dict()))["ratio"] == pytest.approx(0.9)


def test_bench_command_alternates_a_and_b_and_prints_json():
    status, out, _ = _run(["bench", *TINY, "--norm", "layer", "--repeats", "2", "--vs", "norm=layer+proxy", "--json",
                           "--no-memory"])
    assert status == 0
    report = json.loads(out)
    a, b = report["results"]
    assert (a["config"]["norm"], b["config"]["norm"]) == ("layer", "layer+proxy")
    assert a["resolution"] == b["resolution"] == 32
    assert len(a["images_per_s"]) == len(b["images_per_s"]) == 2
    assert 0 < a["params"] < b["params"]  # Proxy Norm adds gamma_t, beta_t per proxy-normalised channel
    assert report["ratio"] == pytest.approx(b["median"] / a["median"], rel=1e-3)


def test_bench_infer_mode_and_usage_errors():
    status, out, _ = _run(["bench", *TINY, "--mode", "infer", "--repeats", "1", "--no-memory"])
    assert status == 0 and "inference" in out and "img/s" in out and "B/A" not in out
    assert _run(["bench", *TINY, "--norm", "batch+proxy"])[0] == 2
    assert _run(["bench", *TINY, "--vs", "colour=red"])[0] == 2
    assert _run(["bench", *TINY, "--repeats", "0"])[0] == 2
    status, _, err = _run(["bench", *TINY, "--model", "efficientnet_b9"])
    assert status == 2 and "unknown model" in err


def test_run_bench_interleaves_rounds():
    seen = []
    a = BenchConfig(model="efficientnet_tiny", norm="group", res=32, batch=1, steps=1, warmup=0)
    run_bench([a, a.with_overrides("norm=none")], repeats=2, progress=seen.append, memory=False)
    assert [line.split(":")[0] for line in seen] == ["round 1/2 A", "round 1/2 B", "round 2/2 A", "round 2/2 B"]


def _write_jpegs(root, count, size=(96, 72)):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.jpg")


def test_new_options_validate_with_one_line_errors():
    a = BenchConfig(model="efficientnet_b0", norm="batch")
    assert a.with_overrides("device=cuda precision=fp16 workers=2 draft=false").workers == 2
    for text, match in (("precision=fp16", "needs device cuda"), ("device=tpu", "device 'tpu'"),
                        ("impl=timm", "impl 'timm'"), ("impl=geffnet norm=layer", "norm batch"),
                        ("impl=geffnet model=efficientnet_b0_g16", "no geffnet counterpart"),
                        ("jpeg_size=500", "WIDTHxHEIGHT"), ("workers=-1", "workers must be >= 0")):
        with pytest.raises(UsageError, match=match):
            a.with_overrides(text)
    data = BenchConfig(mode="data", res=160, workers=1)
    assert data.label() == "batch=16 workers=1"  # no model fields in the data mode
    assert "precision=bf16" in a.with_overrides("precision=bf16").label()


@pytest.mark.slow
def test_bench_reports_peak_memory_from_a_fresh_process():
    a = BenchConfig(model="efficientnet_tiny", norm="batch", res=32, batch=2, steps=1, warmup=0, num_classes=10)
    report = run_bench([a, a.with_overrides("batch=8")], repeats=1)
    small, large = (r.memory for r in report.results)
    for memory in (small, large):
        assert memory["peak_rss_mb"] >= memory["built_rss_mb"] > 50  # the interpreter and torch alone exceed it
        assert memory["steps_rss_mb"] == pytest.approx(memory["peak_rss_mb"] - memory["built_rss_mb"], abs=0.2)
    assert report.memory_ratio == pytest.approx(large["peak_rss_mb"] / small["peak_rss_mb"])
    assert "peak RSS" in format_report(report) and "peak memory B/A" in format_report(report)
    assert run_bench([a], repeats=1, memory=False).results[0].memory is None


def test_bf16_autocast_and_cuda_or_ipu_missing():
    status, out, _ = _run(["bench", *TINY, "--precision", "bf16", "--repeats", "1", "--no-memory"])
    assert status == 0 and "cpu bf16" in out and "TrainingModel through TorchRunner.step" in out
    import torch

    if not torch.cuda.is_available():
        status, _, err = _run(["bench", *TINY, "--device", "cuda", "--no-memory"])
        assert status == 2 and "device cuda" in err
    try:
        import poptorch  # noqa: F401
    except ImportError:
        status, _, err = _run(["bench", *TINY, "--device", "ipu", "--no-memory"])
        assert status == 2 and "poptorch" in err.lower()


def test_data_mode_on_a_jpeg_folder_draft_against_full_decode(tmp_path):
    _write_jpegs(tmp_path, 6)
    status, out, _ = _run(["bench", "--mode", "data", "--data-path", str(tmp_path), "--res", "32", "--batch", "2",
                           "--steps", "2", "--warmup", "1", "--repeats", "1", "--quiet", "--json",
                           "--threads", "1", "--vs", "draft=false workers=1 decoder=pillow resampler=pillow"])
    assert status == 0
    report = json.loads(out)
    a, b = report["results"]
    assert (a["config"]["draft"], b["config"]["draft"]) == (True, False)
    # what "auto" resolved to is reported: the fast paths for A (one thread), Pillow for the baseline B
    from ipu_effnet.data.decode import jpeg_decoder_available, torch_resampler_available

    assert a["decoder"] == ("simplejpeg" if jpeg_decoder_available() else "pillow")
    assert a["resampler"] == ("torch" if torch_resampler_available() else "pillow")
    assert (b["decoder"], b["resampler"]) == ("pillow", "pillow")
    assert a["images"] == b["images"] == 6 and a["resolution"] == 32 and b["workers"] == 1
    assert a["median_per_worker"] == pytest.approx(a["median"], rel=1e-3)  # 0 workers count as one
    assert b["median_per_worker"] == pytest.approx(b["median"], rel=1e-3)
    assert a["memory"] is None and report["ratio"] == pytest.approx(b["median"] / a["median"], rel=1e-3)
    assert _run(["bench", "--mode", "data", "--data-path", str(tmp_path / "missing"), "--quiet"])[0] == 2
    status, out, _ = _run(["bench", "--mode", "data", "--data-path", str(tmp_path), "--res", "32", "--batch", "2",
                           "--steps", "1", "--warmup", "0", "--repeats", "1", "--quiet", "--preprocess", "eval"])
    assert status == 0 and "evaluation preprocessing" in out and "resampler pillow" in out


def test_draft_option_of_the_train_transform_decodes_at_full_size(tmp_path):
    import random

    from PIL import Image

    from ipu_effnet.data.transforms import TrainTransform, decode_region

    _write_jpegs(tmp_path, 1, size=(400, 300))
    path = next(tmp_path.rglob("*.jpg"))
    with Image.open(path) as img:
        assert decode_region(img, (0, 0, 400, 300), (40, 30))[0].size == (50, 38)  # libjpeg's 1/8 scale
    with Image.open(path) as img:
        assert decode_region(img, (0, 0, 400, 300), (40, 30), draft=False)[0].size == (400, 300)
    for draft in (True, False):
        with Image.open(path) as img:
            out = TrainTransform(32, draft=draft)(img, random.Random(0))
        assert tuple(out.shape) == (3, 32, 32)


@pytest.mark.slow
def test_peer_geffnet_alternates_with_ours():
    pytest.importorskip("geffnet")
    status, out, _ = _run(["bench", "--model", "efficientnet_b0", "--res", "32", "--batch", "2", "--steps", "1",
                           "--warmup", "0", "--repeats", "1", "--quiet", "--json", "--no-memory", "--peer", "geffnet"])
    assert status == 0
    a, b = json.loads(out)["results"]
    assert (a["config"]["impl"], b["config"]["impl"]) == ("ours", "geffnet")
    assert abs(a["params"] - b["params"]) < 0.01 * a["params"]  # the same network, two implementations
    assert _run(["bench", *TINY, "--peer", "geffnet", "--vs", "batch=4"])[0] == 2


def test_peer_geffnet_missing_is_a_usage_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "geffnet", None)  # import geffnet now raises ImportError
    status, _, err = _run(["bench", "--model", "efficientnet_b0", "--res", "32", "--batch", "1", "--steps", "1",
                           "--warmup", "0", "--repeats", "1", "--quiet", "--no-memory", "--peer", "geffnet"])
    assert status == 2 and "pip install --no-deps geffnet==1.0.2" in err


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_ipu_device_runs_through_poptorch(mode):
    """--device ipu builds poptorch.trainingModel / inferenceModel (here the SDK-free double of
    tests/poptorch_double, in a subprocess so that it is importable as `poptorch`) and times it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(root / "tests" / "poptorch_double"), str(root)]))
    proc = subprocess.run([sys.executable, "-m", "ipu_effnet", "bench", *TINY, "--repeats", "1", "--device", "ipu",
                           "--mode", mode, "--no-memory", "--json"], capture_output=True, text=True, cwd=root,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = json.loads(proc.stdout)["results"]
    assert result["config"]["device"] == "ipu" and result["median"] > 0


def test_ipu_half_precision_is_refused_not_run_in_fp32():
    status, _, err = _run(["bench", *TINY, "--device", "ipu", "--precision", "fp16", "--no-memory"])
    assert status == 2 and "fp32 only" in err and "train.precision" in err
