"""The restricted ``.pth`` reader (``boneage_jax.weights.pth``): state dicts written as torch writes
them (zip and legacy layouts) round-trip without torch, and a file whose pickle names any other
global is refused before anything in it runs."""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

from boneage_jax import weights
from boneage_jax.weights import pth

# ----------------------------------------------------------------------------- a torch-free writer


def _rebuild_tensor_v2():  # stand-ins pickled under torch's names
    pass


class FloatStorage:
    pass


class HalfStorage:
    pass


class LongStorage:
    pass


TORCH_NAMES = {_rebuild_tensor_v2: ("torch._utils", "_rebuild_tensor_v2"), FloatStorage: ("torch", "FloatStorage"),
               HalfStorage: ("torch", "HalfStorage"), LongStorage: ("torch", "LongStorage")}
STORAGE_CLASSES = {np.dtype(np.float32): FloatStorage, np.dtype(np.float16): HalfStorage,
                   np.dtype(np.int64): LongStorage}


@dataclasses.dataclass
class View:
    """A tensor over ``storage`` with explicit geometry (to write non-contiguous tensors)."""

    storage: np.ndarray
    offset: int
    size: tuple
    stride: tuple


@dataclasses.dataclass(eq=False)
class _StorageRef:
    key: str
    array: np.ndarray


