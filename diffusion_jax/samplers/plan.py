r"""Sampler plans: the validated options of a method and its host-side float64 tables, cached by value.

A :class:`Plan` holds everything a sampler needs that does not depend on the network or the initial state:
the time grid and, per method, the coefficient tables (gDDIM's Psi, C_j, noise factors, m_{t'}, R_{t'};
SSCS's half-step transitions and kicks; EDM-Heun's sigma steps). Plans are cached by (family value, method,
NFE, square root, options), so a benchmark over many batches, seeds or checkpoints builds each table once.

Options are strict: an option the chosen method does not use is an error that lists the method's options.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np

from diffusion_jax.param.roots import SQUARE_ROOTS, OUTPUTS, SquareRoot, square_root
from diffusion_jax.samplers.exponential import (MAX_STAGES, check_layout, default_fractions, guard_grid,
                                                single_step_tables, step_tables)
from diffusion_jax.samplers.gddim import _psd_sqrt, gddim_coefficients
from diffusion_jax.samplers.grids import GRIDS, noise_level, time_grid
from diffusion_jax.sdes.base import Family

# method -> (solver evaluations per step, extra evaluations) for the fixed-step diffrax solvers
DIFFRAX_FIXED = {"euler": (1, 0), "heun": (2, 0), "midpoint": (2, 0), "tsit5": (6, 1)}
DIFFRAX_ADAPTIVE = ("dopri5", "tsit5_adaptive")
STOCHASTIC = ("euler_maruyama",)
MAX_GDDIM_ORDER = 3

# The options each method reads (besides the common ones); anything else is an error.
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    **{m: ("grid", "rho") for m in DIFFRAX_FIXED},
    **{m: ("rtol", "atol", "max_steps") for m in DIFFRAX_ADAPTIVE},
    "euler_maruyama": ("grid", "rho"),
    "gddim": ("grid", "rho", "order", "lam", "predict", "corrector", "max_gain", "stages", "fractions"),
    "sscs": ("grid", "rho", "lam"),
    "edm_heun": ("rho", "ode_jump"),
}
METHODS = tuple(METHOD_OPTIONS)
COMMON_OPTIONS = ("output", "K", "t_start", "t_end", "denoise_final", "return_trajectory")
DEFAULTS: dict[str, Any] = dict(grid="uniform", rho=7.0, order=1, lam=0.0, rtol=1e-5, atol=1e-5, max_steps=16384,
                                ode_jump=False, corrector=-1, max_gain=math.inf, stages=1)
PREDICTS = ("denoiser", "eps")
MAX_CORRECTOR = 4
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {"sscs": dict(lam=1.0), "edm_heun": dict(grid="edm")}


def is_stochastic(method: str, lam: float = 0.0) -> bool:
    """Whether the method draws noise (and so needs a key)."""
    return method in STOCHASTIC or (method in ("gddim", "sscs") and lam > 0)


def check_options(method: str, nfe: int | None, options: dict[str, Any]) -> dict[str, Any]:
    """The method's full option set (defaults filled in); a ValueError naming the fix for anything else."""
    if method not in METHOD_OPTIONS:
        raise ValueError(f"unknown sampling method {method!r}; choose one of {', '.join(METHODS)}")
    allowed = METHOD_OPTIONS[method]
    bad = sorted(k for k in options if k not in allowed)
    if bad:
        raise ValueError(f"{method} does not use option(s) {', '.join(bad)}; its options are "
                         f"{', '.join(allowed) or 'none'} (and {', '.join(COMMON_OPTIONS)})")
    opts = {k: DEFAULTS[k] for k in allowed if k in DEFAULTS}
    opts.update({k: v for k, v in METHOD_DEFAULTS.get(method, {}).items() if k in allowed})
    opts.update(options)
    if method in DIFFRAX_ADAPTIVE:
        if nfe is not None:
            raise ValueError(f"{method} is adaptive: its NFE follows from rtol/atol; do not pass nfe")
        if not (opts["rtol"] > 0 and opts["atol"] > 0):
            raise ValueError(f"{method}: rtol and atol must be > 0, got {opts['rtol']}, {opts['atol']}")
        if not (isinstance(opts["max_steps"], (int, np.integer)) and opts["max_steps"] >= 1):
            raise ValueError(f"{method}: max_steps must be a positive integer, got {opts['max_steps']!r}")
    elif not (isinstance(nfe, (int, np.integer)) and not isinstance(nfe, bool) and nfe >= 1):
        raise ValueError(f"nfe must be an integer >= 1 for {method}, got {nfe!r}")
    if "grid" in opts and opts["grid"] not in GRIDS:
        raise ValueError(f"unknown time grid {opts['grid']!r}; choose one of {GRIDS}")
    if "rho" in options and method != "edm_heun" and opts.get("grid") not in ("edm", "power"):
        raise ValueError("rho shapes the 'edm' and 'power' grids only: pass grid='edm' or 'power' with rho, "
                         "or drop rho")
    if "rho" in opts and not (opts["rho"] > 0):
        raise ValueError(f"rho must be > 0, got {opts['rho']}")
    if "lam" in opts and not (opts["lam"] >= 0 and math.isfinite(opts["lam"])):
        raise ValueError(f"lam must be finite and >= 0, got {opts['lam']}")
    if method == "gddim":
        # deterministic: the denoiser form by default (make_plan fills in its tuned, gain-bounded options);
        # with noise (lam > 0) the eps form, the only stochastic one
        opts.setdefault("predict", "denoiser" if opts["lam"] == 0 else "eps")
        if opts["predict"] not in PREDICTS:
            raise ValueError(f"gddim predict must be one of {PREDICTS}, got {opts['predict']!r}")
        if opts["predict"] == "denoiser" and opts["lam"] > 0:
            raise ValueError("gddim predict='denoiser' is deterministic: use predict='eps' for lam > 0")
        c = opts["corrector"]
        if not (isinstance(c, (int, np.integer)) and -1 <= c <= MAX_CORRECTOR):
            raise ValueError(f"gddim corrector must be an integer in -1..{MAX_CORRECTOR} (-1: none), got {c!r}")
        g = opts["max_gain"]
        if not (isinstance(g, (int, float, np.integer, np.floating)) and not isinstance(g, bool) and g > 0):
            raise ValueError(f"gddim max_gain must be a number > 0 (inf: no limit), got {g!r}")
        if "max_gain" in options and opts["predict"] != "denoiser":
            raise ValueError("gddim max_gain bounds the denoiser form's history weights: it needs predict='denoiser'")
        if c >= 0 and opts["predict"] != "denoiser":
            raise ValueError("the gddim corrector needs predict='denoiser' (pass corrector=-1 for predict='eps')")
        if "fractions" in options and isinstance(opts["stages"], (int, np.integer)) and opts["stages"] == 1:
            raise ValueError("fractions place the stages of a single-step gddim: pass stages > 1 with them")
        layout, fractions = _layout(nfe, opts["stages"], opts.get("fractions"))
        # multistep keeps the plain option (its static options do not depend on nfe)
        opts["stages"], opts["fractions"] = (layout, fractions) if len(layout) < nfe else (1, None)
        if len(layout) < nfe:
            if opts["predict"] != "denoiser":
                raise ValueError("single-step gddim (stages > 1) is the denoiser form: drop predict='eps' and lam")
            if "order" in options or c >= 0:
                raise ValueError("order and corrector are the multistep options: a single-step gddim (stages > 1) "
                             "takes stages (and fractions) instead")
        q = opts["order"]
        if not (isinstance(q, (int, np.integer)) and 0 <= q <= MAX_GDDIM_ORDER):
            raise ValueError(f"gddim order must be an integer in 0..{MAX_GDDIM_ORDER}, got {q!r}")
        if q > nfe - 1:
            raise ValueError(f"gddim order {q} needs {q + 1} eps values of history but nfe={nfe} "
                             f"gives only {nfe}; use order <= {nfe - 1}")
    if method in DIFFRAX_FIXED:
        per_step, extra = DIFFRAX_FIXED[method]
        if (nfe - extra) // per_step < 1:
            raise ValueError(f"{method} needs nfe >= {per_step + extra} (one step), got nfe={nfe}")
    return opts


