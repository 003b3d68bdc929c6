"""Exact mixture / empirical scores and denoisers (float32 JAX) against independent float64 references.

References are brute force on the full d*k-dimensional state: component i is N(kron(mu_i, m_t), kron(I_d, C_i))
with C_i = v_i m_t m_t^T + Sigma_t (m_t, Sigma_t from the host float64 ``transition_np``/``covariance_np``),
factored as a dense (d k) x (d k) matrix; they are themselves checked against scipy's logpdf and against
central finite differences of it. Inputs are rounded to float32 first and the references see those values.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from diffusion_jax import exact, param, sdes

FAMILIES = [("vp", {}), ("ve", {}), ("cld", {}), ("told", {}), ("psld", {}), ("cdhold", {"n": 4})]
FAMILY_IDS = ["vp", "ve", "cld", "told", "psld", "cdhold4"]
TIMES = [1e-3, 0.1, 1.0]
EPS32 = float(np.finfo(np.float32).eps)


@functools.lru_cache(maxsize=None)
def _family(name, items):
    return sdes.make(name, **dict(items))


def family(name, params):
    return _family(name, tuple(sorted(params.items())))


# ------------------------------------------------------------------ batched, jitted float32 functions
# One compiled function per family and shape (compiling the SDE core dominates the run time).
def as_states(sde, us):
    """Flat states (n, d, k) -> the library's (batch, *data, k): a modal family needs its data shape."""
    us = jnp.asarray(us)
    return us.reshape(us.shape[:1] + tuple(sde.data_shape) + us.shape[-1:]) if sde.mode_ndim else us


@functools.partial(jax.jit, static_argnums=0)
def j_mixture(sde, mix, us, t, kmat):
    """Every mixture quantity for a batch of flat states (n, d, k) at one time t; kmat: a root of Sigma_t."""
    u = as_states(sde, us)
    logp = exact.mixture_log_density(sde, mix, u, t)
    # the examples are independent, so the gradient of the sum is the per-example gradient
    grad = jax.grad(lambda v: jnp.sum(exact.mixture_log_density(sde, mix, v, t)))(u)
    return dict(score=exact.mixture_score(sde, mix, u, t).reshape(us.shape),
                den=exact.mixture_denoiser(sde, mix, u, t).reshape(us.shape[:-1]),
                logp=logp, grad=grad.reshape(us.shape),
                eps_l=exact.mixture_eps(sde, mix, u, t, "L").reshape(us.shape),
                eps_k=exact.mixture_eps(sde, mix, u, t, lambda _: kmat).reshape(us.shape))


def mixture_outputs(sde, mix, us, t, kmat=None):
    kmat = np.eye(sde.order) if kmat is None else kmat
    out = j_mixture(sde, mix, jnp.asarray(us), t, jnp.asarray(kmat, jnp.float32))
    return {key: np.asarray(val, np.float64) for key, val in out.items()}


@functools.partial(jax.jit, static_argnums=(0, 4))
def j_empirical(sde, data, us, t, chunk):
    """(empirical denoiser, empirical score, Dirac-mixture denoiser, Dirac-mixture score) for flat states."""
    n = data.shape[0]
    dirac = exact.GaussianMixture(data, jnp.zeros((n,), data.dtype), jnp.full((n,), 1.0 / n, data.dtype))
    u = as_states(sde, us)
    return (exact.empirical_denoiser(sde, data, u, t, chunk).reshape(us.shape[:-1]),
            exact.empirical_score(sde, data, u, t, chunk).reshape(us.shape),
            exact.mixture_denoiser(sde, dirac, u, t).reshape(us.shape[:-1]),
            exact.mixture_score(sde, dirac, u, t).reshape(us.shape))


def empirical_outputs(sde, data, us, t, chunk=64):
    return tuple(np.asarray(a, np.float64) for a in j_empirical(sde, jnp.asarray(data), jnp.asarray(us), t, chunk))


# ------------------------------------------------------------------ float64 brute-force references
def moments64(sde, t):
    return sde.transition_np(t=t, s=0.0)[:, 0], sde.covariance_np(t)


def ref_components(sde, means, var, t):
    """Per component: full mean (d k,), Cholesky factor of kron(I_d, C_i), and C_i."""
    m, sig = moments64(sde, t)
    d = means.shape[1]
    out = []
    for mu, v in zip(means, var):
        c = v * np.outer(m, m) + sig
        out.append((np.outer(mu, m).ravel(), np.linalg.cholesky(np.kron(np.eye(d), c)), c))
    return out


def ref_logits(comps, weights, u):
    """log w_i + log N(vec u; mean_i, kron(I, C_i)) and the per-component C_i^{-1}(u - mean_i), float64."""
    x = u.ravel()
    logits, solved = [], []
    for (mean, chol, _), w in zip(comps, weights):
        white = scipy.linalg.solve_triangular(chol, x - mean, lower=True)
        logits.append(math.log(w) - 0.5 * white @ white - np.log(np.diag(chol)).sum()
                      - 0.5 * x.size * math.log(2 * math.pi))
        solved.append(scipy.linalg.solve_triangular(chol, white, lower=True, trans="T"))
    return np.array(logits), np.array(solved)


