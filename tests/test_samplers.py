"""Samplers: gDDIM exactness on a single data point, convergence orders on exact scores, NFE, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from diffusion_jax import exact, sdes
from diffusion_jax.exact import exact_eps_fn
from diffusion_jax.samplers import prior_init, sample, time_grid

X_STAR = 0.7
T_END = 1e-3


def dirac_denoiser(u, t):
    return jnp.full(u.shape[:-1], X_STAR, u.dtype)


def reference_dirac_pf_ode(sde, u0, t_end):
    """float64 Radau solve of du/dt = F u + 1/2 G G^T Sigma_t^{-1} (u - m_t x*) (the exact PF-ODE), with its
    Jacobian I (x) (F + 1/2 G G^T Sigma_t^{-1}) given (finite differences would cost k * batch right-hand sides each)."""
    k = sde.order
    n = int(np.prod(np.shape(u0))) // k

    def parts(t):
        beta = sde.schedule.beta(np.float64(t), np)
        chol = sde.cholesky_np(t)
        return beta, np.linalg.solve(chol.T, np.linalg.solve(chol, np.eye(k))), sde.transition_np(t=t, s=0.0)[:, 0]

    def rhs(t, y):
        beta, sigma_inv, m = parts(t)
        u = y.reshape(-1, k)
        return (beta * u @ sde.A.T + 0.5 * beta * (u - X_STAR * m) @ (sde.Q @ sigma_inv).T).ravel()

    def jac(t, y):
        beta, sigma_inv, _ = parts(t)
        return np.kron(np.eye(n), beta * sde.A + 0.5 * beta * sde.Q @ sigma_inv)

    # rtol 1e-9: 1e5 below the checked 1e-4. At small t, Sigma_t^{-1} of CD-HOLD n=4 is ill-conditioned
    # (cond ~1e7), so its right-hand side is only good to ~1e-9: rtol 1e-11 moved the endpoint by 1.5e-8 and
    # cost 8x the time in rejected steps.
    sol = solve_ivp(rhs, (sde.T, t_end), np.asarray(u0, np.float64).ravel(), method="Radau", rtol=1e-9,
                    atol=1e-11, jac=jac)
    return sol.y[:, -1].reshape(np.shape(u0))


FAMS = [("vp", {}), ("cld", {}), ("psld", {}), ("told", {}), ("cdhold", {"n": 4})]


@pytest.mark.parametrize("name,params", FAMS, ids=[f[0] + str(f[1].get("n", "")) for f in FAMS])
def test_gddim_with_R_is_exact_on_a_single_point_and_L_is_not(name, params):
    sde = sdes.make(name, **params)
    u0 = prior_init(sde, jax.random.PRNGKey(0), 3, (2,))
    ref = reference_dirac_pf_ode(sde, u0, T_END)
    scale = np.abs(ref).max()
    # exact at any order: eps comes from the carried representation u = m c + R z (param.convert.carried_tables),
    # not from K^{-1} applied to the float32 state (test_solver_accuracy covers every order and NFE 1..20).
    for nfe, order in [(1, 0), (7, 0), (50, 0), (20, 1)]:
        u, info = sample(sde, dirac_denoiser, u0, method="gddim", nfe=nfe, order=order, output="denoiser",
                         K="R", t_end=T_END, predict="eps", grid="uniform")
        assert info.nfe == nfe
        err = np.abs(np.asarray(u, np.float64) - ref).max() / scale
        assert err <= 1e-4, (nfe, order, err)
    if sde.order > 1:
        u, _ = sample(sde, dirac_denoiser, u0, method="gddim", nfe=10, order=0, output="denoiser", K="L",
                      t_end=T_END, predict="eps", grid="uniform")
        err_l = np.abs(np.asarray(u, np.float64) - ref).max() / scale
        assert err_l > 1e-2, err_l        # the Cholesky parameterisation does not keep eps constant


def _errors(sde, fn, u0, ref, method, nfes, **opts):
    out = []
    for n in nfes:
        if method == "gddim":          # the eps-form on the uniform grid (tests/test_solver_accuracy.py: denoiser form)
            opts = dict(opts, predict="eps", grid="uniform")
        u, info = sample(sde, fn, u0, method=method, nfe=n, t_end=0.1, **opts)
        out.append(float(jnp.mean(jnp.linalg.norm(u - ref, axis=(1, 2)))))
    return np.array(out)


# Slope windows per convergence order p, pairwise disjoint so that a solver of the wrong order cannot pass.
# Measured at NFE 64 -> 128 (CLD ring, T -> 0.1): euler 1.09, gddim q=0 0.99, heun 2.04, gddim q=1 1.82,
# q=2 2.61, q=3 3.41 (q = 2, 3 are still pre-asymptotic there: 2.74 and 3.39 at 128 -> 256).
ORDER_WINDOWS = {1: (0.8, 1.4), 2: (1.6, 2.3), 3: (2.45, 3.05), 4: (3.2, 4.6)}


def test_convergence_orders_on_exact_mixture_scores():
    """Local slope log(err) vs log(NFE) in the smooth regime (T -> 0.1, CLD, 8-Gaussian ring): each method's
    slope lies in the window of its order (windows disjoint), and at fixed NFE each gDDIM order beats the last."""
    bounds = sorted(ORDER_WINDOWS.values())
    assert all(hi < lo for (_, hi), (lo, _) in zip(bounds, bounds[1:]))
    sde = sdes.make("cld")
    fn = exact_eps_fn(sde, exact.ring_of_gaussians())
    u0 = prior_init(sde, jax.random.PRNGKey(0), 32, (2,))
    ref, _ = sample(sde, fn, u0, method="dopri5", rtol=1e-7, atol=1e-7, t_end=0.1)
    cases = [("euler", {}, (128, 256), 1), ("heun", {}, (64, 128), 2), ("gddim", dict(order=0), (64, 128), 1),
             ("gddim", dict(order=1), (64, 128), 2), ("gddim", dict(order=2), (64, 128), 3),
             ("gddim", dict(order=3), (64, 128), 4)]
    slopes, gddim_err = {}, {}
    for method, opts, nfes, p in cases:
        err = _errors(sde, fn, u0, ref, method, nfes, **opts)
        slope = -np.log(err[1] / err[0]) / np.log(nfes[1] / nfes[0])
        slopes[(method, opts.get("order"))] = slope
        lo, hi = ORDER_WINDOWS[p]
        assert lo <= slope < hi, (method, opts, "expected order", p, err, slope)
        if method == "gddim":
            gddim_err[opts["order"]] = err[1]                 # at NFE 128
    # One more order at NFE 128 cuts the error by 3.5 or more (measured 6.5, 5.5, 3.6 for q = 0->1, 1->2, 2->3).
    for q in range(3):
        assert gddim_err[q + 1] < gddim_err[q] / 2.5, (q, gddim_err)
    print(slopes, gddim_err)


def test_diffrax_nfe_formula_matches_counted_evaluations():
    """info.nfe equals the number of times fn actually ran (counted by a host callback)."""
    sde = sdes.make("cld")
    counter = {"n": 0}

    def bump(x):
        counter["n"] += 1
        return x

    def fn(u, t):
        t = jax.experimental.io_callback(bump, jax.ShapeDtypeStruct(t.shape, t.dtype), t, ordered=True)
        return jnp.zeros_like(u) + 0.1 * u * t[:, None, None]

    import jax.experimental  # noqa: F401
    u0 = prior_init(sde, jax.random.PRNGKey(0), 4, (2,))
    for method, nfe in [("euler", 7), ("heun", 8), ("midpoint", 6), ("tsit5", 13), ("dopri5", None),
                        ("gddim", 5), ("sscs", 4), ("edm_heun", 9), ("euler_maruyama", 5)]:
        counter["n"] = 0
        opts = dict(rtol=1e-4, atol=1e-4) if nfe is None else {}          # only the adaptive methods read them
        _, info = sample(sde, fn, u0, method=method, nfe=nfe, key=jax.random.PRNGKey(1), **opts)
        assert counter["n"] == info.nfe, (method, counter["n"], info.nfe)
        if nfe is not None:
            assert info.nfe <= nfe


def test_trajectory_and_denoiser_outputs():
    sde = sdes.make("told")
    u0 = prior_init(sde, jax.random.PRNGKey(0), 2, (3,))
    u, info = sample(sde, dirac_denoiser, u0, method="gddim", nfe=6, order=1, output="denoiser",
                     return_trajectory=True)
    assert info.trajectory.shape == (7, 2, 3, 3) and info.denoised.shape == (6, 2, 3)
    assert np.allclose(info.trajectory[0], u0) and np.allclose(info.trajectory[-1], u)
    assert np.allclose(info.denoised, X_STAR, atol=1e-3)


@pytest.mark.parametrize("kind", ["uniform", "quadratic", "logsnr", "edm"])
def test_time_grids_are_decreasing_and_hit_the_ends(kind):
    sde = sdes.make("vp")
    g = time_grid(sde, 10, kind, t_end=1e-3)
    assert g[0] == 1.0 and g[-1] == 1e-3 and np.all(np.diff(g) < 0)
    if kind == "logsnr":   # VP: log SNR = -log(e^B - 1) is equally spaced
        b = 0.1 * g + 0.5 * 19.9 * g ** 2
        assert np.allclose(np.diff(-np.log(np.expm1(b))), np.diff(-np.log(np.expm1(b)))[0], rtol=1e-6)


def test_bad_input():
    sde = sdes.make("cld")
    u0 = prior_init(sde, jax.random.PRNGKey(0), 2, (2,))
    fn = lambda u, t: jnp.zeros_like(u)
    with pytest.raises(ValueError, match="unknown sampling method 'rk9'"):
        sample(sde, fn, u0, method="rk9", nfe=10)
    with pytest.raises(ValueError, match="nfe must be an integer >= 1"):
        sample(sde, fn, u0, method="gddim", nfe=0)
    with pytest.raises(ValueError, match="order 3 needs 4 eps values"):
        sample(sde, fn, u0, method="gddim", nfe=3, order=3)
    with pytest.raises(ValueError, match="order must be an integer in 0..3"):
        sample(sde, fn, u0, method="gddim", nfe=30, order=5)
    with pytest.raises(ValueError, match=r"network returned shape \(2, 2\), expected \(2, 2, 2\)"):
        sample(sde, lambda u, t: u[..., 0], u0, method="euler", nfe=4)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        sample(sde, fn, u0, method="euler_maruyama", nfe=4)
    with pytest.raises(ValueError, match="u_init must have shape"):
        sample(sde, fn, u0[..., :1], method="euler", nfe=4)
    with pytest.raises(ValueError, match="unknown time grid"):
        sample(sde, fn, u0, method="gddim", nfe=4, grid="cosine")
    with pytest.raises(ValueError, match="heun needs nfe >= 2"):
        sample(sde, fn, u0, method="heun", nfe=1)
