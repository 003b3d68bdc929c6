"""HSM / DSM losses: for Gaussian data the exact optimal eps attains the loss's closed-form minimum.

Data x_0 ~ N(mu, v) per dimension. With C = v m m^T + Sigma_t (the law of u_t) and K K^T = Sigma_t:

* HSM target z with u = m x_0 + K z: min E|eps - z|^2 = tr(I - K^T C^{-1} K);
* DSM target M z' (M = K^T K'^{-T}) with u = Phi u_0 + K' z': min = tr(M (I - K'^T C^{-1} K') M^T);
* likelihood weighting multiplies the error by W = sqrt(beta) G_0^T K^{-T}: min = tr(W Cov W^T).

The closed forms are computed here in float64 numpy from the core's host tables; the optimal eps is
:func:`diffusion_jax.exact.mixture_eps` (independent of the loss code). Shifting eps by c adds |W c|^2 (k c^2 for the eps weighting),
checked on the paired per-example difference of the two losses (same draws) against its own standard error.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import exact
from diffusion_jax.training import losses
from diffusion_jax.param import square_root
from diffusion_jax.sdes import families


MU, VAR, DIM, N = 0.3, 0.25, 4, 12000


def _closed_form(sde, K, t, objective, weighting):
    k = sde.order
    kt = square_root(sde, K).np(t)
    m = sde.transition_np(t=t, s=0.0)[:, 0]
    c = VAR * np.outer(m, m) + sde.covariance_np(t)
    if objective == "hsm":
        cov = np.eye(k) - kt.T @ np.linalg.solve(c, kt)
    else:
        kc = sde.known_start().cholesky_np(t)
        mm = kt.T @ np.linalg.inv(kc).T
        cov = mm @ (np.eye(k) - kc.T @ np.linalg.solve(c, kc)) @ mm.T
    if weighting == "likelihood":
        beta = float(sde.schedule.beta(np.float64(t), np))
        w = np.sqrt(beta) * sde.noise_factor.T @ np.linalg.inv(kt).T
        cov = w @ cov @ w.T
    return float(np.trace(cov))


CASES = [("vp", {}, "hsm", "R"), ("cld", {}, "hsm", "R"), ("cld", {}, "dsm", "R"), ("cld", {}, "hsm", "L"),
         ("cld", {}, "dsm", "L"), ("cdhold", {"n": 3}, "hsm", "R"), ("cdhold", {"n": 3}, "dsm", "L"),
         ("psld", {}, "hsm", "L"), ("psld", {}, "dsm", "R")]


@pytest.mark.parametrize("name,params,objective,K", CASES)
@pytest.mark.parametrize("weighting", ["eps", "likelihood"])
def test_optimal_eps_attains_closed_form_minimum(name, params, objective, K, weighting):
    sde = families.make(name, **params)
    sqrt = square_root(sde, K)
    mix = exact.GaussianMixture.create(np.full((1, DIM), MU), VAR)
    t_val = 0.3
    t = jnp.full((N,), t_val)
    x0 = MU + np.sqrt(VAR) * jax.random.normal(jax.random.PRNGKey(1), (N, DIM))

    def optimal(shift):
        def eps_fn(u, tt):
            return exact.mixture_eps(sde, mix, u, tt, sqrt) + shift
        return eps_fn

    expected = _closed_form(sde, K, t_val, objective, weighting)
    run = jax.jit(lambda key, shift: losses.score_matching_loss(
        optimal(shift), sde, sqrt, key, x0, objective=objective, weighting=weighting, t=t))
    loss, aux = run(jax.random.PRNGKey(2), 0.0)
    # Moving eps off the optimum by c (every component) raises the loss by |W c|^2 (k c^2 for the eps
    # weighting): per example the change is |W (e + c)|^2 - |W e|^2 = 2 (W c).(W e) + |W c|^2 and the optimal
    # error e has conditional mean 0. Paired on the same draws, the change's mean has a standard error
    # ~ 2 |W c| sd(W e) / sqrt(N DIM), a few per cent of |W c|^2 at c = 1, so a wrongly weighted loss fails.
    c = 1.0
    _, aux_c = run(jax.random.PRNGKey(2), c)
    diff = np.asarray(aux_c["per_example"], np.float64) - np.asarray(aux["per_example"], np.float64)
    if weighting == "eps":
        gain = sde.order * c * c
    else:
        beta = float(sde.schedule.beta(np.float64(t_val), np))
        w = np.sqrt(beta) * sde.noise_factor.T @ np.linalg.inv(sqrt.np(t_val)).T
        gain = float(np.sum((w @ np.full(sde.order, c)) ** 2))
    se_diff = float(np.std(diff) / np.sqrt(N))
    assert 4 * se_diff < 0.05 * gain, (se_diff, gain)    # the check below resolves a 5 % error in the gain
    assert abs(float(np.mean(diff)) - gain) < 4 * se_diff + 1e-5 * gain, (float(np.mean(diff)), gain, se_diff)
    se = float(np.std(aux["per_example"]) / np.sqrt(N))
    assert abs(float(loss) - expected) < 4 * se + 1e-5 * expected, (float(loss), expected, se)
    print(f"{name} {objective} {K} {weighting}: 4 SE / gain = {4 * se_diff / gain:.3f}")


def test_stratified_times_cover_the_interval():
    t = np.asarray(losses.stratified_times(jax.random.PRNGKey(0), 1000, 1e-5, 1.0))
    assert t.min() >= 1e-5 and t.max() <= 1.0
    # One point per 1/1000 of the interval: every bin of width 1/100 holds exactly 10.
    counts = np.histogram(t, bins=100, range=(1e-5, 1.0))[0]
    assert counts.min() >= 9 and counts.max() <= 11


@pytest.mark.parametrize("kwargs,match", [(dict(objective="sm"), "objective"),
                                          (dict(weighting="mle"), "weighting"),
                                          (dict(t_eps=0.0), "t_eps")])
def test_bad_loss_options(kwargs, match):
    sde = families.make("cld")
    opts = dict(objective="hsm", weighting="eps", t_eps=1e-5) | kwargs
    with pytest.raises(ValueError, match=match):
        losses.check_loss_options(sde, **opts)