def ref_log_density(sde, means, var, weights, u, t):
    return logsumexp(ref_logits(ref_components(sde, means, var, t), weights, u)[0])


def ref_score(sde, means, var, weights, u, t, with_scale=False):
    """The score; with_scale: also sum_i r_i |C_i^{-1}(u - m mu_i)|, the size of the terms the mixture sums
    (the score itself may cancel to ~0 between components, e.g. midway between two of them)."""
    logits, solved = ref_logits(ref_components(sde, means, var, t), weights, u)
    resp = np.exp(logits - logsumexp(logits))
    score = -(resp @ solved).reshape(u.shape)
    return (score, resp @ np.linalg.norm(solved, axis=1)) if with_scale else score


def ref_denoiser(sde, means, var, weights, u, t):
    """sum_i r_i (mu_i + v_i m^T C_i^{-1} (u_j - m mu_ij)), the explicit Gaussian posterior, float64."""
    comps = ref_components(sde, means, var, t)
    logits, _ = ref_logits(comps, weights, u)
    resp = np.exp(logits - logsumexp(logits))
    m, _ = moments64(sde, t)
    post = [mu + v * np.linalg.solve(c, (u - np.outer(mu, m)).T).T @ m
            for mu, v, (_, _, c) in zip(means, var, comps)]
    return resp @ np.array(post)


def ref_empirical(sde, data, u, t):
    """softmax_n(log N(vec u; kron(y_n, m), kron(I_d, Sigma))) weighted mean of y_n, float64, all n at once."""
    m, sig = moments64(sde, t)
    chol = np.linalg.cholesky(np.kron(np.eye(data.shape[1]), sig))
    resid = u.ravel()[None, :] - (data[:, :, None] * m).reshape(len(data), -1)
    white = scipy.linalg.solve_triangular(chol, resid.T, lower=True)
    logit = -0.5 * np.sum(white * white, axis=0)
    p = np.exp(logit - logsumexp(logit))
    return p @ data


def ref_tweedie(sde, den, u, t):
    """-Sigma^{-1}(u_j - m D_j) per data dimension, float64."""
    m, sig = moments64(sde, t)
    return -np.linalg.solve(sig, (u - np.outer(den, m)).T).T


# ------------------------------------------------------------------ test inputs
def make_mixture(case, d=3, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(4, d))
    if case == "gauss":
        return exact.GaussianMixture.create(means, 0.01)
    if case == "mixed":
        return exact.GaussianMixture.create(means, [0.01, 0.04, 1e-4, 0.0025], [0.1, 0.2, 0.3, 0.4])
    if case == "dirac":
        return exact.GaussianMixture.create(means, 0.0, [0.4, 0.3, 0.2, 0.1])
    raise ValueError(case)


def mix64(mix):
    return tuple(np.asarray(a, np.float64) for a in mix)


def states(sde, mix, t, n=6, seed=1):
    """float32 states (n, d, k): on-model draws from p_t, a point between two components, a far point."""
    rng = np.random.default_rng(seed)
    means, var, weights = mix64(mix)
    m, _ = moments64(sde, t)
    chol = sde.cholesky_np(t)
    out = []
    for j in range(n):
        if j == n - 2:
            x0 = 0.5 * (means[0] + means[1])
        else:
            i = rng.choice(len(weights), p=weights / weights.sum())
            x0 = means[i] + math.sqrt(var[i]) * rng.normal(size=means.shape[1])
        z = rng.normal(size=(means.shape[1], sde.order))
        u = np.outer(x0, m) + z @ chol.T
        out.append(3.0 * u if j == n - 1 else u)
    return np.asarray(out, np.float32)


def rel_err(got, ref):
    return np.linalg.norm(np.asarray(got, np.float64) - ref) / np.linalg.norm(ref)


# ------------------------------------------------------------------ GaussianMixture
def test_ring_of_gaussians_and_sampling():
    mix = exact.ring_of_gaussians(8, radius=2.0, variance=0.01)
    assert mix.means.shape == (8, 2) and mix.variances.shape == (8,) and mix.weights.shape == (8,)
    assert mix.means.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(mix.means, axis=1), 2.0, rtol=1e-6)
    np.testing.assert_allclose(mix.weights, 1 / 8, rtol=1e-6)
    np.testing.assert_allclose(mix.variances, 0.01, rtol=1e-6)
    unit = exact.ring_of_gaussians()
    np.testing.assert_allclose(np.linalg.norm(unit.means, axis=1), 1.0, rtol=1e-6)
    x = np.asarray(jax.jit(lambda k: mix.sample(k, 40_000))(jax.random.PRNGKey(0)), np.float64)
    assert x.shape == (40_000, 2)
    np.testing.assert_allclose(x.mean(0), 0.0, atol=0.03)
    np.testing.assert_allclose(np.mean(np.sum(x * x, 1)), 4.0 + 2 * 0.01, rtol=0.01)
    # every sample lies near the ring: |x| - 2 is within ~6 standard deviations of a component
    assert np.all(np.abs(np.linalg.norm(x, axis=1) - 2.0) < 0.6)


