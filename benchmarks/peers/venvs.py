"""The peers' virtual environments, created on request from the pinned requirement files.

``torch.txt`` (PyTorch, torchvision, timm) and ``keras.txt`` (TensorFlow-CPU, Keras 3) beside
this file pin each stack. :func:`ensure` creates ``benchmarks/peers/.venvs/<name>`` (an ignored
folder) with ``python -m venv`` and ``pip install -r`` the first time it is asked, and again
when its requirement file changes (a stamp holds the file's hash); only the harness asks, and
only for a stack it runs without an interpreter given (``--torch_python``, ``--keras_python``).
Nothing else (``make test``, CI) creates them. pip's output goes to ``.venvs/<name>.log``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
VENV_ROOT = os.path.join(HERE, ".venvs")
REQUIREMENTS = {"torch": os.path.join(HERE, "torch.txt"), "keras": os.path.join(HERE, "keras.txt")}


class VenvError(RuntimeError):
    """A peer venv could not be created; the message names the log."""


def _stamp(requirements: str) -> str:
    with open(requirements, "rb") as f:
        return ".installed-" + hashlib.sha256(f.read()).hexdigest()[:16]


def python_of(name: str, root: str = VENV_ROOT) -> str:
    return os.path.join(root, name, "bin", "python")


def ensure(name: str, *, root: str = VENV_ROOT, base_python: str = sys.executable,
           log: Callable[[str], None] = print) -> str:
    """The interpreter of the peer venv ``name`` (``torch`` or ``keras``), created or updated
    first if its requirement file changed since the last install. Raises :class:`VenvError`."""
    requirements = REQUIREMENTS[name]
    folder = os.path.join(root, name)
    stamp = os.path.join(folder, _stamp(requirements))
    python = python_of(name, root)
    if os.path.exists(stamp) and os.access(python, os.X_OK):
        return python
    os.makedirs(root, exist_ok=True)
    log_path = folder + ".log"
    log(f"peer venv {folder}: installing {os.path.relpath(requirements)} (minutes; pip's output in {log_path})")
    with open(log_path, "w", encoding="utf-8") as out:
        steps = ([] if os.access(python, os.X_OK) else [[base_python, "-m", "venv", folder]])
        steps.append([python, "-m", "pip", "install", "--no-compile", "-r", requirements])
        for command in steps:
            out.write("$ " + " ".join(command) + "\n")
            out.flush()
            status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
            if status != 0:
                raise VenvError(f"{requirements}: '{' '.join(command[:4])} ...' failed (exit {status}); see {log_path}")
    for old in os.listdir(folder):
        if old.startswith(".installed-"):
            os.remove(os.path.join(folder, old))
    with open(stamp, "w", encoding="utf-8") as f:
        f.write(requirements + "\n")
    return python
