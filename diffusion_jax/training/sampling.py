"""Sampling a trained run (any sampler of :mod:`diffusion_jax.samplers`) and saving sample figures.

:func:`compile_sampler` is the one place where training draws samples: ONE jitted function
``draw(params, u0, key) -> x_0`` with the parameters as an argument (never closed over), compiled once
per (method, nfe, order, grid, shapes) and reused for every checkpoint or EMA copy; on a mesh the
parameters are replicated global arrays and ``u0`` is split along 'data', so it also runs when the
parameters span several hosts.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax.data import to_image_space
from diffusion_jax import samplers
from diffusion_jax.samplers import prior_init
from diffusion_jax.training.setup import Experiment

Array = Any



def compile_sampler(exp: Experiment, method: str = "gddim", nfe: int = 50, *, mesh: Mesh | None = None,
                    **sampler_kwargs: Any) -> Callable[[Any, Array, Array], Array]:
    """``draw(params, u0, key) -> x_0`` (the data coordinate after a final denoising step), compiled once.

    A :func:`diffusion_jax.samplers.compile` handle with the network as ``exp.apply(params, u, t)``: the
    parameters (e.g. the EMA copy, a global array on several hosts) are an argument, never a constant.
    The final step maps u at t_min to the denoiser output D(u, t_min) = E[x_0 | u] (one more network
    evaluation; ``denoise_final``), which every family needs for clean data at its auxiliary coordinates.
    ``key`` drives the sampler's noise (stochastic methods); ``mesh``: params replicated, ``u0`` split
    along 'data' when its batch divides the mesh, the result replicated (readable on every process).
    """
    kwargs = dict(sampler_kwargs)
    kwargs.setdefault("denoise_final", True)
    handle = samplers.compile(exp.sde, exp.apply, method=method, nfe=nfe, output="eps", K=exp.sqrt, **kwargs)

    def draw(params: Any, u0: Array, key: Array) -> Array:
        return handle(params, u0, key if handle.stochastic else None).u[..., 0]

    draw.__name__ = draw.__qualname__ = f"sampler_{method}_periodic"      # its name in compile logs
    if mesh is None:
        return jax.jit(draw)
    replicated = NamedSharding(mesh, P())
    return jax.jit(draw, in_shardings=(replicated, None, replicated), out_shardings=replicated)


def prior_sampler(exp: Experiment, n: int, mesh: Mesh | None = None) -> Callable[[Array], Array]:
    """``key -> u0`` (n prior draws), jitted, created split along 'data' when n divides the mesh."""
    def init(key):
        return prior_init(exp.sde, key, n, exp.data_shape)
    if mesh is None:
        return jax.jit(init)
    spec = P("data") if n % mesh.devices.size == 0 else P()
    return jax.jit(init, out_shardings=NamedSharding(mesh, spec))


def sample_data(exp: Experiment, params: Any, key: Array, n: int, method: str = "gddim", nfe: int = 50,
                batch: int | None = None, **sampler_kwargs: Any) -> np.ndarray:
    """n samples x_0 (data coordinate of the final state, with a final denoising step), shape (n, *data).

    The final step maps u at t_min to the denoiser output D(u, t_min) = E[x_0 | u] (one more network
    evaluation; ``denoise_final``), which every family needs for clean data at its auxiliary coordinates.
    One compiled sampler serves every batch (a short last batch is padded) and every ``params``.
    Batch i starts from ``prior_init(sde, fold_in(key, i), ...)``; stochastic samplers draw their noise from
    ``fold_in(fold_in(key, 1), i)``.
    """
    sampler_kwargs.setdefault("denoise_final", True)
    draw = samplers.compile(exp.sde, exp.apply, method=method, nfe=nfe, output="eps", K=exp.sqrt, **sampler_kwargs)
    batch = min(batch or n, n)
    noise_key = jax.random.fold_in(key, 1)
    out = []
    for i, start in enumerate(range(0, n, batch)):
        m = min(batch, n - start)
        u0 = prior_init(exp.sde, jax.random.fold_in(key, i), m, exp.data_shape)
        if m < batch:                               # same shape as the other batches: no recompile
            u0 = jax.numpy.concatenate([u0, jax.numpy.zeros((batch - m,) + u0.shape[1:], u0.dtype)])
        res = draw(params, u0, jax.random.fold_in(noise_key, i) if draw.stochastic else None)
        out.append(np.asarray(res.u[:m, ..., 0]))
    return np.concatenate(out)


def save_samples(x: np.ndarray, config, path: str, reference: np.ndarray | None = None) -> str:
    """A scatter plot (2-D data, with ``reference`` points in grey) or an image grid (in [-1, 1])."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if x.ndim == 2:
        fig, ax = plt.subplots(figsize=(4, 4))
        if reference is not None:
            ax.scatter(reference[:, 0], reference[:, 1], s=1, c="0.75", label="data")
        ax.scatter(x[:, 0], x[:, 1], s=1, c="C0", label="samples")
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")
        ax.set_title(f"{config.family.name} {dict(config.family.params)}", fontsize=8)
    else:
        grid = image_grid(x)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def image_grid(x: np.ndarray, cols: int | None = None, pad: int = 1) -> np.ndarray:
    """Images (n, H, W, C) in [-1, 1] -> one (rows (H+pad), cols (W+pad), C) array in [0, 1]."""
    x = to_image_space(x)
    n, h, w, c = x.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c))
    for i in range(n):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    return grid
