"""Write PyTorch checkpoint files (what ``torch.save`` writes) from numpy, without torch: test-side only.

Two writers:

* :func:`torch_save` (the general one): any nesting of dict / OrderedDict / list / tuple / int / float / str /
  bool / None / numpy arrays, written as torch >= 1.6 does: a zip archive ``<root>/data.pkl`` (pickle
  protocol 2) with one raw little-endian record ``<root>/data/<key>`` per tensor storage, plus
  ``<root>/byteorder`` and ``<root>/version``. A numpy array becomes a tensor: the global
  ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`` with the storage a
  persistent id ``("storage", torch.<Type>Storage, key, "cpu", numel)``; numpy scalars become Python numbers.
  An OrderedDict keeps its ``__dict__`` (state dicts carry ``_metadata``), pickled with BUILD as torch does.
* :func:`write_fake_torch_checkpoint` (low level): a flat state dict assembled opcode by opcode, with storages
  shared between views (offset / stride), the legacy (torch < 1.6) stream layout, and an injected global,
  for the reader's own tests.

Both are read by :mod:`diffusion_jax.evaluation.torch_pickle` (the restricted unpickler); the writer of
:func:`torch_save` was checked against files written by ``torch.save`` itself (torch 2.13): both load to the
same objects through that reader.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from typing import Any

import numpy as np

from diffusion_jax.evaluation import torch_pickle

_STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
                  np.dtype(np.int64): "LongStorage", np.dtype(np.int32): "IntStorage",
                  np.dtype(np.float16): "HalfStorage", np.dtype(np.bool_): "BoolStorage",
                  np.dtype(np.uint8): "ByteStorage"}


# ================================================================================================
# General writer: a pure-Python pickler that names torch's globals without importing torch
# ================================================================================================

class _Global:
    """A stand-in for a global ``module.name`` that is written as GLOBAL, never resolved here."""

    def __init__(self, module: str, name: str):
        self.module, self.name, self.__name__ = module, name, name

    def __call__(self, *args):        # pickle's save_reduce wants a callable
        raise TypeError("a pickling stand-in")


class _StorageRef:
    def __init__(self, key: str, array: np.ndarray):
        self.key, self.array = key, array


_REBUILD = _Global("torch._utils", "_rebuild_tensor_v2")


class _TorchPickler(pickle._Pickler):
    """Protocol-2 pickler: numpy arrays -> torch tensors with zip storages; globals by name."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file):
        super().__init__(file, protocol=2)
        self.storages: dict[str, np.ndarray] = {}

    def _save_global_standin(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
        self.memoize(obj)

    dispatch[_Global] = _save_global_standin

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageRef):
            dtype = obj.array.dtype
            if dtype not in _STORAGE_NAMES:
                raise TypeError(f"no torch storage type for numpy dtype {dtype}")
            return ("storage", _Global("torch", _STORAGE_NAMES[dtype]), obj.key, "cpu", int(obj.array.size))
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            arr = np.asarray(obj, order="C")          # (ascontiguousarray makes 0-d arrays 1-d)
            key = str(len(self.storages))
            self.storages[key] = arr.reshape(-1)
            stride = tuple(int(np.prod(arr.shape[i + 1:])) for i in range(arr.ndim))   # contiguous
            args = (_StorageRef(key, arr), 0, tuple(int(s) for s in arr.shape), stride, False,
                    collections.OrderedDict())
            return (_REBUILD, args)
        return NotImplemented


