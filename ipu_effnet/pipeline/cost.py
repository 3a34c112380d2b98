"""Memory and compute cost of pipeline stages: the model the split planner optimises against.

The model is cut into *units*, the pieces between consecutive candidate split points, in forward order:

    stem | blocks.0.0 | blocks.0.0.conv_dw | blocks.0.0.se | blocks.0.0.conv_pwl | blocks.0.1 | ... | head | pool | ...

A unit is named by the module path that starts it, which is also the split name that puts it first on a
new IPU. `blocks.S.I.conv_pw` starts the same unit as `blocks.S.I` (nothing of the block runs before
its expansion conv), so it is an alias of the block's first unit. Per unit and per sample the model
keeps MACs and parameters (from `ipu_effnet.models.profile`, a meta-device forward), the elements of
the tensors autograd keeps for backward, and the elements that cross into the unit when a stage starts
there (the tensor flowing in, plus the block input when the unit sits inside a residual block).

Per-IPU memory of stage k of N holding units [i, j) (docs/pipeline.md states every assumption):

    fixed overhead                     OVERHEAD_MB per IPU (code, exchange buffers, streams): assumed
    convolution temporaries            available_memory_proportion[k] x IPU memory (the cap Poplar plans
                                       convolutions and matmuls against; reserved, reported separately)
    weights                            P x bytes(weights)        (2 for 16.x and bf16, 4 for 32.32)
    gradients                          P x bytes(weights)        (one backward pass)
    gradient accumulators              P x 4                     (when accumulating: grad_accum > 1 or N > 1)
    fp32 master weights                P x 4                     (16-bit weights, --master-weights only:
                                       Graphcore's 16.16 updates fp16 weights in place, stochastic
                                       rounding on for B4, with fp32 optimiser state)
    optimiser state                    P x 4 x slots             (rmsprop_tf 2, adamw 2, sgd 1 or 0)
    activations, no recomputation      F(k, N) x B x A(i, j)
    activations, recomputation         F(k, N) x B x S(i, j) + B x max segment of A(i, j)

with F(k, N) = 2 (N - k) - 1 micro-batches in flight on stage k (0-based): a micro-batch's backward
reaches stage k after N - k - 1 forward and N - k - 1 backward pipeline cycles on the later stages, so
stage k starts 2 (N - k) - 2 more micro-batches before it can free the first (Graphcore's grouped
pipelining: PopART/poptorch "Pipelining" in the IPU programmer's guide; the last stage holds one).
A(i, j) is the activation bytes of one sample kept for backward, S(i, j) what recomputation stashes
(the stage input and the recomputation checkpoints inside the stage), B the micro-batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

from ipu_effnet.models.profile import Profile

MB = 1e6  # memory figures are in decimal megabytes, as Graphcore quotes "900 MB" of In-Processor Memory

# Candidate split points inside a block, in forward order; the first one present aliases the block.
INNER_POINTS = ("conv_pw", "conv_exp", "conv_dw", "se", "conv_pwl")
# Modules whose output is the output of their last child (or of their input): not an extra tensor.
_PASS_THROUGH = {"Sequential", "ConvNormAct", "EfficientNet", "Identity", "Dropout", "DropPath",
                 "MBConv", "FusedMBConv"}
OPTIMISER_SLOTS = {"rmsprop_tf": 2, "adamw": 2, "sgd": 1}  # fp32 tensors per parameter; sgd: with momentum
RECOMPUTE_MODES = ("auto", "off", "stage", "blocks")


@dataclass
class Assumptions:
    """Every constant the memory model uses; printed with each plan and written into its JSON."""
    ipu_memory_mb: float = 900.0      # Mk2 GC200 In-Processor Memory (docs/reference.md section 7)
    overhead_mb: float = 150.0        # ASSUMED fixed per-IPU cost: code, exchange buffers, host streams
    weight_bytes: int = 2             # from the precision: 2 for 16.x / bf16, 4 for 32.32
    activation_bytes: int = 2
    state_bytes: int = 4              # optimiser state, accumulators and master weights are fp32
    master_weights: bool = False      # fp32 master copy of 16-bit weights (Graphcore's 16.16 has none)
    optimiser: str = "rmsprop_tf"
    optimiser_slots: int = 2
    accumulate: bool = True           # gradient accumulators present (grad_accum > 1 or pipelined)
    recompute: str = "stage"          # off | stage | blocks (see docs/pipeline.md)
    in_flight: str = "2 (N - k) - 1 micro-batches on stage k of N (0-based)"

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)


def precision_bytes(precision: str) -> Tuple[int, int]:
    """(weight bytes, activation bytes) for a precision string ("weights.partials", Graphcore's naming)."""
    if precision == "bf16" or precision.startswith("16."):
        return 2, 2
    return 4, 4


def optimiser_slots(optimiser: str, momentum: float = 0.9) -> int:
    if optimiser == "sgd":
        return 1 if momentum > 0 else 0
    return OPTIMISER_SLOTS.get(optimiser, 2)


@dataclass
class Unit:
    name: str                    # the module path that starts this unit (its split name)
    aliases: List[str]           # other paths that start the same unit (blocks.S.I.conv_pw, ...)
    modules: List[str]           # the top-level pieces of the unit (module paths)
    macs: int                    # per sample, forward
    params: int
    act_elems: int               # per sample, tensors kept for backward
    in_elems: int                # per sample, what crosses into this unit when a stage starts here
    out_elems: int               # per sample, the unit's output (a recomputation checkpoint stashes this)
    candidate: bool              # the planner may start a stage here
    block: Optional[str] = None  # blocks.S.I for units inside a block


@dataclass
class CostModel:
    """Units of one model at one resolution, plus the settings that turn them into stage memory."""
    model_name: str
    resolution: int
    micro_batch: int
    units: List[Unit]
    assumptions: Assumptions
    available_memory_proportion: List[float] = field(default_factory=lambda: [0.15])
    checkpoints: List[int] = field(default_factory=list)  # unit indices whose output is checkpointed

    def __post_init__(self) -> None:
        self._macs = _prefix([u.macs for u in self.units])
        self._params = _prefix([u.params for u in self.units])
        self._acts = _prefix([u.act_elems for u in self.units])
        self._index: Dict[str, int] = {}
        for i, u in enumerate(self.units):
            for name in [u.name] + u.aliases:
                self._index.setdefault(name, i)
        self._set_checkpoints(self.checkpoints)

    def _set_checkpoints(self, checkpoints: Sequence[int]) -> None:
        cps = sorted(set(checkpoints))
        if self.assumptions.recompute == "blocks":
            # a checkpoint at every block output: the unit before each block start, and before head
            cps = sorted(set(cps) | {i - 1 for i, u in enumerate(self.units)
                                     if i > 0 and (u.name.count(".") == 2 and u.name.startswith("blocks.")
                                                   or u.name == "head")})
        self.checkpoints = cps

    # -- lookups ------------------------------------------------------------------------------------
    @property
    def total_macs(self) -> int:
        return self._macs[-1]

    @property
    def total_params(self) -> int:
        return self._params[-1]

    def candidates(self) -> List[int]:
        """Unit indices where the planner may start a stage."""
        return [i for i, u in enumerate(self.units) if u.candidate]

    def position(self, path: str) -> Optional[int]:
        """The unit a split at `path` starts: the unit named (or aliased) so, else the first unit whose
        modules lie under `path`, else the unit holding `path` (a split deep inside a unit is moved to
        that unit's start, which the report says)."""
        if path in self._index:
            return self._index[path]
        for i, u in enumerate(self.units):
            if any(m == path or m.startswith(path + ".") for m in u.modules):
                return i
        for i, u in enumerate(self.units):
            if any(path.startswith(m + ".") for m in u.modules):
                return i
        return None

    # -- stage costs --------------------------------------------------------------------------------
    def macs(self, i: int, j: int) -> int:
        return self._macs[j] - self._macs[i]

    def params(self, i: int, j: int) -> int:
        return self._params[j] - self._params[i]

    def in_flight(self, k: int, n: int) -> int:
        return 2 * (n - k) - 1

    def amp(self, k: int) -> float:
        props = self.available_memory_proportion or [0.15]
        return props[k] if k < len(props) else props[-1]

    def recomputing(self, n: int) -> bool:
        return self.assumptions.recompute != "off"

    def stage_memory(self, k: int, n: int, i: int, j: int) -> Dict[str, float]:
        """Bytes of stage k of n holding units [i, j), by component."""
        a = self.assumptions
        p = self.params(i, j)
        b = self.micro_batch
        act_bytes = a.activation_bytes
        state = p * a.weight_bytes * 2  # weights + gradients
        if a.accumulate:
            state += p * a.state_bytes
        if a.master_weights and a.weight_bytes < a.state_bytes:
            state += p * a.state_bytes
        state += p * a.state_bytes * a.optimiser_slots
        flight = self.in_flight(k, n)
        full = self._acts[j] - self._acts[i]
        if self.recomputing(n):
            inner = [c for c in self.checkpoints if i <= c < j - 1]
            stash = self.units[i].in_elems + sum(self.units[c].out_elems for c in inner)
            bounds = [i] + [c + 1 for c in inner] + [j]
            segment = max(self._acts[e] - self._acts[s] for s, e in zip(bounds, bounds[1:]))
            stashed = flight * b * stash * act_bytes
            working = b * segment * act_bytes
        else:
            stashed = flight * b * full * act_bytes
            working = 0
        temporaries = self.amp(k) * a.ipu_memory_mb * MB
        overhead = a.overhead_mb * MB
        total = overhead + temporaries + state + stashed + working
        return {"overhead": overhead, "temporaries": temporaries, "weights_and_optimiser": float(state),
                "stashed_activations": float(stashed), "working_activations": float(working),
                "total": float(total), "in_flight": flight}


def _prefix(values: Sequence[int]) -> List[int]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n if shape else 0


def _kept_elems(model: nn.Module, profile: Profile, prefix: str) -> int:
    """Elements of the tensors autograd keeps for backward, per sample, under module `prefix`: every
    module's output except those that only pass a child's (or their input's) tensor on; a norm+act
    module counts its own output (the normalised tensor) and its activation child's; a residual block
    adds its sum."""
    total = 0
    root = model.get_submodule(prefix)
    for name, module in root.named_modules():
        path = f"{prefix}.{name}" if name else prefix
        kind = type(module).__name__
        try:
            cost = profile.module(path)
        except KeyError:
            continue
        if kind in _PASS_THROUGH:
            if getattr(module, "has_residual", False):
                total += _numel(cost.out_shape)
            continue
        total += _numel(cost.out_shape)
    return total


def build_units(model: nn.Module, profile: Profile) -> List[Unit]:
    """The model's units in forward order (see the module docstring)."""
    units: List[Unit] = []
    prev_out = _input_elems(model, profile)  # the image enters the first unit
    for top, top_module in model.named_children():
        if top == "blocks":
            for block_path in model.block_paths():
                block = model.get_submodule(block_path)
                children = list(block.named_children())
                in_elems = prev_out
                residual = bool(getattr(block, "has_residual", False))
                groups: List[Tuple[str, List[str]]] = []
                for cname, child in children:
                    if cname in INNER_POINTS and not isinstance(child, nn.Identity):
                        groups.append((cname, [cname]))
                    elif groups:
                        groups[-1][1].append(cname)
                    else:
                        groups.append((cname, [cname]))
                last_out = in_elems
                for g, (start, members) in enumerate(groups):
                    paths = [f"{block_path}.{m}" for m in members]
                    macs = params = acts = 0
                    for p in paths:
                        pp, mm = profile.totals(p)
                        params += pp
                        macs += mm
                        acts += _kept_elems(model, profile, p)
                    out = last_out
                    for p in paths:
                        shape = profile.module(p).out_shape
                        if shape and type(model.get_submodule(p)).__name__ not in ("Identity", "DropPath"):
                            out = _numel(shape)
                    if g == len(groups) - 1 and residual:
                        acts += _numel(profile.module(block_path).out_shape)  # the residual sum
                    name = block_path if g == 0 else f"{block_path}.{start}"
                    aliases = [f"{block_path}.{start}"] if g == 0 and start in INNER_POINTS else []
                    crossing = in_elems if g == 0 else last_out + (in_elems if residual else 0)
                    units.append(Unit(name, aliases, paths, macs, params, acts, crossing, out,
                                      candidate=True, block=block_path))
                    last_out = out
                prev_out = _numel(profile.module(block_path).out_shape)
            continue
        params, macs = profile.totals(top)
        try:
            shape = profile.module(top).out_shape
        except KeyError:
            shape = ()
        out = _numel(shape) if shape and not isinstance(top_module, (nn.Identity, nn.Dropout)) else prev_out
        units.append(Unit(top, [], [top], macs, params, _kept_elems(model, profile, top), prev_out, out,
                          candidate=top == "head", block=None))
        prev_out = out
    return units


def _input_elems(model: nn.Module, profile: Profile) -> int:
    stem = getattr(model, "stem", None)
    in_chans = stem.conv.in_channels if stem is not None else 3
    return in_chans * profile.resolution * profile.resolution


def build_cost_model(model: nn.Module, profile: Profile, *, model_name: str, micro_batch: int,
                     precision: str = "16.16", optimiser: str = "rmsprop_tf", momentum: float = 0.9,
                     grad_accum: int = 1, stages: int = 1, recompute: str = "auto",
                     recompute_points: Sequence[str] = (), available_memory_proportion: Sequence[float] = (0.15,),
                     ipu_memory_mb: float = 900.0, overhead_mb: float = 150.0,
                     master_weights: bool = False) -> CostModel:
    """A CostModel for `model` (profiled at its training resolution) under one training setup.

    recompute: "auto" is "stage" when pipelined (stages > 1) and "off" on one IPU; "stage" stashes only
    each stage's input (plus the checkpoints in `recompute_points`) and recomputes the rest during
    backward; "blocks" also checkpoints every block output."""
    wb, ab = precision_bytes(precision)
    if recompute == "auto":
        recompute = "stage" if stages > 1 or recompute_points else "off"
    assumptions = Assumptions(
        ipu_memory_mb=ipu_memory_mb, overhead_mb=overhead_mb, weight_bytes=wb, activation_bytes=ab,
        master_weights=master_weights, optimiser=optimiser, optimiser_slots=optimiser_slots(optimiser, momentum),
        accumulate=grad_accum > 1 or stages > 1, recompute=recompute)
    units = build_units(model, profile)
    cm = CostModel(model_name, profile.resolution, micro_batch, units, assumptions,
                   list(available_memory_proportion))
    cps = []
    for path in recompute_points:
        pos = cm.position(path)
        if pos is not None:
            cps.append(pos)
    cm._set_checkpoints(cps)
    return cm
