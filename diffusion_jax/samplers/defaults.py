r"""Default gDDIM configuration per family and NFE: the best one measured on the exact-score benchmark under
an eps-error gain bound.

``sample(sde, fn, u, method="gddim", nfe=N)`` with nothing else chosen runs the denoiser form
(:mod:`.exponential`) and takes its multistep order, its corrector, its time grid and its gain bound
``max_gain`` from here. The grids are data (``tuned_grids.json`` beside this file), written by
``python -m diffusion_jax bench-solvers --tune`` and validated retunes of some cells (the table's ``commands``;
see ``diffusion_jax.apps.bench_solvers.tune``): for each
family (at its default parameters) and NFE, every (order, corrector) on power grids
t = (t_end^{1/p} + s (t_start^{1/p} - t_end^{1/p}))^p, s uniform, is measured, and the best one's nodes s_i
are then optimised coordinate-wise on exact-score trajectories (8-Gaussian ring, its own prior draws, not
the benchmark's). Every candidate runs as the plan will run it: its grid guarded so that each step's
eps-error gain |m_{t'}| / |w_t| is at most ``max_gain`` and each step's order lowered until its history gain
is too (:func:`.exponential.guard_grid`, :func:`.exponential.step_tables`). The optimum is therefore the best
*bounded* configuration: accurate on exact scores and safe with learned networks (whose eps error the
unbounded tuned grids multiplied by up to ~180 in their first step). A stored grid is kept in the variable s
(that of the guarded grid), so it maps onto any [t_end, t_start]; the plan guards it again (a no-op on the
tuned interval).

An entry can instead be single-step (``stages`` per step, their stage ``fractions``, the grid's s and rho:
:func:`.exponential.single_step_tables`), written by ``bench-solvers --tune --tune-stages ...``
(:func:`diffusion_jax.apps.bench_solvers._tune_layout`: nodes and fractions descended together, the grid guarded
by the bound like every candidate); it applies to its own NFE only.

Resolution for a family and N:
* the stored entry for (family, N) when there is one;
* for another N of a stored family: its nearest stored multistep NFE's configuration, the node profile s(i / N)
  interpolated (monotone, piecewise linear in i / N);
* otherwise the generic rule :data:`GENERIC` (a power grid, order 3 with corrector), with no gain bound.
"""
from __future__ import annotations

import functools
import json
import math
import os
from typing import Any

import numpy as np

TUNED_PATH = os.path.join(os.path.dirname(__file__), "tuned_grids.json")
# generic rule for families with no stored entry (measured best on average over the five benchmark families)
GENERIC = dict(order=3, corrector=3, rho=4.0)


def family_key(sde: Any) -> str:
    """``name`` plus the family's parameters (a stored grid applies only to the parameters it was tuned on)."""
    params = getattr(sde, "params", {}) or {}
    items = ",".join(f"{k}={_fmt(v)}" for k, v in sorted(params.items()))
    return f"{sde.name}({items})"


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple, np.ndarray)):
        return "[" + ",".join(_fmt(x) for x in np.asarray(v).ravel()) + "]"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.10g}"
    return str(v)


@functools.lru_cache(maxsize=4)
def load_table(path: str = TUNED_PATH) -> dict:
    """The stored table ``{"entries": {family_key: {nfe: {order, corrector, rho, s, ...}}}, ...}``."""
    if not os.path.exists(path):
        return {"entries": {}}
    with open(path) as f:
        return json.load(f)


def power_grid(s: np.ndarray, rho: float, t_start: float, t_end: float) -> np.ndarray:
    """t = (t_end^{1/rho} + s (t_start^{1/rho} - t_end^{1/rho}))^rho for s in [0, 1] (decreasing s -> grid)."""
    s = np.asarray(s, np.float64)
    lo, hi = t_end ** (1.0 / rho), t_start ** (1.0 / rho)
    g = (lo + s * (hi - lo)) ** rho
    g[0], g[-1] = t_start, t_end
    return g


def _resample(s: np.ndarray, nfe: int) -> np.ndarray:
    x_old = np.linspace(0.0, 1.0, len(s))
    return np.interp(np.linspace(0.0, 1.0, nfe + 1), x_old, np.asarray(s, np.float64))


def gddim_defaults(sde: Any, nfe: int, t_start: float, t_end: float, table: dict | None = None) -> dict:
    """dict(order, corrector, ts (host float64 grid), source, max_gain) for ``method="gddim"`` with ``nfe``
    steps; ``max_gain`` is the eps-error gain bound the entry was tuned under (inf when none was stored, and for
    the generic rule: the bound is chosen and tuned per family; on a family whose prior is far wider than its
    data, e.g. the force-field families, 1/|w_T| is so large that guarding would pile the grid up at T)."""
    table = load_table() if table is None else table
    entries = table.get("entries", {}).get(family_key(sde), {})
    multistep = {k: v for k, v in entries.items() if "stages" not in v}
    if str(nfe) in entries:
        e = entries[str(nfe)]
        s, source = np.asarray(e["s"], np.float64), f"tuned {family_key(sde)} nfe={nfe}"
    elif multistep:
        # a single-step entry's layout belongs to its NFE: other NFEs resample the nearest multistep entry
        entries = multistep
        near = min(entries, key=lambda k: (abs(np.log(int(k) / nfe)), int(k)))
        e = entries[near]
        s, source = _resample(e["s"], nfe), f"tuned {family_key(sde)} nfe={near}, resampled to {nfe}"
    else:
        e, s, source = GENERIC, np.linspace(1.0, 0.0, nfe + 1), "generic"
    ts = power_grid(s, float(e["rho"]), t_start, t_end)
    if "stages" in e:                                # single-step: its layout and stage fractions, no order
        return dict(stages=tuple(int(x) for x in e["stages"]), fractions=tuple(tuple(f) for f in e["fractions"]),
                    ts=ts, source=source, max_gain=gain_at(e.get("max_gain"), nfe))
    order = int(min(e["order"], nfe - 1))
    corrector = int(min(e["corrector"], nfe - 1)) if e["corrector"] >= 0 else -1
    return dict(order=order, corrector=corrector, ts=ts, source=source, max_gain=gain_at(e.get("max_gain"), nfe))


def gain_at(spec: Any, nfe: int) -> float:
    """The eps-error gain bound of a stored ``max_gain``: None -> inf; a number; or {nfe: bound} -> the bound
    of the nearest stored NFE (in log NFE, the smaller on a tie)."""
    if spec is None:
        return math.inf
    if isinstance(spec, dict):
        if not spec:
            raise ValueError("an empty max_gain table: give a number or {nfe: bound}")
        near = min(spec, key=lambda k: (abs(np.log(int(k) / nfe)), int(k)))
        return gain_at(spec[near], nfe)
    return float(spec)
