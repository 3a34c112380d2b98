"""Pretrained weights in (models/importer.py) and TensorFlow's SAME padding (models/padding.py).

The source models are built here with random weights and random BatchNorm statistics (no downloads):
geffnet's and efficientnet_pytorch's EfficientNet-B0, installed without their dependencies (neither
needs torchvision to build a model).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from ipu_effnet.config import load
from ipu_effnet.errors import UsageError
from ipu_effnet.models import create_model
from ipu_effnet.models.importer import detect_format, load_pretrained, source_names
from ipu_effnet.models.padding import Conv2dSame, same_pads
from ipu_effnet.run.recipes import init_numerics
from norms import NormSpec

ROOT = Path(__file__).resolve().parents[1]


def randomise_norms(model: nn.Module) -> nn.Module:
    """BatchNorm affine and running statistics away from their initial values (1, 0, 0, 1), so a
    mapping that puts a norm's tensors in the wrong place cannot go unnoticed."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def geffnet_file(tmp_path_factory):
    geffnet = pytest.importorskip("geffnet")
    torch.manual_seed(0)
    src = randomise_norms(geffnet.efficientnet_b0(pretrained=False))
    path = tmp_path_factory.mktemp("weights") / "efficientnet_b0.pth"
    torch.save(src.state_dict(), path)
    return src, path


@pytest.fixture(scope="module")
def effnet_pytorch_file(tmp_path_factory):
    ep = pytest.importorskip("efficientnet_pytorch")
    torch.manual_seed(0)
    src = ep.EfficientNet.from_name("efficientnet-b0", image_size=64)
    src.set_swish(memory_efficient=False)
    src = randomise_norms(src)
    path = tmp_path_factory.mktemp("weights") / "efficientnet-b0.pth"
    torch.save({"state_dict": src.state_dict()}, path)  # inside a training script's checkpoint dict
    return src, path


def images(res=64, n=2):
    return torch.randn(n, 3, res, res, generator=torch.Generator().manual_seed(2))


def max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a.eval()(x) - b.eval()(x)).abs().max())


@pytest.mark.slow
def test_geffnet_b0_loads_and_computes_the_source_models_function(geffnet_file):
    src, path = geffnet_file
    model = create_model("efficientnet_b0", norm=NormSpec(eps=1e-5))
    lines = []
    report = load_pretrained(model, path, "auto", log=lines.append)
    assert report.format == "timm" and report.loaded == len(model.state_dict())
    assert max_diff(src, model, images()) <= 1e-5
    assert max_diff(src, model, images(96)) <= 1e-5
    assert "tensors loaded" in lines[-1]
    from ipu_effnet.models.fold import inference_copy  # what export and predict run

    assert max_diff(src, inference_copy(model), images()) <= 1e-5


@pytest.mark.slow
def test_efficientnet_pytorch_b0_needs_tf_numerics(effnet_pytorch_file):
    src, path = effnet_pytorch_file
    model = create_model("efficientnet_b0", norm=NormSpec(eps=1e-3), padding="same")
    assert load_pretrained(model, path, "efficientnet_pytorch", log=lambda _m: None).loaded == len(model.state_dict())
    assert max_diff(src, model, images()) <= 1e-5
    # the same weights with symmetric padding compute something else
    plain = create_model("efficientnet_b0", norm=NormSpec(eps=1e-3))
    warnings = []
    load_pretrained(plain, path, "auto", log=warnings.append)
    assert any("model.padding=symmetric" in w and "trained with model.padding=same" in w for w in warnings)
    with torch.no_grad():  # the feature maps (the logits of random weights are all small)
        x = images()
        assert torch.allclose(model.forward_features(x), src.extract_features(x), atol=1e-5)
        assert float((plain.forward_features(x) - src.extract_features(x)).abs().max()) > 1e-2