class TorchPickler(pickle._Pickler):  # pylint: disable=protected-access  (the pure-Python pickler)
    """Pickles numpy arrays as torch pickles tensors: ``_rebuild_tensor_v2`` of a persistent
    storage id ``("storage", torch.FloatStorage, key, "cpu", numel)``, protocol 2."""

    def __init__(self, file):
        super().__init__(file, protocol=2)
        self.storages: list[_StorageRef] = []

    def reducer_override(self, obj):
        if isinstance(obj, type) or callable(obj) and not isinstance(obj, np.ndarray):
            if obj in TORCH_NAMES:
                return TORCH_NAMES[obj][1]  # a string: pickled by (our) save_global
            return NotImplemented
        if isinstance(obj, np.ndarray):
            obj = np.array(obj, order="C")
            obj = View(obj.ravel(), 0, obj.shape, tuple(s // obj.itemsize for s in obj.strides))
        if isinstance(obj, View):
            ref = _StorageRef(str(len(self.storages)), obj.storage)
            self.storages.append(ref)
            return _rebuild_tensor_v2, (ref, obj.offset, tuple(obj.size), tuple(obj.stride), False,
                                        collections.OrderedDict())
        return NotImplemented

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", STORAGE_CLASSES[obj.array.dtype], obj.key, "cpu", obj.array.size)
        return None

    def save_global(self, obj, name=None):
        if obj in TORCH_NAMES:
            module, qualname = TORCH_NAMES[obj]
            self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _pickled(obj) -> tuple[bytes, list[_StorageRef]]:
    buf = io.BytesIO()
    pickler = TorchPickler(buf)
    pickler.dump(obj)
    return buf.getvalue(), pickler.storages


def write_zip_pth(path, obj, data_pkl: bytes | None = None) -> None:
    """``torch.save``'s zip layout: ``archive/data.pkl``, ``archive/data/KEY``, byteorder, version."""
    data, storages = _pickled(obj)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data if data_pkl is None else data_pkl)
        z.writestr("archive/byteorder", "little")
        for ref in storages:
            z.writestr(f"archive/data/{ref.key}", ref.array.astype(ref.array.dtype.newbyteorder("<")).tobytes())
        z.writestr("archive/version", "3\n")


def write_legacy_pth(path, obj, main_pkl: bytes | None = None) -> None:
    """The legacy layout (``_use_new_zipfile_serialization=False``): magic, protocol, sys info,
    the object, the storage keys, then each storage as int64 count + bytes."""
    data, storages = _pickled(obj)
    with open(path, "wb") as f:
        f.write(pickle.dumps(pth.LEGACY_MAGIC, protocol=2))
        f.write(pickle.dumps(pth.LEGACY_PROTOCOL, protocol=2))
        f.write(pickle.dumps({"protocol_version": 1001, "little_endian": True,
                              "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2))
        f.write(data if main_pkl is None else main_pkl)
        f.write(pickle.dumps([ref.key for ref in storages], protocol=2))
        for ref in storages:
            f.write(struct.pack("<q", ref.array.size))
            f.write(ref.array.astype(ref.array.dtype.newbyteorder("<")).tobytes())


WRITERS = {"zip": write_zip_pth, "legacy": write_legacy_pth}


def _state_dict(seed=0):
    rng = np.random.default_rng(seed)
    return collections.OrderedDict([
        ("conv.weight", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)),
        ("bn.running_var", rng.uniform(0.5, 2, 4).astype(np.float32)),
        ("bn.num_batches_tracked", np.array(7, np.int64)),
        ("fc.weight", rng.normal(size=(2, 4)).astype(np.float16)),
    ])


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("layout", sorted(WRITERS))
def test_a_state_dict_round_trips_without_torch(tmp_path, layout):
    path = str(tmp_path / "weights.pth")
    expected = _state_dict()
    # A transposed (non-contiguous) tensor and one at an offset inside a shared storage.
    base = np.arange(24, dtype=np.float32)
    expected_t = base[:12].reshape(3, 4).T
    WRITERS[layout](path, collections.OrderedDict(
        [*expected.items(), ("t", View(base, 0, (4, 3), (1, 4))), ("tail", View(base, 20, (2, 2), (2, 1)))]))
    got = pth.read_pth(path)
    assert isinstance(got, collections.OrderedDict)
    assert list(got) == [*expected, "t", "tail"]
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape
        np.testing.assert_array_equal(got[name], value)
    np.testing.assert_array_equal(got["t"], expected_t)
    np.testing.assert_array_equal(got["tail"], [[20, 21], [22, 23]])
    # read_torch: float32 for floating tensors, the checkpoint wrapper and module. prefix dropped.
    WRITERS[layout](path, {"epoch": 3, "state_dict": collections.OrderedDict(
        (f"module.{k}", v) for k, v in expected.items())})
    tensors = weights.read_torch(path)
    assert list(tensors) == list(expected)
    assert tensors["fc.weight"].dtype == np.float32 and tensors["bn.num_batches_tracked"].dtype == np.int64
    np.testing.assert_array_equal(tensors["fc.weight"], expected["fc.weight"].astype(np.float32))


def test_torch_save_files_are_read(tmp_path):
    """Where torch is installed: its own zip and legacy files read the same."""
    torch = pytest.importorskip("torch")
    expected = _state_dict()
    state = collections.OrderedDict((k, torch.from_numpy(v)) for k, v in expected.items())
    state["t"] = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    for new in (True, False):
        path = str(tmp_path / f"torch_{new}.pth")
        torch.save(state, path, _use_new_zipfile_serialization=new)
        got = pth.read_pth(path)
        for name, value in expected.items():
            np.testing.assert_array_equal(got[name], value)
        np.testing.assert_array_equal(got["t"], np.arange(12, dtype=np.float32).reshape(3, 4).T)


# ----------------------------------------------------------------------------- hostile files


def _proto2_call(module: str, name: str, arg: str) -> bytes:
    """``module.name(arg)`` in protocol-2 opcodes: GLOBAL, BINUNICODE, TUPLE1, REDUCE, STOP."""
    data = arg.encode()
    return (b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X" + struct.pack("<I", len(data)) + data
            + b"\x85R.")


def _proto4_call(module: str, name: str, arg: str) -> bytes:
    """The same with protocol 4's STACK_GLOBAL."""
    def short(s):
        return b"\x8c" + bytes([len(s)]) + s.encode()
    return b"\x80\x04" + short(module) + short(name) + b"\x93" + short(arg) + b"\x85R."


@pytest.mark.parametrize("layout", sorted(WRITERS))
@pytest.mark.parametrize("module, name, build", [
    ("os", "system", _proto2_call),
    ("builtins", "eval", _proto2_call),
    ("posix", "system", _proto4_call),
    ("torch", "load", _proto2_call),
    ("numpy.core.multiarray", "_reconstruct", _proto2_call),
])
def test_a_hostile_pth_is_refused_and_nothing_runs(tmp_path, layout, module, name, build):
    marker = tmp_path / "pwned"
    command = f"open({str(marker)!r}, 'w')" if name == "eval" else f"touch {marker}"
    path = str(tmp_path / "hostile.pth")
    payload = build(module, name, command)
    if layout == "zip":
        write_zip_pth(path, {}, data_pkl=payload)
    else:
        write_legacy_pth(path, {}, main_pkl=payload)
    with pytest.raises(pth.UnsafePthError, match=rf"{path}: refused to load the global {module}\.{name}"):
        weights.read_weights(path, "torch")
    assert not marker.exists()


def test_a_plain_hostile_pickle_is_refused_too(tmp_path):
    path = str(tmp_path / "plain.pth")
    with open(path, "wb") as f:
        f.write(_proto2_call("os", "system", f"touch {tmp_path / 'pwned'}"))
    with pytest.raises(pth.UnsafePthError, match="refused to load the global os.system"):
        pth.read_pth(path)
    assert not (tmp_path / "pwned").exists()


def test_the_convert_command_refuses_a_hostile_pth(tmp_path, capsys):
    path = str(tmp_path / "hostile.pth")
    write_zip_pth(path, {}, data_pkl=_proto2_call("os", "system", f"touch {tmp_path / 'pwned'}"))
    out = str(tmp_path / "out")
    assert weights.main(["--from", "torch", "--model", "resnet18_torch", "--in", path, "--out", out]) == 2
    assert "refused to load the global os.system" in capsys.readouterr().err
    assert not os.path.exists(out) and not (tmp_path / "pwned").exists()


def test_damaged_files_are_named(tmp_path):
    path = str(tmp_path / "w.pth")
    with open(path, "wb") as f:
        f.write(b"not a torch file at all" * 4)
    with pytest.raises(ValueError, match="not a torch file"):
        pth.read_pth(path)
    # a tensor claiming more elements than its storage holds
    write_zip_pth(path, {"w": View(np.zeros(4, np.float32), 2, (2, 2), (2, 1))})
    with pytest.raises(ValueError, match="runs past its storage"):
        pth.read_pth(path)
    # a truncated legacy file
    write_legacy_pth(path, _state_dict())
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:-10])
    with pytest.raises(ValueError, match="truncated"):
        pth.read_pth(path)
