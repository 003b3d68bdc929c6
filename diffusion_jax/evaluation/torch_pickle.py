"""Read PyTorch checkpoints (``torch.save`` of a state dict) with numpy only, through an allowlist.

``torch.load`` is a general unpickler: a checkpoint can name any Python callable and have it called.
This reader understands the two layouts ``torch.save`` writes and nothing else:

* **zip** (torch >= 1.6): ``<root>/data.pkl`` (pickle protocol 2) plus one raw record
  ``<root>/data/<key>`` per storage; ``<root>/byteorder`` says ``little``/``big`` (absent: little).
* **legacy** (torch < 1.6, e.g. pytorch-fid's 2019 weight file): one stream holding the pickles
  magic number ``0x1950a86a20f9469cfc6c``, protocol version ``1001``, a sys-info dict, the object,
  the sorted list of storage keys, and then per key an int64 element count and the raw bytes.

In the object pickle a tensor is ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
requires_grad, backward_hooks[, metadata])`` and each storage is a *persistent id*
``("storage", torch.<Type>Storage, key, location, numel[, view_metadata])``; the element at multi-index
``i`` of the tensor is ``storage[offset + sum_k i_k stride_k]``.

Globals allowed (anything else raises :class:`UnsafeCheckpointError` before it is resolved):
``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``, ``torch._utils._rebuild_parameter``
and the typed storage classes ``torch.{Float,Double,Half,BFloat16,Long,Int,Short,Char,Byte,Bool}Storage``.
Those names resolve to local stand-ins; torch is never imported.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001


try:  # ml_dtypes ships with jax; it gives numpy a bfloat16
    import ml_dtypes
    _BFLOAT16: Optional[np.dtype] = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    _BFLOAT16 = None

# torch storage class name -> numpy dtype (little endian); bfloat16 resolved lazily.
STORAGE_DTYPES: Dict[str, Optional[np.dtype]] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": _BFLOAT16,
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint references a Python global outside the allowlist (or is malformed)."""


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        d = STORAGE_DTYPES[self.name]
        if d is None:
            raise UnsafeCheckpointError(f"{self.name} needs the ml_dtypes package")
        return d


@dataclass
class _Storage:
    key: str
    dtype: np.dtype
    numel: int
    data: Optional[np.ndarray] = None   # filled once the raw bytes are read