def _layout(nfe: int, stages: Any, fractions: Any) -> tuple[tuple[int, ...], tuple[tuple[float, ...], ...]]:
    """(stages per step, stage fractions per step) of a gddim run of ``nfe`` evaluations: ``stages`` an integer S
    (steps of S evaluations, a last step of the remainder; 1 = multistep) or one count per step summing to nfe;
    ``fractions`` None (:func:`.exponential.default_fractions`) or one increasing tuple in (0, 1) per step."""
    if isinstance(stages, (int, np.integer)) and not isinstance(stages, bool):
        if not 1 <= stages <= MAX_STAGES:
            raise ValueError(f"gddim stages must be in 1..{MAX_STAGES} (1: multistep), got {stages}")
        layout = (int(stages),) * (nfe // stages) + ((nfe % stages,) if nfe % stages else ())
    else:
        try:
            layout = tuple(int(x) for x in stages)
        except TypeError as e:
            raise ValueError(f"gddim stages must be an integer or one integer per step, got {stages!r}") from e
        if sum(layout) != nfe:
            raise ValueError(f"gddim stages per step must sum to nfe={nfe}, got {layout}")
    if fractions is None:
        fr = tuple(default_fractions(x) for x in layout)
    else:
        try:
            fr = tuple(tuple(float(r) for r in f) for f in fractions)
        except TypeError as e:
            raise ValueError(f"gddim fractions must be one tuple of stage fractions per step, got {fractions!r}") from e
    check_layout(layout, fr)
    return layout, fr


def check_model(output: str, K: str | SquareRoot) -> str:
    if output not in OUTPUTS:
        raise ValueError(f"unknown model output {output!r}; choose one of {OUTPUTS}")
    kind = K.kind if isinstance(K, SquareRoot) else K
    if kind not in SQUARE_ROOTS:
        raise ValueError(f"unknown square root K={K!r}; choose one of {SQUARE_ROOTS}")
    return kind


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """A method's validated options, its time grid ``ts`` (host float64, decreasing) and its tables.

    ``nfe`` is the exact number of network evaluations of one run (None for adaptive methods, whose count
    is known after the solve); ``tables`` are host arrays passed to the compiled run as arguments; ``meta``
    the configuration a gddim run uses (order, corrector, predict, grid source, per-step orders).
    """
    method: str
    options: tuple[tuple[str, Any], ...]
    t_start: float
    t_end: float
    ts: np.ndarray
    nfe: int | None
    tables: dict[str, np.ndarray]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)   # gddim: the configuration actually used

    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.options)


