"""C allocator settings that keep freed memory for reuse on the CPU (glibc, Linux): ``BONEAGE_ALLOCATOR``.

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

The cost is memory: the heap fragments (a small allocation that lands in a freed step-sized
block makes the next step's block come from new memory), so a step loop grows now and then by
one step's temporaries (Xception, 256 px, batch 8: 2.9 GB after the first step, then 4.7 GB
from one step on, in one run of 25 steps for good, in another again to 6.5 GB at step 11), and
work with other temporaries (an evaluation) adds its own.
``release`` (``malloc_trim``) hands the free parts of the heap back; the training loop calls it
after each evaluation and each log line (every ``config.log_every`` steps; the step after it
faults its temporaries in once, as every step does with glibc's defaults). Measured in a
2,000-step training run with ten evaluations and ten checkpoints, releasing after evaluations
only (README *Keeping freed memory*): resident memory stayed between 2.9 and 4.5 GB while
training.

Modes (``BONEAGE_ALLOCATOR``):

- ``auto`` (default): ``retain`` when the process computes on the CPU: ``JAX_PLATFORMS`` starts
  with ``cpu``, or no accelerator plugin is installed (no module in JAX's ``jax_plugins``
  namespace, no ``libtpu``). On a GPU or TPU host the host's many input threads keep glibc's
  per-thread arenas (``system``).
- ``retain``: the settings above, wherever glibc is the C library.
- ``system``: glibc's defaults.

Elsewhere (no glibc, not Linux) nothing is changed. ``apply`` is idempotent and returns what it did.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import pkgutil
import platform

ENV = "BONEAGE_ALLOCATOR"
MODES = ("auto", "retain", "system")

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1), (M_TOP_PAD, 64 << 20))

_LIBC: list[ctypes.CDLL] = []  # glibc, once apply() has applied the settings


def mode() -> str:
    """``BONEAGE_ALLOCATOR`` (``auto`` when unset)."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}; expected one of {MODES}")
    return value


def accelerator_plugin() -> str | None:
    """The name of an installed JAX accelerator plugin (a module in the ``jax_plugins``
    namespace, or ``libtpu``), found without importing JAX; ``None`` when there is none."""
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        for module in pkgutil.iter_modules(list(spec.submodule_search_locations)):
            return f"jax_plugins.{module.name}"
    if importlib.util.find_spec("libtpu") is not None:
        return "libtpu"
    return None


def resolved_mode() -> str:
    """``retain`` or ``system``: :func:`mode`, with ``auto`` decided as the module docstring says."""
    chosen = mode()
    if chosen != "auto":
        return chosen
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms.split(",")[0].strip() == "cpu":
        return "retain"
    return "system" if accelerator_plugin() else "retain"


@functools.cache
def apply() -> str:
    """Applies the settings above once per process when :func:`resolved_mode` is ``retain``;
    returns ``"retain"`` when they were applied, else why not (``system`` mode, not glibc, a
    refused ``mallopt``)."""
    if resolved_mode() == "system":
        return "system"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc's name on every Linux platform
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
    differ from a training step's, and now and then (``train.py`` does after each evaluation and
    each log line). Returns whether memory was released; without ``retain`` it does nothing
    (glibc already returns it)."""
    if apply() != "retain":  # "retain" means _LIBC holds glibc
        return False
    return bool(_LIBC[0].malloc_trim(0))
