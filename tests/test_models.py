"""The model family against the published numbers (docs/reference.md sections 1-3) and its structure."""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from ipu_effnet.cli import main
from ipu_effnet.models import create_model, create_model_from_args, list_models
from ipu_effnet.models.blocks import DropPath, FusedMBConv, MBConv
from ipu_effnet.models.builder import make_divisible
from ipu_effnet.models.profile import profile_model, stage_table
from norms import NormSpec

# docs/reference.md sections 1 and 2: torchvision parameter counts (BatchNorm, 1000 classes) and GMACs
# (conv + linear multiply-accumulates) at the resolution given.
PUBLISHED = {
    "efficientnet_b0": (5_288_548, 0.386, 224),
    "efficientnet_b1": (7_794_184, 0.687, 240),
    "efficientnet_b2": (9_109_994, 0.994, 260),
    "efficientnet_b3": (12_233_232, 1.827, 300),
    "efficientnet_b4": (19_341_616, 4.394, 380),
    "efficientnet_b5": (30_389_784, 10.266, 456),
    "efficientnet_b6": (43_040_704, 19.068, 528),
    "efficientnet_b7": (66_347_960, 37.746, 600),
    "efficientnetv2_s": (21_458_488, 8.366, 384),
    "efficientnetv2_m": (54_139_356, 24.582, 480),
    "efficientnetv2_l": (118_515_272, 56.08, 480),
}
V1 = [f"efficientnet_b{i}" for i in range(8)]
ALL_NAMED = V1 + [f"{n}_g16" for n in V1] + ["efficientnetv2_s", "efficientnetv2_m", "efficientnetv2_l"]


def info_json(*argv: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["info", "--json", *argv]) == 0
    return json.loads(out.getvalue())


def meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **kwargs)


def test_list_models_names_the_family():
    assert sorted(list_models()) == sorted(ALL_NAMED)
    assert "efficientnet_tiny" in list_models(include_extra=True)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_info_reports_published_params_and_gmacs(name):
    params, gmacs, res = PUBLISHED[name]
    info = info_json("--model", name)
    assert info["params"] == params
    assert info["resolution"] == res  # the default is the resolution of the published figure
    assert abs(info["gmacs"] / gmacs - 1) < 0.02
    assert sum(s["params"] for s in info["stages"]) == params
    assert sum(s["macs"] for s in info["stages"]) == info["macs"]


def test_b2_gmacs_at_288_px():
    assert abs(info_json("--model", "efficientnet_b2", "--res", "288")["gmacs"] / 1.088 - 1) < 0.02


