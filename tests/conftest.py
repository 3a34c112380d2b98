"""Shared test settings: two CPU threads (the project's CI machines have two cores), fixed seeds."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


DOUBLE = Path(__file__).resolve().parent / "poptorch_double"


@pytest.fixture
def poptorch(monkeypatch):
    """The poptorch/popdist test double (tests/poptorch_double/), importable as `poptorch` and `popdist`
    for this test only, reset to hardware mode with no popdist layout in the environment."""
    for name in list(sys.modules):
        if name.split(".")[0] in ("poptorch", "popdist"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(DOUBLE))
    for key in list(os.environ):
        if key.startswith("POPDIST_"):
            monkeypatch.delenv(key)
    import poptorch as double

    double.reset(hardware=True)
    yield double
    for name in list(sys.modules):
        if name.split(".")[0] in ("poptorch", "popdist"):
            del sys.modules[name]
