"""No code path of the package deserialises untrusted input unsafely or evaluates strings.

The scan reads every Python file of the shipped packages as a syntax tree and reports calls
to ``pickle.load``/``loads``/``Unpickler`` (and ``cPickle``, ``dill``, ``joblib.load``; also when
imported by name, ``from pickle import loads``), ``torch.load`` without ``weights_only=True``,
``np.load(..., allow_pickle=True)``, ``yaml.load`` (use ``yaml.safe_load``), ``marshal.loads``,
and the builtins ``eval`` and ``exec``.

The one sanctioned way to unpickle is a restricted unpickler: a class deriving from
``pickle.Unpickler`` that overrides ``find_class`` (an allow-list of globals, as
``boneage_jax.weights.pth.PthUnpickler`` does for torch state dicts). A subclass that does not
override ``find_class`` is reported.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PACKAGES = ("boneage_jax", "tfds_rsna", "configs", "launch", "benchmarks", "tools")

_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal"}


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` for an attribute chain or a name; '' otherwise."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(kw.arg == name and isinstance(kw.value, ast.Constant) and kw.value.value is True
               for kw in call.keywords)


def _is_unpickler(base: ast.AST, imported: set[str]) -> bool:
    name = _dotted(base)
    head, _, last = name.rpartition(".")
    return (last == "Unpickler" and head.split(".")[-1] in _PICKLE_MODULES) or (not head and name in imported)


def unsafe_calls(source: str, filename: str = "<string>") -> list[str]:
    """``file:line: what`` for every unsafe call in ``source`` (and every unpickler subclass
    without its own ``find_class``)."""
    found = []
    tree = ast.parse(source, filename)
    # names bound by ``from pickle import load, loads, Unpickler [as x]``
    imported = {alias.asname or alias.name for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] in _PICKLE_MODULES
                for alias in node.names if alias.name in ("load", "loads", "Unpickler")}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(_is_unpickler(b, imported) for b in node.bases):
            if not any(isinstance(item, ast.FunctionDef) and item.name == "find_class" for item in node.body):
                found.append(f"{filename}:{node.lineno}: class {node.name} unpickles without overriding find_class")
            continue
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, last = name.rpartition(".")
        problem = None
        if name in ("eval", "exec"):
            problem = f"{name}() of a string"
        elif name in imported:
            problem = f"{name} (imported from a pickle module): unpickling"
        elif head.split(".")[-1] in _PICKLE_MODULES and last in ("load", "loads", "Unpickler"):
            problem = f"{name}: unpickling"
        elif name in ("joblib.load",):
            problem = f"{name}: unpickling"
        elif last == "load" and head.split(".")[-1] == "torch" and not _keyword_is_true(node, "weights_only"):
            problem = f"{name} without weights_only=True"
        elif last == "load" and head.split(".")[-1] in ("np", "numpy") and any(
                kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False)
                for kw in node.keywords):
            problem = f"{name} with allow_pickle"
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            problem = f"{name} (use yaml.safe_load)"
        if problem:
            found.append(f"{filename}:{node.lineno}: {problem}")
    return found


def _package_files():
    for package in PACKAGES:
        for folder, folders, files in os.walk(os.path.join(ROOT, package)):
            # hidden folders are not the package's code: benchmarks/peers/.venvs holds the peers' installs
            folders[:] = [name for name in folders if not name.startswith(".")]
            for name in files:
                if name.endswith(".py"):
                    yield os.path.join(folder, name)


def test_package_has_no_unsafe_deserialisation_or_eval():
    found = []
    for path in _package_files():
        with open(path, encoding="utf-8") as f:
            found += unsafe_calls(f.read(), os.path.relpath(path, ROOT))
    assert not found, "\n".join(found)


@pytest.mark.parametrize("snippet", [
    "import pickle\npickle.load(open('x', 'rb'))",
    "import pickle\npickle.loads(b'')",
    "import torch\ntorch.load('x.pth')",
    "import torch\ntorch.load('x.pth', weights_only=False)",
    "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
    "import yaml\nyaml.load(open('x'))",
    "eval('1 + 1')",
    "exec('x = 1')",
    "import marshal\nmarshal.loads(b'')",
    "import pickle\npickle.Unpickler(open('x', 'rb')).load()",
    "from pickle import loads\nloads(b'')",
    "from pickle import Unpickler as U\nU(open('x', 'rb')).load()",
    "import pickle\nclass Open(pickle.Unpickler):\n    pass\nOpen(open('x', 'rb')).load()",
    "from pickle import Unpickler\nclass Open(Unpickler):\n    def persistent_load(self, pid):\n        return pid\n",
])
def test_scan_finds_unsafe_calls(snippet):
    assert unsafe_calls(snippet)


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load('x.pth', map_location='cpu', weights_only=True)",
    "import numpy as np\nnp.load('x.npy')",
    "import numpy as np\nnp.load('x.npy', allow_pickle=False)",
    "import yaml\nyaml.safe_load(open('x'))",
    "model.eval()",
    "import json\njson.load(open('x'))",
    # the sanctioned exception: a restricted unpickler (an allow-list in find_class)
    "import pickle\nclass Safe(pickle.Unpickler):\n    def find_class(self, module, name):\n"
    "        raise ValueError(name)\nSafe(open('x', 'rb')).load()",
])
def test_scan_accepts_safe_calls(snippet):
    assert not unsafe_calls(snippet)