def test_sampling_respects_weights_and_variances():
    mix = exact.GaussianMixture.create([[-5.0], [5.0]], [0.0, 0.25], [0.25, 0.75])
    x = np.asarray(mix.sample(jax.random.PRNGKey(1), 40_000))[:, 0]
    left, right = x[x < 0], x[x > 0]
    assert np.all(left == -5.0)
    assert abs(len(right) / len(x) - 0.75) < 0.01
    assert abs(right.var() - 0.25) < 0.01


@pytest.mark.parametrize("kwargs, match", [
    (dict(means=[1.0, 2.0]), "shape"),
    (dict(means=[[0.0], [1.0]], variances=[-0.1, 0.1]), ">= 0"),
    (dict(means=[[0.0], [1.0]], weights=[0.3, 0.3]), "sum to 1"),
    (dict(means=[[0.0], [1.0]], weights=[0.5, 0.25, 0.25]), "shape"),
    (dict(means=[[0.0], [np.nan]]), "finite"),
])
def test_mixture_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        exact.GaussianMixture.create(**kwargs)


def test_bad_state_shapes():
    sde = family("cld", {})
    mix = make_mixture("gauss")
    with pytest.raises(ValueError, match=r"\(batch, \*data, k=2\)"):
        exact.mixture_score(sde, mix, jnp.zeros((3,)), 0.1)
    with pytest.raises(ValueError, match="data dimensions"):     # one (d, k) state without its batch axis
        exact.mixture_score(sde, mix, jnp.zeros((3, 2)), 0.1)
    with pytest.raises(ValueError, match=r"scalar or have shape \(batch,\)"):
        exact.mixture_denoiser(sde, mix, jnp.zeros((4, 3, 2)), jnp.ones(2))
    with pytest.raises(ValueError, match="dimensions"):
        exact.empirical_denoiser(sde, jnp.zeros((10, 4)), jnp.zeros((1, 3, 2)), 0.1)
    with pytest.raises(ValueError, match="K must be one of"):
        exact.mixture_eps(sde, mix, jnp.zeros((1, 3, 2)), 0.1, "cholesky")


# ------------------------------------------------------------------ the references themselves
@pytest.mark.parametrize("name, params", FAMILIES, ids=FAMILY_IDS)
def test_reference_matches_scipy_logpdf_and_finite_differences(name, params):
    sde = family(name, params)
    mix = make_mixture("mixed", d=2)
    means, var, weights = mix64(mix)
    for t in TIMES:
        m, sig = moments64(sde, t)
        u = states(sde, mix, t, n=3).astype(np.float64)[0]

        def scipy_logp(x):
            return logsumexp([math.log(w) + multivariate_normal(np.outer(mu, m).ravel(),
                                                                np.kron(np.eye(2), v * np.outer(m, m) + sig)
                                                                ).logpdf(x.ravel())
                              for mu, v, w in zip(means, var, weights)])

        assert abs(ref_log_density(sde, means, var, weights, u, t) - scipy_logp(u)) < 1e-9 * (1 + abs(scipy_logp(u)))
        # central differences, step scaled to the smallest standard deviation of the components
        lam = min(np.linalg.eigvalsh(v * np.outer(m, m) + sig)[0] for v in var)
        h = 1e-4 * math.sqrt(lam)
        fd = np.zeros_like(u)
        for idx in np.ndindex(u.shape):
            e = np.zeros_like(u)
            e[idx] = h
            fd[idx] = (scipy_logp(u + e) - scipy_logp(u - e)) / (2 * h)
        ref = ref_score(sde, means, var, weights, u, t)
        assert rel_err(fd, ref) < 1e-6, (t, fd, ref)


# ------------------------------------------------------------------ mixture score / density / denoiser
@pytest.mark.parametrize("name, params", FAMILIES, ids=FAMILY_IDS)
def test_mixture_score_density_denoiser_eps_match_float64(name, params):
    """Gaussian components (v_i = 0.01, and mixed v_i in [1e-4, 0.04] with unequal weights) at t in TIMES:
    C_i is well conditioned, so float32 must match float64 to ~1e-6 (asserted: 1e-4 relative)."""
    sde = family(name, params)
    k = sde.order
    rot = np.linalg.qr(np.random.default_rng(3).normal(size=(k, k)))[0]
    for case in ["gauss", "mixed"]:
        mix = make_mixture(case)
        means, var, weights = mix64(mix)
        for t in [0.0] + TIMES:                                 # t = 0: Sigma_0 singular, C_i is not
            us = states(sde, mix, t)
            chol = sde.cholesky_np(t)
            kmat = chol @ rot                                   # another square root of Sigma_t (gDDIM-like)
            out = mixture_outputs(sde, mix, us, t, kmat)
            for j, u in enumerate(us.astype(np.float64)):
                where = (case, t, j)
                ref, scale = ref_score(sde, means, var, weights, u, t, with_scale=True)
                assert np.linalg.norm(out["score"][j] - ref) < 1e-4 * scale, where
                assert np.linalg.norm(out["grad"][j] - ref) < 1e-4 * scale, where
                ref_lp = ref_log_density(sde, means, var, weights, u, t)
                assert abs(out["logp"][j] - ref_lp) < 1e-5 * (abs(ref_lp) + u.size), where
                np.testing.assert_allclose(out["den"][j], ref_denoiser(sde, means, var, weights, u, t),
                                           atol=1e-5, rtol=0, err_msg=str(where))
                # eps = -K^T score, for K = L_t and K = L_t R; and back: score = -K^{-T} eps
                if t > 0:                                       # (k = 1 at t = 0: K = 0, eps = 0)
                    assert rel_err(out["eps_l"][j], -ref @ chol) < 1e-4, where
                    assert rel_err(out["eps_k"][j], -ref @ kmat) < 1e-4, where
                if t >= 0.1:   # at t = 1e-3, K^{-T} (cond ~1e7) amplifies eps's float32 rounding past 1e-4
                    assert rel_err(-scipy.linalg.solve(kmat.T, out["eps_k"][j].T).T, ref) < 1e-4, where


