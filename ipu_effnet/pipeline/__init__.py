"""Pipeline stages: split names (module paths of the model as built) -> modules, stages, a cost model."""

from .cost import Assumptions, CostModel, Unit, build_cost_model
from .planner import BALANCE_BOUND, Plan, StageReport, evaluate, plan

__all__ = ["BALANCE_BOUND", "Assumptions", "CostModel", "Plan", "StageReport", "Unit", "build_cost_model",
           "evaluate", "plan"]
