"""Data-parallel layout for sampling and evaluation: a 1-D 'data' mesh over the devices, batches split along it.

Compiled samplers and feature extractors are batch-parallel, so an input laid out over the mesh runs on every
device with no other change (jit propagates the sharding); the tables and parameters are replicated.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


@functools.lru_cache(maxsize=4)
def data_mesh(n_devices: int | None = None) -> Mesh:
    """A 'data' mesh over the first ``n_devices`` devices (default all), axis type Auto (jit shardings)."""
    n = jax.device_count() if n_devices is None else int(n_devices)
    try:
        return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    except (AttributeError, TypeError):          # older jax: no axis types, every axis is Auto
        return jax.make_mesh((n,), ("data",))


def shard_batch(x: Any, mesh: Mesh | None = None) -> Any:
    """``x`` (batch, ...) laid out along 'data' when there are several devices and they divide the batch;
    unchanged otherwise (one device, or a batch that does not split evenly)."""
    mesh = mesh or data_mesh()
    n = mesh.shape["data"]
    if n == 1 or x.shape[0] % n:
        return x
    return jax.device_put(x, NamedSharding(mesh, P("data")))
