"""Time grids for fixed-step samplers: decreasing arrays t_0 = t_start > ... > t_N = t_end (float64, host)."""
from __future__ import annotations

import numpy as np

from diffusion_jax.sdes.base import Family

GRIDS = ("uniform", "quadratic", "logsnr", "edm", "power")


def noise_level(sde: Family, t: np.ndarray) -> np.ndarray:
    """sigma(t) = sqrt(Sigma_t[x, x]) / m_t[x]: the noise-to-signal ratio of the data coordinate.

    For VE it is sqrt(B(t)) (EDM's sigma); for VP sqrt(e^B - 1) (EDM's sigma of VP); for a modal family
    (bdm) that of its unblurred lowest-frequency mode.
    """
    return np.asarray(sde.noise_level_np(np.atleast_1d(np.asarray(t, np.float64))))


def _invert_monotone(sde: Family, t_start: float, t_end: float, target: np.ndarray, fn) -> np.ndarray:
    """t with fn(t) = target for an increasing fn on [t_end, t_start], by dense log-t table + bisection."""
    dense = np.geomspace(t_end, t_start, 2049)
    vals = fn(dense)
    if not np.all(np.diff(vals) > 0):
        raise ValueError(f"{sde.name}: the noise level is not monotone on [{t_end}, {t_start}]")
    target = np.asarray(target, np.float64)
    j = np.clip(np.searchsorted(vals, target), 1, len(dense) - 1)
    lo, hi = dense[j - 1], dense[j]
    for _ in range(60):                           # bisection on the exact function (every target at once)
        mid = 0.5 * (lo + hi)
        below = fn(mid) < target
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return 0.5 * (lo + hi)


def time_grid(sde: Family, n_steps: int, kind: str = "uniform", t_start: float | None = None,
              t_end: float | None = None, rho: float = 7.0) -> np.ndarray:
    """N + 1 decreasing times from ``t_start`` (default T) to ``t_end`` (default t_min).

    * ``uniform``: equal steps in t;  ``quadratic``: t = t_end + (t_start - t_end) s^2, s uniform;
    * ``logsnr``: equal steps in log(m_t^2 / Sigma_t[x, x]);
    * ``edm``: Karras et al.'s rho-schedule on the noise level sigma(t) (``rho`` = 7);
    * ``power``: the same rho-schedule on t itself, t = (t_end^{1/rho} + s (t_start^{1/rho} - t_end^{1/rho}))^rho.
    """
    if kind not in GRIDS:
        raise ValueError(f"unknown time grid {kind!r}; choose one of {GRIDS}")
    if not (isinstance(n_steps, (int, np.integer)) and n_steps >= 1):
        raise ValueError(f"need at least one step, got n_steps={n_steps!r}")
    t_start = sde.T if t_start is None else float(t_start)
    t_end = sde.t_min if t_end is None else float(t_end)
    if not (0 < t_end < t_start <= sde.T):
        raise ValueError(f"need 0 < t_end < t_start <= T={sde.T}, got t_end={t_end}, t_start={t_start}")
    s = np.linspace(1.0, 0.0, n_steps + 1)
    if kind == "uniform":
        grid = t_end + (t_start - t_end) * s
    elif kind == "quadratic":
        grid = t_end + (t_start - t_end) * s * s
    elif kind == "power":
        lo_p, hi_p = t_end ** (1.0 / rho), t_start ** (1.0 / rho)
        grid = (lo_p + s * (hi_p - lo_p)) ** rho
    elif kind == "logsnr":
        neg_logsnr = lambda t: 2 * np.log(noise_level(sde, t))
        lo, hi = neg_logsnr(np.array([t_end, t_start]))
        grid = _invert_monotone(sde, t_start, t_end, lo + (hi - lo) * s, neg_logsnr)
    else:
        lo, hi = noise_level(sde, np.array([t_end, t_start]))
        sig = (lo ** (1 / rho) + s * (hi ** (1 / rho) - lo ** (1 / rho))) ** rho
        grid = _invert_monotone(sde, t_start, t_end, sig, lambda t: noise_level(sde, t))
    grid[0], grid[-1] = t_start, t_end
    return grid
