"""Figures for trajectory analyses, written as PNG files with matplotlib's Agg canvas.

Figures are built with ``matplotlib.figure.Figure`` and rendered by ``FigureCanvasAgg`` directly, so these
functions never touch pyplot's global state or the process-wide backend (safe in notebooks and servers).
Every function saves to ``path`` (parent folders are created) and returns the path.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from diffusion_jax.analysis.geometry import flatten_trajectory

Array = Any

__all__ = ["plot_trajectories_2d", "plot_trajectories_1d", "plot_curves", "plot_score_deviation"]


def _save(fig: Figure, path: str | os.PathLike, dpi: int) -> str:
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def plot_trajectories_2d(path: str | os.PathLike, traj: Array, denoised: Array | None = None,
                         data: Array | None = None, max_paths: int = 64, title: str | None = None,
                         dpi: int = 110) -> str:
    """Sampling trajectories (N+1, batch, 2) in the plane, optionally with the denoising trajectories
    (M, batch, 2) dashed and the training points ``data`` (n, 2) as crosses. Starts are circles, ends dots."""
    x = np.asarray(traj, np.float64)
    if x.ndim != 3 or x.shape[-1] != 2:
        raise ValueError(f"plot_trajectories_2d needs trajectories of shape (N+1, batch, 2), got {x.shape}")
    b = min(x.shape[1], max_paths)
    fig = Figure(figsize=(5.5, 5.5))
    ax = fig.add_subplot(1, 1, 1)
    if data is not None:
        d = np.asarray(data, np.float64).reshape(-1, 2)
        ax.scatter(d[:, 0], d[:, 1], marker="x", c="k", s=30, label="data", zorder=3)
    for i in range(b):
        line, = ax.plot(x[:, i, 0], x[:, i, 1], lw=1.0, alpha=0.8, label="sampling" if i == 0 else None)
        ax.plot(x[0, i, 0], x[0, i, 1], "o", mfc="none", c=line.get_color(), ms=4)
        ax.plot(x[-1, i, 0], x[-1, i, 1], ".", c=line.get_color(), ms=7)
        if denoised is not None:
            dd = np.asarray(denoised, np.float64)
            ax.plot(dd[:, i, 0], dd[:, i, 1], "--", lw=0.8, c=line.get_color(), alpha=0.6,
                    label="denoising" if i == 0 else None)
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(loc="best", fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path, dpi)


def plot_trajectories_1d(path: str | os.PathLike, ts: Array, traj: Array, denoised: Array | None = None,
                         denoised_ts: Array | None = None, direction: Array | None = None, max_paths: int = 32,
                         log_t: bool = True, xlabel: str = "t", title: str | None = None, dpi: int = 110) -> str:
    """A 1-D projection of trajectories against time: <x_t - x_N, e> with e the unit chord direction of each
    example (x_0 - x_N), or a fixed ``direction`` (P,). Denoising trajectories are projected the same way.
    ``ts`` (and ``denoised_ts``) may be noise levels instead of times (set ``xlabel``): for VE most of the
    motion happens at t near T, and sigma spreads it out.

    Projecting on the chord shows the quasi-linear sampling path and how fast the denoiser reaches x_N.
    """
    x = flatten_trajectory(traj)
    ts = np.asarray(ts, np.float64)
    if ts.shape != x.shape[:1]:
        raise ValueError(f"{x.shape[0]} states but {ts.shape[0]} times")
    end = x[-1]
    if direction is None:
        e = x[0] - end
        e = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-300)
    else:
        e = np.asarray(direction, np.float64).reshape(1, -1)
        e = np.broadcast_to(e / np.linalg.norm(e), end.shape)
    b = min(x.shape[1], max_paths)
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    proj = np.sum((x - end) * e, axis=-1)
    if denoised is not None:
        dn = flatten_trajectory(denoised)
        dts = ts[: dn.shape[0]] if denoised_ts is None else np.asarray(denoised_ts, np.float64)
        dproj = np.sum((dn - end) * e, axis=-1)
    for i in range(b):
        line, = ax.plot(ts, proj[:, i], lw=1.0, label="sampling" if i == 0 else None)
        if denoised is not None:
            ax.plot(dts, dproj[:, i], "--", lw=0.9, c=line.get_color(), label="denoising" if i == 0 else None)
    if log_t and np.all(ts > 0):
        ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("projection on chord" if direction is None else "projection")
    ax.legend(loc="best", fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path, dpi)


def plot_curves(path: str | os.PathLike, x: Array, curves: Mapping[str, Array], xlabel: str = "t",
                ylabel: str = "", log_x: bool = True, log_y: bool = False, title: str | None = None,
                dpi: int = 110) -> str:
    """Per-example curves versus ``x``: each value (len(x), batch) or (len(x),) is drawn as its mean over
    the batch with a 10-90% band (e.g. chord deviation or distance to the end versus t)."""
    x = np.asarray(x, np.float64)
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    for name, vals in curves.items():
        v = np.asarray(vals, np.float64)
        v = v.reshape(v.shape[0], -1)
        if v.shape[0] != x.shape[0]:
            raise ValueError(f"curve {name!r} has {v.shape[0]} points, x has {x.shape[0]}")
        mean = np.nanmean(v, axis=1)
        line, = ax.plot(x, mean, lw=1.5, label=name)
        if v.shape[1] > 1:
            lo, hi = np.nanpercentile(v, [10, 90], axis=1)
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    if log_x and np.all(x > 0):
        ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(loc="best", fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path, dpi)


def plot_score_deviation(path: str | os.PathLike, result: Mapping[str, Any],
                         keys: Sequence[str] = ("sampling", "denoising", "learned_deviation", "optimal_deviation"),
                         against: str = "sigma", log_y: bool = True, title: str | None = None,
                         dpi: int = 110) -> str:
    """The distances of :func:`analysis.deviation.score_deviation` versus the noise level (or ``"ts"``)."""
    x = np.asarray(result[against], np.float64)
    curves = {k: np.maximum(np.asarray(result[k], np.float64), 1e-12) if log_y else result[k] for k in keys}
    return plot_curves(path, x, curves, xlabel="noise level sigma" if against == "sigma" else "t",
                       ylabel="distance", log_x=True, log_y=log_y,
                       title=title or "learned vs optimal denoiser", dpi=dpi)
