"""Probability-flow likelihoods against closed forms (float32 solves, float64 references).

Data: x_0 ~ N(MU, V I_2). Its exact score for every family comes from ``diffusion_jax.exact`` (a one-component
mixture), and every marginal is Gaussian: per data dimension u_t ~ N(m_t mu_j, C_t), C_t = V m_t m_t^T + Sigma_t
(m_t, Sigma_t from the host float64 ``transition_np`` / ``covariance_np``).

The model's ODE density uses the prior pi at T, while the true p_T of this data is not exactly pi (VP at T=1:
m_T = 6.6e-3 leaves a 5e-3 nats mismatch; CLD at B(T) = 4 a few 1e-2). The identity
log p_eps(u_eps) = log p_T(u_T) + int div f is exact for the true flow, so the references are compared with
``delta_logp + log p_T(u_T)`` (closed-form p_T at the returned end point u_T): that isolates the ODE, the
divergence and the start state from the (correct, but here known) prior term.

Compile time dominates (about 6-10 s per family and trace kind), so every family is compiled once, with one
batch shape, and reused.
"""
import functools
import math

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from diffusion_jax import exact
from diffusion_jax.evaluation import likelihood as lk
from diffusion_jax.sdes import families

MU = np.array([0.5, -0.3])
V = 0.25
X_TEST = np.array([[0.9, -0.8], [0.1, 0.2], [-0.4, 0.7], [1.3, -0.1]])
BATCH = 64                       # one batch shape for every k >= 2 solve (one compilation per family)
ODE_TOL = 1e-3                   # nats: float32 solves with rtol = atol = 1e-5
CALLS = {"n": 0}                 # host-side count of evaluations of the counting fn (vp, ve)


def _count(_):
    CALLS["n"] += 1


@functools.lru_cache(maxsize=None)
def setup(name, items=(), counting=False):
    sde = families.make(name, **dict(items))
    mix = exact.GaussianMixture.create(MU[None], V)

    def fn(u, t):
        if counting:
            jax.debug.callback(_count, t)
        return exact.mixture_score(sde, mix, u, t)
    return sde, fn


# ------------------------------------------------------------------ float64 closed forms
def moments(sde, t):
    m = sde.transition_np(t=t, s=0.0)[:, 0]
    return m, V * np.outer(m, m) + sde.covariance_np(t)


def gauss_logpdf(u, mean, cov):
    """sum over data dimensions j of log N(u[..., j, :]; mean[j], cov), u (B, d, k), mean (d, k)."""
    r = np.asarray(u, np.float64) - mean
    quad = np.einsum("bji,ik,bjk->b", r, np.linalg.inv(cov), r)
    return -0.5 * quad - 0.5 * r.shape[1] * np.linalg.slogdet(2 * np.pi * cov)[1]


def log_pt(sde, t, u):
    m, c = moments(sde, t)
    return gauss_logpdf(u, np.outer(MU, m), c)


def true_prior_delta(sde, res):
    """delta_logp + log p_T(u_T): the ODE's log p_eps with the true p_T in place of the prior."""
    return np.asarray(res.delta_logp, np.float64) + log_pt(sde, sde.T, res.u_T)


def expected_bound(sde, t, x0, aux):
    """E_{a~r}[log p_t(x0, a) - log r(a | x0)] in closed form, and log p_{t,X}(x0)."""
    m, c = moments(sde, t)
    k = sde.order
    if aux == "forward":
        mean_r, cov_r = np.outer(x0, m[1:]), sde.covariance_np(t)[1:, 1:]
    else:
        mean_r, cov_r = np.zeros((len(x0), k - 1)), sde.sigma0[1:, 1:]
    u = np.concatenate([x0[:, None], mean_r], axis=1)[None]
    e_logp = gauss_logpdf(u, np.outer(MU, m), c)[0] - 0.5 * len(x0) * np.trace(np.linalg.inv(c)[1:, 1:] @ cov_r)
    entropy = len(x0) * (0.5 * (k - 1) * (1 + math.log(2 * math.pi)) + 0.5 * np.linalg.slogdet(cov_r)[1])
    log_px = gauss_logpdf(x0[None, :, None], np.outer(MU, m[:1]), c[:1, :1])[0]
    return e_logp + entropy, log_px


K1 = [("vp", ()), ("ve", ())]
K2 = [("cld", ()), ("psld", ()), ("cdhold", (("n", 3),))]