@pytest.mark.parametrize("name, params", FAMILIES, ids=FAMILY_IDS)
def test_tweedie_holds_for_gaussian_components_too(name, params):
    """grad log p_t(u) = -Sigma^{-1}(u - m E[x_0|u]) for any prior, so also for v_i > 0: float64 check of the
    maths, and float32 check of score and eps (eps = L^{-1}(u - m D)) against the float32 denoiser where
    Sigma_t^{-1} m does not amplify the denoiser's rounding too much (t >= 0.1)."""
    sde = family(name, params)
    for case in ["gauss", "mixed", "dirac"]:
        mix = make_mixture(case)
        means, var, weights = mix64(mix)
        for t in [0.1, 1.0]:
            us = states(sde, mix, t)
            out = mixture_outputs(sde, mix, us, t)
            m, _ = moments64(sde, t)
            chol = sde.cholesky_np(t)
            for j, u in enumerate(us.astype(np.float64)):
                den = ref_denoiser(sde, means, var, weights, u, t)
                ref = ref_score(sde, means, var, weights, u, t)
                assert rel_err(ref_tweedie(sde, den, u, t), ref) < 1e-8, (case, t, j)
                assert rel_err(out["score"][j], ref_tweedie(sde, out["den"][j], u, t)) < 1e-3, (case, t, j)
                tw = scipy.linalg.solve_triangular(chol, (u - np.outer(out["den"][j], m)).T, lower=True).T
                assert rel_err(out["eps_l"][j], tw) < 1e-4, (case, t, j)


# ------------------------------------------------------------------ Dirac mixtures (v_i = 0)
DIRAC_CASES = [(n, p, t) for (n, p) in FAMILIES for t in TIMES if t >= 0.1 or n in ("vp", "ve", "cld", "psld")]


@pytest.mark.parametrize("name, params", FAMILIES, ids=FAMILY_IDS)
def test_dirac_mixture_matches_float64(name, params):
    """v_i = 0 (C_i = Sigma_t): checked wherever a float32 state resolves x_0 (every family at t >= 0.1;
    k <= 2 at t = 1e-3); see test_dirac_score_at_small_t_is_limited_by_float32_state for the rest."""
    sde = family(name, params)
    mix = make_mixture("dirac")
    means, var, weights = mix64(mix)
    for t in [t for (n, p, t) in DIRAC_CASES if n == name]:
        us = states(sde, mix, t)
        out = mixture_outputs(sde, mix, us, t)
        chol = sde.cholesky_np(t)
        for j, u in enumerate(us.astype(np.float64)):
            ref = ref_score(sde, means, var, weights, u, t)
            assert rel_err(out["score"][j], ref) < 1e-4, (t, j, out["score"][j], ref)
            assert rel_err(out["eps_l"][j], -ref @ chol) < 1e-4, (t, j)
            np.testing.assert_allclose(out["den"][j], ref_denoiser(sde, means, var, weights, u, t),
                                       atol=1e-5, rtol=0)


@pytest.mark.parametrize("name, params, floor", [("told", {}, 3e-3), ("cdhold", {"n": 4}, 0.3)],
                         ids=["told", "cdhold4"])
def test_dirac_score_at_small_t_is_limited_by_float32_state(name, params, floor):
    """At t = 1e-3 rounding u to float32 alone moves the exact Dirac score by `floor` or more (relative):
    the documented intrinsic limit. The float32 result is finite and within a small factor of it."""
    sde = family(name, params)
    t = 1e-3
    mix = make_mixture("dirac")
    means, var, weights = mix64(mix)
    chol = sde.cholesky_np(t)
    m, _ = moments64(sde, t)

    def score64(u):   # float64 through the backward-stable factor (kron(I, Sigma) is too ill conditioned)
        logits = np.array([math.log(w) - 0.5 * np.sum(scipy.linalg.solve_triangular(
            chol, (u - np.outer(mu, m)).T, lower=True) ** 2) for mu, w in zip(means, weights)])
        resp = np.exp(logits - logsumexp(logits))
        den = resp @ means
        return -scipy.linalg.solve_triangular(chol, scipy.linalg.solve_triangular(
            chol, (u - np.outer(den, m)).T, lower=True), lower=True, trans="T").T

    us = states(sde, mix, t)
    score = mixture_outputs(sde, mix, us, t)["score"]
    assert np.all(np.isfinite(score))
    rng = np.random.default_rng(5)
    for j, u in enumerate(us.astype(np.float64)[:3]):          # on-model draws
        ref = score64(u)
        sens = max(rel_err(score64(u * (1 + 0.5 * EPS32 * rng.uniform(-1, 1, u.shape))), ref) for _ in range(4))
        assert sens > floor, sens
        assert rel_err(score[j], ref) < 10 * sens, (rel_err(score[j], ref), sens)


