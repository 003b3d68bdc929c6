r"""Samplers for every family: :func:`sample` (the front door) and :func:`compile` (a compiled handle).

A sampler integrates the reverse process from ``t_start`` (T) down to ``t_end`` from an explicit initial state
``u_init`` of shape (batch, *data, k) (draw one with :func:`prior_init`). The network enters as a function of
its parameters, ``apply(params, u, t_batch)``, returning eps (w.r.t. ``K``), the score or the denoiser
(``output``). Plan and run are apart:

* the **plan** (time grid, float64 coefficient tables) is computed on the host once per (family value, method,
  NFE, options) and cached (:mod:`.plan`);
* the **run** is a pure function of ``(params, u_init, key)`` compiled once per (method, static options,
  shapes) (:mod:`.run`); a new checkpoint, EMA copy, batch of noise or key does not recompile, and no weights
  are lowered as constants. Inputs laid out over a device mesh keep their sharding (batch-parallel sampling).

``draw = compile(sde, apply, method="gddim", nfe=20)`` returns a handle, ``draw(params, u0, key)`` a
:class:`SampleResult`; it can be called inside user ``jit`` / ``vmap`` code. ``sample(sde, fn, u0, ...)``
takes ``fn(u, t)`` (or ``fn(params, u, t)`` with ``params=``) and returns ``(u_final, SampleInfo)``.

Methods and their options (anything else is an error naming these):

* ``euler``, ``heun``, ``midpoint``, ``tsit5``: diffrax, fixed steps on the time grid (``grid``, ``rho``);
* ``dopri5``, ``tsit5_adaptive``: diffrax with a PID controller (``rtol``, ``atol``, ``max_steps``; no ``nfe``);
* ``euler_maruyama``: the reverse SDE (``grid``, ``rho``; needs a key);
* ``gddim``: exponential integrator, multistep ``order`` q = 0..3. Deterministic, by default, in the denoiser
  (``predict="denoiser"``, the matrix analogue of DPM-Solver++ multistep with an optional ``corrector`` at no
  extra evaluation, :mod:`.exponential`): the options left unset (order, corrector, grid, ``max_gain``) take the
  configuration measured best on exact scores *under an eps-error gain bound* for the family and NFE
  (:mod:`.defaults`, ``bench-solvers --tune``; a family never tuned gets a generic power grid, unbounded). The
  bound ``max_gain`` (stored with each entry) caps how much a step multiplies a learned network's eps error
  (D = w^T(K^{-1}u - eps)/|w|^2 carries it times 1/|w_t|, ~250 at T for CLD): the grid's steps are shortened
  (:func:`.exponential.guard_grid`) and each step's order lowered (:func:`.exponential.step_tables`) until
  every gain is within it; the tuner measures every candidate that way,
  so the stored grid is the best bounded one (unbounded, the tuned grids diverged with learned networks).
  ``max_gain=inf`` lifts it. ``stages`` = 2 or 3 (or one count per step) gives the single-step exponential
  Runge-Kutta method instead (:func:`.exponential.single_step_tables`, stage ``fractions`` in log t), on a
  power grid with exponent 3 unless ``grid`` is chosen; ``info.config["gains"]`` reports its stage weights' eps-error
  gains (the bound guards its steps only). The eps form (``predict="eps"``, :mod:`.gddim`; order 1 on the uniform grid unless
  chosen) is the one used with noise (``lam`` > 0);
* ``sscs``: symmetric splitting, exact linear half-steps around an Euler score step (``lam``, default 1);
* ``edm_heun``: Karras et al.'s Heun in sigma(t) on the EDM grid (``rho``, ``ode_jump``).

Common options: ``output`` ("eps", "score", "denoiser"), ``K`` ("R" or "L"), ``t_start``, ``t_end``,
``denoise_final`` (end on D(u, t_end), one more evaluation), ``return_trajectory``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from diffusion_jax.param.convert import with_params
from diffusion_jax.param.roots import SquareRoot
from diffusion_jax.samplers.grids import GRIDS, noise_level, time_grid
from diffusion_jax.samplers.plan import (COMMON_OPTIONS, DIFFRAX_ADAPTIVE, DIFFRAX_FIXED, MAX_GDDIM_ORDER,
                                         METHOD_OPTIONS, METHODS, STOCHASTIC, Plan, check_model, is_stochastic,
                                         make_plan)
from diffusion_jax.samplers.run import runner
from diffusion_jax.sdes.base import Family

Array = Any


class SampleResult(NamedTuple):
    """What a compiled handle returns (a pytree): the final state, and with ``return_trajectory`` the states
    at the grid times (N+1, batch, *data, k) and the denoiser outputs along them (N or N+1, batch, *data).

    ``stats`` holds (accepted steps, rejected steps, success) for adaptive methods, () otherwise."""
    u: Array
    trajectory: Array | None
    denoised: Array | None
    stats: tuple


class SampleInfo(NamedTuple):
    """What :func:`sample` returns beside the final state; the same fields for every method.

    nfe: exact network evaluations (the final denoising step included); ts: the time grid (host float64);
    trajectory / denoised: as in :class:`SampleResult` (None unless ``return_trajectory``); denoised_ts: the
    times of ``denoised`` (the grid, or SSCS's step midpoints); nfe_analysis: extra evaluations spent on
    ``denoised`` (diffrax methods evaluate it after the solve); steps / rejected: adaptive step counts (else None);
    config: gddim's configuration as run (order, corrector, predict, grid source, per-step orders), else None.
    """
    nfe: int
    ts: np.ndarray
    trajectory: Array | None
    denoised: Array | None
    denoised_ts: np.ndarray | None
    nfe_analysis: int
    steps: int | None
    rejected: int | None
    config: dict | None = None


def prior_init(sde: Family, key: Array, batch: int, data_shape: tuple[int, ...]) -> Array:
    """An initial state u_T ~ prior, shape (batch, *data_shape, k)."""
    return sde.prior_sample(key, (batch,) + tuple(data_shape))


@functools.lru_cache(maxsize=128)
def _jitted(sde: Family, apply: Callable, method: str, options: tuple, output: str, kind: str, t_start: float,
            t_end: float, denoise_final: bool, return_trajectory: bool) -> Callable:
    run = runner(sde, apply, method, options, output, kind, t_start, t_end, denoise_final, return_trajectory)
    run.__name__ = run.__qualname__ = f"sampler_{method}"     # the name in compile logs
    return jax.jit(run)


class Sampler:
    """A compiled sampler handle: ``draw(params, u0, key=None) -> SampleResult`` (see :func:`compile`)."""

    def __init__(self, sde: Family, apply: Callable, plan: Plan, output: str, kind: str, denoise_final: bool,
                 return_trajectory: bool):
        self.sde, self.apply, self.plan = sde, apply, plan
        self.output, self.kind = output, kind
        self.denoise_final, self.return_trajectory = denoise_final, return_trajectory
        self.stochastic = is_stochastic(plan.method, plan.opts.get("lam", 0.0))
        self._fn = _jitted(sde, apply, plan.method, plan.options, output, kind, plan.t_start, plan.t_end,
                           denoise_final, return_trajectory)
        self._checked: set = set()

    @property
    def method(self) -> str:
        return self.plan.method

    @property
    def ts(self) -> np.ndarray:
        return self.plan.ts

    @property
    def nfe(self) -> int | None:
        """Exact network evaluations of one call (None for adaptive methods: see ``SampleResult.stats``)."""
        if self.plan.nfe is None:
            return None
        return self.plan.nfe + int(self.denoise_final)

    def check(self, params: Any, u0: Array) -> None:
        """Shape checks of the state and of the network output (abstract evaluation, nothing compiles)."""
        sig = (tuple(u0.shape), str(u0.dtype))
        if sig in self._checked:
            return
        sde = self.sde
        if u0.ndim < 2 or u0.shape[-1] != sde.order:
            raise ValueError(f"u_init must have shape (batch, *data, k={sde.order}), got {tuple(u0.shape)}")
        if sde.data_shape is not None and tuple(u0.shape[1:-1]) != tuple(sde.data_shape):
            raise ValueError(f"{sde.name} was built for data of shape {tuple(sde.data_shape)}, u_init has "
                             f"{tuple(u0.shape[1:-1])}")
        expected = tuple(u0.shape[:-1]) if self.output == "denoiser" else tuple(u0.shape)
        out = jax.eval_shape(self.apply, params, jax.ShapeDtypeStruct(u0.shape, u0.dtype),
                             jax.ShapeDtypeStruct(u0.shape[:1], u0.dtype))
        if tuple(out.shape) != expected:
            raise ValueError(f"the network returned shape {tuple(out.shape)}, expected {expected} for "
                             f"output={self.output!r} (state shape {tuple(u0.shape)})")
        self._checked.add(sig)

    def __call__(self, params: Any, u0: Array, key: Array | None = None) -> SampleResult:
        self.check(params, u0)
        if key is None:
            if self.stochastic:
                raise ValueError(f"{self.method} with noise needs a PRNG key: pass key=jax.random.key(...)")
            key = jax.random.key(0)                 # unused by deterministic methods
        u, traj, den, stats = self._fn(params, u0, key, self.plan.tables)
        return SampleResult(u, traj, den, stats)

    def lower(self, params: Any, u0: Array, key: Array | None = None):
        """``jax.jit(...).lower`` of the run (e.g. to inspect the StableHLO text and its size)."""
        return self._fn.lower(params, u0, jax.random.key(0) if key is None else key, self.plan.tables)


def compile(sde: Family, apply: Callable, *, method: str, nfe: int | None = None, output: str = "eps",
            K: str | SquareRoot = "R", t_start: float | None = None, t_end: float | None = None,
            denoise_final: bool = False, return_trajectory: bool = False, **options: Any) -> Sampler:
    """A compiled sampler handle for ``apply(params, u, t_batch)``; see the module docstring.

    Everything is validated here, before anything compiles; the first call with a new state shape compiles.
    """
    if not callable(apply):
        raise ValueError(f"apply must be a function apply(params, u, t), got {type(apply).__name__}")
    kind = check_model(output, K)
    plan = make_plan(sde, method, nfe, kind, t_start, t_end, **options)
    if sde.deterministic_only and is_stochastic(method, plan.opts.get("lam", 0.0)):
        raise ValueError(f"{sde.name} is sampled by its probability-flow ODE only (a force-field ODE model: its "
                         f"training noise is not Gaussian), so {method} with noise does not apply; use an ODE method "
                         f"(edm_heun, heun, euler, dopri5, ...) or gddim / sscs with lam=0")
    return Sampler(sde, apply, plan, output, kind, bool(denoise_final), bool(return_trajectory))


def sample(sde: Family, fn: Callable, u_init: Array, *, method: str, nfe: int | None = None,
           params: Any = None, key: Array | None = None, **options: Any) -> tuple[Array, SampleInfo]:
    """Sample from ``u_init`` at ``t_start`` down to ``t_end``; returns (u_final, :class:`SampleInfo`).

    ``fn(u, t_batch)``, or ``fn(params, u, t_batch)`` when ``params`` is given (the form that compiles once
    across checkpoints). Options as in the module docstring.
    """
    apply = fn if params is not None else with_params(fn)
    draw = compile(sde, apply, method=method, nfe=nfe, **options)
    res = draw(params, u_init, key)
    plan = draw.plan
    steps = rejected = None
    nfe_done = draw.nfe
    if method in DIFFRAX_ADAPTIVE:
        n_acc, n_rej, ok = (int(res.stats[0]), int(res.stats[1]), bool(res.stats[2]))
        if not ok:
            raise RuntimeError(f"{method} did not reach t_end (raise max_steps or loosen rtol/atol)")
        steps, rejected = n_acc, n_rej
        # FSAL Runge-Kutta: one evaluation at the start, then 6 new stages per attempted step.
        nfe_done = 1 + 6 * (n_acc + n_rej) + int(draw.denoise_final)
    traj = res.trajectory
    den_ts = None
    nfe_analysis = 0
    if traj is not None:
        den_ts = plan.tables["mids"] if method == "sscs" else (plan.ts if method in DIFFRAX_ADAPTIVE
                                                                else plan.ts[:len(res.denoised)])
        if method in DIFFRAX_FIXED or method in DIFFRAX_ADAPTIVE or method == "euler_maruyama":
            nfe_analysis = len(plan.ts)
    return res.u, SampleInfo(nfe_done, plan.ts, traj, res.denoised, den_ts, nfe_analysis, steps, rejected,
                             dict(plan.meta) if plan.meta else None)


__all__ = ["sample", "compile", "Sampler", "SampleResult", "SampleInfo", "prior_init", "time_grid", "noise_level",
           "METHODS", "METHOD_OPTIONS", "COMMON_OPTIONS", "GRIDS", "STOCHASTIC", "DIFFRAX_FIXED",
           "DIFFRAX_ADAPTIVE", "MAX_GDDIM_ORDER"]