def _steps_for(method: str, nfe: int, opts: dict) -> int:
    if method == "gddim" and opts.get("stages", 1) != 1:
        return len(opts["stages"])                 # single-step: one step per stage group
    if method in DIFFRAX_FIXED:
        per_step, extra = DIFFRAX_FIXED[method]
        return (nfe - extra) // per_step
    if method == "edm_heun":
        return (nfe + 1) // 2                   # N steps cost 2N - 1 evaluations (last step Euler)
    return nfe


def make_plan(sde: Family, method: str, nfe: int | None = None, K: str = "R", t_start: float | None = None,
              t_end: float | None = None, **options: Any) -> Plan:
    """The validated, cached plan of ``method`` on ``sde`` (see the module docstring)."""
    t_start = sde.T if t_start is None else float(t_start)
    t_end = sde.t_min if t_end is None else float(t_end)
    if not (0 < t_end < t_start <= sde.T):
        raise ValueError(f"need 0 < t_end < t_start <= T={sde.T}, got t_end={t_end}, t_start={t_start}")
    if method == "gddim" and options.get("lam", 0.0) == 0 and options.get("predict", "denoiser") == "denoiser" \
            and isinstance(nfe, (int, np.integer)) and nfe >= 1:
        # the default: the denoiser form, options left unset taking the best configuration measured on exact
        # scores under the eps-error gain bound for the family and NFE (defaults.py, bench-solvers --tune)
        from diffusion_jax.samplers.defaults import gddim_defaults
        cfg = gddim_defaults(sde, int(nfe), t_start, t_end)
        options = dict(options)
        options["predict"] = "denoiser"
        chosen = {"order", "corrector", "stages", "fractions"} & set(options)
        if cfg.get("stages") is not None and not chosen:          # a tuned single-step entry
            options.update(stages=cfg["stages"], fractions=cfg["fractions"])
        elif options.get("stages", 1) == 1 and "fractions" not in options:
            # (a multistep choice where the table's entry is single-step: the plain multistep defaults)
            options.setdefault("order", cfg.get("order", DEFAULTS["order"]))
            options.setdefault("corrector", cfg.get("corrector", DEFAULTS["corrector"]))
        options.setdefault("max_gain", cfg["max_gain"])
        if "grid" not in options and "rho" not in options:
            if chosen and (cfg.get("stages") is not None or options.get("stages", 1) != 1):
                # a layout other than the table's: its steps on a power grid (the table's grid has its own length)
                options.update(grid="power", rho=3.0)
            else:
                options["grid"] = "tuned"
    tuned = options.get("grid") == "tuned"
    opts = check_options(method, nfe, {k: v for k, v in options.items() if not (tuned and k == "grid")})
    if tuned:
        opts["grid"] = "tuned"
    return _plan(sde, method, None if nfe is None else int(nfe), K, t_start, t_end, tuple(sorted(opts.items())))