@pytest.mark.parametrize("name, params", FAMILIES + [("cdhold", {"n": 6})], ids=FAMILY_IDS + ["cdhold6"])
def test_finite_at_t_min(name, params):
    """At t_min = 1e-5 (m^T Sigma^{-1} m ~ 1e41 for CD-HOLD n=6, past the float32 range) every output is
    finite and, for Dirac data, the posterior is one-hot on the generating point."""
    sde = family(name, params)
    t = sde.t_min
    for case in ["gauss", "dirac"]:
        mix = make_mixture(case)
        us = states(sde, mix, t)
        out = mixture_outputs(sde, mix, us, t)
        for key in ["score", "den", "eps_l", "logp", "grad"]:
            assert np.all(np.isfinite(out[key])), (case, key)   # the far point included (Dirac score ~1e28)
        if case == "dirac":   # on-model draws: the posterior is one-hot on the generating point
            dist = np.abs(out["den"][:4, None, :] - np.asarray(mix.means)[None]).max(-1).min(-1)
            assert np.all(dist < 1e-6), dist
            if name == "cdhold":
                emp = np.asarray(jax.jit(lambda u: exact.empirical_denoiser(sde, mix.means, u, t, 3))(
                    jnp.asarray(us)))
                assert np.all(np.isfinite(emp))
                np.testing.assert_array_equal(emp[:4], out["den"][:4])


# ------------------------------------------------------------------ empirical data sets
def data_states(sde, data, t, n=6, seed=2):
    rng = np.random.default_rng(seed)
    m, _ = moments64(sde, t)
    chol = sde.cholesky_np(t)
    out = []
    for j in range(n):
        x0 = data[rng.integers(len(data))] if j % 2 == 0 else 0.5 * (data[j] + data[j + 1])
        out.append(np.outer(x0, m) + rng.normal(size=(data.shape[1], sde.order)) @ chol.T)
    return np.asarray(out, np.float32)


EMP_TIMES = [1e-3, 0.05, 0.3, 1.0]


@pytest.mark.parametrize("name, params", FAMILIES, ids=FAMILY_IDS)
def test_empirical_denoiser_matches_bruteforce_and_dirac_mixture(name, params):
    sde = family(name, params)
    rng = np.random.default_rng(7)
    data = rng.normal(size=(300, 5)).astype(np.float32)
    data64 = data.astype(np.float64)
    for t in EMP_TIMES:
        us = data_states(sde, data64, t)
        den, score, mix_den, mix_score = empirical_outputs(sde, data, us, t, 64)   # 64 does not divide 300
        for j, u in enumerate(us.astype(np.float64)):
            ref = ref_empirical(sde, data64, u, t)
            np.testing.assert_allclose(den[j], ref, atol=1e-5, rtol=0, err_msg=f"t={t} j={j}")
            np.testing.assert_allclose(mix_den[j], den[j], atol=1e-5, rtol=0, err_msg=f"t={t} j={j}")
            if t >= 0.05 or sde.order <= 2:   # where a float32 state resolves the Dirac score (see above)
                ref_s = ref_tweedie(sde, ref, u, t)
                assert rel_err(score[j], ref_s) < 1e-4 and rel_err(mix_score[j], ref_s) < 1e-4, (t, j)


def test_empirical_chunking_and_vmap_over_time():
    sde = family("cdhold", {"n": 4})
    rng = np.random.default_rng(8)
    data = rng.normal(size=(300, 5)).astype(np.float32)
    t = 0.3
    us = data_states(sde, data.astype(np.float64), t)
    den = jax.jit(lambda u, c: exact.empirical_denoiser(sde, jnp.asarray(data), u, t, c), static_argnums=1)
    base = np.asarray(den(jnp.asarray(us), 64))
    for chunk in [7, 1024]:                              # 1024 > N: one chunk
        np.testing.assert_allclose(np.asarray(den(jnp.asarray(us), chunk)), base, atol=2e-6, rtol=0,
                                   err_msg=f"chunk={chunk}")
    ts = jnp.asarray([0.05, 0.1, 0.3, 0.5, 0.8, 1.0])
    batched = jax.jit(lambda u, tt: exact.empirical_denoiser(sde, jnp.asarray(data), u, tt, 64))(
        jnp.asarray(us), ts)                             # per-example times
    for j in range(len(ts)):
        ref = ref_empirical(sde, data.astype(np.float64), us[j].astype(np.float64), float(ts[j]))
        np.testing.assert_allclose(np.asarray(batched[j]), ref, atol=1e-5, rtol=0)


