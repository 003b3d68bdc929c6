r"""Likelihoods through the probability-flow ODE, for every linear family, and bits per dimension.

Instantaneous change of variables
---------------------------------
The probability-flow ODE of a family (docs/maths.md section 5) is, on the whole state u in R^{D k}
(D data dimensions, k phase-space coordinates each),

    du/dt = f(u, t) = beta(t) [(I_D (x) A) u - 1/2 (I_D (x) Q) s(u, t)],

and along any of its solutions the density it transports obeys d log p_t(u_t)/dt = -div f(u_t, t).
Integrating forward from t_eps to T and replacing the unknown p_T by the prior pi = N(0, Sigma_prior):

    log p_eps(u_eps) = log pi(u_T) + int_{t_eps}^T div f(u_t, t) dt,                              (1)

which is exact for the density p^theta_eps that the model's ODE defines (the law at t_eps of the ODE
run backwards from u_T ~ pi). The divergence splits into an analytic part and a score part,

    div f = beta(t) D tr(A) + div g,      g(u) = -1/2 beta(t) (I_D (x) Q) s(u, t),

and only div g is computed from the model: exactly (``trace="exact"``: one Jacobian-vector product per
basis vector e_j, and only for the coordinates j whose row of Q is non-zero, since the other rows of the
Jacobian of g vanish), or by Hutchinson's estimator (``trace="hutchinson"``):
div g ~ (1/P) sum_p z_p^T J_g z_p with P = ``n_probes`` fixed probes per example, drawn once and kept
along the whole trajectory (so each solve is an ordinary ODE), Rademacher or Gaussian, supported on the
same non-zero-Q coordinates. That restriction keeps the estimator unbiased (E[z z^T] = P_R, the
projection on those coordinates, and P_R J_g = J_g) and removes the cross terms with the other
coordinates from its variance. The Jacobian-vector products come from one ``jax.linearize`` per
vector-field evaluation, so the network's forward pass is shared by every probe or basis vector.

Modal families (:class:`~diffusion_jax.sdes.modal.ModalSDE`, e.g. blurring diffusion) have, with the
orthogonal basis V, f(u, t) = V F V^T u - 1/2 V G G^T V^T s(u, t) (F, G G^T diagonal per mode). Every term
goes through the family interface (``sde.apply`` for the matrices, ``sde.drift_trace`` for
tr(V F V^T) = sum over modes of f_f(t), ``sde.noise_rows``), and the trace of J_g is basis-invariant, so the
exact trace (one-hot pixel vectors) and the Hutchinson probes (pixel-space) need nothing else. k = 1 there,
so ``logp`` is log p^theta_eps(x_0) itself.

Per-example solves
------------------
Each example is its own ODE [u, delta_logp] (a ``jax.vmap`` over a single-example ``diffeqsolve``), so
its step sizes, and therefore its value, do not depend on what else is in the batch. The step-size
controller is diffrax's PID on the norm max(rms(u error), |delta_logp error|) of the scaled local errors
(``atol + rtol |y|``), so the log-density increment is controlled on its own rather than diluted among
the D k state coordinates.

NFE. ``nfe`` is the exact number of evaluations of the augmented vector field (each one network
evaluation through ``fn`` plus the Jacobian-vector products of that same linearisation), per example,
derived from diffrax's statistics and the solver's Butcher tableau: diffrax's ``num_steps`` counts
*attempted* steps (accepted + rejected); an explicit Runge-Kutta method with s stages costs s evaluations
per attempted step, and a first-same-as-last (FSAL) one (Dopri5, Tsit5, Bosh3, ...) costs one
evaluation at the start plus s - 1 per attempted step (a rejected step keeps the stored first stage).
Under ``vmap`` the batch runs in lock step (finished examples are masked, not skipped), so ``fn`` is
evaluated batch * max(nfe) times in all; ``tests/test_likelihood.py`` checks that with a host counter.

Auxiliary variables (k >= 2): the bound
---------------------------------------
For k >= 2 the model density p^theta_eps(x, a) is over the data coordinate x and the auxiliaries a, and
what plays the role of the data likelihood is the model's density of the data coordinate at t_eps,

    p^theta_{eps,X}(x_0) = int p^theta_eps(x_0, a) da,

the same quantity (1) gives for k = 1 (VP, VE: evaluated at u_eps = x_0, as in Song et al.). For any
density r(a | x_0), Jensen's inequality (log is concave) gives

    log p^theta_{eps,X}(x_0) = log E_{a ~ r}[p^theta_eps(x_0, a) / r(a | x_0)]
                             >= E_{a ~ r}[log p^theta_eps(x_0, a) - log r(a | x_0)],                 (2)

with gap KL(r(. | x_0) || p^theta_eps(. | x_0)) >= 0. :func:`log_likelihood` returns one Monte Carlo draw
of the right-hand side per example: it draws a ~ r, solves (1) from u_eps = (x_0, a) and subtracts
log r(a | x_0). The data coordinate of u_eps is x_0 itself, not a perturbed x_eps. (Drawing the whole
state u_eps ~ q(u_eps | x_0) and subtracting log q(a_eps | x_0) would *not* be a bound: it exceeds the
valid bound with the conditional q(a_eps | x_eps, x_0) by the mutual information of x_eps and a_eps given
x_0, which for HSM families at small t_eps is large, because x_eps - m x_0 is then driven almost
entirely by the initial auxiliary draw.) Two choices of r (``aux``):

* ``"forward"`` (default): the auxiliary part of the forward marginal at t_eps from x_0,
  r(a | x_0) = N(a; m_{t,a} x_0, Sigma_{t,aa}) per data dimension, i.e. the law of a_{t_eps} when
  a_0 ~ N(0, Sigma_0,aux) (the HSM initial law) and (x_0, a_0) is run forward to t_eps.
  As t_eps -> 0 it tends to N(0, Sigma_0,aux), which is also the limit of the true conditional
  p_eps(a | x_0) (under HSM, a_0 is independent of x_0), so the gap vanishes with t_eps; at small t_eps
  it also follows the first-order coupling a_eps ~ a_0 + O(t_eps) x_0 that the true conditional has.
* ``"initial"``: r = N(0, Sigma_0,aux), the HSM initial law itself (CLD-SGM's bound
  log p(x_0) >= E_{v_0 ~ p(v_0)}[log p(x_0, v_0) - log p(v_0)]); needs every initial auxiliary
  variance > 0.

How tight: for x_0 ~ N(mu, 0.25 I_2) and the exact score (``tests/test_likelihood.py``), the expected
bound sits below log N(x_0; mu, 0.25) by 1e-3 - 7e-3 nats at t_eps = 1e-2 and 1e-5 - 1.4e-4 at
t_eps = 1e-3 with ``"forward"`` (CLD, PSLD, CD-HOLD n=3), against 1.2 - 1.3 and 0.13 - 0.19 nats with
``"initial"``: the forward law is the much tighter choice unless t_eps is tiny.

So ``logp`` is, per example, log p^theta_eps(x_0) exactly (up to the ODE tolerance and, with Hutchinson,
an unbiased estimate of it) for k = 1, and a single-sample unbiased estimate of the lower bound (2) for
k >= 2. Averages over examples are averages of unbiased estimates, hence unbiased for the mean bound;
average over several calls (keys) to shrink the variance of a single example's estimate.

Bits per dimension
------------------
See :func:`bits_per_dim` and :func:`dequantize`: for integer data with ``bins`` levels, dequantised
uniformly over a cell of width Delta (in model space) around each level,
-log2 P(x_int) / D <= -E_u[log p_X(x)] / (D ln 2) - log2 Delta.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.param import OUTPUTS, Model, SquareRoot, with_params
from diffusion_jax.sdes.base import Family, apply_matrix, tri_factor

Array = Any

TRACES = ("hutchinson", "exact")
PROBES = ("rademacher", "gaussian")
AUX_LAWS = ("forward", "initial")
CONVENTIONS = ("grid", "cell")

__all__ = [
    "LikelihoodResult", "ode_log_likelihood", "log_likelihood", "sample_aux", "bits_per_dim",
    "dequantize", "cell_width", "TRACES", "PROBES", "AUX_LAWS", "CONVENTIONS",
]


class LikelihoodResult(NamedTuple):
    """Per-example outputs (leading axis = batch), all in nats.

    ``logp``: log p^theta_eps(x_0) for k = 1; one draw of the lower bound (2) for k >= 2.
    ``logp_state``: log p^theta_eps(u_eps), the model's density of the full state at t_eps, eq. (1).
    ``log_q_aux``: log r(a | x_0) of the auxiliary draw (0 for k = 1 and for :func:`ode_log_likelihood`).
    ``prior_logp``: log pi(u_T);  ``delta_logp``: int_{t_eps}^T div f dt  (logp_state = their sum).
    ``u_eps``: the initial states (batch, *data, k);  ``u_T``: the ODE end points.
    ``nfe``: evaluations of the augmented vector field (int32);  ``steps``/``rejected``: diffrax's
    attempted and rejected step counts.
    """
    logp: Array
    logp_state: Array
    log_q_aux: Array
    prior_logp: Array
    delta_logp: Array
    u_eps: Array
    u_T: Array
    nfe: Array
    steps: Array
    rejected: Array


# ------------------------------------------------------------------ validation
def _check_choice(what: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {choices}")


def _resolve_t_eps(sde: Family, t_eps: float | None) -> float:
    if t_eps is None:
        return sde.t_min
    try:
        t = float(t_eps)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError(f"t_eps must be a concrete number, got {t_eps!r}") from e
    if not (math.isfinite(t) and sde.t_min <= t < sde.T):
        raise ValueError(f"{sde.name}: t_eps must lie in [t_min={sde.t_min}, T={sde.T}) (the range the "
                         f"model is trained on), got {t_eps!r}")
    return t


def _check_solver(solver: Any) -> Any:
    if solver is None:
        return diffrax.Dopri5()
    if isinstance(solver, type):
        raise ValueError(f"pass a solver instance, e.g. {solver.__name__}(), not the class")
    if not isinstance(solver, diffrax.AbstractERK) or getattr(solver.tableau, "b_error", None) is None:
        raise ValueError(f"solver must be an adaptive explicit Runge-Kutta method with an embedded error "
                         f"estimate (e.g. diffrax.Dopri5(), Tsit5(), Bosh3(), Dopri8()), got {solver!r}")
    return solver


def _check_common(sde, apply, params, u_shape, dtype, output, K, trace, n_probes, probe, rtol, atol, max_steps):
    _check_choice("model output", output, OUTPUTS)
    _check_choice("trace estimator", trace, TRACES)
    _check_choice("probe distribution", probe, PROBES)
    if not (isinstance(n_probes, (int, np.integer)) and not isinstance(n_probes, bool) and n_probes >= 1):
        raise ValueError(f"n_probes must be an integer >= 1, got {n_probes!r}")
    if not (isinstance(max_steps, (int, np.integer)) and max_steps >= 1):
        raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")
    for name, v in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(v, (int, float, np.floating)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    if not (isinstance(K, SquareRoot) or K in ("R", "L")):
        raise ValueError(f"K must be 'R', 'L' or a SquareRoot, got {K!r}")
    if len(u_shape) < 2 or u_shape[-1] != sde.order:
        raise ValueError(f"{sde.name}: the state must have shape (batch, *data, k={sde.order}), got {u_shape}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"the state must be floating point, got dtype {dtype}")
    # one example at a time: that is how the solver calls fn
    one = (1,) + tuple(u_shape[1:])
    expected = one[:-1] if output == "denoiser" else one
    out = jax.eval_shape(apply, params, jax.ShapeDtypeStruct(one, dtype), jax.ShapeDtypeStruct((1,), dtype))
    if getattr(out, "shape", None) != expected:
        raise ValueError(f"fn returned shape {getattr(out, 'shape', out)}, expected {expected} for "
                         f"output={output!r} (called with a state of shape {one})")


# ------------------------------------------------------------------ the augmented ODE
def _noise_rows(sde: Family) -> tuple[int, ...]:
    """Phase-space coordinates the noise drives: the only ones where J_g has a diagonal."""
    return sde.noise_rows


def _nfe_formula(solver: Any) -> tuple[int, int]:
    """(evaluations at the start, evaluations per attempted step) of an explicit RK solver on an ODETerm."""
    tab = solver.tableau
    return (1, tab.num_stages - 1) if tab.fsal else (0, tab.num_stages)


def _error_norm(err: Any) -> Array:
    u_err, l_err = err
    return jnp.maximum(jnp.sqrt(jnp.mean(jnp.square(u_err))), jnp.abs(l_err))


@functools.lru_cache(maxsize=64)
def _build(sde: Family, apply: Callable, output: str, K: Any, trace: str, rtol: float, atol: float,
           solver: Any, max_steps: int) -> Callable:
    """The jitted solve ``run(params, u, probes, t0)``: the network enters through ``apply(params, u, t)``, so
    one compile serves every checkpoint; cached per (family value, apply, options)."""
    # The square root only changes the score for output="eps" (for "score" and "denoiser" the conversion
    # is -Sigma^{-1}(u - m D) whatever K is), so skip building the R table there.
    sqrt_kind = K if output == "eps" else "L"
    rows = _noise_rows(sde)
    first, per_step = _nfe_formula(solver)
    controller = diffrax.PIDController(rtol=rtol, atol=atol, norm=_error_norm)
    t_end = sde.T

    def one(params: Any, u0: Array, probes: Array | None, t0: Array):
        model = Model(sde, lambda uu, tt: apply(params, uu, tt), output, sqrt_kind)
        data_shape = u0.shape[:-1]
        n_data = int(np.prod(data_shape, dtype=np.int64))
        dtype = u0.dtype
        if trace == "exact":
            # one-hot basis vectors e_(pixel, c) for c in rows: J_g e_j is column j, its j-th entry J_jj
            basis = np.zeros((n_data * len(rows), n_data, sde.order), dtype=np.float32)
            for r, c in enumerate(rows):
                basis[r * n_data + np.arange(n_data), np.arange(n_data), c] = 1.0
            vecs = jnp.asarray(basis.reshape((-1,) + u0.shape), dtype)
        else:
            vecs = probes

        def vf(t, y, args):
            u, _ = y
            noise = sde.noise_matrix(t).astype(dtype)

            def g(v):                                    # the score part of the drift
                return -0.5 * sde.apply(noise, model.score(v[None], t)[0])

            g_u, g_lin = jax.linearize(g, u)
            du = sde.apply(sde.drift_matrix(t).astype(dtype), u) + g_u
            quad = jnp.sum(jax.vmap(g_lin)(vecs) * vecs)  # sum_p z_p^T J_g z_p  (or sum_j J_jj)
            div_g = quad if trace == "exact" else quad / vecs.shape[0]
            return du, sde.drift_trace(t, data_shape).astype(dtype) + div_g

        t0 = jnp.asarray(t0, dtype)
        # Scale-free start: near t_eps the flow of near-Dirac data changes on the time scale t itself.
        dt0 = jnp.minimum(t0, (t_end - t0) / 64)
        sol = diffrax.diffeqsolve(diffrax.ODETerm(vf), solver, t0, t_end, dt0, (u0, jnp.zeros((), dtype)),
                                  stepsize_controller=controller, saveat=diffrax.SaveAt(t1=True),
                                  max_steps=max_steps, throw=False)
        u_t, delta = sol.ys[0][-1], sol.ys[1][-1]
        attempted = sol.stats["num_steps"]
        ok = sol.result == diffrax.RESULTS.successful
        return u_t, delta, first + per_step * attempted, attempted, sol.stats["num_rejected_steps"], ok

    @jax.jit
    def run(params: Any, u: Array, probes: Array | None, t0: Array):
        u_t, delta, nfe, steps, rejected, ok = jax.vmap(one, in_axes=(None, 0, 0, None))(params, u, probes, t0)
        prior = sde.prior_logp(u_t, batch_ndim=1)
        return u_t, delta, prior, nfe, steps, rejected, ok

    return run


def _draw_probes(key: Array, probe: str, n_probes: int, shape: tuple[int, ...], dtype: Any,
                 rows: tuple[int, ...], k: int) -> Array:
    """(batch, n_probes, *data, k) probes, zero outside the noise-driven coordinates ``rows``."""
    batch = shape[0]
    full = (batch, n_probes) + tuple(shape[1:])
    if probe == "rademacher":
        z = jax.random.rademacher(key, full, dtype)
    else:
        z = jax.random.normal(key, full, dtype)
    mask = np.zeros((k,), dtype=np.float32)
    mask[list(rows)] = 1.0
    return z * jnp.asarray(mask, dtype)


def ode_log_likelihood(sde: Family, fn: Callable, u: Array, *, params: Any = None, output: str = "eps",
                       K: str | SquareRoot = "R", t_eps: float | None = None, trace: str = "hutchinson",
                       n_probes: int = 1, probe: str = "rademacher", key: Array | None = None,
                       rtol: float = 1e-5, atol: float = 1e-5, solver: Any = None,
                       max_steps: int = 4096) -> LikelihoodResult:
    r"""log p^theta_eps(u) of full states u (batch, *data, k) at t_eps through eq. (1) of the module doc.

    ``fn(u, t_batch)`` (or ``fn(params, u, t_batch)`` with ``params``, which compiles once across checkpoints)
    returns eps (w.r.t. the square root ``K``), the score or the denoiser (``output``);
    it is called on one example at a time (shape (1, *data, k)) inside a ``vmap`` over the batch.
    ``trace``: ``"exact"`` (D r Jacobian-vector products per evaluation, r = number of non-zero rows of Q:
    for small D) or ``"hutchinson"`` (``n_probes`` fixed probes per example of kind ``probe``, drawn from
    ``key``). ``t_eps`` defaults to ``sde.t_min``; ``solver`` to ``diffrax.Dopri5()`` (any adaptive
    explicit RK solver). Raises RuntimeError if a solve does not reach T within ``max_steps``.
    """
    u = jnp.asarray(u)
    if not jnp.issubdtype(u.dtype, jnp.floating):
        u = u.astype(jnp.result_type(float))
    t0 = _resolve_t_eps(sde, t_eps)
    apply = fn if params is not None else with_params(fn)
    _check_common(sde, apply, params, u.shape, u.dtype, output, K, trace, n_probes, probe, rtol, atol, max_steps)
    solver = _check_solver(solver)
    rows = _noise_rows(sde)
    if trace == "hutchinson":
        if key is None:
            raise ValueError("trace='hutchinson' needs a PRNG key for the probes: pass key=jax.random.PRNGKey(...)")
        probes = _draw_probes(key, probe, int(n_probes), u.shape, u.dtype, rows, sde.order)
    else:
        probes = None
    kind = K.kind if isinstance(K, SquareRoot) else K
    run = _build(sde, apply, output, kind, trace, float(rtol), float(atol), solver, int(max_steps))
    u_t, delta, prior, nfe, steps, rejected, ok = run(params, u, probes, jnp.asarray(t0, u.dtype))
    if not bool(jnp.all(ok)):
        bad = np.flatnonzero(~np.asarray(ok))
        raise RuntimeError(f"{sde.name}: the likelihood ODE did not reach T for examples {bad[:8].tolist()} "
                           f"(raise max_steps={max_steps} or loosen rtol/atol)")
    logp = prior + delta
    return LikelihoodResult(logp=logp, logp_state=logp, log_q_aux=jnp.zeros_like(logp), prior_logp=prior,
                            delta_logp=delta, u_eps=u, u_T=u_t, nfe=nfe, steps=steps, rejected=rejected)


# ------------------------------------------------------------------ auxiliary variables
def _aux_law(sde: Family, t_eps: float, aux: str, dtype: Any) -> tuple[Array, Array]:
    """(mean coefficient (k-1,), lower factor F (k-1, k-1)) of r(a | x_0) = N(c x_0, F F^T) per pixel."""
    k = sde.order
    if aux == "initial":
        var = np.asarray(sde.initial_variance)[1:]             # checked > 0 by sample_aux
        return jnp.zeros((k - 1,), dtype), jnp.asarray(np.diag(np.sqrt(var)), dtype)
    t = jnp.asarray(t_eps, dtype)
    chol = sde.cholesky(t)                                   # Sigma_t = L L^T, so Sigma_aa = L_a L_a^T
    fac = tri_factor(chol[1:, :], jnp)                      # with L_a = rows 1.. of L (k-1 x k)
    return sde.mean_coefficient(t)[1:], fac


@functools.partial(jax.jit, static_argnums=(0, 1))
def _aux_draw(sde: Family, aux: str, key: Array, x0: Array, t_eps: Array) -> tuple[Array, Array]:
    k = sde.order
    coef, fac = _aux_law(sde, t_eps, aux, x0.dtype)
    z = jax.random.normal(key, x0.shape + (k - 1,), x0.dtype)
    a = coef * x0[..., None] + apply_matrix(fac, z)
    per_pixel = (-0.5 * jnp.sum(z * z, axis=-1) - jnp.sum(jnp.log(jnp.diagonal(fac)))
                 - 0.5 * (k - 1) * math.log(2.0 * math.pi))
    return a, jnp.sum(per_pixel.reshape(x0.shape[0], -1), axis=1)


def sample_aux(key: Array, sde: Family, x0: Array, t_eps: float | None = None,
               aux: str = "forward") -> tuple[Array, Array]:
    r"""Draw a ~ r(a | x_0) per example and return (a, log r(a | x_0)).

    x0 has shape (batch, *data); a has shape (batch, *data, k-1) and log r shape (batch,). With
    a = c x_0 + F z, z ~ N(0, I): log r = sum over pixels of [-|z|^2/2 - sum log diag F - (k-1)/2 log 2 pi]
    (evaluated from z, so no ill-conditioned solve). ``aux``: ``"forward"`` or ``"initial"`` (module doc).
    """
    _check_choice("auxiliary law", aux, AUX_LAWS)
    if sde.order < 2:
        raise ValueError(f"{sde.name} has no auxiliary variables (k = 1)")
    x0 = jnp.asarray(x0)
    if not jnp.issubdtype(x0.dtype, jnp.floating):
        x0 = x0.astype(jnp.result_type(float))
    if x0.ndim < 2:
        raise ValueError(f"x0 must have shape (batch, *data), got {x0.shape}")
    t0 = _resolve_t_eps(sde, t_eps)
    if aux == "initial" and np.any(np.asarray(sde.initial_variance)[1:] <= 0):
        raise ValueError(f"{sde.name}: aux='initial' needs every initial auxiliary variance > 0, got "
                         f"{np.asarray(sde.initial_variance)[1:].tolist()}; use aux='forward'")
    return _aux_draw(sde, aux, key, x0, jnp.asarray(t0, x0.dtype))


def log_likelihood(sde: Family, fn: Callable, x0: Array, *, params: Any = None, key: Array | None = None,
                   output: str = "eps", K: str | SquareRoot = "R", t_eps: float | None = None,
                   trace: str = "hutchinson", n_probes: int = 1, probe: str = "rademacher",
                   aux: str = "forward", rtol: float = 1e-5, atol: float = 1e-5, solver: Any = None,
                   max_steps: int = 4096) -> LikelihoodResult:
    r"""Log-likelihood of data x0 (batch, *data) in nats: exact for k = 1, the bound (2) for k >= 2.

    k = 1 (VP, VE): ``logp`` = log p^theta_eps(x_0) by eq. (1) from u_eps = x_0.
    k >= 2: draws a ~ r(a | x_0) (``aux``: ``"forward"``, the auxiliary part of u_{t_eps} | x_0, or
    ``"initial"``, N(0, Sigma_0,aux)), solves eq. (1) from u_eps = (x_0, a) and returns
    ``logp`` = log p^theta_eps(x_0, a) - log r(a | x_0), an unbiased one-sample estimate of
    E_r[log p^theta_eps(x_0, a) - log r(a | x_0)] <= log p^theta_{eps,X}(x_0) (Jensen; gap
    KL(r || p^theta_eps(a | x_0))). ``key`` drives the auxiliary draw and the Hutchinson probes
    (required unless k = 1 and ``trace="exact"``). Other arguments as :func:`ode_log_likelihood`.
    Convert to bits/dim with :func:`bits_per_dim`.
    """
    x0 = jnp.asarray(x0)
    if not jnp.issubdtype(x0.dtype, jnp.floating):
        x0 = x0.astype(jnp.result_type(float))
    if x0.ndim < 2:
        raise ValueError(f"x0 must have shape (batch, *data) with a batch axis, got {x0.shape}")
    _check_choice("auxiliary law", aux, AUX_LAWS)
    t0 = _resolve_t_eps(sde, t_eps)
    needs_key = sde.order >= 2 or trace == "hutchinson"
    if needs_key and key is None:
        why = "the auxiliary draw" if sde.order >= 2 else "the Hutchinson probes"
        raise ValueError(f"{sde.name}: {why} needs a PRNG key: pass key=jax.random.PRNGKey(...)")
    if sde.order == 1:
        u, log_q = x0[..., None], jnp.zeros((x0.shape[0],), x0.dtype)
        key_probe = key
    else:
        key_aux, key_probe = jax.random.split(key)
        a, log_q = sample_aux(key_aux, sde, x0, t0, aux)
        u = jnp.concatenate([x0[..., None], a], axis=-1)
    res = ode_log_likelihood(sde, fn, u, params=params, output=output, K=K, t_eps=t0, trace=trace, n_probes=n_probes,
                             probe=probe, key=key_probe, rtol=rtol, atol=atol, solver=solver,
                             max_steps=max_steps)
    return res._replace(logp=res.logp_state - log_q, log_q_aux=log_q)


# ------------------------------------------------------------------ bits per dimension
def cell_width(bins: int, *, convention: str = "grid", low: float = -1.0, high: float = 1.0) -> float:
    r"""Width Delta, in model space, of the dequantisation cell of one of ``bins`` integer levels.

    ``"grid"`` (this package's data pipeline, :func:`diffusion_jax.data.to_model_space`): level v sits at
    x_v = low + (high - low) v / (bins - 1) and its cell is [x_v - Delta/2, x_v + Delta/2),
    Delta = (high - low) / (bins - 1).  ``"cell"`` (Song et al.'s score_sde): x = low + (high - low) (v + u) / bins,
    u in [0, 1), so Delta = (high - low) / bins and the cells tile [low, high).
    """
    _check_choice("dequantisation convention", convention, CONVENTIONS)
    if not (isinstance(bins, (int, np.integer)) and not isinstance(bins, bool) and bins >= 2):
        raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise ValueError(f"need finite low < high, got low={low}, high={high}")
    return (high - low) / (bins - 1 if convention == "grid" else bins)


def dequantize(key: Array, x_int: Array, bins: int, *, convention: str = "grid", low: float = -1.0,
               high: float = 1.0) -> Array:
    r"""Uniform dequantisation of integer data x_int in {0, ..., bins-1} into model space.

    ``"grid"``: x = low + Delta (v + u - 1/2) with Delta = (high - low)/(bins - 1), i.e. the level's grid
    point x_v plus uniform noise over its cell; ``"cell"``: x = low + Delta (v + u), Delta = (high - low)/bins;
    u ~ U[0, 1) independently per dimension. Any density p_X in model space then satisfies
    log P(x_int) >= E_u[log p_X(x)] + D log Delta (see :func:`bits_per_dim`).
    """
    delta = cell_width(bins, convention=convention, low=low, high=high)
    x_arr = jnp.asarray(x_int)
    if not isinstance(x_arr, jax.core.Tracer):
        v = np.asarray(x_arr)
        if v.size and (not np.all(np.isfinite(v)) or np.any(v != np.round(v)) or v.min() < 0
                       or v.max() > bins - 1):
            raise ValueError(f"x_int must hold integers in 0..{bins - 1}, got values in [{v.min()}, {v.max()}]")
    dtype = jnp.result_type(float)
    u = jax.random.uniform(key, x_arr.shape, dtype)
    offset = -0.5 if convention == "grid" else 0.0
    return low + delta * (x_arr.astype(dtype) + u + offset)


def bits_per_dim(logp: Array, num_dims: int, *, dequantize_bins: int | None = None,
                 convention: str = "grid", low: float = -1.0, high: float = 1.0) -> Array:
    r"""Bits per dimension from a log-density ``logp`` (nats, per example) of D = ``num_dims`` dimensions.

    Continuous data (``dequantize_bins=None``): bpd = -logp / (D ln 2), the density in model space.

    Discrete data with ``bins`` levels, evaluated at uniformly dequantised points x (:func:`dequantize`,
    cell width Delta in model space): the probability of the integer vector is
    P(x_int) = int_cell p_X(x) dx = Delta^D E_u[p_X(x)] >= Delta^D exp(E_u[log p_X(x)]) (Jensen), so

        -log2 P(x_int) / D <= -E_u[log p_X(x)] / (D ln 2) - log2 Delta,

    and the returned value, -logp / (D ln 2) - log2 Delta, is an upper bound on the discrete bits/dim in
    expectation over the dequantisation noise (and over the auxiliary draw when ``logp`` is the bound (2)).
    In [0, 1]-space terms (score_sde's ``"cell"`` convention, [low, high] = [-1, 1]): y = (v + u)/bins has
    log p_Y(y) = log p_X(x) + D log 2 (the scaling y -> 2y - 1) and cells of width 1/bins, giving the
    familiar -logp/(D ln 2) - 1 + log2(bins) = ... + 7 for 8-bit images. With the ``"grid"`` convention of
    this package's data pipeline the offset is log2((bins - 1)/2): 6.994 for 8-bit images, 3 for the
    17-level digits.
    """
    if not (isinstance(num_dims, (int, np.integer)) and not isinstance(num_dims, bool) and num_dims >= 1):
        raise ValueError(f"num_dims must be an integer >= 1, got {num_dims!r}")
    bpd = -jnp.asarray(logp) / (num_dims * math.log(2.0))
    if dequantize_bins is not None:
        bpd = bpd - math.log2(cell_width(dequantize_bins, convention=convention, low=low, high=high))
    return bpd