@functools.lru_cache(maxsize=256)
def _plan(sde: Family, method: str, nfe: int | None, kind: str, t_start: float, t_end: float,
          options: tuple) -> Plan:
    opts = dict(options)
    if method in DIFFRAX_ADAPTIVE:
        ts = np.linspace(t_start, t_end, 33)                     # save points of a returned trajectory
        return Plan(method, options, t_start, t_end, ts, None, {"ts": ts}, {})
    n = _steps_for(method, nfe, opts)
    meta: dict[str, Any] = {}
    if opts.get("grid") == "tuned":
        from diffusion_jax.samplers.defaults import gddim_defaults
        cfg = gddim_defaults(sde, nfe, t_start, t_end)
        ts, meta["grid"] = cfg["ts"], cfg["source"]
    else:
        ts = time_grid(sde, n, opts.get("grid", "edm"), t_start, t_end, opts.get("rho", 7.0))
    if method == "gddim" and math.isfinite(opts.get("max_gain", math.inf)):
        # every step's eps-error gain within the bound, whichever grid (the tuned one already is, on [1e-3, T])
        ts = guard_grid(sde, square_root(sde, "R"), ts, float(opts["max_gain"]))
        meta["grid"] = f"{meta.get('grid', opts['grid'])}, steps guarded to eps gain <= {opts['max_gain']:g}"
    tables: dict[str, np.ndarray] = {"ts": ts}
    if method in DIFFRAX_FIXED:
        per_step, extra = DIFFRAX_FIXED[method]
        count = per_step * n + extra
    elif method == "euler_maruyama":
        count = n
    elif method == "gddim" and opts["stages"] != 1:
        tab = dict(single_step_tables(sde, square_root(sde, "R"), tuple(float(t) for t in ts), opts["stages"],
                                      opts["fractions"], K=square_root(sde, kind)))
        meta.update(stages=opts["stages"], fractions=opts["fractions"], predict="denoiser",
                    max_gain=float(opts["max_gain"]), steps=ts, gains=tab.pop("gain"), stage_index=tab.pop("stages"))
        meta.setdefault("grid", opts["grid"])
        # the plan's times are the evaluation times (and t_end): the trajectory holds the state at each of them
        ts = np.append(tab.pop("evals"), ts[-1])
        tables.update(tab, ts=ts)
        count = nfe
    elif method == "gddim" and opts["predict"] == "denoiser":
        gain = float(opts["max_gain"])
        tab = step_tables(sde, square_root(sde, "R"), tuple(float(t) for t in ts), opts["order"], opts["corrector"],
                          K=square_root(sde, kind), max_gain=None if math.isinf(gain) else gain)
        meta.update(order=opts["order"], corrector=opts["corrector"], predict="denoiser", max_gain=gain,
                    orders=tab.pop("orders"), correctors=tab.pop("correctors"))
        meta.setdefault("grid", opts["grid"])
        tables.update(tab)
        count = n
    elif method == "gddim":
        meta.update(order=opts["order"], corrector=-1, predict="eps", grid=opts["grid"])
        c = gddim_coefficients(sde, square_root(sde, kind), tuple(float(t) for t in ts), opts["order"],
                               float(opts["lam"]))
        tables.update(c)
        count = n
    elif method == "sscs":
        tables.update(_sscs_tables(sde, ts, float(opts["lam"])))
        count = n
    else:                                                       # edm_heun
        sig = noise_level(sde, ts)
        # dt/dsigma at the nodes by a centred float64 difference of the exact noise level
        h = 1e-6 * ts
        hi = np.minimum(ts + h, sde.T)
        dt_dsig = 1.0 / ((noise_level(sde, hi) - noise_level(sde, ts - h)) / (hi - (ts - h)))
        tables.update(dsig=np.diff(sig), j0=dt_dsig[:-1], j1=dt_dsig[1:])
        count = 2 * n - 1
    return Plan(method, options, t_start, t_end, ts, count, tables, meta)


def _sscs_tables(sde: Family, ts: np.ndarray, lam: float) -> dict[str, np.ndarray]:
    """Strang splitting: exact linear half-steps (with their noise) around an Euler step of the score part
    du = -(1 + lam^2)/2 G G^T s dt at the step midpoint."""
    n = len(ts) - 1
    mids = 0.5 * (ts[:-1] + ts[1:])
    return dict(
        mids=mids,
        half1=np.stack([sde.transition_np(t=mids[i], s=ts[i]) for i in range(n)]),
        half2=np.stack([sde.transition_np(t=ts[i + 1], s=mids[i]) for i in range(n)]),
        nz1=np.stack([_psd_sqrt(lam ** 2 * sde.reverse_covariance_np(mids[i], ts[i])) for i in range(n)]),
        nz2=np.stack([_psd_sqrt(lam ** 2 * sde.reverse_covariance_np(ts[i + 1], mids[i])) for i in range(n)]),
        kick=np.stack([0.5 * (1 + lam ** 2) * (ts[i] - ts[i + 1]) * sde.noise_matrix_np(mids[i]) for i in range(n)]))