def test_gls_estimate_is_the_sufficient_statistic():
    """log N(u; m y, Sigma) - log N(u; m y', Sigma) = -(|xhat - y|^2 - |xhat - y'|^2) / (2 sigma_eff^2)."""
    sde = family("told", {})
    t = 0.05
    rng = np.random.default_rng(9)
    m, sig = moments64(sde, t)
    u = (np.outer(rng.normal(size=3), m) + rng.normal(size=(3, 3)) @ sde.cholesky_np(t).T).astype(np.float32)
    xhat, s2 = (np.asarray(a[0], np.float64) for a in exact.gls_estimate(sde, jnp.asarray(u)[None], t))
    u = u.astype(np.float64)
    prec = np.linalg.inv(sig)
    xh = (u @ prec @ m) / (m @ prec @ m)
    np.testing.assert_allclose(xhat, xh, rtol=1e-5)
    np.testing.assert_allclose(s2, 1.0 / (m @ prec @ m), rtol=1e-5)
    y, y2 = rng.normal(size=(2, 3))
    quad = lambda y: np.einsum("jk,kl,jl", u - np.outer(y, m), prec, u - np.outer(y, m))
    rhs = -(np.sum((xh - y) ** 2) - np.sum((xh - y2) ** 2)) * 0.5 * (m @ prec @ m)
    assert abs(-0.5 * (quad(y) - quad(y2)) - rhs) < 1e-8 * (1 + abs(rhs))


def test_empirical_denoiser_image_sized_data():
    """1500 points of 3072 dims stream through chunks of 512 (ragged last chunk) and match float64.

    The logits are sums over 3072 dims (~1e3 here), so float32 rounding of a logit is ~1e-4 absolute and
    the weights carry ~1e-4 relative errors: the tolerance is 5e-5 on outputs of size ~0.3."""
    sde = family("cld", {})
    rng = np.random.default_rng(10)
    n, d = 1500, 3072
    data = rng.uniform(-1, 1, size=(n, d)).astype(np.float32)
    t = 0.6
    m, sig = moments64(sde, t)
    chol = sde.cholesky_np(t)
    x0 = np.stack([data[3], 0.5 * (data[5] + data[6])]).astype(np.float64)
    us = (x0[:, :, None] * m + rng.normal(size=(2, d, 2)) @ chol.T).astype(np.float32)
    got = np.asarray(jax.jit(lambda u: exact.empirical_denoiser(sde, jnp.asarray(data), u, t, 512))(
        jnp.asarray(us)), np.float64)
    prec = np.linalg.inv(sig)
    data64 = data.astype(np.float64)
    for j, u in enumerate(us.astype(np.float64)):
        # per-dimension quadratic form, summed over dims, for every data point (float64)
        r = u[None] - data64[:, :, None] * m                      # (n, d, k)
        logit = -0.5 * np.einsum("ndk,kl,ndl->n", r, prec, r)
        p = np.exp(logit - logsumexp(logit))
        assert 1.0 / np.sum(p * p) > 2                            # the weights are genuinely spread
        np.testing.assert_allclose(got[j], p @ data64, atol=5e-5, rtol=0)


# ------------------------------------------------------------------ modal families: blurring diffusion (bdm)
# Independent float64 pixel-space references: the mean operator M_t = V diag(a_f(t)) V^T is built column by
# column with scipy's orthonormal DCT (not the library's), a_f and sigma_t from the closed forms of Hoogeboom &
# Salimans written out here, and the mixture is sum_i w_i N(M_t mu_i, v_i M_t M_t^T + sigma_t^2 I) on R^d.
BDM = dict(sigma_blur_max=3.0, d_min=0.001, logsnr_min=-10.0)
BDM_SHAPES = [(4, 4, 1), (4, 4, 2)]
BDM_TIMES = [1e-3, 0.1, 0.5, 1.0]


@functools.lru_cache(maxsize=None)
def bdm_family(shape):
    return sdes.make("bdm", shape=shape, **BDM)


def bdm_law64(shape, t):
    """(M_t (d x d), sigma_t^2) in pixel space, float64, from the closed forms (T = 1)."""
    from scipy.fft import dctn, idctn
    h, w = shape[:2]
    i, j = np.arange(h)[:, None], np.arange(w)[None, :]
    lam = np.pi ** 2 * (i ** 2 / h ** 2 + j ** 2 / w ** 2)                    # (H, W)
    phi_t = math.atan(math.exp(-BDM["logsnr_min"] / 2))
    s_blur = BDM["sigma_blur_max"] * math.sin(math.pi * t / 2) ** 2
    a = math.cos(phi_t * t) * ((1 - BDM["d_min"]) * np.exp(-lam * s_blur ** 2 / 2) + BDM["d_min"])
    d = int(np.prod(shape))
    eye = np.eye(d).reshape((d,) + tuple(shape))                              # unit images e_n
    cols = idctn(a[None, :, :, None] * dctn(eye, axes=(1, 2), norm="ortho"), axes=(1, 2), norm="ortho")
    return cols.reshape(d, d).T, math.sin(phi_t * t) ** 2                       # column n = M_t e_n