@pytest.mark.slow
def test_info_as_a_subprocess_prints_json():
    out = subprocess.run([sys.executable, "-m", "ipu_effnet", "info", "--model", "efficientnet_b0", "--json"],
                         capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert (info["params"], info["resolution"]) == (5_288_548, 224)


@pytest.mark.slow
def test_info_bad_model_is_one_line_and_exit_2():
    out = subprocess.run([sys.executable, "-m", "ipu_effnet", "info", "--model", "efficientnet_b9"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "efficientnet_b9" in lines[0] and "efficientnet_b" in lines[0]


def test_b0_stage_table_matches_the_paper():
    model = meta_model("efficientnet_b0")
    rows = stage_table(model, profile_model(model, 224))
    assert [r.channels for r in rows] == [32, 16, 24, 40, 80, 112, 192, 320, 1280, 1000]
    assert [r.repeats for r in rows[1:8]] == [1, 2, 2, 3, 3, 4, 1]
    assert [r.resolution[0] for r in rows[:9]] == [112, 112, 56, 28, 14, 14, 7, 7, 7]


@pytest.mark.parametrize("value,expected", [(32 * 1.1, 32), (40 * 1.2, 48), (16 * 1.1, 16), (3.0, 8), (112 * 1.1, 120),
                                            (1280 * 1.4, 1792), (9.6, 16)])
def test_make_divisible(value, expected):
    assert make_divisible(value) == expected


def test_depth_scaling_is_ceil_and_stride_on_first_block_only():
    model = meta_model("efficientnet_b4")
    assert [len(s) for s in model.block_args] == [math.ceil(r * 1.8) for r in (1, 2, 2, 3, 3, 4, 1)]
    for stage, table_stride in zip(model.block_args, (1, 2, 2, 2, 1, 2, 1)):
        assert [a.stride for a in stage] == [table_stride] + [1] * (len(stage) - 1)
        assert all(a.in_chs == stage[0].out_chs for a in stage[1:])


def test_se_width_is_a_quarter_of_the_block_input():
    model = meta_model("efficientnet_b0")
    block = model.blocks[1][0]
    assert block.se.conv_reduce.out_channels == 16 // 4
    assert block.se.conv_reduce.in_channels == 16 * 6


def test_drop_path_schedule_is_linear_over_all_blocks():
    model = meta_model("efficientnet_b0", drop_path_rate=0.2)
    rates = [a.drop_path_rate for s in model.block_args for a in s]
    assert len(rates) == 16
    assert rates == pytest.approx([0.2 * i / 16 for i in range(16)])
    # the module exists exactly on residual blocks with a non-zero rate, and carries that rate
    for stage, stage_args in zip(model.blocks, model.block_args):
        for block, args in zip(stage, stage_args):
            expected = block.has_residual and args.drop_path_rate > 0
            assert isinstance(block.drop_path, DropPath) == expected, args.path
            if expected:
                assert block.drop_path.rate == args.drop_path_rate
    assert model.blocks[6][0].has_residual is False and model.blocks[1][1].has_residual is True


@pytest.mark.parametrize("name", V1)
def test_g16_variants_use_16_channels_per_group_and_expansion_4(name):
    model = meta_model(name + "_g16")
    convs = [(path, m) for path, m in model.named_modules() if path.endswith("conv_dw")]
    assert len(convs) == sum(len(s) for s in model.block_args)
    for path, conv in convs:
        chs = conv.in_channels
        if chs % 16 == 0:
            assert chs // conv.groups == 16, path
        else:
            # only the expand-1 first stage of B3..B6 (24, 40 or 56 channels): Graphcore's rule
            assert path.startswith("blocks.0.") and chs in (24, 40, 56), path
            assert conv.groups == {24: 1, 40: 2, 56: 2}[chs]
    for stage in model.block_args[1:]:
        assert all(a.mid_chs == 4 * a.in_chs for a in stage)
    assert all(a.mid_chs == a.in_chs for a in model.block_args[0])  # the expand-1 stage stays at 1


def test_g16_b0_is_b0_with_group_size_16_and_expand_4():
    a = meta_model("efficientnet_b0_g16")
    b = meta_model("efficientnet_b0", group_size=16, expand_ratio=4)
    assert [tuple(p.shape) for p in a.parameters()] == [tuple(p.shape) for p in b.parameters()]


def test_group_size_that_does_not_divide_is_a_clear_error():
    with pytest.raises(ValueError, match=r"group_size 16 does not divide the 40 channels of blocks\.0\.0\.conv_dw"):
        meta_model("efficientnet_b3", group_size=16)
    model = meta_model("efficientnet_b3", group_size=16, fit_group_size=True)
    assert model.blocks[0][0].conv_dw.groups == 2 and model.blocks[0][1].conv_dw.groups == 1


def test_fused_blocks_ignore_group_size_and_mbconv_stages_take_it():
    model = meta_model("efficientnetv2_s", group_size=16)
    assert isinstance(model.blocks[0][0], FusedMBConv) and model.blocks[0][0].conv_exp.groups == 1
    assert isinstance(model.blocks[3][0], MBConv)
    assert model.blocks[3][0].conv_dw.in_channels // model.blocks[3][0].conv_dw.groups == 16


def test_v2_fused_expand_1_is_a_single_conv():
    block = meta_model("efficientnetv2_s").blocks[0][0]
    assert isinstance(block.conv_pwl, nn.Identity) and block.conv_exp.out_channels == 24 and block.has_residual


def test_module_paths_for_pipeline_splits():
    model = meta_model("efficientnet_b0")
    for path in ["stem", "stem.conv", "blocks.3.0", "blocks.3.0.conv_pw", "blocks.5.3", "blocks.5.3.se",
                 "blocks.3.0.conv_pwl", "head", "pool", "classifier"]:
        model.get_submodule(path)
    assert model.block_paths()[0] == "blocks.0.0" and model.block_paths()[-1] == "blocks.6.0"
    assert isinstance(model.blocks[0][0].conv_pw, nn.Identity)  # stable names without expansion


def test_unknown_model_suggests_the_closest_name():
    with pytest.raises(ValueError, match="did you mean 'efficientnet_b7'"):
        create_model("efficientnet_b9")


def test_model_args_rebuild_the_same_model():
    torch.manual_seed(1)
    model = create_model("efficientnet_tiny", num_classes=10, norm=NormSpec(kind="group", groups=2), group_size=16)
    clone = create_model_from_args(model.model_args)
    clone.load_state_dict(model.state_dict())
    model.eval()
    clone.eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(model(x), clone(x))


def _forward_backward(model: nn.Module, res: int, batch: int = 2) -> None:
    model.train()
    x = torch.randn(batch, 3, res, res)
    out = model(x)
    assert out.shape == (batch, model.num_classes)
    assert torch.isfinite(out).all()
    out.float().logsumexp(1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing[:5]


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_NAMED)
def test_forward_backward_every_named_variant(name):
    # Small input and 10 classes keep this fast; 64 px still leaves 2x2 after five stride-2 stages.
    _forward_backward(create_model(name, num_classes=10), res=64)


NORMS = [NormSpec(kind="batch"), NormSpec(kind="group"), NormSpec(kind="group", groups=8), NormSpec(kind="layer"),
         NormSpec(kind="none"), NormSpec(kind="layer", proxy=True), NormSpec(kind="group", proxy=True)]


@pytest.mark.slow
@pytest.mark.parametrize("norm", NORMS, ids=lambda n: n.kind + ("+proxy" if n.proxy else "") + f"{n.groups}")
@pytest.mark.parametrize("name,group_size", [("efficientnet_tiny", 1), ("efficientnet_tiny", 16)])
def test_forward_backward_every_norm_kind(name, group_size, norm):
    model = create_model(name, num_classes=10, norm=norm, group_size=group_size, drop_path_rate=0.0)
    _forward_backward(model, res=64, batch=3)
    # with no dropped paths, every parameter receives a non-zero gradient
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, zero[:5]


def test_drop_path_drops_whole_samples_and_rescales():
    torch.manual_seed(0)
    dp = DropPath(0.5).train()
    y = dp(torch.ones(1000, 3, 2, 2))
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()
    assert 0.4 < (per_sample[:, 0] > 0).float().mean() < 0.6
    assert torch.equal(dp.eval()(torch.ones(4, 3)), torch.ones(4, 3))


def test_in_chans_option():
    model = create_model("efficientnet_tiny", num_classes=4, in_chans=1)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 4)


@pytest.mark.slow
def test_family_table_puts_g1_beside_g16():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["info", "--family"]) == 0
    rows = {line.split("|")[1].strip(): line for line in out.getvalue().splitlines() if line.startswith("| ")}
    assert "| 224 | 5,288,548 | 0.386 |" in rows["B0"]
    assert "66,347,960" in rows["B7"] and "118,515,272" in rows["V2-L"]
    g16 = meta_model("efficientnet_b4_g16")
    assert f"{sum(p.numel() for p in g16.parameters()):,}" in rows["B4"]