@dataclass
class _PendingTensor:
    storage: _Storage
    offset: int
    size: Tuple[int, ...]
    stride: Tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    # Data may not be read yet (legacy files store it after the pickle): materialise later.
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpointError(f"tensor storage is {type(storage).__name__}, not a persistent storage")
    return _PendingTensor(storage, int(storage_offset), tuple(int(s) for s in size),
                          tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler resolving only the allowlisted globals; storages come back as placeholders."""

    def __init__(self, file, legacy: bool):
        super().__init__(file)
        self.legacy = legacy
        self.storages: Dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafeCheckpointError(
            f"checkpoint references the global {module}.{name}, which is not on the allowlist "
            f"(OrderedDict, torch._utils._rebuild_tensor_v2/_rebuild_parameter, torch.*Storage); refusing to load it")

    def persistent_load(self, pid: Any) -> _Storage:
        if not isinstance(pid, tuple) or not pid:
            raise UnsafeCheckpointError(f"unexpected persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind != "storage":
            raise UnsafeCheckpointError(f"unsupported persistent id type {kind!r} (only tensor storages)")
        if self.legacy:
            if len(pid) != 6:
                raise UnsafeCheckpointError(f"malformed legacy storage id {pid!r}")
            _, stype, key, _location, numel, view_metadata = pid
            if view_metadata is not None:
                raise UnsafeCheckpointError("legacy storage views are not supported")
        else:
            if len(pid) != 5:
                raise UnsafeCheckpointError(f"malformed storage id {pid!r}")
            _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise UnsafeCheckpointError(f"storage type {stype!r} is not a torch typed storage")
        key = key.decode("ascii") if isinstance(key, bytes) else str(key)
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(key, stype.dtype, int(numel))
        elif storage.dtype != stype.dtype:
            raise UnsafeCheckpointError(f"storage {key} used with two dtypes")
        return storage


class _PlainUnpickler(pickle.Unpickler):
    """For the legacy header pickles, which hold only ints, strings, lists and dicts: no globals."""

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafeCheckpointError(f"global {module}.{name} in a checkpoint header pickle")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError("persistent id in a checkpoint header pickle")


def _materialise(obj: Any) -> Any:
    """Replace every pending tensor by a numpy array (a copy, C-contiguous) in nested containers."""
    if isinstance(obj, _PendingTensor):
        st = obj.storage
        if st.data is None:
            raise UnsafeCheckpointError(f"storage {st.key} has no data in the checkpoint")
        if any(s < 0 for s in obj.size) or any(s < 0 for s in obj.stride) or obj.offset < 0:
            raise UnsafeCheckpointError("negative size/stride/offset")
        numel = int(np.prod(obj.size)) if obj.size else 1
        if numel == 0:
            return np.zeros(obj.size, st.dtype)
        last = obj.offset + sum((n - 1) * s for n, s in zip(obj.size, obj.stride))
        if last >= st.data.shape[0]:
            raise UnsafeCheckpointError(f"tensor reads past the end of storage {st.key}")
        itemsize = st.data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(st.data[obj.offset:], shape=obj.size,
                                               strides=tuple(s * itemsize for s in obj.stride),
                                               writeable=False)
        return np.array(view, dtype=st.data.dtype.newbyteorder("="), order="C")
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _materialise(v)
        return out
    if isinstance(obj, list):
        return [_materialise(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialise(v) for v in obj)
    return obj


def _storage_array(raw: bytes, storage: _Storage, little_endian: bool) -> np.ndarray:
    dtype = storage.dtype if little_endian else storage.dtype.newbyteorder(">")
    need = storage.numel * dtype.itemsize
    if len(raw) < need:
        raise UnsafeCheckpointError(f"storage {storage.key}: {len(raw)} bytes, need {need}")
    return np.frombuffer(raw, dtype=dtype, count=storage.numel)


def _load_zip(data: bytes) -> Any:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise UnsafeCheckpointError(f"not a torch zip checkpoint (data.pkl records: {pkl})")
        root = pkl[0][: -len("data.pkl")]
        little = True
        if root + "byteorder" in names:
            little = zf.read(root + "byteorder").decode().strip() == "little"
        unpickler = RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), legacy=False)
        obj = unpickler.load()
        for key, storage in unpickler.storages.items():
            record = f"{root}data/{key}"
            if record not in names:
                raise UnsafeCheckpointError(f"missing storage record {record}")
            storage.data = _storage_array(zf.read(record), storage, little)
    return _materialise(obj)


def _load_legacy(data: bytes) -> Any:
    f = io.BytesIO(data)

    def plain() -> Any:
        return _PlainUnpickler(f).load()

    if plain() != LEGACY_MAGIC_NUMBER:
        raise UnsafeCheckpointError("invalid magic number: not a torch checkpoint")
    if plain() != LEGACY_PROTOCOL_VERSION:
        raise UnsafeCheckpointError("unsupported legacy protocol version")
    sys_info = plain()
    little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
    unpickler = RestrictedUnpickler(f, legacy=True)
    obj = unpickler.load()
    keys = plain()
    if not isinstance(keys, list):
        raise UnsafeCheckpointError("malformed storage key list")
    for key in keys:
        key = key.decode("ascii") if isinstance(key, bytes) else str(key)
        storage = unpickler.storages.get(key)
        if storage is None:
            raise UnsafeCheckpointError(f"storage {key} listed but never referenced")
        (numel,) = struct.unpack("<q" if little else ">q", f.read(8))
        if numel != storage.numel:
            raise UnsafeCheckpointError(f"storage {key}: {numel} elements on disk, {storage.numel} expected")
        storage.data = _storage_array(f.read(numel * storage.dtype.itemsize), storage, little)
    return _materialise(obj)


def load_torch_checkpoint(path: str) -> Any:
    """The object saved by ``torch.save`` with every tensor as a numpy array (allowlisted globals only)."""
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:4] == b"PK\x03\x04":
        return _load_zip(data)
    if data[257:262] == b"ustar":
        raise UnsafeCheckpointError(f"{path}: pre-0.4 tar-format torch checkpoints are not supported")
    if data[:2] == b"\x80\x02":
        return _load_legacy(data)
    raise UnsafeCheckpointError(f"{path}: not a torch checkpoint (neither zip nor legacy pickle)")


def load_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
    """A flat ``{name: ndarray}`` state dict from a torch checkpoint (``{"state_dict": ...}`` unwrapped)."""
    obj = load_torch_checkpoint(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray)
                                            for k, v in obj.items()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors")
    return dict(obj)


__all__: List[str] = ["UnsafeCheckpointError", "RestrictedUnpickler", "STORAGE_DTYPES",
                      "load_torch_checkpoint", "load_torch_state_dict"]