# ------------------------------------------------------------------ k = 1: exact log p_eps(x_0)
@pytest.mark.parametrize("name,items", K1, ids=[n for n, _ in K1])
def test_k1_exact_trace_matches_closed_form(name, items):
    sde, fn = setup(name, items, counting=True)
    x0 = jnp.asarray(X_TEST, jnp.float32)
    CALLS["n"] = 0
    res = lk.log_likelihood(sde, fn, x0, output="score", trace="exact")
    jax.block_until_ready(res.logp)
    jax.effects_barrier()
    # the reference: log N(x0; m mu, m^2 V + sigma^2) at t_eps = t_min, the t_eps-perturbed Gaussian
    ref = log_pt(sde, sde.t_min, X_TEST[:, :, None])
    err = np.abs(true_prior_delta(sde, res) - ref)
    print(f"{name}: |ODE - closed form| max {err.max():.2e} nats, nfe {np.asarray(res.nfe).tolist()}")
    assert err.max() < ODE_TOL
    np.testing.assert_allclose(res.logp, res.prior_logp + res.delta_logp, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(res.log_q_aux, 0.0)
    # nfe is exact: under vmap the batch runs in lock step, so fn runs batch * max(nfe) times
    assert CALLS["n"] == x0.shape[0] * int(np.max(res.nfe))
    assert np.all(np.asarray(res.nfe) == 1 + 6 * np.asarray(res.steps))          # Dopri5 is FSAL


# ------------------------------------------------------------------ k >= 2: full-state density
@pytest.mark.parametrize("name,items", K2, ids=[n for n, _ in K2])
def test_full_state_exact_trace_matches_closed_form(name, items):
    sde, fn = setup(name, items)
    kx, ku = jax.random.split(jax.random.PRNGKey(1))
    x0 = MU + math.sqrt(V) * jax.random.normal(kx, (BATCH, 2))
    u, _ = sde.sample_marginal(ku, x0, jnp.full((BATCH,), sde.t_min))             # u ~ p_{t_min}
    res = lk.ode_log_likelihood(sde, fn, u, output="score", trace="exact")
    err = np.abs(true_prior_delta(sde, res) - log_pt(sde, sde.t_min, u))
    print(f"{name}: |ODE - closed form| max {err.max():.2e} nats, mean nfe {np.mean(res.nfe):.0f}")
    assert err.max() < ODE_TOL


# ------------------------------------------------------------------ k >= 2: the bound on log p(x_0)
@pytest.mark.parametrize("name,items", K2, ids=[n for n, _ in K2])
def test_auxiliary_bound(name, items):
    sde, fn = setup(name, items)
    x_point = X_TEST[0]
    x0 = jnp.broadcast_to(jnp.asarray(x_point, jnp.float32), (BATCH, 2))
    ref = float(np.sum(norm.logpdf(x_point, MU, math.sqrt(V))))                 # log N(x0; mu, V)
    cf_gaps = {}
    for aux in lk.AUX_LAWS:
        cf_gaps[aux] = []
        for i, t_eps in enumerate((0.1, 1e-2, 1e-3)):
            res = lk.log_likelihood(sde, fn, x0, output="score", trace="exact", aux=aux, t_eps=t_eps,
                                    key=jax.random.PRNGKey(10 + i))
            # log r(a | x0) of the returned draws against a float64 Gaussian log-density
            a = np.asarray(res.u_eps, np.float64)[..., 1:]
            if aux == "forward":
                mean_r = np.outer(x_point, sde.transition_np(t=t_eps, s=0)[1:, 0])
                cov_r = sde.covariance_np(t_eps)[1:, 1:]
            else:
                mean_r, cov_r = np.zeros((2, sde.order - 1)), sde.sigma0[1:, 1:]
            np.testing.assert_allclose(res.log_q_aux, gauss_logpdf(a, mean_r, cov_r), atol=2e-3)
            np.testing.assert_array_equal(np.asarray(res.u_eps)[..., 0], np.asarray(x0))
            draws = true_prior_delta(sde, res) - np.asarray(res.log_q_aux, np.float64)
            mean, se = draws.mean(), draws.std(ddof=1) / math.sqrt(BATCH)
            e_bound, log_px = expected_bound(sde, t_eps, x_point, aux)
            print(f"{name} {aux} t_eps={t_eps:g}: MC bound {mean:.5f} +- {se:.1e}, closed form {e_bound:.5f}, "
                  f"log p_eps,X(x0) {log_px:.5f}, log N(x0; mu, V) {ref:.5f}")
            # the library's one-draw estimates average to the closed-form expected bound ...
            assert abs(mean - e_bound) <= 4 * se + ODE_TOL
            # ... which lies below log p_{eps,X}(x0) (Jensen: the gap is KL(r || p_eps(a | x0)) >= 0)
            assert e_bound <= log_px + 1e-12
            assert mean <= log_px + 4 * se + ODE_TOL
            cf_gaps[aux].append(ref - e_bound)
        # the gap to the t = 0 log-likelihood log N(x0; mu, V) shrinks with t_eps (closed form, exact numbers)
        assert cf_gaps[aux][0] > cf_gaps[aux][1] > cf_gaps[aux][2] > 0
    # measured: forward 0.16-0.56, 1e-3-7e-3, 1e-5-1.4e-4; initial 2.4-3.6, 1.2-1.3, 0.13-0.19
    assert cf_gaps["forward"][2] < 2e-4 and cf_gaps["initial"][2] > 0.1
    assert all(f < i for f, i in zip(cf_gaps["forward"], cf_gaps["initial"]))
    # and the library's estimate at t_eps = 1e-3 (forward, the last draws above have aux="initial") is
    # within its error of log N(x0; mu, V)
    res = lk.log_likelihood(sde, fn, x0, output="score", trace="exact", t_eps=1e-3, key=jax.random.PRNGKey(20))
    draws = true_prior_delta(sde, res) - np.asarray(res.log_q_aux, np.float64)
    assert abs(draws.mean() - ref) < 4 * draws.std(ddof=1) / math.sqrt(BATCH) + ODE_TOL


# ------------------------------------------------------------------ Hutchinson: unbiased
def test_hutchinson_mean_matches_exact_trace():
    sde, fn = setup("psld")                     # Q = diag(Gamma, M nu): 2x2 blocks, Rademacher has variance
    u_one = jnp.asarray([[0.7, -0.4], [-0.2, 0.9]], jnp.float32)
    u = jnp.broadcast_to(u_one, (BATCH, 2, 2))
    t_eps = 1e-3
    exact_res = lk.ode_log_likelihood(sde, fn, u, output="score", trace="exact", t_eps=t_eps)
    target = float(np.mean(exact_res.logp))
    assert np.ptp(np.asarray(exact_res.logp)) < 1e-5                              # identical copies
    for probe in lk.PROBES:
        res = lk.ode_log_likelihood(sde, fn, u, output="score", trace="hutchinson", n_probes=2, probe=probe,
                                    t_eps=t_eps, key=jax.random.PRNGKey(3))
        est = np.asarray(res.logp, np.float64)
        mean, se = est.mean(), est.std(ddof=1) / math.sqrt(BATCH)
        print(f"hutchinson {probe}: mean {mean:.4f} +- {se:.4f} (SE), exact trace {target:.4f}")
        assert se > 1e-3                                                          # really random
        assert abs(mean - target) < 4 * se


# ------------------------------------------------------------------ bits per dimension
def test_bits_per_dim_uniform_and_offsets():
    for bins in (256, 17):
        for conv in lk.CONVENTIONS:
            delta = lk.cell_width(bins, convention=conv)
            d = 64
            # the uniform density on the dequantised support (bins cells of width delta) is bins^-D
            bpd = lk.bits_per_dim(jnp.asarray(-d * math.log(bins * delta)), d, dequantize_bins=bins,
                                  convention=conv)
            assert abs(float(bpd) - math.log2(bins)) < 1e-5
    assert float(lk.bits_per_dim(0.0, 3072, dequantize_bins=256, convention="cell")) == pytest.approx(7.0)
    assert float(lk.bits_per_dim(0.0, 3072, dequantize_bins=256)) == pytest.approx(math.log2(127.5))
    assert float(lk.bits_per_dim(0.0, 64, dequantize_bins=17)) == pytest.approx(3.0)
    assert float(lk.bits_per_dim(-10 * math.log(2), 10)) == pytest.approx(1.0)


def test_bits_per_dim_discrete_gaussian():
    """Model density N(0, s^2) per dimension, 17 levels on [-1, 1]: bpd against the exact discrete P(v)."""
    bins, s = 17, 0.5
    delta = 2.0 / (bins - 1)
    levels = np.arange(bins)
    x_v = -1.0 + delta * levels
    # E_u[log N(x_v + delta (u - 1/2); 0, s^2)] = -1/2 log(2 pi s^2) - (x_v^2 + delta^2 / 12) / (2 s^2)
    e_logp = -0.5 * np.log(2 * np.pi * s ** 2) - (x_v ** 2 + delta ** 2 / 12) / (2 * s ** 2)
    bpd = np.asarray(lk.bits_per_dim(jnp.asarray(e_logp), 1, dequantize_bins=bins), np.float64)
    by_hand = (0.5 * np.log2(2 * np.pi * s ** 2) + (x_v ** 2 + delta ** 2 / 12) / (2 * s ** 2 * np.log(2))
               + np.log2((bins - 1) / 2))
    np.testing.assert_allclose(bpd, by_hand, rtol=1e-6)
    exact_bits = -np.log2(norm.cdf((x_v + delta / 2) / s) - norm.cdf((x_v - delta / 2) / s))
    gap = bpd - exact_bits
    assert np.all(gap >= -1e-6)                                                    # Jensen
    # second order: gap ~ Var_u[log p] / (2 ln 2), Var_u = (x_v delta / s^2)^2 / 12 + delta^4 / (720 s^4)
    var_u = (x_v * delta / s ** 2) ** 2 / 12 + delta ** 4 / (720 * s ** 4)
    np.testing.assert_allclose(gap, var_u / (2 * np.log(2)), rtol=0.05, atol=1e-6)
    # Monte Carlo through dequantize(): samples fall in their cells and reproduce E_u[log p]
    v = np.array([0, 5, 16])
    x = lk.dequantize(jax.random.PRNGKey(0), jnp.broadcast_to(jnp.asarray(v), (20000, 3)), bins)
    x = np.asarray(x, np.float64)
    lo = -1.0 + delta * (v - 0.5)
    assert np.all(x >= lo - 1e-6) and np.all(x < lo + delta + 1e-6)
    logp = norm.logpdf(x, 0.0, s)
    np.testing.assert_allclose(logp.mean(axis=0), e_logp[v], atol=4 * logp.std(axis=0).max() / math.sqrt(20000))
    x_cell = np.asarray(lk.dequantize(jax.random.PRNGKey(1), jnp.asarray([0, 255]), 256, convention="cell"))
    assert x_cell[0] >= -1 and x_cell[0] < -1 + 2 / 256 and x_cell[1] >= 1 - 2 / 256 and x_cell[1] < 1


# ------------------------------------------------------------------ errors
def test_clear_errors():
    sde, fn = setup("cld")
    u = jnp.zeros((2, 2, 2))
    x0 = jnp.zeros((2, 2))
    key = jax.random.PRNGKey(0)
    bad = [
        (dict(trace="hutchinsn"), "trace estimator"),
        (dict(n_probes=0), "n_probes"),
        (dict(n_probes=1.5), "n_probes"),
        (dict(probe="cauchy"), "probe distribution"),
        (dict(t_eps=0.0), "t_eps"),
        (dict(t_eps=1.0), "t_eps"),
        (dict(rtol=-1.0), "rtol"),
        (dict(solver=diffrax.Euler()), "adaptive explicit Runge-Kutta"),
        (dict(solver=diffrax.Dopri5), "solver instance"),
        (dict(output="velocity"), "model output"),
    ]
    for kwargs, msg in bad:
        with pytest.raises(ValueError, match=msg):
            lk.ode_log_likelihood(sde, fn, u, output=kwargs.pop("output", "score"), key=key, **kwargs)
    with pytest.raises(ValueError, match="shape"):
        lk.ode_log_likelihood(sde, fn, jnp.zeros((2, 2, 3)), output="score", key=key)
    with pytest.raises(ValueError, match="fn returned shape"):
        lk.ode_log_likelihood(sde, lambda uu, tt: uu[..., 0], u, output="score", key=key)
    with pytest.raises(ValueError, match="PRNG key"):
        lk.ode_log_likelihood(sde, fn, u, output="score", trace="hutchinson")
    with pytest.raises(ValueError, match="PRNG key"):
        lk.log_likelihood(sde, fn, x0, output="score", trace="exact")
    with pytest.raises(ValueError, match="batch"):
        lk.log_likelihood(sde, fn, jnp.zeros((2,)), output="score", key=key)
    with pytest.raises(ValueError, match="auxiliary law"):
        lk.log_likelihood(sde, fn, x0, output="score", key=key, aux="posterior")
    no_aux_var = families.hold([1.0], 2.0, init_var=0.0)
    with pytest.raises(ValueError, match="initial auxiliary variance"):
        lk.sample_aux(key, no_aux_var, x0, aux="initial")
    with pytest.raises(ValueError, match="no auxiliary"):
        lk.sample_aux(key, setup("vp")[0], x0)
    with pytest.raises(ValueError, match="bins"):
        lk.bits_per_dim(0.0, 4, dequantize_bins=1)
    with pytest.raises(ValueError, match="num_dims"):
        lk.bits_per_dim(0.0, 0)
    with pytest.raises(ValueError, match="convention"):
        lk.cell_width(256, convention="center")
    with pytest.raises(ValueError, match="integers in 0..16"):
        lk.dequantize(key, jnp.asarray([3, 17]), 17)


# ------------------------------------------------------------------ a modal family: blurring diffusion
BDM_SHAPE = (4, 4, 1)
BDM_KW = dict(shape=BDM_SHAPE, sigma_blur_max=3.0, d_min=0.001, logsnr_min=-10.0)
BDM_MU = 0.5 * np.cos(np.arange(16.0)).reshape(BDM_SHAPE)            # a non-flat mean image


@functools.lru_cache(maxsize=None)
def bdm_setup():
    sde = families.make("bdm", **BDM_KW)
    mix = exact.GaussianMixture.create(BDM_MU.reshape(1, -1), V)

    def fn(u, t):                                  # (batch, 4, 4, 1, 1): the exact score
        return exact.mixture_score(sde, mix, u, t)
    return sde, fn


def bdm_log_pt(t, u):
    """log p_t(u) of x_0 ~ N(mu, V I) under bdm, float64 and independent of the library: per DCT mode
    (scipy.fft.dctn, orthonormal) w_f ~ N(a_f(t) mu_f, V a_f(t)^2 + sigma_t^2), a_f from the closed form."""
    from scipy.fft import dctn
    h, w = BDM_SHAPE[:2]
    lam = np.pi ** 2 * (np.arange(h)[:, None] ** 2 / h ** 2 + np.arange(w)[None, :] ** 2 / w ** 2)[..., None]
    phi_t = math.atan(math.exp(5.0))
    s_blur = 3.0 * math.sin(math.pi * t / 2) ** 2
    a = math.cos(phi_t * t) * (0.999 * np.exp(-lam * s_blur ** 2 / 2) + 0.001)
    var = V * a ** 2 + math.sin(phi_t * t) ** 2
    wu = dctn(np.asarray(u, np.float64).reshape((-1,) + BDM_SHAPE), axes=(1, 2), norm="ortho")
    wm = dctn(BDM_MU, axes=(0, 1), norm="ortho")
    return np.sum(norm.logpdf(wu, a * wm, np.sqrt(var)), axis=(1, 2, 3))


def test_bdm_exact_trace_matches_closed_form():
    """bdm (k = 1, per-mode drift V diag(f_f) V^T): the PF-ODE log-likelihood of data points with the exact
    score equals log p_{t_min}(x_0) in closed form, and that is log N(x_0; mu, V I) up to ~1e-8."""
    sde, fn = bdm_setup()
    rng = np.random.default_rng(4)
    x_np = BDM_MU + math.sqrt(V) * rng.normal(size=(4,) + BDM_SHAPE)
    x_np[3] = BDM_MU + 1.5 * math.sqrt(V) * rng.normal(size=BDM_SHAPE)   # a less likely point
    x0 = jnp.asarray(x_np, jnp.float32)
    res = lk.log_likelihood(sde, fn, x0, output="score", trace="exact")
    x64 = np.asarray(x0, np.float64)
    ref = bdm_log_pt(sde.t_min, x64)
    gauss = np.sum(norm.logpdf(x64, BDM_MU, math.sqrt(V)), axis=(1, 2, 3))      # log N(x0; mu, V I)
    assert np.max(np.abs(ref - gauss)) < 1e-6                                      # t_min = 1e-5
    true_p_t = np.asarray(res.delta_logp, np.float64) + bdm_log_pt(sde.T, res.u_T)
    err = np.abs(true_p_t - gauss)
    print(f"bdm: |ODE - log N(x0; mu, V I)| max {err.max():.2e} nats, nfe {np.asarray(res.nfe).tolist()}, "
          f"prior mismatch {np.max(np.abs(np.asarray(res.logp) - true_p_t)):.1e}")
    assert err.max() < ODE_TOL
    # the prior N(0, sigma_T^2 I) is not p_T exactly (a_0(T) = 6.7e-3), but close: the library's own logp
    np.testing.assert_allclose(np.asarray(res.logp, np.float64), gauss, atol=5e-3)
    np.testing.assert_allclose(res.logp, res.prior_logp + res.delta_logp, rtol=1e-6, atol=1e-5)
