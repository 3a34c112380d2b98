"""The host allocator setting: glibc serves large blocks from its heap once tuned, and a user's own
allocator setting or IPU_EFFNET_MALLOC=0 leaves glibc's defaults alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ipu_effnet.allocator import tune_host_allocator, wanted

ROOT = Path(__file__).resolve().parents[1]

# In a fresh interpreter: allocate a 64 MiB block and report how many mmapped blocks glibc added for it
# (mallinfo2: glibc >= 2.33).
PROBE = r"""
import ctypes, ctypes.util, json, sys
from ipu_effnet.allocator import tune_host_allocator
tuned = tune_host_allocator() if sys.argv[1] == "tune" else False

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
before = libc.mallinfo2().hblks
block = libc.malloc(64 << 20)
held = libc.mallinfo2().hblks - before
libc.free(block)
print(json.dumps({"tuned": tuned, "mmapped_blocks": held}))
"""


def _probe(mode: str, **env: str):
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "IPU_EFFNET_MALLOC")}
    environ.update(env, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=environ, capture_output=True, text=True,
                         check=True, timeout=60)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _has_glibc_mallinfo2() -> bool:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    return bool(name) and sys.platform.startswith("linux") and hasattr(ctypes.CDLL(name), "mallinfo2")


needs_glibc = pytest.mark.skipif(not _has_glibc_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")


@needs_glibc
def test_a_tuned_process_serves_a_large_block_from_the_heap():
    default = _probe("plain")
    tuned = _probe("tune")
    assert default == {"tuned": False, "mmapped_blocks": 1}  # glibc's default: a 64 MiB block is mmapped
    assert tuned == {"tuned": True, "mmapped_blocks": 0}


@needs_glibc
def test_a_users_own_setting_or_the_switch_leaves_glibc_alone():
    assert _probe("tune", MALLOC_ARENA_MAX="2")["tuned"] is True  # unrelated settings do not count
    for env in ({"MALLOC_MMAP_THRESHOLD_": "131072"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
                {"IPU_EFFNET_MALLOC": "0"}):
        assert _probe("tune", **env) == {"tuned": False, "mmapped_blocks": 1}, env


def test_wanted_reads_the_environment_it_is_given():
    linux = sys.platform.startswith("linux")
    assert wanted({}) is linux
    assert wanted({"IPU_EFFNET_MALLOC": "off"}) is False
    assert wanted({"MALLOC_TRIM_THRESHOLD_": "0"}) is False
    assert tune_host_allocator({"IPU_EFFNET_MALLOC": "no"}) is False
