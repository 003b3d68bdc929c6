r"""Exponential integrators in the denoiser (data prediction) for any linear family: multistep with an
optional predictor-corrector (``gddim`` with ``predict="denoiser"``), and single-step exponential Runge-Kutta
(``gddim`` with ``stages`` = 2 or 3, :func:`single_step_tables`). Both run in one compiled loop
(:func:`multistep_scan`): a row's update starts from a base evaluation, the current one (multistep) or the first
stage of the step (single-step).

Write the probability-flow ODE with the denoiser D = E[x_0 | u] (per data dimension, u = m_t D + R_t eps):

    du/dt = F u - 1/2 G G^T s = M_t u + b_t D,   M_t = F + 1/2 G G^T Sigma_t^{-1},  b_t = -1/2 G G^T Sigma_t^{-1} m_t.

R_t solves dR/dt = M_t R, so the transition of M is Phi_M(t', tau) = R_{t'} R_tau^{-1} and, exactly,

    u(t') = A u(t) + int_t^{t'} Phi_M(t', tau) b_tau D(tau) dtau,    A = R_{t'} R_t^{-1}.

Since d/dtau [Phi_M(t', tau) m_tau] = Phi_M(t', tau) (F - M_tau) m_tau = Phi_M(t', tau) b_tau, with
P(tau) = R_{t'} R_tau^{-1} m_tau and D replaced by its Lagrange polynomial sum_j l_j(tau) D_j through the
last q + 1 values (in a chosen interpolation variable v(tau)), integration by parts gives vectors

    E_j = l_j(t') m_{t'} - l_j(t) P(t) - int_t^{t'} P(tau) l_j'(tau) dtau,     u(t') = A u(t) + sum_j E_j D_j,

with sum_j E_j = m_{t'} - A m_t exactly: when D is constant (a single data point) every step is exact
(u = m_t x + R_t eps  ->  R_{t'} eps + m_{t'} x), whatever the quadrature or the step size.

This is the non-isotropic analogue of DPM-Solver++ (multistep, data prediction): the family's M replaces
the scalar log-SNR drift. Float32: the E_j are bounded vectors and D_j - D_0 carries the rounding of an
O(1) quantity; A expands some directions (entries up to 1e6 for CD-HOLD n = 4 on the last steps), so it is
never applied to a float32 state, and eps, D are formed from a carried representation u = m_t c + R_t z
rather than by R^{-1} from u (:func:`step_tables`, :func:`diffusion_jax.param.convert.carried_tables`).

Predictor-corrector (``corrector=True``, UniPC's idea with the family's matrices): after the predictor
reaches t_{i+1} and D is evaluated there (the evaluation the next step needs anyway), the step
t_i -> t_{i+1} is redone with the interpolant through (t_{i+1}, t_i, ..., t_{i-q+1}) (q + 1 nodes that
include the new point); the next step starts from the corrected state but reuses the D evaluated at the
predicted one. No extra evaluation; the last step is not corrected.

Coefficients are computed once per grid on the host in float64 (Gauss-Legendre in log tau) and cached.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from diffusion_jax.param import SquareRoot
from diffusion_jax.param.convert import carried_tables
from diffusion_jax.samplers.gddim import _lagrange, _lagrange_deriv

Array = Any
_GL_NODES = 32
MAX_WEIGHT = 1e3
# (the gain bound of the defaults is stored with the tuned table: samplers/tuned_grids.json, setup.max_gain)
INTERP_VARIABLES = ("t", "logt", "lambda")
# the float arrays of :func:`step_tables` that the compiled loop reads, one row per step
SCAN_KEYS = ("t", "new", "m_next", "b", "v", "g", "zv", "w", "w_hat", "kz", "kt", "s_inv")
MAX_STAGES = 3




def _variable(sde, kind: str):
    """The interpolation variable v(tau) and dv/dtau (host float64)."""
    if kind == "t":
        return (lambda t: np.asarray(t, np.float64)), (lambda t: np.ones_like(np.asarray(t, np.float64)))
    if not isinstance(kind, str):                       # v = tau^kind (kind > 0)
        return (lambda t: np.asarray(t, np.float64) ** kind), (lambda t: kind * np.asarray(t, np.float64) ** (kind - 1))
    if kind == "logt":
        return (lambda t: np.log(t)), (lambda t: 1.0 / np.asarray(t, np.float64))

    # lambda = log noise level (half the negative log-SNR of the data coordinate)
    def lam(t):
        t = np.atleast_1d(np.asarray(t, np.float64))
        return np.log(sde.noise_level_np(t))

    def dlam(t):
        t = np.atleast_1d(np.asarray(t, np.float64))
        h = 1e-5 * t
        return (lam(t + h) - lam(t - h)) / (2 * h)
    return lam, dlam


def _solve_vec(r: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.linalg.solve(r, v[..., None])[..., 0]


@functools.lru_cache(maxsize=4096)
def _p_step(sde, sqrt: SquareRoot, t: float, t_next: float) -> dict:
    """One step t -> t': A = R_{t'} R_t^{-1}, P(t), P at the Gauss-Legendre nodes (in log tau) and their weights,
    m_{t'}."""
    gl_x, gl_w = np.polynomial.legendre.leggauss(_GL_NODES)
    r_t, r_n = sqrt.np(t), sqrt.np(t_next)
    m_of = lambda x: sde.transition_np(t=x, s=0.0)[..., :, 0]
    lo, hi = np.log(t_next), np.log(t)
    taus = np.exp(0.5 * (hi - lo) * gl_x + 0.5 * (hi + lo))
    return dict(a=np.linalg.solve(np.swapaxes(r_t, -1, -2), np.swapaxes(r_n, -1, -2)).swapaxes(-1, -2),
                p_t=(r_n @ _solve_vec(r_t, m_of(t))[..., None])[..., 0], taus=taus,
                wts=0.5 * (hi - lo) * gl_w * taus, m_next=m_of(t_next),
                p_vals=(r_n @ _solve_vec(sqrt.np(taus), m_of(taus))[..., None])[..., 0])   # all nodes at once


def _weights(sde, sqrt: SquareRoot, t: float, t_next: float, nodes: np.ndarray, variable) -> np.ndarray:
    r"""E_j (J, k) of the step t -> t' with D replaced by its Lagrange interpolant through the node times
    (in the variable v): E_j = l_j(t') m_{t'} - l_j(t) P(t) - int_t^{t'} P(tau) l_j'(tau) dtau."""
    ps = _p_step(sde, sqrt, float(t), float(t_next))
    v_of, dv_of = _variable(sde, variable)
    vn = v_of(np.asarray(nodes, np.float64))
    out = np.zeros((len(vn),) + ps["m_next"].shape)
    if len(vn) > 1:
        taus = ps["taus"]
        dv, v_taus = dv_of(taus), v_of(taus)
    for j in range(len(vn)):
        lj_next = _lagrange(vn, j, v_of(np.array([t_next])))[0]
        lj_t = _lagrange(vn, j, v_of(np.array([t])))[0]
        integral = 0.0
        if len(vn) > 1:
            # int_t^{t'} P l_j' dtau = -int_{t'}^{t} P (dl_j/dv)(dv/dtau) dtau
            integral = -np.tensordot(ps["wts"] * dv * _lagrange_deriv(vn, j, v_taus), ps["p_vals"], axes=1)
        out[j] = lj_next * ps["m_next"] - lj_t * ps["p_t"] - integral
    return out


@functools.lru_cache(maxsize=64)
def denoiser_coefficients(sde, sqrt: SquareRoot, grid: tuple[float, ...], order: int, corrector: int = -1,
                          variable: str = "logt") -> dict[str, np.ndarray]:
    """Host float64 tables for the decreasing ``grid`` (N steps) and multistep ``order`` q:

    ``a`` (N, k, k) = R_{t_{i+1}} R_{t_i}^{-1}; ``e`` (N, q+1, k): E[i, j] multiplies D at grid[i - j]
    (slots beyond the available history are zero); with ``corrector`` = c >= 0: ``ec`` (N, c+1, k),
    Ec[i, j] multiplies D at grid[i + 1 - j] in the corrected step t_i -> t_{i+1} (interpolant of degree c
    through the new point and the c latest old ones; c = q + 1 raises the order by one). A modal family's tables carry
    its ``mode_shape`` before the last (k) or (k, k) axes.
    """
    if isinstance(variable, str) and variable not in INTERP_VARIABLES:
        raise ValueError(f"unknown interpolation variable {variable!r}; choose one of {INTERP_VARIABLES}")
    ts = np.asarray(grid, np.float64)
    n = len(ts) - 1
    kshape = sde.transition_np(t=ts[0], s=0.0)[..., :, 0].shape
    a = np.stack([_p_step(sde, sqrt, float(ts[i]), float(ts[i + 1]))["a"] for i in range(n)])
    e = np.zeros((n, order + 1) + kshape)
    ec = np.zeros((n, max(corrector, 0) + 1) + kshape)

    def coeffs(i: int, nodes_idx: list[int]) -> np.ndarray:
        return _weights(sde, sqrt, ts[i], ts[i + 1], ts[nodes_idx], variable)

    for i in range(n):
        q = min(order, i)
        e[i, :q + 1] = coeffs(i, list(range(i, i - q - 1, -1)))
        if corrector >= 0 and i < n - 1:
            qc = min(corrector, i + 1)
            ec[i, :qc + 1] = coeffs(i, list(range(i + 1, i - qc, -1)))
    return dict(a=a, e=e, ec=ec)


def eps_gain(sde, sqrt: SquareRoot, t: float) -> np.ndarray:
    r"""1 / |w_t| with w_t = R_t^{-1} m_t: the size of the change of D = w^T (R^{-1} u - eps) / |w|^2 per unit
    change of eps (the same for any square root K = R U, U orthogonal). It is large at t ~ T, where m_t -> 0
    (1/|w| ~ 250 at T for CLD, 150 for VP): there a learned network's D is its eps error magnified that much."""
    m = sde.transition_np(t=t, s=0.0)[..., :, 0]
    return 1.0 / np.linalg.norm(_solve_vec(sqrt.np(t), m), axis=-1)


def step_gain(sde, sqrt: SquareRoot, t: float, t_next: float) -> float:
    """|m_{t'}| / |w_t|: how far the order-0 (DDIM) step t -> t' moves u per unit eps error (largest over modes)."""
    m = sde.transition_np(t=t_next, s=0.0)[..., :, 0]
    return float(np.max(np.linalg.norm(m, axis=-1) * eps_gain(sde, sqrt, t)))


def guard_grid(sde, sqrt: SquareRoot, ts: np.ndarray, max_gain: float) -> np.ndarray:
    r"""The grid with every step's own eps-error gain (:func:`step_gain`) at most ``max_gain``, same length.

    Grids tuned on exact scores take a huge first step (CLD NFE 5: T = 1 -> 0.13, a gain of 183), harmless
    when the score is exact and ruinous for a learned one: D(T) is the network's eps error times 1/|w_T| ~ 250.
    Walking from T, a step whose gain is too large is shortened to the t' where the gain equals ``max_gain``
    (bisection; m_t grows as t falls) and the later nodes keep their relative place in log t between the new
    node and t_end. The last step is never moved (its gain is tiny: |w| is large at small t).
    """
    ts = np.array(ts, np.float64)
    n = len(ts) - 1
    for i in range(n - 1):
        if step_gain(sde, sqrt, ts[i], ts[i + 1]) <= max_gain:
            continue
        lo, hi = ts[i + 1], ts[i]                       # gain(lo) > max_gain >= gain(hi) = |m_t| / |w_t| ~ sigma_t
        for _ in range(60):
            mid = np.sqrt(lo * hi)
            if step_gain(sde, sqrt, ts[i], mid) > max_gain:
                lo = mid
            else:
                hi = mid
        old, t_end = ts[i + 1], ts[-1]
        frac = (np.log(ts[i + 2:n]) - np.log(t_end)) / (np.log(old) - np.log(t_end))
        ts[i + 1] = hi
        ts[i + 2:n] = np.exp(np.log(t_end) + frac * (np.log(hi) - np.log(t_end)))
    return ts


def step_tables(sde, sqrt: SquareRoot, grid: tuple[float, ...], order: int, corrector: int = -1,
                variable: str = "t", K: SquareRoot | None = None, max_weight: float = MAX_WEIGHT,
                max_gain: float | None = None) -> dict[str, np.ndarray]:
    r"""Per-step tables for :func:`multistep_step` (row i serves the step grid[i] -> grid[i+1]).

    The step is evaluated as  u_{i+1} = m_{i+1} D_i + R_{i+1} eps_i + sum_{j >= 1} V_ij (D_{i-j} - D_i)  with
    eps_i w.r.t. R and the vectors V_ij collecting, in float64, the predictor weights E_i and, with a corrector,
    the transport A_i (Ec_{i-1} - E_{i-1}) of the previous step's correction (whose D differences are known by
    then). A constant D cancels exactly and no float32 state is ever multiplied by A_i = R_{i+1} R_i^{-1}, whose
    entries reach 1e5 (CD-HOLD n = 4) to 1e8 (n = 6) on the last steps to t = 1e-3 (a backward transition of
    the denoising flow expands some directions). The corrected state at grid[i] (for the trajectory only) is
    u_i + sum_{j >= 1} G_ij (D_{i-j} - D_i).

    Float32 safety. (1) eps and D come from the model relative to the carried representation
    u_i = m_i c_i + R_i z_i (:func:`diffusion_jax.param.convert.carried_tables`): c_{i+1} = D_i,
    z_{i+1} = eps_i + sum_j (R_{i+1}^{-1} V_ij) (D_{i-j} - D_i), so the float32 state's rounding is never
    multiplied by R^{-1}. (2) D differences carry rounding ~1e-7 |D|, so each step lowers its order (and then
    its corrector) until every |V_ij| <= ``max_weight``; this only bites on the last steps, where D no longer
    moves. Keys: ``t`` (N,), ``m_next`` (N, k), ``b`` (N, k, k) = R_{i+1}, ``v`` (N, H, k), ``zv`` (N, H, k)
    = R_{i+1}^{-1} V, ``g`` (N, H, k), the carried conversions at grid[i] (``w``, ``w_hat``, ``kz``, ``kt``,
    ``s_inv``), ``orders`` (N,) and ``correctors`` (N,) (the degrees used: correction of step i - 1 applied
    at row i).

    Learned networks (``max_gain``): D_j carries the network's eps error times 1/|w_j| (:func:`eps_gain`), so the
    multistep terms move u_{i+1} by sum_j |V_ij| / |w_{i-j}| per unit eps error, where the order-0 step (DDIM,
    no history) moves it by |m_{i+1}| / |w_i| (:func:`guard_grid` bounds that one). Each step also lowers its
    order (then its corrector) until the first is at most ``max_gain``: a D from a much noisier time (the first
    steps from t ~ T, where 1/|w| ~ 1e2) is not extrapolated with a weight that multiplies its error. With an
    exact score this only costs accuracy; with a trained one it removes the multistep part of the divergence
    of notebook 03's CLD model. ``None`` (the default) turns it off.
    """
    ts = np.asarray(grid, np.float64)
    n = len(ts) - 1
    K = sqrt if K is None else K
    rs = list(sqrt.np(ts))
    ms = list(sde.transition_np(t=ts, s=0.0)[..., :, 0])
    kshape = ms[0].shape
    # history: D_i .. D_{i-order}, and with a corrector also the previous step's order + 1 slots after slot 0
    n_hist = max(order + 1 + (corrector >= 0), corrector + 2, 1)
    b = np.stack(rs[1:])
    gains = np.stack([eps_gain(sde, sqrt, t) for t in ts])                 # (N + 1, *mode_shape)
    v = np.zeros((n, n_hist) + kshape)
    g = np.zeros((n, n_hist) + kshape)
    orders = np.zeros(n, np.int64)
    correctors = np.full(n, -1, np.int64)
    tabs = {}

    def coeffs(q, c):
        if (q, c) not in tabs:
            tabs[(q, c)] = denoiser_coefficients(sde, sqrt, grid, q, c, variable)
        return tabs[(q, c)]

    for i in range(n):
        q, c = min(order, i), (min(corrector, i) if i > 0 else -1)
        while True:
            vi, gi = np.zeros((n_hist,) + kshape), np.zeros((n_hist,) + kshape)
            tab = coeffs(q, c if c >= 0 else -1)
            vi[:q + 1] += tab["e"][i, :q + 1]
            if c >= 0:
                ec, e_prev = tab["ec"][i - 1, :c + 1], tab["e"][i - 1]
                q_prev = int(orders[i - 1])
                e_prev = coeffs(q_prev, -1)["e"][i - 1, :q_prev + 1]
                gi[:c + 1] += ec
                gi[1:q_prev + 2] -= e_prev
                vi += (tab["a"][i] @ gi[..., None])[..., 0]
            vi[0] = 0.0                                   # slot 0 is D_i itself: implied by the differences
            gi[0] = 0.0
            ok = np.abs(vi).max() <= max_weight
            if ok and max_gain is not None:
                # eps-error gain of the history terms against the order-0 step's own, per mode
                ok = bool(np.all(_history_gain(vi, gains[[max(i - j, 0) for j in range(n_hist)]]) <= max_gain))
            if ok or (q == 0 and c < 0):
                break
            if c >= 0:
                c -= 1
            else:
                q -= 1
        v[i], g[i], orders[i], correctors[i] = vi, gi, q, c
    zv = np.stack([np.linalg.solve(rs[i + 1], v[i][..., None])[..., 0] for i in range(n)])
    return dict(t=ts[:n], new=np.ones(n), m_next=np.stack(ms[1:]), b=b, v=v, zv=zv, g=g, orders=orders,
                correctors=correctors, **carried_tables(sde, sqrt, K, ts[:n]))


def _history_gain(v: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """sum_j |V_j| / |w_j| per mode: how far the D-difference terms of one row move u per unit eps error
    (``gains``: :func:`eps_gain` at the time of each history slot)."""
    return sum(np.linalg.norm(v[j], axis=-1) * gains[j] for j in range(v.shape[0]))


def stage_times(t: float, t_next: float, fractions) -> list[float]:
    """The evaluation times of one single-step step t -> t': t and t (t'/t)^r for each stage fraction r
    (geometric in t: a fraction r of the step in log t)."""
    return [float(t)] + [float(np.exp(np.log(t) + r * (np.log(t_next) - np.log(t)))) for r in fractions]


def default_fractions(stages: int) -> tuple[float, ...]:
    """Stage fractions (in log t) of an untuned ``stages``-stage step: 1/2 for 2 stages, 1/3 and 2/3 for 3 (the
    DPM-Solver-2 / -3 placements, here in log t)."""
    return tuple(k / stages for k in range(1, stages))


def check_layout(stages, fractions) -> None:
    """A ValueError naming the fix unless every step has 1..MAX_STAGES stages and stages - 1 increasing stage
    fractions in (0, 1) (one tuple per step)."""
    if len(fractions) != len(stages):
        raise ValueError(f"gddim fractions need one tuple per step: {len(stages)} steps, {len(fractions)} tuples")
    for st, fr in zip(stages, fractions):
        if not 1 <= st <= MAX_STAGES:
            raise ValueError(f"gddim stages per step must be in 1..{MAX_STAGES}, got {tuple(stages)}")
        bounds = (0.0,) + tuple(fr) + (1.0,)
        if len(fr) != st - 1 or not all(a < b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"gddim fractions need, per step, stages - 1 increasing numbers in (0, 1): a step of "
                             f"{st} stages got {tuple(fr)}")


@functools.lru_cache(maxsize=64)
def single_step_tables(sde, sqrt: SquareRoot, grid: tuple[float, ...], stages: tuple[int, ...],
                       fractions: tuple[tuple[float, ...], ...], variable: str = "logt",
                       K: SquareRoot | None = None) -> dict[str, np.ndarray]:
    r"""Tables of a single-step exponential Runge-Kutta method in the denoiser, one row per evaluation.

    Step i (grid[i] = t -> grid[i+1] = t') spends ``stages[i]`` = S evaluations at the times s_0 = t and
    s_k = t (t'/t)^{r_k} (``fractions[i]`` = (r_1, ..., r_{S-1}), increasing in (0, 1)). Stage k + 1 (or t' after
    the last) is reached from u(t) by the exact variation-of-constants step with D replaced by its Lagrange
    interpolant (in ``variable``) through the k + 1 values D(s_0), ..., D(s_k) known so far
    (:func:`_weights`); with the carried form of :func:`step_tables` every one is

        u(s_{k+1}) = m_{s_{k+1}} D_0 + R_{s_{k+1}} eps_0 + sum_{j=1}^{k} E_j (D_j - D_0),

    from the step's first evaluation (D_0, eps_0) (row key ``new`` = 1 there, 0 on the later stages). S = 2 with
    r = 1/2 is the matrix analogue of DPM-Solver++(2S), S = 3 the third-order scheme with its stages on an
    interpolant of rising degree. A constant D (single data point) is exact at every stage. No step reuses an
    evaluation of an earlier one, so a learned network's error at t ~ T reaches later steps only through the state.

    Rows (the keys of :data:`SCAN_KEYS`, as in :func:`step_tables`, history slot j = the evaluation j rows back)
    plus ``evals`` (nfe,) the evaluation times, ``stages`` (nfe,) the stage index of each row and ``gain`` (nfe,)
    the eps-error gain of each row's D-difference terms (:func:`_history_gain`; largest over modes).
    """
    if len(stages) != len(grid) - 1:
        raise ValueError(f"need one stage count per step: {len(grid) - 1} steps, {len(stages)} stage counts")
    check_layout(stages, fractions)
    K = sqrt if K is None else K
    ts = np.asarray(grid, np.float64)
    n_hist = max(stages)
    rows: dict[str, list] = dict(t=[], new=[], m_next=[], b=[], v=[], zv=[], stages=[], gain=[])
    for i, st in enumerate(stages):
        times = stage_times(ts[i], ts[i + 1], fractions[i])
        for k in range(st):
            target = times[k + 1] if k + 1 < st else ts[i + 1]
            e = _weights(sde, sqrt, times[0], target, np.asarray(times[:k + 1]), variable)
            v = np.zeros((n_hist,) + e.shape[1:])
            for j in range(1, k + 1):               # stage j's D sits k - j rows back; the base (stage 0) k rows
                v[k - j] = e[j]
            r_next = sqrt.np(target)
            rows["t"].append(times[k])
            rows["new"].append(float(k == 0))
            rows["m_next"].append(sde.transition_np(t=target, s=0.0)[..., :, 0])
            rows["b"].append(r_next)
            rows["v"].append(v)
            rows["zv"].append(np.stack([_solve_vec(r_next, x) for x in v]))
            rows["stages"].append(k)
            gains = np.stack([eps_gain(sde, sqrt, times[k - j]) for j in range(k + 1)])    # slots 0..k only
            rows["gain"].append(float(np.max(_history_gain(v[:k + 1], gains))))
    out = {k: np.asarray(x) for k, x in rows.items()}
    out["g"] = np.zeros_like(out["v"])              # no corrector: the state at each row is the one evaluated
    out["evals"] = out["t"]
    return dict(out, **carried_tables(sde, sqrt, K, out["t"]))


def multistep_step(sde, tab: dict, u: Array, c: Array, z: Array, eps: Array, d: Array, hist: Array,
                   base: tuple[Array, Array]) -> tuple[Array, Array, Array, Array, Array, tuple[Array, Array]]:
    r"""One row of :func:`step_tables` or :func:`single_step_tables`: u = m c + R z the state at ``tab["t"]``
    (with its carried representation), (``eps``, ``d``) the model there (eps w.r.t. R, from
    :meth:`~diffusion_jax.param.Model.carried`), ``hist`` the earlier D values (newest first), ``base`` the
    (eps, D) the step starts from: replaced by (eps, d) on a row with ``new`` = 1 (every multistep row, the first
    stage of a single-step one). Computes

        u_next = m_next D_b + R_next eps_b + sum_j V_j (hist_j - D_b)      (hist_0 = d),

    and returns (the corrected state at this row (u itself without corrector), u_next, c_next = D_b,
    z_next = eps_b + sum_j ZV_j (hist_j - D_b), new history, new base)."""
    import jax.numpy as jnp
    hist = jnp.concatenate([d[None], hist[:-1]], axis=0)              # hist[j] = D j rows back
    new = tab["new"] > 0
    eps_b, d_b = jnp.where(new, eps, base[0]), jnp.where(new, d, base[1])
    u_next = sde.lift(tab["m_next"], d_b) + sde.apply(tab["b"], eps_b)
    z_next = eps_b
    u_corr = u
    for j in range(hist.shape[0]):
        diff = hist[j] - d_b
        u_next = u_next + sde.lift(tab["v"][j], diff)
        z_next = z_next + sde.lift(tab["zv"][j], diff)
        u_corr = u_corr + sde.lift(tab["g"][j], diff)
    return u_corr, u_next, d_b, z_next, hist, (eps_b, d_b)


def carried_start(sde, u0: Array, s_inv0: Array) -> tuple[Array, Array]:
    """The carried representation (c, z) = (0, S^{-1} u0) of the initial state (S well conditioned at t_start)."""
    import jax.numpy as jnp
    return jnp.zeros(u0.shape[:-1], u0.dtype), sde.apply(s_inv0, u0)


def multistep_scan(sde, model, u0: Array, tab: dict):
    """The jittable loop over :func:`multistep_step` (``tab``: the arrays of :func:`step_tables` or
    :func:`single_step_tables` named in :data:`SCAN_KEYS`, in u0's dtype). ``model.carried`` gives (eps, D)
    relative to the carried representation. Returns (u_N, states at the evaluation rows (N, ...), D there (N, ...)).
    """
    import jax
    import jax.numpy as jnp

    def step(carry, row):
        u, c, z, hist, base = carry
        eps, d = model.carried(u, row["t"], c, z, row)
        u_corr, u_next, c, z, hist, base = multistep_step(sde, row, u, c, z, eps, d, hist, base)
        return (u_next, c, z, hist, base), (u_corr, d)

    hist0 = jnp.zeros((tab["v"].shape[1],) + u0.shape[:-1], u0.dtype)
    rows = {k: tab[k] for k in SCAN_KEYS}
    c0, z0 = carried_start(sde, u0, tab["s_inv"][0])
    base0 = (jnp.zeros_like(u0), jnp.zeros(u0.shape[:-1], u0.dtype))
    (u_fin, *_), (traj, den) = jax.lax.scan(step, (u0, c0, z0, hist0, base0), rows)
    return u_fin, traj, den
