r"""Empirical score deviation and memorisation (arXiv 2305.19947, docs/maths.md section 6).

A trained model D_theta and the optimal denoiser D* of the training set {y_n} (:func:`exact.empirical_denoiser`,
the posterior mean E[x_0 | u_t] under the empirical distribution) are run by the same sampler from the same
initial state u_T (and, for stochastic samplers, the same key). With u^theta_t and u*_t the two trajectories:

    sampling distance        ||x^theta_t - x*_t||                  (data coordinate x = u[..., 0])
    denoising distance       ||D_theta(u^theta_t, t) - D*(u*_t, t)||
    learned-path deviation   ||D_theta(u^theta_t, t) - D*(u^theta_t, t)||  (score deviation along the learned path)
    optimal-path deviation   ||D_theta(u*_t, t) - D*(u*_t, t)||          (score deviation along the optimal path)

per example and per grid time (Euclidean norms over all data dimensions). The denoiser error is the score
error up to the known factor: s_theta - s* = Sigma_t^{-1} m_t (D_theta - D*) per data dimension (for a modal
family, e.g. blurring diffusion, per mode in the family's basis V: s_theta - s* = V (Sigma_f^{-1} m_f
(V^T (D_theta - D*))_f)). Everything here goes through the family interface, so modal families need nothing
else: states, denoisers and distances stay in pixel space, and D* is the pixel-space convex combination of
the training points that :func:`exact.empirical_denoiser` forms with per-mode kernel weights.

The optimal sampler memorises: its samples are training points. Nearest-neighbour distances of samples to
the training set (and the ratio of the nearest to the second-nearest distance, small for a copy) measure
how close a learned model comes to that.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffusion_jax import exact
from diffusion_jax.param import Model, SquareRoot, square_root, with_params
from diffusion_jax.samplers import sample
from diffusion_jax.samplers.grids import noise_level
from diffusion_jax.sdes.base import Family

Array = Any

__all__ = ["empirical_denoiser_fn", "denoiser_along", "score_deviation", "nearest_neighbors"]


@functools.lru_cache(maxsize=32)
def empirical_denoiser_apply(sde: Family, chunk: int = 1024) -> Callable[[Array, Array, Array], Array]:
    """``apply(data, u, t_batch)`` -> D*(u, t) of the data set ``data`` (n, *data_shape), shape (batch, *data).

    The data set is an argument (like a network's parameters), so one compiled sampler serves any data set
    of a given shape and no data is lowered as a constant. :func:`exact.empirical_denoiser` streams the data
    in ``chunk`` rows (a modal family's basis change happens inside, on the family's data shape).
    """
    k = sde.order

    def apply(data: Array, u: Array, t: Array) -> Array:
        data_shape = data.shape[1:]
        if u.shape[1:] != data_shape + (k,):
            raise ValueError(f"u must have shape (batch, *{data_shape}, {k}), got {u.shape}")
        return exact.empirical_denoiser(sde, data, u, t, chunk).astype(u.dtype)

    return apply


def _as_data(data: Array) -> Array:
    data = jnp.asarray(data)
    if data.ndim < 2:
        raise ValueError(f"data must have shape (n, *data_shape), got {data.shape}")
    return data


def empirical_denoiser_fn(sde: Family, data: Array, chunk: int = 1024) -> Callable[[Array, Array], Array]:
    """``fn(u, t_batch)`` -> D*(u, t) for ``samplers.sample(..., output="denoiser")`` (a convenience closure of
    :func:`empirical_denoiser_apply` over ``data``; pass ``params=data`` to that one to compile once)."""
    data = _as_data(data)
    apply = empirical_denoiser_apply(sde, chunk)
    return lambda u, t: apply(data, u, t)


@functools.lru_cache(maxsize=64)
def _denoiser_run(sde: Family, apply: Callable, output: str, kind: str) -> Callable:
    sqrt = square_root(sde, kind)

    def run(params, tr, tt):
        model = Model(sde, lambda u, t: apply(params, u, t), output, sqrt)
        return lax.map(lambda a: model.all(a[0], a[1])[2], (tr, tt))
    return jax.jit(run)


def denoiser_along(sde: Family, fn: Callable, traj: Array, ts: Array, output: str = "eps",
                   K: str | SquareRoot = "R", params: Any = None) -> Array:
    """D(u_{t_i}, t_i) for every state of a trajectory (N+1, batch, *data, k): shape (N+1, batch, *data).

    ``fn(u, t)`` (or ``fn(params, u, t)`` with ``params``) returns ``output`` ("eps" w.r.t. ``K``, "score" or
    "denoiser"); one evaluation per time point, run sequentially (``lax.map``) so memory stays that of one batch.
    """
    traj = jnp.asarray(traj)
    ts = jnp.asarray(np.asarray(ts, np.float64), traj.dtype)
    if ts.shape != traj.shape[:1]:
        raise ValueError(f"{traj.shape[0]} states but {ts.shape[0]} times")
    apply = fn if params is not None else with_params(fn)
    kind = K.kind if isinstance(K, SquareRoot) else K
    return _denoiser_run(sde, apply, output, kind)(params, traj, ts)


def _norm(a: Array) -> np.ndarray:
    a = np.asarray(a, np.float64)
    return np.linalg.norm(a.reshape(a.shape[0], a.shape[1], -1), axis=-1)


def score_deviation(sde: Family, learned_fn: Callable, data: Array, u_init: Array, *, method: str,
                    nfe: int | None = None, output: str = "eps", K: str | SquareRoot = "R", chunk: int = 1024,
                    learned_params: Any = None, **sample_kwargs: Any) -> dict[str, Any]:
    """Learned versus optimal sampling from the same ``u_init``: the four distances of the module docstring.

    ``learned_fn(u, t)`` (or ``learned_fn(params, u, t)`` with ``learned_params``) returns ``output`` (w.r.t. ``K``); the optimal model is :func:`empirical_denoiser_fn` of
    ``data`` (n, *data). Both runs use :func:`samplers.sample` with ``method``, ``nfe`` and ``sample_kwargs``
    (pass ``key`` for stochastic samplers: both runs then see the same noise). All denoisers are evaluated
    afresh at the N+1 trajectory times (both models on both paths: 2 (N+1) evaluations of a doubled batch
    beyond the sampling, reported as ``nfe_analysis``), so every sampler is measured at the same points,
    whatever it evaluates internally.

    Returns a dict: ``ts`` (N+1,), ``sigma`` (noise level at ts), ``sampling``, ``denoising``,
    ``learned_deviation``, ``optimal_deviation`` (each (N+1, batch)), ``state_distance`` (the full phase-space
    state, (N+1, batch)), the trajectories ``traj_learned``/``traj_optimal`` (N+1, batch, *data, k), the
    denoiser outputs ``D_learned``/``D_optimal`` along their own paths, the final samples (data coordinate)
    ``x_learned``/``x_optimal``, and ``nfe`` (sampling cost of each run).
    """
    data = _as_data(data)
    opt_apply = empirical_denoiser_apply(sde, chunk)
    _, info_l = sample(sde, learned_fn, u_init, method=method, nfe=nfe, params=learned_params, output=output, K=K,
                       return_trajectory=True, **sample_kwargs)
    _, info_o = sample(sde, opt_apply, u_init, method=method, nfe=nfe, params=data, output="denoiser", K=K,
                       return_trajectory=True, **sample_kwargs)
    ts = np.asarray(info_l.ts, np.float64)
    if not np.allclose(ts, np.asarray(info_o.ts, np.float64)):
        raise RuntimeError("the two runs saved their trajectories at different times")
    tr_l, tr_o = info_l.trajectory, info_o.trajectory
    # both paths side by side in the batch: one compiled evaluation per model
    both = jnp.concatenate([tr_l, tr_o], axis=1)
    b = tr_l.shape[1]
    d_learned = np.asarray(denoiser_along(sde, learned_fn, both, ts, output, K, params=learned_params))
    d_opt = np.asarray(denoiser_along(sde, opt_apply, both, ts, "denoiser", K, params=data))
    dl_l, dl_o = d_learned[:, :b], d_learned[:, b:]                  # D_theta(u^theta), D_theta(u*)
    do_l, do_o = d_opt[:, :b], d_opt[:, b:]                          # D*(u^theta), D*(u*)
    return dict(
        ts=ts, sigma=noise_level(sde, ts),
        sampling=_norm(np.asarray(tr_l)[..., 0] - np.asarray(tr_o)[..., 0]),
        state_distance=_norm(np.asarray(tr_l) - np.asarray(tr_o)),
        denoising=_norm(np.asarray(dl_l) - np.asarray(do_o)),
        learned_deviation=_norm(np.asarray(dl_l) - np.asarray(do_l)),
        optimal_deviation=_norm(np.asarray(dl_o) - np.asarray(do_o)),
        traj_learned=np.asarray(tr_l), traj_optimal=np.asarray(tr_o),
        D_learned=np.asarray(dl_l), D_optimal=np.asarray(do_o),
        x_learned=np.asarray(tr_l)[-1, ..., 0], x_optimal=np.asarray(tr_o)[-1, ..., 0],
        nfe=dict(learned=info_l.nfe, optimal=info_o.nfe), nfe_analysis=2 * len(ts))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _top_k_sq_dist(x: Array, y_all: Array, k: int, chunk: int) -> tuple[Array, Array]:
    """Running top-k of squared distances from each row of x (M, P) to the rows of y_all (n, P)."""
    m, n = x.shape[0], y_all.shape[0]

    def update(carry, y, offset):
        best_d, best_i = carry
        diff = x[:, None, :] - y[None, :, :]
        dist = jnp.sum(diff * diff, axis=-1)                                   # (M, c)
        idx = offset + jnp.arange(y.shape[0])
        all_d = jnp.concatenate([best_d, dist], axis=1)
        all_i = jnp.concatenate([best_i, jnp.broadcast_to(idx, dist.shape)], axis=1)
        neg, pos = lax.top_k(-all_d, k)
        return -neg, jnp.take_along_axis(all_i, pos, axis=1)

    carry = (jnp.full((m, k), jnp.inf, x.dtype), jnp.full((m, k), -1, jnp.int32))
    n_full = n // chunk
    if n_full > 0:
        carry, _ = lax.scan(
            lambda c, i: (update(c, lax.dynamic_slice_in_dim(y_all, i * chunk, chunk, 0), i * chunk), None),
            carry, jnp.arange(n_full))
    if n_full * chunk < n:
        carry = update(carry, y_all[n_full * chunk:], n_full * chunk)
    return carry


def nearest_neighbors(samples: Array, data: Array, k: int = 2, chunk: int = 1024) -> dict[str, np.ndarray]:
    """The ``k`` nearest training points of each sample (Euclidean, all data dimensions flattened).

    ``samples`` (M, *shape), ``data`` (n, *shape). The data are streamed in chunks of ``chunk`` rows with a
    running top-k (memory O(M chunk P)); distances come from explicit differences, so a copied training point
    has distance exactly 0. Returns ``distance`` (M, k) and ``index`` (M, k), ascending, and, for k >= 2,
    ``ratio`` = d_1 / d_2 (near 0 for a memorised sample; 1/3 is a common threshold).
    """
    samples = jnp.asarray(samples)
    data = jnp.asarray(data)
    if samples.shape[1:] != data.shape[1:]:
        raise ValueError(f"samples {samples.shape[1:]} and data {data.shape[1:]} differ in shape")
    n = data.shape[0]
    if not (isinstance(k, (int, np.integer)) and 1 <= k <= n):
        raise ValueError(f"k must be an integer in [1, n={n}], got {k!r}")
    dtype = jnp.result_type(samples.dtype, float)
    x = samples.reshape(samples.shape[0], -1).astype(dtype)
    y_all = data.reshape(n, -1).astype(dtype)
    chunk = int(max(1, min(int(chunk), n)))
    d2, idx = _top_k_sq_dist(x, y_all, int(k), chunk)
    dist = np.sqrt(np.asarray(d2, np.float64))
    out = dict(distance=dist, index=np.asarray(idx))
    if k >= 2:
        with np.errstate(invalid="ignore", divide="ignore"):
            out["ratio"] = dist[:, 0] / dist[:, 1]
    return out
