r"""Sampling and denoising trajectories and their geometry (Chen et al., arXiv 2305.19947).

A sampler run with ``return_trajectory=True`` gives states u_{t_i} (N+1, batch, *data, k) and denoiser
outputs D(u_t, t) = E[x_0 | u_t]. The two curves studied here, for every linear family:

* the sampling trajectory in data coordinates, x_{t_i} = u_{t_i}[..., 0];
* the denoising trajectory D(u_{t_i}, t_i) (an implicit curve that converges faster, ibid.).

For a family with k = 1 (VP, VE) the state is u = m_t x_0 + sqrt(Sigma_t) z, so xhat = u / m_t = x_0 + sigma z
with the noise level sigma(t) = sqrt(Sigma_t) / m_t (:func:`samplers.grids.noise_level`), and the
probability-flow ODE in (xhat, sigma) is the VE/EDM ODE dxhat/dsigma = (xhat - D(xhat, sigma)) / sigma. For VE
m_t = 1, so xhat = u = x. :func:`edm_view` returns that view (for k >= 2 it is the rescaled data coordinate,
a useful picture but not a state of that ODE).

Modal families (e.g. blurring diffusion, k = 1, state in pixel space) have a mean coefficient a_f(t) per mode
f of an orthogonal basis V: u = V (a(t) * V^T x_0) + sigma_t z. The trajectories and every metric below are
taken in pixel space, as for any other family. The scalar m_t of :func:`reference_mean_coefficient` (used by
:func:`edm_view`) is then, by definition, that of the first mode, the unblurred (zero-frequency) one, the same
mode :func:`samplers.grids.noise_level` reports sigma(t) for: xhat = u / a_0(t) puts the image mean on the data
scale, and the other modes are additionally damped by a_f / a_0 <= 1 (blurred), so only the zero-frequency
component of xhat follows the VE ODE.

Geometry of one trajectory x_0, ..., x_N (each point flattened to a vector in R^P):

* chord deviation   dev_i = || (x_i - x_0) - ((x_i - x_0) . e) e ||,  e = (x_N - x_0) / ||x_N - x_0||:
  the distance from x_i to the straight line through the two end points (0 at both ends);
* distance to end   ||x_i - x_N||;
* step cosines      cos_i = <Delta_i, Delta_{i+1}> / (|Delta_i| |Delta_{i+1}|),  Delta_i = x_{i+1} - x_i,
  and the turning angles arccos(cos_i) (0 on a straight line, the same constant on a uniform circle arc);
* Menger curvature  kappa_i = 4 Area(x_{i-1}, x_i, x_{i+1}) / (|a| |b| |a + b|),  a = x_i - x_{i-1},
  b = x_{i+1} - x_i, with 4 Area^2 = |a|^2 |b|^2 - (a . b)^2: the inverse radius of the circle through three
  consecutive points (exactly 1/R on a circle of radius R);
* second derivative ||d^2 x / ds^2|| in a parameter s (t or sigma) by non-uniform central differences
  (exact for quadratics). For VE, d^2 x / dsigma^2 = -(1/sigma) dD/dsigma along the exact ODE: the
  denoising trajectory governs the curvature of the sampling trajectory.

All metrics take an array (N+1, batch, *data) and return per-example values (leading time axis kept).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from diffusion_jax.samplers.grids import noise_level
from diffusion_jax.sdes.base import Family

Array = Any

__all__ = [
    "sampling_trajectory", "denoising_trajectory", "edm_view", "reference_mean_coefficient", "flatten_trajectory",
    "chord_deviation", "distance_to_end", "step_cosines", "turning_angles", "menger_curvature",
    "second_derivative_norm", "trajectory_geometry",
]


# ------------------------------------------------------------------ trajectories from sampler output
def _require(info: Any, key: str) -> None:
    if getattr(info, key) is None:
        raise ValueError(f"sampler info has no {key!r}: call samplers.sample(..., return_trajectory=True)")


def sampling_trajectory(info: Any) -> tuple[np.ndarray, np.ndarray]:
    """(ts, x): grid times (N+1,) and data coordinates x_t = u_t[..., 0], shape (N+1, batch, *data)."""
    _require(info, "trajectory")
    traj = np.asarray(info.trajectory, np.float64)
    return np.asarray(info.ts, np.float64), traj[..., 0]


def denoising_trajectory(info: Any) -> tuple[np.ndarray, np.ndarray]:
    """(ts_D, D): the times of the denoiser outputs and D(u_t, t), shape (len(ts_D), batch, *data).

    Samplers differ in where they evaluate the network: the diffrax methods at all N+1 grid times, gDDIM and
    EDM-Heun at the N step starts t_0..t_{N-1}, SSCS at the step midpoints (``info.denoised_ts``). ``info`` is the :class:`~diffusion_jax.samplers.SampleInfo` of a sampler run.
    The returned times always match the returned outputs.
    """
    _require(info, "denoised")
    den = np.asarray(info.denoised, np.float64)
    if info.denoised_ts is not None:
        ts = np.asarray(info.denoised_ts, np.float64)
    else:
        ts = np.asarray(info.ts, np.float64)[: den.shape[0]]
    if ts.shape[0] != den.shape[0]:
        raise ValueError(f"{den.shape[0]} denoiser outputs but {ts.shape[0]} times")
    return ts, den


def reference_mean_coefficient(sde: Family, t: float) -> float:
    """The scalar m_t of the data coordinate, Phi(t, 0)[x, x] (float64).

    Pixel-shared families: the one coefficient of every data dimension. Modal families: that of the first mode,
    the unblurred (zero-frequency) one, whose sigma(t) :func:`samplers.grids.noise_level` also reports.
    """
    k = sde.order
    # (k, k) or (*modes, k, k): the first matrix is the pixel-shared one or the first mode's
    return float(np.asarray(sde.transition_np(t=float(t), s=0.0)).reshape(-1, k, k)[0, 0, 0])


def edm_view(sde: Family, ts: Array, x: Array) -> tuple[np.ndarray, np.ndarray]:
    """(sigma(t), x / m_t): the noise level and the rescaled data coordinate at each time.

    ``x`` has the time axis first (length len(ts)); m_t is :func:`reference_mean_coefficient`. For k = 1 this
    is the state of the VE/EDM ODE dxhat/dsigma = (xhat - D) / sigma (for VE, m_t = 1 and xhat = x); for a
    modal family only its zero-frequency component is (module docstring).
    """
    ts = np.asarray(ts, np.float64)
    x = np.asarray(x, np.float64)
    if x.shape[0] != ts.shape[0]:
        raise ValueError(f"x has {x.shape[0]} time points, ts has {ts.shape[0]}")
    m = np.array([reference_mean_coefficient(sde, t) for t in ts])
    return noise_level(sde, ts), x / m.reshape((-1,) + (1,) * (x.ndim - 1))


# ------------------------------------------------------------------ metrics
def flatten_trajectory(traj: Array) -> np.ndarray:
    """(N+1, batch, *data) -> (N+1, batch, P) float64."""
    traj = np.asarray(traj, np.float64)
    if traj.ndim < 2:
        raise ValueError(f"a trajectory needs shape (N+1, batch, *data), got {traj.shape}")
    if traj.ndim == 2:                      # scalar data
        return traj[..., None]
    return traj.reshape(traj.shape[0], traj.shape[1], -1)


def chord_deviation(traj: Array) -> np.ndarray:
    """Distance of every point from the line through the trajectory's end points, shape (N+1, batch)."""
    x = flatten_trajectory(traj)
    rel = x - x[:1]
    chord = x[-1] - x[0]                                                     # (batch, P)
    norm = np.linalg.norm(chord, axis=-1, keepdims=True)
    # A closed trajectory has no chord direction; then the deviation is the distance to the start.
    e = np.where(norm > 0, chord / np.where(norm > 0, norm, 1.0), 0.0)
    along = np.sum(rel * e, axis=-1, keepdims=True)
    return np.linalg.norm(rel - along * e, axis=-1)


