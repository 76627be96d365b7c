"""Opt-in C allocator settings that keep freed memory for reuse (glibc, Linux): ``BONEAGE_ALLOCATOR=retain``.

XLA:CPU allocates every step's temporaries afresh (ResNet-50's train step at 256 px, batch 8:
about 1.3 GB; Xception's 2.1 GB). glibc serves such blocks with ``mmap`` and returns them to
the kernel when they are freed, so each step touches new pages and the kernel faults in and
zeroes about 317,000 of them: 0.5-0.8 s of system time per ResNet-50 step on two cores
(``getrusage``). Transparent huge pages (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``) cut the
faults to about 1,000 but not the system time (0.48-0.66 s: the zeroing stays). Keeping the
memory does remove it; several threads allocate and a thread's own glibc arena holds blocks of
at most 64 MB, so it takes four ``mallopt`` settings, applied when ``boneage_jax`` is imported
(before JAX starts its backend; a thread that allocated before that keeps its own arena):

- ``M_ARENA_MAX`` 1: every thread allocates from the main heap;
- ``M_MMAP_MAX`` 0: no block is served by its own ``mmap``; the heap grows instead;
- ``M_TRIM_THRESHOLD`` -1: the heap is never shrunk (glibc's documented "never trim");
- ``M_TOP_PAD`` 64 MB: per-thread heaps, where a thread still has one, are kept too.

Measured on the project's 2-core Xeon (README *Peer benchmark (CPU)*): no page faults after
warm-up in most runs and ResNet-50 steps 13-19% faster, Xception 9-20%. **Not the default**,
because the heap fragments: a small allocation that lands in a freed step-sized block makes the
next step's block come from new memory, and the process keeps it. Resident memory of a ResNet-50
step loop went from 2.4 GB to 3.6 GB (one extra step's worth, then flat for 30 steps) in one run
and to 4.8 GB in six steps in another, and a real training run (Xception, 192 px, batch 8)
grew by 1.1-1.4 GB at each evaluation (4.55, 5.98, 7.06 GB; glibc's defaults: 1.7-2.8 GB) while
it trained 30% faster. ``release`` (``malloc_trim``), which the training loop calls after each
evaluation, hands the free parts of the heap back: in the same run resident memory then came back
to 4.9 GB after each evaluation (6.1 GB during it) instead of growing. Use it for benchmarks and
CPU runs where memory is plentiful.

``BONEAGE_ALLOCATOR=system`` (the default) leaves glibc's defaults. Elsewhere (no glibc, not
Linux) nothing is changed. ``apply`` is idempotent and returns what it did.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

ENV = "BONEAGE_ALLOCATOR"
MODES = ("retain", "system")

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1), (M_TOP_PAD, 64 << 20))

_LIBC: list[ctypes.CDLL] = []  # glibc, once apply() has applied the settings


def mode() -> str:
    """``BONEAGE_ALLOCATOR`` (``system`` when unset)."""
    value = os.environ.get(ENV, "system").strip().lower() or "system"
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}; expected one of {MODES}")
    return value


@functools.cache
def apply() -> str:
    """Applies the settings above once per process when ``BONEAGE_ALLOCATOR=retain``; returns
    ``"retain"`` when they were applied, else why not (``system`` mode, not glibc, a refused
    ``mallopt``)."""
    if mode() == "system":
        return "system"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as error:
        return f"no mallopt ({error})"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    refused = [parameter for parameter, value in SETTINGS if mallopt(parameter, value) != 1]
    if refused:
        return f"mallopt refused parameters {refused}"
    _LIBC.append(libc)
    return "retain"


def release() -> bool:
    """With ``retain`` applied: returns the heap's free memory to the kernel (``malloc_trim(0)``,
    which also releases free pages inside the heap), so resident memory drops to what is in use;
    the next step faults its temporaries in once more. Call it after work whose temporaries
    differ from a training step's (``train.py`` does after each evaluation). Returns whether
    memory was released; without ``retain`` it does nothing (glibc already returns it)."""
    if apply() != "retain":  # "retain" means _LIBC holds glibc
        return False
    return bool(_LIBC[0].malloc_trim(0))
