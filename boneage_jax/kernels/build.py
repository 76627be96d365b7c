"""Compiles ``onednn_conv.cc`` into the library ``onednn.py`` loads.

    python -m boneage_jax.kernels.build [--force]

Needs a C++17 compiler (``$CXX``, else ``g++``), jaxlib's FFI headers (``jax.ffi.include_dir()``)
and oneDNN's headers and library from the packages ``onednn-devel-cpu-gomp`` and
``onednn-cpu-gomp`` (installed with this package on Linux x86-64; they put ``include/`` and
``lib/`` under the environment's prefix). The library's file name carries a hash of the source
and of the jaxlib version, so a changed source or an upgraded jaxlib is rebuilt, never loaded
stale. The compiled file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time

from collections.abc import Sequence

from absl import flags

from boneage_jax import cli

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "onednn_conv.cc")


def _fingerprint() -> str:
    import jaxlib

    digest = hashlib.sha256()
    with open(SOURCE, "rb") as f:
        digest.update(f.read())
    digest.update(jaxlib.__version__.encode())
    digest.update(" ".join(CXXFLAGS).encode())
    return digest.hexdigest()[:12]


# -O1: the source only sets up and caches oneDNN's primitives (the convolutions run in libdnnl),
# and compiles in 4.1 s where -O2 took 7.0 s (g++ 12, this machine).
CXXFLAGS = ("-O1", "-std=c++17")


def library_path() -> str:
    """Where the library for this source and this jaxlib lives (it may not exist yet)."""
    return os.path.join(HERE, f"_onednn_conv-{_fingerprint()}.so")


def onednn_prefix() -> str:
    """The prefix holding oneDNN's ``include/oneapi/dnnl/dnnl.hpp`` and ``lib/libdnnl.so``."""
    for prefix in (sys.prefix, sys.base_prefix, "/usr/local", "/usr"):
        if os.path.exists(os.path.join(prefix, "include", "oneapi", "dnnl", "dnnl.hpp")) and any(
            os.path.exists(os.path.join(prefix, lib, "libdnnl.so")) for lib in ("lib", "lib/x86_64-linux-gnu")
        ):
            return prefix
    raise FileNotFoundError(
        "oneDNN's headers and library were not found under the environment's prefix "
        f"({sys.prefix}); install them with: pip install onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0")


def compile_library(force: bool = False, quiet: bool = False) -> str:
    """Builds the library unless it exists (``force``: always); returns its path."""
    import jax

    target = library_path()
    if os.path.exists(target) and not force:
        return target
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise FileNotFoundError(f"no C++ compiler {compiler!r} on PATH (set CXX or install g++)")
    prefix = onednn_prefix()
    libdir = next(os.path.join(prefix, lib) for lib in ("lib", "lib/x86_64-linux-gnu")
                  if os.path.exists(os.path.join(prefix, lib, "libdnnl.so")))
    temporary = f"{target}.{os.getpid()}.tmp"
    command = [compiler, *CXXFLAGS, "-shared", "-fPIC",
               f"-I{jax.ffi.include_dir()}", f"-I{os.path.join(prefix, 'include')}", SOURCE, "-o", temporary,
               f"-L{libdir}", "-ldnnl", f"-Wl,-rpath,{libdir}"]
    start = time.time()
    if not quiet:
        print(f"Compiling {os.path.relpath(SOURCE)} against oneDNN in {prefix} ...", flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise RuntimeError(f"compiling {SOURCE} failed:\n{' '.join(command)}\n{result.stderr[-4000:]}")
    os.replace(temporary, target)
    for name in os.listdir(HERE):  # libraries of older sources or other jaxlib versions
        if name.startswith("_onednn_conv-") and name.endswith(".so") and os.path.join(HERE, name) != target:
            os.remove(os.path.join(HERE, name))
    if not quiet:
        print(f"Wrote {os.path.relpath(target)} in {time.time() - start:.0f} s")
    return target


FLAGS = flags.FlagValues()  # this command's flags (cli.parse)
_FORCE = flags.DEFINE_bool("force", False, "Rebuild even when the library for this source exists.", flag_values=FLAGS)


def main(argv: Sequence[str]) -> int:
    cli.parse(FLAGS, argv)
    compile_library(force=_FORCE.value)
    return 0


if __name__ == "__main__":
    cli.run(main)
