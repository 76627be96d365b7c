"""boneage_jax.allocator: BONEAGE_ALLOCATOR=retain (the default on the CPU) keeps freed memory, so
repeated XLA:CPU steps stop faulting in fresh pages; system leaves glibc alone."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from boneage_jax import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted step with a 32 MB output and 32 MB temporaries, run 40 times after warm-up; prints the
# minor page faults per call. boneage_jax is imported first, as the commands do.
PROGRAM = """
import resource
import boneage_jax
import jax, jax.numpy as jnp
step = jax.jit(lambda x: jnp.tanh(x * 2 + 1) * 3 - jnp.roll(x, 1, axis=1))
x = jnp.ones((8, 64, 64, 256))
for _ in range(3):
    jax.block_until_ready(step(x))
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    y = step(x); jax.block_until_ready(y); del y
print(boneage_jax._allocator.apply(), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 40)
"""


def test_mode_reads_the_environment(monkeypatch):
    monkeypatch.delenv(allocator.ENV, raising=False)
    assert allocator.mode() == "auto"
    monkeypatch.setenv(allocator.ENV, " Retain ")
    assert allocator.mode() == "retain"
    monkeypatch.setenv(allocator.ENV, "jemalloc")
    with pytest.raises(ValueError, match="BONEAGE_ALLOCATOR='jemalloc'; expected one of"):
        allocator.mode()


def test_auto_retains_on_the_cpu_and_leaves_accelerator_hosts_alone(monkeypatch):
    monkeypatch.delenv(allocator.ENV, raising=False)
    monkeypatch.setattr(allocator, "accelerator_plugin", lambda: "jax_plugins.xla_cuda12")
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    assert allocator.resolved_mode() == "system"  # a GPU plugin and nothing says cpu
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert allocator.resolved_mode() == "retain"
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert allocator.resolved_mode() == "system"
    monkeypatch.setattr(allocator, "accelerator_plugin", lambda: None)
    monkeypatch.delenv("JAX_PLATFORMS")
    assert allocator.resolved_mode() == "retain"  # nothing but the CPU
    monkeypatch.setenv(allocator.ENV, "system")
    assert allocator.resolved_mode() == "system"
    monkeypatch.setenv(allocator.ENV, "retain")
    monkeypatch.setattr(allocator, "accelerator_plugin", lambda: "libtpu")
    assert allocator.resolved_mode() == "retain"


def test_accelerator_plugin_finds_a_module_in_the_jax_plugins_namespace(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "jax_plugins", raising=False)
    before = allocator.accelerator_plugin()
    (tmp_path / "jax_plugins" / "xla_fake").mkdir(parents=True)  # a namespace package, as the CUDA plugin's
    (tmp_path / "jax_plugins" / "xla_fake" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = allocator.accelerator_plugin()
    assert found == (before or "jax_plugins.xla_fake")
    assert found.startswith("jax_plugins.") or found == "libtpu"


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_retain_stops_the_page_faults_of_repeated_steps():
    def faults(mode: str) -> tuple[str, float]:
        env = {**os.environ, allocator.ENV: mode, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
        out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, check=True)
        applied, per_call = out.stdout.split()[-2:]
        return applied, float(per_call)

    applied, system = faults("system")
    assert applied == "system" and system > 4000  # the 32 MB output alone is 8,192 fresh pages a call
    applied, retain = faults("retain")
    assert applied == "retain" and retain < system / 4, (retain, system)


# With retain applied: a step loop, then a program with larger temporaries (as an evaluation
# between training steps); prints resident memory (MB) before and after release() and what it returned.
RELEASE_PROGRAM = """
import boneage_jax
import jax, jax.numpy as jnp
from boneage_jax import allocator

def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

step = jax.jit(lambda x: jnp.tanh(x * 2 + 1) * 3 - jnp.roll(x, 1, axis=1))
for _ in range(3):
    jax.block_until_ready(step(jnp.ones((8, 64, 64, 256))))
big = jnp.ones((8, 64, 64, 1024))  # 128 MB, and as much again in temporaries
jax.block_until_ready(step(big).sum()); del big
before = resident_mb()
released = allocator.release()
print(allocator.apply(), released, before, resident_mb())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_release_gives_retained_memory_back_and_is_a_no_op_with_system():
    def run(mode: str) -> list[str]:
        env = {**os.environ, allocator.ENV: mode, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
        out = subprocess.run([sys.executable, "-c", RELEASE_PROGRAM], env=env, capture_output=True, text=True,
                             check=True)
        return out.stdout.split()[-4:]

    applied, released, before, after = run("retain")
    assert applied == "retain" and released == "True"
    assert float(before) - float(after) > 100, (before, after)  # the larger program's freed blocks
    applied, released, _, _ = run("system")
    assert applied == "system" and released == "False"
