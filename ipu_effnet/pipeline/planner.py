"""Pipeline split planner: choose where N stages begin so the slowest stage is as fast as possible.

The candidate split points are the starts of the cost model's units (every block, the inner points
conv_dw / se / conv_pwl of each block, and the head). A plan of N stages picks N - 1 of them in forward
order. The planner minimises the largest stage's forward MACs (backward costs about twice the forward
everywhere, so the factor cancels) among the plans whose every stage fits the per-IPU memory budget,
exactly, by dynamic programming over (stage, first unit):

    best(k, i) = min over candidate j > i of  max(cost(stage k = units [i, j)), best(k + 1, j))
    best(N - 1, i) = cost(units [i, end))

where a stage that does not fit the budget is excluded; ties are broken by the largest memory share.
When no plan fits, the same recursion minimises the largest memory over budget first, so the answer is
the plan closest to fitting, reported as not fitting. See docs/pipeline.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ipu_effnet.errors import UsageError

from .cost import MB, CostModel

BALANCE_BOUND = 1.25  # acceptance: the slowest stage carries at most this x the mean stage compute


@dataclass
class StageReport:
    index: int
    first: str            # module path of the stage's first unit
    last: str             # module path of the stage's last unit
    units: int
    macs: int             # per sample, forward
    macs_share: float
    params: int
    memory_mb: Dict[str, float]
    fits: bool


@dataclass
class Plan:
    model: str
    resolution: int
    micro_batch: int
    num_stages: int
    splits: List[str]
    stages: List[StageReport]
    budget_mb: float
    fits: bool
    balance: float              # slowest stage MACs / mean stage MACs
    reason: Optional[str] = None  # why the balance cannot be better (when above BALANCE_BOUND) or why no fit
    notes: List[str] = field(default_factory=list)
    assumptions: Dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)

    def config_lines(self) -> str:
        splits = ", ".join(self.splits)
        return f"ipu:\n  ipus_per_replica: {self.num_stages}\n  pipeline_splits: [{splits}]"


def evaluate(cm: CostModel, splits: Sequence[str], budget_mb: Optional[float] = None) -> Plan:
    """The report for the given splits (as configured): each names the first module of a new stage."""
    positions = []
    notes = []
    for name in splits:
        pos = cm.position(name)
        if pos is None:
            raise UsageError(f"ipu.pipeline_splits: {name!r} names no module of the model")
        unit = cm.units[pos]
        if name != unit.name and name not in unit.aliases and not unit.name.startswith(name + "."):
            notes.append(f"{name} lies inside unit {unit.name}: evaluated as a split at {unit.name}")
        positions.append(pos)
    for a, b, na, nb in zip(positions, positions[1:], splits, splits[1:]):
        if b <= a:
            raise UsageError(f"ipu.pipeline_splits: {nb!r} does not come after {na!r} in the model; "
                             "list the splits in forward order, one per new stage")
    if positions and positions[0] == 0:
        raise UsageError(f"ipu.pipeline_splits: {splits[0]!r} starts the model; the first stage begins there anyway")
    return _report(cm, [0] + positions + [len(cm.units)], budget_mb, notes, list(splits))


def plan(cm: CostModel, num_stages: int, budget_mb: Optional[float] = None) -> Plan:
    """The split of `cm`'s model into `num_stages` stages that minimises the slowest stage's MACs
    subject to every stage fitting `budget_mb` (default: the cost model's IPU memory)."""
    if num_stages < 1:
        raise UsageError(f"--ipus {num_stages}: a pipeline needs at least 1 stage")
    budget = (budget_mb if budget_mb is not None else cm.assumptions.ipu_memory_mb) * MB
    cands = cm.candidates()
    if num_stages - 1 > len(cands):
        raise UsageError(f"--ipus {num_stages}: the model has only {len(cands)} candidate split points, "
                         f"so at most {len(cands) + 1} stages")
    bounds = _solve(cm, num_stages, budget, cands, by_memory=False)
    notes: List[str] = []
    if bounds is None:
        bounds = _solve(cm, num_stages, budget, cands, by_memory=True)
        notes.append(f"no split into {num_stages} stage(s) fits {budget / MB:.0f} MB per IPU: "
                     "shown is the split with the smallest peak memory")
    assert bounds is not None
    splits = [cm.units[b].name for b in bounds[1:-1]]
    report = _report(cm, bounds, budget_mb, notes, splits)
    if report.balance > BALANCE_BOUND:
        report.reason = _why_unbalanced(cm, num_stages, budget, cands, report)
    elif not report.fits:
        report.reason = notes[0]
    return report


# -- internals --------------------------------------------------------------------------------------------

def _solve(cm: CostModel, n: int, budget: float, cands: List[int], by_memory: bool) -> Optional[List[int]]:
    m = len(cm.units)
    starts = [0] + cands
    inf = (float("inf"), float("inf"))

    def value(k: int, i: int, j: int) -> Optional[Tuple[float, float]]:
        mem = cm.stage_memory(k, n, i, j)["total"] / budget
        macs = float(cm.macs(i, j))
        if by_memory:
            return (max(mem, 1.0), macs)
        return (macs, mem) if mem <= 1.0 else None

    # best[k][i] = (value, next start) for stages k.. starting at unit i
    best: List[Dict[int, Tuple[Tuple[float, float], int]]] = [dict() for _ in range(n)]
    for i in starts:
        v = value(n - 1, i, m)
        if v is not None:
            best[n - 1][i] = (v, m)
    for k in range(n - 2, -1, -1):
        for i in (starts if k > 0 else [0]):
            top = (inf, -1)
            for j in cands:
                if j <= i or j not in best[k + 1]:
                    continue
                here = value(k, i, j)
                if here is None:
                    continue  # this stage overflows; a longer one may still fit on a later stage index
                if not by_memory and here[0] > top[0][0]:
                    break  # MACs of stage k only grow with j
                rest = best[k + 1][j][0]
                v = (max(here[0], rest[0]), max(here[1], rest[1]))
                if v < top[0]:
                    top = (v, j)
            if top[1] >= 0:
                best[k][i] = top
    if 0 not in best[0]:
        return None
    bounds = [0]
    i = 0
    for k in range(n):
        i = best[k][i][1]
        bounds.append(i)
    return bounds


def _report(cm: CostModel, bounds: List[int], budget_mb: Optional[float], notes: List[str],
            splits: List[str]) -> Plan:
    n = len(bounds) - 1
    budget = budget_mb if budget_mb is not None else cm.assumptions.ipu_memory_mb
    total = cm.total_macs or 1
    stages = []
    for k, (i, j) in enumerate(zip(bounds, bounds[1:])):
        mem = cm.stage_memory(k, n, i, j)
        mem_mb = {key: (round(v / MB, 1) if key != "in_flight" else v) for key, v in mem.items()}
        stages.append(StageReport(k, cm.units[i].name, cm.units[j - 1].name, j - i, cm.macs(i, j),
                                  cm.macs(i, j) / total, cm.params(i, j), mem_mb, mem["total"] <= budget * MB))
    balance = max(s.macs for s in stages) / (total / n)
    return Plan(cm.model_name, cm.resolution, cm.micro_batch, n, splits, stages, budget,
                all(s.fits for s in stages), balance, None, notes,
                dict(cm.assumptions.to_dict(), budget_mb=budget,
                     available_memory_proportion=list(cm.available_memory_proportion),
                     balance_bound=BALANCE_BOUND))


def _why_unbalanced(cm: CostModel, n: int, budget: float, cands: List[int], report: Plan) -> str:
    mean = cm.total_macs / n
    edges = [0] + cands + [len(cm.units)]
    pieces = [(cm.macs(a, b), cm.units[a].name) for a, b in zip(edges, edges[1:]) if b > a]
    biggest, name = max(pieces)
    if biggest > BALANCE_BOUND * mean:
        return (f"indivisible: the piece starting at {name} (no candidate split inside it) carries "
                f"{biggest / cm.total_macs:.1%} of the compute, {biggest / mean:.2f}x the mean stage "
                f"share of {1 / n:.1%}; no split can do better than that")
    free = _solve(cm, n, float("inf"), cands, by_memory=False)
    if free is not None:
        free_max = max(cm.macs(a, b) for a, b in zip(free, free[1:]))
        if free_max < max(s.macs for s in report.stages):
            return (f"memory: without the {budget / MB:.0f} MB budget the best split would carry "
                    f"{free_max / mean:.2f}x the mean; every such split overflows an IPU")
    return (f"granularity: this is the exact optimum over {len(cands)} candidate points (largest piece "
            f"{name}, {biggest / mean:.2f}x the mean); the pieces cannot be grouped more evenly into {n} stages")