def _plain(obj: Any) -> Any:
    """numpy scalars -> Python numbers (torch.save never holds numpy objects); containers rebuilt."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, collections.OrderedDict):
        out = collections.OrderedDict((k, _plain(v)) for k, v in obj.items())
        out.__dict__.update({k: _plain(v) for k, v in obj.__dict__.items()})
        return out
    if isinstance(obj, dict):
        return {_plain(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    return obj


def torch_save(obj: Any, path: str, root: str = "archive") -> None:
    """Write ``obj`` to ``path`` as ``torch.save(obj, path)`` would (zip format), numpy arrays as tensors."""
    buf = io.BytesIO()
    pickler = _TorchPickler(buf)
    pickler.dump(_plain(obj))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{root}/data.pkl", buf.getvalue())
        zf.writestr(f"{root}/byteorder", "little")
        for key, arr in pickler.storages.items():
            zf.writestr(f"{root}/data/{key}", arr.astype(arr.dtype.newbyteorder("<")).tobytes())
        zf.writestr(f"{root}/version", "3\n")


def state_dict(items: Any) -> collections.OrderedDict:
    """An OrderedDict carrying ``_metadata`` as ``nn.Module.state_dict()`` returns it."""
    out = collections.OrderedDict(items)
    out._metadata = collections.OrderedDict([("", {"version": 1})])
    return out


# ================================================================================================
# Low-level writer, assembled opcode by opcode (views into shared storages, legacy layout)
# ================================================================================================

def _pk_str(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b                # BINUNICODE


def _pk_int(i):
    return b"J" + struct.pack("<i", i)                          # BININT


def _pk_tuple(parts):
    return b"(" + b"".join(parts) + b"t"                        # MARK ... TUPLE


def _pk_global(module, name):
    return b"c" + f"{module}\n{name}\n".encode()                # GLOBAL


def _pk_ordered_dict(items):
    out = _pk_global("collections", "OrderedDict") + b")R"       # OrderedDict()
    if items:
        out += b"(" + b"".join(k + v for k, v in items) + b"u"  # MARK k v ... SETITEMS
    return out


def _pk_tensor(storage_key, storage, offset, size, stride, legacy):
    pid = [_pk_str("storage"), _pk_global("torch", _STORAGE_NAMES[storage.dtype]), _pk_str(storage_key),
           _pk_str("cpu"), _pk_int(storage.size)]
    if legacy:
        pid.append(b"N")                                        # view_metadata = None
    args = [_pk_tuple(pid) + b"Q",                              # BINPERSID
            _pk_int(offset), _pk_tuple([_pk_int(s) for s in size]), _pk_tuple([_pk_int(s) for s in stride]),
            b"\x89", _pk_ordered_dict([])]                       # requires_grad=False, hooks
    return _pk_global("torch._utils", "_rebuild_tensor_v2") + _pk_tuple(args) + b"R"


def write_fake_torch_checkpoint(path, storages, tensors, fmt="zip", root="archive", extra_global=None):
    """storages: {key: 1-d array}; tensors: [(name, key, offset, size, stride)] -> a torch.save file."""
    items = [(_pk_str(name), _pk_tensor(key, storages[key], off, size, stride, fmt == "legacy"))
             for name, key, off, size, stride in tensors]
    if extra_global is not None:   # an entry whose value calls an arbitrary global
        items.append((_pk_str("evil"), _pk_global(*extra_global) + _pk_tuple([_pk_str("echo pwned")]) + b"R"))
    # state_dict() is an OrderedDict carrying a `_metadata` attribute: pickled as BUILD with its __dict__.
    version_dict = b"}" + _pk_str("version") + _pk_int(1) + b"s"      # {"version": 1}
    metadata = _pk_ordered_dict([(_pk_str(""), version_dict)])
    obj = b"\x80\x02" + _pk_ordered_dict(items) + b"}" + _pk_str("_metadata") + metadata + b"sb" + b"."
    if fmt == "zip":
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr(f"{root}/data.pkl", obj)
            zf.writestr(f"{root}/byteorder", "little")
            for key, arr in storages.items():
                zf.writestr(f"{root}/data/{key}", np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes())
            zf.writestr(f"{root}/version", "3\n")
    else:
        with open(path, "wb") as f:
            f.write(pickle.dumps(torch_pickle.LEGACY_MAGIC_NUMBER, protocol=2))
            f.write(pickle.dumps(torch_pickle.LEGACY_PROTOCOL_VERSION, protocol=2))
            f.write(pickle.dumps({"protocol_version": 1001, "little_endian": True,
                                  "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2))
            f.write(obj)
            keys = sorted(storages)
            f.write(pickle.dumps(keys, protocol=2))
            for key in keys:
                arr = storages[key]
                f.write(struct.pack("<q", arr.size) + arr.astype(arr.dtype.newbyteorder("<")).tobytes())


def write_state_dict_as_torch(path, state_dict, fmt="zip"):
    storages, tensors = {}, []
    for i, (name, arr) in enumerate(state_dict.items()):
        arr = np.ascontiguousarray(arr)
        storages[str(i)] = arr.reshape(-1)
        stride = tuple(int(s // arr.itemsize) for s in arr.strides)
        tensors.append((name, str(i), 0, arr.shape, stride))
    write_fake_torch_checkpoint(path, storages, tensors, fmt=fmt)
