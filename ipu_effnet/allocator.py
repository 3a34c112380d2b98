"""The host allocator, tuned for training on the CPU (glibc only; a no-op elsewhere).

glibc's malloc serves every block above its mmap threshold (128 KiB at start, raised as large blocks
are freed) from fresh pages and gives memory above the trim threshold back to the kernel. A training
step allocates and frees activation tensors of megabytes each, so with those defaults each step faults
its pages in again: on a 2-core CPU a third of the process's time went to the kernel. Serving every
block from the heap (no mmap: mallopt's threshold stops at 32 MiB, below a batch's larger activations)
and keeping freed memory for the next step turns that into reuse; docs/PERFORMANCE.md has the measurement.

`tune_host_allocator()` runs once, from the command line's entry point (a library user's process is
left as it is). A user's own MALLOC_* or GLIBC_TUNABLES setting wins, and IPU_EFFNET_MALLOC=0 keeps
glibc's defaults. DataLoader workers forked later inherit the setting.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Mapping, Optional

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1024 * 1024 * 1024

_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def wanted(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether to tune: Linux, not switched off, and no allocator setting of the user's own."""
    env = os.environ if environ is None else environ
    if not sys.platform.startswith("linux"):
        return False
    if env.get("IPU_EFFNET_MALLOC", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return not any(name in env for name in _USER_SETTINGS)


def tune_host_allocator(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Serve every block from glibc's heap and keep freed memory there; True when both were set."""
    if not wanted(environ):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries without mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