def bdm_ref(mix, u, t, shape):
    """float64 reference of the pixel-space mixture at u (d,): a dict with log p_t(u) ``logp``, ``score``,
    denoiser ``den``, ``scale`` = sum_i r_i |C_i^{-1}(u - M mu_i)| (the size of the terms the score sums) and
    the float32 floors ``score_floor`` / ``den_floor`` of the two mixtures. A logit is a sum of d squares, so
    float32 rounds it by ~eps32 max_i quad_i / 2, and sum_i r_i q_i then moves by up to
    2 max|dlogit| sum_i r_i |q_i - sum r q| (floor: twice that); it matters midway between components."""
    means, var, weights = mix64(mix)
    mt, s2 = bdm_law64(shape, t)
    d = len(u)
    logits, solved, post, quad = [], [], [], []
    for mu, v, w in zip(means, var, weights):
        c = v * mt @ mt.T + s2 * np.eye(d)
        chol = np.linalg.cholesky(c)
        white = scipy.linalg.solve_triangular(chol, u - mt @ mu, lower=True)
        quad.append(white @ white)
        logits.append(math.log(w) - 0.5 * white @ white - np.log(np.diag(chol)).sum() - 0.5 * d * math.log(2 * math.pi))
        sol = scipy.linalg.solve_triangular(chol, white, lower=True, trans="T")   # C_i^{-1} (u - M mu_i)
        solved.append(sol)
        post.append(mu + v * mt.T @ sol)
    logits, solved, post = np.array(logits), np.array(solved), np.array(post)
    resp = np.exp(logits - logsumexp(logits))
    score, den = -resp @ solved, resp @ post
    dlogit = 4 * EPS32 * max(0.5 * max(quad), 1.0)
    return dict(logp=logsumexp(logits), score=score, den=den, scale=resp @ np.linalg.norm(solved, axis=1),
                score_floor=dlogit * (resp @ np.linalg.norm(-solved - score, axis=1)),
                den_floor=dlogit * (resp @ np.abs(post - den).max(axis=1)))


def bdm_state_sensitivity(mix, u, t, shape, ref, n=3, seed=5):
    """How far rounding the state to float32 alone moves the exact score: max over n relative perturbations
    of size eps32 / 2 (the same probe as test_dirac_score_at_small_t_is_limited_by_float32_state)."""
    rng = np.random.default_rng(seed)
    return max(np.linalg.norm(bdm_ref(mix, u * (1 + 0.5 * EPS32 * rng.uniform(-1, 1, u.shape)), t, shape)["score"]
                              - ref["score"]) for _ in range(n))


def bdm_states(mix, t, shape, n=6, seed=1):
    """float32 pixel-space states (n, d, 1): draws from p_t, a point between two components, a far point."""
    rng = np.random.default_rng(seed)
    means, var, weights = mix64(mix)
    mt, s2 = bdm_law64(shape, t)
    out = []
    for j in range(n):
        if j == n - 2:
            x0 = 0.5 * (means[0] + means[1])
        else:
            i = rng.choice(len(weights), p=weights / weights.sum())
            x0 = means[i] + math.sqrt(var[i]) * rng.normal(size=means.shape[1])
        u = mt @ x0 + math.sqrt(s2) * rng.normal(size=means.shape[1])
        out.append(3.0 * u if j == n - 1 else u)
    return np.asarray(out, np.float32)[..., None]


def test_bdm_reference_matches_scipy_and_finite_differences():
    """The float64 reference itself: scipy's logpdf, central differences, and M_t = V diag(a) V^T as the
    identity at t = 0 and as a low-pass (only the flat image keeps its size, up to cos(phi_T t))."""
    shape = (4, 4, 1)
    mix = make_mixture("mixed", d=16)
    means, var, weights = mix64(mix)
    t = 0.5
    mt, s2 = bdm_law64(shape, t)
    np.testing.assert_allclose(bdm_law64(shape, 0.0)[0], np.eye(16), atol=1e-14)
    np.testing.assert_allclose(mt, mt.T, atol=1e-14)
    alpha = math.cos(math.atan(math.exp(5.0)) * t)
    np.testing.assert_allclose(mt @ np.ones(16), alpha * np.ones(16), rtol=1e-12)
    assert np.linalg.norm(mt @ (-1.0) ** np.arange(16)) < 0.5 * alpha * 4
    u = bdm_states(mix, t, shape, n=1)[0, :, 0].astype(np.float64)

    def scipy_logp(x):
        return logsumexp([math.log(w) + multivariate_normal(mt @ mu, v * mt @ mt.T + s2 * np.eye(16)).logpdf(x)
                          for mu, v, w in zip(means, var, weights)])

    ref = bdm_ref(mix, u, t, shape)
    logp, score = ref["logp"], ref["score"]
    assert abs(logp - scipy_logp(u)) < 1e-9 * (1 + abs(logp))
    h = 1e-5
    fd = np.array([(scipy_logp(u + h * e) - scipy_logp(u - h * e)) / (2 * h) for e in np.eye(16)])
    assert rel_err(fd, score) < 1e-6