def distance_to_end(traj: Array) -> np.ndarray:
    """||x_i - x_N|| per point, shape (N+1, batch)."""
    x = flatten_trajectory(traj)
    return np.linalg.norm(x - x[-1:], axis=-1)


def step_cosines(traj: Array) -> np.ndarray:
    """Cosine between consecutive displacements Delta_i, Delta_{i+1}, shape (N-1, batch) (1 on a line).

    A zero-length step has no direction; its cosines are NaN.
    """
    x = flatten_trajectory(traj)
    if x.shape[0] < 3:
        raise ValueError("step cosines need at least 3 points")
    d = np.diff(x, axis=0)
    n = np.linalg.norm(d, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.sum(d[:-1] * d[1:], axis=-1) / (n[:-1] * n[1:])
    return np.clip(c, -1.0, 1.0)


def turning_angles(traj: Array) -> np.ndarray:
    """arccos of :func:`step_cosines` (radians), shape (N-1, batch)."""
    return np.arccos(step_cosines(traj))


def menger_curvature(traj: Array) -> np.ndarray:
    """Inverse circumradius of consecutive point triples, shape (N-1, batch) (1/R on a circle of radius R)."""
    x = flatten_trajectory(traj)
    if x.shape[0] < 3:
        raise ValueError("curvature needs at least 3 points")
    a = x[1:-1] - x[:-2]
    b = x[2:] - x[1:-1]
    aa, bb, ab = np.sum(a * a, -1), np.sum(b * b, -1), np.sum(a * b, -1)
    # |a|^2 |b|^2 - (a.b)^2 = 4 Area^2 >= 0; clip the rounding below 0 on (near-)straight pieces.
    twice_area = np.sqrt(np.clip(aa * bb - ab * ab, 0.0, None))
    c = np.linalg.norm(a + b, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 2.0 * twice_area / (np.sqrt(aa * bb) * c)


def second_derivative_norm(traj: Array, s: Array) -> np.ndarray:
    """||d^2 x / ds^2|| at the interior points by non-uniform central differences, shape (N-1, batch).

    With h0 = s_i - s_{i-1}, h1 = s_{i+1} - s_i:
    x'' = 2 [h0 x_{i+1} - (h0 + h1) x_i + h1 x_{i-1}] / (h0 h1 (h0 + h1)), exact for quadratics in s.
    """
    x = flatten_trajectory(traj)
    s = np.asarray(s, np.float64)
    if s.shape != (x.shape[0],):
        raise ValueError(f"s must have shape ({x.shape[0]},), got {s.shape}")
    if x.shape[0] < 3:
        raise ValueError("a second derivative needs at least 3 points")
    h0 = (s[1:-1] - s[:-2])[:, None, None]
    h1 = (s[2:] - s[1:-1])[:, None, None]
    acc = 2.0 * (h0 * x[2:] - (h0 + h1) * x[1:-1] + h1 * x[:-2]) / (h0 * h1 * (h0 + h1))
    return np.linalg.norm(acc, axis=-1)


def trajectory_geometry(traj: Array, s: Array | None = None) -> dict[str, np.ndarray]:
    """Every metric of one trajectory array (N+1, batch, *data): a dict of per-example arrays.

    Keys: ``chord_deviation``, ``distance_to_end``, ``step_cosine``, ``turning_angle``, ``curvature``
    (Menger), ``length`` (polygonal arc length, (batch,)), ``chord`` (end-to-end distance, (batch,)) and,
    when a parameter ``s`` (N+1,) is given, ``second_derivative``.
    """
    x = flatten_trajectory(traj)
    out = dict(chord_deviation=chord_deviation(x), distance_to_end=distance_to_end(x),
               step_cosine=step_cosines(x), turning_angle=turning_angles(x), curvature=menger_curvature(x),
               length=np.sum(np.linalg.norm(np.diff(x, axis=0), axis=-1), axis=0),
               chord=np.linalg.norm(x[-1] - x[0], axis=-1))
    if s is not None:
        out["second_derivative"] = second_derivative_norm(x, s)
    return out
