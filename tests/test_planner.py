"""The split planner: balanced stages for B0..B7, Graphcore's published splits fit, B4 on one
IPU does not. Golden layouts: docs/reference.md section 6; memory: section 7 (900 MB per Mk2 IPU)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from ipu_effnet.cli import main
from ipu_effnet.models import create_model
from ipu_effnet.models.profile import profile_model
from ipu_effnet.pipeline.cost import build_cost_model
from ipu_effnet.pipeline.planner import BALANCE_BOUND, evaluate, plan

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@lru_cache(maxsize=None)
def _model_and_profile(name: str):
    with torch.device("meta"):
        model = create_model(name, norm="group")
    return model, profile_model(model, model.train_resolution)


def cost_model(name: str, stages: int, micro_batch: int = 1, amp=(0.15,)):
    model, profile = _model_and_profile(name)
    return build_cost_model(model, profile, model_name=name, micro_batch=micro_batch, precision="16.16",
                            grad_accum=8, stages=stages, available_memory_proportion=amp)


@pytest.mark.slow
@pytest.mark.parametrize("stages", [2, 4, 8])
@pytest.mark.parametrize("variant", [f"efficientnet_b{i}{g}" for i in range(8) for g in ("", "_g16")])
def test_slowest_stage_within_bound_or_explained(variant, stages):
    cm = cost_model(variant, stages)
    p = plan(cm, stages)
    assert len(p.stages) == stages and len(p.splits) == stages - 1
    assert sum(s.macs for s in p.stages) == cm.total_macs
    assert p.balance == pytest.approx(max(s.macs for s in p.stages) * stages / cm.total_macs)
    if p.balance > BALANCE_BOUND:
        assert p.reason, f"{variant} x{stages}: balance {p.balance:.2f} with no reason"
        assert p.reason.split(":")[0] in ("indivisible", "granularity", "memory")
    # the splits are real module paths, in forward order, and re-evaluate to the same stages
    again = evaluate(cm, p.splits)
    assert [s.macs for s in again.stages] == [s.macs for s in p.stages]


def test_planner_is_exact_on_a_small_case():
    """Brute force over every pair of candidate points agrees with the dynamic programme (3 stages)."""
    cm = cost_model("efficientnet_b0_g16", 3)
    budget = cm.assumptions.ipu_memory_mb * 1e6
    cands = cm.candidates()
    m = len(cm.units)
    best = None
    for a in cands:
        for b in cands:
            if b <= a:
                continue
            bounds = [0, a, b, m]
            if all(cm.stage_memory(k, 3, i, j)["total"] <= budget for k, (i, j) in enumerate(zip(bounds, bounds[1:]))):
                worst = max(cm.macs(i, j) for i, j in zip(bounds, bounds[1:]))
                best = worst if best is None else min(best, worst)
    assert max(s.macs for s in plan(cm, 3).stages) == best


def test_stash_formula_and_recompute_lower_memory():
    cm = cost_model("efficientnet_b0", 4)
    assert [cm.in_flight(k, 4) for k in range(4)] == [7, 5, 3, 1]
    m = len(cm.units)
    with_recompute = cm.stage_memory(0, 4, 0, m // 4)
    cm.assumptions.recompute = "off"
    without = cm.stage_memory(0, 4, 0, m // 4)
    assert without["stashed_activations"] > with_recompute["stashed_activations"] + with_recompute["working_activations"]


def test_inner_split_names_resolve():
    cm = cost_model("efficientnet_b4_g16", 2)
    assert cm.position("blocks.3.0.conv_pw") == cm.position("blocks.3.0")
    assert cm.position("blocks.3.0.conv_dw") == cm.position("blocks.3.0") + 1
    assert cm.units[cm.position("blocks.3.0.se")].name == "blocks.3.0.se"


def _plan_json(capsys, config, *extra):
    assert main(["plan", "--config", str(CONFIGS / config), "--set", "train.precision=16.16", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("config, micro_batch, ipus, splits", [
    ("efficientnet-b0-g16-gn.yaml", 20, 2, ["blocks.3.0.conv_pw"]),
    ("efficientnet-b4-g16-gn.yaml", 4, 2, ["blocks.3.0.conv_dw"]),
    ("efficientnet-b4-g1-bn.yaml", 4, 4, ["blocks.1.1", "blocks.3.0", "blocks.4.5"]),
])
@pytest.mark.slow
def test_published_configs_fit(capsys, config, micro_batch, ipus, splits):
    out = _plan_json(capsys, config)
    configured = out["configured"]
    assert out["micro_batch"] == micro_batch
    assert configured["splits"] == splits and configured["num_stages"] == ipus
    assert configured["fits"], [s["memory_mb"]["total"] for s in configured["stages"]]
    assert out["plan"]["fits"] and out["plan"]["num_stages"] == ipus
    assert out["assumptions"]["overhead_mb"] > 0


def test_b4_g1_does_not_fit_one_ipu(capsys):
    out = _plan_json(capsys, "efficientnet-b4-g1-bn.yaml", "--ipus", "1")
    p = out["plan"]
    assert p["num_stages"] == 1 and p["splits"] == []
    assert not p["fits"] and p["reason"]
    assert p["stages"][0]["memory_mb"]["total"] > 900


def test_text_output_has_table_config_lines_and_assumptions(capsys):
    assert main(["plan", "--config", str(CONFIGS / "efficientnet-b0-g16-gn.yaml"), "--ipus", "2"]) == 0
    text = capsys.readouterr().out
    assert "ipu:\n  ipus_per_replica: 2\n  pipeline_splits: [" in text
    assert "as configured (2 stages" in text
    assert "assumptions:" in text and "ASSUMED" in text


def test_bad_split_in_config_exits_2(capsys):
    assert main(["plan", "--config", str(CONFIGS / "efficientnet-b0-g16-gn.yaml"),
                 "--set", "ipu.pipeline_splits=[blocks.9.0]"]) == 2