@pytest.mark.parametrize("shape", BDM_SHAPES, ids=["4x4x1", "4x4x2"])
def test_bdm_mixture_matches_float64_pixel_space(shape):
    """Score (and the autodiff gradient of the log-density), log-density, denoiser and eps of Gaussian, mixed
    and Dirac mixtures under blurring diffusion against the pixel-space float64 reference, t in [1e-3, 1].

    Tolerances: 1e-4 relative (score, eps; against ``scale``) and 1e-5 absolute (denoiser), plus the float32
    floors the reference states: the logit floor (midway between components, where the responsibilities are
    ~1/2 and the logits sums of d squares) and, for the score, 4x the float32 state's own sensitivity (Dirac
    components at t = 1e-3, where sigma_t = 1.6e-3 and the basis change adds a few roundings of |u| to the
    residual). Measured worst ratios err / tolerance are printed (-s)."""
    sde = bdm_family(shape)
    d = int(np.prod(shape))
    k_r = param.square_root(sde, "R")
    worst = {}
    for case in ["gauss", "mixed", "dirac"]:
        mix = make_mixture(case, d=d)
        for t in BDM_TIMES:
            us = bdm_states(mix, t, shape)
            out = j_mixture(sde, mix, jnp.asarray(us), jnp.asarray(t, jnp.float32), k_r(jnp.asarray(t, jnp.float32)))
            out = {key: np.asarray(v, np.float64) for key, v in out.items()}
            s_t = math.sqrt(bdm_law64(shape, t)[1])
            for j, u in enumerate(us[..., 0].astype(np.float64)):
                r = bdm_ref(mix, u, t, shape)
                ref = r["score"]
                tol = 1e-4 * r["scale"] + r["score_floor"] + 4 * bdm_state_sensitivity(mix, u, t, shape, r)
                ratios = dict(score=np.linalg.norm(out["score"][j, :, 0] - ref) / tol,
                              grad=np.linalg.norm(out["grad"][j, :, 0] - ref) / tol,
                              # eps = -K^T score = -sigma_t score (K = L = R = sigma_t for every mode)
                              eps=np.linalg.norm(out["eps_l"][j, :, 0] + s_t * ref) / (s_t * tol),
                              eps_k=np.linalg.norm(out["eps_k"][j, :, 0] + s_t * ref) / (s_t * tol),
                              logp=abs(out["logp"][j] - r["logp"]) / (1e-5 * (abs(r["logp"]) + d)),
                              den=np.abs(out["den"][j] - r["den"]).max() / (1e-5 + r["den_floor"]))
                for key, v in ratios.items():
                    worst[key] = max(worst.get(key, 0.0), v)
                assert max(ratios.values()) < 1.0, ((case, t, j), ratios)
    print(shape, "worst err / tolerance:", {k: f"{v:.2f}" for k, v in worst.items()})


def test_bdm_mixture_eps_checks_the_square_root_shape():
    sde = bdm_family((4, 4, 1))
    mix = make_mixture("gauss", d=16)
    with pytest.raises(ValueError, match="broadcast"):
        exact.mixture_eps(sde, mix, jnp.zeros((1, 4, 4, 1, 1)), 0.5, lambda _: jnp.ones((3, 1, 1)))
    with pytest.raises(ValueError, match=r"the family's data shape"):
        exact.mixture_score(sde, make_mixture("gauss", d=8), jnp.zeros((1, 8, 1)), 0.5)


@pytest.mark.parametrize("shape", BDM_SHAPES, ids=["4x4x1", "4x4x2"])
def test_bdm_empirical_denoiser_and_score_match_float64_softmax(shape):
    """D(u) = softmax_n(-|u - M_t y_n|^2 / (2 sigma_t^2)) y_n in float64 pixel space; the score is Tweedie's
    -(u - M_t D) / sigma_t^2; the Dirac mixture of the same points agrees; chunk sizes do not matter."""
    sde = bdm_family(shape)
    d = int(np.prod(shape))
    rng = np.random.default_rng(11)
    data = rng.uniform(-1, 1, size=(200, d)).astype(np.float32)
    data64 = data.astype(np.float64)
    spreads = []
    for t in [1e-3, 0.05, 0.3, 1.0]:
        mt, s2 = bdm_law64(shape, t)
        x0 = np.stack([data64[3], 0.5 * (data64[5] + data64[6]), data64[9], 0.3 * data64[1]])
        us = (x0 @ mt.T + math.sqrt(s2) * rng.normal(size=x0.shape)).astype(np.float32)[..., None]
        den, score, mix_den, mix_score = empirical_outputs(sde, data, us, t, 64)   # 64 does not divide 200
        den7 = np.asarray(jax.jit(lambda u: exact.empirical_denoiser(sde, jnp.asarray(data), as_states(sde, u),
                                                                     t, 7))(jnp.asarray(us)), np.float64).reshape(den.shape)
        for j, u in enumerate(us[..., 0].astype(np.float64)):
            resid = u[None, :] - data64 @ mt.T
            logit = -0.5 * np.sum(resid * resid, axis=1) / s2
            p = np.exp(logit - logsumexp(logit))
            spreads.append(1.0 / np.sum(p * p))
            ref = p @ data64
            np.testing.assert_allclose(den[j], ref, atol=1e-5, rtol=0, err_msg=f"t={t} j={j}")
            np.testing.assert_allclose(den7[j], den[j], atol=2e-6, rtol=0)
            np.testing.assert_allclose(mix_den[j], ref, atol=1e-5, rtol=0)
            ref_s = -(u - mt @ ref) / s2
            assert rel_err(score[j, :, 0], ref_s) < 1e-4 and rel_err(mix_score[j, :, 0], ref_s) < 1e-4, (t, j)
    # not only nearest-point snapping: at large t the posterior spreads over many points
    assert max(spreads) > 20 and min(spreads) < 1.01, (min(spreads), max(spreads))