def test_init_numerics_sets_eps_and_padding_of_the_format(geffnet_file, effnet_pytorch_file):
    for (_src, path), eps, padding, fmt in ((geffnet_file, 1e-5, "symmetric", "timm"),
                                            (effnet_pytorch_file, 1e-3, "same", "efficientnet_pytorch")):
        cfg = load(None, ["model.name=efficientnet_b0", "norm.eps=0.01", f"model.init_from={json.dumps(str(path))}"])
        said = []
        out = init_numerics(cfg, log=said.append)
        assert (out.norm.eps, out.model.padding, out.model.init_format) == (eps, padding, fmt)
        assert len(said) == 1 and f"norm.eps={eps:g}" in said[0] and f"model.padding={padding}" in said[0]
    tf_named = Path(geffnet_file[1]).with_name("tf_efficientnet_b0.pth")
    tf_named.write_bytes(Path(geffnet_file[1]).read_bytes())
    cfg = load(None, [f"model.init_from={json.dumps(str(tf_named))}"])
    assert init_numerics(cfg, log=lambda _m: None).model.padding == "same"  # timm's TF ports


def test_other_class_count_reinitialises_the_classifier(geffnet_file):
    src, path = geffnet_file
    model = create_model("efficientnet_b0", num_classes=10, norm=NormSpec(eps=1e-5))
    before = model.classifier.weight.clone()
    lines = []
    report = load_pretrained(model, path, log=lines.append)
    assert report.reinitialised == ["classifier.weight", "classifier.bias"]
    assert torch.equal(model.classifier.weight, before)
    assert any("classifier re-initialised" in line and "1000 classes" in line for line in lines)
    with torch.no_grad():
        x = images()
        assert torch.allclose(model.eval().forward_features(x), src.features(x), atol=1e-5)  # all but the classifier


@pytest.mark.parametrize("edit, named", [
    (lambda sd: sd.pop("blocks.2.1.conv_dw.weight"), "blocks.2.1.conv_dw.weight"),
    (lambda sd: sd.__setitem__("blocks.3.0.bn2.running_var", torch.ones(7)), "blocks.3.0.bn2.running_var"),
    (lambda sd: sd.__setitem__("blocks.7.0.conv_pw.weight", torch.ones(1)), "blocks.7.0.conv_pw.weight"),
])
def test_missing_mismatched_or_extra_tensor_fails_naming_it(geffnet_file, tmp_path, edit, named):
    _src, path = geffnet_file
    sd = torch.load(path, weights_only=True)
    edit(sd)
    torch.save(sd, tmp_path / "edited.pth")
    with pytest.raises(UsageError) as err:
        load_pretrained(create_model("efficientnet_b0", norm=NormSpec(eps=1e-5)), tmp_path / "edited.pth")
    message = str(err.value)
    assert named in message and "\n" not in message


def test_a_g16_model_refuses_g1_weights(geffnet_file):
    with pytest.raises(UsageError, match=r"blocks\.0\.0\.conv_dw\.weight has shape \[32, 1, 3, 3\] in the file but the model.s blocks\.0\.0\.conv_dw\.weight has \[32, 16, 3, 3\]"):
        load_pretrained(create_model("efficientnet_b0_g16"), geffnet_file[1], log=lambda _m: None)


def test_a_pickled_model_is_refused_without_running_it(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / "model.pt")
    with pytest.raises(UsageError, match="weights_only"):
        load_pretrained(create_model("efficientnet_tiny"), tmp_path / "model.pt")


def test_torchvision_names():
    # torchvision's efficientnet_b0 state dict, as its module tree names it: features.0 the stem, features.1..7
    # the stages (block.0 expansion, block.1 depthwise, block.2 fc1/fc2 squeeze-excitation, block.3
    # projection; no expansion in stage 1), features.8 the head, classifier.1 the linear layer
    known = {"features.0.0.weight": (32, 3, 3, 3), "features.1.0.block.0.0.weight": (32, 1, 3, 3),
             "features.1.0.block.1.fc1.weight": (8, 32, 1, 1), "features.1.0.block.2.1.running_var": (16,),
             "features.2.0.block.0.0.weight": (96, 16, 1, 1), "features.2.0.block.1.0.weight": (96, 1, 3, 3),
             "features.2.0.block.2.fc2.bias": (96,), "features.3.1.block.1.0.weight": (240, 1, 5, 5),
             "features.7.0.block.3.0.weight": (320, 1152, 1, 1), "features.8.0.weight": (1280, 320, 1, 1),
             "features.8.1.weight": (1280,), "classifier.1.weight": (1000, 1280)}
    model = create_model("efficientnet_b0")
    prefixes = dict(source_names(model, "torchvision"))
    theirs = {f"{prefixes[k.rpartition('.')[0]]}.{k.rpartition('.')[2]}": v.shape for k, v in model.state_dict().items()}
    for key, shape in known.items():
        assert tuple(theirs[key]) == shape, key
    assert detect_format(dict.fromkeys(theirs, torch.zeros(1))) == "torchvision"
    assert len(theirs) == len(model.state_dict())


