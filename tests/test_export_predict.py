"""`export` (ONNX, TorchScript) and `predict` on a small run over a class-folder data set."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipu_effnet.config import load
from ipu_effnet.errors import UsageError
from ipu_effnet.run import train
from ipu_effnet.training.checkpoint import latest_checkpoint, load_checkpoint, rebuild_model
from ipu_effnet.training.model import TrainingModel

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "fish"]  # sorted: the label order of the folders
COLOURS = {"cat": (200, 60, 40), "dog": (40, 180, 60), "fish": (50, 70, 210)}


def cli(*argv):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "ipu_effnet", *argv], capture_output=True, text=True, cwd=ROOT,
                          env=env)


def make_folder_data(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("validation", 2)):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                noise = rng.integers(-40, 40, (40, 48, 3))
                pixels = np.clip(np.array(COLOURS[name]) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}{i}.png")
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    data = make_folder_data(base / "data")
    cfg = load(ROOT / "configs" / "tiny-cpu.yaml", [
        "model.name=efficientnet_tiny", "model.resolution=32", "model.num_classes=3", "model.group_size=16",
        "norm.kind=batch", "norm.momentum=0.5", "data.dataset=imagenet", f"data.path={json.dumps(str(data))}",
        "train.epochs=3", "train.micro_batch=6", "train.optimizer=adamw", "train.lr=0.002", "train.weight_decay=0.0",
        "model.drop_path_rate=0.0", "train.bn_recalibration_batches=0", "logging.tensorboard=false"])
    # momentum 0.5: running statistics that fit after nine steps (with SGD at 0.05 and the default momentum
    # a few images reach logits in the thousands in eval mode, where an absolute 1e-4 says little)
    train(cfg, base / "run", log=lambda _m: None)
    return base / "run"


def reference_logits(ckpt, images):
    """The trained network as training evaluates it: TrainingModel's normalisation, BatchNorm unfolded."""
    tm = TrainingModel(rebuild_model(ckpt)).eval()
    with torch.no_grad():
        return tm(images)


def validation_images(run_dir: Path, res=32):
    from ipu_effnet.inference import load_images

    return load_images([run_dir.parent / "data" / "validation"], res)


@pytest.mark.slow
def test_checkpoints_store_the_class_folder_names(run_dir):
    assert load_checkpoint(latest_checkpoint(run_dir))["extra"]["classes"] == CLASSES


@pytest.mark.slow
def test_predict_names_classes_and_matches_the_network(run_dir):
    out = cli("predict", "--checkpoint", str(run_dir), str(run_dir.parent / "data" / "validation"), "--topk", "2",
              "--json")
    assert out.returncode == 0, out.stderr
    answers = json.loads(out.stdout)
    assert [Path(a["image"]).name for a in answers] == [f"{c}{i}.png" for c in CLASSES for i in range(2)]
    images, _files = validation_images(run_dir)
    probs = reference_logits(load_checkpoint(latest_checkpoint(run_dir)), images).softmax(1)
    for answer, p in zip(answers, probs):
        top = answer["top"]
        assert len(top) == 2 and {t["class"] for t in top} <= set(CLASSES)
        assert [t["class"] for t in top] == [CLASSES[t["index"]] for t in top]
        assert top[0]["index"] == int(p.argmax())
        assert [t["probability"] for t in top] == pytest.approx([float(p[t["index"]]) for t in top], abs=1e-5)
    text = cli("predict", "--checkpoint", str(run_dir), str(run_dir.parent / "data" / "validation" / "dog"))
    assert text.returncode == 0 and text.stdout.count("dog1.png: ") == 1
    missing = cli("predict", "--checkpoint", str(run_dir), str(run_dir / "no-such.png"))
    assert missing.returncode == 2 and "no such file" in missing.stderr


@pytest.mark.slow
def test_onnx_export_checks_and_agrees_with_torch_at_any_batch(run_dir):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path = run_dir / "model.onnx"
    out = cli("export", "--checkpoint", str(run_dir), "--format", "onnx", "--out", str(path))
    assert out.returncode == 0, out.stderr
    assert "onnx.checker passed" in out.stdout and "onnxruntime agrees" in out.stdout
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)  # folded
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["classes"]) == CLASSES and meta["resolution"] == "32"
    images, _ = validation_images(run_dir)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ckpt = load_checkpoint(latest_checkpoint(run_dir))
    for batch in (images, images[:1], torch.cat([images, images])):
        got = session.run(["logits"], {"images": batch.numpy()})[0]
        expected = reference_logits(ckpt, batch).numpy()
        assert 0.1 < np.abs(expected).max() < 100  # logits of a sane network: 1e-4 means something
        assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.slow
def test_torchscript_export_runs_at_another_batch(run_dir):
    path = run_dir / "model.pt"
    out = cli("export", "--checkpoint", str(run_dir), "--format", "torchscript", "--out", str(path))
    assert out.returncode == 0, out.stderr
    extra = {"classes.json": "", "meta.json": ""}
    loaded = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["classes.json"]) == CLASSES and json.loads(extra["meta.json"])["resolution"] == "32"
    images, _ = validation_images(run_dir)
    with torch.no_grad():
        got = loaded(images[:5])
    expected = reference_logits(load_checkpoint(latest_checkpoint(run_dir)), images[:5])
    assert (got - expected).abs().max() <= 1e-4


@pytest.mark.slow
def test_proxy_norm_model_exports_its_frozen_form(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from ipu_effnet.config import model_kwargs
    from ipu_effnet.models import create_model
    from ipu_effnet.training.checkpoint import make_checkpoint, save_checkpoint

    cfg = load(ROOT / "configs" / "tiny-cpu.yaml", ["model.name=efficientnet_tiny", "model.group_size=16",
                                                     "norm.kind=layer", "norm.proxy=true", "data.dataset=digits"])
    name, kwargs = model_kwargs(cfg)
    model = create_model(name, **kwargs)
    save_checkpoint(tmp_path / "checkpoints" / "ckpt-e0001-s000000001.pt",
                    make_checkpoint(model, epoch=1, step=1, config=cfg.to_dict()))
    out = cli("export", "--checkpoint", str(tmp_path), "--res", "40")
    assert out.returncode == 0, out.stderr
    assert "onnxruntime agrees" in out.stdout and "validation images of the digits data" in out.stdout
    assert (tmp_path / "export" / "model-40.onnx").is_file()


def test_missing_package_is_one_line_naming_the_install():
    from ipu_effnet.commands.export import _require

    with pytest.raises(UsageError, match="requirements-extras.txt") as err:
        _require("no_such_onnx_package", "--format onnx")
    assert "\n" not in str(err.value)