def test_same_padding_rule():
    # TensorFlow: out = ceil(in / stride); the odd pixel of the padding goes after
    assert same_pads(224, 3, 2) == (0, 1) and same_pads(225, 3, 2) == (1, 1)
    assert same_pads(112, 5, 2) == (1, 2) and same_pads(56, 3, 1) == (1, 1)
    model = create_model("efficientnet_b0", padding="same")
    same = [n for n, m in model.named_modules() if isinstance(m, Conv2dSame)]
    assert same and all(max(m.stride) > 1 for m in model.modules() if isinstance(m, Conv2dSame))
    assert model.model_args["padding"] == "same"
    assert "padding" not in create_model("efficientnet_b0").model_args  # older checkpoints' model_args
    from ipu_effnet.models import create_model_from_args
    from ipu_effnet.models.fold import inference_copy

    rebuilt = create_model_from_args(model.model_args)
    assert [n for n, m in rebuilt.named_modules() if isinstance(m, Conv2dSame)] == same
    x = images(67, 1)  # odd size: the right/bottom padding matters
    folded = inference_copy(model.eval())
    assert any(isinstance(m, Conv2dSame) for m in folded.modules())
    assert max_diff(model, folded, x) <= 1e-4


@pytest.mark.slow
def test_cli_checks_the_init_options(tmp_path):
    def cli(*argv):
        return subprocess.run([sys.executable, "-m", "ipu_effnet", *argv], capture_output=True, text=True, cwd=ROOT)

    bad = cli("train", "--config", "configs/tiny-cpu.yaml", "--init-from", str(tmp_path / "none.pth"))
    assert bad.returncode == 2 and "no such file" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    bad = cli("finetune", "--init-from", str(tmp_path / "none.pth"), "--res", "64")
    assert bad.returncode == 2 and "needs --config" in bad.stderr


@pytest.mark.slow
def test_train_starts_from_the_file(tmp_path):
    """train --init-from: with lr 0 the run's final weights are the file's (GroupNorm: no running
    statistics move), and the resolved config records the file and its format."""
    from ipu_effnet.config import model_kwargs
    from ipu_effnet.training.checkpoint import latest_checkpoint, load_checkpoint

    sets = ["model.name=efficientnet_tiny", "model.group_size=16", "model.num_classes=4", "norm.kind=group",
            "data.num_train=8", "data.num_val=4", "train.micro_batch=4", "train.lr=0.0", "train.weight_decay=0.0",
            "logging.tensorboard=false"]
    name, kwargs = model_kwargs(load(ROOT / "configs" / "tiny-cpu.yaml", sets))
    torch.manual_seed(5)
    source = create_model(name, **kwargs)
    torch.save(source.state_dict(), tmp_path / "start.pth")
    out = subprocess.run([sys.executable, "-m", "ipu_effnet", "train", "--config", "configs/tiny-cpu.yaml",
                          *[a for s in sets for a in ("--set", s)], "--init-from", str(tmp_path / "start.pth"),
                          "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "tensors loaded (ipu_effnet format)" in out.stdout
    final = load_checkpoint(latest_checkpoint(tmp_path / "run"))["model"]
    assert all(torch.equal(final[k], v) for k, v in source.state_dict().items())
    resolved = load(tmp_path / "run" / "config.yaml")
    assert resolved.model.init_from == str(tmp_path / "start.pth") and resolved.model.init_format == "ipu_effnet"
